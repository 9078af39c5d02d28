"""Pure helpers over a study's trials: scores, ranking, the Pareto front, counts, tables, and the
self-describing checkpoint. Every command that reads a study (search, replay, report, reproduce,
bench, confirm, export) takes them from here."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import optuna
import torch
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from nas.cpu import native
from nas.config import RungConfig, StudyConfig
from nas.run import RunRecord, record_of
from nas.space import SpaceConfig, suggest
from nas.spec import ArchSpec, TrainConfig
from nas.storage import StorageError, open_storage
from nas.cpu import resolve_precision
from nas.train import resolve_device

DEFAULT_STUDY = "mnist-8k"
TARGET_ACCURACY = 99.4  # the seed's bar: "consistent 99.4%"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def open_study(url: str, name: str | None = None) -> optuna.Study:
    """The named study of an existing storage; without a name, its only study (or mnist-8k among
    several). Raises StorageError, naming the studies it holds, where there is no such study."""
    storage = open_storage(url, must_exist=True)
    names = optuna.get_all_study_names(storage)
    if name is None:
        name = names[0] if len(names) == 1 else DEFAULT_STUDY
    if name not in names:
        known = f"; it holds {', '.join(sorted(names))}" if names else "; it holds no study"
        raise StorageError(f"no study named {name!r} in {url}{known}")
    return optuna.load_study(study_name=name, storage=storage)


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


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials this study trained, which count toward --trials (not those a warm start brought in)."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED)
            if not is_rejected(t) and "warm_start" not in t.user_attrs]


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


def config_from_study(study: optuna.Study) -> StudyConfig:
    """The study's own copy of its description, stored when it was created."""
    stored = study.user_attrs["config"]
    return dataclasses.replace(
        StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
                       if k not in ("space", "rung")}),
        space=SpaceConfig.from_dict(stored["space"]), rung=RungConfig(**stored.get("rung", {})),
    )


def trials_table(trials: list[FrozenTrial]) -> str:
    """Markdown rows of completed trials, in the order given."""
    rows = ["| # | val acc (mean last) | params | RF | epochs to 99.4 | optimizer | lr | batch | scheduler | augment |",
            "|--:|--:|--:|--:|--:|:--|--:|--:|:--|--:|"]
    for t in trials:
        cfg = t.user_attrs.get("train", {})
        rows.append(
            f"| {t.number} | {t.values[0]:.2f} | {t.user_attrs.get('params', 0):,} | "
            f"{t.user_attrs.get('receptive_field', '')} | {t.user_attrs.get('epochs_to_99_4') or '-'} | "
            f"{cfg.get('optimizer', '')} | {cfg.get('lr', 0):.4g} | {cfg.get('batch_size', '')} | "
            f"{cfg.get('scheduler', '')} | {cfg.get('augment', 0):.2f} |"
        )
    return "\n".join(rows)


def results_table(study: optuna.Study, top: int = 10) -> str:
    """The `top` most accurate trials; a two-objective study's whole Pareto front instead."""
    if is_multi_objective(study):
        return trials_table(pareto_trials(study))
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
    """Pruned by the rung pruner before full training (nas.search.Objective.run_rung)."""
    return "rung_acc" in trial.user_attrs and trial.user_attrs.get("pruned_at") == 0


class ReplayError(RuntimeError):
    """A stored trial that can't be trained again here, as it was."""


def rebuild(trial: FrozenTrial, config: StudyConfig) -> tuple[ArchSpec, TrainConfig]:
    """The same space function the search ran, fed the stored params."""
    stored = trial.user_attrs["train"]
    arch, train_config = suggest(FixedTrial(trial.params, trial.number), config.space, stored["epochs"],
                                 stored["seed"], budget=config.budget)
    if arch != ArchSpec.from_dict(trial.user_attrs["arch"]):
        raise ReplayError(f"trial {trial.number}: the search space no longer rebuilds the stored architecture")
    return arch, train_config


def stored_run(trial: FrozenTrial, device: str | None, batchnorm: str | None) -> RunRecord:
    """The trial's run record, on `device` (default: the stored one, where it exists here) and,
    if asked, another BatchNorm path. Raises ReplayError where the stored path can't run here."""
    run = record_of(trial.user_attrs)
    if device is None:
        device = run.device if run.device == "cpu" or torch.cuda.is_available() else "cpu"
    run = replace(run, device=str(resolve_device(device)), batchnorm=batchnorm or run.batchnorm)
    if run.batchnorm == "native" and not native.available():
        raise ReplayError(f"trial {trial.number} trained with nas's C BatchNorm kernel, which can't be built "
                          "here; --batchnorm pytorch replays it on PyTorch's BatchNorm, not bit for bit")
    resolve_precision(run.precision, torch.device(run.device))
    return run


BASELINE = "model3"  # the hand design every confirmation compares against


def confirm_key(prefix: str, label: str, seed: int) -> str:
    """The study user attribute holding one confirm run ("confirm" on validation, "confirm-test")."""
    return f"{prefix}:{label}:seed{seed}"


def confirm_runs(study: optuna.Study, prefix: str = "confirm") -> dict[str, list[dict]]:
    """The stored confirm runs by candidate label ("trial<N>" or "model3")."""
    runs: dict[str, list[dict]] = {}
    for key, value in sorted(study.user_attrs.items()):
        if key.startswith(prefix + ":") and isinstance(value, dict):
            runs.setdefault(value["candidate"], []).append(value)
    return runs


def confirmed_best(study: optuna.Study) -> int | None:
    """The trial number with the best mean validation score over its confirm runs, if any."""
    means = {runs[0]["trial"]: sum(r["score"] for r in runs) / len(runs)
             for label, runs in confirm_runs(study).items() if label != BASELINE and runs[0]["trial"] is not None}
    return max(means, key=means.__getitem__) if means else None


def checkpoint(arch: ArchSpec, config: TrainConfig, run: RunRecord, model: torch.nn.Module, extra: dict) -> dict:
    """A self-describing checkpoint: loadable with weights_only=True and rebuildable, and retrainable
    the same way, without a study."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"arch": arch.to_dict(), "train": config.to_dict(), "run": run.to_dict(), "state_dict": state, **extra}
