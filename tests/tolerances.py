"""The one tolerance table of the test suite (docs/DESIGN.md section 5).

Parity rule: a fast result is compared with the float64 reference. In float64 and float32 it must be within
(atol, rtol) of it. In a low precision (bf16, fp16) its error against the float64 reference must be at most
2x the error of PyTorch's own result in the same precision, plus atol: we may not be worse than the framework
by more than a factor two. NaN never passes.

atol is relative to the reference's scale, its largest magnitude: the gradients of BEGAN's mean-L1 losses are
1e-5 to 1e-3, where a fixed atol of 1e-4 would pass a gradient of all zeros. In a low precision it is a floor
for the rare result whose PyTorch error is by chance near 0, kept at about half the output's own rounding (half
an ulp at the largest magnitude is 2^-9 = 2e-3 of it in bf16, 2^-12 = 2.4e-4 in fp16), so that the bound stays
near 2x: one op's error measured 0.2x to 1.5x PyTorch's over the layer tests, while float32 accumulation done in
bf16 or fp16 instead measured 2.5x to 8x.

A whole training step (`compounded=True`) differs: a gradient there passes through every layer of G and D, and
where the roundings fall differs between PyTorch's ops and the kernels, so the ratio of the errors scatters (0.1x
to 9x over 6 seeds, and thousands where PyTorch's error is by chance tiny). Its row judges each gradient against
a share of its own scale instead; the per-op rule above is what pins each kernel's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float64: Tol(1e-10, 1e-9, "same math, summation order differs: only float64 rounding"),
    torch.float32: Tol(
        1e-5,
        1e-5,
        "float32 accumulation in a different order over up to 9*C*B terms: measured at most 3e-7 of the scale for one "
        "op and about 1e-6 for a whole step (interpreter, CPU), where TF32 rounding is 1e-3",
    ),
    torch.bfloat16: Tol(1e-3, 0.0, "one bf16 op (8-bit mantissa): 2x torch's bf16 error, floor half an output ulp"),
    torch.float16: Tol(1e-4, 0.0, "one fp16 op (11-bit mantissa): 2x torch's fp16 error, floor half an output ulp"),
}
# A whole step in a low precision: the errors of ~20 bf16 or fp16 layers compound along different rounding paths.
COMPOUNDED: dict[torch.dtype, Tol] = {
    torch.bfloat16: Tol(2e-2, 0.0, "a whole bf16 step: 2x torch's error plus 2% of the gradient's scale"),
    torch.float16: Tol(2.5e-3, 0.0, "a whole fp16 step: the bf16 row scaled by 2^-3 for fp16's 3 more mantissa bits"),
}


def assert_parity(
    fast: torch.Tensor,
    ref64: torch.Tensor,
    torch_same: torch.Tensor | None = None,
    *,
    name: str = "result",
    compounded: bool = False,
) -> None:
    """Check `fast` against the float64 reference `ref64` under the rule above.

    torch_same: PyTorch's own result in fast's dtype; needed for bf16 and fp16. compounded: `fast` is the result
    of a whole step in a low precision, not of one op.
    """
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(fast).any(), f"{name}: NaN in the fast result"
    tol = COMPOUNDED[fast.dtype] if compounded else TOLERANCES[fast.dtype]
    fast64, ref64 = fast.double(), ref64.double()
    atol = tol.atol * ref64.abs().max().item()
    if fast.dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(fast64, ref64, atol=atol, rtol=tol.rtol, msg=lambda m: f"{name}: {m}")
        return
    assert torch_same is not None, f"{name}: a {fast.dtype} comparison needs PyTorch's same-precision result"
    err_fast = (fast64 - ref64).abs().max().item()
    err_torch = (torch_same.double() - ref64).abs().max().item()
    assert err_fast <= 2 * err_torch + atol, (
        f"{name}: {fast.dtype} error {err_fast:.3g} > 2 x torch's {err_torch:.3g} + atol {atol:.3g}"
    )
