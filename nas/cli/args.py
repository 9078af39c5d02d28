"""What the commands share: the parser whose mistakes are one line, number types, the run flags
declared once, and the one-line error."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from nas.run.device import PRECISIONS
from nas.run.record import BATCHNORM_PATHS
from nas.train.setup import RunSettings


class ArgumentParser(argparse.ArgumentParser):
    """A user's mistake on the command line is one `error:` line and exit status 2;
    argparse's own would print the whole usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def workers_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """How to train: the flags every training command shares, read back by run_settings."""
    group = parser.add_argument_group("how to train")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: on CUDA bf16 where supported; on CPU whichever of fp32 and native bf16 "
                       "measures faster for each architecture")
    group.add_argument("--threads", type=positive_int,
                       help="torch threads per training process (default: every core, or the worker's share)")
    group.add_argument("--batchnorm", default="pytorch", choices=BATCHNORM_PATHS,
                       help="native: BatchNorm+ReLU in nas's C kernel on CPU (opt-in; needs a C compiler)")
    group.add_argument("--compile", action="store_true", help="torch.compile each model (costs seconds up front)")
    group.add_argument("--no-ema", dest="ema", action="store_false",
                       help="evaluate and keep the weights after the last step, not their moving average")


def run_settings(args: argparse.Namespace) -> RunSettings:
    return RunSettings(device=args.device, precision=args.precision, batchnorm=args.batchnorm,
                       compile=args.compile, ema=args.ema, threads=args.threads)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="where MNIST, the torchvision sets and the decoded-folder cache live "
                        "(default: $NAS_DATA_DIR or data/)")


def first_line(exc: BaseException) -> str:
    """An exception as the one line a user sees: its first line, or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def error(message: str, status: int = 2) -> int:
    """Print one `error:` line on stderr and return the exit status to end with."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def fail(exc: BaseException, status: int = 2) -> int:
    """`exc` as one `error:` line (its first line) on stderr; returns the exit status to end with."""
    return error(first_line(exc), status)
