"""What a dataset is made of: its pinned files, how they hold the examples, and the places they
can come from.

Two layouts are known: four IDX files (MNIST, Fashion-MNIST: images and labels of each split),
and batches of fixed-length records, each a label byte followed by one image's pixels
(CIFAR-10's binary release, ``RecordBatches``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.progress import Progress

FORMATS = ("idx", "raw")


@dataclass(frozen=True)
class FileSpec:
    """One file, pinned by the SHA-256 of its decompressed content.

    Attributes:
        name: file name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.
        sha256: hex SHA-256 of the decompressed file.
        shape: the dimensions of its elements, e.g. ``(60000, 28, 28)``; an IDX header must
            declare them.
        dtype: the element type (an IDX header must declare it).
        format: ``"idx"`` (a header, then the elements) or ``"raw"`` (the elements alone, as in
            CIFAR's ``.bin`` batches, whose length is then all there is to check besides the
            checksum).
    """

    name: str
    sha256: str
    shape: tuple[int, ...]
    dtype: str = "uint8"
    format: str = "idx"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown file format {self.format!r}; known: {', '.join(FORMATS)}")

    @property
    def size(self) -> int:
        """Length of the decompressed file in bytes: the header (IDX), then the elements."""
        elements = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        return elements if self.format == "raw" else 4 + 4 * len(self.shape) + elements


@dataclass(frozen=True)
class RecordBatches:
    """A dataset stored as batches of records: each record is one label byte followed by one
    image's pixels, channel by channel, each channel row by row (CIFAR-10's binary layout).

    Attributes:
        train, test: the batch files of each split, in order; each a ``"raw"`` file of
            shape (records, 1 + C * H * W).
        image_shape: (C, H, W) of one image.

    Example:
        >>> batch = FileSpec("test_batch.bin", "0" * 64, (10000, 3073), format="raw")
        >>> RecordBatches((batch,), (batch,), (3, 32, 32)).record_bytes
        3073
    """

    train: tuple[FileSpec, ...]
    test: tuple[FileSpec, ...]
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for file in (*self.train, *self.test):
            if file.format != "raw" or file.dtype != "uint8" or len(file.shape) != 2:
                raise ValueError(f"{file.name}: a batch of records is a raw uint8 file (N, bytes)")
            if file.shape[1] != self.record_bytes:
                raise ValueError(
                    f"{file.name}: records of {file.shape[1]} bytes, but a label byte and a "
                    f"{' x '.join(map(str, self.image_shape))} image take {self.record_bytes}"
                )

    @property
    def record_bytes(self) -> int:
        return 1 + math.prod(self.image_shape)


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
    """A dataset: its files, where to get them and the names of its classes.

    Its files are either the four IDX files (``train_images`` ... ``test_labels``) or, for
    ``batches``, record files (``RecordBatches``); one of the two layouts, not both.

    Attributes:
        name: the name ``load`` takes, e.g. ``"mnist"``.
        train_images, train_labels, test_images, test_labels: the pinned IDX files.
        sources: tried in order when the files are in neither the user's directory nor the cache.
        classes: class names, index = label.
        hint: an extra way to get the files by hand, printed when every source fails.
        batches: the pinned record files, for a dataset of that layout.
        normalize: per-channel ``(means, stds)`` of pixels in [0, 1]; ``load`` gives
            ``(p / 255 - mean_c) / std_c``. ``None``: pixels in [0, 1].
        folders: other names of the directory holding the files, looked for (after
            ``<name>/``) in a directory the user names, e.g. ``cifar-10-batches-bin``.
    """

    name: str
    train_images: FileSpec | None = None
    train_labels: FileSpec | None = None
    test_images: FileSpec | None = None
    test_labels: FileSpec | None = None
    sources: tuple[Source, ...] = ()
    classes: tuple[str, ...] = ()
    hint: str = ""
    batches: RecordBatches | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    folders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        idx_files = (self.train_images, self.train_labels, self.test_images, self.test_labels)
        given = sum(file is not None for file in idx_files)
        if (self.batches is None and given != 4) or (self.batches is not None and given):
            raise ValueError(
                f"dataset {self.name!r}: give its four IDX files or its record batches, not "
                f"{given} IDX files and {'batches' if self.batches else 'no batches'}"
            )
        if not self.classes:
            raise ValueError(f"dataset {self.name!r}: name its classes")
        if self.normalize is not None:
            means, stds = self.normalize
            if not len(means) == len(stds) == self.image_shape[0] or min(stds) <= 0:
                raise ValueError(
                    f"dataset {self.name!r}: normalize needs one mean and one std > 0 per "
                    f"channel ({self.image_shape[0]})"
                )

    @property
    def files(self) -> tuple[FileSpec, ...]:
        """Every file in a fixed order: train images, train labels, test images, test labels;
        or the train batches, then the test batches."""
        if self.batches is not None:
            return (*self.batches.train, *self.batches.test)
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image: ``(1, H, W)`` for IDX images of (N, H, W)."""
        if self.batches is not None:
            return tuple(self.batches.image_shape)
        return (1, *self.train_images.shape[1:])

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's ``x`` as ``load`` gives it: IDX images flattened (784 for MNIST),
        record images as they are stored, (C, H, W)."""
        if self.batches is not None:
            return self.image_shape
        return (math.prod(self.image_shape),)

    @property
    def examples(self) -> tuple[int, int]:
        """(training examples, test examples)."""
        if self.batches is not None:
            return (
                sum(file.shape[0] for file in self.batches.train),
                sum(file.shape[0] for file in self.batches.test),
            )
        return (self.train_images.shape[0], self.test_images.shape[0])
