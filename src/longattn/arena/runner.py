"""Run a grid of arena cells, resuming where a previous run stopped."""

from __future__ import annotations

import sys
import time
import traceback
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

    Returns ``{"total", "skipped", "computed", "failed"}``. Cells already stored are skipped
    (not recomputed); duplicates in ``cells`` run once. A cell whose computation raises (an
    out-of-memory error, a method that refuses the shape) is reported on stderr with its error,
    is not stored, and does not stop the grid: a rerun tries it again. ``KeyboardInterrupt``
    and other non-``Exception`` errors stop the run at once (finished cells stay stored)."""
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    done = store.done_keys()
    todo = [c for k, c in unique.items() if k not in done]
    stats = {"total": len(unique), "skipped": len(unique) - len(todo), "computed": 0, "failed": 0}
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        with Progress(*columns) as bar:
            task = bar.add_task("arena", total=len(todo))
            for cell in todo:
                bar.update(task, description=f"{cell.label} {cell.task} {cell.length} #{cell.sample}")
                stats["computed" if _run_one(cell, compute, store, env) else "failed"] += 1
                bar.advance(task)
    else:
        for cell in todo:
            stats["computed" if _run_one(cell, compute, store, env) else "failed"] += 1
    return stats


def _run_one(cell: Cell, compute: Compute, store: ResultStore, env: dict[str, Any] | None) -> bool:
    """Compute and store one cell; ``False`` (after printing the error) when it raised."""
    start = time.perf_counter()
    try:
        metrics = compute(cell)
    except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the rest of the grid
        where = "".join(traceback.format_exception(exc)[-3:]).rstrip()
        print(f"arena: cell {cell.label} {cell.task} {cell.length} #{cell.sample} failed, "
              f"not stored (a rerun retries it):\n{where}", file=sys.stderr, flush=True)
        return False
    store.add(cell, metrics, time.perf_counter() - start, env)
    return True
