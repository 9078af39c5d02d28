"""python -m nas.space --sample N: what a study file's search space draws, without training."""

from __future__ import annotations

from pathlib import Path

import optuna

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, fail, non_negative_int, positive_int
from nas.errors import NasError
from nas.space import draw, sample_report
from nas.studyfile import DEFAULT_STUDY_FILE, KNOWN_SHAPES, check_fits, load_study_config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.space",
                            description="Draw candidates from a study file's search space, without training.")
    parser.add_argument("--sample", type=positive_int, required=True, metavar="N", help="candidates to draw")
    parser.add_argument("--study-file", type=Path, default=DEFAULT_STUDY_FILE,
                        help=f"the study whose space and budget to draw from (default {DEFAULT_STUDY_FILE})")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the RandomSampler's seed (default 0)")
    add_data_dir(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_study_config(args.study_file)
        # A folder's or an npz's shape is known once it is read (a folder's decoding is cached).
        shape = KNOWN_SHAPES.get(config.data.dataset) or \
            data.open_data(config.data, data.resolve_data_dir(args.data_dir)).shape
        check_fits(config, shape, str(args.study_file))
    except NasError as exc:
        return fail(exc)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = draw(config.space, config.limits, args.sample, args.seed, shape)
    print(f"{args.sample} candidates from {args.study_file} (space version {config.space.version}, "
          f"budget {config.budget:,}, {shape.channels}x{shape.size}x{shape.size} inputs, {shape.classes} classes), "
          f"drawn by Optuna's RandomSampler (seed {args.seed}), none trained:")
    print("\n".join(sample_report(archs, config.limits, ops=config.space.version >= 3)))
    return 0
