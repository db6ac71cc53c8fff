"""Test lanes (DESIGN.md section 5): without a GPU the Triton kernels run through the interpreter, which must be
switched on before any @triton.jit function is defined; tests marked `cuda` are skipped."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the parity tests run on: the GPU when there is one (compiled kernels), else the CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
