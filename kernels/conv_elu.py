"""Fused conv3x3 (padding 1) + bias + ELU as an implicit GEMM: forward, input gradient, weight/bias gradient.

Activations are channels_last (NHWC memory, NCHW logical shape): a 3x3 tap at one pixel is a contiguous run
of channels, so the GEMM's reduction axis (tap, channel) reads coalesced rows. The conv's logical input is
x nearest-upsampled by `upsample`, then (optionally) `skip` nearest-upsampled to the same size and
concatenated after x's channels. Neither is ever materialised: a logical pixel (h, w) reads x[h // up, w // up]
for channels c < C1 and skip[h // fh, w // fw] for c >= C1. stride 2 subsamples the output grid.

Forward  : y[p, n]   = act(bias[n] + sum_{tap, c} in[p @ tap, c] * w[n, c, tap]), accumulated in float32.
Backward : g = dy * elu'(y) with elu'(a) = 1 if y > 0 else y + 1 (from the saved output, alpha = 1);
           d in[q, c] = sum_{tap, n} g[q - tap, n] * w[n, c, tap] (a transposed conv; stride 2 keeps only
           the taps landing on the output grid; upsample sums the up x up block of logical pixels);
           d w[n, c, tap] = sum_p s[b(p)] * g[p, n] * in[p @ tap, c] over all B*Ho*Wo output pixels,
           d bias[n] = sum_p s[b(p)] * g[p, n], with s the optional per-sample scale.

The weight is packed once per forward into a (9, Cin, Cout) matrix in the activation dtype (pack_weight: a few
hundred KB to a few MB, cast and permuted in one copy). The forward reads it as its GEMM's (K, N) operand, each tile
contiguous along Cout; the input-gradient kernel reads the same pack transposed, as a (Cout, Cin) operand per tap,
each tile contiguous along its reduction axis Cout, so backward packs nothing.

Under Triton's interpreter (TRITON_INTERPRET=1) one small fixed block configuration is used, the tl.dot
operands are cast to float32 (the interpreter has no bf16 arithmetic) and bf16 results are rounded to
nearest-even by hand (its cast truncates); compiled, the operands stay in the
input dtype (tensor cores) and float32 inputs use IEEE precision (no TF32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import FP_FUSION, interpreter, on_the_inputs_device
from kernels.interpreter import INTERPRET, round_to

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Output pixels per weight-gradient program: the B*Ho*Wo reduction is split into chunks of this many rows
# whose float32 partials are summed afterwards, so that small layers still fill the GPU.
_WGRAD_ROWS_PER_SPLIT = 256 if INTERPRET else 4096


def _as_configs(tiles: list[tuple[int, ...]], names: tuple[str, str, str]) -> list[triton.Config]:
    """(block, block, block, num_warps, num_stages) tuples as triton.Configs."""
    return [
        triton.Config(dict(zip(names, blocks, strict=True)), num_warps=warps, num_stages=stages)
        for *blocks, warps, stages in tiles
    ]


def _configs(gpu: list[tuple[int, ...]], interpreted: tuple[int, int, int], names: tuple[str, str, str]):
    """The configs to autotune over; interpreted, the one given config (the interpreter's cost is per program
    and per op, so few programs with long rows are fastest)."""
    return _as_configs([(*interpreted, 1, 1)] if INTERPRET else gpu, names)


# Hopper-sized tiles; few enough that autotuning a new layer shape stays quick. Each autotuner keeps the tile it
# picked per shape (its `key`) and dtypes in Triton's disk cache (cache_results, keyed also by the GPU architecture,
# the Triton version and the kernel's source): a later run on the machine skips the benchmark (do_bench's 25 ms of
# warm-up and 100 ms of timed launches per config and shape), and picks the same tile, so its sums add up in the
# first run's order (without it a resume in a new process may pick another tile and drift from the run it continues).
_GEMM_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 4),
]
_WGRAD_TILES = [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (32, 64, 128, 4, 4)]
_FWD_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_DGRAD_BLOCKS = ("BLOCK_M", "BLOCK_C", "BLOCK_K")
_WGRAD_BLOCKS = ("BLOCK_C", "BLOCK_N", "BLOCK_P")
_FWD_CONFIGS = _configs(_GEMM_TILES, (128, 16, 16), _FWD_BLOCKS)
_DGRAD_CONFIGS = _configs(_GEMM_TILES, (128, 16, 16), _DGRAD_BLOCKS)
_WGRAD_CONFIGS = _configs(_WGRAD_TILES, (16, 16, 128), _WGRAD_BLOCKS)
# Every tile autotuning may pick on a GPU, per kernel, also under the interpreter: the tests run each one.
GPU_CONFIGS = {
    "conv_elu_fwd_kernel": _as_configs(_GEMM_TILES, _FWD_BLOCKS),
    "conv_elu_dgrad_kernel": _as_configs(_GEMM_TILES, _DGRAD_BLOCKS),
    "conv_elu_wgrad_kernel": _as_configs(_WGRAD_TILES, _WGRAD_BLOCKS),
}


def smallest_tile(configs: list[triton.Config]) -> triton.Config:
    """The config whose block sizes multiply to the least: the quickest to compile."""
    return min(configs, key=lambda config: math.prod(config.kwargs.values()))


def _one_tile_for_ieee(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuning's early prune: float32 operands multiply exactly ("ieee") on the CUDA cores, where tl.dot unrolls
    into one FMA per tile element and k, so the tensor-core-sized tiles take a minute or more each to compile
    (60-90 s per config, single-threaded, seen on an H200 with Triton 3.6) for no speed-up. There only the smallest
    tile is kept (newer Triton then skips the benchmark; 3.6 still times that one tile, briefly); bf16 and fp16 tune
    over all the configs."""
    if kwargs.get("PRECISION") != "ieee":
        return configs
    return [smallest_tile(configs)]


@triton.jit
def _mma(acc, a, b, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b with float32 accumulation; the interpreter multiplies in float32 (no bf16 arithmetic)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _preact_grad(gy_ptr, y_ptr, offs, mask, ACT: tl.constexpr):
    """g = dy * elu'(a) in float32, elu' taken from the saved output y: 1 where y > 0, y + 1 = exp(a) elsewhere."""
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(y > 0, g, g * (y + 1.0))
    return g


@triton.jit
def _accumulate_source(
    acc,
    src_ptr,
    row,
    row_mask,
    C,
    w_ptr,
    offs_n,
    mask_n,
    COUT,
    BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc (BLOCK_M, BLOCK_N) += src[row, 0:C] @ w[0:C, offs_n]; row: NHWC element offsets of the pixels."""
    offs_k = tl.arange(0, BLOCK_K)
    for c0 in range(0, C, BLOCK_K):
        ck = c0 + offs_k
        mask_k = ck < C
        a = tl.load(src_ptr + row[:, None] + ck[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + ck[:, None] * COUT + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(acc, a, b, INTERPRETED, PRECISION)
    return acc


@triton.autotune(
    configs=_FWD_CONFIGS,
    prune_configs_by={"early_config_prune": _one_tile_for_ieee},
    cache_results=True,
    key=["M", "COUT", "C1", "C2", "H", "W"],
)
@triton.jit
def conv_elu_fwd_kernel(
    x_ptr,  # (B, H, W, C1) NHWC
    skip_ptr,  # (B, HS, WS, C2) NHWC, or x_ptr when C2 == 0
    w_ptr,  # (9, C1 + C2, COUT), input dtype
    bias_ptr,  # (COUT,) or x_ptr when there is no bias
    y_ptr,  # (B, HO, WO, COUT) NHWC
    M,  # B * HO * WO
    H,
    W,
    C1,
    HS,
    WS,
    C2,
    FSH,  # logical rows per skip row: H * UP // HS
    FSW,
    HO,
    WO,
    COUT,
    STRIDE: tl.constexpr,
    UP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = elu(conv3x3(cat(up(x), up(skip))) + bias) as an implicit GEMM: (M output pixels) x (COUT), reduced over
    9 taps x CIN channels. up() is nearest x UP (skip's own factor FSH, FSW); the stride-2 variant reads every
    second logical pixel. Each pointer's shape and layout is beside it. Grid: (cdiv(M, BLOCK_M), cdiv(COUT,
    BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    b = offs_m // (HO * WO)
    oh = (offs_m // WO) % HO
    ow = offs_m % WO
    HL = H * UP
    WL = W * UP
    CIN = C1 + C2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(9):
        # Logical input pixel of this tap; out-of-range pixels are the zero padding.
        ih = oh * STRIDE + tap // 3 - 1
        iw = ow * STRIDE + tap % 3 - 1
        inside = mask_m & (ih >= 0) & (ih < HL) & (iw >= 0) & (iw < WL)
        ih = tl.where(inside, ih, 0)
        iw = tl.where(inside, iw, 0)
        x_row = ((b * H + ih // UP) * W + iw // UP) * C1
        acc = _accumulate_source(
            acc,
            x_ptr,
            x_row,
            inside,
            C1,
            w_ptr + tap * CIN * COUT,
            offs_n,
            mask_n,
            COUT,
            BLOCK_K,
            INTERPRETED,
            PRECISION,
        )
        if C2 > 0:
            s_row = ((b * HS + ih // FSH) * WS + iw // FSW) * C2
            acc = _accumulate_source(
                acc,
                skip_ptr,
                s_row,
                inside,
                C2,
                w_ptr + (tap * CIN + C1) * COUT,
                offs_n,
                mask_n,
                COUT,
                BLOCK_K,
                INTERPRETED,
                PRECISION,
            )

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT:
        # ELU (alpha = 1) on the float32 accumulator: expm1(a) where a <= 0, as PyTorch's. exp(a) - 1 keeps only the
        # bits of a small |a| that exp(a)'s rounding near 1 leaves (-1e-6 came out 1% off, -1e-8 as 0), so |a| < 1/16
        # takes expm1's series to a^5 / 120 (the next term is under 2e-9 of a there). min() keeps exp finite where its
        # branch is not taken. The test is acc <= 0, not acc > 0: min() drops a NaN, which must take the acc branch to
        # stay NaN, as in PyTorch.
        neg = tl.minimum(acc, 0.0)
        series = neg * (1.0 + neg * (0.5 + neg * (1.0 / 6.0 + neg * (1.0 / 24.0 + neg * (1.0 / 120.0)))))
        acc = tl.where(acc <= 0, tl.where(neg > -0.0625, series, tl.exp(neg) - 1.0), acc)
    y_offs = offs_m[:, None] * COUT + offs_n[None, :]
    tl.store(y_ptr + y_offs, round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(
    configs=_DGRAD_CONFIGS,
    prune_configs_by={"early_config_prune": _one_tile_for_ieee},
    cache_results=True,
    key=["M", "COUT", "C", "CIN", "HO", "WO"],
)
@triton.jit
def conv_elu_dgrad_kernel(
    gy_ptr,  # (B, HO, WO, COUT) NHWC: gradient of the layer output
    y_ptr,  # (B, HO, WO, COUT) NHWC: the saved layer output
    w_ptr,  # (9, CIN, COUT), gy's dtype: the forward's packed weight, read transposed
    dx_ptr,  # (B, H, W, C) NHWC: gradient of input channels C_OFF .. C_OFF + C on the source grid
    M,  # B * H * W
    H,
    W,
    C,
    C_OFF,
    CIN,
    HO,
    WO,
    COUT,
    STRIDE: tl.constexpr,
    UP: tl.constexpr,  # each source pixel is an UP x UP block of logical pixels; their gradients sum
    ACT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx of one source of the conv's input (x, or skip: the weight's channels C_OFF .. C_OFF + C): the transposed
    conv of g = gy * elu'(pre-activation), read back from y, summed over the UP x UP logical pixels of each source
    pixel. Each pointer's shape and layout is beside it. Grid: (cdiv(B * ceil(H / STRIDE) * ceil(W / STRIDE),
    BLOCK_M), cdiv(C, BLOCK_C), STRIDE * STRIDE parity classes)."""
    tl.static_assert(STRIDE == 1 or UP == 1)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    # Program axis 2 is the pixel's parity class (h % STRIDE, w % STRIDE): all pixels of one class are reached
    # by the same taps of a strided conv, so the taps that miss the output grid are skipped, not masked.
    ph = tl.program_id(2) // STRIDE
    pw = tl.program_id(2) % STRIDE
    hq = (H - ph + STRIDE - 1) // STRIDE
    wq = (W - pw + STRIDE - 1) // STRIDE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < (M // (H * W)) * hq * wq
    mask_c = offs_c < C
    b = offs_m // tl.maximum(hq * wq, 1)
    h = (offs_m // tl.maximum(wq, 1)) % tl.maximum(hq, 1) * STRIDE + ph
    w = offs_m % tl.maximum(wq, 1) * STRIDE + pw

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # A runtime loop, not tl.static_range: unrolled, UP = 2 made 36 pipelined tap loops, which took 190 s to
    # compile for sm_90 (Triton 3.9, scripts/check_kernels_compile.py) against 6 s for this one body of 9.
    for sub in range(UP * UP):
        ih = h * UP + sub // UP
        iw = w * UP + sub % UP
        for tap in tl.static_range(9):
            # Logical pixel ih was read by output row oh through tap kh iff oh * STRIDE + kh - 1 == ih.
            if ((ph + 1 - tap // 3 + STRIDE) % STRIDE == 0) & ((pw + 1 - tap % 3 + STRIDE) % STRIDE == 0):
                nh = ih + 1 - tap // 3
                nw = iw + 1 - tap % 3
                hit = mask_m & (nh >= 0) & (nw >= 0) & (nh < HO * STRIDE) & (nw < WO * STRIDE)
                nh = tl.where(hit, nh, 0)
                nw = tl.where(hit, nw, 0)
                g_row = ((b * HO + nh // STRIDE) * WO + nw // STRIDE) * COUT
                for n0 in range(0, COUT, BLOCK_K):
                    nk = n0 + offs_k
                    mask_k = nk < COUT
                    g_offs = g_row[:, None] + nk[None, :]
                    g = _preact_grad(gy_ptr, y_ptr, g_offs, hit[:, None] & mask_k[None, :], ACT)
                    # Rounded to the activation dtype, as PyTorch's own backward stores dy * elu'(a).
                    g = round_to(g, gy_ptr.dtype.element_ty, INTERPRETED)
                    # w[n, c, tap] as a (BLOCK_K, BLOCK_C) tile of the forward's (9, CIN, COUT) pack: contiguous
                    # along n, the reduction axis.
                    wt = tl.load(
                        w_ptr + (tap * CIN + C_OFF + offs_c[None, :]) * COUT + nk[:, None],
                        mask=mask_k[:, None] & mask_c[None, :],
                        other=0.0,
                    )
                    acc = _mma(acc, g, wt, INTERPRETED, PRECISION)

    dx_offs = ((b * H + h) * W + w)[:, None] * C + offs_c[None, :]
    tl.store(
        dx_ptr + dx_offs, round_to(acc, dx_ptr.dtype.element_ty, INTERPRETED), mask=mask_m[:, None] & mask_c[None, :]
    )


@triton.autotune(
    configs=_WGRAD_CONFIGS,
    prune_configs_by={"early_config_prune": _one_tile_for_ieee},
    cache_results=True,
    key=["P", "COUT", "C", "CIN", "HO", "WO"],
)
@triton.jit
def conv_elu_wgrad_kernel(
    src_ptr,  # (B, HSRC, WSRC, C) NHWC: one source of the logical input (x, or skip)
    gy_ptr,  # (B, HO, WO, COUT) NHWC
    y_ptr,  # (B, HO, WO, COUT) NHWC
    scale_ptr,  # (B,) per-sample scale, or gy_ptr when there is none
    dw_ptr,  # (SPLITS, 9, CIN, COUT) float32 partial sums; this launch fills channels C_OFF .. C_OFF + C
    db_ptr,  # (SPLITS, COUT) float32 partial sums, or dw_ptr when the bias gradient is not wanted
    P,  # B * HO * WO
    HSRC,
    WSRC,
    C,
    C_OFF,
    CIN,
    FH,  # logical rows per source row (the upsample factor of this source)
    FW,
    HL,  # logical input size
    WL,
    HO,
    WO,
    COUT,
    ROWS_PER_SPLIT,
    STRIDE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WANT_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One split's partial weight gradient dw[s, tap, C_OFF + c, n] = sum over its output pixels p of
    src(p's input pixel under tap)[c] * g[p, n], and db[s, n] = sum g[p, n], with g = gy * elu'(pre-activation)
    (times scale[b] with HAS_SCALE); the host sums the SPLITS partials in a fixed order. Each pointer's shape and
    layout is beside it. Grid: (9 * cdiv(C, BLOCK_C), cdiv(COUT, BLOCK_N), SPLITS)."""
    pid_tc = tl.program_id(0)  # tap * cdiv(C, BLOCK_C) + channel block
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)  # which chunk of output pixels
    c_blocks = tl.cdiv(C, BLOCK_C)
    tap = pid_tc // c_blocks
    offs_c = (pid_tc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_n = offs_n < COUT
    kh = tap // 3
    kw = tap % 3
    p_end = tl.minimum(P, (pid_s + 1) * ROWS_PER_SPLIT)

    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(pid_s * ROWS_PER_SPLIT, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        b = offs_p // (HO * WO)
        oh = (offs_p // WO) % HO
        ow = offs_p % WO
        g = _preact_grad(
            gy_ptr, y_ptr, offs_p[:, None] * COUT + offs_n[None, :], mask_p[:, None] & mask_n[None, :], ACT
        )
        if HAS_SCALE:
            g = g * tl.load(scale_ptr + b, mask=mask_p, other=0.0).to(tl.float32)[:, None]
        if WANT_BIAS:
            bias_acc += tl.sum(g, axis=0)
        ih = oh * STRIDE + kh - 1
        iw = ow * STRIDE + kw - 1
        inside = mask_p & (ih >= 0) & (ih < HL) & (iw >= 0) & (iw < WL)
        ih = tl.where(inside, ih, 0)
        iw = tl.where(inside, iw, 0)
        src_row = ((b * HSRC + ih // FH) * WSRC + iw // FW) * C
        a = tl.load(
            src_ptr + src_row[:, None] + offs_c[None, :], mask=inside[:, None] & mask_c[None, :], other=0.0
        )  # (BLOCK_P, BLOCK_C)
        acc = _mma(acc, tl.trans(a), round_to(g, gy_ptr.dtype.element_ty, INTERPRETED), INTERPRETED, PRECISION)

    dw_offs = ((pid_s * 9 + tap) * CIN + C_OFF + offs_c[:, None]) * COUT + offs_n[None, :]
    tl.store(dw_ptr + dw_offs, acc, mask=mask_c[:, None] & mask_n[None, :])
    if WANT_BIAS:
        if pid_tc == 0:
            tl.store(db_ptr + pid_s * COUT + offs_n, bias_acc, mask=mask_n)


# Every offset the kernels compute is int32: a tensor they read or write must hold fewer elements than this.
MAX_ELEMENTS = 2**31


def unsupported(x: torch.Tensor, skip: torch.Tensor | None, weight: torch.Tensor, stride: int, upsample: int):
    """Why these kernels cannot run conv_elu on these tensors (a phrase for an error message), or None if they can:
    the device, the dtype, or a tensor (the output, or the skip's gradient on the upsampled grid) too large for
    int32 offsets. Shapes as conv_elu_forward's."""
    on_device = interpreter.device_unsupported(x.device)
    if on_device is not None:
        return on_device
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x dtype {x.dtype} unsupported; expected one of {SUPPORTED_DTYPES}"
    bsz, _, h, w = x.shape
    hl, wl = h * upsample, w * upsample
    out = bsz * weight.shape[0] * ((hl - 1) // stride + 1) * ((wl - 1) // stride + 1)
    largest = max(x.numel(), out, 0 if skip is None else bsz * skip.shape[1] * hl * wl)
    if largest >= MAX_ELEMENTS:
        return f"a tensor of {largest} elements is too large for the kernels' int32 offsets (at most 2**31 - 1)"
    return None


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (Cout, Cin, 3, 3), of any float dtype, as the kernels read it: (9, Cin, Cout) contiguous in `dtype`
    (the activations'), tap-major. Cast and permuted in one copy; the forward and the input gradient share it."""
    permuted = weight.permute(2, 3, 1, 0)
    packed = torch.empty(permuted.shape, device=weight.device, dtype=dtype)
    packed.copy_(permuted)
    return packed.view(9, weight.shape[1], weight.shape[0])


@on_the_inputs_device
def conv_elu_forward(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    upsample: int,
    act: bool,
) -> torch.Tensor:
    """y = act(conv3x3(cat(up(x), up(skip))) + bias), channels_last, in x's dtype.

    x: (B, C1, H, W); skip: (B, C2, Hs, Ws) in x's dtype or None, Hs and Ws dividing H*upsample, W*upsample;
    w_packed: pack_weight(weight (Cout, C1 + C2, 3, 3), x.dtype); bias: (Cout,) or None, any float dtype. Any input
    layout is accepted (made channels_last, a no-op when already so). Output: (B, Cout, H*upsample/stride,
    W*upsample/stride).
    """
    x = _nhwc(x)
    bsz, c1, h, w = x.shape
    c2 = 0 if skip is None else skip.shape[1]
    skip = x if skip is None else _nhwc(skip)
    cout = w_packed.shape[2]
    hl, wl = h * upsample, w * upsample
    ho, wo = (hl - 1) // stride + 1, (wl - 1) // stride + 1
    y = torch.empty((bsz, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    m = bsz * ho * wo

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"])

    conv_elu_fwd_kernel[grid](
        x,
        skip,
        w_packed,
        x if bias is None else bias,
        y,
        m,
        h,
        w,
        c1,
        skip.shape[2],
        skip.shape[3],
        c2,
        hl // skip.shape[2],
        wl // skip.shape[3],
        ho,
        wo,
        cout,
        STRIDE=stride,
        UP=upsample,
        HAS_BIAS=bias is not None,
        ACT=act,
        INTERPRETED=INTERPRET,
        PRECISION=_precision(x.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return y


@on_the_inputs_device
def conv_elu_input_grad(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    w_packed: torch.Tensor,
    channels: tuple[int, int],
    size: tuple[int, int],
    upsample: int,
    stride: int,
    act: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of the layer's input channels [c0, c1) on a grid `size` that is `upsample` times coarser than
    the conv's logical input: each of its pixels sums the gradients of its upsample x upsample block.

    grad_y, y: (B, Cout, Ho, Wo) (y the saved output, used for elu' when act); w_packed: the forward's
    pack_weight(weight (Cout, Cin, 3, 3), grad_y.dtype). Returns (B, c1 - c0, *size) channels_last in `dtype`,
    accumulated in float32.
    """
    grad_y, y = _nhwc(grad_y), _nhwc(y)
    bsz, cout, ho, wo = grad_y.shape
    cin = w_packed.shape[1]
    c0, c1 = channels
    h, w = size
    dx = torch.empty((bsz, c1 - c0, h, w), device=grad_y.device, dtype=dtype, memory_format=torch.channels_last)
    m = bsz * h * w

    class_pixels = bsz * triton.cdiv(h, stride) * triton.cdiv(w, stride)  # the largest parity class

    def grid(meta):
        return triton.cdiv(class_pixels, meta["BLOCK_M"]), triton.cdiv(c1 - c0, meta["BLOCK_C"]), stride * stride

    conv_elu_dgrad_kernel[grid](
        grad_y,
        y,
        w_packed,
        dx,
        m,
        h,
        w,
        c1 - c0,
        c0,
        cin,
        ho,
        wo,
        cout,
        STRIDE=stride,
        UP=upsample,
        ACT=act,
        INTERPRETED=INTERPRET,
        PRECISION=_precision(grad_y.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return dx


@on_the_inputs_device
def conv_elu_weight_grad(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    grad_y: torch.Tensor,
    y: torch.Tensor,
    wgrad_scale: torch.Tensor | None,
    stride: int,
    upsample: int,
    act: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (Cout, C1 + C2, 3, 3) and bias (Cout,) gradients in float32, or (grad_w, None) without want_bias.

    x, skip: the layer's inputs as in conv_elu_forward; grad_y, y: (B, Cout, Ho, Wo); wgrad_scale: (B,) or
    None, multiplying each sample's contribution. The B*Ho*Wo reduction runs in float32 over chunks of
    output pixels whose partial sums are added here.
    """
    x, grad_y, y = _nhwc(x), _nhwc(grad_y), _nhwc(y)
    bsz, cout, ho, wo = grad_y.shape
    c1 = x.shape[1]
    c2 = 0 if skip is None else skip.shape[1]
    cin = c1 + c2
    hl, wl = x.shape[2] * upsample, x.shape[3] * upsample
    p = bsz * ho * wo
    splits = triton.cdiv(p, _WGRAD_ROWS_PER_SPLIT)
    dw = torch.empty((splits, 9, cin, cout), device=x.device, dtype=torch.float32)
    db = torch.empty((splits, cout), device=x.device, dtype=torch.float32) if want_bias else None
    scale = None if wgrad_scale is None else wgrad_scale.contiguous()
    sources = [(x, 0)] if skip is None else [(x, 0), (_nhwc(skip), c1)]
    for src, c_off in sources:
        c = src.shape[1]

        def grid(meta, c=c):
            return 9 * triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(cout, meta["BLOCK_N"]), splits

        conv_elu_wgrad_kernel[grid](
            src,
            grad_y,
            y,
            grad_y if scale is None else scale,
            dw,
            dw if db is None else db,
            p,
            src.shape[2],
            src.shape[3],
            c,
            c_off,
            cin,
            hl // src.shape[2],
            wl // src.shape[3],
            hl,
            wl,
            ho,
            wo,
            cout,
            _WGRAD_ROWS_PER_SPLIT,
            STRIDE=stride,
            HAS_SCALE=scale is not None,
            WANT_BIAS=want_bias and c_off == 0,
            ACT=act,
            INTERPRETED=INTERPRET,
            PRECISION=_precision(grad_y.dtype),
            enable_fp_fusion=FP_FUSION,
        )
    # The splits' partial sums added straight into the (Cout, Cin, 3, 3) layout: one op, no copy after it.
    grad_w = torch.empty((cout, cin, 3, 3), device=x.device, dtype=torch.float32)
    torch.sum(dw.view(splits, 3, 3, cin, cout).permute(0, 4, 3, 1, 2), dim=0, out=grad_w)
    return grad_w, None if db is None else db.sum(0)
