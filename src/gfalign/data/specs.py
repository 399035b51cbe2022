"""What a dataset is made of: four pinned IDX files and the places they can come from."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.progress import Progress


@dataclass(frozen=True)
class FileSpec:
    """One IDX file, pinned by the SHA-256 of its decompressed content.

    Attributes:
        name: file name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.
        sha256: hex SHA-256 of the decompressed file.
        shape: the dimensions its header must declare, e.g. ``(60000, 28, 28)``.
        dtype: the element type its header must declare.
    """

    name: str
    sha256: str
    shape: tuple[int, ...]
    dtype: str = "uint8"

    @property
    def size(self) -> int:
        """Length of the decompressed file in bytes: header, then the elements."""
        return 4 + 4 * len(self.shape) + math.prod(self.shape) * np.dtype(self.dtype).itemsize


class Source(Protocol):
    """A place dataset files can come from (a mirror, a package, a directory)."""

    @property
    def description(self) -> str:
        """One line naming the source in messages, e.g. its URL."""
        ...

    def retrieve(
        self, files: Sequence[FileSpec], workdir: Path, progress: Progress
    ) -> Iterator[tuple[FileSpec, Path]]:
        """Yield each of ``files`` with a path holding it, gzipped or not, unverified.

        Anything downloaded goes under ``workdir``, a scratch directory the caller removes.
        A failure raises DataError saying what went wrong (the caller names the source).
        """
        ...


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its four files, where to get them and the names of its classes.

    Attributes:
        name: the name ``load`` takes, e.g. ``"mnist"``.
        train_images, train_labels, test_images, test_labels: the pinned files.
        sources: tried in order when the files are in neither the user's directory nor the cache.
        classes: class names, index = label.
        hint: an extra way to get the files by hand, printed when every source fails.
    """

    name: str
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec
    sources: tuple[Source, ...]
    classes: tuple[str, ...]
    hint: str = ""

    @property
    def files(self) -> tuple[FileSpec, FileSpec, FileSpec, FileSpec]:
        """The four files in a fixed order: train images, train labels, test images, labels."""
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)
