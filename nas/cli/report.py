"""Figures and an index page for a stored study: optimization history, parameter importances,
per-epoch values (what the pruner saw), and validation accuracy against size with the Pareto front.

    python -m nas.report                                  # studies/mnist-8k.db -> runs/report/mnist-8k/
    python -m nas.report --study mo --storage sqlite:///studies/mo.db --out reports/mo

Only trained trials carry an accuracy: rejected candidates (over budget or shape-invalid, never
trained) and pruned trials (stopped early, no final score) are counted but not plotted as results.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from nas.cli.args import ArgumentParser, fail, positive_int
from nas.errors import NasError
from nas.storage import default_url
from nas.study.report import write_report
from nas.study.stored import DEFAULT_STUDY, open_study
from nas.study.trials import ranked_trials


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help=f"study name (default: the storage's only study, else {DEFAULT_STUDY})")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/report/<study>)")
    parser.add_argument("--top", type=positive_int, default=10, help="trials in the top table (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    # Before Optuna's plots import pyplot: files only, no display needed (or opened) on a server.
    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = args.storage or default_url(args.study or DEFAULT_STUDY)
    try:
        study = open_study(url, args.study)
        out = args.out or Path("runs") / "report" / study.study_name
        written = write_report(study, url, out, args.top)
    except NasError as exc:
        return fail(exc)
    print(f"Report on study {study.study_name!r} ({len(ranked_trials(study))} completed trials):")
    for path in written:
        print(f"  {path}")
    return 0
