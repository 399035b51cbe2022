"""The peer library the tests compare against, loaded file by file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def biotorch_file(relative: str):
    """A module of the installed biotorch package loaded from its file alone: its
    ``biotorch.models`` package imports torchvision, which this test environment lacks."""
    found = importlib.util.find_spec("biotorch")
    if found is None or not found.submodule_search_locations:
        pytest.skip("biotorch is not installed (pip install --no-deps biotorch)")
    path = Path(found.submodule_search_locations[0]) / relative
    spec = importlib.util.spec_from_file_location(f"_biotorch_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
