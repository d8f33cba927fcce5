"""The collector: drives a game (the built-in sim, a remote game, a Gymnasium env) and streams samples,
or replays a recorded dataset.

- ``sources``  where driving comes from: SimSource, GameSource, GymSource, DatasetSource (a recording
               replayed; charles.dataset) (the Source protocol).
- ``sender``   the bounded queue and thread that encode (charles.drive's Encoder) and publish samples.
- ``service``  the process: configuration from the broker, the tick loop (charles.drive's SampleBuilder).

Imports: core, charles.proto, charles.drive, charles.sim; no other service.
"""
