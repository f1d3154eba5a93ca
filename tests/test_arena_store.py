"""The arena store and runner: idempotent keys, and a SIGKILL half-way through a grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch

from longattn.arena.runner import run_grid
from longattn.arena.store import Cell, ResultStore


def grid(n_samples=5):
    return [
        Cell(model="m", method=method, task=task, length=length, sample=s, config=config)
        for method, config in (("full", {}), ("moba", {"top_k": 3, "block_size": 64}))
        for task in ("passkey", "niah")
        for length in (1024, 2048)
        for s in range(n_samples)
    ]


def test_keys_depend_on_every_field_and_config_order_does_not_matter():
    a = Cell("m", "moba", "passkey", 1024, 0, 0, {"top_k": 3, "block_size": 64})
    b = Cell("m", "moba", "passkey", 1024, 0, 0, {"block_size": 64, "top_k": 3})
    assert a.key == b.key
    for other in (
        Cell("m2", "moba", "passkey", 1024, 0, 0, a.config), Cell("m", "topk", "passkey", 1024, 0, 0, a.config),
        Cell("m", "moba", "niah", 1024, 0, 0, a.config), Cell("m", "moba", "passkey", 2048, 0, 0, a.config),
        Cell("m", "moba", "passkey", 1024, 1, 0, a.config), Cell("m", "moba", "passkey", 1024, 0, 1, a.config),
        Cell("m", "moba", "passkey", 1024, 0, 0, {"top_k": 4, "block_size": 64}),
    ):
        assert other.key != a.key


def test_rerun_skips_finished_cells(tmp_path):
    calls = Counter()

    def compute(cell):
        calls[cell.key] += 1
        return {"score": cell.sample / 10}

    cells = grid(2)
    with ResultStore(tmp_path / "r.sqlite") as store:
        first = run_grid(cells + cells[:3], compute, store, progress=False)
        second = run_grid(cells, compute, store, progress=False)
        assert first == {"total": len(cells), "skipped": 0, "computed": len(cells), "failed": 0}
        assert second == {"total": len(cells), "skipped": len(cells), "computed": 0, "failed": 0}
        assert store.count() == len(cells) and set(calls.values()) == {1}
        assert not store.add(cells[0], {"score": 9}, 0.0)  # a duplicate is refused
        row = next(r for r in store.rows() if r["key"] == cells[0].key)
        assert row["metrics"] == {"score": 0.0}


def test_a_failing_cell_is_reported_not_stored_and_retried(tmp_path, capsys):
    cells = grid(2)
    bad = cells[1].key
    calls = Counter()

    def compute(cell):
        calls[cell.key] += 1
        if cell.key == bad and calls[cell.key] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"score": 1.0}

    with ResultStore(tmp_path / "r.sqlite") as store:
        first = run_grid(cells, compute, store, progress=False)
        assert first == {"total": len(cells), "skipped": 0, "computed": len(cells) - 1, "failed": 1}
        assert bad not in store.done_keys() and store.count() == len(cells) - 1
        assert "out of memory (simulated)" in capsys.readouterr().err
        second = run_grid(cells, compute, store, progress=False)
        assert second == {"total": len(cells), "skipped": len(cells) - 1, "computed": 1, "failed": 0}
        assert store.count() == len(cells) and calls[bad] == 2
        assert all(calls[c.key] == 1 for c in cells if c.key != bad)


def test_keyboard_interrupt_stops_the_grid(tmp_path):
    cells = grid(2)

    def compute(cell):
        if cell.key == cells[2].key:
            raise KeyboardInterrupt
        return {"score": 1.0}

    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_grid(cells, compute, store, progress=False)
        assert store.count() == 2


SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_arena_store import grid
    from longattn.arena.runner import run_grid
    from longattn.arena.store import ResultStore

    log = open({log!r}, "a")
    done_here = []

    def compute(cell):
        log.write(cell.key + "\\n"); log.flush()
        # the first run stops in the middle of the grid until it is killed, however slow the
        # machine (a rerun, with the release file present, goes straight through)
        if len(done_here) == {half} and not os.path.exists({release!r}):
            time.sleep(120)
        time.sleep(0.02)
        done_here.append(cell.key)
        return {{"score": 1.0, "sample": cell.sample}}

    with ResultStore({db!r}) as store:
        run_grid(grid(), compute, store, progress=False)
    """
)


def test_a_new_store_opened_by_several_connections_at_once(tmp_path):
    """A job and its monitor may open a fresh store at the same moment: the switch to the
    write-ahead log is retried while another connection holds the lock ("database is locked"),
    and each adds the KV-policy columns only if they are missing, under the write lock, so none
    fails on a column another just added ("duplicate column name", seen in CI)."""
    import threading

    for trial in range(10):
        path = tmp_path / f"store{trial}.sqlite"
        barrier = threading.Barrier(6)
        errors = []

        def open_it():
            barrier.wait()
            try:
                ResultStore(path).close()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with ResultStore(path) as store:
            columns = [row[1] for row in store._db.execute("PRAGMA table_info(results)")]
        assert columns[-3:] == ["policy", "budget", "policy_config"]


def test_sigkill_half_way_then_rerun_finishes_without_duplicates_or_recomputation(tmp_path):
    db, log = tmp_path / "arena.sqlite", tmp_path / "computed.log"
    script = tmp_path / "run.py"
    total = len(grid())
    release = tmp_path / "release"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__), log=str(log), db=str(db), half=total // 2,
                                    release=str(release)))
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until about half the grid is stored
        if db.exists():
            with ResultStore(db) as s:
                if s.count() >= total // 2:
                    break
        time.sleep(0.02)
    time.sleep(0.2)  # the child is now blocked in the cell after the stored half
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    release.touch()
    with ResultStore(db) as s:
        stored_at_kill = s.done_keys()
    assert 0 < len(stored_at_kill) < total, "the kill must land half-way"

    subprocess.run([sys.executable, str(script)], check=True, timeout=120)

    with ResultStore(db) as s:
        rows = list(s.rows())
    keys = [r["key"] for r in rows]
    assert len(keys) == total == len(set(keys)) == len({c.key for c in grid()})
    computed = Counter(log.read_text().split())
    twice = [k for k, n in computed.items() if n > 1]
    # finished cells are never recomputed; only the cell in flight at the kill may run again
    assert all(k not in stored_at_kill for k in twice)
    assert len(twice) <= 1 and max(computed.values()) <= 2
    assert set(computed) == set(keys)
