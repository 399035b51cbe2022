"""The IDX file format of MNIST and Fashion-MNIST, gzipped or not, with every header field checked.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the elements in row-major order. A file whose header or
length disagrees with what is expected is an error naming the file, never a shorter array.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np

from gfalign.data.errors import DataError

# Type code -> element type; the multi-byte types are big-endian on disk.
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
# Real IDX files have 1 to 3 dimensions; a larger count means a file of another kind.
MAXIMUM_DIMENSIONS = 8


@dataclass(frozen=True)
class IdxHeader:
    """The decoded header of an IDX file.

    Attributes:
        dtype: element type as stored (big-endian for multi-byte types).
        shape: one size per dimension, e.g. ``(60000, 28, 28)``.
    """

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def header_bytes(self) -> int:
        """Length of the header: the magic number and one uint32 per dimension."""
        return 4 + 4 * len(self.shape)

    @property
    def total_bytes(self) -> int:
        """Length the whole file must have."""
        return self.header_bytes + math.prod(self.shape) * self.dtype.itemsize


def describe(shape: tuple[int, ...], dtype: np.dtype | str) -> str:
    """``(60000, 28, 28)`` and uint8 as ``'60000 x 28 x 28 uint8'`` for messages."""
    return " x ".join(str(size) for size in shape) + f" {np.dtype(dtype).name}"


def parse_header(data: bytes, label: str) -> IdxHeader:
    """Decode and check the magic number and dimensions at the start of ``data``.

    Args:
        data: the file's (decompressed) content, or at least its first 4 + 4 * ndim bytes.
        label: names the file in error messages.

    Returns:
        The header. Raises DataError on a bad magic number, unknown type code or short header.
    """
    if len(data) < 4:
        raise DataError(f"{label}: only {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{label}: bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero "
            "bytes; is it still gzipped or not an IDX file?)"
        )
    code, dimensions = data[2], data[3]
    if code not in DTYPES:
        raise DataError(f"{label}: unknown IDX type code 0x{code:02x}")
    if not 1 <= dimensions <= MAXIMUM_DIMENSIONS:
        raise DataError(f"{label}: IDX header declares {dimensions} dimensions")
    header_bytes = 4 + 4 * dimensions
    if len(data) < header_bytes:
        raise DataError(f"{label}: truncated inside the header ({len(data)} bytes)")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", dimensions, offset=4))
    return IdxHeader(DTYPES[code], shape)


def check(
    header: IdxHeader,
    length: int,
    label: str,
    shape: tuple[int, ...] | None = None,
    dtype: str | None = None,
) -> None:
    """Check the file length against the header, and the header against what is expected.

    Args:
        header: the decoded header.
        length: the file's (decompressed) length in bytes.
        label: names the file in error messages.
        shape: expected dimensions, e.g. ``(60000, 28, 28)``; None accepts any.
        dtype: expected element type name, e.g. ``"uint8"``; None accepts any.
    """
    if dtype is not None and header.dtype.name != np.dtype(dtype).name:
        raise DataError(f"{label}: elements are {header.dtype.name}, expected {dtype}")
    if shape is not None and header.shape != tuple(shape):
        raise DataError(
            f"{label}: wrong dimensions {describe(header.shape, header.dtype)}, "
            f"expected {describe(tuple(shape), header.dtype)}"
        )
    if length < header.total_bytes:
        raise DataError(
            f"{label}: truncated: the header declares {describe(header.shape, header.dtype)} "
            f"({header.total_bytes} bytes in all) but the file holds {length} bytes"
        )
    if length > header.total_bytes:
        raise DataError(
            f"{label}: {length - header.total_bytes} unexpected bytes after the "
            f"{describe(header.shape, header.dtype)} data"
        )


def parse(
    data: bytes,
    label: str,
    shape: tuple[int, ...] | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Parse a whole decompressed IDX file.

    Args:
        data: the file's content.
        label: names the file in error messages.
        shape, dtype: what is expected (see ``check``); None accepts any.

    Returns:
        A writable array of the header's shape in native byte order.

    Example:
        >>> parse(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]), "labels").tolist()
        [7, 9]
    """
    header = parse_header(data, label)
    check(header, len(data), label, shape, dtype)
    count = math.prod(header.shape)
    array = np.frombuffer(data, header.dtype, count, offset=header.header_bytes)
    # astype copies: the result owns writable memory in native order, as torch.from_numpy wants.
    return array.astype(header.dtype.newbyteorder("="), copy=True).reshape(header.shape)


def decompress(raw: bytes, label: str) -> bytes:
    """Return ``raw`` gunzipped when it starts with the gzip magic number, as it is otherwise."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as error:
        raise DataError(f"{label}: truncated gzip stream ({error})") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{label}: corrupt gzip stream ({error})") from None


def read(
    path: str | os.PathLike,
    shape: tuple[int, ...] | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Read an IDX file, gzipped or not (told by its content, not its name).

    Args:
        path: the file.
        shape, dtype: what is expected (see ``check``); None accepts any.

    Returns:
        The array, e.g. uint8 of shape (60000, 28, 28) for MNIST's training images.
    """
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    return parse(decompress(raw, str(path)), str(path), shape, dtype)


def encode(array: np.ndarray) -> bytes:
    """Write ``array`` as IDX bytes (the inverse of ``parse``), for fixtures and tests."""
    codes = {dtype.name: code for code, dtype in DTYPES.items()}
    dtype = np.dtype(array.dtype)
    if dtype.name not in codes:
        raise DataError(f"IDX cannot store elements of type {dtype.name}")
    header = bytes([0, 0, codes[dtype.name], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype.newbyteorder(">")).tobytes()
