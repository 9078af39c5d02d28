"""The multi-fidelity schemes a study file can choose (pruner = ...) and the benchmark that compares them."""

import dataclasses
import json
import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nas.cli import fidelity as fidelity_command
from nas.cli import search as search_command
from nas.experiments import fidelity
from nas import studyfile
from nas.study.sampling import PRUNERS, RUNG_STEP, RungPruner, make_pruner, rung_pays
from nas.study.stored import config_from_study
from nas.study.trials import trial_counts
from nas.studyfile import NO_MARGIN, ConfigError, RungConfig, StudyConfig, parse_study_config

from tests.conftest import REPO_ROOT


def tiny_study_file(tmp_path, pruner):
    path = tmp_path / f"{pruner}.toml"
    path.write_text(f'name = "f"\nbudget = 8000\nepochs = 2\nscore_epochs = 1\npruner = "{pruner}"\n'
                    "[rung]\nsubset = 64\nepochs = 1\nstartup = 1\n")
    return path


@pytest.mark.parametrize("pruner", ["median", "hyperband", "rung"])
def test_each_fidelity_scheme_runs_end_to_end(pruner, tmp_path, data_dir):
    url = f"sqlite:///{tmp_path / 's.db'}"
    trials = 4 if pruner == "rung" else 3
    assert search_command.main(["--trials", str(trials), "--subset", "256", "--storage", url,
                                "--data-dir", str(data_dir), "--study-file", str(tiny_study_file(tmp_path, pruner)),
                                "--quiet"]) == 0
    study = optuna.load_study(study_name="f", storage=url)
    trained = [t for t in study.trials if "rejected" not in t.user_attrs]
    assert len([t for t in trained if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == trials
    assert config_from_study(study).pruner == pruner
    for t in trained:
        if t.state == TrialState.COMPLETE:
            epochs = [1, 2]
            assert sorted(t.intermediate_values) == ([RUNG_STEP] if pruner == "rung" else []) + epochs
    counts = trial_counts(study)
    if pruner != "rung":
        assert all("rung_acc" not in t.user_attrs for t in trained) and "stopped at the rung" not in counts
        return
    assert counts.get("stopped at the rung", 0) == sum(t.state == TrialState.PRUNED for t in trained)
    # Each trial went on to full training exactly when the rule says, from the rung scores before it
    # (startup 1, the default margin of 1 point).
    rungs: list[float] = []
    for t in sorted(trained, key=lambda t: t.number):
        value = t.user_attrs["rung_acc"]
        assert t.intermediate_values[RUNG_STEP] == value
        better = sum(r > value for r in rungs)
        stopped = len(rungs) >= 1 and (better >= (len(rungs) + 1) / 3 or value < max(rungs) - 1.0)
        assert (t.state == TrialState.PRUNED and t.user_attrs.get("pruned_at") == RUNG_STEP) == stopped
        rungs.append(value)


def test_a_quick_look_skips_a_rung_that_costs_as_much_as_the_trial(searched):
    # The default study's rung is 2 epochs on 10,000 images; the fixture's trials are 1 epoch on 256.
    config = parse_study_config({"pruner": "rung"})
    assert not rung_pays(config, epochs=1, train_images=256)
    assert rung_pays(config, epochs=15, train_images=50_000)
    assert not rung_pays(config, epochs=2, train_images=10_000)  # the same cost: no saving
    study = optuna.load_study(study_name="mnist-8k", storage=searched[0])
    trained = [t for t in study.trials if "rejected" not in t.user_attrs]
    assert trained and all(RUNG_STEP not in t.intermediate_values and "rung_acc" not in t.user_attrs
                           for t in trained)


def rung_study(scores, keep=1 / 3, startup=3, margin=NO_MARGIN):
    study = optuna.create_study(direction="maximize", pruner=RungPruner(keep, startup, margin))
    for state, value in scores:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value if state == TrialState.COMPLETE else None,
            params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, intermediate_values={0: value}))
    return study


def prunes(study, value, step=RUNG_STEP):
    trial = study.ask()
    trial.report(value, step)
    return trial.should_prune()


def test_every_pruner_a_study_file_may_name_is_made_from_one_table():
    assert set(PRUNERS) == set(studyfile.PRUNERS)
    kinds = {name: type(make_pruner(StudyConfig(pruner=name), 15)) for name in studyfile.PRUNERS}
    assert kinds == {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
                     "rung": RungPruner, "none": optuna.pruners.NopPruner}


def test_the_rung_keeps_the_top_third_of_all_rung_scores_pruned_ones_included():
    # Five earlier rung scores, two of them from trials the rung stopped: 97 is better than 4 of 5, kept;
    # 93 is beaten by 3 (97.5, 96, 95) >= 6/3, stopped, though only one completed trial beats it.
    earlier = [(TrialState.COMPLETE, 97.5), (TrialState.PRUNED, 96.0), (TrialState.PRUNED, 95.0),
               (TrialState.COMPLETE, 90.0), (TrialState.PRUNED, 80.0)]
    assert not prunes(rung_study(earlier), 97.0)
    assert prunes(rung_study(earlier), 93.0)
    assert not prunes(rung_study(earlier), 10.0, step=1)  # never during full training
    assert not prunes(rung_study(earlier[:2]), 10.0)  # with no margin, the first `startup` trials go on


C, P, R = TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING


@pytest.mark.parametrize("earlier, score, keep, startup, margin, goes_on", [
    ([], 10.0, 1 / 3, 3, 1.0, True),  # the first candidate: nothing to compare with
    ([(C, 96.8)], 47.2, 1 / 3, 3, 1.0, False),  # a startup candidate far below Model 3: stopped
    ([(C, 96.8)], 95.8, 1 / 3, 3, 1.0, True),  # exactly the margin below: goes on
    ([(C, 96.8)], 95.7, 1 / 3, 3, 1.0, False),  # just past it
    ([(C, 96.8)], 95.7, 1 / 3, 3, 2.0, True),  # a wider margin lets it on
    ([(C, 96.8)], 47.2, 1 / 3, 3, NO_MARGIN, True),  # no margin: startup goes on, the old rule
    ([(C, 96.8), (P, 97.5)], 96.6, 1 / 3, 3, 1.0, True),  # within 1 of a pruned trial's best; keep waits
    ([(C, 96.8), (P, 97.5)], 96.4, 1 / 3, 3, 1.0, False),  # the best so far counts whatever became of it
    ([(C, 96.8), (R, 97.5)], 96.4, 1 / 3, 3, 1.0, False),  # a trial still training counts too
    ([(C, 97.0), (C, 96.9), (C, 96.8)], 96.7, 1 / 3, 3, 1.0, False),  # in the margin, beaten by 3 >= 4/3
    ([(C, 97.0), (C, 96.9), (C, 96.8)], 96.95, 1 / 3, 3, 1.0, True),  # beaten by 1 < 4/3, in the margin
    ([(C, 97.0), (C, 96.9), (C, 96.8)], 97.1, 1 / 3, 3, 1.0, True),  # the best: goes on
    ([(C, 97.0), (C, 96.9), (C, 96.8)], 96.7, 1.0, 3, 1.0, True),  # keep everything: the margin alone
    ([(C, 97.0), (C, 96.9), (C, 96.8)], 96.7, 1 / 3, 4, 1.0, True),  # keep not yet: 3 scores < startup 4
    ([(C, 97.0), (C, 90.0), (C, 80.0)], 95.0, 1.0, 0, 1.0, False),  # keep passes, the margin stops it
])
def test_each_stop_or_go_at_the_rung_follows_the_rule(earlier, score, keep, startup, margin, goes_on):
    # The rule (RungConfig): goes on iff score >= best earlier - margin (when there is one), and,
    # once len(earlier) >= startup, fewer than keep * (len(earlier) + 1) earlier scores beat it.
    assert prunes(rung_study(earlier, keep, startup, margin), score) is not goes_on
    assert not prunes(rung_study(earlier, keep, startup, margin), score, step=1)  # never in full training


def test_the_study_file_sets_the_rung_and_the_study_keeps_it(tmp_path):
    config = parse_study_config({"pruner": "rung", "rung": {"subset": 5000, "epochs": 3, "keep": 0.5}})
    assert config.rung == RungConfig(subset=5000, epochs=3, keep=0.5, startup=3, margin=1.0)
    for bad in ({"keep": 0}, {"epochs": 0}, {"subset": -1}, {"keep": 1.5}, {"margin": -1}):
        with pytest.raises(ConfigError, match=r"\[rung\]"):
            parse_study_config({"rung": bad})
    with pytest.raises(ConfigError, match="colour"):
        parse_study_config({"rung": {"colour": 1}})
    study = optuna.create_study()  # the study stores its config as nas.study.create.create_or_load does
    study.set_user_attr("config", config.to_stored())
    assert config_from_study(study) == config
    old = dataclasses.asdict(StudyConfig())
    del old["rung"]["margin"]  # a study created before the margin existed ran without one
    study.set_user_attr("config", old)
    assert config_from_study(study).rung == RungConfig(margin=NO_MARGIN)
    del old["rung"]  # a study created before the rung existed
    study.set_user_attr("config", old)
    assert config_from_study(study).rung == RungConfig()


def test_rank_correlations_match_hand_computed_values():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert fidelity.spearman(x, y) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert fidelity.kendall(x, y) == pytest.approx(0.6)  # 8 concordant, 2 discordant pairs
    assert fidelity.spearman(x, x[::-1]) == pytest.approx(-1)
    assert fidelity.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert fidelity.kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (2 * 3) ** 0.5)  # tau-b with a tie
    assert math.isnan(fidelity.spearman([1], [2])) and math.isnan(fidelity.kendall([1], [2]))  # one net ranks nothing


def test_compare_runs_only_the_jobs_the_results_lack():
    plan = fidelity.Plan(schemes=("median", "rung"), repeats=2, archs=3)
    assert [job.name for job in fidelity.pending_jobs(plan, {})] == [
        "rank", "median-seed1", "rung-seed1", "median-seed2", "rung-seed2"]
    done = {"rank": [], "runs": {"median-seed1": {}, "rung-seed2": {}}}
    assert fidelity.pending_jobs(plan, done) == [fidelity.Job("rung-seed1", "rung", 1),
                                                 fidelity.Job("median-seed2", "median", 2)]
    assert [job.name for job in fidelity.pending_jobs(dataclasses.replace(plan, archs=0), {})][0] == "median-seed1"


def test_compare_refuses_more_pinned_jobs_than_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "available_cpus", lambda: 1)
    plan = fidelity.Plan(schemes=("rung",), repeats=1, archs=1, parallel=2, work_dir=tmp_path / "w")
    with pytest.raises(fidelity.FidelityError, match="--parallel 2"):
        fidelity.compare(plan, StudyConfig(), tmp_path / "f.json", "", print, print)
    assert not (tmp_path / "w").exists()


def test_compare_runs_each_job_once_and_draws_the_curves(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("NAS_DATA_DIR", str(data_dir))
    monkeypatch.chdir(REPO_ROOT)  # the default study file
    out, figure = tmp_path / "f.json", tmp_path / "f.png"
    args = ["compare", "--minutes", "0.4", "--repeats", "1", "--schemes", "rung", "--archs", "1",
            "--subset", "200", "--epochs", "1", "--rung-subset", "100", "--rung-epochs", "1",
            "--work-dir", str(tmp_path / "w"), "--out", str(out), "--figure", str(figure)]
    assert fidelity_command.main(args) == 0
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"rung-seed1"}
    assert len(results["rank"]) == 1 and results["rank"][0]["model3"]
    for run in results["runs"].values():
        assert run["trials"], "a run of 24 s finishes trials of one epoch on 200 images, even on 2 busy cores"
        assert all(t["seconds"] <= 24 + 3 for t in run["trials"])
    assert figure.read_bytes()[:4] == b"\x89PNG"
    # Each job's own output went to its log, not to the command's.
    assert "rank 1/1: " in (tmp_path / "w" / "rank.log").read_text()
    assert "Trial 0: " in (tmp_path / "w" / "rung-seed1.log").read_text()
    figure.unlink()
    assert fidelity_command.main(args) == 0  # nothing left to run: same results, figure redrawn
    assert json.loads(out.read_text())["runs"] == results["runs"] and figure.is_file()
    other = [a if a != "0.4" else "0.3" for a in args]
    assert fidelity_command.main(other) == 2  # another budget into the same file is refused


def test_plot_without_results_is_one_error_line(tmp_path, capsys):
    assert fidelity_command.main(["plot", "--out", str(tmp_path / "none.json"), "--figure",
                                  str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no runs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.png").exists()


def test_with_workers_a_candidate_at_the_rung_waits_for_the_running_presets_score():
    """Two workers: Model 3 (trial 0) and a candidate start together; the candidate's rung ends first.
    Its verdict waits for Model 3's rung score instead of going on as the first candidate."""
    import threading

    for patience, preset_reports, pruned in ((30.0, True, True), (1.5, False, False)):
        study = optuna.create_study(direction="maximize", pruner=RungPruner(1 / 3, 3, 1.0, patience=patience))
        preset = study.ask()
        preset.set_user_attr("preset", "model3")
        candidate = study.ask()
        candidate.report(47.2, RUNG_STEP)
        if preset_reports:
            threading.Timer(1.2, preset.report, (96.8, RUNG_STEP)).start()
        assert candidate.should_prune() is pruned  # without the preset's score: the first candidate goes on
