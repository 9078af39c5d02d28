"""Finalists confirmed over seeds: the study's top trials and Model 3, each re-trained with fresh
seeds, so that the winner is picked on more than one run's luck (python -m nas.confirm).

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

import datetime
import functools
import json
import math
import queue
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from nas import data
from nas.cpu import cpu_model, tune_allocator
from nas.data.resize import resize_images, resized_split
from nas.errors import NasError
from nas.run.record import RunRecord
from nas.spec import PRESETS, ArchSpec, Shape, SpecError, TrainConfig, count_params
from nas.study.stored import (BASELINE, DATA_ATTR, config_from_study, confirm_key, confirmed_best, open_study,
                              rebuild, stored_run)
from nas.study.trials import epochs_to_target, ranked_trials, score
from nas.studyfile import StudyConfig
from nas.train import train
from nas.train.setup import RunSettings, resolve_run
from nas.workers import SPAWN, run_processes

RESULTS_FORMAT = "nas-confirm-results"  # the "format" of a results file (write_results)

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


class ConfirmError(NasError):
    """A study that cannot be confirmed as asked."""


@dataclass(frozen=True)
class ConfirmPlan:
    """What a confirm was asked for: which candidates, how many seeds, on which split and fidelity."""

    storage: str
    study: str
    top: int = 3  # the best trials to confirm, unless `trials` names them
    trials: tuple[int, ...] | None = None
    seeds: int = 3  # runs per candidate, seeds 1..seeds
    epochs: int | None = None  # None: each trial's own
    subset: int | None = None  # None: as the search trained (with `test`: all training images)
    test: bool = False  # train on all training images and score on the test set
    device: str | None = None  # None: the device each trial ran on, where it exists here
    data_dir: str = "data"
    quiet: bool = False
    int8: bool = False  # also each run's accuracy as an int8 ONNX model (nas.deployment)

    @property
    def prefix(self) -> str:
        """The prefix of the study user attributes that hold its runs (confirm_key)."""
        return "confirm-test" if self.test else "confirm"


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
        shape = data_shape(study, best.arch.shape)
        arch = replace(preset.arch, in_channels=shape.channels, input_size=shape.size, num_classes=shape.classes)
        try:
            fits = count_params(arch) < config.budget
        except SpecError:
            fits = False
        if fits:  # else the study's data is too small for it, or too wide: no baseline
            chosen.append(Candidate(BASELINE, arch, replace(preset.train, epochs=best.train.epochs),
                                    replace(best.run, batchnorm="pytorch"), None))
    return chosen


def data_shape(study: optuna.Study, fallback: Shape) -> Shape:
    """The shape of the study's data as it stored it (a trial's may be resized: [space] image_sizes)."""
    stored = study.user_attrs.get(DATA_ATTR)
    return Shape(stored["shape"][0], stored["shape"][1], len(stored["classes"])) if stored else fallback


def leaderboard(candidates: list[Candidate], results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: each candidate's mean ± std over seeds and its paired difference to Model 3."""
    base = {r["seed"]: r["score"] for r in results.get(BASELINE, [])}
    int8 = any("int8_acc" in r for runs in results.values() for r in runs)
    rows = ["| candidate | params | seeds | score mean ± std | vs Model 3 (paired, 95%) | beats Model 3 |"
            + (" fp32 final | int8 final | int8 − fp32 | TFLM int8 |" if int8 else ""),
            "|:--|--:|--:|--:|--:|:--|" + ("--:|--:|--:|--:|" if int8 else "")]
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
        row = f"| {c.label} | {count_params(c.arch):,} | {len(runs)} | {mean} | {versus} | {beats} |"
        if int8:
            row += int8_cells(runs)
        rows.append(row)
    return rows


def int8_cells(runs: list[dict]) -> str:
    """The final weights' ONNX Runtime accuracy, fp32 and int8, and the int8 .tflite's in TFLM, mean
    over the runs that measured it."""
    measured = [r for r in runs if "int8_acc" in r]
    if not measured:
        return " - | - | - | - |"
    fp32 = statistics.mean(r["onnx_fp32_acc"] for r in measured)
    int8 = statistics.mean(r["int8_acc"] for r in measured)
    tflm = [r["tflm_int8_acc"] for r in measured if r.get("tflm_int8_acc") is not None]
    return f" {fp32:.3f} | {int8:.3f} | {int8 - fp32:+.3f} | " + (f"{statistics.mean(tflm):.3f} |" if tflm else "- |")


def chosen_numbers(study: optuna.Study, plan: ConfirmPlan) -> tuple[list[int] | None, str]:
    """The trials to confirm besides Model 3, and why: plan.trials; for a test confirm the trial
    that the validation confirm found best; else None (the top plan.top)."""
    if plan.trials:
        return list(plan.trials), ""
    if plan.test and confirmed_best(study) is not None:
        return [confirmed_best(study)], " (the best of its validation confirm)"
    return None, ""


def candidates_of(study: optuna.Study, plan: ConfirmPlan) -> list[Candidate]:
    numbers, _ = chosen_numbers(study, plan)
    return pick_candidates(study, config_from_study(study), plan.top, plan.device, numbers)


def settings_for(candidate: Candidate, seed: int, plan: ConfirmPlan) -> tuple[RunRecord, TrainConfig]:
    # a test confirm trains on all training images unless plan.subset says otherwise (a quick look)
    subset = plan.subset if plan.test else (plan.subset or candidate.run.subset)
    run = replace(candidate.run, seed=seed, subset=subset)
    return run, replace(candidate.train, seed=seed, epochs=plan.epochs or candidate.train.epochs)


def tflm_available() -> bool:
    from nas.tflm import available

    return available()


def stored_run_of(study: optuna.Study, candidate: Candidate, seed: int, plan: ConfirmPlan) -> dict | None:
    """The stored run of this candidate and seed, if one was trained with these epochs and subset."""
    run, config = settings_for(candidate, seed, plan)
    stored = study.user_attrs.get(confirm_key(plan.prefix, candidate.label, seed))
    if stored is None or stored["epochs"] != config.epochs or stored["subset"] != run.subset:
        return None
    if plan.int8 and ("int8_acc" not in stored or "tflm_int8_acc" not in stored and tflm_available()):
        return None  # stored without its int8 accuracies: the weights are gone, so it trains again
    return stored


def run_and_store(study: optuna.Study, candidate: Candidate, seed: int, *, plan: ConfirmPlan, source: data.Data,
                  splits: dict, score_epochs: int, threads: int | None, progress: bool) -> dict:
    run, config = settings_for(candidate, seed, plan)
    # threads: this process's share of the CPU, whatever the trial's worker had (None: all of it)
    stored = confirm_one(candidate, config, replace(run, threads=threads), source=source, test=plan.test,
                         splits=splits, score_epochs=score_epochs, progress=progress, int8=plan.int8)
    study.set_user_attr(confirm_key(plan.prefix, candidate.label, seed), stored)
    return stored


def run_line(stored: dict, test: bool, score_epochs: int, who: str = "") -> str:
    last = min(score_epochs, stored["epochs"])
    tflm = f", TFLM int8 {stored['tflm_int8_acc']:.2f}%" if stored.get("tflm_int8_acc") is not None else ""
    int8 = (f"; int8 {stored['int8_acc']:.2f}%{tflm} against fp32 {stored['onnx_fp32_acc']:.2f}%, final weights"
            if "int8_acc" in stored else "")
    return (f"{who}{stored['candidate']} seed {stored['seed']}: {stored['score']:.3f}% "
            f"({'test' if test else 'validation'}, mean of the last {last} epoch{'s' * (last > 1)}){int8}")


def confirm(study: optuna.Study, plan: ConfirmPlan, candidates: list[Candidate], source: data.Data, workers: int,
            say: Callable[[str], None]) -> tuple[optuna.Study, dict[str, list[dict]]]:
    """Every candidate's run for every seed: read back where stored, else trained and stored, in
    this process or shared out to `workers` spawned ones. `say` hears one line per run. Returns the
    study as read back after the runs and the runs by candidate label. A worker that fails ends it
    with ConfirmError; the runs finished so far stay stored."""
    seeds = range(1, plan.seeds + 1)
    config = config_from_study(study)
    todo = [(c.label, seed) for c in candidates for seed in seeds if stored_run_of(study, c, seed, plan) is None]
    if workers > 1 and len(todo) > 1:
        run_in_workers(plan, todo, min(workers, len(todo)), len(candidates) * len(seeds))
        study = open_study(plan.storage, plan.study)
    results: dict[str, list[dict]] = {c.label: [] for c in candidates}
    splits: dict = {}
    for candidate in candidates:
        for seed in seeds:
            stored = stored_run_of(study, candidate, seed, plan)
            if stored is None:
                stored = run_and_store(study, candidate, seed, plan=plan, source=source, splits=splits,
                                       score_epochs=config.score_epochs, threads=None, progress=not plan.quiet)
            results[candidate.label].append(stored)
            say(run_line(stored, plan.test, config.score_epochs))
    return study, results


def run_in_workers(plan: ConfirmPlan, todo: list[tuple[str, int]], workers: int, total: int) -> None:
    """The runs `todo` shared out to `workers` spawned processes (nas.workers), each storing its
    runs in the study as it finishes them; a bar counts the stored runs."""
    jobs = SPAWN.Queue()
    for job in todo:
        jobs.put(job)
    bar = tqdm(total=total, initial=total - len(todo), desc="Runs", unit="run", disable=plan.quiet, file=sys.stdout,
               dynamic_ncols=True)
    study = open_study(plan.storage, plan.study)

    def watch() -> None:
        attrs = study.user_attrs  # read from the storage each time
        bar.n = total - sum(1 for label, seed in todo if confirm_key(plan.prefix, label, seed) not in attrs)
        bar.refresh()

    try:
        failed = run_processes(functools.partial(_worker_entry, plan, jobs), workers, watch=watch, every=5.0)
    finally:
        bar.close()
    if failed:
        raise ConfirmError(f"{'; '.join(failed)}; finished runs are stored, rerun the same command to resume")


def _worker_entry(plan: ConfirmPlan, jobs, worker: int, threads: int) -> None:
    """One spawned confirm worker: takes (candidate, seed) runs off the queue until it is empty."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_allocator()
    torch.set_num_threads(threads)
    study = open_study(plan.storage, plan.study)
    config = config_from_study(study)
    by_label = {c.label: c for c in candidates_of(study, plan)}
    source = data.open_data(config.data, Path(plan.data_dir))
    splits: dict = {}
    try:
        while True:
            try:
                label, seed = jobs.get(timeout=1)
            except queue.Empty:
                return
            # the parent's bar counts runs; no epoch bars
            stored = run_and_store(study, by_label[label], seed, plan=plan, source=source, splits=splits,
                                   score_epochs=config.score_epochs, threads=threads, progress=False)
            print(run_line(stored, plan.test, config.score_epochs, who=f"[worker {worker}] "), flush=True)
    except KeyboardInterrupt:
        sys.exit(130)


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


def write_results(path: Path, study: optuna.Study, candidates: list[Candidate], results: dict[str, list[dict]], *,
                  title: str, rows: list[str], test: bool) -> None:
    """The confirm runs as a small JSON file to commit: the winner (the study trial with the best
    mean score, Model 3 aside) on top as "arch" and "train", so `nas.train --model` reads it, then
    every candidate, best first, with its runs per seed."""
    def summary(c: Candidate) -> dict:
        runs = [{"seed": r["seed"], "score": r["score"], "eval_acc": r["eval_acc"],
                 "best_epoch": max(range(len(r["eval_acc"])), key=r["eval_acc"].__getitem__) + 1,
                 "best_acc": max(r["eval_acc"]), "epochs_to_99_4": epochs_to_target(r["eval_acc"]),
                 "run": r["run"], **{k: r[k] for k in ("onnx_fp32_acc", "int8_acc", "tflm_int8_acc") if k in r}}
                for r in results[c.label]]
        scores = [r["score"] for r in runs]
        return {"label": c.label, "trial": c.trial.number if c.trial else None, "params": count_params(c.arch),
                "arch": c.arch.to_dict(), "train": c.train.to_dict(), "score_mean": statistics.mean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else None, "runs": runs}

    summaries = sorted((summary(c) for c in candidates), key=lambda s: -s["score_mean"])
    winner = winner_of(summaries)
    body = {"format": RESULTS_FORMAT, "study": study.study_name, "cpu": cpu_model(),
            "date": datetime.date.today().isoformat(),
            "evaluated_on": "test (trained on all 60,000 training images)" if test else "validation",
            "score": "mean of the last score_epochs epochs", "winner": winner["label"],
            "arch": winner["arch"], "train": winner["train"], "leaderboard": [title, *rows],
            "candidates": summaries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")


def confirm_one(candidate: Candidate, config: TrainConfig, run: RunRecord, *, source: data.Data, test: bool,
                splits: dict, score_epochs: int, progress: bool, int8: bool = False) -> dict:
    device = torch.device(run.device)
    which = ("test", run.subset) if test else ("valid", run.subset)
    size = candidate.arch.input_size  # the side the trial drew, where the study searched it (nas.data.resize)
    if (which, run.device, size) not in splits:
        splits[(which, run.device, size)] = resized_split(source.split(which[0], which[1], device), size)
    if run.threads:
        torch.set_num_threads(run.threads)
    if candidate.trial is None:  # Model 3 from its preset: set up for this machine
        settings = RunSettings(device=run.device, precision=run.precision, batchnorm=run.batchnorm,
                               compile=run.compiled, ema=run.weight_average)
        run = resolve_run(candidate.arch, config, settings, device, len(splits[(which, run.device, size)].train_x),
                          run.subset)
    split = splits[(which, run.device, size)]
    result = train(candidate.arch, config, split, run, progress=progress)
    accuracies = [e.eval_acc for e in result.history]
    stored = {"candidate": candidate.label, "trial": candidate.trial.number if candidate.trial else None,
              "seed": config.seed, "epochs": config.epochs, "subset": run.subset, "split": which[0],
              "eval_acc": accuracies, "score": score(accuracies, score_epochs), "run": run.to_dict()}
    if int8:  # the final weights as nas.deploy ships them: ONNX Runtime fp32 and int8, calibrated on training
        # images, and the int8 .tflite in TensorFlow Lite Micro (where tflite-micro is installed)
        from nas.deployment import int8_accuracy, tflm_accuracy

        stored["onnx_fp32_acc"], stored["int8_acc"] = int8_accuracy(result.model, split.mean, split.std,
                                                                    resize_images(source.train_x, size), split.eval_x,
                                                                    split.eval_y)
        tflm = tflm_accuracy(result.model, split.mean, split.std, resize_images(source.train_x, size), split.eval_x,
                             split.eval_y)
        if tflm is not None:
            stored["tflm_int8_acc"] = tflm
    return stored


def save_note(study: optuna.Study, title: str, rows: list[str]) -> None:
    from optuna_dashboard import save_note

    save_note(study, f"## {title}\n\n" + "\n".join(rows) + "\n\nRuns: the study's `confirm:*` user attributes.\n")




def recorded_run(path: Path, seed: int, label: str | None = None) -> tuple[str, ArchSpec, TrainConfig, RunRecord] | None:
    """From a confirm results file (write_results): the candidate `label` (default: the winner),
    its spec and training config, and the run record its run with `seed` trained with, so that
    `nas.train` trains that run again. None where `path` is not a results file or holds no run of
    that seed; ConfirmError where it has no such candidate."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("format") != RESULTS_FORMAT:
        return None
    label = label or body["winner"]
    candidate = _candidate(path, body, label)
    runs = [r for r in candidate["runs"] if r["seed"] == seed]
    if not runs:
        return None
    arch, train_config = ArchSpec.from_dict(candidate["arch"]), TrainConfig.from_dict(candidate["train"])
    return label, arch, replace(train_config, seed=seed), RunRecord.from_dict(runs[0]["run"])


def results_candidate(path: Path, label: str) -> tuple[ArchSpec, TrainConfig]:
    """The spec and training config of candidate `label` of the results file `path` (a seed it
    has no run of: trained afresh); ConfirmError where `path` is no results file or lacks it."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        body = None
    if not isinstance(body, dict) or body.get("format") != RESULTS_FORMAT:
        raise ConfirmError(f"--candidate {label} needs a nas.confirm results file as --model; {path} is none")
    candidate = _candidate(path, body, label)
    return ArchSpec.from_dict(candidate["arch"]), TrainConfig.from_dict(candidate["train"])


def _candidate(path: Path, body: dict, label: str) -> dict:
    found = [c for c in body["candidates"] if c["label"] == label]
    if not found:
        raise ConfirmError(f"{path} has no candidate {label!r}; it holds "
                           f"{', '.join(c['label'] for c in body['candidates'])}")
    return found[0]
