"""What the kernels do differently under Triton's interpreter (TRITON_INTERPRET=1, the CPU test lane)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on `device`: CUDA ones compiled, any under the interpreter."""
    return device.type == "cuda" or INTERPRET


def device_unsupported(device: torch.device) -> str | None:
    """Why the kernels cannot take tensors on `device` (a phrase for an error message), or None if they can."""
    if runs_on(device):
        return None
    return f"x is on {device.type}; expected a CUDA tensor (or TRITON_INTERPRET=1 to run the kernels on the CPU)"


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x rounded to nearest-even in `dtype`. The interpreter's float32 -> bfloat16 cast truncates, so
    there the rounding is done on the bits first (bf16 is the top half of a float32; finite values only); compiled,
    this is the plain cast, which rounds to nearest."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)
