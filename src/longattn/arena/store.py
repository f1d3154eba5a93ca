"""The arena's result store: one SQLite file, one row per finished cell.

A cell is one (model, method, config, task, length, sample, seed); its key is a hash of those
fields, so a rerun finds what is done and never writes a cell twice (the key is the primary
key). Every row is committed as soon as its cell finishes (write-ahead log), so a crash or a
SIGKILL loses at most the cell that was running.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    config TEXT NOT NULL,
    task TEXT NOT NULL,
    length INTEGER NOT NULL,
    sample INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    duration_s REAL NOT NULL,
    finished_at TEXT NOT NULL,
    env TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_method ON results (method, task, length);
"""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Cell:
    """One unit of arena work."""

    model: str
    method: str
    task: str
    length: int
    sample: int
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        fields = asdict(self)
        fields["config"] = canonical_json(self.config)
        return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:32]


class ResultStore:
    """``ResultStore(path)``: open (or create) the SQLite store at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done_keys(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT key FROM results")}

    def add(self, cell: Cell, metrics: dict[str, Any], duration_s: float, env: dict[str, Any] | None = None) -> bool:
        """Store a finished cell; returns False (and writes nothing) if it is already there."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cell.key, cell.model, cell.method, canonical_json(cell.config), cell.task,
                cell.length, cell.sample, cell.seed, canonical_json(metrics), float(duration_s),
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                canonical_json(env or {}),
            ),
        )
        self._db.commit()
        return cur.rowcount == 1

    def rows(self) -> Iterator[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM results ORDER BY method, task, length, sample, seed")
        names = [d[0] for d in cur.description]
        for values in cur:
            row = dict(zip(names, values))
            for name in ("config", "metrics", "env"):
                row[name] = json.loads(row[name])
            yield row

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
