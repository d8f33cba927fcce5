"""The balancer: bins the sample stream per output and emits balanced sample sets (Balancing v1..v4).

The logic is socket-free (:class:`Balancer`); the service main wires it to ``sample.*`` in and ``set.*``
out. Pictures (matplotlib) live in :mod:`charles.balancer.plot` and are imported only when drawn.

Imports: core (its section is charles.sections.balancer; datasets are charles.dataset) and charles.proto;
no other service. ``dataset`` is ``charles dataset info|plot``.
"""

from charles.balancer.balancer import Balancer, BalancerStats, GroupStats
from charles.sections.balancer import BalancerConfig

__all__ = ["Balancer", "BalancerConfig", "BalancerStats", "GroupStats"]
