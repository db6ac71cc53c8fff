"""End-to-end training-step benchmark (GPU only): steps/s, images/s, model FLOP utilisation and peak memory.

Providers, measured in one run on the same models and batches:
  torch       (a) the reference step (D on x and on G(z) apart, plain autograd), eager IEEE float32 (the spec)
  torch-tf32  (a') the same with PyTorch's default float32 convolutions, which cuDNN rounds to TF32: what a plain
              PyTorch port gets in float32 (the reference step turns TF32 off)
  torch-bf16  (b) the reference step under bf16 autocast with channels_last activations
  compile     (c) the same with G and D torch.compile'd (mode="max-autotune-no-cudagraphs", dynamic=False); the
              losses and Adam stay eager, and no CUDA graph: torch.compile of a plain port's networks in bf16
  triton      (d) ours: FastStep on the Triton kernels, --amp bf16, one CUDA graph, GPU-resident data
for paper64 and paper128 at batch 16 and 64. Model FLOPs per step count each conv and fc once forward and twice
backward (input and weight gradients) for G on B images and D on 2B images: the algorithm's work, the same for
every provider however it schedules it. MFU divides by the bf16 dense peak of the device's data sheet (H100 / H200
SXM: 989 TFLOP/s; PEAK_BF16_FLOPS), for every provider (a float32 provider's MFU is then a fraction of what bf16
could reach). Peak memory is the highest allocation over the timed steps, after the warm-up's.
The baselines run the models on impl="torch", which is reference.conv_elu_ref on plain autograd where no per-sample
scale is asked for (every layer of the reference step), as a plain port's nn.Conv2d + ELU; their Adam is the
capturable one (its learning rate is a tensor the decay changes on the device), one small kernel more per step.
cuDNN picks its fastest algorithm per shape (cudnn.benchmark), as a training run would. A round is STEPS_PER_ROUND
steps back to back, then a synchronize, as a training loop queues steps: an eager step's host work overlaps the GPU's.

    python -m pytest bench/bench_step.py --benchmark-json bench/step.json
    python scripts/bench_report.py bench/step.json --suite step
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from began_fast.config import DataConfig, get_preset
from began_fast.data import make_batches
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.model import ConvELU, Discriminator, Generator, Linear
from began_fast.step import ReferenceStep

if not torch.cuda.is_available():
    pytest.skip("the step benchmark needs an NVIDIA GPU", allow_module_level=True)

# Dense bf16 peaks from NVIDIA's data sheets, by a part of torch.cuda.get_device_name(), the first that matches:
# the PCIe and NVL boards run lower clocks than the SXM ones ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12}
PRESETS = ("paper64", "paper128")
BATCHES = (16, 64)
PROVIDERS = ("torch", "torch-tf32", "torch-bf16", "compile", "triton")
DATASET_IMAGES = 2048
STEPS_PER_ROUND, ROUNDS, WARMUP_ROUNDS = 5, 10, 2  # 60 timed and warm-up steps per case: paper128 b64 in IEEE
# float32 is the slowest case

torch.backends.cudnn.benchmark = True


def forward_flop(cfg, batch: int) -> tuple[float, float]:
    """FLOPs of one forward pass of G on `batch` images and of D on 2*batch, counted with hooks on the meta device."""
    totals = []
    for net, n in ((Generator(cfg, impl="torch"), batch), (Discriminator(cfg, impl="torch"), 2 * batch)):
        net = net.to("meta")
        flop = [0.0]

        def hook(module, inputs, output, flop=flop):
            if isinstance(module, ConvELU):
                c_out, c_in = module.weight.shape[:2]
                flop[0] += 2 * output.shape[0] * output.shape[2] * output.shape[3] * c_out * c_in * 9
            else:
                flop[0] += 2 * output.shape[0] * module.in_features * module.out_features

        for m in net.modules():
            if isinstance(m, ConvELU | Linear):
                m.register_forward_hook(hook)
        x = torch.zeros(n, cfg.z_size, device="meta") if isinstance(net, Generator) else None
        net(x if x is not None else torch.zeros(n, 3, cfg.image_size, cfg.image_size, device="meta"))
        totals.append(flop[0])
    return totals[0], totals[1]


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), float("nan"))


def make_provider(provider: str, preset_name: str, batch: int):
    """A callable running one training step of `provider`, warmed up (compiled, autotuned, captured)."""
    preset = get_preset(preset_name)
    cfg, train_cfg = preset.model, dataclasses.replace(preset.train, batch_size=batch)
    device = torch.device("cuda")
    torch.manual_seed(0)
    impl = "triton" if provider == "triton" else "torch"
    # What earlier cases left behind (their graphs, compiled code, cached blocks) counts in no later peak.
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    G, D = Generator(cfg, impl=impl).to(device), Discriminator(cfg, impl=impl).to(device)
    # Fed as train.py feeds the step (make_feed).
    batches = make_batches(
        DataConfig(builtin_count=DATASET_IMAGES, loader="gpu"), cfg.image_size, batch, device=device, seed=0
    )
    if provider == "triton":
        step = FastStep(G, D, train_cfg, device, amp="bf16", impl="triton")
        run = CudaGraphStep(step, (batch, 3, cfg.image_size, cfg.image_size), stream=batches)
    else:
        bf16 = provider in ("torch-bf16", "compile")
        if bf16:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        if provider == "compile":
            # One static shape per case (a second case would otherwise get a shape-generic graph), and no CUDA
            # graph trees: the reference step runs a second backward through D with retain_graph.
            compile_options = dict(mode="max-autotune-no-cudagraphs", dynamic=False)
            G, D = torch.compile(G, **compile_options), torch.compile(D, **compile_options)
        step = ReferenceStep(G, D, train_cfg, device)  # compiled modules pass .cfg etc. to the original

        # ReferenceStep.__call__ sets IEEE float32 around its body (step.ieee_float32); the bf16 providers and
        # torch-tf32 run the body under PyTorch's own settings, as a plain port does (and Inductor's conv lowering
        # of some torch versions reads cudnn.allow_tf32, which cannot be read inside ieee_float32).
        body = ReferenceStep.__call__.__wrapped__

        def run():
            x = next(batches)
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    body(step, x)
            elif provider == "torch-tf32":
                conv = torch.backends.cudnn.conv
                default, conv.fp32_precision = conv.fp32_precision, "tf32"
                try:
                    body(step, x)
                finally:
                    conv.fp32_precision = default
            else:
                step(x)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    return run


# The provider varies fastest: each preset and batch is measured by every provider back to back, and a session
# stopped at BENCH_BUDGET_S keeps whole groups (with the provider outermost, it dropped every triton case first).
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("preset_name", PRESETS)
def test_step(measure, benchmark, provider, preset_name, batch):
    cfg = get_preset(preset_name).model
    g_flop, d_flop = forward_flop(cfg, batch)
    step_flop = 3 * (g_flop + d_flop)
    run = make_provider(provider, preset_name, batch)
    # The peak over the timed steps, from what the warm-up left allocated (weights, Adam's moments, the graph's
    # pool): not the warm-up's own peaks (cuDNN's and Inductor's autotuning workspaces, the graph capture's copies).
    torch.cuda.reset_peak_memory_stats()
    image_bytes = batch * 3 * cfg.image_size**2 * 4
    measure(
        run,
        calls=STEPS_PER_ROUND,
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
        flop=step_flop,
        bytes=image_bytes,
        layer=preset_name,
        shape=f"b{batch}",
        direction="step",
        batch=batch,
        provider=provider,
    )
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median / STEPS_PER_ROUND
        benchmark.extra_info.update(
            steps_per_s=1 / median,
            images_per_s=batch / median,
            mfu=step_flop / median / peak_flops(),
            peak_bf16_tflops=peak_flops() / 1e12,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
