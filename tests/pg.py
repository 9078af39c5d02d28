"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on a temp dir and a free localhost port.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` OS user. Set NAS_REQUIRE_POSTGRES=1 (CI does) to fail instead of skipping when the
server binaries are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import psycopg

USER = "nas"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.data = root / "pgdata"
        self.port = free_port()
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        self.as_postgres = os.geteuid() == 0

    @property
    def available(self) -> bool:
        return bool(self.initdb and self.pg_ctl)

    def run(self, *args: str, output: bool = True) -> None:
        command = list(args)
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        if output:
            subprocess.run(command, check=True, capture_output=True, text=True)
        else:  # a server it starts keeps its output open, and a pipe would never see the end
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def start(self) -> None:
        if self.as_postgres:
            shutil.chown(self.data.parent, "postgres", "postgres")
        self.run(self.initdb, "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync")
        self.start_again()

    def start_again(self) -> None:
        """Start the initialized server (after stop_server), on the same port."""
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"),
                 "-w", "start")

    def restart(self) -> None:
        """What an administrator's restart does: every session is cut, then the server comes back."""
        self.run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "restart", output=False)

    def stop_server(self) -> None:
        """Stop it, cutting every session, until start_again."""
        self.run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A fresh database; returns its SQLAlchemy URL."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres",
                                     autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")


@contextmanager
def rdb_storage(url: str) -> Iterator[optuna.storages.RDBStorage]:
    """A plain Optuna RDBStorage on `url`, its engine disposed of on the way out.

    Optuna never disposes of an RDBStorage's engine, nor of the one it opens when given a URL
    (optuna.load_study(storage=url), optuna.copy_study): its pooled PostgreSQL connections are
    left to the garbage collector, and psycopg warns (ResourceWarning, "deleted while still
    open") in whichever later test the collector happens to run."""
    storage = optuna.storages.RDBStorage(url)
    try:
        yield storage
    finally:
        storage.engine.dispose()


def server_for_tests():
    """A started Server on a temp dir for a pytest fixture to yield, stopped and removed after;
    skips (fails under NAS_REQUIRE_POSTGRES) where the server binaries are missing."""
    import tempfile

    import pytest

    # Not under pytest's tmp dir: that sits in a root-only directory the postgres user can't enter.
    root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
    server = Server(root)
    if not server.available:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if os.environ.get("NAS_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
