"""Figures and an index page for a stored study: optimization history, parameter importances,
per-epoch values (what the pruner saw), and validation accuracy against size with the Pareto front.
The command is nas/cli/report.py: it opens the study and picks matplotlib's backend before any
figure is drawn (Optuna's plots go through pyplot); this module does neither.

Only trained trials carry an accuracy: rejected candidates (over budget or shape-invalid, never
trained) and pruned trials (stopped early, no final score) are counted but not plotted as results.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from optuna.trial import FrozenTrial

from nas.errors import NasError, writing
from nas.study.trials import (
    cost_objective,
    is_multi_objective,
    pareto_trials,
    ranked_trials,
    trial_counts,
    trials_table,
)

ACCURACY_LABEL = "validation accuracy (%)"


class ReportError(NasError):
    """A study that cannot be reported on."""


@dataclass(frozen=True)
class Section:
    title: str
    image: str | None  # file name of the PNG, or None when the figure could not be drawn
    text: str  # what the figure shows, or why it is missing


# --- the study's description ---------------------------------------------------------------------


def budget_of(study: optuna.Study) -> int | None:
    """The parameter budget the study was created with, if the search created it."""
    return study.user_attrs.get("config", {}).get("budget")


# The cost a Pareto figure puts on its x axis: the study's second objective (parameters where it has
# none): the trial user attribute, the axis label, the study file key of its budget.
SIZE_AXES = {"params": ("params", "parameters", "budget"), "macs": ("macs", "MACs", "max_macs"),
             "peak_ram": ("peak_ram", "peak activation RAM (int8 bytes)", "max_peak_ram"),
             "flash": ("flash", "flash (int8 weight bytes)", "max_flash")}


def size_axis(study: optuna.Study) -> tuple[str, str, int | None]:
    """(user attribute, label, budget or None) of the cost the study traded accuracy against."""
    config = study.user_attrs.get("config", {})
    objectives = config.get("objectives") or ["accuracy"]
    attr, label, key = SIZE_AXES.get(objectives[-1], SIZE_AXES["params"])
    return attr, label, config.get(key) or None


# --- figures ------------------------------------------------------------------------------------


def accuracy(trial: FrozenTrial) -> float:
    return trial.values[0]


def history_figure(study: optuna.Study) -> Figure:
    from optuna.visualization.matplotlib import plot_optimization_history

    if not is_multi_objective(study):
        ax = plot_optimization_history(study, target_name=ACCURACY_LABEL)
    else:
        # Optuna draws no best-so-far line for a chosen target of a multi-objective study.
        ax = plot_optimization_history(study, target=accuracy, target_name=ACCURACY_LABEL)
        ranked = sorted(ranked_trials(study), key=lambda t: t.number)
        best, xs, ys = float("-inf"), [], []
        for t in ranked:
            best = max(best, accuracy(t))
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
        ax.legend()
    zoom_on_the_best(ax, [accuracy(t) for t in ranked_trials(study)])
    ax.set_title(f"Optimization history of {study.study_name!r}")
    return ax.figure


def zoom_on_the_best(ax, values: list[float]) -> None:
    """The accuracy axis from a little below the lower quartile to the best, so that 99.3 and 99.5
    are apart however low the worst trial fell; how many lie below the axis is said on it."""
    if len(values) < 8:
        return
    ordered = sorted(values)
    best, quartile = ordered[-1], ordered[len(ordered) // 4]
    low = quartile - 0.25 * (best - quartile)
    below = sum(v < low for v in values)
    if not below:
        return
    ax.set_ylim(low, best + 0.1 * (best - low))
    ax.annotate(f"{below} trial{'s' * (below > 1)} below {low:.2f}%, off the axis", (0.01, 0.01),
                xycoords="axes fraction", fontsize=8, color="dimgray")


def importance_figure(study: optuna.Study) -> tuple[Figure | None, str]:
    """PED-ANOVA importances of the parameters for accuracy, or None and why they can't be had."""
    from optuna.visualization.matplotlib import plot_param_importances

    completed = len(ranked_trials(study))
    if completed < 2:
        return None, f"Parameter importances need at least 2 completed trials; this study has {completed}."
    try:
        with warnings.catch_warnings():
            # PED-ANOVA warns that it favours low targets (hence the minus) and, in small studies,
            # that some regimes hold few trials; the text below says as much once.
            warnings.simplefilter("ignore", UserWarning)
            ax = plot_param_importances(study, target=lambda t: -accuracy(t), target_name=ACCURACY_LABEL)
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
        return None, f"Optuna could not compute parameter importances: {exc}"
    ax.set_title("Parameter importances for high validation accuracy", loc="left")  # Optuna's title sits left
    rows = len(ax.get_yticks())  # one bar a parameter: a deep space has 30, too many for the default height
    ax.figure.set_size_inches(8, max(4.8, 1.6 + 0.26 * rows))
    return ax.figure, (f"How much each parameter matters for reaching high validation accuracy (PED-ANOVA over "
                       f"{completed} completed trials; rough while there are few).")


def intermediate_figure(study: optuna.Study) -> tuple[Figure | None, str]:
    from optuna.visualization.matplotlib import plot_intermediate_values

    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        why = ("a two-objective study does not prune, so its trials report no per-epoch values"
               if is_multi_objective(study) else "no trial has reported a per-epoch value yet")
        return None, f"No intermediate values: {why}."
    ax = plot_intermediate_values(study)
    ax.set_xlabel("epoch (0: the cheap first rung, with pruner \"rung\")")
    ax.set_ylabel(ACCURACY_LABEL)
    ax.set_title("Validation accuracy per epoch, as the pruner saw it")
    text = ("Validation accuracy after every epoch of each trained trial; lines that stop early "
            "are trials the pruner stopped (or trials still running). With the rung pruner, epoch 0 "
            "is the rung's score (a short run on a subset), and a trial with only that point "
            "stopped there.")
    if len(ax.get_lines()) > LEGEND_LINES and ax.get_legend() is not None:
        ax.get_legend().remove()  # a legend of dozens of trials is taller than the figure and tells nothing
    finals = [t.intermediate_values[max(t.intermediate_values)] for t in ranked_trials(study) if t.intermediate_values]
    if len(finals) >= 2:
        low = max(0.0, sorted(finals)[(len(finals) - 1) // 2] - 1.0)  # the better half's last epochs, and 1 point
        ax.set_ylim(low, min(100.0, max(finals) + 0.5))
        text += f" The axis starts at {low:.1f}%: earlier epochs and weaker trials below it are off the axis."
    return ax.figure, text


def pareto_figure(study: optuna.Study) -> Figure:
    """Validation error against size (the study's second objective: params, MACs, peak RAM or flash) for
    every completed trial, the front joined by a step line.

    Error (100 - accuracy) on a log axis: 0.6% and 0.8% are far apart where the good trials sit,
    and a hopeless trial at 15% still fits on the same axis without squashing them."""
    key, label, budget = size_axis(study)
    sizes = bool(study.user_attrs.get("config", {}).get("space", {}).get("image_sizes"))
    done = [t for t in ranked_trials(study) if key in t.user_attrs]
    front = pareto_trials(study)
    front_numbers = {t.number for t in front}
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()

    def error(trial: FrozenTrial) -> float:
        return max(100.0 - accuracy(trial), 1e-3)  # a perfect score still has a place on a log axis

    rest = [t for t in done if t.number not in front_numbers]
    if rest:
        ax.scatter([t.user_attrs[key] for t in rest], [error(t) for t in rest], color="tab:gray",
                   alpha=0.6, label=f"other completed trials ({len(rest)})")
    by_size = sorted(front, key=lambda t: t.user_attrs[key])
    ax.step([t.user_attrs[key] for t in by_size], [error(t) for t in by_size], where="post",
            color="tab:red", alpha=0.5)
    ax.scatter([t.user_attrs[key] for t in front], [error(t) for t in front], color="tab:red", zorder=3,
               label=f"Pareto front ({len(front)})")
    right = max([t.user_attrs[key] for t in done] + [budget or 0])
    for t in front:
        near_the_edge = t.user_attrs[key] > 0.96 * right  # label below left, inside the axes
        ax.annotate(front_label(t, key, sizes),
                    (t.user_attrs[key], error(t)), textcoords="offset points",
                    xytext=(-4, -4) if near_the_edge else (4, 4), ha="right" if near_the_edge else "left",
                    va="top" if near_the_edge else "bottom", fontsize=8)
    if budget:
        ax.axvline(budget, color="black", linestyle=":", label=f"budget ({budget:,})")
    ax.set_yscale("log")
    errors = [error(t) for t in done]
    if errors:
        ax.set_ylim(min(errors) / 1.15, max(errors) * 1.15)
    ticks = error_ticks(*ax.get_ylim())
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(matplotlib_percent())
    # the same axis read as accuracy, on the right
    accuracy_axis = ax.twinx()
    accuracy_axis.set_yscale("log")
    accuracy_axis.set_ylim(ax.get_ylim())
    accuracy_axis.yaxis.set_major_locator(FixedLocator(ticks))
    accuracy_axis.yaxis.set_minor_locator(NullLocator())
    accuracy_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{100 - value:.4g}%"))
    accuracy_axis.set_ylabel("validation accuracy (%)")
    accuracy_axis.grid(False)
    ax.set_xlabel(label)
    ax.set_ylabel("validation error (%, log scale; lower is better)")
    ax.set_title(f"Error against size in {study.study_name!r}")
    ax.legend(loc="upper right")
    return fig


def front_label(trial: FrozenTrial, key: str, sizes: bool = False) -> str:
    """A front point's label: its number (and preset), accuracy and cost, with `sizes` (a study
    that searched them) its input side, and a first conv of stride 2 as `/2`."""
    name = trial.user_attrs.get("preset")
    arch = trial.user_attrs.get("arch", {})
    shape = [f"{arch['input_size']}px"] if sizes and "input_size" in arch else []
    shape += ["/2"] if arch.get("first_stride", 1) != 1 else []
    return (f"#{trial.number}" + (f" {name}" if name else "") + f" {accuracy(trial):.2f}%, "
            f"{trial.user_attrs[key]:,}" + (f" ({' '.join(shape)})" if shape else ""))


# Tick values (percent error) dense enough that 0.6% and 0.7% are told apart where the good
# trials sit, and sparse enough to read across a wide range.
LEGEND_LINES = 12  # trials a per-epoch figure names in a legend
ERROR_TICKS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.2, 1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 70, 100)


def error_ticks(low: float, high: float) -> list[float]:
    """The ERROR_TICKS within [low, high], thinned to at most 12, dropping the dense upper ones."""
    ticks = [t for t in ERROR_TICKS if low <= t <= high]
    while len(ticks) > 12:
        ticks = [t for i, t in enumerate(ticks) if t <= 1 or i % 2 == 0]
        if len(ticks) > 12:
            ticks = ticks[::2]
    return ticks or [low, high]


def matplotlib_percent():
    return FuncFormatter(lambda value, _: f"{value:g}%")


# --- the page -----------------------------------------------------------------------------------


def objectives_text(study: optuna.Study) -> str:
    if is_multi_objective(study):
        return f"validation accuracy (maximized) and {size_axis(study)[1]} (minimized): a Pareto front"
    return "validation accuracy (maximized), mean of the last epochs"


def index_markdown(study: optuna.Study, url: str, sections: list[Section], top: int) -> str:
    counts = trial_counts(study)
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Storage `{url}`; objectives: {objectives_text(study)}.",
        "",
        "Trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ". "
        "Rejected candidates were never trained and pruned trials have no final score, so "
        "neither appears among the results below (pruned trials do appear in the per-epoch plot, where there is one).",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
        lines += [section.text, ""]
    front = pareto_trials(study)
    lines += [
        f"## Pareto front ({len(front)} trials, most accurate first)",
        "",
        "Completed trials that no other completed trial beats on both validation accuracy and size.",
        "",
        trials_table(front, device=is_multi_objective(study) and cost_objective(study) != "params"),
        "",
        f"## Top {top} trials by validation accuracy",
        "",
        trials_table(ranked_trials(study)[:top]),
        "",
    ]
    return "\n".join(lines)


def figure_sections(study: optuna.Study, save) -> list[Section]:
    sections = [Section("Optimization history", save(history_figure(study), "optimization_history.png"),
                        "Validation accuracy of every completed trial in the order they ran.")]
    fig, text = importance_figure(study)
    sections.append(Section("Parameter importances", save(fig, "param_importances.png") if fig else None, text))
    fig, text = intermediate_figure(study)
    sections.append(Section("Intermediate values", save(fig, "intermediate_values.png") if fig else None, text))
    cost = size_axis(study)[1].split(" (")[0]
    sections.append(Section(f"Accuracy against {cost}", save(pareto_figure(study), "pareto.png"),
                            f"Every completed trial; the red points are the Pareto front (higher accuracy, less {cost})."))
    return sections


def write_report(study: optuna.Study, url: str, out: Path, top: int = 10) -> list[Path]:
    """Every PNG and the index.md, in `out`; returns the paths written. Raises ReportError for a
    study without a completed trial (before writing anything) and OutputError where `out` can't be
    written. Uses pyplot's current backend: a command picks a non-interactive one first."""
    import matplotlib.pyplot as plt

    if not ranked_trials(study):
        raise ReportError(f"study {study.study_name!r} has no completed trial to report on yet")
    written: list[Path] = []
    sections: list[Section] = []

    def save(fig: Figure, name: str) -> str:
        path = out / name
        fig.savefig(path, dpi=120, bbox_inches="tight")  # Optuna's figures clip long parameter names
        plt.close(fig)
        written.append(path)
        return name

    with writing(f"the report into {out}"), warnings.catch_warnings():
        out.mkdir(parents=True, exist_ok=True)
        # Optuna's matplotlib plots are marked experimental; the figures are what the user asked for.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sections += figure_sections(study, save)
        index = out / "index.md"
        index.write_text(index_markdown(study, url, sections, top))
    written.append(index)
    return written
