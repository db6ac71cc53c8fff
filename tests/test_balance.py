"""The fused balance op (kernels/balance.py, began_fast/balance_function.py) against reference.began_objective.

Losses are scaled by N = B*3*S*S before the backward so every input gradient is O(1) (+-coefficient or 0): a
wrong sign, a missing term or a stale k_t then moves a gradient by about 1, far outside every tolerance.
"""

import pytest
import torch

from began_fast import balance_function, ops
from began_fast.balance_function import triton_began_balance
from began_fast.reference import began_objective
from kernels.balance import STATS, BalanceInputError, balance_backward, balance_forward
from tests.tolerances import assert_parity

GAMMA, LAMBDA_K = 0.5, 0.001
# Coefficients of LOSS_TERMS in the loss whose gradients are checked.
LOSS_TERMS = ("l_real", "l_fake", "l_d", "l_g")
LOSSES = {
    "l_real+l_fake": (1.0, 1.0, 0.0, 0.0),
    "l_d": (0.0, 0.0, 1.0, 0.0),
    "l_g": (0.0, 0.0, 0.0, 1.0),
    "mixed": (0.7, -1.3, 0.9, 2.1),
}


def make_inputs(shape, dtype, device, seed, fake_scale=1.0):
    """Fresh random (x, rx, fake, rfake); fake_scale sets how far rfake lies from fake (and so L_fake)."""
    g = torch.Generator().manual_seed(seed)
    x, rx, fake, rfake = (torch.randn(shape, generator=g) for _ in range(4))
    rfake = fake + fake_scale * (rfake - fake)
    return [t.to(device=device, dtype=dtype) for t in (x, rx, fake, rfake)]


def loss_of(result, coeffs, n):
    return n * sum(
        c * getattr(result, name) for c, name in zip(coeffs, ("l_real", "l_fake", "l_d", "l_g"), strict=True)
    )


def run(fn, inputs, k, coeffs, dtype=None):
    """(result, grads of x, rx, fake, rfake) of fn on leaf copies of inputs (cast to dtype if given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    result = fn(*leaves, k, GAMMA, LAMBDA_K)
    loss_of(result, coeffs, inputs[0].numel()).backward()
    return result, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 13, 13), (3, 3, 24, 24)], ids=["batch1-13px", "batch3-24px"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_values_and_gradients_match_reference(dtype, shape, loss, device):
    inputs = make_inputs(shape, dtype, device, seed=10 * sum(shape) + list(LOSSES).index(loss))
    k = 0.3
    fast, fast_grads = run(triton_began_balance, inputs, k, LOSSES[loss])
    ref, ref_grads = run(began_objective, inputs, k, LOSSES[loss], dtype=torch.float64)
    for name in STATS:
        assert getattr(fast, name).dtype == torch.float32
        assert_parity(getattr(fast, name), getattr(ref, name), name=name)
    same = run(began_objective, inputs, k, LOSSES[loss])[1] if dtype != torch.float32 else [None] * 4
    for arg, g_fast, g_ref, g_same in zip(("x", "rx", "fake", "rfake"), fast_grads, ref_grads, same, strict=True):
        assert g_fast.dtype == dtype
        assert_parity(g_fast, g_ref, g_same, name=f"grad {arg}")
    assert not fast.k_next.requires_grad and not fast.m.requires_grad


@pytest.mark.parametrize(
    "needs",
    [(False, True, True, True), (True, False, False, True), (False, False, True, False), (True, True, False, False)],
    ids=["fast-step", "x-rfake", "fake-only", "real-pair-only"],
)
def test_only_the_inputs_that_need_a_gradient_get_one(needs, device):
    """The fast step's real images need no gradient; each pair's half is written only where autograd asks."""
    inputs = make_inputs((2, 3, 9, 9), torch.float32, device, seed=5)
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
    loss_of(triton_began_balance(*leaves, 0.4, GAMMA, LAMBDA_K), LOSSES["mixed"], inputs[0].numel()).backward()
    _, ref_grads = run(began_objective, inputs, 0.4, LOSSES["mixed"], dtype=torch.float64)
    for leaf, need, g_ref in zip(leaves, needs, ref_grads, strict=True):
        if need:
            assert_parity(leaf.grad, g_ref, name="grad")
        else:
            assert leaf.grad is None


def test_the_backward_kernel_is_asked_only_for_the_gradients_autograd_needs(monkeypatch, device):
    """The fast step's real images need no gradient: the backward kernel is not asked to write one, an image-sized
    pass per step that autograd would drop unseen (so the test above cannot tell)."""
    asked = []

    def recording(*args, **kwargs):
        grads = balance_backward(*args, **kwargs)
        asked.append(tuple(g is not None for g in grads))
        return grads

    monkeypatch.setattr(balance_function, "balance_backward", recording)
    needs = (False, True, True, True)
    inputs = make_inputs((2, 3, 9, 9), torch.float32, device, seed=5)
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
    loss_of(triton_began_balance(*leaves, 0.4, GAMMA, LAMBDA_K), LOSSES["mixed"], inputs[0].numel()).backward()
    assert asked == [needs]


def test_zero_difference_gets_zero_gradient(device):
    x, rx, fake, rfake = make_inputs((2, 3, 11, 11), torch.float32, device, seed=1)
    exact = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)).to(device) < 0.4
    rx = torch.where(exact, x, rx)
    rfake = torch.where(exact, fake, rfake)
    fast, grads = run(triton_began_balance, (x, rx, fake, rfake), 0.6, LOSSES["mixed"])
    ref, ref_grads = run(began_objective, (x, rx, fake, rfake), 0.6, LOSSES["mixed"], dtype=torch.float64)
    assert_parity(fast.l_real, ref.l_real, name="l_real")
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert torch.all(g[exact] == 0), "sign(0) must be 0: an exactly matched element gets no gradient"
        assert torch.all(g[~exact] != 0)
        assert_parity(g, g_ref, name="grad")


@pytest.mark.parametrize(
    "k, fake_scale, lambda_k, expected",
    [
        (0.0, 4.0, 0.001, 0.0),  # gamma * L_real - L_fake < 0 pushes k below 0: stays 0
        (1.0, 0.01, 0.001, 1.0),  # positive balance pushes k above 1: stays 1
        (1.0 - 1e-4, 0.01, 0.01, 1.0),  # near 1, one step crosses 1: clamps to 1
    ],
    ids=["k0-negative-balance", "k1-positive-balance", "near1-crosses"],
)
def test_k_clamps(k, fake_scale, lambda_k, expected, device):
    inputs = make_inputs((2, 3, 8, 8), torch.float32, device, seed=3, fake_scale=fake_scale)
    ref = began_objective(*(t.double() for t in inputs), k, GAMMA, lambda_k)
    unclamped = k + lambda_k * (GAMMA * ref.l_real - ref.l_fake).item()
    assert (unclamped < 0) if expected == 0.0 else (unclamped > 1), "the case must push k past its clamp"
    k_tensor = torch.tensor(k, dtype=torch.float32, device=device)
    before = k_tensor.clone()
    result = triton_began_balance(*inputs, k_tensor, GAMMA, lambda_k)
    assert result.k_next.item() == expected and torch.equal(k_tensor, before), "k_next clamps; k itself is only read"
    assert_parity(result.m, ref.m, name="m")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
def test_a_nan_in_the_images_makes_every_statistic_nan_as_in_pytorch(device):
    """A diverged step's NaN reaches the losses, k_next and M, as in the reference, for the loop's non-finite check
    to see: the clamp of k_next dropped it (a review helper: k_next came out 0)."""
    x, rx, fake, rfake = make_inputs((2, 3, 8, 8), torch.float32, device, seed=4)
    rfake = rfake.clone()
    rfake[1, 2, 3, 4] = float("nan")
    fast = triton_began_balance(x, rx, fake, rfake, 0.5, GAMMA, 0.001)
    ref = began_objective(x, rx, fake, rfake, 0.5, GAMMA, 0.001)
    assert ref.l_real.isfinite() and ref.l_fake.isnan() and ref.k_next.isnan() and ref.m.isnan()
    assert [value.isnan().item() for value in fast] == [value.isnan().item() for value in ref]
    assert_parity(fast.l_real, ref.l_real.double(), name="l_real")


def test_backward_uses_the_k_t_of_the_forward_after_the_owner_updates_k(device):
    """A step may write k_next into its k_t between the forward and the backward: L_D's gradients stay those of the
    k_t the forward read."""
    inputs = [t.requires_grad_() for t in make_inputs((2, 3, 10, 10), torch.float32, device, seed=4)]
    k_tensor = torch.tensor(0.25, device=device)
    fast = triton_began_balance(*inputs, k_tensor, GAMMA, LAMBDA_K)
    assert k_tensor.item() == 0.25, "triton_began_balance must leave k unchanged"
    k_tensor.copy_(fast.k_next + 0.5)  # far from 0.25: a gradient with the new k would be off by about 1
    loss_of(fast, LOSSES["l_d"], inputs[0].numel()).backward()
    ref, ref_grads = run(began_objective, inputs, 0.25, LOSSES["l_d"], dtype=torch.float64)
    assert_parity(fast.l_d, ref.l_d, name="l_d with the k_t of the forward")
    for arg, g_ref in zip(inputs, ref_grads, strict=True):
        assert_parity(arg.grad, g_ref, name="grad")


def test_grid_stride_loop_and_tails(device):
    """Few programs, many short tiles: the grid-stride loop and the masked tail of both kernels."""
    inputs = make_inputs((1, 3, 19, 21), torch.float32, device, seed=5)
    n = inputs[0].numel()
    k = torch.tensor(0.4, device=device)
    stats, k_used = balance_forward(*inputs, k, GAMMA, LAMBDA_K, block=64, max_programs=4)
    ref = began_objective(*(t.double() for t in inputs), 0.4, GAMMA, LAMBDA_K)
    for name, value in zip(STATS, stats, strict=True):
        assert_parity(value, getattr(ref, name), name=name)
    # Upstream gradients of [l_real, l_fake, l_d, l_g, k_next, m]; k_next and m are statistics, never differentiated.
    grad_stats = torch.tensor([n, 2.0 * n, n, 0.0, 5.0, 7.0], device=device)
    grads = balance_backward(*inputs, grad_stats, k_used, (True, False, False, True), block=64)
    x, rx, fake, rfake = inputs
    assert grads[1] is None and grads[2] is None
    # d/dx = (1 + 1) sign(x - rx); d/drfake = (2 - k_t) sign(rfake - fake) with k_t = 0.4 from l_d.
    torch.testing.assert_close(grads[0], 2 * torch.sign(x - rx))
    torch.testing.assert_close(grads[3], 1.6 * torch.sign(rfake - fake))


@pytest.mark.parametrize("odd", [True, False], ids=["reconstructions_channels_last", "images_channels_last"])
def test_layouts_are_reconciled(device, odd):
    """Inputs of both memory layouts at once, either way round (x, rx, fake, rfake): only rx and rfake in
    channels_last was tested, and a check that looked at rx alone passed it."""
    inputs = make_inputs((2, 3, 9, 9), torch.float32, device, seed=6)
    mixed = [t.contiguous(memory_format=torch.channels_last) if i % 2 == odd else t for i, t in enumerate(inputs)]
    fast, grads = run(triton_began_balance, mixed, 0.5, LOSSES["mixed"])
    ref, ref_grads = run(began_objective, inputs, 0.5, LOSSES["mixed"], dtype=torch.float64)
    assert_parity(fast.l_fake, ref.l_fake, name="l_fake")
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert_parity(g, g_ref, name="grad")


@pytest.mark.cuda
def test_deterministic(device):
    """Two runs are bit-identical: a fixed grid and no float atomics. Only a GPU, whose programs run concurrently,
    can show a difference; the interpreter runs them one after another."""
    inputs = make_inputs((3, 3, 32, 32), torch.bfloat16, device, seed=7)
    first, first_grads = run(triton_began_balance, inputs, 0.5, LOSSES["mixed"])
    second, second_grads = run(triton_began_balance, inputs, 0.5, LOSSES["mixed"])
    for a, b in zip([*first, *first_grads], [*second, *second_grads], strict=True):
        assert torch.equal(a, b), "two runs on the same inputs must be bit-identical"


def test_ops_dispatch(device):
    inputs = make_inputs((2, 3, 8, 8), torch.float32, device, seed=8)
    via_ops = ops.began_balance(*inputs, 0.1, GAMMA, LAMBDA_K, impl="triton")
    direct = triton_began_balance(*inputs, 0.1, GAMMA, LAMBDA_K)
    assert all(torch.equal(a, b) for a, b in zip(via_ops, direct, strict=True))


def test_an_explicit_triton_impl_refuses_images_the_kernels_do_not_take(device, recwarn):
    """impl="auto" takes PyTorch for float64 images (with a warning); an explicit impl="triton" is a request for the
    kernels and refuses them, as conv_elu does, instead of falling back."""
    inputs = [t.double() for t in make_inputs((2, 3, 8, 8), torch.float32, device, seed=8)]
    with pytest.raises(BalanceInputError, match="one dtype"):
        ops.began_balance(*inputs, 0.1, GAMMA, LAMBDA_K, impl="triton")
    assert not [w for w in recwarn.list if str(w.message).startswith("began_fast")]


def test_bad_input(device):
    x, rx, fake, rfake = make_inputs((2, 3, 8, 8), torch.float32, device, seed=9)
    with pytest.raises(BalanceInputError, match="one dtype"):
        triton_began_balance(x, rx.half(), fake, rfake, 0.0, GAMMA, LAMBDA_K)
    with pytest.raises(BalanceInputError, match="one dtype"):
        triton_began_balance(x.double(), rx.double(), fake.double(), rfake.double(), 0.0, GAMMA, LAMBDA_K)
    with pytest.raises(BalanceInputError, match="one shape"):
        triton_began_balance(x, rx, fake[:1], rfake, 0.0, GAMMA, LAMBDA_K)
    with pytest.raises(BalanceInputError, match="0-dim"):
        triton_began_balance(x, rx, fake, rfake, torch.zeros(2), GAMMA, LAMBDA_K)
    k = torch.zeros((), device=device)
    with pytest.raises(BalanceInputError, match="contiguous"):
        balance_forward(x[..., ::2], rx[..., ::2], fake[..., ::2], rfake[..., ::2], k, GAMMA, LAMBDA_K)


def test_an_empty_batch_is_refused_not_averaged_to_nan(device):
    """A batch of no images has no mean: the kernels refuse it by name rather than return 0 / 0 for every loss."""
    x, rx, fake, rfake = make_inputs((2, 3, 8, 8), torch.float32, device, seed=10)
    with pytest.raises(BalanceInputError, match="expected 1 to 2"):
        triton_began_balance(x[:0], rx[:0], fake[:0], rfake[:0], 0.2, GAMMA, LAMBDA_K)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_images_give_float32_losses_and_keep_small_k_updates(impl, dtype, device):
    """With bf16 / fp16 images (an --amp step) either impl returns float32 losses, k_next and M: a k_t update of
    lambda_k * balance ~ 1e-5 must not round back to k_t, as it would in bf16 (k_t would stop moving)."""
    inputs = make_inputs((2, 3, 16, 16), dtype, device, seed=7, fake_scale=0.25)
    k = torch.tensor(0.3, device=device)
    res = ops.began_balance(*inputs, k, GAMMA, LAMBDA_K, impl=impl)
    ref = began_objective(*(t.double() for t in inputs), 0.3, GAMMA, LAMBDA_K)
    for name in STATS:
        assert getattr(res, name).dtype == torch.float32, name
        assert_parity(getattr(res, name), getattr(ref, name), name=name)
    step = (res.k_next - k).double()
    assert step.abs() > 1e-4  # the update is not lost (bf16 rounds 0.3 to a multiple of 2^-9)
    torch.testing.assert_close(step, ref.k_next - 0.3, rtol=1e-3, atol=1e-7)  # atol: float32 ulps of k
