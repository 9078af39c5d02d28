"""A trained net as a full-integer TFLite file for TensorFlow Lite Micro (python -m nas.deploy):
the BatchNorm-folded net lowered to TFLite ops, quantized as TFLite's int8 spec asks and written
as a flatbuffer with TFLite's own schema (the `tflite` package's generated builders).

The int8 spec, as followed here:
- weights int8, symmetric, per output channel (zero point 0, range -127..127); a depthwise conv's
  channels are its last dimension (quantized_dimension 3);
- biases int32, zero point 0, scale input scale x weight scale of their channel;
- activations int8, asymmetric, per tensor, their ranges the minimum and maximum (0 included) seen on
  the calibration images, as ONNX Runtime's MinMax calibration takes them; a ReLU is fused into its
  conv, whose output range then starts at 0;
- NHWC; max and average pooling keep their input's scale and zero point.

The file takes raw pixels: a uint8 (1, H, W, C) input, turned into int8 by a QUANTIZE op that only
subtracts 128. The data's normalization lives in the quantization parameters: the int8 tensor's
real value is (pixel - z) * s with s = 1/(255 std) and z = 255 mean rounded, so a padded conv pads
the normalized zero, as PyTorch does. What rounding z moves (and, for several channels, their
differing means and stds) is folded into the first conv's weights and bias: exact away from a
padded border, where the padded pixels miss the shift (0.004 of a normalized unit for MNIST).

Ops: QUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, MAX_POOL_2D, AVERAGE_POOL_2D (global average pooling),
ADD (a residual), PAD (a padded conv TFLite's SAME padding would pad differently), FULLY_CONNECTED
(the 1x1 classifier on the pooled 1x1 map, which it flattens itself). Nothing else is written: no
names, no metadata, one empty buffer shared by every activation, equal vectors and tables once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from nas.errors import NasError
from nas.model import Residual

TFLITE_FILE = "model-int8.tflite"
SCHEMA_VERSION = 3
# Buffer.data alignment: 4 bytes, what a microcontroller's word loads of the int32 biases need (the
# C array is 16-aligned, so offsets in the file are addresses' alignment). The schema's force_align
# of 16 serves phones' SIMD loads, and would pad Model 3's file by ~100 B.
BUFFER_ALIGNMENT = 4


class TFLiteError(NasError):
    """A net with a layer this writer (or TFLite Micro) has no int8 op for."""


@dataclass(eq=False)
class Tensor:
    """One tensor of the graph: its NHWC shape, type, quantization and, for a constant, its values."""

    shape: tuple[int, ...]
    dtype: str  # "uint8", "int8" or "int32"
    scale: np.ndarray  # float32, one value (per tensor) or one per channel
    zero_point: np.ndarray  # int64, one per scale (a weight's or bias's are all 0)
    dimension: int = 0  # the channel axis of per-channel scales
    data: np.ndarray | None = None  # a constant's values, of `dtype`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Op:
    """One operator: its TFLite name, input and output tensor indices (-1: an optional input left
    out) and its options (padding "SAME"/"VALID", stride, filter, relu)."""

    code: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    padding: str = "VALID"
    stride: int = 1
    filter: int = 0  # pools: the window's side
    relu: bool = False


@dataclass(eq=False)
class Graph:
    """A quantized net: tensors and ops in execution order, one input (uint8) and one output (int8)."""

    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()

    def add(self, tensor: Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    @property
    def op_codes(self) -> list[str]:
        """The distinct ops, in order of first use: what a TFLM resolver registers."""
        return list(dict.fromkeys(op.code for op in self.ops))

    @property
    def weight_bytes(self) -> int:
        """The bytes of its constants: int8 weights, int32 biases (and a PAD's paddings)."""
        return sum(t.nbytes for t in self.tensors if t.data is not None)


# --- quantization ---------------------------------------------------------------------------------


def activation_quant(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """int8 scale and zero point of an activation seen between `low` and `high` (0 always inside)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    zero = int(np.clip(round(-128.0 - low / float(scale)), -128, 127))
    return np.array([scale], np.float32), np.array([zero], np.int64)


def weight_quant(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and per-output-channel scales of `weight` (channels first): symmetric, -127..127."""
    flat = weight.reshape(len(weight), -1).astype(np.float64)
    peak = np.abs(flat).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.round(flat / scale.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return values.reshape(weight.shape), scale


def bias_quant(bias: np.ndarray, input_scale: np.float32, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 values and scales (input scale x weight scale, zero point 0) of a bias."""
    scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
    values = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    return np.clip(values, -2**31, 2**31 - 1).astype(np.int32), scale


def input_quant(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.float32, int]:
    """The int8 input tensor's scale and zero point: pixel p is real (p - z) * s, the normalized
    pixel of a one-channel input up to z's rounding (nas.tflite's docstring)."""
    scale = np.float32(1.0 / (255.0 * float(np.mean(std))))
    return scale, int(round(255.0 * float(np.mean(mean))))


def first_conv_fold(weight: torch.Tensor, bias: torch.Tensor | None, mean, std, scale: np.float32,
                    zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first conv's weight and bias taking x = (p - zero) * scale instead of the normalized
    pixels n_c = (p/255 - mean_c)/std_c = a_c x + b_c."""
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    a = 1.0 / (255.0 * std_t * float(scale))
    b = (zero - 255.0 * mean_t) / (255.0 * std_t)
    w = weight.double()
    folded_bias = (bias.double() if bias is not None else torch.zeros(len(w), dtype=torch.float64))
    folded_bias = folded_bias + (w * b.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return (w * a.view(1, -1, 1, 1)).float(), folded_bias.float()


# --- lowering: the folded torch net to a quantized graph -----------------------------------------


class Lowering:
    """Walks the folded net once, with the calibration images flowing through it in PyTorch (fp32),
    and adds each layer's int8 op with its output's calibrated range."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.graph = Graph()
        self.mean, self.std = mean, std
        self.first_conv = True

    def constant(self, values: np.ndarray, dtype: str, scale: np.ndarray, dimension: int = 0) -> int:
        # one zero point per scale, as TFLite (and LiteRT's loader) requires; TFLM alone would take one
        return self.graph.add(Tensor(tuple(values.shape), dtype, scale, np.zeros(len(scale), np.int64), dimension,
                                     np.ascontiguousarray(values.astype(dtype))))

    def activation(self, like: torch.Tensor, quant: tuple[np.ndarray, np.ndarray]) -> int:
        """An int8 activation of `like`'s (N, C, H, W) or (N, F) shape, batch 1, NHWC."""
        shape = (1, *like.shape[2:], like.shape[1]) if like.dim() == 4 else (1, like.shape[1])
        return self.graph.add(Tensor(shape, "int8", *quant))

    def calibrated(self, like: torch.Tensor) -> int:
        return self.activation(like, activation_quant(float(like.min()), float(like.max())))

    def start(self, images: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The uint8 input, its QUANTIZE to int8, and the normalized images in fp32."""
        scale, zero = input_quant(self.mean, self.std)
        n, c, h, w = images.shape
        raw = self.graph.add(Tensor((1, h, w, c), "uint8", np.array([scale], np.float32),
                                    np.array([zero], np.int64)))
        self.graph.inputs = (raw,)
        quantized = self.graph.add(Tensor((1, h, w, c), "int8", np.array([scale], np.float32),
                                          np.array([zero - 128], np.int64)))
        self.graph.ops.append(Op("QUANTIZE", (raw,), (quantized,)))
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return quantized, (images.float() / 255 - mean) / std

    def sequence(self, modules: list[nn.Module], tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        i = 0
        while i < len(modules):
            module = modules[i]
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            if isinstance(module, nn.Conv2d):
                last = i + (2 if relu else 1) >= len(modules) or isinstance(modules[i + (2 if relu else 1)], nn.Flatten)
                if last and x.shape[2:] == (1, 1) and module.kernel_size == (1, 1) and module.groups == 1:
                    tensor, x = self.fully_connected(module, relu, tensor, x)  # the classifier on the pooled map
                else:
                    tensor, x = self.conv(module, relu, tensor, x)
                i += 2 if relu else 1
                continue
            if isinstance(module, nn.MaxPool2d):
                tensor, x = self.max_pool(module, tensor, x)
            elif isinstance(module, nn.AdaptiveAvgPool2d):
                tensor, x = self.global_pool(module, tensor, x)
            elif isinstance(module, Residual):
                tensor, x = self.residual(module, tensor, x)
            elif isinstance(module, nn.Flatten):
                x = x.flatten(1)
            elif isinstance(module, nn.ReLU):
                raise TFLiteError("a ReLU that follows no conv: TFLite Micro would need a RELU op, which this "
                                  "writer does not emit")
            else:
                raise TFLiteError(f"no int8 TFLite op for {type(module).__name__} in this writer")
            i += 1
        return tensor, x

    def conv(self, conv: nn.Conv2d, relu: bool, tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        y = conv(x)
        if relu:
            y = torch.relu(y)
        if conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
            raise TFLiteError(f"no int8 TFLite op for {conv} in this writer")
        depthwise = conv.groups > 1
        if depthwise and not (conv.groups == conv.in_channels == conv.out_channels):
            raise TFLiteError(f"a grouped conv that is not depthwise has no TFLite op: {conv}")
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        if self.first_conv:
            scale, zero = input_quant(self.mean, self.std)
            weight, bias = first_conv_fold(weight, bias, self.mean, self.std, scale, zero)
            self.first_conv = False
        tensor, padding = self.padded(tensor, x, conv)
        values, w_scale = weight_quant(weight.numpy())
        if depthwise:  # (C, 1, kh, kw) -> (1, kh, kw, C), channels last
            filter_ = self.constant(values.transpose(1, 2, 3, 0), "int8", w_scale, dimension=3)
        else:  # (O, I, kh, kw) -> (O, kh, kw, I)
            filter_ = self.constant(values.transpose(0, 2, 3, 1), "int8", w_scale, dimension=0)
        if bias is None and depthwise:  # TFLM's depthwise conv needs its bias input (it crashes without)
            bias = torch.zeros(conv.out_channels)
        bias_index = -1
        if bias is not None:
            b_values, b_scale = bias_quant(bias.numpy(), self.graph.tensors[tensor].scale[0], w_scale)
            bias_index = self.constant(b_values, "int32", b_scale)
        out = self.calibrated(y)
        self.graph.ops.append(Op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", (tensor, filter_, bias_index),
                                 (out,), padding=padding, stride=conv.stride[0], relu=relu))
        return out, y

    def padded(self, tensor: int, x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, str]:
        """The conv's TFLite padding: VALID, SAME where TFLite's SAME pads as PyTorch does, else an
        explicit PAD op (of the input's zero point, a real 0) and VALID."""
        pad, kernel, stride = conv.padding[0], conv.kernel_size[0], conv.stride[0]
        if conv.padding[0] != conv.padding[1] or conv.padding_mode != "zeros":
            raise TFLiteError(f"no int8 TFLite op for {conv} in this writer")
        if pad == 0:
            return tensor, "VALID"
        size = x.shape[2]
        out = (size + 2 * pad - kernel) // stride + 1
        total = max((out - 1) * stride + kernel - size, 0)
        if out == -(-size // stride) and total // 2 == pad and x.shape[2] == x.shape[3]:
            return tensor, "SAME"
        paddings = np.array([[0, 0], [pad, pad], [pad, pad], [0, 0]], np.int32)
        source = self.graph.tensors[tensor]
        padded = self.graph.add(Tensor((1, size + 2 * pad, x.shape[3] + 2 * pad, x.shape[1]), "int8",
                                       source.scale, source.zero_point))
        constant = self.constant(paddings, "int32", np.zeros(0, np.float32))
        self.graph.ops.append(Op("PAD", (tensor, constant), (padded,)))
        return padded, "VALID"

    def fully_connected(self, conv: nn.Conv2d, relu: bool, tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        y = torch.relu(conv(x)) if relu else conv(x)
        weight = conv.weight.detach()[:, :, 0, 0].numpy()
        values, w_scale = weight_quant(weight)
        filter_ = self.constant(values, "int8", w_scale, dimension=0)
        bias_index = -1
        if conv.bias is not None:
            b_values, b_scale = bias_quant(conv.bias.detach().numpy(), self.graph.tensors[tensor].scale[0], w_scale)
            bias_index = self.constant(b_values, "int32", b_scale)
        flat = y.flatten(1)
        out = self.calibrated(flat)
        self.graph.ops.append(Op("FULLY_CONNECTED", (tensor, filter_, bias_index), (out,), relu=relu))
        return out, flat

    def max_pool(self, pool: nn.MaxPool2d, tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        if kernel[0] != kernel[1] or stride != kernel or _pair(pool.padding) != (0, 0) or pool.ceil_mode \
                or _pair(pool.dilation) != (1, 1):
            raise TFLiteError(f"no int8 TFLite op for {pool} in this writer")
        y = pool(x)
        source = self.graph.tensors[tensor]
        out = self.activation(y, (source.scale, source.zero_point))
        self.graph.ops.append(Op("MAX_POOL_2D", (tensor,), (out,), stride=kernel[0], filter=kernel[0]))
        return out, y

    def global_pool(self, pool: nn.AdaptiveAvgPool2d, tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        if _pair(pool.output_size) != (1, 1) or x.shape[2] != x.shape[3]:
            raise TFLiteError(f"no int8 TFLite op for {pool} in this writer")
        y = pool(x)
        source = self.graph.tensors[tensor]
        out = self.activation(y, (source.scale, source.zero_point))
        self.graph.ops.append(Op("AVERAGE_POOL_2D", (tensor,), (out,), stride=1, filter=x.shape[2]))
        return out, y

    def residual(self, block: Residual, tensor: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        body, b = self.sequence(list(block.body), tensor, x)
        y = x + b
        out = self.calibrated(y)
        self.graph.ops.append(Op("ADD", (tensor, body), (out,)))
        return out, y


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def lower(folded: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...],
          calibration: np.ndarray) -> Graph:
    """The quantized graph of a BatchNorm-folded net (nas.deployment.fold_batchnorm), its activation
    ranges the minimum and maximum over `calibration` (uint8 images, N C H W)."""
    lowering = Lowering(tuple(mean), tuple(std))
    with torch.inference_mode():
        tensor, x = lowering.start(torch.from_numpy(np.array(calibration, dtype=np.uint8)))
        tensor, x = lowering.sequence(list(folded.eval()), tensor, x)
    if x.dim() != 2:
        raise TFLiteError("the net does not end in a classifier on a pooled 1x1 map")
    lowering.graph.outputs = (tensor,)
    return lowering.graph


# --- the flatbuffer ---------------------------------------------------------------------------------

TYPES = {"uint8": 3, "int8": 9, "int32": 2}  # tflite.TensorType


def serialize(graph: Graph) -> bytes:
    """The graph as a .tflite flatbuffer (schema version 3, file identifier TFL3)."""
    import flatbuffers
    import tflite

    builder = flatbuffers.Builder(4096)
    codes = graph.op_codes

    def int_vector(start, values, elem=4) -> int:
        start(builder, len(values))
        for v in reversed(values):
            builder.PrependInt32(v) if elem == 4 else builder.PrependInt64(v)
        return builder.EndVector()

    def raw_vector(data: bytes, alignment: int) -> int:
        builder.StartVector(1, len(data), alignment)
        builder.head -= len(data)
        builder.Bytes[builder.head:builder.head + len(data)] = data
        builder.vectorNumElems = len(data)
        return builder.EndVector()

    # buffers: 0 is the empty one every activation shares; each constant its own
    buffer_of, datas = {}, []
    for index, t in enumerate(graph.tensors):
        if t.data is not None:
            buffer_of[index] = len(datas) + 1
            datas.append(t.data.astype(t.data.dtype.newbyteorder("<")).tobytes())
    buffers = []
    for data in [b""] + datas:
        vector = raw_vector(data, BUFFER_ALIGNMENT) if data else None
        tflite.BufferStart(builder)
        if vector is not None:
            tflite.BufferAddData(builder, vector)
        buffers.append(tflite.BufferEnd(builder))

    # Equal vectors and quantization tables are written once and shared (a flatbuffer may point
    # to one object from many places): shapes, a pool's quantization, the weights' zero point 0.
    written: dict[tuple, int] = {}

    def once(key: tuple, make) -> int:
        if key not in written:
            written[key] = make()
        return written[key]

    def vector(values: np.ndarray) -> int:
        return once(("vector", values.dtype.str, values.tobytes()), lambda: builder.CreateNumpyVector(values))

    def quantization(t: Tensor) -> int:
        scale, zero = vector(t.scale.astype("<f4")), vector(t.zero_point.astype("<i8"))

        def make() -> int:
            tflite.QuantizationParametersStart(builder)
            tflite.QuantizationParametersAddScale(builder, scale)
            tflite.QuantizationParametersAddZeroPoint(builder, zero)
            if t.dimension:
                tflite.QuantizationParametersAddQuantizedDimension(builder, t.dimension)
            return tflite.QuantizationParametersEnd(builder)
        return once(("quantization", scale, zero, t.dimension), make)

    tensors = []
    for index, t in enumerate(graph.tensors):
        quant = quantization(t) if len(t.scale) else None
        shape = vector(np.array(t.shape, "<i4"))
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape)
        tflite.TensorAddType(builder, TYPES[t.dtype])
        if index in buffer_of:
            tflite.TensorAddBuffer(builder, buffer_of[index])
        if quant is not None:
            tflite.TensorAddQuantization(builder, quant)
        tensors.append(tflite.TensorEnd(builder))

    operators = [_operator(builder, tflite, op, codes.index(op.code), once) for op in graph.ops]

    tensor_vector = _offsets(builder, tflite.SubGraphStartTensorsVector, tensors)
    inputs = builder.CreateNumpyVector(np.array(graph.inputs, "<i4"))
    outputs = builder.CreateNumpyVector(np.array(graph.outputs, "<i4"))
    op_vector = _offsets(builder, tflite.SubGraphStartOperatorsVector, operators)
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensor_vector)
    tflite.SubGraphAddInputs(builder, inputs)
    tflite.SubGraphAddOutputs(builder, outputs)
    tflite.SubGraphAddOperators(builder, op_vector)
    subgraph = tflite.SubGraphEnd(builder)

    op_codes = []
    for code in codes:
        number = getattr(tflite.BuiltinOperator, code)
        tflite.OperatorCodeStart(builder)
        tflite.OperatorCodeAddBuiltinCode(builder, number)
        op_codes.append(tflite.OperatorCodeEnd(builder))
    code_vector = _offsets(builder, tflite.ModelStartOperatorCodesVector, op_codes)
    subgraph_vector = _offsets(builder, tflite.ModelStartSubgraphsVector, [subgraph])
    buffer_vector = _offsets(builder, tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, code_vector)
    tflite.ModelAddSubgraphs(builder, subgraph_vector)
    tflite.ModelAddBuffers(builder, buffer_vector)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _offsets(builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _operator(builder, tflite, op: Op, code_index: int, once) -> int:
    """One Operator table; its options table is shared with every earlier op of the same options."""
    kind, options = once(("options", op.code, op.padding, op.stride, op.filter, op.relu),
                         lambda: _options(builder, tflite, op))
    inputs = builder.CreateNumpyVector(np.array(op.inputs, "<i4"))
    outputs = builder.CreateNumpyVector(np.array(op.outputs, "<i4"))
    tflite.OperatorStart(builder)
    if code_index:
        tflite.OperatorAddOpcodeIndex(builder, code_index)
    tflite.OperatorAddInputs(builder, inputs)
    tflite.OperatorAddOutputs(builder, outputs)
    if options is not None:
        tflite.OperatorAddBuiltinOptionsType(builder, kind)
        tflite.OperatorAddBuiltinOptions(builder, options)
    return tflite.OperatorEnd(builder)


def _options(builder, tflite, op: Op) -> tuple[int, int | None]:
    """(BuiltinOptions type, table) of an op; None where every option is its default."""
    activation = tflite.ActivationFunctionType.RELU if op.relu else tflite.ActivationFunctionType.NONE
    padding = getattr(tflite.Padding, op.padding)
    options, kind = None, tflite.BuiltinOptions.NONE
    if op.code == "CONV_2D":
        tflite.Conv2DOptionsStart(builder)
        tflite.Conv2DOptionsAddPadding(builder, padding)
        tflite.Conv2DOptionsAddStrideW(builder, op.stride)
        tflite.Conv2DOptionsAddStrideH(builder, op.stride)
        tflite.Conv2DOptionsAddFusedActivationFunction(builder, activation)
        options, kind = tflite.Conv2DOptionsEnd(builder), tflite.BuiltinOptions.Conv2DOptions
    elif op.code == "DEPTHWISE_CONV_2D":
        tflite.DepthwiseConv2DOptionsStart(builder)
        tflite.DepthwiseConv2DOptionsAddPadding(builder, padding)
        tflite.DepthwiseConv2DOptionsAddStrideW(builder, op.stride)
        tflite.DepthwiseConv2DOptionsAddStrideH(builder, op.stride)
        tflite.DepthwiseConv2DOptionsAddDepthMultiplier(builder, 1)
        tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(builder, activation)
        options, kind = tflite.DepthwiseConv2DOptionsEnd(builder), tflite.BuiltinOptions.DepthwiseConv2DOptions
    elif op.code in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        tflite.Pool2DOptionsStart(builder)
        tflite.Pool2DOptionsAddPadding(builder, padding)
        tflite.Pool2DOptionsAddStrideW(builder, op.stride)
        tflite.Pool2DOptionsAddStrideH(builder, op.stride)
        tflite.Pool2DOptionsAddFilterWidth(builder, op.filter)
        tflite.Pool2DOptionsAddFilterHeight(builder, op.filter)
        tflite.Pool2DOptionsAddFusedActivationFunction(builder, activation)
        options, kind = tflite.Pool2DOptionsEnd(builder), tflite.BuiltinOptions.Pool2DOptions
    elif op.code == "ADD" and op.relu:  # without one, every option is its default: no table
        tflite.AddOptionsStart(builder)
        tflite.AddOptionsAddFusedActivationFunction(builder, activation)
        options, kind = tflite.AddOptionsEnd(builder), tflite.BuiltinOptions.AddOptions
    elif op.code == "FULLY_CONNECTED" and op.relu:
        tflite.FullyConnectedOptionsStart(builder)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, activation)
        options, kind = tflite.FullyConnectedOptionsEnd(builder), tflite.BuiltinOptions.FullyConnectedOptions
    return kind, options


def convert(folded: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...],
            calibration: np.ndarray) -> tuple[Graph, bytes]:
    """The quantized graph of a folded net and its .tflite bytes."""
    graph = lower(folded, mean, std, calibration)
    return graph, serialize(graph)
