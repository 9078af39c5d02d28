import tomllib
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import nas.study.objective
from nas.cli import search
from nas.study import trials
from nas.studyfile import ConfigError, parse_study_config
from nas.space import params_for
from nas.spec import PRESETS
from nas.run.record import RunRecord

STUDY_FILE = "studies/mnist-8k.toml"


def run_search(url, data_dir, trials, *extra):
    return search.main(["--trials", str(trials), "--epochs", "1", "--subset", "256", "--storage", url,
                        "--study-file", STUDY_FILE, "--data-dir", str(data_dir), "--quiet", *extra])


def load(url):
    return optuna.load_study(study_name="mnist-8k", storage=url)


def test_model3_runs_first_and_only_once(searched):
    study = load(searched[0])
    first = study.trials[0]
    assert first.user_attrs["preset"] == "model3"
    assert first.user_attrs["params"] == 7918
    config = parse_study_config(tomllib.loads(Path(STUDY_FILE).read_text()))
    assert first.params == params_for(PRESETS["model3"], config.space, config.budget)
    assert sum(t.user_attrs.get("preset") == "model3" for t in study.trials) == 1


def test_trials_is_the_total_and_reruns_top_up(searched):
    assert len(trials.finished_trials(load(searched[0]))) == 3


def test_trained_trials_are_under_budget_and_rejected_ones_never_trained(searched):
    study = load(searched[0])
    for t in study.trials:
        if "rejected" in t.user_attrs:
            assert t.state == TrialState.PRUNED
            assert "epoch_acc" not in t.user_attrs and not t.intermediate_values
            assert t.constraints["params_over_budget"] > 0
        elif t.state == TrialState.COMPLETE:
            assert t.user_attrs["params"] < 8000
            assert len(t.user_attrs["epoch_acc"]) == 1
            assert t.user_attrs["weights_artifact"]
            run = RunRecord.from_dict(t.user_attrs["run"])  # what replay repeats
            assert (run.weight_average, run.batchnorm, run.subset, run.seed) == (True, "pytorch", 256, 0)
            assert run.threads == torch.get_num_threads() and run.device == "cpu"


def test_interrupted_trial_is_failed_and_rerun_resumes(tmp_path, data_dir, monkeypatch):
    url = f"sqlite:///{tmp_path / 'i.db'}"
    real_train = nas.study.objective.train
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(nas.study.objective, "train", interrupt_second)
    assert run_search(url, data_dir, 3) == 130
    study = load(url)
    assert [t.state for t in study.trials if "rejected" not in t.user_attrs][-1] == TrialState.FAIL
    monkeypatch.setattr(nas.study.objective, "train", real_train)
    assert run_search(url, data_dir, 3) == 0
    assert len(trials.finished_trials(load(url))) == 3


@pytest.mark.parametrize("bad", ["0", "-3", "abc"])
def test_bad_trial_counts_exit_cleanly(bad, tmp_path, capsys):
    db = tmp_path / "x.db"
    with pytest.raises(SystemExit) as exc:
        search.main(["--trials", bad, "--storage", f"sqlite:///{db}"])
    assert exc.value.code == 2
    assert not db.exists()
    assert "--trials" in capsys.readouterr().err


def test_unopenable_storage_is_one_line(tmp_path, data_dir, capsys):
    code = run_search(f"sqlite:///{tmp_path}/missing-dir/x.db", data_dir, 1)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_impossible_budget_is_rejected_before_anything_is_stored(tmp_path, data_dir, capsys):
    study_file = tmp_path / "tiny.toml"
    study_file.write_text('name = "tiny"\nbudget = 50\n')
    db = tmp_path / "t.db"
    code = search.main(["--trials", "1", "--storage", f"sqlite:///{db}", "--study-file", str(study_file),
                        "--data-dir", str(data_dir), "--quiet"])
    assert code == 2 and not db.exists()
    assert "unreachable" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unreachable"):
        parse_study_config({"budget": 50})


def test_a_preset_outside_the_space_is_not_enqueued(tmp_path, data_dir, capsys):
    study_file = tmp_path / "narrow.toml"
    study_file.write_text('name = "narrow"\nbudget = 8000\nepochs = 1\n[space]\nwidth = [4, 12]\n')
    url = f"sqlite:///{tmp_path / 'n.db'}"
    assert search.main(["--trials", "1", "--subset", "256", "--storage", url, "--study-file", str(study_file),
                        "--data-dir", str(data_dir), "--quiet"]) == 0
    assert "model3 lies outside this study's search space" in capsys.readouterr().err
    study = optuna.load_study(study_name="narrow", storage=url)
    assert all("preset" not in t.user_attrs for t in study.trials)


def test_a_changed_study_file_does_not_silently_reshape_a_stored_study(searched, tmp_path, data_dir, capsys):
    url, db = searched
    before = [(t.number, t.state, t.params) for t in load(url).trials]
    changed = tmp_path / "mnist-8k.toml"
    text = Path(STUDY_FILE).read_text()
    changed.write_text(text.replace("lr = [0.0005, 0.05]", "lr = [0.001, 0.05]"))
    assert changed.read_text() != text  # the change took: the file's lr line is as this test expects
    code = search.main(["--trials", "5", "--epochs", "1", "--subset", "256", "--storage", url, "--study-file",
                        str(changed), "--data-dir", str(data_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "space.lr: (0.0005, 0.05) stored, (0.001, 0.05) in the file" in err and "--study name" in err
    assert [(t.number, t.state, t.params) for t in load(url).trials] == before


@pytest.mark.parametrize("objectives, names", [
    (("accuracy",), ["validation accuracy"]),
    (("accuracy", "params"), ["validation accuracy", "parameters"]),
    (("accuracy", "peak_ram"), ["validation accuracy", "peak RAM (bytes)"]),
])
def test_the_dashboard_names_the_objectives(objectives, names):
    from nas.study.create import create_or_load
    from nas.studyfile import StudyConfig

    storage = optuna.storages.InMemoryStorage()
    config = StudyConfig(objectives=objectives)
    study = create_or_load(storage, "named", config, seed=0, epochs=1, enqueue=())
    assert study.metric_names == names
    # A study made before studies named them gets its names when it is loaded again
    old = optuna.create_study(storage=storage, study_name="old", directions=config.directions)
    old.set_user_attr("config", config.to_stored())
    assert create_or_load(storage, "old", config, seed=0, epochs=1, enqueue=()).metric_names == names
