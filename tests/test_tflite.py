"""nas.tflite's int8 TFLite files, held op by op to the numpy reference of TFLite's kernels
(nas.tflite_reference) in TensorFlow Lite Micro's interpreter, on small random nets of space
version 3: plain, padded and not, separable (with and without the BatchNorm between), residual,
a 5x5 first conv, three input channels, and a strided conv TFLite's SAME would pad otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nas.deployment import fold_batchnorm
from nas.model import build_model
from nas.spec import PRESETS, ArchSpec, BlockSpec

pytest.importorskip("tflite_micro")
from nas import tflite, tflite_reference, tflm  # noqa: E402

NETS = {
    "model3": PRESETS["model3"].arch,
    "separable": ArchSpec((BlockSpec((6, 8, 8), padding=1, op="sep"), BlockSpec((12, 12), op="sep")), tail=(10,)),
    "separable-linear": ArchSpec((BlockSpec((6, 8), padding=1, op="sep"), BlockSpec((10,), op="sep")),
                                 dw_norm=False),
    "residual": ArchSpec((BlockSpec((8, 8, 8), padding=1, residual=True),
                          BlockSpec((12, 12), padding=1, op="sep", residual=True)), first_kernel=5),
    "rgb": ArchSpec((BlockSpec((6, 6), padding=1), BlockSpec((8,))), in_channels=3, input_size=12),
    "stride-2": ArchSpec((BlockSpec((6, 8), padding=1, op="sep"), BlockSpec((10,))), first_kernel=5, first_stride=2,
                         input_size=20),
}
MEANS = {"rgb": ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))}


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """A built net with random BatchNorm statistics and affine terms, as a trained one has."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) * 0.6 - 0.3)
    return model.eval()


def images(arch: ArchSpec, count: int, seed: int) -> np.ndarray:
    """Digit-like uint8 images: mostly dark, some bright strokes."""
    rng = np.random.default_rng(seed)
    shape = (count, arch.in_channels, arch.input_size, arch.input_size)
    return np.where(rng.random(shape) < 0.2, rng.integers(128, 256, shape), rng.integers(0, 30, shape)).astype(np.uint8)


def converted(name: str, seed: int = 0) -> tuple[tflite.Graph, bytes, ArchSpec]:
    arch = NETS[name]
    torch.manual_seed(seed)
    folded = fold_batchnorm(randomized(build_model(arch), seed))
    mean, std = MEANS.get(name, ((0.1307,), (0.3081,)))
    graph, model = tflite.convert(folded, mean, std, images(arch, 64, seed))
    return graph, model, arch


@pytest.mark.parametrize("name", list(NETS))
def test_every_op_matches_the_reference(name):
    graph, model, arch = converted(name)
    image = images(arch, 1, 99)
    expected = tflite_reference.run(graph, image.transpose(0, 2, 3, 1))
    found = tflm.tensors(model, image[0], len(graph.tensors))
    for op in graph.ops:
        out = op.outputs[0]
        assert np.array_equal(found[out].reshape(expected[out].shape), expected[out]), (name, op.code, out)


@pytest.mark.parametrize("name", ["model3", "residual"])
def test_outputs_match_the_reference_on_a_batch_and_pytorch_closely(name):
    graph, model, arch = converted(name, seed=3)
    batch = images(arch, 40, 5)
    found = tflm.logits(model, batch, tflm.smallest_arena(model))
    assert np.array_equal(found, tflite_reference.logits(graph, batch))
    out = graph.tensors[graph.outputs[0]]
    torch.manual_seed(3)
    folded = fold_batchnorm(randomized(build_model(arch), 3))
    with torch.inference_mode():
        x = (torch.from_numpy(batch).float() / 255 - 0.1307) / 0.3081
        real = folded(x).numpy()
    dequantized = (found.astype(np.float64) - out.zero_point[0]) * out.scale[0]
    spread = real.max() - real.min()
    assert np.abs(dequantized - real).max() < 0.1 * spread  # int8 tracks fp32


def test_the_file_is_small_and_holds_the_ops_tflm_registers():
    graph, model, _ = converted("model3")
    assert graph.weight_bytes == 8122  # nas.spec's flash count of Model 3: int8 weights, int32 biases
    assert len(model) <= 2 * 8122  # the bound (12,336 B: the goal of 1.5x is missed, docs/devices.md)
    assert model[4:8] == b"TFL3"
    assert graph.op_codes == ["QUANTIZE", "CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "FULLY_CONNECTED"]
    residual, _, _ = converted("residual")
    assert residual.op_codes == ["QUANTIZE", "CONV_2D", "ADD", "MAX_POOL_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                                 "FULLY_CONNECTED"]


def test_a_strided_padded_conv_gets_an_explicit_pad():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Conv2d(4, 3, 1, bias=False), nn.Flatten())
    torch.manual_seed(0)
    calibration = images(ArchSpec((BlockSpec((4,)),)), 16, 0)
    graph, model = tflite.convert(net.eval(), (0.1307,), (0.3081,), calibration)
    assert "PAD" in graph.op_codes
    image = calibration[:1]
    expected = tflite_reference.run(graph, image.transpose(0, 2, 3, 1))
    found = tflm.tensors(model, image[0], len(graph.tensors))
    for op in graph.ops:
        assert np.array_equal(found[op.outputs[0]].reshape(expected[op.outputs[0]].shape), expected[op.outputs[0]])


def test_a_layer_without_an_int8_op_is_one_line():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 3, 1), nn.Flatten())
    with pytest.raises(tflite.TFLiteError, match="no int8 TFLite op for Sigmoid"):
        tflite.convert(net.eval(), (0.5,), (0.5,), np.zeros((2, 1, 8, 8), np.uint8))


def test_the_smallest_arena_is_found_to_the_byte_and_one_less_fails():
    _, model, _ = converted("separable")
    arena = tflm.smallest_arena(model)
    assert tflm.fits(model, arena) and not tflm.fits(model, arena - 1)
    assert tflm.allocations(model, arena + 4096).total == arena
    with pytest.raises(tflm.ArenaTooSmall, match=f"{arena - 1:,}-byte"):
        tflm.interpreter(model, arena - 1)


def test_the_c_source_holds_the_same_bytes():
    graph, model, _ = converted("model3")
    cc, h = tflm.c_source(model, arena=20000, device=19000, ops=graph.op_codes)
    assert tflm.bytes_of_c_array(cc) == model
    assert "alignas(16)" in cc and f"g_model_len = {len(model)}" in cc
    assert "MicroMutableOpResolver<5>" in h and "AddFullyConnected();" in h and "= 20000;" in h


def test_reference_rounding_helpers_follow_tflite():
    assert tflite_reference.quantize_multiplier(1.0) == (1 << 30, 1)
    assert tflite_reference.quantize_multiplier(0.5) == (1 << 30, 0)
    assert tflite_reference.quantize_multiplier(0.0) == (0, 0)
    # RoundingDivideByPOT rounds half away from zero
    assert list(tflite_reference.rounding_divide_by_pot(np.array([5, -5, 6, -6, 7]), np.array(1))) == [3, -3, 3, -3, 4]
    assert tflite_reference.same_padding(28, 3, 1) == (1, 1)
    assert tflite_reference.same_padding(28, 3, 2) == (0, 1)


def test_an_op_tflm_lacks_is_one_line():
    import dataclasses

    graph, _, _ = converted("model3")
    graph.ops[2] = dataclasses.replace(graph.ops[2], code="UNIQUE")  # TFLM has no kernel for it
    with pytest.raises(tflm.TFLMError, match="^TensorFlow Lite Micro has no kernel for the op UNIQUE$"):
        tflm.interpreter(tflite.serialize(graph), 100_000)
