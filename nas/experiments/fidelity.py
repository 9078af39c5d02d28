"""Which multi-fidelity scheme finds good nets soonest: a benchmark of the study file's pruners
(the command is nas/cli/fidelity.py).

Each run is a search of the default study scaled to fit a small machine (Scale: subset images and
epochs at full fidelity, the rung on its first rung_subset images), on one CPU core, for `minutes`
of wall clock, with no preset enqueued, so what it measures is how soon each scheme finds on its
own. compare runs the jobs in nas.workers processes, `parallel` at a time, each pinned to a core of
its own. Anytime performance is the best validation score among completed trials against the
seconds since the run started. The rank job (run by compare too) trains `archs` random candidates,
the seed's Model 3 first, at both the rung's and full fidelity, and says how well the rung ranks
them (Spearman and Kendall). Results go to one JSON file (each finished job is kept, so a rerun
only runs what is missing) and a PNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, stdev

import optuna
import torch
from optuna.trial import TrialState

from nas import data
from nas.cpu import cpu_model, tune_allocator
from nas.errors import NasError
from nas.space import params_for, suggest
from nas.spec import PRESETS, count_params, layer_string
from nas.storage import open_storage
from nas.study.create import create_or_load
from nas.study.objective import SearchOptions
from nas.study.search import load_split, quiet_optuna, run_worker
from nas.study.trials import score
from nas.studyfile import StudyConfig
from nas.train import DivergedError, train
from nas.train.setup import RunSettings, resolve_run
from nas.workers import SPAWN, available_cpus, run_processes

SCHEMES = ("median", "hyperband", "rung")
RESULTS = Path("studies/results/fidelity.json")
FIGURE = Path("docs/images/fidelity-anytime.png")
WORK_DIR = Path("studies/fidelity")
T0_ATTR = "fidelity_t0"  # the study user attribute holding the run's start (ISO 8601, UTC)
STUDY = "fidelity"
# A run stops starting trials at its deadline; the trial under way then is abandoned this long
# after it (it would only add seconds past the budget), left unfinished in the storage.
GRACE_SECONDS = 2
WATCH_SECONDS = 2.0  # how often compare looks at its jobs' progress


class FidelityError(NasError):
    """compare or plot can't do what was asked (another run's results file, no results yet)."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """The study scaled to fit: full fidelity and the rung."""

    subset: int = 20000
    epochs: int = 6
    rung_subset: int = 5000
    rung_epochs: int = 2

    def config(self, base: StudyConfig, scheme: str) -> StudyConfig:
        rung = dataclasses.replace(base.rung, subset=self.rung_subset, epochs=self.rung_epochs)
        return dataclasses.replace(base, pruner=scheme, epochs=self.epochs, enqueue=(), rung=rung)


# --- one search run -----------------------------------------------------------------------------


class _Deadline(BaseException):
    """Raised in a search job's main thread at its deadline. A BaseException, and neither an
    Exception nor a KeyboardInterrupt, so that Optuna neither catches it nor records the trial it
    interrupts: that trial stays unfinished (RUNNING) in the storage, as if the process had ended,
    and its storage session is closed on the way out."""


def _deadline(signum, frame) -> None:
    raise _Deadline


def run_search(scheme: str, seed: int, *, minutes: float, storage_url: str, scale: Scale, base: StudyConfig,
               data_dir: Path) -> None:
    """One run: a fresh study `scheme` in `storage_url` searched single-threaded on the CPU for
    `minutes`, its start stored as T0_ATTR. The trial under way at the deadline is abandoned
    GRACE_SECONDS later (SIGALRM: call it in a process's main thread, where nothing else uses it)."""
    config = scale.config(base, scheme)
    options = SearchOptions(storage=storage_url, study=STUDY, trials=10_000, epochs=scale.epochs,
                            subset=scale.subset, seed=seed, data_dir=str(data_dir),
                            run=RunSettings(device="cpu", threads=1), timeout=minutes * 60, quiet=True)
    quiet_optuna()
    storage = open_storage(storage_url)
    split = load_split(options, config, torch.device("cpu"))
    study = create_or_load(storage, STUDY, config, seed=seed, epochs=scale.epochs, enqueue=(),
                           say=lambda line: print(line, file=sys.stderr))
    study.set_user_attr(T0_ATTR, datetime.now(timezone.utc).isoformat())
    previous = signal.signal(signal.SIGALRM, _deadline)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, minutes * 60 + GRACE_SECONDS)
            run_worker(options, config, split)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        pass  # also when it fires in the `finally` above, before the timer is stopped
    finally:
        signal.signal(signal.SIGALRM, previous)


def timeline(storage_url: str) -> dict:
    """A run's trials as seconds since its start: when each finished, its state and value."""
    study = optuna.load_study(study_name=STUDY, storage=storage_url)
    t0 = datetime.fromisoformat(study.user_attrs[T0_ATTR])
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None or "rejected" in t.user_attrs:
            continue
        at = (t.datetime_complete.replace(tzinfo=timezone.utc) - t0).total_seconds()
        trials.append({"number": t.number, "state": t.state.name.lower(), "seconds": round(at, 1),
                       "value": t.value if t.state == TrialState.COMPLETE else None,
                       "rung_acc": t.user_attrs.get("rung_acc"), "epochs": len(t.user_attrs.get("epoch_acc", [])),
                       "params": t.user_attrs.get("params")})
    return {"trials": sorted(trials, key=lambda t: t["seconds"])}


def best_by(run: dict, seconds: float) -> float | None:
    values = [t["value"] for t in run["trials"] if t["value"] is not None and t["seconds"] <= seconds]
    return max(values) if values else None


# --- the rank job -------------------------------------------------------------------------------


def rank_rows(archs: int, seed: int, scale: Scale, base: StudyConfig, data_dir: Path,
              on_row: Callable[[str], None] | None = None) -> list[dict]:
    """Model 3 and random candidates of the space (`archs` in all), each trained at the rung's
    fidelity and at full, single-threaded on the CPU; `on_row` hears a line as each is done."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    split = data.make_split(data.load_mnist(data_dir), "valid", scale.subset)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed), direction="maximize")
    study.enqueue_trial(params_for(PRESETS["model3"], base.space, base.budget))
    rows: list[dict] = []
    while len(rows) < archs:
        trial = study.ask()
        arch, config = suggest(trial, base.space, scale.epochs, seed, budget=base.budget)
        study.tell(trial, 0.0)
        if count_params(arch) >= base.budget:
            continue
        run = resolve_run(arch, config, RunSettings(device="cpu"), torch.device("cpu"), len(split.train_x))
        row = {"arch": layer_string(arch), "params": count_params(arch), "model3": not rows}
        try:
            rung = train(arch, dataclasses.replace(config, epochs=scale.rung_epochs), split.head(scale.rung_subset),
                         run, progress=False)
            row["rung_acc"] = rung.history[-1].eval_acc
            full = train(arch, config, split, run, progress=False)
            row["full_score"] = score([e.eval_acc for e in full.history], base.score_epochs)
        except DivergedError:
            row["rung_acc"] = row.get("rung_acc", 0.0)
            row["full_score"] = 0.0
        rows.append(row)
        if on_row is not None:
            on_row(f"rank {len(rows)}/{archs}: {row['arch']} rung {row['rung_acc']:.2f} full {row['full_score']:.2f}")
    return rows


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else math.nan  # undefined for fewer than 2 distinct values


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n = concordant + discordant
    norm = math.sqrt((n + ties_x) * (n + ties_y))
    return (concordant - discordant) / norm if norm else math.nan


# --- compare: the jobs, `parallel` at a time -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One of compare's jobs: a search run of `scheme` with sampler seed `seed`, or (no scheme) the rank job."""

    name: str
    scheme: str | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What compare was asked for."""

    schemes: tuple[str, ...] = SCHEMES
    repeats: int = 3  # sampler seeds 1..repeats per scheme
    minutes: float = 14.0  # wall clock per search run
    archs: int = 12  # the rank job's architectures (0: no rank job)
    parallel: int = 2  # jobs at a time; with more than one, each process is pinned to one core
    scale: Scale = Scale()
    work_dir: Path = WORK_DIR  # the runs' databases and logs
    data_dir: Path = Path(data.DEFAULT_DATA_DIR)
    rank_seed: int = 0

    def log(self, job: str) -> Path:
        return self.work_dir / f"{job}.log"

    def storage_url(self, job: str) -> str:
        return f"sqlite:///{self.work_dir / (job + '.db')}"


def pending_jobs(plan: Plan, results: dict) -> list[Job]:
    """The jobs whose results `results` lacks: the rank job first, then each seed's schemes."""
    jobs = [Job("rank")] if plan.archs and "rank" not in results else []
    for seed in range(1, plan.repeats + 1):
        for scheme in plan.schemes:
            name = f"{scheme}-seed{seed}"
            if name not in results.get("runs", {}):
                jobs.append(Job(name, scheme, seed))
    return jobs


def compare(plan: Plan, base: StudyConfig, out: Path, command: str, progress: Callable[[str], None],
            problem: Callable[[str], None]) -> dict:
    """Runs the jobs `out` still lacks and returns the results, each finished job's saved to `out`
    as it ends. `progress` hears a line as each job starts and ends; `problem` one for each job that
    failed or never finished (the others go on). FidelityError: `out` holds another scale or budget,
    or more jobs at a time were asked for than there are CPUs to pin them to."""
    results = load_results(out)
    scale = dataclasses.asdict(plan.scale)
    if results.get("scale", scale) != scale or results.get("minutes", plan.minutes) != plan.minutes:
        raise FidelityError(f"{out} holds runs of another scale or budget; pass another --out")
    jobs = pending_jobs(plan, results)
    processes = min(plan.parallel, len(jobs))
    if plan.parallel > 1 and processes > available_cpus():
        raise FidelityError(f"--parallel {plan.parallel}: only {available_cpus()} CPUs to pin the jobs to")
    results.update(scale=scale, minutes=plan.minutes, cpu=cpu_model(), command=command)
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    if not jobs:
        return results
    for job in jobs:
        (plan.work_dir / f"{job.name}.db").unlink(missing_ok=True)
    todo, events = SPAWN.Queue(), SPAWN.Queue()
    for job in jobs:
        todo.put(job)
    for _ in range(processes):
        todo.put(None)  # one each: the end of the queue
    running: dict[int, str] = {}  # worker -> its job under way

    def handle(event: tuple) -> None:
        kind, worker, name, detail, at = event
        clock = time.strftime("%H:%M:%S", time.localtime(at))
        if kind == "start":
            running[worker] = name
            progress(f"{clock} start {name} on {detail}")
            return
        del running[worker]
        if kind == "failed":
            problem(f"job {name} failed ({detail}); see {plan.log(name)}")
            return
        if name == "rank":
            results["rank"] = json.loads((plan.work_dir / "rank.json").read_text())
        else:
            results.setdefault("runs", {})[name] = timeline(plan.storage_url(name))
        save_results(out, results)
        progress(f"{clock} done {name}")

    def collect(wait: float = 0.0) -> None:
        while True:
            try:
                handle(events.get(timeout=wait) if wait else events.get_nowait())
            except queue.Empty:
                return

    failed = run_processes(functools.partial(_job_worker, todo, events, plan, base), processes, watch=collect,
                           every=WATCH_SECONDS)
    collect(wait=0.5)  # a worker's last events may reach the pipe just after its exit was seen
    for worker, name in running.items():
        problem(f"job {name} did not finish (worker {worker} ended under it); see {plan.log(name)}")
    for line in failed:
        problem(line)
    done = set(results.get("runs", {})) | ({"rank"} if "rank" in results else set())
    never = [job.name for job in jobs if job.name not in done and job.name not in running.values()]
    if failed and never:
        problem(f"jobs never started: {', '.join(never)}; rerun to run them")
    return results


def _job_worker(todo, events, plan: Plan, base: StudyConfig, worker: int, threads: int) -> None:
    """One of compare's processes (nas.workers.run_processes): jobs from `todo` until its end, each
    single-threaded whatever `threads` says, its output in its log; `events` hears each start and
    end. With more than one process, this one pins itself to its own CPU of those it may use, first
    thing, while it has no other thread (a new thread inherits its creator's affinity)."""
    where = "no core of its own"
    if plan.parallel > 1:
        core = sorted(os.sched_getaffinity(0))[worker]
        os.sched_setaffinity(0, {core})
        where = f"core {core}"
    torch.set_num_threads(1)
    tune_allocator()
    quiet_optuna()
    try:
        while (job := todo.get()) is not None:
            events.put(("start", worker, job.name, where, time.time()))
            error = _run_job(job, plan, base)
            events.put(("failed" if error else "done", worker, job.name, error, time.time()))
    except KeyboardInterrupt:
        sys.exit(130)


def _run_job(job: Job, plan: Plan, base: StudyConfig) -> str | None:
    """Runs `job`, its output (and any traceback) in its log; returns None, or what went wrong in a line."""
    with _output_to(plan.log(job.name)):
        try:
            if job.scheme is None:
                rows = rank_rows(plan.archs, plan.rank_seed, plan.scale, base, plan.data_dir,
                                 on_row=lambda line: print(line, flush=True))
                (plan.work_dir / "rank.json").write_text(json.dumps(rows, indent=1))
            else:
                run_search(job.scheme, job.seed, minutes=plan.minutes, storage_url=plan.storage_url(job.name),
                           scale=plan.scale, base=base, data_dir=plan.data_dir)
        except Exception as exc:
            traceback.print_exc()
            lines = str(exc).strip().splitlines()
            return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        finally:
            gc.collect()  # an abandoned trial's storage engine, closed before the parent reads the file
    return None


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr, file descriptors included, into `path` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


# --- the table and the figure -------------------------------------------------------------------


def by_scheme(results: dict) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for name, run in sorted(results.get("runs", {}).items()):
        grouped.setdefault(name.rsplit("-seed", 1)[0], []).append(run)
    return grouped


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{mean(values):.2f} ± {stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table_lines(results: dict) -> list[str]:
    seconds = results["minutes"] * 60
    marks = [seconds / 4, seconds / 2, seconds]
    lines = ["| scheme | runs | " + " | ".join(f"best at {m / 60:.1f} min" for m in marks)
             + " | trained to the end | stopped early |", "|:--|--:|" + "--:|" * len(marks) + "--:|--:|"]
    for scheme, runs in by_scheme(results).items():
        bests = [[b for run in runs if (b := best_by(run, m)) is not None] for m in marks]
        done = [sum(t["state"] == "complete" and t["seconds"] <= seconds for t in run["trials"]) for run in runs]
        pruned = [sum(t["state"] == "pruned" and t["seconds"] <= seconds for t in run["trials"]) for run in runs]
        lines.append(f"| {scheme} | {len(runs)} | " + " | ".join(spread(b) for b in bests)
                     + f" | {mean(done):.1f} | {mean(pruned):.1f} |")
    rank = results.get("rank")
    if rank:
        x, y = [r["rung_acc"] for r in rank], [r["full_score"] for r in rank]
        lines += ["", f"Rung vs full fidelity over {len(rank)} architectures: Spearman {spearman(x, y):.2f}, "
                  f"Kendall tau-b {kendall(x, y):.2f}"]
    return lines


def draw(results: dict, path: Path) -> None:
    """Best validation error so far against minutes, on a log axis (97 and 98% are far apart
    there): each run thin, the median over a scheme's runs bold."""
    from matplotlib.figure import Figure
    from statistics import median

    seconds = results["minutes"] * 60
    grid = [seconds * i / 240 for i in range(241)]
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.subplots()
    colors = {"median": "tab:blue", "hyperband": "tab:orange", "rung": "tab:green", "none": "tab:gray"}

    def error(value):
        return None if value is None else max(100.0 - value, 1e-3)

    for scheme, runs in by_scheme(results).items():
        color = colors.get(scheme, "tab:purple")
        curves = [[error(best_by(run, s)) for s in grid] for run in runs]
        minutes = [s / 60 for s in grid]
        for curve in curves:
            ax.step(minutes, [float("nan") if v is None else v for v in curve], where="post", color=color,
                    alpha=0.35, linewidth=0.8)
        middle = [median(v) if all(x is not None for x in v) else float("nan")
                  for v in zip(*curves)]
        ax.step(minutes, middle, where="post", color=color, linewidth=2.2,
                label=f"{scheme}: median of {len(runs)} runs (thin: each run)")
    model3 = [r["full_score"] for r in results.get("rank") or [] if r.get("model3")]
    if model3:
        ax.axhline(error(model3[0]), color="black", linestyle="--", linewidth=1,
                   label=f"Model 3 at this fidelity ({model3[0]:.2f}%)")
    scale = results["scale"]
    ax.set_yscale("log")
    ax.set_ylim(None, 30)
    ax.set_xlabel("wall-clock minutes since the run started (one CPU core each)")
    ax.set_ylabel("best validation error so far (%), log scale")
    ax.set_title(f"Anytime performance: {scale['epochs']} epochs on {scale['subset']:,} images; the rung "
                 f"{scale['rung_epochs']} epochs on {scale['rung_subset']:,}\n{results.get('cpu', '')}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
