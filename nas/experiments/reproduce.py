"""Retrain the seed study's Models 1-3 with their documented configs over several seeds and set our
test-set figures beside the seed's logged ones: a Markdown table, a PNG of the curves, raw JSON.

    python -m nas.reproduce                               # 3 models x 3 seeds x 15 epochs
    python -m nas.reproduce --models model3 --seeds 5 --out runs/model3

The seed's headline (99.52%) is the best of 15 test evaluations of one run; the table shows that
statistic for us too, but also what holds: the mean of the last 3 epochs, over seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from nas import data
from nas.cli import ArgumentParser, positive_int
from nas.trials import TARGET_ACCURACY, epochs_to_target, score
from nas.spec import PRESETS, count_params
from nas.run import BATCHNORM_PATHS, RunRecord
from nas.cpu import PRECISIONS, resolve_precision, tune_allocator
from nas.train import DivergedError, EpochResult, resolve_device, resolve_run, train

LAST_EPOCHS = 3  # "accuracy that holds": the mean of the last 3 epochs, as the search scores it
DEFAULT_OUT = Path("runs/reproduce")
TEST_SIZE = 10_000


@dataclass(frozen=True)
class SeedRun:
    """One of the seed study's runs as its README documents it (15 epochs, test set after each)."""

    params: int  # "Total params" of its layer table
    reported_best: float  # "Best Accuracy" of its results table, percent
    reported_epoch: int  # "Epoch" of its results table
    test_correct: tuple[int, ...]  # "Accuracy: N/10000" of each epoch in its training log
    epoch_seconds: tuple[int, ...]  # each epoch's training-bar time in the log (whole seconds)

    @property
    def test_acc(self) -> list[float]:
        return [100.0 * c / TEST_SIZE for c in self.test_correct]


# Transcribed from the seed study's README (its results table, layer tables and training logs).
SEED_RUNS: dict[str, SeedRun] = {
    "model1": SeedRun(
        7224, 99.35, 15,
        (9755, 9735, 9841, 9914, 9906, 9912, 9907, 9879, 9881, 9915, 9888, 9906, 9902, 9917, 9935),
        (18, 18, 18, 17, 18, 17, 17, 17, 17, 19, 17, 18, 17, 18, 17),
    ),
    "model2": SeedRun(
        7838, 99.34, 15,
        (9833, 9834, 9848, 9899, 9890, 9906, 9914, 9923, 9909, 9913, 9907, 9916, 9928, 9921, 9934),
        (21, 21, 20, 20, 20, 21, 21, 21, 21, 20, 21, 22, 22, 22, 20),
    ),
    "model3": SeedRun(
        7918, 99.52, 11,
        (9819, 9872, 9914, 9899, 9911, 9896, 9921, 9908, 9944, 9941, 9952, 9943, 9950, 9945, 9950),
        (21, 21, 21, 22, 21, 21, 21, 20, 21, 21, 21, 21, 21, 21, 21),
    ),
}


@dataclass(frozen=True)
class Run:
    """One training run of a preset with one seed, evaluated on the test set after every epoch."""

    model: str
    seed: int
    params: int
    history: tuple[EpochResult, ...]
    wall_seconds: float  # training and per-epoch evaluation

    @property
    def test_acc(self) -> list[float]:
        return [e.eval_acc for e in self.history]


@dataclass(frozen=True)
class Settings:
    """What the runs were asked for and where they ran; goes into the table's preamble and the JSON."""

    models: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int | None  # None: each preset's own (15)
    subset: int | None
    device: str
    precision: str  # the setup each model trained with: precision and memory format
    threads: int
    torch: str


# --- pure helpers -------------------------------------------------------------------------------


def best_epoch(accuracies: list[float]) -> tuple[float, int]:
    """The best accuracy and its 1-based epoch (the first, if it recurs)."""
    index = max(range(len(accuracies)), key=accuracies.__getitem__)
    return accuracies[index], index + 1


def holding_score(accuracies: list[float]) -> float:
    return score(accuracies, LAST_EPOCHS)


def mean_std(values: list[float]) -> str:
    """"m ± s" over seeds (sample std), or just m for a single seed."""
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}%"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def model_label(name: str) -> str:
    return name.replace("model", "Model ")


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def parse_models(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise ValueError(f"--models: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(PRESETS)}")
    return names


# --- training -----------------------------------------------------------------------------------


def run_preset(name: str, seed: int, split: data.Split, epochs: int | None, run: RunRecord, progress: bool) -> Run:
    """Train preset `name` with its documented config and `seed`, evaluating on split's eval set."""
    preset = PRESETS[name]
    config = replace(preset.train, seed=seed, epochs=epochs or preset.train.epochs)
    start = time.perf_counter()
    result = train(preset.arch, config, split, replace(run, seed=seed), progress=progress)
    return Run(name, seed, count_params(preset.arch), tuple(result.history), time.perf_counter() - start)


# --- outputs ------------------------------------------------------------------------------------


def results_table(runs: list[Run], settings: Settings) -> str:
    """The seed's results table, each model's seed row followed by ours."""
    rows = [
        f"| Model | Run | Params | Best test acc (epoch) | Mean of last {LAST_EPOCHS} epochs "
        f"| Holds ≥ {TARGET_ACCURACY}% from epoch | Wall time |",
        "|:--|:--|--:|:--|:--|:--|:--|",
    ]
    for name in settings.models:
        seed_run = SEED_RUNS[name]
        acc, epoch = best_epoch(seed_run.test_acc)
        rows.append(
            f"| {model_label(name)} | seed study, 1 run (its log) | {seed_run.params:,} | {acc:.2f}% ({epoch}) | "
            f"{holding_score(seed_run.test_acc):.2f}% | {epochs_to_target(seed_run.test_acc) or '—'} | "
            f"{duration(sum(seed_run.epoch_seconds))} training (log's epoch bars) |"
        )
        ours = [r for r in runs if r.model == name]
        if not ours:
            continue
        epochs = len(ours[0].history)
        last = min(LAST_EPOCHS, epochs)
        bests = [best_epoch(r.test_acc) for r in ours]
        top = max(range(len(ours)), key=lambda i: bests[i][0])
        best_text = f"{bests[top][0]:.2f}% ({bests[top][1]}, seed {ours[top].seed})"
        if len(ours) > 1:
            best_text += f"; per-seed best {mean_std([b[0] for b in bests])}"
        holds = ", ".join(str(epochs_to_target(r.test_acc) or "—") for r in ours)
        wall = statistics.mean(r.wall_seconds for r in ours)
        rows.append(
            f"| {model_label(name)} | ours, {plural(len(ours), 'seed')} × {plural(epochs, 'epoch')} | "
            f"{ours[0].params:,} | {best_text} | {mean_std([holding_score(r.test_acc) for r in ours])}"
            f"{'' if last == LAST_EPOCHS else f' (last {last})'} | {holds} | {duration(wall)} per run |"
        )
    return "\n".join(rows)


def settings_text(settings: Settings) -> str:
    data_text = f"the first {settings.subset:,} training images" if settings.subset else "all 60,000 training images"
    lines = [
        f"Ours: seeds {', '.join(map(str, settings.seeds))}; "
        f"{plural(settings.epochs, 'epoch') if settings.epochs else 'each preset’s documented epochs'} on "
        f"{data_text}; test accuracy on the 10,000 test images after every epoch; {settings.device}, "
        f"{settings.precision}, {settings.threads} threads, torch {settings.torch}. Mean ± std is over seeds "
        "(sample std); 'holds from' is the first epoch from which accuracy stays at or above the target, "
        "per seed.",
    ]
    if settings.subset or any(settings.epochs not in (None, PRESETS[m].train.epochs) for m in settings.models):
        lines.append("")
        lines.append("A quick check, not a reproduction: the seed trained 15 epochs on all 60,000 images.")
    return "\n".join(lines)


def report_markdown(runs: list[Run], settings: Settings, figure_name: str) -> str:
    return "\n".join([
        "# The seed study's Models 1-3, retrained",
        "",
        settings_text(settings),
        "",
        results_table(runs, settings),
        "",
        f"![test accuracy per epoch]({figure_name})",
        "",
    ])


def accuracy_figure(runs: list[Run], models: tuple[str, ...]) -> Figure:
    """Test accuracy per epoch: our mean over seeds with its min-max band, the seed's log dashed."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for name, color in zip(models, colors * len(models)):
        ours = [r.test_acc for r in runs if r.model == name]
        seed_acc = SEED_RUNS[name].test_acc
        ax.plot(range(1, len(seed_acc) + 1), seed_acc, linestyle="--", color=color, alpha=0.7,
                label=f"{model_label(name)}, seed study's log")
        if not ours:
            continue
        epochs = range(1, len(ours[0]) + 1)
        per_epoch = list(zip(*ours))
        ax.plot(epochs, [statistics.mean(v) for v in per_epoch], marker="o", markersize=3, color=color,
                label=f"{model_label(name)}, ours (mean of {plural(len(ours), 'seed')})")
        low, high = [min(v) for v in per_epoch], [max(v) for v in per_epoch]
        if len(epochs) > 1:
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
        else:
            ax.vlines(epochs, low, high, color=color, alpha=0.4, linewidth=4)
    ax.axhline(TARGET_ACCURACY, color="black", linestyle=":", linewidth=1, label=f"{TARGET_ACCURACY}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def raw_json(runs: list[Run], settings: Settings) -> dict:
    return {
        "settings": asdict(settings),
        "runs": [
            {
                "model": r.model,
                "seed": r.seed,
                "params": r.params,
                "train_config": replace(PRESETS[r.model].train, seed=r.seed, epochs=len(r.history)).to_dict(),
                "wall_seconds": round(r.wall_seconds, 3),
                "epochs": [asdict(e) for e in r.history],
            }
            for r in runs
        ],
        "seed_study": {name: {**asdict(s), "test_acc": s.test_acc} for name, s in SEED_RUNS.items()
                       if name in settings.models},
    }


def write_outputs(runs: list[Run], settings: Settings, out: Path) -> list[Path]:
    """reproduce.md, test_accuracy.png and reproduce.json in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    table, figure, raw = out / "reproduce.md", out / "test_accuracy.png", out / "reproduce.json"
    raw.write_text(json.dumps(raw_json(runs, settings), indent=1))
    accuracy_figure(runs, settings.models).savefig(figure, dpi=120)
    table.write_text(report_markdown(runs, settings, figure.name))
    return [table, figure, raw]


# --- command line -------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(PRESETS), help="comma-separated presets (default all three)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per model (default 3)")
    parser.add_argument("--epochs", type=positive_int, help="override the presets' 15 epochs (quick checks)")
    parser.add_argument("--subset", type=positive_int, help="train on the first N training images (quick checks)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: on CUDA bf16 where supported; on CPU whichever of fp32 and native bf16 "
                        "measures faster")
    parser.add_argument("--batchnorm", default="pytorch", choices=BATCHNORM_PATHS,
                        help="native: BatchNorm+ReLU in nas's C kernel on CPU (opt-in; needs a C compiler)")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="evaluate the weights after the last step, as the seed did, not their moving average")
    parser.add_argument("--data-dir", help="MNIST directory (default: $NAS_DATA_DIR or data/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    try:
        models = parse_models(args.models)
        device = resolve_device(args.device)
        resolve_precision(args.precision, device)  # an impossible precision fails before the data
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file, not a directory")
        root = data.resolve_data_dir(args.data_dir)
        data.prepare(root, progress=not args.quiet)
        split = data.make_split(data.load_mnist(root), "test", args.subset, device)
    except (ValueError, RuntimeError, data.DataError) as exc:
        # RuntimeError: torch's word on a device string it can't parse or a GPU that isn't there.
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    tune_allocator()
    setups = {}
    for name in models:
        config = replace(PRESETS[name].train, epochs=args.epochs or PRESETS[name].train.epochs)
        setups[name] = resolve_run(PRESETS[name].arch, config, device, len(split.train_x), args.precision,
                                   args.batchnorm, args.ema, subset=args.subset)
    labels = {s.describe() for s in setups.values()}
    setup_text = labels.pop() if len(labels) == 1 else "; ".join(f"{model_label(n)} {s.describe()}"
                                                                 for n, s in setups.items())
    setup_text += ", weight average evaluated" if args.ema else ", last-step weights evaluated"
    settings = Settings(models, tuple(range(args.seeds)), args.epochs, args.subset, str(device), setup_text,
                        torch.get_num_threads(), torch.__version__)
    runs: list[Run] = []
    code = 0
    try:
        for i, (name, seed) in enumerate((m, s) for m in models for s in settings.seeds):
            if not args.quiet:
                print(f"\n== {model_label(name)}, seed {seed} ({i + 1} of {len(models) * args.seeds}) ==")
            run = run_preset(name, seed, split, args.epochs, setups[name], progress=not args.quiet)
            runs.append(run)
            acc, epoch = best_epoch(run.test_acc)
            print(f"{model_label(name)} seed {seed}: best test accuracy {acc:.2f}% (epoch {epoch}), "
                  f"mean of last {plural(min(LAST_EPOCHS, len(run.history)), 'epoch')} "
                  f"{holding_score(run.test_acc):.2f}%, "
                  f"{duration(run.wall_seconds)}", flush=True)
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(runs)} finished runs", file=sys.stderr)
        code = 130
    if not runs:
        return code
    try:
        written = write_outputs(runs, settings, args.out)
    except OSError as exc:
        print(f"error: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print()
    print(results_table(runs, settings))
    print()
    print("Wrote " + ", ".join(str(p) for p in written))
    return code


if __name__ == "__main__":
    sys.exit(main())
