"""Waiting for a condition in a test, never for a fixed time: on a loaded machine any fixed wait is
too short some day, while a generous deadline costs nothing when the condition comes soon."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.1) -> T:
    """Calls `condition` every `every` seconds until it returns something true, and returns that;
    fails the test, naming `what` it waited for, if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(every)
