"""Architecture and training specs: frozen, JSON-round-trippable, and the pure maths on them.

An architecture is a sequence of blocks of 3x3 convs separated by 2x2 max-pools, then an optional
tail of 1x1 convs, global average pooling and a 1x1 classifier. No conv has a bias, and every conv but
the classifier is followed by BatchNorm + ReLU, which is what the seed study's parameter counts show.

Space version 3's ops, each off by default (so every older spec reads and builds as before):
- the net's first conv may be 5x5 (`first_kernel`); it is always a plain conv, and may have stride 2
  (`first_stride`: early downsampling, as MCUNet's nets open and µNAS's convs may);
- a block's other convs may be depthwise-separable (`op = "sep"`): a depthwise 3x3 conv (one filter
  per channel), then a 1x1 pointwise conv to the block's width; BatchNorm+ReLU after both, or after
  the pointwise conv only (`dw_norm = False`: the two convs are then one factorized linear map);
- a block may be residual: every conv in it whose output has its input's shape (padded, same
  width) adds its input to its output (after its ReLU: x + relu(bn(conv(x)))).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.errors import NasError


class SpecError(NasError):
    """A spec that cannot be built (bad field, or a feature map that shrinks away)."""


OPS = ("conv", "sep")  # a block's convs: plain 3x3, or depthwise-separable 3x3 (depthwise 3x3 + 1x1)
STRIDES = (1, 2)  # the first conv's stride


@dataclass(frozen=True)
class BlockSpec:
    widths: tuple[int, ...]  # output channels of each 3x3 conv, in order
    padding: int = 0  # 1: every conv in the block keeps the map's size (a 3x3 pads 1, a 5x5 pads 2)
    op: str = "conv"  # "sep": its convs (but the net's first) are depthwise-separable
    residual: bool = False  # each conv whose output has its input's shape adds its input


@dataclass(frozen=True)
class Shape:
    """What a net sees and says: its input's channels and (square) side, and its classes."""

    channels: int = 1
    size: int = 28
    classes: int = 10

    def arch(self, blocks: tuple[BlockSpec, ...], tail: tuple[int, ...] = (), dropout: float = 0.0,
             first_kernel: int = 3, dw_norm: bool = True, first_stride: int = 1) -> ArchSpec:
        return ArchSpec(blocks, tail, dropout, in_channels=self.channels, input_size=self.size,
                        num_classes=self.classes, first_kernel=first_kernel, dw_norm=dw_norm,
                        first_stride=first_stride)


MNIST_SHAPE = Shape()


@dataclass(frozen=True)
class ArchSpec:
    blocks: tuple[BlockSpec, ...]  # a 2x2 max-pool sits between consecutive blocks
    tail: tuple[int, ...] = ()  # 1x1 conv widths after the last block, before global pooling
    dropout: float = 0.0  # Dropout2d after every 3x3 conv's ReLU; 0 leaves no layer at all
    in_channels: int = 1
    input_size: int = 28
    num_classes: int = 10
    first_kernel: int = 3  # the net's first conv: 3x3 or 5x5 (always a plain conv)
    dw_norm: bool = True  # separable convs: BatchNorm+ReLU after the depthwise conv too
    first_stride: int = 1  # 2: the first conv halves the map (early downsampling)

    @property
    def shape(self) -> Shape:
        return Shape(self.in_channels, self.input_size, self.num_classes)

    @property
    def version3(self) -> bool:
        """Whether it uses any of space version 3's ops."""
        return (self.first_kernel != 3 or not self.dw_norm or self.first_stride != 1
                or any(b.op != "conv" or b.residual for b in self.blocks))

    def to_dict(self) -> dict[str, Any]:
        """Its fields; version 3's only where they differ from their defaults, so a spec without
        them reads (and is stored, hashed and cached) exactly as it always was."""
        data = dataclasses.asdict(self)
        for block in data["blocks"]:
            for name, default in (("op", "conv"), ("residual", False)):
                if block[name] == default:
                    del block[name]
        for name, default in (("first_kernel", 3), ("dw_norm", True), ("first_stride", 1)):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        fields = dict(data)
        fields["blocks"] = tuple(
            BlockSpec(widths=tuple(b["widths"]), padding=b.get("padding", 0), op=b.get("op", "conv"),
                      residual=bool(b.get("residual", False)))
            for b in fields["blocks"]
        )
        fields["tail"] = tuple(fields.get("tail", ()))
        spec = cls(**fields)
        validate(spec)
        return spec


OPTIMIZERS = ("adam", "sgd")  # nas.train.make_optimizer builds each
SCHEDULERS = ("none", "step", "onecycle")  # nas.train.lr_factor computes each


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" or "sgd" (SGD always with Nesterov-free momentum)
    lr: float = 0.005
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    scheduler: str = "step"  # "none", "step" (StepLR) or "onecycle" (OneCycleLR, peak = lr)
    step_size: int = 8  # StepLR: epochs between decays
    gamma: float = 0.1  # StepLR: decay factor
    augment: float = 0.0  # 0..1: up to 15 degrees rotation and 10% translation at 1
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise SpecError(f"unknown scheduler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    arch: ArchSpec
    train: TrainConfig
    note: str = field(default="", compare=False)


# The seed study's three hand-designed models. Batch sizes follow from its logs (469 steps per
# epoch is 128, 938 is 64); the seed names Adam as its optimizer and gives LR and scheduler per model.
PRESETS: dict[str, Preset] = {
    "model1": Preset(
        ArchSpec(blocks=(BlockSpec((8, 16, 8)), BlockSpec((16, 8, 16, 8)))),
        TrainConfig(epochs=15, batch_size=128, lr=0.02, scheduler="none"),
        "baseline: 1-8-16-8 | 16-8-16-8, no padding",
    ),
    "model2": Preset(
        ArchSpec(blocks=(BlockSpec((10, 10, 10)), BlockSpec((16, 16, 8, 8))), tail=(16,)),
        TrainConfig(epochs=15, batch_size=64, lr=0.005, scheduler="none"),
        "channel optimization + 1x1 before GAP",
    ),
    "model3": Preset(
        ArchSpec(
            blocks=(BlockSpec((10, 10, 10), padding=1), BlockSpec((16, 16, 8, 8))),
            tail=(8, 16),
        ),
        TrainConfig(epochs=15, batch_size=64, lr=0.005, scheduler="step", step_size=8, gamma=0.1),
        "padding in block 1, two 1x1 convs, StepLR(8, 0.1)",
    ),
}


@dataclass(frozen=True)
class LayerInfo:
    name: str  # "conv3x3", "conv5x5", "dwconv3x3", "pwconv1x1", "conv1x1" (tail), "maxpool", "gap", "classifier"
    out_shape: tuple[int, int, int]  # (channels, height, width)
    params: int
    receptive_field: int  # side of the input square one output pixel sees
    macs: int = 0  # multiply-accumulates of its convolution (as ptflops and fvcore count Conv2d)
    in_shape: tuple[int, int, int] = (0, 0, 0)
    norm: bool = False  # a BatchNorm follows it (its 2 parameters a channel are counted in `params`)
    residual: bool = False  # it adds the input of its (separable) conv to its output
    held: int = 0  # bytes of another activation kept in RAM meanwhile (a residual's input, if not its own)

    @property
    def activation_bytes(self) -> int:
        """Its input plus its output activation, one byte a value (int8), and a residual's input it
        holds until the add: what must be in RAM at once."""
        return math.prod(self.in_shape) + math.prod(self.out_shape) + self.held

    @property
    def flash_bytes(self) -> int:
        """Its int8 weights with BatchNorm folded into the conv: a byte a weight, a 4-byte bias a channel
        where a BatchNorm folds into it (the classifier, and a depthwise conv without BatchNorm, have none)."""
        if self.norm:
            channels = self.out_shape[0]
            return self.params - 2 * channels + 4 * channels  # BatchNorm's 2 per channel become one bias
        return self.params if self.name.endswith(("conv3x3", "conv5x5", "conv1x1")) or self.name == "classifier" else 0


def layer_table(spec: ArchSpec) -> list[LayerInfo]:
    """Every weighted or shape-changing layer with its output shape, parameters and receptive field.

    BatchNorm's two parameters per channel are folded into its conv's row. A separable conv is two
    rows, its depthwise and its pointwise conv.
    """
    validate_fields(spec)
    rows: list[LayerInfo] = []
    channels, size = spec.in_channels, spec.input_size
    rf, jump = 1, 1  # receptive field and the input-pixel distance between adjacent outputs
    for index, block in enumerate(spec.blocks):
        if index > 0:
            size //= 2
            rf, jump = rf + jump, jump * 2
            _check_size(size, "maxpool", index)
            rows.append(LayerInfo("maxpool", (channels, size, size), 0, rf, 0, rows[-1].out_shape))
        for position, width in enumerate(block.widths):
            before = (channels, size, size)
            first = index == 0 and position == 0
            kernel = spec.first_kernel if first else 3
            stride = spec.first_stride if first else 1
            size = conv_output_size(size, kernel, block.padding, stride)
            rf += (kernel - 1) * jump
            jump *= stride
            after = (width, size, size)
            residual = block.residual and before == after
            if block.op == "sep" and not first:
                name = "dwconv3x3"
                _check_size(size, name, index)
                dw = (channels, size, size)
                rows.append(LayerInfo(name, dw, 9 * channels + 2 * channels * spec.dw_norm, rf,
                                      9 * channels * size * size, before, norm=spec.dw_norm))
                rows.append(LayerInfo("pwconv1x1", after, channels * width + 2 * width, rf,
                                      channels * width * size * size, dw, norm=True, residual=residual,
                                      held=math.prod(before) if residual else 0))
            else:
                name = f"conv{kernel}x{kernel}"
                _check_size(size, name, index)
                rows.append(LayerInfo(name, after, kernel * kernel * channels * width + 2 * width, rf,
                                      kernel * kernel * channels * width * size * size, before, norm=True,
                                      residual=residual))
            channels = width
    for width in spec.tail:
        rows.append(LayerInfo("conv1x1", (width, size, size), channels * width + 2 * width, rf,
                              channels * width * size * size, (channels, size, size), norm=True))
        channels = width
    rows.append(LayerInfo("gap", (channels, 1, 1), 0, spec.input_size, 0, (channels, size, size)))
    rows.append(LayerInfo("classifier", (spec.num_classes, 1, 1), channels * spec.num_classes, spec.input_size,
                          channels * spec.num_classes, (channels, 1, 1)))
    return rows


def conv_output_size(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    """The side of a conv's output map: padded (`padding` 1, kernel // 2 pixels a side), it keeps the
    map's size, else shrinks it by kernel - 1; a stride of 2 then halves it, rounding up (PyTorch's
    floor((size + 2 pad - kernel) / stride) + 1)."""
    return (size + 2 * padding * (kernel // 2) - kernel) // stride + 1


def _check_size(size: int, layer: str, block: int) -> None:
    if size < 1:
        raise SpecError(f"feature map shrinks below 1x1 at a {layer} in block {block + 1}")


def count_params(spec: ArchSpec) -> int:
    return sum(row.params for row in layer_table(spec))


@dataclass(frozen=True)
class Costs:
    """What a net costs a small device, int8: its multiply-accumulates, the most activation bytes in
    RAM at once (MCUNet's peak for a sequential net: a layer's input plus its output), and the bytes
    of its weights with BatchNorm folded."""

    macs: int
    peak_ram: int
    peak_layer: int  # index into layer_table of the layer at the peak
    flash: int


def costs(spec: ArchSpec) -> Costs:
    rows = layer_table(spec)
    peak = max(range(len(rows)), key=lambda i: rows[i].activation_bytes)
    return Costs(sum(r.macs for r in rows), rows[peak].activation_bytes, peak, sum(r.flash_bytes for r in rows))


def cost_lines(spec: ArchSpec) -> list[str]:
    """Per layer and in total: output, MACs, activation bytes in RAM (input + output) and int8 flash."""
    rows = layer_table(spec)
    total = costs(spec)
    lines = [f"{'layer':>16} {'output':>12} {'MACs':>11} {'RAM B (in+out)':>15} {'flash B':>8}"]
    for i, row in enumerate(rows):
        c, h, w = row.out_shape
        mark = "  <- peak" if i == total.peak_layer else ""
        lines.append(f"{f'{row.name}-{i + 1}':>16} {f'{h}x{w}x{c}':>12} {row.macs:>11,} {row.activation_bytes:>15,} "
                     f"{row.flash_bytes:>8,}{mark}")
    lines.append(f"MACs {total.macs:,}; peak activation memory {total.peak_ram:,} B (int8, at layer "
                 f"{total.peak_layer + 1}); flash {total.flash:,} B (int8 weights, BatchNorm folded, 4-byte biases)")
    return lines


def receptive_field(spec: ArchSpec) -> int:
    """Receptive field of the last spatial layer, before global pooling makes it the whole image."""
    spatial = [row for row in layer_table(spec) if row.name not in ("gap", "classifier")]
    return spatial[-1].receptive_field


def layer_string(spec: ArchSpec) -> str:
    """The architecture in one short line: conv widths per block (`p1`: padded), `M` for each
    max-pool, `1x1:` the tail, e.g. Model 3 is `10-10-10p1 M 16-16-8-8 1x1:8-16`. Version 3's ops:
    `k5` after a 5x5 first conv's width, `/2` after a first conv of stride 2, `s` after a separable
    conv's, `+` after a conv that adds its input (residual), and `dwlin` at the end where separable
    convs have no BatchNorm+ReLU between their two convs, e.g. `8k5/2-12s-12s+p1 M 24s-24s+p1 1x1:16`."""
    residuals = iter(row.residual for row in layer_table(spec) if row.name in ("conv3x3", "conv5x5", "pwconv1x1"))
    blocks = []
    for index, block in enumerate(spec.blocks):
        words = []
        for position, width in enumerate(block.widths):
            first = index == 0 and position == 0
            word = str(width) + (f"k{spec.first_kernel}" if first and spec.first_kernel != 3 else "")
            word += f"/{spec.first_stride}" if first and spec.first_stride != 1 else ""
            word += "s" if block.op == "sep" and not first else ""
            words.append(word + ("+" if next(residuals) else ""))
        blocks.append("-".join(words) + ("p" + str(block.padding) if block.padding else ""))
    text = " M ".join(blocks) + (" 1x1:" + "-".join(map(str, spec.tail)) if spec.tail else "")
    if not spec.dw_norm and any(b.op == "sep" for b in spec.blocks):
        text += " dwlin"
    return text + (f" drop{spec.dropout:.2f}" if spec.dropout else "")


def validate_fields(spec: ArchSpec) -> None:
    if not spec.blocks:
        raise SpecError("an architecture needs at least one block")
    for i, block in enumerate(spec.blocks):
        if not block.widths:
            raise SpecError(f"block {i + 1} has no conv layers")
        if any(w < 1 for w in block.widths):
            raise SpecError(f"block {i + 1} has a conv width below 1: {block.widths}")
        if block.padding not in (0, 1):
            raise SpecError(f"block {i + 1} padding must be 0 or 1, got {block.padding}")
        if block.op not in OPS:
            raise SpecError(f"block {i + 1} op must be one of {', '.join(OPS)}, got {block.op!r}")
    if spec.first_kernel not in (3, 5):
        raise SpecError(f"first_kernel must be 3 or 5, got {spec.first_kernel}")
    if spec.first_stride not in STRIDES:
        raise SpecError(f"first_stride must be 1 or 2, got {spec.first_stride}")
    if any(w < 1 for w in spec.tail):
        raise SpecError(f"tail has a width below 1: {spec.tail}")
    if not 0.0 <= spec.dropout < 1.0:
        raise SpecError(f"dropout must be in [0, 1), got {spec.dropout}")


def validate(spec: ArchSpec) -> None:
    layer_table(spec)


def load_arch(name_or_path: str) -> tuple[ArchSpec, TrainConfig | None]:
    """A preset by name, or a JSON file holding an ArchSpec dict (optionally under "arch",
    with a "train" dict beside it)."""
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return preset.arch, preset.train
    path = Path(name_or_path)
    if not path.is_file():
        raise SpecError(f"{name_or_path}: neither a preset ({', '.join(PRESETS)}) nor a spec file")
    try:
        data = json.loads(path.read_text())
        if "arch" in data:
            train = TrainConfig.from_dict(data["train"]) if "train" in data else None
            return ArchSpec.from_dict(data["arch"]), train
        return ArchSpec.from_dict(data), None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SpecError(f"{path}: not a valid spec file ({exc})") from exc
