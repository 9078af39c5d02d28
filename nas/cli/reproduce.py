"""Retrain the seed study's Models 1-3 with their documented configs over several seeds and set our
test-set figures beside the seed's logged ones: a Markdown table, a PNG of the curves, raw JSON.

    python -m nas.reproduce                               # 3 models x 3 seeds x 15 epochs
    python -m nas.reproduce --models m3 --seeds 5 --out runs/model3

The seed's headline (99.52%) is the best of 15 test evaluations of one run; the table shows that
statistic for us too, but also what holds: the mean of the last 3 epochs, over seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, add_run_flags, fail, positive_int, run_settings
from nas.cpu import tune_allocator
from nas.errors import NasError, UsageError
from nas.experiments.reproduce import (DEFAULT_OUT, Run, Settings, model_label, parse_models,
                                       resolve_setups, results_table, run_line, run_preset, setup_text,
                                       write_outputs)
from nas.spec import PRESETS
from nas.train import DivergedError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(PRESETS),
                        help="comma-separated presets, model1,model2,model3 or m1,m2,m3 (default all three)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per model (default 3)")
    parser.add_argument("--epochs", type=positive_int, help="override the presets' 15 epochs (quick checks)")
    parser.add_argument("--subset", type=positive_int, help="train on the first N training images (quick checks)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_flags(parser)  # --no-ema evaluates the last step's weights, as the seed did
    return parser


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    settings = run_settings(args)
    try:
        models = parse_models(args.models)
        device = settings.resolve_device()  # an impossible device or precision fails before the data
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file, not a directory")
        root = data.resolve_data_dir(args.data_dir)
        data.prepare(root, progress=not args.quiet, notify=lambda line: print(line, file=sys.stderr))
        split = data.make_split(data.load_mnist(root), "test", args.subset, device)
    except NasError as exc:
        return fail(exc)
    tune_allocator()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    setups = resolve_setups(models, settings, device, len(split.train_x), args.epochs, args.subset)
    described = Settings(models, tuple(range(args.seeds)), args.epochs, args.subset, str(device),
                             setup_text(setups, settings.ema), torch.get_num_threads(), torch.__version__)
    runs: list[Run] = []
    code = 0
    try:
        for i, (name, seed) in enumerate((m, s) for m in models for s in described.seeds):
            if not args.quiet:
                print(f"\n== {model_label(name)}, seed {seed} ({i + 1} of {len(models) * args.seeds}) ==")
            run = run_preset(name, seed, split, args.epochs, setups[name], progress=not args.quiet)
            runs.append(run)
            print(run_line(run), flush=True)
    except DivergedError as exc:  # a result to report, after the runs that finished
        code = fail(exc, status=1)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(runs)} finished runs", file=sys.stderr)
        code = 130
    if not runs:
        return code
    try:
        written = write_outputs(runs, described, args.out)
    except NasError as exc:
        return fail(exc)
    print()
    print(results_table(runs, described))
    print()
    print("Wrote " + ", ".join(str(p) for p in written))
    return code
