"""nas.confirm on a tiny real study: runs stored in the study, resumed without retraining, a
leaderboard against Model 3; and nas.search --warm-start from an export."""

from __future__ import annotations

import json

import optuna
import pytest

import nas.space
from nas.cli import confirm, export, search, train
from nas.study import confirm as confirming
from nas.study import create, trials
from nas.study.stored import confirm_runs, confirmed_best
from nas.study.export import load_export
from nas.spec import ArchSpec, TrainConfig, load_arch
from nas.workers import available_cpus

TINY = ["--epochs", "1", "--subset", "256", "--quiet"]


@pytest.fixture(scope="module")
def study_url(tmp_path_factory, data_dir) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('confirm') / 's.db'}"
    assert search.main(["--trials", "3", "--storage", url, "--data-dir", str(data_dir), *TINY]) == 0
    return url


def test_paired_difference_and_its_interval():
    mean, half = confirming.paired_difference([99.5, 99.6, 99.7], [99.4, 99.4, 99.4])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert confirming.paired_difference([99.5], [99.4]) is None


def test_confirm_stores_each_run_and_resumes_without_retraining(study_url, data_dir, capsys, monkeypatch, tmp_path):
    args = ["--storage", study_url, "--top", "1", "--seeds", "2", "--data-dir", str(data_dir), "--quiet"]
    assert confirm.main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="mnist-8k", storage=study_url)
    runs = confirm_runs(study)
    best = [t for t in trials.ranked_trials(study) if t.user_attrs.get("preset") != "model3"][0]
    assert set(runs) == {f"trial{best.number}", "model3"}
    assert all(sorted(r["seed"] for r in rs) == [1, 2] and all(r["subset"] == 256 for r in rs) for rs in runs.values())
    assert "| candidate |" in out and "beats Model 3" in out
    assert confirmed_best(study) == best.number

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(confirming, "train", no_training)
    out = tmp_path / "results.json"
    assert confirm.main(args + ["--out", str(out)]) == 0
    assert capsys.readouterr().out.count("seed 1:") == 2
    # The results file: the winner on top, readable by nas.train --model; every run's accuracy per epoch.
    written = json.loads(out.read_text())
    by_label = {c["label"]: c for c in written["candidates"]}
    assert set(by_label) == set(runs) and written["winner"] == f"trial{best.number}"  # never the yardstick
    assert [c["score_mean"] for c in written["candidates"]] == sorted(c["score_mean"] for c in written["candidates"])[::-1]
    assert load_arch(str(out)) == (ArchSpec.from_dict(by_label[written["winner"]]["arch"]),
                                   TrainConfig.from_dict(by_label[written["winner"]]["train"]))
    # A file written before that rule (winner: Model 3) gets its winner back from its own runs.
    out.write_text(json.dumps({**written, "winner": "model3", "arch": by_label["model3"]["arch"]}))
    assert confirming.rewinner(out) == f"trial{best.number}"
    assert json.loads(out.read_text()) == written
    for label, stored in runs.items():
        assert [r["eval_acc"] for r in by_label[label]["runs"]] == [r["eval_acc"] for r in stored]
        assert by_label[label]["score_mean"] == pytest.approx(sum(r["score"] for r in stored) / len(stored))


def test_confirm_of_a_missing_study_is_one_line(tmp_path, capsys):
    assert confirm.main(["--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_warm_start_brings_in_what_fits_and_does_not_count_it(study_url, data_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert export.main(["--storage", study_url, "--out", str(out)]) == 0
    exported = load_export(out)["trials"]
    fitting = sorted(t["number"] for t in exported if t["user_attrs"]["params"] < 7900)
    small = tmp_path / "small.toml"
    small.write_text('name = "small"\nbudget = 7900\nepochs = 1\nenqueue = []\n')
    url = f"sqlite:///{tmp_path / 'w.db'}"
    assert search.main(["--trials", "1", "--storage", url, "--study-file", str(small), "--warm-start", str(out),
                        "--data-dir", str(data_dir), *TINY]) == 0
    study = optuna.load_study(study_name="small", storage=url)
    warm = [t for t in study.trials if "warm_start" in t.user_attrs]
    assert sorted(t.user_attrs["exported_number"] for t in warm) == fitting  # Model 3 (7,918 params) is not
    assert all(t.user_attrs.get("preset") != "model3" for t in warm)
    err = capsys.readouterr().err
    assert f"{len(fitting)} trials added to the history, {len(exported) - len(fitting)} skipped" in err
    assert len(trials.finished_trials(study)) == 1  # --trials counts this study's own


def test_warm_start_queues_the_best_shapes_that_do_not_fit_scaled_to_the_budget(study_url, tmp_path):
    from nas.studyfile import parse_study_config
    from nas.spec import count_params

    out = tmp_path / "e.json"
    assert export.main(["--storage", study_url, "--out", str(out)]) == 0
    exported = load_export(out)
    over = sorted((t for t in exported["trials"] if t["state"] == "COMPLETE" and t["user_attrs"]["params"] >= 5000),
                  key=lambda t: -t["values"][0])
    assert over, "the tiny study should hold a net over 5,000 params (Model 3 at least)"
    config = parse_study_config({"name": "small", "budget": 5000, "enqueue": []})
    study = optuna.create_study(directions=config.directions)
    assert create.enqueue_scaled(study, exported, config, top=2) == [t["number"] for t in over[:2]]
    assert create.enqueue_scaled(study, exported, config, top=2) == [t["number"] for t in over[:2]]
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(queued) == len(over[:2])  # queued once, however often the export is offered
    for t, source in zip(queued, over):
        assert t.user_attrs["scaled_from"] == f"mnist-8k#{source['number']}"
        scaled, train_config = nas.space.suggest(optuna.trial.FixedTrial(t.system_attrs["fixed_params"]), config.space,
                                              15, 0, budget=config.budget)
        original = ArchSpec.from_dict(source["user_attrs"]["arch"])
        assert count_params(scaled) < 5000 <= count_params(original)
        assert [len(b.widths) for b in scaled.blocks] == [len(b.widths) for b in original.blocks]
        assert len(scaled.tail) == len(original.tail)
        assert train_config.lr == TrainConfig.from_dict(source["user_attrs"]["train"]).lr
    # A version-1 space words absolute widths: nothing to scale.
    v1 = parse_study_config({"name": "v1", "budget": 5000, "enqueue": [], "space": {"version": 1}})
    assert create.enqueue_scaled(optuna.create_study(directions=v1.directions), exported, v1) == []


def test_warm_start_re_expresses_an_older_space_versions_trials(tmp_path, capsys):
    """The previous release's study (space version 1, absolute widths) into a version-2 study:
    a net the new space can word (Model 3) joins with new params that rebuild it; those it can't
    are skipped (trial 1: a width under a quarter of the widest; trial 2: 3,719 params, under half
    the budget)."""
    from pathlib import Path

    from nas.studyfile import load_study_config
    from nas.spec import ArchSpec

    fixture = load_export(Path(__file__).parent / "fixtures" / "study-v0.json")
    config = load_study_config(Path("studies/mnist-8k.toml"))
    study = optuna.create_study(directions=config.directions)
    assert create.warm_start(study, fixture, config) == (1, 2)
    assert [t.user_attrs["exported_number"] for t in study.trials] == [0]
    for t in study.trials:
        rebuilt, _ = nas.space.suggest(optuna.trial.FixedTrial(t.params), config.space, 15, 0, budget=config.budget)
        assert rebuilt == ArchSpec.from_dict(t.user_attrs["arch"]) and "budget_fraction" in t.params


def test_confirm_in_two_workers_stores_every_run_once_and_test_takes_the_validated_best(study_url, data_dir,
                                                                                          capsys, tmp_path):
    # --subset 128: runs of its own, none stored by the tests before
    args = ["--storage", study_url, "--top", "1", "--seeds", "2", "--subset", "128", "--data-dir", str(data_dir),
            "--quiet"]
    assert confirm.main(args + ["--workers", "2"]) == 0
    study = optuna.load_study(study_name="mnist-8k", storage=study_url)
    runs = confirm_runs(study)
    top = [t.number for t in trials.ranked_trials(study) if t.user_attrs.get("preset") != "model3"][:1]
    assert set(runs) == {*(f"trial{n}" for n in top), "model3"}
    assert all(sorted(r["seed"] for r in rs) == [1, 2] and {r["subset"] for r in rs} == {128} for rs in runs.values())
    assert all(r["run"]["threads"] == max(1, available_cpus() // 2) for rs in runs.values() for r in rs)
    capsys.readouterr()
    # --test without --trials: the validation confirm's best and Model 3, nothing else
    out = tmp_path / "test.json"
    assert confirm.main(["--storage", study_url, "--test", "--seeds", "1", "--subset", "256", "--data-dir",
                         str(data_dir), "--quiet", "--out", str(out)]) == 0
    best = confirmed_best(optuna.load_study(study_name="mnist-8k", storage=study_url))
    tested = confirm_runs(optuna.load_study(study_name="mnist-8k", storage=study_url), "confirm-test")
    assert set(tested) == {f"trial{best}", "model3"}
    assert "(the best of its validation confirm)" in capsys.readouterr().out
    # The results table's reproduce command: nas.train trains a recorded run again, to the digit
    for label, extra in ((f"trial{best}", []), ("model3", ["--candidate", "model3"])):
        assert train.main(["--model", str(out), "--seed", "1", "--subset", "256", "--data-dir", str(data_dir),
                           "--quiet", *extra]) == 0
        printed = capsys.readouterr().out
        assert f"({label}, trained as its seed-1 run was)" in printed
        assert f"mean of the last 1 epoch: {tested[label][0]['score']:.3f}%" in printed


def test_confirm_of_a_trial_that_is_not_complete_is_one_line(study_url, data_dir, capsys):
    assert confirm.main(["--storage", study_url, "--trials", "999", "--data-dir", str(data_dir), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: trial 999 is not a completed trial")


def test_confirm_int8_adds_each_runs_int8_accuracy_and_retrains_runs_stored_without_it(study_url, data_dir, capsys,
                                                                                        tmp_path):
    # --subset 192: runs of their own; the first confirm stores them without int8
    args = ["--storage", study_url, "--top", "1", "--seeds", "1", "--subset", "192", "--data-dir", str(data_dir),
            "--quiet"]
    assert confirm.main(args) == 0
    capsys.readouterr()
    out = tmp_path / "int8.json"
    assert confirm.main(args + ["--int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fp32 final | int8 final | int8 − fp32 | TFLM int8 |" in printed and "; int8 " in printed
    runs = confirm_runs(optuna.load_study(study_name="mnist-8k", storage=study_url))
    measured = [r for rs in runs.values() for r in rs if r["subset"] == 192]
    assert len(measured) == 2 and all(0 <= r["int8_acc"] <= 100 for r in measured)
    # TensorFlow Lite Micro's accuracy of the int8 .tflite, beside ONNX Runtime's, printed with each run
    assert all(abs(r["tflm_int8_acc"] - r["int8_acc"]) <= 5 for r in measured)
    assert all(f", TFLM int8 {r['tflm_int8_acc']:.2f}% against" in printed for r in measured)
    # ONNX Runtime's fp32 is PyTorch's evaluation of the final weights, to the rounding of a few images
    assert all(abs(r["onnx_fp32_acc"] - r["eval_acc"][-1]) <= 0.05 for r in measured)
    written = json.loads(out.read_text())
    assert all("int8_acc" in run and "tflm_int8_acc" in run for c in written["candidates"] for run in c["runs"])
