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

from dataclasses import dataclass

from nas.errors import NasError
from nas.spec import ArchSpec, Costs, layer_table
from nas.spec import costs as mcunet_costs

COST_MODELS = ("tflm", "mcunet")
CURRENT = "tflm"  # what new studies count with
BEFORE = "mcunet"  # what a study stored before cost models had names counted with
ALIGNMENT = 16  # TFLM's MicroArenaBufferAlignment: every planned buffer's size is rounded up to it

# TFLM's arena tail, 64-bit, from its allocations (tflite-micro's recording allocator; fitted on the
# 85 nets of docs/devices.md to within 3 bytes, then rounded up): the allocator's own objects, the
# input's and output's TfLiteTensors and the QUANTIZE, AVERAGE_POOL_2D and FULLY_CONNECTED ops' data;
# a TfLiteEvalTensor per tensor; a node, op data and parsed options per op; a conv's (and the
# classifier's) per-channel multipliers and shifts, two int32 arrays each aligned to 16 bytes.
TAIL_FIXED = 1136
TAIL_PER_TENSOR = 24
TAIL_PER_CONV = 176  # CONV_2D, DEPTHWISE_CONV_2D
TAIL_PER_OTHER = 144  # MAX_POOL_2D, ADD, PAD
# Planning needs room for an AllocationInfo per tensor and the planner's arrays per buffer (64-bit),
# which a net with small activations and many tensors may need more than its plan.
PLANNING_FIXED, PLANNING_PER_TENSOR, PLANNING_PER_BUFFER = 256, 32, 40
# The .tflite's bytes beyond its constants (nas.tflite.serialize): its distinct shape vectors and the
# per-channel scale and zero-point vectors are counted exactly, the rest by part (fitted on the 85 nets of
# docs/devices.md to within 150 bytes, then raised to bound them)
FILE_FIXED = 300  # root, Model, SubGraph and their vectors, the vtables, the empty buffer
FILE_PER_TENSOR = 64  # a Tensor table, its buffer and quantization tables, its index in op vectors
FILE_PER_ACTIVATION_QUANT = 20  # an activation's own scale and int64 zero point
FILE_PER_OP = 8
FILE_PER_OPTIONS = 48  # an options table (ops with equal options share one)
FILE_PER_CODE = 20  # an OperatorCode


class CostModelError(NasError):
    """An unknown count (say, a study stored by a newer nas)."""


@dataclass(frozen=True)
class Buffer:
    """An activation tensor of the file, as TFLM's planner sees it."""

    size: int  # bytes, rounded up to ALIGNMENT
    first: int  # the op that writes it (0: the input)
    last: int  # the last op that reads it


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    kind: str  # "activation", "weight", "bias" or "paddings" (a PAD's, int32, no quantization)
    nbytes: int
    shares: bool = False  # an activation with its input's quantization (a pool's output)


@dataclass(frozen=True)
class OpInfo:
    code: str
    inputs: int
    options: tuple  # what makes its options table (ops with equal options share one)


@dataclass(frozen=True)
class Layout:
    """The tensors and ops nas.tflite writes for a spec, counted without building it."""

    buffers: tuple[Buffer, ...]  # activations, in tensor order
    tensors: tuple[TensorInfo, ...]
    ops: tuple[OpInfo, ...]
    channels: tuple[int, ...]  # output channels of each op with per-channel multipliers

    @property
    def constant_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.kind != "activation")


def layout(spec: ArchSpec) -> Layout:
    """nas.tflite's graph of `spec`, in its order: QUANTIZE; per row of the layer table its op (a
    conv, depthwise conv, pool), a residual's ADD after the conv that ends it; AVERAGE_POOL_2D and
    FULLY_CONNECTED at the end. Each activation lives from the op that writes it to the last that reads it."""
    rows = layer_table(spec)
    spans: list[list[int]] = []  # [bytes, first op, last op] of each activation, in tensor order
    tensors: list[TensorInfo] = []
    ops: list[OpInfo] = []
    channels: list[int] = []

    def activation(shape: tuple[int, int, int], op: int, shares: bool = False) -> int:
        c, h, w = shape
        tensors.append(TensorInfo((1, h, w, c) if (h, w) != (0, 0) else (1, c), "activation", c * h * w, shares))
        spans.append([c * h * w, op, op])
        return len(spans) - 1

    def read(buffer: int, op: int) -> None:
        spans[buffer][2] = op

    shape = (spec.in_channels, spec.input_size, spec.input_size)
    source = activation(shape, 0)  # the uint8 input
    ops.append(OpInfo("QUANTIZE", 1, ()))
    read(source, 1)
    current = activation(shape, 1)  # its int8 copy
    block_input = None
    for index, row in enumerate(rows):
        if row.residual and row.name != "pwconv1x1" or (
                row.name == "dwconv3x3" and index + 1 < len(rows) and rows[index + 1].residual):
            block_input = current
        op = len(ops) + 1
        read(current, op)
        out, (c, h, w) = row.out_shape[0], row.in_shape
        if row.name in ("maxpool", "gap"):
            size = 2 if row.name == "maxpool" else h
            ops.append(OpInfo("MAX_POOL_2D" if row.name == "maxpool" else "AVERAGE_POOL_2D", 1, (size,)))
            current = activation(row.out_shape, op, shares=True)
            continue
        kernel = {"conv3x3": 3, "conv5x5": 5, "dwconv3x3": 3}.get(row.name, 1)
        first = index == 0
        stride = spec.first_stride if first else 1
        pad = kernel // 2 if (spec.blocks[0].padding if first else row.out_shape[1] == h) else 0
        padded = pad > 0
        if pad and not same_pads_as_pytorch(h, kernel, stride, pad):  # nas.tflite pads with a PAD op
            ops.append(OpInfo("PAD", 2, ()))
            current = activation((c, h + 2 * pad, w + 2 * pad), op, shares=True)
            tensors.append(TensorInfo((4, 2), "paddings", 32))
            op += 1
            read(current, op)
            padded = False
        if row.name == "classifier":
            tensors.append(TensorInfo((out, c), "weight", out * c))
            ops.append(OpInfo("FULLY_CONNECTED", 3, ()))
            tensors.append(TensorInfo((1, out), "activation", out))
            spans.append([out, op, op])
            current = len(spans) - 1
            channels.append(out)
            continue
        depthwise = row.name == "dwconv3x3"
        tensors.append(TensorInfo((1, kernel, kernel, out) if depthwise else (out, kernel, kernel, c), "weight",
                                  kernel * kernel * out * (1 if depthwise else c)))
        tensors.append(TensorInfo((out,), "bias", 4 * out))  # nas.tflite gives a depthwise conv a bias always
        relu = row.norm
        ops.append(OpInfo("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", 3, (padded, relu)))
        channels.append(out)
        current = activation(row.out_shape, op)
        if row.residual:  # its ADD
            op += 1
            ops.append(OpInfo("ADD", 2, ()))
            read(block_input, op)
            read(current, op)
            current = activation(row.out_shape, op)
    aligned = tuple(Buffer(-(-size // ALIGNMENT) * ALIGNMENT, first, last) for size, first, last in spans)
    return Layout(aligned, tuple(tensors), tuple(ops), tuple(channels))


def same_pads_as_pytorch(size: int, kernel: int, stride: int, pad: int) -> bool:
    """Whether TFLite's SAME padding pads a conv as PyTorch's `pad` pixels a side do (nas.tflite.Lowering.padded)."""
    out = (size + 2 * pad - kernel) // stride + 1
    total = max((out - 1) * stride + kernel - size, 0)
    return out == -(-size // stride) and total // 2 == pad


def greedy_plan(buffers: tuple[Buffer, ...]) -> int:
    """The arena head TFLM's GreedyMemoryPlanner lays `buffers` out in
    (tensorflow/lite/micro/memory_planner/greedy_memory_planner.cc): largest first, each at the
    lowest offset where it overlaps no placed buffer alive at the same time."""
    # Its bubble sort is stable, and it fills the array from the end: equal sizes go last added first.
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, -i))
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


def arena_bound(counted: Layout) -> int:
    """A bound on TFLM's arena (64-bit): the planned head (exact) or what planning needs, whichever
    is more, and a bound on the tail."""
    head = max(greedy_plan(counted.buffers),
               PLANNING_FIXED + PLANNING_PER_TENSOR * len(counted.tensors) + PLANNING_PER_BUFFER * len(counted.buffers))
    convs = sum(op.code in ("CONV_2D", "DEPTHWISE_CONV_2D") for op in counted.ops)
    others = sum(op.code in ("MAX_POOL_2D", "ADD", "PAD") for op in counted.ops)
    arrays = sum(2 * -(-4 * c // ALIGNMENT) * ALIGNMENT for c in counted.channels)
    return head + TAIL_FIXED + TAIL_PER_TENSOR * len(counted.tensors) + TAIL_PER_CONV * convs \
        + TAIL_PER_OTHER * others + arrays


def file_bound(counted: Layout) -> int:
    """A bound on the .tflite's bytes: its constants (with up to 3 bytes of padding each), its shapes,
    per-channel scales and zero points exactly, the flatbuffer's tables by part."""
    shapes = {t.shape for t in counted.tensors}
    constants = [t for t in counted.tensors if t.kind != "activation"]
    quantized_constants = [t for t in constants if t.kind != "paddings"]
    quantized = [t for t in counted.tensors if t.kind == "activation" and not t.shares]
    options = {(op.code, op.options) for op in counted.ops if op.options}
    codes = {op.code for op in counted.ops}
    lengths = [t.shape[-1] if t.shape[0] == 1 and len(t.shape) == 4 else t.shape[0] for t in quantized_constants]
    scales = sum(4 + 4 * n for n in lengths)
    zeros = sum(8 + 8 * n for n in set(lengths))  # int64 zero points, one a scale; equal vectors shared
    return (FILE_FIXED + sum(t.nbytes + 3 for t in constants) + scales + zeros + sum(4 + 4 * len(s) for s in shapes)
            + FILE_PER_TENSOR * len(counted.tensors) + FILE_PER_ACTIVATION_QUANT * len(quantized)
            + FILE_PER_OP * len(counted.ops) + FILE_PER_OPTIONS * len(options) + FILE_PER_CODE * len(codes))


def tflm_costs(spec: ArchSpec) -> Costs:
    """The "tflm" count: `peak_ram` a bound on TFLM's arena, `flash` a bound on the .tflite's bytes."""
    counted = layout(spec)
    reference = mcunet_costs(spec)
    return Costs(reference.macs, arena_bound(counted), reference.peak_layer, file_bound(counted))


def costs(spec: ArchSpec, model: str = CURRENT) -> Costs:
    """`spec`'s MACs, peak RAM and flash by the count `model` ("tflm" or "mcunet")."""
    if model == "tflm":
        return tflm_costs(spec)
    if model == "mcunet":
        return mcunet_costs(spec)
    raise CostModelError(f"unknown cost model {model!r}; one of {', '.join(COST_MODELS)}")
