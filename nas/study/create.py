"""Creating a study, or loading it: its stored description checked against the study file, the
presets queued once, and a warm start from another study's export."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.space import express, params_for, params_of, upgraded
from nas.spec import MNIST_SHAPE, ArchSpec, Preset, Shape, SpecError, TrainConfig, count_params
from nas.study.export import trial_from_dict
from nas.study.sampling import make_pruner, make_sampler
from nas.study.stored import DATA_ATTR, check_data, config_from_study
from nas.studyfile import ConfigError, StudyConfig, design, differences

def create_or_load(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig, *, seed: int, epochs: int,
                   enqueue: tuple[str, ...], warm: dict | None = None, shape: Shape = MNIST_SHAPE,
                   identity: dict | None = None, say: Callable[[str], None] | None = None) -> optuna.Study:
    """Load the study `name`, or create it and enqueue the presets; its sampler is seeded by `seed`
    and its pruner spans `epochs`. Creating is atomic in the
    storage, so exactly one of several workers starting together enqueues. With `warm` (a study
    export, nas.study.export), its trials that fit this study join the history first, once.
    `shape` is the data's, and `identity` what the study stores of its data, or checks against
    what it stored (ConfigError naming what changed; DataError where its data changed). `say` hears a
    line for each thing a user would want to know that was done or left undone (a warm start's
    count, a preset not enqueued); None: nothing is said."""
    say = say or (lambda line: None)
    sampler = make_sampler(seed)
    pruner = make_pruner(config, epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    pruner=pruner, directions=config.directions)
        study.set_user_attr("config", config.to_stored())
        if identity is not None:
            study.set_user_attr(DATA_ATTR, identity)
        name_metrics(study, config)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
        created = False
        if [d.name.lower() for d in study.directions] != config.directions:
            raise ConfigError(
                f"study {name!r} exists with objectives for {[d.name.lower() for d in study.directions]}; "
                f"the study file asks for {config.directions}: use another --study name"
            )
        if "config" in study.user_attrs:
            stored = config_from_study(study)
            if stored.cost_model != config.cost_model:
                say(f"note: study {name!r} counts peak RAM and flash as {stored.cost_model!r} (nas.costmodel), the "
                    f"count it was made with, not the file's {config.cost_model!r}")
            changed = differences(stored, config)
            if changed:
                raise ConfigError(
                    f"study {name!r} was made from another version of its study file ({'; '.join(changed)}); "
                    "rerun with the file it was made from, or give the new version its own --study name "
                    "(--warm-start from an export of this one carries its trials over)")
        if identity is not None:
            check_data(study, identity)
            if DATA_ATTR not in study.user_attrs:  # made before studies stored their data: MNIST's
                study.set_user_attr(DATA_ATTR, identity)
        if study.metric_names is None:  # made before studies named them
            name_metrics(study, config)
    if warm is not None and created:
        added, skipped = warm_start(study, warm, config, shape)
        say(f"Warm start from study {warm['study']!r}: {added} trials added to the history, "
            f"{skipped} skipped (outside this study's budget or space)")
        scaled = enqueue_scaled(study, warm, config, shape)
        if scaled:
            say(f"Warm start: the shapes of its best trials that do not fit ({', '.join(map(str, scaled))}) "
                "are queued, scaled to this budget")
    enqueue_presets(study, config, enqueue, fresh=created, shape=shape, say=say)
    return study




# What the dashboard calls each study-file objective (instead of "Objective 0").
METRIC_NAMES = {"accuracy": "validation accuracy", "params": "parameters", "macs": "multiply-accumulates",
                "peak_ram": "peak RAM (bytes)", "flash": "flash (bytes)"}


def metric_names(config: StudyConfig) -> list[str]:
    """The study's objectives as the dashboard names them; an int8-scored accuracy says so."""
    names = [METRIC_NAMES[o] for o in config.objectives]
    if config.score == "int8":
        names[0] = f"int8 {names[0]}"
    return names


def name_metrics(study: optuna.Study, config: StudyConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names is, in Optuna 5
        study.set_metric_names(metric_names(config))


def warm_start(study: optuna.Study, export: dict, config: StudyConfig, shape: Shape = MNIST_SHAPE) -> tuple[int, int]:
    """Adds the exported trials whose architecture and training config this study's space can
    express within its budget, re-expressed in this space's params and distributions (a study of
    another space version or budget words the same net differently), so the sampler starts from
    them. They are marked `warm_start` and do not count toward --trials. Returns (added, skipped)."""
    added = []
    for exported in export["trials"]:
        stored = trial_from_dict(exported)
        rebuilt = _reexpress(stored, config, shape)
        if rebuilt is None or len(stored.values or ()) not in (0, len(config.directions)):
            continue
        added.append(optuna.trial.create_trial(
            state=stored.state, values=stored.values, params=rebuilt.params, distributions=rebuilt.distributions,
            intermediate_values=stored.intermediate_values,
            user_attrs={**stored.user_attrs, "warm_start": export["study"]}))
    study.add_trials(added)
    return len(added), len(export["trials"]) - len(added)


def enqueue_scaled(study: optuna.Study, export: dict, config: StudyConfig, shape: Shape = MNIST_SHAPE,
                   top: int = 3) -> list[int]:
    """Queues the shapes of the export's `top` best finished trials that are over this study's
    budget, scaled to it, and returns their numbers. A version-2 space words widths as shares of
    the budget, so a trial's params rebuild its net narrower (or wider) under another budget, with
    the same depth, proportions and training config. From a version-2 or -3 space to one of the same
    version, or from version 2 to 3 (its nets worded with plain ops: nas.space.upgraded), of one
    objective; a params set this space cannot take as it is (a value out of its ranges) is passed over."""
    exported = export.get("user_attrs", {}).get("config", {}).get("space", {})
    pairs = ((2, 2), (2, 3), (3, 3))
    if (exported.get("version"), config.space.version) not in pairs or len(config.directions) != 1:
        return []
    over = []
    for t in map(trial_from_dict, export["trials"]):
        if (t.state == TrialState.COMPLETE and len(t.values or ()) == 1 and "arch" in t.user_attrs
                and count_params(ArchSpec.from_dict(t.user_attrs["arch"])) >= config.budget):
            over.append(t)
    over.sort(key=lambda t: t.values[0], reverse=config.directions[0] == "maximize")
    chosen = []
    for t in over:
        if len(chosen) == top:
            break
        params = upgraded(t.params, config.space) if exported["version"] < config.space.version else t.params
        if express(params, config.space, config.limits, config.epochs, 0, shape) is None:
            continue
        number = t.user_attrs["exported_number"]
        study.enqueue_trial(params, user_attrs={"scaled_from": f"{export['study']}#{number}"}, skip_if_exists=True)
        chosen.append(number)
    return chosen


def _reexpress(stored: FrozenTrial, config: StudyConfig, shape: Shape) -> optuna.trial.FixedTrial | None:
    """A trial whose params make this study's space rebuild `stored`'s architecture and training
    config (epochs and seed aside) within the budget, or None: its own params where this space takes
    them, else the net worded afresh in this space (params_of)."""
    if "arch" not in stored.user_attrs or "train" not in stored.user_attrs:
        return None
    arch, train_config = ArchSpec.from_dict(stored.user_attrs["arch"]), TrainConfig.from_dict(stored.user_attrs["train"])
    if count_params(arch) >= config.budget:
        return None
    for params in (stored.params, None):
        try:
            params = params if params is not None else params_of(arch, train_config, config.space, config.limits)
        except (ValueError, SpecError):
            continue
        taken = express(params, config.space, config.limits, train_config.epochs, train_config.seed, shape)
        if taken is not None and taken[1:] == (arch, train_config):
            return taken[0]
    return None


def enqueue_presets(study: optuna.Study, config: StudyConfig, names: tuple[str, ...], fresh: bool,
                    shape: Shape = MNIST_SHAPE, say: Callable[[str], None] = lambda line: None) -> None:
    """Run each named preset (or design file, nas.studyfile.design) once per study, its input and classifier made to the data's `shape`.
    A preset whose trial failed (interrupted) is queued again; one whose trial (or the same params,
    queued another way) is waiting, running, finished or was retried is not. One that does not fit the data or the budget is skipped, in a line to `say`."""
    trials = study.get_trials(deepcopy=False)
    if not fresh and not trials:
        return  # another worker created the study a moment ago and is enqueueing
    present = {t.user_attrs.get("preset") for t in trials if t.state != TrialState.FAIL}
    present_params = [t.params for t in trials if t.state != TrialState.FAIL]  # the same net queued otherwise
    for name in names:
        if name in present:
            continue
        preset = design(name)
        # a design made for one of the sides the space draws keeps it; any other is made to the data's
        size = preset.arch.input_size if preset.arch.input_size in config.space.image_sizes else shape.size
        arch = dataclasses.replace(preset.arch, in_channels=shape.channels, input_size=size,
                                   num_classes=shape.classes)
        try:
            params = count_params(arch)
        except SpecError as exc:
            say(f"note: {name} does not fit {size}x{size} inputs ({exc}); not enqueued")
            continue
        broken = config.limits.over(arch)
        if broken:
            say(f"note: {name} is over this study's budget on this data ({'; '.join(broken)}); not enqueued")
            continue
        preset = Preset(arch, preset.train)
        params = params_for(preset, config.space, config.limits)
        taken = express(params, config.space, config.limits, preset.train.epochs, preset.train.seed, shape)
        if taken is None or taken[1:] != (preset.arch, preset.train):
            say(f"note: {name} lies outside this study's search space; not enqueued")
            continue
        if params in present_params:
            continue
        study.enqueue_trial(params, user_attrs={"preset": name})
