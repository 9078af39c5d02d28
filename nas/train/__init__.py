"""Trains an ArchSpec with a TrainConfig on tensors that already live on the training device.

The hot loop indexes one resident tensor with a randperm slice, augments the whole batch at once
and keeps its metrics on the device, so nothing waits on the host until an epoch ends.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nas.data import Split
from nas.errors import NasError
from nas.model import build_model
from nas.run.device import resolve_precision
from nas.run.record import RunRecord
from nas.spec import ArchSpec, TrainConfig

MAX_ROTATION_DEG = 15.0  # at augment=1
MAX_TRANSLATION = 0.1  # fraction of the image side, at augment=1
EVAL_BATCH = 2000
EMA_IMAGES = 6400  # the weight average's horizon: 100 of the seed's batches of 64


class DivergedError(NasError):
    """Training produced a non-finite loss; the run is worthless from here on."""


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based, as in the seed's logs
    train_loss: float
    train_acc: float  # percent
    eval_loss: float
    eval_acc: float  # percent
    eval_correct: int
    eval_total: int
    lr: float  # learning rate at the end of the epoch
    seconds: float  # training time of the epoch, evaluation excluded


@dataclass
class TrainResult:
    model: nn.Module
    run: RunRecord
    history: list[EpochResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.history)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of config.lr after `step` optimizer steps (the schedule is stepped per batch)."""
    if config.scheduler == "none":
        return 1.0
    if config.scheduler == "step":
        return config.gamma ** ((step // steps_per_epoch) // config.step_size)
    if config.scheduler == "onecycle":
        # OneCycleLR's defaults: 30% cosine warm-up from lr/25, cosine decay to lr/25/1e4.
        total = config.epochs * steps_per_epoch
        warm_end = 0.3 * total - 1
        start, low = 1 / 25, 1 / 25 / 1e4
        if step <= warm_end:
            pct = step / warm_end
            return 1 + (start - 1) * (1 + math.cos(math.pi * pct)) / 2
        pct = (step - warm_end) / (total - 1 - warm_end)
        return low + (1 - low) * (1 + math.cos(math.pi * min(pct, 1.0))) / 2
    raise ValueError(f"unknown scheduler {config.scheduler!r}")


def planned_steps(config: TrainConfig, images: int) -> int:
    """Optimizer steps of a whole run on `images` training images (the last batch may be short)."""
    return config.epochs * math.ceil(images / config.batch_size)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of a dozen small ops per tensor per step.
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            fused=True,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after
    every optimizer step; the averaged copy is the model that is evaluated and kept. Adam at the
    seed's LR leaves the last step's weights noisy; their average over the last few thousand images
    scores steadier and higher (measured in docs/design.md).

    The decay per step is set so the horizon is EMA_IMAGES images whatever the batch size, and warms
    up as (1 + t) / (10 + t) (timm's ModelEmaV2) so a short run is not dominated by its initial
    weights. torch.optim.swa_utils.AveragedModel does the same arithmetic but reads its step counter
    back from the device on every update, a host sync per step on CUDA; this keeps it on the host."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = math.exp(-batch_size / EMA_IMAGES)
        self.steps = 0
        pairs = [
            (mine, theirs)
            for mine, theirs in zip(chain(self.model.parameters(), self.model.buffers()),
                                    chain(model.parameters(), model.buffers()))
            if mine.is_floating_point()  # BatchNorm's step counter is not averaged
        ]
        self.averaged = [mine for mine, _ in pairs]
        self.live = [theirs for _, theirs in pairs]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.averaged, self.live, 1 - decay)


def augment_batch(images: torch.Tensor, strength: float, generator: torch.Generator, background: float) -> torch.Tensor:
    """Random rotation and translation of a whole batch in one affine warp."""
    n = images.shape[0]
    angle = (torch.rand(n, device=images.device, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG * strength)
    shift = (torch.rand(n, 2, device=images.device, generator=generator) * 2 - 1) * (2 * MAX_TRANSLATION * strength)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros; shifting by the background keeps the padding "blank paper".
    return F.grid_sample(images - background, grid, align_corners=False) + background


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, int]:
    """Mean cross-entropy and number of correct predictions, in fp32 whatever the training precision;
    `normalize` turns each batch of stored images (a Split's uint8) into the model's input."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for i in range(0, len(images), EVAL_BATCH):
        batch = images[i : i + EVAL_BATCH]
        out = model(normalize(batch) if normalize is not None else batch)
        loss_sum += F.cross_entropy(out, labels[i : i + EVAL_BATCH], reduction="sum")
        correct += (out.argmax(1) == labels[i : i + EVAL_BATCH]).sum()
    return loss_sum.item() / len(images), int(correct.item())


def _forward_of(model: nn.Module, compiled: bool, device: torch.device) -> nn.Module:
    """The module each training batch goes through: the model, or its torch.compile."""
    if device.type == "cuda":
        # Shapes are fixed for a whole trial: cuDNN times its algorithms once and keeps the fastest
        # (at the price of bit-exact reruns on GPU; CPU runs stay bit-exact).
        torch.backends.cudnn.benchmark = True
    if not compiled:
        return model
    # Inductor fuses each BatchNorm+ReLU into the convolution's neighbours; the graph is compiled
    # once per architecture, on the first batch (seconds on CPU, counted in epoch 1's time).
    # On CUDA, "reduce-overhead" also captures CUDA graphs: a tiny net is launch-bound there.
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")


def flip_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left to right with probability one half."""
    flipped = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flipped.view(-1, 1, 1, 1), images.flip(3), images)


def _train_epoch(forward: nn.Module, optimizer: torch.optim.Optimizer, scheduler, average: WeightAverage | None, *,
                 split: Split, order: torch.Tensor, config: TrainConfig,
                 precision: str, generator: torch.Generator, background: float | torch.Tensor,
                 bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the split's training images in `order`, a batch per optimizer step. Returns
    the summed loss and the number of correct predictions, both still on the device (no host sync
    per step)."""
    train_x, train_y = split.train_x, split.train_y
    loss_sum = torch.zeros((), device=train_x.device)
    correct = torch.zeros((), device=train_x.device, dtype=torch.long)
    for b in range(0, len(order), config.batch_size):
        index = order[b : b + config.batch_size]
        images, labels = split.normalize(train_x[index]), train_y[index]
        if split.flip:
            images = flip_batch(images, generator)
        if config.augment > 0:
            images = augment_batch(images, config.augment, generator, background)
        with autocast(train_x.device, precision):
            out = forward(images)
        loss = F.cross_entropy(out.float(), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update()
        loss_sum += loss.detach() * len(labels)
        correct += (out.argmax(1) == labels).sum()
        bar.update()
    return loss_sum, correct


def train(
    arch: ArchSpec,
    config: TrainConfig,
    split: Split,
    run: RunRecord,
    *,
    on_epoch: Callable[[EpochResult, nn.Module], None] | None = None,
    progress: bool = True,
    background: float | torch.Tensor | None = None,
    nested: bool = False,
) -> TrainResult:
    """Train for config.epochs on split.train_x, evaluating on split.eval_x after every epoch, the
    way `run` says (precision, memory format, BatchNorm path, weight average, compile); the
    caller has already put the data on the device and set the thread count. `on_epoch` sees every
    epoch's result and the evaluated model, and may raise to stop early (the search's pruner does).
    `background` is the normalized value of a blank pixel (default: the data's darkest). The same
    arguments on the same machine give the same numbers. With run.weight_average the evaluated and
    returned model is the moving average of the weights (WeightAverage), else the last step's.
    With `nested` the epoch's bar sits under a study's bar (line 2) and is cleared when done; the
    caller writes the epoch's line."""
    train_x, eval_x, eval_y = split.train_x, split.eval_x, split.eval_y
    device = train_x.device
    n = len(train_x)
    steps_per_epoch = math.ceil(n / config.batch_size)
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
    model = build_model(arch, batchnorm=run.batchnorm).to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, config)
    average = WeightAverage(model, config.batch_size) if run.weight_average else None
    eval_model = average.model if average else model
    forward = _forward_of(model, run.compiled, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, steps_per_epoch)
    )
    if background is None:
        background = split.background()
    result = TrainResult(eval_model, run)
    for epoch in range(1, config.epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, device=device, generator=generator)
        bar = tqdm(total=steps_per_epoch, disable=not progress, file=sys.stdout,
                   desc=f"Epoch {epoch} train",
                   **({"position": 1, "leave": False} if nested else {}))
        loss_sum, correct = _train_epoch(forward, optimizer, scheduler, average, split=split, order=order, config=config,
                                         precision=precision, generator=generator, background=background, bar=bar)
        train_loss = loss_sum.item() / n
        train_acc = 100.0 * correct.item() / n
        seconds = time.perf_counter() - start
        bar.set_description(f"Epoch {epoch} train: Loss={train_loss:.4f} Batch_id={steps_per_epoch - 1} Accuracy={train_acc:.2f}")
        bar.close()
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss became {train_loss} in epoch {epoch}")
        eval_loss, eval_correct = evaluate(eval_model, eval_x, eval_y, split.normalize)
        epoch_result = EpochResult(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            eval_loss=eval_loss,
            eval_acc=100.0 * eval_correct / len(eval_x),
            eval_correct=eval_correct,
            eval_total=len(eval_x),
            lr=optimizer.param_groups[0]["lr"],
            seconds=seconds,
        )
        result.history.append(epoch_result)
        if on_epoch is not None:
            on_epoch(epoch_result, eval_model)
    return result


def epoch_line(result: EpochResult, eval_name: str) -> str:
    """The seed's evaluation line."""
    label = "Test set" if eval_name == "test" else "Validation set"
    return (
        f"{label}: Average loss: {result.eval_loss:.4f}, "
        f"Accuracy: {result.eval_correct}/{result.eval_total} ({result.eval_acc:.2f}%)"
    )
