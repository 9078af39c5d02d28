"""Work shared out to spawned processes on one machine, the CPUs split evenly between them: the one
implementation behind nas.search --workers, nas.confirm --workers and nas.fidelity's runs."""

from __future__ import annotations

import ctypes
import functools
import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
PARENT_POLL = 0.5  # seconds between a process's checks that its parent still runs (and SIGTERM came)


class Slots:
    """How many more trials a run may start, shared by its processes: each claims a slot before it
    asks the study for a trial and gives it back if that trial does not count (rejected, failed),
    so a run of N trials ends with exactly N however many processes share it. Shared is a
    multiprocessing value (pass it to spawned processes as an argument); else a count in this one."""

    def __init__(self, count: int, shared: bool = False):
        self.left = SPAWN.Value("i", max(0, count)) if shared else _Count(max(0, count))

    def claim(self) -> bool:
        with self.left.get_lock():
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            return True

    def release(self) -> None:
        with self.left.get_lock():
            self.left.value += 1


class _Count:
    def __init__(self, value: int):
        self.value, self.lock = value, threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self.lock


@dataclass(frozen=True)
class Line:
    """A line a spawned process printed, on its way to the parent's terminal."""

    text: str
    err: bool = False  # printed to stderr


class Outbox:
    """A spawned process's way to its parent (run_processes with `relay`): `send` takes anything
    picklable; the parent's relay sees it in order."""

    def __init__(self, channel):
        self.channel = channel

    def send(self, item: Any) -> None:
        self.channel.put(item)


class _Printer(io.TextIOBase):
    """sys.stdout or sys.stderr of a spawned process with an outbox: every whole line it is given
    goes to the parent as a Line, which prints it above its bars."""

    def __init__(self, outbox: Outbox, err: bool):
        super().__init__()
        self.outbox, self.err, self.pending = outbox, err, ""

    @property
    def encoding(self) -> str:
        return "utf-8"

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.outbox.send(Line(line.rsplit("\r", 1)[-1], self.err))  # a redrawn bar: its last state
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.outbox.send(Line(self.pending, self.err))
            self.pending = ""

    def writable(self) -> bool:
        return True


def run_processes(target: Callable[..., None], processes: int, watch: Callable[[], None] | None = None,
                  every: float = 2.0, relay: Callable[[Any], None] | None = None) -> list[str]:
    """Runs target(worker, threads) in `processes` spawned processes, threads_each(processes)
    threads each, and calls `watch` every `every` seconds while any runs, and once when all have
    ended. Returns one line for each process that failed (none: all exited 0). `target` must be
    importable by name (a module-level function, or a functools.partial of one): spawn pickles it.
    With `relay`, target(worker, threads, outbox) gets an Outbox, its process's printed lines go
    through it too (as Line), and this process calls relay(item) for each item, in a thread of its
    own, until all have ended. Each process leaves when this one dies, even by SIGKILL
    (_watch_parent). On KeyboardInterrupt it stops the processes (`stop`), then re-raises."""
    threads = threads_each(processes)
    channel = SPAWN.Queue() if relay is not None else None
    outbox = Outbox(channel) if channel is not None else None
    procs = [SPAWN.Process(target=functools.partial(_interruptible, target, os.getpid(), outbox), args=(i, threads))
             for i in range(processes)]
    ended = threading.Event()
    reader = threading.Thread(target=_relay, args=(channel, relay, ended), daemon=True) if channel else None
    if reader:
        reader.start()
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
        ended.set()
        if reader:
            reader.join()
        if watch is not None:
            watch()
    for p in procs:
        p.join()
    return [f"worker {i} was killed by signal {-p.exitcode}" if p.exitcode < 0
            else f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]


def _relay(channel, relay: Callable[[Any], None], ended: threading.Event) -> None:
    """Hands each item on, until the processes have ended and their last items are read (a
    process's queue is flushed before it exits)."""
    while True:
        try:
            item = channel.get(timeout=0.2)
        except queue.Empty:
            if ended.is_set():
                return
            continue
        relay(item)


def stop(procs: list, grace: float = STOP_GRACE, patience: float = STOP_PATIENCE) -> None:
    """After a KeyboardInterrupt in the parent. A Ctrl-C in a terminal reached the processes too,
    and they end on their own within `grace`; a SIGINT sent to the parent alone did not, so those
    still running get one, and `patience` to fail their work and store that. Any still running
    then, or when a second KeyboardInterrupt comes (Ctrl-C pressed again: get out now), is
    terminated: it runs its cleanup (when_leaving: a search worker fails its trial) and exits, and
    is killed if it has not within `patience` (a trial it held is then failed as stale and retried
    on resume: nas.storage's heartbeats). None is left behind for multiprocessing's exit handler
    to wait on."""
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
            for p in procs:
                if p.is_alive():
                    p.kill()
            _join(procs, patience)
        finally:
            signal.signal(signal.SIGINT, previous)


def _join(procs: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _interruptible(target: Callable[..., None], parent: int, outbox: Outbox | None, worker: int,
                  threads: int) -> None:
    """A spawned process's start: its first SIGINT is a KeyboardInterrupt and later ones are
    ignored, so that a second Ctrl-C cannot break into the cleanup (failing its trial, storing that)
    that the first began. SIGTERM (the parent's terminate, `stop`) and its parent's death end it
    (_watch_parent)."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _terminated)
    if outbox is not None:
        sys.stdout, sys.stderr = _Printer(outbox, err=False), _Printer(outbox, err=True)
    _watch_parent(parent, outbox)
    try:
        if outbox is None:
            target(worker, threads)
        else:
            target(worker, threads, outbox)
    finally:
        if outbox is not None:
            sys.stdout.flush()
            sys.stderr.flush()


def _interrupt_once(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _terminated(signum, frame) -> None:
    # The watcher (_watch_parent) does the rest. No lock here (an Event's, say): the signal comes
    # again and again while the parent's threads end, and a handler run inside itself would wait
    # on the lock it holds.
    global _leaving
    _leaving = True


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_leaving = False  # SIGTERM came: the parent's terminate, or the kernel's word that it died
_cleanups: list[Callable[[], None]] = []  # what this process does before it leaves (when_leaving)


def when_leaving(cleanup: Callable[[], None]) -> None:
    """In a process that run_processes started: `cleanup` runs (in another thread, while the main
    one goes on) when the process leaves because its parent died or terminated it; it replaces an
    earlier one."""
    _cleanups[:] = [cleanup]


def _watch_parent(parent: int, outbox: Outbox | None) -> None:
    """Makes this process leave when `parent` dies, even by SIGKILL, or sends SIGTERM: the kernel
    sends it SIGTERM when the parent dies on Linux (PR_SET_PDEATHSIG; once for each of the parent's
    threads as they end, so SIGTERM only ever wakes the watcher), and a thread checks the parent
    every PARENT_POLL seconds anywhere. That thread, not the main one, runs the cleanup
    (when_leaving) and ends the process (exit status 130): an exception raised in the main thread
    at whatever it was doing (an import, a database commit) could leave its work half failed, or
    worse. Messages still queued for a dead parent are dropped."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while not _leaving and os.getppid() == parent:
            time.sleep(PARENT_POLL)
        if outbox is not None and os.getppid() != parent:
            outbox.channel.cancel_join_thread()
        try:
            for cleanup in _cleanups:
                cleanup()
        finally:
            os._exit(130)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
