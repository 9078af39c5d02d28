import math
from dataclasses import replace

import pytest
import torch

from nas.run.device import DeviceError, bf16_supported, resolve_device
from nas.data import Split
from nas.model import BatchNormAct2d
from nas.run.record import RunRecord
from nas.spec import PRESETS, ArchSpec, BlockSpec, SpecError, TrainConfig
from nas.train import (
    DivergedError,
    WeightAverage,
    augment_batch,
    evaluate,
    lr_factor,
    train,
)

TINY = ArchSpec(blocks=(BlockSpec((4, 8), padding=1), BlockSpec((8,))), tail=(8,))


def fit(config: TrainConfig, x: torch.Tensor, y: torch.Tensor, on_epoch=None, **run):
    """TINY trained on (x, y) and evaluated on the same, the way RunRecord(**run) says."""
    return train(TINY, config, Split(x, y, x, y, "valid"), RunRecord(**run), on_epoch=on_epoch, progress=False)


def torch_schedule(config: TrainConfig, steps_per_epoch: int, scheduler_factory) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    sched = scheduler_factory(opt)
    lrs = []
    for _ in range(config.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_matches_torch_steplr_per_epoch():
    config = TrainConfig(lr=0.01, epochs=10, scheduler="step", step_size=3, gamma=0.5)
    steps = 4
    ours = [config.lr * lr_factor(config, s, steps) for s in range(config.epochs * steps)]
    per_epoch = torch_schedule(replace(config), 1, lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5))
    assert ours[::steps] == pytest.approx(per_epoch)
    assert ours[steps * 3 - 1] == pytest.approx(0.01) and ours[steps * 3] == pytest.approx(0.005)


def test_onecycle_schedule_matches_torch_onecycle():
    config = TrainConfig(lr=0.02, epochs=3, scheduler="onecycle")
    steps = 7
    expected = torch_schedule(
        config, steps,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=21, cycle_momentum=False),
    )
    ours = [config.lr * lr_factor(config, s, steps) for s in range(21)]
    assert ours == pytest.approx(expected, rel=1e-6)


def test_no_schedule_is_constant_and_unknown_is_rejected():
    assert lr_factor(TrainConfig(scheduler="none"), 1000, 10) == 1.0
    with pytest.raises(SpecError, match="unknown scheduler 'cosine'; one of none, step, onecycle"):
        TrainConfig(scheduler="cosine")
    with pytest.raises(SpecError, match="unknown optimizer"):
        TrainConfig(optimizer="lamb")


def test_augment_keeps_shape_and_background():
    gen = torch.Generator().manual_seed(0)
    blank = torch.full((5, 1, 28, 28), -0.42)
    out = augment_batch(blank, 1.0, gen, background=-0.42)
    assert out.shape == blank.shape
    assert torch.allclose(out, blank, atol=1e-5)
    digit = torch.zeros(5, 1, 28, 28)
    digit[:, :, 10:18, 12:16] = 1.0
    assert not torch.equal(augment_batch(digit, 1.0, gen, background=0.0), digit)


def fake_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 1, 28, 28, generator=g) * 25).to(torch.uint8)  # stored as bytes, as a Split holds them
    x[torch.arange(n), 0, y * 2, y * 2] = 255  # a learnable class-dependent bright pixel
    return x, y


def test_training_is_deterministic_given_a_seed():
    x, y = fake_data()
    config = TrainConfig(epochs=2, batch_size=32, lr=0.01, augment=0.5, label_smoothing=0.05, seed=3)
    runs = [[e.eval_acc for e in fit(config, x, y).history] for _ in range(2)]
    assert runs[0] == runs[1]
    other = fit(replace(config, seed=4), x, y).history
    losses = [e.train_loss for e in other]
    assert losses != [e.train_loss for e in fit(config, x, y).history]


def test_callback_sees_every_epoch_and_can_stop_training():
    x, y = fake_data()
    seen = []

    def stop_after_two(result, model):
        seen.append(result.epoch)
        if result.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig(epochs=5, batch_size=64), x, y, on_epoch=stop_after_two)
    assert seen == [1, 2]


def test_divergence_is_reported():
    x, y = fake_data()
    infinite = Split(x, y, x, y, "valid", mean=(0.0,), std=(0.0,))  # every pixel / 0: inf or nan
    with pytest.raises(DivergedError, match="loss became nan"):
        train(TINY, TrainConfig(epochs=1, batch_size=256), infinite, RunRecord(), progress=False)


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "step"), ("adam", "onecycle"), ("adam", "none")])
def test_optimizers_and_schedulers_run(optimizer, scheduler):
    x, y = fake_data()
    config = TrainConfig(epochs=2, batch_size=64, optimizer=optimizer, scheduler=scheduler, step_size=1, lr=0.01)
    history = fit(config, x, y).history
    assert len(history) == 2 and all(0 <= e.eval_acc <= 100 for e in history)


def test_short_training_on_real_mnist_learns(mnist):
    from nas.data import make_split

    split = make_split(mnist, "valid", subset=4000)
    config = replace(PRESETS["model3"].train, epochs=2)
    split = replace(split, eval_x=split.eval_x[:2000], eval_y=split.eval_y[:2000])
    history = train(PRESETS["model3"].arch, config, split, RunRecord(), progress=False).history
    assert history[-1].eval_acc > 60.0  # chance is 10%


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_training_is_deterministic_and_keeps_fp32_weights():
    x, y = fake_data()
    config = TrainConfig(epochs=2, batch_size=64, seed=3)
    first = fit(config, x, y, precision="bf16")
    second = fit(config, x, y, precision="bf16")
    fp32 = fit(config, x, y)
    assert [e.eval_acc for e in first.history] == [e.eval_acc for e in second.history]
    assert [e.train_loss for e in first.history] != [e.train_loss for e in fp32.history]
    assert all(p.dtype == torch.float32 for p in first.model.parameters())


@pytest.mark.parametrize("name", ["foo", "cuda:99" if torch.cuda.is_available() else "cuda", "meta"])
def test_unusable_devices_are_a_clear_error(name):
    with pytest.raises(DeviceError, match="device"):
        resolve_device(name)


def test_train_uses_and_reports_the_setup_it_was_given():
    x, y = fake_data()
    config = TrainConfig(epochs=1, batch_size=64, seed=3)
    result = fit(config, x, y, memory_format="channels_last")
    assert result.run.channels_last
    assert next(result.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    nchw = fit(config, x, y)
    assert not nchw.run.channels_last
    conv = next(m for m in nchw.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_train_runs_the_batchnorm_path_of_its_run_record(kernel):
    """The kernel is opt-in: a run record that asks for it gets it, and trains to the same numbers as
    PyTorch's BatchNorm to rounding (not bit for bit)."""
    x, y = fake_data()
    config = TrainConfig(epochs=1, batch_size=64, seed=3)
    native = fit(config, x, y, memory_format="channels_last", batchnorm="native")
    pytorch = fit(config, x, y, memory_format="channels_last")
    assert {m.batchnorm for m in native.model.modules() if isinstance(m, BatchNormAct2d)} == {"native"}
    assert {m.batchnorm for m in pytorch.model.modules() if isinstance(m, BatchNormAct2d)} == {"pytorch"}
    assert native.history[0].train_loss == pytest.approx(pytorch.history[0].train_loss, rel=1e-3)


def test_weight_average_follows_the_live_weights_with_warm_up():
    live = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.BatchNorm2d(2))
    average = WeightAverage(live, batch_size=64)
    assert average.decay == pytest.approx(math.exp(-64 / 6400))
    start = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].num_batches_tracked += 5
    average.update()  # step 1: decay min(0.99, 2/11)
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked.item() == 0  # counters are not averaged
    assert not average.model[0].weight.requires_grad and live[0].weight.requires_grad
    for _ in range(2000):
        average.update()
    assert torch.allclose(average.model[0].weight, live[0].weight)  # converges to constant weights


def test_the_weight_average_changes_what_is_evaluated_not_how_it_trains():
    x, y = fake_data()
    config = TrainConfig(epochs=2, batch_size=32, seed=1)
    averaged = fit(config, x, y)
    last = fit(config, x, y, weight_average=False)
    assert [e.train_loss for e in averaged.history] == [e.train_loss for e in last.history]
    assert averaged.history[-1].eval_loss != last.history[-1].eval_loss
    for result in (averaged, last):  # the returned model is the one the last epoch reported on
        loss, correct = evaluate(result.model, x, y, Split(x, y, x, y, "valid").normalize)
        assert correct == result.history[-1].eval_correct
        assert loss == pytest.approx(result.history[-1].eval_loss)
