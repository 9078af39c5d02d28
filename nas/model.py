"""Builds a torch module from an ArchSpec. Knows nothing of Optuna or training."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nas import native
from nas.spec import ArchSpec, validate

# PyTorch's channels-last BatchNorm kernel on CPU vectorizes across channels; with a channel count
# that is not a multiple of the vector width it falls back to slow loops.
CPU_VECTOR_CHANNELS = 16
# Set on an output of BatchNorm2d(fuse_relu=True) that already went through the ReLU; ReLU passes it on.
RECTIFIED = "_nas_rectified"


class _NativeBatchNorm(torch.autograd.Function):
    """Training-mode batch norm (then ReLU if `relu`) of a channels-last fp32 CPU tensor in the C
    kernel of nas/batchnorm.c: two passes over the data each way, where the PyTorch-only path below
    takes about ten with the ReLU's. The kernel also updates the module's running statistics: every
    op saved here is tens of microseconds on a layer this small."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, relu):
        n, c, h, w = x.shape
        out = torch.empty_like(x, memory_format=torch.channels_last)
        stats = x.new_empty(2, c)  # batch mean, 1/sqrt(biased variance + eps)
        pointer = stats.data_ptr()
        _check(native.library().nas_batchnorm_forward(
            x.data_ptr(), out.data_ptr(), n * h, w * c, c, weight.data_ptr(), bias.data_ptr(), module.eps, relu,
            torch.get_num_threads(), pointer, pointer + c * stats.element_size(), module.running_mean.data_ptr(),
            module.running_var.data_ptr(), module.momentum, module.num_batches_tracked.data_ptr()))
        ctx.relu = relu
        ctx.save_for_backward(x, weight, bias, stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, stats = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_weight, grad_bias = x.new_empty(2, c)
        pointer = stats.data_ptr()
        _check(native.library().nas_batchnorm_backward(
            grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), n * h, w * c, c, weight.data_ptr(), bias.data_ptr(),
            pointer, pointer + c * stats.element_size(), ctx.relu, torch.get_num_threads(), grad_weight.data_ptr(),
            grad_bias.data_ptr()))
        return grad_x, grad_weight, grad_bias, None, None


def _check(status: int) -> None:
    if status:
        raise MemoryError("out of memory in the BatchNorm kernel")


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
    """nn.BatchNorm2d (same parameters, buffers and numbers to rounding) that trains channels-last
    fp32 CPU tensors in the C kernel of _NativeBatchNorm, or where that can't be built and the channel
    count is awkward, in _ChannelsLastBatchNorm; it also evaluates them in the kernel, without
    autograd (evaluation runs under inference_mode). PyTorch's channels-last kernel takes 6.5 ms forward +
    backward for Model 3's 10-channel 28x28 layers (1.0 ms in NCHW, 2-core Xeon); without a faster one
    channels-last convolutions (3x faster there) would not pay.

    With `fuse_relu` (the module after this one is a ReLU) the kernel applies the ReLU in the same
    pass and marks its output so that ReLU passes it on; elsewhere the ReLU does its own work."""

    def __init__(self, num_features: int, *args, fuse_relu: bool = False, kernel: bool = False, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.fuse_relu = fuse_relu
        self.kernel = kernel

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fuse_relu=True" if self.fuse_relu else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.track_running_stats and self.affine and x.device.type == "cpu" and x.dtype == torch.float32
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return super().forward(x)
        # torch.compile can't trace into C; it fuses the PyTorch-only path itself.
        kernel = self.kernel and not torch.compiler.is_compiling()
        if not self.training:
            if not (kernel and not torch.is_grad_enabled()):  # the evaluation kernel has no backward
                return super().forward(x)
            out = _native_inference(x, self)
        elif self.momentum is None:
            return super().forward(x)
        elif kernel:
            out = _NativeBatchNorm.apply(x, self.weight, self.bias, self, self.fuse_relu)
        elif x.shape[1] % CPU_VECTOR_CHANNELS:
            return self._pytorch_only(x)
        else:
            return super().forward(x)
        if self.fuse_relu:
            setattr(out, RECTIFIED, True)
        return out

    def _pytorch_only(self, x: torch.Tensor) -> torch.Tensor:
        out, mean, var = _ChannelsLastBatchNorm.apply(x, self.weight, self.bias, self.eps)
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (count / max(count - 1, 1)), self.momentum)
        return out


def _native_inference(x: torch.Tensor, module: BatchNorm2d) -> torch.Tensor:
    """Evaluation-mode batch norm (then ReLU if the module fuses it) in one pass of the C kernel."""
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    _check(native.library().nas_batchnorm_inference(
        x.data_ptr(), out.data_ptr(), n * h, w * c, c, module.weight.data_ptr(), module.bias.data_ptr(),
        module.running_mean.data_ptr(), module.running_var.data_ptr(), module.eps, module.fuse_relu,
        torch.get_num_threads()))
    return out


class ReLU(nn.ReLU):
    """nn.ReLU that passes on an input its BatchNorm2d(fuse_relu=True) already rectified."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if getattr(x, RECTIFIED, False) else super().forward(x)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int, kernel: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
        BatchNorm2d(out_channels, fuse_relu=True, kernel=kernel),
        ReLU(inplace=True),
    ]


def build_model(spec: ArchSpec, batchnorm: str = "pytorch") -> nn.Sequential:
    """The model of `spec`; batchnorm "native" runs BatchNorm+ReLU in nas's C kernel (raises
    RuntimeError where it can't be built), "pytorch" never does."""
    validate(spec)
    kernel = batchnorm == "native"
    if kernel and native.library() is None:
        raise RuntimeError("nas's C BatchNorm kernel can't be built here (see the warning above)")
    layers: list[nn.Module] = []
    prev_channels = spec.in_channels
    for index, block in enumerate(spec.blocks):
        if index > 0:
            layers.append(nn.MaxPool2d(2))
        for width in block.widths:
            layers += conv_bn_relu(prev_channels, width, 3, block.padding, kernel)
            if spec.dropout > 0:
                layers.append(nn.Dropout2d(spec.dropout))
            prev_channels = width
    for width in spec.tail:
        layers += conv_bn_relu(prev_channels, width, 1, 0, kernel)
        prev_channels = width
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(prev_channels, spec.num_classes, 1, bias=False),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)
