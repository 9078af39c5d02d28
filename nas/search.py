"""The main job: an Optuna study over architectures and training settings under a parameter budget.

    python -m nas.search --trials 50

`--trials` is the study's total: finished (completed or pruned) trained trials, counting those of
earlier runs, so rerunning the same command after an interruption resumes and tops the study up.
Over-budget candidates are never trained and never counted; they are reported apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from nas import data
from nas.cli import ArgumentParser, positive_int
from nas.config import ConfigError, StudyConfig, load_study_config
from nas.space import params_for, params_of, suggest
from nas.spec import PRESETS, ArchSpec, SpecError, TrainConfig, count_params, layer_string, receptive_field
from nas.storage.outage import lost_to_a_peer
from nas.storage import StorageError, artifact_dir_for, default_url, open_storage
from nas.summary import summary_table
from nas.export import ExportError, load_export, trial_from_dict
from nas.run import BATCHNORM_PATHS, RUN_ATTR, RunRecord
from nas.cpu import PRECISIONS, resolve_precision, tune_allocator
from nas.train import DivergedError, EpochResult, epoch_line, resolve_device, resolve_run, train
from nas.trials import (checkpoint, config_from_study, epochs_to_target, finished_trials, is_multi_objective,
                        results_table, score, trial_counts)
from nas.workers import ProgressBar, StopAtTarget, resolve_workers, run_workers, workers_arg

DEFAULT_STUDY_FILE = Path("studies/mnist-8k.toml")

@dataclass(frozen=True)
class RunOptions:
    """What one search run was asked for on the command line, beyond the study file."""

    storage: str
    study: str
    trials: int
    epochs: int
    subset: int | None
    seed: int
    device: str
    data_dir: str
    timeout: float | None = None
    quiet: bool = False
    threads: int | None = None
    worker: int = 0
    precision: str = "auto"  # resolved per trial by nas.cpu.choose_setup
    compile: bool = False
    ema: bool = True  # evaluate and keep the moving average of the weights (nas.train.WeightAverage)
    batchnorm: str = "pytorch"  # or "native": nas's C BatchNorm kernel (nas.cpu), opt-in
    artifact_dir: str | None = None  # None: beside the SQLite/journal file, else studies/artifacts


# --- sampler and pruner -------------------------------------------------------------------------


RUNG_STEP = 0  # the rung's score is the trial's intermediate value at step 0; epochs are steps 1..N


def make_pruner(config: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if config.pruner == "rung":
        return RungPruner(config.rung.keep, config.rung.startup)
    return optuna.pruners.NopPruner()


def rung_pays(config: StudyConfig, epochs: int, train_images: int) -> bool:
    """Whether the study's rung is cheaper than the full training it screens for (it is not in a
    quick look such as --epochs 1 --subset 256): where it is not, trials skip it and train in full."""
    rung = config.rung
    return rung.epochs * min(rung.subset, train_images) < epochs * train_images


class RungPruner(optuna.pruners.BasePruner):
    """Prunes at the cheap first rung (step RUNG_STEP) a trial whose rung score is not within the
    top `keep` share of the rung scores of every trial that ran the rung, whatever became of it
    (completed, pruned there, still training); the first `startup` trials always go on. It never
    prunes during full training. Optuna's own pruners don't fit a rung that is a separate, cheaper
    run: Median and Percentile compare against completed trials only, so the bar would rise with
    each promotion, and successive halving's rungs sit at steps >= 1 of the same run."""

    def __init__(self, keep: float, startup: int):
        self.keep, self.startup = keep, startup

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if trial.last_step != RUNG_STEP:
            return False
        others = [t.intermediate_values[RUNG_STEP] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and RUNG_STEP in t.intermediate_values]
        if len(others) < self.startup:
            return False
        better = sum(score > trial.intermediate_values[RUNG_STEP] for score in others)
        return better >= self.keep * (len(others) + 1)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, its random draws seeded by (seed, trial number).

    Every process that joins a study (a scaled compose worker, a worker on another machine, a rerun
    that resumes) starts its own sampler. Seeded once per process they would all draw the same
    candidates in the same order, and the random startup trials would repeat across processes.
    Trial numbers are unique within a study, so each trial gets its own draws, and the same study
    history gives the same ones."""

    def __init__(self, seed: int, **tpe_options: Any):
        self.seed, self.tpe_options = seed, tpe_options
        self.number: int | None = None  # the trial self.tpe was made for
        self.tpe: optuna.samplers.TPESampler | None = None

    def for_trial(self, number: int) -> optuna.samplers.TPESampler:
        if self.tpe is None or number != self.number:
            seed = (self.seed * 1_000_003 + number) % 2**32
            with warnings.catch_warnings():
                # multivariate, group and constant_liar are marked experimental; they are chosen.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.tpe = optuna.samplers.TPESampler(seed=seed, **self.tpe_options)
            self.number = number
        return self.tpe

    def infer_relative_search_space(self, study, trial):
        return self.for_trial(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.for_trial(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.for_trial(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.for_trial(trial.number).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.for_trial(trial.number).after_trial(study, trial, state, values)


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar keeps parallel workers from sampling the same point while trials run.
    return TrialSeededSampler(seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=10)


# --- the objective ------------------------------------------------------------------------------


class Objective:
    def __init__(self, config: StudyConfig, options: RunOptions, split: data.Split, device: torch.device,
                 artifact_dir: Path | None):
        self.config, self.options, self.split, self.device = config, options, split, device
        self.artifact_dir = artifact_dir
        self.multi = len(config.objectives) > 1
        self.nested = False  # True while a study bar is drawn above the epoch bars (run_worker)
        resolve_precision(options.precision, device)  # fails here, not in the first trial

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        arch, train_config = suggest(trial, self.config.space, self.options.epochs, self.options.seed,
                                     budget=self.config.budget)
        try:
            params = count_params(arch)
        except SpecError as exc:
            return self.reject(trial, f"invalid: {exc}", over=1.0)
        trial.set_user_attr("params", params)
        if params >= self.config.budget:
            return self.reject(trial, f"over budget: {params:,} >= {self.config.budget:,}",
                               over=float(params - self.config.budget + 1))
        set_constraint(trial, float(params - self.config.budget + 1))
        trial.set_user_attr("receptive_field", receptive_field(arch))
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("train", train_config.to_dict())
        trial.set_user_attr("worker", self.options.worker)
        run = resolve_run(arch, train_config, self.device, len(self.split.train_x), self.options.precision,
                          self.options.batchnorm, self.options.ema, self.options.compile, self.options.subset)
        trial.set_user_attr(RUN_ATTR, run.to_dict())
        self.say(f"Trial {trial.number}: {params:,} params, {layer_string(arch)}; {train_config.optimizer} "
                 f"lr {train_config.lr:.3g}, batch {train_config.batch_size}, {train_config.scheduler}, "
                 f"augment {train_config.augment:.2f}")
        if self.config.pruner == "rung" and not self.multi and rung_pays(self.config, train_config.epochs,
                                                                            len(self.split.train_x)):
            self.run_rung(trial, arch, train_config, run)
        accuracies: list[float] = []

        def on_epoch(result: EpochResult, model: torch.nn.Module) -> None:
            accuracies.append(result.eval_acc)
            trial.set_user_attr("epoch_acc", accuracies)
            if not self.options.quiet:
                tqdm.write(f"Epoch {result.epoch}: {epoch_line(result, 'valid')}", file=sys.stdout)
            if self.multi:
                return
            trial.report(result.eval_acc, result.epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", result.epoch)
                self.say(f"Trial {trial.number}: pruned after epoch {result.epoch} at {result.eval_acc:.2f}%")
                raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

        try:
            result = train(arch, train_config, self.split, run, on_epoch=on_epoch, progress=not self.options.quiet,
                           nested=self.nested)
        except DivergedError as exc:
            trial.set_user_attr("failed_reason", str(exc))
            self.say(f"Trial {trial.number}: stopped, {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        value = score(accuracies, self.config.score_epochs)
        last = min(self.config.score_epochs, len(accuracies))
        self.say(f"Trial {trial.number}: {value:.2f}% validation (mean of the last {last} "
                 f"epoch{'s' if last > 1 else ''}), {result.seconds:.0f} s")
        trial.set_user_attr("best_epoch", max(range(len(accuracies)), key=accuracies.__getitem__) + 1)
        trial.set_user_attr("epochs_to_99_4", epochs_to_target(accuracies))
        trial.set_user_attr("train_seconds", round(result.seconds, 2))
        self.save_weights(trial, arch, train_config, run, result.model)
        save_layer_note(trial, arch, train_config)
        return (value, float(params)) if self.multi else value

    def run_rung(self, trial: optuna.Trial, arch: ArchSpec, train_config: TrainConfig, run: RunRecord) -> None:
        """The cheap first rung (config.rung): a short run on the first images, scored on the
        validation split and reported at step RUNG_STEP; the pruner decides whether full training follows."""
        rung = self.config.rung
        short = dataclasses.replace(train_config, epochs=rung.epochs)
        split = self.split.head(rung.subset)
        try:
            result = train(arch, short, split, run, progress=not self.options.quiet, nested=self.nested)
            value = result.history[-1].eval_acc
        except DivergedError:
            value = 0.0
        trial.set_user_attr("rung_acc", value)
        trial.report(value, RUNG_STEP)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", RUNG_STEP)
            self.say(f"Trial {trial.number}: stopped at the rung, {value:.2f}% validation after {rung.epochs} "
                     f"epochs on {len(split.train_x):,} images")
            raise optuna.TrialPruned("not among the rung's best")
        self.say(f"Trial {trial.number}: rung {value:.2f}% validation, moves on to full training")

    def reject(self, trial: optuna.Trial, reason: str, over: float) -> Any:
        """Never train it, but tell the sampler how far out it was (Optuna's constraints)."""
        trial.set_user_attr("rejected", reason)
        set_constraint(trial, over)
        self.say(f"Trial {trial.number}: rejected, {reason} (never trained)")
        raise optuna.TrialPruned(reason)

    def say(self, line: str) -> None:
        """One line per trial event, above any progress bars (kept under --quiet)."""
        tqdm.write(line if self.options.worker == 0 else f"[worker {self.options.worker}] {line}", file=sys.stdout)

    def save_weights(self, trial: optuna.Trial, arch: ArchSpec, config: TrainConfig, run: RunRecord,
                     model: torch.nn.Module) -> None:
        if self.artifact_dir is None:
            return
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(self.artifact_dir))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            torch.save(checkpoint(arch, config, run, model, {"trial": trial.number}), path)
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        trial.set_user_attr("weights_artifact", artifact_id)


def set_constraint(trial: optuna.Trial, over: float) -> None:
    """How far over budget the candidate is (<= 0: within), for the sampler. A retried trial
    inherits the value from the trial it retries; Optuna then warns that it keeps the old one,
    which is the same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The constraint value is ignored")
        trial.set_constraint("params_over_budget", over)


def save_layer_note(trial: optuna.Trial, arch: ArchSpec, config: TrainConfig) -> None:
    """The trial's layer table and config as an optuna-dashboard note."""
    from optuna_dashboard import save_note

    body = (
        f"## Trial {trial.number}\n\n```\n{summary_table(arch)}\n```\n\n"
        f"Training config:\n\n```json\n{json.dumps(config.to_dict(), indent=2)}\n```\n"
    )
    save_note(trial, body)


# --- the study ----------------------------------------------------------------------------------


def create_or_load(storage: optuna.storages.BaseStorage, options: RunOptions, config: StudyConfig,
                   enqueue: tuple[str, ...], warm: dict | None = None) -> optuna.Study:
    """Load the study, or create it and enqueue the presets. Creating is atomic in the storage, so
    exactly one of several workers starting together enqueues. With `warm` (a nas.export export),
    its trials that fit this study join the history first, once."""
    sampler = make_sampler(options.seed)
    pruner = make_pruner(config, options.epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=options.study, sampler=sampler,
                                    pruner=pruner, directions=config.directions)
        study.set_user_attr("config", dataclasses.asdict(config))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=options.study, sampler=sampler, pruner=pruner)
        created = False
        if [d.name.lower() for d in study.directions] != config.directions:
            raise ConfigError(
                f"study {options.study!r} exists with objectives for {[d.name.lower() for d in study.directions]}; "
                f"the study file asks for {config.directions}: use another --study name"
            )
        if "config" in study.user_attrs:
            changed = differences(config_from_study(study), config)
            if changed:
                raise ConfigError(
                    f"study {options.study!r} was made from another version of its study file ({'; '.join(changed)}); "
                    "rerun with the file it was made from, or give the new version its own --study name "
                    "(--warm-start from an export of this one carries its trials over)")
    if warm is not None and created:
        added, skipped = warm_start(study, warm, config)
        print(f"Warm start from study {warm['study']!r}: {added} trials added to the history, "
              f"{skipped} skipped (outside this study's budget or space)", file=sys.stderr)
        scaled = enqueue_scaled(study, warm, config)
        if scaled:
            print(f"Warm start: the shapes of its best trials that do not fit ({', '.join(map(str, scaled))}) "
                  "are queued, scaled to this budget", file=sys.stderr)
    enqueue_presets(study, config, enqueue, fresh=created)
    return study


def differences(stored: StudyConfig, wanted: StudyConfig) -> list[str]:
    """What a study file changes in the description a study stored when it was made: everything
    that decides which trials it holds and how they are scored (its name and presets aside, and the
    [rung] table unless either uses the rung)."""
    def values(config: StudyConfig) -> dict[str, Any]:
        flat = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.name in ("name", "enqueue") or f.name == "rung" and "rung" not in (stored.pruner, wanted.pruner):
                continue
            if dataclasses.is_dataclass(value):
                flat.update({f"{f.name}.{k}": tuple(v) if isinstance(v, list) else v
                             for k, v in dataclasses.asdict(value).items()})
            else:
                flat[f.name] = tuple(value) if isinstance(value, list) else value
        return flat

    old, new = values(stored), values(wanted)
    return [f"{key}: {old.get(key)!r} stored, {new.get(key)!r} in the file" for key in new if old.get(key) != new.get(key)]


def warm_start(study: optuna.Study, export: dict, config: StudyConfig) -> tuple[int, int]:
    """Adds the exported trials whose architecture and training config this study's space can
    express within its budget, re-expressed in this space's params and distributions (a study of
    another space version or budget words the same net differently), so the sampler starts from
    them. They are marked `warm_start` and do not count toward --trials. Returns (added, skipped)."""
    scratch = optuna.create_study(directions=config.directions)  # in memory: records this space's distributions
    added = []
    for exported in export["trials"]:
        stored = trial_from_dict(exported)
        rebuilt = _reexpress(scratch, stored, config)
        if rebuilt is None or len(stored.values or ()) not in (0, len(config.directions)):
            continue
        added.append(optuna.trial.create_trial(
            state=stored.state, values=stored.values, params=rebuilt.params, distributions=rebuilt.distributions,
            intermediate_values=stored.intermediate_values,
            user_attrs={**stored.user_attrs, "warm_start": export["study"]}))
    study.add_trials(added)
    return len(added), len(export["trials"]) - len(added)


def enqueue_scaled(study: optuna.Study, export: dict, config: StudyConfig, top: int = 3) -> list[int]:
    """Queues the shapes of the export's `top` best finished trials that are over this study's
    budget, scaled to it, and returns their numbers. A version-2 space words widths as shares of
    the budget, so a trial's params rebuild its net narrower (or wider) under another budget, with
    the same depth, proportions and training config. Between version-2 spaces of one objective
    only; a params set this space cannot take as it is (a value out of its ranges) is passed over."""
    exported = export.get("user_attrs", {}).get("config", {}).get("space", {})
    if config.space.version != 2 or exported.get("version") != 2 or len(config.directions) != 1:
        return []
    over = []
    for t in map(trial_from_dict, export["trials"]):
        if (t.state == TrialState.COMPLETE and len(t.values or ()) == 1 and "arch" in t.user_attrs
                and count_params(ArchSpec.from_dict(t.user_attrs["arch"])) >= config.budget):
            over.append(t)
    over.sort(key=lambda t: t.values[0], reverse=config.directions[0] == "maximize")
    scratch = optuna.create_study(directions=config.directions)
    chosen = []
    for t in over:
        if len(chosen) == top:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a value outside this space's ranges
                scratch.enqueue_trial(t.params)
                probe = scratch.ask()
                arch, _ = suggest(probe, config.space, config.epochs, 0, budget=config.budget)
        except (UserWarning, ValueError, SpecError):
            continue
        finally:
            for running in scratch.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                scratch.tell(running.number, state=TrialState.FAIL)
        if probe.params != t.params or count_params(arch) >= config.budget:
            continue
        number = t.user_attrs["exported_number"]
        study.enqueue_trial(t.params, user_attrs={"scaled_from": f"{export['study']}#{number}"}, skip_if_exists=True)
        chosen.append(number)
    return chosen


def _reexpress(scratch: optuna.Study, stored: FrozenTrial, config: StudyConfig) -> optuna.Trial | None:
    """A trial of `scratch` whose params make this study's space rebuild `stored`'s architecture
    and training config (epochs and seed aside) within the budget, or None."""
    if "arch" not in stored.user_attrs or "train" not in stored.user_attrs:
        return None
    arch, train_config = ArchSpec.from_dict(stored.user_attrs["arch"]), TrainConfig.from_dict(stored.user_attrs["train"])
    if count_params(arch) >= config.budget:
        return None
    for params in (stored.params, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a value outside this space's ranges
            try:
                params = params if params is not None else params_of(arch, train_config, config.space, config.budget)
                scratch.enqueue_trial(params)
                trial = scratch.ask()
                got_arch, got_train = suggest(trial, config.space, train_config.epochs, train_config.seed,
                                              budget=config.budget)
            except (UserWarning, ValueError, SpecError):
                continue
            finally:
                for running in scratch.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    scratch.tell(running.number, state=TrialState.FAIL)
        if got_arch == arch and got_train == train_config and set(trial.params) == set(params):
            return trial
    return None


def enqueue_presets(study: optuna.Study, config: StudyConfig, names: tuple[str, ...], fresh: bool) -> None:
    """Run each named preset once per study. A preset whose trial failed (interrupted) is queued
    again; one whose trial is waiting, running, finished or was retried is not."""
    trials = study.get_trials(deepcopy=False)
    if not fresh and not trials:
        return  # another worker created the study a moment ago and is enqueueing
    present = {t.user_attrs.get("preset") for t in trials if t.state != TrialState.FAIL}
    for name in names:
        if name in present:
            continue
        preset = PRESETS[name]
        with warnings.catch_warnings():
            # FixedTrial only warns when a value lies outside its distribution's range.
            warnings.simplefilter("error", UserWarning)
            try:
                params = params_for(preset, config.space, config.budget)
                arch, train_config = suggest(optuna.trial.FixedTrial(params), config.space, preset.train.epochs, 0,
                                             budget=config.budget)
            except (UserWarning, ValueError, SpecError):
                arch, train_config = None, None
        if arch != preset.arch or dataclasses.replace(train_config, epochs=preset.train.epochs) != preset.train:
            print(f"note: {name} lies outside this study's search space; not enqueued", file=sys.stderr)
            continue
        study.enqueue_trial(params, user_attrs={"preset": name})


def artifact_dir(options: RunOptions) -> Path:
    return Path(options.artifact_dir) if options.artifact_dir else artifact_dir_for(options.storage)


def run_worker(options: RunOptions, config: StudyConfig, split: data.Split | None = None) -> None:
    """One process's share of the search: trials until the study holds options.trials."""
    tune_allocator()
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    if split is None:
        split = load_split(options, device)
    storage = open_storage(options.storage, wait=True)  # its command has just reached it
    study = optuna.load_study(storage=storage, study_name=options.study,
                              sampler=make_sampler(options.seed),
                              pruner=make_pruner(config, options.epochs))
    remaining = options.trials - len(finished_trials(study))
    if remaining <= 0:
        return
    objective = Objective(config, options, split, device, artifact_dir(options))
    callbacks: list = [StopAtTarget(options.trials)]
    bar = None
    if options.worker == 0 and not options.quiet and options.threads is None:
        bar = ProgressBar(study, options.trials, disable=False)
        callbacks.append(bar)
        objective.nested = True
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    try:
        while len(finished_trials(study)) < options.trials:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                study.optimize(objective, timeout=timeout, callbacks=callbacks, catch=(), gc_after_trial=False)
                break
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, AssertionError) as exc:
                if not lost_to_a_peer(exc):
                    raise
                print(f"worker {options.worker}: a peer failed this worker's trial as stale while the storage "
                      "was unreachable, and queued its retry; this result is dropped", file=sys.stderr, flush=True)
    finally:
        if bar:
            bar.close()


def load_split(options: RunOptions, device: torch.device) -> data.Split:
    root = Path(options.data_dir)
    return data.make_split(data.load_mnist(root), "valid", options.subset, device)


def quiet_optuna() -> None:
    # Optuna logs an interrupted trial as a warning with a traceback; the end-of-run summary
    # counts failed and interrupted trials instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _worker_entry(options: RunOptions, config: StudyConfig, worker: int, threads: int) -> None:
    """One spawned worker process (nas.workers.run_workers)."""
    # tqdm's default lock is a multiprocessing semaphore that no one releases at exit, and the
    # resource tracker then warns of a leak; bars in one process need only a thread lock.
    tqdm.set_lock(threading.RLock())
    quiet_optuna()
    try:
        run_worker(dataclasses.replace(options, worker=worker, threads=threads, quiet=True), config)
    except KeyboardInterrupt:
        sys.exit(130)


# --- reporting ----------------------------------------------------------------------------------


def summary_lines(study: optuna.Study, storage_url: str) -> list[str]:
    counts = trial_counts(study)
    lines = [f"Study {study.study_name!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
    replay = f"python -m nas.replay --storage {storage_url} --study {study.study_name}"
    if is_multi_objective(study):
        lines += ["Pareto front (validation accuracy up, params down), most accurate first:", ""]
    lines += [results_table(study), ""]
    dashboard = f"optuna-dashboard {storage_url}"
    dashboard += f" --artifact-dir {artifact_dir_for(storage_url)}"
    lines.append(f"Browse it:  {dashboard}")
    if is_multi_objective(study):
        lines.append(f"Replay a trial of the front:  {replay} --trial N   (no --trial: its most accurate)")
    else:
        lines.append(f"Replay the best trial:  {replay}")
        confirm = f"python -m nas.confirm --storage {storage_url} --study {study.study_name}"
        lines.append(f"Confirm the top 3 against Model 3 over 3 seeds:  {confirm}")
    return lines


# --- command line -------------------------------------------------------------------------------


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
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=workers_arg, default=1,
                        help="trial processes sharing the study, or auto: one single-thread worker per CPU "
                        "core on CPU (measured 1.25-1.5x the trials/hour of one worker using all cores), "
                        "1 on CUDA (the best N there is not measured yet)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: on CUDA bf16 where supported; on CPU whichever of fp32 and native bf16 "
                        "measures faster for each architecture")
    parser.add_argument("--compile", action="store_true", help="torch.compile each trial's model")
    parser.add_argument("--batchnorm", default="pytorch", choices=BATCHNORM_PATHS,
                        help="native: BatchNorm+ReLU in nas's C kernel on CPU (opt-in; needs a C compiler)")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="evaluate and keep the weights after the last step, not their moving average")
    parser.add_argument("--artifact-dir", help="where trial weights go, shared by all workers "
                        "(default: artifacts/ beside a SQLite or journal file, else studies/artifacts)")
    parser.add_argument("--warm-start", type=Path, metavar="EXPORT.json",
                        help="start a new study from a nas.export file: its trials that fit this study's budget "
                        "and space join the history (they do not count toward --trials)")
    parser.add_argument("--enqueue-all", action="store_true", help="also run the seed's Models 1 and 2 first")
    parser.add_argument("--data-dir", help="MNIST directory (default: $NAS_DATA_DIR or data/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def resolve_config(path: Path | None) -> StudyConfig:
    if path is not None:
        return load_study_config(path)
    if DEFAULT_STUDY_FILE.is_file():
        return load_study_config(DEFAULT_STUDY_FILE)
    return StudyConfig()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_optuna()
    try:
        config = resolve_config(args.study_file)
        device = resolve_device(args.device)
        args.workers = resolve_workers(args.workers, device)
        name = args.study or config.name
        storage_url = args.storage or default_url(name)
        if args.storage is None:
            Path("studies").mkdir(exist_ok=True)
        options = RunOptions(storage=storage_url, study=name, trials=args.trials, epochs=args.epochs or config.epochs,
                             subset=args.subset, seed=args.seed, device=args.device,
                             data_dir=str(data.resolve_data_dir(args.data_dir)), timeout=args.timeout,
                             quiet=args.quiet, precision=args.precision, compile=args.compile,
                             ema=args.ema, batchnorm=args.batchnorm, artifact_dir=args.artifact_dir)
        data.prepare(Path(options.data_dir), progress=not args.quiet)
        # With several workers each loads its own split; this one only checks --subset, on the CPU,
        # so that the watching process holds no GPU memory.
        split = load_split(options, device if args.workers == 1 else torch.device("cpu"))
        storage = open_storage(storage_url)
        enqueue = tuple(dict.fromkeys(config.enqueue + (("model1", "model2") if args.enqueue_all else ())))
        warm = load_export(args.warm_start) if args.warm_start else None
        study = create_or_load(storage, options, config, enqueue, warm)
    except (ConfigError, StorageError, data.DataError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = len(finished_trials(study))
    if config.pruner == "rung" and not rung_pays(config, options.epochs, len(split.train_x)):
        print(f"note: the rung ({config.rung.epochs} epochs on up to {config.rung.subset:,} images) costs as much as "
              f"a whole trial here ({options.epochs} epoch{'s' * (options.epochs > 1)} on {len(split.train_x):,}); "
              "trials skip it and train in full", file=sys.stderr)
    if not args.quiet:
        print(f"Study {name!r} in {storage_url}: {done} of {args.trials} trials finished; "
              f"budget < {config.budget:,} params, {options.epochs} epochs, {device}"
              + (f", {args.workers} workers" if args.workers > 1 else ""))
    code = 0
    try:
        if args.workers > 1:
            del split
            code = run_workers(functools.partial(_worker_entry, options, config), args.workers, study, args.trials,
                               args.quiet)
        else:
            run_worker(options, config, split)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(finished_trials(study))} finished trials are stored; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(study, storage_url)))
    return code


if __name__ == "__main__":
    sys.exit(main())
