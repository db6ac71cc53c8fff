"""The project's Triton kernels (conv_elu, balance) and their launchers."""

from __future__ import annotations


def launched_kernels() -> list[tuple[object, str, object]]:
    """(module, name, kernel) of every Triton kernel the project launches: the @triton.jit (or autotuned) functions
    of kernels/conv_elu.py and kernels/balance.py whose names end in _kernel (the other @triton.jit functions are
    inlined into them)."""
    from triton.runtime import KernelInterface

    from kernels import balance, conv_elu

    return [
        (module, name, value)
        for module in (conv_elu, balance)
        for name, value in vars(module).items()
        if name.endswith("_kernel") and isinstance(value, KernelInterface)
    ]
