"""charles.agents — the two processes that run on the Windows game PC and connect in to the broker.

- ``capture``  ``python -m charles.agents.capture``: frames (dxcam) + telemetry (a DeepGTAV-protocol mod,
  or a person's pad) -> ``sample.<id>`` (collect) or ``game.<id>`` (play); Unstuck through the mod.
- ``gamepad``  ``python -m charles.agents.gamepad``: ``action.<id>`` from allowed players -> a virtual
  Xbox 360 pad (vgamepad); which actions pass is charles.pad (shared with the sim agent).
- ``deepgtav`` the DeepGTAV protocol client (framing, padded BGR frames, reconnect with back-off), Charles'
  extension of it (game clock, tick, alternate cameras, autopilot override) and the public mod's speed fix.
- ``timing``   telemetry matched to a capture's time (interpolated), the skew, the game clock.
- ``devices``  the OS boundary (dxcam, XInput, vgamepad) behind small protocols; fakes on Linux.
- ``common``   agent configuration (one YAML per agent), the bus checks, a fixed-rate clock.

Install on the game PC with ``pip install -e ".[agents]"`` (dxcam and vgamepad are Windows-only); see README.md here.

Imports: core, charles.proto, charles.drive (sample building, Unstuck, controls); never a service and
never charles.sim (what both need lives lower down).
"""
