"""Image classification data sets other than the built-in MNIST path, read into uint8 arrays:
a folder of images (decoded once, then cached by its files' fingerprint), an npz, scikit-learn's
8x8 digits and torchvision's FashionMNIST, KMNIST, CIFAR-10 and SVHN. Each loader returns Images
or raises DataError with one line that names the file or folder at fault."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import sys
import zipfile
from contextlib import ExitStack, redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nas.data.errors import DataError

TORCHVISION = ("fashion-mnist", "kmnist", "cifar10", "svhn")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MIRROR_TIMEOUT_S = 10.0
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first bytes: with members, and empty
NPY_MAGIC = b"\x93NUMPY"  # a single array saved by numpy.save (refused below, by name)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no generated __eq__
class Images:
    """A data set's images and labels as loaded, before any split or normalization."""

    train_x: torch.Tensor  # uint8 (N, C, H, W), contiguous
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor | None  # uint8 (M, C, H, W), or None where the source has no test split
    test_y: torch.Tensor | None
    classes: tuple[str, ...]  # label k is classes[k]


# --- a folder of images ------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


Files = list[tuple[str, int]]  # (path relative to the folder given, label) of each image in a split


def _files(root: Path, split: str, classes: list[str]) -> Files:
    """Every image under root/split/<class>/, ordered by file name across classes, then class."""
    found = []
    for label, name in enumerate(classes):
        folder = os.path.join(split, name)
        with os.scandir(root / folder) as entries:  # is_file from the listing, and strings: no stat or
            names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]  # Path per file
        if not names:
            raise DataError(f"{root / folder}: class folder holds no files")
        found += [(file, name, label) for file in names]
    found.sort()
    return [(os.path.join(split, name, file), label) for file, name, label in found]


def _layout(root: Path) -> tuple[list[str], Files, Files | None]:
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if (root / "train").is_dir():
        classes = _class_dirs(root / "train")
        if not (root / "test").is_dir():
            raise DataError(f"{root}: has train/ but no test/; put the test images in test/<class>/, or all "
                            "images in <class>/ folders directly under it")
        test_classes = _class_dirs(root / "test")
        if test_classes != classes:
            only = sorted(set(classes) ^ set(test_classes))
            raise DataError(f"{root}: train/ and test/ have different class folders ({', '.join(only)})")
    else:
        classes = _class_dirs(root)
    if len(classes) < 2:
        raise DataError(f"{root}: needs at least 2 class folders, found {len(classes)}"
                        + (f": {classes[0]!r}" if classes else ""))
    if (root / "train").is_dir():
        return classes, _files(root, "train", classes), _files(root, "test", classes)
    return classes, _files(root, "", classes), None


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not an image Pillow can read ({exc.__class__.__name__})") from None


def _header(root: Path, files: Files) -> tuple[bool, set[tuple[int, int]]]:
    """Whether every image is grayscale, and the sizes seen (reading headers only)."""
    gray, sizes = True, set()
    for file, _ in files:
        with _open(os.path.join(root, file)) as image:
            gray = gray and image.mode in GRAYSCALE_MODES
            sizes.add(image.size)
    return gray, sizes


def _decode(root: Path, files: Files, size: int, channels: int, bar: tqdm) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    x = np.empty((len(files), channels, size, size), dtype=np.uint8)
    y = np.empty(len(files), dtype=np.int64)
    mode = "L" if channels == 1 else "RGB"
    for i, (file, label) in enumerate(files):
        path = os.path.join(root, file)
        try:
            with _open(path) as image:
                if image.mode.startswith("I;16"):  # Pillow's convert would clip 16-bit values at 255
                    image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image)
                x[i] = pixels if channels == 1 else pixels.transpose(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt past the header
            raise DataError(f"{path}: not an image Pillow can read ({exc.__class__.__name__})") from None
        y[i] = label
        bar.update()
    return x, y


def _cache_key(root: Path, image_size: int | None, channels: int | None, files: Files) -> str:
    digest = hashlib.sha256(repr((CACHE_VERSION, str(root.resolve()), image_size, channels)).encode())
    for file, label in sorted(files):
        stat = os.stat(os.path.join(root, file))
        digest.update(f"{file}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path) -> Images | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            test = bool(cached["has_test"])
            return Images(torch.from_numpy(cached["train_x"]), torch.from_numpy(cached["train_y"]),
                          torch.from_numpy(cached["test_x"]) if test else None,
                          torch.from_numpy(cached["test_y"]) if test else None,
                          tuple(str(c) for c in cached["classes"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # missing or damaged: decode again


def _write_cache(path: Path, images: Images) -> None:
    """Atomically, so a reader sees the whole file or none; a cache that can't be written is no error."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    empty = np.zeros((0,), dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as out:
            np.savez(out, train_x=images.train_x.numpy(), train_y=images.train_y.numpy(),
                     test_x=empty if images.test_x is None else images.test_x.numpy(),
                     test_y=empty if images.test_y is None else images.test_y.numpy(),
                     has_test=np.array(images.test_x is not None), classes=np.array(images.classes))
        os.replace(temporary, path)
    except OSError:
        with suppress(OSError):  # where the folder itself is missing, there is nothing to remove
            temporary.unlink(missing_ok=True)


def from_folder(path: Path, image_size: int | None, channels: int | None, cache_dir: Path | None,
                progress: bool = False) -> Images:
    """`path/train/<class>/*` and `path/test/<class>/*`, or `path/<class>/*` (no test split).
    Class names are the sorted folder names; images are ordered by file name across classes. Any
    image Pillow reads, converted to grayscale (channels 1) or RGB (3; None: 1 if every image is
    grayscale; 16-bit values keep their high byte), resized (bilinear, no crop) to image_size (None:
    their one square size). With a cache_dir, the arrays are kept there under a key of the files'
    paths, sizes and times, so a second call with unchanged files decodes nothing."""
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    classes, train, test = _layout(path)
    every = train + (test or [])
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"folder-{_cache_key(path, image_size, channels, every)}.npz"
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    if channels is None or image_size is None:
        gray, sizes = _header(path, every)
        channels = channels or (1 if gray else 3)
        if image_size is None:
            (width, height), *others = sorted(sizes)
            if others:
                raise DataError(f"{path}: images have mixed sizes (e.g. {width}x{height} and "
                                f"{others[0][0]}x{others[0][1]}); set image_size in [data]")
            if width != height:
                raise DataError(f"{path}: images are {width}x{height}, not square; set image_size in [data]")
            image_size = width
    with tqdm(total=len(every), desc=f"Decoding {path}", file=sys.stderr, disable=not progress) as bar:
        train_x, train_y = _decode(path, train, image_size, channels, bar)
        test_arrays = _decode(path, test, image_size, channels, bar) if test is not None else (None, None)
    images = Images(torch.from_numpy(train_x), torch.from_numpy(train_y),
                    None if test is None else torch.from_numpy(test_arrays[0]),
                    None if test is None else torch.from_numpy(test_arrays[1]), tuple(classes))
    if cache is not None:
        _write_cache(cache, images)
    return images


# --- an npz --------------------------------------------------------------------------------------


def _pixels(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise DataError(f"{path}: {key} must be (N, H, W) or (N, H, W, C) with C 1 or 3, got {x.shape}")
    if x.shape[1] != x.shape[2]:
        raise DataError(f"{path}: images must be square, got {x.shape[1]}x{x.shape[2]}")
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{path}: {key} has dtype {x.dtype}, not numbers")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise DataError(f"{path}: {key} holds NaN or infinite values")
        if np.issubdtype(x.dtype, np.floating) and x.size and float(x.max()) <= 1.0:
            x = x * 255.0
        if x.size and (float(x.min()) < 0 or float(x.max()) > 255):
            raise DataError(f"{path}: {key} holds values outside 0..255 (or 0..1 as floats)")
        x = np.rint(x).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras's CIFAR-10 labels come as (N, 1)
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{path}: {key} holds {len(y) if y.ndim == 1 else y.shape} labels for {n} images")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) and np.all(y == np.rint(y))):
        raise DataError(f"{path}: {key} must hold whole-number class labels")
    return torch.from_numpy(y.astype(np.int64))


def from_npz(path: Path) -> Images:
    """x_train, y_train and optionally x_test, y_test (both or neither); `classes` optionally names
    them (else "0".."K-1", K one more than the largest training label)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as file:
            magic = file.read(len(NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not magic.startswith(ZIP_MAGIC) and magic != NPY_MAGIC:
        # numpy would take it for a pickle and speak of allow_pickle, which is beside the point.
        raise DataError(f"{path}: not an npz file (one is a zip archive of named arrays, as numpy.savez writes it)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single array saved with np.save
            raise ValueError(f"one {loaded.dtype} array {loaded.shape}, not named arrays")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not an npz file numpy can read ({reason})") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"{path}: no {key} array (it holds {', '.join(sorted(arrays)) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: holds only one of x_test and y_test")
    train_x = _pixels(arrays["x_train"], path, "x_train")
    if not len(train_x):
        raise DataError(f"{path}: x_train holds no images")
    train_y = _labels(arrays["y_train"], len(train_x), path, "y_train")
    test_x = test_y = None
    if "x_test" in arrays:
        test_x = _pixels(arrays["x_test"], path, "x_test")
        test_y = _labels(arrays["y_test"], len(test_x), path, "y_test")
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"{path}: x_test images are {tuple(test_x.shape[1:])}, "
                            f"x_train's {tuple(train_x.shape[1:])}")
    names = tuple(str(c) for c in arrays["classes"].reshape(-1)) if "classes" in arrays else None
    if names == ():
        raise DataError(f"{path}: classes names no class")
    count = len(names) if names is not None else int(train_y.max()) + 1
    for key, labels in (("y_train", train_y), ("y_test", test_y)):
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= count):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise DataError(f"{path}: {key} holds label {bad}, outside 0..{count - 1}")
    return Images(train_x, train_y, test_x, test_y, tuple(map(str, range(count))) if names is None else names)


# --- scikit-learn's digits -----------------------------------------------------------------------


def from_digits() -> Images:
    """sklearn.datasets.load_digits: 1,797 8x8 images, pixels 0..16 scaled to 0..255, no test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None]
    return Images(torch.from_numpy(x), torch.from_numpy(digits.target.astype(np.int64)), None, None,
                  tuple(map(str, range(10))))


# --- torchvision's sets --------------------------------------------------------------------------


def _where(name: str, data_dir: Path) -> str:
    """Which files to put where, for a set whose mirrors are unreachable."""
    if name in ("fashion-mnist", "kmnist"):
        folder = "FashionMNIST" if name == "fashion-mnist" else "KMNIST"
        return (f"put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                f"t10k-labels-idx1-ubyte (or their .gz) in {data_dir / folder / 'raw'}")
    if name == "cifar10":
        return f"unpack cifar-10-python.tar.gz in {data_dir} (giving {data_dir / 'cifar-10-batches-py'})"
    return f"put train_32x32.mat and test_32x32.mat in {data_dir}"


def _torchvision_set(name: str, data_dir: Path, train: bool, download: bool):
    from torchvision import datasets

    if name == "svhn":
        return datasets.SVHN(str(data_dir), split="train" if train else "test", download=download)
    kind = {"fashion-mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST, "cifar10": datasets.CIFAR10}[name]
    return kind(str(data_dir), train=train, download=download)


def _arrays(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "svhn":
        return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.from_numpy(dataset.labels.astype(np.int64))
    if name == "cifar10":
        x = np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))
        return torch.from_numpy(x), torch.tensor(dataset.targets, dtype=torch.int64)
    return dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64)


def from_torchvision(name: str, data_dir: Path, progress: bool = False) -> Images:
    """One of TORCHVISION through torchvision's own class under data_dir, downloaded if missing;
    where that fails, DataError says which files to put where."""
    if name not in TORCHVISION:
        raise DataError(f"unknown dataset {name!r}; one of mnist, {', '.join(TORCHVISION)}, digits, folder, npz")
    try:
        sets = [_torchvision_set(name, data_dir, train, download=False) for train in (True, False)]
    except Exception:  # noqa: BLE001 - missing (RuntimeError) or unreadable (many kinds): download, or say why not
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(MIRROR_TIMEOUT_S)
        try:
            with ExitStack() as stack:
                if not progress:  # torchvision prints its messages and bars unconditionally
                    stack.enter_context(redirect_stdout(io.StringIO()))
                    stack.enter_context(redirect_stderr(io.StringIO()))
                sets = [_torchvision_set(name, data_dir, train, download=True) for train in (True, False)]
        except Exception as exc:  # noqa: BLE001 - torchvision's download raises many kinds; each ends here
            lines = str(exc).strip().splitlines()
            reason = lines[-1] if lines else type(exc).__name__
            raise DataError(f"cannot download {name} ({reason}); {_where(name, data_dir)}") from None
        finally:
            socket.setdefaulttimeout(previous)
    (train_x, train_y), (test_x, test_y) = (_arrays(s, name) for s in sets)
    classes = tuple(sets[0].classes) if hasattr(sets[0], "classes") else tuple(map(str, range(10)))
    return Images(train_x, train_y, test_x, test_y, classes)
