"""Runs: configs, the training loop and its log, checkpoints, workdirs, devices and processes.

Modules:
  config_utils: loading configs, sensor-derived fields, field checks, `config.json`.
  train_lib: train state, steps, `train_and_evaluate`.
  train_log: metric writer (JSON lines, TensorBoard), step lines, NaN guard.
  summaries: what a run tells its user (compile line, validation images, closing summary).
  checkpointing: orbax checkpoints (save with checksums, select, restore, fall back).
  workdir: the lock, the shared-workdir check, the stored-config comparison.
  sharding: the one device mesh and the shardings given to `jax.jit`.
  distributed: multi-process launch, agreement between processes, preemption.
  logging_utils: console verbosity.
"""
