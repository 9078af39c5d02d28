"""nas.study.eta and nas.study.progress: the ETA as a pure function of the study's timeline, checked
case by case and against a recorded run replayed trial by trial; the bar that shows it."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.study.eta import (LONG_RUN_SHARE, Finished, Running, eta_seconds, expected_share, finished_times,
                           full_share)
from nas.study.progress import ProgressBar, TrialProgress
from nas.study.sampling import RUNG_STEP, TPE_STARTUP

TIMELINE = Path(__file__).parent / "data" / "main-job-2026-12-07.json"
# the default study with all three levers on (studies/levers/all.toml): a second rung, curve stops
LEVERS_TIMELINE = Path(__file__).parent / "data" / "main-job-levers-2026-12-07.json"
# the default study, levers off, on an AVX2-only EPYC: 13 of 50 trained in full (a stopped and resumed
# run, reconstructed as one: its note)
AVX2_TIMELINE = Path(__file__).parent / "data" / "main-job-none-avx2-2026-12-08.json"
MODEL3 = Finished(200.0, at_rung=False, rung_seconds=20.0, preset=True)  # went on; 20 s of it the rung


def stop(seconds: float, number: int = 0, earlier: bool = False) -> Finished:
    return Finished(seconds, at_rung=True, earlier=earlier, number=number)


def full(seconds: float, number: int = 0, rung_seconds: float | None = 15.0, earlier: bool = False) -> Finished:
    return Finished(seconds, at_rung=False, rung_seconds=rung_seconds, earlier=earlier, number=number)


def test_the_share_of_full_trainings_weighs_recent_trials_most():
    assert full_share([]) == LONG_RUN_SHARE  # nothing screened: the long-run share
    assert full_share([], prior=0.2) == 0.2
    # The newest weighs 1, the one before 0.5, the prior (as 1 trial older still) 0.25:
    # (1 x 1 + 0.5 x 0 + 0.25 x 0.2) / 1.75
    assert full_share([False, True], prior=0.2, prior_weight=1.0, decay=0.5) == pytest.approx(1.05 / 1.75)
    # The same fates in another order: the recent one decides
    assert full_share([True, False], prior=0.2, prior_weight=1.0, decay=0.5) == pytest.approx(0.55 / 1.75)
    assert full_share([True] * 40) > 0.99 and full_share([False] * 40) < 0.01


def test_the_expected_share_moves_from_the_recent_one_to_the_long_run_one():
    assert expected_share(0.2, 0) == 0.2  # nothing left to start
    one = expected_share(0.2, 1, long_run=0.6, near=5.0)  # the next trial: mostly the recent share
    many = expected_share(0.2, 200, long_run=0.6, near=5.0)  # a long way off: mostly the long-run one
    assert 0.2 < one < 0.3 and 0.55 < many < 0.6
    assert one == pytest.approx(0.6 - 0.4 * 5 * (1 - math.exp(-1 / 5)))
    assert expected_share(0.6, 30, long_run=0.6) == pytest.approx(0.6)


@pytest.mark.parametrize("finished, running, not_started, workers, expected", [
    ([], [], 50, 1, None),  # nothing finished, nothing measured: no estimate
    ([stop(10.0)], [], 50, 1, None),  # no full training's time known yet
    ([MODEL3], [], 0, 1, 0.0),  # nothing left
    # No trial ran the rung: every trial is a full one, 40 s; two workers share five
    ([full(30.0, rung_seconds=None), full(50.0, rung_seconds=None)], [], 5, 2, (5 * 40.0 + 40.0 / 2) / 2),
    # A running full training: its epochs left at its own epoch time, less the part of the
    # current epoch done (3 x 10 - 4 = 26 s); the longest running trial bounds the estimate below.
    ([MODEL3, stop(10.0)], [Running(1, seconds=60.0, training=True, epochs_left=3, epoch_seconds=10.0,
                                    in_epoch=4.0)], 0, 2, 26.0),
    # No epoch measured yet: a full trial's mean, less the time it has run
    ([MODEL3, stop(10.0)], [Running(1, seconds=50.0, training=True)], 0, 1, 150.0),
    # Nothing finished in full, but a running full training's epochs give its time: 25 + 15 x 10 = 175 s
    ([stop(10.0, 11)], [Running(0, seconds=25.0, training=True, epochs_left=15, epoch_seconds=10.0, preset=True)],
     0, 1, 150.0),
])
def test_the_eta_adds_the_work_left_and_shares_it_out(finished, running, not_started, workers, expected):
    got = eta_seconds(finished, running, not_started, workers)
    assert got == (None if expected is None else pytest.approx(expected))


def test_trials_to_start_take_the_expected_time_of_a_trial_at_the_expected_share():
    """Model 3 (200 s, a preset: no fate), TPE trials 10-13: stops at 10 s, one full at 190 s; the
    random trials before TPE_STARTUP tell nothing of TPE's share."""
    finished = [MODEL3, stop(10.0, 1), full(1000.0, 2, earlier=True),
                stop(8.0, TPE_STARTUP), stop(12.0, TPE_STARTUP + 1), full(190.0, TPE_STARTUP + 2),
                stop(10.0, TPE_STARTUP + 3)]
    share = expected_share(full_share([False, False, True, False]), 10)
    stop_mean = (10 + 8 + 12 + 10) / 4
    trial = share * 195.0 + (1 - share) * stop_mean  # this run's full trials: (200 + 190) / 2
    assert eta_seconds(finished, [], 10, 1) == pytest.approx(10 * trial)
    # Two workers: the work is shared, and one waits for the other's last full training (half of one)
    assert eta_seconds(finished, [], 10, 2) == pytest.approx((10 * trial + share * 195.0 / 2) / 2)
    # A trial at the rung is expected to take a trial's time, less what it has run; with none left
    # to start, at the share now
    now = full_share([False, False, True, False])
    at_rung = now * 195.0 + (1 - now) * stop_mean - 5.0
    assert eta_seconds(finished, [Running(20, seconds=5.0, training=False)], 0, 1) == pytest.approx(at_rung)
    # One in full training is a full fate: the share rises
    more = eta_seconds(finished, [Running(20, seconds=5.0, training=True, epochs_left=15, epoch_seconds=12.0)], 10, 1)
    assert more > eta_seconds(finished, [], 10, 1) + 15 * 12.0


def test_a_second_rung_splits_the_candidates_that_pass_the_first_in_two():
    """With a second rung (lever b), a stop there is neither a first-rung stop nor a full training:
    of the candidates past the first rung (expected_share), the recent share past the second trains
    in full, the rest stop at the second rung's time (its stops, and the full trainings' rungs)."""
    model3 = Finished(200.0, at_rung=False, rung_seconds=20.0, preset=True, second_rung=True)
    finished = [model3, stop(10.0, TPE_STARTUP), stop(12.0, TPE_STARTUP + 1),
                Finished(100.0, at_rung=True, number=TPE_STARTUP + 2, second_rung=True),
                Finished(180.0, at_rung=False, rung_seconds=60.0, number=TPE_STARTUP + 3, second_rung=True)]
    first = expected_share(full_share([False, False, True, True]), 10)
    second = full_share([False, True])  # the preset tells nothing of it either
    full_mean, second_end = (200.0 + 180.0) / 2, (100.0 + 20.0 + 60.0) / 3
    after_first = (1 - second) * second_end + second * full_mean
    trial = first * after_first + (1 - first) * 11.0
    assert eta_seconds(finished, [], 10, 1) == pytest.approx(10 * trial)
    assert eta_seconds(finished, [], 10, 2) == pytest.approx((10 * trial + first * second * full_mean / 2) / 2)
    # A trial at the second rung has passed the first: it is expected to take after_first, less its time
    assert eta_seconds(finished, [Running(20, seconds=70.0, training=False, second_rung=True)], 0, 1) \
        == pytest.approx(after_first - 70.0)
    # Without the second rung's stop, the same study reads as before: first-rung stops or full trainings
    plain = [f for f in finished if not (f.at_rung and f.second_rung)]
    plain = [dataclasses.replace(f, second_rung=False) for f in plain]
    share = expected_share(full_share([False, False, True]), 10)
    assert eta_seconds(plain, [], 10, 1) == pytest.approx(10 * (share * full_mean + (1 - share) * 11.0))


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
              trial(250, 90),  # another pruner's trial: no rung
              trial(400, 120, TrialState.PRUNED, rung_acc=97.5, rung2_acc=98.9, pruned_at=RUNG_STEP)]  # lever b
    for number, t in enumerate(trials):
        t.number = number
    assert finished_times(trials, since) == [
        Finished(300.0, at_rung=False, rung_seconds=40.0, preset=True, earlier=True, number=0),
        Finished(30.0, at_rung=True, number=1),
        Finished(200.0, at_rung=False, rung_seconds=30.0, number=2),
        Finished(90.0, at_rung=False, number=3),
        Finished(120.0, at_rung=True, number=4, second_rung=True),
    ]


# --- the recorded run, replayed --------------------------------------------------------------------


def timeline_at(trials: list[dict], now: float, epochs: int) -> tuple[list[Finished], list[Running], int]:
    """What the bar knew `now` seconds into the recorded run: the finished trials, the running ones
    (a full training's epochs spread evenly over its recorded training seconds, which end it; at a
    second rung from the first rung's recorded end to the training), and how many had not started."""
    finished, running = [], []
    for t in trials:
        seconds, trained = t["end_s"] - t["start_s"], t["train_seconds"]
        rung = seconds - trained if trained else seconds
        second = t.get("rung2_acc") is not None
        if t["end_s"] <= now:
            recorded = trained and not t.get("train_seconds_estimated")  # as finished_times reads it
            finished.append(Finished(seconds, at_rung=t["pruned_at"] == RUNG_STEP,
                                     rung_seconds=rung if recorded else None, preset=t["number"] == 0,
                                     number=t["number"], second_rung=second))
        elif t["start_s"] <= now:
            since = now - t["start_s"]
            if trained and since >= rung:
                epoch = trained / (t.get("epochs_run") or epochs)  # a curve stop ended it early
                done = min(epochs - 1, int((since - rung) // epoch))
                running.append(Running(t["number"], since, training=True, epochs_left=epochs - done,
                                       epoch_seconds=epoch if done else None, in_epoch=since - rung - done * epoch,
                                       preset=t["number"] == 0))
            else:
                at_second = second and t.get("rung_end_s") is not None and now >= t["rung_end_s"]
                running.append(Running(t["number"], since, training=False, preset=t["number"] == 0,
                                       second_rung=at_second))
    return finished, running, len(trials) - len(finished) - len(running)


def replayed_errors(timeline: Path = TIMELINE) -> dict[int, float]:
    """The ETA's relative error at each finished trial of a recorded run (2 workers, --trials 50,
    which ran 51 in the first: the replay's target is the number it ran), from the 10th to the one
    before the last: (ETA - time actually left) / time actually left."""
    run = json.loads(timeline.read_text())
    trials = run["trials"]
    last = max(t["end_s"] for t in trials)
    errors = {}
    for count, now in enumerate(sorted(t["end_s"] for t in trials)[:-1], start=1):
        if count >= 10:
            finished, running, not_started = timeline_at(trials, now, epochs=15)
            eta = eta_seconds(finished, running, not_started, run["workers"])
            errors[count] = (eta - (last - now)) / (last - now)
    return errors


def test_the_replayed_run_holds_what_it_was_measured_at():
    """The recorded default run (tests/data/main-job-2026-12-07.json: 51 trials, 22 trained in full,
    2 workers, 54 min), replayed through the ETA. What the estimate achieves there, with constants
    chosen on this same run (nas.study.eta): within 25% from the 10th finished trial to the 42nd,
    within 50% to the end, where a handful of trials are left and their fates decide (the last 7
    all trained in full, after 4 rung stops in a row). The old estimate was 50-80% short all along."""
    errors = replayed_errors()
    assert len(errors) == 41
    assert max(abs(e) for count, e in errors.items() if count <= 42) <= 0.25
    assert max(abs(e) for e in errors.values()) <= 0.50


@pytest.mark.xfail(strict=True, reason="the issue's target, not met at the run's end: 33-45% short from the "
                   "43rd finished trial on (docs/performance.md, 2026-12-07)")
def test_the_replayed_run_holds_the_issues_target_throughout():
    assert max(abs(e) for e in replayed_errors().values()) <= 0.25


def test_the_replay_gives_the_eta_the_bar_showed():
    """The levers-off run on the AVX2 EPYC, unbroken to its 34th finished trial: its replay gives, at
    the 10th, 20th and 30th, the ETA its bar showed (+65%, +27%, +94% of the time actually left;
    the bar's frames differ from the trials' ends by a second or two)."""
    run = json.loads(AVX2_TIMELINE.read_text())
    shown = {s["finished"]: s["eta_shown_s"] for s in run["eta_shown"]}
    errors = replayed_errors(AVX2_TIMELINE)
    left = {count: run["wall_seconds"] - s["bar_elapsed_s"] for count, s in
            ((s["finished"], s) for s in run["eta_shown"])}
    for count in (10, 20, 30):
        assert errors[count] == pytest.approx((shown[count] - left[count]) / left[count], abs=0.02)
    assert all(errors[count] > 0.2 for count in (10, 20, 30))  # far too long on this run: few trained in full


def test_no_share_of_full_trainings_known_in_advance_holds_the_issues_target(monkeypatch):
    """Why the target is not met: the fates of the trials still to come, not the estimate of their
    share, decide the time left. Given each recorded run's own final share of TPE candidates past
    the first rung (hindsight no estimate has) from its first trial on, the replayed ETA is still more
    than 25% off somewhere between the 10th and the 42nd finished trial in two of the three runs,
    and in all three before their last."""
    from nas.study import eta

    worst = {}
    for timeline in (TIMELINE, LEVERS_TIMELINE, AVX2_TIMELINE):
        tpe = [t for t in json.loads(timeline.read_text())["trials"] if t["number"] >= TPE_STARTUP]
        share = sum(t["pruned_at"] is None or t.get("rung2_acc") is not None for t in tpe) / len(tpe)
        monkeypatch.setattr(eta, "full_share", lambda fates, share=share: share)
        monkeypatch.setattr(eta, "expected_share", lambda now, trials: now)
        errors = replayed_errors(timeline)
        worst[timeline.name] = (max(abs(e) for count, e in errors.items() if count <= 42),
                                max(abs(e) for e in errors.values()))
    assert sum(before > 0.25 for before, _ in worst.values()) == 2, worst
    assert all(end > 0.5 for _, end in worst.values()), worst


def test_the_replayed_levered_run_holds_far_closer_than_the_eta_it_showed():
    """The default study with all three levers (tests/data/main-job-levers-2026-12-07.json: 50 trials,
    6 trained in full, 1 stopped on the curve, 10 at the second rung, AVX2-only EPYC, 77 min), replayed.
    The ETA it showed counted a second-rung stop as a rung stop and expected half the candidates to
    train in full: +148%, +64%, +56%, -9% at the 10th, 20th, 30th and 40th finished trial (the replay of
    that estimate: +140%, +63%, +56%, -13%). Weighing the second rung's survivors apart, with no constant
    chosen on this run: within 30% at those four, 23% off on average; not the issue's 25% throughout
    (73% at the 12th, when Model 3, the first full training and the slowest, finished)."""
    errors = replayed_errors(LEVERS_TIMELINE)
    assert len(errors) == 40
    assert all(abs(errors[count]) <= 0.30 for count in (10, 20, 30, 40)), errors
    assert sum(abs(e) for e in errors.values()) / len(errors) <= 0.25
    assert max(abs(e) for e in errors.values()) <= 0.75


# --- the bar -------------------------------------------------------------------------------------


def test_a_watchers_poll_between_trials_keeps_the_countdown_running(monkeypatch):
    """With workers the parent polls the study every few seconds: the ETA is estimated again only
    when a trial has finished or reported a step, so between them it counts down instead of
    standing still."""
    from nas.study import progress

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=97.0, params={}, distributions={}))
    monkeypatch.setattr(progress, "eta_seconds", lambda *args, **kwargs: 600.0)
    bar = progress.ProgressBar(study, 5, disable=True)
    first = bar.estimated_at
    bar.update(study)  # a poll, nothing finished
    assert bar.estimated_at == first
    study.add_trial(optuna.trial.create_trial(value=98.0, params={}, distributions={}))
    bar.update(study)  # a trial finished: estimated again
    second = bar.estimated_at
    assert second > first
    bar.progress(TrialProgress(worker=1, trial=2, phase="train", epoch=1, epochs=15, accuracy=97.5))
    assert bar.estimated_at > second
    bar.close()


def test_each_running_trial_shows_its_step_in_the_bar_until_it_ends():
    study = optuna.create_study(direction="maximize")
    bar = ProgressBar(study, 5, disable=True, workers=2)
    bar.progress(TrialProgress(worker=0, trial=3, phase="rung"))
    bar.progress(TrialProgress(worker=1, trial=2, phase="train", epoch=7, epochs=15, accuracy=98.91,
                               epoch_seconds=20.0))
    bar.draw()
    assert bar.bar.postfix.endswith("#3 rung, #2 ep 7/15 98.91%")
    assert bar.eta is not None  # trial 2's epochs tell a full training's time
    assert TrialProgress(worker=1, trial=2, phase="train", epoch=7, epochs=15, accuracy=98.91).line() == (
        "[worker 1] Trial 2: epoch 7/15, 98.91% validation")  # the line above the bar
    bar.progress(TrialProgress(worker=1, trial=None))  # worker 1 is between trials
    bar.draw()
    assert "#2" not in bar.bar.postfix and "#3 rung" in bar.bar.postfix
    bar.close()
