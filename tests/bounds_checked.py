"""Out-of-bounds loads and stores of interpreted kernels, made errors.

Triton's interpreter reads and writes whatever address a kernel computes: it checks no bounds (docs/DESIGN.md section
6). A load that lacks its mask then reads the memory next to a tensor, and where the loaded values are masked out or
multiplied by 0 later, every parity test still passes; compiled, the same load may read past the end of an allocation
and fault. `bounds_checked()` checks the lanes a load or store leaves active against the byte ranges of the running
kernel's tensor arguments: every active lane of one access must lie in one of them (each access of this project's
kernels offsets one tensor's pointer), else it is an OutOfBounds error naming the kernel. So a lane that strays past
its tensor into another argument's range (torch may place two allocations side by side) is an error too; an access
whose every lane lands in another argument is not seen.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter

# What of Triton's interpreter this wraps (not its public API; Triton 3.6 to 3.9 have them all).
INTERNALS = (
    "GridExecutor._init_args_hst",
    "interpreter_builder.create_masked_load",
    "interpreter_builder.create_masked_store",
    "_get_np_dtype",
)


def missing_internals() -> list[str]:
    """The INTERNALS this Triton's interpreter lacks (a Triton that renamed them needs this module updated)."""
    missing = []
    for name in INTERNALS:
        owner, _, attribute = name.rpartition(".")
        if not hasattr(getattr(interpreter, owner) if owner else interpreter, attribute):
            missing.append(name)
    return missing


class OutOfBounds(AssertionError):
    """An interpreted kernel loaded or stored outside every tensor it was given."""


def byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    """[start, end) of the bytes tensor `t` spans (any strides, views included); None when it is empty."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


@contextlib.contextmanager
def bounds_checked():
    """Within the block, every interpreted kernel launch has its loads and stores checked (see the module's doc)."""
    launch = {"kernel": None, "ranges": []}
    executor, builder = interpreter.GridExecutor, interpreter.interpreter_builder
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args_recorded(self, args_dev, kwargs):
        # The host copies are the tensors the kernel's pointers point into (a CPU tensor is its own host copy).
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        tensors = [arg for arg in [*args_hst, *kwargs_hst.values()] if isinstance(arg, torch.Tensor)]
        launch["kernel"] = self.fn.__name__
        launch["ranges"] = [span for span in map(byte_range, tensors) if span is not None]
        return args_hst, kwargs_hst

    def check(ptrs, mask, access: str):
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        if addresses.size == 0:
            return
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        first, last = int(addresses.min()), int(addresses.max()) + itemsize
        if any(start <= first and last <= end for start, end in launch["ranges"]):
            return  # all lanes in one tensor, at the cost of a min and a max
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in launch["ranges"]:
            inside |= (addresses >= np.uint64(start)) & (addresses + np.uint64(itemsize) <= np.uint64(end))
        where = (
            f"{(~inside).sum()} outside every tensor argument"
            if not inside.all()
            else "lanes in more than one tensor argument (one strayed past its tensor into another)"
        )
        raise OutOfBounds(
            f"{launch['kernel']}: a {access} of {addresses.size} active lanes has {where} (a missing or too wide mask)"
        )

    def load_checked(ptrs, mask, other, *args):
        check(ptrs, mask, "load")
        return load(ptrs, mask, other, *args)

    def store_checked(ptrs, value, mask, *args):
        check(ptrs, mask, "store")
        return store(ptrs, value, mask, *args)

    executor._init_args_hst = init_args_recorded
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    try:
        yield
    finally:
        executor._init_args_hst = init_args
        builder.create_masked_load, builder.create_masked_store = load, store
