"""The results store: one SQLite file (WAL mode), one row per run, keyed by ``RunConfig.key()``.

Only the coordinating process of a sweep writes; workers return their results to it. The row
holds the configuration, the status, the epochs done, the final metrics, the per-epoch history,
the seconds spent and the versions the run used, so a report needs nothing but this file.
"""

from __future__ import annotations

import csv
import gzip
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Store", "StoreError"]


class StoreError(ValueError):
    """A file that cannot be imported into the store: unknown format, bad line, wrong key."""


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

    def export(self, path: str | Path, experiment: str | None = None) -> int:
        """Write the runs to ``path``: CSV for ``.csv``, else JSON lines (gzipped for ``.gz``).

        The CSV holds the final metrics only (a table to read); the JSON lines hold every column,
        the per-epoch history included, so ``import_file`` rebuilds the store from them.
        """
        path = Path(path)
        if _format(path) == "csv":
            return self.export_csv(path, experiment)
        rows = self.list(experiment)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_text(path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        return len(rows)

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

    def import_file(self, path: str | Path, *, replace: bool = False) -> tuple[int, int]:
        """Add the runs of an ``export`` file; returns (imported, skipped).

        A run already in the store is kept unless ``replace`` is set or the file's row has more
        epochs done. Each row's key must be the hash of its configuration, so a hand-edited or
        foreign row is refused with its line number. A CSV restores the final metrics but no
        per-epoch history (the curves in a report need the JSON-lines export).
        """
        from gfalign.config import RunConfig
        from gfalign.rules import ConfigError

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no such file to import")
        try:
            rows = list(_read_rows(path))
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
            raise StoreError(f"{path}: cannot read it ({error})") from None
        imported = skipped = 0
        for line, row in rows:
            where = f"{path}, line {line}"
            try:
                key = RunConfig.from_data(row["config"]).key()
            except (ConfigError, TypeError, ValueError) as error:
                raise StoreError(f"{where}: bad configuration ({error})") from None
            if key != row["key"]:
                raise StoreError(
                    f"{where}: key {row['key']} is not the hash of its configuration ({key}); "
                    "edited by hand, or written by a gfalign that hashes differently?"
                )
            present = self.get(key)
            if present and not replace and present["epochs_done"] >= row["epochs_done"]:
                skipped += 1
                continue
            self.upsert(
                key,
                config=row["config"],
                status=row["status"],
                experiment=row["experiment"] or None,
                label=row["label"] or None,
                epochs_done=row["epochs_done"],
                final=row["final"],
                history=row["history"],
                seconds=row["seconds"],
                versions=row["versions"],
            )
            imported += 1
        return imported, skipped


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return "csv" if suffixes and suffixes[-1] == ".csv" else "jsonl"


def _open_text(path: Path, mode: str):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="")
    return path.open(mode, encoding="utf-8", newline="")


def _number(text: str) -> float | int | None:
    """A CSV cell as the number it was written from (``""``: None)."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _run(row: Mapping[str, Any], **columns: Any) -> dict[str, Any]:
    """One export row in the shape ``upsert`` takes; ``columns`` are the already decoded ones."""
    return {
        "key": row["key"],
        "status": row["status"],
        "experiment": row.get("experiment"),
        "label": row.get("label"),
        "epochs_done": int(row.get("epochs_done") or 0),
        "seconds": row.get("seconds"),
        "final": {},
        "history": [],
        "versions": {},
        **columns,
    }


def _read_rows(path: Path):
    """(line number, row) pairs of an export file, in the shape ``upsert`` takes."""
    with _open_text(path, "r") as handle:
        if _format(path) == "jsonl":
            for line, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                    decoded = {n: row[n] for n in ("final", "history", "versions") if row.get(n)}
                    yield line, _run(row, config=row["config"], **decoded)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    raise StoreError(f"{path}, line {line}: not a stored run ({error})") from None
            return
        reader = csv.DictReader(handle)
        missing = {"key", "config", "status"} - set(reader.fieldnames or [])
        if missing:
            raise StoreError(f"{path}: not a runs export (no column {', '.join(sorted(missing))})")
        for line, row in enumerate(reader, 2):
            try:
                final = {
                    name[len("final_") :]: value
                    for name, text in row.items()
                    if name.startswith("final_") and (value := _number(text)) is not None
                }
                config = json.loads(row["config"])
                seconds = _number(row.get("seconds") or "")
                yield line, _run(row, config=config, final=final, seconds=seconds)
            except (json.JSONDecodeError, TypeError, ValueError) as error:
                raise StoreError(f"{path}, line {line}: not a stored run ({error})") from None


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON:
        text = data.pop(f"{name}_json")
        data[name] = json.loads(text) if text else ({} if name != "history" else [])
    return {c: data[c] for c in COLUMNS}
