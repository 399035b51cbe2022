"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 as verified tensors, plus a small synthetic one
and a generated character-level text (``chars``).

``load`` returns a ``Dataset`` of ``Split``s with y (N,) int64 and x (N, 784) floats in [0, 1]
(MNIST, Fashion-MNIST) or (N, 3, 32, 32) images normalised per channel as biotorch does
(CIFAR-10). The files (IDX files, or CIFAR's binary record batches) come from a directory the
user names (``root=`` or ``GFALIGN_DATA``), the cache, or the dataset's public mirrors and
packages, and are checked against pinned SHA-256 sums.

Example:
    >>> from gfalign import data
    >>> dataset = data.load("mnist", validation=10_000)  # doctest: +SKIP
    >>> dataset.train.x.shape  # doctest: +SKIP
    torch.Size([50000, 784])
"""

from gfalign.data.dataset import Dataset, Split, load, read_labels, synthetic
from gfalign.data.errors import DataError
from gfalign.data.files import FileReport, cache_root, fetch, verify
from gfalign.data.registry import (
    CIFAR10,
    DATASETS,
    FASHION_MNIST,
    MNIST,
    SPECS,
    get_spec,
    register,
)
from gfalign.data.sources import (
    ArchiveMirror,
    DebianPackage,
    HttpMirror,
    LocalDirectory,
    NpmPackage,
)
from gfalign.data.specs import DatasetSpec, FileSpec, RecordBatches, Source
from gfalign.data.text import chars

__all__ = [
    "CIFAR10",
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SPECS",
    "ArchiveMirror",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "DebianPackage",
    "FileReport",
    "FileSpec",
    "HttpMirror",
    "LocalDirectory",
    "NpmPackage",
    "RecordBatches",
    "Source",
    "Split",
    "cache_root",
    "chars",
    "fetch",
    "get_spec",
    "load",
    "read_labels",
    "register",
    "synthetic",
    "verify",
]
