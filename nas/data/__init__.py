"""The data a study trains on: the study file's [data] table (DataConfig), the images it names
(MNIST by default, a torchvision set, scikit-learn's digits, a folder or an npz), cut into
training, validation and test parts (Data), and the part a run trains and evaluates on (Split).

Images stay uint8 in memory, on the host and on the device, and are normalized a batch at a
time, so a data set costs a quarter of its float32 size. A Data knows its identity (source,
fingerprint of the arrays, shape, classes, split sizes, normalization); a study stores it and the
commands that reopen the study check it (differences).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from nas.data.errors import DataError
from nas.data.mnist import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    EXPECTED_MD5,
    MEAN,
    STD,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    VALID_SIZE,
    Mnist,
    decode_idx,
    encode_idx,
    fallback_to_idx,
    load_mnist,
    prepare,
    raw_dir,
    resolve_data_dir,
    unpickle_fallback,
)
from nas.data.sources import TORCHVISION, Images, from_digits, from_folder, from_npz, from_torchvision
from nas.spec import Shape

__all__ = [
    "DATASETS", "DATA_DIR_ENV", "DEFAULT_DATA_DIR", "EXPECTED_MD5", "MEAN", "TEST_IMAGES", "TEST_LABELS",
    "TRAIN_IMAGES", "TRAIN_LABELS", "STD", "TORCHVISION", "VALID_SIZE", "Data", "DataConfig",
    "DataError", "Images", "Mnist", "Split", "decode_idx", "differences", "encode_idx", "fallback_to_idx", "load_mnist", "make_split",
    "SOURCES", "open_data", "prepare", "raw_dir", "resolve_data_dir", "unpickle_fallback",
]

DATASETS = ("mnist", *TORCHVISION, "digits", "folder", "npz")
ORDERS = ("last", "random")
SPLIT_SEED = 0  # the random holdout's draw; fixed, so a data set always splits the same way
CACHE_SUBDIR = "cache"  # decoded folders, under the data directory


@dataclass(frozen=True)
class DataConfig:
    """The study file's [data] table; without one, MNIST as the seed used it."""

    dataset: str = "mnist"  # one of DATASETS
    path: str = ""  # folder or npz: where the data is (relative paths: to the working directory)
    image_size: int = 0  # folder: resize every image to this side; 0: the images' own (one square size)
    channels: int = 0  # folder: 1 grayscale, 3 RGB; 0: 1 if every image is grayscale, else 3
    valid: float = 0  # images held out of training for validation: a count, or a fraction < 1; 0 (not given): 10,000
    # where the training images number 50,000 or more (MNIST, as the seed), else a fifth of them
    test: float = 0.2  # for sources without a test split (digits, a folder without test/)
    order: str = ""  # which images are held out: "last" (the source's last ones) or "random" (a fixed
    # draw); "" is "last" for sets published shuffled (mnist, torchvision's, npz), "random" otherwise
    flip: bool = False  # random horizontal flips in training (never for digits or text)
    mean: tuple[float, ...] = ()  # per channel, of pixels in [0, 1]; (): the training part's (mnist: 0.1307)
    std: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, table: dict[str, Any], source: str = "[data]") -> DataConfig:
        """The table as written; DataError (one line) for an unknown key or a value that can't be used."""
        unknown = set(table) - {f.name for f in fields(cls)}
        if unknown:
            raise DataError(f"{source}: unknown keys {', '.join(sorted(unknown))}")
        if "valid" in table and not isinstance(table["valid"], bool) and table["valid"] == 0:
            # 0 is the field's "not given"; written out, it would silently mean the default holdout.
            raise DataError(f"{source}: valid = 0 holds out no images to validate on; give a count (e.g. 1000) "
                            "or a fraction (e.g. 0.2), or leave valid out for the default")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        try:
            config = cls(**values)
        except TypeError as exc:
            raise DataError(f"{source}: {exc}") from None
        config.check(source)
        return config

    def check(self, source: str = "[data]") -> None:
        if self.dataset not in DATASETS:
            raise DataError(f"{source}: unknown dataset {self.dataset!r}; one of {', '.join(DATASETS)}")
        if self.dataset in ("folder", "npz") and not self.path:
            raise DataError(f"{source}: dataset {self.dataset!r} needs a path")
        if self.dataset not in ("folder", "npz") and self.path:
            raise DataError(f"{source}: path is for folder and npz data, not {self.dataset!r}")
        if self.dataset != "folder" and (self.image_size or self.channels):
            raise DataError(f"{source}: image_size and channels are for folder data (others come as they are)")
        if self.image_size < 0 or self.channels not in (0, 1, 3):
            raise DataError(f"{source}: image_size must be positive and channels 1 or 3")
        for key in ("valid", "test"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or isinstance(value, float) and not value < 1:
                raise DataError(f"{source}: {key} must be a count of images or a fraction below 1, got {value!r}")
        if self.order not in ("", *ORDERS):
            raise DataError(f"{source}: order must be one of {ORDERS}, got {self.order!r}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise DataError(f"{source}: mean and std need one value per channel, std above 0")

    @classmethod
    def from_stored(cls, table: dict[str, Any]) -> DataConfig:
        """The table a study stored (every field, `valid = 0` where the file left it out)."""
        return cls.from_dict({k: v for k, v in table.items() if not (k == "valid" and v == 0)}, "stored [data]")

    @property
    def holdout_order(self) -> str:
        return self.order or ("last" if self.dataset in ("mnist", *TORCHVISION, "npz") else "random")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no generated __eq__
class Split:
    """What one run trains and evaluates on: uint8 images (N, C, H, W) on its device, normalized a
    batch at a time by `normalize`."""

    train_x: torch.Tensor
    train_y: torch.Tensor  # int64 (N,)
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str  # "valid" or "test"
    mean: tuple[float, ...] = (MEAN,)
    std: tuple[float, ...] = (STD,)
    flip: bool = False  # random horizontal flips in training
    classes: int = 10

    def head(self, n: int) -> Split:
        """The same split, training on its first n images only (all of them if it holds fewer)."""
        return Split(self.train_x[:n], self.train_y[:n], self.eval_x, self.eval_y, self.eval_name, self.mean,
                     self.std, self.flip, self.classes)

    @property
    def shape(self) -> Shape:
        return Shape(self.train_x.shape[1], self.train_x.shape[2], self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as float32 of zero mean and unit deviation per channel, on their device."""
        scaled = images.float().div(255)  # a new tensor whatever the input's type: the stored images stay
        if len(self.mean) == 1:
            return scaled.sub_(self.mean[0]).div_(self.std[0])
        mean, std = self._channel_tensors
        return scaled.sub_(mean).div_(std)

    @cached_property
    def _channel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (C, 1, 1) tensors on the split's device, made once rather than every batch."""
        return tuple(torch.tensor(v, device=self.train_x.device).view(-1, 1, 1) for v in (self.mean, self.std))

    def background(self) -> float | torch.Tensor:
        """The normalized value of a blank pixel: each channel's darkest training value."""
        if len(self.mean) == 1:
            return float(self.normalize(self.train_x.min().view(1, 1, 1)))
        darkest = self.train_x.amin(dim=(0, 2, 3)).view(1, -1, 1, 1)
        return self.normalize(darkest).view(-1, 1, 1)


@dataclass(frozen=True, eq=False)
class Data:
    """A data set cut into training, validation and test parts (uint8 on the host) with its
    normalization: `split` makes what a run uses, `identity` says what it is."""

    config: DataConfig
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: Images = field(repr=False)  # what it was cut from
    rest_x: torch.Tensor = field(repr=False)  # training and validation images in the source's order
    rest_y: torch.Tensor = field(repr=False)

    @cached_property
    def fingerprint(self) -> str:
        """Of the source's arrays, before they are cut (a quarter of a second for MNIST)."""
        s = self.source
        return fingerprint(s.train_x, s.train_y, s.test_x, s.test_y)

    @property
    def shape(self) -> Shape:
        return Shape(self.train_x.shape[1], self.train_x.shape[2], len(self.classes))

    def split(self, evaluate_on: str = "valid", subset: int | None = None,
              device: str | torch.device = "cpu") -> Split:
        """Train/eval tensors on device. "valid" trains on the training part and evaluates on the
        validation part, so a search never sees the test set; "test" trains on both and evaluates
        on the test part. subset keeps the first N training images and leaves the eval set as it is."""
        if evaluate_on == "valid":
            train_x, train_y, eval_x, eval_y = self.train_x, self.train_y, self.valid_x, self.valid_y
        elif evaluate_on == "test":
            # in the source's order, so a final run does not depend on how validation was drawn
            train_x, train_y = self.rest_x, self.rest_y
            eval_x, eval_y = self.test_x, self.test_y
        else:
            raise ValueError(f"evaluate_on must be 'valid' or 'test', not {evaluate_on!r}")
        if subset is not None:
            if not 1 <= subset <= len(train_x):
                raise DataError(f"subset must be between 1 and {len(train_x)} when evaluating on "
                                 f"{evaluate_on!r}, got {subset}")
            train_x, train_y = train_x[:subset], train_y[:subset]
        # Moved as bytes, a quarter of the float32 size; normalized on the device a batch at a time.
        return Split(train_x.to(device), train_y.to(device), eval_x.to(device), eval_y.to(device), evaluate_on,
                     self.mean, self.std, self.config.flip, len(self.classes))

    def identity(self) -> dict[str, Any]:
        """What the study stores of its data, and what `differences` compares."""
        return {
            "dataset": self.config.dataset,
            "path": str(Path(self.config.path).resolve()) if self.config.path else "",
            "fingerprint": self.fingerprint,
            "shape": [self.shape.channels, self.shape.size, self.shape.size],
            "classes": list(self.classes),
            "split": {"train": len(self.train_x), "valid": len(self.valid_x), "test": len(self.test_x),
                      "order": self.config.holdout_order},
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
        }

    def describe(self) -> str:
        """One line: the data's shape, classes and parts."""
        return describe(self.identity())


def describe(identity: dict[str, Any]) -> str:
    """A data identity (Data.identity) in one line: source, shape, classes and parts."""
    classes = identity["classes"]
    names = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    c, h, w = identity["shape"]
    parts = identity["split"]
    where = f" {identity['path']}" if identity["path"] else ""
    return (f"{identity['dataset']}{where}: {c}x{h}x{w}, {len(classes)} classes ({names}); "
            f"{parts['train']:,} train, {parts['valid']:,} valid, {parts['test']:,} test")


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between the identity a study stored and the data as it is now, a phrase each."""
    changed = []
    for key in stored.keys() | current.keys():
        if stored.get(key) != current.get(key):
            if key == "fingerprint":
                changed.append("the images or labels (fingerprint "
                               f"{stored.get(key)} stored, {current.get(key)} now)")
            else:
                changed.append(f"{key}: {stored.get(key)!r} stored, {current.get(key)!r} now")
    return sorted(changed)


def fingerprint(*arrays: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        if array is not None:
            digest.update(str((tuple(array.shape), str(array.dtype))).encode())
            digest.update(array.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _count(value: float, total: int, key: str, source: str) -> int:
    n = round(value * total) if isinstance(value, float) else int(value)
    if not 1 <= n < total:
        raise DataError(f"{source}: {key} = {value!r} holds out {n} of {total} images; it must leave some to train on "
                        "and hold at least one")
    return n


def _holdout(x: torch.Tensor, y: torch.Tensor, n: int, order: str) -> tuple[torch.Tensor, ...]:
    """(kept x, kept y, held x, held y): the last n, or n drawn at random; each part in the source's order."""
    if order == "last":
        return x[:-n], y[:-n], x[-n:], y[-n:]
    held = torch.zeros(len(x), dtype=torch.bool)
    held[torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))[:n]] = True
    return x[~held], y[~held], x[held], y[held]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and deviation of pixels in [0, 1], summed in float64 a chunk at a time."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, len(images), 4096):
        chunk = images[i : i + 4096].to(torch.float64).div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    n = images.numel() / channels
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def open_data(config: DataConfig, data_dir: Path, progress: bool = False,
              notify: Callable[[str], None] | None = None) -> Data:
    """The data `config` names, read (MNIST fetched if missing, a folder decoded or taken from
    its cache under data_dir) and cut; DataError says in one line what is wrong with it."""
    return cut(SOURCES[config.dataset](config, data_dir, progress, notify), config)


def _mnist_images(mnist: Mnist) -> Images:
    return Images(mnist.train_images.unsqueeze(1), mnist.train_labels, mnist.test_images.unsqueeze(1),
                  mnist.test_labels, tuple(map(str, range(10))))


def _from_mnist(config: DataConfig, root: Path, progress: bool, notify: Callable[[str], None] | None) -> Images:
    prepare(root, progress, notify)
    return _mnist_images(load_mnist(root))


def _from_folder(config: DataConfig, root: Path, progress: bool, notify: Callable[[str], None] | None) -> Images:
    return from_folder(Path(config.path), config.image_size or None, config.channels or None, root / CACHE_SUBDIR,
                       progress)


def _from_torchvision(name: str) -> Callable[..., Images]:
    return lambda config, root, progress, notify: from_torchvision(name, root, progress)


# Each [data] dataset's reader, (config, data directory, progress, notify) -> Images, by name: the
# one place a name is looked up (DataConfig.check has refused any other, listing DATASETS).
SOURCES: dict[str, Callable[[DataConfig, Path, bool, Callable[[str], None] | None], Images]] = {
    "mnist": _from_mnist,
    **{name: _from_torchvision(name) for name in TORCHVISION},
    "digits": lambda config, root, progress, notify: from_digits(),
    "folder": _from_folder,
    "npz": lambda config, root, progress, notify: from_npz(Path(config.path)),
}


def cut(images: Images, config: DataConfig, source: str = "[data]") -> Data:
    """`images` cut into training, validation and test parts as `config` says."""
    order = config.holdout_order
    x, y = images.train_x, images.train_y
    if images.test_x is None:
        x, y, test_x, test_y = _holdout(x, y, _count(config.test, len(x), "test", source), order)
    else:
        test_x, test_y = images.test_x, images.test_y
    valid = config.valid or (VALID_SIZE if len(x) >= 5 * VALID_SIZE else 0.2)
    train_x, train_y, valid_x, valid_y = _holdout(x, y, _count(valid, len(x), "valid", source), order)
    _check_classes(images, train_y, config)
    channels = train_x.shape[1]
    if config.mean:
        if len(config.mean) != channels:
            raise DataError(f"{source}: mean and std give {len(config.mean)} values for {channels}-channel images")
        mean, std = tuple(map(float, config.mean)), tuple(map(float, config.std))
    elif config.dataset == "mnist":
        mean, std = (MEAN,), (STD,)  # the published statistics, as every MNIST study so far used
    else:
        mean, std = _channel_stats(train_x)
    return Data(config, train_x, train_y, valid_x, valid_y, test_x, test_y, tuple(images.classes), mean, std, images,
                x, y)


def _check_classes(images: Images, train_y: torch.Tensor, config: DataConfig) -> None:
    """DataError unless the training part holds at least 2 classes: with one, every net scores a
    trivial 100% and the search learns nothing."""
    present = torch.unique(train_y)
    if len(present) >= 2:
        return
    where = config.path or config.dataset
    name = images.classes[int(present[0])] if len(present) else None
    if len(torch.unique(images.train_y)) < 2:
        raise DataError(f"{where}: every training image is labelled {name!r}; a classifier needs at least 2 classes")
    raise DataError(f"{where}: once validation is held out, every training image left is labelled {name!r}; "
                    "order = \"random\" in [data] holds out a random draw instead of the last images")


def make_split(mnist: Mnist, evaluate_on: str = "valid", subset: int | None = None,
               device: str | torch.device = "cpu") -> Split:
    """MNIST's split as the default study cuts it: the last 10,000 training images validate."""
    return cut(_mnist_images(mnist), DataConfig()).split(evaluate_on, subset, device)
