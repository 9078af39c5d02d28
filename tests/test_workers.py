"""Several workers on one study: processes on one machine, and a real PostgreSQL server shared the
way workers on many machines share it. The CLI runs as users run it, in subprocesses."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

import pytest
import torch

from nas import workers
from nas.cli import search
from nas.storage import open_storage
from nas.study.progress import ProgressBar
from nas.study.sampling import make_sampler
from nas.study.trials import finished_trials
from nas.study.search import run_trials
from nas.workers import Slots, available_cpus
from tests.pg import rdb_storage
from tests.waiting import wait_for

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


def assert_shared_cleanly(study: optuna.Study, trials: int, workers: int, one_command: bool = True) -> None:
    # One command's workers share its count of trials left to start: exactly the count. Commands
    # started apart (compose's workers, other machines) each finish the trial they are in when
    # another reaches it, no more.
    if one_command:
        assert len(finished_trials(study)) == trials
    assert trials <= len(finished_trials(study)) <= trials + workers - 1
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Model 3 enqueued once however many workers started together; no trial trained twice.
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "rejected" not in t.user_attrs]
    assert sum(t.user_attrs.get("preset") == "model3" for t in done) == 1
    # Nor was any candidate drawn twice, trained or rejected (a retry repeats a failed one's).
    drawn = [tuple(sorted(t.params.items())) for t in study.trials if t.state != TrialState.FAIL]
    assert len(drawn) == len(set(drawn))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


def test_workers_with_the_same_seed_draw_different_candidates():
    """Each joining process starts its own sampler; the draws follow the trial number, not the process."""
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def draws(samplers):
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="s", storage=storage)
        return [optuna.load_study(study_name="s", storage=storage, sampler=s).ask(space).params["x"]
                for s in samplers]

    two_workers = draws([make_sampler(0), make_sampler(0)])
    assert two_workers[0] != two_workers[1]
    assert draws([make_sampler(0)] * 2) == two_workers  # one process, the same study: the same draws
    assert draws([make_sampler(1)] * 2) != two_workers


def test_two_workers_on_one_machine_share_a_sqlite_study(tmp_path, data_dir):
    url = f"sqlite:///{tmp_path / 'duo.db'}"
    result = run(search_command(url, data_dir, 3, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert_shared_cleanly(study, 3, workers=2)
    # Every trial records which of the two processes ran it, each with its share of the CPUs. (Not
    # asserted: that both got one; on a loaded machine the first can finish three tiny trials
    # before the second has imported torch.)
    assert {t.user_attrs.get("worker") for t in trained(study)} <= {0, 1}
    assert {t.user_attrs["run"]["threads"] for t in trained(study)} == {max(1, available_cpus() // 2)}


def test_two_independent_workers_share_a_postgresql_study(postgres, data_dir):
    """What docker compose's scaled workers, or workers on two machines, do: the same command,
    started twice at once against one database, nothing to tell them apart."""
    url = postgres.create_database("duo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(search_command(url, data_dir, 3), cwd=REPO_ROOT, env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr
    with rdb_storage(url) as storage:
        assert_shared_cleanly(optuna.load_study(study_name=STUDY, storage=storage), 3, workers=2, one_command=False)


def test_a_killed_worker_trial_is_failed_by_heartbeat_and_retried(postgres, data_dir, monkeypatch):
    url = postgres.create_database("killed")
    fast = {"NAS_HEARTBEAT_SECONDS": "1", "NAS_GRACE_SECONDS": "3"}
    for name, value in fast.items():
        monkeypatch.setenv(name, value)  # for this process's storage below, which looks for staleness as a worker does
    # Many epochs: the first trial (Model 3) is surely mid-training when it is killed.
    victim = subprocess.Popen(
        search_command(url, data_dir, 1, "--epochs", "50"), cwd=REPO_ROOT,
        env={**os.environ, **fast}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    with rdb_storage(url) as storage:
        while True:
            assert victim.poll() is None, "the worker ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished its first epoch in time"
            trials = optuna.load_study(study_name=STUDY, storage=storage).trials if _study_exists(storage) else []
            if trials and trials[0].intermediate_values:
                break
            time.sleep(0.3)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        killed = optuna.load_study(study_name=STUDY, storage=storage).trials[0]
        assert killed.state == TrialState.RUNNING  # nobody told the storage: only the heartbeat stops

        watcher = open_storage(url)
        try:
            study_id = watcher.get_study_id_from_name(STUDY)
            wait_for(lambda: killed._trial_id in watcher._get_stale_trial_ids(study_id), "the trial to go stale")
        finally:
            watcher.close()
        result = run(search_command(url, data_dir, 1), env=fast)
        assert result.returncode == 0, result.stderr
        study = optuna.load_study(study_name=STUDY, storage=storage)
        trials = study.trials
        assert trials[0].state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].system_attrs["retry_history"] == [killed.number]
        assert retries[0].params == killed.params and retries[0].user_attrs.get("preset") == "model3"
        assert_shared_cleanly(study, 1, workers=1)


def _study_exists(storage: optuna.storages.BaseStorage) -> bool:
    return any(s.study_name == STUDY for s in storage.get_all_studies())


def test_workers_auto_is_one_worker_per_cpu_core_on_cpu_and_one_on_a_gpu(capsys):
    args = search.build_parser().parse_args(["--workers", "auto"])
    assert args.workers == "auto"
    assert workers.resolve_workers(args.workers, torch.device("cpu")) == workers.available_cpus()
    assert workers.resolve_workers("auto", torch.device("cuda")) == 1
    assert workers.resolve_workers(3, torch.device("cpu")) == 3
    with pytest.raises(SystemExit) as exc:
        search.build_parser().parse_args(["--workers", "many"])
    assert exc.value.code == 2 and "--workers" in capsys.readouterr().err


def test_the_search_default_is_auto_unless_nas_workers_says_otherwise(monkeypatch, capsys):
    monkeypatch.delenv(workers.WORKERS_ENV)
    assert search.build_parser().parse_args([]).workers == "auto"  # measured faster (docs/performance.md)
    monkeypatch.setenv(workers.WORKERS_ENV, "3")
    assert search.build_parser().parse_args([]).workers == 3
    monkeypatch.setenv(workers.WORKERS_ENV, "many")
    with pytest.raises(SystemExit) as exc:
        search.build_parser().parse_args([])
    assert exc.value.code == 2 and "--workers" in capsys.readouterr().err


def test_the_study_bar_counts_earlier_trials_and_its_clock_ticks_until_closed(capsys):
    study = optuna.create_study(direction="maximize")
    for value in (97.0, 98.5):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    bar = ProgressBar(study, 5, disable=False)
    assert (bar.bar.n, bar.bar.initial, bar.bar.total) == (2, 2, 5)  # the ETA's rate counts this run only
    printed: list[str] = []

    def redrawn_at_two_seconds() -> bool:
        printed.append(capsys.readouterr().out)
        return "00:02" in "".join(printed)

    try:
        wait_for(redrawn_at_two_seconds, "the bar's clock to show 00:02")  # with no trial finishing
    finally:
        bar.close()
    assert not bar.ticker.is_alive()
    out = "".join(printed) + capsys.readouterr().out
    assert "Trials:  40%" in out and "2/5" in out and "best=98.50% (#1)" in out
    assert "eta=00:00" in out  # the earlier trials took no time (nas.study.eta.eta_seconds)


INTERRUPTED_TARGET = '''
import os, sys, time
from pathlib import Path

def work(worker, threads):
    here = Path(os.environ["WORK_DIR"])
    (here / f"ready-{worker}").write_text(str(os.getpid()))
    try:
        time.sleep(3600)
    except KeyboardInterrupt:
        (here / f"cleaning-{worker}").write_text("")
        time.sleep(float(os.environ["CLEANUP_SECONDS"]))  # failing and storing its trial
        (here / f"cleaned-{worker}").write_text("")
        sys.exit(130)
'''

INTERRUPTED_DRIVER = '''
import os, sys
from pathlib import Path
import target
from nas import workers

def stop(*args, **kwargs):  # says when the parent has taken the first Ctrl-C: a second one sent
    Path(os.environ["WORK_DIR"], "stopping").write_text("")  # sooner may merge with it, as signals do
    return stopping(*args, **kwargs)

if __name__ == "__main__":
    workers.STOP_PATIENCE = float(os.environ["STOP_PATIENCE"])
    stopping, workers.stop = workers.stop, stop
    try:
        workers.run_processes(target.work, 2, every=0.2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
'''


@contextlib.contextmanager
def _interruptible_run(tmp_path: Path, cleanup_seconds: float,
                       patience: float = workers.STOP_PATIENCE) -> Iterator[subprocess.Popen]:
    """The driver above, started in a session of its own; where the test fails (a wait timing out, an
    assertion), its group is killed on the way out, so no driver or worker outlives it."""
    (tmp_path / "target.py").write_text(INTERRUPTED_TARGET)
    (tmp_path / "driver.py").write_text(INTERRUPTED_DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}", "WORK_DIR": str(tmp_path),
           "CLEANUP_SECONDS": str(cleanup_seconds), "STOP_PATIENCE": str(patience)}
    # SIGINT as a terminal's process has it: a suite started in the background by a script inherits it
    # ignored, and Python would then never raise KeyboardInterrupt in the driver
    parent = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def started() -> bool:
        assert parent.poll() is None, parent.communicate()
        return all((tmp_path / f"ready-{i}").exists() for i in range(2))

    try:
        wait_for(started, "the workers to start", timeout=120)
        yield parent
    except BaseException:  # only then: a test that passes must have seen its group end by itself
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.communicate()
        raise


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_sigint_to_the_parent_alone_reaches_its_workers_which_end_cleanly(tmp_path):
    """`kill -INT <pid>` of nas.search (not its group): the workers are told too, fail their trials
    cleanly, and nothing is left for multiprocessing's exit handler to wait on."""
    with _interruptible_run(tmp_path, cleanup_seconds=0.5) as parent:
        parent.send_signal(signal.SIGINT)
        _, stderr = parent.communicate(timeout=60)
        assert parent.returncode == 130 and stderr.strip() == "interrupted", stderr
        assert all((tmp_path / f"cleaned-{i}").exists() for i in range(2))
        assert all(_gone(int((tmp_path / f"ready-{i}").read_text())) for i in range(2))


def test_ctrl_c_pressed_twice_gets_out_at_once_without_a_traceback(tmp_path):
    """A terminal's Ctrl-C reaches the whole group. Pressed again while the workers are still
    cleaning up, it must not break into their cleanup (a traceback each) nor leave the parent's exit
    waiting on them (a traceback from multiprocessing's atexit join): the parent terminates them.

    The workers' cleanup and the parent's patience both last an hour, so only the second Ctrl-C can
    end the run within the (generous) deadline; no wall time is asserted."""
    with _interruptible_run(tmp_path, cleanup_seconds=3600, patience=3600) as parent:
        os.killpg(parent.pid, signal.SIGINT)
        wait_for(lambda: all((tmp_path / f"cleaning-{i}").exists() for i in range(2))
                 and (tmp_path / "stopping").exists(), "the workers' cleanup to begin and the parent to stop them")
        os.killpg(parent.pid, signal.SIGINT)
        _, stderr = parent.communicate(timeout=300)
        assert parent.returncode == 130 and stderr.strip() == "interrupted", stderr
        assert not any((tmp_path / f"cleaned-{i}").exists() for i in range(2))
        assert all(_gone(int((tmp_path / f"ready-{i}").read_text())) for i in range(2))


def test_slots_are_claimed_until_none_is_left_and_given_back():
    slots = Slots(2)
    assert slots.claim() and slots.claim() and not slots.claim()
    slots.release()
    assert slots.claim() and not slots.claim()
    assert not Slots(-3).claim()  # a study already past its target


def _tiny_trials(url: str, target: int, slots: Slots, worker: int, threads: int) -> None:
    """A spawned worker of a study whose objective takes a moment (so that the workers' trials
    overlap when the target is reached) and rejects every third candidate, as an over-budget one is."""
    study = optuna.load_study(study_name="tiny", storage=url)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number % 3 == 1:
            trial.set_user_attr("rejected", "over budget")
            raise optuna.TrialPruned("over budget")
        time.sleep(0.3)  # the work of a trial
        return x

    run_trials(study, objective, slots, target=target, worker=worker)


@pytest.mark.parametrize("processes", [2, 3])
def test_a_run_of_n_trials_ends_with_exactly_n_with_any_number_of_workers(tmp_path, processes):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"x": 0.5},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    target = 7
    slots = Slots(target - len(finished_trials(study)), shared=True)
    assert workers.run_processes(functools.partial(_tiny_trials, url, target, slots), processes, every=0.2) == []
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert len(finished_trials(optuna.load_study(study_name="tiny", storage=url))) == target
    assert any("rejected" in t.user_attrs for t in trials)  # rejected ones gave their slots back
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _running_trials(db: Path) -> int:
    """Running trials in a SQLite study file, read without creating its tables (Optuna's storage
    would, racing the search that is creating them); 0 while it has none."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        try:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet, or a writer holds the lock
            return 0


def _runs(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie that no one reaped has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class _HeldSampler(optuna.samplers.RandomSampler):
    """Holds each trial in its sampling (after Optuna has created it RUNNING in the storage) until
    `proceed` is set; `sampling` says it is there."""

    def __init__(self):
        super().__init__(seed=0)
        self.sampling, self.proceed = threading.Event(), threading.Event()

    def before_trial(self, study, trial):
        self.sampling.set()
        assert self.proceed.wait(timeout=60)


def test_a_worker_whose_parent_dies_while_its_trial_is_created_fails_that_trial(tmp_path):
    """The parent's death can come between Optuna's creation of the next trial and its first
    suggestion (the sampler's work): the leaving worker fails that trial too, instead of leaving it
    RUNNING until the heartbeat's grace period ends."""
    sampler = _HeldSampler()
    study = optuna.create_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path / 'tiny.db'}"),
                                sampler=sampler, direction="maximize")
    finish = threading.Event()

    def objective(trial: optuna.Trial) -> float:
        assert finish.wait(timeout=60)
        raise RuntimeError("the process would have left")

    one = Slots(1)
    one.release = lambda: None  # the failed trial's slot is not given back: one trial, then run_trials returns
    errors = []
    main = threading.Thread(target=lambda: _catch(errors, run_trials, study, objective, one, target=1))
    main.start()
    try:
        assert sampler.sampling.wait(timeout=60)
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
        leaving = threading.Thread(target=workers._cleanups[-1])  # what the parent watcher runs
        leaving.start()
        sampler.proceed.set()
        leaving.join(timeout=60)
        assert not leaving.is_alive()
        assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
    finally:
        sampler.proceed.set()
        finish.set()
        main.join(timeout=60)
    assert not main.is_alive()


def _catch(errors: list, function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except Exception as exc:  # the objective's, or Optuna's on telling a failed trial
        errors.append(exc)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in /proc")
def test_a_sigkilled_search_leaves_no_worker_behind(tmp_path, data_dir):
    """`kill -9` of nas.search (the OOM killer, a closed SSH session): its workers notice, fail
    their trials as an interrupted trial is failed, and exit; none keeps training."""
    url = f"sqlite:///{tmp_path / 'orphans.db'}"
    parent = subprocess.Popen(search_command(url, data_dir, 20, "--workers", "2", "--epochs", "50"), cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def training() -> bool:
            assert parent.poll() is None, "the search ended before it could be killed"
            return _running_trials(tmp_path / "orphans.db") == 2 and len(_children(parent.pid)) >= 2

        wait_for(training, "both workers to be in a trial", timeout=180, every=0.5)
        spawned = _children(parent.pid)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    wait_for(lambda: not any(_runs(pid) for pid in spawned), "the workers to leave", timeout=60)
    trials = optuna.load_study(study_name=STUDY, storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state == TrialState.FAIL]) == 2
