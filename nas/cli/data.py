"""python -m nas.data: download MNIST if it is missing, and verify its checksums."""

from __future__ import annotations

import sys

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, fail
from nas.errors import NasError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.data",
                            description="Download MNIST if it is missing and verify its checksums.")
    add_data_dir(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = data.resolve_data_dir(args.data_dir)
    try:
        md5s = data.prepare(data_dir, notify=lambda line: print(line, file=sys.stderr))
        mnist = data.load_mnist(data_dir)
    except NasError as exc:
        return fail(exc, status=1)
    counts = {
        data.TRAIN_IMAGES: len(mnist.train_images),
        data.TRAIN_LABELS: len(mnist.train_labels),
        data.TEST_IMAGES: len(mnist.test_images),
        data.TEST_LABELS: len(mnist.test_labels),
    }
    print(f"MNIST in {data.raw_dir(data_dir)}")
    for name, md5 in md5s.items():
        print(f"{name:<24} {counts[name]:>6}  md5 {md5}  ok")
    return 0
