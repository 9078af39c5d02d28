"""Builds a torch module from an ArchSpec. Knows nothing of Optuna or training."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nas.spec import ArchSpec, validate

# PyTorch's channels-last BatchNorm kernel on CPU vectorizes across channels; with a channel count
# that is not a multiple of the vector width it falls back to slow loops.
CPU_VECTOR_CHANNELS = 16


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels-last CPU tensor, written as a handful of whole-tensor
    ops on its (N*H, W*C) view, where channel c sits in every C-th column: per-column sums fold to
    per-channel ones, and per-channel vectors tiled W times broadcast along the rows. Returns the
    output and the batch mean and biased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, h, w = x.shape
        rows = _rows(x)
        count = n * h * w
        mean, mean_square = _channel_sums(rows, rows, w) / count
        var = (mean_square - mean * mean).clamp_min_(0)
        rstd = torch.rsqrt(var + eps)
        scale = weight * rstd
        shift, scale = _tiled(torch.stack((bias - mean * scale, scale)), w)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(shift, rows, scale, out=_rows(out))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _mean_grad, _var_grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w
        rows = _rows(x)
        grad_rows = _rows(grad.contiguous(memory_format=torch.channels_last))
        grad_sum, grad_dot_x = _channel_sums(grad_rows, rows, w)
        grad_dot_normalized = rstd * (grad_dot_x - mean * grad_sum)  # sum of grad * (x - mean) * rstd
        # dx = scale * (grad - mean(grad) - normalized * mean(grad * normalized)), as a*grad + b*x + c
        a = weight * rstd
        b = -a * rstd * grad_dot_normalized / count
        a, b, offset = _tiled(torch.stack((a, b, -a * grad_sum / count - b * mean)), w)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(offset, grad_rows, a, out=_rows(grad_x)).addcmul_(rows, b)
        return grad_x, grad_dot_normalized, grad_sum, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The (N*H, W*C) view of a channels-last (N, C, H, W) tensor (no copy)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n * h, w * c)


def _channel_sums(rows: torch.Tensor, other: torch.Tensor, w: int) -> torch.Tensor:
    """Per-channel sums of `rows` and of `rows * other`, as a (2, C) tensor (few ops: each costs
    microseconds of dispatch, which is most of the time on small layers)."""
    columns = torch.stack((rows.sum(0), torch.linalg.vecdot(rows, other, dim=0)))
    return columns.view(2, w, -1).sum(1)


def _tiled(vectors: torch.Tensor, w: int) -> torch.Tensor:
    """Per-channel vectors (k, C), each repeated W times to match a row of _rows."""
    k, c = vectors.shape
    return vectors.unsqueeze(1).expand(k, w, c).reshape(k, w * c)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and numbers) that trains channels-last fp32 CPU
    tensors with awkward channel counts through _ChannelsLastBatchNorm: for Model 3's 10-channel
    28x28 layers, forward + backward take 1.0 ms there against 6.5 ms in PyTorch's kernel (2-core
    Xeon), which is what makes channels-last convolutions (3x faster there) worth having."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.affine and self.momentum is not None
                and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and x.shape[1] % CPU_VECTOR_CHANNELS and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            return super().forward(x)
        out, mean, var = _ChannelsLastBatchNorm.apply(x, self.weight, self.bias, self.eps)
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (count / max(count - 1, 1)), self.momentum)
        return out


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
        BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def build_model(spec: ArchSpec) -> nn.Sequential:
    validate(spec)
    layers: list[nn.Module] = []
    prev_channels = spec.in_channels
    for index, block in enumerate(spec.blocks):
        if index > 0:
            layers.append(nn.MaxPool2d(2))
        for width in block.widths:
            layers += conv_bn_relu(prev_channels, width, 3, block.padding)
            if spec.dropout > 0:
                layers.append(nn.Dropout2d(spec.dropout))
            prev_channels = width
    for width in spec.tail:
        layers += conv_bn_relu(prev_channels, width, 1, 0)
        prev_channels = width
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(prev_channels, spec.num_classes, 1, bias=False),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)
