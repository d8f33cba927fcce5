"""The trainer: balanced sets in, a model trained on them, checkpoints and weights for players out.

Its section (TrainerConfig, BufferConfig, StorageConfig) is charles.sections.trainer. One idea per module: ``buffers`` and ``storage`` (the sample pools and
their on-disk mirror), ``batches`` (decoding and collating), ``training`` (the model, optimizer and
joining a torchrun job), ``launch`` (starting one: several training processes from one command), ``checkpoint`` and ``initial`` (what weights are saved and where a new run starts), ``runs``
(run directories and which run a process trains), ``resume`` (where training continues), ``receiver``
(the receive loop), ``reporting`` (metrics, rates, TensorBoard), ``console`` (the console view), and
``service``, the thin wiring of those to the bus. ``runs`` and ``checkpoint`` are the public API for
the player, benches and tools (``newest_weights``, ``find_run``).

It imports charles.proto, the core modules (config, runtime, outputs, version, cli) and charles.model, and no
other service: what the balancer balances reaches it through the run configuration and the heartbeats.
"""
