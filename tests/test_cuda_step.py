"""The fast step on a GPU: CUDA graph replay, mixed precision, fp16 loss scaling, and resume from graph runs.

All marked `cuda`: they run where a GPU is present (the compiled Triton kernels, fused Adam, graph capture).
"""

import copy
import dataclasses
import threading

import pytest
import torch

import began_fast.train as training
from began_fast.config import DataConfig, ModelConfig, TrainConfig
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.model import Discriminator, Generator
from began_fast.step import ReferenceStep
from began_fast.train import RunOptions, setup_run, train

pytestmark = pytest.mark.cuda

MODEL = ModelConfig(image_size=32, n=32, h=32, skip=True)
BATCH = 8


def networks(impl="auto", seed=0, model=MODEL):
    torch.manual_seed(seed)
    return Generator(model, impl=impl).cuda(), Discriminator(model, impl=impl).cuda()


def batches(count, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.rand(BATCH, 3, 32, 32, device="cuda", generator=g) * 2 - 1 for _ in range(count)]


def state_of(step):
    """Everything a step changes: weights, Adam's state, k_t, the statistics, the lr and its decay's window, the step
    count (the residual's carry) and the loss scale."""
    return [t.detach().clone() for t in step._mutable_tensors()]


def assert_graph_replays_the_eager_step(eager, graphed, graph, data):
    """eager and graph (capturing graphed) each take every batch of data; both end in the same state, bit for bit."""
    for x in data:
        eager(x)
        graph(x)
    torch.cuda.synchronize()
    for a, b in zip(state_of(eager), state_of(graphed), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_graph_replay_equals_eager_bit_for_bit(amp):
    """With what changes from step to step in the graph changing: the lr (its decay at every step: a window of one,
    and a best M of 0 that every window's mean reaches) and the vanishing residual's carry; in fp16 the loss scale's
    growth tracker too. A value the capture had baked in would have held in the graph and moved in the eager step."""
    model = dataclasses.replace(MODEL, vanishing_residual=True, carry_steps=4)
    cfg = TrainConfig(batch_size=BATCH, lr_decay_window=1, lr_floor=0.0)
    eager = FastStep(*networks(model=model), cfg, "cuda", amp=amp)
    graphed = FastStep(*networks(model=model), cfg, "cuda", amp=amp)
    data = batches(6)
    for step in (eager, graphed):
        step(data[0])  # both start from one real step, so Adam's state exists in both
        step.decay.best.fill_(0.0)
    graph = CudaGraphStep(graphed, data[0].shape)
    assert_graph_replays_the_eager_step(eager, graphed, graph, data[1:])
    assert graphed.steps_done == eager.steps_done == 6
    assert graphed.lr.item() == eager.lr.item() == pytest.approx(cfg.lr * 0.5**5)


def test_replay_rewrites_poisoned_outputs():
    cfg = TrainConfig(batch_size=BATCH)
    step = FastStep(*networks(), cfg, "cuda", amp="bf16")
    twin = copy.deepcopy(step)
    x = batches(1)[0]
    graph = CudaGraphStep(step, x.shape)
    for p in step.parameters():
        p.grad.fill_(float("nan"))  # the graph's static gradients: a replay must overwrite, not accumulate
    graph(x)
    twin(x)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in step.parameters())
    for a, b in zip(state_of(step), state_of(twin), strict=True):
        assert torch.equal(a, b)


def test_bf16_tracks_the_float32_reference_for_50_steps():
    """k_t and M of the bf16 fast step stay near the float32 reference step's. bf16 keeps 8 mantissa bits, so
    each step's L1 means carry ~0.4% relative error; M is a mean of them (rtol 5% over the run leaves room for
    the trajectories to drift apart a little), and k_t integrates lambda_k * balance, so after 50 steps its
    difference is bounded by 50 * 0.001 * |balance error| (atol 5e-4)."""
    cfg = TrainConfig(batch_size=BATCH, lr_decay_window=1000)
    ref = ReferenceStep(*networks("torch"), cfg, "cuda")
    fast = FastStep(*networks(), cfg, "cuda", amp="bf16")
    ks, ms = [], []
    for x in batches(50, seed=1):
        res = ref(x)
        fast(x)
        ks.append((ref.k.item(), fast.k.item()))
        ms.append((res.m.item(), fast.stats.read_and_reset()["m"]))
        ref.stats.read_and_reset()
    ref_k, fast_k = map(torch.tensor, zip(*ks, strict=True))
    ref_m, fast_m = map(torch.tensor, zip(*ms, strict=True))
    torch.testing.assert_close(fast_k, ref_k, atol=5e-4, rtol=0)
    torch.testing.assert_close(fast_m, ref_m, rtol=5e-2, atol=0)


def test_fp16_overflow_skips_the_graphed_step_and_lowers_the_scale():
    cfg = TrainConfig(batch_size=BATCH)
    step = FastStep(*networks(), cfg, "cuda", amp="fp16")
    x = batches(1)[0]
    step.loss_scale.scale.fill_(1024.0)
    graph = CudaGraphStep(step, x.shape)
    before = state_of(step)
    step.loss_scale.scale.fill_(3e38)
    graph(x)
    torch.cuda.synchronize()
    assert step.loss_scale.found_inf.item() == 1 and step.loss_scale.scale.item() == pytest.approx(1.5e38)
    # A skipped step changes nothing but its count and the loss scale: not the weights, Adam, k_t, the statistics
    # or the lr's decay window.
    moving = {id(t) for t in (step.step_count, step.loss_scale.scale, step.loss_scale.growth_tracker)}
    kept = [id(t) not in moving for t in step._mutable_tensors()]
    assert kept.count(False) == 3
    for a, b, still in zip(before, state_of(step), kept, strict=True):
        assert torch.equal(a, b) or not still


@pytest.mark.parametrize("resume_graphs", [True, False], ids=["resume-graph", "resume-eager"])
def test_graph_run_and_its_resume_continue_the_same_trajectory(tmp_path, resume_graphs):
    model = ModelConfig(image_size=16, n=8, h=8)
    train_cfg = TrainConfig(batch_size=4, steps=12, log_every=3, sample_every=6, checkpoint_every=6)
    data = DataConfig(builtin_count=64, num_workers=0, loader="torch")

    def run(out, steps, resume=False, graphs=True):
        opts = RunOptions(out=out, device="cuda", amp="bf16", cuda_graphs=graphs, resume=resume, quiet=True)
        r = setup_run(model, dataclasses.replace(train_cfg, steps=steps), data, opts)
        train(r)
        return r

    whole = run(tmp_path / "whole", 12)
    run(tmp_path / "split", 6)
    resumed = run(tmp_path / "split", 12, resume=True, graphs=resume_graphs)
    # A graph resume replays the same kernels as the uninterrupted graph run: bit-for-bit. An eager resume runs
    # them outside the graph, which should also match; it is held to float32 noise, not to the bit.
    tol = dict(rtol=0, atol=0) if resume_graphs else dict(rtol=1e-3, atol=1e-5)
    for a, b in zip(
        whole.step.parameters() + [whole.step.k], resumed.step.parameters() + [resumed.step.k], strict=True
    ):
        torch.testing.assert_close(a, b, **tol)


def test_the_gpu_resident_loader_in_the_graph_gathers_the_torch_loaders_batches(tmp_path):
    """--loader gpu stages each step's indices and flips and the graph gathers the images: 6 graph steps and 6
    resumed ones end where 12 graph steps on the torch loader do, bit for bit (the same batches, the same kernels)."""
    model = ModelConfig(image_size=16, n=8, h=8)
    train_cfg = TrainConfig(batch_size=4, steps=12, log_every=3, sample_every=6, checkpoint_every=6)

    def run(out, steps, loader, resume=False):
        data = DataConfig(builtin_count=64, num_workers=0, loader=loader)
        opts = RunOptions(out=out, device="cuda", amp="bf16", cuda_graphs=True, resume=resume, quiet=True)
        r = setup_run(model, dataclasses.replace(train_cfg, steps=steps), data, opts)
        train(r)
        return r

    on_torch_loader = run(tmp_path / "torch", 12, "torch")
    run(tmp_path / "gpu", 6, "gpu")
    resumed = run(tmp_path / "gpu", 12, "gpu", resume=True)
    for a, b in zip(
        on_torch_loader.step.parameters() + [on_torch_loader.step.k],
        resumed.step.parameters() + [resumed.step.k],
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "amp, cuda_graphs, loader",
    [("bf16", True, "gpu"), ("bf16", True, "torch"), ("fp16", True, "gpu"), ("bf16", False, "torch")],
    ids=["graph-gpu-loader", "graph-torch-loader", "graph-fp16", "eager"],
)
def test_the_loop_waits_for_the_gpu_only_where_it_reads_its_statistics(tmp_path, monkeypatch, amp, cuda_graphs, loader):
    """Between two log steps the loop queues work and reads nothing back: a step that waited for the GPU (an
    .item(), a copy to the host, a blocking copy in, a skipped-step check on the host) would cost the time the
    queue hides. Under torch.cuda.set_sync_debug_mode("error") each such call raises; the loop runs under it from
    each step (after the first two, which may compile) to the next call that may read the device: the statistics'
    read, the weights' check, the checkpoint, the pictures and the evaluation."""
    steps = []

    def strict(feed):
        def step():
            steps.append(None)
            if len(steps) > 2:
                torch.cuda.set_sync_debug_mode("error")
            feed()

        return step

    reads_at = []  # (what, step): a read made on every step would pass unseen without it

    def lenient(name, reads):
        def read(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            reads_at.append((name, run.step.steps_done))
            return reads(*args, **kwargs)

        return read

    make_feed = training.make_feed
    monkeypatch.setattr(training, "make_feed", lambda run, batches: strict(make_feed(run, batches)))
    for name in ("log_window", "check_weights", "write_checkpoint", "write_pictures", "evaluate"):
        monkeypatch.setattr(training, name, lenient(name, getattr(training, name)))
    model = ModelConfig(image_size=16, n=8, h=8)
    train_cfg = TrainConfig(batch_size=4, steps=16, log_every=8, sample_every=16, checkpoint_every=16)
    data = DataConfig(builtin_count=64, num_workers=0, loader=loader)
    opts = RunOptions(out=tmp_path, device="cuda", amp=amp, cuda_graphs=cuda_graphs, quiet=True)
    run = setup_run(model, train_cfg, data, opts)
    try:
        train(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(steps) == 16 and torch.cuda.get_sync_debug_mode() == 0
    last = [("check_weights", 16), ("write_checkpoint", 16), ("write_pictures", 16)]
    assert reads_at == [("log_window", 8), ("log_window", 16), *last]  # no evaluation: eval_every is 0


def test_the_capture_lets_other_threads_call_cuda():
    """While the step is captured, a loader's thread may call CUDA: the DataLoader's pin-memory thread pins batches
    (cudaHostAlloc for a block it has not cached), DALI's threads run its pipeline. In PyTorch's default global
    capture mode such a call from another thread fails (and the capture with it); the step captures in thread_local
    mode, where it does not. Here a thread pins a fresh 200 MiB block in the middle of the capture; the graph must
    still replay what the eager step computes, bit for bit."""
    cfg = TrainConfig(batch_size=BATCH)
    eager = FastStep(*networks(), cfg, "cuda", amp="bf16")
    graphed = FastStep(*networks(), cfg, "cuda", amp="bf16")
    data = batches(4)
    eager(data[0])
    graphed(data[0])
    body, pinned, failures = graphed.body, [], []

    def pin_a_fresh_block():
        try:
            pinned.append(torch.empty(200 << 20, dtype=torch.uint8, pin_memory=True))
        except RuntimeError as e:
            failures.append(e)

    def body_with_a_thread_that_pins(x):
        result = body(x)
        if torch.cuda.is_current_stream_capturing():
            thread = threading.Thread(target=pin_a_fresh_block)
            thread.start()
            thread.join()
        return result

    graphed.body = body_with_a_thread_that_pins
    graph = CudaGraphStep(graphed, data[0].shape)
    assert not failures and len(pinned) == 1  # the capture ran the thread once
    assert_graph_replays_the_eager_step(eager, graphed, graph, data[1:])


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_checkpoint_resumes_on_another_kind_of_device(tmp_path, capsys, first, then):
    """Adam's capturable setting and the noise generator (Mersenne Twister on the CPU, Philox on CUDA) differ
    between the devices: the resume takes this device's, and says that the noise stream is a new one."""
    model = ModelConfig(image_size=16, n=8, h=8)
    train_cfg = TrainConfig(batch_size=4, steps=3, checkpoint_every=3)
    data = DataConfig(builtin_count=64, num_workers=0, loader="torch")

    def options(device, resume=False):  # the fast path on the GPU: bf16 in a CUDA graph
        fast = dict(amp="bf16", cuda_graphs=True) if device == "cuda" else {}
        return RunOptions(tmp_path, device, resume=resume, quiet=True, **fast)

    train(setup_run(model, train_cfg, data, options(first)))
    resumed = setup_run(model, dataclasses.replace(train_cfg, steps=6), data, options(then, resume=True))
    train(resumed)
    assert resumed.step.steps_done == 6
    for group in resumed.step.opt_g.param_groups + resumed.step.opt_d.param_groups:
        assert group["capturable"] == (then == "cuda")
    assert all(torch.isfinite(p).all() for p in resumed.step.parameters())
    assert "noise generator ran on another kind of device" in capsys.readouterr().err
