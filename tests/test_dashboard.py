"""optuna-dashboard, started as users start it, serves a study that nas.search wrote: from the
SQLite file a single worker writes, and from PostgreSQL as in docker-compose.yml."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from nas import search
from tests.pg import free_port, rdb_storage


def get_json(url: str, server: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"optuna-dashboard exited: {server.stderr.read()}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    """A one-trial study (Model 3) and its artifacts directory."""
    root = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{root / 'dash.db'}"
    assert search.main(["--trials", "1", "--epochs", "1", "--subset", "256", "--storage", url,
                        "--data-dir", str(data_dir), "--quiet"]) == 0
    return url, root / "artifacts"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_dashboard_serves_the_study_its_trials_and_layer_notes(backend, searched, request):
    url, artifacts = searched
    if backend == "postgresql":
        # The same study, trials, notes and artifact references, moved to PostgreSQL.
        target = request.getfixturevalue("postgres").create_database("dash")
        with rdb_storage(url) as source, rdb_storage(target) as copy:
            optuna.copy_study(from_study_name="mnist-8k", from_storage=source, to_storage=copy)
        url = target
    port = free_port()
    # As a context manager: the stderr pipe is closed (and the server reaped) on the way out.
    with subprocess.Popen(
        # The console script users run, from the same environment as the tests.
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port),
         "--artifact-dir", str(artifacts), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    ) as server:
        try:
            studies = get_json(f"http://127.0.0.1:{port}/api/studies", server)["study_summaries"]
            assert [s["study_name"] for s in studies] == ["mnist-8k"]
            detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", server)
            assert detail["objective_names"] == ["validation accuracy"]  # not "Objective 0"
            trials = detail["trials"]
            assert [t["state"] for t in trials if t["state"] == "Complete"] == ["Complete"]
            model3 = trials[0]
            assert any(a["key"] == "preset" and "model3" in a["value"] for a in model3["user_attrs"])
            assert "Total params: 7,918" in model3["note"]["body"]
            artifact = model3["artifacts"][0]
            # The weights themselves download from the artifact store.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{studies[0]['study_id']}/"
                                        f"{model3['trial_id']}/{artifact['artifact_id']}", timeout=10) as response:
                assert len(response.read()) > 7918 * 4
        finally:
            server.terminate()
            server.wait(timeout=10)
