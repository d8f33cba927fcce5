"""charles (folder core/): what every process shares — the run configuration (``config``, ``sections``),
the process runtime (``runtime``: Service, sockets, heartbeats, metrics), output kinds and bins
(``outputs``), the topology facts and checkers (``topology``), the local launcher (``launcher``), the
pad gate shared by the gamepad and sim agents (``pad``), ``charles eval`` (``evaluate``), the CLI.

Imports: charles.proto, charles.drive, charles.sim, charles.model (lazily); never a service package
(broker, collector, balancer, trainer, player, viewer): services import core, not the other way round.
tests/test_architecture.py holds every package to its rule.
"""
