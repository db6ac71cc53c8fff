"""The project's Triton kernels (conv_elu, balance) and their launchers."""

from __future__ import annotations

import functools

import torch

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


def on_the_inputs_device(launcher):
    """Run `launcher` (a host launcher whose first argument is a tensor) with that tensor's CUDA device current.
    Triton compiles for and launches on the current device, not on the one its pointers lead to: a tensor on cuda:1
    given by a process whose current device is 0 (the Python API, a model moved with .to("cuda:1")) would have its
    kernels run on GPU 0 and its CUDA graph capture there. FlashAttention's and Liger-Kernel's launchers guard the
    same way. CPU tensors (the interpreter), and those on the current device (the common case: no context entered,
    a launch's host time matters for small layers), run as they are."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        if not first.is_cuda or first.device.index == torch.cuda.current_device():
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return launch
