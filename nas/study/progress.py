"""A search's progress on the screen: the bar over the study's finished trials, with its ETA
(nas.study.eta) and each running trial's step in its postfix, and the lines of every worker written
above it, never on its line."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial
from tqdm import tqdm

from nas.study.eta import Running, eta_seconds, finished_times
from nas.study.trials import best_trial, finished_trials, is_rejected

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's, less its uniform-rate ETA


# TrialProgress.phase: what a trial in flight is doing (the bar shows it as written)
RUNG, SECOND_RUNG, TRAIN = "rung", "rung 2", "train"


@dataclass(frozen=True)
class TrialProgress:
    """What a worker reports of the trial it runs, at each step, to the process that draws the bar."""

    worker: int
    trial: int | None  # None: between trials
    phase: str = RUNG  # RUNG or SECOND_RUNG: being screened; TRAIN: in full training
    epoch: int = 0  # epochs done (train)
    epochs: int = 0  # epochs in all (train)
    accuracy: float | None = None  # the last epoch's validation accuracy
    epoch_seconds: float | None = None  # mean wall time of its epochs so far, evaluation included
    preset: bool = False

    def line(self) -> str:
        """The line a finished epoch writes above the bar, as the trial's other lines are written
        (nas.study.objective.Objective.say): `[worker 1] Trial 28: epoch 7/15, 98.90% validation`."""
        prefix = "" if self.worker == 0 else f"[worker {self.worker}] "
        return f"{prefix}Trial {self.trial}: epoch {self.epoch}/{self.epochs}, {self.accuracy:.2f}% validation"

    def label(self) -> str:
        """How the bar's postfix shows it, e.g. `#28 ep 7/15 98.90%` or `#29 rung`."""
        if self.phase != TRAIN:
            return f"#{self.trial} {self.phase}"
        return f"#{self.trial} ep {self.epoch}/{self.epochs}" + (
            "" if self.accuracy is None else f" {self.accuracy:.2f}%")


@dataclass(frozen=True)
class _Seen:
    report: TrialProgress
    started: float  # monotonic time its trial was first reported
    at: float  # monotonic time of this report


class ProgressBar:
    """A bar over the study's finished trials: finished / target, elapsed time, the ETA, the
    rejected count, the best value so far and each running trial's step (reported to `progress`).
    The ETA (nas.study.eta.eta_seconds over this run's trials, `workers` sharing them) is estimated
    again when a trial finishes or reports a step, and counts down in between. Lines are written
    above it (`write`) under the same lock as its redraws, so no line is ever written on its line;
    its clock ticks every second."""

    def __init__(self, study: optuna.Study, target: int, disable: bool, workers: int = 1):
        self.since = datetime.now()  # Optuna's trial times are naive local times too
        self.workers = workers
        self.lock = threading.RLock()
        self.postfix = ""
        self.eta: float | None = None
        self.counted = -1  # finished trials when the ETA was last estimated
        self.estimated_at = time.monotonic()
        self.running: dict[int, _Seen] = {}  # by worker
        self.ended = 0  # trials their workers ended since the study was last read: neither running nor to start
        self.finished: list[FrozenTrial] = []
        done = min(len(finished_trials(study)), target)
        self.bar = tqdm(total=target, initial=done, desc="Trials", unit="trial", disable=disable, file=sys.stdout,
                        position=0, dynamic_ncols=True, bar_format=BAR_FORMAT)
        self.update(study)
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self.tick, daemon=True)
        if not disable:
            self.ticker.start()

    def tick(self) -> None:
        while not self.stopped.wait(1.0):
            self.draw()

    def update(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        """Reads the study again (an Optuna callback after each trial, or a watcher's poll)."""
        finished = finished_trials(study)
        best = best_trial(study)
        rejected = sum(1 for t in study.get_trials(deepcopy=False) if is_rejected(t))
        with self.lock:
            self.finished = finished
            done = {t.number for t in finished}
            self.running = {w: s for w, s in self.running.items() if s.report.trial not in done}
            self.ended = 0
            self.bar.n = min(len(finished), self.bar.total)
            self.postfix = f"rejected={rejected}"
            if best is not None:
                self.postfix += f", best={best.values[0]:.2f}% (#{best.number})"
            if len(finished) != self.counted or self.eta is None:  # a watcher polls between trials:
                self.estimate()  # keep counting down until one ends or reports
            self.counted = len(finished)
        self.draw()

    __call__ = update

    def progress(self, report: TrialProgress) -> None:
        """A worker's report of the trial it runs (None: it is between trials)."""
        now = time.monotonic()
        with self.lock:
            seen = self.running.get(report.worker)
            if report.trial is None:
                gone = self.running.pop(report.worker, None)
                self.ended += gone is not None and all(t.number != gone.report.trial for t in self.finished)
            else:
                started = seen.started if seen and seen.report.trial == report.trial else now
                self.running[report.worker] = _Seen(report, started, now)
            self.estimate()
        self.draw()

    def write(self, line: str, err: bool = False) -> None:
        """A line above the bar."""
        with self.lock:
            tqdm.write(line, file=sys.stderr if err else sys.stdout)

    def estimate(self) -> None:
        now = time.monotonic()
        running = [_running(seen, now) for seen in self.running.values()]
        not_started = max(0, self.bar.total - len(self.finished) - len(running) - self.ended)
        self.eta = eta_seconds(finished_times(self.finished, self.since), running, not_started, self.workers)
        self.estimated_at = now

    def draw(self) -> None:
        with self.lock:
            left = "?" if self.eta is None else tqdm.format_interval(
                max(0.0, self.eta - (time.monotonic() - self.estimated_at)))
            steps = [seen.report.label() for _, seen in sorted(self.running.items())]
            self.bar.set_postfix_str(", ".join([f"eta={left}", self.postfix, *steps]), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self.stopped.set()
        if self.ticker.is_alive():
            self.ticker.join()
        with self.lock:
            self.bar.close()


def _running(seen: _Seen, now: float) -> Running:
    report = seen.report
    training = report.phase == TRAIN
    return Running(number=report.trial, seconds=now - seen.started, training=training,
                   epochs_left=report.epochs - report.epoch if training else 0,
                   epoch_seconds=report.epoch_seconds, in_epoch=now - seen.at if training else 0.0,
                   preset=report.preset, second_rung=report.phase == SECOND_RUNG)
