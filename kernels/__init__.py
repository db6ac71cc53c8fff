"""The project's Triton kernels (conv_elu, balance) and their launchers."""

from __future__ import annotations

# Every launch compiles with Triton's floating-point fusion on: a*b + c as one FMA (one rounding, one instruction).
# That was Triton's default up to 3.9, which warns that 3.10 turns it off; pinned, a kernel computes the same, as
# fast, whichever Triton compiles it (TRITON_DEFAULT_FP_FUSION changes nothing here).
FP_FUSION = True


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
