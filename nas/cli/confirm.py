"""Finalists confirmed over seeds: the study's top trials and Model 3, each re-trained with fresh
seeds, so that the winner is picked on more than one run's luck.

    python -m nas.confirm                 # top 3 and Model 3, 3 seeds each, on validation
    python -m nas.confirm --test          # the same on all 60,000 training images, scored on test

How runs are stored, resumed and compared with Model 3: nas/study/confirm.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, fail, non_negative_int, positive_int, workers_arg
from nas.cpu import tune_allocator
from nas.errors import NasError
from nas.storage import default_url
from nas.study.confirm import (ConfirmPlan, chosen_numbers, confirm, leaderboard, pick_candidates,
                               save_note, write_results)
from nas.study.stored import DEFAULT_STUDY, config_from_study, open_study, open_study_data
from nas.workers import WORKERS_ENV, default_workers, resolve_workers


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.confirm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=DEFAULT_STUDY, help=f"study name (default {DEFAULT_STUDY})")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--top", type=positive_int, default=3, help="how many of the best trials (default 3)")
    parser.add_argument("--trials", type=non_negative_int, nargs="+", metavar="N",
                        help="confirm these trial numbers (and Model 3) instead of the top; with --test the "
                        "default is the trial its validation confirm found best, where one was run")
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per candidate, seeds 1..S (default 3)")
    parser.add_argument("--epochs", type=positive_int, help="epochs per run (default: each trial's own)")
    parser.add_argument("--subset", type=positive_int, help="train on the first N images (default: as the "
                        "search did; with --test, all of them)")
    parser.add_argument("--test", action="store_true", help="train on all 60,000 training images and score "
                        "on the test set (the final figure; the search never sees the test set)")
    parser.add_argument("--out", type=Path, metavar="F.json",
                        help="also write the results: every candidate's spec, training config and per-seed "
                        "accuracy per epoch, the winner's spec and config on top (python -m nas.train --model F.json "
                        "trains it)")
    parser.add_argument("--int8", action="store_true", help="also measure each run's final weights as an int8 "
                        "ONNX model (as nas.deploy ships it); runs stored without it train again")
    parser.add_argument("--device", help="default: the device each trial ran on, where it exists here")
    add_data_dir(parser)
    parser.add_argument("--workers", type=workers_arg, default=default_workers(),
                        help="runs at a time, the CPUs split between them, or auto: one single-thread run per "
                        f"CPU core on CPU, 1 on CUDA (default auto, or ${WORKERS_ENV}, as nas.search)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = data.resolve_data_dir(args.data_dir)
    plan = ConfirmPlan(storage=args.storage or default_url(args.study), study=args.study, top=args.top,
                       trials=tuple(args.trials) if args.trials else None, seeds=args.seeds, epochs=args.epochs,
                       subset=args.subset, test=args.test, device=args.device, data_dir=str(root), quiet=args.quiet,
                       int8=args.int8)
    try:
        study = open_study(plan.storage, plan.study)
        if config_from_study(study).score == "int8":  # a study scored on int8 is confirmed on it too
            plan = replace(plan, int8=True)
        numbers, why = chosen_numbers(study, plan)
        candidates = pick_candidates(study, config_from_study(study), plan.top, plan.device, numbers)
        source = open_study_data(study, root, not args.quiet, notify=lambda line: print(line, file=sys.stderr))
        workers = resolve_workers(args.workers, torch.device(candidates[0].run.device))
    except NasError as exc:
        return fail(exc)
    tune_allocator()
    print(f"Confirming {', '.join(c.label for c in candidates)} of study {plan.study!r}{why} over seeds "
          f"1-{plan.seeds}, " + ("on all training images, scored on test" if plan.test else
                                 "on the search's split, scored on validation")
          + (f", {workers} runs at a time" if workers > 1 else ""), flush=True)
    try:
        study, results = confirm(study, plan, candidates, source, workers, say=lambda line: print(line, flush=True))
    except NasError as exc:
        return fail(exc, status=1)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are stored; rerun the same command to resume", file=sys.stderr)
        return 130
    rows = leaderboard(candidates, results)
    what = "test accuracy, all training images" if plan.test else "validation score"
    title = f"Confirmed over seeds 1-{plan.seeds} ({what}; paired Student-t over seeds against Model 3)"
    print("\n" + title + "\n\n" + "\n".join(rows))
    save_note(study, title, rows)
    if args.out:
        write_results(args.out, study, candidates, results, title=title, rows=rows, test=plan.test)
        print(f"results: {args.out}")
    return 0
