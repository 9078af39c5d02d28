"""The search space: one function from an Optuna trial to an ArchSpec and a TrainConfig.

Parameter names are stable and indexed (`b1_l2_rel` is block 1's third conv), so a stored trial's
params can be fed back through `optuna.trial.FixedTrial` to rebuild exactly what it trained.

Version 2 is feasible by construction: it samples the topology, each conv's width relative to the
others and the share of the budget to spend (`budget_fraction`), then scales all widths together
to the largest net within that share, and caps each block's depth at what its feature map allows.
Version 1 samples absolute widths (`b1_l2_width`), so most of its draws were over budget or
shrank the map away; studies created with it still rebuild their trials through it.

Version 3 is version 2 with the ops of the best tiny nets (nas.spec): per block plain or
depthwise-separable convs (`b1_op`), its own padding (`b1_padding`), and a residual add
(`b1_residual`, asked of padded blocks of two convs or more, whose convs then share one width,
`b1_l0_rel`); the first conv's kernel (`first_kernel`), and for separable nets whether BatchNorm+ReLU
sits between the depthwise and the pointwise conv (`dw_norm`), and the first conv's stride
(`first_stride`: 2 halves the map at once, early downsampling). A study file without `version` still
means version 2 (DEFAULT_VERSION).

Any version may search the input's side (`image_size`, drawn from `image_sizes`): the net is built
for that size, its costs counted at it, and the data resized to it (nas.data.resize).

`python -m nas.space --sample 200` shows what a study file's space draws, untrained (draw, sample_report).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from dataclasses import dataclass, fields
from collections.abc import Callable
from typing import Any

import optuna

from nas.costmodel import CURRENT, costs
from nas.spec import (MNIST_SHAPE, ArchSpec, BlockSpec, Preset, Shape, SpecError, TrainConfig, conv_output_size,
                      count_params, layer_string, layer_table, receptive_field)

VERSIONS = (1, 2, 3)
DEFAULT_VERSION = 2  # what a study file without `version` searches


@dataclass(frozen=True)
class Budget:
    """What a net may cost: strictly fewer than `params` parameters, and at most `macs`
    multiply-accumulates, `peak_ram` bytes of int8 activations and `flash` bytes of int8 weights
    (0: no such limit), counted by `cost_model` (nas.costmodel: "tflm", TFLM's arena and .tflite
    bytes; "mcunet", the count before 2026-12-07). Every cost grows with the widths, so the widest
    net within all of them is found by one bisection (fit_widths)."""

    params: int
    macs: int = 0
    peak_ram: int = 0
    flash: int = 0
    cost_model: str = CURRENT

    def within(self, arch: ArchSpec, fraction: float = 1.0) -> bool:
        """Whether `arch` fits `fraction` of every budget (SpecError if it does not build)."""
        if count_params(arch) > min(fraction * self.params, self.params - 1):
            return False
        if not (self.macs or self.peak_ram or self.flash):
            return True
        cost = costs(arch, self.cost_model)
        return all(not limit or value <= fraction * limit
                   for value, limit in ((cost.macs, self.macs), (cost.peak_ram, self.peak_ram),
                                        (cost.flash, self.flash)))

    def over(self, arch: ArchSpec) -> list[str]:
        """Each budget `arch` breaks, as a phrase; empty if it fits them all."""
        params, cost = count_params(arch), costs(arch, self.cost_model)
        broken = [f"{params:,} params >= {self.params:,}"] if params >= self.params else []
        for name, value, limit in (("MACs", cost.macs, self.macs), ("peak RAM B", cost.peak_ram, self.peak_ram),
                                   ("flash B", cost.flash, self.flash)):
            if limit and value > limit:
                broken.append(f"{value:,} {name} > {limit:,}")
        return broken


def as_budget(budget: int | Budget) -> Budget:
    return budget if isinstance(budget, Budget) else Budget(budget)


@dataclass(frozen=True)
class SpaceConfig:
    """Ranges searched; a (low, high) pair with low == high fixes that value without searching it."""

    version: int = 2  # 2: widths scaled to the budget; 1: absolute widths (studies created before 2)
    blocks: tuple[int, int] = (2, 3)  # number of 3x3 blocks (max-pools sit between them)
    layers: tuple[int, int] = (1, 4)  # 3x3 convs per block (version 2: capped where the map runs out)
    width: tuple[int, int] = (4, 32)  # channels of any conv (version 2: the bounds scaled widths are held to)
    relative_width: tuple[float, float] = (0.25, 1.0)  # version 2: a conv's width, relative to the others'
    budget_fraction: tuple[float, float] = (0.5, 1.0)  # version 2: the share of the budget widths scale to
    first_padding: tuple[int, ...] = (0, 1)  # padding choices of the first block (later blocks: 0)
    tail_layers: tuple[int, int] = (0, 2)  # 1x1 convs before global pooling
    lr: tuple[float, float] = (5e-4, 5e-2)  # log scale
    batch_size: tuple[int, ...] = (32, 64, 128, 256)
    optimizer: tuple[str, ...] = ("adam", "sgd")
    scheduler: tuple[str, ...] = ("step", "onecycle", "none")
    step_size: tuple[int, int] = (2, 12)  # StepLR epochs between decays
    gamma: tuple[float, float] = (0.05, 0.5)  # StepLR decay
    augment: tuple[float, float] = (0.0, 1.0)
    dropout: tuple[float, float] = (0.0, 0.15)
    label_smoothing: tuple[float, float] = (0.0, 0.1)
    # version 3's ops (nas.spec), searched per block
    ops: tuple[str, ...] = ("conv", "sep")  # a block's convs: plain 3x3 or depthwise-separable
    padding: tuple[int, ...] = (0, 1)  # padding choices of the blocks after the first
    residual: tuple[bool, ...] = (False, True)  # a padded block of 2+ convs: whether its convs add their input
    first_kernel: tuple[int, ...] = (3, 5)  # the first conv's kernel
    dw_norm: tuple[bool, ...] = (True, False)  # separable convs: BatchNorm+ReLU between the two convs
    first_stride: tuple[int, ...] = (1,)  # version 3: the first conv's stride (2: early downsampling)
    image_sizes: tuple[int, ...] = ()  # input sides a trial draws from (data resized to it); (): the data's own

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaceConfig:
        """A dict without `version` was stored by a study created before versions: version 1."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown search-space keys: {', '.join(sorted(unknown))}")
        scalar = [k for k, v in data.items() if k != "version" and not isinstance(v, (list, tuple))]
        if scalar:
            raise ValueError(f"search-space keys {', '.join(sorted(scalar))} take a list ([low, high] or choices)")
        return cls(**{"version": 1, **{k: v if k == "version" else tuple(v) for k, v in data.items()}})


def _int(trial: optuna.Trial, name: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return low if low == high else trial.suggest_int(name, low, high)


def _float(trial: optuna.Trial, name: str, bounds: tuple[float, float], log: bool = False) -> float:
    low, high = bounds
    return float(low) if low == high else trial.suggest_float(name, low, high, log=log)


def _choice(trial: optuna.Trial, name: str, choices: tuple) -> Any:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def suggest(
    trial: optuna.Trial, space: SpaceConfig, epochs: int, seed: int, budget: int | Budget | None = None,
    shape: Shape = MNIST_SHAPE,
) -> tuple[ArchSpec, TrainConfig]:
    """The trial's architecture and training config, for inputs and classes of `shape` (its side
    drawn from the space's `image_sizes`, where it has any). A version-2 space needs the study's
    `budget` (strictly more parameters than the net may have); version 1 ignores it."""
    if space.image_sizes:
        shape = dataclasses.replace(shape, size=_choice(trial, "image_size", space.image_sizes))
    if space.version == 1:
        arch = _absolute_arch(trial, space, shape)
    elif budget is None:
        raise ValueError("a version-2 search space scales widths to the budget: pass budget=")
    elif space.version == 2:
        arch = _scaled_arch(trial, space, as_budget(budget), shape)
    else:
        arch = _scaled_arch_v3(trial, space, as_budget(budget), shape)
    scheduler = _choice(trial, "scheduler", space.scheduler)
    step = scheduler == "step"
    config = TrainConfig(
        epochs=epochs,
        batch_size=_choice(trial, "batch_size", space.batch_size),
        optimizer=_choice(trial, "optimizer", space.optimizer),
        lr=_float(trial, "lr", space.lr, log=True),
        scheduler=scheduler,
        step_size=_int(trial, "step_size", space.step_size) if step else TrainConfig.step_size,
        gamma=_float(trial, "gamma", space.gamma) if step else TrainConfig.gamma,
        augment=_float(trial, "augment", space.augment),
        label_smoothing=_float(trial, "label_smoothing", space.label_smoothing),
        seed=seed,
    )
    return arch, config


def _absolute_arch(trial: optuna.Trial, space: SpaceConfig, shape: Shape) -> ArchSpec:
    blocks = []
    for i in range(_int(trial, "n_blocks", space.blocks)):
        n_layers = _int(trial, f"b{i}_layers", space.layers)
        widths = tuple(_int(trial, f"b{i}_l{j}_width", space.width) for j in range(n_layers))
        padding = _choice(trial, "b0_padding", space.first_padding) if i == 0 else 0
        blocks.append(BlockSpec(widths, padding))
    tail = tuple(
        _int(trial, f"tail{k}_width", space.width) for k in range(_int(trial, "tail_layers", space.tail_layers))
    )
    return shape.arch(tuple(blocks), tail, _float(trial, "dropout", space.dropout))


def _scaled_arch(trial: optuna.Trial, space: SpaceConfig, budget: Budget, shape: Shape) -> ArchSpec:
    n_blocks = _int(trial, "n_blocks", space.blocks)
    padding = _choice(trial, "b0_padding", space.first_padding)
    size = shape.size
    # A small input has room for fewer pools: cap the blocks at what the map allows (at least one;
    # if even that does not fit, count_params says so).
    n_blocks = min(n_blocks, max(max_blocks(size, padding, space.layers[0]), 1))
    relative = []
    for i in range(n_blocks):
        if i > 0:
            size //= 2
        pad = padding if i == 0 else 0
        n_layers = _int(trial, f"b{i}_layers", space.layers)
        if not pad:
            room = (size - _size_needed_after(n_blocks - 1 - i, space.layers[0])) // 2
            n_layers = min(n_layers, max(room, space.layers[0]))  # no room for the minimum: count_params says so
            size -= 2 * n_layers
        relative.append((tuple(_float(trial, f"b{i}_l{j}_rel", space.relative_width) for j in range(n_layers)), pad))
    n_tail = _int(trial, "tail_layers", space.tail_layers)
    tail = tuple(_float(trial, f"tail{k}_rel", space.relative_width) for k in range(n_tail))
    fraction = _float(trial, "budget_fraction", space.budget_fraction)
    proportions = shape.arch(tuple(BlockSpec(rel, pad) for rel, pad in relative), tail,
                             _float(trial, "dropout", space.dropout))
    if budget == Budget(budget.params):  # parameters alone: the bisection as it always ran, bit for bit
        return fit_widths(proportions, space.width, min(fraction * budget.params, budget.params - 1))
    return fit_widths(proportions, space.width, lambda arch: budget.within(arch, fraction))


def _scaled_arch_v3(trial: optuna.Trial, space: SpaceConfig, budget: Budget, shape: Shape) -> ArchSpec:
    """Version 2's draw with version 3's ops; capped where the map runs out, as version 2 (later
    blocks counted unpadded), and scaled to the budget the same way."""
    n_blocks = _int(trial, "n_blocks", space.blocks)
    first_padding = _choice(trial, "b0_padding", space.first_padding)
    kernel = _choice(trial, "first_kernel", space.first_kernel)
    stride = _choice(trial, "first_stride", space.first_stride)
    n_blocks = min(n_blocks, max(max_blocks(shape.size, first_padding, space.layers[0], kernel, stride), 1))
    size = conv_output_size(shape.size, kernel, first_padding, stride)  # block 0's map after its first conv
    blocks = []
    for i in range(n_blocks):
        if i > 0:
            size //= 2
        pad = first_padding if i == 0 else _choice(trial, f"b{i}_padding", space.padding)
        n_layers = _int(trial, f"b{i}_layers", space.layers)
        if not pad:
            first = i == 0  # block 0's first conv is counted in `size` already
            room = (size - _size_needed_after(n_blocks - 1 - i, space.layers[0])) // 2 + first
            n_layers = min(n_layers, max(room, space.layers[0]))  # no room for the minimum: count_params says so
            size -= 2 * (n_layers - first)
        op = _choice(trial, f"b{i}_op", space.ops) if n_layers > (i == 0) else "conv"  # the first conv is plain
        residual = bool(_choice(trial, f"b{i}_residual", space.residual)) if pad and n_layers >= 2 else False
        if residual:  # one width for the block, so that every conv after its first keeps the shape
            widths = (_float(trial, f"b{i}_l0_rel", space.relative_width),) * n_layers
        else:
            widths = tuple(_float(trial, f"b{i}_l{j}_rel", space.relative_width) for j in range(n_layers))
        blocks.append(BlockSpec(widths, pad, op, residual))
    n_tail = _int(trial, "tail_layers", space.tail_layers)
    tail = tuple(_float(trial, f"tail{k}_rel", space.relative_width) for k in range(n_tail))
    dw_norm = bool(_choice(trial, "dw_norm", space.dw_norm)) if any(b.op == "sep" for b in blocks) else True
    fraction = _float(trial, "budget_fraction", space.budget_fraction)
    proportions = shape.arch(tuple(blocks), tail, _float(trial, "dropout", space.dropout), kernel, dw_norm, stride)
    return fit_widths(proportions, space.width, lambda arch: budget.within(arch, fraction))


def max_blocks(size: int, padding: int, min_layers: int, first_kernel: int = 3, first_stride: int = 1) -> int:
    """The most blocks of at least `min_layers` 3x3 convs (the first padded by `padding`, a 2x2
    pool between each two; the net's first conv `first_kernel` wide, of stride `first_stride`) that
    an input of side `size` leaves at least 1x1, later blocks unpadded; 0 if not even one."""
    first = conv_output_size(size, first_kernel, padding, first_stride) - 2 * (min_layers - 1) * (1 - padding)
    blocks = 0
    while first >= _size_needed_after(blocks, min_layers):
        blocks += 1
    return blocks


def _size_needed_after(blocks_left: int, min_layers: int) -> int:
    """The smallest map a block can hand on (before the pool) so that `blocks_left` unpadded blocks
    of `min_layers` 3x3 convs still leave at least 1x1."""
    size = 1
    for _ in range(blocks_left):
        size = 2 * (size + 2 * min_layers)
    return size


def scaled(shape: ArchSpec, scale: float, bounds: tuple[int, int]) -> ArchSpec:
    """`shape` with relative widths as its widths: each times `scale`, rounded half up, held to `bounds`."""
    low, high = bounds

    def width(relative: float) -> int:
        return min(high, max(low, math.floor(relative * scale + 0.5)))

    return dataclasses.replace(
        shape,
        blocks=tuple(dataclasses.replace(b, widths=tuple(map(width, b.widths))) for b in shape.blocks),
        tail=tuple(map(width, shape.tail)),
    )


def fit_widths(shape: ArchSpec, bounds: tuple[int, int], limit: float | Callable[[ArchSpec], bool]) -> ArchSpec:
    """The widest scaling of `shape` with at most `limit` parameters (or that `limit` accepts, a
    test monotone in the widths); the narrowest one if none fits or if the feature map shrinks away
    (count_params then says so).

    Widths never shrink as the scale grows, so the parameter count is monotone in it, and the
    largest fitting scale is found by bisection."""
    fits = limit if callable(limit) else lambda arch: count_params(arch) <= limit
    relative = [w for b in shape.blocks for w in b.widths] + list(shape.tail)
    low, high = 0.0, bounds[1] / min(relative) + 1.0  # every width at bounds[0], at bounds[1]
    try:
        if fits(scaled(shape, high, bounds)):
            return scaled(shape, high, bounds)
    except SpecError:
        return scaled(shape, low, bounds)
    for _ in range(60):
        middle = (low + high) / 2
        if fits(scaled(shape, middle, bounds)):
            low = middle
        else:
            high = middle
    return scaled(shape, low, bounds)


def params_for(preset: Preset, space: SpaceConfig | None = None, budget: int | Budget | None = None) -> dict[str, Any]:
    """The trial params that make `suggest` (with this `space` and `budget`) rebuild a preset, as
    used to enqueue the seed's models. Without a space: version 1's params."""
    return params_of(preset.arch, preset.train, space or SpaceConfig(version=1), budget)


def params_of(arch: ArchSpec, train: TrainConfig, space: SpaceConfig, budget: int | Budget | None = None
              ) -> dict[str, Any]:
    """The trial params that describe `arch` and `train` in `space` under `budget` (the study's
    whole budget: its share, `budget_fraction`, is that of the tightest limit). Whether the space holds them
    (widths and shares within its ranges) is for the caller to check, by rebuilding through
    FixedTrial, which warns on a value out of range."""
    params: dict[str, Any] = {"n_blocks": len(arch.blocks), "b0_padding": arch.blocks[0].padding}
    if space.image_sizes:
        params["image_size"] = arch.input_size
    for i, block in enumerate(arch.blocks):
        params[f"b{i}_layers"] = len(block.widths)
    params["tail_layers"] = len(arch.tail)
    if space.version == 3:
        return _params_of_v3(arch, train, space, budget)
    if space.version == 1:
        for i, block in enumerate(arch.blocks):
            params.update({f"b{i}_l{j}_width": w for j, w in enumerate(block.widths)})
        params.update({f"tail{k}_width": w for k, w in enumerate(arch.tail)})
    else:
        if budget is None:
            raise ValueError("a version-2 search space scales widths to the budget: pass budget=")
        widest = max(w for b in arch.blocks for w in (*b.widths, *arch.tail))
        for i, block in enumerate(arch.blocks):
            params.update({f"b{i}_l{j}_rel": w / widest for j, w in enumerate(block.widths)})
        params.update({f"tail{k}_rel": w / widest for k, w in enumerate(arch.tail)})
        params["budget_fraction"] = budget_share(arch, budget)
    params.update(
        dropout=arch.dropout,
        scheduler=train.scheduler,
        batch_size=train.batch_size,
        optimizer=train.optimizer,
        lr=train.lr,
        augment=train.augment,
        label_smoothing=train.label_smoothing,
    )
    if train.scheduler == "step":
        params.update(step_size=train.step_size, gamma=train.gamma)
    return params


def budget_share(arch: ArchSpec, budget: int | Budget) -> float:
    """The `budget_fraction` whose widest scaling is `arch`: its share of the budget it fills most.
    Half a unit above each count (a parameter, a MAC, a byte), so that floating-point error in
    fraction * limit cannot push `arch` out of its own share."""
    budget = as_budget(budget)
    share = (count_params(arch) + 0.5) / budget.params
    if budget.macs or budget.peak_ram or budget.flash:
        cost = costs(arch, budget.cost_model)
        share = max([share] + [(value + 0.5) / limit for value, limit in
                               ((cost.macs, budget.macs), (cost.peak_ram, budget.peak_ram),
                                (cost.flash, budget.flash)) if limit])
    return share


def _params_of_v3(arch: ArchSpec, train: TrainConfig, space: SpaceConfig, budget: int | Budget | None
                  ) -> dict[str, Any]:
    """Version 3's params of `arch`: every one version 3 could ask, then just those it does ask of
    them (a residual block's one width, `dw_norm` only where a block is separable, a fixed choice
    not at all)."""
    if budget is None:
        raise ValueError("a version-3 search space scales widths to the budget: pass budget=")
    widest = max(w for b in arch.blocks for w in (*b.widths, *arch.tail))
    params: dict[str, Any] = {"n_blocks": len(arch.blocks), "b0_padding": arch.blocks[0].padding,
                              "first_kernel": arch.first_kernel, "first_stride": arch.first_stride,
                              "image_size": arch.input_size, "tail_layers": len(arch.tail),
                              "dw_norm": arch.dw_norm, "dropout": arch.dropout,
                              "budget_fraction": budget_share(arch, budget)}
    for i, block in enumerate(arch.blocks):
        params.update({f"b{i}_padding": block.padding, f"b{i}_layers": len(block.widths), f"b{i}_op": block.op,
                       f"b{i}_residual": block.residual})
        params.update({f"b{i}_l{j}_rel": w / widest for j, w in enumerate(block.widths)})
    params.update({f"tail{k}_rel": w / widest for k, w in enumerate(arch.tail)})
    params.update(scheduler=train.scheduler, batch_size=train.batch_size, optimizer=train.optimizer, lr=train.lr,
                  augment=train.augment, label_smoothing=train.label_smoothing, step_size=train.step_size,
                  gamma=train.gamma)
    return _asked(params, space, budget, arch.shape)


def _asked(params: dict[str, Any], space: SpaceConfig, budget: int | Budget, shape: Shape = MNIST_SHAPE
           ) -> dict[str, Any]:
    """Of `params`, those `space` asks when it rebuilds from them (all of them if it can't)."""
    trial = optuna.trial.FixedTrial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # out of range: express, the caller's check, says so
        try:
            suggest(trial, space, 1, 0, budget=budget, shape=shape)
        except (ValueError, SpecError):
            return params
    return {name: params[name] for name in trial.params}


def upgraded(params: dict[str, Any], space: SpaceConfig) -> dict[str, Any]:
    """A version-2 trial's params worded for the version-3 `space`: the same widths, shares and
    training, with plain 3x3 convs, later blocks unpadded, no residual and a 3x3 first conv (of
    those, the params `space` asks; a space that searches the input's side needs `image_size` among
    `params`). With the same budget it rebuilds the same net; with another,
    the same shape scaled to it (nas.study.create.enqueue_scaled)."""
    n_blocks = params.get("n_blocks", space.blocks[0])
    full = {**params, "first_kernel": 3, "first_stride": 1, "dw_norm": True,
            **{f"b{i}_{key}": value for i in range(n_blocks)
               for key, value in (("op", "conv"), ("padding", 0), ("residual", False)) if i or key != "padding"}}
    return _asked(full, space, budget=10**9)  # which params it asks, not the net: any budget


def express(params: dict[str, Any], space: SpaceConfig, budget: int | Budget, epochs: int, seed: int,
            shape: Shape = MNIST_SHAPE) -> tuple[optuna.trial.FixedTrial, ArchSpec, TrainConfig] | None:
    """Whether this space can take `params` as they are: every value within its ranges and choices,
    every param used, and a valid net within the budget. Returns the trial that took them (its
    `distributions` are this space's) with what `suggest` built from them, or None.

    The one check behind enqueuing presets, warm starts and scaled shapes."""
    trial = optuna.trial.FixedTrial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # FixedTrial warns of a value out of its range
        try:
            arch, train = suggest(trial, space, epochs, seed, budget=budget, shape=shape)
            params_used = set(trial.params) == set(params)
            fits = not as_budget(budget).over(arch)
        except (UserWarning, ValueError, SpecError):
            return None
    return (trial, arch, train) if params_used and fits else None


def smallest_arch(space: SpaceConfig, shape: Shape = MNIST_SHAPE, first_stride: int = 1) -> ArchSpec:
    """The architecture with the fewest parameters the space can produce for inputs of `shape`
    (unpadded: a version-2 space caps blocks where the map runs out), its first conv of stride
    `first_stride`; SpecError if the input is too small for any of its nets."""
    width = space.width[0]
    blocks = space.blocks[0]
    v3 = space.version == 3
    op = "sep" if v3 and "sep" in space.ops else "conv"  # fewer parameters than plain at any width
    kernel = min(space.first_kernel) if v3 else 3
    dw_norm = not (v3 and False in space.dw_norm)
    if space.version != 1:
        room = max(max_blocks(shape.size, padding, space.layers[0], kernel, first_stride)
                   for padding in space.first_padding)
        if room < 1:
            raise SpecError(f"a {shape.size}x{shape.size} input is too small for any net in the search space "
                            f"(its first block has at least {space.layers[0]} 3x3 convs)")
        blocks = min(blocks, room)
    padding = (max(space.first_padding) if blocks > max_blocks(shape.size, 0, space.layers[0], kernel, first_stride)
               else 0)
    return shape.arch(
        tuple(BlockSpec((width,) * space.layers[0], padding if i == 0 else 0, op) for i in range(blocks)),
        (width,) * space.tail_layers[0], first_kernel=kernel, dw_norm=dw_norm, first_stride=first_stride,
    )


def smallest_archs(space: SpaceConfig, shape: Shape = MNIST_SHAPE) -> list[ArchSpec]:
    """smallest_arch for each input side the space draws (`image_sizes`, else `shape`'s) and each
    first stride that side leaves room for; SpecError naming a side too small for any net."""
    archs = []
    for size in space.image_sizes or (shape.size,):
        sized, error = [], None
        for stride in space.first_stride if space.version == 3 else (1,):
            try:
                sized.append(smallest_arch(space, dataclasses.replace(shape, size=size), stride))
            except SpecError as exc:
                error = error or exc
        if not sized:
            raise error
        archs += sized
    return archs


# --- what a space draws, untrained (python -m nas.space --sample N) --------------------------------


def draw(space: SpaceConfig, budget: int | Budget, n: int, seed: int, shape: Shape = MNIST_SHAPE) -> list[ArchSpec]:
    """`n` architectures from Optuna's RandomSampler, none trained: what a study's random start-up
    trials draw, and where the TPE sampler starts from."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest(study.ask(), space, 1, seed, budget, shape)[0] for _ in range(n)]


def op_counts(archs: list[ArchSpec]) -> dict[str, int]:
    """How many of `archs` use each op: a plain 3x3 conv after the first, a separable conv, a residual add, a 5x5
    first conv, separable convs without BatchNorm+ReLU between their halves."""
    rows = []
    for arch in archs:
        table = layer_table(arch)  # its first row is the first conv, counted on its own
        rows.append([row.name for row in table[1:]] + ["residual"] * any(r.residual for r in table))
    return {
        "plain 3x3 (after the first conv)": sum("conv3x3" in names for names in rows),
        "separable 3x3": sum("dwconv3x3" in names for names in rows),
        "residual": sum("residual" in names for names in rows),
        "5x5 first conv": sum(arch.first_kernel == 5 for arch in archs),
        "separable without BN between": sum("dwconv3x3" in names and not arch.dw_norm
                                            for names, arch in zip(rows, archs)),
    }


def sample_report(archs: list[ArchSpec], budget: int | Budget, examples: int = 5, ops: bool = False) -> list[str]:
    """Lines saying how many of `archs` a study would reject (over any of its budgets), how large,
    costly and far-seeing the others are, and a few of them as layer strings; with `ops`, how many
    draws use each of version 3's ops (of those that build)."""
    budget = as_budget(budget)
    counted = []
    invalid = 0
    for arch in archs:
        try:
            counted.append((count_params(arch), arch))
        except SpecError:
            invalid += 1
    over = sum(1 for _, arch in counted if budget.over(arch))
    fits = [(params, arch) for params, arch in counted if not budget.over(arch)]
    lines = [f"over budget or invalid: {over + invalid} of {len(archs)} ({(over + invalid) / len(archs):.1%}); "
             f"{over} over budget, {invalid} invalid (feature map shrinks away)"]
    if counted:
        lines.append("parameters:      " + _spread([params for params, _ in counted], "{:,}"))
        for name, limit, value in (("MACs:           ", budget.macs, lambda c: c.macs),
                                   ("peak RAM (B):   ", budget.peak_ram, lambda c: c.peak_ram),
                                   ("flash (B):      ", budget.flash, lambda c: c.flash)):
            if limit:
                counts = [value(costs(arch, budget.cost_model)) for _, arch in counted]
                lines.append(name + " " + _spread(counts, "{:,}"))
    if ops and counted:
        lines.append("draws using each op: " + ", ".join(
            f"{name} {count}" for name, count in op_counts([arch for _, arch in counted]).items()))
    if fits:
        lines.append("receptive field: " + _spread([receptive_field(arch) for _, arch in fits], "{}"))
        distinct: dict[str, tuple[int, ArchSpec]] = {}
        for params, arch in fits:
            distinct.setdefault(layer_string(arch), (params, arch))
        lines.append("examples:")
        lines += [f"  {params:>6,} params, RF {receptive_field(arch):>2}: {text}"
                  for text, (params, arch) in list(distinct.items())[:examples]]
    return lines


def _spread(values: list[int], style: str) -> str:
    low, middle, high = min(values), statistics.median_low(values), max(values)
    return f"min {style.format(low)}, median {style.format(middle)}, max {style.format(high)}"
