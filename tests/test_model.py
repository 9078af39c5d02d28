import os

import pytest
import torch

from nas import native
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


def _batch_norm_pair(channels, fuse_relu=False):
    from nas.model import BatchNorm2d

    ours, reference = BatchNorm2d(channels, fuse_relu=fuse_relu), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(torch.linspace(0.5, 1.5, channels))
            module.bias.copy_(torch.linspace(-0.2, 0.3, channels))
    return ours, reference


BACKWARD = {"native": "_NativeBatchNormBackward", "torch": "_ChannelsLastBatchNormBackward"}


@pytest.fixture(params=sorted(BACKWARD))
def batch_norm_path(request, monkeypatch):
    """Runs a test on the C kernel (nas/batchnorm.c) and on the PyTorch-only fallback."""
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    else:
        _require_native()
    return request.param


def _require_native():
    """Skips a test of the C kernel where it can't be built; fails instead under NAS_REQUIRE_NATIVE (CI)."""
    if native.library() is None:
        message = "the BatchNorm kernel could not be built here (no C compiler?)"
        if os.environ.get("NAS_REQUIRE_NATIVE"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(8, 10, 28, 28), (4, 8, 6, 6), (3, 3, 5, 7), (5, 16, 6, 6)])
def test_channels_last_batch_norm_matches_pytorch(shape, threads, batch_norm_path):
    """The channels-last CPU paths give PyTorch's outputs, gradients and running statistics."""
    torch.manual_seed(0)
    ours, reference = _batch_norm_pair(shape[1])
    x = (torch.randn(shape) * 3 + 1.5).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    results = []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for module in (ours, reference):
            for _ in range(2):  # twice: the running statistics compound
                xi = x.clone().requires_grad_()
                out = module(xi)
                out.backward(grad)
            results.append((out, xi.grad, module.weight.grad, module.bias.grad))
    finally:
        torch.set_num_threads(saved)
    if batch_norm_path == "native" or shape[1] % 16:  # else PyTorch's kernel runs: it is fast there
        assert type(results[0][0].grad_fn).__name__ == BACKWARD[batch_norm_path]
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert ours.num_batches_tracked == reference.num_batches_tracked == 2


def test_fused_relu_matches_batch_norm_then_relu(batch_norm_path):
    """BatchNorm2d(fuse_relu=True) + ReLU computes nn.BatchNorm2d + nn.ReLU; on the C kernel the ReLU
    is done inside the BatchNorm's pass and the ReLU module passes the result on untouched."""
    from nas.model import ReLU

    torch.manual_seed(0)
    ours, reference = _batch_norm_pair(10, fuse_relu=True)
    x = torch.randn(6, 10, 9, 9).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(6, 10, 9, 9)
    results = []
    for layers in ((ours, ReLU(inplace=True)), (reference, torch.nn.ReLU(inplace=True))):
        xi = x.clone().requires_grad_()
        normalized = layers[0](xi)
        out = layers[1](normalized)
        out.backward(grad)
        results.append((out, xi.grad, layers[0].weight.grad, layers[0].bias.grad))
        if layers[0] is ours:
            relu_ran = type(out.grad_fn).__name__ == "ReluBackward0"
            assert relu_ran == (batch_norm_path == "torch")
    assert (results[0][0] == 0).any()
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_fused_relu_passes_nan_on(batch_norm_path):
    """A diverged activation stays NaN through the ReLU, as in PyTorch, so training sees the loss go NaN."""
    from nas.model import ReLU

    ours, _ = _batch_norm_pair(10, fuse_relu=True)
    x = torch.randn(2, 10, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 3, 1, 1] = float("nan")
    out = ReLU(inplace=True)(ours(x))
    assert out[:, 3].isnan().all() and not out[:, 2].isnan().any()


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_evaluation_matches_pytorch(fuse_relu, batch_norm_path):
    """Eval mode without autograd (as nas.train evaluates) gives nn.BatchNorm2d's (+ ReLU's) output."""
    from nas.model import RECTIFIED, ReLU

    torch.manual_seed(0)
    ours, reference = _batch_norm_pair(10, fuse_relu=fuse_relu)
    with torch.no_grad():
        for module in (ours, reference):
            module.running_mean.copy_(torch.linspace(-1, 1, 10))
            module.running_var.copy_(torch.linspace(0.5, 2, 10))
    ours.eval(), reference.eval()
    x = (torch.randn(4, 10, 7, 7) * 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        normalized = ours(x)
        out = ReLU()(normalized)
        expected = torch.relu(reference(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert getattr(normalized, RECTIFIED, False) == (fuse_relu and batch_norm_path == "native")
    assert out.is_contiguous(memory_format=torch.channels_last)
    with_grad = ours(x.clone().requires_grad_())  # eval mode with autograd: PyTorch's own kernel
    assert with_grad.grad_fn is not None and not getattr(with_grad, RECTIFIED, False)


def test_batch_norm_keeps_pytorch_kernel_where_it_is_fast(batch_norm_path):
    """NCHW tensors and eval mode take nn.BatchNorm2d's own path; so do vector-width channel counts
    when the C kernel is missing."""
    for channels, memory_format, training in [(10, torch.contiguous_format, True), (16, torch.channels_last, True),
                                              (10, torch.channels_last, False)]:
        ours, _ = _batch_norm_pair(channels)
        ours.train(training)
        x = torch.randn(2, channels, 5, 5).contiguous(memory_format=memory_format).requires_grad_()
        ours_path = batch_norm_path == "native" and training and memory_format == torch.channels_last
        assert (type(ours(x).grad_fn).__name__ in BACKWARD.values()) == ours_path


def test_kernel_is_built_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        _require_native()
        builds = list(tmp_path.glob("batchnorm-*.so"))
        assert len(builds) == 1
        native.library.cache_clear()
        monkeypatch.setattr(native, "build", lambda *args: pytest.fail("built again"))
        assert native.library() is not None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_no_compiler_falls_back_to_pytorch_path(compiler, tmp_path, monkeypatch, caplog):
    """Without a working C compiler: one warning line, and the model still trains (PyTorch-only path)."""
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    native.library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert native.library() is None
        assert len(caplog.records) == 1 and "slower path" in caplog.records[0].getMessage()
        model = build_model(PRESETS["model3"].arch).to(memory_format=torch.channels_last)
        out = model(torch.randn(4, 1, 28, 28))
        out.sum().backward()
        assert type(model[1](torch.randn(2, 10, 4, 4).contiguous(memory_format=torch.channels_last)).grad_fn
                    ).__name__ == BACKWARD["torch"]
        assert not list(tmp_path.glob("*.so"))
    finally:
        native.library.cache_clear()


def test_models_train_the_same_in_either_memory_format():
    """A few SGD steps of Model 3 in channels-last (our batch norm) and NCHW (PyTorch's) agree."""
    torch.manual_seed(0)
    nchw = build_model(PRESETS["model3"].arch)
    channels_last = build_model(PRESETS["model3"].arch)
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
