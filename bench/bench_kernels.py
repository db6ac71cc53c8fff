"""Kernel benchmarks (GPU only): every distinct conv layer of the paper models, and the balance op.

Conv layers are not typed here: they are read off began_fast.model by a forward pre-hook on every ConvELU of G and
D during one batch-1 CPU forward of each model in MODELS, and deduplicated (G's decoder and D's decoder share most
layers, the 64 and 128 px models share their low scales). Each layer runs at every batch in BATCHES and every
direction (forward with autograd recording as in training; backward of a saved forward; both), on bf16
channels_last activations and weights, with three providers:

- torch: reference.conv_elu_ref in eager mode (cuDNN conv, then bias and ELU as separate kernels);
- compile: torch.compile of the same function, default mode (cuDNN conv with bias and ELU fused by Inductor; the
  step benchmark's max-autotune would autotune conv templates for each of some 230 cases);
- triton: ops.conv_elu(impl="triton"), the fused kernels.

The balance op (L1 losses, k_t, M) runs against the eager and compiled reference.began_objective at each model's
image size. A round is CALLS_PER_ROUND calls back to back, then a synchronize. Each call is an eager call: for the
smallest layers (a few microseconds of GPU work) the times are the host's (Python, autograd, the launch), which a
training step replayed from a CUDA graph does not pay; and the same tensors every call may stay in the GPU's L2
cache (50 to 60 MB on an H100 / H200), as a layer's input often has in training. Run and report: see bench/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("bench/bench_kernels.py needs an NVIDIA GPU (CUDA is not available)", allow_module_level=True)

from began_fast import ops
from began_fast.balance_function import triton_began_balance
from began_fast.config import get_preset
from began_fast.model import ConvELU, Discriminator, Generator
from began_fast.reference import began_objective, conv_elu_ref

MODELS = {
    "paper64": get_preset("paper64").model,
    "paper128": get_preset("paper128").model,
    # The paper's skip connections add the upsample + skip-concat layers the defaults do not have.
    "paper64-skip": dataclasses.replace(get_preset("paper64").model, skip=True),
}
BATCHES = (16, 64)
DIRECTIONS = ("forward", "backward", "both")
PROVIDERS = ("torch", "compile", "triton")
DTYPE = torch.bfloat16
GAMMA, LAMBDA_K = 0.5, 0.001
CALLS_PER_ROUND, ROUNDS, WARMUP_ROUNDS = 10, 10, 3  # 130 calls a case (about 700 cases)

# As a training run would: let cuDNN pick its fastest algorithm per shape.
torch.backends.cudnn.benchmark = True


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One ConvELU as it runs: x (B, c_in, *size), skip (B, skip_channels, *skip_size) or none, output c_out."""

    c_in: int
    skip_channels: int
    c_out: int
    stride: int
    upsample: int
    act: bool
    size: tuple[int, int]
    skip_size: tuple[int, int] | None

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(s * self.upsample // self.stride for s in self.size)

    def flop(self, batch: int) -> int:
        """Forward FLOPs: 2 * B * Ho * Wo * Cout * Cin * 9 (Cin counting the skip channels)."""
        return 2 * batch * math.prod(self.out_size) * self.c_out * (self.c_in + self.skip_channels) * 9

    def describe(self) -> str:
        skip = f"+{self.skip_channels}@{self.skip_size[0]}" if self.skip_channels else ""
        variant = " s2" if self.stride == 2 else ""
        variant += (" up2" if self.upsample == 2 else "") + ("" if self.act else " no-elu")
        return f"{self.c_in}{skip}->{self.c_out} @{self.size[0]}x{self.size[1]}{variant}"


def distinct_conv_layers(models: dict) -> dict[ConvLayer, list[str]]:
    """Every distinct ConvELU of G and D of each model config, with the names of the modules that run it."""
    layers: dict[ConvLayer, list[str]] = {}

    def record(name, module, args, kwargs):
        x, skip = args[0], kwargs.get("skip")
        skip_channels = 0 if skip is None else skip.shape[1]
        c_out, c_in_total = module.weight.shape[:2]
        layer = ConvLayer(
            c_in=c_in_total - skip_channels,
            skip_channels=skip_channels,
            c_out=c_out,
            stride=module.stride,
            upsample=module.upsample,
            act=module.act,
            size=tuple(x.shape[2:]),
            skip_size=None if skip is None else tuple(skip.shape[2:]),
        )
        layers.setdefault(layer, []).append(name)

    for model_name, cfg in models.items():
        generator, discriminator = Generator(cfg, impl="torch"), Discriminator(cfg, impl="torch")
        for net_name, net in (("G", generator), ("D", discriminator)):
            for name, module in net.named_modules():
                if isinstance(module, ConvELU):
                    hook = functools.partial(record, f"{model_name}/{net_name}.{name}")
                    module.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            discriminator(generator(torch.zeros(1, cfg.z_size)))
    return layers


CONV_LAYERS = distinct_conv_layers(MODELS)


def timed_work(direction: str, forward, leaves: list[torch.Tensor]):
    """The work one timed call does: forward() as in training; backward of one saved forward; or both.

    forward() returns the tensor to differentiate; leaves are the tensors whose gradients it produces.
    """
    if direction == "forward":
        return forward
    out = forward()
    grad_out = torch.randn_like(out)

    def clear_grads():
        for t in leaves:
            t.grad = None

    if direction == "backward":

        def backward():
            clear_grads()
            out.backward(grad_out, retain_graph=True)

        return backward

    def both():
        clear_grads()
        forward().backward(grad_out)

    return both


def compiled(fn):
    """torch.compile of fn for one static shape, from a clean cache (each case compiles its own graph)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def conv_op(provider: str, layer: ConvLayer):
    """op(x, weight, bias, skip=None) for one provider, with the layer's stride, upsample and act bound."""
    conf = {"stride": layer.stride, "upsample": layer.upsample, "act": layer.act}
    if provider == "triton":
        return lambda x, weight, bias, skip=None: ops.conv_elu(x, weight, bias, skip=skip, impl="triton", **conf)

    def reference(x, weight, bias, skip=None):
        return conv_elu_ref(x, weight, bias, skip=skip, **conf)

    return compiled(reference) if provider == "compile" else reference


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", list(CONV_LAYERS), ids=lambda layer: CONV_LAYERS[layer][0])
def test_conv_elu(measure, layer, batch, direction, provider):
    device = torch.device("cuda")

    def activation(channels, size):
        t = torch.randn(batch, channels, *size, device=device, dtype=DTYPE)
        return t.contiguous(memory_format=torch.channels_last).requires_grad_()

    x = activation(layer.c_in, layer.size)
    skip = activation(layer.skip_channels, layer.skip_size) if layer.skip_channels else None
    c_in = layer.c_in + layer.skip_channels
    weight = torch.randn(layer.c_out, c_in, 3, 3, device=device, dtype=DTYPE) / math.sqrt(9 * c_in)
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = (0.1 * torch.randn(layer.c_out, device=device, dtype=DTYPE)).requires_grad_()
    op = conv_op(provider, layer)
    leaves = [t for t in (x, skip, weight, bias) if t is not None]
    work = timed_work(direction, lambda: op(x, weight, bias, skip=skip), leaves)

    # Minimal traffic of a fused layer: forward reads x, skip, weight, bias and writes y; backward reads dy, y, x,
    # skip, weight and writes their gradients.
    elt = x.element_size()
    y_numel = layer.c_out * batch * math.prod(layer.out_size)
    inputs_numel = sum(t.numel() for t in leaves)
    bytes_moved = {"forward": inputs_numel + y_numel, "backward": 2 * y_numel + 2 * inputs_numel}
    bytes_moved["both"] = bytes_moved["forward"] + bytes_moved["backward"]
    flop = {"forward": 1, "backward": 2, "both": 3}[direction] * layer.flop(batch)
    shape = f"x({batch},{layer.c_in},{layer.size[0]},{layer.size[1]})"
    if skip is not None:
        shape += f" skip({batch},{layer.skip_channels},{layer.skip_size[0]},{layer.skip_size[1]})"
    measure(
        work,
        calls=CALLS_PER_ROUND,
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
        flop=flop,
        bytes=elt * bytes_moved[direction],
        layer=f"{CONV_LAYERS[layer][0]} {layer.describe()}",
        shape=f"{shape} -> ({batch},{layer.c_out},{layer.out_size[0]},{layer.out_size[1]})",
        uses=CONV_LAYERS[layer],
        direction=direction,
        batch=batch,
        provider=provider,
    )


BALANCE_SIZES = sorted({cfg.image_size for cfg in MODELS.values()})


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", BALANCE_SIZES, ids=lambda s: f"{s}px")
def test_balance(measure, size, batch, direction, provider):
    device = torch.device("cuda")
    shape = (batch, 3, size, size)

    def image(requires_grad):
        t = (2 * torch.rand(shape, device=device, dtype=DTYPE) - 1).contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    # As in the training step: the real images x need no gradient; D(x), G(z) and D(G(z)) do.
    x, rx, fake, rfake = image(False), image(True), image(True), image(True)
    k = torch.tensor(0.5, device=device)
    objective = {"torch": began_objective, "triton": triton_began_balance}.get(provider) or compiled(began_objective)

    def forward():
        result = objective(x, rx, fake, rfake, k, GAMMA, LAMBDA_K)
        return result.l_d + result.l_g

    work = timed_work(direction, forward, [rx, fake, rfake])
    elt, n = x.element_size(), x.numel()
    # Forward reads the four images; backward reads them again and writes three gradients.
    bytes_moved = {"forward": 4 * n, "backward": 7 * n, "both": 11 * n}[direction]
    measure(
        work,
        calls=CALLS_PER_ROUND,
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
        flop=None,
        bytes=elt * bytes_moved,
        layer=f"balance {size}px",
        shape=f"4 x ({batch},3,{size},{size})",
        direction=direction,
        batch=batch,
        provider=provider,
    )
