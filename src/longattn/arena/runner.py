"""Run a grid of arena cells, resuming where a previous run stopped."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from .store import Cell, ResultStore

Compute = Callable[[Cell], dict[str, Any]]


def run_grid(
    cells: Iterable[Cell],
    compute: Compute,
    store: ResultStore,
    *,
    env: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Compute every cell not yet in ``store`` and store its metrics as soon as it finishes.

    Returns ``{"total", "skipped", "computed"}``. Cells already stored are skipped (not
    recomputed); duplicates in ``cells`` run once."""
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    done = store.done_keys()
    todo = [c for k, c in unique.items() if k not in done]
    stats = {"total": len(unique), "skipped": len(unique) - len(todo), "computed": 0}
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        with Progress(*columns) as bar:
            task = bar.add_task("arena", total=len(todo))
            for cell in todo:
                bar.update(task, description=f"{cell.method} {cell.task} {cell.length} #{cell.sample}")
                _run_one(cell, compute, store, env)
                stats["computed"] += 1
                bar.advance(task)
    else:
        for cell in todo:
            _run_one(cell, compute, store, env)
            stats["computed"] += 1
    return stats


def _run_one(cell: Cell, compute: Compute, store: ResultStore, env: dict[str, Any] | None) -> None:
    start = time.perf_counter()
    metrics = compute(cell)
    store.add(cell, metrics, time.perf_counter() - start, env)
