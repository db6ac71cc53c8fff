"""Data loader throughput (GPU only): images/s delivered to the GPU as float batches, CelebA-sized JPEGs.

The bench writes its own data set: NUM_FILES JPEGs of 178 x 218 (the aligned CelebA size) made from the built-in
faces (DISTINCT faces, each saved at several JPEG qualities, so the files differ byte for byte), in a temporary
img_align_celeba/ folder, celeba crop. Three loaders, each at 64 and 128 px, batch BATCH:

- dali-mixed: DaliLoader on the GPU (nvJPEG decode, resize and normalise on the device);
- dali-cpu: DaliLoader's CPU pipeline with every core, batches then copied to the GPU;
- torch: TorchLoader (PIL decode in a DataLoader with every core as workers), pinned copy to the GPU.

A round is BATCHES_PER_ROUND batches, the GPU synchronized at its end; extra_info records images_per_s from the
median round. `test_fast_step_fed_by_loader` runs the fast path (paper64, batch 16, bf16, CUDA graph) fed by the
GPU-resident set, DALI mixed and the torch loader, and records steps/s. Each case also records the keys
scripts/bench_report.py tables (layer, direction, batch, provider: the loader), so its table compares the loaders'
time per round side by side:

    python -m pytest bench/bench_data.py --benchmark-json /tmp/data.json
    python scripts/bench_report.py /tmp/data.json --suite data
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("bench/bench_data.py needs an NVIDIA GPU (CUDA is not available)", allow_module_level=True)

from began_fast.config import DataConfig
from began_fast.data import dali_install_command, dali_installed, make_batches
from began_fast.data.builtin import draw_face

HAS_DALI = dali_installed()
NUM_FILES = 4096
DISTINCT = 512
QUALITIES = (88, 89, 90, 91, 92, 93, 94, 95)  # NUM_FILES = DISTINCT * len(QUALITIES)
BATCH = 64
BATCHES_PER_ROUND = 32
# The warm-up rounds drain what the loaders fetched ahead while they started (the torch loader holds up to 4 batches
# per worker: 64 on 16 cores, two rounds): timed, they would be served from that store, faster than it refills.
ROUNDS, WARMUP_BATCHES, WARMUP_ROUNDS = 5, 8, 3
CORES = os.cpu_count() or 1


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data") / "img_align_celeba"
    root.mkdir()
    for i in range(DISTINCT):
        # A 218 x 218 drawing cut to the 178 x 218 CelebA frame.
        face = draw_face(np.random.default_rng([11, i]), 218).crop((20, 0, 198, 218))
        for j, quality in enumerate(QUALITIES):
            face.save(root / f"{j * DISTINCT + i:06d}.jpg", quality=quality)
    return str(root)


def _loader(name: str, jpeg_dir: str, image_size: int):
    if name != "torch" and not HAS_DALI:
        pytest.skip(f"NVIDIA DALI is not installed ({dali_install_command()})")
    cfg = DataConfig(path=jpeg_dir, num_workers=CORES, loader="torch" if name == "torch" else "dali")
    device = "cpu" if name == "dali-cpu" else "cuda"
    return make_batches(cfg, image_size, BATCH, device=device, seed=0)


@pytest.mark.parametrize("image_size", [64, 128])
@pytest.mark.parametrize("name", ["dali-mixed", "dali-cpu", "torch"])
def test_loader_throughput(benchmark, jpeg_dir, name, image_size):
    loader = _loader(name, jpeg_dir, image_size)

    def batches(count: int) -> None:
        for _ in range(count):
            batch = next(loader).to("cuda", non_blocking=True)
        assert batch.shape == (BATCH, 3, image_size, image_size)
        torch.cuda.synchronize()

    batches(WARMUP_BATCHES)  # worker start-up, pipeline build and the first prefetches are not throughput
    benchmark.group = f"data {image_size}px b{BATCH}"
    info = {"loader": name, "image_size": image_size, "batch": BATCH, "cores": CORES, "describe": loader.describe()}
    info |= {"layer": f"{image_size}px, {BATCHES_PER_ROUND} batches", "direction": "load", "provider": name}
    benchmark.extra_info.update(info)
    benchmark.pedantic(batches, args=(BATCHES_PER_ROUND,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is not None:  # None under --benchmark-disable: ran once as a smoke test
        benchmark.extra_info["images_per_s"] = BATCHES_PER_ROUND * BATCH / benchmark.stats.stats.median


STEP_BATCH, STEPS_PER_ROUND = 16, 50


@pytest.mark.parametrize("feed", ["gpu-resident", "dali-mixed", "torch"])
def test_fast_step_fed_by_loader(benchmark, jpeg_dir, feed):
    """The fast path (paper64, batch 16, bf16, one CUDA graph) fed by each loader: steps/s against the
    GPU-resident set, which gathers its batch inside the graph and so is the upper bound."""
    from began_fast.config import get_preset
    from began_fast.fast_step import CudaGraphStep, FastStep
    from began_fast.model import Discriminator, Generator

    preset = get_preset("paper64")
    size, shape = preset.model.image_size, (STEP_BATCH, 3, preset.model.image_size, preset.model.image_size)
    torch.manual_seed(0)
    # impl="triton" as the step benchmark's: "auto" would fall back to PyTorch (BEGAN_FAST_IMPL=torch, a shape the
    # kernels do not take) and still be reported as the fast step.
    G, D = Generator(preset.model, impl="triton").cuda(), Discriminator(preset.model, impl="triton").cuda()
    step = FastStep(G, D, preset.train, "cuda", amp="bf16", impl="triton")
    cfg = DataConfig(
        path=jpeg_dir, num_workers=CORES, loader={"gpu-resident": "gpu", "dali-mixed": "dali"}.get(feed, feed)
    )
    if feed == "gpu-resident":
        batches = make_batches(cfg, size, STEP_BATCH, device="cuda", seed=0)
        graph = CudaGraphStep(step, shape, stream=batches)

        def one_step():
            graph()

    else:
        if feed == "dali-mixed" and not HAS_DALI:
            pytest.skip(f"NVIDIA DALI is not installed ({dali_install_command()})")
        loader = make_batches(cfg, size, STEP_BATCH, device="cuda", seed=0)
        graph = CudaGraphStep(step, shape)

        def one_step():
            graph(next(loader))

    def steps(count: int) -> None:
        for _ in range(count):
            one_step()
        torch.cuda.synchronize()

    steps(10)
    benchmark.group = f"fast step fed by loader, paper64 b{STEP_BATCH}"
    benchmark.extra_info.update({"feed": feed, "batch": STEP_BATCH, "image_size": size})
    benchmark.extra_info.update(layer=f"paper64 fast step, {STEPS_PER_ROUND} steps", direction="fed", provider=feed)
    benchmark.pedantic(steps, args=(STEPS_PER_ROUND,), rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["steps_per_s"] = STEPS_PER_ROUND / benchmark.stats.stats.median
