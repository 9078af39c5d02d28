"""CPU specializations, in one place and a leaf (nothing here imports the rest of nas): glibc
allocator tuning (allocator), the CPU's name (info), and the opt-in C BatchNorm+ReLU kernel with its
loader (native, batchnorm; nas.model.build_model(..., batchnorm="native") selects it). Choosing
precision and memory format by measurement is nas.train.setup's job: it times training steps.

Only entry points call tune_allocator: it changes malloc for the whole process, for good."""

from nas.cpu.allocator import allocator_tuned, tune_allocator
from nas.cpu.info import cpu_model
from nas.cpu.native import KernelUnavailable

__all__ = ["KernelUnavailable", "allocator_tuned", "cpu_model", "tune_allocator"]
