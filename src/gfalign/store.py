"""The results store: one SQLite file (WAL mode), one row per run, keyed by ``RunConfig.key()``.

Only the coordinating process of a sweep writes; workers return their results to it. The row
holds the configuration, the status, the epochs done, the final metrics, the per-epoch history,
the seconds spent and the versions the run used, so a report needs nothing but this file.

A store is opened for writing (``Store(path)``: created with its directory) or for reading
(``Store(path, readonly=True)``: SQLite's ``mode=ro``, which works on read-only media and
never changes the file). Opening checks the file (``PRAGMA quick_check``, milliseconds for the
committed store) and refuses a damaged one or a file that is not SQLite; nothing is ever
repaired silently: the way back is the committed export, ``gfalign runs import
results/runs.jsonl.gz --store NEW.sqlite``. Every SQLite failure (damage, a full disk, a
read-only file, a lock held too long) is raised as a one-line ``StoreError`` naming the file.

``import_file`` is one transaction: every row of the file is checked first (types, ranges,
finite numbers, the key against its configuration), and either all rows go in or none do.
An export is written to a temporary file and renamed, so a failed export never leaves half a
file and never touches the store.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["STATUSES", "Store", "StoreError"]

# The statuses a run directory's summary can have (``gfalign.runs``).
STATUSES = ("finished", "diverged", "running", "stopped", "interrupted")
REBUILD = "gfalign runs import results/runs.jsonl.gz --store NEW.sqlite"
# Stores up to this size are checked page by page when opened (about 1 ms per MB).
CHECK_LIMIT = 256 * 2**20
_INT64 = 2**63 - 1
# Bad rows named in an import's refusal; the rest are counted.
_NAMED = 10


class StoreError(ValueError):
    """The store or a file for it cannot be used: damaged, unwritable, or a bad import row."""


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


def _damaged(path: Path, error: BaseException) -> str:
    recover = f"rebuild it from the committed export: {REBUILD}, then move NEW.sqlite to {path}"
    if "not a database" in str(error):
        return (
            f"{path} is not a results store (SQLite: {error}); check the --store path, "
            f"or, if it was the store, {recover}"
        )
    return f"results store {path} is damaged ({error}); nothing was changed: {recover}"


def _describe(path: Path, error: sqlite3.Error) -> str:
    """One line for a SQLite failure on the store at ``path``."""
    text = str(error)
    if not isinstance(error, sqlite3.OperationalError) or "malformed" in text:
        return _damaged(path, error)
    if "full" in text:
        return f"cannot write the results store {path}: {text}; free some space"
    if "readonly" in text or "read-only" in text:
        return f"cannot write the results store {path}: it is read-only ({text})"
    if "locked" in text or "busy" in text:
        return (
            f"results store {path} stayed locked by another process for 30 s ({text}); "
            "run this again when that process has finished writing"
        )
    if "unable to open" in text:
        return (
            f"cannot open the results store {path} ({text}): the file or its directory is "
            "missing or read-only"
        )
    return f"results store {path}: {text}"


class Store:
    """A SQLite results store at ``path``.

    Args:
        path: the store file; created (with its parent directory) unless ``readonly``.
        readonly: open with SQLite's ``mode=ro``: reading works on read-only media and the
            file is never written.

    Raises:
        StoreError: the file is missing (``readonly``), damaged, not SQLite, or cannot be
            created or opened.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path, self.readonly = Path(path), readonly
        if readonly and not self.path.is_file():
            raise StoreError(
                f"results store {self.path} does not exist; run `gfalign reproduce` first, "
                f"or rebuild it from the committed export: {REBUILD}"
            )
        if not readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(
                    f"cannot create the results store {self.path}: {self.path.parent} cannot be "
                    f"a directory ({error.strerror}); choose a writable --store path"
                ) from None
            if self.path.is_dir():
                raise StoreError(f"results store {self.path} is a directory, not a file")
        self._db: sqlite3.Connection | None = None
        try:
            with self._errors():
                self._db = self._connect()
                self._check()
                if readonly:
                    self._require_schema()
                else:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.executescript(_SCHEMA)
                    self._db.commit()
        except BaseException:
            if self._db is not None:
                self._db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            db = sqlite3.connect(str(self.path), timeout=30)
        else:
            uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=30)
            try:
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.OperationalError:
                db.close()
                # A WAL store on read-only media: SQLite cannot create the shared-memory file.
                # With no write-ahead log beside it the file is all there is, and nobody can
                # change it there, so it may be read as immutable.
                if Path(f"{self.path}-wal").exists():
                    raise
                db = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _check(self) -> None:
        """Refuse a damaged store before anything reads or writes it."""
        if self.path.exists() and self.path.stat().st_size > CHECK_LIMIT:
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StoreError(_damaged(self.path, " / ".join(problems).replace("\n", " ")))

    def _require_schema(self) -> None:
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
        ).fetchone()
        if found is None:
            raise StoreError(
                f"{self.path} is a SQLite file but not a results store (it has no runs table); "
                "check the --store path"
            )

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite failures as one-line ``StoreError``s naming this store."""
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(_describe(self.path, error)) from error
        except json.JSONDecodeError as error:
            raise StoreError(_damaged(self.path, f"a row is not JSON: {error}")) from error

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taking the write lock at once: all of it, or nothing."""
        if self.readonly:
            raise StoreError(f"results store {self.path} was opened read-only")
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.rollback()
                raise
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
        """Insert or replace the row of run ``key``.

        Raises:
            StoreError: the store cannot be written (disk full, read-only, locked).
        """
        with self._transaction():
            self._insert(
                key,
                config=config,
                status=status,
                experiment=experiment,
                label=label,
                epochs_done=epochs_done,
                final=final,
                history=history,
                seconds=seconds,
                versions=versions,
            )

    def _insert(
        self,
        key: str,
        *,
        config: Mapping[str, Any],
        status: str,
        experiment: str | None,
        label: str | None,
        epochs_done: int,
        final: Mapping[str, Any] | None,
        history: Sequence[Mapping[str, Any]] | None,
        seconds: float | None,
        versions: Mapping[str, Any] | None,
    ) -> None:
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

    def _rows(self, sql: str, *parameters: Any) -> list[dict[str, Any]]:
        with self._errors():
            return [_decode(r) for r in self._db.execute(sql, parameters)]

    def get(self, key: str) -> dict[str, Any] | None:
        """The row of run ``key`` (JSON columns decoded, ``*_json`` names shortened), or None."""
        rows = self._rows("SELECT * FROM runs WHERE key = ?", key)
        return rows[0] if rows else None

    def find(self, prefix: str) -> list[dict[str, Any]]:
        """The rows whose key starts with ``prefix``."""
        return self._rows(
            "SELECT * FROM runs WHERE key LIKE ? ORDER BY key", prefix.replace("%", "") + "%"
        )

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every row (of one experiment), oldest update first."""
        if experiment is None:
            return self._rows("SELECT * FROM runs ORDER BY updated, key")
        return self._rows(
            "SELECT * FROM runs WHERE experiment = ? ORDER BY updated, key", experiment
        )

    def export(self, path: str | Path, experiment: str | None = None) -> int:
        """Write the runs to ``path``: CSV for ``.csv``, else JSON lines (gzipped for ``.gz``).

        The CSV holds the final metrics only (a table to read); the JSON lines hold every column,
        the per-epoch history included, so ``import_file`` rebuilds the store from them. The
        file is written beside ``path`` and renamed into place: a failed export leaves
        ``path`` as it was.

        Raises:
            StoreError: ``path`` cannot be written (the store is unchanged), or as ``list``.
        """
        path = Path(path)
        if _format(path) == "csv":
            return self.export_csv(path, experiment)
        rows = self.list(experiment)
        with _replacing(path) as temporary, _open_text(temporary, "w", path) as handle:
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
        with _replacing(path) as temporary, temporary.open("w", newline="") as handle:
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
        """Add the runs of an ``export`` file in one transaction; returns (imported, skipped).

        Every row is checked before any is written: its key must be the hash of its
        configuration (a hand-edited or foreign row is refused), its status one of
        ``STATUSES``, its epochs a non-negative 64-bit integer, its seconds and metrics finite
        numbers (``Infinity`` is refused, and ``NaN`` too but as an angle to backprop, which
        the alignment measurement records as NaN when it is undefined). One bad row refuses
        the whole file, with every bad row named by its line. A run already in the store is
        kept unless ``replace`` is set or the file's row has more epochs done. A CSV restores
        the final metrics but no per-epoch history (the curves in a report need the JSON-lines
        export).

        Raises:
            StoreError: a missing or unreadable file, bad rows, or a store that cannot be
                written (then nothing was imported either).
        """
        path = Path(path)
        rows = _checked_rows(path)
        imported = skipped = 0
        with self._transaction():
            for row in rows:
                present = self.get(row["key"])
                if present and not replace and present["epochs_done"] >= row["epochs_done"]:
                    skipped += 1
                    continue
                self._insert(**row)
                imported += 1
        return imported, skipped


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed to it when the block succeeds."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield temporary
            os.replace(temporary, path)
        except OSError as error:
            raise StoreError(
                f"cannot write {path} ({error.strerror or error}); the store is unchanged: "
                "choose a writable place for the export"
            ) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return "csv" if suffixes and suffixes[-1] == ".csv" else "jsonl"


def _open_text(path: Path, mode: str, named: Path | None = None):
    """``path`` as text, gzipped when ``named`` (the file it stands for) ends in ``.gz``."""
    if (named or path).suffix.lower() == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="")
    return path.open(mode, encoding="utf-8", newline="")


# ---------------------------------------------------------------------------- checked import


class _Bad(ValueError):
    """One problem with one row of an import file."""


def _constant(name: str) -> float:
    """JSON's non-standard ``NaN``, ``Infinity`` and ``-Infinity``, read as floats so that the
    field checks refuse them by name (json.loads would accept them silently)."""
    return float(name.replace("Infinity", "inf"))


def _number(text: str) -> float | int | None:
    """A CSV cell as the number it was written from (``""``: None)."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise _Bad(f"{text!r} is not a number") from None


def _finite(value: Any, what: str, undefined: bool = False) -> int | float:
    """``value`` if it is a finite number within 64 bits (or, with ``undefined``, NaN)."""
    kind = type(value)  # exact types: a bool is no number here
    if kind is float:
        if math.isfinite(value) or (undefined and math.isnan(value)):
            return value
        raise _Bad(f"{what} is {value}, not a finite number")
    if kind is int:
        if -_INT64 <= value <= _INT64:
            return value
        raise _Bad(f"{what} is {value:.3g}, outside the 64-bit range")
    raise _Bad(f"{what} is {json.dumps(value, default=str)[:40]}, not a number")


def _metrics(value: Any, what: str) -> dict[str, int | float]:
    """A record of metrics: finite numbers, except that an angle to backprop may be NaN, which
    the alignment measurement records when an update or a gradient is zero."""
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object of metrics")
    for name, number in value.items():
        kind = type(number)
        if kind is float and math.isfinite(number) or kind is int and abs(number) <= _INT64:
            continue
        _finite(number, f"{what} {name}", undefined="angle" in name)
    return value


def _plain(value: Any, what: str) -> None:
    """Refuse non-finite or out-of-range numbers anywhere inside a configuration."""
    if isinstance(value, dict):
        for name, item in value.items():
            _plain(item, f"{what}.{name}")
    elif isinstance(value, list):
        for item in value:
            _plain(item, what)
    elif type(value) in (int, float):
        _finite(value, what)


def _text(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Bad(f"{what} is not text")
    return value


def _retired(config: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``config`` with its built-in model's name replaced by the former definition that its key
    hashes (``gfalign.models.RETIRED_MODELS``), or ``None`` where none does."""
    from gfalign.config import RunConfig
    from gfalign.models import RETIRED_MODELS

    name = config.get("model")
    for former in RETIRED_MODELS.get(name, ()) if isinstance(name, str) else ():
        candidate = {**config, "model": former}
        if RunConfig.from_data(candidate).key() == key:
            return candidate
    return None


def _checked(row: Mapping[str, Any]) -> dict[str, Any]:
    """One export row, checked by type and range, in the shape ``Store._insert`` takes."""
    from gfalign.config import RunConfig
    from gfalign.rules import ConfigError

    for name in ("key", "config", "status"):
        if name not in row:
            raise _Bad(f"not a stored run (no {name})")
    key, config = row["key"], row["config"]
    if not isinstance(key, str):
        raise _Bad("the key is not text")
    if not isinstance(config, dict):
        raise _Bad("bad configuration (not an object)")
    _plain(config, "config")
    try:
        hashed = RunConfig.from_data(config).key()
        if hashed != key:
            config = _retired(config, key) or config
            hashed = RunConfig.from_data(config).key()
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise _Bad(f"bad configuration ({error})") from None
    if hashed != key:
        raise _Bad(
            f"key {key} is not the hash of its configuration ({hashed}); "
            "edited by hand, or written by a gfalign that hashes differently?"
        )
    status = row["status"]
    if status not in STATUSES:
        raise _Bad(f"status {status!r} is not one of {', '.join(STATUSES)}")
    epochs = row.get("epochs_done") or 0
    if isinstance(epochs, str):
        try:
            epochs = int(epochs)
        except ValueError:
            raise _Bad(f"epochs_done {epochs!r} is not a whole number") from None
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= _INT64:
        raise _Bad(f"epochs_done {str(epochs)[:40]} is not a whole number from 0 to 2^63-1")
    seconds = row.get("seconds")
    if seconds is not None:
        seconds = float(_finite(seconds, "seconds"))
        if seconds < 0:
            raise _Bad(f"seconds is {seconds}, below 0")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise _Bad("history is not a list of epoch records")
    history = [_metrics(record, f"history[{n}]") for n, record in enumerate(history)]
    versions = row.get("versions") or {}
    if not isinstance(versions, dict):
        raise _Bad("versions is not an object")
    return {
        "key": key,
        "config": config,
        "status": status,
        "experiment": _text(row.get("experiment"), "experiment"),
        "label": _text(row.get("label"), "label"),
        "epochs_done": epochs,
        "final": _metrics(row.get("final") or {}, "final"),
        "history": history,
        "seconds": seconds,
        "versions": versions,
    }


def _lines(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """(line number, raw row or the problem with that line) of an export file."""
    with _open_text(path, "r") as handle:
        if _format(path) == "jsonl":
            for line, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text, parse_constant=_constant)
                except _Bad as problem:
                    yield line, str(problem)
                    continue
                except (json.JSONDecodeError, RecursionError) as error:
                    yield line, f"not a stored run ({error})"
                    continue
                yield line, row if isinstance(row, dict) else "not a stored run (not an object)"
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
                    if name and name.startswith("final_") and (value := _number(text)) is not None
                }
                config = json.loads(row["config"] or "", parse_constant=_constant)
                seconds = _number(row.get("seconds") or "")
            except (_Bad, json.JSONDecodeError, TypeError, ValueError) as error:
                yield line, f"not a stored run ({error})"
                continue
            yield line, {**row, "config": config, "final": final, "seconds": seconds}


def _checked_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of an export file, checked; refuses the file with every bad line named."""
    if not path.is_file():
        raise StoreError(f"{path}: no such file to import")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    lines: dict[str, int] = {}
    try:
        for line, raw in _lines(path):
            try:
                if isinstance(raw, str):
                    raise _Bad(raw)
                row = _checked(raw)
                if row["key"] in lines:
                    raise _Bad(f"run {row['key']} is already on line {lines[row['key']]}")
            except _Bad as problem:
                problems.append(f"line {line}: {problem}")
                continue
            lines[row["key"]] = line
            rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise StoreError(f"{path}: cannot read it ({error}); nothing imported") from None
    if problems:
        more = len(problems) - _NAMED
        named = "; ".join(problems[:_NAMED]) + (f"; and {more} more" if more > 0 else "")
        count = f"{len(problems)} bad row" + ("s" if len(problems) > 1 else "")
        raise StoreError(f"{path}: {count}, nothing imported: {named}")
    return rows


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON:
        text = data.pop(f"{name}_json")
        data[name] = json.loads(text) if text else ({} if name != "history" else [])
    return {c: data[c] for c in COLUMNS}
