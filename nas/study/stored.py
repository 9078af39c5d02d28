"""A stored study read back: opened by name, its description, its trials rebuilt through the space
function that made them with the run record they trained with, and the confirm runs it holds."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from torch import nn

from nas import data
from nas.cpu import native
from nas.errors import NasError
from nas.run.device import resolve_device, resolve_precision
from nas.run.record import RunRecord, record_of
from nas.space import suggest
from nas.spec import ArchSpec, TrainConfig
from nas.storage import StorageError, open_storage
from nas.studyfile import StudyConfig
from nas.study.trials import best_trial
from nas.train.checkpoint import load_checkpoint

DEFAULT_STUDY = "mnist-8k"
DATA_ATTR = "data"  # the study's user attribute holding its data's identity (nas.data.Data.identity)
BASELINE = "model3"  # the hand design every confirmation compares against


class ReplayError(NasError):
    """A stored trial that can't be trained again here, as it was."""


def open_study(url: str, name: str | None = None) -> optuna.Study:
    """The named study of an existing storage; without a name, its only study (or mnist-8k among
    several). Raises StorageError, naming the studies it holds, where there is no such study."""
    storage = open_storage(url, must_exist=True)
    names = optuna.get_all_study_names(storage)
    if name is None:
        name = names[0] if len(names) == 1 else DEFAULT_STUDY
    if name not in names:
        known = f"; it holds {', '.join(sorted(names))}" if names else "; it holds no study"
        raise StorageError(f"no study named {name!r} in {url}{known}")
    return optuna.load_study(study_name=name, storage=storage)


def config_from_study(study: optuna.Study) -> StudyConfig:
    """The study's own copy of its description, stored when it was created."""
    return StudyConfig.from_stored(study.user_attrs["config"])


def check_data(study: optuna.Study, identity: dict) -> None:
    """DataError, naming what changed, unless the study's stored data identity is `identity`. A
    study made before nas stored identities trained on MNIST, the only data there was."""
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        if identity["dataset"] != "mnist":
            raise data.DataError(f"study {study.study_name!r} was made on MNIST; this data is {identity['dataset']}")
        return
    changed = data.differences(stored, identity)
    if changed:
        raise data.DataError(f"study {study.study_name!r} was made on other data ({'; '.join(changed)}); "
                             "use the data it was made on, or give this data its own --study name")


def open_study_data(study: optuna.Study, data_dir: Path, progress: bool = False,
                    notify: Callable[[str], None] | None = None) -> data.Data:
    """The data the study was made on, read as its study file's [data] table says and checked
    against the identity it stored (DataError naming what changed); `notify` hears of a fallback."""
    opened = data.open_data(config_from_study(study).data, data_dir, progress, notify)
    check_data(study, opened.identity())
    return opened


def rebuild(trial: FrozenTrial, config: StudyConfig) -> tuple[ArchSpec, TrainConfig]:
    """The same space function the search ran, fed the stored params."""
    stored = trial.user_attrs["train"]
    stored_arch = ArchSpec.from_dict(trial.user_attrs["arch"])
    arch, train_config = suggest(FixedTrial(trial.params, trial.number), config.space, stored["epochs"],
                                 stored["seed"], budget=config.limits, shape=stored_arch.shape)
    if arch != stored_arch:
        raise ReplayError(f"trial {trial.number}: the search space no longer rebuilds the stored architecture")
    return arch, train_config


def stored_run(trial: FrozenTrial, device: str | None, batchnorm: str | None) -> RunRecord:
    """The trial's run record, on `device` (default: the stored one, where it exists here) and,
    if asked, another BatchNorm path. Raises ReplayError where the stored path can't run here."""
    run = record_of(trial.user_attrs)
    if device is None:
        device = run.device if run.device == "cpu" or torch.cuda.is_available() else "cpu"
    run = replace(run, device=str(resolve_device(device)), batchnorm=batchnorm or run.batchnorm)
    if run.batchnorm == "native" and not native.available():
        raise ReplayError(f"trial {trial.number} trained with nas's C BatchNorm kernel, which can't be built "
                          "here; --batchnorm pytorch replays it on PyTorch's BatchNorm, not bit for bit")
    resolve_precision(run.precision, torch.device(run.device))
    return run


def confirm_key(prefix: str, label: str, seed: int) -> str:
    """The study user attribute holding one confirm run ("confirm" on validation, "confirm-test")."""
    return f"{prefix}:{label}:seed{seed}"


def confirm_runs(study: optuna.Study, prefix: str = "confirm") -> dict[str, list[dict]]:
    """The stored confirm runs by candidate label ("trial<N>" or "model3")."""
    runs: dict[str, list[dict]] = {}
    for key, value in sorted(study.user_attrs.items()):
        if key.startswith(prefix + ":") and isinstance(value, dict):
            runs.setdefault(value["candidate"], []).append(value)
    return runs


def confirmed_best(study: optuna.Study) -> int | None:
    """The trial number with the best mean validation score over its confirm runs, if any."""
    means = {runs[0]["trial"]: sum(r["score"] for r in runs) / len(runs)
             for label, runs in confirm_runs(study).items() if label != BASELINE and runs[0]["trial"] is not None}
    return max(means, key=means.__getitem__) if means else None


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Trial `number`; else the confirmed best (nas.study.confirm) where there is one; else the most
    accurate completed trial (in a two-objective study, the most accurate of the Pareto front)."""
    if number is None and confirmed_best(study) is not None:
        number = confirmed_best(study)
    if number is None:
        best = best_trial(study)
        if best is None:
            raise ReplayError(f"study {study.study_name!r} has no completed trial to replay")
        return best
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches:
        raise ReplayError(f"study {study.study_name!r} has no trial {number}")
    trial = matches[0]
    if "rejected" in trial.user_attrs:
        raise ReplayError(f"trial {number} was rejected ({trial.user_attrs['rejected']}) and never trained")
    if trial.state != TrialState.COMPLETE:
        raise ReplayError(f"trial {number} is {trial.state.name.lower()}, not a completed trial")
    return trial


def replay_setup(trial: FrozenTrial, config: StudyConfig, seed: int | None, device: str | None,
                 batchnorm: str | None, full_train: bool) -> tuple[ArchSpec, TrainConfig, RunRecord]:
    """What replaying `trial` trains: its net and training config rebuilt through the space, and its
    run record, with another `seed`, device or BatchNorm path where asked, and on all training
    images for `full_train`."""
    arch, train_config = rebuild(trial, config)
    run = stored_run(trial, device, batchnorm)
    if seed is not None:
        train_config, run = replace(train_config, seed=seed), replace(run, seed=seed)
    if full_train:
        run = replace(run, subset=None)
    return arch, train_config, run


def stored_weights(trial: FrozenTrial, directory: Path) -> tuple[nn.Module, dict]:
    """The model `trial` stored in the artifact store at `directory`, and its checkpoint
    (nas.train.checkpoint); ReplayError where the trial stored none or the store lacks it."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    artifact = trial.user_attrs.get("weights_artifact")
    if artifact is None:
        raise ReplayError(f"trial {trial.number} has no stored weights (it ran before nas stored them, or without "
                          "an artifact store); --full-train retrains it")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        try:
            download_artifact(artifact_store=FileSystemArtifactStore(str(directory)), artifact_id=artifact,
                              file_path=str(path))
        except (OSError, ArtifactNotFound) as exc:
            raise ReplayError(f"trial {trial.number}'s weights are not in {directory} ({type(exc).__name__}); "
                              "--artifact-dir names where they are, --full-train retrains it") from None
        return load_checkpoint(path)
