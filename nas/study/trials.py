"""Pure functions over a study's trials: scores, ranking, the Pareto front, counts and tables.
Every command that reads a study takes them from here; none of them opens a storage or trains."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

TARGET_ACCURACY = 99.4  # the seed's bar: "consistent 99.4%"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def score(accuracies: list[float], last: int) -> float:
    """Accuracy that holds: the mean of the last `last` epochs."""
    tail = accuracies[-last:]
    return sum(tail) / len(tail)


def epochs_to_target(accuracies: list[float], target: float = TARGET_ACCURACY) -> int | None:
    """First epoch (1-based) from which accuracy stays >= target to the end, or None."""
    first = None
    for epoch, acc in enumerate(accuracies, start=1):
        if acc >= target:
            first = first or epoch
        else:
            first = None
    return first


def is_rejected(trial: FrozenTrial) -> bool:
    return "rejected" in trial.user_attrs


def counts(trial: FrozenTrial) -> bool:
    """Whether the trial counts toward --trials: trained to its end (completed or pruned), not a
    rejected candidate nor one a warm start brought in."""
    return trial.state in FINISHED and not is_rejected(trial) and "warm_start" not in trial.user_attrs


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials this study trained, which count toward --trials (not those a warm start brought in)."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if counts(t)]


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed, in-budget trials, best accuracy (the first objective) first; the smaller one
    first among equals, so the top trial is always on the accuracy/params Pareto front."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_rejected(t)]
    return sorted(done, key=lambda t: (-t.values[0], t.user_attrs.get("params", 0)))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The most accurate trial; in a two-objective study, the most accurate of the Pareto front."""
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def non_dominated(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, params) points that no other point beats: none is at least as
    accurate and at most as large while strictly better in one of the two."""
    return [
        i for i, (acc, size) in enumerate(points)
        if not any(a >= acc and p <= size and (a > acc or p < size) for a, p in points)
    ]


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The accuracy-up, params-down front of the completed in-budget trials, most accurate first:
    Optuna's own front for a two-objective study, computed from the params attribute otherwise."""
    ranked = ranked_trials(study)
    if is_multi_objective(study):
        front = {t.number for t in study.best_trials}
        return [t for t in ranked if t.number in front]
    sized = [t for t in ranked if "params" in t.user_attrs]
    keep = non_dominated([(t.values[0], t.user_attrs["params"]) for t in sized])
    return [sized[i] for i in keep]


# How a line names each cost a two-objective study may trade accuracy against (its trial user attribute).
COST_UNITS = {"params": "params", "macs": "MACs", "peak_ram": "B peak RAM", "flash": "B flash"}


def cost_objective(study: optuna.Study) -> str:
    """The cost a two-objective study minimizes beside accuracy (its study file's second
    objective); "params" for one objective, or a study stored without its config."""
    objectives = study.user_attrs.get("config", {}).get("objectives") or ["accuracy"]
    return objectives[-1] if len(objectives) > 1 else "params"


def front_note(study: optuna.Study, trial: FrozenTrial, picked: bool) -> str:
    """Where `trial` sits on a two-objective study's Pareto front, naming the front's trials;
    `picked`: it was chosen by default (the front's most accurate), not asked for by number."""
    front = pareto_trials(study)
    numbers = ", ".join(str(t.number) for t in front)
    cost = cost_objective(study)
    size = f"{trial.values[0]:.2f}% validation accuracy, {trial.user_attrs.get(cost, 0):,} {COST_UNITS[cost]}"
    if picked:
        return (f"Trial {trial.number} is the most accurate of the Pareto front ({size}); "
                f"front trials: {numbers} (pick one with --trial N)")
    if any(t.number == trial.number for t in front):
        return f"Trial {trial.number} is on the Pareto front ({size}); front trials: {numbers}"
    return f"note: trial {trial.number} is not on the Pareto front ({size}); front trials: {numbers}"


def trials_table(trials: list[FrozenTrial], device: bool = False) -> str:
    """Markdown rows of completed trials, in the order given; with `device`, also each one's input
    side, first stride and int8 costs (a front against a device's cost)."""
    head = "| # | val acc (mean last) | params |" + (" side | stride | MACs | peak RAM B | flash B |" if device else "")
    rows = [head + " RF | epochs to 99.4 | optimizer | lr | batch | scheduler | augment |",
            "|--:|--:|--:|" + ("--:|--:|--:|--:|--:|" if device else "") + "--:|--:|:--|--:|--:|:--|--:|"]
    for t in trials:
        cfg, attrs = t.user_attrs.get("train", {}), t.user_attrs
        costs = ""
        if device:
            arch = attrs.get("arch", {})
            costs = (f" {arch.get('input_size', '')} | {arch.get('first_stride', 1)} | {attrs.get('macs', 0):,} | "
                     f"{attrs.get('peak_ram', 0):,} | {attrs.get('flash', 0):,} |")
        rows.append(
            f"| {t.number} | {t.values[0]:.2f} | {attrs.get('params', 0):,} |{costs} "
            f"{attrs.get('receptive_field', '')} | {attrs.get('epochs_to_99_4') or '-'} | "
            f"{cfg.get('optimizer', '')} | {cfg.get('lr', 0):.4g} | {cfg.get('batch_size', '')} | "
            f"{cfg.get('scheduler', '')} | {cfg.get('augment', 0):.2f} |"
        )
    return "\n".join(rows)


def results_table(study: optuna.Study, top: int = 10) -> str:
    """The `top` most accurate trials; a two-objective study's whole Pareto front instead."""
    if is_multi_objective(study):
        return trials_table(pareto_trials(study), device=cost_objective(study) != "params")
    return trials_table(ranked_trials(study)[:top])


def trial_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and not is_rejected(t)]
    at_rung = sum(1 for t in pruned if stopped_at_rung(t))
    return {
        "completed": sum(1 for t in trials if t.state == TrialState.COMPLETE),
        **({"stopped at the rung": at_rung} if at_rung else {}),
        "pruned": len(pruned) - at_rung,
        "rejected (over budget, never trained)": sum(1 for t in trials if is_rejected(t)),
        "failed/interrupted": sum(1 for t in trials if t.state == TrialState.FAIL),
    }


def stopped_at_rung(trial: FrozenTrial) -> bool:
    """Pruned by the rung pruner before full training (nas.study.objective.Objective.run_rung)."""
    return "rung_acc" in trial.user_attrs and trial.user_attrs.get("pruned_at") == 0
