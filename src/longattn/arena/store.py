"""The arena's result store: one SQLite file, one row per finished cell.

A cell is one (model, method, config, task, length, sample, seed), plus, for a KV-cache policy
cell, (policy, budget, policy_config); its key is a hash of those fields, so a rerun finds what
is done and never writes a cell twice (the key is the primary key). A cell without a policy
hashes exactly the fields it had before policies existed, so stores written then keep their
keys and still resume; their rows read back with ``policy``/``budget`` ``None`` and an empty
``policy_config`` (the columns are added to an old file when it is opened). Every row is committed as soon as its cell finishes (write-ahead log), so a crash or a
SIGKILL loses at most the cell that was running.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
import time
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

#: columns added for KV-policy cells; ``ALTER TABLE`` adds them to stores written before
BUSY_TIMEOUT_S = 30  # how long a connection waits for another's lock

POLICY_COLUMNS = (("policy", "TEXT"), ("budget", "TEXT"), ("policy_config", "TEXT NOT NULL DEFAULT '{}'"))
COLUMNS = ("key", "model", "method", "config", "task", "length", "sample", "seed", "metrics", "duration_s",
           "finished_at", "env", "policy", "budget", "policy_config")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Cell:
    """One unit of arena work.

    ``method``/``config``: the attention method and its config. ``policy``: a KV-cache policy
    of :mod:`longattn.kv` (then ``method`` must be ``"full"``: the policy's cache computes the
    attention), ``budget`` its canonical budget label (``"25%"``, ``"512"``; ``None`` for the
    ``full`` policy) and ``policy_config`` the config the budget translated to
    (:func:`longattn.arena.budget.policy_config`)."""

    model: str
    method: str
    task: str
    length: int
    sample: int
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    budget: str | None = None
    policy_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy is None:
            if self.budget is not None or self.policy_config:
                raise ValueError("a cell without a KV policy takes no budget or policy_config")
        elif self.method != "full":
            raise ValueError(
                f"a KV-policy cell ({self.policy}) runs with attention method 'full' (the cache computes the "
                f"attention), got method {self.method!r}")

    @property
    def key(self) -> str:
        fields = asdict(self)
        fields["config"] = canonical_json(self.config)
        if self.policy is None:  # the fields of cells from before policies existed: same keys
            for name in ("policy", "budget", "policy_config"):
                del fields[name]
        else:
            fields["policy_config"] = canonical_json(self.policy_config)
        return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:32]

    @property
    def label(self) -> str:
        """Short name for progress lines: ``method`` or ``policy@budget``."""
        if self.policy is None:
            return self.method
        return self.policy if self.budget is None else f"{self.policy}@{self.budget}"


class ResultStore:
    """``ResultStore(path)``: open (or create) the SQLite store at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # add the policy columns to a store written before them; under the write lock, so that
        # processes opening one store at once (a job and its monitor) do not both add a column
        self._db.execute("BEGIN IMMEDIATE")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        for name, decl in POLICY_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE results ADD COLUMN {name} {decl}")
        self._db.commit()

    def _enable_wal(self) -> None:
        """Switch to the write-ahead log (persistent: the first opener's switch holds for all).
        The switch takes an exclusive lock and SQLite does not wait on its busy timeout for it,
        so a store being created by another connection at the same moment answers "database is
        locked": retry until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

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
            f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            (
                cell.key, cell.model, cell.method, canonical_json(cell.config), cell.task,
                cell.length, cell.sample, cell.seed, canonical_json(metrics), float(duration_s),
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                canonical_json(env or {}), cell.policy, cell.budget, canonical_json(cell.policy_config),
            ),
        )
        self._db.commit()
        return cur.rowcount == 1

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every stored row as a dict of its columns (``config``, ``metrics``, ``env`` and
        ``policy_config`` parsed from JSON; ``policy``/``budget`` ``None`` for method cells)."""
        cur = self._db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM results "
            "ORDER BY method, policy, task, length, budget, sample, seed")
        for values in cur:
            row = dict(zip(COLUMNS, values))
            for name in ("config", "metrics", "env", "policy_config"):
                row[name] = json.loads(row[name] or "{}")
            yield row

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
