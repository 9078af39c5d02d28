"""python -m nas.train: train a preset or spec file on MNIST, reporting test accuracy per epoch and,
at the end, the score the results tables use: the mean of the last 3 epochs.

A nas.confirm results file (--out) as --model trains its winner (or --candidate), and where the file
holds a run of that --seed, trains it as that run was trained (precision, memory format, threads,
BatchNorm path, weight average): the command a results table's row gives to reproduce it."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, add_run_flags, fail, positive_int, run_settings
from nas.cpu import tune_allocator
from nas.run.setup import resolve_run
from nas.spec import PRESETS, SpecError, TrainConfig, count_params, load_arch
from nas.study.confirm import ConfirmError, recorded_run
from nas.study.trials import score
from nas.studyfile import ConfigError, load_study_config
from nas.train import DivergedError, EpochResult, epoch_line, train

SCORE_EPOCHS = 3  # as every study file and results table: the mean of the last 3 epochs


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.train",
                            description="Train a preset or spec file and report test accuracy (on MNIST, or "
                            "the data of --study-file).")
    parser.add_argument("--model", default="model3", help="model1, model2, model3 or a spec JSON file "
                        "(a nas.confirm results file trains its winner)")
    parser.add_argument("--candidate", metavar="LABEL", help="with a results file as --model: train this "
                        "candidate (e.g. model3, trial147) instead of its winner")
    parser.add_argument("--epochs", type=positive_int, help="override the preset's epochs")
    parser.add_argument("--subset", type=positive_int, help="train on the first N training images")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--study-file", type=Path, help="train on this study file's [data] (default MNIST); "
                        "a preset's input and classifier are made to fit it")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = run_settings(args)
    try:
        recorded = recorded_run(Path(args.model), args.seed, args.candidate)
        if recorded is not None:
            label, arch, config, run = recorded
            settings = replace(settings, device=run.device, precision=run.precision, threads=run.threads)
        else:
            arch, config = load_arch(args.model)
        device = settings.resolve_device()  # an impossible device or precision fails before the data
        data_config = load_study_config(args.study_file).data if args.study_file else data.DataConfig()
        root = data.resolve_data_dir(args.data_dir)
        source = data.open_data(data_config, root, progress=not args.quiet,
                                notify=lambda line: print(line, file=sys.stderr))
        split = source.split("test", args.subset, device)
        if args.model in PRESETS:
            arch = replace(arch, in_channels=split.shape.channels, input_size=split.shape.size,
                           num_classes=split.shape.classes)
            count_params(arch)  # SpecError where the data's images are too small for it
        elif arch.shape != split.shape:
            raise SpecError(f"{args.model} is made for {arch.in_channels}x{arch.input_size}x{arch.input_size} inputs "
                            f"and {arch.num_classes} classes; the data is {source.describe()}")
    except (SpecError, ConfirmError, ConfigError, ValueError, data.DataError) as exc:
        return fail(exc)
    tune_allocator()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if recorded is not None:
        name = f"{args.model} ({label}, trained as its seed-{args.seed} run was)"
        if args.epochs:
            config = replace(config, epochs=args.epochs)
        run = replace(run, subset=args.subset)
    else:
        name = args.model
        config = replace(config or TrainConfig(), seed=args.seed)
        if args.epochs:
            config = replace(config, epochs=args.epochs)
        run = resolve_run(arch, config, settings, device, len(split.train_x), args.subset)
    print(f"{name}: {count_params(arch):,} params, {config.epochs} epochs, seed {config.seed}, {run.describe()}")

    def report(result: EpochResult, model: nn.Module) -> None:
        print(epoch_line(result, split.eval_name), flush=True)

    try:
        result = train(arch, config, split, run, on_epoch=report, progress=not args.quiet)
    except DivergedError as exc:
        return fail(exc, status=1)
    accuracies = [e.eval_acc for e in result.history]
    last = min(SCORE_EPOCHS, len(accuracies))
    print(f"Test accuracy, mean of the last {last} epoch{'s' * (last > 1)}: {score(accuracies, SCORE_EPOCHS):.3f}% "
          f"(best {max(accuracies):.2f}% at epoch {accuracies.index(max(accuracies)) + 1})")
    return 0
