"""The seed study's Models 1-3 retrained with their documented configs over several seeds, our
test-set figures set beside the seed's logged ones: a Markdown table, a PNG of the curves, raw JSON
(the command is nas/cli/reproduce.py).

The seed's headline (99.52%) is the best of 15 test evaluations of one run; the table shows that
statistic for us too, but also what holds: the mean of the last 3 epochs, over seeds.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from nas import data
from nas.errors import UsageError, writing
from nas.run.record import RunRecord
from nas.spec import PRESETS, TrainConfig, count_params
from nas.study.trials import TARGET_ACCURACY, epochs_to_target, score
from nas.train import EpochResult, train
from nas.train.setup import RunSettings, resolve_run

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


def preset_name(name: str) -> str:
    """A preset's name as --models takes it: the preset's own (model3) or its short form (m3)."""
    short = re.fullmatch(r"m(\d+)", name)
    return f"model{short.group(1)}" if short else name


def parse_models(text: str) -> tuple[str, ...]:
    """Comma-separated presets, long (model1) or short (m1), in order and once each; UsageError
    names the unknown ones."""
    given = [n.strip() for n in text.split(",") if n.strip()]
    names = tuple(dict.fromkeys(preset_name(n) for n in given))
    unknown = [n for n in given if preset_name(n) not in PRESETS]
    if unknown or not names:
        short = ", ".join(f"m{n.removeprefix('model')}" for n in PRESETS if re.fullmatch(r"model\d+", n))
        raise UsageError(f"--models: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(PRESETS)}"
                         + (f" (or {short})" if short else ""))
    return names


# --- training -----------------------------------------------------------------------------------


def preset_config(name: str, epochs: int | None) -> TrainConfig:
    """Preset `name`'s documented training config, with `epochs` in place of its own if given."""
    preset = PRESETS[name]
    return replace(preset.train, epochs=epochs or preset.train.epochs)


def resolve_setups(models: tuple[str, ...], settings: RunSettings, device: torch.device, images: int,
                   epochs: int | None, subset: int | None) -> dict[str, RunRecord]:
    """Each model's run record as `settings` ask (precision and memory format measured per net on a
    CPU); its seed is filled in per run. The thread count must be set before calling."""
    return {name: resolve_run(PRESETS[name].arch, preset_config(name, epochs), settings, device, images, subset)
            for name in models}


def setup_text(setups: dict[str, RunRecord], ema: bool) -> str:
    """How the models trained, for the table's preamble: one setup, or one per model."""
    labels = {s.describe() for s in setups.values()}
    text = labels.pop() if len(labels) == 1 else "; ".join(f"{model_label(n)} {s.describe()}"
                                                          for n, s in setups.items())
    return text + (", weight average evaluated" if ema else ", last-step weights evaluated")


def run_preset(name: str, seed: int, split: data.Split, epochs: int | None, run: RunRecord, progress: bool) -> Run:
    """Train preset `name` with its documented config and `seed`, evaluating on split's eval set."""
    preset = PRESETS[name]
    config = replace(preset_config(name, epochs), seed=seed)
    start = time.perf_counter()
    result = train(preset.arch, config, split, replace(run, seed=seed), progress=progress)
    return Run(name, seed, count_params(preset.arch), tuple(result.history), time.perf_counter() - start)


def run_line(run: Run) -> str:
    """One finished run in a line: its best and holding accuracy and its wall time."""
    acc, epoch = best_epoch(run.test_acc)
    return (f"{model_label(run.model)} seed {run.seed}: best test accuracy {acc:.2f}% (epoch {epoch}), "
            f"mean of last {plural(min(LAST_EPOCHS, len(run.history)), 'epoch')} "
            f"{holding_score(run.test_acc):.2f}%, {duration(run.wall_seconds)}")


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
    """reproduce.md, test_accuracy.png and reproduce.json in `out`; returns their paths. OutputError
    where `out` can't be written."""
    table, figure, raw = out / "reproduce.md", out / "test_accuracy.png", out / "reproduce.json"
    with writing(f"to {out}"):
        out.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(raw_json(runs, settings), indent=1))
        accuracy_figure(runs, settings.models).savefig(figure, dpi=120)
        table.write_text(report_markdown(runs, settings, figure.name))
    return [table, figure, raw]
