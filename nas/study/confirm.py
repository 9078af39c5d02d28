"""Finalists confirmed over seeds: the study's top trials and Model 3, each re-trained with fresh
seeds, so that the winner is picked on more than one run's luck.

    python -m nas.confirm                 # top 3 and Model 3, 3 seeds each, on validation
    python -m nas.confirm --test          # the same on all 60,000 training images, scored on test

Each run trains a trial again through the search's own code path (its stored params through the
space function, its stored run record) with seed 1, 2, ..., on the search's split and fidelity: the
trial's epochs and training subset, scored on the validation split as the search scored it. A
finished run is stored in the study as a user attribute (`confirm:<candidate>:seed<N>`, or
`confirm-test:...`), so a killed confirm resumes without redoing it; the leaderboard is also
saved as the study's optuna-dashboard note.

Whether a candidate beats Model 3 is a paired comparison over seeds: run k of both uses seed k
(the same data order and augmentation draws), the difference of their scores is taken per seed,
and the candidate beats Model 3 when the two-sided 95% Student-t interval of the mean difference
lies above zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import queue
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from nas import data
from nas.cli import ArgumentParser, non_negative_int, positive_int
from nas.config import StudyConfig
from nas.spec import PRESETS, ArchSpec, TrainConfig, count_params
from nas.storage import StorageError, default_url
from nas.cpu import cpu_model, tune_allocator
from nas.train import DivergedError, resolve_run, train
from nas.run import RunRecord
from nas.trials import (BASELINE, ReplayError, config_from_study, confirm_key, confirmed_best, epochs_to_target,
                        open_study, ranked_trials, rebuild, score, stored_run)
from nas.workers import available_cpus, resolve_workers, workers_arg

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


class ConfirmError(RuntimeError):
    """A study that cannot be confirmed as asked."""


@dataclass(frozen=True)
class Candidate:
    label: str  # "trial<N>" or "model3"
    arch: ArchSpec
    train: TrainConfig
    run: RunRecord
    trial: FrozenTrial | None  # None: Model 3 trained from its preset (the study never ran it)


def t_quantile(df: int) -> float:
    known = [d for d in T_975 if d <= df]
    return T_975[max(known)] if df < 30 else 1.960


def paired_difference(ours: list[float], theirs: list[float]) -> tuple[float, float] | None:
    """Mean of the per-seed differences and the half-width of its 95% interval; None below 2 pairs."""
    diffs = [a - b for a, b in zip(ours, theirs)]
    if len(diffs) < 2:
        return None
    return statistics.mean(diffs), t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def pick_candidates(study: optuna.Study, config: StudyConfig, top: int, device: str | None,
                    numbers: list[int] | None = None) -> list[Candidate]:
    """The `top` best trials of the study (or the trials `numbers`), then Model 3: its trial where
    the study ran it, else its preset with the study's epochs and the fidelity of the best trial."""
    ranked = [t for t in ranked_trials(study) if t.user_attrs.get("preset") != BASELINE]
    if not ranked:
        raise ConfirmError(f"study {study.study_name!r} has no completed trial to confirm")
    if numbers is not None:
        by_number = {t.number: t for t in ranked}
        missing = [n for n in numbers if n not in by_number]
        if missing:
            raise ConfirmError(f"trial {missing[0]} is not a completed trial of study {study.study_name!r} "
                               "(Model 3 is always confirmed; name other trials)")
        ranked = [by_number[n] for n in dict.fromkeys(numbers)]
        top = len(ranked)
    chosen = []
    for trial in ranked[:top]:
        arch, train_config = rebuild(trial, config)
        chosen.append(Candidate(f"trial{trial.number}", arch, train_config, stored_run(trial, device, None), trial))
    baseline = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("preset") == BASELINE]
    if baseline:
        arch, train_config = rebuild(baseline[0], config)
        chosen.append(Candidate(BASELINE, arch, train_config, stored_run(baseline[0], device, None), baseline[0]))
    else:
        preset = PRESETS[BASELINE]
        best = chosen[0]
        chosen.append(Candidate(BASELINE, preset.arch, replace(preset.train, epochs=best.train.epochs),
                                replace(best.run, batchnorm="pytorch"), None))
    return chosen


def leaderboard(candidates: list[Candidate], results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: each candidate's mean ± std over seeds and its paired difference to Model 3."""
    base = {r["seed"]: r["score"] for r in results.get(BASELINE, [])}
    rows = ["| candidate | params | seeds | score mean ± std | vs Model 3 (paired, 95%) | beats Model 3 |",
            "|:--|--:|--:|--:|--:|:--|"]
    order = sorted(candidates, key=lambda c: -statistics.mean([r["score"] for r in results[c.label]] or [0]))
    for c in order:
        runs = results[c.label]
        scores = [r["score"] for r in runs]
        spread = f" ± {statistics.stdev(scores):.3f}" if len(scores) > 1 else ""
        mean = f"{statistics.mean(scores):.3f}{spread}" if scores else "-"
        versus, beats = "-", "-"
        if c.label != BASELINE:
            paired = [(r["score"], base[r["seed"]]) for r in runs if r["seed"] in base]
            diff = paired_difference([a for a, _ in paired], [b for _, b in paired])
            if diff is not None:
                versus = f"{diff[0]:+.3f} ± {diff[1]:.3f}"
                beats = "yes" if diff[0] - diff[1] > 0 else "no"
        rows.append(f"| {c.label} | {count_params(c.arch):,} | {len(runs)} | {mean} | {versus} | {beats} |")
    return rows


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.confirm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="mnist-8k", help="study name (default mnist-8k)")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--top", type=positive_int, default=3, help="how many of the best trials (default 3)")
    parser.add_argument("--trials", type=non_negative_int, nargs="+", metavar="N",
                        help="confirm these trial numbers (and Model 3) instead of the top; with --test the "
                        "default is the trial its validation confirm found best, where one was run")
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per candidate, seeds 1..S (default 3)")
    parser.add_argument("--epochs", type=positive_int, help="epochs per run (default: each trial's own)")
    parser.add_argument("--subset", type=positive_int, help="train on the first N images (default: as the "
                        "search did; with --test, all of them)")
    parser.add_argument("--test", action="store_true", help="train on all 60,000 training images and score "
                        "on the test set (the final figure; the search never sees the test set)")
    parser.add_argument("--out", type=Path, metavar="F.json",
                        help="also write the results: every candidate's spec, training config and per-seed "
                        "accuracy per epoch, the winner's spec and config on top (python -m nas.train --model F.json "
                        "trains it)")
    parser.add_argument("--device", help="default: the device each trial ran on, where it exists here")
    parser.add_argument("--data-dir", help="MNIST directory (default: $NAS_DATA_DIR or data/)")
    parser.add_argument("--workers", type=workers_arg, default=1,
                        help="runs at a time, the CPUs split between them, or auto: one single-thread run per "
                        "CPU core on CPU (as nas.search --workers), 1 on CUDA")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_url = args.storage or default_url(args.study)
    try:
        study = open_study(storage_url, args.study)
        config = config_from_study(study)
        numbers, why = chosen_numbers(study, args)
        candidates = pick_candidates(study, config, args.top, args.device, numbers)
        root = data.resolve_data_dir(args.data_dir)
        data.prepare(root, progress=not args.quiet)
        mnist = data.load_mnist(root)
        workers = resolve_workers(args.workers, torch.device(candidates[0].run.device))
    except (ConfirmError, ReplayError, StorageError, data.DataError, ValueError, RuntimeError) as exc:
        print(f"error: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 2
    tune_allocator()
    seeds = range(1, args.seeds + 1)
    print(f"Confirming {', '.join(c.label for c in candidates)} of study {args.study!r}{why} over seeds "
          f"{seeds[0]}-{seeds[-1]}, " + ("on all training images, scored on test" if args.test else
                                         "on the search's split, scored on validation")
          + (f", {workers} runs at a time" if workers > 1 else ""), flush=True)
    try:
        todo = [(c.label, seed) for c in candidates for seed in seeds if stored_run_of(study, c, seed, args) is None]
        if workers > 1 and len(todo) > 1:
            code = run_in_workers(args, storage_url, todo, min(workers, len(todo)), len(candidates) * len(seeds))
            if code:
                return code
            study = open_study(storage_url, args.study)
        results: dict[str, list[dict]] = {c.label: [] for c in candidates}
        splits: dict = {}
        for candidate in candidates:
            for seed in seeds:
                stored = stored_run_of(study, candidate, seed, args)
                if stored is None:
                    stored = run_and_store(study, candidate, seed, args, mnist, splits, config.score_epochs, None)
                results[candidate.label].append(stored)
                say_run(stored, args.test, config.score_epochs)
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are stored; rerun the same command to resume", file=sys.stderr)
        return 130
    rows = leaderboard(candidates, results)
    what = "test accuracy, all training images" if args.test else "validation score"
    title = f"Confirmed over seeds {seeds[0]}-{seeds[-1]} ({what}; paired Student-t over seeds against Model 3)"
    print("\n" + title + "\n\n" + "\n".join(rows))
    _save_note(study, title, rows)
    if args.out:
        write_results(args.out, study, candidates, results, title, rows, args.test)
        print(f"results: {args.out}")
    return 0


def chosen_numbers(study: optuna.Study, args) -> tuple[list[int] | None, str]:
    """The trials to confirm besides Model 3, and why: --trials; for --test the trial that the
    validation confirm found best; else None (the top --top)."""
    if args.trials:
        return args.trials, ""
    if args.test and confirmed_best(study) is not None:
        return [confirmed_best(study)], " (the best of its validation confirm)"
    return None, ""


def prefix_of(args) -> str:
    return "confirm-test" if args.test else "confirm"


def run_settings(candidate: Candidate, seed: int, args) -> tuple[RunRecord, TrainConfig]:
    # --test trains on all training images unless --subset says otherwise (a quick look)
    subset = args.subset if args.test else (args.subset or candidate.run.subset)
    run = replace(candidate.run, seed=seed, subset=subset)
    return run, replace(candidate.train, seed=seed, epochs=args.epochs or candidate.train.epochs)


def stored_run_of(study: optuna.Study, candidate: Candidate, seed: int, args) -> dict | None:
    """The stored run of this candidate and seed, if one was trained with these epochs and subset."""
    run, config = run_settings(candidate, seed, args)
    stored = study.user_attrs.get(confirm_key(prefix_of(args), candidate.label, seed))
    if stored is None or stored["epochs"] != config.epochs or stored["subset"] != run.subset:
        return None
    return stored


def run_and_store(study: optuna.Study, candidate: Candidate, seed: int, args, mnist: data.Mnist, splits: dict,
                  score_epochs: int, threads: int | None) -> dict:
    run, config = run_settings(candidate, seed, args)
    # threads: this process's share of the CPU, whatever the trial's worker had (None: all of it)
    stored = confirm_one(candidate, config, replace(run, threads=threads), mnist, args, splits, score_epochs)
    study.set_user_attr(confirm_key(prefix_of(args), candidate.label, seed), stored)
    return stored


def say_run(stored: dict, test: bool, score_epochs: int, who: str = "") -> None:
    last = min(score_epochs, stored["epochs"])
    print(f"{who}{stored['candidate']} seed {stored['seed']}: {stored['score']:.3f}% "
          f"({'test' if test else 'validation'}, mean of the last {last} epoch{'s' * (last > 1)})", flush=True)


def run_in_workers(args, storage_url: str, todo: list[tuple[str, int]], workers: int, total: int) -> int:
    """The runs `todo` shared out to `workers` spawned processes, the CPUs split between them; each
    stores its runs in the study as it finishes them. A bar counts the stored runs."""
    context = multiprocessing.get_context("spawn")
    jobs = context.Queue()
    for job in todo:
        jobs.put(job)
    threads = max(1, available_cpus() // workers)
    procs = [context.Process(target=_worker_entry, args=(args, storage_url, jobs, threads, i)) for i in range(workers)]
    for p in procs:
        p.start()
    bar = tqdm(total=total, initial=total - len(todo), desc="Runs", unit="run", disable=args.quiet, file=sys.stdout,
               dynamic_ncols=True)
    study = open_study(storage_url, args.study)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(5)
            bar.n = total - jobs_left(args, study, todo)
            bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        bar.close()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        print(f"error: confirm worker{'s' * (len(failed) > 1)} {', '.join(map(str, failed))} failed; "
              "finished runs are stored, rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


def jobs_left(args, study: optuna.Study, todo: list[tuple[str, int]]) -> int:
    prefix = prefix_of(args)
    attrs = study.user_attrs  # read from the storage each time
    return sum(1 for label, seed in todo if confirm_key(prefix, label, seed) not in attrs)


def _worker_entry(args, storage_url: str, jobs, threads: int, worker: int) -> None:
    """One spawned confirm worker: takes (candidate, seed) runs off the queue until it is empty."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_allocator()
    torch.set_num_threads(threads)
    study = open_study(storage_url, args.study)
    config = config_from_study(study)
    numbers, _ = chosen_numbers(study, args)
    by_label = {c.label: c for c in pick_candidates(study, config, args.top, args.device, numbers)}
    mnist = data.load_mnist(data.resolve_data_dir(args.data_dir))
    splits: dict = {}
    quiet = replace_namespace(args, quiet=True)  # the parent's bar counts runs; no epoch bars
    try:
        while True:
            try:
                label, seed = jobs.get(timeout=1)
            except queue.Empty:
                return
            stored = run_and_store(study, by_label[label], seed, quiet, mnist, splits, config.score_epochs, threads)
            say_run(stored, args.test, config.score_epochs, who=f"[worker {worker}] ")
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def replace_namespace(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def winner_of(summaries: list[dict]) -> dict:
    """The best-scoring study trial among a results file's candidates (sorted best first). Model 3
    is the yardstick, never the winner: over a smaller budget it is not even a candidate."""
    return next((s for s in summaries if s["trial"] is not None and s["label"] != BASELINE), summaries[0])


def rewinner(path: Path) -> str:
    """Set a results file's winner (and its top-level arch and train) by `winner_of`, from the runs
    it already holds: for files written before the winner rule, once the database is gone."""
    body = json.loads(path.read_text())
    winner = winner_of(sorted(body["candidates"], key=lambda s: -s["score_mean"]))
    body.update(winner=winner["label"], arch=winner["arch"], train=winner["train"])
    path.write_text(json.dumps(body, indent=1) + "\n")
    return winner["label"]


def write_results(path: Path, study: optuna.Study, candidates: list[Candidate], results: dict[str, list[dict]],
                  title: str, rows: list[str], test: bool) -> None:
    """The confirm runs as a small JSON file to commit: the winner (the study trial with the best
    mean score, Model 3 aside) on top as "arch" and "train", so `nas.train --model` reads it, then
    every candidate, best first, with its runs per seed."""
    def summary(c: Candidate) -> dict:
        runs = [{"seed": r["seed"], "score": r["score"], "eval_acc": r["eval_acc"],
                 "best_epoch": max(range(len(r["eval_acc"])), key=r["eval_acc"].__getitem__) + 1,
                 "best_acc": max(r["eval_acc"]), "epochs_to_99_4": epochs_to_target(r["eval_acc"]),
                 "run": r["run"]} for r in results[c.label]]
        scores = [r["score"] for r in runs]
        return {"label": c.label, "trial": c.trial.number if c.trial else None, "params": count_params(c.arch),
                "arch": c.arch.to_dict(), "train": c.train.to_dict(), "score_mean": statistics.mean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else None, "runs": runs}

    summaries = sorted((summary(c) for c in candidates), key=lambda s: -s["score_mean"])
    winner = winner_of(summaries)
    body = {"format": "nas-confirm-results", "study": study.study_name, "cpu": cpu_model(),
            "date": datetime.date.today().isoformat(),
            "evaluated_on": "test (trained on all 60,000 training images)" if test else "validation",
            "score": "mean of the last score_epochs epochs", "winner": winner["label"],
            "arch": winner["arch"], "train": winner["train"], "leaderboard": [title, *rows],
            "candidates": summaries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")


def confirm_one(candidate: Candidate, config: TrainConfig, run: RunRecord, mnist: data.Mnist, args,
                splits: dict, score_epochs: int) -> dict:
    device = torch.device(run.device)
    which = ("test", run.subset) if args.test else ("valid", run.subset)
    if (which, run.device) not in splits:
        splits[(which, run.device)] = data.make_split(mnist, which[0], which[1], device)
    if run.threads:
        torch.set_num_threads(run.threads)
    if candidate.trial is None:  # Model 3 from its preset: set up for this machine
        run = replace(resolve_run(candidate.arch, config, device, len(splits[(which, run.device)].train_x),
                                  run.precision, run.batchnorm, run.weight_average, run.compiled, run.subset),
                      seed=config.seed)
    result = train(candidate.arch, config, splits[(which, run.device)], run, progress=not args.quiet)
    accuracies = [e.eval_acc for e in result.history]
    return {"candidate": candidate.label, "trial": candidate.trial.number if candidate.trial else None,
            "seed": config.seed, "epochs": config.epochs, "subset": run.subset, "split": which[0],
            "eval_acc": accuracies, "score": score(accuracies, score_epochs), "run": run.to_dict()}


def _save_note(study: optuna.Study, title: str, rows: list[str]) -> None:
    from optuna_dashboard import save_note

    save_note(study, f"## {title}\n\n" + "\n".join(rows) + "\n\nRuns: the study's `confirm:*` user attributes.\n")


if __name__ == "__main__":
    sys.exit(main())
