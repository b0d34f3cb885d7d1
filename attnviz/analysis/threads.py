"""How many CPU threads an analysis uses (shared by the pattern atlas and its autoencoder)."""

from __future__ import annotations

import os

__all__ = ["default_threads"]


def default_threads() -> int:
    """CPU threads for training: the cores this process may use, minus those other processes keep busy
    (1-minute load average, not counting this process), at least 1. On a shared machine more threads
    than free cores make torch's OpenMP workers wait on each other (measured here: 10x slower steps)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        busy = 0.0
    return int(max(1, min(cores, round(cores - busy))))
