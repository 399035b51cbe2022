import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _strict_torch():
    """Deterministic kernels and a known global seed in every test."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(1234)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's real data cache from a test."""
    monkeypatch.setenv("GFALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture
def real_mnist_dir():
    """The real MNIST files, when GFALIGN_DATA points at them (CI sets it)."""
    root = os.environ.get("GFALIGN_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("GFALIGN_DATA is not set to a directory holding MNIST")
    return root
