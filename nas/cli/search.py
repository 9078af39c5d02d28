"""The main job: an Optuna study over architectures and training settings under a parameter budget.

    python -m nas.search --trials 50

`--trials` is the study's total: finished (completed or pruned) trained trials, counting those of
earlier runs, so rerunning the same command after an interruption resumes and tops the study up.
Over-budget candidates are never trained and never counted; they are reported apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nas import data
from nas.cli.args import (ArgumentParser, add_data_dir, add_run_flags, error, fail, positive_int, run_settings,
                          workers_arg)
from nas.errors import NasError
from nas.storage import default_url, open_storage
from nas.study.create import create_or_load
from nas.study.export import load_export
from nas.study.objective import SearchOptions
from nas.study.sampling import rung_pays
from nas.study.search import quiet_optuna, run_search, summary_lines
from nas.study.trials import finished_trials
from nas.studyfile import DEFAULT_STUDY_FILE, check_fits, resolve_study_file
from nas.workers import WORKERS_ENV, default_workers, resolve_workers


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=positive_int, default=50,
                        help="total finished trials the study should hold, earlier runs included (default 50)")
    parser.add_argument("--study-file", type=Path, help=f"study description (default {DEFAULT_STUDY_FILE})")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--study", help="study name (default: the study file's name)")
    parser.add_argument("--epochs", type=positive_int, help="epochs per trial (default: the study file's)")
    parser.add_argument("--subset", type=positive_int, help="train on the first N images (quick looks)")
    parser.add_argument("--timeout", type=positive_int, help="stop starting trials after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="training and sampler seed (default 0)")
    parser.add_argument("--workers", type=workers_arg, default=default_workers(),
                        help="trial processes sharing the study, or auto: one single-thread worker per CPU "
                        f"core on CPU, 1 on CUDA (default auto, or ${WORKERS_ENV}; measured in docs/performance.md)")
    parser.add_argument("--artifact-dir", help="where trial weights go, shared by all workers "
                        "(default: artifacts/ beside a SQLite or journal file, else studies/artifacts)")
    parser.add_argument("--warm-start", type=Path, metavar="EXPORT.json",
                        help="start a new study from a nas.export file: its trials that fit this study's budget "
                        "and space join the history (they do not count toward --trials)")
    parser.add_argument("--enqueue-all", action="store_true", help="also run the seed's Models 1 and 2 first")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_optuna()
    try:
        config = resolve_study_file(args.study_file)
        settings = run_settings(args)
        device = settings.resolve_device()
        workers = resolve_workers(args.workers, device)
        name = args.study or config.name
        storage_url = args.storage or default_url(name)
        if args.storage is None:
            Path("studies").mkdir(exist_ok=True)
        options = SearchOptions(storage=storage_url, study=name, trials=args.trials, epochs=args.epochs or config.epochs,
                                subset=args.subset, seed=args.seed, data_dir=str(data.resolve_data_dir(args.data_dir)),
                                run=settings, timeout=args.timeout, quiet=args.quiet, artifact_dir=args.artifact_dir)
        chosen = data.open_data(config.data, Path(options.data_dir), progress=not args.quiet,
                                notify=lambda line: print(line, file=sys.stderr))
        check_fits(config, chosen.shape, str(args.study_file or DEFAULT_STUDY_FILE))
        # With several workers each loads its own split; this one only checks --subset, on the CPU,
        # so that the watching process holds no GPU memory.
        split = chosen.split("valid", options.subset, device if workers == 1 else torch.device("cpu"))
        storage = open_storage(storage_url)
        enqueue = tuple(dict.fromkeys(config.enqueue + (("model1", "model2") if args.enqueue_all else ())))
        warm = load_export(args.warm_start) if args.warm_start else None
        study = create_or_load(storage, name, config, seed=args.seed, epochs=options.epochs, enqueue=enqueue,
                               warm=warm, shape=chosen.shape, identity=chosen.identity(),
                               say=lambda line: print(line, file=sys.stderr))
    except NasError as exc:
        return fail(exc)
    done = len(finished_trials(study))
    if config.pruner == "rung" and not rung_pays(config, options.epochs, len(split.train_x)):
        print(f"note: the rung ({config.rung.epochs} epochs on up to {config.rung.subset:,} images) costs as much as "
              f"a whole trial here ({options.epochs} epoch{'s' * (options.epochs > 1)} on {len(split.train_x):,}); "
              "trials skip it and train in full", file=sys.stderr)
    if not args.quiet:
        print(f"Data: {chosen.describe()}")
        print(f"Study {name!r} in {storage_url}: {done} of {args.trials} trials finished; "
              f"budget < {config.budget:,} params, {options.epochs} epochs, {device}"
              + (f", {workers} workers" if workers > 1 else ""))
    try:
        del chosen
        if workers > 1:
            del split
            split = None
        failed = run_search(options, config, workers, study, split)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(finished_trials(study))} finished trials are stored; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    if failed:
        error("; ".join(failed), status=1)
    print("\n".join(summary_lines(study, storage_url)))
    return 1 if failed else 0
