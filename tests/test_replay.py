"""nas.cli.replay: a stored trial trained again exactly, errors that leave the study untouched, and a
two-objective study end to end (the search keeps a Pareto front, replay takes a trial from it, the
report draws it)."""

import hashlib

import optuna
import pytest

from nas.cli import replay, report, search
from nas.study.search import summary_lines
from nas.study.stored import pick_trial
from nas.study.trials import best_trial, front_note, pareto_trials, ranked_trials
from nas.train.checkpoint import load_checkpoint

STUDY_FILE = """
name = "pareto"
budget = 8000
epochs = 1
objectives = ["accuracy", "params"]
enqueue = []  # Model 3 lies outside this small space

[space]
blocks = [2, 2]
layers = [1, 2]
width = [4, 12]
tail_layers = [0, 1]
"""


@pytest.fixture(scope="module")
def pareto_study(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("pareto")
    (root / "pareto.toml").write_text(STUDY_FILE)
    url = f"sqlite:///{root / 'pareto.db'}"
    code = search.main(["--trials", "3", "--epochs", "1", "--subset", "256", "--storage", url,
                        "--study-file", str(root / "pareto.toml"), "--data-dir", str(data_dir), "--quiet"])
    assert code == 0
    return url, optuna.load_study(study_name="pareto", storage=url)


def test_search_creates_a_two_objective_study_with_a_front(pareto_study):
    _, study = pareto_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    completed = ranked_trials(study)
    assert len(completed) == 3
    for t in completed:
        assert t.values[1] == t.user_attrs["params"] < 8000
    front = pareto_trials(study)
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    for a in front:
        for b in completed:
            assert not (b.values[0] >= a.values[0] and b.values[1] <= a.values[1] and b.values != a.values)
    assert best_trial(study).number == front[0].number


def test_search_summary_shows_the_front(pareto_study):
    url, study = pareto_study
    lines = summary_lines(study, url)
    assert any("Pareto front" in line for line in lines)
    assert any("--trial N" in line for line in lines)


def test_replay_takes_a_trial_from_the_front(pareto_study, data_dir, tmp_path, capsys):
    url, study = pareto_study
    front = pareto_trials(study)
    chosen = min(front, key=lambda t: t.user_attrs["params"])  # the smallest; the default is the most accurate
    out = tmp_path / "m.pt"
    assert replay.main(["--storage", url, "--study", "pareto", "--trial", str(chosen.number),
                        "--data-dir", str(data_dir), "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Trial {chosen.number} is on the Pareto front" in printed
    assert "difference +0.0000 (identical)" in printed
    _, saved = load_checkpoint(out)
    assert saved["trial"] == chosen.number and saved["params"] == chosen.user_attrs["params"]


def test_replay_without_a_trial_picks_the_most_accurate_of_the_front(pareto_study):
    _, study = pareto_study
    trial = pick_trial(study, None)
    front = pareto_trials(study)
    assert trial.number == front[0].number
    assert trial.values[0] == max(t.values[0] for t in ranked_trials(study))
    assert "is the most accurate of the Pareto front" in front_note(study, trial, picked=True)


def test_report_on_a_two_objective_study(pareto_study, tmp_path):
    url, study = pareto_study
    out = tmp_path / "report"
    assert report.main(["--storage", url, "--study", "pareto", "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    assert "a Pareto front" in index and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for t in pareto_trials(study):
        assert f"| {t.number} | {t.values[0]:.2f} | {t.user_attrs['params']:,} |" in index


def test_replay_of_an_unknown_device_is_one_line(pareto_study, data_dir, capsys):
    url, _ = pareto_study
    code = replay.main(["--storage", url, "--study", "pareto", "--device", "foo", "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def load(url):
    return optuna.load_study(study_name="mnist-8k", storage=url)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replay_reproduces_the_stored_value_exactly(searched, data_dir, capsys, tmp_path):
    url, _ = searched
    out = tmp_path / "m.pt"
    assert replay.main(["--storage", url, "--data-dir", str(data_dir), "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "difference +0.0000 (identical)" in printed
    model, saved = load_checkpoint(out)
    assert saved["trial"] == best_trial(load(url)).number
    assert sum(p.numel() for p in model.parameters()) == saved["params"]


def test_replay_with_another_seed_trains_differently(searched, data_dir, capsys, tmp_path, monkeypatch):
    url, _ = searched
    monkeypatch.chdir(tmp_path)
    assert replay.main(["--storage", url, "--data-dir", str(data_dir), "--quiet", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "seed 7 (not the stored seed)" in printed and "(identical)" not in printed
    best = best_trial(load(url)).number
    assert load_checkpoint(tmp_path / "runs" / f"mnist-8k-trial{best}-seed7.pt")[1]["train"]["seed"] == 7


def test_replay_errors_leave_the_database_untouched(searched, tmp_path, data_dir, capsys):
    url, db = searched
    before = digest(db)
    assert replay.main(["--storage", url, "--trial", "999", "--data-dir", str(data_dir)]) == 2
    assert "no trial 999" in capsys.readouterr().err
    assert digest(db) == before
    empty = tmp_path / "empty.db"
    optuna.create_study(study_name="mnist-8k", storage=f"sqlite:///{empty}")
    assert replay.main(["--storage", f"sqlite:///{empty}", "--data-dir", str(data_dir)]) == 2
    assert "no completed trial" in capsys.readouterr().err
    missing = tmp_path / "nothing.db"
    assert replay.main(["--storage", f"sqlite:///{missing}"]) == 2
    assert not missing.exists()
