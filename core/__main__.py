import sys

from charles.cli import main

sys.exit(main())
