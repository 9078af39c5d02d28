"""nas.study.levers: the three [rung] levers on the rung's cost, each rule case by case, and each as
the rung pruner or the objective applies it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nas.cli import search
from nas.study.levers import (SECOND_RUNG_ATTR, best_curve, crowded, keep_share, second_rung_pays,
                              second_rung_scores, trails_best)
from nas.study.sampling import RUNG_STEP, RungPruner
from nas.studyfile import ConfigError, RungConfig, parse_study_config

REPO_ROOT = Path(__file__).resolve().parent.parent
C, P, R = TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING
CROWD = RungConfig(crowd_noise=0.5, crowd_window=4, crowd_keep=0.2)
CURVE = RungConfig(curve_epochs=(5, 10), curve_margin=0.3)


@pytest.mark.parametrize("recent, noise, crowds", [
    ([97.0, 97.2, 96.9], 0.5, False),  # fewer than 4: never
    ([97.0, 97.2, 96.9, 97.3], 0.5, True),  # middle half 97.0-97.2
    ([97.0, 97.2, 96.9, 97.3], 0.1, False),  # wider than the noise
    ([97.0, 97.2, 52.0, 97.3, 97.1, 96.95, 97.05, 97.25], 0.5, True),  # one far-off candidate moves nothing
    ([97.0, 80.0, 52.0, 97.3, 88.0, 96.95, 90.0, 97.25], 0.5, False),  # a spread-out field
])
def test_rung_scores_crowd_when_their_middle_half_lies_within_the_noise(recent, noise, crowds):
    assert crowded(recent, noise) is crowds


@pytest.mark.parametrize("scores, rung, keep", [
    ([97.0, 97.2, 96.9, 97.3], RungConfig(), 1 / 3),  # the lever off (crowd_noise 0)
    ([97.0, 97.2, 96.9], CROWD, 1 / 3),  # fewer scores than the window
    ([97.0, 97.2, 96.9, 97.3], CROWD, 0.2),  # crowded: the tighter share
    ([60.0, 70.0, 80.0, 97.0, 97.2, 96.9, 97.3], CROWD, 0.2),  # only the last window counts
    ([97.0, 97.2, 96.9, 97.3, 80.0, 70.0, 60.0], CROWD, 1 / 3),  # the recent ones spread out
    ([97.0, 97.2, 96.9, 97.3], dataclasses.replace(CROWD, crowd_keep=0.5), 1 / 3),  # never looser than keep
])
def test_the_keep_share_tightens_while_recent_rung_scores_crowd(scores, rung, keep):
    assert keep_share(scores, 1 / 3, rung) == pytest.approx(keep)


def rung_study(scores, levers: RungConfig) -> optuna.Study:
    pruner = RungPruner(levers.keep, levers.startup, levers.margin, levers=levers)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for state, value in scores:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value if state == C else None, params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)}, intermediate_values={RUNG_STEP: value}))
    return study


def prunes(study: optuna.Study, value: float, step: int = RUNG_STEP) -> bool:
    trial = study.ask()
    trial.report(value, step)
    return trial.should_prune()


def test_the_rung_pruner_holds_a_candidate_to_the_crowded_share():
    # Six crowded rung scores; 97.15 is beaten by 2 of them: 2 < 7/3 goes on at keep 1/3, but
    # 2 >= 0.2 x 7 is stopped once the crowd lever is on.
    earlier = [(C, 97.0), (P, 97.2), (P, 96.9), (C, 97.3), (P, 97.1), (R, 97.05)]
    assert not prunes(rung_study(earlier, RungConfig()), 97.15)
    assert prunes(rung_study(earlier, CROWD), 97.15)
    assert not prunes(rung_study(earlier, CROWD), 97.35)  # the best still goes on


@pytest.mark.parametrize("value, epoch, stops", [
    (98.0, 5, True),  # 0.5 below the best's 98.5 after epoch 5
    (98.2, 5, False),  # exactly the margin below: goes on
    (98.3, 5, False),
    (97.0, 4, False),  # not an epoch the lever looks at
    (99.0, 10, True),  # below 99.4 - 0.3
    (99.2, 10, False),
    (90.0, 12, False),  # past the last look
])
def test_a_full_training_stops_where_it_trails_the_best_curve_by_more_than_the_margin(value, epoch, stops):
    curve = {epoch: 98.5 if epoch <= 5 else 99.4 for epoch in range(1, 16)}
    assert trails_best(value, epoch, curve, CURVE) is stops
    assert not trails_best(value, epoch, curve, RungConfig())  # the lever off
    assert not trails_best(value, epoch, {}, CURVE)  # no completed trial yet


def curve_trial(value: float, curve: dict[int, float], state=C, **user_attrs):
    return optuna.trial.create_trial(state=state, value=value if state == C else None, params={"x": 0.5},
                                     distributions={"x": FloatDistribution(0, 1)},
                                     intermediate_values={RUNG_STEP: 97.0, **curve}, user_attrs=user_attrs)


def test_the_best_curve_is_the_best_completed_trials():
    best = {e: 98.0 + e / 10 for e in range(1, 11)}
    trials = [curve_trial(99.0, {e: 90.0 for e in range(1, 11)}),
              curve_trial(99.3, best),
              curve_trial(99.9, {e: 99.9 for e in range(1, 11)}, rejected="over budget"),
              curve_trial(0.0, {e: 99.9 for e in range(1, 6)}, state=P)]
    assert best_curve(trials) == best  # its epochs, not its rung score (step 0)
    assert best_curve([]) == {}


def test_the_rung_pruner_stops_a_training_that_trails_the_best_curve():
    study = optuna.create_study(direction="maximize", pruner=RungPruner(1 / 3, 3, 1.0, levers=CURVE))
    study.add_trial(curve_trial(99.3, {e: 98.0 + e / 10 for e in range(1, 16)}))  # 98.5 after epoch 5
    trial = study.ask()
    trial.report(97.5, RUNG_STEP)
    assert not trial.should_prune()  # the first rung: this candidate goes on
    for epoch, value in ((4, 97.0), (5, 98.0)):
        trial.report(value, epoch)
    assert trial.should_prune()  # 98.0 < 98.5 - 0.3 after epoch 5
    other = study.ask()
    other.report(98.4, 5)
    assert not other.should_prune()
    off = optuna.create_study(direction="maximize", pruner=RungPruner(1 / 3, 3, 1.0))
    off.add_trial(curve_trial(99.3, {e: 98.0 + e / 10 for e in range(1, 16)}))
    assert not prunes(off, 90.0, step=5)  # the lever off: never during full training


@pytest.mark.parametrize("rung, epochs, images, pays", [
    (RungConfig(), 15, 50_000, False),  # off
    (RungConfig(second_epochs=5), 15, 50_000, True),  # 5 epochs on all < 15 on all
    (RungConfig(second_epochs=5), 4, 20_000, False),  # a 4-epoch run: it costs more than training
    (RungConfig(second_epochs=5, second_subset=10_000), 4, 20_000, True),  # 50k images < 80k
])
def test_the_second_rung_runs_only_where_it_is_asked_for_and_cheaper_than_training(rung, epochs, images, pays):
    assert second_rung_pays(rung, epochs, images) is pays


def test_second_rung_scores_are_the_other_trials_in_trial_order():
    trials = [curve_trial(99.0, {}, **{SECOND_RUNG_ATTR: 98.7}), curve_trial(99.0, {}),
              curve_trial(99.0, {}, **{SECOND_RUNG_ATTR: 98.9}), curve_trial(99.0, {}, **{SECOND_RUNG_ATTR: 98.1})]
    for number, trial in enumerate(trials):
        trial.number = number
    assert second_rung_scores(trials[::-1], number=2) == [98.7, 98.1]


def test_the_levers_are_study_file_options_checked_like_the_rest():
    config = parse_study_config({"rung": {"crowd_noise": 0.5, "second_epochs": 5, "curve_epochs": [5, 10]}})
    assert config.rung.curve_epochs == (5, 10) and config.rung.second_epochs == 5
    for bad in ({"crowd_noise": -1}, {"crowd_window": 2}, {"crowd_keep": 0}, {"second_epochs": -1},
                {"curve_epochs": [0]}, {"curve_epochs": [2.5]}, {"curve_margin": -0.1}):
        with pytest.raises(ConfigError, match=r"\[rung\]"):
            parse_study_config({"rung": bad})


def test_the_second_rung_screens_candidates_in_a_search(tmp_path, data_dir):
    """A tiny search with the second rung on: every candidate that passed the first rung has a
    second-rung score, and a stop there counts as a rung stop."""
    study_file = tmp_path / "second.toml"
    study_file.write_text(_with_second_rung((REPO_ROOT / "studies" / "mnist-8k.toml").read_text()))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert search.main(["--trials", "2", "--epochs", "3", "--subset", "400", "--storage", url, "--study-file",
                        str(study_file), "--data-dir", str(data_dir), "--quiet"]) == 0
    trials = optuna.load_study(study_name="mnist-8k", storage=url).trials
    passed = [t for t in trials if "rung_acc" in t.user_attrs and t.user_attrs.get("pruned_at") != RUNG_STEP
              or SECOND_RUNG_ATTR in t.user_attrs]
    assert passed and all(SECOND_RUNG_ATTR in t.user_attrs for t in passed)
    assert trials[0].user_attrs.get("preset") == "model3" and SECOND_RUNG_ATTR in trials[0].user_attrs


def _with_second_rung(text: str) -> str:
    """The study file with a small first rung and a second one that pays at --epochs 3 --subset 400."""
    out, in_rung = [], False
    for line in text.splitlines():
        if line.startswith("["):
            in_rung = line.startswith("[rung]")
            out.append(line)
            if in_rung:
                out += ["subset = 100", "epochs = 1", "second_epochs = 1", "second_subset = 200"]
            continue
        if in_rung and line.split("=")[0].strip() in ("subset", "epochs"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


LEVER_KEYS = {"crowd_noise", "crowd_window", "crowd_keep", "second_epochs", "second_subset", "curve_epochs",
              "curve_margin"}


@pytest.mark.parametrize("lever", ["crowd", "second", "curve", "all"])
def test_each_lever_study_file_is_the_default_study_with_its_lever_on(lever):
    """studies/levers/*.toml, measured against studies/mnist-8k.toml (docs/performance.md): they
    differ in their name and their [rung] lever keys, nothing else."""
    from nas.studyfile import load_study_config

    default = load_study_config(REPO_ROOT / "studies" / "mnist-8k.toml")
    with_lever = load_study_config(REPO_ROOT / "studies" / "levers" / f"{lever}.toml")
    assert with_lever.name == f"mnist-8k-{lever}"
    changed = {k for k, v in dataclasses.asdict(with_lever.rung).items() if dataclasses.asdict(default.rung)[k] != v}
    assert changed and changed <= LEVER_KEYS
    assert dataclasses.replace(with_lever, name=default.name, rung=default.rung) == default
