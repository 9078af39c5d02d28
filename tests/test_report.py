import random
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nas.cli import report
from nas.study.report import error_ticks, history_figure, intermediate_figure, pareto_figure
from nas.study.trials import pareto_trials, ranked_trials

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DISTRIBUTIONS = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "width": IntDistribution(4, 32)}
FIGURES = ("optimization_history.png", "param_importances.png", "intermediate_values.png", "pareto.png")


def dominates(a, b):
    """(accuracy, params) a is at least as good as b on both and better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def point(trial):
    return trial.values[0], trial.user_attrs["params"]


def fill(study, completed=12):
    """Completed trials with a tie on the front, a pruned trial and a rejected (never trained) one."""
    rng = random.Random(0)
    multi = len(study.directions) > 1
    points = [(round(rng.uniform(97.0, 99.5), 2), rng.randrange(1500, 8000)) for _ in range(completed - 2)]
    best = max(points)
    points += [best, (best[0], best[1] + 100)]  # the same point twice, and an equally accurate larger one
    for acc, params in points:
        study.add_trial(create_trial(
            params={"lr": rng.uniform(1e-3, 1e-1), "width": rng.randint(4, 32)}, distributions=DISTRIBUTIONS,
            values=[acc, float(params)] if multi else [acc],
            user_attrs={"params": params, "train": {"optimizer": "adam", "lr": 0.005}},
            intermediate_values={} if multi else {1: acc - 1.0, 2: acc},
        ))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.01, "width": 8},
                                 distributions=DISTRIBUTIONS, user_attrs={"params": 3000},
                                 intermediate_values={} if multi else {1: 60.0}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.01, "width": 32},
                                 distributions=DISTRIBUTIONS,
                                 user_attrs={"params": 12000, "rejected": "over budget: 12,000 >= 8,000"}))
    study.set_user_attr("config", {"budget": 8000})
    return study


@pytest.fixture
def tiny_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    return url, fill(optuna.create_study(study_name="tiny", storage=url))


def table_numbers(index, heading):
    """Trial numbers in the first column of the table under the heading starting with `heading`."""
    section = index.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [int(n) for n in re.findall(r"^\| (\d+) \|", section, flags=re.M)]


def test_report_writes_every_figure_and_an_index(tiny_study, tmp_path, capsys):
    url, study = tiny_study
    out = tmp_path / "report"
    assert report.main(["--storage", url, "--out", str(out)]) == 0  # the storage's only study
    printed = capsys.readouterr().out
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        assert str(out / name) in printed
    index = (out / "index.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in index
    assert "12 completed, 1 pruned, 1 rejected" in index
    front = table_numbers(index, "Pareto front")
    assert front == [t.number for t in pareto_trials(study)]
    top = table_numbers(index, "Top 10")
    assert top == [t.number for t in ranked_trials(study)][:10]
    pruned_or_rejected = {t.number for t in study.trials if t.state == TrialState.PRUNED}
    assert not pruned_or_rejected & (set(front) | set(top))


def test_reported_front_is_non_dominated_and_complete(tiny_study):
    _, study = tiny_study
    front = pareto_trials(study)
    completed = ranked_trials(study)
    for a in front:
        assert not any(dominates(point(b), point(a)) for b in completed)
    numbers = {t.number for t in front}
    for b in completed:
        if b.number not in numbers:
            assert any(dominates(point(a), point(b)) for a in front)
    # both copies of the most accurate point are on the front; the larger equally accurate one is not
    accurate = [t for t in completed if t.values[0] == completed[0].values[0]]
    assert sorted(t.number in numbers for t in accurate) == [False, True, True]


def test_two_objective_front_is_optunas_and_non_dominated(tmp_path):
    url = f"sqlite:///{tmp_path / 'mo.db'}"
    study = fill(optuna.create_study(study_name="mo", storage=url, directions=["maximize", "minimize"]))
    front = pareto_trials(study)
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    assert [t.values[0] for t in front] == sorted((t.values[0] for t in front), reverse=True)
    for a in front:
        for b in front:
            assert not dominates(point(b), point(a))
    out = tmp_path / "report"
    assert report.main(["--storage", url, "--study", "mo", "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    assert "two-objective study does not prune" in index and not (out / "intermediate_values.png").exists()
    assert table_numbers(index, "Pareto front") == [t.number for t in front]


def test_importances_are_skipped_with_a_note_below_two_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(study_name="one", storage=url)
    study.add_trial(create_trial(params={"lr": 0.01, "width": 8}, distributions=DISTRIBUTIONS, value=98.5,
                                 user_attrs={"params": 4000}, intermediate_values={1: 98.5}))
    out = tmp_path / "report"
    assert report.main(["--storage", url, "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    assert "need at least 2 completed trials" in index
    assert not (out / "param_importances.png").exists() and (out / "pareto.png").exists()


def one_line_error(argv, capsys):
    code = report.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    return err


def test_missing_storage_or_study_is_one_line(tiny_study, tmp_path, capsys):
    url, _ = tiny_study
    missing = tmp_path / "nothing.db"
    assert "no such database file" in one_line_error(["--storage", f"sqlite:///{missing}"], capsys)
    assert not missing.exists()
    err = one_line_error(["--storage", url, "--study", "other", "--out", str(tmp_path / "r")], capsys)
    assert "no study named 'other'" in err and "tiny" in err
    assert not (tmp_path / "r").exists()
    one_line_error(["--storage", "nosuchdb://x"], capsys)


def test_study_without_completed_trials_is_one_line(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    assert "no completed trial" in one_line_error(["--storage", url, "--out", str(tmp_path / "r")], capsys)


def test_out_that_is_a_file_is_one_line(tiny_study, tmp_path, capsys):
    url, _ = tiny_study
    out = tmp_path / "file"
    out.write_text("")
    one_line_error(["--storage", url, "--out", str(out)], capsys)


def test_pareto_accuracy_axis_spans_the_trials_with_ticks_a_tenth_of_a_point_apart_there(tiny_study):
    _, study = tiny_study
    fig = pareto_figure(study)
    ax = fig.axes[0]
    errors = [100 - t.values[0] for t in study.trials if t.state == TrialState.COMPLETE]
    low, high = ax.get_ylim()
    assert low <= min(errors) and max(errors) <= high <= 1.2 * max(errors)  # not 84-100% but where they sit
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    assert {0.6, 0.7, 0.8} <= set(ticks)  # 99.4, 99.3 and 99.2% each have a line
    accuracy_labels = [label.get_text() for label in fig.axes[1].get_yticklabels()]
    assert "99.4%" in accuracy_labels and "99.3%" in accuracy_labels


def test_error_ticks_keep_the_dense_low_end_over_a_wide_range():
    ticks = error_ticks(0.5, 60)
    assert len(ticks) <= 12
    assert ticks[:6] == [0.5, 0.6, 0.7, 0.8, 0.9, 1]
    assert error_ticks(0.62, 0.68) == [0.62, 0.68]  # no tick inside: the ends are labelled


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # write_report silences it
def test_history_axis_leaves_a_hopeless_trial_off_and_says_so(tiny_study):
    _, study = tiny_study
    study.add_trial(create_trial(params={"lr": 0.01, "width": 8}, distributions=DISTRIBUTIONS, values=[11.35],
                                 user_attrs={"params": 4000, "train": {"optimizer": "sgd", "lr": 0.01}}))
    ax = history_figure(study).axes[0]
    low, high = ax.get_ylim()
    best = max(t.values[0] for t in study.trials if t.state == TrialState.COMPLETE)
    assert 90 < low < 99.5 and best < high
    assert any("below" in text.get_text() and "off the axis" in text.get_text() for text in ax.texts)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # write_report silences it
def test_per_epoch_axis_zooms_on_the_better_half_and_drops_a_crowded_legend(tmp_path):
    study = fill(optuna.create_study(), completed=20)
    fig, text = intermediate_figure(study)
    ax = fig.axes[0]
    finals = sorted(t.intermediate_values[2] for t in study.trials if t.state == TrialState.COMPLETE)
    low, high = ax.get_ylim()
    assert low == pytest.approx(finals[(len(finals) - 1) // 2] - 1.0) and high > finals[-1]
    assert ax.get_legend() is None and "off the axis" in text
    few = intermediate_figure(fill(optuna.create_study(), completed=6))[0].axes[0]
    assert few.get_legend() is not None  # 7 lines: still named


def test_a_macs_study_draws_its_front_against_macs_with_its_macs_budget(tmp_path):
    study = optuna.create_study(study_name="m", storage=f"sqlite:///{tmp_path / 'm.db'}",
                                directions=["maximize", "minimize"])
    for acc, macs in ((99.0, 500_000), (98.5, 300_000), (98.0, 550_000)):
        study.add_trial(create_trial(params={"lr": 0.01, "width": 8}, distributions=DISTRIBUTIONS,
                                     values=[acc, float(macs)], user_attrs={"params": 5000, "macs": macs}))
    study.set_user_attr("config", {"budget": 8000, "max_macs": 600_000, "objectives": ["accuracy", "macs"]})
    ax = pareto_figure(study).axes[0]
    assert ax.get_xlabel() == "MACs"
    assert sorted(ax.collections[-1].get_offsets()[:, 0]) == [300_000, 500_000]  # the front, on MACs
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [600_000]
