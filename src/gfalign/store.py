"""The results store: one SQLite file (WAL mode), one row per run, keyed by ``RunConfig.key()``.

Only the coordinating process of a sweep writes; workers return their results to it. The row
holds the configuration, the status, the epochs done, the final metrics, the per-epoch history,
the seconds spent and the versions the run used, so a report needs nothing but this file.

A store is opened for writing (``Store(path)``: created with its directory where no file is, or
an empty one) or for reading (``Store(path, readonly=True)``: SQLite's ``mode=ro``, which works
on read-only media and never changes the file). A store carries a marker,
``PRAGMA application_id`` (the bytes ``gfal``) and ``PRAGMA user_version`` (its schema), so an
SQLite file of another application is refused before anything is written into it; a store made
before the marker existed is recognised by its ``runs`` table and stamped when it is next opened
for writing. Opening checks the file (``PRAGMA quick_check``, milliseconds for the committed
store) and refuses a damaged one or a file that is not SQLite; nothing is ever repaired
silently: the way back is the committed export,
``gfalign runs import results/runs.jsonl.gz --store NEW.sqlite``. Every SQLite failure (damage,
a full disk, a read-only file, a lock held too long) is raised as a one-line ``StoreError``
naming the file. Every read checks each row's key against the hash of its configuration, so a
row changed after it was written (a flipped bit, an edit) is refused with its key and the
store's name.

``import_file`` is one transaction: every row of the file is checked first (types, ranges,
finite numbers, the key against its configuration, lines of at most 16 MiB), and either all rows
go in or none do; a file of blank lines only is refused as holding no run. An export is written
to a temporary file and renamed, so a failed export never leaves half a file and never touches
the store.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import itertools
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
# The marker of a results store: ``PRAGMA application_id`` (b"gfal") and the schema version.
APPLICATION_ID = int.from_bytes(b"gfal", "big")
SCHEMA_VERSION = 1
# The longest line an import reads: a stored run of 1000 epochs of history is about 1 MiB.
LINE_LIMIT = 16 * 2**20


class StoreError(ValueError):
    """The store or a file for it cannot be used: damaged, unwritable, or a bad import row."""


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
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
)""",
    "CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
# The columns of the runs table, by which a store made before the marker is recognised.
_RUN_COLUMNS = (
    "key",
    "experiment",
    "label",
    "config_json",
    "status",
    "epochs_done",
    "final_json",
    "history_json",
    "seconds",
    "versions_json",
    "updated",
)

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
        return f"cannot write the results store {path}: {text}; free some space and run this again"
    if "disk i/o error" in text.lower():
        return (
            f"cannot write the results store {path}: {text} (a full or failing disk); free "
            "some space or check the disk, then run this again"
        )
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
        # The outermost path this opening created (the file or a directory above it), which a
        # failed opening, or ``discard``, removes again; None when the file was there.
        self.created: Path | None = None
        if readonly and not self.path.is_file():
            raise StoreError(
                f"results store {self.path} does not exist; run `gfalign reproduce` first, "
                f"or rebuild it from the committed export: {REBUILD}"
            )
        if not readonly:
            if self.path.is_dir():
                raise StoreError(f"results store {self.path} is a directory, not a file")
            created = _first_missing(self.path)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(
                    f"cannot create the results store {self.path}: {self.path.parent} cannot be "
                    f"a directory ({error.strerror}); choose a writable --store path"
                ) from None
            self.created = created
        self._db: sqlite3.Connection | None = None
        try:
            with self._errors():
                self._db = self._connect()
                self._check()
                marked = self._recognise()
                if not readonly:
                    if not marked:
                        self._db.execute("BEGIN IMMEDIATE")
                        for statement in _SCHEMA:
                            self._db.execute(statement)
                        self._db.commit()
                    self._db.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            if self._db is not None:
                self._db.close()
            self.discard()
            raise

    def discard(self) -> None:
        """Remove what opening this store created (the file, its journals and the directories
        made for it); nothing when the file was there before. For a write that failed."""
        if self.created is None:
            return
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                Path(f"{self.path}{suffix}").unlink()
        for directory in self.path.parents:
            if not str(directory).startswith(str(self.created)):
                break
            with contextlib.suppress(OSError):
                directory.rmdir()
        self.created = None

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

    def _recognise(self) -> bool:
        """Whether the file carries the store's marker; a store made before the marker is
        recognised by its runs table, an SQLite file with no tables at all is a store to make,
        and any other is refused before anything is written.

        Raises:
            StoreError: the file belongs to another application, or to a newer gfalign.
        """
        application = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if application == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"results store {self.path} has schema {version}, written by a newer "
                    f"gfalign (this one reads schema {SCHEMA_VERSION}); upgrade gfalign"
                )
            return True
        tables = [
            row[0]
            for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        if application == 0 and version == 0:
            if not tables and not self.readonly:
                return False
            columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(runs)"))
            if "runs" in tables and sorted(columns) == sorted(_RUN_COLUMNS):
                return False
        what = f"application id {application:#x}, " if application else ""
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        holds = f"tables {shown}" if tables else "no tables"
        raise StoreError(
            f"{self.path} is an SQLite file but not a results store ({what}{holds}); nothing "
            "was written to it: check the --store path, or choose a new file for the store"
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
        """The rows ``sql`` selects, decoded, each checked against its key."""
        with self._errors():
            return [self._verified(r) for r in self._db.execute(sql, parameters)]

    def _verified(self, raw: sqlite3.Row) -> dict[str, Any]:
        """One stored row, decoded, once its key is the hash of its configuration (or of a
        former definition of its built-in model, ``_retired``)."""
        key = raw["key"]
        try:
            row = _decode(raw)
            problem = _mismatch(key, raw["config_json"])
        except json.JSONDecodeError as error:
            problem = f"a column is not JSON ({error})"
        if problem is not None:
            raise StoreError(
                f"results store {self.path}: row {key} ({raw['label'] or 'no label'}) was "
                f"changed after it was stored: {problem}; nothing was read: rebuild the store "
                f"from the committed export: {REBUILD}, or remove the row"
            )
        return row

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
        try:
            with self._transaction():
                for row in rows:
                    present = self.get(row["key"])
                    if present and not replace and present["epochs_done"] >= row["epochs_done"]:
                        skipped += 1
                        continue
                    self._insert(**row)
                    imported += 1
        except StoreError as error:
            raise StoreError(f"{error}; nothing from {path} was imported") from None
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


@functools.lru_cache(maxsize=4096)
def _mismatch(key: str, config_json: str) -> str | None:
    """Why a stored row's ``key`` is not the hash of its configuration, None when it is."""
    from gfalign.config import RunConfig
    from gfalign.rules import ConfigError

    try:
        config = json.loads(config_json)
        hashed = RunConfig.from_data(config).key()
        if hashed == key or _retired(config, key) is not None:
            return None
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as error:
        return f"its configuration is no valid run ({' '.join(str(error).split())[:160]})"
    return f"its configuration hashes to {hashed}, not to its key"


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (None: it exists)."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


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


class _TooLong(Exception):
    """A line of an import file longer than ``LINE_LIMIT``."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def _bounded(handle, counted: list[int]) -> Iterator[str]:
    """The lines of ``handle``, none read beyond ``LINE_LIMIT`` characters; ``counted[0]``
    becomes the characters read."""
    for line in itertools.count(1):
        text = handle.readline(LINE_LIMIT + 1)
        if not text:
            return
        counted[0] += len(text)
        if len(text) > LINE_LIMIT:
            raise _TooLong(line)
        yield text


def _lines(path: Path, counted: list[int]) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """(line number, raw row or the problem with that line) of an export file; ``counted[0]``
    becomes the characters read."""
    with _open_text(path, "r") as handle:
        lines = _bounded(handle, counted)
        if _format(path) == "jsonl":
            for line, text in enumerate(lines, 1):
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
        reader = csv.DictReader(lines)
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
    counted = [0]
    try:
        for line, raw in _lines(path, counted):
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
    except _TooLong as long:
        raise StoreError(
            f"{path}: line {long.line} is longer than {LINE_LIMIT // 2**20} MiB, the most a "
            "line of a runs export may hold; nothing imported"
        ) from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise StoreError(f"{path}: cannot read it ({error}); nothing imported") from None
    if not rows and not problems and counted[0] and _format(path) == "jsonl":
        raise StoreError(
            f"{path}: holds no stored run ({counted[0]} characters of blank lines); nothing "
            "imported: give an export written by `gfalign runs export`"
        )
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
