"""The fast step against the reference step (docs/DESIGN.md section 3): one D pass over [x; fake] with per-sample
weight-gradient scales gives exactly the reference's gradients; fp16 overflow handling; warm-up restore."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from began_fast.config import ModelConfig, TrainConfig
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.model import Discriminator, Generator
from began_fast.step import ReferenceStep
from tests.glue_ops import ComputedTensors, stub_kernels
from tests.tolerances import assert_parity

ROOT = Path(__file__).resolve().parent.parent


def build(model_cfg, impl="torch", dtype=torch.float64, seed=0, device="cpu"):
    torch.manual_seed(seed)
    nets = Generator(model_cfg, impl=impl), Discriminator(model_cfg, impl=impl)
    return tuple(net.to(device=device, dtype=dtype) for net in nets)


def real_batch(b, size, dtype=torch.float64, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def shared_z(model_cfg, device, seed=1):
    """One seeded z (2 rows) for every step compared, in float64."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(2, model_cfg.z_size, dtype=torch.float64, generator=gen) * 2 - 1).to(device)


def mid_carry(step):
    """Step 2 of the vanishing residual's 3 (carry 1/3): at step 0 (carry 1) every blended conv is bypassed and its
    weight gradient is 0, which would compare 0 with 0."""
    step.steps_done = 2
    if hasattr(step, "step_count"):  # the fast step reads the carry's step from a device tensor
        step.step_count.fill_(2)


def gradients_of_one_step(step, x, monkeypatch):
    for opt in (step.opt_g, step.opt_d):
        monkeypatch.setattr(opt, "step", lambda: None)  # keep the gradients, skip the update
    step(x)
    return [p.grad.clone() for p in list(step.G.parameters()) + list(step.D.parameters())]


CONFIGS = [
    ModelConfig(image_size=16, n=4, h=3),
    # carry 1/3 at step 2: not a float32 number, so a carry computed in float32 shows in the float64 comparison.
    ModelConfig(image_size=16, n=3, h=4, z_dim=5, skip=True, vanishing_residual=True, carry_steps=3),
]


def _user_precision(setting: str) -> None:
    """The TF32 settings a user may have made before training, by either of PyTorch's APIs."""
    if setting == "allow_tf32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    elif setting == "medium":
        torch.set_float32_matmul_precision("medium")
    else:
        torch.backends.fp32_precision = "tf32"


def _precision_settings() -> tuple:
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    return (
        conv.fp32_precision,
        matmul.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
        torch.backends.fp32_precision,
    )


def test_float32_steps_run_pytorchs_layers_in_ieee_float32():
    """PyTorch lets cuDNN's float32 convolutions round to TF32 by default (10 mantissa bits, on Ampere and later): the
    float32 steps turn that off for every layer's forward and backward, and give the user's setting back,
    whichever of PyTorch's APIs made it (a review helper: the older flags cannot be read once the newer API is in
    use), keeping the two APIs in agreement inside the step (PyTorch refuses to read a TF32 setting otherwise).
    In a subprocess: these settings are the process's; each user setting is made on top of the last."""
    program = """
import torch
from began_fast.config import TrainConfig
from began_fast.fast_step import FastStep
from began_fast.model import ConvELU, Linear
from began_fast.step import ReferenceStep
from tests.test_fast_step import CONFIGS, _precision_settings, _user_precision, build, real_batch

for setting in ("allow_tf32", "medium", "fp32_precision"):
    _user_precision(setting)
    user = _precision_settings(), torch.get_float32_matmul_precision()
    for kind in ("reference", "fast"):
        G, D = build(CONFIGS[0], dtype=torch.float32)
        cfg = TrainConfig(batch_size=2)
        step = ReferenceStep(G, D, cfg, "cpu") if kind == "reference" else FastStep(G, D, cfg, "cpu", impl="torch")
        layers = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, (ConvELU, Linear))]
        seen = []

        def record(*args):
            # PyTorch's own check that both APIs agree (TunableOp's GEMMs make it), which raises when they do not
            seen.append((*_precision_settings()[:3], torch.backends.cuda.matmul.allow_tf32))

        def record_forward_and_backward(module, inputs, output):
            record()
            output.register_hook(record)  # runs when backward reaches this layer

        for layer in layers:
            layer.register_forward_hook(record_forward_and_backward)
        step(real_batch(2, 16, dtype=torch.float32))
        with step.autocast():  # pictures and evaluations
            G(torch.zeros(1, G.cfg.z_size))
        assert (_precision_settings(), torch.get_float32_matmul_precision()) == user, (setting, kind, user)
        assert len(seen) > 2 * len(layers) and set(seen) == {("ieee", "ieee", "ieee", False)}, (setting, kind, seen)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("model_cfg", CONFIGS, ids=["plain", "skip-residual"])
@pytest.mark.parametrize("k", [0.0, 0.37, 1.0])
def test_fast_step_gradients_equal_reference_float64(model_cfg, k, monkeypatch):
    train_cfg = TrainConfig(batch_size=3)
    x = real_batch(3, 16)
    ref = ReferenceStep(*build(model_cfg), train_cfg, "cpu")
    fast = FastStep(*build(model_cfg), train_cfg, "cpu")
    for step in (ref, fast):
        step.k.fill_(k)
        mid_carry(step)
    want = gradients_of_one_step(ref, x, monkeypatch)
    got = gradients_of_one_step(fast, x, monkeypatch)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.k, ref.k)
    torch.testing.assert_close(fast.stats.sums, ref.stats.sums)


def test_fast_step_trajectory_tracks_reference_float64():
    """Several full steps (Adam included): the fused Adam of the fast step and the reference's Adam agree."""
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2, lr=1e-3)
    ref = ReferenceStep(*build(model_cfg), train_cfg, "cpu")
    fast = FastStep(*build(model_cfg), train_cfg, "cpu")
    for i in range(4):
        ref(real_batch(2, 16, seed=i))
        fast(real_batch(2, 16, seed=i))
    for net in ("G", "D"):
        want, got = getattr(ref, net).state_dict(), getattr(fast, net).state_dict()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9, msg=f"{net}.{name}")
    # Adam's moments too: D's last update reaches no parameter of G, and a moment off now would show only later.
    # (atol against each moment's scale: a few small elements differ by ~3e-9 of it, float64 gradients summed in
    # another order, with cancellation.)
    for ref_opt, fast_opt in ((ref.opt_g, fast.opt_g), (ref.opt_d, fast.opt_d)):
        pairs = zip(ref_opt.param_groups[0]["params"], fast_opt.param_groups[0]["params"], strict=True)
        for p, q in pairs:
            for moment in ("exp_avg", "exp_avg_sq"):
                want = ref_opt.state[p][moment]
                torch.testing.assert_close(fast_opt.state[q][moment], want, rtol=1e-7, atol=1e-7 * want.abs().max())
    torch.testing.assert_close(fast.k, ref.k)


def test_vanishing_residual_trajectory_tracks_reference_float64():
    """Several full steps with the vanishing residual (carry 1, 2/3, 1/3, 0 over carry_steps=3): each step of either
    kind blends its layers with the carry of its own step, so the two runs stay together, and both end having taken
    the carry to 0. Their lr decays alike: both feed it the M of each step (windows of 2 steps)."""
    model_cfg, train_cfg = CONFIGS[1], TrainConfig(batch_size=2, lr=1e-3, lr_decay_window=2)
    ref = ReferenceStep(*build(model_cfg), train_cfg, "cpu")
    fast = FastStep(*build(model_cfg), train_cfg, "cpu")
    for i in range(4):
        ref(real_batch(2, 16, seed=i))
        fast(real_batch(2, 16, seed=i))
    for step in (ref, fast):
        assert step.steps_done == 4
        assert step.G.decoder.carry.item() == step.D.decoder.carry.item() == 0.0
    for net in ("G", "D"):
        want, got = getattr(ref, net).state_dict(), getattr(fast, net).state_dict()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9, msg=f"{net}.{name}")
    assert ref.decay.best.isfinite() and ref.decay.count.item() == 0
    for name, value in ref.decay.state_dict().items():
        torch.testing.assert_close(fast.decay.state_dict()[name], value, rtol=1e-6, atol=0, msg=name)


def test_fp16_gradients_reach_the_optimizer_without_their_loss_scale(monkeypatch):
    """The fp16 step's gradients, once unscaled, are the float64 reference step's to within fp16's rounding. The
    parity test compares the kernels with the same fast step on PyTorch's ops, which shares any unscaling error,
    and Adam's update does not change when all gradients are scaled alike: gradients left scale^2 too large (the
    unscale multiplying by the scale) passed every test, while Adam's moments, saved in each checkpoint, were wrong.
    A scale of 256 leaves such an error 65536x; the bound, 5% of each gradient's largest entry, is 20x the error
    measured here (0.25% of it, the worst of the 38 gradients)."""
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2)
    ref = ReferenceStep(*build(model_cfg), train_cfg, "cpu")
    fast = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu", amp="fp16", impl="torch")
    fast.loss_scale.scale.fill_(256.0)  # (2**16, the usual start, overflows this tiny net's fp16 grads)
    x = off_the_l1_kink(real_batch(2, 16), (ref, fast))
    z = shared_z(model_cfg, "cpu")
    grads = []
    for step in (ref, fast):
        step.k.fill_(0.4)
        monkeypatch.setattr(step, "draw_z", lambda b, step=step: z.to(step.G.decoder.fc.weight.dtype))
        grads.append(gradients_of_one_step(step, x.to(step.G.decoder.fc.weight.dtype), monkeypatch))
    assert fast.loss_scale.found_inf.item() == 0
    for i, (want, got) in enumerate(zip(*grads, strict=True)):
        assert want.abs().max() > 0
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 0.05, f"parameter {i}: {error:.3g} of its scale"


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu", amp="fp16")
    step.loss_scale.scale.fill_(256.0)  # (2**16, the usual start, overflows this tiny net's first fp16 grads)
    step(real_batch(2, 16, torch.float32))  # one clean step creates Adam's state
    assert step.loss_scale.found_inf.item() == 0
    before = copy.deepcopy((step.G.state_dict(), step.D.state_dict(), step.k.clone()))
    step.stats.read_and_reset()
    decay_count = step.decay.count.clone()
    step.loss_scale.scale.fill_(3e38)  # the scaled loss overflows
    step(real_batch(2, 16, torch.float32, seed=1))
    assert step.loss_scale.found_inf.item() == 1
    assert step.loss_scale.scale.item() == pytest.approx(1.5e38)
    for saved, now in zip(before[:2], (step.G.state_dict(), step.D.state_dict()), strict=True):
        assert all(torch.equal(saved[key], now[key]) for key in saved)
    assert torch.equal(before[2], step.k)
    assert step.stats.count.item() == 0  # the skipped step is left out of the statistics
    assert torch.equal(step.decay.count, decay_count)  # and out of the lr decay's window of M


def test_fp16_step_after_an_overflow_is_taken_again():
    """An overflow skips only its own step: found_inf is cleared by the next unscale, so the next step whose scaled
    gradients are finite updates G, D, k_t, the statistics and the lr decay's window as any clean step does."""
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu", amp="fp16")
    step.loss_scale.scale.fill_(256.0)  # (2**16, the usual start, overflows this tiny net's first fp16 grads)
    step(real_batch(2, 16, torch.float32))  # one clean step creates Adam's state
    step.loss_scale.scale.fill_(3e38)  # the scaled loss overflows
    step(real_batch(2, 16, torch.float32, seed=1))
    assert step.loss_scale.found_inf.item() == 1
    step.loss_scale.scale.fill_(256.0)
    before = copy.deepcopy((step.G.state_dict(), step.D.state_dict(), step.k.clone()))
    step.stats.read_and_reset()
    decay_count = step.decay.count.clone()
    step(real_batch(2, 16, torch.float32, seed=2))
    assert step.loss_scale.found_inf.item() == 0
    for saved, now in zip(before[:2], (step.G.state_dict(), step.D.state_dict()), strict=True):
        assert all(not torch.equal(saved[key], now[key]) for key in saved)
    assert not torch.equal(before[2], step.k)
    assert step.stats.count.item() == 1
    assert step.decay.count.item() == decay_count.item() + 1


def test_fp16_loss_scale_grows_after_clean_steps_and_resumes_with_the_step_count():
    """The scale doubles after growth_interval clean steps; a state_dict round trip keeps the scale, the count of
    clean steps toward the next growth and the step count (the vanishing residual's carry is read from it)."""
    model_cfg, train_cfg = CONFIGS[1], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu", amp="fp16")
    step.loss_scale.scale.fill_(256.0)
    step.loss_scale.growth_interval = 2
    for i in range(3):
        step(real_batch(2, 16, torch.float32, seed=i))
    assert step.loss_scale.found_inf.item() == 0
    assert step.loss_scale.scale.item() == 512.0 and step.loss_scale.growth_tracker.item() == 1
    resumed = FastStep(*build(model_cfg, dtype=torch.float32, seed=1), train_cfg, "cpu", amp="fp16")
    resumed.load_state_dict(copy.deepcopy(step.state_dict()))
    assert resumed.loss_scale.scale.item() == 512.0 and resumed.loss_scale.growth_tracker.item() == 1
    assert resumed.steps_done == 3 and resumed.step_count.item() == 3


def test_snapshot_restore_undoes_warmup_steps():
    model_cfg, train_cfg = CONFIGS[1], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu")
    step(real_batch(2, 16, torch.float32))
    snap = step.snapshot()
    replica = copy.deepcopy(step)
    for i in range(3):
        step.body(real_batch(2, 16, torch.float32, seed=i + 1))
    step.restore(snap)
    for a, b in zip(step._mutable_tensors(), replica._mutable_tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(step.z_gen.get_state(), replica.z_gen.get_state())


def test_snapshot_restore_undoes_warmup_steps_of_the_lr_decay():
    """The lr decay's window (its sum of M, its count of steps), its best window mean and the lr are put back too:
    warm-up steps left in the window would end it early, at other steps than the run without warm-up."""
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2, lr_decay_window=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu")
    step(real_batch(2, 16, torch.float32))
    saved = copy.deepcopy(step.decay.state_dict())
    snap = step.snapshot()
    for i in range(3):  # a window ends in the warm-up, and another one starts
        step.body(real_batch(2, 16, torch.float32, seed=i + 1))
    assert step.decay.best.isfinite()
    step.restore(snap)
    for name, value in saved.items():
        assert torch.equal(getattr(step.decay, name), value), name


def test_snapshot_restore_undoes_warmup_steps_of_the_fp16_loss_scale():
    """Under fp16 the warm-up steps before a CUDA graph capture (and the head start's dry run) move the loss scale
    too: its count of clean steps, and the scale when it grows. restore puts both back, or the captured run would grow
    its scale at other steps than the run without warm-up."""
    model_cfg, train_cfg = CONFIGS[0], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu", amp="fp16")
    step.loss_scale.scale.fill_(256.0)  # (2**16, the usual start, overflows this tiny net's first fp16 grads)
    step.loss_scale.growth_interval = 3
    step(real_batch(2, 16, torch.float32))
    snap = step.snapshot()
    scale, tracker = step.loss_scale.scale.clone(), step.loss_scale.growth_tracker.clone()
    for i in range(2):
        step.body(real_batch(2, 16, torch.float32, seed=i + 1))
    assert step.loss_scale.found_inf.item() == 0 and step.loss_scale.scale.item() == 2 * scale.item()
    step.restore(snap)
    assert torch.equal(step.loss_scale.scale, scale) and torch.equal(step.loss_scale.growth_tracker, tracker)


def test_restore_to_before_the_first_update_zeroes_the_optimizer_state_created_since():
    """A CUDA graph is captured after warm-up steps on a step that may not have updated yet: Adam's state, created
    by the warm-up, must restart from zero as a first update starts from, or the first real step is not the first."""
    model_cfg, train_cfg = CONFIGS[1], TrainConfig(batch_size=2)
    step = FastStep(*build(model_cfg, dtype=torch.float32), train_cfg, "cpu")
    snap = step.snapshot()  # no update yet: no Adam state
    twin = copy.deepcopy(step)
    for i in range(3):
        step.body(real_batch(2, 16, torch.float32, seed=i + 1))
    step.restore(snap)
    for s in (step, twin):
        s(real_batch(2, 16, torch.float32, seed=7))
    for a, b in zip(step._mutable_tensors(), twin._mutable_tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("amp", ["fp32", "float16", "BF16"])
def test_an_unknown_amp_is_refused_when_the_step_is_made(amp):
    """A precision the fast step does not know is refused by name at construction, not found later as a KeyError
    inside the first step."""
    nets = build(CONFIGS[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="amp must be None or one of"):
        FastStep(*nets, TrainConfig(batch_size=2), "cpu", amp=amp)


def test_cuda_graphs_need_cuda():
    step = FastStep(*build(CONFIGS[0], dtype=torch.float32), TrainConfig(batch_size=2), "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphStep(step, (2, 3, 16, 16))


@pytest.mark.parametrize("model_cfg", CONFIGS, ids=["plain", "skip-residual"])
def test_fast_step_on_triton_kernels_matches_reference(model_cfg, monkeypatch, device):
    """The same algebra with every layer and the balance on the Triton kernels (the interpreter on a CPU): float32
    against the float64 reference, under the float32 row of the tolerance table."""
    train_cfg = TrainConfig(batch_size=2)
    x = real_batch(2, 16).to(device)
    ref = ReferenceStep(*build(model_cfg, device=device), train_cfg, device)
    fast = FastStep(*build(model_cfg, "triton", torch.float32, device=device), train_cfg, device, impl="triton")
    z = shared_z(model_cfg, device)
    for step in (ref, fast):
        step.k.fill_(0.4)
        mid_carry(step)
        monkeypatch.setattr(step, "draw_z", lambda b, step=step: z.to(step.G.decoder.fc.weight.dtype))
    want = gradients_of_one_step(ref, x, monkeypatch)
    got = gradients_of_one_step(fast, x.float(), monkeypatch)
    assert all(w.abs().max() > 0 for w in want)  # every layer takes part: no comparison of 0 with 0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_parity(g, w, name=f"parameter {i}")
    assert_parity(fast.k, ref.k.double(), name="k")


def off_the_l1_kink(x, steps):
    """|x - D(x)| has a kink where a pixel's residual is 0: a rounding that carries a residual across 0 flips that
    pixel's gradient, and one such flip among a step's 1536 pixels moved a D gradient by 6% of its scale (seed 0,
    one flip in the bf16 step on the kernels, none in PyTorch's). A rounding-error comparison must not depend on
    where the kinks fall, so the real pixels are moved out to |x| >= 0.5 and each step's G output up by 1 (its
    output bias, in place), away from D's untrained reconstructions (within +-0.35). Returns the moved x."""
    with torch.no_grad():
        for step in steps:
            step.G.decoder.out.bias += 1.0
    return x.sign() * (0.5 + 0.5 * x.abs())


def smallest_residual(step, x, z) -> float:
    """The smallest |x - D(x)| or |G(z) - D(G(z))| of the reference step's networks, at their current carry."""
    step.set_carry()
    with torch.no_grad():
        fake = step.G(z)
        return min((x - step.D(x)).abs().min().item(), (fake - step.D(fake)).abs().min().item())


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_fast_step_on_triton_kernels_is_within_twice_torchs_error(amp, dtype, monkeypatch, device):
    """Under bf16 or fp16 autocast, the gradients of the fast step on the Triton kernels against the float64
    reference step are judged by the parity rule's row for a whole step: at most 2x the error of the same fast step
    on PyTorch's ops in that precision, or a share of the gradient's scale (tests/tolerances.py says why a whole
    step needs it). fp16 runs with its loss scaling, unscaled before the comparison."""
    model_cfg, train_cfg = CONFIGS[1], TrainConfig(batch_size=2)
    x = real_batch(2, 16).to(device)
    z = shared_z(model_cfg, device)
    f32 = dict(dtype=torch.float32, device=device)
    steps = {
        "ref": ReferenceStep(*build(model_cfg, device=device), train_cfg, device),
        "torch": FastStep(*build(model_cfg, "torch", **f32), train_cfg, device, amp=amp, impl="torch"),
        "triton": FastStep(*build(model_cfg, "triton", **f32), train_cfg, device, amp=amp, impl="triton"),
    }
    x = off_the_l1_kink(x, steps.values())
    for step in steps.values():
        step.k.fill_(0.4)
        mid_carry(step)
        if getattr(step, "loss_scale", None) is not None:
            step.loss_scale.scale.fill_(256.0)  # (2**16, the usual start, overflows this tiny net's fp16 grads)
    assert smallest_residual(steps["ref"], x, z) > 0.05  # what off_the_l1_kink is for
    grads = {}
    for name, step in steps.items():
        monkeypatch.setattr(step, "draw_z", lambda b, step=step: z.to(step.G.decoder.fc.weight.dtype))
        grads[name] = gradients_of_one_step(step, x if name == "ref" else x.float(), monkeypatch)
    assert all(w.abs().max() > 0 for w in grads["ref"])  # every layer takes part: no comparison of 0 with 0
    for i, (ref, torch_low, triton_low) in enumerate(zip(grads["ref"], grads["torch"], grads["triton"], strict=True)):
        assert_parity(triton_low.to(dtype), ref, torch_low.to(dtype), name=f"parameter {i}", compounded=True)


@pytest.mark.parametrize("amp", [None, "bf16"], ids=["fp32", "bf16"])
def test_fast_step_on_triton_layers_copies_the_images_only_to_cast_and_join_them(amp, monkeypatch, device):
    """Around the kernels (stubbed here), one fast step computes four image-batch-sized tensors: x in the working
    precision and channels_last (one copy), [x; fake] for D's one pass, the two halves' gradients joined (split's
    backward), and fake's two gradient terms added (its own L1 term, and the one through D). Any other would be one
    more pass over the images per step: a layout conversion, or a slice's zero-filled gradient."""
    stub_kernels(monkeypatch)
    model_cfg, train_cfg = ModelConfig(image_size=16, n=4, h=4), TrainConfig(batch_size=2)
    nets = build(model_cfg, "triton", torch.float32, device=device)
    step = FastStep(*nets, train_cfg, device, amp=amp, impl="triton")
    x = real_batch(2, 16, torch.float32).to(device)
    step(x)  # the first step creates Adam's state
    with ComputedTensors() as watched:
        step(x)
    image_sized = [r.op for r in watched.results if r.shape[1:] == x.shape[1:] and r.shape[0] in (2, 4)]
    assert image_sized == ["aten::_to_copy", "aten::cat", "aten::cat", "aten::add"]
