import pytest
import torch

from nas.model import build_model
from nas.spec import PRESETS, ArchSpec, BlockSpec


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(PRESETS[name].arch)
    out = model(torch.randn(8, 1, 28, 28))
    assert out.shape == (8, 10)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(8)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_no_conv_bias_and_batchnorm_after_every_hidden_conv():
    model = build_model(PRESETS["model3"].arch)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model) == len(convs) - 1


def test_dropout_layers_only_when_asked():
    spec = ArchSpec(blocks=(BlockSpec((4, 4)),))
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in build_model(spec))
    with_dropout = build_model(ArchSpec(blocks=(BlockSpec((4, 4)),), dropout=0.1))
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in with_dropout) == 2
