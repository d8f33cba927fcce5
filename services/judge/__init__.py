"""The judge: the live driving score. Now and then it drives the newest weights of each version on held-out
sim towns and publishes km between Unstucks, on-road fraction, collisions/km and mean speed (the NPC's on
the same towns as the reference) beside the loss: whether the car drives better shows while it trains.

The logic is socket-free (:class:`Judge`: weights held per version, when each is due, the bounded curve);
the service (:mod:`charles.judge.service`) wires it to ``weights.<line>*`` in and ``score.<run>``,
``console.<instance>``, ``/metrics`` and TensorBoard out. The driving is charles.evaluate's, the code
``charles eval`` drives with.

Imports: core (its section is charles.sections.judge), charles.proto, charles.model, charles.drive and
charles.sim (through charles.evaluate); no other service.
"""

from charles.judge.judge import Candidate, Curve, Judge
from charles.sections.judge import JudgeConfig

__all__ = ["Candidate", "Curve", "Judge", "JudgeConfig"]
