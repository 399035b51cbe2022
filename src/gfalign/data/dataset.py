"""Datasets as tensors: ``load`` for MNIST, Fashion-MNIST and CIFAR-10, ``synthetic`` for tests."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gfalign.data import idx, records
from gfalign.data.errors import DataError
from gfalign.data.files import fetch_into_cache, named_directory
from gfalign.data.progress import progress_bar
from gfalign.data.registry import get_spec
from gfalign.data.sources import find_file
from gfalign.data.specs import DatasetSpec
from gfalign.data.tensors import KEYS, read_tensors, write_tensors

logger = logging.getLogger("gfalign.data")


@dataclass(frozen=True, eq=False)
class Split:
    """Examples and their labels, one row per example.

    Attributes:
        x: (N, 784) float inputs in [0, 1] (MNIST's pixels, flattened row by row), images
            (N, C, H, W) (CIFAR-10's, normalised per channel, or any dataset's for a model that
            wants them, ``Dataset.shaped``).
        y: (N,) int64 class labels.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"a split needs x of shape (N, features) or (N, C, H, W) and y of shape (N,); "
                f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )

    def shaped(
        self,
        shape: tuple[int, ...],
        *,
        resize: int | None = None,
        normalize: tuple[float, float] | None = None,
    ) -> Split:
        """The examples as ``shape`` per example (e.g. (1, 28, 28) from 784 pixels), resized
        to ``resize`` x ``resize`` (bilinear with half-pixel centres, as PIL resizes images) and
        normalised to ``(x - mean) / std``; a new tensor, computed once."""
        n = len(self)
        x = self.x.reshape(n, *shape)
        if resize is not None:
            if x.dim() != 4:
                raise DataError(f"only images (N, C, H, W) can be resized, not {tuple(x.shape)}")
            x = torch.nn.functional.interpolate(
                x, size=(resize, resize), mode="bilinear", align_corners=False
            )
        if normalize is not None:
            mean, std = normalize
            x = (x - mean) / std
        return Split(x.contiguous(), self.y)

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Split:
        """The same examples on ``device``, with inputs of ``dtype`` (labels stay int64)."""
        return Split(self.x.to(device=device, dtype=dtype), self.y.to(device=device))

    def subset(self, n: int) -> Split:
        """The first ``n`` examples (views, no copy)."""
        if not 0 <= n <= len(self):
            raise DataError(f"cannot take {n} examples from a split of {len(self)}")
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named dataset's splits.

    Attributes:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"synthetic"``.
        train: the training examples (less the validation ones, when held out).
        test: the test examples.
        validation: examples held out of the end of the training set, or None.
    """

    name: str
    train: Split
    test: Split
    validation: Split | None = None

    def shaped(
        self,
        shape: tuple[int, ...],
        *,
        resize: int | None = None,
        normalize: tuple[float, float] | None = None,
    ) -> Dataset:
        """Every split's examples shaped, resized and normalised for a model (``Split.shaped``).

        Example:
            >>> images = synthetic(10, 5).shaped((1, 28, 28), resize=32)
            >>> images.train.x.shape
            torch.Size([10, 1, 32, 32])
        """

        def shape_split(split: Split) -> Split:
            return split.shaped(shape, resize=resize, normalize=normalize)

        validation = None if self.validation is None else shape_split(self.validation)
        return replace(
            self, train=shape_split(self.train), test=shape_split(self.test), validation=validation
        )

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """Every split on ``device``, with inputs of ``dtype``."""
        validation = self.validation.to(device, dtype) if self.validation is not None else None
        return replace(
            self,
            train=self.train.to(device, dtype),
            test=self.test.to(device, dtype),
            validation=validation,
        )


def load(
    name: str = "mnist",
    *,
    root: str | os.PathLike | None = None,
    validation: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    download: bool = True,
    quiet: bool = False,
) -> Dataset:
    """Load a dataset as tensors, fetching and verifying its files the first time.

    Pixels p in 0..255 become x = p / 255 in [0, 1], normalised per channel to
    ``(p / 255 - mean_c) / std_c`` for a dataset whose spec says so (CIFAR-10). The first load
    parses the verified files and writes a fast cache that later loads read in well under a
    second.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (or a name added to ``SPECS``).
        root: a directory holding the files, gzipped or not (or ``root/<name>``, or one of the
            spec's ``folders``); default ``$GFALIGN_DATA``, then the cache and the dataset's
            sources (see ``fetch``).
        validation: hold out the last ``validation`` training examples as
            ``Dataset.validation``; 0 keeps the whole training set (the paper's train/test).
        device: where the tensors go.
        dtype: floating type of the inputs x; labels y are int64.
        download: False allows only files already on disk.
        quiet: no progress bars.

    Returns:
        A Dataset: train x (60000 - validation, 784), test x (10000, 784) for MNIST and
        Fashion-MNIST; train x (50000 - validation, 3, 32, 32), test x (10000, 3, 32, 32) for
        CIFAR-10.

    Example:
        >>> data = load("mnist", validation=10_000)  # doctest: +SKIP
        >>> data.train.x.shape, data.validation.x.shape  # doctest: +SKIP
        (torch.Size([50000, 784]), torch.Size([10000, 784]))
    """
    spec = get_spec(name)
    if not dtype.is_floating_point:
        raise DataError(f"inputs need a floating dtype, not {dtype}")
    tensors, attempts = None, []
    # The order of docs/reference/data.md: the user's directory (verified on every load), the
    # cache (the fast tensor file, else the IDX files), the sources. The fast file records the
    # pinned checksums of the files it was parsed from, so once the user's files verify against
    # the same checksums it holds their content, and parsing them again is skipped.
    with progress_bar(quiet) as progress:
        directory = named_directory(spec, root, progress, attempts)
        tensors = read_tensors(spec)
        if tensors is None and directory is None:
            directory = fetch_into_cache(spec, progress, download=download, attempts=attempts)
    if tensors is None:
        tensors = _parse(spec, directory)
        try:
            write_tensors(spec, tensors)
        except OSError as error:
            logger.warning("cannot write the fast cache for %s (%s)", spec.name, error)
    train_images, train_labels, test_images, test_labels = (tensors[key] for key in KEYS)
    kept = train_images.shape[0] - validation
    if validation < 0 or kept <= 0:
        raise DataError(
            f"validation must be 0 to {train_images.shape[0] - 1} examples, not {validation}"
        )
    held_out = None
    if validation:
        held_out = _split(spec, train_images[kept:], train_labels[kept:], device, dtype)
    return Dataset(
        name=spec.name,
        train=_split(spec, train_images[:kept], train_labels[:kept], device, dtype),
        test=_split(spec, test_images, test_labels, device, dtype),
        validation=held_out,
    )


def _split(
    spec: DatasetSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Split:
    """uint8 (N, C * H * W) pixels and (N,) labels as a Split of floats in [0, 1] (or
    normalised, for a spec that says so) of one example's ``spec.example_shape``, and int64."""
    # Moving uint8 before converting sends a quarter of the bytes to an accelerator.
    x = images.to(device).to(dtype).div_(255).view(len(images), *spec.example_shape)
    if spec.normalize is not None:
        means, stds = (
            torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)  # (C, 1, 1)
            for values in spec.normalize
        )
        x = x.view(len(images), *spec.image_shape).sub_(means).div_(stds)
        x = x.view(len(images), *spec.example_shape)
    return Split(x, labels.to(device=device, dtype=torch.int64))


def _parse(spec: DatasetSpec, directory: Path) -> dict[str, torch.Tensor]:
    """Read the dataset's files in ``directory`` as uint8 tensors: images flattened to
    (N, C * H * W) (784 for MNIST), labels (N,), keyed by ``KEYS``."""
    if spec.batches is not None:
        return _parse_batches(spec, directory)
    tensors = {}
    for key, file in zip(KEYS, spec.files, strict=True):
        path = _path(directory, file)
        array = idx.read(path, file.shape, file.dtype)
        tensor = torch.from_numpy(array)
        if key.endswith("images"):
            tensor = tensor.reshape(tensor.shape[0], -1)
        else:
            _check_labels(array, path, spec)
        tensors[key] = tensor
    return tensors


def _parse_batches(spec: DatasetSpec, directory: Path) -> dict[str, torch.Tensor]:
    """The record batches of each split, concatenated in order (see ``gfalign.data.records``)."""
    tensors = {}
    for split, files in (("train", spec.batches.train), ("test", spec.batches.test)):
        images, labels = [], []
        for file in files:
            path = _path(directory, file)
            batch_images, batch_labels = records.split(records.read(path, file))
            _check_labels(batch_labels, path, spec)
            images.append(batch_images)
            labels.append(batch_labels)
        tensors[f"{split}_images"] = torch.from_numpy(np.concatenate(images))
        tensors[f"{split}_labels"] = torch.from_numpy(np.concatenate(labels))
    return tensors


def _path(directory: Path, file) -> Path:
    path = find_file(directory, file)
    if path is None:
        raise DataError(f"{directory}: no {file.name}[.gz]")
    return path


def _check_labels(labels: np.ndarray, path: Path, spec: DatasetSpec) -> None:
    if labels.size and int(labels.max()) >= len(spec.classes):
        raise DataError(
            f"{path}: label {int(labels.max())} out of range for {len(spec.classes)} classes"
        )


def read_labels(spec: DatasetSpec, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The training and test labels of the dataset's files in ``directory`` (verified or not:
    the caller checks them first), for counts and summaries.

    Raises:
        DataError: a file is missing or does not parse.
    """
    if spec.batches is None:
        return (
            idx.read(_path(directory, spec.train_labels), spec.train_labels.shape),
            idx.read(_path(directory, spec.test_labels), spec.test_labels.shape),
        )
    return tuple(
        np.concatenate(
            [records.split(records.read(_path(directory, file), file))[1] for file in files]
        )
        for files in (spec.batches.train, spec.batches.test)
    )


def synthetic(
    n_train: int = 1000,
    n_test: int = 200,
    *,
    seed: int = 0,
    features: int = 784,
    classes: int = 10,
    noise: float = 0.3,
    validation: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """A small learnable dataset for tests and demos, shaped like MNIST.

    Each class c has a random prototype p_c in [0, 1]^features; an example of class y is
    x = clamp(p_y + noise * z, 0, 1) with z standard normal, so a linear classifier can learn it.

    Args:
        n_train, n_test: examples in each split (validation ones come out of n_train).
        seed: the same seed gives the same dataset.
        features: input size (784 like MNIST).
        classes: number of classes.
        noise: standard deviation of the noise around each prototype.
        validation: hold out the last ``validation`` training examples.
        device, dtype: as for ``load``.

    Returns:
        A Dataset named ``"synthetic"``.

    Example:
        >>> len(synthetic(100, 20).train)
        100
    """
    if not 0 <= validation < n_train:
        raise DataError(f"validation must be 0 to {n_train - 1} examples, not {validation}")
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(classes, features, generator=generator)  # (C, features)

    def draw(count: int) -> Split:
        labels = torch.randint(classes, (count,), generator=generator)
        noisy = prototypes[labels] + noise * torch.randn(count, features, generator=generator)
        return Split(noisy.clamp_(0, 1).to(device=device, dtype=dtype), labels.to(device))

    train, test = draw(n_train), draw(n_test)
    kept = n_train - validation
    held_out = None
    if validation:
        held_out = Split(train.x[kept:], train.y[kept:])
    return Dataset("synthetic", train.subset(kept), test, held_out)
