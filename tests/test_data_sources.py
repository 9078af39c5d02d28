"""nas.data.sources on small files each test writes: folders of images, npz, scikit-learn's digits
and torchvision's sets from their own on-disk formats (no downloads)."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data.errors import DataError
from nas.data.mnist import encode_idx
from nas.data.sources import TORCHVISION, from_digits, from_folder, from_npz, from_torchvision


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], suffix: str = ".png") -> None:
    """images (N, H, W) or (N, H, W, 3) uint8 as root/<class>/<index:05d><suffix>."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}{suffix}")


def random_set(n: int, seed: int, shape: tuple[int, ...] = (6, 6), classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])  # every class present
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), labels


CLASSES = ["ant", "bee", "cat"]


@pytest.fixture
def split_folder(tmp_path: Path) -> tuple[Path, tuple[np.ndarray, ...]]:
    """A train/test folder of grayscale PNGs, and the arrays it was written from."""
    train_x, train_y = random_set(12, seed=0)
    test_x, test_y = random_set(5, seed=1)
    write_folder(tmp_path / "set" / "train", train_x, train_y, CLASSES)
    write_folder(tmp_path / "set" / "test", test_x, test_y, CLASSES)
    return tmp_path / "set", (train_x, train_y, test_x, test_y)


# --- folders -------------------------------------------------------------------------------------


def test_folder_round_trips_in_file_name_order(split_folder):
    path, (train_x, train_y, test_x, test_y) = split_folder
    images = from_folder(path, None, None, cache_dir=None)
    assert images.classes == tuple(CLASSES)
    assert images.train_x.dtype == torch.uint8 and images.train_x.shape == (12, 1, 6, 6)
    assert images.train_x.is_contiguous() and images.train_y.dtype == torch.int64
    assert torch.equal(images.train_x, torch.from_numpy(train_x)[:, None])
    assert torch.equal(images.train_y, torch.from_numpy(train_y))
    assert torch.equal(images.test_x, torch.from_numpy(test_x)[:, None])
    assert torch.equal(images.test_y, torch.from_numpy(test_y))


def test_folder_breaks_file_name_ties_by_class(tmp_path: Path):
    for name, value in (("b", 200), ("a", 100)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((2, 2), value, np.uint8)).save(tmp_path / name / "0.png")
    images = from_folder(tmp_path, None, None, cache_dir=None)
    assert images.train_y.tolist() == [0, 1] and images.train_x[:, 0, 0, 0].tolist() == [100, 200]


def test_folder_without_train_has_no_test_split(tmp_path: Path):
    x, y = random_set(7, seed=2)
    write_folder(tmp_path, x, y, CLASSES)
    (tmp_path / ".hidden").mkdir()  # ignored, as are hidden files
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"junk")
    images = from_folder(tmp_path, None, None, cache_dir=None)
    assert images.test_x is None and images.test_y is None and images.classes == tuple(CLASSES)
    assert torch.equal(images.train_x, torch.from_numpy(x)[:, None])


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """RGB and grayscale images of four sizes, in PNG and JPEG."""
    rng = np.random.default_rng(3)
    for name, size, mode, suffix in (("a", (10, 10), "RGB", ".png"), ("a", (12, 8), "L", ".jpg"),
                                     ("b", (6, 6), "L", ".png"), ("b", (7, 9), "RGB", ".jpg")):
        (tmp_path / name).mkdir(exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / name / f"{size}{suffix}")
    return tmp_path


def test_folder_resizes_mixed_images_to_image_size(mixed_folder: Path):
    images = from_folder(mixed_folder, 5, None, cache_dir=None)
    assert images.train_x.shape == (4, 3, 5, 5) and images.classes == ("a", "b")
    assert from_folder(mixed_folder, 5, 1, cache_dir=None).train_x.shape == (4, 1, 5, 5)
    with pytest.raises(DataError, match="image_size") as error:
        from_folder(mixed_folder, None, None, cache_dir=None)
    assert "mixed sizes (e.g. 6x6 and 7x9)" in str(error.value) and "\n" not in str(error.value)


def test_folder_of_one_non_square_size_needs_image_size(tmp_path: Path):
    write_folder(tmp_path, np.zeros((2, 4, 6), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="6x4, not square; set image_size"):
        from_folder(tmp_path, None, None, cache_dir=None)
    assert from_folder(tmp_path, 4, None, cache_dir=None).train_x.shape == (2, 1, 4, 4)


def test_folder_channels_follow_the_images(tmp_path: Path):
    x, y = random_set(4, seed=4, classes=2)
    write_folder(tmp_path, x, y, ["p", "q"])
    assert from_folder(tmp_path, None, None, cache_dir=None).train_x.shape[1] == 1
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "q" / "rgb.png")
    assert from_folder(tmp_path, None, None, cache_dir=None).train_x.shape[1] == 3


def test_folder_keeps_the_high_byte_of_16_bit_images(tmp_path: Path):
    for name, value in (("a", 0x1234), ("b", 0xFF00)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((3, 3), value, np.uint16)).save(tmp_path / name / "0.png")
    images = from_folder(tmp_path, None, None, cache_dir=None)
    assert images.train_x.shape == (2, 1, 3, 3) and images.train_x[:, 0, 0, 0].tolist() == [0x12, 0xFF]


def test_folder_cache_hit_decodes_nothing(split_folder, tmp_path: Path, monkeypatch):
    path, _ = split_folder
    cache = tmp_path / "cache"
    first = from_folder(path, None, None, cache_dir=cache)
    assert len(list(cache.glob("folder-*.npz"))) == 1 and not list(cache.glob(".*"))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded on a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", refuse)
        second = from_folder(path, None, None, cache_dir=cache)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.classes == first.classes


def test_folder_cache_keeps_a_missing_test_split(tmp_path: Path):
    x, y = random_set(5, seed=5)
    write_folder(tmp_path / "set", x, y, CLASSES)
    from_folder(tmp_path / "set", None, None, cache_dir=tmp_path / "cache")
    cached = from_folder(tmp_path / "set", None, None, cache_dir=tmp_path / "cache")
    assert cached.test_x is None and cached.test_y is None and cached.classes == tuple(CLASSES)


def test_folder_cache_key_follows_files_and_options(split_folder, tmp_path: Path):
    path, _ = split_folder
    cache = tmp_path / "cache"
    from_folder(path, None, None, cache_dir=cache)
    from_folder(path, None, None, cache_dir=cache)
    assert len(list(cache.glob("folder-*.npz"))) == 1
    touched = path / "train" / "ant" / "00000.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    from_folder(path, None, None, cache_dir=cache)
    assert len(list(cache.glob("folder-*.npz"))) == 2
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(path / "train" / "bee" / "99999.png")
    assert len(from_folder(path, None, None, cache_dir=cache).train_x) == 13
    from_folder(path, 6, 1, cache_dir=cache)  # the same arrays, asked for differently: its own entry
    assert len(list(cache.glob("folder-*.npz"))) == 4


def test_folder_ignores_and_rewrites_a_corrupt_cache(split_folder, tmp_path: Path):
    path, (train_x, *_) = split_folder
    cache = tmp_path / "cache"
    from_folder(path, None, None, cache_dir=cache)
    (entry,) = cache.glob("folder-*.npz")
    entry.write_bytes(b"not an npz")
    assert torch.equal(from_folder(path, None, None, cache_dir=cache).train_x, torch.from_numpy(train_x)[:, None])
    with np.load(entry, allow_pickle=False) as rewritten:
        assert rewritten["train_x"].shape == (12, 1, 6, 6)


def test_folder_cache_that_cannot_be_written_is_no_error(split_folder, tmp_path: Path):
    path, _ = split_folder
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert len(from_folder(path, None, None, cache_dir=blocked / "cache").train_x) == 12


def test_folder_errors_name_what_is_wrong(tmp_path: Path):
    def error(path: Path, image_size=None, channels=None) -> str:
        with pytest.raises(DataError) as raised:
            from_folder(path, image_size, channels, cache_dir=None)
        message = str(raised.value)
        assert "\n" not in message
        return message

    assert "no such folder" in error(tmp_path / "absent") and "absent" in error(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"")
    assert "not a folder" in error(tmp_path / "file.png")

    one = tmp_path / "one"
    x, y = random_set(2, seed=6, classes=1)
    write_folder(one, x, y, ["cat"])
    assert "found 1: 'cat'" in error(one)

    empty = tmp_path / "empty"
    write_folder(empty, x, y, ["cat"])
    (empty / "dog").mkdir()
    assert "dog" in error(empty) and "no files" in error(empty)

    corrupt = tmp_path / "corrupt"
    write_folder(corrupt, *random_set(3, seed=7, classes=2), ["a", "b"])
    (corrupt / "b" / "x.png").write_bytes(b"\x89garbage, not a PNG at all")
    assert "x.png" in error(corrupt) and "not an image" in error(corrupt)
    assert "x.png" in error(corrupt, image_size=6, channels=1)  # found while decoding, not from headers

    truncated = tmp_path / "truncated"
    write_folder(truncated, *random_set(3, seed=8, classes=2), ["a", "b"])
    whole = (truncated / "a" / "00000.png").read_bytes()
    (truncated / "a" / "00000.png").write_bytes(whole[:len(whole) // 2])
    assert "00000.png" in error(truncated)

    mismatch = tmp_path / "mismatch"
    write_folder(mismatch / "train", x, y, ["cat"])
    write_folder(mismatch / "train", x, y, ["dog"])
    write_folder(mismatch / "test", x, y, ["cat"])
    write_folder(mismatch / "test", x, y, ["eel"])
    message = error(mismatch)
    assert "dog" in message and "eel" in message and "cat" not in message.split("(")[-1]

    no_test = tmp_path / "no-test"
    write_folder(no_test / "train", *random_set(3, seed=9, classes=2), ["a", "b"])
    assert "test/" in error(no_test)

    assert "channels" in error(one, channels=2)
    assert "image_size" in error(one, image_size=0)


# --- npz -----------------------------------------------------------------------------------------


def test_npz_uint8_with_a_test_split(tmp_path: Path):
    x, y = random_set(8, seed=10)
    tx, ty = random_set(4, seed=11)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=tx, y_test=ty)
    images = from_npz(tmp_path / "d.npz")
    assert torch.equal(images.train_x, torch.from_numpy(x)[:, None]) and images.train_x.is_contiguous()
    assert torch.equal(images.test_y, torch.from_numpy(ty)) and images.train_y.dtype == torch.int64
    assert images.classes == ("0", "1", "2")


def test_npz_float_rgb_in_unit_range_and_named_classes(tmp_path: Path):
    rng = np.random.default_rng(12)
    x = rng.random((5, 4, 4, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 3, 0]), classes=np.array(["a", "b", "c", "d"]))
    images = from_npz(tmp_path / "d.npz")
    assert images.train_x.shape == (5, 3, 4, 4) and images.train_x.is_contiguous() and images.test_x is None
    assert torch.equal(images.train_x, torch.from_numpy(np.rint(x * 255).astype(np.uint8).transpose(0, 3, 1, 2)))
    assert images.classes == ("a", "b", "c", "d")
    np.savez(tmp_path / "e.npz", x_train=np.full((2, 3, 3), 200.4), y_train=np.array([[0.0], [1.0]]))  # as Keras
    images = from_npz(tmp_path / "e.npz")
    assert images.train_x.unique().tolist() == [200] and images.train_y.tolist() == [0, 1]


@pytest.mark.parametrize("arrays, expected", [
    (dict(x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 1]), x_test=np.zeros((1, 4, 4), np.uint8),
          y_test=np.array([2])), "label 2"),
    (dict(x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 5]), classes=np.array(["a", "b"])), "label 5"),
    (dict(x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1])), "2 labels for 3 images"),
    (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.array([], np.int64)), "no images"),
    (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]), classes=np.array([], str)),
     "names no class"),
    (dict(y_train=np.array([0, 1])), "x_train"),
    (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]), x_test=np.zeros((1, 4, 4), np.uint8)),
     "x_test and y_test"),
    (dict(x_train=np.zeros((2, 28, 32), np.uint8), y_train=np.array([0, 1])), "square, got 28x32"),
    (dict(x_train=np.full((2, 4, 4), 300.0), y_train=np.array([0, 1])), "outside 0..255"),
    (dict(x_train=np.full((2, 4, 4), -1), y_train=np.array([0, 1])), "outside 0..255"),
    (dict(x_train=np.full((2, 4, 4), np.nan), y_train=np.array([0, 1])), "NaN"),
    (dict(x_train=np.zeros((2, 4, 4, 2), np.uint8), y_train=np.array([0, 1])), "C 1 or 3"),
    (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0.5, 1])), "whole-number"),
    (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]), x_test=np.zeros((1, 5, 5), np.uint8),
          y_test=np.array([0])), "x_test images"),
])
def test_npz_errors_name_what_is_wrong(tmp_path: Path, arrays, expected):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=expected) as error:
        from_npz(tmp_path / "bad.npz")
    assert "bad.npz" in str(error.value) and "\n" not in str(error.value)


def test_npz_file_that_is_missing_or_not_a_zip(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        from_npz(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz"):
        from_npz(tmp_path / "junk.npz")
    (tmp_path / "text.npz").write_text("x_train,y_train\n0,1\n")
    with pytest.raises(DataError) as text:
        from_npz(tmp_path / "text.npz")
    assert str(text.value) == (f"{tmp_path / 'text.npz'}: not an npz file (one is a zip archive of named arrays, "
                               "as numpy.savez writes it)")
    np.save(tmp_path / "one.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="one.npy: not an npz file numpy can read .one uint8 array"):
        from_npz(tmp_path / "one.npy")


# --- digits --------------------------------------------------------------------------------------


def test_digits():
    images = from_digits()
    assert images.train_x.shape == (1797, 1, 8, 8) and images.train_x.dtype == torch.uint8
    assert images.train_x.is_contiguous() and images.test_x is None and images.test_y is None
    assert int(images.train_x.min()) == 0 and int(images.train_x.max()) == 255
    assert images.classes == tuple("0123456789") and images.train_y.unique().tolist() == list(range(10))


# --- torchvision ---------------------------------------------------------------------------------


def test_fashion_mnist_from_its_raw_files(tmp_path: Path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = random_set(6, seed=13, shape=(28, 28), classes=10 // 2)
    test_x, test_y = random_set(4, seed=14, shape=(28, 28), classes=4)
    for name, array in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y.astype(np.uint8)),
                        ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y.astype(np.uint8))):
        (raw / name).write_bytes(encode_idx(array))
    images = from_torchvision("fashion-mnist", tmp_path)
    assert torch.equal(images.train_x, torch.from_numpy(train_x)[:, None]) and images.train_x.is_contiguous()
    assert torch.equal(images.train_y, torch.from_numpy(train_y)) and images.train_y.dtype == torch.int64
    assert torch.equal(images.test_x, torch.from_numpy(test_x)[:, None])
    assert images.classes[0] == "T-shirt/top" and len(images.classes) == 10


def test_cifar10_from_its_batches(tmp_path: Path, monkeypatch):
    # The batches are checked against the real files' md5s; these small ones can't match.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(15)
    batches = {name: (rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, 10, 3).tolist())
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, (data, labels) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    images = from_torchvision("cifar10", tmp_path)
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(images.train_x, torch.from_numpy(train)) and images.train_x.is_contiguous()
    assert images.train_y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(images.test_x, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert images.classes == tuple(names) and images.train_y.dtype == torch.int64


def test_svhn_from_its_mat_files(tmp_path: Path, monkeypatch):
    from scipy.io import savemat

    monkeypatch.setattr("torchvision.datasets.svhn.check_integrity", lambda *args, **kwargs: True)  # md5s as above
    rng = np.random.default_rng(16)
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        arrays[split] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), np.array([[10], [1], [9]][:n], np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": arrays[split][0], "y": arrays[split][1]})
    images = from_torchvision("svhn", tmp_path)
    assert torch.equal(images.train_x, torch.from_numpy(arrays["train"][0].transpose(3, 2, 0, 1).copy()))
    assert images.train_y.tolist() == [0, 1, 9] and images.test_y.tolist() == [0, 1]
    assert images.classes == tuple("0123456789") and images.train_x.is_contiguous()


def test_torchvision_unknown_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist2'; one of mnist, " + ", ".join(TORCHVISION)):
        from_torchvision("mnist2", Path("unused"))


@pytest.mark.parametrize("name, module, where", [
    ("fashion-mnist", "mnist", os.path.join("FashionMNIST", "raw")),
    ("kmnist", "mnist", os.path.join("KMNIST", "raw")),
    ("cifar10", "cifar", "cifar-10-python.tar.gz"),
])
def test_torchvision_without_files_or_network_says_where_to_put_them(tmp_path: Path, monkeypatch, capsys,
                                                                      name, module, where):
    def offline(*args, **kwargs):
        raise URLError("mirror unreachable")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", offline)
    with pytest.raises(DataError, match=f"cannot download {name}") as error:
        from_torchvision(name, tmp_path / "data")
    message = str(error.value)
    assert "mirror unreachable" in message and where in message and str(tmp_path / "data") in message
    assert "\n" not in message and socket.getdefaulttimeout() is None
    assert capsys.readouterr().out == ""


def test_svhn_without_files_or_network_says_where_to_put_them(tmp_path: Path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("mirror unreachable")

    monkeypatch.setattr("torchvision.datasets.svhn.download_url", offline)
    with pytest.raises(DataError, match="train_32x32.mat and test_32x32.mat") as error:
        from_torchvision("svhn", tmp_path)
    assert str(tmp_path) in str(error.value)


def test_torchvision_files_it_cannot_read_are_a_data_error(tmp_path: Path):
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # present, so torchvision tries no download
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(encode_idx(np.zeros((2, 28, 28), np.uint8))[:100])  # truncated
    with pytest.raises(DataError, match=f"kmnist .*{raw}"):
        from_torchvision("kmnist", tmp_path)
