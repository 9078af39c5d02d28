"""How a model is trained on this machine, beside its architecture and training config.

- record: RunRecord, what one run did (device, threads, precision, memory format, BatchNorm path,
  weight average, compile, subset, seed), stored with every trial and checkpoint;
- device: the device and autocast precision a name asks for, checked against this machine.

A leaf below nas.model and nas.train, which read the record; turning a command's settings into a
record by timing training steps needs the trainer, so it lives above them, in nas.train.setup.
"""
