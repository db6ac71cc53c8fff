"""The reference training step: loss routing, k_t, statistics, and its state for exact resumes."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from began_fast.config import ModelConfig, TrainConfig
from began_fast.fast_step import FastStep
from began_fast.model import ConvELU, Discriminator, Generator
from began_fast.reference import began_objective
from began_fast.step import ReferenceStep

MODEL = ModelConfig(image_size=16, n=4, h=4)


def make_step(seed=0, **train):
    torch.manual_seed(seed)
    G, D = Generator(MODEL, impl="torch").double(), Discriminator(MODEL, impl="torch").double()
    return ReferenceStep(G, D, TrainConfig(batch_size=3, **train), "cpu")


def real_batch(seed=0):
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_losses_are_routed_l_d_to_d_and_l_g_to_g(monkeypatch):
    step = make_step()
    step.k.fill_(0.5)  # with k = 0 L_D would not depend on G at all, and routing could not be seen
    G0, D0 = copy.deepcopy(step.G), copy.deepcopy(step.D)
    z_gen = copy.deepcopy(step.z_gen)
    for opt in (step.opt_g, step.opt_d):
        monkeypatch.setattr(opt, "step", lambda: None)  # keep the gradients, skip the update
    x = real_batch()
    step(x)

    z = torch.rand(3, 4, generator=z_gen, dtype=torch.float64) * 2 - 1
    fake = G0(z)
    res = began_objective(x, D0(x), fake, D0(fake), 0.5, 0.5, 0.001)
    d_params, g_params = list(D0.parameters()), list(G0.parameters())
    want_d = torch.autograd.grad(res.l_d, d_params, retain_graph=True)
    want_g = torch.autograd.grad(res.l_g, g_params, retain_graph=True)
    wrong_g = torch.autograd.grad(res.l_d, g_params)  # what G would get if L_D leaked into it
    for p, w in zip(step.D.parameters(), want_d, strict=True):
        torch.testing.assert_close(p.grad, w)
    for p, w in zip(step.G.parameters(), want_g, strict=True):
        torch.testing.assert_close(p.grad, w)
    assert any(not torch.allclose(p.grad, bad) for p, bad in zip(step.G.parameters(), wrong_g, strict=True))


def test_d_update_leaves_g_untouched_and_the_reverse(monkeypatch):
    for frozen in ("opt_g", "opt_d"):
        step = make_step()
        before = {name: copy.deepcopy(getattr(step, name[-1].upper())) for name in ("opt_g", "opt_d")}
        monkeypatch.setattr(getattr(step, frozen), "step", lambda: None)
        step(real_batch())
        still = frozen[-1].upper()  # the network whose optimizer did not run
        moved = "D" if still == "G" else "G"
        for a, b in zip(before[frozen].parameters(), getattr(step, still).parameters(), strict=True):
            assert torch.equal(a, b)
        changed = zip(before["opt_" + moved.lower()].parameters(), getattr(step, moved).parameters(), strict=True)
        assert any(not torch.equal(a, b) for a, b in changed)


def test_k_and_statistics_follow_the_objective():
    step = make_step()
    res = step(real_batch())
    # k_0 = 0; the first balance of an untrained pair is positive. k_t is kept in float32.
    assert step.k.item() == res.k_next.float().item() > 0
    stats = step.stats.read_and_reset()
    assert stats["k"] == 0.0  # the statistics record the k_t that step used
    assert stats["m"] == res.m.float().item() and stats["l_d"] == res.l_d.float().item()


def test_the_lr_decay_watches_the_convergence_measure_m():
    """The lr decay's window sums M = L_real + |gamma L_real - L_fake| of each step (float32 on the device), and a
    window's mean is what the next windows are judged against."""
    step = make_step(lr_decay_window=2)
    ms = [step(real_batch(i)).m.float() for i in range(2)]
    torch.testing.assert_close(step.decay.best, (ms[0] + ms[1]) / 2)
    res = step(real_batch(2))
    torch.testing.assert_close(step.decay.m_sum, res.m.float())
    assert step.decay.count.item() == 1


def resumed(a, state):
    """A step with other initial weights that takes a's networks and `state`, as a resume from a checkpoint does."""
    b = make_step(seed=123)
    b.G.load_state_dict(a.G.state_dict())
    b.D.load_state_dict(a.D.state_dict())
    b.load_state_dict(state)
    return b


def assert_same_parameters(a, b):
    for p, q in zip(
        list(a.G.parameters()) + list(a.D.parameters()), list(b.G.parameters()) + list(b.D.parameters()), strict=True
    ):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically():
    a = make_step()
    for i in range(2):
        a(real_batch(i))
    b = resumed(a, copy.deepcopy(a.state_dict()))
    a(real_batch(5))
    b(real_batch(5))
    assert_same_parameters(a, b)
    assert torch.equal(a.k, b.k) and b.opt_g.param_groups[0]["lr"] is b.lr


def test_a_checkpoint_from_a_cuda_graph_step_resumes_with_this_devices_adam():
    """A CUDA graph step's Adam is capturable (fused in the fast step); those settings say how it steps, not what it
    computes, so a resume on the CPU keeps the CPU's (capturable Adam refuses CPU parameters) and steps as the run
    it came from."""
    a = make_step()
    a(real_batch(0))
    saved = copy.deepcopy(a.state_dict())
    for optimizer in ("opt_g", "opt_d"):
        for group in saved[optimizer]["param_groups"]:
            group.update(capturable=True, fused=True, foreach=None)
    b = resumed(a, saved)
    for group in b.opt_g.param_groups + b.opt_d.param_groups:
        assert (group["capturable"], group["fused"], group["foreach"]) == (False, None, False)
    a(real_batch(1))
    b(real_batch(1))
    assert_same_parameters(a, b)


def test_a_noise_generator_from_another_kind_of_device_restarts_from_the_seed_and_the_step():
    """A checkpoint's noise generator that cannot go on here (a CUDA run's 16-byte Philox state on the CPU) is
    restarted from the run's seed and the checkpoint's step: two resumes at one step draw the same z, and a resume at
    another step does not replay the noise of the first."""
    a = make_step()
    a(real_batch())
    draws = []
    for steps_done in (1, 1, 2):
        state = copy.deepcopy(a.state_dict())
        state.update(z_gen=torch.tensor([7, 0], dtype=torch.int64).view(torch.uint8), steps_done=steps_done)
        b = resumed(a, state)
        assert b.noise_restarted
        draws.append(b.draw_z(3))
    assert torch.equal(draws[0], draws[1])
    assert not torch.allclose(draws[0], draws[2], atol=1e-3)


def test_a_resume_gives_the_networks_the_checkpoints_carry_before_the_first_step():
    """The vanishing residual's carry is derived from the step, not saved: load_state_dict sets it in G and both
    halves of D, so pictures or evaluations made before the resumed run's first step see the checkpoint's networks."""
    torch.manual_seed(0)
    model = ModelConfig(image_size=16, n=4, h=4, vanishing_residual=True, carry_steps=10)
    G, D = Generator(model, impl="torch").double(), Discriminator(model, impl="torch").double()
    step = ReferenceStep(G, D, TrainConfig(batch_size=3), "cpu")
    state = copy.deepcopy(step.state_dict())
    state["steps_done"] = 4
    step.load_state_dict(state)
    for net in (G.decoder, D.encoder, D.decoder):
        assert net.carry.item() == pytest.approx(0.6)


@pytest.mark.parametrize("step_class", [ReferenceStep, FastStep], ids=["reference", "fast"])
def test_the_step_takes_gamma_lambda_k_and_the_lr_decay_factor_from_its_config(step_class, monkeypatch):
    """gpu64 and demo train at gamma 0.7: a step that used the paper's 0.5, or the default lambda_k or decay factor,
    instead of its config's passed every test that ran at the defaults (a mutation audit found it). k_next and M
    are the objective's at the config's gamma and lambda_k, and a stalled window multiplies the lr by its factor."""
    cfg = TrainConfig(batch_size=3, gamma=0.7, lambda_k=0.05, lr=1e-3, lr_decay_window=1, lr_decay_factor=0.25)
    torch.manual_seed(0)
    G, D = Generator(MODEL, impl="torch").double(), Discriminator(MODEL, impl="torch").double()
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    step = step_class(G, D, cfg, "cpu")
    step.k.fill_(0.3)
    step.decay.best.fill_(0.0)  # every M is no lower: this step's window (one step) ends with a decay
    z = torch.rand(3, MODEL.z_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    monkeypatch.setattr(step, "draw_z", lambda batch_size: z)
    x = real_batch()
    step(x)
    fake = G0(z)
    want = began_objective(x, D0(x), fake, D0(fake), 0.3, 0.7, 0.05)
    assert step.k.item() == pytest.approx(want.k_next.item(), rel=1e-6)
    assert step.k.item() != pytest.approx(began_objective(x, D0(x), fake, D0(fake), 0.3, 0.5, 0.05).k_next.item())
    assert step.stats.read_and_reset()["m"] == pytest.approx(want.m.item(), rel=1e-6)
    assert step.decay.lr.item() == pytest.approx(1e-3 * 0.25)


def test_the_steps_noise_follows_the_runs_seed():
    """Each z comes from a stream of the run's seed: two seeds draw two sequences (a step that seeded its noise with
    a constant passed every test), one seed the same sequence."""

    def noise(seed):
        torch.manual_seed(0)
        G, D = Generator(MODEL, impl="torch"), Discriminator(MODEL, impl="torch")
        step = ReferenceStep(G, D, TrainConfig(batch_size=3, seed=seed), "cpu")
        return torch.cat([step.draw_z(3) for _ in range(2)])

    assert torch.equal(noise(1), noise(1))
    assert not torch.equal(noise(1), noise(2))


class WeightGradients(TorchDispatchMode):
    """Counts the convolution backwards that compute a weight gradient."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.count += bool(args[-1][1])  # output_mask: (input, weight, bias)
        return func(*args, **(kwargs or {}))


def test_the_reference_step_computes_only_the_weight_gradients_it_uses():
    """grad(L_G, G's parameters) goes back through D. D's layers ran TorchConvELU, whose explicit backward computed
    their weight gradients on that pass too, and threw them away: on the demo model 55 weight gradients a step where
    39 are used, so the benchmarks' PyTorch baselines did a fifth of their step for nothing. Without a per-sample
    scale, the torch impl is reference.conv_elu_ref on plain autograd, which computes what a backward asks for: each
    of D's layers once for D(x) and once for D(G(z)) (both in L_D), each of G's once."""
    step = make_step()
    convs = {net: sum(isinstance(m, ConvELU) for m in getattr(step, net).modules()) for net in ("G", "D")}
    with WeightGradients() as counted:
        step(real_batch())
    assert counted.count == 2 * convs["D"] + convs["G"]
