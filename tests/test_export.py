"""nas.export: a study to JSON and back, and a study written by the previous release (kept as its
export, tests/fixtures/study-v0.json) still replays exactly."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from nas.cli import export, replay
from nas.study.export import export_study, load_export, restore
from nas.run.record import RunRecord, record_of
from nas.cpu import cpu_model

FIXTURE = Path(__file__).parent / "fixtures" / "study-v0.json"
# The fixture was written by commit bef66af (`python -m nas.search --trials 3 --epochs 2 --subset 2000`)
# on this CPU; CPU reductions round differently elsewhere, so exactness is only promised here.
FIXTURE_CPU = "Intel(R) Xeon(R) Processor"


@pytest.fixture
def restored(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'restored.db'}"
    assert export.main(["--restore", str(FIXTURE), "--storage", url]) == 0
    return url


def test_export_then_restore_gives_back_the_same_trials(restored, tmp_path):
    out = tmp_path / "again.json"
    assert export.main(["--storage", restored, "--out", str(out)]) == 0
    before, after = load_export(FIXTURE), load_export(out)  # version 1, version 2
    assert after["user_attrs"] == before["user_attrs"] and after["directions"] == before["directions"]
    for old, new in zip(before["trials"], after["trials"], strict=True):
        assert new["user_attrs"].pop("exported_number") == old["number"]
        assert {k: v for k, v in new.items() if k != "number"} == {k: v for k, v in old.items() if k != "number"}


def test_the_file_names_each_distribution_once_and_a_trial_only_its_own(tmp_path):
    """A study whose space changed on resume: the second trial's x is drawn from another range."""
    wide = optuna.distributions.FloatDistribution(0, 10)
    study = optuna.create_study()
    for value, x, dist in ((1.0, 1.0, wide), (2.0, 2.0, optuna.distributions.FloatDistribution(0, 5)),
                           (3.0, 3.0, wide)):
        choice = optuna.distributions.CategoricalDistribution(["a", "b"])
        study.add_trial(optuna.trial.create_trial(value=value, params={"x": x, "c": "a"},
                                                  distributions={"x": dist, "c": choice}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    restored = restore(export_study(study), optuna.storages.get_storage(url), "s")
    out = tmp_path / "s.json"
    assert export.main(["--storage", url, "--study", "s", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["version"] == 2 and written["distributions"]["x"]["attributes"]["high"] == 10
    assert ["distributions" in t for t in written["trials"]] == [False, True, False]
    assert list(written["trials"][1]["distributions"]) == ["x"]
    assert written["trials"][1]["distributions"]["x"]["attributes"]["high"] == 5
    back = restore(load_export(out), optuna.storages.get_storage(f"sqlite:///{tmp_path / 'b.db'}"), "b")
    assert [t.distributions for t in back.trials] == [t.distributions for t in restored.trials]
    assert [t.distributions["x"].high for t in back.trials] == [10, 5, 10]


def test_rejected_and_failed_trials_are_counted_not_listed(tmp_path):
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=90.0, user_attrs={"params": 100}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"rejected": "over"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    data = export_study(study)
    assert [t["values"] for t in data["trials"]] == [[90.0]]
    assert data["left_out"] == {"fail": 1, "rejected": 1}


def test_restoring_over_an_existing_study_or_a_bad_file_is_one_line(restored, tmp_path, capsys):
    assert export.main(["--restore", str(FIXTURE), "--storage", restored]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert export.main(["--restore", str(bad), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "not a nas study export" in capsys.readouterr().err


def test_old_trials_read_back_as_the_run_they_were():
    trials = json.loads(FIXTURE.read_text())["trials"]
    # Written before the run record: fp32 NCHW on 2 threads; the kernel could load but ran only on
    # channels-last tensors, so these ran PyTorch's BatchNorm.
    assert [record_of(t["user_attrs"]) for t in trials] == [
        RunRecord(device="cpu", threads=2, precision="fp32", memory_format="nchw", batchnorm="pytorch",
                  weight_average=True, compiled=False, subset=2000, seed=0)] * 3


@pytest.mark.parametrize("number", [0, 1])  # Model 3; a sampled net with augmentation and dropout
def test_a_study_of_the_previous_release_replays_exactly(restored, number, data_dir, tmp_path, capsys):
    assert replay.main(["--storage", restored, "--study", "mnist-8k", "--trial", str(number), "--quiet",
                        "--data-dir", str(data_dir), "--out", str(tmp_path / "m.pt")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Validation score"))
    stored, replayed = (float(line.split(word)[1].split(",")[0]) for word in ("stored ", "replayed "))
    if cpu_model() == FIXTURE_CPU:
        assert line.endswith("(identical)"), line
    else:
        assert abs(replayed - stored) < 1.0, line


def test_a_restore_gives_every_trial_its_exported_number_back(tmp_path):
    """Left-out numbers (failed, rejected) are held by failed placeholders, so that what names a
    trial by number (the study's stored confirm runs, results files) still names the same trial."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=90.0))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"rejected": "over"}))
    study.add_trial(optuna.trial.create_trial(value=95.0, user_attrs={"arch": "the confirmed one"}))
    study.set_user_attr("confirm:trial3:seed1", {"candidate": "trial3", "trial": 3, "score": 95.5})
    back = restore(export_study(study), optuna.storages.get_storage(f"sqlite:///{tmp_path / 'r.db'}"), "r")
    assert [t.state.name for t in back.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert back.trials[3].user_attrs["arch"] == "the confirmed one" and back.trials[3].values == [95.0]
    assert back.trials[1].user_attrs == {"left_out_of_export": True}
    assert back.user_attrs["confirm:trial3:seed1"]["trial"] == 3
    again = export_study(back)  # the placeholders are left out again, and the numbers kept
    assert [t["number"] for t in again["trials"]] == [0, 3] and again["left_out"] == {"fail": 2}
