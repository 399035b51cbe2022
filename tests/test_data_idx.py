"""The IDX parser: a malformed header or length is an error naming the file, never short data."""

import gzip
import hashlib

import numpy as np
import pytest
import torch

from gfalign.data import DataError, FileSpec, idx
from gfalign.data.files import check_file
from gfalign.data.progress import progress_bar

IMAGES = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize(
    "array",
    [
        IMAGES,
        np.array([7, 0, 9], dtype=np.uint8),
        np.array([[-3, 5]], dtype=np.int8),
        np.array([[1, -2], [300, 4]], dtype=np.int16),
        np.array([1, -70000], dtype=np.int32),
        np.array([0.5, -1.25], dtype=np.float32),
        np.array([1e-300], dtype=np.float64),
    ],
)
def test_round_trip_every_type(array):
    parsed = idx.parse(idx.encode(array), "file")
    assert parsed.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(parsed, array)
    # Writable and native: torch takes it without a warning (warnings are errors here).
    assert torch.from_numpy(parsed).shape == array.shape


def test_header_bytes_are_big_endian():
    data = idx.encode(IMAGES)
    assert data[:4] == bytes([0, 0, 0x08, 3])
    assert data[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert len(data) == 16 + IMAGES.size


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "too short for an IDX header"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "bad magic number 0x1f8b0800"),
        (b"\x00\x01\x08\x01" + bytes(8), "bad magic number"),
        (b"\x00\x00\x0a\x01" + bytes(8), "unknown IDX type code 0x0a"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated inside the header"),
    ],
)
def test_bad_header(data, message):
    with pytest.raises(DataError) as error:
        idx.parse(data, "labels.idx")
    assert str(error.value).startswith("labels.idx: ")
    assert message in str(error.value)


def test_truncated_data_names_the_file_and_both_lengths():
    data = idx.encode(IMAGES)[:-5]
    with pytest.raises(DataError) as error:
        idx.parse(data, "train-images-idx3-ubyte")
    message = str(error.value)
    assert message.startswith("train-images-idx3-ubyte: truncated")
    assert "2 x 3 x 4 uint8" in message
    assert f"{len(data) + 5} bytes in all" in message
    assert f"holds {len(data)} bytes" in message


def test_extra_bytes_are_an_error():
    with pytest.raises(DataError, match="3 unexpected bytes after"):
        idx.parse(idx.encode(IMAGES) + b"abc", "file")


def test_wrong_dimensions_against_the_expected_shape():
    with pytest.raises(DataError, match=r"wrong dimensions 2 x 3 x 4 uint8, expected 2 x 12"):
        idx.parse(idx.encode(IMAGES), "file", shape=(2, 12))
    with pytest.raises(DataError, match="wrong dimensions"):
        idx.parse(idx.encode(IMAGES), "file", shape=(3, 3, 4))


def test_wrong_element_type():
    with pytest.raises(DataError, match="elements are int16, expected uint8"):
        idx.parse(idx.encode(IMAGES.astype(np.int16)), "file", dtype="uint8")


def test_read_plain_and_gzipped_files_by_content(tmp_path):
    plain = tmp_path / "images"
    plain.write_bytes(idx.encode(IMAGES))
    # A gzipped file without .gz in its name is still recognised by its magic number.
    zipped = tmp_path / "images-without-suffix"
    zipped.write_bytes(gzip.compress(idx.encode(IMAGES)))
    for path in (plain, zipped):
        np.testing.assert_array_equal(idx.read(path, shape=(2, 3, 4), dtype="uint8"), IMAGES)


def test_read_truncated_or_corrupt_gzip(tmp_path):
    compressed = gzip.compress(idx.encode(IMAGES))
    path = tmp_path / "images.gz"
    path.write_bytes(compressed[:-12])
    with pytest.raises(DataError, match=r"images.gz: truncated gzip stream"):
        idx.read(path)
    path.write_bytes(compressed[:10] + b"\xff" * 20 + compressed[30:])
    with pytest.raises(DataError, match=r"images.gz: (corrupt|truncated) gzip stream"):
        idx.read(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing-here: cannot read"):
        idx.read(tmp_path / "nothing-here")


# The streaming check used on downloads must agree with the whole-file parser.


def _spec(array: np.ndarray) -> FileSpec:
    return FileSpec("images", hashlib.sha256(idx.encode(array)).hexdigest(), array.shape)


def _check(path, file):
    with progress_bar(quiet=True) as progress:
        check_file(path, file, path.name, progress)


def test_streaming_check_accepts_plain_gzip_and_multi_member_gzip(tmp_path):
    data = idx.encode(IMAGES)
    file = _spec(IMAGES)
    variants = {
        "plain": data,
        "gzip": gzip.compress(data),
        "members": gzip.compress(data[:7]) + gzip.compress(data[7:]),
    }
    for name, content in variants.items():
        path = tmp_path / name
        path.write_bytes(content)
        _check(path, file)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda data: gzip.compress(data)[:-12], "truncated gzip stream"),
        (lambda data: gzip.compress(data[:-1]), "truncated: the header declares"),
        (lambda data: data + b"x", "longer than the 40 bytes expected"),
        (lambda data: gzip.compress(data) + b"garbage!", "corrupt gzip stream"),
        (lambda data: data[:-1] + b"\x01", "does not match the pinned"),
        (lambda data: idx.encode(IMAGES.reshape(2, 12)), "wrong dimensions"),
    ],
)
def test_streaming_check_rejects(tmp_path, content, message):
    path = tmp_path / "downloaded"
    path.write_bytes(content(idx.encode(IMAGES)))
    with pytest.raises(DataError, match=message):
        _check(path, _spec(IMAGES))
