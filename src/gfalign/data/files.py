"""Finding, fetching and verifying a dataset's files (four IDX files, or CIFAR's record batches).

Files come, in order, from a directory the user names (``root=`` or ``GFALIGN_DATA``), the cache
(``GFALIGN_CACHE``, else ``$XDG_CACHE_HOME/gfalign``, else ``~/.cache/gfalign``), then each of the
dataset's sources. Every file is checked against its pinned SHA-256 and its IDX header (or, for
a headerless record file, its exact length) before use.
Downloads land in a temporary file inside the cache and are renamed into place only once verified,
under a lock, so concurrent fetches leave one good cache and a failed one leaves nothing behind.
The user's own files are read, never moved or deleted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from filelock import FileLock
from rich.progress import Progress

from gfalign.data import idx
from gfalign.data.errors import DataError
from gfalign.data.progress import progress_bar
from gfalign.data.registry import SPECS, get_spec
from gfalign.data.sources import CHUNK_BYTES, find_file
from gfalign.data.specs import DatasetSpec, FileSpec, Source

logger = logging.getLogger("gfalign.data")

DATA_VARIABLE = "GFALIGN_DATA"
CACHE_VARIABLE = "GFALIGN_CACHE"
# Enough of a decompressed file to hold any IDX header (4 bytes + 4 per dimension).
HEAD_BYTES = 64


def cache_root() -> Path:
    """The cache: ``$GFALIGN_CACHE``, or ``$XDG_CACHE_HOME/gfalign``, or ``~/.cache/gfalign``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gfalign"
    return Path.home() / ".cache" / "gfalign"


def cache_directory(spec: DatasetSpec) -> Path:
    """Where the cache keeps one dataset's files: ``<cache root>/<name>``."""
    return cache_root() / spec.name


def user_directory(root: str | os.PathLike | None) -> Path | None:
    """The directory the user named: ``root`` if given, else ``$GFALIGN_DATA``, else None."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(DATA_VARIABLE):
        return Path(os.environ[DATA_VARIABLE]).expanduser()
    return None


def dataset_directory(root: Path, spec: DatasetSpec) -> Path:
    """The first of ``root/<name>/<folder>``, ``root/<name>``, ``root/<folder>`` (for each of the
    spec's ``folders``, such as the ``cifar-10-batches-bin`` a CIFAR archive unpacks to) that
    exists, so one directory can hold several datasets; else ``root``."""
    candidates = [root / spec.name / folder for folder in spec.folders]
    candidates += [root / spec.name, *(root / folder for folder in spec.folders)]
    return next((path for path in candidates if path.is_dir()), root)


@dataclass(frozen=True)
class FileReport:
    """What ``verify`` found for one file.

    Attributes:
        name: the file's name without ``.gz``.
        path: where it is, gzipped or not; None when missing.
        status: ``"good"`` (checksum and header match), ``"bad"`` or ``"missing"``.
        detail: what is wrong, empty when good.
        size: bytes on disk; None when missing.
    """

    name: str
    path: Path | None
    status: Literal["good", "bad", "missing"]
    detail: str = ""
    size: int | None = None

    @property
    def good(self) -> bool:
        return self.status == "good"


@dataclass(frozen=True)
class _Inspection:
    sha256: str
    length: int
    head: bytes
    overflowed: bool  # stopped reading past the limit: length and sha256 cover a prefix only


def _decompressed(
    stream: BinaryIO, label: str, on_read: Callable[[int], object]
) -> Iterator[bytes]:
    """Yield a gzip stream's content in bounded chunks (a small bad file cannot fill memory)."""
    decompressor = zlib.decompressobj(wbits=31)
    # Whether the current member has begun: one begun and unfinished at the end is truncation.
    fed = False
    try:
        while chunk := stream.read(CHUNK_BYTES):
            on_read(len(chunk))
            while chunk:
                fed = True
                yield decompressor.decompress(chunk, CHUNK_BYTES)
                chunk = decompressor.unconsumed_tail
                if decompressor.eof:
                    # Concatenated gzip members form one valid stream: go on with the next.
                    chunk = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=31)
                    fed = False
        if fed:
            yield decompressor.flush()
    except zlib.error as error:
        raise DataError(f"{label}: corrupt gzip stream ({error})") from None
    if fed and not decompressor.eof:
        raise DataError(f"{label}: truncated gzip stream (the file ends inside it)")


def _inspect(
    path: Path,
    label: str,
    limit: int,
    progress: Progress,
    destination: BinaryIO | None = None,
) -> _Inspection:
    """Hash and measure the decompressed content of ``path``, copying it to ``destination``.

    Reading stops past ``limit`` bytes, so a huge or endless file costs no more than a right one.
    """
    digest = hashlib.sha256()
    head = bytearray()
    length = 0
    overflowed = False
    task = progress.add_task(label, total=path.stat().st_size)
    try:
        with open(path, "rb") as stream:
            gzipped = stream.read(2) == idx.GZIP_MAGIC
            stream.seek(0)
            advance = functools.partial(progress.advance, task)
            chunks = _decompressed(stream, label, advance) if gzipped else _plain(stream, advance)
            for chunk in chunks:
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                length += len(chunk)
                if length > limit:
                    overflowed = True
                    break
                digest.update(chunk)
                if destination is not None:
                    destination.write(chunk)
    except OSError as error:
        raise DataError(f"{label}: cannot read ({error.strerror or error})") from None
    finally:
        progress.remove_task(task)
    return _Inspection(digest.hexdigest(), length, bytes(head), overflowed)


def _plain(stream: BinaryIO, on_read: Callable[[int], object]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        on_read(len(chunk))
        yield chunk


def check_file(
    path: Path,
    file: FileSpec,
    label: str,
    progress: Progress,
    destination: BinaryIO | None = None,
) -> None:
    """Raise DataError unless ``path`` (gzipped or not) holds exactly ``file``.

    Checks the IDX header (magic number, type, dimensions) and the length it implies, or a raw
    file's length, and the pinned SHA-256 of the decompressed content, in one pass that also
    copies it to ``destination``.
    """
    inspection = _inspect(path, label, file.size, progress, destination)
    if file.format == "raw":
        if inspection.overflowed or inspection.length != file.size:
            held = "more than" if inspection.overflowed else "only"
            length = file.size if inspection.overflowed else inspection.length
            raise DataError(
                f"{label}: {held} {length} bytes, expected exactly {file.size} "
                f"({idx.describe(file.shape, file.dtype)})"
            )
        _check_sha256(inspection, file, label)
        return
    header = idx.parse_header(inspection.head, label)
    if inspection.overflowed:
        # A wrong type or shape explains a long file better than its length does.
        idx.check(header, header.total_bytes, label, file.shape, file.dtype)
        raise DataError(f"{label}: longer than the {file.size} bytes expected")
    idx.check(header, inspection.length, label, file.shape, file.dtype)
    _check_sha256(inspection, file, label)


def _check_sha256(inspection: _Inspection, file: FileSpec, label: str) -> None:
    if inspection.sha256 != file.sha256:
        raise DataError(
            f"{label}: SHA-256 {inspection.sha256} does not match the pinned {file.sha256}"
        )


def verify_directory(
    spec: DatasetSpec, directory: Path, progress: Progress | None = None
) -> list[FileReport]:
    """Check each of the dataset's files in ``directory``; one report per file, in order."""
    reports = []
    # Entering a running display again would stop it on exit: only open one when none is given.
    display = progress_bar(quiet=True) if progress is None else contextlib.nullcontext(progress)
    with display as active:
        for file in spec.files:
            path = find_file(directory, file)
            if path is None:
                reports.append(FileReport(file.name, None, "missing", f"no {file.name}[.gz]"))
                continue
            size = path.stat().st_size
            try:
                check_file(path, file, path.name, active)
            except DataError as error:
                reports.append(FileReport(file.name, path, "bad", str(error), size))
            else:
                reports.append(FileReport(file.name, path, "good", "", size))
    return reports


def verify(name: str, *, root: str | os.PathLike | None = None) -> list[FileReport]:
    """Check a dataset's files where ``load`` would look first, without fetching anything.

    Args:
        name: a dataset name, e.g. ``"mnist"``.
        root: a directory holding the files (or ``root/<name>``); default ``$GFALIGN_DATA``,
            else the cache.

    Returns:
        One ``FileReport`` per file, in the order of ``DatasetSpec.files``.

    Example:
        >>> all(report.good for report in verify("mnist"))  # doctest: +SKIP
        True
    """
    spec = get_spec(name)
    return verify_directory(spec, lookup_directory(spec, root))


def lookup_directory(spec: DatasetSpec, root: str | os.PathLike | None = None) -> Path:
    """Where ``verify`` looks: ``root``, else ``$GFALIGN_DATA``, else the cache."""
    user = user_directory(root)
    return dataset_directory(user, spec) if user is not None else cache_directory(spec)


def fetch(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    quiet: bool = False,
    download: bool = True,
) -> Path:
    """Make sure a dataset's verified files are at hand; return the directory holding them.

    A complete, verified directory named by ``root`` or ``$GFALIGN_DATA`` is used in place.
    Otherwise the cache is checked and whatever it lacks is fetched from the dataset's sources in
    order; each source that fails is logged in one line on the ``gfalign.data`` logger and the
    next is tried.

    Args:
        name: a dataset name, e.g. ``"mnist"``.
        root: a directory holding the files, gzipped or not (or ``root/<name>``).
        quiet: no progress bars.
        download: False allows only files already on disk.

    Returns:
        The directory: the user's, or ``<cache root>/<name>``.

    Raises:
        DataError listing what was tried and how to supply the files by hand.

    Example:
        >>> sorted(path.name for path in fetch("mnist").iterdir())  # doctest: +SKIP
    """
    spec = get_spec(name)
    attempts: list[str] = []
    with progress_bar(quiet) as progress:
        named = named_directory(spec, root, progress, attempts)
        if named is not None:
            return named
        return fetch_into_cache(spec, progress, download=download, attempts=attempts)


def named_directory(
    spec: DatasetSpec,
    root: str | os.PathLike | None,
    progress: Progress,
    attempts: list[str] | None = None,
) -> Path | None:
    """The directory the user named (``root``, else ``$GFALIGN_DATA``) when it holds all of the
    dataset's files, each verified; else None, with the reason logged in one line (and added to
    ``attempts``). None too when no directory is named."""
    user = user_directory(root)
    if user is None:
        return None
    attempts = [] if attempts is None else attempts
    if not user.is_dir():
        _attempt(attempts, f"data directory {user}", "no such directory")
        return None
    directory = dataset_directory(user, spec)
    reports = verify_directory(spec, directory, progress)
    problems = "; ".join(report.detail for report in reports if not report.good)
    if problems:
        other = _other_dataset(spec, directory, progress)
        if other is not None:  # MNIST and Fashion-MNIST share their files' names
            problems = (
                f"it holds {other}'s files, not {spec.name}'s (a directory can hold both as "
                f"{user / other}/ and {user / spec.name}/)"
            )
        _attempt(attempts, f"data directory {directory}", problems + "; trying the cache")
        return None
    return directory


def _other_dataset(spec: DatasetSpec, directory: Path, progress: Progress) -> str | None:
    """The name of another dataset, of the same file names, whose files ``directory`` holds."""
    names = [file.name for file in spec.files]
    twins = [s for s in SPECS.values() if s != spec and [f.name for f in s.files] == names]
    return next(
        (s.name for s in twins if all(r.good for r in verify_directory(s, directory, progress))),
        None,
    )


def fetch_into_cache(
    spec: DatasetSpec,
    progress: Progress,
    *,
    download: bool = True,
    attempts: list[str] | None = None,
) -> Path:
    """The cache directory, once it holds the dataset's verified files: what it lacks is
    fetched from the dataset's sources in order (see ``fetch``, which looks at the user's
    directory first)."""
    attempts = [] if attempts is None else attempts
    cache = cache_directory(spec)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache directory {cache} ({error})") from None
    with FileLock(cache / ".lock"):
        _remove_leftovers(spec, cache)
        missing = _missing_from_cache(spec, cache, progress)
        if not missing:
            return cache
        if not download:
            names = ", ".join(file.name for file in missing)
            attempts.append(f"cache {cache}: missing {names}, and downloads are off")
            raise DataError(_give_up(spec, attempts))
        for source in spec.sources:
            missing = _fetch_from(source, missing, cache, progress, attempts)
            if not missing:
                return cache
    raise DataError(_give_up(spec, attempts))


def _attempt(attempts: list[str], source: str, problem: str) -> None:
    """Record a failed source and report it in one line."""
    line = f"{source}: {problem}"
    logger.warning("%s", line)
    attempts.append(line)


def _remove_leftovers(spec: DatasetSpec, cache: Path) -> None:
    """Delete partial downloads of a fetch that was killed (called with the lock held)."""
    for file in spec.files:
        for path in cache.glob(f".{file.name}.*.part"):
            path.unlink(missing_ok=True)
    for path in cache.glob(".download-*"):
        shutil.rmtree(path, ignore_errors=True)


def _missing_from_cache(spec: DatasetSpec, cache: Path, progress: Progress) -> list[FileSpec]:
    """The files the cache lacks; a cached file that fails its check is discarded."""
    missing = []
    for file in spec.files:
        path = cache / file.name
        if path.is_file():
            try:
                check_file(path, file, f"cached {file.name}", progress)
                continue
            except DataError as error:
                logger.warning("%s; discarded", error)
                path.unlink(missing_ok=True)
        missing.append(file)
    return missing


def _fetch_from(
    source: Source,
    missing: Sequence[FileSpec],
    cache: Path,
    progress: Progress,
    attempts: list[str],
) -> list[FileSpec]:
    """Install into ``cache`` what ``source`` gives of ``missing``; return what is still missing."""
    remaining = list(missing)
    workdir = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        for file, path in source.retrieve(tuple(missing), workdir, progress):
            _install(path, file, cache, progress)
            remaining.remove(file)
            logger.info("%s: %s verified", source.description, file.name)
    except DataError as error:
        _attempt(attempts, source.description, str(error))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return remaining


def _install(path: Path, file: FileSpec, cache: Path, progress: Progress) -> None:
    """Decompress and verify ``path`` into a temporary file, then rename it into the cache."""
    descriptor, name = tempfile.mkstemp(dir=cache, prefix=f".{file.name}.", suffix=".part")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            check_file(path, file, path.name, progress, destination=handle)
        os.chmod(temporary, 0o644)  # mkstemp's 0o600 would hide a shared cache from other users
        os.replace(temporary, cache / file.name)
    except DataError as error:
        raise DataError(f"{error}; discarded") from None
    finally:
        temporary.unlink(missing_ok=True)


def _give_up(spec: DatasetSpec, attempts: Sequence[str]) -> str:
    """The message when no source gave the files: what was tried, how to supply them by hand."""
    tried = "\n".join(f"  - {line}" for line in attempts) or "  (no sources)"
    names = ", ".join(file.name for file in spec.files)
    count = {4: "four"}.get(len(spec.files), str(len(spec.files)))
    message = (
        f"cannot obtain the {spec.name} files; tried:\n{tried}\n"
        f"To supply them by hand, put the {count} files ({names}; gzipped as .gz or not) in a "
        f"directory and pass --data-dir DIR (root=DIR in Python) or set {DATA_VARIABLE}=DIR."
    )
    return f"{message} {spec.hint}".rstrip()
