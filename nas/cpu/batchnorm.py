"""The channels-last CPU paths of nas.model.BatchNormAct2d: the C kernel of batchnorm.c (batch norm
and ReLU in one pass), and a PyTorch-only training path for channel counts PyTorch's own
channels-last kernel handles slowly. All take fp32 channels-last (N, C, H, W) CPU tensors and an
nn.BatchNorm2d's parameters and buffers, and give that module's numbers to rounding."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nas.cpu import native


def native_training(x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm then ReLU, in the kernel; updates the module's running statistics."""
    return _NativeBatchNorm.apply(x, module.weight, module.bias, module)


def native_inference(x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
    """Evaluation-mode batch norm then ReLU in one pass of the kernel, without autograd."""
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    _check(native.library().nas_batchnorm_inference(
        x.data_ptr(), out.data_ptr(), n * h, w * c, c, module.weight.data_ptr(), module.bias.data_ptr(),
        module.running_mean.data_ptr(), module.running_var.data_ptr(), module.eps, True,
        torch.get_num_threads()))
    return out


def channels_last_training(x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm (no ReLU) in whole-tensor PyTorch ops; updates the running statistics."""
    out, mean, var = _ChannelsLastBatchNorm.apply(x, module.weight, module.bias, module.eps)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        module.running_mean.lerp_(mean, module.momentum)
        module.running_var.lerp_(var * (count / max(count - 1, 1)), module.momentum)
    return out


class _NativeBatchNorm(torch.autograd.Function):
    """Training-mode batch norm then ReLU in the C kernel: two passes over the data each way, where
    PyTorch takes about ten with the ReLU's. The kernel also updates the module's running statistics:
    every op saved here is tens of microseconds on a layer this small."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        n, c, h, w = x.shape
        out = torch.empty_like(x, memory_format=torch.channels_last)
        stats = x.new_empty(2, c)  # batch mean, 1/sqrt(biased variance + eps)
        pointer = stats.data_ptr()
        _check(native.library().nas_batchnorm_forward(
            x.data_ptr(), out.data_ptr(), n * h, w * c, c, weight.data_ptr(), bias.data_ptr(), module.eps, True,
            torch.get_num_threads(), pointer, pointer + c * stats.element_size(), module.running_mean.data_ptr(),
            module.running_var.data_ptr(), module.momentum, module.num_batches_tracked.data_ptr()))
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
            pointer, pointer + c * stats.element_size(), True, torch.get_num_threads(), grad_weight.data_ptr(),
            grad_bias.data_ptr()))
        return grad_x, grad_weight, grad_bias, None


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
