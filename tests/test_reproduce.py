import json

import pytest

from nas.cli import reproduce
from nas.errors import UsageError
from nas.experiments.reproduce import SEED_RUNS, Run, Settings, best_epoch, mean_std, parse_models, results_table
from nas.spec import PRESETS, count_params
from nas.study.trials import epochs_to_target
from nas.train import EpochResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(model, seed, accuracies, wall=10.0):
    history = tuple(
        EpochResult(epoch=i + 1, train_loss=0.1, train_acc=99.0, eval_loss=0.02, eval_acc=acc,
                    eval_correct=round(acc * 100), eval_total=10_000, lr=0.005, seconds=1.0)
        for i, acc in enumerate(accuracies)
    )
    return Run(model, seed, count_params(PRESETS[model].arch), history, wall)


def settings(models, seeds, epochs):
    return Settings(models, seeds, epochs, None, "cpu", "fp32", 2, "x")


def test_seed_runs_match_the_seed_table():
    """The transcribed logs give back the seed's own results table and layer-table totals."""
    table = {"model1": (7224, 99.35, 15), "model2": (7838, 99.34, 15), "model3": (7918, 99.52, 11)}
    for name, (params, best, epoch) in table.items():
        run = SEED_RUNS[name]
        assert (run.params, run.reported_best, run.reported_epoch) == (params, best, epoch)
        assert best_epoch(run.test_acc) == (pytest.approx(best), epoch)
        assert count_params(PRESETS[name].arch) == params
        assert len(run.test_correct) == len(run.epoch_seconds) == 15
    # "consistent 99.44%+ from epoch 9"
    assert epochs_to_target(SEED_RUNS["model3"].test_acc) == 9
    assert epochs_to_target(SEED_RUNS["model1"].test_acc) is None


def test_best_epoch_and_mean_std():
    assert best_epoch([98.0, 99.5, 99.2, 99.5]) == (99.5, 2)
    assert mean_std([99.25]) == "99.25%"
    assert mean_std([99.0, 99.5]) == "99.25 ± 0.35%"


def test_models_take_the_presets_names_and_their_short_forms():
    assert parse_models("model1,model2,model3") == ("model1", "model2", "model3")
    assert parse_models("m1,m2,m3") == ("model1", "model2", "model3")  # the README's spelling
    assert parse_models(" m3 , model1,model3") == ("model3", "model1")  # once each, in order
    for bad in ("m9", "model9", ",", "", "mm1"):
        with pytest.raises(UsageError, match="--models: unknown"):
            parse_models(bad)


def test_table_aggregates_over_seeds():
    runs = [fake_run("model3", 0, [99.0, 99.3, 99.45, 99.5, 99.4]),
            fake_run("model3", 1, [99.1, 99.6, 99.2, 99.3, 99.35], wall=20.0)]
    table = results_table(runs, settings(("model3",), (0, 1), 5))
    seed_row, ours_row = table.splitlines()[2:]
    assert seed_row.startswith("| Model 3 | seed study") and "99.52% (11)" in seed_row and "| 9 |" in seed_row
    assert "ours, 2 seeds × 5 epochs" in ours_row and "7,918" in ours_row
    assert "99.60% (2, seed 1)" in ours_row
    assert "per-seed best 99.55 ± 0.07%" in ours_row
    # last 3 epochs: 99.45 (seed 0) and 99.2833 (seed 1)
    assert "| 99.37 ± 0.12% |" in ours_row
    assert "| 3, — |" in ours_row
    assert "15.0s per run" in ours_row


def test_reproduce_writes_table_json_and_png(tmp_path, data_dir, capsys):
    out = tmp_path / "rep"
    code = reproduce.main(["--models", "m1,m2,m3", "--epochs", "1", "--subset", "128", "--seeds", "1",
                           "--out", str(out), "--data-dir", str(data_dir), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    table = (out / "reproduce.md").read_text()
    for label, params in (("Model 1", "7,224"), ("Model 2", "7,838"), ("Model 3", "7,918")):
        assert f"| {label} | seed study, 1 run (its log) | {params} |" in table
        assert f"| {label} | ours, 1 seed × 1 epoch | {params} |" in table
    assert "99.52% (11)" in table and "A quick check, not a reproduction" in table
    assert (out / "test_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    raw = json.loads((out / "reproduce.json").read_text())
    assert [(r["model"], r["seed"], len(r["epochs"])) for r in raw["runs"]] == [
        ("model1", 0, 1), ("model2", 0, 1), ("model3", 0, 1)]
    first = raw["runs"][0]["epochs"][0]
    assert first["eval_total"] == 10_000 and 0 <= first["eval_acc"] <= 100
    assert raw["settings"]["subset"] == 128
    assert raw["seed_study"]["model3"]["test_acc"][10] == pytest.approx(99.52)
    for name in ("reproduce.md", "test_accuracy.png", "reproduce.json"):
        assert str(out / name) in printed


def exit_code(argv):
    try:
        return reproduce.main(argv)
    except SystemExit as exc:  # argparse's own way out
        return exc.code


@pytest.mark.parametrize("argv", [
    ["--models", "model9"],
    ["--models", "m1,m9"],
    ["--models", ","],
    ["--seeds", "0"],
    ["--epochs", "x"],
    ["--subset", "70000"],
    ["--device", "cuda:7"],
    ["--device", "foo"],
])
def test_bad_input_is_one_line_and_exit_2(argv, data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert exit_code(argv + ["--quiet", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "file"
    out.write_text("")
    assert exit_code(["--out", str(out), "--data-dir", str(data_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--out" in err and len(err.strip().splitlines()) == 1
