"""Builds a torch module from an ArchSpec, and its layer table in the seed study's style as
torchinfo measures the built model. Knows nothing of Optuna or training."""

from __future__ import annotations

import torch
import torchinfo
from torch import nn

from nas.cpu import native
from nas.cpu.batchnorm import channels_last_training, native_inference, native_training
from nas.run.record import BATCHNORM_PATHS
from nas.spec import ArchSpec, count_params, layer_table, validate

# PyTorch's channels-last BatchNorm kernel on CPU vectorizes across channels; with a channel count
# that is not a multiple of the vector width it falls back to slow loops.
CPU_VECTOR_CHANNELS = 16


class BatchNormAct2d(nn.BatchNorm2d):
    """nn.BatchNorm2d then ReLU, as one module (as timm's BatchNormAct2d): the parameters and buffers
    of nn.BatchNorm2d, so it loads their weights. `batchnorm`, fixed when the model is built, picks
    the code that runs on channels-last fp32 CPU tensors:
    - "pytorch": PyTorch's kernels, except in training with a channel count that is not a multiple of
      CPU_VECTOR_CHANNELS, where PyTorch's channels-last kernel is several times slower than in NCHW
      and a few whole-tensor ops do the same (nas.cpu.batchnorm.channels_last_training);
    - "native": nas.cpu's C kernel, batch norm and ReLU in one pass, in training and in evaluation
      without autograd. It must be buildable here: KernelUnavailable (a NasError) otherwise.
    Everything else (NCHW, bf16, CUDA, eval mode with autograd) runs nn.BatchNorm2d then ReLU, and so
    does torch.compile, which can't trace into C and fuses the rest itself. Both paths give
    nn.BatchNorm2d + ReLU's numbers to rounding, not bit for bit: a run records which one it took."""

    def __init__(self, num_features: int, batchnorm: str = "pytorch", **kwargs):
        if batchnorm not in BATCHNORM_PATHS:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_PATHS)}, not {batchnorm!r}")
        if batchnorm == "native":
            native.library()  # fails here, once, rather than in the first forward
        super().__init__(num_features, **kwargs)
        self.batchnorm = batchnorm
        self.act = nn.ReLU(inplace=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batchnorm={self.batchnorm!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.track_running_stats and self.affine and x.device.type == "cpu" and x.dtype == torch.float32
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return self.act(super().forward(x))
        kernel = self.batchnorm == "native" and not torch.compiler.is_compiling()
        if not self.training:
            if kernel and not torch.is_grad_enabled():  # the evaluation kernel has no backward
                return native_inference(x, self)
        elif self.momentum is not None:  # None: a cumulative average, which only PyTorch's kernel keeps
            if kernel:
                return native_training(x, self)
            if x.shape[1] % CPU_VECTOR_CHANNELS:
                return self.act(channels_last_training(x, self))
        return self.act(super().forward(x))


class ConvNet(nn.Sequential):
    """The built model: convolutions, BatchNormAct2d, pools, dropout, in order. Loads the state
    dicts of trials stored before BatchNormAct2d, when each BatchNorm was followed by a ReLU module
    of its own (no parameters, but it took a position, so later layers' keys were numbered one
    higher per ReLU)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        given = [key for key in state_dict if key.startswith(prefix)]
        expected = set(self.state_dict(prefix=prefix, keep_vars=True))
        if set(given) != expected:
            positions = self._positions_before_batchnorm_act()
            renamed = {}
            for key in given:
                position, _, rest = key[len(prefix):].partition(".")
                renamed[key] = f"{prefix}{positions.get(position, position)}.{rest}"
            if set(renamed.values()) == expected:
                state_dict.update({renamed[key]: state_dict.pop(key) for key in given})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _positions_before_batchnorm_act(self) -> dict[str, str]:
        """Each layer's position in the layout with a ReLU module after every BatchNorm -> its position now."""
        positions, old = {}, 0
        for now, module in enumerate(self):
            positions[str(old)] = str(now)
            old += 2 if isinstance(module, BatchNormAct2d) else 1
        return positions


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int,
                 batchnorm: str, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        BatchNormAct2d(out_channels, batchnorm),
    ]


class Add(nn.Module):
    """A residual's sum, as a module of its own so that summaries list it."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class Residual(nn.Module):
    """x + body(x): a conv (with its BatchNorm+ReLU) that adds its input to its output."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.body(x))


def separable_conv(in_channels: int, out_channels: int, padding: int, dw_norm: bool,
                   batchnorm: str) -> list[nn.Module]:
    """Depthwise 3x3 (one filter a channel), [BatchNorm+ReLU,] then pointwise 1x1 and BatchNorm+ReLU."""
    depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=padding, groups=in_channels, bias=False)
    return [depthwise, *([BatchNormAct2d(in_channels, batchnorm)] if dw_norm else []),
            *conv_bn_relu(in_channels, out_channels, 1, 0, batchnorm)]


def build_model(spec: ArchSpec, batchnorm: str = "pytorch") -> ConvNet:
    """The model of `spec`, its BatchNorm+ReLU on the `batchnorm` path (BatchNormAct2d): "pytorch"
    (the default) or the opt-in "native" C kernel, which raises KernelUnavailable where it can't
    be built."""
    validate(spec)
    layers: list[nn.Module] = []
    prev_channels = spec.in_channels
    residuals = iter(row.residual for row in layer_table(spec) if row.name in ("conv3x3", "conv5x5", "pwconv1x1"))
    for index, block in enumerate(spec.blocks):
        if index > 0:
            layers.append(nn.MaxPool2d(2))
        for position, width in enumerate(block.widths):
            first = index == 0 and position == 0
            if block.op == "sep" and not first:
                unit = separable_conv(prev_channels, width, block.padding, spec.dw_norm, batchnorm)
            else:
                kernel = spec.first_kernel if first else 3
                unit = conv_bn_relu(prev_channels, width, kernel, block.padding * (kernel // 2), batchnorm,
                                    spec.first_stride if first else 1)
            layers += [Residual(*unit)] if next(residuals) else unit
            if spec.dropout > 0:
                layers.append(nn.Dropout2d(spec.dropout))
            prev_channels = width
    for width in spec.tail:
        layers += conv_bn_relu(prev_channels, width, 1, 0, batchnorm)
        prev_channels = width
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(prev_channels, spec.num_classes, 1, bias=False),
        nn.Flatten(),
    ]
    return ConvNet(*layers)


# --- the layer table (python -m nas.summary) ---------------------------------------------------

RULE = "-" * 64
DOUBLE_RULE = "=" * 64


def summary_table(arch: ArchSpec) -> str:
    """The seed's table (layer, output shape, params, totals) followed by receptive fields."""
    model = build_model(arch)
    stats = torchinfo.summary(
        model, input_size=(1, arch.in_channels, arch.input_size, arch.input_size), verbose=0, device="cpu"
    )
    lines = [RULE, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", DOUBLE_RULE]
    index = 0
    for layer in stats.summary_list:
        fused = isinstance(layer.module, BatchNormAct2d)  # the seed's BatchNorm2d row; its ReLU follows
        if (layer.children and not fused) or layer.class_name == "Flatten":
            continue  # containers, and the flatten that only drops two unit dimensions
        index += 1
        shape = str([-1, *layer.output_size[1:]])
        name = "BatchNorm2d" if fused else layer.class_name
        if isinstance(layer.module, nn.Conv2d) and layer.module.groups > 1:
            name = "DepthwiseConv2d"  # a separable conv's first half; an Add row is a residual's sum
        lines.append(f"{f'{name}-{index}':>20}  {shape:>25} {layer.num_params:>15,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += [
        DOUBLE_RULE,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        RULE,
    ]
    lines.append(receptive_field_line(arch))
    return "\n".join(lines)


def receptive_field_line(arch: ArchSpec) -> str:
    fields = [row.receptive_field for row in layer_table(arch) if row.name not in ("gap", "classifier")]
    return (
        f"Receptive field: {fields[-1]}x{fields[-1]} before global average pooling "
        f"(per layer: {' '.join(map(str, fields))}); analytic parameter count {count_params(arch):,}"
    )
