import json
import math
import platform
import subprocess
import sys

import pytest
import torch

from nas.cpu import KernelUnavailable, native
from nas.errors import NasError
from nas.model import build_model
from nas.run.device import DeviceError, bf16_supported, resolve_precision
from nas.spec import ArchSpec, BlockSpec
from nas.train import setup as cpu_setup
from nas.train.setup import Setup, choose_setup

TINY = ArchSpec(blocks=(BlockSpec((4, 8), padding=1), BlockSpec((8,))), tail=(8,))

FAULT_PROBE = """
import resource, torch
from nas.cpu import tune_allocator
print(tune_allocator())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():  # what a training step does: make, use and free megabyte-sized tensors
    a = torch.ones(2 << 20)
    return float((a * 2)[-1])
for _ in range(5):
    cycle()
per_cycle = []
for _ in range(20):
    before = faults()
    cycle()
    per_cycle.append(faults() - before)
print(sum(f > 1000 for f in per_cycle))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    """Each cycle touches 16 MB (4,096 pages). Tuned, freed blocks are reused: a cycle may touch
    fresh heap once in a while (the heap moves on), but does not fault its memory back every time."""
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, check=True)
    tuned, faulting_cycles = out.stdout.split()
    assert tuned == "True"
    assert int(faulting_cycles) <= 2


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "fp32")
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def fake_timings(monkeypatch, ms: dict[tuple[str, bool], float]) -> list:
    """Replace the step timer with fixed per-setup times; returns the (setup, batchnorm) pairs it timed."""
    calls = []

    def timed(arch, batch_size, device, setup, batchnorm):
        calls.append((setup, batchnorm))
        return ms[(setup.precision, setup.channels_last)] / 1000

    monkeypatch.setattr(cpu_setup, "_time_steps", timed)
    monkeypatch.setattr(cpu_setup, "_TUNED", {})
    return calls


def test_choose_setup_keeps_fp32_nchw_unless_another_is_clearly_faster(monkeypatch, tmp_path):
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    # Within the 10% margin: the seed's numerics win.
    fake_timings(monkeypatch, {("fp32", False): 20.0, ("fp32", True): 19.5, ("bf16", False): 19.8, ("bf16", True): 19.2})
    assert choose_setup(TINY, 64, cpu) == Setup("fp32", False)
    # Clearly faster: taken.
    fake_timings(monkeypatch, {("fp32", False): 20.0, ("fp32", True): 30.0, ("bf16", False): 25.0, ("bf16", True): 12.0})
    (tmp_path / "cpu-setup.json").unlink()
    expected = Setup("bf16", True) if bf16_supported(cpu) else Setup("fp32", False)
    assert choose_setup(TINY, 64, cpu) == expected


def test_choose_setup_is_measured_once_then_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    calls = fake_timings(monkeypatch, {("fp32", False): 20.0, ("fp32", True): 10.0, ("bf16", False): 30.0, ("bf16", True): 30.0})
    first = choose_setup(TINY, 64, cpu, "fp32")
    assert first == Setup("fp32", True)
    assert {(s.precision, s.channels_last) for s, _ in calls} == {("fp32", False), ("fp32", True)}  # fp32 asked: no bf16
    timed = len(calls)
    assert choose_setup(TINY, 64, cpu, "fp32") == first and len(calls) == timed  # this process remembers
    # A new process (empty memory) reads the file: same answer, nothing timed, even if timings changed.
    calls = fake_timings(monkeypatch, {("fp32", False): 10.0, ("fp32", True): 20.0, ("bf16", False): 30.0, ("bf16", True): 30.0})
    assert choose_setup(TINY, 64, cpu, "fp32") == first and calls == []
    # Another batch size is another measurement.
    assert choose_setup(TINY, 128, cpu, "fp32") == Setup("fp32", False) and calls
    # A damaged cache file is measured over, not an error.
    for damaged in ("{not json", "[1, 2]", json.dumps({key: {"precision": "fp8"} for key in json.loads(
            (tmp_path / "cpu-setup.json").read_text())})):
        (tmp_path / "cpu-setup.json").write_text(damaged)
        calls = fake_timings(monkeypatch, {("fp32", False): 10.0, ("fp32", True): 20.0, ("bf16", False): 30.0,
                                           ("bf16", True): 30.0})
        assert choose_setup(TINY, 64, cpu, "fp32") == Setup("fp32", False) and calls


def test_choose_setup_times_the_batchnorm_path_that_will_run(monkeypatch, tmp_path):
    """The kernel changes which setup is fastest, so each path is measured, and cached, on its own."""
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    calls = fake_timings(monkeypatch, {("fp32", False): 20.0, ("fp32", True): 10.0})
    assert choose_setup(TINY, 64, cpu, "fp32") == Setup("fp32", True)
    assert {batchnorm for _, batchnorm in calls} == {"pytorch"}
    calls = fake_timings(monkeypatch, {("fp32", False): 10.0, ("fp32", True): 20.0})
    assert choose_setup(TINY, 64, cpu, "fp32", batchnorm="native") == Setup("fp32", False)
    assert calls and {batchnorm for _, batchnorm in calls} == {"native"}
    assert choose_setup(TINY, 64, cpu, "fp32") == Setup("fp32", True)  # the pytorch entry is kept


def test_short_runs_are_not_measured_for(monkeypatch, tmp_path):
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    calls = fake_timings(monkeypatch, {("fp32", False): 20.0, ("fp32", True): 10.0, ("bf16", False): 9.0, ("bf16", True): 8.0})
    assert choose_setup(TINY, 64, torch.device("cpu"), steps=100) == Setup("fp32", False)
    assert calls == [] and not (tmp_path / "cpu-setup.json").exists()
    assert choose_setup(TINY, 64, torch.device("cpu"), steps=10_000) != Setup("fp32", False) and calls


def test_a_setup_is_timed_for_real():
    """Seconds per step, measured: a positive, finite number (how many depends on the machine)."""
    for setup in (Setup("fp32", False), Setup("fp32", True)):
        seconds = cpu_setup._time_steps(TINY, 8, torch.device("cpu"), setup)
        assert seconds > 0 and math.isfinite(seconds)


def test_a_setup_is_timed_for_real_on_the_kernel(kernel):
    seconds = cpu_setup._time_steps(TINY, 8, torch.device("cpu"), Setup("fp32", True), "native")
    assert seconds > 0 and math.isfinite(seconds)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch, fresh_kernel):
    """A cache directory with no kernel built in it yet, and none loaded."""
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_kernel_is_built_once_and_kept(empty_cache, kernel, monkeypatch):
    assert len(list(empty_cache.glob("batchnorm-*.so"))) == 1
    native._load.cache_clear()  # a new process
    monkeypatch.setattr(native, "build", lambda *args: pytest.fail("built again"))
    assert native.available()


@pytest.mark.parametrize("compiler,reason", [("/nonexistent/cc", "needs a C compiler"),
                                             ("false", "could not build")])
def test_without_a_working_compiler_the_kernel_is_refused(compiler, reason, empty_cache, monkeypatch):
    """Asking for the kernel where it can't be built is a one-line error saying why, never a silent
    fallback; the default path still builds and trains."""
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(native, "_torch_uses_gnu_openmp", lambda: True)
    assert not native.available()
    with pytest.raises(KernelUnavailable, match=reason) as refused:
        build_model(TINY, batchnorm="native")
    assert isinstance(refused.value, NasError) and "\n" not in str(refused.value)
    assert not list(empty_cache.glob("*.so"))
    model = build_model(TINY).to(memory_format=torch.channels_last)
    model(torch.randn(4, 1, 28, 28)).sum().backward()


def test_the_kernel_is_refused_without_gnu_openmp(empty_cache, monkeypatch):
    monkeypatch.setattr(native, "_torch_uses_gnu_openmp", lambda: False)
    with pytest.raises(KernelUnavailable, match="GNU OpenMP"):
        build_model(TINY, batchnorm="native")
