"""How a model runs on this machine: autocast precision and memory format, measured per CPU.

The fastest of {fp32, bf16 where native} x {NCHW, channels_last} differs from one CPU to the next,
so choose_setup times a few optimizer steps of each candidate, as cudnn.benchmark times convolution
algorithms, and keeps the answer in a cache file so the same command on the same machine keeps
making the same choice, and so the same numbers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nas.cache import cache_dir
from nas.cpu import allocator_tuned, cpu_model
from nas.model import build_model
from nas.run.device import bf16_supported, resolve_device, resolve_precision
from nas.run.record import RunRecord
from nas.spec import ArchSpec, TrainConfig
from nas.train import autocast, make_optimizer, planned_steps

TUNE_WARMUP_STEPS = 3
TUNE_STEPS = 6
TUNE_ROUNDS = 2
TUNE_MARGIN = 0.10  # another setup must beat plain fp32 NCHW (the seed's numerics) by this much: more than noise
# Measuring costs about 2 x 4 x 9 optimizer steps; a run shorter than this can't earn that back
# (the best setup saves up to ~30% of a step), so it runs as fp32 NCHW unmeasured.
TUNE_MIN_STEPS = 500
# Part of the cache key: a cached choice was measured on the code that ran then. Bumped whenever a
# candidate gets faster or slower by a change here (2: nas.model's channels-last batch norm; 3: its
# C kernel; 4: the kernel opt-in, the BatchNorm path part of the key).
TUNE_VERSION = 4


@dataclass(frozen=True)
class Setup:
    """How a model is run: autocast precision and memory format. Both change the numbers a little,
    so a stored trial records them and a replay repeats them."""

    precision: str  # "fp32" or "bf16"
    channels_last: bool

    def __str__(self) -> str:
        return f"{self.precision}, {'channels_last' if self.channels_last else 'NCHW'}"


def choose_setup(arch: ArchSpec, batch_size: int, device: torch.device, precision: str = "auto",
                 steps: int | None = None, batchnorm: str = "pytorch") -> Setup:
    """The setup to train `arch` with, its BatchNorm on the `batchnorm` path. On CUDA: bf16
    autocast where supported (or `precision`), channels_last. On CPU the fastest candidate, measured
    (a few optimizer steps of this architecture and batch size each); another setup wins over fp32
    NCHW only by more than TUNE_MARGIN. The answer is kept per process and in a cache file
    ($NAS_CACHE_DIR, default ~/.cache/nas) keyed by everything the timings depend on. A run of fewer
    than TUNE_MIN_STEPS `steps` is not worth measuring for: it gets the first candidate."""
    if device.type != "cpu":
        return Setup(resolve_precision(precision, device), channels_last=True)
    if precision == "auto":
        precisions = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    else:
        precisions = [resolve_precision(precision, device)]
    candidates = [Setup(p, cl) for p in precisions for cl in (False, True)]
    if steps is not None and steps < TUNE_MIN_STEPS:
        return candidates[0]
    key = _tuning_key(arch, batch_size, device, precision, batchnorm)
    cached = _TUNED.get(key) or _read_tuning_cache().get(key)
    if isinstance(cached, dict):
        setup = Setup(cached.get("precision"), cached.get("channels_last"))
        if setup in candidates:  # anything else in the file is measured over
            _TUNED[key] = cached
            return setup
    seconds = {c: math.inf for c in candidates}
    for _ in range(TUNE_ROUNDS):  # interleaved, best of rounds: other load only ever adds time
        for candidate in candidates:
            seconds[candidate] = min(seconds[candidate], _time_steps(arch, batch_size, device, candidate, batchnorm))
    baseline = candidates[0]
    best = min(candidates, key=seconds.__getitem__)
    if seconds[best] > (1 - TUNE_MARGIN) * seconds[baseline]:
        best = baseline
    entry = {"precision": best.precision, "channels_last": best.channels_last,
             "ms_per_step": {str(c): round(1000 * s, 2) for c, s in seconds.items()}}
    _TUNED[key] = entry
    _write_tuning_cache(key, entry)
    return best


_TUNED: dict[str, dict] = {}


def _tuning_key(arch: ArchSpec, batch_size: int, device: torch.device, precision: str, batchnorm: str) -> str:
    facts = {"version": TUNE_VERSION, "cpu": cpu_model(),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
             "allocator_tuned": allocator_tuned(), "batchnorm": batchnorm,
             "precision": precision, "batch_size": batch_size, "arch": arch.to_dict()}
    return hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _read_tuning_cache() -> dict[str, dict]:
    try:
        cache = json.loads((cache_dir() / "cpu-setup.json").read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or one we can't read: measure again
    return cache if isinstance(cache, dict) else {}


def _write_tuning_cache(key: str, entry: dict) -> None:
    path = cache_dir() / "cpu-setup.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_tuning_cache()
        cache[key] = entry
        # Written whole to a temporary file and renamed: concurrent workers never see half a file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-measuring next time


def _time_steps(arch: ArchSpec, batch_size: int, device: torch.device, setup: Setup,
                batchnorm: str = "pytorch") -> float:
    """Seconds per optimizer step of `arch` on random data in `setup` (global RNG untouched)."""
    generator = torch.Generator(device=device).manual_seed(0)
    memory_format = torch.channels_last if setup.channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, batchnorm=batchnorm).to(device, memory_format=memory_format)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(batch_size=batch_size))
    x = torch.randn(batch_size, arch.in_channels, arch.input_size, arch.input_size, device=device,
                    generator=generator)
    y = torch.randint(0, arch.num_classes, (batch_size,), device=device, generator=generator)
    start = 0.0
    for step in range(TUNE_WARMUP_STEPS + TUNE_STEPS):
        if step == TUNE_WARMUP_STEPS:
            start = time.perf_counter()
        with autocast(device, setup.precision):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / TUNE_STEPS


@dataclass(frozen=True)
class RunSettings:
    """How a command was asked to train, before this machine is measured: the shared run flags
    (nas.cli.args.add_run_flags) as one value. resolve_run turns it into a RunRecord per net."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    precision: str = "auto"  # auto: measured per net on CPU (choose_setup), bf16 where supported on CUDA
    batchnorm: str = "pytorch"  # or "native": nas's C kernel (nas.cpu), opt-in
    compile: bool = False  # torch.compile
    ema: bool = True  # evaluate and keep the moving average of the weights (nas.train.WeightAverage)
    threads: int | None = None  # torch's intra-op threads; None: the process's (every core by default)

    def resolve_device(self) -> torch.device:
        """The device, with the precision checked against it: ValueError says what can't run here."""
        device = resolve_device(self.device)
        resolve_precision(self.precision, device)
        return device


def resolve_run(arch: ArchSpec, config: TrainConfig, settings: RunSettings, device: torch.device, images: int,
                subset: int | None = None) -> RunRecord:
    """The run record for training `arch` with `config` on `images` images on `device` as `settings`
    ask: precision and memory format as choose_setup picks them (measured on CPU), the rest as asked.
    The thread count recorded is the process's: set it (settings.threads) before calling."""
    setup = choose_setup(arch, config.batch_size, device, settings.precision, planned_steps(config, images),
                         settings.batchnorm)
    return RunRecord(device=str(device), threads=torch.get_num_threads() if device.type == "cpu" else None,
                     precision=setup.precision, memory_format="channels_last" if setup.channels_last else "nchw",
                     batchnorm=settings.batchnorm, weight_average=settings.ema, compiled=settings.compile,
                     subset=subset, seed=config.seed)
