"""A study's finished trials as a small JSON file that can be committed, and back: the study
outlives its database file, a lost database is rebuilt from it, and a new study starts from it.

    python -m nas.export --out studies/results/mnist-8k.json
    python -m nas.export --restore studies/results/mnist-8k.json --storage sqlite:///studies/mnist-8k.db

The file holds the study's config and directions, and for each completed or pruned trial its
params with their distributions, values, intermediate values, user attributes (the run record,
accuracies per epoch, confirm results) and times. Rejected candidates (never trained) are counted,
not listed; failed and running trials are left out and counted.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from nas.cli.args import ArgumentParser, fail
from nas.errors import NasError
from nas.storage import default_url, open_storage
from nas.study.export import export_study, load_export, restore, write_export
from nas.study.stored import DEFAULT_STUDY, open_study


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help=f"study name (default {DEFAULT_STUDY}; with --restore: the exported one's)")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="write the export to this JSON file")
    what.add_argument("--restore", type=Path, help="rebuild a study from this export into --storage")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if args.restore:
            export = load_export(args.restore)
            name = args.study or export["study"]
            url = args.storage or default_url(name)
            restore(export, open_storage(url), name)
            print(f"Restored study {name!r} into {url}: {len(export['trials'])} trials")
            return 0
        name = args.study or DEFAULT_STUDY
        export = export_study(open_study(args.storage or default_url(name), name))
        write_export(export, args.out)
    except NasError as exc:
        return fail(exc)
    left = ", ".join(f"{n} {k}" for k, n in export["left_out"].items()) or "none"
    print(f"Exported {len(export['trials'])} finished trials of study {name!r} to {args.out} (left out: {left})")
    return 0
