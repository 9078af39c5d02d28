"""Builds and loads batchnorm.c, the CPU kernel behind nas.model.BatchNormAct2d(batchnorm="native").

It is compiled on first use with the system's C compiler ($CC, else Python's, else `cc`) for this
CPU (-march=native), and kept in the cache directory under a name that hashes the source, the flags,
the compiler and the CPU, so a home directory shared by different machines holds one build each.
Without a compiler, off Linux, or on a PyTorch not built on GNU OpenMP, `library()` raises
KernelUnavailable: the kernel is opt-in, and a model that asked for it never silently runs without it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from nas.cache import cache_dir
from nas.errors import NasError

SOURCE = Path(__file__).with_name("batchnorm.c")
# -ffp-contract=off: no fused multiply-adds, so the forward's ReLU test and the backward's
# recomputation of it round alike (batchnorm.c, affine_columns).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT = 120  # seconds; a build takes about one on 2 cores


def compiler() -> list[str] | None:
    """The C compiler command, or None if there is none."""
    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not command or shutil.which(command[0]) is None:
        return None
    return command


def cpu_description() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def build(command: list[str], target: Path) -> None:
    """Compiles the kernel to `target`, atomically: concurrent workers may build it at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*command, *FLAGS, str(SOURCE), "-o", temporary], check=True, capture_output=True,
                       text=True, timeout=COMPILE_TIMEOUT)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _torch_uses_gnu_openmp() -> bool:
    """Whether PyTorch's OpenMP runtime is GNU's libgomp, which the kernel (built with gcc -fopenmp or
    clang against libgomp) then shares, threads and all, instead of loading one of its own."""
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nas_batchnorm_forward.argtypes = [pointer, pointer, size, size, size, pointer, pointer, ctypes.c_double,
                                          flag, flag, pointer, pointer, pointer, pointer, ctypes.c_double, pointer]
    lib.nas_batchnorm_backward.argtypes = [pointer, pointer, pointer, size, size, size, pointer, pointer,
                                           pointer, pointer, flag, flag, pointer, pointer]
    lib.nas_batchnorm_inference.argtypes = [pointer, pointer, size, size, size, pointer, pointer, pointer, pointer,
                                            ctypes.c_double, flag, flag]
    lib.nas_batchnorm_forward.restype = lib.nas_batchnorm_backward.restype = flag
    lib.nas_batchnorm_inference.restype = flag
    return lib


class KernelUnavailable(NasError):
    """The C BatchNorm kernel can't be had here; the message says why in one line."""


@functools.cache
def _load() -> ctypes.CDLL | KernelUnavailable:
    """The loaded kernel, built first if needed, or why it can't be (kept too: a failed build is
    not retried in this process)."""
    if not _torch_uses_gnu_openmp():
        # Off Linux, or a PyTorch on Intel's or LLVM's OpenMP (or none): the kernel would bring a
        # runtime of its own, and two would fight over the cores.
        return KernelUnavailable("the native BatchNorm kernel needs Linux and a PyTorch that uses GNU OpenMP "
                                 "(libgomp); this one does not")
    command = compiler()
    if command is None:
        return KernelUnavailable("the native BatchNorm kernel needs a C compiler, and none was found (set CC)")
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, cpu_description(),
                                        platform.machine()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"batchnorm-{key}.so"
        if not target.exists():
            build(command, target)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as error:
        lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        # The compiler's first error says why; its last line is often just "compilation terminated."
        reason = next((line for line in lines if "error" in line), lines[-1] if lines else type(error).__name__)
        return KernelUnavailable(f"could not build the native BatchNorm kernel: {reason.strip()}")


def library() -> ctypes.CDLL:
    """The loaded kernel; raises KernelUnavailable where it can't be built or loaded."""
    loaded = _load()
    if isinstance(loaded, KernelUnavailable):
        raise loaded
    return loaded


def available() -> bool:
    return not isinstance(_load(), KernelUnavailable)
