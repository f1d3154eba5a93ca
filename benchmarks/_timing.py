"""CUDA-event timing shared by the small benchmark scripts (``tile_sweep.py``, ``nsa_phases.py``)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, reps: int, *, warmup: bool = True) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` on the current CUDA stream, each timed
    by CUDA events and followed by a synchronisation (one untimed call first if ``warmup``)."""
    if warmup:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
