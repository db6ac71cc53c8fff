"""What the kernels do differently under Triton's interpreter (TRITON_INTERPRET=1, the CPU test lane)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
