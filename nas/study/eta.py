"""The search's ETA, as pure functions of the study's own timeline: the trials that finished, the
trials in flight as their workers last reported them, and how many have not started.

    left = (not started x expected seconds of a trial + each running trial's remaining seconds) / workers

A trial either stops at the rung (seconds) or trains in full (minutes), so the expected trial weighs
the two by the share of full trainings, and that share is not fixed: the first TPE_STARTUP trials
are random draws, most of them far below the best, while TPE's later proposals sit near the best
and pass the rung more and more often. The share is therefore read from TPE's trials only, recent
ones weighing most (full_share). A running full training has a known number of epochs left at its
own measured epoch time; that part is exact where the old estimate guessed.

A study with a second rung (nas.study.levers, lever b) screens twice: a candidate that passes the
first rung stops at the second or trains in full. Its expected trial weighs the three ends by the
share that passes the first rung (as above) and the share of those that passes the second (recent
ones weighing most, the same prior); without one, the second share is 1 and the two ends above remain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from statistics import fmean

from optuna.trial import FrozenTrial

from nas.study.levers import SECOND_RUNG_ATTR
from nas.study.sampling import TPE_STARTUP
from nas.study.trials import stopped_at_rung

# The share of full trainings among TPE's candidates (full_share, expected_share). The recent share
# holds for the next few trials and gives way to LONG_RUN_SHARE over about NEAR_TRIALS trials:
# in the recorded default run (tests/data/main-job-2026-12-07.json, docs/performance.md) 21 of the 41
# candidates TPE proposed trained in full, few of the first and most of the last. The constants were
# chosen on that one run, which is also the one the replay test checks against.
LONG_RUN_SHARE = 0.5
NEAR_TRIALS = 5.0
DECAY = 0.1  # each screened trial weighs (1 - DECAY) times the one after it
PRIOR_WEIGHT = 1.0  # LONG_RUN_SHARE weighs as this many trials older than the first


@dataclass(frozen=True)
class Finished:
    """A finished trial, as the ETA sees it."""

    seconds: float  # wall time, start to end
    at_rung: bool  # stopped at the rung; otherwise it went on to full training (or ran no rung)
    rung_seconds: float | None = None  # one that went on: its time outside full training (None: no rung)
    preset: bool = False  # enqueued presets run first and go on, so they tell nothing of the share
    earlier: bool = False  # finished in an earlier run of the study
    number: int = 0  # its trial number: TPE_STARTUP and the share's weights follow it
    second_rung: bool = False  # it ran a second rung (and stopped there if at_rung)


@dataclass(frozen=True)
class Running:
    """A trial in flight, as its worker last reported it (nas.study.progress.TrialProgress)."""

    number: int
    seconds: float  # since it started
    training: bool  # in full training; False: still being screened at the rung (or not yet begun)
    epochs_left: int = 0  # training: epochs still to run, the current one included
    epoch_seconds: float | None = None  # training: its own mean epoch time so far (None: no epoch done yet)
    in_epoch: float = 0.0  # training: seconds since its last epoch ended (or training began)
    preset: bool = False
    second_rung: bool = False  # being screened at a second rung now


def finished_times(trials: list[FrozenTrial], since: datetime) -> list[Finished]:
    """`trials` (finished, counting toward --trials: rejected ones take no time) with their wall
    times, those started before `since` marked earlier."""
    return [Finished(seconds=(t.datetime_complete - t.datetime_start).total_seconds(),
                     at_rung=stopped_at_rung(t), rung_seconds=_rung_seconds(t),
                     preset="preset" in t.user_attrs, earlier=t.datetime_start < since, number=t.number,
                     second_rung=SECOND_RUNG_ATTR in t.user_attrs)
            for t in trials]


def _rung_seconds(trial: FrozenTrial) -> float | None:
    if stopped_at_rung(trial) or "rung_acc" not in trial.user_attrs or "train_seconds" not in trial.user_attrs:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds() - trial.user_attrs["train_seconds"]


def full_share(fates: list[bool], prior: float = LONG_RUN_SHARE, prior_weight: float = PRIOR_WEIGHT,
               decay: float = DECAY) -> float:
    """The share of full trainings now, from the fates of the screened candidates in trial order
    (True: trained in full): a weighted mean, the newest weighing 1, each older one (1 - decay)
    times its successor, and `prior` as `prior_weight` trials older than the first."""
    total = prior_weight * (1 - decay) ** len(fates)
    full = total * prior
    for age, went_on in enumerate(reversed(fates)):
        weight = (1 - decay) ** age
        total += weight
        full += weight * went_on
    return full / total


def expected_share(now: float, trials: int, long_run: float = LONG_RUN_SHARE, near: float = NEAR_TRIALS) -> float:
    """The mean share of full trainings over the next `trials` candidates, the share moving from
    `now` to `long_run` as exp(-k / near) over the k-th of them."""
    if trials <= 0:
        return now
    return long_run + (now - long_run) * near / trials * (1 - math.exp(-trials / near))


def _mean(kind: list[Finished]) -> float | None:
    """Mean wall time, this run's own where it has any: the machine or its load may have changed."""
    own = [f.seconds for f in kind if not f.earlier]
    seconds = own or [f.seconds for f in kind]
    return fmean(seconds) if seconds else None


def _left_in_training(trial: Running, full: float) -> float:
    if trial.epoch_seconds is None:
        return max(0.0, full - trial.seconds)
    return max(0.0, trial.epochs_left * trial.epoch_seconds - trial.in_epoch)


def eta_seconds(finished: list[Finished], running: list[Running], not_started: int, workers: int = 1) -> float | None:
    """Seconds until the search ends: the expected work left, shared by `workers`, and never less
    than the longest running trial's remaining time. The work left is not_started trials at the
    expected time of one (expected_share of them past the first rung, and of those, the recent share
    past a second rung where the study has one), each running trial's remaining time (its epochs
    left at its own epoch time once it trains in full), and, while trials remain to be started, half
    a full training for each worker but one: the search ends when its last worker does, and the
    others wait for it. None while no full training's time is known (neither finished nor measured
    for an epoch)."""
    full = _mean([f for f in finished if not f.at_rung])
    if full is None:  # none finished yet: a running one's epochs tell
        guesses = [t.seconds + _left_in_training(t, 0.0) for t in running
                   if t.training and t.epoch_seconds is not None]
        full = fmean(guesses) if guesses else None
    if full is None:
        return None if not_started or running else 0.0
    second = any(f.second_rung for f in finished) or any(t.second_rung for t in running)
    stop = _mean([f for f in finished if f.at_rung and not f.second_rung])
    if stop is None:
        rungs = [f.rung_seconds for f in finished if f.rung_seconds is not None and not f.second_rung]
        stop = fmean(rungs) if rungs else None
    past_second = 1.0  # the share of the first rung's survivors that trains in full
    after_first = full  # the expected seconds of a trial that passes the first rung
    if stop is None:  # no trial ran the rung: every trial is a full one
        share, stop = 1.0, full
    else:
        screened = sorted([(f.number, not f.at_rung or f.second_rung) for f in finished
                           if not f.preset and f.number >= TPE_STARTUP]
                          + [(t.number, True) for t in running
                             if (t.training or t.second_rung) and not t.preset and t.number >= TPE_STARTUP])
        share = expected_share(full_share([went_on for _, went_on in screened]), not_started)
        if second:
            # time to the second rung's verdict: a stop there, or a full training's rungs
            ends = ([f.seconds for f in finished if f.at_rung and f.second_rung]
                    + [f.rung_seconds for f in finished
                       if not f.at_rung and f.second_rung and f.rung_seconds is not None])
            if ends:
                past_second = full_share([not f.at_rung for f in sorted(finished, key=lambda f: f.number)
                                          if f.second_rung and not f.preset]
                                         + [True for t in running if t.training and not t.preset])
                after_first = (1 - past_second) * fmean(ends) + past_second * full
    trial = share * after_first + (1 - share) * stop
    left = [_left_in_training(t, full) if t.training or t.preset
            else max(0.0, (after_first if t.second_rung else trial) - t.seconds) for t in running]
    work = not_started * trial + sum(left)
    if not_started:
        work += (workers - 1) * share * past_second * full / 2
    return max(work / workers, max(left, default=0.0))
