"""The rung in a two-objective study (accuracy and a cost): a candidate stops after its short run if
cheaper candidates clearly beat it there.

Optuna cannot prune a multi-objective trial (Trial.report and should_prune raise; optuna#3450), so
the objective decides itself, from the rung scores (`rung_acc`) and costs the other trials stored as
user attributes, and a stopped trial ends as PRUNED: TPE then counts it among the bad draws
(_split_pruned_trials), and the Pareto front (study.best_trials) holds completed trials only, as
does every figure of nas.report. FAIL would be wrong: TPE leaves failed trials out, so it would
learn nothing from the screening and could draw the same losers again, and FAIL means a trial that
broke (a stale worker, a crash), not one that was screened out. The trial reports no intermediate
value: TPE ranks a pruned trial that has one with the study's single direction, which a
two-objective study has not."""

from __future__ import annotations

import time

import optuna
from optuna.trial import FrozenTrial, TrialState

RUNG_ATTR = "rung_acc"
POLL_SECONDS = 1.0


def goes_on_front(score: float, cost: float, others: list[tuple[float, float]], margin: float) -> bool:
    """Whether a candidate with rung score `score` and cost `cost` trains in full, given the (rung
    score, cost) of the study's other trials: it stops only if one that costs no more than it does
    scored more than `margin` points better at the rung. A candidate cheaper than all the others
    always goes on (it may start the front)."""
    cheaper = [s for s, c in others if c <= cost]
    return not cheaper or score >= max(cheaper) - margin


def rivals(trials: list[FrozenTrial], number: int, cost_key: str) -> list[tuple[float, float]]:
    """(rung score, cost) of every trial but `number` that ran the rung and stored its cost, whatever
    became of it (completed, stopped at the rung, still training, carried over by a warm start)."""
    return [(t.user_attrs[RUNG_ATTR], t.user_attrs[cost_key]) for t in trials
            if t.number != number and RUNG_ATTR in t.user_attrs and cost_key in t.user_attrs]


def preset_at_rung(trial: FrozenTrial) -> bool:
    """An enqueued preset that is running and has no rung score yet."""
    return (trial.state == TrialState.RUNNING and "preset" in trial.user_attrs
            and RUNG_ATTR not in trial.user_attrs and "rejected" not in trial.user_attrs)


def front_rung_verdict(study: optuna.Study, trial: optuna.Trial, score: float, cost_key: str, margin: float,
                       patience: float = 900.0) -> bool:
    """Whether `trial` (its rung score `score`, its cost stored as `cost_key`) goes on. As the
    one-objective rung pruner, it waits at most `patience` seconds for a running preset's rung score
    where no other score is in yet (several workers that started together)."""
    waited = 0.0
    while True:
        trials = study.get_trials(deepcopy=False)
        others = rivals(trials, trial.number, cost_key)
        if others or waited >= patience or not any(preset_at_rung(t) for t in trials if t.number != trial.number):
            break
        time.sleep(POLL_SECONDS)
        waited += POLL_SECONDS
    return goes_on_front(score, float(trial.user_attrs[cost_key]), others, margin)
