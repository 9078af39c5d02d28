"""Rebuild a stored trial through the search's own code path, retrain it with its stored seed, and
compare the replayed validation score with the stored one; test accuracy is reported per epoch.

    python -m nas.replay                      # the best trial of studies/mnist-8k.db
    python -m nas.replay --trial 7 --full-train

In a two-objective (accuracy, params) study, --trial picks any trial of the Pareto front; without
it, the front's most accurate trial is replayed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial
from torch import nn

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, fail
from nas.cpu import tune_allocator
from nas.data.resize import resized_split
from nas.errors import NasError
from nas.model import summary_table
from nas.run.record import BATCHNORM_PATHS
from nas.spec import count_params
from nas.storage import default_url
from nas.study.stored import (DEFAULT_STUDY, config_from_study, open_study, open_study_data, pick_trial,
                              replay_setup)
from nas.study.trials import epochs_to_target, front_note, is_multi_objective, score
from nas.train import EpochResult, epoch_line, evaluate, train
from nas.train.checkpoint import checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial", type=int, help="trial number (default: the best completed trial; "
                        "in a two-objective study, the most accurate of the Pareto front)")
    parser.add_argument("--study", default=DEFAULT_STUDY, help=f"study name (default {DEFAULT_STUDY})")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--full-train", action="store_true",
                        help="retrain on all 60,000 training images and report the test set only")
    parser.add_argument("--seed", type=int, help="train with this seed instead of the stored one, to see "
                        "how much a result owes to its seed (the stored value is then not expected back)")
    parser.add_argument("--out", type=Path, help="where to save the model (default runs/<study>-trial<N>.pt)")
    parser.add_argument("--device", default=None, help="default: the device the trial ran on, if present")
    parser.add_argument("--batchnorm", choices=BATCHNORM_PATHS,
                        help="run BatchNorm on this path instead of the stored one (then not bit for bit)")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def score_lines(trial: FrozenTrial, accuracies: list[float], test_acc: list[float], score_epochs: int,
                full_train: bool) -> list[str]:
    """The replay's verdict: the replayed validation score against the stored one, and test accuracy."""
    replayed = score(accuracies, score_epochs)
    if full_train:
        return [f"Full-train test accuracy, mean of last {score_epochs} epochs: {replayed:.2f}%"]
    stored = trial.user_attrs.get("fp32_score", trial.values[0])  # an int8-scored study keeps its fp32 score too
    return [f"Validation score (mean of last {score_epochs} epochs): stored {stored:.4f}, replayed {replayed:.4f}, "
            f"difference {replayed - stored:+.4f}" + (" (identical)" if replayed == stored else ""),
            f"Test accuracy, mean of last {score_epochs} epochs: {score(test_acc, score_epochs):.2f}% "
            f"(best {max(test_acc):.2f}%, holds >= 99.4% from epoch {epochs_to_target(test_acc) or '-'})"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_url = args.storage or default_url(args.study)
    try:
        study = open_study(storage_url, args.study)
        trial = pick_trial(study, args.trial)
        config = config_from_study(study)
        arch, train_config, run = replay_setup(trial, config, args.seed, args.device, args.batchnorm, args.full_train)
        device = torch.device(run.device)
        root = data.resolve_data_dir(args.data_dir)
        source = open_study_data(study, root, not args.quiet, notify=lambda line: print(line, file=sys.stderr))
        # at the input side the trial drew (nas.data.resize), where the study searched it
        split = resized_split(source.split("test" if args.full_train else "valid", run.subset, device), arch.input_size)
        test = resized_split(source.split("test", None, device), arch.input_size)
    except NasError as exc:
        return fail(exc)

    tune_allocator()
    if run.threads:  # the search worker's thread count: CPU reductions, and so results, depend on it
        torch.set_num_threads(run.threads)
    if is_multi_objective(study):
        print(front_note(study, trial, picked=args.trial is None))
    print(f"Replaying trial {trial.number} of study {study.study_name!r}: {run.describe()}, "
          f"seed {train_config.seed}" + (" (not the stored seed)" if args.seed is not None else ""))
    print(summary_table(arch))
    test_acc: list[float] = []

    def report(result: EpochResult, model: nn.Module) -> None:
        print(epoch_line(result, split.eval_name))
        if not args.full_train:
            _, correct = evaluate(model, test.eval_x, test.eval_y, test.normalize)
            test_acc.append(100.0 * correct / len(test.eval_y))
            print(f"Test set: Accuracy: {correct}/{len(test.eval_y)} ({test_acc[-1]:.2f}%)")
        if not args.quiet:
            print()

    result = train(arch, train_config, split, run, on_epoch=report, progress=not args.quiet)
    accuracies = [e.eval_acc for e in result.history]
    if args.full_train:
        test_acc = accuracies
    print("\n".join(score_lines(trial, accuracies, test_acc, config.score_epochs, args.full_train)))
    suffix = ("-full" if args.full_train else "") + ("" if args.seed is None else f"-seed{args.seed}")
    out = args.out or Path("runs") / f"{study.study_name}-trial{trial.number}{suffix}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint(arch, train_config, run, result.model,
                          {"study": study.study_name, "trial": trial.number, "params": count_params(arch),
                           "eval_acc": accuracies, "test_acc": test_acc}), out)
    print(f"Saved model (state_dict + spec + training config) to {out}")
    return 0

