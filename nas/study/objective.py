"""The objective: one trial's candidate drawn from the space, held to the budget, screened at the
rung, trained, scored on validation, and stored with its run record, layer table and weights."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm import tqdm

from nas.costmodel import costs
from nas.data import Split, describe
from nas.data.resize import SplitsBySize
from nas.model import summary_table
from nas.run.record import RUN_ATTR, RunRecord
from nas.space import suggest
from nas.spec import ArchSpec, SpecError, TrainConfig, cost_lines, count_params, layer_string, receptive_field
from nas.study.front_rung import front_rung_verdict
from nas.study.levers import SECOND_RUNG_ATTR, keep_share, second_rung_pays, second_rung_scores
from nas.study.progress import RUNG, SECOND_RUNG, TRAIN, TrialProgress
from nas.study.sampling import RUNG_STEP, goes_on, rung_pays
from nas.study.stored import DATA_ATTR
from nas.study.trials import epochs_to_target, score
from nas.studyfile import StudyConfig
from nas.train import DivergedError, EpochResult, epoch_line, train
from nas.train.checkpoint import checkpoint
from nas.train.setup import RunSettings, resolve_run

@dataclass(frozen=True)
class SearchOptions:
    """What one search run was asked for on the command line, beyond the study file."""

    storage: str
    study: str
    trials: int  # finished trials the study should hold, earlier runs included
    epochs: int
    subset: int | None
    seed: int
    data_dir: str
    run: RunSettings = RunSettings()  # how to train (run.threads: this worker's share of the CPU)
    timeout: float | None = None
    quiet: bool = False
    worker: int = 0  # which of the run's worker processes this is; worker 0's lines carry no prefix
    artifact_dir: str | None = None  # None: beside the SQLite/journal file, else studies/artifacts


class Objective:
    def __init__(self, config: StudyConfig, options: SearchOptions, split: Split, device: torch.device,
                 artifact_dir: Path | None):
        self.config, self.options, self.split, self.device = config, options, split, device
        self.sized = SplitsBySize(split)  # the split at each input side the trials draw, resized once
        self.artifact_dir = artifact_dir
        self.multi = len(config.objectives) > 1
        self.nested = False  # True while a study bar is drawn above the epoch bars (run_worker)
        self.bars = not options.quiet  # epoch bars and lines (a spawned worker's steps show in the parent's bar)
        self.progress: Callable[[TrialProgress], None] | None = None  # hears each trial's steps

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        arch, train_config = suggest(trial, self.config.space, self.options.epochs, self.options.seed,
                                     budget=self.config.limits, shape=self.split.shape)
        trial.set_user_attr("image_size", arch.input_size)
        try:
            params = count_params(arch)
        except SpecError as exc:
            return self.reject(trial, f"invalid: {exc}", over=1.0)
        trial.set_user_attr("params", params)
        cost = costs(arch, self.config.cost_model)  # what it costs a device, int8 (sortable in the dashboard)
        trial.set_user_attr("cost_model", self.config.cost_model)
        trial.set_user_attr("macs", cost.macs)
        trial.set_user_attr("peak_ram", cost.peak_ram)
        trial.set_user_attr("flash", cost.flash)
        broken = self.config.limits.over(arch)
        if broken:
            # how far out, for the sampler: the parameter overshoot, or 1 where only a device budget broke
            return self.reject(trial, f"over budget: {'; '.join(broken)}",
                               over=float(max(params - self.config.budget + 1, 1)))
        set_constraint(trial, float(params - self.config.budget + 1))
        trial.set_user_attr("receptive_field", receptive_field(arch))
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("train", train_config.to_dict())
        trial.set_user_attr("worker", self.options.worker)
        split = self.sized(arch.input_size)
        run = resolve_run(arch, train_config, self.options.run, self.device, len(split.train_x),
                          self.options.subset)
        trial.set_user_attr(RUN_ATTR, run.to_dict())
        side = f" at {arch.input_size}x{arch.input_size}" if self.config.space.image_sizes else ""
        self.say(f"Trial {trial.number}: {params:,} params{side}, {layer_string(arch)}; {train_config.optimizer} "
                 f"lr {train_config.lr:.3g}, batch {train_config.batch_size}, {train_config.scheduler}, "
                 f"augment {train_config.augment:.2f}", detail=True)
        if self.config.pruner == "rung" and rung_pays(self.config, train_config.epochs, len(split.train_x)):
            self.run_rung(trial, arch, train_config, run, split)
            if not self.multi:
                self.run_second_rung(trial, arch, train_config, run, split)
        accuracies: list[float] = []
        int8: list[float] = []  # score = "int8": the int8 model's accuracy in each scored epoch
        steps = Steps(self.progress, self.options.worker, trial.number, "preset" in trial.user_attrs)
        steps.training(train_config.epochs)

        def on_epoch(result: EpochResult, model: torch.nn.Module) -> None:
            accuracies.append(result.eval_acc)
            steps.epoch(result.epoch, result.eval_acc)
            trial.set_user_attr("epoch_acc", accuracies)
            if self.config.score == "int8" and result.epoch > train_config.epochs - self.config.score_epochs:
                int8.append(self.int8_accuracy(model, split))
                trial.set_user_attr("int8_acc", int8)
            if self.bars:
                tqdm.write(f"Epoch {result.epoch}: {epoch_line(result, 'valid')}", file=sys.stdout)
            if self.multi:
                return
            trial.report(result.eval_acc, result.epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", result.epoch)
                self.say(f"Trial {trial.number}: pruned after epoch {result.epoch} at {result.eval_acc:.2f}%")
                raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

        try:
            result = train(arch, train_config, split, run, on_epoch=on_epoch, progress=self.bars,
                           nested=self.nested)
        except DivergedError as exc:
            trial.set_user_attr("failed_reason", str(exc))
            self.say(f"Trial {trial.number}: stopped, {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        value = score(accuracies, self.config.score_epochs)
        last = min(self.config.score_epochs, len(accuracies))
        what = "validation"
        if int8:
            trial.set_user_attr("fp32_score", value)
            value, what = score(int8, self.config.score_epochs), "int8 validation"
        self.say(f"Trial {trial.number}: {value:.2f}% {what} (mean of the last {last} "
                 f"epoch{'s' if last > 1 else ''}), {result.seconds:.0f} s")
        trial.set_user_attr("best_epoch", max(range(len(accuracies)), key=accuracies.__getitem__) + 1)
        trial.set_user_attr("epochs_to_99_4", epochs_to_target(accuracies))
        trial.set_user_attr("train_seconds", round(result.seconds, 2))
        self.save_weights(trial, arch, train_config, run, result.model)
        save_layer_note(trial, arch, train_config)
        return (value, float(trial.user_attrs[self.config.objectives[-1]])) if self.multi else value

    def int8_accuracy(self, model: torch.nn.Module, split: Split) -> float:
        """The model's validation accuracy as the int8 ONNX model nas.deploy would ship (an export,
        a calibration on training images and an ONNX Runtime pass over the validation images)."""
        from nas.deployment import int8_accuracy

        _, int8 = int8_accuracy(model, split.mean, split.std, split.train_x, split.eval_x, split.eval_y)
        return int8

    def run_rung(self, trial: optuna.Trial, arch: ArchSpec, train_config: TrainConfig, run: RunRecord,
                 split: Split) -> None:
        """The cheap first rung (config.rung): a short run on the first images, scored on the
        validation split; the pruner (one objective: the score reported at step RUNG_STEP) or the
        two-objective rule (nas.study.front_rung) decides whether full training follows."""
        rung = self.config.rung
        short = dataclasses.replace(train_config, epochs=rung.epochs)
        split = split.head(rung.subset)
        try:
            if self.progress is not None:
                self.progress(TrialProgress(self.options.worker, trial.number, RUNG,
                                            preset="preset" in trial.user_attrs))
            result = train(arch, short, split, run, progress=self.bars, nested=self.nested)
            value = result.history[-1].eval_acc
        except DivergedError:
            value = 0.0
        trial.set_user_attr("rung_acc", value)
        if self.multi:
            stops = not front_rung_verdict(trial.study, trial, value, self.config.objectives[-1], rung.margin)
        else:
            trial.report(value, RUNG_STEP)
            stops = trial.should_prune()
        if stops:
            trial.set_user_attr("pruned_at", RUNG_STEP)
            why = " (a trial that costs no more beat it there)" if self.multi else ""
            self.say(f"Trial {trial.number}: stopped at the rung, {value:.2f}% validation after {rung.epochs} "
                     f"epochs on {len(split.train_x):,} images{why}")
            raise optuna.TrialPruned("not among the rung's best")
        self.say(f"Trial {trial.number}: rung {value:.2f}% validation, moves on to full training", detail=True)

    def run_second_rung(self, trial: optuna.Trial, arch: ArchSpec, train_config: TrainConfig, run: RunRecord,
                        split: Split) -> None:
        """The second, longer rung (nas.study.levers, lever b), where the study file asks for one and it
        costs less than full training: a run of rung.second_epochs on the first rung.second_subset
        images, held to the rung's margin and keep share against the other trials' second-rung scores."""
        rung = self.config.rung
        if not second_rung_pays(rung, train_config.epochs, len(split.train_x)):
            return
        split = split.head(rung.second_subset or len(split.train_x))
        if self.progress is not None:
            self.progress(TrialProgress(self.options.worker, trial.number, SECOND_RUNG,
                                        preset="preset" in trial.user_attrs))
        try:
            value = train(arch, dataclasses.replace(train_config, epochs=rung.second_epochs), split, run,
                          progress=self.bars, nested=self.nested).history[-1].eval_acc
        except DivergedError:
            value = 0.0
        others = second_rung_scores(trial.study.get_trials(deepcopy=False), trial.number)
        trial.set_user_attr(SECOND_RUNG_ATTR, value)
        if not goes_on(value, others, keep_share(others, rung.keep, rung), rung.startup, rung.margin):
            trial.set_user_attr("pruned_at", RUNG_STEP)
            self.say(f"Trial {trial.number}: stopped at the second rung, {value:.2f}% validation after "
                     f"{rung.second_epochs} epochs on {len(split.train_x):,} images")
            raise optuna.TrialPruned("not among the second rung's best")
        self.say(f"Trial {trial.number}: second rung {value:.2f}% validation, moves on to full training", detail=True)

    def reject(self, trial: optuna.Trial, reason: str, over: float) -> Any:
        """Never train it, but tell the sampler how far out it was (Optuna's constraints)."""
        trial.set_user_attr("rejected", reason)
        set_constraint(trial, over)
        self.say(f"Trial {trial.number}: rejected, {reason} (never trained)")
        raise optuna.TrialPruned(reason)

    def say(self, line: str, detail: bool = False) -> None:
        """A line of the trial's story, above any progress bars; under --quiet only its end (one
        line a trial), not the `detail` on the way."""
        if detail and self.options.quiet:
            return
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

    identity = trial.study.user_attrs.get(DATA_ATTR)
    data_line = f"Data: {describe(identity)}\n\n" if identity else ""
    body = (
        f"## Trial {trial.number}\n\n{data_line}```\n{summary_table(arch)}\n```\n\n"
        f"Device costs (int8):\n\n```\n{chr(10).join(cost_lines(arch))}\n```\n\n"
        f"Training config:\n\n```json\n{json.dumps(config.to_dict(), indent=2)}\n```\n"
    )
    save_note(trial, body)


class Steps:
    """A trial's steps as its Objective reports them (TrialProgress) to whoever draws the bar: full
    training begun, then each epoch with its accuracy and the epochs' mean wall time so far."""

    def __init__(self, progress: Callable[[TrialProgress], None] | None, worker: int, trial: int, preset: bool):
        self.progress, self.worker, self.trial, self.preset = progress, worker, trial, preset
        self.epochs, self.started = 0, time.monotonic()

    def training(self, epochs: int) -> None:
        self.epochs, self.started = epochs, time.monotonic()
        self.send(0, None)

    def epoch(self, epoch: int, accuracy: float) -> None:
        self.send(epoch, accuracy)

    def send(self, epoch: int, accuracy: float | None) -> None:
        if self.progress is None:
            return
        seconds = (time.monotonic() - self.started) / epoch if epoch else None
        self.progress(TrialProgress(self.worker, self.trial, TRAIN, epoch, self.epochs, accuracy, seconds,
                                    self.preset))
