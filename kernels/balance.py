"""BEGAN's balance step as two launches forward and one backward: the L1 reconstruction losses of the real and the
fake pair, L_D, L_G, the k_t update and the convergence measure M, all on the device.

Forward: `_l1_partial_sums_kernel` (a fixed grid of programs, each reducing a grid-strided share of both pairs to
two float32 partial sums) then `_balance_finalize_kernel` (one program sums the partials in a fixed order and
computes the statistics). Two stages and no float atomics, so a result is bit-identical from run to run.
Backward: `_l1_grad_kernel`, elementwise, reading the upstream gradients from the device (no host sync).

Layout: the four tensors share one shape and one dtype (float32, bfloat16 or float16) and are all contiguous or
all channels_last-contiguous; their storage is then one dense run in the same element order, and since a mean
over all elements does not depend on that order the kernels treat each tensor as a flat vector of N elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import FP_FUSION, interpreter, on_the_inputs_device
from kernels.interpreter import INTERPRET, round_to

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATS = ("l_real", "l_fake", "l_d", "l_g", "k_next", "m")
# Forward grid: at most MAX_PROGRAMS programs of BLOCK elements per iteration. The grid depends on N only (never
# on the device), so the partial sums, and therefore the result, are the same on every run and every GPU.
BLOCK = 2048
MAX_PROGRAMS = 1024
NUM_WARPS = 8


@triton.jit
def _l1_partial_sums_kernel(x_ptr, rx_ptr, fake_ptr, rfake_ptr, partials_ptr, n_elements, BLOCK: tl.constexpr):
    """partials[pid] = sum |x - rx|, partials[P + pid] = sum |fake - rfake| over this program's tiles (P programs).

    x, rx, fake, rfake: (n_elements,) flat views of four dense tensors of one layout and dtype; partials: (2P,)
    float32. Grid: (P,), P = min(cdiv(n_elements, BLOCK), MAX_PROGRAMS).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    # One float32 accumulator per lane over all of this program's tiles, reduced once at the end: the sum of
    # bf16/fp16 inputs never rounds to their precision.
    acc_real = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_fake = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(pid * BLOCK, n_elements, num_programs * BLOCK):
        idx = start + offsets
        mask = idx < n_elements
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        rx = tl.load(rx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        fake = tl.load(fake_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        rfake = tl.load(rfake_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc_real += tl.abs(x - rx)
        acc_fake += tl.abs(fake - rfake)
    tl.store(partials_ptr + pid, tl.sum(acc_real, axis=0))
    tl.store(partials_ptr + num_programs + pid, tl.sum(acc_fake, axis=0))


@triton.jit
def _balance_finalize_kernel(
    partials_ptr,
    num_partials,
    k_ptr,
    stats_ptr,
    k_used_ptr,
    n_elements,
    gamma,
    lambda_k,
    P_BLOCK: tl.constexpr,
):
    """One program: stats = [l_real, l_fake, l_d, l_g, k_next, m] and k_used = k_t.

    partials: (2 * num_partials,) float32 from _l1_partial_sums_kernel; k, k_used: () float32; stats: (6,) float32.
    """
    offsets = tl.arange(0, P_BLOCK)
    mask = offsets < num_partials
    sum_real = tl.sum(tl.load(partials_ptr + offsets, mask=mask, other=0.0), axis=0)
    sum_fake = tl.sum(tl.load(partials_ptr + num_partials + offsets, mask=mask, other=0.0), axis=0)
    l_real = sum_real / n_elements
    l_fake = sum_fake / n_elements
    k = tl.load(k_ptr)
    # BEGAN (docs/DESIGN.md section 3): the balance gamma * L_real - L_fake drives k_t (a proportional controller
    # clamped to [0, 1]) and, through its magnitude, the convergence measure M.
    balance = gamma * l_real - l_fake
    k_raw = k + lambda_k * balance
    # min() and max() drop a NaN (a diverged loss): it stays NaN, as torch.clamp keeps it, and is not clamped to 0.
    k_next = tl.where(k_raw == k_raw, tl.minimum(tl.maximum(k_raw, 0.0), 1.0), k_raw)
    tl.store(stats_ptr + 0, l_real)
    tl.store(stats_ptr + 1, l_fake)
    tl.store(stats_ptr + 2, l_real - k * l_fake)
    tl.store(stats_ptr + 3, l_fake)
    tl.store(stats_ptr + 4, k_next)
    tl.store(stats_ptr + 5, l_real + tl.abs(balance))
    # The backward of L_D needs the k_t this forward used, kept apart from k, which its owner may update first.
    tl.store(k_used_ptr, k)


@triton.jit
def _sign(d):
    # torch.sign: 0 at 0, so an element the reconstruction matches exactly gets no gradient.
    return tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)


@triton.jit
def _l1_pair_grad(
    a_ptr,
    ra_ptr,
    grad_a_ptr,
    grad_ra_ptr,
    idx,
    mask,
    scale,
    NEED_A: tl.constexpr,
    NEED_RA: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """The gradients of scale * sum |a - ra| at idx: d/d ra = scale * sign(ra - a), d/d a its negative.

    a, ra, grad_a, grad_ra: (N,) flat, one layout; a gradient not NEEDed is neither computed nor stored.
    """
    if NEED_A or NEED_RA:
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        ra = tl.load(ra_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        grad_ra = scale * _sign(ra - a)
        if NEED_RA:
            tl.store(grad_ra_ptr + idx, round_to(grad_ra, grad_ra_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        if NEED_A:
            tl.store(grad_a_ptr + idx, round_to(-grad_ra, grad_a_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _l1_grad_kernel(
    x_ptr,
    rx_ptr,
    fake_ptr,
    rfake_ptr,
    grad_stats_ptr,
    k_used_ptr,
    grad_x_ptr,
    grad_rx_ptr,
    grad_fake_ptr,
    grad_rfake_ptr,
    n_elements,
    BLOCK: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_RX: tl.constexpr,
    NEED_FAKE: tl.constexpr,
    NEED_RFAKE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Gradients of the inputs from the upstream gradient of the stats vector (only its l_* entries are used).

    x, rx, fake, rfake and the four grad_*: (n_elements,) flat views of one layout; grad_stats: (6,) float32;
    k_used: () float32, the k_t of the forward. Grid: (cdiv(n_elements, BLOCK),).
    """
    # L_D = L_real - k_t L_fake and L_G = L_fake fold into the gradients of L_real and L_fake.
    g_real = tl.load(grad_stats_ptr + 0) + tl.load(grad_stats_ptr + 2)
    k = tl.load(k_used_ptr)
    g_fake = tl.load(grad_stats_ptr + 1) - k * tl.load(grad_stats_ptr + 2) + tl.load(grad_stats_ptr + 3)
    # Each loss is a mean over n_elements.
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    _l1_pair_grad(x_ptr, rx_ptr, grad_x_ptr, grad_rx_ptr, idx, mask, g_real / n_elements, NEED_X, NEED_RX, INTERPRETED)
    _l1_pair_grad(
        fake_ptr,
        rfake_ptr,
        grad_fake_ptr,
        grad_rfake_ptr,
        idx,
        mask,
        g_fake / n_elements,
        NEED_FAKE,
        NEED_RFAKE,
        INTERPRETED,
    )


class BalanceInputError(ValueError):
    """The balance kernels cannot take these tensors; the message says what is expected."""


def unsupported(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take images like x (a phrase for an error message): its device or its dtype; None
    if they can."""
    on_device = interpreter.device_unsupported(x.device)
    if on_device is not None:
        return on_device
    if x.dtype not in DTYPES:
        return f"x dtype {x.dtype} unsupported; expected one of {DTYPES}"
    return None


def check_balance_inputs(x: torch.Tensor, rx: torch.Tensor, fake: torch.Tensor, rfake: torch.Tensor) -> None:
    """Raise BalanceInputError unless the four tensors meet the layout contract of this module's docstring."""
    tensors = (x, rx, fake, rfake)
    on_device = interpreter.device_unsupported(x.device)
    if on_device is not None:
        raise BalanceInputError(f"began balance: {on_device}")
    if len({t.shape for t in tensors}) != 1:
        raise BalanceInputError(
            f"began balance: x, rx, fake, rfake must share one shape, got {[tuple(t.shape) for t in tensors]}"
        )
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in DTYPES:
        raise BalanceInputError(
            f"began balance: inputs must share one dtype in {DTYPES}, got {[t.dtype for t in tensors]}"
        )
    if len({t.device for t in tensors}) != 1:
        raise BalanceInputError(f"began balance: inputs must be on one device, got {[str(t.device) for t in tensors]}")
    if not 0 < x.numel() < 2**31:
        raise BalanceInputError(f"began balance: expected 1 to 2**31 - 1 elements (int32 offsets), got {x.numel()}")
    dense = all(t.is_contiguous() for t in tensors)
    if not dense and x.dim() == 4:
        dense = all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    if not dense:
        raise BalanceInputError("began balance: inputs must be all contiguous or all channels_last-contiguous")


@on_the_inputs_device
def balance_forward(
    x: torch.Tensor,
    rx: torch.Tensor,
    fake: torch.Tensor,
    rfake: torch.Tensor,
    k: torch.Tensor,
    gamma: float,
    lambda_k: float,
    *,
    block: int = BLOCK,
    max_programs: int = MAX_PROGRAMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward pair. Returns (stats, k_used): stats (6,) float32 in the order of STATS, k_used () the k_t
    read. k: () float32 on the inputs' device, only read.
    block and max_programs set the forward grid (powers of two; the defaults fix the summation order)."""
    check_balance_inputs(x, rx, fake, rfake)
    n = x.numel()
    num_programs = min(triton.cdiv(n, block), max_programs)
    partials = torch.empty(2 * num_programs, dtype=torch.float32, device=x.device)
    stats = torch.empty(len(STATS), dtype=torch.float32, device=x.device)
    k_used = torch.empty((), dtype=torch.float32, device=x.device)
    _l1_partial_sums_kernel[(num_programs,)](
        x, rx, fake, rfake, partials, n, BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION
    )
    _balance_finalize_kernel[(1,)](
        partials,
        num_partials=num_programs,
        k_ptr=k,
        stats_ptr=stats,
        k_used_ptr=k_used,
        n_elements=n,
        gamma=float(gamma),
        lambda_k=float(lambda_k),
        P_BLOCK=triton.next_power_of_2(max_programs),
        num_warps=4,
        enable_fp_fusion=FP_FUSION,
    )
    return stats, k_used


@on_the_inputs_device
def balance_backward(
    x: torch.Tensor,
    rx: torch.Tensor,
    fake: torch.Tensor,
    rfake: torch.Tensor,
    grad_stats: torch.Tensor,
    k_used: torch.Tensor,
    needs: tuple[bool, bool, bool, bool],
    *,
    block: int = BLOCK,
) -> list[torch.Tensor | None]:
    """Gradients [x, rx, fake, rfake] (None where `needs` is False) in the inputs' dtype and layout.

    grad_stats: (6,) float32 contiguous, the upstream gradient of the stats vector; k_used: () from balance_forward.
    """
    grads = [torch.empty_like(t) if need else None for t, need in zip((x, rx, fake, rfake), needs, strict=True)]
    if not any(needs):
        return grads
    n = x.numel()
    # A gradient that is not needed is never written; its pointer argument is a placeholder.
    _l1_grad_kernel[(triton.cdiv(n, block),)](
        x,
        rx,
        fake,
        rfake,
        grad_stats,
        k_used,
        *(g if g is not None else x for g in grads),
        n,
        BLOCK=block,
        NEED_X=needs[0],
        NEED_RX=needs[1],
        NEED_FAKE=needs[2],
        NEED_RFAKE=needs[3],
        INTERPRETED=INTERPRET,
        num_warps=NUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    )
    return grads
