"""python -m nas.train: train a preset or spec file on MNIST, reporting test accuracy per epoch and,
at the end, the score the results tables use: the mean of the last 3 epochs.

A nas.confirm results file (--out) as --model trains its winner (or --candidate), and where the file
holds a run of that --seed, trains it as that run was trained (precision, memory format, threads,
BatchNorm path, weight average): the command a results table's row gives to reproduce it."""

from __future__ import annotations

from torch import nn

from nas.cli.args import ArgumentParser, add_data_dir, add_run_flags, fail, run_settings
from nas.cli.target import add_target_flags, resolve_target
from nas.errors import NasError
from nas.spec import count_params
from nas.study.trials import score
from nas.train import EpochResult, epoch_line, train

SCORE_EPOCHS = 3  # as every study file and results table: the mean of the last 3 epochs


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.train",
                            description="Train a preset or spec file and report test accuracy (on MNIST, or "
                            "the data of --study-file).")
    add_target_flags(parser, "train")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = resolve_target(args, run_settings(args))
    except NasError as exc:
        return fail(exc)
    arch, config, split = target.arch, target.config, target.split
    print(f"{target.name}: {count_params(arch):,} params, {arch.input_size}x{arch.input_size} inputs, "
          f"{config.epochs} epochs, seed {config.seed}, {target.run.describe()}")

    def report(result: EpochResult, model: nn.Module) -> None:
        print(epoch_line(result, split.eval_name), flush=True)

    try:
        result = train(arch, config, split, target.run, on_epoch=report, progress=not args.quiet)
    except NasError as exc:  # DivergedError: the run's result, not a mistake in the command
        return fail(exc, status=1)
    accuracies = [e.eval_acc for e in result.history]
    last = min(SCORE_EPOCHS, len(accuracies))
    print(f"Test accuracy, mean of the last {last} epoch{'s' * (last > 1)}: {score(accuracies, SCORE_EPOCHS):.3f}% "
          f"(best {max(accuracies):.2f}% at epoch {accuracies.index(max(accuracies)) + 1})")
    return 0
