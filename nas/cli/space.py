"""python -m nas.space --sample N: what a study file's search space draws, without training."""

from __future__ import annotations

from pathlib import Path

import optuna

from nas.cli.args import ArgumentParser, fail, non_negative_int, positive_int
from nas.space import draw, sample_report
from nas.studyfile import DEFAULT_STUDY_FILE, ConfigError, load_study_config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.space",
                            description="Draw candidates from a study file's search space, without training.")
    parser.add_argument("--sample", type=positive_int, required=True, metavar="N", help="candidates to draw")
    parser.add_argument("--study-file", type=Path, default=DEFAULT_STUDY_FILE,
                        help=f"the study whose space and budget to draw from (default {DEFAULT_STUDY_FILE})")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the RandomSampler's seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_study_config(args.study_file)
    except ConfigError as exc:
        return fail(exc)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = draw(config.space, config.budget, args.sample, args.seed)
    print(f"{args.sample} candidates from {args.study_file} (space version {config.space.version}, "
          f"budget {config.budget:,}), drawn by Optuna's RandomSampler (seed {args.seed}), none trained:")
    print("\n".join(sample_report(archs, config.budget)))
    return 0
