"""Which multi-fidelity scheme finds good nets soonest: a benchmark of the study file's pruners.

    python -m nas.fidelity compare --minutes 14          # 3 schemes x 3 sampler seeds, then the figure
    python -m nas.fidelity plot                          # redraw the figure and table from the results

Each run is a search of the default study scaled to fit a small machine (--subset images, --epochs
epochs; the rung on its first --rung-subset images), on one CPU core, for --minutes of wall clock,
with no preset enqueued, so what it measures is how soon each scheme finds on its own. Two runs go
at a time, one per core. Anytime performance is the best validation score among completed trials
against the seconds since the run started. The rank job (run by compare too) trains --archs
random candidates, the seed's Model 3 first, at both the rung's and full fidelity and reports how
well the rung ranks them (Spearman and Kendall). Results go to one JSON file (each finished job is
kept, so a rerun only runs what is missing) and a PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, error, fail, non_negative_int, positive_int
from nas.errors import NasError
from nas.experiments.fidelity import (FIGURE, RESULTS, SCHEMES, WORK_DIR, FidelityError, Plan, Scale, compare, draw,
                                      load_results, table_lines)
from nas.studyfile import resolve_study_file


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.fidelity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="run the schemes and the rank job, then table and figure")
    c.add_argument("--schemes", nargs="+", choices=SCHEMES + ("none",), default=list(SCHEMES))
    c.add_argument("--repeats", type=positive_int, default=3, help="sampler seeds 1..N per scheme")
    c.add_argument("--minutes", type=float, default=14.0, help="wall clock per run")
    c.add_argument("--archs", type=non_negative_int, default=12, help="architectures of the rank job (0: none)")
    c.add_argument("--parallel", type=positive_int, default=2, help="runs at a time, each pinned to one core")
    c.add_argument("--work-dir", type=Path, default=WORK_DIR, help="the runs' databases and logs")
    c.add_argument("--out", type=Path, default=RESULTS)
    c.add_argument("--figure", type=Path, default=FIGURE)
    c.add_argument("--subset", type=positive_int, default=Scale.subset, help="full fidelity: training images")
    c.add_argument("--epochs", type=positive_int, default=Scale.epochs, help="full fidelity: epochs")
    c.add_argument("--rung-subset", type=positive_int, default=Scale.rung_subset, help="the rung's images")
    c.add_argument("--rung-epochs", type=positive_int, default=Scale.rung_epochs, help="the rung's epochs")
    add_data_dir(c)
    p = sub.add_parser("plot", help="table and figure from the results file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figure", type=Path, default=FIGURE)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        results = load_results(args.out)
        if not results.get("runs"):
            return fail(FidelityError(f"{args.out} holds no runs; run `python -m nas.fidelity compare` first"))
    else:
        plan = Plan(schemes=tuple(args.schemes), repeats=args.repeats, minutes=args.minutes, archs=args.archs,
                    parallel=args.parallel, work_dir=args.work_dir, data_dir=data.resolve_data_dir(args.data_dir),
                    scale=Scale(args.subset, args.epochs, args.rung_subset, args.rung_epochs))
        command = "python -m nas.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
        try:
            base = resolve_study_file(None)
            results = compare(plan, base, args.out, command, progress=lambda line: print(line, flush=True),
                              problem=error)
        except NasError as exc:
            return fail(exc)
        except KeyboardInterrupt:
            print(f"\ninterrupted: the finished jobs are kept in {args.out}; rerun to run the rest", file=sys.stderr)
            return 130
    print("\n".join(table_lines(results)))
    draw(results, args.figure)
    print(f"figure: {args.figure}")
    return 0
