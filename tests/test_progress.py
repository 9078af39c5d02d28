"""nas.study.progress: the ETA that knows the rung, as a pure function of the finished trials."""

from __future__ import annotations

from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import TrialState

from nas.study.progress import Finished, expected_seconds, finished_times
from nas.study.sampling import RUNG_STEP

MODEL3 = Finished(200.0, at_rung=False, rung_seconds=20.0, preset=True)  # went on; 20 s of it the rung


def stop(seconds: float, earlier: bool = False) -> Finished:
    return Finished(seconds, at_rung=True, earlier=earlier)


def full(seconds: float, rung_seconds: float | None = 15.0, earlier: bool = False) -> Finished:
    return Finished(seconds, at_rung=False, rung_seconds=rung_seconds, earlier=earlier)


@pytest.mark.parametrize("finished, remaining, workers, expected", [
    ([], 50, 1, None),  # nothing finished: no estimate
    ([stop(10.0)], 50, 1, None),  # no full trial yet: its time is unknown
    ([MODEL3], 0, 1, 0.0),  # nothing left
    # After Model 3 alone: the share is the rung's keep (1/3), a stop costs its rung part (20 s):
    # 49 x (1/3 x 200 + 2/3 x 20) = 49 x 80.
    ([MODEL3], 49, 1, 49 * 80.0),
    ([MODEL3], 49, 2, 49 * 80.0 / 2),  # two workers share the remaining trials
    # Measured: screened 4 (Model 3 aside), 1 went on: share (1 + 3 x 1/3) / (4 + 3) = 2/7;
    # full mean (200 + 190) / 2, stop mean 10: 10 x (2/7 x 195 + 5/7 x 10).
    ([MODEL3, stop(10.0), stop(8.0), stop(12.0), full(190.0)], 10, 1, 10 * (2 / 7 * 195 + 5 / 7 * 10)),
    # A kind this run has not finished takes the earlier runs' mean; the share is this run's only:
    # (0 + 1) / (1 + 3) = 1/4 full, at the earlier 300 s; stops at this run's 12 s.
    ([full(300.0, earlier=True), stop(50.0, earlier=True), stop(12.0)], 4, 1, 4 * (0.25 * 300 + 0.75 * 12)),
    ([full(1000.0, earlier=True), full(100.0), stop(10.0)], 1, 1, 1 * (2 / 5 * 100 + 3 / 5 * 10)),  # own first
    ([full(30.0, None), full(50.0, None)], 5, 1, 5 * 40.0),  # no trial ran the rung: every trial is full
])
def test_the_eta_weighs_rung_stops_and_full_trainings_at_their_measured_share_and_times(
        finished, remaining, workers, expected):
    got = expected_seconds(finished, remaining, full_share=1 / 3, workers=workers)
    assert got == (None if expected is None else pytest.approx(expected))


def test_finished_trials_are_read_as_rung_stops_or_full_trials_with_their_times():
    since = datetime(2026, 12, 3, 12, 0, 0)

    def trial(start: float, seconds: float, state=TrialState.COMPLETE, **user_attrs):
        t = optuna.trial.create_trial(state=state, value=99.0 if state == TrialState.COMPLETE else None,
                                      intermediate_values={RUNG_STEP: 97.0}, user_attrs=user_attrs)
        t.datetime_start = since + timedelta(seconds=start)
        t.datetime_complete = t.datetime_start + timedelta(seconds=seconds)
        return t

    trials = [trial(-500, 300, preset="model3", rung_acc=97.0, train_seconds=260.0),
              trial(10, 30, TrialState.PRUNED, rung_acc=80.0, pruned_at=RUNG_STEP),
              trial(40, 200, rung_acc=97.0, train_seconds=170.0),
              trial(250, 90)]  # another pruner's trial: no rung
    assert finished_times(trials, since) == [
        Finished(300.0, at_rung=False, rung_seconds=40.0, preset=True, earlier=True),
        Finished(30.0, at_rung=True),
        Finished(200.0, at_rung=False, rung_seconds=30.0),
        Finished(90.0, at_rung=False),
    ]


def test_a_watchers_poll_between_trials_keeps_the_countdown_running(monkeypatch):
    """With workers the parent polls the study every few seconds: the ETA is estimated again only
    when a trial has finished, so between trials it counts down instead of standing still."""
    import optuna

    from nas.study import progress

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=97.0, params={}, distributions={}))
    monkeypatch.setattr(progress, "expected_seconds", lambda *args, **kwargs: 600.0)
    bar = progress.ProgressBar(study, 5, disable=True)
    first = bar.estimated_at
    bar.update(study)  # a poll, nothing finished
    assert bar.estimated_at == first
    study.add_trial(optuna.trial.create_trial(value=98.0, params={}, distributions={}))
    bar.update(study)  # a trial finished: estimated again
    assert bar.estimated_at > first
    bar.close()
