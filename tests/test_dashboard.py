"""optuna-dashboard, started as users start it, serves a study that nas.search wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from nas import search
from tests.pg import free_port


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


def test_dashboard_serves_the_study_its_trials_and_layer_notes(tmp_path, data_dir):
    db = tmp_path / "dash.db"
    url = f"sqlite:///{db}"
    assert search.main(["--trials", "2", "--epochs", "1", "--subset", "256", "--storage", url,
                        "--data-dir", str(data_dir), "--quiet"]) == 0
    port = free_port()
    server = subprocess.Popen(
        # The console script users run, from the same environment as the tests.
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port),
         "--artifact-dir", str(tmp_path / "artifacts"), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", server)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["mnist-8k"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", server)
        trials = detail["trials"]
        complete = [t for t in trials if t["state"] == "Complete"]
        assert len(complete) >= 2
        model3 = trials[0]
        assert any(a["key"] == "preset" and "model3" in a["value"] for a in model3["user_attrs"])
        assert "Total params: 7,918" in model3["note"]["body"]
        assert model3["artifacts"], "the trial's weights should be browsable as an artifact"
    finally:
        server.terminate()
        server.wait(timeout=10)
