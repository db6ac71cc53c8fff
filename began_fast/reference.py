"""The specification: BEGAN's layer op and objective in plain PyTorch autograd.

Every fast implementation (the Triton kernels in kernels/, the fused step) is checked against these
functions. They are written for clarity, not speed: each one is the math of docs/DESIGN.md, sections 2 and 3.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def conv_elu_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: int = 1,
    upsample: int = 1,
    skip: torch.Tensor | None = None,
    act: bool = True,
) -> torch.Tensor:
    """One BEGAN layer: [nearest upsample] -> [concat nearest-upsampled skip] -> conv3x3 (pad 1) + bias -> [ELU].

    x: (B, C1, H, W). skip: (B, C2, h, w) with h, w dividing the upsampled size, or None.
    weight: (Cout, C1 + C2, 3, 3). The output is (B, Cout, H*upsample/stride, W*upsample/stride).
    """
    if upsample != 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    if skip is not None:
        x = torch.cat([x, F.interpolate(skip, size=x.shape[-2:], mode="nearest")], dim=1)
    y = F.conv2d(x, weight, bias, stride=stride, padding=1)
    return F.elu(y) if act else y


class BalanceResult(NamedTuple):
    """One step's BEGAN statistics; all are 0-dim float32 tensors."""

    l_real: torch.Tensor  # mean |x - D(x)|
    l_fake: torch.Tensor  # mean |G(z) - D(G(z))|
    l_d: torch.Tensor  # L_real - k_t * L_fake
    l_g: torch.Tensor  # L_fake
    k_next: torch.Tensor  # clamp(k_t + lambda_k * (gamma * L_real - L_fake), 0, 1)
    m: torch.Tensor  # L_real + |gamma * L_real - L_fake|


def began_objective(
    x: torch.Tensor,
    rx: torch.Tensor,
    fake: torch.Tensor,
    rfake: torch.Tensor,
    k: torch.Tensor | float,
    gamma: float,
    lambda_k: float,
) -> BalanceResult:
    """BEGAN's losses, the k_t update and the convergence measure M (docs/DESIGN.md section 3).

    x, rx: real images and D's reconstructions; fake, rfake: G(z) and D(G(z)); all (B, 3, S, S).
    k: k_t, a float or a 0-dim tensor. The losses carry autograd; k_next and m are detached statistics.
    Which loss reaches which network is the training step's business (see step.py).
    """
    return began_balance((x - rx).abs().mean(), (fake - rfake).abs().mean(), k, gamma, lambda_k)


def began_balance(
    l_real: torch.Tensor, l_fake: torch.Tensor, k: torch.Tensor | float, gamma: float, lambda_k: float
) -> BalanceResult:
    """began_objective from its two L1 losses (0-dim tensors): L_D and L_G carry the losses' autograd, k_next and M
    are detached. Also the global balance of a torchrun job, from the losses averaged over the ranks."""
    k = torch.as_tensor(k, dtype=l_real.dtype, device=l_real.device)
    balance = gamma * l_real.detach() - l_fake.detach()
    k_next = torch.clamp(k + lambda_k * balance, 0.0, 1.0)
    m = l_real.detach() + balance.abs()
    return BalanceResult(l_real, l_fake, l_real - k * l_fake, l_fake, k_next, m)
