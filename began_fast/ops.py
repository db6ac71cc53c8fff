"""The public ops BEGAN's networks are built from, each with an `impl=` switch.

impl="torch" runs PyTorch primitives (any device); impl="triton" runs the fused Triton kernels (on a CUDA
device, or through Triton's interpreter on a CPU when TRITON_INTERPRET=1); impl="auto" picks Triton on CUDA
and PyTorch elsewhere. The environment variable BEGAN_FAST_IMPL (auto|torch|triton) overrides "auto" for a
whole run. When Triton is asked for but cannot be imported, the op falls back to PyTorch with one warning.
The specification every impl is checked against is reference.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from began_fast.conv_function import TorchConvELU
from began_fast.linear_function import ScaledLinear
from began_fast.reference import BalanceResult, began_objective, conv_elu_ref

IMPLS = ("auto", "torch", "triton")
IMPL_ENV = "BEGAN_FAST_IMPL"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"began_fast: impl='triton' unavailable ({reason}); using impl='torch'", stacklevel=3)


def impl_override() -> str:
    """What BEGAN_FAST_IMPL makes of impl="auto": its value, "auto" when unset or empty; ValueError when it names no
    impl."""
    impl = os.environ.get(IMPL_ENV, "auto") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map "auto" (or the BEGAN_FAST_IMPL override) to a concrete impl for tensors on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = impl_override()
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        _warn_fallback("triton is not installed")
        impl = "torch"
    return impl


def prepare_activation(x: torch.Tensor, impl: str = "auto", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Put a network's input in the layout its impl works in (done once per network, not per layer), cast to
    `dtype` in the same copy when one is given.

    The Triton kernels read channels_last (NHWC) activations: a 3x3 tap is then a contiguous run of channels,
    the GEMM's reduction axis. PyTorch's ops take either layout; they keep the caller's.
    """
    dtype = x.dtype if dtype is None else dtype
    if resolve_impl(impl, x.device) == "triton":
        return x.to(dtype=dtype, memory_format=torch.channels_last)
    return x.to(dtype)


def autocast_inputs(*tensors):
    """Under autocast, cast the op's floating inputs to the autocast dtype (weights included: their gradient flows
    back through the cast to the float32 master copy), and return a context that turns autocast off, so the op's
    forward and its explicit backward see one dtype. Without autocast: the tensors as they are, a null context."""
    device_type = next(t for t in tensors if t is not None).device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
    return cast, torch.autocast(device_type, enabled=False)


def check_wgrad_scale(op: str, x: torch.Tensor, wgrad_scale: torch.Tensor | None) -> None:
    """wgrad_scale holds one number per sample of x, for either impl (PyTorch's would broadcast a (1,) one)."""
    if wgrad_scale is not None and tuple(wgrad_scale.shape) != (x.shape[0],):
        raise ValueError(f"{op}: wgrad_scale must have shape ({x.shape[0]},), got {tuple(wgrad_scale.shape)}")


def _check_conv_args(x, weight, skip, stride, upsample):
    if x.dim() != 4:
        raise ValueError(f"conv_elu: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if stride not in (1, 2) or upsample not in (1, 2) or (stride == 2 and upsample == 2):
        raise ValueError(f"conv_elu: expected stride, upsample in {{1, 2}} and not both 2, got {stride}, {upsample}")
    c_in = x.shape[1] + (0 if skip is None else skip.shape[1])
    if tuple(weight.shape[1:]) != (c_in, 3, 3):
        raise ValueError(f"conv_elu: weight must be (Cout, {c_in}, 3, 3) for these inputs, got {tuple(weight.shape)}")
    if skip is not None:
        out_hw = (x.shape[2] * upsample, x.shape[3] * upsample)
        if skip.shape[0] != x.shape[0] or any(o % s for o, s in zip(out_hw, skip.shape[2:], strict=True)):
            raise ValueError(
                f"conv_elu: skip {tuple(skip.shape)} must match x's batch and divide the upsampled size {out_hw}"
            )


def conv_elu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int = 1,
    upsample: int = 1,
    skip: torch.Tensor | None = None,
    act: bool = True,
    wgrad_scale: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """conv3x3 (padding 1) + bias + ELU, with nearest x`upsample` and a skip concat folded into the input.

    x: (B, C1, H, W); skip: (B, C2, h, w) or None, nearest-upsampled to the output size and concatenated after
    x's channels; weight: (Cout, C1 + C2, 3, 3). Output: (B, Cout, H*upsample/stride, W*upsample/stride).
    act=False leaves out the ELU (the decoder's RGB output). wgrad_scale: (B,) or None, multiplies each
    sample's contribution to the weight and bias gradients only; the input gradients stay unscaled.
    """
    _check_conv_args(x, weight, skip, stride, upsample)
    check_wgrad_scale("conv_elu", x, wgrad_scale)
    (x, skip), autocast_off = autocast_inputs(x, skip)
    function = TorchConvELU
    if resolve_impl(impl, x.device) == "triton":
        from began_fast.conv_function import TritonConvELU
        from kernels.conv_elu import unsupported

        # "auto" takes PyTorch where the kernels cannot go (float64, an int32-overflowing size); an explicit
        # impl="triton" lets TritonConvELU raise instead.
        reason = None if impl == "triton" else unsupported(x, skip, weight, stride, upsample)
        if reason is None:
            function = TritonConvELU
        else:
            _warn_fallback(reason)
    if function is TorchConvELU:
        # PyTorch's convolution takes one dtype, so under autocast the weights are cast too. The Triton kernels
        # take the float32 master weights as they are: packing them casts them, and their gradients come back
        # float32 from float32 sums, never rounded to the autocast dtype and cast back.
        (weight, bias), _ = autocast_inputs(weight, bias)
        if wgrad_scale is None:
            # The specification itself, on plain autograd, which computes only the gradients a backward asks for.
            # TorchConvELU's explicit backward computes the weight gradient on every pass through the layer: the
            # reference step's grad(L_G, G's parameters) through D computed all of D's again, and threw them away.
            with autocast_off:
                return conv_elu_ref(x, weight, bias, stride=stride, upsample=upsample, skip=skip, act=act)
    with autocast_off:
        return function.apply(x, skip, weight, bias, wgrad_scale, stride, upsample, act)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, wgrad_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x W^T + b, with an optional per-sample scale (B,) on the weight and bias gradients only."""
    if wgrad_scale is None:
        return torch.nn.functional.linear(x, weight, bias)
    check_wgrad_scale("linear", x, wgrad_scale)
    (x, weight, bias), autocast_off = autocast_inputs(x, weight, bias)
    with autocast_off:
        return ScaledLinear.apply(x, weight, bias, wgrad_scale)


def began_balance(
    x: torch.Tensor,
    rx: torch.Tensor,
    fake: torch.Tensor,
    rfake: torch.Tensor,
    k: torch.Tensor | float,
    gamma: float,
    lambda_k: float,
    *,
    impl: str = "auto",
) -> BalanceResult:
    """BEGAN's L1 losses, k_t update and M in one op; arguments and result as reference.began_objective.

    Whatever the images' precision, the losses, k_next and M are float32 or wider (the Triton kernel accumulates
    in float32): in bf16, k_t + lambda_k * balance (an update of 1e-5 to 1e-4) would round back to k_t.
    """
    if not (x.shape == rx.shape == fake.shape == rfake.shape):
        raise ValueError(
            f"began_balance: x, rx, fake, rfake must share one shape, got "
            f"{tuple(x.shape)}, {tuple(rx.shape)}, {tuple(fake.shape)}, {tuple(rfake.shape)}"
        )
    if resolve_impl(impl, x.device) == "triton":
        from began_fast.balance_function import triton_began_balance
        from kernels.balance import unsupported

        # As conv_elu: "auto" takes PyTorch where the kernels cannot go, an explicit "triton" raises.
        reason = None if impl == "triton" else unsupported(x)
        if reason is None:
            return triton_began_balance(x, rx, fake, rfake, k, gamma, lambda_k)
        _warn_fallback(f"the balance kernels cannot run: {reason}")
    x, rx, fake, rfake = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (x, rx, fake, rfake))
    return began_objective(x, rx, fake, rfake, k, gamma, lambda_k)
