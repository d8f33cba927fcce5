"""The trainer: balanced sets in, buffers (mirrored to SQLite), training, checkpoints, weights out.

Its section (TrainerConfig, with BufferConfig and StorageConfig) is charles.sections.trainer.
Imports: core, charles.proto, charles.model; no other service.
"""
