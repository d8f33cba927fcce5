from charles.cli import entry

entry()
