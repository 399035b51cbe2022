"""The results store: one SQLite file (WAL mode), one row per run, keyed by ``RunConfig.key()``.

Only the coordinating process of a sweep writes; workers return their results to it. The row
holds the configuration, the status, the epochs done, the final metrics, the per-epoch history,
the seconds spent and the versions the run used, so a report needs nothing but this file.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    experiment TEXT,
    label TEXT,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL,
    epochs_done INTEGER NOT NULL DEFAULT 0,
    final_json TEXT,
    history_json TEXT,
    seconds REAL,
    versions_json TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment);
"""

_JSON = ("config", "final", "history", "versions")
COLUMNS = (
    "key",
    "experiment",
    "label",
    "config",
    "status",
    "epochs_done",
    "final",
    "history",
    "seconds",
    "versions",
    "updated",
)


class Store:
    """A SQLite results store at ``path`` (created, with its parent directory)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upsert(
        self,
        key: str,
        *,
        config: Mapping[str, Any],
        status: str,
        experiment: str | None = None,
        label: str | None = None,
        epochs_done: int = 0,
        final: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
        seconds: float | None = None,
        versions: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert or replace the row of run ``key``."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO runs (key, experiment, label, config_json, status, "
                "epochs_done, final_json, history_json, seconds, versions_json, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    experiment,
                    label,
                    json.dumps(dict(config), sort_keys=True, default=str),
                    status,
                    int(epochs_done),
                    json.dumps(dict(final or {}), default=str),
                    json.dumps([dict(r) for r in history or []], default=str),
                    seconds,
                    json.dumps(dict(versions or {}), default=str),
                    time.time(),
                ),
            )

    def get(self, key: str) -> dict[str, Any] | None:
        """The row of run ``key`` (JSON columns decoded, ``*_json`` names shortened), or None."""
        row = self._db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else _decode(row)

    def find(self, prefix: str) -> list[dict[str, Any]]:
        """The rows whose key starts with ``prefix``."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE key LIKE ? ORDER BY key", (prefix.replace("%", "") + "%",)
        )
        return [_decode(r) for r in rows]

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every row (of one experiment), oldest update first."""
        if experiment is None:
            rows = self._db.execute("SELECT * FROM runs ORDER BY updated, key")
        else:
            rows = self._db.execute(
                "SELECT * FROM runs WHERE experiment = ? ORDER BY updated, key", (experiment,)
            )
        return [_decode(r) for r in rows]

    def export_csv(self, path: str | Path, experiment: str | None = None) -> int:
        """Write one line per run (final metrics as columns, no history); returns the count."""
        rows = self.list(experiment)
        metrics: list[str] = []
        for row in rows:
            metrics.extend(k for k in row["final"] if k not in metrics)
        header = ["key", "experiment", "label", "status", "epochs_done", "seconds", "updated"]
        header += ["config"] + [f"final_{m}" for m in metrics]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in rows:
                writer.writerow(
                    [row[c] for c in header[:7]]
                    + [json.dumps(row["config"], sort_keys=True)]
                    + [row["final"].get(m, "") for m in metrics]
                )
        return len(rows)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON:
        text = data.pop(f"{name}_json")
        data[name] = json.loads(text) if text else ({} if name != "history" else [])
    return {c: data[c] for c in COLUMNS}
