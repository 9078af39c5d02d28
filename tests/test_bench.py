from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas.bench import (
    OURS,
    SEED_STYLE,
    Timing,
    extrapolate,
    fastest,
    format_table,
    loader_workers,
    main,
    ratio,
    ratio_line,
    report,
    schedule,
)
from nas.cli import non_negative_int

REPO_ROOT = Path(__file__).resolve().parent.parent


def timing(pipeline: str, seconds: float, images: int = 12_800, epoch_images: int = 60_000) -> Timing:
    return Timing(pipeline, seconds, images, epoch_images, train_loss=1.0, train_acc=70.0)


def test_extrapolate_scales_linearly_by_images():
    assert extrapolate(6.0, 12_800, 60_000) == pytest.approx(28.125)
    assert extrapolate(30.0, 60_000, 60_000) == 30.0


def test_timing_derives_epoch_time_speed_and_whether_it_was_extrapolated():
    partial = timing(OURS, 6.4)
    assert partial.extrapolated
    assert partial.images_per_second == pytest.approx(2_000)
    assert partial.epoch_seconds == pytest.approx(30.0)
    full = timing(OURS, 30.0, images=60_000)
    assert not full.extrapolated and full.epoch_seconds == 30.0


def test_ratio_compares_epoch_times_not_raw_seconds():
    # Ours timed over half as many images in the same time is twice as fast.
    ours = timing(OURS, 5.0, images=6_400)
    seed_style = timing(SEED_STYLE, 5.0, images=12_800)
    assert ratio(ours, seed_style) == pytest.approx(2.0)
    assert ratio(timing(OURS, 3.0), timing(SEED_STYLE, 6.0)) == pytest.approx(0.5)


def test_ratio_line_gives_time_fraction_and_speed_up():
    line = ratio_line(0.5)
    assert "0.500" in line and "2.00x" in line


def test_schedule_alternates_which_pipeline_goes_first():
    assert schedule(1) == [SEED_STYLE, OURS]
    assert schedule(3) == [SEED_STYLE, OURS, OURS, SEED_STYLE, SEED_STYLE, OURS]


def test_fastest_keeps_each_pipelines_quickest_run():
    runs = [timing(SEED_STYLE, 7.0), timing(OURS, 5.5), timing(OURS, 5.0), timing(SEED_STYLE, 6.0)]
    best = fastest(runs)
    assert best[SEED_STYLE].seconds == 6.0 and best[OURS].seconds == 5.0


def test_report_holds_best_runs_all_seconds_and_their_ratio():
    runs = [timing(SEED_STYLE, 8.0), timing(OURS, 4.0), timing(OURS, 5.0), timing(SEED_STYLE, 6.0)]
    result = report({"cpu": "x"}, {"mode": "quick"}, runs)
    assert result["pipelines"][OURS]["seconds"] == 4.0
    assert result["pipelines"][SEED_STYLE]["all_seconds"] == [8.0, 6.0]
    assert result["ratio"] == pytest.approx(4.0 / 6.0)
    json.dumps(result)


def test_table_says_which_times_are_measured_and_aligns_columns():
    table = format_table([timing(SEED_STYLE, 6.0), timing(OURS, 30.0, images=60_000)])
    header, seed_row, ours_row = table.splitlines()
    assert header.startswith("pipeline") and "s/epoch" in header and "images/s" in header
    assert seed_row.startswith(SEED_STYLE) and "28.12" in seed_row and "extrapolated from 12,800 images" in seed_row
    assert ours_row.startswith(OURS) and "30.00" in ours_row and "measured" in ours_row
    # Right-aligned numbers end in the same column on every row.
    assert header.index("images/s") + len("images/s") == seed_row.index("2,133") + len("2,133")
    assert ours_row.index("2,000") + len("2,000") == seed_row.index("2,133") + len("2,133")


def test_seed_style_loader_workers_follow_the_seeds_choice():
    assert loader_workers(torch.device("cpu")) == 0
    assert loader_workers(torch.device("cuda")) == 2


def test_non_negative_int():
    assert non_negative_int("0") == 0 and non_negative_int("2") == 2
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_int(bad)


def test_quick_run_end_to_end_writes_consistent_json(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--quick", "--batches", "2", "--warmup", "1", "--device", "cpu",
                 "--data-dir", str(data_dir), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    pipelines = result["pipelines"]
    assert set(pipelines) == {OURS, SEED_STYLE}
    for figures in pipelines.values():
        assert figures["seconds"] > 0 and figures["epoch_seconds"] > figures["seconds"]
        assert figures["images"] == 128 and figures["extrapolated"]
        assert len(figures["all_seconds"]) == 2 and min(figures["all_seconds"]) == figures["seconds"]
    assert result["ratio"] == pytest.approx(pipelines[OURS]["epoch_seconds"] / pipelines[SEED_STYLE]["epoch_seconds"])
    assert result["setup"]["mode"] == "quick" and result["setup"]["batches"] == 2
    assert result["machine"]["device"] == "cpu" and result["machine"]["threads"] >= 1
    printed = capsys.readouterr().out
    assert "extrapolated from 128 images" in printed and "ours / seed-style" in printed


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def test_missing_data_is_one_error_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nas.bench", "--quick", "--data-dir", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "missing" in one_error_line(result.stderr)


def test_concurrent_trainings_report_aggregate_throughput(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--batches", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                 "--concurrency", "1,2", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["concurrency"]
    assert [(r["processes"], len(r["per_process"])) for r in rows] == [(1, 1), (2, 2)]
    for row in rows:
        assert row["images_per_process"] == 128 and all(rate > 0 for rate in row["per_process"])
        assert row["images_per_second"] == pytest.approx(sum(row["per_process"]))
    assert "images/s (all)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--workers", "-1"], ["--nonsense"],
                                  ["--concurrency", "0"], ["--concurrency", "1,x"]])
def test_bad_flags_are_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr().err)


def test_bad_device_is_one_error_line(data_dir, capsys):
    device = "nonsense" if torch.cuda.is_available() else "cuda"
    assert main(["--device", device, "--data-dir", str(data_dir)]) == 2
    one_error_line(capsys.readouterr().err)


def test_unwritable_json_path_fails_before_timing(data_dir, tmp_path, capsys):
    assert main(["--quick", "--data-dir", str(data_dir), "--json", str(tmp_path / "no" / "b.json")]) == 2
    captured = capsys.readouterr()
    assert "no such directory" in one_error_line(captured.err)
    assert "timing" not in captured.out
