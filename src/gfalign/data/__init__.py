"""Datasets: MNIST and Fashion-MNIST as verified tensors, plus a small synthetic one.

``load`` returns a ``Dataset`` of ``Split``s with x (N, 784) floats in [0, 1] and y (N,) int64.
The IDX files come from a directory the user names (``root=`` or ``GFALIGN_DATA``), the cache, or
the dataset's public mirrors and packages, and are checked against pinned SHA-256 sums.

Example:
    >>> from gfalign import data
    >>> dataset = data.load("mnist", validation=10_000)  # doctest: +SKIP
    >>> dataset.train.x.shape  # doctest: +SKIP
    torch.Size([50000, 784])
"""

from gfalign.data.dataset import Dataset, Split, load, synthetic
from gfalign.data.errors import DataError
from gfalign.data.files import FileReport, cache_root, fetch, verify
from gfalign.data.registry import DATASETS, FASHION_MNIST, MNIST, SPECS, get_spec, register
from gfalign.data.sources import DebianPackage, HttpMirror, LocalDirectory, NpmPackage
from gfalign.data.specs import DatasetSpec, FileSpec, Source

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SPECS",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "DebianPackage",
    "FileReport",
    "FileSpec",
    "HttpMirror",
    "LocalDirectory",
    "NpmPackage",
    "Source",
    "Split",
    "cache_root",
    "fetch",
    "get_spec",
    "load",
    "register",
    "synthetic",
    "verify",
]
