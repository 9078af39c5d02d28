"""What a net costs a device, by one of two counts (a study stores which one its budgets use):

- "tflm" (studies made from 2026-12-07): what TensorFlow Lite Micro needs to run nas.tflite's int8
  file of the net. `peak_ram` bounds TFLM's arena: its GreedyMemoryPlanner simulated on the
  file's activation tensors (sizes rounded up to 16 bytes, sorted by size, first fit among those
  alive at once) plus a bound on the persistent tail (a TfLiteEvalTensor per tensor, a node per op,
  each op's data and per-channel multipliers, the allocator's own objects), all at their 64-bit sizes.
  It is never below the arena TFLM's 64-bit interpreter finds by bisection, and at most 10% + 1 KiB
  above it (tests/test_costmodel.py; docs/devices.md). `flash` bounds the .tflite's bytes.
- "mcunet" (studies made before): nas.spec.costs, MCUNet's count for a sequential net (a layer's
  input plus its output; int8 weights and 4-byte biases).

MACs are the same in both. Pure functions of the spec: no torch, no TFLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nas.spec import ArchSpec, Costs, layer_table
from nas.spec import costs as mcunet_costs

COST_MODELS = ("tflm", "mcunet")
CURRENT = "tflm"  # what new studies count with
BEFORE = "mcunet"  # what a study stored before cost models had names counted with
ALIGNMENT = 16  # TFLM's MicroArenaBufferAlignment: every planned buffer's size is rounded up to it

# The tail's bytes, bounds measured on tflite-micro's 64-bit Python interpreter (2026-12-07;
# docs/devices.md): its allocator's own objects and the input's and output's TfLiteTensors, and
# per tensor, per op and per output channel of a conv.
TAIL_FIXED = 1200
TAIL_PER_TENSOR = 24  # TfLiteEvalTensor
TAIL_PER_OP = 64 + 48  # NodeAndRegistration, and the op's data
TAIL_PER_CHANNEL = 8  # a conv's per-channel multiplier and shift (int32 each)
TAIL_PER_CONV = 96  # a conv's op data beyond the per-op share, with its arrays' alignment
# The .tflite's bytes beyond its constants, bounds of the flatbuffer's tables (nas.tflite.serialize)
FILE_FIXED = 400
FILE_PER_TENSOR = 48  # a tensor table, its shape and (shared where equal) quantization
FILE_PER_CONSTANT = 24  # a buffer table and its data's length and alignment
FILE_PER_CHANNEL = 8  # a weight's and a bias's float scale
FILE_PER_OP = 64  # an operator table, its input and output vectors, its options


class CostModelError(ValueError):
    """An unknown count."""


@dataclass(frozen=True)
class Buffer:
    """An activation tensor of the file, as TFLM's planner sees it."""

    size: int  # bytes, rounded up to ALIGNMENT
    first: int  # the op that writes it (0: the input)
    last: int  # the last op that reads it


@dataclass(frozen=True)
class Layout:
    """The tensors and ops nas.tflite writes for a spec, counted without building it."""

    buffers: tuple[Buffer, ...]  # activations, in tensor order
    tensors: int
    ops: int
    convs: int  # convs, depthwise convs and the classifier (ops with per-channel data)
    channels: int  # their output channels, summed
    constant_bytes: int  # int8 weights and int32 biases
    constants: int


def layout(spec: ArchSpec) -> Layout:
    """nas.tflite's graph of `spec`, in its order: QUANTIZE; per row of the layer table its op (a
    conv, depthwise conv, pool), a residual's ADD after the conv that ends it; AVERAGE_POOL_2D and
    FULLY_CONNECTED at the end. Each activation lives from the op that writes it to the last that reads it."""
    rows = layer_table(spec)
    spans: list[list[int]] = []  # [bytes, first op, last op] of each activation, in tensor order

    def new(size: int, op: int) -> int:
        spans.append([size, op, op])
        return len(spans) - 1

    pixels = spec.in_channels * spec.input_size * spec.input_size
    source = new(pixels, 0)  # the uint8 input
    op = 1
    spans[source][2] = op
    current = new(pixels, op)  # QUANTIZE's int8 copy
    tensors, convs, channels, constant_bytes, constants = 2, 0, 0, 0, 0
    block_input = None
    for index, row in enumerate(rows):
        starts_residual = row.residual and row.name != "pwconv1x1" or (
            row.name == "dwconv3x3" and index + 1 < len(rows) and rows[index + 1].residual)
        if starts_residual:
            block_input = current
        op += 1
        spans[current][2] = op
        current = new(math.prod(row.out_shape), op)
        tensors += 1
        if row.name in ("maxpool", "gap"):
            continue
        out = row.out_shape[0]
        has_bias = row.norm or row.name == "dwconv3x3"  # nas.tflite gives a depthwise conv a bias always
        constant_bytes += row.params - 2 * out * row.norm + 4 * out * has_bias
        constants += 1 + has_bias
        tensors += 1 + has_bias
        convs += 1
        channels += out
        if row.residual:  # its ADD
            op += 1
            spans[block_input][2] = spans[current][2] = op
            current = new(math.prod(row.out_shape), op)
            tensors += 1
    aligned = tuple(Buffer(-(-size // ALIGNMENT) * ALIGNMENT, first, last) for size, first, last in spans)
    return Layout(aligned, tensors, op, convs, channels, constant_bytes, constants)


def greedy_plan(buffers: tuple[Buffer, ...]) -> int:
    """The arena head TFLM's GreedyMemoryPlanner lays `buffers` out in
    (tensorflow/lite/micro/memory_planner/greedy_memory_planner.cc): largest first, ties in the
    order added; each at the lowest offset where it overlaps no placed buffer alive at the same time."""
    order = sorted(range(len(buffers)), key=lambda i: -buffers[i].size)  # stable, as its bubble sort
    placed: list[tuple[int, int]] = []  # (offset, buffer index), by offset
    for index in order:
        wanted = buffers[index]
        offset = 0
        for start, other in placed:
            them = buffers[other]
            if them.first > wanted.last or wanted.first > them.last:
                continue  # never alive together
            if start - offset >= wanted.size:
                break  # the gap before this one holds it
            offset = max(offset, start + them.size)
        placed.append((offset, index))
        placed.sort(key=lambda p: p[0])
    return max((start + buffers[i].size for start, i in placed), default=0)


def tflm_costs(spec: ArchSpec) -> Costs:
    """The "tflm" count: `peak_ram` a bound on TFLM's arena, `flash` a bound on the .tflite's bytes."""
    counted = layout(spec)
    head = greedy_plan(counted.buffers)
    tail = (TAIL_FIXED + TAIL_PER_TENSOR * counted.tensors + TAIL_PER_OP * counted.ops
            + TAIL_PER_CONV * counted.convs + TAIL_PER_CHANNEL * counted.channels)
    file = (FILE_FIXED + counted.constant_bytes + FILE_PER_TENSOR * counted.tensors
            + FILE_PER_CONSTANT * counted.constants + FILE_PER_CHANNEL * 2 * counted.channels
            + FILE_PER_OP * counted.ops)
    reference = mcunet_costs(spec)
    return Costs(reference.macs, head + tail, reference.peak_layer, file)


def costs(spec: ArchSpec, model: str = CURRENT) -> Costs:
    """`spec`'s MACs, peak RAM and flash by the count `model` ("tflm" or "mcunet")."""
    if model == "tflm":
        return tflm_costs(spec)
    if model == "mcunet":
        return mcunet_costs(spec)
    raise CostModelError(f"unknown cost model {model!r}; one of {', '.join(COST_MODELS)}")
