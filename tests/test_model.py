import json
from pathlib import Path

import pytest
import torch

from nas import model as model_module
from nas.cpu import native
from nas.model import BatchNormAct2d, build_model
from nas.spec import PRESETS, ArchSpec, BlockSpec

SEED_COUNTS = {"model1": 7_224, "model2": 7_838, "model3": 7_918}
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(params=["pytorch", "native"])
def batchnorm(request):
    """Runs a test on each BatchNorm path; "native" needs the C kernel (the `kernel` fixture)."""
    if request.param == "native":
        request.getfixturevalue("kernel")
    return request.param


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_and_backward(name, memory_format, batchnorm):
    torch.manual_seed(0)
    model = build_model(PRESETS[name].arch, batchnorm=batchnorm).to(memory_format=memory_format)
    assert sum(p.numel() for p in model.parameters()) == SEED_COUNTS[name]
    out = model(torch.randn(8, 1, 28, 28).contiguous(memory_format=memory_format))
    assert out.shape == (8, 10)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(8)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_no_conv_bias_and_batchnorm_act_after_every_hidden_conv():
    model = build_model(PRESETS["model3"].arch)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, BatchNormAct2d) for m in model) == len(convs) - 1
    assert not any(isinstance(m, torch.nn.ReLU) for m in model)  # each sits inside its BatchNormAct2d


def test_dropout_layers_only_when_asked():
    spec = ArchSpec(blocks=(BlockSpec((4, 4)),))
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in build_model(spec))
    with_dropout = build_model(ArchSpec(blocks=(BlockSpec((4, 4)),), dropout=0.1))
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in with_dropout) == 2


def test_unknown_batchnorm_path_is_an_error():
    with pytest.raises(ValueError, match="batchnorm"):
        build_model(PRESETS["model3"].arch, batchnorm="cudnn")


def test_state_dicts_from_before_batchnorm_act_still_load():
    """A model built and trained by the previous release (a ReLU module after every BatchNorm2d, so
    later layers numbered higher, saved without metadata as nas.trials saves checkpoints) loads and
    computes what it computed then."""
    saved = json.loads((FIXTURES / "model-before-batchnorm-act.json").read_text())

    def tensor(entry):
        return torch.tensor(entry["values"], dtype=torch.float32).reshape(entry["shape"])

    state = {key: tensor(entry).to(torch.long if key.endswith("num_batches_tracked") else torch.float32)
             for key, entry in saved["state_dict"].items()}
    model = build_model(ArchSpec.from_dict(saved["arch"]))
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensor(saved["input"])), tensor(saved["output"]), rtol=1e-6, atol=1e-6)
    assert model[1].num_batches_tracked == 3

    again = build_model(ArchSpec.from_dict(saved["arch"]))  # and today's state dicts load as they are
    again.load_state_dict({key: value for key, value in model.state_dict().items()})
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def _batch_norm_pair(channels, batchnorm="pytorch"):
    """BatchNormAct2d and its reference, nn.BatchNorm2d then ReLU, with the same parameters."""
    ours, reference = BatchNormAct2d(channels, batchnorm), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(torch.linspace(0.5, 1.5, channels))
            module.bias.copy_(torch.linspace(-0.2, 0.3, channels))
    return ours, torch.nn.Sequential(reference, torch.nn.ReLU())


@pytest.fixture
def paths_taken(monkeypatch):
    """Counts the calls of each channels-last CPU path of BatchNormAct2d."""
    calls = {}
    for name in ("native_training", "native_inference", "channels_last_training"):
        def spy(*args, name=name, original=getattr(model_module, name)):
            calls[name] = calls.get(name, 0) + 1
            return original(*args)

        monkeypatch.setattr(model_module, name, spy)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(8, 10, 28, 28), (4, 8, 6, 6), (3, 3, 5, 7), (5, 16, 6, 6)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_act_matches_batch_norm_then_relu(shape, threads, memory_format, batchnorm, paths_taken):
    """Outputs, gradients and running statistics of nn.BatchNorm2d + ReLU, on every path."""
    torch.manual_seed(0)
    ours, reference = _batch_norm_pair(shape[1], batchnorm)
    x = (torch.randn(shape) * 3 + 1.5).contiguous(memory_format=memory_format)
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    results = []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for module in (ours, reference):
            for _ in range(2):  # twice: the running statistics compound
                xi = x.clone().requires_grad_()
                out = module(xi)
                out.backward(grad)
            results.append((out, xi.grad, module.get_parameter("weight" if module is ours else "0.weight").grad,
                            module.get_parameter("bias" if module is ours else "0.bias").grad))
    finally:
        torch.set_num_threads(saved)
    channels_last = memory_format == torch.channels_last
    expected = {}
    if channels_last and batchnorm == "native":
        expected = {"native_training": 2}
    elif channels_last and shape[1] % 16:  # else PyTorch's own kernel, fast there
        expected = {"channels_last_training": 2}
    assert paths_taken == expected
    assert (results[0][0] == 0).any()
    assert results[0][0].is_contiguous(memory_format=memory_format)
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, reference[0].running_mean)
    torch.testing.assert_close(ours.running_var, reference[0].running_var)
    assert ours.num_batches_tracked == reference[0].num_batches_tracked == 2


def test_batch_norm_act_passes_nan_on(batchnorm):
    """A diverged activation stays NaN through the ReLU, as in PyTorch, so training sees the loss go NaN."""
    ours, _ = _batch_norm_pair(10, batchnorm)
    x = torch.randn(2, 10, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 3, 1, 1] = float("nan")
    out = ours(x)
    assert out[:, 3].isnan().all() and not out[:, 2].isnan().any()


def test_evaluation_matches_batch_norm_then_relu(batchnorm, paths_taken):
    """Eval mode without autograd (as nas.train evaluates) gives nn.BatchNorm2d + ReLU's output, in
    the kernel on the native path; with autograd, PyTorch's kernels on either path."""
    torch.manual_seed(0)
    ours, reference = _batch_norm_pair(10, batchnorm)
    with torch.no_grad():
        for module in (ours, reference[0]):
            module.running_mean.copy_(torch.linspace(-1, 1, 10))
            module.running_var.copy_(torch.linspace(0.5, 2, 10))
    ours.eval(), reference.eval()
    x = (torch.randn(4, 10, 7, 7) * 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = ours(x)
        expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert paths_taken == ({"native_inference": 1} if batchnorm == "native" else {})
    xi = x.clone().requires_grad_()
    ours(xi).sum().backward()
    assert xi.grad is not None and paths_taken == ({"native_inference": 1} if batchnorm == "native" else {})


def test_pytorch_path_never_touches_the_kernel(monkeypatch):
    """batchnorm="pytorch" trains and evaluates channels-last without looking the kernel up, so its
    numbers can't depend on whether a C compiler is installed."""
    monkeypatch.setattr(native, "_load", lambda: pytest.fail("the kernel was looked up"))
    model = build_model(PRESETS["model3"].arch).to(memory_format=torch.channels_last)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    with torch.inference_mode():
        model.eval()(torch.randn(4, 1, 28, 28))


def test_models_train_the_same_in_either_memory_format(batchnorm):
    """A few SGD steps of Model 3 in channels-last (nas's channels-last BatchNorm paths) and NCHW
    (PyTorch's) agree."""
    torch.manual_seed(0)
    nchw = build_model(PRESETS["model3"].arch)
    channels_last = build_model(PRESETS["model3"].arch, batchnorm=batchnorm)
    channels_last.load_state_dict(nchw.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    for model in (nchw, channels_last):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for (name, a), b in zip(nchw.state_dict().items(), channels_last.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
