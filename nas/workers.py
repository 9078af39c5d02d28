"""Work shared out to spawned processes on one machine, the CPUs split evenly between them: the one
implementation behind nas.search --workers, nas.confirm --workers and nas.fidelity's runs."""

from __future__ import annotations

import multiprocessing
import os
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


WORKERS_ENV = "NAS_WORKERS"  # nas.search's default --workers where set (the tests set 1)


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """"auto" is one single-thread worker per available CPU on a CPU, and 1 on a GPU."""
    if workers != "auto":
        return workers
    return available_cpus() if device.type == "cpu" else 1


def run_processes(target: Callable[[int, int], None], processes: int, watch: Callable[[], None] | None = None,
                  every: float = 2.0) -> list[str]:
    """Runs target(worker, threads) in `processes` spawned processes, threads_each(processes)
    threads each, and calls `watch` every `every` seconds while any runs, and once when all have
    ended. Returns one line for each process that failed (none: all exited 0). `target` must be
    importable by name (a module-level function, or a functools.partial of one): spawn pickles it.
    On KeyboardInterrupt (which reaches the spawned processes too) it waits for them, then re-raises."""
    threads = threads_each(processes)
    procs = [SPAWN.Process(target=target, args=(i, threads)) for i in range(processes)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(every)
            if watch is not None:
                watch()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        if watch is not None:
            watch()
    for p in procs:
        p.join()
    return [f"worker {i} was killed by signal {-p.exitcode}" if p.exitcode < 0
            else f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
