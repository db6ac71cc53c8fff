"""Autograd Functions for the conv3x3+bias+ELU layer op (see ops.conv_elu).

`TorchConvELU` computes the layer with PyTorch's conv primitives and an explicit backward that matches the
fused kernels' algorithm: ELU's derivative from the saved output (y > 0 ? 1 : y + 1), the input gradient
mapped back through the upsample / skip-concat, and an optional per-sample scale on the weight and bias
gradients only (the fast step gives the fake half of a [real; fake] batch the weight -k_t there while its
input gradient flows unscaled into G). ops.conv_elu runs it where such a scale is given; without one, the torch
impl is reference.conv_elu_ref on plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def build_conv_input(x: torch.Tensor, skip: torch.Tensor | None, upsample: int) -> torch.Tensor:
    """The conv's logical input: x nearest-upsampled, then skip nearest-upsampled to that size and concatenated."""
    if upsample != 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    if skip is not None:
        x = torch.cat([x, F.interpolate(skip, size=x.shape[-2:], mode="nearest")], dim=1)
    return x


def sum_nearest_blocks(grad: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adjoint of nearest upsampling from `size`: sum each (fh x fw) block of `grad`."""
    b, c, hh, ww = grad.shape
    fh, fw = hh // size[0], ww // size[1]
    if fh == 1 and fw == 1:
        return grad
    return grad.reshape(b, c, size[0], fh, size[1], fw).sum(dim=(3, 5))


def elu_grad_from_output(grad_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d elu(a)/da expressed through y = elu(a): 1 where y > 0, exp(a) = y + 1 elsewhere (alpha = 1).

    PyTorch's own ELU backward in its from-the-result form computes exactly this, in one fused op."""
    return torch.ops.aten.elu_backward(grad_out, 1.0, 1.0, 1.0, True, y)


def scale_per_sample(grad: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return grad if scale is None else grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))


class TorchConvELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, weight, bias, wgrad_scale, stride, upsample, act):
        inp = build_conv_input(x, skip, upsample)
        y = F.conv2d(inp, weight, bias, stride=stride, padding=1)
        if act:
            y = F.elu(y)
        ctx.save_for_backward(x, skip, weight, y, wgrad_scale)
        ctx.conf = (stride, upsample, act, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, skip, weight, y, wgrad_scale = ctx.saved_tensors
        stride, upsample, act, has_bias = ctx.conf
        g = elu_grad_from_output(grad_y, y) if act else grad_y
        inp = build_conv_input(x, skip, upsample)
        grad_x = grad_skip = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_inp = torch.nn.grad.conv2d_input(inp.shape, weight, g, stride=stride, padding=1)
            c1 = x.shape[1]
            grad_x = sum_nearest_blocks(grad_inp[:, :c1], x.shape[-2:])
            if skip is not None:
                grad_skip = sum_nearest_blocks(grad_inp[:, c1:], skip.shape[-2:])
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            gs = scale_per_sample(g, wgrad_scale)
            grad_w = torch.nn.grad.conv2d_weight(inp, weight.shape, gs, stride=stride, padding=1)
            grad_b = gs.sum(dim=(0, 2, 3)) if has_bias else None
        return grad_x, grad_skip, grad_w, grad_b, None, None, None, None


class TritonConvELU(torch.autograd.Function):
    """The same layer on the fused Triton kernels of kernels/conv_elu.py, with TorchConvELU's backward algorithm.

    Activations run channels_last (any input layout is accepted and converted once); the output is
    channels_last in the activation dtype (ops.conv_elu has already cast x and skip to the autocast dtype under
    autocast). The weight may be of another float dtype (the float32 master copy under autocast): the forward
    packs it once into the activation dtype, and the input-gradient kernels read that same pack in backward. Weight
    and bias gradients are reduced in float32 and come back in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, skip, weight, bias, wgrad_scale, stride, upsample, act):
        from kernels.conv_elu import conv_elu_forward, pack_weight, unsupported

        reason = unsupported(x, skip, weight, stride, upsample)
        if reason is not None:
            raise ValueError(f"conv_elu(impl='triton'): {reason}")
        x = x.contiguous(memory_format=torch.channels_last)
        if skip is not None:
            skip = skip.to(x.dtype).contiguous(memory_format=torch.channels_last)
        w_packed = pack_weight(weight, x.dtype)
        y = conv_elu_forward(x, skip, w_packed, bias, stride, upsample, act)
        ctx.save_for_backward(x, skip, w_packed, y, wgrad_scale)
        ctx.conf = (stride, upsample, act, bias is not None, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from kernels.conv_elu import conv_elu_input_grad, conv_elu_weight_grad

        x, skip, w_packed, y, wgrad_scale = ctx.saved_tensors
        stride, upsample, act, has_bias, weight_dtype = ctx.conf
        # Once here, not in each kernel's launcher: a gradient from a non-conv op (the balance, a reshape) comes in
        # NCHW, and the input- and weight-gradient kernels both read it channels_last.
        grad_y = grad_y.to(dtype=y.dtype, memory_format=torch.channels_last)
        c1, c_in = x.shape[1], w_packed.shape[1]
        grad_x = grad_skip = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_elu_input_grad(grad_y, y, w_packed, (0, c1), x.shape[-2:], upsample, stride, act, x.dtype)
        if skip is not None and ctx.needs_input_grad[1]:
            # The skip's gradient on the conv's logical grid, then summed over each nearest-upsampled block.
            logical_size = (x.shape[2] * upsample, x.shape[3] * upsample)
            grad_logical = conv_elu_input_grad(
                grad_y, y, w_packed, (c1, c_in), logical_size, 1, stride, act, torch.float32
            )
            grad_skip = sum_nearest_blocks(grad_logical, skip.shape[-2:]).to(skip.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            want_bias = has_bias and ctx.needs_input_grad[3]
            grad_w, grad_b = conv_elu_weight_grad(x, skip, grad_y, y, wgrad_scale, stride, upsample, act, want_bias)
            grad_w = grad_w.to(weight_dtype)
            grad_b = None if grad_b is None else grad_b.to(weight_dtype)
        return grad_x, grad_skip, grad_w, grad_b, None, None, None, None
