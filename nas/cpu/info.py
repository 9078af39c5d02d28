"""Which CPU this is, by name: part of every figure nas reports and of every cached measurement."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer is vaguer but exists everywhere
    return platform.processor() or platform.machine() or "unknown"
