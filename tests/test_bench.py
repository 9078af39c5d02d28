from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nas import workers
from nas.cli.args import non_negative_int, run_settings
from nas.cli.bench import build_parser, concurrency_list, main, study_size
from nas.experiments import bench
from nas.experiments.bench import (
    BenchError,
    GPU_CONCURRENCY,
    OURS,
    SEED_STYLE,
    StudySize,
    Timing,
    extrapolate,
    fastest,
    format_concurrency,
    format_study,
    format_table,
    gather,
    loader_workers,
    machine_line,
    planned,
    process_threads,
    ratio,
    ratio_line,
    report,
    schedule,
    study_command,
    time_study,
)
from nas.train.setup import RunSettings

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
    assert "concurrency" not in result and "study" not in result
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


def test_the_shared_run_flags_reach_our_pipelines_run_settings():
    args = build_parser().parse_args(["--no-ema", "--compile", "--batchnorm", "native", "--threads", "2",
                                      "--precision", "fp32", "--device", "cpu"])
    assert run_settings(args) == RunSettings(device="cpu", precision="fp32", batchnorm="native", compile=True,
                                             ema=False, threads=2)
    assert run_settings(build_parser().parse_args([])) == RunSettings()


def test_concurrency_list_and_study_size_parse_what_the_flags_take():
    assert concurrency_list("1,2,4,8") == [1, 2, 4, 8] and concurrency_list("3") == [3]
    assert study_size("10x15") == StudySize(10, 15) and study_size("2X1") == StudySize(2, 1)
    assert str(StudySize(10, 15)) == "10x15"
    for bad in ("0", "1,0", "x", "1,,2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            concurrency_list(bad)
    for bad in ("3", "0x2", "2x0", "x", "2x3x4", "ax2"):
        with pytest.raises(argparse.ArgumentTypeError):
            study_size(bad)


def test_concurrency_and_study_are_opt_in_on_cpu_and_default_on_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert planned(None, None, cpu, quick=False) == ([], None)
    assert planned([1, 2], StudySize(2, 1), cpu, quick=True) == ([1, 2], StudySize(2, 1))
    assert planned(None, None, gpu, quick=False) == (list(GPU_CONCURRENCY), StudySize(10, 15))
    # --quick on a GPU keeps the concurrency table but not the minutes of a default study.
    assert planned(None, None, gpu, quick=True) == (list(GPU_CONCURRENCY), None)
    assert planned([4], StudySize(3, 2), gpu, quick=True) == ([4], StudySize(3, 2))


def test_cpu_threads_are_split_between_concurrent_processes(monkeypatch):
    # The CPUs this process may run on (a taskset's share), not the machine's: nas.workers' split.
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 64)
    cpu = torch.device("cpu")
    assert [process_threads(n, cpu) for n in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert process_threads(4, torch.device("cuda")) == 1


def test_gather_fails_at_once_when_a_process_dies_without_reporting(monkeypatch):
    monkeypatch.setattr(bench, "POLL_SECONDS", 0.01)
    messages = queue.Queue()
    messages.put(1.5)
    alive, dead = SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=1)
    with pytest.raises(BenchError, match="died while training .exit status 1"):
        gather(messages, [alive, dead], "while training")
    # Both gone, one of them silently: waiting longer would hang.
    messages.put(1.5)
    with pytest.raises(BenchError, match="exit status 0"):
        gather(messages, [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=0)], "while training")
    for rate in (1.0, 2.0):
        messages.put(rate)
    assert gather(messages, [alive, alive], "while training") == [1.0, 2.0]


def test_concurrent_trainings_report_aggregate_and_per_process_throughput(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--batches", "3", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                 "--concurrency", "1,2", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["concurrency"]
    assert [(r["processes"], len(r["per_process"])) for r in rows] == [(1, 1), (2, 2)]
    cpu = torch.device("cpu")
    for row in rows:
        assert row["threads_each"] == process_threads(row["processes"], cpu)
        assert row["images_per_process"] == 192 and row["seconds"] > 0
        assert all(rate > 0 for rate in row["per_process"])
        assert row["images_per_second"] == pytest.approx(row["processes"] * 192 / row["seconds"])
    printed = capsys.readouterr().out
    assert "images/s (all)" in printed and "images/s (each, mean)" in printed
    assert printed.rstrip().splitlines()[-1].startswith("machine: ")


def test_concurrency_table_lines_up_aggregate_and_each():
    rows = [{"processes": 1, "threads_each": 2, "images_per_process": 12_800, "seconds": 4.0,
             "images_per_second": 3_200.0, "per_process": [3_300.0]},
            {"processes": 2, "threads_each": 1, "images_per_process": 12_800, "seconds": 5.0,
             "images_per_second": 5_120.0, "per_process": [2_500.0, 2_700.0]}]
    header, one, two = format_concurrency(rows).splitlines()
    assert "3,200" in one and "3,300" in one and "5,120" in two and "2,600" in two and "2,500-2,700" in two
    end = header.index("images/s (all)") + len("images/s (all)")
    assert one.index("3,200") + len("3,200") == end == two.index("5,120") + len("5,120")


def test_study_command_is_the_search_on_its_own_storage(tmp_path):
    command = study_command(StudySize(10, 15), "journal:///tmp/x/bench.log", workers=1, device=torch.device("cpu"),
                            precision="auto", data_dir=tmp_path, subset=None)
    assert command[:3] == [sys.executable, "-m", "nas.search"]
    args = " ".join(command[3:])
    assert args.startswith("--trials 10 --epochs 15 --storage journal:///tmp/x/bench.log --study bench --quiet")
    assert "--device cpu" in args and f"--data-dir {tmp_path}" in args
    # One worker is said, not left to the search's default (auto: a process per CPU core).
    assert args.endswith("--workers 1") and "--subset" not in args
    command = study_command(StudySize(2, 1), "journal:///s.log", workers=4, device=torch.device("cpu"),
                            precision="fp32", data_dir=tmp_path, subset=256)
    assert " ".join(command).endswith("--precision fp32 --data-dir " + str(tmp_path) + " --workers 4 --subset 256")


def test_a_real_tiny_study_reports_its_trials_and_rate(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--batches", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                 "--study", "2x1", "--study-subset", "128", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    study = json.loads(out.read_text())["study"]
    assert (study["trials"], study["epochs"], study["workers"], study["subset"]) == (2, 1, 1, 128)
    assert study["finished"] == 2 and study["counts"]["completed"] + study["counts"]["pruned"] == 2
    assert study["wall_seconds"] > study["trial_span_seconds"] > 0
    assert study["trials_per_hour"] == pytest.approx(2 * 3600 / study["wall_seconds"])
    assert "--study bench --quiet" in study["command"] and "--subset 128" in study["command"]
    printed = capsys.readouterr().out
    assert "trials/hour" in printed and "2x1" in printed


def test_a_failed_study_run_is_one_error_line(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 2, "", "Traceback ...\nerror: something broke\n")
    monkeypatch.setattr(bench.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(BenchError, match="exit status 2: error: something broke"):
        time_study(StudySize(2, 1), 1, torch.device("cpu"), "auto", tmp_path, 128)


def test_study_table_names_counts_and_rate():
    row = {"trials": 10, "epochs": 15, "workers": 2, "subset": None, "wall_seconds": 600.0,
           "trial_span_seconds": 590.0, "finished": 11, "trials_per_hour": 66.0,
           "counts": {"completed": 4, "pruned": 7, "rejected (over budget, never trained)": 3,
                      "failed/interrupted": 0}}
    header, line = format_study(row).splitlines()
    assert header.split() == ["trials", "x", "epochs", "workers", "train", "images", "wall", "s", "first",
                              "start-last", "end", "s", "finished", "completed", "pruned", "rejected",
                              "failed/interrupted", "trials/hour"]
    assert line.split() == ["10x15", "2", "all", "600.0", "590.0", "11", "4", "7", "3", "0", "66"]


def test_machine_line_names_the_machine():
    cpu = {"cpu": "AMD EPYC", "cpu_count": 2, "load_average": 1.5, "torch": "2.14.1", "threads": 2,
           "device": "cpu"}
    assert machine_line(cpu) == "machine: AMD EPYC, 2 CPUs, load 1.50 at start; torch 2.14.1, 2 threads; device cpu"
    gpu = {**cpu, "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "load_average": None, "device": "cuda"}
    assert machine_line(gpu).startswith("machine: NVIDIA H100 80GB HBM3 (CUDA 13.0), AMD EPYC, 2 CPUs; torch")


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--workers", "-1"], ["--nonsense"],
                                  ["--concurrency", "0"], ["--concurrency", "x"], ["--concurrency", "1,x"],
                                  ["--study", "3"], ["--study", "0x2"], ["--study-workers", "0"],
                                  ["--study-subset", "0"]])
def test_bad_flags_are_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr().err)


def test_bad_device_is_one_error_line(data_dir, capsys):
    device = "nonsense" if torch.cuda.is_available() else "cuda"
    assert main(["--device", device, "--data-dir", str(data_dir)]) == 2
    one_error_line(capsys.readouterr().err)


def test_a_study_subset_the_search_would_refuse_fails_before_timing(data_dir, capsys):
    assert main(["--quick", "--study", "2x1", "--study-subset", "50001", "--data-dir", str(data_dir)]) == 2
    captured = capsys.readouterr()
    assert "50,000" in one_error_line(captured.err)
    assert "timing" not in captured.out


def test_unwritable_json_path_fails_before_timing(data_dir, tmp_path, capsys):
    assert main(["--quick", "--data-dir", str(data_dir), "--json", str(tmp_path / "no" / "b.json")]) == 2
    captured = capsys.readouterr()
    assert "no such directory" in one_error_line(captured.err)
    assert "timing" not in captured.out
