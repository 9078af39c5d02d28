"""Time one Model 3 training epoch in our pipeline and in the seed study's DataLoader pipeline.

    python -m nas.bench --quick --repeats 3                # the ratio: our Model 3 epoch / the seed-style one
    python -m nas.bench --quick --concurrency 1,2          # + N Model 3 trainings at once
    python -m nas.bench --study 10x15 --study-workers 2    # + a real 10-trial, 15-epoch study

How each is measured: nas/experiments/bench.py.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from nas import data
from nas.cli.args import (ArgumentParser, add_data_dir, add_run_flags, fail, non_negative_int, positive_int,
                          run_settings)
from nas.cpu import tune_allocator
from nas.errors import NasError, UsageError
from nas.experiments.bench import (GPU_CONCURRENCY, GPU_STUDY, MODEL, OURS, QUICK_BATCHES, REPEATS, SEED_STYLE,
                                   WARMUP_BATCHES, StudySize, fastest, format_concurrency, format_profile,
                                   format_study, format_table, header_lines, loader_workers, machine_info,
                                   machine_line, ours_process, parse_concurrency, prepare, profile_ours, ratio_line,
                                   report, resolve_ours, setup_record, time_concurrent, time_pipelines, time_study,
                                   write_report)
from nas.spec import PRESETS
from nas.train.setup import resolve_run


def concurrency_list(text: str) -> list[int]:
    try:
        return parse_concurrency(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def study_size(text: str) -> StudySize:
    try:
        return StudySize.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m nas.bench",
        description=f"Time one {MODEL} training epoch in our pipeline and in the seed study's DataLoader pipeline.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="time --batches batches per pipeline and extrapolate to a full epoch")
    parser.add_argument("--batches", type=positive_int, default=QUICK_BATCHES,
                        help=f"batches timed per pipeline and per concurrent training with --quick "
                        f"(default {QUICK_BATCHES})")
    parser.add_argument("--warmup", type=positive_int, default=WARMUP_BATCHES,
                        help=f"untimed batches each pipeline runs first (default {WARMUP_BATCHES})")
    parser.add_argument("--repeats", type=positive_int, default=REPEATS,
                        help="timed runs per pipeline, alternating which goes first; the fastest counts "
                        f"(default {REPEATS})")
    parser.add_argument("--workers", type=non_negative_int,
                        help="seed-style DataLoader workers (default: the seed's, 2 on CUDA, 0 otherwise)")
    add_data_dir(parser)
    parser.add_argument("--concurrency", type=concurrency_list,
                        help="also time N Model 3 trainings at once for each N in this list, e.g. 1,2,4,8 "
                        "(aggregate images/s: what N search workers get from the machine; "
                        f"default {','.join(map(str, GPU_CONCURRENCY))} on CUDA, none on CPU)")
    parser.add_argument("--study", type=study_size, metavar="TRIALSxEPOCHS",
                        help="also time a fresh `nas.search` study of this size, e.g. 10x15 "
                        f"(default {GPU_STUDY} on CUDA without --quick, none on CPU)")
    parser.add_argument("--study-workers", type=positive_int, default=1,
                        help="the study's --workers (default 1)")
    parser.add_argument("--study-subset", type=positive_int, help="the study's --subset: train on the first N images")
    parser.add_argument("--profile", action="store_true",
                        help="instead: where a Model 3 epoch's time goes, --batches batches under torch.profiler")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    # Our pipeline trains as these ask; the seed-style one always runs fp32 NCHW, as the seed did.
    add_run_flags(parser)
    return parser


def profile(settings, inputs, batches: int, machine: dict) -> int:
    """Print where a short Model 3 epoch's time goes (nas.experiments.bench.profile_ours)."""
    tune_allocator()
    split = data.make_split(data.load_mnist(inputs.data_dir), "test", None, inputs.device)
    preset = PRESETS[MODEL]
    run = resolve_run(preset.arch, preset.train, settings, inputs.device, len(split.train_x))
    print(f"{MODEL}, {batches} batches of {preset.train.batch_size} under torch.profiler: {run.describe()}", flush=True)
    wall, groups = profile_ours(split, run, batches)
    print(format_profile(wall, groups, batches))
    print(f"\n{machine_line(machine)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and not args.json.parent.is_dir():
        # Checked now rather than after minutes of timing.
        return fail(UsageError(f"{args.json}: no such directory {args.json.parent}"))
    settings = run_settings(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        inputs = prepare(settings, data.resolve_data_dir(args.data_dir), quick=args.quick, batches=args.batches,
                         warmup=args.warmup, concurrency=args.concurrency, study=args.study,
                         study_subset=args.study_subset)
    except NasError as exc:
        return fail(exc)
    machine = machine_info(inputs.device)
    loader = loader_workers(inputs.device) if args.workers is None else args.workers
    if args.profile:
        return profile(settings, inputs, args.batches, machine)
    with ours_process(torch.get_num_threads()) as ours:
        run = resolve_ours(ours, settings, inputs)
        print("\n".join(header_lines(run, inputs, loader, args.repeats)), flush=True)
        runs = time_pipelines(ours, run, inputs, args.repeats, loader)
    best = fastest(runs)
    print(format_table([best[SEED_STYLE], best[OURS]]))
    results = report(machine, setup_record(run, inputs, args.quick, args.repeats, loader), runs)
    print(ratio_line(results["ratio"]))
    try:
        if inputs.concurrency:
            print(f"\n{MODEL} trainings at once, {inputs.images:,} images each, released together ...", flush=True)
            # Each trains as the ratio's run did, in the precision it measured there.
            together = replace(settings, precision=run.precision)
            results["concurrency"] = [time_concurrent(n, inputs.device, inputs.images, inputs.warmup, together,
                                                      inputs.data_dir) for n in inputs.concurrency]
            print(format_concurrency(results["concurrency"]))
        if inputs.study:
            study = inputs.study
            subset = "all" if args.study_subset is None else f"{args.study_subset:,}"
            print(f"\nstudy {study}: {study.trials} trials of {study.epochs} epochs each on {subset} training images, "
                  f"{args.study_workers} worker(s), fresh journal storage ...", flush=True)
            results["study"] = time_study(study, args.study_workers, inputs.device, settings.precision,
                                          inputs.data_dir, args.study_subset)
            print(format_study(results["study"]))
    except NasError as exc:  # BenchError: a timed run failed, after the table above was printed
        return fail(exc, status=1)
    print(f"\n{machine_line(machine)}")
    if args.json:
        try:
            write_report(results, args.json)
        except NasError as exc:
            return fail(exc, status=1)
    return 0
