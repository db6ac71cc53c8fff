"""BEGAN's objective at its boundaries (docs/DESIGN.md section 3) and the device-side statistics."""

import pytest
import torch

from began_fast import ops
from began_fast.reference import began_objective
from began_fast.stats import STAT_NAMES, MStallDecay, RunningStats
from tests.tolerances import assert_parity


def images(seed, shape=(2, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(4)]


def test_objective_formulas():
    x, rx, fake, rfake = images(0)
    k, gamma, lam = 0.3, 0.7, 0.01
    res = began_objective(x, rx, fake, rfake, k, gamma, lam)
    l_real, l_fake = (x - rx).abs().mean(), (fake - rfake).abs().mean()
    # Float64 images keep every statistic in float64, k_t included (0.3 in float32 is 0.3 + 1.2e-8).
    expected = dict(
        l_real=l_real,
        l_fake=l_fake,
        l_d=l_real - k * l_fake,
        l_g=l_fake,
        k_next=torch.clamp(k + lam * (gamma * l_real - l_fake), 0, 1),
        m=l_real + (gamma * l_real - l_fake).abs(),
    )
    for name, value in expected.items():
        assert getattr(res, name).dtype == torch.float64, name
        assert_parity(getattr(res, name), value, name=name)


@pytest.mark.parametrize("k, gamma, clamp", [(0.0, 0.01, 0.0), (1.0, 1.0, 1.0), (0.9995, 1.0, 1.0)])
def test_k_clamps(k, gamma, clamp):
    x, rx, fake, rfake = images(1)
    if clamp == 1.0:
        rfake = fake + 0.01 * (rfake - fake)  # D reconstructs fakes well: the balance is positive
    res = began_objective(x, rx, fake, rfake, k, gamma, lambda_k=1.0)
    balance = gamma * res.l_real - res.l_fake
    assert (balance < 0) if clamp == 0.0 else (balance > 0)  # the update pushes k past the clamp
    assert res.k_next.item() == clamp


def test_l1_gradient_is_zero_where_reconstruction_is_exact():
    x, rx, fake, rfake = images(2)
    rx = rx.clone()
    rx[0, 0, :4] = x[0, 0, :4]  # differences of exactly 0: torch's sign(0) = 0
    rx.requires_grad_(True)
    res = began_objective(x, rx, fake, rfake, 0.0, 0.5, 0.001)
    (grad,) = torch.autograd.grad(res.l_real, rx)
    assert (grad[0, 0, :4] == 0).all()
    assert (grad[0, 0, 4:].abs() == 1 / x.numel()).all()


def test_began_balance_torch_impl_keeps_k_and_the_losses_in_float32_for_half_precision_images():
    """In bf16 the k update (lambda_k x balance, about 1e-5 here) would round back to k_t: the op's results are
    float32 whatever the images' precision, equal to the objective of the same images promoted."""
    x, rx, fake, rfake = (t.bfloat16() for t in images(3))
    k = torch.tensor(0.2)
    got = ops.began_balance(x, rx, fake, rfake, k, 0.5, 0.0001, impl="torch")
    want = began_objective(*(t.double() for t in (x, rx, fake, rfake)), k.double(), 0.5, 0.0001)
    assert all(value.dtype == torch.float32 for value in got)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u.double(), v, rtol=1e-6, atol=1e-7)
    assert got.k_next != k and (got.k_next - k).abs() < 1e-4
    with pytest.raises(ValueError, match="share one shape"):
        ops.began_balance(x, rx[:1], fake, rfake, 0.0, 0.5, 0.001, impl="torch")


def test_running_stats_means_and_reset():
    stats = RunningStats(torch.device("cpu"))
    rows = torch.rand(5, len(STAT_NAMES))
    for row in rows:
        stats.add(row)
    means = stats.read_and_reset()
    assert list(means) == list(STAT_NAMES)
    torch.testing.assert_close(torch.tensor(list(means.values())), rows.mean(0))
    stats.add(rows[0])
    torch.testing.assert_close(torch.tensor(list(stats.read_and_reset().values())), rows[0])


def test_running_stats_leave_skipped_steps_out_of_the_means():
    """A skipped step (an fp16 overflow, valid False) adds neither its values nor its count; a window of skipped
    steps only reads as zeros, not NaN (0 / 0), which the loop would take for a diverged run."""
    stats = RunningStats(torch.device("cpu"))
    rows = torch.rand(4, len(STAT_NAMES)) + 0.5
    for row, valid in zip(rows, (True, False, True, False), strict=True):
        stats.add(row * (1 if valid else 1e4), torch.tensor(valid))
    torch.testing.assert_close(torch.tensor(list(stats.read_and_reset().values())), rows[[0, 2]].mean(0))
    stats.add(rows[1], torch.tensor(False))
    assert list(stats.read_and_reset().values()) == [0.0] * len(STAT_NAMES)


def test_lr_decays_only_when_m_stalls_and_never_below_floor():
    lr = torch.tensor(1.0)
    decay = MStallDecay(lr, window=2, factor=0.5, floor=0.3)
    history = []
    for m in [5, 5, 4, 4, 4, 4, 3, 3, 9, 9, 9, 9]:  # window means: 5, 4, 4 (stall), 3, 9 (stall), 9 (stall)
        decay.update(torch.tensor(float(m)))
        history.append(lr.item())
    assert history == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3])


def test_lr_decays_against_the_best_window_so_far_not_the_last():
    """Window means 3, 5, 4: the third is no lower than the best (3), so the lr decays again, though it is lower
    than the window before it."""
    lr = torch.tensor(1.0)
    decay = MStallDecay(lr, window=1, factor=0.5, floor=0.0)
    history = []
    for m in [3, 5, 4]:
        decay.update(torch.tensor(float(m)))
        history.append(lr.item())
    assert history == [1.0, 0.5, 0.25]


def test_lr_decay_resumes_mid_window_as_if_never_stopped():
    """A checkpoint taken inside a window keeps the window's sum and count and the best mean: the resumed run
    decides that window's end as the run that went on would."""

    def fed(ms, decay=None):
        decay = decay or MStallDecay(torch.tensor(1.0), window=2, factor=0.5, floor=0.0)
        for m in ms:
            decay.update(torch.tensor(float(m)))
        return decay

    whole = fed([4, 4, 5, 5])  # window means 4, then 5: a stall, so one decay
    resumed = MStallDecay(torch.tensor(1.0), window=2, factor=0.5, floor=0.0)
    resumed.load_state_dict(fed([4, 4, 5]).state_dict())
    fed([5], resumed)
    assert whole.lr.item() == 0.5
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
