"""CIFAR-10's binary release and biotorch's LeNet for it, on tiny files made here.

The real archive cannot be fetched in tests: every file below is written by the test in the
binary format (records of a label byte and 3 x 32 x 32 pixel bytes), under the names of the
real release, and the one mirror is a ``file://`` URL to an archive the test packs itself.
"""

import gzip
import hashlib
import io
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gfalign import data
from gfalign.config import RunConfig
from gfalign.data import SPECS, ArchiveMirror, DataError, FileSpec, RecordBatches, records
from gfalign.data.files import verify_directory
from gfalign.models import build
from gfalign.rules import ConfigError

TRAIN_RECORDS, TEST_RECORDS = (2, 3, 2, 1, 2), (3,)  # per batch file
TRAIN_NAMES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
ARCHIVE_FOLDER = "cifar-10-batches-bin"


@pytest.fixture(autouse=True)
def _no_user_directory(monkeypatch):
    monkeypatch.delenv("GFALIGN_DATA", raising=False)


def _batches(seed: int = 0, bad_label: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Labels (N,) and images (N, 3, 32, 32) of every batch file, by name."""
    generator = np.random.default_rng(seed)
    content = {}
    names = (*TRAIN_NAMES, "test_batch.bin")
    for name, count in zip(names, (*TRAIN_RECORDS, *TEST_RECORDS), strict=True):
        labels = generator.integers(0, 10, count)
        images = generator.integers(0, 256, (count, 3, 32, 32))
        content[name] = (labels, images)
    content[TRAIN_NAMES[0]][1][0, 0, 0, :2] = (0, 255)  # both ends of the pixel range
    if bad_label:
        content["test_batch.bin"][0][0] = 10
    return content


def _encoded(content) -> dict[str, bytes]:
    return {name: records.encode(*arrays) for name, arrays in content.items()}


def _spec(files: dict[str, bytes], *sources) -> data.DatasetSpec:
    """The real CIFAR-10 spec with the tiny files' record counts and checksums."""

    def pinned(name: str) -> FileSpec:
        count = len(files[name]) // 3073
        return FileSpec(name, hashlib.sha256(files[name]).hexdigest(), (count, 3073), format="raw")

    batches = RecordBatches(
        tuple(pinned(name) for name in TRAIN_NAMES), (pinned("test_batch.bin"),), (3, 32, 32)
    )
    return replace(data.CIFAR10, batches=batches, sources=tuple(sources))


def _write(directory: Path, files: dict[str, bytes], compress: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / name).write_bytes(content)
    return directory


def _archive(path: Path, files: dict[str, bytes], extra=()) -> Path:
    """A .tar.gz laid out as the real one (``cifar-10-batches-bin/<name>``), plus ``extra``
    members given as TarInfo (with their content, or None)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        meta = b"airplane\nautomobile\n"
        info = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/batches.meta.txt")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for info, content in extra:
            tar.addfile(info, None if content is None else io.BytesIO(content))
    return path


def _mirror(archive: Path, sha256: str | None = None) -> ArchiveMirror:
    digest = sha256 or hashlib.sha256(archive.read_bytes()).hexdigest()
    return ArchiveMirror(archive.as_uri(), digest, archive.stat().st_size, ARCHIVE_FOLDER)


def _expected_x(content, names) -> np.ndarray:
    """What load must give, computed here from the arrays the records were made of."""
    images = np.concatenate([content[name][1] for name in names]).astype(np.float64) / 255
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in data.CIFAR10.normalize)
    return (images - mean) / std


# ----------------------------------------------------------------------------- the format


def test_records_hold_a_label_byte_then_the_image_channel_by_channel():
    labels, images = np.array([7, 2]), np.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32) % 251
    raw = records.encode(labels, images)
    assert len(raw) == 2 * 3073 and raw[0] == 7 and raw[3073] == 2
    # pixel (channel 1, row 2, column 5) of image 0 sits at 1 + 1 * 1024 + 2 * 32 + 5
    assert raw[1 + 1024 + 64 + 5] == images[0, 1, 2, 5]
    file = FileSpec("b.bin", hashlib.sha256(raw).hexdigest(), (2, 3073), format="raw")
    pixels, read_labels = records.split(records.parse(raw, file, "b.bin"))
    assert read_labels.tolist() == [7, 2]
    assert np.array_equal(pixels.reshape(2, 3, 32, 32), images)
    with pytest.raises(DataError, match=r"b.bin: 6145 bytes, expected exactly 6146"):
        records.parse(raw[:-1], file, "b.bin")


def test_a_record_spec_must_fit_its_image():
    with pytest.raises(ValueError, match="records of 3072 bytes, but a label byte and a 3 x 32"):
        RecordBatches((FileSpec("b.bin", "0" * 64, (1, 3072), format="raw"),), (), (3, 32, 32))


# ------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["flat", "named", "unpacked", "nested", "gzipped"])
def test_load_keeps_images_chw_normalised_as_biotorch(tmp_path, monkeypatch, layout):
    content = _batches()
    files = _encoded(content)
    monkeypatch.setitem(SPECS, "cifar10", _spec(files))
    where = {
        "flat": tmp_path,
        "named": tmp_path / "cifar10",
        "unpacked": tmp_path / ARCHIVE_FOLDER,
        "nested": tmp_path / "cifar10" / ARCHIVE_FOLDER,
        "gzipped": tmp_path,
    }[layout]
    _write(where, files, compress=layout == "gzipped")
    dataset = data.load("cifar10", root=tmp_path, validation=3, dtype=torch.float64, quiet=True)
    train, test = sum(TRAIN_RECORDS), sum(TEST_RECORDS)
    assert dataset.train.x.shape == (train - 3, 3, 32, 32)
    assert dataset.validation.x.shape == (3, 3, 32, 32)
    assert dataset.test.x.shape == (test, 3, 32, 32)
    labels = np.concatenate([content[name][0] for name in TRAIN_NAMES])
    assert dataset.train.y.tolist() + dataset.validation.y.tolist() == labels.tolist()
    assert dataset.test.y.tolist() == content["test_batch.bin"][0].tolist()
    expected = _expected_x(content, TRAIN_NAMES)
    got = torch.cat([dataset.train.x, dataset.validation.x]).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        dataset.test.x.numpy(), _expected_x(content, ["test_batch.bin"]), rtol=0, atol=1e-12
    )


def test_the_fast_cache_gives_the_same_tensors(tmp_path, monkeypatch):
    files = _encoded(_batches())
    monkeypatch.setitem(SPECS, "cifar10", _spec(files))
    _write(tmp_path, files)
    first = data.load("cifar10", root=tmp_path, quiet=True)
    monkeypatch.setattr("gfalign.data.dataset._parse", lambda *a: pytest.fail("parsed again"))
    again = data.load("cifar10", root=tmp_path, quiet=True)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.y, again.test.y)


def test_a_damaged_batch_is_refused_by_name(tmp_path, monkeypatch):
    files = _encoded(_batches())
    monkeypatch.setitem(SPECS, "cifar10", _spec(files))
    short = dict(files, **{"data_batch_3.bin": files["data_batch_3.bin"][:-7]})
    flipped = bytearray(files["test_batch.bin"])
    flipped[100] ^= 1
    short["test_batch.bin"] = bytes(flipped)
    reports = verify_directory(SPECS["cifar10"], _write(tmp_path, short))
    status = {report.name: (report.status, report.detail) for report in reports}
    assert status["data_batch_1.bin"] == ("good", "")
    assert status["data_batch_3.bin"][0] == "bad"
    assert (
        "only 6139 bytes, expected exactly 6146 (2 x 3073 uint8)" in status["data_batch_3.bin"][1]
    )
    assert "does not match the pinned" in status["test_batch.bin"][1]
    with pytest.raises(DataError, match=r"(?s)cannot obtain the cifar10 files.*put the 6 files"):
        data.load("cifar10", root=tmp_path, quiet=True)


def test_a_label_out_of_range_is_an_error(tmp_path, monkeypatch):
    files = _encoded(_batches(bad_label=True))
    monkeypatch.setitem(SPECS, "cifar10", _spec(files))
    _write(tmp_path, files)
    with pytest.raises(DataError, match="test_batch.bin: label 10 out of range for 10 classes"):
        data.load("cifar10", root=tmp_path, quiet=True)


def test_read_labels_counts_both_splits(tmp_path, monkeypatch):
    content = _batches()
    files = _encoded(content)
    spec = _spec(files)
    train, test = data.read_labels(spec, _write(tmp_path, files))
    assert train.tolist() == np.concatenate([content[n][0] for n in TRAIN_NAMES]).tolist()
    assert test.tolist() == content["test_batch.bin"][0].tolist()


# ------------------------------------------------------------------------ from the archive


def test_the_archive_is_fetched_verified_and_only_its_batches_extracted(tmp_path, monkeypatch):
    content = _batches()
    files = _encoded(content)
    escape = tarfile.TarInfo("../../escaped.bin")
    escape.size = 4
    absolute = tarfile.TarInfo(str(tmp_path / "absolute.bin"))
    absolute.size = 4
    (tmp_path / "mirror" / "deep").mkdir(parents=True)
    archive = _archive(
        tmp_path / "mirror" / "deep" / "cifar-10-binary.tar.gz",
        files,
        extra=[(escape, b"evil"), (absolute, b"evil")],
    )
    monkeypatch.setitem(SPECS, "cifar10", _spec(files, _mirror(archive)))
    dataset = data.load("cifar10", quiet=True)
    assert dataset.train.x.shape == (sum(TRAIN_RECORDS), 3, 32, 32)
    cache = data.cache_root() / "cifar10"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        [*files, "cifar10.pt"]
    )
    assert not list(tmp_path.rglob("escaped.bin")) and not (tmp_path / "absolute.bin").exists()
    assert not list(data.cache_root().parent.rglob("escaped.bin"))


def test_an_archive_that_does_not_match_its_pin_is_not_opened(tmp_path, monkeypatch):
    files = _encoded(_batches())
    archive = _archive(tmp_path / "cifar-10-binary.tar.gz", files)
    monkeypatch.setitem(SPECS, "cifar10", _spec(files, _mirror(archive, sha256="0" * 64)))
    monkeypatch.setattr(
        "gfalign.data.sources.extract_members", lambda *a: pytest.fail("opened the archive")
    )
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: SHA-256 \w+ does not match"):
        data.load("cifar10", quiet=True)
    assert not [p for p in (data.cache_root() / "cifar10").iterdir() if p.suffix == ".bin"]


def test_a_linked_member_is_refused(tmp_path, monkeypatch):
    files = _encoded(_batches())
    rest = {name: content for name, content in files.items() if name != "data_batch_2.bin"}
    link = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/data_batch_2.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _archive(tmp_path / "cifar-10-binary.tar.gz", rest, extra=[(link, None)])
    monkeypatch.setitem(SPECS, "cifar10", _spec(files, _mirror(archive)))
    with pytest.raises(DataError, match="data_batch_2.bin in cifar-10-binary.tar.gz is not a reg"):
        data.load("cifar10", quiet=True)


def test_the_real_spec_pins_the_binary_release():
    spec = data.CIFAR10
    assert [file.name for file in spec.files] == [*TRAIN_NAMES, "test_batch.bin"]
    assert spec.examples == (50_000, 10_000) and spec.example_shape == (3, 32, 32)
    for file in spec.files:
        assert file.format == "raw" and file.size == 10_000 * 3073
        assert re.fullmatch("[0-9a-f]{64}", file.sha256), file.sha256  # hashlib's form
    assert len({file.sha256 for file in spec.files}) == 6
    (mirror,) = spec.sources
    assert mirror.url.endswith("/cifar-10-binary.tar.gz") and mirror.size == 170_052_171
    assert mirror.directory == ARCHIVE_FOLDER and re.fullmatch("[0-9a-f]{64}", mirror.sha256)
    assert len(spec.classes) == 10 and spec.classes[0] == "airplane"


# ------------------------------------------------------------------- runs and the model


def test_run_configurations_take_the_dataset_shape():
    assert RunConfig(dataset="cifar10", hidden=(100,)).sizes == (3072, 100, 10)
    assert RunConfig().sizes == (784, 800, 800, 10)
    RunConfig(dataset="cifar10", model="lenet5-cifar", rule="dfa")
    with pytest.raises(ConfigError, match=r"model 'lenet5' takes inputs of shape \[1, 32, 32\]; "):
        RunConfig(dataset="cifar10", model="lenet5")
    with pytest.raises(ConfigError, match=r"'lenet5-cifar' takes inputs of shape \[3, 32, 32\]"):
        RunConfig(dataset="mnist", model="lenet5-cifar")
    with pytest.raises(ConfigError, match=r"cifar10's inputs are not in \[0, 1\]"):
        RunConfig(dataset="cifar10", objective="autoencoder", rule="dfa")


def _biotorch_lenet_cifar() -> nn.Sequential:
    """biotorch's LeNetCIFAR (biotorch/models/le_net.py), transcribed layer by layer."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3),
        nn.ReLU(),
        nn.AvgPool2d(4),  # F.avg_pool2d(out, out.size()[3]) on its 4 x 4 map
        nn.Flatten(),
        nn.Linear(128, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).double()


def test_lenet5_cifar_is_biotorchs_lenet_cifar():
    net = build("lenet5-cifar", seed=0, dtype=torch.float64)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert net(x).shape == (2, 10)
    assert net.pre_shapes == ((32, 30, 30), (64, 13, 13), (128, 4, 4), (256,), (10,))
    assert net.post_shapes == ((3, 32, 32), (32, 15, 15), (64, 6, 6), (128,), (256,))
    reference = _biotorch_lenet_cifar()
    ours = list(net.parameters())
    theirs = list(reference.parameters())
    assert [tuple(p.shape) for p in ours] == [tuple(p.shape) for p in theirs]
    with torch.no_grad():
        for mine, other in zip(ours, theirs, strict=True):
            other.copy_(mine)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(net.forward_cache(x).pre[-1], reference(x), rtol=0, atol=1e-12)


def test_cli_info_and_verify_read_the_binary_batches(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gfalign.cli import main as cli

    content = _batches()
    files = _encoded(content)
    monkeypatch.setitem(SPECS, "cifar10", _spec(files))
    directory = _write(tmp_path / "cifar", files)
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "info", "cifar10", "--data-dir", str(directory)])
    assert result.exit_code == 0, result.output
    train = np.bincount(np.concatenate([content[n][0] for n in TRAIN_NAMES]), minlength=10)
    expected = f"train: {sum(TRAIN_RECORDS)} examples; per class " + " ".join(map(str, train))
    assert expected in result.output and "test: 3 examples" in result.output
    result = runner.invoke(cli, ["data", "verify", "cifar10", "--data-dir", str(directory)])
    assert result.exit_code == 0 and result.output.count(" good ") == 6, result.output
    (directory / "test_batch.bin").write_bytes(files["test_batch.bin"][:-1])  # truncated
    result = runner.invoke(cli, ["data", "info", "cifar10", "--data-dir", str(directory)])
    assert "no class counts (test_batch.bin is" in result.output
    result = runner.invoke(cli, ["data", "verify", "cifar10", "--data-dir", str(directory)])
    assert result.exit_code != 0 and "1 of 6 files are bad or missing" in result.output
