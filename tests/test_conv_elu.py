"""Parity of the fused conv3x3 + bias + ELU Triton kernels (ops.conv_elu(impl="triton")) with reference.conv_elu_ref.

Every case runs forward and backward on fresh random inputs and compares the output and the gradients of x,
skip, weight and bias with the float64 reference under tests/tolerances.py (bf16 judged against PyTorch's own
bf16 result). Without a GPU the kernels run through Triton's interpreter, so the shapes here are tiny; the
paper's shapes run compiled in the `cuda`-marked test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import pytest
import torch

import kernels.conv_elu as conv_elu_kernels
from began_fast import ops
from began_fast.config import ModelConfig
from began_fast.model import Discriminator, Generator
from began_fast.reference import began_objective, conv_elu_ref
from kernels import interpreter
from tests.glue_ops import ComputedTensors, stub_kernels
from tests.tolerances import assert_parity

GRAD_NAMES = ("grad x", "grad skip", "grad weight", "grad bias")


@dataclass(frozen=True)
class Layer:
    """One conv_elu call: x (batch, c1, size, width), skip (batch, c2, skip_size, skip_width) when c2 > 0; a width
    of 0 means square."""

    batch: int
    c1: int
    size: int
    c_out: int
    stride: int = 1
    upsample: int = 1
    c2: int = 0
    skip_size: int = 0
    act: bool = True
    channels_last: bool = True
    width: int = 0
    skip_width: int = 0


VARIANTS = {
    "stride1": Layer(batch=2, c1=5, size=12, c_out=7),
    "stride2_odd_batch1": Layer(batch=1, c1=7, size=11, c_out=5, stride=2, channels_last=False),
    "upsample": Layer(batch=2, c1=5, size=6, c_out=7, upsample=2),
    "upsample_skip": Layer(batch=2, c1=5, size=6, c_out=7, upsample=2, c2=3, skip_size=3, channels_last=False),
    "no_act": Layer(batch=2, c1=5, size=12, c_out=3, act=False),
    # Rows and columns apart: the skip's blocks are 4 logical rows by 2 logical columns, the stride-2 grid 4 x 5.
    "upsample_skip_nonsquare": Layer(
        batch=2, c1=3, size=4, width=6, c_out=5, upsample=2, c2=2, skip_size=2, skip_width=6
    ),
    "stride2_nonsquare": Layer(batch=2, c1=3, size=7, width=10, c_out=4, stride=2),
    # Odd sides: the largest stride-2 parity class (2 x 9 x 9 = 162 pixels) needs one block of 128 more than the
    # others (2 x 8 x 8 = 128).
    "stride2_odd_classes": Layer(batch=2, c1=3, size=17, c_out=4, stride=2),
    # A skip at the full logical height and half its width: blocks of 1 row by 2 columns.
    "upsample_skip_full_height": Layer(
        batch=2, c1=3, size=4, width=3, c_out=4, upsample=2, c2=2, skip_size=8, skip_width=3
    ),
}


def make_inputs(layer: Layer, device, dtype, seed: int):
    """x, skip, weight, bias, grad_out: fresh random values, weights scaled so pre-activations are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layer.channels_last else torch.contiguous_format

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(layer.batch, layer.c1, layer.size, layer.width or layer.size).contiguous(memory_format=fmt)
    skip = None
    if layer.c2:
        skip_shape = (layer.batch, layer.c2, layer.skip_size, layer.skip_width or layer.skip_size)
        skip = rand(*skip_shape).contiguous(memory_format=fmt)
    c_in = layer.c1 + layer.c2
    weight = rand(layer.c_out, c_in, 3, 3, scale=(9 * c_in) ** -0.5)
    bias = rand(layer.c_out, scale=0.5)
    out_h, out_w = ((side * layer.upsample - 1) // layer.stride + 1 for side in (layer.size, layer.width or layer.size))
    grad_out = rand(layer.batch, layer.c_out, out_h, out_w)  # conv3x3, padding 1
    return x, skip, weight, bias, grad_out


def run_layer(fn, layer: Layer, x, skip, weight, bias, grad_out, **kwargs):
    """Forward and backward of fn on fresh leaves; returns (y, [grad x, grad skip, grad weight, grad bias])."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, skip, weight, bias)]
    lx, lskip, lw, lb = leaves
    y = fn(lx, lw, lb, stride=layer.stride, upsample=layer.upsample, skip=lskip, act=layer.act, **kwargs)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def triton_conv_elu(*args, **kwargs):
    return ops.conv_elu(*args, impl="triton", **kwargs)


def float64(tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_reference(device, variant, dtype):
    layer = VARIANTS[variant]
    inputs = make_inputs(layer, device, dtype, seed=list(VARIANTS).index(variant))
    y, grads = run_layer(triton_conv_elu, layer, *inputs)
    y64, grads64 = run_layer(conv_elu_ref, layer, *float64(inputs))
    y_same, grads_same = (y64, grads64) if dtype == torch.float32 else run_layer(conv_elu_ref, layer, *inputs)

    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_parity(y, y64, y_same, name=f"{variant} output")
    for name, g, g64, g_same in zip(GRAD_NAMES, grads, grads64, grads_same, strict=True):
        if g64 is None:
            assert g is None, f"{variant}: {name} should be None"
            continue
        assert g.dtype == dtype, f"{variant}: {name} dtype {g.dtype}"
        assert_parity(g, g64, g_same, name=f"{variant} {name}")


def test_elu_at_zero_has_output_zero_and_slope_one(device):
    """Output channel 0 has zero weights and zero bias: its pre-activation is exactly 0, where ELU is 0 and
    its derivative (from the saved output: y + 1) is 1, so grad bias[0] is the plain sum of grad_out[:, 0]."""
    layer = VARIANTS["upsample_skip"]
    x, skip, weight, bias, grad_out = make_inputs(layer, device, torch.float32, seed=7)
    weight[0] = 0.0
    bias[0] = 0.0
    y, grads = run_layer(triton_conv_elu, layer, x, skip, weight, bias, grad_out)
    assert torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))
    assert (y[:, 1:] < 0).any() and (y[:, 1:] > 0).any(), "both ELU branches should be exercised"
    torch.testing.assert_close(grads[3][0], grad_out[:, 0].sum(), atol=1e-4, rtol=1e-4)
    y64, grads64 = run_layer(conv_elu_ref, layer, *float64((x, skip, weight, bias, grad_out)))
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64, strict=True):
        assert_parity(g, g64, name=f"ELU at 0: {name}")


def test_elu_of_small_negative_pre_activations_keeps_their_precision(device):
    """ELU is expm1 below 0, as PyTorch computes it: exp(a) - 1 in float32 loses a small |a|'s low bits to exp's
    rounding near 1 (a pre-activation of -1e-6 came out about 1% off and one of -1e-8 as 0: a layer of tiny
    activations failed any relative comparison). Zero weights make each channel's pre-activation its bias, here from
    -1e-8 to -1 and a few positive ones: each output is within a few float32 ulps of the float64 ELU (4e-7 relative;
    where |a| >= 1/16, exp's own rounding, relative to the smaller result, allows 4e-6)."""
    layer = replace(VARIANTS["stride1"], c_out=24)
    x, _, weight, _, _ = make_inputs(layer, device, torch.float32, seed=9)
    count = layer.c_out
    bias = -torch.logspace(-8, 0, count - 3, dtype=torch.float64)
    bias = torch.cat([bias, torch.tensor([1e-7, 0.01, 2.0], dtype=torch.float64)]).float().to(device)
    y = ops.conv_elu(x, torch.zeros_like(weight), bias, impl="triton").detach().cpu().double()
    want = torch.nn.functional.elu(bias.cpu().double())[None, :, None, None].expand_as(y)
    small = (bias.cpu().abs() < 1 / 16)[None, :, None, None].expand_as(y)
    torch.testing.assert_close(y[small], want[small], rtol=4e-7, atol=0)
    torch.testing.assert_close(y[~small], want[~small], rtol=4e-6, atol=0)


@pytest.mark.parametrize("variant", ["stride2_odd_batch1", "upsample_skip"])
def test_wgrad_scale_weights_each_sample(device, variant):
    """With wgrad_scale s, grad weight/bias = sum_i s_i * (sample i's gradient); input gradients are unscaled."""
    layer = replace(VARIANTS[variant], batch=3)
    inputs = make_inputs(layer, device, torch.float32, seed=11)
    scale = torch.tensor([1.0, -0.37, 2.5], device=device)
    _, grads = run_layer(triton_conv_elu, layer, *inputs, wgrad_scale=scale)

    x, skip, weight, bias, grad_out = float64(inputs)
    _, unscaled = run_layer(conv_elu_ref, layer, x, skip, weight, bias, grad_out)
    expected_w = torch.zeros_like(weight)
    expected_b = torch.zeros_like(bias)
    for i, s in enumerate(scale.tolist()):
        sample = [None if t is None else t[i : i + 1] for t in (x, skip)]
        _, per_sample = run_layer(conv_elu_ref, layer, sample[0], sample[1], weight, bias, grad_out[i : i + 1])
        expected_w += s * per_sample[2]
        expected_b += s * per_sample[3]

    assert_parity(grads[0], unscaled[0], name="grad x (unscaled)")
    if layer.c2:
        assert_parity(grads[1], unscaled[1], name="grad skip (unscaled)")
    assert_parity(grads[2], expected_w, name="scaled grad weight")
    assert_parity(grads[3], expected_b, name="scaled grad bias")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "needs", [(False, True, False, False), (False, False, False, True)], ids=["skip-only", "bias-only"]
)
def test_a_gradient_is_given_to_each_input_that_needs_one_alone(device, impl, needs):
    """Each of x, skip, weight, bias gets its gradient when it is the only input that needs one: a skip whose x is
    frozen (a decoder fed a constant), a bias whose weight is frozen. The others get none."""
    layer = VARIANTS["upsample_skip"]
    inputs = make_inputs(layer, device, torch.float32, seed=13)
    x, skip, weight, bias, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, skip, weight, bias), needs, strict=True)]
    y = ops.conv_elu(leaves[0], leaves[2], leaves[3], upsample=layer.upsample, skip=leaves[1], impl=impl)
    y.backward(grad_out)
    _, grads64 = run_layer(conv_elu_ref, layer, *float64(inputs))
    for name, leaf, need, g64 in zip(GRAD_NAMES, leaves, needs, grads64, strict=True):
        if need:
            assert leaf.grad is not None, f"{impl}: no {name}"
            assert_parity(leaf.grad, g64, name=f"{impl} {name}")
        else:
            assert leaf.grad is None, f"{impl}: {name} given"


AMP_DTYPES = pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@AMP_DTYPES
def test_autocast_weight_gradients_are_float32_sums_never_rounded(device, amp):
    """Under autocast the kernels take the float32 master weights as they are and give back the weight and bias
    gradients as their float32 sums: equal to the float64 sums over the same low-precision activations to
    float32 accuracy. A gradient rounded to bf16 (fp16) and cast back would be off by up to 2^-9 (2^-12) of each
    value. No ELU here, so the sums' terms are exactly the rounded inputs' products."""
    layer = replace(VARIANTS["upsample_skip"], act=False)
    x, skip, weight, bias, grad_out = make_inputs(layer, device, torch.float32, seed=5)
    with torch.autocast(device.type, dtype=amp):
        _, grads = run_layer(triton_conv_elu, layer, x, skip, weight, bias, grad_out)
    rounded = [t.to(amp).double() for t in (x, skip, grad_out)]
    _, grads64 = run_layer(conv_elu_ref, layer, rounded[0], rounded[1], weight.double(), bias.double(), rounded[2])
    for name, g, g64 in zip(GRAD_NAMES[2:], grads[2:], grads64[2:], strict=True):
        assert g.dtype == torch.float32, f"{name} dtype {g.dtype}"
        torch.testing.assert_close(
            g.double(), g64, rtol=1e-5, atol=1e-6 * g64.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )


@AMP_DTYPES
@pytest.mark.parametrize("variant", ["upsample", "upsample_skip"])
def test_autocast_layer_copies_its_weight_only_to_pack_it(device, amp, variant, monkeypatch):
    """Besides its kernels, one layer's forward and backward under autocast compute two weight-sized tensors: the
    weight packed once in the activation dtype, which the forward kernel and then the input-gradient kernels (one
    per source, x and skip) read, and the float32 weight gradient summed straight into the weight's layout. And
    one bias-sized one, the float32 bias gradient. No cast of the weight before packing, no second pack for
    backward, no low-precision gradient cast back, no copy after the sum: each would be one more launch per layer,
    some 30 layers per step. An output gradient that comes in NCHW (from a reshape, or the loss) is made
    channels_last once, for all the kernels that read it."""
    stub_kernels(monkeypatch)
    layer = VARIANTS[variant]
    x, skip, weight, bias, grad_out = make_inputs(layer, device, torch.float32, seed=6)
    grad_out = grad_out.to(amp).contiguous()
    leaves = [t.requires_grad_() for t in (x, skip, weight, bias) if t is not None]
    with ComputedTensors() as watched:
        with torch.autocast(device.type, dtype=amp):
            y = triton_conv_elu(x, weight, bias, upsample=layer.upsample, skip=skip)
        y.backward(grad_out)
    assert all(leaf.grad is not None for leaf in leaves)
    weight_sized = [r.dtype for r in watched.results if math.prod(r.shape) == weight.numel()]
    bias_sized = [r.dtype for r in watched.results if math.prod(r.shape) == bias.numel()]
    output_sized = [r.dtype for r in watched.results if r.shape == y.shape]
    assert weight_sized == [amp, torch.float32]
    assert bias_sized == [torch.float32]
    assert output_sized == [amp]


def test_rejects_unsupported_dtype_and_scale_shape(device):
    layer = VARIANTS["stride1"]
    x, skip, weight, bias, _ = make_inputs(layer, device, torch.float32, seed=3)
    with pytest.raises(ValueError, match="dtype torch.float64 unsupported"):
        triton_conv_elu(x.double(), weight.double(), bias.double())
    with pytest.raises(ValueError, match="wgrad_scale must have shape"):
        triton_conv_elu(x, weight, bias, wgrad_scale=torch.ones(layer.batch + 1, device=device))


def test_auto_takes_pytorch_where_the_kernels_cannot_go(device, monkeypatch, recwarn):
    """impl="auto" (resolved to Triton here through BEGAN_FAST_IMPL) runs a float64 layer and a balance on
    PyTorch with one warning; an explicit impl="triton" refuses them."""
    monkeypatch.setenv(ops.IMPL_ENV, "triton")
    ops._warn_fallback.cache_clear()  # once per reason and process: another test may have warned already
    layer = VARIANTS["stride1"]
    x, _, weight, bias, _ = make_inputs(layer, device, torch.float64, seed=4)
    y = ops.conv_elu(x, weight, bias, impl="auto")
    assert y.dtype == torch.float64 and torch.equal(y, conv_elu_ref(x, weight, bias))
    fallbacks = [str(w.message) for w in recwarn.list if str(w.message).startswith("began_fast")]
    assert fallbacks == [
        "began_fast: impl='triton' unavailable (x dtype torch.float64 unsupported; expected one of (torch.float32, "
        "torch.bfloat16, torch.float16)); using impl='torch'"
    ]
    with pytest.raises(ValueError, match="dtype torch.float64 unsupported"):
        ops.conv_elu(x, weight, bias, impl="triton")
    images = [torch.rand(2, 3, 8, 8, dtype=torch.float64, device=device) for _ in range(4)]
    assert ops.began_balance(*images, 0.1, 0.5, 0.001, impl="auto").l_real.dtype == torch.float64
    fallbacks = [str(w.message) for w in recwarn.list if str(w.message).startswith("began_fast")]
    assert len(fallbacks) == 2 and "the balance kernels cannot run: x dtype torch.float64" in fallbacks[1]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
@pytest.mark.parametrize("act", [True, False], ids=["elu", "linear"])
def test_nan_and_inf_reach_the_output_as_in_pytorch(device, act):
    """A NaN or inf in a layer's input (a diverged run) stays NaN / inf in its output, where PyTorch's has it, so the
    loop's non-finite check sees it: the ELU's min() drops a NaN (a review helper: NaN came out as 0)."""
    x, _, weight, bias, _ = make_inputs(VARIANTS["stride1"], device, torch.float32, seed=6)
    x = x.detach().clone()
    x[0, 0, 1, 1], x[-1, -1, 2, 3] = float("nan"), float("inf")
    fast = ops.conv_elu(x, weight, bias, act=act, impl="triton").cpu()
    # float64 on the CPU: a direct convolution, whose NaN stay within each output's 3x3 window (a Winograd one would
    # spread them over its tile)
    reference = conv_elu_ref(*(t.detach().cpu().double() for t in (x, weight, bias)), act=act)
    assert reference.isnan().any() and reference.isinf().any() and reference.isfinite().any()
    assert torch.equal(fast.isnan(), reference.isnan()) and torch.equal(fast.isinf(), reference.isinf())
    finite = reference.isfinite()
    assert torch.equal(fast[~finite & ~fast.isnan()], reference[~finite & ~fast.isnan()].float())  # the same infs
    assert_parity(fast[finite], reference[finite], name="output")


def test_cpu_tensors_without_the_interpreter_are_refused_or_fall_back(monkeypatch, recwarn):
    """The kernels take CPU tensors only under TRITON_INTERPRET=1 (here: made to say they do not): an explicit
    impl="triton" refuses a conv_elu and a balance in one line, "auto" resolved to Triton runs both on PyTorch with one
    warning each. (A review helper: the balance crashed in Triton's driver lookup, "0 active drivers".)"""
    monkeypatch.setattr(interpreter, "runs_on", lambda device: device.type == "cuda")
    monkeypatch.setenv(ops.IMPL_ENV, "triton")
    ops._warn_fallback.cache_clear()
    x, _, weight, bias, _ = make_inputs(VARIANTS["stride1"], torch.device("cpu"), torch.float32, seed=5)
    images = [torch.rand(2, 3, 8, 8) for _ in range(4)]
    expected = "x is on cpu; expected a CUDA tensor (or TRITON_INTERPRET=1 to run the kernels on the CPU)"
    with pytest.raises(ValueError, match=rf"^conv_elu\(impl='triton'\): {re.escape(expected)}$"):
        ops.conv_elu(x, weight, bias, impl="triton")
    with pytest.raises(ValueError, match=rf"^began balance: {re.escape(expected)}$"):
        ops.began_balance(*images, 0.1, 0.5, 0.001, impl="triton")
    assert torch.equal(ops.conv_elu(x, weight, bias, impl="auto"), conv_elu_ref(x, weight, bias))
    result = ops.began_balance(*images, 0.1, 0.5, 0.001, impl="auto")
    assert torch.equal(result.k_next, began_objective(*images, 0.1, 0.5, 0.001).k_next)
    fallbacks = [str(w.message) for w in recwarn.list if str(w.message).startswith("began_fast")]
    assert fallbacks == [
        f"began_fast: impl='triton' unavailable ({expected}); using impl='torch'",
        f"began_fast: impl='triton' unavailable (the balance kernels cannot run: {expected}); using impl='torch'",
    ]


def test_tensors_beyond_int32_offsets_are_refused(monkeypatch):
    """The kernels index with int32: a layer whose output (or the skip's gradient on the upsampled grid) holds
    2**31 elements or more must not reach them (meta tensors, taken as a device the kernels run on: only the shapes
    matter)."""
    monkeypatch.setattr(interpreter, "runs_on", lambda device: True)
    meta = dict(device="meta", dtype=torch.bfloat16)
    weight = torch.empty(128, 128, 3, 3, **meta)
    fits = torch.empty(255, 128, 256, 256, **meta)  # 256 x 128 channels x 256^2 is exactly 2**31
    assert conv_elu_kernels.unsupported(fits, None, weight, 1, 1) is None
    too_big = torch.empty(256, 128, 256, 256, **meta)
    assert "int32" in conv_elu_kernels.unsupported(too_big, None, weight, 1, 1)
    up = torch.empty(256, 128, 128, 128, **meta)  # the output of x2 upsampling is the 2**31-element one
    assert "int32" in conv_elu_kernels.unsupported(up, None, weight, 1, 2)
    # One output channel: the largest tensor is the skip's gradient, 128 channels on the 256^2 upsampled grid.
    low_res, narrow = torch.empty(256, 1, 128, 128, **meta), torch.empty(1, 129, 3, 3, **meta)
    assert "int32" in conv_elu_kernels.unsupported(low_res, torch.empty(256, 128, 8, 8, **meta), narrow, 1, 2)
    narrower = torch.empty(1, 128, 3, 3, **meta)
    assert conv_elu_kernels.unsupported(low_res, torch.empty(256, 127, 8, 8, **meta), narrower, 1, 2) is None
    # Stride 2 on an odd side keeps the last row and column: a 3 x 3 input gives a 2 x 2 output, 4 * 2**29 elements.
    tiny, wide = torch.empty(1, 1, 3, 3, **meta), torch.empty(2**29, 1, 3, 3, **meta)
    assert "int32" in conv_elu_kernels.unsupported(tiny, None, wide, 2, 1)
    assert conv_elu_kernels.unsupported(tiny, None, torch.empty(2**29 - 1, 1, 3, 3, **meta), 2, 1) is None


def _model_parity(make_net, net_input, device, **forward_kwargs):
    """Forward + backward of one network built with impl="triton" (float32) and impl="torch" (float64, same
    weights); compares the output, the input gradient and every parameter gradient."""
    torch.manual_seed(0)
    fast = make_net("triton").to(device)
    ref = make_net("torch").to(device).double()
    ref.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(1)
    outputs = {}
    for name, net, dtype in (("fast", fast, torch.float32), ("ref", ref, torch.float64)):
        inp = net_input.detach().to(dtype).clone().requires_grad_()
        out = net(inp, **{k: v.to(dtype) for k, v in forward_kwargs.items()})
        if name == "fast":
            grad_out = torch.randn(out.shape, generator=gen).to(device)
        out.backward(grad_out.to(dtype))
        outputs[name] = (out.detach(), inp.grad, {k: p.grad for k, p in net.named_parameters()})
    (out, grad_in, grads), (out64, grad_in64, grads64) = outputs["fast"], outputs["ref"]
    assert_parity(out, out64, name="output")
    assert_parity(grad_in, grad_in64, name="input gradient")
    for key, g in grads.items():
        assert_parity(g, grads64[key], name=f"grad {key}")


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_generator_matches_torch_impl(device, skip):
    cfg = ModelConfig(image_size=16, n=4, h=4, skip=skip)
    z = torch.rand(2, cfg.z_size, generator=torch.Generator().manual_seed(2)).to(device) * 2 - 1
    _model_parity(lambda impl: Generator(cfg, impl=impl), z, device)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_discriminator_matches_torch_impl(device, skip):
    """D forward + backward, with the fast step's per-sample weight-gradient scale ([real; fake] -> [1, -k_t])."""
    cfg = ModelConfig(image_size=16, n=4, h=4, skip=skip)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(device)
    scale = torch.tensor([1.0, -0.3], device=device)
    _model_parity(lambda impl: Discriminator(cfg, impl=impl), x, device, wgrad_scale=scale)


def assert_scaled_layer_matches_torch(variant: str, layer: Layer, device, dtype, seed: int) -> None:
    """Forward and backward on the Triton kernels with a per-sample wgrad scale, against PyTorch's layer in float64
    (and, in a low precision, in the same dtype), output and every gradient."""
    inputs = make_inputs(layer, device, dtype, seed=seed)
    scale = torch.linspace(-1.0, 1.0, layer.batch, device=device)
    y, grads = run_layer(triton_conv_elu, layer, *inputs, wgrad_scale=scale)
    y64, grads64 = run_layer(ops.conv_elu, layer, *float64(inputs), wgrad_scale=scale.double(), impl="torch")
    y_same, grads_same = (
        (y64, grads64)
        if dtype == torch.float32
        else run_layer(ops.conv_elu, layer, *inputs, wgrad_scale=scale.to(dtype), impl="torch")
    )
    assert_parity(y, y64, y_same, name=f"{variant} output")
    for name, g, g64, g_same in zip(GRAD_NAMES, grads, grads64, grads_same, strict=True):
        if g64 is not None:
            assert_parity(g, g64, g_same, name=f"{variant} {name}")


PAPER_LAYERS = {
    "stride1": Layer(batch=16, c1=128, size=64, c_out=128),
    "stride2": Layer(batch=16, c1=128, size=64, c_out=128, stride=2),
    "upsample_skip": Layer(batch=16, c1=128, size=32, c_out=128, upsample=2, c2=128, skip_size=8),
    "rgb_out": Layer(batch=16, c1=128, size=64, c_out=3, act=False, channels_last=False),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("variant", list(PAPER_LAYERS))
def test_paper_shapes_match_reference(device, variant, dtype):
    """The paper's layer shapes (n=128, 64x64, batch 16), compiled on the GPU, with a per-sample wgrad scale."""
    assert_scaled_layer_matches_torch(variant, PAPER_LAYERS[variant], device, dtype, seed=5)


# Channels above 64 and pixel counts above 128, neither a multiple of any block: every tile size then runs more
# than one block along each GEMM axis and a partial last block.
TILE_LAYERS = {
    "stride2": Layer(batch=2, c1=70, size=13, c_out=66, stride=2),
    "upsample_skip": Layer(batch=2, c1=70, size=6, c_out=66, upsample=2, c2=68, skip_size=3),
}
# Case i runs tile i of each kernel (cycling through a shorter list), so that every tile runs once.
TILE_CASES = [
    {kernel: configs[i % len(configs)] for kernel, configs in conv_elu_kernels.GPU_CONFIGS.items()}
    for i in range(max(len(configs) for configs in conv_elu_kernels.GPU_CONFIGS.values()))
]


@pytest.mark.parametrize("case", TILE_CASES, ids=[f"tiles{i}" for i in range(len(TILE_CASES))])
def test_every_autotuning_tile_matches_reference(device, case, monkeypatch):
    """Autotuning picks one tile per layer shape on the GPU it runs on, so the other tests may never run some
    tiles: here the three kernels run with the tiles of one case, in bf16, the precision that autotunes over all
    of them. Under the interpreter this checks each tile's indexing and masking; on a GPU, compiled, its code."""
    for kernel, config in case.items():
        monkeypatch.setattr(getattr(conv_elu_kernels, kernel), "configs", [config])
    for seed, (variant, layer) in enumerate(TILE_LAYERS.items()):
        assert_scaled_layer_matches_torch(variant, layer, device, torch.bfloat16, seed=seed)


def test_exact_float32_autotunes_only_the_smallest_tile():
    """Compiled, float32 operands multiply exactly on the CUDA cores, where a tensor-core-sized tile takes a minute
    or more to compile: autotuning keeps the smallest tile there, and every tile for bf16 / fp16."""
    configs = conv_elu_kernels.GPU_CONFIGS["conv_elu_fwd_kernel"]
    assert conv_elu_kernels._one_tile_for_ieee(configs, {}, PRECISION="tf32") == configs
    (kept,) = conv_elu_kernels._one_tile_for_ieee(configs, {}, PRECISION="ieee")
    assert kept.kwargs == dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)


class _RecordPrecision:
    """Stands in for a conv kernel: `kernel[grid](...)` launches nothing and records the PRECISION it was given."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append((self.name, kwargs["PRECISION"]))


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")], ids=["fp32", "bf16"])
def test_float32_layers_ask_every_kernel_for_exact_products(monkeypatch, dtype, precision):
    """A float32 layer's forward, input gradient and weight gradient all multiply in IEEE float32: compiled, "tf32"
    would round their operands to 10 mantissa bits (the interpreter multiplies exactly whatever it is told, so only
    the launch arguments show it here). bf16 / fp16 operands take the tensor cores' own precision."""
    seen = []
    for name in ("conv_elu_fwd_kernel", "conv_elu_dgrad_kernel", "conv_elu_wgrad_kernel"):
        monkeypatch.setattr(conv_elu_kernels, name, _RecordPrecision(name, seen))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 6, 6, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(3, 4, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(3, generator=gen, requires_grad=True)
    ops.conv_elu(x, weight, bias, impl="triton").sum().backward()
    assert sorted(seen) == [
        ("conv_elu_dgrad_kernel", precision),
        ("conv_elu_fwd_kernel", precision),
        ("conv_elu_wgrad_kernel", precision),
    ]
