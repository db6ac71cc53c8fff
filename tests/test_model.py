"""The specification's architecture and layer op (docs/DESIGN.md section 2)."""

import pytest
import torch

from began_fast import ops
from began_fast.config import ModelConfig
from began_fast.model import ConvELU, Discriminator, Generator, carry_at
from began_fast.reference import conv_elu_ref


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_design():
    cfg = ModelConfig(image_size=64, n=128, h=64)
    assert count(Generator(cfg, impl="torch")) == 1_716_611
    assert count(Discriminator(cfg, impl="torch")) == 13_405_379


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("skip", [False, True])
def test_output_shapes_every_size(size, skip):
    cfg = ModelConfig(image_size=size, n=2, h=3, z_dim=5, skip=skip)
    G, D = Generator(cfg, impl="torch"), Discriminator(cfg, impl="torch")
    fake = G(torch.rand(2, 5) * 2 - 1)
    assert fake.shape == (2, 3, size, size)
    assert D(fake).shape == (2, 3, size, size)
    assert D.encoder(fake).shape == (2, 3)
    assert len(G.decoder.blocks) == cfg.num_scales == {16: 2, 32: 3, 64: 4, 128: 5, 256: 6}[size]


def test_skip_variant_concatenates_h0_at_every_later_scale():
    cfg = ModelConfig(image_size=32, n=4, h=4, skip=True)
    G = Generator(cfg, impl="torch")
    first_convs = [block[0] for block in G.decoder.blocks]
    assert first_convs[0].weight.shape[1] == 4
    assert all(conv.weight.shape[1] == 8 for conv in first_convs[1:])
    # Recompute G by hand from the reference op: the skip input is h0 upsampled to each scale.
    z = torch.rand(3, 4) * 2 - 1
    h0 = G.decoder.fc(z).view(3, 4, 8, 8)
    x = h0
    for i, (first, second) in enumerate(G.decoder.blocks):
        up = 2 if i > 0 else 1
        x = conv_elu_ref(x, first.weight, first.bias, upsample=up, skip=h0 if i > 0 else None)
        x = conv_elu_ref(x, second.weight, second.bias)
    expected = conv_elu_ref(x, G.decoder.out.weight, G.decoder.out.bias, act=False)
    torch.testing.assert_close(G(z), expected)


@pytest.mark.parametrize("c_in, c_out, skip_channels", [(4, 6, 0), (3, 5, 2)])
def test_conv_layers_start_as_nn_conv2d_would(c_in, c_out, skip_channels):
    """Each conv's weight and bias are drawn as nn.Conv2d's default initialisation draws them (kaiming-uniform with
    a = sqrt(5), bias uniform in +-1/sqrt(fan_in), fan_in counting the skip's channels): the same numbers from the
    same seed."""
    torch.manual_seed(7)
    expected = torch.nn.Conv2d(c_in + skip_channels, c_out, 3, padding=1)
    torch.manual_seed(7)
    conv = ConvELU(c_in, c_out, skip_channels=skip_channels, impl="torch")
    assert torch.equal(conv.weight, expected.weight) and torch.equal(conv.bias, expected.bias)


def test_vanishing_residual_blends_shape_preserving_layers():
    cfg = ModelConfig(image_size=16, n=4, h=4, vanishing_residual=True, carry_steps=100)
    assert carry_at(0, cfg) == 1.0 and carry_at(50, cfg) == 0.5 and carry_at(500, cfg) == 0.0
    G = Generator(cfg, impl="torch")
    z = torch.rand(2, 4) * 2 - 1
    G.set_carry(1.0)
    # With carry 1 every blendable conv passes its input through: G is fc -> (upsample-conv) -> out conv.
    h0 = G.decoder.fc(z).view(2, 4, 8, 8)
    up = conv_elu_ref(h0, G.decoder.blocks[1][0].weight, G.decoder.blocks[1][0].bias, upsample=2)
    torch.testing.assert_close(G(z), conv_elu_ref(up, G.decoder.out.weight, G.decoder.out.bias, act=False))
    G.set_carry(0.0)
    plain = Generator(ModelConfig(image_size=16, n=4, h=4), impl="torch")
    plain.load_state_dict(G.state_dict())
    torch.testing.assert_close(G(z), plain(z))


@pytest.mark.parametrize("size", [16, 128])
def test_encoder_is_the_specification_by_hand(size):
    """docs/DESIGN.md section 2, from the reference op: a 3->n ELU conv, then per scale i (c = n*(i+1)) c_prev->c and
    c->c ELU convs and, before the next scale, a stride-2 c->c ELU conv; flatten c x 8 x 8 and fc to h. At 128 px
    the channels reach 5n."""
    n, h = 2, 3
    cfg = ModelConfig(image_size=size, n=n, h=h)
    encoder = Discriminator(cfg, impl="torch").encoder
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    y = conv_elu_ref(x, encoder.conv0.weight, encoder.conv0.bias)
    c_prev = n
    for i, block in enumerate(encoder.blocks):
        c = n * (i + 1)
        shapes = [(c, c_prev, 3, 3), (c, c, 3, 3)] + ([(c, c, 3, 3)] if i < cfg.num_scales - 1 else [])
        assert [tuple(conv.weight.shape) for conv in block] == shapes, f"scale {i}"
        y = conv_elu_ref(y, block[0].weight, block[0].bias)
        y = conv_elu_ref(y, block[1].weight, block[1].bias)
        if i < cfg.num_scales - 1:
            y = conv_elu_ref(y, block[2].weight, block[2].bias, stride=2)
        c_prev = c
    assert y.shape == (2, n * cfg.num_scales, 8, 8)
    expected = torch.nn.functional.linear(y.flatten(1), encoder.fc.weight, encoder.fc.bias)
    torch.testing.assert_close(encoder(x), expected)


def _blend(x, y, carry):
    """The vanishing residual where the ELU conv keeps the shape, the conv alone where it does not."""
    return carry * x + (1 - carry) * y if y.shape == x.shape else y


def test_vanishing_residual_blends_every_shape_preserving_elu_conv_of_g_and_d_mid_way():
    """At carry 0.3 each ELU conv whose output has its input's shape is 0.3 in + 0.7 conv(in), in G, D's encoder
    and D's decoder alike; the RGB output conv (no ELU) never blends, though with n = 3 its shapes agree."""
    cfg = ModelConfig(image_size=16, n=3, h=4, vanishing_residual=True, carry_steps=100)
    assert carry_at(torch.tensor(500), cfg).item() == 0.0 and carry_at(torch.tensor(30), cfg).item() == 0.7
    torch.manual_seed(0)
    G, D = Generator(cfg, impl="torch").double(), Discriminator(cfg, impl="torch").double()
    G.set_carry(0.3)
    D.set_carry(0.3)

    def decoder(net, v):
        h0 = net.fc(v).view(v.shape[0], cfg.n, 8, 8)
        y = h0
        for i, (first, second) in enumerate(net.blocks):
            y = _blend(y, conv_elu_ref(y, first.weight, first.bias, upsample=2 if i > 0 else 1), 0.3)
            y = _blend(y, conv_elu_ref(y, second.weight, second.bias), 0.3)
        return conv_elu_ref(y, net.out.weight, net.out.bias, act=False)

    def encoder(net, x):
        y = _blend(x, conv_elu_ref(x, net.conv0.weight, net.conv0.bias), 0.3)  # 3 -> n = 3: blends
        for block in net.blocks:
            for conv in block:
                y = _blend(y, conv_elu_ref(y, conv.weight, conv.bias, stride=conv.stride), 0.3)
        return torch.nn.functional.linear(y.flatten(1), net.fc.weight, net.fc.bias)

    z = torch.rand(2, 4, dtype=torch.float64) * 2 - 1
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(G(z), decoder(G.decoder, z))
    torch.testing.assert_close(D(x), decoder(D.decoder, encoder(D.encoder, x)))


def test_state_dict_keys_are_the_same_for_every_impl():
    cfg = ModelConfig(image_size=16, n=4, h=4, skip=True)
    assert Discriminator(cfg, impl="torch").state_dict().keys() == Discriminator(cfg, impl="triton").state_dict().keys()


VARIANTS = [
    dict(stride=1, upsample=1, skip=False, act=True, hw=6),
    dict(stride=2, upsample=1, skip=False, act=True, hw=6),
    dict(stride=1, upsample=2, skip=False, act=True, hw=3),
    dict(stride=1, upsample=2, skip=True, act=True, hw=3),
    dict(stride=1, upsample=1, skip=False, act=False, hw=5),
]


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(f"{k}{int(x)}" for k, x in v.items()))
def test_reference_op_gradcheck_float64(v):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, v["hw"], v["hw"], dtype=torch.float64, generator=g, requires_grad=True)
    skip = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True) if v["skip"] else None
    c_in = 3 + (2 if v["skip"] else 0)
    w = torch.randn(4, c_in, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(stride=v["stride"], upsample=v["upsample"], act=v["act"])
    inputs = (x, w, b) + ((skip,) if skip is not None else ())

    def ref(x, w, b, *s):
        return conv_elu_ref(x, w, b, skip=s[0] if s else None, **kw)

    # A per-sample scale of ones: without one the torch impl is conv_elu_ref itself, and only with one does it run
    # TorchConvELU's explicit backward (the algorithm the kernels mirror), checked here against numerical derivatives.
    ones = torch.ones(x.shape[0], dtype=torch.float64)

    def torch_op(x, w, b, *s):
        return ops.conv_elu(x, w, b, skip=s[0] if s else None, wgrad_scale=ones, impl="torch", **kw)

    assert torch.autograd.gradcheck(ref, inputs)
    assert torch.autograd.gradcheck(torch_op, inputs)
    torch.testing.assert_close(torch_op(*inputs), ref(*inputs))


def _conv_elu_by_hand(x, w, b, *, stride, upsample, skip, act):
    """The layer written out without F.interpolate, F.conv2d or F.elu: nearest upsampling as each pixel repeated,
    the skip repeated to x's size and put after x's channels, a 3x3 conv with one pixel of zero padding as a sum
    over its nine taps, ELU as y or exp(y) - 1."""
    x = x.repeat_interleave(upsample, 2).repeat_interleave(upsample, 3)
    if skip is not None:
        k = x.shape[-1] // skip.shape[-1]
        x = torch.cat([x, skip.repeat_interleave(k, 2).repeat_interleave(k, 3)], dim=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    h, w_out = (x.shape[-2] - 1) // stride + 1, (x.shape[-1] - 1) // stride + 1
    y = b.view(1, -1, 1, 1).expand(x.shape[0], -1, h, w_out).clone()
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride]
            y = y + torch.einsum("bchw,oc->bohw", window, w[:, :, i, j])
    return torch.where(y > 0, y, torch.exp(y) - 1) if act else y


@pytest.mark.parametrize(
    "v",
    [
        *VARIANTS,
        dict(stride=2, upsample=1, skip=False, act=True, hw=7),
        dict(stride=1, upsample=2, skip=4, act=True, hw=4),
    ],
    ids=lambda v: "-".join(f"{k}{int(x)}" for k, x in v.items()),
)
def test_reference_op_is_the_layer_written_out_by_hand(v):
    """The reference layer against the same layer from first principles: the gradcheck above compares it with
    TorchConvELU, another version written on the same torch ops. Skips at half and at a quarter of x's upsampled
    size (the decoder's h0 at its later scales), odd sizes at stride 2."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, v["hw"], v["hw"], dtype=torch.float64, generator=g)
    factor = int(v["skip"]) if v["skip"] > 1 else 2  # the upsampled x is this many times the skip's size
    side = v["hw"] * v["upsample"] // factor
    skip = torch.randn(2, 2, side, side, dtype=torch.float64, generator=g) if v["skip"] else None
    w = torch.randn(4, 3 + (2 if v["skip"] else 0), 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    kw = dict(stride=v["stride"], upsample=v["upsample"], skip=skip, act=v["act"])
    torch.testing.assert_close(conv_elu_ref(x, w, b, **kw), _conv_elu_by_hand(x, w, b, **kw))


def test_wgrad_scale_scales_weight_grads_per_sample_and_leaves_input_grads():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    seed = torch.randn(3, 6, 5, 5, dtype=torch.float64, generator=g)
    scale = torch.tensor([1.0, -0.3, 2.0], dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad((ops.conv_elu(x, w, b, wgrad_scale=scale, impl="torch") * seed).sum(), (x, w, b))
    per_sample = [
        torch.autograd.grad((conv_elu_ref(x[i : i + 1], w, b) * seed[i : i + 1]).sum(), (w, b)) for i in range(3)
    ]
    torch.testing.assert_close(gw, sum(s * p[0] for s, p in zip(scale, per_sample, strict=True)))
    torch.testing.assert_close(gb, sum(s * p[1] for s, p in zip(scale, per_sample, strict=True)))
    torch.testing.assert_close(gx, torch.autograd.grad((conv_elu_ref(x, w, b) * seed).sum(), x)[0])


def test_linear_wgrad_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    seed = torch.randn(4, 3, dtype=torch.float64, generator=g)
    gx, gw, gb = torch.autograd.grad((ops.linear(x, w, b, wgrad_scale=scale) * seed).sum(), (x, w, b))
    torch.testing.assert_close(gw, (seed * scale[:, None]).t() @ x)
    torch.testing.assert_close(gb, (seed * scale[:, None]).sum(0))
    torch.testing.assert_close(gx, seed @ w)
    # Without a bias, and with only the weight's gradient asked for (a review helper: a bias gradient was returned)
    (gw_alone,) = torch.autograd.grad((ops.linear(x.detach(), w, None, wgrad_scale=scale) * seed).sum(), (w,))
    torch.testing.assert_close(gw_alone, gw)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_wgrad_scale_of_another_shape_than_the_batch_is_refused(impl):
    """One scale per sample, for both impls: PyTorch's would broadcast a (1,) scale where the kernels refuse it."""
    x, weight = torch.randn(4, 3, 6, 6), torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"^conv_elu: wgrad_scale must have shape \(4,\), got \(1,\)$"):
        ops.conv_elu(x, weight, torch.randn(2), wgrad_scale=torch.ones(1), impl=impl)


def test_a_linear_wgrad_scale_of_another_shape_than_the_batch_is_refused():
    """ops.linear has one impl, PyTorch's, which would broadcast a (1,) scale."""
    with pytest.raises(ValueError, match=r"^linear: wgrad_scale must have shape \(4,\), got \(1,\)$"):
        ops.linear(torch.randn(4, 5), torch.randn(3, 5), torch.randn(3), wgrad_scale=torch.ones(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stride=3), "stride, upsample"),
        (dict(stride=2, upsample=2), "not both 2"),
        (dict(weight_cin=5), "weight must be"),
    ],
)
def test_conv_elu_rejects_bad_arguments(kwargs, message):
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(2, kwargs.pop("weight_cin", 4), 3, 3)
    with pytest.raises(ValueError, match=message):
        ops.conv_elu(x, w, torch.zeros(2), impl="torch", **kwargs)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_conv_elu_refuses_a_skip_of_another_batch(impl):
    """The skip's batch must be x's: the kernels would read past the end of a smaller skip tensor."""
    gen = torch.Generator().manual_seed(5)
    x, skip = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(1, 2, 4, 4, generator=gen)
    weight, bias = torch.randn(3, 6, 3, 3, generator=gen), torch.randn(3, generator=gen)
    with pytest.raises(ValueError, match="must match x's batch"):
        ops.conv_elu(x, weight, bias, upsample=2, skip=skip, impl=impl)


def test_impl_env_override(monkeypatch):
    monkeypatch.setenv(ops.IMPL_ENV, "torch")
    assert ops.resolve_impl("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv(ops.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match="BEGAN_FAST_IMPL"):
        ops.resolve_impl("auto", torch.device("cpu"))
    assert ops.resolve_impl("triton", torch.device("cpu")) == "triton"


def test_an_unknown_impl_is_refused_not_taken_for_pytorch():
    """A misspelt impl (impl="trition") is an error, not a silent run on PyTorch's ops."""
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = (torch.randn(shape, generator=gen) for shape in ((2, 4, 5, 5), (3, 4, 3, 3), (3,)))
    for impl in ("trition", "Torch", ""):
        with pytest.raises(ValueError, match="impl must be one of"):
            ops.resolve_impl(impl, torch.device("cpu"))
        with pytest.raises(ValueError, match="impl must be one of"):
            ops.conv_elu(x, weight, bias, impl=impl)


def test_auto_is_triton_on_cuda_and_pytorch_elsewhere(monkeypatch):
    """Without BEGAN_FAST_IMPL, impl="auto" takes the Triton kernels on a CUDA device only (on a CPU they would run
    through Triton's interpreter, or not at all); an explicit impl is taken as given."""
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    assert ops.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert ops.resolve_impl("auto", torch.device("cuda")) == ("triton" if ops.triton_available() else "torch")
    assert ops.resolve_impl("torch", torch.device("cuda")) == "torch"


def test_without_triton_the_ops_fall_back_to_pytorch_with_one_warning(monkeypatch, recwarn):
    """Asked for Triton where it cannot be imported, every op runs on PyTorch, and the process is told once, not at
    every layer of every step."""
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    ops._warn_fallback.cache_clear()  # once per reason and process: another test may have warned already
    for device in ("cuda", "cpu"):
        assert ops.resolve_impl("triton", torch.device(device)) == "torch"
        assert ops.resolve_impl("auto", torch.device(device)) == "torch"
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = (torch.randn(shape, generator=gen) for shape in ((2, 4, 5, 5), (3, 4, 3, 3), (3,)))
    for _ in range(2):
        torch.testing.assert_close(ops.conv_elu(x, weight, bias, impl="triton"), conv_elu_ref(x, weight, bias))
    fallbacks = [str(w.message) for w in recwarn.list if str(w.message).startswith("began_fast")]
    assert fallbacks == ["began_fast: impl='triton' unavailable (triton is not installed); using impl='torch'"]
    ops._warn_fallback.cache_clear()
