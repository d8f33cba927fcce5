"""The driver's view of the world: what a model sees each tick and what it does, in one place.

Training and driving must see the same thing. Collectors, the player (and its DAgger samples), the capture
agent, the sim agent, ``charles eval`` and the Gymnasium adapters all build their inputs and read their
outputs with these modules, so there is one of each rule:

- ``shape``    :class:`InputShape`: what the model line needs of each tick (resolution, stacked frames,
  history rows).
- ``frames``   fitting a picture to the model's input (the one resize) and the codec round trip.
- ``past``     the history ring (rows of the ticks *before* now) and the frame stack.
- ``controls`` the wire's ranges, the one clamp, the one throttle/brake split and combination, the one
  angle wrap.
- ``unstuck``  Unstuck: when a car is stuck, and the recovery's phases (fade, teleport, settle, fade).
- ``samples``  the tick rate, a tick as a source saw it (:class:`Capture`), the sample builder with its
  timing rule (a tick becomes history only after its own sample is built) and the sample encoder.
- ``policy``   :class:`ModelPolicy`: weights in, controls out, on exactly the inputs the trainer saw.
- ``gym``      reading a Gymnasium observation, and the action adapters between (steering, throttle_brake)
  and an env's own action layout ([steer, gas, brake], a discrete table...).

Imports: ``charles.proto`` only (and ``charles.model`` lazily, when a ModelPolicy is made), so every
process can use it without pulling in torch, the sim or a service. tests/test_architecture.py holds it to
that.
"""
