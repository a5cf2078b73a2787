"""Test-session setup that must happen before any test module imports triton, and a loader for bench scripts.

Without a GPU, the Triton kernels run in Triton's interpreter, which is chosen by ``TRITON_INTERPRET=1``
at triton's first import (docs/kernels.md); a GPU session leaves it unset and runs them natively.
"""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available (a lent GPU session runs them all)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def load_bench():
    """Imports ``bench/<name>.py`` (a script folder, not a package) so its logic can be tested on CPU."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
