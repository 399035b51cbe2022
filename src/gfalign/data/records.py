"""CIFAR's binary format: batches of fixed-length records, read as plain bytes.

A record is one label byte followed by one image's pixels, C x H x W bytes, channel by channel
and each channel row by row (for CIFAR-10: 1 + 3 * 32 * 32 = 3073 bytes). A batch file is its
records back to back, with no header, so its length is the only structure to check; its
content is checked against a pinned SHA-256 before it is used. Nothing is ever unpickled (the
Python release of CIFAR is a pickle; this one is not).
"""

from __future__ import annotations

import os

import numpy as np

from gfalign.data import idx
from gfalign.data.errors import DataError
from gfalign.data.specs import FileSpec


def parse(data: bytes, file: FileSpec, label: str) -> np.ndarray:
    """The records of a decompressed batch, a writable uint8 array of ``file.shape``
    (records, record bytes).

    Example:
        >>> batch = FileSpec("tiny.bin", "0" * 64, (2, 3), format="raw")
        >>> parse(bytes([1, 10, 11, 0, 20, 21]), batch, "tiny.bin").tolist()
        [[1, 10, 11], [0, 20, 21]]
    """
    if len(data) != file.size:
        raise DataError(
            f"{label}: {len(data)} bytes, expected exactly {file.size} "
            f"({idx.describe(file.shape, file.dtype)})"
        )
    return np.frombuffer(data, np.uint8).reshape(file.shape).copy()


def read(path: str | os.PathLike, file: FileSpec) -> np.ndarray:
    """Read a batch file, gzipped or not (told by its content, not its name); see ``parse``."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    return parse(idx.decompress(raw, str(path)), file, str(path))


def split(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of records (N, 1 + pixels): images (N, pixels) in the stored
    C x H x W order, labels (N,); views, no copy."""
    return records[:, 1:], records[:, 0]


def encode(labels: np.ndarray, images: np.ndarray) -> bytes:
    """Records of ``labels`` (N,) and ``images`` (N, C, H, W) as a batch file's bytes (the
    inverse of ``parse`` and ``split``), for fixtures and tests.

    Example:
        >>> encode(np.array([3]), np.arange(4).reshape(1, 1, 2, 2)).hex()
        '0300010203'
    """
    labels, images = np.asarray(labels), np.asarray(images)
    if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"records need labels (N,) and images (N, ...), got {labels.shape} and {images.shape}"
        )
    low = min(labels.min(initial=0), images.min(initial=0))
    if low < 0 or max(labels.max(initial=0), images.max(initial=0)) > 255:
        raise DataError("a record stores bytes: labels and pixels must be in 0..255")
    flat = images.reshape(len(labels), -1).astype(np.uint8)
    return np.concatenate([labels.astype(np.uint8)[:, None], flat], axis=1).tobytes()
