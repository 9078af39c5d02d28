"""Work shared out to spawned processes on one machine, the CPUs split evenly between them: the one
implementation behind nas.search --workers, nas.confirm --workers and nas.fidelity's runs."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from collections.abc import Callable

import torch

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch threads or locks


def available_cpus() -> int:
    """CPUs this process may run on: a taskset's or cpuset's share, not the whole machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_each(processes: int) -> int:
    """torch threads for each of `processes` processes sharing this process's CPUs (at least one)."""
    return max(1, available_cpus() // processes)


WORKERS_ENV = "NAS_WORKERS"  # nas.search's and nas.confirm's default --workers where set (the tests set 1)


def default_workers() -> str:
    """The --workers default of nas.search and nas.confirm: $NAS_WORKERS, else auto."""
    return os.environ.get(WORKERS_ENV, "auto")


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """"auto" is one single-thread worker per available CPU on a CPU, and 1 on a GPU."""
    if workers != "auto":
        return workers
    return available_cpus() if device.type == "cpu" else 1


STOP_GRACE = 3.0  # seconds an interrupted run gives its processes to end on their own first
STOP_PATIENCE = 30.0  # then, told again, to fail their work cleanly; then they are terminated


def run_processes(target: Callable[[int, int], None], processes: int, watch: Callable[[], None] | None = None,
                  every: float = 2.0) -> list[str]:
    """Runs target(worker, threads) in `processes` spawned processes, threads_each(processes)
    threads each, and calls `watch` every `every` seconds while any runs, and once when all have
    ended. Returns one line for each process that failed (none: all exited 0). `target` must be
    importable by name (a module-level function, or a functools.partial of one): spawn pickles it.
    On KeyboardInterrupt it stops the processes (`stop`), then re-raises."""
    threads = threads_each(processes)
    procs = [SPAWN.Process(target=functools.partial(_interruptible, target), args=(i, threads))
             for i in range(processes)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(every)
            if watch is not None:
                watch()
    except KeyboardInterrupt:
        stop(procs, STOP_GRACE, STOP_PATIENCE)  # read now, not when stop was defined
        raise
    finally:
        if watch is not None:
            watch()
    for p in procs:
        p.join()
    return [f"worker {i} was killed by signal {-p.exitcode}" if p.exitcode < 0
            else f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]


def stop(procs: list, grace: float = STOP_GRACE, patience: float = STOP_PATIENCE) -> None:
    """After a KeyboardInterrupt in the parent. A Ctrl-C in a terminal reached the processes too,
    and they end on their own within `grace`; a SIGINT sent to the parent alone did not, so those
    still running get one, and `patience` to fail their work and store that. Any still running
    then, or when a second KeyboardInterrupt comes (Ctrl-C pressed again: get out now), is
    terminated; a trial it held is failed as stale and retried on resume (nas.storage's
    heartbeats). None is left behind for multiprocessing's exit handler to wait on."""
    try:
        _join(procs, grace)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        _join(procs, patience)
    except KeyboardInterrupt:
        pass
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C: the same way out
        try:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            _join(procs, patience)
        finally:
            signal.signal(signal.SIGINT, previous)


def _join(procs: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _interruptible(target: Callable[[int, int], None], worker: int, threads: int) -> None:
    """A spawned process's start: its first SIGINT is a KeyboardInterrupt, later ones are ignored,
    so that a second Ctrl-C cannot break into the cleanup (failing its trial, storing that) that
    the first began. The parent terminates it if it takes too long (`stop`)."""
    signal.signal(signal.SIGINT, _interrupt_once)
    target(worker, threads)


def _interrupt_once(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
