"""Neural-architecture search for tiny CNNs under hard budgets, on Optuna and PyTorch.

Three layers, then the commands:
- stages, which take values and return values: spec (architecture, presets, counts), space (the
  search space), studyfile (a study's TOML description), data, model (builder, layer table), train
  (the loop, checkpoints, and train.setup: a command's run settings resolved, by measurement, into
  a run record);
- plumbing: errors (NasError, the one base of nas's errors), run (the run record and the device,
  below model and train), storage, workers (spawned processes), cpu (CPU-only speed-ups, a leaf);
- study logic over Optuna: study (objective, sampler and pruner, creation and warm start, ranking,
  stored studies, confirm, report) and experiments (what the benchmark commands measure);
- cli: one thin module per command; `python -m nas.<command>` reaches it through a shim.
"""
