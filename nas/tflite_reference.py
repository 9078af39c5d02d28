"""An int8 reference for nas.tflite's graphs in numpy: each op computed as TFLite's reference
kernels compute it (tensorflow/lite/kernels/internal/reference/integer_ops and common.h): int32
accumulation over (input - input zero point) x weight, the per-channel multiplier and shift that
QuantizeMultiplier makes of input scale x weight scale / output scale, gemmlowp's rounding
doubling high multiply and rounding right shift, the output zero point, the fused activation's
clamp. Tests hold TensorFlow Lite Micro's outputs to it, op by op.

Batched (N images at once), int64 throughout (TFLite's int32 accumulators never overflow on these
nets: the test checks the accumulators' range).
"""

from __future__ import annotations

import math

import numpy as np

from nas.tflite import Graph, Op, Tensor

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: a Q31 significand and a power-of-two exponent of `real`."""
    if real == 0.0:
        return 0, 0
    significand, shift = math.frexp(real)
    fixed = int(math.floor(abs(significand) * (1 << 31) + 0.5)) * (1 if significand >= 0 else -1)  # std::round
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        return (1 << 31) - 1, 30
    return fixed, shift


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    product = a * b
    nudge = np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    total = product + nudge
    result = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C++ division truncates toward zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, result)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    x, exponent = np.asarray(x, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding, the default build)."""
    shift = np.asarray(shift, np.int64)
    left = np.where(shift > 0, shift, 0)
    right = np.where(shift > 0, 0, -shift)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(np.asarray(x, np.int64) << left, multiplier),
                                  right)


def activation_range(output: Tensor, relu: bool) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for int8: ReLU clamps at the output's real zero."""
    low = max(-128, int(output.zero_point[0])) if relu else -128
    return low, 127


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TFLite's SAME padding (before, after): the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def per_channel(graph: Graph, op: Op) -> tuple[np.ndarray, np.ndarray]:
    """Each output channel's multiplier and shift, as TFLM's Prepare computes them (in double from
    the float32 scales)."""
    source, weights, output = (graph.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    pairs = [quantize_multiplier(float(source.scale[0]) * float(s) / float(output.scale[0])) for s in weights.scale]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def requantize(acc: np.ndarray, graph: Graph, op: Op) -> np.ndarray:
    output = graph.tensors[op.outputs[0]]
    multiplier, shift = per_channel(graph, op)
    result = multiply_by_quantized_multiplier(acc, multiplier, shift) + int(output.zero_point[0])
    low, high = activation_range(output, op.relu)
    return np.clip(result, low, high)


def windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """(N, H, W, C) -> (N, OH, OW, k, k, C): every kernel window, VALID."""
    view = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))  # N, OH, OW, C, k, k
    return view[:, ::stride, ::stride].transpose(0, 1, 2, 4, 5, 3)


def padded_input(graph: Graph, op: Op, x: np.ndarray, kernel: int) -> np.ndarray:
    """x minus its zero point, padded with zeros (a padded pixel adds nothing, as in TFLite)."""
    shifted = x.astype(np.int64) - int(graph.tensors[op.inputs[0]].zero_point[0])
    if op.padding == "SAME":
        top, bottom = same_padding(x.shape[1], kernel, op.stride)
        left, right = same_padding(x.shape[2], kernel, op.stride)
        shifted = np.pad(shifted, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return shifted


def conv(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    weights = graph.tensors[op.inputs[1]].data.astype(np.int64)  # (O, kh, kw, I)
    patches = windows(padded_input(graph, op, x, weights.shape[1]), weights.shape[1], op.stride)
    acc = np.einsum("nhwabi,oabi->nhwo", patches, weights)
    if op.inputs[2] >= 0:
        acc = acc + graph.tensors[op.inputs[2]].data.astype(np.int64)
    check_accumulator(acc)
    return requantize(acc, graph, op)


def depthwise_conv(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    weights = graph.tensors[op.inputs[1]].data.astype(np.int64)[0]  # (kh, kw, C)
    patches = windows(padded_input(graph, op, x, weights.shape[0]), weights.shape[0], op.stride)
    acc = np.einsum("nhwabc,abc->nhwc", patches, weights)
    if op.inputs[2] >= 0:
        acc = acc + graph.tensors[op.inputs[2]].data.astype(np.int64)
    check_accumulator(acc)
    return requantize(acc, graph, op)


def fully_connected(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    weights = graph.tensors[op.inputs[1]].data.astype(np.int64)  # (O, D)
    flat = x.reshape(len(x), -1).astype(np.int64) - int(graph.tensors[op.inputs[0]].zero_point[0])
    acc = flat @ weights.T
    if op.inputs[2] >= 0:
        acc = acc + graph.tensors[op.inputs[2]].data.astype(np.int64)
    check_accumulator(acc)
    return requantize(acc, graph, op)


def max_pool(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    result = windows(x.astype(np.int64), op.filter, op.stride).max(axis=(3, 4))
    return np.clip(result, *activation_range(graph.tensors[op.outputs[0]], op.relu))


def average_pool(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    acc = windows(x.astype(np.int64), op.filter, op.stride).sum(axis=(3, 4))
    count = op.filter * op.filter
    rounded = np.where(acc > 0, acc + count // 2, acc - count // 2)
    result = np.where(rounded >= 0, rounded // count, -((-rounded) // count))  # C++ division
    return np.clip(result, *activation_range(graph.tensors[op.outputs[0]], op.relu))


def add(graph: Graph, op: Op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TFLite's int8 ADD: both inputs to a common scale with 20 bits of headroom, summed, rescaled."""
    first, second, output = (graph.tensors[i] for i in (*op.inputs, op.outputs[0]))
    left_shift = 20
    twice_max = 2 * max(float(first.scale[0]), float(second.scale[0]))
    m1, s1 = quantize_multiplier(float(first.scale[0]) / twice_max)
    m2, s2 = quantize_multiplier(float(second.scale[0]) / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * float(output.scale[0])))

    def scaled(x: np.ndarray, zero: int, multiplier: int, shift: int) -> np.ndarray:
        shifted = (x.astype(np.int64) - zero) * (1 << left_shift)
        return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), -shift)

    total = scaled(a, int(first.zero_point[0]), m1, s1) + scaled(b, int(second.zero_point[0]), m2, s2)
    result = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(total, mo), -so) + int(output.zero_point[0])
    return np.clip(result, *activation_range(output, op.relu))


def quantize(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    """QUANTIZE uint8 -> int8 (TFLite's Requantize)."""
    source, output = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    multiplier, shift = quantize_multiplier(float(source.scale[0]) / float(output.scale[0]))
    shifted = x.astype(np.int64) - int(source.zero_point[0])
    return np.clip(multiply_by_quantized_multiplier(shifted, multiplier, shift) + int(output.zero_point[0]), -128, 127)


def pad(graph: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    paddings = graph.tensors[op.inputs[1]].data
    return np.pad(x, [tuple(p) for p in paddings], constant_values=int(graph.tensors[op.inputs[0]].zero_point[0]))


def check_accumulator(acc: np.ndarray) -> None:
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError("an int32 accumulator would overflow")


def run(graph: Graph, images: np.ndarray) -> dict[int, np.ndarray]:
    """Every activation tensor's values (by tensor index, batch first, NHWC) for `images` (uint8,
    N H W C), computed op by op."""
    values = {graph.inputs[0]: images}
    for op in graph.ops:
        x = values[op.inputs[0]]
        if op.code == "QUANTIZE":
            out = quantize(graph, op, x)
        elif op.code == "CONV_2D":
            out = conv(graph, op, x)
        elif op.code == "DEPTHWISE_CONV_2D":
            out = depthwise_conv(graph, op, x)
        elif op.code == "FULLY_CONNECTED":
            out = fully_connected(graph, op, x)
        elif op.code == "MAX_POOL_2D":
            out = max_pool(graph, op, x)
        elif op.code == "AVERAGE_POOL_2D":
            out = average_pool(graph, op, x)
        elif op.code == "ADD":
            out = add(graph, op, x, values[op.inputs[1]])
        elif op.code == "PAD":
            out = pad(graph, op, x)
        else:
            raise ValueError(f"no reference for {op.code}")
        values[op.outputs[0]] = out.astype(np.int8)
    return values


def logits(graph: Graph, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """The int8 output for `images` (uint8, N C H W as the data holds them)."""
    nhwc = images.transpose(0, 2, 3, 1)
    return np.concatenate([run(graph, nhwc[i:i + batch])[graph.outputs[0]] for i in range(0, len(nhwc), batch)])
