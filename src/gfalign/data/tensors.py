"""The fast cache: a dataset's four arrays as one ``torch.save`` file, keyed by their checksums.

Parsing and verifying the dataset's files takes a second or more; this file loads MNIST in tens
of milliseconds. Images stay uint8 (a quarter of float32's size), flattened to (N, C * H * W),
and become floats on load. The file records the SHA-256 of the files it was built from, so a
changed dataset spec makes it stale and it is rebuilt rather than trusted.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from gfalign.data.files import cache_directory
from gfalign.data.specs import DatasetSpec

logger = logging.getLogger("gfalign.data")

FORMAT = 1
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def tensor_path(spec: DatasetSpec) -> Path:
    """``<cache root>/<name>/<name>.pt``."""
    return cache_directory(spec) / f"{spec.name}.pt"


def _checksums(spec: DatasetSpec) -> dict[str, str]:
    return {file.name: file.sha256 for file in spec.files}


def _expected_shapes(spec: DatasetSpec) -> dict[str, tuple[int, ...]]:
    """Images flattened to (N, C * H * W) (784 for MNIST); labels (N,)."""
    (train, test), width = spec.examples, math.prod(spec.image_shape)
    return {
        "train_images": (train, width),
        "train_labels": (train,),
        "test_images": (test, width),
        "test_labels": (test,),
    }


def read_tensors(spec: DatasetSpec) -> dict[str, torch.Tensor] | None:
    """The four uint8 tensors from the fast cache, or None when it is absent, unreadable or stale.

    Returns:
        ``train_images`` (N, C * H * W), ``train_labels`` (N,), ``test_images`` (M, C * H * W),
        ``test_labels`` (M,), all uint8 on the CPU.
    """
    path = tensor_path(spec)
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is only a stale cache, rebuilt from the IDX
        logger.info("rebuilding %s: cannot read it (%s)", path, error)
        return None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        return None
    if content.get("checksums") != _checksums(spec):
        logger.info("rebuilding %s: built from other files", path)
        return None
    tensors = {}
    for key, shape in _expected_shapes(spec).items():
        tensor = content.get(key)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
            return None
        if tuple(tensor.shape) != shape:
            return None
        tensors[key] = tensor
    return tensors


def write_tensors(spec: DatasetSpec, tensors: dict[str, torch.Tensor]) -> Path:
    """Save the four uint8 tensors (see ``read_tensors``) atomically; return the file's path."""
    path = tensor_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"format": FORMAT, "name": spec.name, "checksums": _checksums(spec)}
    content.update({key: tensors[key].contiguous() for key in KEYS})
    # A temporary file renamed into place: a reader never sees half a file, two writers never mix.
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(content, handle)
        os.chmod(temporary, 0o644)  # mkstemp's 0o600 would hide a shared cache from other users
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
