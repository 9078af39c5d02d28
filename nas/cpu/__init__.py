"""CPU specializations, in one place: glibc allocator tuning (allocator), the measured choice of
precision and memory format (setup), and the opt-in C BatchNorm+ReLU kernel with its loader
(native, batchnorm; nas.model.build_model(..., batchnorm="native") selects it).

Only entry points call tune_allocator: it changes malloc for the whole process, for good."""

from nas.cpu.allocator import tune_allocator
from nas.cpu.native import KernelUnavailable
from nas.cpu.setup import PRECISIONS, Setup, bf16_supported, choose_setup, cpu_model, resolve_precision

__all__ = ["PRECISIONS", "KernelUnavailable", "Setup", "bf16_supported", "choose_setup", "cpu_model", "resolve_precision",
           "tune_allocator"]
