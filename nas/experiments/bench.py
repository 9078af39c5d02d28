"""Times one Model 3 training epoch in our pipeline and in the seed study's, and prints the ratio.

Ours is nas.train.train itself: the whole training set as one normalized tensor on the device,
batches cut with randperm, metrics kept on the device. It runs in a process of its own, set up as
`python -m nas.train` and the search workers set themselves up (nas.cpu.tune_allocator). Seed-style
is what the seed notebook ran, in this plain process: torchvision's MNIST dataset with per-sample
ToTensor + Normalize, a shuffling DataLoader, and a loop that reads the loss and the correct count
back to the host every batch for its progress bar. Both train the same model from the same
initialization with the same optimizer and batch size.

Two more measurements answer what a search feels: time_concurrent times N Model 3 trainings
started together (the aggregate images/s N search workers get from the machine), and time_study
times a real `nas.search` run end to end (trials per hour). The command is nas/cli/bench.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nas import data
from nas.cpu import cpu_model, tune_allocator
from nas.errors import NasError, UsageError, writing
from nas.model import build_model
from nas.run.record import RunRecord
from nas.spec import PRESETS, ArchSpec, TrainConfig, count_params
from nas.storage import open_storage
from nas.study.trials import finished_trials, trial_counts
from nas.train import train
from nas.train.setup import RunSettings, resolve_run
from nas.workers import SPAWN, threads_each

MODEL = "model3"
QUICK_BATCHES = 200
WARMUP_BATCHES = 5
REPEATS = 2
OURS = "ours"
SEED_STYLE = "seed-style"
GPU_CONCURRENCY = (1, 2, 4, 8)  # the default --concurrency on CUDA; CPU runs none unless asked
GPU_STUDY = "10x15"  # the default --study on CUDA without --quick; CPU runs none unless asked
STUDY_NAME = "bench"
POLL_SECONDS = 1.0  # how often the parent looks for a dead child while waiting on the others


class BenchError(NasError):
    """A timed run that failed: a training process that died, a study run that exited non-zero."""


@dataclass(frozen=True)
class Timing:
    pipeline: str
    seconds: float  # wall time of the timed batches
    images: int  # images in the timed batches
    epoch_images: int  # images in a full epoch, the size the time is scaled to
    # Means over the timed images: both pipelines train the same thing, so these should be close.
    train_loss: float
    train_acc: float  # percent

    @property
    def extrapolated(self) -> bool:
        return self.images < self.epoch_images

    @property
    def epoch_seconds(self) -> float:
        return extrapolate(self.seconds, self.images, self.epoch_images)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "images": self.images,
            "epoch_images": self.epoch_images,
            "epoch_seconds": self.epoch_seconds,
            "extrapolated": self.extrapolated,
            "images_per_second": self.images_per_second,
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
        }


def extrapolate(seconds: float, images: int, epoch_images: int) -> float:
    """Scales a partial epoch linearly by images: the per-batch cost dominates, and every batch but
    an epoch's last is full, so this and scaling by batches agree to within one batch."""
    return seconds * epoch_images / images


def ratio(ours: Timing, seed_style: Timing) -> float:
    """Our epoch time as a fraction of the seed-style one; below 1 means ours is faster."""
    return ours.epoch_seconds / seed_style.epoch_seconds


def aligned(rows: list[tuple[str, ...]], text_columns: tuple[int, ...] = (0,)) -> str:
    """Rows of cells as columns two spaces apart: text columns flush left, numbers flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    )


def format_table(timings: list[Timing]) -> str:
    header = ("pipeline", "s/epoch", "", "images/s", "train loss", "train acc")
    rows = [header] + [
        (t.pipeline, f"{t.epoch_seconds:.2f}",
         f"extrapolated from {t.images:,} images" if t.extrapolated else "measured",
         f"{t.images_per_second:,.0f}", f"{t.train_loss:.4f}", f"{t.train_acc:.2f}%")
        for t in timings
    ]
    return aligned(rows, text_columns=(0, 2))


def schedule(repeats: int) -> list[str]:
    """The order of the timed runs: each repeat swaps which pipeline goes first, so neither always
    runs in the other's wake (the first timed run on a fresh process tends to be the slowest)."""
    pairs = ((SEED_STYLE, OURS), (OURS, SEED_STYLE))
    return [name for r in range(repeats) for name in pairs[r % 2]]


def fastest(runs: list[Timing]) -> dict[str, Timing]:
    """Each pipeline's fastest run: noise from other processes only ever adds time."""
    best: dict[str, Timing] = {}
    for run in runs:
        if run.pipeline not in best or run.seconds < best[run.pipeline].seconds:
            best[run.pipeline] = run
    return best


def ratio_line(value: float) -> str:
    return f"ours / seed-style: {value:.3f} of the time ({1 / value:.2f}x the speed)"


def loader_workers(device: torch.device) -> int:
    """The seed's DataLoader workers: on CUDA its notebook passed num_workers=2 with pin_memory=True;
    without CUDA that template falls back to a plain DataLoader(batch_size, shuffle=True), i.e. none."""
    return 2 if device.type == "cuda" else 0


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer read before this would miss work still queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_dataset(data_dir: Path) -> Dataset:
    import torchvision  # here, not at the top: see torchvision_version
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.MEAN,), (data.STD,))])
    # torchvision reads <data_dir>/MNIST/raw/*-ubyte itself when download=False.
    return torchvision.datasets.MNIST(root=data_dir, train=True, download=False, transform=transform)


def time_seed_style(arch: ArchSpec, config: TrainConfig, dataset: Dataset, batches: int,
                    device: torch.device, workers: int) -> Timing:
    """`batches` steps of the seed notebook's training loop, without its progress bar."""
    torch.manual_seed(config.seed)
    model = build_model(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda")
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    synchronize(device)
    # Started before the loader's iterator exists: the seed paid its worker start-up every epoch.
    start = time.perf_counter()
    for images, labels in itertools.islice(loader, batches):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        out = model(images)
        # Our model ends in logits; cross-entropy on them is the seed's nll_loss on log_softmax.
        loss = F.cross_entropy(out, labels)
        loss.backward()
        optimizer.step()
        # The seed read both numbers back every batch for its bar: a host sync it paid per step.
        loss_sum += loss.item() * len(labels)
        correct += int((out.argmax(1) == labels).sum().item())
        seen += len(labels)
    synchronize(device)
    seconds = time.perf_counter() - start
    return Timing(SEED_STYLE, seconds, seen, len(dataset), loss_sum / seen, 100.0 * correct / seen)


def time_ours(arch: ArchSpec, config: TrainConfig, split: data.Split, images: int, epoch_images: int,
              run: RunRecord) -> Timing:
    """One epoch of nas.train.train over the first `images` training images, timed by train itself."""
    # Evaluation runs outside train's timer; one batch of it keeps the wall time down.
    part = data.Split(split.train_x[:images], split.train_y[:images], split.eval_x[: config.batch_size],
                      split.eval_y[: config.batch_size], split.eval_name)
    result = train(arch, replace(config, epochs=1), part, run, progress=False)
    epoch = result.history[0]
    return Timing(OURS, epoch.seconds, images, epoch_images, epoch.train_loss, epoch.train_acc)


def _start_ours(threads: int) -> None:
    """Our pipeline's process starts as nas.train's and nas.search's entry points start theirs."""
    torch.set_num_threads(threads)
    tune_allocator()


_SPLIT: dict[tuple, data.Split] = {}  # our process's training data, loaded once


def _time_ours_in_process(data_dir: str, images: int, epoch_images: int, run: RunRecord) -> Timing:
    key = (data_dir, run.device)
    if key not in _SPLIT:
        _SPLIT[key] = data.make_split(data.load_mnist(Path(data_dir)), "test", None, torch.device(run.device))
    preset = PRESETS[MODEL]
    return time_ours(preset.arch, preset.train, _SPLIT[key], images, epoch_images, run)


def ours_process(threads: int) -> ProcessPoolExecutor:
    """One worker process that stays up for the whole benchmark (data loaded, kernels warm)."""
    return ProcessPoolExecutor(1, mp_context=SPAWN, initializer=_start_ours,
                               initargs=(threads,))


def load_average() -> float | None:
    """The 1-minute load when the run started: other jobs on the machine slow every figure."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None  # Windows has no load average


def torchvision_version() -> str:
    # torchvision is imported only where it is used: it takes seconds to import, and every process
    # of a concurrency run imports this module without needing it.
    import torchvision

    return torchvision.__version__


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line that says which machine the figures above belong to."""
    where = f"{info['gpu']} (CUDA {info['cuda']}), " if "gpu" in info else ""
    load = "" if info.get("load_average") is None else f", load {info['load_average']:.2f} at start"
    return (f"machine: {where}{info['cpu']}, {info['cpu_count']} CPUs{load}; torch {info['torch']}, "
            f"{info['threads']} threads; device {info['device']}")


def report(machine: dict[str, Any], setup: dict[str, Any], runs: list[Timing]) -> dict[str, Any]:
    """The JSON record: each pipeline's fastest run, with every run's seconds beside it."""
    best = fastest(runs)
    return {
        "machine": machine,
        "setup": setup,
        "pipelines": {
            name: {**timing.to_dict(), "all_seconds": [r.seconds for r in runs if r.pipeline == name]}
            for name, timing in best.items()
        },
        "ratio": ratio(best[OURS], best[SEED_STYLE]),
    }


def write_report(results: dict[str, Any], path: Path) -> None:
    """The JSON record at `path`; OutputError where it can't be written."""
    with writing(str(path)):
        path.write_text(json.dumps(results, indent=2) + "\n")


# --- the ratio -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What a benchmark runs on, checked before any timing."""

    device: torch.device
    data_dir: Path
    dataset: Dataset  # the seed-style pipeline's
    epoch_images: int
    images: int  # timed per pipeline run: a full epoch, or the first `batches` batches of one (quick)
    batches: int
    warmup: int  # untimed batches each pipeline runs first
    concurrency: list[int]  # process counts to time together (none: no concurrency table)
    study: StudySize | None  # the study to time (None: none)


def prepare(settings: RunSettings, data_dir: Path, *, quick: bool, batches: int, warmup: int,
            concurrency: list[int] | None, study: StudySize | None, study_subset: int | None) -> Inputs:
    """The device, the data and the plan, each checked now rather than after minutes of timing:
    a NasError (UsageError, DeviceError, DataError) says what can't run. The
    data is verified, never downloaded: a benchmark should not quietly spend minutes on the network."""
    config = PRESETS[MODEL].train
    device = settings.resolve_device()  # an impossible precision fails before the data
    mnist = data.load_mnist(data_dir)
    epoch_images = len(mnist.train_images)
    images = min(batches * config.batch_size, epoch_images) if quick else epoch_images
    dataset = seed_dataset(data_dir)
    concurrency, study = planned(concurrency, study, device, quick)
    search_images = epoch_images - data.VALID_SIZE
    if study and study_subset is not None and study_subset > search_images:
        # As the search would refuse it.
        raise UsageError(f"--study-subset must be at most {search_images:,}, the images a search trains on")
    timed = math.ceil(images / config.batch_size)
    return Inputs(device, data_dir, dataset, epoch_images, images, timed, min(warmup, timed), concurrency, study)


def resolve_ours(ours: ProcessPoolExecutor, settings: RunSettings, inputs: Inputs) -> RunRecord:
    """Our pipeline's run record, resolved in its own process (ours_process) as the trainer would
    there: in the precision and memory format it measures fastest."""
    preset = PRESETS[MODEL]
    return ours.submit(resolve_run, preset.arch, preset.train, settings, inputs.device, inputs.images).result()


def header_lines(run: RunRecord, inputs: Inputs, loader: int, repeats: int) -> list[str]:
    """What is about to be timed, and how."""
    preset = PRESETS[MODEL]
    return [f"{MODEL}: {count_params(preset.arch):,} params, batch {preset.train.batch_size}, Adam lr "
            f"{preset.train.lr}, on {inputs.device} with {torch.get_num_threads()} threads; ours in {run.describe()} "
            f"(own process, allocator tuned), seed-style in fp32 NCHW with {loader} DataLoader workers",
            f"timing {inputs.batches} batches per pipeline, best of {repeats}, "
            f"after {inputs.warmup} warm-up batches each ..."]


def time_pipelines(ours: ProcessPoolExecutor, run: RunRecord, inputs: Inputs, repeats: int,
                   loader: int) -> list[Timing]:
    """Both pipelines warmed up, then each timed `repeats` times in schedule's order: ours in its
    process (ours_process), seed-style in this one with `loader` DataLoader workers."""
    preset = PRESETS[MODEL]

    def measure(pipeline: str, count: int) -> Timing:
        if pipeline == OURS:
            return ours.submit(_time_ours_in_process, str(inputs.data_dir),
                               min(count * preset.train.batch_size, inputs.images), inputs.epoch_images,
                               run).result()
        return time_seed_style(preset.arch, preset.train, inputs.dataset, count, inputs.device, loader)

    # Both warm up before either is timed, so neither pays one-off allocation and kernel set-up.
    for pipeline in (SEED_STYLE, OURS):
        measure(pipeline, inputs.warmup)
    return [measure(pipeline, inputs.batches) for pipeline in schedule(repeats)]


def setup_record(run: RunRecord, inputs: Inputs, quick: bool, repeats: int, loader: int) -> dict[str, Any]:
    """How the ratio was measured, for the JSON record."""
    preset = PRESETS[MODEL]
    return {"model": MODEL, "params": count_params(preset.arch), "batch_size": preset.train.batch_size,
            "lr": preset.train.lr, "mode": "quick" if quick else "full", "batches": inputs.batches,
            "warmup_batches": inputs.warmup, "repeats": repeats, "seed_style_workers": loader,
            "precision": run.precision, "channels_last": run.channels_last, "batchnorm": run.batchnorm,
            "weight_average": run.weight_average, "compiled": run.compiled}


# --- concurrent trainings -----------------------------------------------------------------------


def parse_concurrency(text: str) -> list[int]:
    """Comma-separated process counts, e.g. 1,2,4,8; UsageError says what is wrong."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{text!r} is not a comma-separated list of process counts") from None
    if min(values) < 1:
        raise UsageError(f"process counts must be at least 1, got {text!r}")
    return values


def process_threads(processes: int, device: torch.device) -> int:
    """On CPU the CPUs this process may use are split between the processes, as `nas.search
    --workers` splits them (nas.workers.threads_each); on a GPU the device does the work and one
    host thread each feeds it."""
    return threads_each(processes) if device.type == "cpu" else 1


def _concurrent_training(settings: RunSettings, device: str, threads: int, images: int, warmup: int,
                         data_dir: str, ready: Any, start: Any, results: Any) -> None:
    """One of N processes training Model 3 at once, as N search workers would."""
    _start_ours(threads)
    preset = PRESETS[MODEL]
    split = data.make_split(data.load_mnist(Path(data_dir)), "test", images, torch.device(device))
    run = resolve_run(preset.arch, preset.train, replace(settings, threads=threads), torch.device(device), images)
    # A few untimed batches first, so one-off kernel set-up isn't counted.
    time_ours(preset.arch, preset.train, split, warmup * preset.train.batch_size, images, run)
    ready.put(None)
    start.wait()
    results.put(time_ours(preset.arch, preset.train, split, images, images, run).seconds)


def gather(messages: Any, procs: list, what: str) -> list:
    """One message from each process, failing as soon as one of them has died without sending it."""
    received: list = []
    while len(received) < len(procs):
        try:
            received.append(messages.get(timeout=POLL_SECONDS))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or all(p.exitcode is not None for p in procs):
                raise BenchError(f"a concurrent training process died {what} "
                                   f"(exit status {failed[0] if failed else 0})") from None
    return received


def time_concurrent(processes: int, device: torch.device, images: int, warmup: int, settings: RunSettings,
                    data_dir: Path) -> dict[str, Any]:
    """`processes` Model 3 trainings of `images` images each, as `settings` ask (give the precision
    the ratio's run measured, so that each need not measure it again), released together once all
    have loaded the data and warmed up. The aggregate is all their images over the parent's clock
    from the release to the last result (model set-up and one evaluation batch included, so it errs
    low); each process's own rate is its images over the training time nas.train measured.

    Not nas.workers.run_processes: the release is a barrier the parent opens once every process has
    reported ready, and a process that dies before it must fail the measurement at once (gather),
    where run_processes would wait for the others, which would wait at the barrier for ever."""
    threads = process_threads(processes, device)
    ready, start, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_concurrent_training, daemon=True,
                           args=(settings, str(device), threads, images, warmup, str(data_dir),
                                 ready, start, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        gather(ready, procs, "while loading data or warming up")
        start.set()
        began = time.perf_counter()
        seconds = gather(results, procs, "while training")
        wall = time.perf_counter() - began
    except BaseException:
        for p in procs:
            p.terminate()  # a sibling died or we were interrupted: the rest would wait for nothing
        raise
    finally:
        for p in procs:
            p.join()
    return {"processes": processes, "threads_each": threads, "images_per_process": images,
            "seconds": wall, "images_per_second": processes * images / wall,
            "per_process": [images / s for s in seconds]}


def format_concurrency(rows: list[dict[str, Any]]) -> str:
    header = ("processes", "threads each", "images each", "wall s", "images/s (all)",
              "images/s (each, mean)", "(each, min-max)")
    lines = [header] + [
        (str(r["processes"]), str(r["threads_each"]), f"{r['images_per_process']:,}", f"{r['seconds']:.2f}",
         f"{r['images_per_second']:,.0f}", f"{sum(r['per_process']) / len(r['per_process']):,.0f}",
         f"{min(r['per_process']):,.0f}-{max(r['per_process']):,.0f}")
        for r in rows
    ]
    return aligned(lines, text_columns=())


# --- a real study -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySize:
    trials: int
    epochs: int  # per trial

    def __str__(self) -> str:
        return f"{self.trials}x{self.epochs}"

    @classmethod
    def parse(cls, text: str) -> StudySize:
        """TRIALSxEPOCHS, e.g. 10x15; UsageError says what is wrong."""
        parts = text.lower().split("x")
        try:
            trials, epochs = (int(p) for p in parts)
        except ValueError:
            raise UsageError(f"{text!r} is not TRIALSxEPOCHS, e.g. 10x15") from None
        if trials < 1 or epochs < 1:
            raise UsageError(f"trials and epochs must be at least 1, got {text!r}")
        return cls(trials, epochs)


def study_command(size: StudySize, storage: str, *, workers: int, device: torch.device, precision: str,
                  data_dir: Path, subset: int | None) -> list[str]:
    """The search as a user runs it, on a storage of its own, with `workers` processes: always
    given, since the search's own default (auto, or $NAS_WORKERS) would otherwise decide."""
    command = [sys.executable, "-m", "nas.search", "--trials", str(size.trials), "--epochs", str(size.epochs),
               "--storage", storage, "--study", STUDY_NAME, "--quiet", "--device", str(device),
               "--precision", precision, "--data-dir", str(data_dir.resolve()), "--workers", str(workers)]
    if subset is not None:
        command += ["--subset", str(subset)]
    return command


def time_study(size: StudySize, workers: int, device: torch.device, precision: str, data_dir: Path,
               subset: int | None) -> dict[str, Any]:
    """Wall time and trials per hour of a fresh study, process start and data loading included:
    what a user waits for. The span from the first trial's start to the last one's end is beside it."""
    with tempfile.TemporaryDirectory(prefix="nas-bench-") as tmp:
        storage = f"journal:///{tmp}/bench.log"
        command = study_command(size, storage, workers=workers, device=device, precision=precision, data_dir=data_dir,
                                subset=subset)
        began = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - began
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"the study run failed with exit status {run.returncode}: {last}")
        with warnings.catch_warnings():
            # The storage's retry callback is marked experimental; a benchmark's reader needn't say so.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.load_study(storage=open_storage(storage, must_exist=True), study_name=STUDY_NAME)
        finished = finished_trials(study)
        counts = trial_counts(study)
    span = None
    if finished:
        span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"trials": size.trials, "epochs": size.epochs, "workers": workers, "subset": subset,
            "command": " ".join(command), "wall_seconds": wall, "finished": len(finished),
            "trial_span_seconds": span, "trials_per_hour": 3600 * len(finished) / wall, "counts": counts}


def format_study(row: dict[str, Any]) -> str:
    # trial_counts' keys carry their explanation in parentheses; the table keeps the short name.
    count_names = tuple(name.split(" (")[0] for name in row["counts"])
    span = row["trial_span_seconds"]
    header = ("trials x epochs", "workers", "train images", "wall s", "first start-last end s", "finished",
              *count_names, "trials/hour")
    line = (f"{row['trials']}x{row['epochs']}", str(row["workers"]),
            "all" if row["subset"] is None else f"{row['subset']:,}", f"{row['wall_seconds']:.1f}",
            "-" if span is None else f"{span:.1f}", str(row["finished"]), *map(str, row["counts"].values()),
            f"{row['trials_per_hour']:,.0f}")
    return aligned([header, line], text_columns=())


def planned(concurrency: list[int] | None, study: StudySize | None, device: torch.device,
            quick: bool) -> tuple[list[int], StudySize | None]:
    """What runs beside the ratio: what was asked for, else the device's default. On CPU both are
    opt-in (minutes to hours of a small machine); --quick skips the GPU's default study."""
    on_gpu = device.type == "cuda"
    if concurrency is None:
        concurrency = list(GPU_CONCURRENCY) if on_gpu else []
    if study is None and on_gpu and not quick:
        study = StudySize.parse(GPU_STUDY)
    return concurrency, study


# --- where an epoch's time goes (nas.bench --profile) ---------------------------------------------

# Operator name fragments by what they do, first match wins; the rest is "other ops".
PROFILE_GROUPS = (
    ("convolution (forward and backward)", ("conv",)),
    ("BatchNorm + ReLU", ("batch_norm", "relu", "threshold", "native_batchnorm")),
    ("augmentation (affine warp)", ("grid_sampler", "affine_grid", "linspace")),
    ("optimizer step", ("adam", "sgd")),
    ("weight average", ("lerp",)),
    ("loss, argmax", ("cross_entropy", "nll_loss", "log_softmax", "argmax", "_softmax")),
    ("pooling", ("pool",)),
    ("normalize, index, copy, cast", ("index", "copy_", "to_copy", "div", "sub", "_to", "clone", "contiguous",
                                      "empty", "randperm")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, parts in PROFILE_GROUPS if any(part in lowered for part in parts)), "other ops")


def profile_ours(split: data.Split, run: RunRecord, batches: int) -> tuple[float, dict[str, float]]:
    """One short epoch of Model 3 (`batches` batches) under torch.profiler, after an untimed one:
    its wall seconds and the operators' own CPU seconds summed by PROFILE_GROUPS. What the
    operators don't account for is Python and framework overhead."""
    # Kineto, the profiler's C++ side, logs its start and stop (and, without a GPU, an ERROR line about
    # counting GPUs) unless told otherwise; it reads this when the first profile starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile

    preset = PRESETS[MODEL]
    images = batches * preset.train.batch_size
    part = data.Split(split.train_x[:images], split.train_y[:images], split.eval_x[:1], split.eval_y[:1],
                      split.eval_name)
    train(preset.arch, replace(preset.train, epochs=1), part, run, progress=False)  # warm: allocator, kernels
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train(preset.arch, replace(preset.train, epochs=1), part, run, progress=False)
        wall = time.perf_counter() - start
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            group = group_of(event.key)
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
    return wall, dict(sorted(groups.items(), key=lambda item: -item[1]))


def format_profile(wall: float, groups: dict[str, float], batches: int) -> str:
    rows = [("where", "s", "share of wall")]
    for group, seconds in groups.items():
        rows.append((group, f"{seconds:.3f}", f"{100 * seconds / wall:.1f}%"))
    rest = wall - sum(groups.values())
    rows.append(("Python and framework overhead (wall − ops)", f"{rest:.3f}", f"{100 * rest / wall:.1f}%"))
    rows.append((f"wall, {batches} batches", f"{wall:.3f}", "100%"))
    return aligned(rows)
