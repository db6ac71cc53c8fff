"""Autograd over the fused balance kernels (kernels/balance.py): BEGAN's losses, k_t update and M in one op.

`triton_began_balance` returns a reference.BalanceResult with the semantics of reference.began_objective
(l_real, l_fake carry autograd; l_d = l_real - k_t * l_fake and l_g = l_fake are differentiable through them;
k_next and m are detached; all six are 0-dim float32 views of one stats vector on the device). k is left as it
is: the training step writes k_next into its k_t itself, since an fp16 step with overflowed gradients keeps the
old k_t and a torchrun step first averages the losses over the ranks.

k is a constant for autograd; the backward uses the k_t the forward read, even if k has changed since. Inputs in
different memory formats are first brought to rx's (the reconstructions come out of D in the layout the kernels
produce), so the kernels read four tensors of one layout.
"""

from __future__ import annotations

import torch

from began_fast.reference import BalanceResult
from kernels.balance import BalanceInputError, balance_backward, balance_forward


class BEGANBalance(torch.autograd.Function):
    """(x, rx, fake, rfake) -> stats (6,) float32 [l_real, l_fake, l_d, l_g, k_next, m]; see kernels/balance.py."""

    @staticmethod
    def forward(ctx, x, rx, fake, rfake, k, gamma, lambda_k):
        stats, k_used = balance_forward(x, rx, fake, rfake, k, gamma, lambda_k)
        ctx.save_for_backward(x, rx, fake, rfake, k_used)
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        x, rx, fake, rfake, k_used = ctx.saved_tensors
        grad_stats = grad_stats.to(torch.float32).contiguous()
        grads = balance_backward(x, rx, fake, rfake, grad_stats, k_used, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None, None)


def _same_layout(x, rx, fake, rfake):
    """The four tensors in rx's memory format (channels_last or contiguous), copying only those not in it."""
    tensors = (x, rx, fake, rfake)
    channels_last = rx.dim() == 4 and rx.is_contiguous(memory_format=torch.channels_last) and not rx.is_contiguous()
    if channels_last and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return tensors
    if not channels_last and all(t.is_contiguous() for t in tensors):
        return tensors
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(t.contiguous(memory_format=fmt) for t in tensors)


def _result(stats: torch.Tensor) -> BalanceResult:
    l_real, l_fake, l_d, l_g, k_next, m = stats.unbind(0)
    return BalanceResult(l_real, l_fake, l_d, l_g, k_next.detach(), m.detach())


def triton_began_balance(
    x: torch.Tensor,
    rx: torch.Tensor,
    fake: torch.Tensor,
    rfake: torch.Tensor,
    k: torch.Tensor | float,
    gamma: float,
    lambda_k: float,
) -> BalanceResult:
    """BEGAN's losses, k_t update and M; arguments and result as reference.began_objective, k left unchanged.

    x, rx, fake, rfake: (B, 3, S, S), one dtype in float32/bfloat16/float16, one device. k: float or 0-dim tensor.
    """
    if torch.is_tensor(k) and k.numel() != 1:
        raise BalanceInputError(f"began balance: k must be a float or a 0-dim tensor, got shape {tuple(k.shape)}")
    k = torch.as_tensor(k, dtype=torch.float32, device=rx.device).reshape(())
    return _result(BEGANBalance.apply(*_same_layout(x, rx, fake, rfake), k, gamma, lambda_k))
