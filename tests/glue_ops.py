"""The PyTorch work around the Triton kernels, watched: the kernels stubbed so that they launch nothing, and every
tensor a PyTorch op computes recorded. Each such op is one more launch per call on a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import launched_kernels


class _LaunchNothing:
    """Stands in for a kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels(monkeypatch) -> None:
    """Every kernel of kernels/ launches nothing (their outputs stay uninitialised) until the test ends."""
    for module, name, _ in launched_kernels():
        monkeypatch.setattr(module, name, _LaunchNothing())


@dataclass(frozen=True)
class Computed:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class ComputedTensors(TorchDispatchMode):
    """Records the op, shape and dtype of every tensor a PyTorch op computes (not views, not bare allocations)."""

    def __init__(self):
        super().__init__()
        self.results: list[Computed] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_tensor(out) and not func.is_view and not func._schema.name.startswith("aten::empty"):
            self.results.append(Computed(func._schema.name, tuple(out.shape), out.dtype))
        return out
