from __future__ import annotations

import os
from pathlib import Path

import pytest

from nas.cpu import native
from nas.data import DATA_DIR_ENV, Mnist, load_mnist, prepare, resolve_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

# nas.search's default is a worker per core; the tests' tiny studies run in one process unless a test
# asks for workers (subprocesses they start inherit this). tests/test_workers.py checks the default.
os.environ.setdefault("NAS_WORKERS", "1")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's setup cache in a temporary directory, never the user's ~/.cache/nas; worker
    processes that tests start inherit it through the environment."""
    path = tmp_path_factory.mktemp("nas-cache")
    os.environ["NAS_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def fresh_kernel():
    """nas.cpu.native as in a new process: the kernel (or why it can't be had) not yet looked up;
    forgotten again after the test, so what the test changed (CC, the cache directory) stays in it."""
    native._load.cache_clear()
    yield
    native._load.cache_clear()


@pytest.fixture
def kernel():
    """The native BatchNorm kernel. Skips a test of it where it can't be built; fails instead under
    NAS_REQUIRE_NATIVE (CI), where it must be."""
    try:
        return native.library()
    except native.KernelUnavailable as unavailable:
        if os.environ.get("NAS_REQUIRE_NATIVE"):
            pytest.fail(str(unavailable))
        pytest.skip(str(unavailable))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The prepared MNIST directory: $NAS_DATA_DIR, else data/ at the repository root (whatever the CWD)."""
    path = resolve_data_dir(None) if os.environ.get(DATA_DIR_ENV) else REPO_ROOT / "data"
    prepare(path, progress=False)
    return path


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> Mnist:
    return load_mnist(data_dir)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the whole run; each test makes its own database."""
    from tests.pg import server_for_tests

    yield from server_for_tests()


@pytest.fixture(scope="session")
def searched(tmp_path_factory, data_dir):
    """One tiny study of the default study file, run twice: 2 trials, then topped up to 3.
    Returns (storage URL, database path)."""
    from nas import search

    db = tmp_path_factory.mktemp("study") / "s.db"
    url = f"sqlite:///{db}"
    for trials in (2, 3):
        assert search.main(["--trials", str(trials), "--epochs", "1", "--subset", "256", "--storage", url,
                            "--study-file", str(REPO_ROOT / "studies" / "mnist-8k.toml"), "--data-dir",
                            str(data_dir), "--quiet"]) == 0
    return url, db


# Markers by what a test needs, so the fast subset (-m "not slow") is every test that touches
# neither real MNIST nor a database server. CI runs everything.
SLOW_FIXTURES = {"data_dir", "mnist", "searched", "postgres", "own_postgres"}
POSTGRES_FIXTURES = {"postgres", "own_postgres"}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
