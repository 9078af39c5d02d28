"""The search space: one function from an Optuna trial to an ArchSpec and a TrainConfig.

Parameter names are stable and indexed (`b1_l2_width` is block 1's third conv), so a stored
trial's params can be fed back through `optuna.trial.FixedTrial` to rebuild exactly what it trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import optuna

from nas.spec import ArchSpec, BlockSpec, Preset, TrainConfig


@dataclass(frozen=True)
class SpaceConfig:
    """Ranges searched; a (low, high) pair with low == high fixes that value without searching it."""

    blocks: tuple[int, int] = (2, 3)  # number of 3x3 blocks (max-pools sit between them)
    layers: tuple[int, int] = (1, 4)  # 3x3 convs per block
    width: tuple[int, int] = (4, 32)  # channels of any conv
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaceConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown search-space keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) for k, v in data.items()})


def _int(trial: optuna.Trial, name: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return low if low == high else trial.suggest_int(name, low, high)


def _float(trial: optuna.Trial, name: str, bounds: tuple[float, float], log: bool = False) -> float:
    low, high = bounds
    return float(low) if low == high else trial.suggest_float(name, low, high, log=log)


def _choice(trial: optuna.Trial, name: str, choices: tuple) -> Any:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def suggest(
    trial: optuna.Trial, space: SpaceConfig, epochs: int, seed: int
) -> tuple[ArchSpec, TrainConfig]:
    blocks = []
    for i in range(_int(trial, "n_blocks", space.blocks)):
        n_layers = _int(trial, f"b{i}_layers", space.layers)
        widths = tuple(_int(trial, f"b{i}_l{j}_width", space.width) for j in range(n_layers))
        padding = _choice(trial, "b0_padding", space.first_padding) if i == 0 else 0
        blocks.append(BlockSpec(widths, padding))
    tail = tuple(
        _int(trial, f"tail{k}_width", space.width) for k in range(_int(trial, "tail_layers", space.tail_layers))
    )
    arch = ArchSpec(blocks=tuple(blocks), tail=tail, dropout=_float(trial, "dropout", space.dropout))

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


def params_for(preset: Preset) -> dict[str, Any]:
    """The trial params that make `suggest` rebuild a preset (used to enqueue the seed's models)."""
    arch, train = preset.arch, preset.train
    params: dict[str, Any] = {"n_blocks": len(arch.blocks), "b0_padding": arch.blocks[0].padding}
    for i, block in enumerate(arch.blocks):
        params[f"b{i}_layers"] = len(block.widths)
        params.update({f"b{i}_l{j}_width": w for j, w in enumerate(block.widths)})
    params["tail_layers"] = len(arch.tail)
    params.update({f"tail{k}_width": w for k, w in enumerate(arch.tail)})
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


def smallest_arch(space: SpaceConfig) -> ArchSpec:
    """The architecture with the fewest parameters the space can produce."""
    width = space.width[0]
    return ArchSpec(
        blocks=tuple(BlockSpec((width,) * space.layers[0]) for _ in range(space.blocks[0])),
        tail=(width,) * space.tail_layers[0],
    )
