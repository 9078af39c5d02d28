"""Three levers on the rung pruner's cost, each a [rung] study-file option, each off by default:

(a) a keep share that tightens when the rung scores crowd: once TPE proposes near-best nets, the
    2-epoch rung can't tell them apart and most pass the margin and the keep share, so full
    trainings fill the run (crowd_noise, crowd_window, crowd_keep);
(b) a second, longer rung between the first and full training (second_epochs, second_subset);
(c) a full training stopped at given epochs when it trails the best trial's curve there by more
    than the noise (curve_epochs, curve_margin).

Pure rules over scores, applied by nas.study.sampling.RungPruner (a, c) and by the objective's
rung (b); docs/performance.md says how to measure each."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.studyfile import RungConfig

SECOND_RUNG_ATTR = "rung2_acc"  # a trial's score at the second rung (b)


def crowded(recent: list[float], noise: float) -> bool:
    """Whether the rung scores `recent` crowd: the middle half of them (the interquartile range,
    which the odd far-off candidate does not move) spans at most `noise` points. Fewer than 4
    scores never crowd."""
    if len(recent) < 4:
        return False
    ranked = sorted(recent)
    quarter = len(ranked) // 4
    return ranked[-1 - quarter] - ranked[quarter] <= noise


def keep_share(scores: list[float], keep: float, rung: RungConfig) -> float:
    """The keep share a candidate's rung score is held to, given the other rung scores in trial
    order: `keep`, or the tighter rung.crowd_keep while the last rung.crowd_window of them crowd
    within rung.crowd_noise (a; crowd_noise 0: never)."""
    if rung.crowd_noise > 0 and len(scores) >= rung.crowd_window and crowded(scores[-rung.crowd_window:],
                                                                              rung.crowd_noise):
        return min(keep, rung.crowd_keep)
    return keep


def second_rung_pays(rung: RungConfig, epochs: int, train_images: int) -> bool:
    """Whether the second rung (b) is asked for and costs less than the full training it screens for."""
    images = min(rung.second_subset or train_images, train_images)
    return rung.second_epochs > 0 and rung.second_epochs * images < epochs * train_images


def second_rung_scores(trials: list[FrozenTrial], number: int) -> list[float]:
    """The second-rung scores of the other trials, in trial order."""
    return [t.user_attrs[SECOND_RUNG_ATTR] for t in sorted(trials, key=lambda t: t.number)
            if t.number != number and SECOND_RUNG_ATTR in t.user_attrs]


def best_curve(trials: list[FrozenTrial]) -> dict[int, float]:
    """The per-epoch validation accuracies (intermediate values, epochs from 1) of the best completed
    trial of a one-objective study; {} while none has completed."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and "rejected" not in t.user_attrs]
    if not done:
        return {}
    best = max(done, key=lambda t: t.value)
    return {step: value for step, value in best.intermediate_values.items() if step >= 1}


def trails_best(value: float, epoch: int, curve: dict[int, float], rung: RungConfig) -> bool:
    """Whether a full training that scored `value` after `epoch` stops there (c): `epoch` is one of
    rung.curve_epochs and `value` is more than rung.curve_margin points below the best trial's
    accuracy after the same epoch. Never where the best trial has no such epoch."""
    if epoch not in rung.curve_epochs or epoch not in curve:
        return False
    return value < curve[epoch] - rung.curve_margin


def stops_on_the_curve(study: optuna.Study, trial: FrozenTrial, rung: RungConfig) -> bool:
    """(c) for a trial that has just reported an epoch (its last step)."""
    epoch = trial.last_step
    if epoch is None or epoch not in rung.curve_epochs:
        return False
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number != trial.number]
    return trails_best(trial.intermediate_values[epoch], epoch, best_curve(others), rung)
