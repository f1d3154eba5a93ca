"""CUDA-event timing shared by the small benchmark scripts (``tile_sweep.py``, ``nsa_phases.py``)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, reps: int, *, warmup: bool = True, pre_queue_cycles: int = 0) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` on the current CUDA stream, each timed
    by CUDA events and followed by a synchronisation (one untimed call first if ``warmup``).
    ``pre_queue_cycles``: a spin kernel of that many GPU clock cycles runs before each start
    event, so the host has queued the whole call by the time the timing starts (the GPU work
    alone, without the GPU's waits for the host's launches)."""
    if warmup:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if pre_queue_cycles:
            torch.cuda._sleep(pre_queue_cycles)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of ``fn`` (two eager warm-up calls on a side stream first),
    replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_median_ms(fn, reps: int = 50, flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of ``reps`` CUDA-graph replays of ``fn`` (two eager warm-up calls on a
    side stream, then one capture). ``flush``: a buffer larger than L2, zeroed before every
    replay so each replay starts with a cold cache. Raises what the capture raises (e.g. a host
    sync inside ``fn``)."""
    g = capture_graph(fn)
    events = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    del g
    return statistics.median(a.elapsed_time(b) for a, b in events)
