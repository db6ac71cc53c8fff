"""The autograd Function behind ops.linear with a per-sample weight-gradient scale."""

from __future__ import annotations

import torch


class ScaledLinear(torch.autograd.Function):
    """y = x W^T + b whose weight and bias gradients weigh each sample's share by wgrad_scale (B,); the input
    gradient is unscaled. D's fc layers in the fast step's single D pass over [x; fake]: the fake half's weight
    gradients get -k_t (L_D = L_real - k_t L_fake) while the gradient that flows on to G stays that of L_fake."""

    @staticmethod
    def forward(ctx, x, weight, bias, wgrad_scale):
        ctx.save_for_backward(x, weight, wgrad_scale)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scale = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]  # no bias (None) needs none
        grad_x = grad_y @ weight if needs_x else None
        gs = grad_y * scale.to(grad_y.dtype)[:, None]
        return grad_x, gs.t() @ x if needs_weight else None, gs.sum(0) if needs_bias else None, None
