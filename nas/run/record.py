"""How a model was trained, beyond its architecture and training config: one frozen record that a
trial stores as one user attribute, a checkpoint carries, and replay reads back to train it the
same way. Every field changes the numbers a run produces (or, for `subset` and `seed`, what it
trained on and from)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from nas.errors import NasError

BATCHNORM_PATHS = ("pytorch", "native")  # native: the C kernel of nas/cpu (opt-in)
MEMORY_FORMATS = ("nchw", "channels_last")
RUN_ATTR = "run"  # the user attribute a trial stores its record under


class RecordError(NasError):
    """A run record this version of nas cannot read (a stored trial's, or a results file's)."""


@dataclass(frozen=True)
class RunRecord:
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    threads: int | None = None  # torch's intra-op threads: CPU reductions, and so results, depend on it
    precision: str = "fp32"  # "fp32", or "bf16" autocast for forward passes (weights stay fp32)
    memory_format: str = "nchw"  # or "channels_last"
    batchnorm: str = "pytorch"  # which BatchNorm code runs: PyTorch's, or nas's C kernel ("native")
    weight_average: bool = True  # the evaluated and kept model is the moving average of the weights
    compiled: bool = False  # torch.compile
    subset: int | None = None  # trained on the first N training images; None: all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.memory_format not in MEMORY_FORMATS:
            raise RecordError(f"memory_format must be one of {MEMORY_FORMATS}, not {self.memory_format!r}")
        if self.batchnorm not in BATCHNORM_PATHS:
            raise RecordError(f"batchnorm must be one of {BATCHNORM_PATHS}, not {self.batchnorm!r}")

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecordError(f"unknown run record keys: {', '.join(sorted(unknown))}")
        return cls(**data)

    def describe(self) -> str:
        parts = [self.device, self.precision, "channels_last" if self.channels_last else "NCHW"]
        if self.threads:
            parts.append(f"{self.threads} thread{'s' * (self.threads > 1)}")
        if self.batchnorm != "pytorch":
            parts.append(f"{self.batchnorm} BatchNorm")
        if self.compiled:
            parts.append("compiled")
        if not self.weight_average:
            parts.append("no weight average")
        return ", ".join(parts)


def record_of(attrs: dict[str, Any]) -> RunRecord:
    """The run record of a stored trial, from its user attributes. Trials stored by earlier
    versions have no `run` attribute but separate ones, each added at a different time; every
    default for what they lack is here, and nowhere else:
    - before `precision` existed, trials trained in fp32 NCHW; from then until `channels_last`
      existed, always channels_last;
    - `batchnorm_kernel` said whether the C kernel could be loaded; it ran only on channels-last
      fp32 CPU tensors, so any other trial ran PyTorch's BatchNorm, as did trials before it existed;
    - before the weight average (`ema`) existed, the last step's weights were evaluated;
    - `compiled`, `threads`, `subset` absent: not compiled, the worker's default threads, all data."""
    if RUN_ATTR in attrs:
        return RunRecord.from_dict(attrs[RUN_ATTR])
    precision = attrs.get("precision", "fp32")
    channels_last = attrs.get("channels_last", "precision" in attrs)
    device = attrs.get("device", "cpu")
    kernel_ran = bool(attrs.get("batchnorm_kernel")) and channels_last and precision == "fp32" and device == "cpu"
    return RunRecord(
        device=device,
        threads=attrs.get("threads"),
        precision=precision,
        memory_format="channels_last" if channels_last else "nchw",
        batchnorm="native" if kernel_ran else "pytorch",
        weight_average=attrs.get("ema", False),
        compiled=attrs.get("compiled", False),
        subset=attrs.get("subset"),
        seed=attrs.get("seed", attrs.get("train", {}).get("seed", 0)),
    )
