"""Several workers on one study: processes on one machine, and a real PostgreSQL server shared the
way workers on many machines share it. The CLI runs as users run it, in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.search import finished_trials

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDY = "mnist-8k"


def search_command(url: str, data_dir: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nas.search", "--trials", str(trials), "--epochs", "1", "--subset", "300",
            "--storage", url, "--data-dir", str(data_dir), "--quiet", *extra]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if "rejected" not in t.user_attrs and t.state != TrialState.FAIL]


def assert_shared_cleanly(study: optuna.Study, trials: int) -> None:
    assert len(finished_trials(study)) >= trials
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # Model 3 enqueued once however many workers started together; no trial trained twice.
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "rejected" not in t.user_attrs]
    assert sum(t.user_attrs.get("preset") == "model3" for t in done) == 1
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(params) == len(set(params))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_complete_one_study_together(backend, tmp_path, data_dir, request):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'duo.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("duo")
    result = run(search_command(url, data_dir, 4, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert_shared_cleanly(study, 4)
    # Every trial records which of the two processes ran it. (Not asserted: that both got one; on a
    # loaded machine the first can finish four tiny trials before the second has imported torch.)
    assert {t.user_attrs.get("worker") for t in trained(study)} <= {0, 1}


def test_a_killed_worker_trial_is_failed_by_heartbeat_and_retried(postgres, data_dir):
    url = postgres.create_database("killed")
    fast = {"NAS_HEARTBEAT_SECONDS": "1", "NAS_GRACE_SECONDS": "3"}
    # Many epochs on a small subset: the first trial (Model 3) is surely mid-training when killed.
    victim = subprocess.Popen(
        search_command(url, data_dir, 3, "--epochs", "50"), cwd=REPO_ROOT,
        env={**os.environ, **fast}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    storage = optuna.storages.RDBStorage(url)
    while True:
        assert victim.poll() is None, "the worker ended before it could be killed"
        assert time.monotonic() < deadline, "no trial reached its second epoch in time"
        trials = optuna.load_study(study_name=STUDY, storage=storage).trials if _study_exists(storage) else []
        if trials and len(trials[0].intermediate_values) >= 2:
            break
        time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = optuna.load_study(study_name=STUDY, storage=storage).trials[0]
    assert killed.state == TrialState.RUNNING  # nobody told the storage: only the heartbeat stops

    time.sleep(4)  # past the grace period
    result = run(search_command(url, data_dir, 3), env=fast)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=STUDY, storage=url)
    trials = study.trials
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params and retries[0].user_attrs.get("preset") == "model3"
    assert_shared_cleanly(study, 3)


def _study_exists(storage: optuna.storages.BaseStorage) -> bool:
    return any(s.study_name == STUDY for s in storage.get_all_studies())
