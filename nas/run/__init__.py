"""How a model is trained on this machine, beside its architecture and training config.

- record: RunRecord, what one run did (device, threads, precision, memory format, BatchNorm path,
  weight average, compile, subset, seed), stored with every trial and checkpoint;
- device: the device and autocast precision a name asks for, checked against this machine;
- setup: RunSettings, what the command line asked for, and resolve_run, which turns them into a
  RunRecord for one architecture (on a CPU by timing the candidates: choose_setup).
"""
