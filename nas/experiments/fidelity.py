"""Which multi-fidelity scheme finds good nets soonest: a benchmark of the study file's pruners.

    python -m nas.fidelity compare --minutes 14          # 3 schemes x 3 sampler seeds, then the figure
    python -m nas.fidelity plot                          # redraw the figure and table from the results

Each run is a search of the default study scaled to fit a small machine (--subset images, --epochs
epochs; the rung on its first --rung-subset images), on one CPU core, for --minutes of wall clock,
with no preset enqueued, so what it measures is how soon each scheme finds on its own. Two runs go
at a time, one per core. Anytime performance is the best validation score among completed trials
against the seconds since the run started. The `rank` job (run by compare too) trains --archs
random candidates, the seed's Model 3 first, at both the rung's and full fidelity and reports how
well the rung ranks them (Spearman and Kendall). Results go to one JSON file (each finished job is
kept, so a rerun only runs what is missing) and a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, stdev

import optuna
import torch
from optuna.trial import TrialState

from nas import data
from nas.cli import ArgumentParser, positive_int
from nas.config import ConfigError, RungConfig, StudyConfig
from nas.cpu import cpu_model, tune_allocator
from nas.space import suggest
from nas.spec import PRESETS, count_params, layer_string
from nas.storage import open_storage
from nas.train import DivergedError, resolve_run, train
from nas.trials import score

SCHEMES = ("median", "hyperband", "rung")
RESULTS = Path("studies/results/fidelity.json")
FIGURE = Path("docs/images/fidelity-anytime.png")
T0_ATTR = "fidelity_t0"  # the study user attribute holding the run's start (ISO 8601, UTC)


@dataclasses.dataclass(frozen=True)
class Scale:
    """The study scaled to fit: full fidelity and the rung."""

    subset: int = 20000
    epochs: int = 6
    rung_subset: int = 5000
    rung_epochs: int = 2

    def config(self, base: StudyConfig, scheme: str) -> StudyConfig:
        return dataclasses.replace(base, pruner=scheme, epochs=self.epochs, enqueue=(),
                                   rung=RungConfig(subset=self.rung_subset, epochs=self.rung_epochs,
                                                   keep=base.rung.keep, startup=base.rung.startup))


# --- one search run (a subprocess of compare) ---------------------------------------------------


def run_search(scheme: str, seed: int, minutes: float, storage_url: str, scale: Scale, base: StudyConfig) -> None:
    from nas import search

    config = scale.config(base, scheme)
    options = search.RunOptions(storage=storage_url, study="fidelity", trials=10_000, epochs=scale.epochs,
                                subset=scale.subset, seed=seed, device="cpu",
                                data_dir=str(data.resolve_data_dir(None)), timeout=minutes * 60, quiet=True,
                                threads=1)
    search.quiet_optuna()
    storage = open_storage(storage_url)
    split = search.load_split(options, torch.device("cpu"))
    study = search.create_or_load(storage, options, config, enqueue=())
    study.set_user_attr(T0_ATTR, datetime.now(timezone.utc).isoformat())
    # The trial under way at the deadline would only add seconds past the budget: stop there.
    threading.Timer(minutes * 60 + 2, os._exit, args=(0,)).start()
    search.run_worker(options, config, split)
    os._exit(0)


def timeline(storage_url: str) -> dict:
    """A run's trials as seconds since its start: when each finished, its state and value."""
    study = optuna.load_study(study_name="fidelity", storage=storage_url)
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


def run_rank(archs: int, seed: int, scale: Scale, base: StudyConfig, out: Path) -> None:
    """Model 3 and random candidates of the space, each trained at the rung's fidelity and at full."""
    from nas.space import params_for

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    tune_allocator()
    split = data.make_split(data.load_mnist(data.resolve_data_dir(None)), "valid", scale.subset)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed), direction="maximize")
    study.enqueue_trial(params_for(PRESETS["model3"], base.space, base.budget))
    rows = []
    while len(rows) < archs:
        trial = study.ask()
        arch, config = suggest(trial, base.space, scale.epochs, seed, budget=base.budget)
        study.tell(trial, 0.0)
        if count_params(arch) >= base.budget:
            continue
        run = resolve_run(arch, config, torch.device("cpu"), len(split.train_x))
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
        print(f"rank {len(rows)}/{archs}: {row['arch']} rung {row['rung_acc']:.2f} full {row['full_score']:.2f}",
              flush=True)
    out.write_text(json.dumps(rows, indent=1))


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


# --- compare: the jobs, two at a time -----------------------------------------------------------


def compare(args, scale: Scale) -> int:
    results = load_results(args.out)
    if results.get("scale", dataclasses.asdict(scale)) != dataclasses.asdict(scale) or \
            results.get("minutes", args.minutes) != args.minutes:
        print(f"error: {args.out} holds runs of another scale or budget; pass another --out", file=sys.stderr)
        return 2
    results.update(scale=dataclasses.asdict(scale), minutes=args.minutes, cpu=cpu_model(),
                   command="python -m nas.fidelity " + " ".join(sys.argv[1:]))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    if args.archs and "rank" not in results:
        jobs.append(("rank", None, None))
    for seed in range(1, args.repeats + 1):
        for scheme in args.schemes:
            if f"{scheme}-seed{seed}" not in results.get("runs", {}):
                jobs.append((f"{scheme}-seed{seed}", scheme, seed))
    running: dict[int, tuple[str, subprocess.Popen]] = {}
    free = list(range(args.parallel))
    base = [sys.executable, "-m", "nas.fidelity"]
    scale_args = ["--subset", str(scale.subset), "--epochs", str(scale.epochs),
                  "--rung-subset", str(scale.rung_subset), "--rung-epochs", str(scale.rung_epochs)]
    while jobs or running:
        while jobs and free:
            name, scheme, seed = jobs.pop(0)
            core = free.pop(0)
            db = work / f"{name}.db"
            db.unlink(missing_ok=True)
            if scheme is None:
                command = base + ["_rank", "--archs", str(args.archs), "--out", str(work / "rank.json")] + scale_args
            else:
                command = base + ["_run", scheme, str(seed), str(args.minutes), f"sqlite:///{db}"] + scale_args
            taskset = ["taskset", "-c", str(core)] if args.parallel > 1 else []
            log = open(work / f"{name}.log", "w")
            print(f"{time.strftime('%H:%M:%S')} start {name} on core {core}", flush=True)
            running[core] = (name, subprocess.Popen(taskset + command, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(5)
        for core, (name, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[core]
            free.append(core)
            if proc.returncode != 0:
                print(f"error: job {name} exited with {proc.returncode}; see {work / (name + '.log')}", file=sys.stderr)
                continue
            if name == "rank":
                results["rank"] = json.loads((work / "rank.json").read_text())
            else:
                results.setdefault("runs", {})[name] = timeline(f"sqlite:///{work / (name + '.db')}")
            save_results(args.out, results)
            print(f"{time.strftime('%H:%M:%S')} done {name}", flush=True)
    print("\n".join(table_lines(results)))
    draw(results, args.figure)
    print(f"figure: {args.figure}")
    return 0


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


# --- command line -------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.fidelity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_scale(p):
        p.add_argument("--subset", type=positive_int, default=Scale.subset, help="full fidelity: training images")
        p.add_argument("--epochs", type=positive_int, default=Scale.epochs, help="full fidelity: epochs")
        p.add_argument("--rung-subset", type=positive_int, default=Scale.rung_subset, help="the rung's images")
        p.add_argument("--rung-epochs", type=positive_int, default=Scale.rung_epochs, help="the rung's epochs")

    c = sub.add_parser("compare", help="run the schemes and the rank job, then table and figure")
    c.add_argument("--schemes", nargs="+", choices=SCHEMES + ("none",), default=list(SCHEMES))
    c.add_argument("--repeats", type=positive_int, default=3, help="sampler seeds 1..N per scheme")
    c.add_argument("--minutes", type=float, default=14.0, help="wall clock per run")
    c.add_argument("--archs", type=int, default=12, help="architectures of the rank job (0: none)")
    c.add_argument("--parallel", type=positive_int, default=2, help="runs at a time, each pinned to one core")
    c.add_argument("--work-dir", default="studies/fidelity", help="the runs' databases and logs")
    c.add_argument("--out", type=Path, default=RESULTS)
    c.add_argument("--figure", type=Path, default=FIGURE)
    add_scale(c)
    p = sub.add_parser("plot", help="table and figure from the results file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figure", type=Path, default=FIGURE)
    r = sub.add_parser("_run")
    r.add_argument("scheme", choices=SCHEMES + ("none",))
    r.add_argument("seed", type=int)
    r.add_argument("minutes", type=float)
    r.add_argument("storage")
    add_scale(r)
    k = sub.add_parser("_rank")
    k.add_argument("--archs", type=positive_int, required=True)
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--seed", type=int, default=0)
    add_scale(k)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nas.search import resolve_config

    args = build_parser().parse_args(argv)
    try:
        base = resolve_config(None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "plot":
        results = load_results(args.out)
        if not results.get("runs"):
            print(f"error: {args.out} holds no runs; run `python -m nas.fidelity compare` first", file=sys.stderr)
            return 2
        print("\n".join(table_lines(results)))
        draw(results, args.figure)
        print(f"figure: {args.figure}")
        return 0
    scale = Scale(args.subset, args.epochs, args.rung_subset, args.rung_epochs)
    if args.command == "_run":
        run_search(args.scheme, args.seed, args.minutes, args.storage, scale, base)
        return 0
    if args.command == "_rank":
        run_rank(args.archs, args.seed, scale, base, args.out)
        return 0
    return compare(args, scale)


if __name__ == "__main__":
    sys.exit(main())
