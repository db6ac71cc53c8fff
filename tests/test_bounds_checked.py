"""The suite's bounds check of interpreted kernels (tests/bounds_checked.py, on for every test by tests/conftest.py):
an access outside the tensors a kernel was given is an error, an access inside them is not."""

import pytest
import torch
import triton
import triton.language as tl
from bounds_checked import byte_range

from kernels.interpreter import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="checks Triton's interpreter (the lane without a GPU)")


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, stride, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    """dst[i] = src[i * stride] for i < n; src_ptr: n elements, `stride` apart; dst_ptr: n contiguous elements."""
    offs = tl.arange(0, BLOCK)
    if MASK_LOAD:
        x = tl.load(src_ptr + offs * stride, mask=offs < n, other=0.0)
    else:
        x = tl.load(src_ptr + offs * stride)
    if MASK_STORE:
        tl.store(dst_ptr + offs, x, mask=offs < n)
    else:
        tl.store(dst_ptr + offs, x)


def _copy(src, mask_load=True, mask_store=True):
    # src and dst are views into larger buffers: the lanes past their ends land in memory that torch allocated, which
    # only the view's bounds make wrong.
    dst = torch.empty(3 * len(src))[len(src) : 2 * len(src)]
    copy_kernel[(1,)](src, dst, len(src), src.stride(0), BLOCK=16, MASK_LOAD=mask_load, MASK_STORE=mask_store)
    return dst


def test_masked_accesses_inside_the_tensors_pass():
    matrix = torch.randn(10, 7)
    column = matrix[:, 3]  # strided: its lanes lie 7 elements apart
    torch.testing.assert_close(_copy(column), column, rtol=0, atol=0)


@pytest.mark.parametrize("access", ["load", "store"])
def test_an_access_past_a_tensors_end_is_an_error_naming_the_kernel(access):
    src = torch.randn(30)[10:20]
    with pytest.raises(
        triton.runtime.errors.InterpreterError, match=f"copy_kernel: a {access} of 16 active lanes has 6"
    ):
        _copy(src, mask_load=access != "load", mask_store=access != "store")


def test_lanes_straying_past_a_tensor_into_the_next_argument_are_an_error():
    # src and dst side by side in one buffer: an unmasked load's lanes past src's end land inside dst, a tensor the
    # kernel was given, yet no lane of a load from src may be there.
    buffer = torch.randn(20)
    src, dst = buffer[:10], buffer[10:]
    with pytest.raises(
        triton.runtime.errors.InterpreterError, match="copy_kernel: a load of 16 active lanes has lanes in more"
    ):
        copy_kernel[(1,)](src, dst, 10, 1, BLOCK=16, MASK_LOAD=False, MASK_STORE=True)


def test_byte_range_spans_a_views_elements():
    matrix = torch.randn(5, 7, dtype=torch.float64)
    start = matrix.data_ptr() + 2 * 8
    assert byte_range(matrix[:, 2]) == (start, start + (4 * 7 + 1) * 8)
    assert byte_range(matrix.t()) == (matrix.data_ptr(), matrix.data_ptr() + 35 * 8)
    assert byte_range(matrix[:0]) is None
