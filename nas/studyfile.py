"""A study's description: the small TOML file in studies/ that defines budget, epochs, objective
and search ranges, so a new study (say a 5K budget) needs no code. A study stores its description
when it is created (StudyConfig.to_stored / from_stored), and a rerun with a file that changes it
is refused (differences)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.costmodel import BEFORE, COST_MODELS, CURRENT
from nas.data import DataConfig, DataError
from nas.errors import NasError
from nas.space import DEFAULT_VERSION, VERSIONS, Budget, SpaceConfig, smallest_archs
from nas.spec import OPS, PRESETS, STRIDES, Preset, Shape, SpecError, count_params, load_arch

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_STUDY_FILE = Path("studies/mnist-8k.toml")
OBJECTIVES = ("accuracy", "params", "macs", "peak_ram", "flash")  # the second: a trial user attribute (int8 costs)
# The shapes of the data sets that come in one shape, so a study file is checked before any is read.
KNOWN_SHAPES = {"mnist": Shape(1, 28, 10), "fashion-mnist": Shape(1, 28, 10), "kmnist": Shape(1, 28, 10),
                "cifar10": Shape(3, 32, 10), "svhn": Shape(3, 32, 10), "digits": Shape(1, 8, 10)}
PRUNERS = ("median", "hyperband", "rung", "none")
SCORES = ("fp32", "int8")
NO_MARGIN = 100.0  # a rung margin that stops no one: scores are percentages


class ConfigError(NasError):
    """A study file that cannot be used as written."""


@dataclass(frozen=True)
class RungConfig:
    """pruner = "rung": every candidate first trains `epochs` epochs on the first `subset` training
    images, scored on the validation split. It goes on to full training only if its rung score is
    (a) at most `margin` percentage points below the best rung score so far and (b) within the top
    `keep` share of all rung scores so far, once there are `startup` earlier ones
    (nas.study.sampling.goes_on). The enqueued presets run first and set the bar. The crowd_*,
    second_* and curve_* keys are levers on the rung's cost (nas.study.levers), off by default.

    In a two-objective study (accuracy and a cost) only cheaper rivals count: a candidate stops if
    its rung score is more than `margin` points below the best rung score of the other trials that
    cost no more than it does (the second objective); `keep`, `startup` and the levers do not apply
    (nas.study.front_rung.goes_on_front)."""

    subset: int = 10000
    epochs: int = 2
    keep: float = 1 / 3
    startup: int = 3  # earlier rung scores needed before (b) applies; (a) applies from the second trial
    margin: float = 1.0  # a study stored before the margin existed reads back NO_MARGIN, the rule it ran under
    # The levers on the rung's cost (nas.study.levers), each off by default:
    crowd_noise: float = 0.0  # the keep tightens to crowd_keep while the last crowd_window rung scores'
    crowd_window: int = 10  # middle half spans at most crowd_noise points (0: never)
    crowd_keep: float = 1 / 6
    second_epochs: int = 0  # a second rung of this many epochs (0: none) on the first second_subset
    second_subset: int = 0  # training images (0: all), held to the same margin and keep
    curve_epochs: tuple[int, ...] = ()  # a full training stops after one of these epochs if it trails the
    curve_margin: float = 0.3  # best completed trial's accuracy there by more than curve_margin points

    def __post_init__(self):
        object.__setattr__(self, "curve_epochs", tuple(self.curve_epochs))  # a TOML or stored list


@dataclass(frozen=True)
class StudyConfig:
    name: str = "mnist-8k"
    budget: int = 8000  # trained architectures have strictly fewer parameters than this
    max_macs: int = 0  # and at most this many multiply-accumulates (0: no limit)
    max_peak_ram: int = 0  # bytes of int8 activations in RAM at once (0: no limit)
    max_flash: int = 0  # bytes of int8 weights, BatchNorm folded (0: no limit)
    cost_model: str = CURRENT  # how peak RAM and flash are counted (nas.costmodel); a stored study keeps its own
    epochs: int = 15
    objectives: tuple[str, ...] = ("accuracy",)  # ("accuracy", "params") asks for a Pareto front
    score_epochs: int = 3  # the accuracy objective is the mean of the last N epochs' validation accuracy
    score: str = "fp32"  # or "int8": that accuracy measured on the int8 ONNX model (nas.deployment), per epoch
    pruner: str = "rung"  # measured best of the four (docs/fidelity.md)
    enqueue: tuple[str, ...] = ("model3",)  # presets (or spec files: design) run first, once per study
    space: SpaceConfig = field(default_factory=SpaceConfig)
    rung: RungConfig = field(default_factory=RungConfig)  # used by pruner = "rung"
    data: DataConfig = field(default_factory=DataConfig)  # [data]; absent: MNIST

    @property
    def limits(self) -> Budget:
        """Every budget the study holds its nets to."""
        return Budget(self.budget, self.max_macs, self.max_peak_ram, self.max_flash, self.cost_model)

    @property
    def directions(self) -> list[str]:
        return ["maximize" if o == "accuracy" else "minimize" for o in self.objectives]

    def to_stored(self) -> dict[str, Any]:
        """The plain dict a study keeps as its `config` user attribute."""
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> StudyConfig:
        """The description a study stored when it was created (any version since the first); one
        stored before cost models had names counted with BEFORE."""
        stored = {"cost_model": BEFORE, **stored}
        return dataclasses.replace(
            cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
                   if k not in ("space", "rung", "data")}),
            space=SpaceConfig.from_dict(stored["space"]), rung=stored_rung(stored.get("rung")),
            data=DataConfig.from_stored(stored.get("data", {})),
        )


def stored_rung(stored: dict[str, Any] | None) -> RungConfig:
    """The [rung] a study stored: a study made before the rung existed takes the defaults (it did
    not use it), one made before the margin existed ran without one."""
    return RungConfig() if stored is None else RungConfig(**{"margin": NO_MARGIN, **stored})


def parse_study_config(data: dict[str, Any], source: str = "study file") -> StudyConfig:
    top = dict(data)
    try:
        # A study file without `version` means the current space; only a stored config that
        # predates versions means version 1 (SpaceConfig.from_dict).
        space = SpaceConfig.from_dict({"version": DEFAULT_VERSION, **top.pop("space", {})})
        rung = RungConfig(**top.pop("rung", {}))
        data = DataConfig.from_dict(top.pop("data", {}), f"{source}: [data]")
        for key in ("objectives", "enqueue"):
            if key in top:
                top[key] = tuple(top[key])
        config = StudyConfig(**top, space=space, rung=rung, data=data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    except (TypeError, ValueError, SpecError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    check(config, source)
    return config


def check(config: StudyConfig, source: str) -> None:
    if config.budget < 1 or config.epochs < 1 or config.score_epochs < 1:
        raise ConfigError(f"{source}: budget, epochs and score_epochs must be positive")
    if min(config.max_macs, config.max_peak_ram, config.max_flash) < 0:
        raise ConfigError(f"{source}: max_macs, max_peak_ram and max_flash must be positive (0: no limit)")
    if not config.objectives or any(o not in OBJECTIVES for o in config.objectives):
        raise ConfigError(f"{source}: objectives must be drawn from {OBJECTIVES}, got {config.objectives}")
    if config.objectives[0] != "accuracy":
        raise ConfigError(f"{source}: the first objective must be accuracy")
    if config.cost_model not in COST_MODELS:
        raise ConfigError(f"{source}: cost_model must be one of {COST_MODELS}, got {config.cost_model!r}")
    if config.score not in SCORES:
        raise ConfigError(f"{source}: score must be one of {SCORES}, got {config.score!r}")
    if config.pruner not in PRUNERS:
        raise ConfigError(f"{source}: pruner must be one of {PRUNERS}, got {config.pruner!r}")
    rung = config.rung
    if rung.subset < 1 or rung.epochs < 1 or rung.startup < 0 or not 0 < rung.keep <= 1 or rung.margin < 0:
        raise ConfigError(f"{source}: [rung] needs subset and epochs >= 1, startup and margin >= 0, keep in (0, 1]")
    if rung.crowd_noise < 0 or rung.crowd_window < 4 or not 0 < rung.crowd_keep <= 1:
        raise ConfigError(f"{source}: [rung] needs crowd_noise >= 0, crowd_window >= 4, crowd_keep in (0, 1]")
    if rung.second_epochs < 0 or rung.second_subset < 0 or rung.curve_margin < 0:
        raise ConfigError(f"{source}: [rung] needs second_epochs, second_subset and curve_margin >= 0")
    if any(type(e) is not int or e < 1 for e in rung.curve_epochs):
        raise ConfigError(f"{source}: [rung] curve_epochs must be epochs (1 or more), got {list(rung.curve_epochs)}")
    for name in config.enqueue:
        if name not in PRESETS:
            design(name, source)
    check_space(config.space, source)
    if config.data.dataset in KNOWN_SHAPES:
        check_fits(config, KNOWN_SHAPES[config.data.dataset], source)


def check_fits(config: StudyConfig, shape: Shape, source: str = "study file") -> None:
    """ConfigError unless the space holds a net for inputs and classes of `shape` under the budget."""
    try:
        archs = smallest_archs(config.space, shape)
        smallest = min(map(count_params, archs))
    except SpecError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    breaks = [[b for b in config.limits.over(arch) if "params" not in b] for arch in archs]
    broken = min(breaks, key=len)  # empty where some input side and stride fits every device budget
    if broken:
        raise ConfigError(f"{source}: the smallest architecture in the search space breaks a device budget "
                          f"({'; '.join(broken)}): no net can be trained")
    if smallest >= config.budget:
        raise ConfigError(
            f"{source}: budget {config.budget:,} is unreachable: the smallest architecture in the "
            f"search space has {smallest:,} parameters"
            + (f" for {shape.channels}x{shape.size}x{shape.size} inputs and {shape.classes} classes"
               if shape != KNOWN_SHAPES["mnist"] else "")
        )


def design(name: str, source: str = "study file") -> Preset:
    """An `enqueue` entry: a preset's name, or a spec file (relative to the working directory) with
    its architecture and its training config, e.g. studies/designs/sep-2k.json."""
    if name in PRESETS:
        return PRESETS[name]
    if not name.endswith(".json"):
        raise ConfigError(f"{source}: enqueue names unknown presets [{name!r}]; known: {list(PRESETS)}, "
                          "or a spec file (.json)")
    try:
        arch, train = load_arch(name)
    except SpecError as exc:
        raise ConfigError(f"{source}: enqueue: {exc}") from None
    if train is None:
        raise ConfigError(f"{source}: enqueue: {name} has no \"train\" config beside its \"arch\"")
    return Preset(arch, train)


def check_space(space: SpaceConfig, source: str) -> None:
    if space.version not in VERSIONS:
        raise ConfigError(f"{source}: space version must be one of {VERSIONS}, got {space.version!r}")
    for key in ("relative_width", "budget_fraction"):
        low, high = getattr(space, key)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"{source}: {key} must be a range within (0, 1], got [{low}, {high}]")
    for key, allowed in (("ops", OPS), ("padding", (0, 1)), ("first_padding", (0, 1)), ("first_kernel", (3, 5)),
                         ("residual", (False, True)), ("dw_norm", (False, True))):
        chosen = getattr(space, key)
        if not chosen or any(c not in allowed or type(c) is not type(allowed[0]) for c in chosen):
            raise ConfigError(f"{source}: {key} takes choices from {list(allowed)}, got {list(chosen)}")
    check_device_choices(space, source)


def check_device_choices(space: SpaceConfig, source: str) -> None:
    """`first_stride` (version 3 only: older spaces keep their meaning) and `image_sizes`."""
    if not space.first_stride or any(s not in STRIDES or type(s) is not int for s in space.first_stride):
        raise ConfigError(f"{source}: first_stride takes choices from {list(STRIDES)}, got {list(space.first_stride)}")
    if space.first_stride != (1,) and space.version != 3:
        raise ConfigError(f"{source}: first_stride is searched by space version 3, not {space.version}")
    if any(type(s) is not int or s < 1 for s in space.image_sizes) or len(set(space.image_sizes)) < len(space.image_sizes):
        raise ConfigError(f"{source}: image_sizes takes distinct positive sides in pixels, got {list(space.image_sizes)}")


def load_study_config(path: Path) -> StudyConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_study_config(data, str(path))


def resolve_study_file(path: Path | None) -> StudyConfig:
    """The study file asked for; else the default one where it exists (a checkout); else the defaults."""
    if path is not None:
        return load_study_config(path)
    if DEFAULT_STUDY_FILE.is_file():
        return load_study_config(DEFAULT_STUDY_FILE)
    return StudyConfig()


def differences(stored: StudyConfig, wanted: StudyConfig) -> list[str]:
    """What a study file changes in the description a study stored when it was made: everything
    that decides which trials it holds and how they are scored (its name and presets aside, the
    [rung] table unless either uses the rung, and the cost model: a stored study keeps its own)."""
    def values(config: StudyConfig) -> dict[str, Any]:
        flat = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.name in ("name", "enqueue", "cost_model") or f.name == "rung" and "rung" not in (stored.pruner,
                                                                                                 wanted.pruner):
                continue
            if dataclasses.is_dataclass(value):
                flat.update({f"{f.name}.{k}": tuple(v) if isinstance(v, list) else v
                             for k, v in dataclasses.asdict(value).items()})
            else:
                flat[f.name] = tuple(value) if isinstance(value, list) else value
        return flat

    old, new = values(stored), values(wanted)
    if old.get("rung.margin") == NO_MARGIN:  # made before the margin: it resumes under the file's, which
        new.pop("rung.margin", None)  # decides how long candidates train, not what the study holds or scores
    return [f"{key}: {old.get(key)!r} stored, {new.get(key)!r} in the file" for key in new if old.get(key) != new.get(key)]
