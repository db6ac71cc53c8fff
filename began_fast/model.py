"""BEGAN's generator and discriminator (docs/DESIGN.md section 2), built once from the ops in ops.py.

The parameters and state_dict keys are the same whichever impl runs the layers, so a checkpoint moves freely
between impl="torch" and impl="triton". Layer names: `decoder.fc`, `decoder.blocks.{i}.{0,1}`, `decoder.out`,
`encoder.conv0`, `encoder.blocks.{i}.{0,1[,2]}` (2 is the stride-2 subsampling), `encoder.fc`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from began_fast import ops
from began_fast.config import ModelConfig


class ConvELU(nn.Module):
    """conv3x3 + bias (+ ELU), with the op's optional upsample, stride and skip concat. Weight (Cout, Cin, 3, 3)."""

    def __init__(self, c_in, c_out, *, stride=1, upsample=1, skip_channels=0, act=True, impl="auto"):
        super().__init__()
        self.stride, self.upsample, self.act, self.impl = stride, upsample, act, impl
        self.weight = nn.Parameter(torch.empty(c_out, c_in + skip_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(c_out))
        # nn.Conv2d's default initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        # A vanishing residual blends this layer with its input; only where input and output shapes agree.
        self.blendable = act and c_in == c_out and stride == 1 and upsample == 1 and skip_channels == 0

    def forward(self, x, skip=None, wgrad_scale=None):
        return ops.conv_elu(
            x,
            self.weight,
            self.bias,
            stride=self.stride,
            upsample=self.upsample,
            skip=skip,
            act=self.act,
            wgrad_scale=wgrad_scale,
            impl=self.impl,
        )

    def extra_repr(self):
        c_out, c_in = self.weight.shape[:2]
        return f"{c_in}->{c_out}, stride={self.stride}, upsample={self.upsample}, act={self.act}"


class Linear(nn.Linear):
    """nn.Linear with the per-sample weight-gradient scale of ops.linear."""

    def forward(self, x, wgrad_scale=None):
        return ops.linear(x, self.weight, self.bias, wgrad_scale=wgrad_scale)


class _Network(nn.Module):
    """Shared by the encoder and decoder: the vanishing-residual carry and the per-layer blend."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vanishing_residual = cfg.vanishing_residual
        # carry in [0, 1], the input's weight in each blended layer; set by the training step (set_carry), kept
        # as a device tensor so a captured CUDA graph reads its current value. Derived from the step, not saved.
        self.register_buffer("carry", torch.ones(()), persistent=False)

    def layer(self, conv: ConvELU, x, wgrad_scale, skip=None):
        y = conv(x, skip=skip, wgrad_scale=wgrad_scale)
        if self.vanishing_residual and conv.blendable:
            carry = self.carry.to(y.dtype)
            y = carry * x + (1 - carry) * y
        return y


class Decoder(_Network):
    """v (B, v_dim) -> image (B, 3, S, S). fc to n x 8 x 8 (h0), two ELU convs per scale, x2 upsample between
    scales (folded into the next scale's first conv), with skip=True h0 concatenated at every scale >= 1."""

    def __init__(self, cfg: ModelConfig, v_dim: int, impl: str = "auto"):
        super().__init__(cfg)
        n = cfg.n
        self.n, self.skip, self.impl = n, cfg.skip, impl
        self.fc = Linear(v_dim, 8 * 8 * n)
        blocks = []
        for i in range(cfg.num_scales):
            first = ConvELU(n, n, upsample=2 if i > 0 else 1, skip_channels=n if (cfg.skip and i > 0) else 0, impl=impl)
            blocks.append(nn.ModuleList([first, ConvELU(n, n, impl=impl)]))
        self.blocks = nn.ModuleList(blocks)
        self.out = ConvELU(n, 3, act=False, impl=impl)

    def forward(self, v, wgrad_scale=None):
        h0 = self.fc(v, wgrad_scale).view(-1, self.n, 8, 8)
        h0 = ops.prepare_activation(h0, self.impl)
        x = h0
        for i, (first, second) in enumerate(self.blocks):
            x = self.layer(first, x, wgrad_scale, skip=h0 if (self.skip and i > 0) else None)
            x = self.layer(second, x, wgrad_scale)
        return self.out(x, wgrad_scale=wgrad_scale)


class Encoder(_Network):
    """image (B, 3, S, S) -> embedding (B, h). A 3->n ELU conv, then per scale i (c = n*(i+1)) two ELU convs
    and, between scales, a stride-2 ELU conv; flatten c x 8 x 8 and fc to h."""

    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__(cfg)
        n = cfg.n
        self.impl = impl
        self.conv0 = ConvELU(3, n, impl=impl)
        blocks, c_prev = [], n
        for i in range(cfg.num_scales):
            c = n * (i + 1)
            layers = [ConvELU(c_prev, c, impl=impl), ConvELU(c, c, impl=impl)]
            if i < cfg.num_scales - 1:
                layers.append(ConvELU(c, c, stride=2, impl=impl))
            blocks.append(nn.ModuleList(layers))
            c_prev = c
        self.blocks = nn.ModuleList(blocks)
        self.fc = Linear(c_prev * 8 * 8, cfg.h)

    def forward(self, x, wgrad_scale=None):
        x = self.layer(self.conv0, ops.prepare_activation(x, self.impl), wgrad_scale)
        for block in self.blocks:
            for conv in block:
                x = self.layer(conv, x, wgrad_scale)
        # reshape (not view): a channels_last activation flattens in the reference's (C, H, W) order this way.
        return self.fc(x.reshape(x.shape[0], -1), wgrad_scale)


class Generator(nn.Module):
    """G(z): a Decoder of z (B, z_size) in [-1, 1] to images (B, 3, S, S)."""

    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg, cfg.z_size, impl)

    def forward(self, z):
        return self.decoder(z)

    def set_carry(self, carry: torch.Tensor | float) -> None:
        self.decoder.carry.copy_(torch.as_tensor(carry, dtype=torch.float64))


class Discriminator(nn.Module):
    """D(x) = Decoder(Encoder(x)): BEGAN's auto-encoder. wgrad_scale (B,) scales each sample's weight gradients."""

    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, impl)
        self.decoder = Decoder(cfg, cfg.h, impl)

    def forward(self, x, wgrad_scale=None):
        return self.decoder(self.encoder(x, wgrad_scale), wgrad_scale)

    def set_carry(self, carry: torch.Tensor | float) -> None:
        for net in (self.encoder, self.decoder):
            net.carry.copy_(torch.as_tensor(carry, dtype=torch.float64))


def carry_at(step: int | torch.Tensor, cfg: ModelConfig):
    """The vanishing residual's input weight at `step`: 1 at step 0, falling linearly to 0 at carry_steps.
    A step tensor gives a float64 tensor: the networks' carry buffers then round it as they round a Python float."""
    if torch.is_tensor(step):
        return torch.clamp(1 - step.double() / cfg.carry_steps, min=0.0)
    return max(0.0, 1.0 - step / cfg.carry_steps)


def carry_after(steps_done: int, cfg: ModelConfig) -> float:
    """The carry of a model that has done `steps_done` steps: the one its last update ran under (each step sets its
    own at its start, from the steps done before it), which the run's pictures and evaluations at that step used."""
    return carry_at(max(steps_done - 1, 0), cfg)
