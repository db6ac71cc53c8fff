"""Shared by the pytest-benchmark suites under bench/ (GPU only; see bench/README.md).

`measure` times one case with pytest-benchmark's pedantic mode, synchronizing the GPU inside the timed call, and
records what scripts/bench_report.py reads back from the JSON: extra_info = {layer, shape, direction, batch,
provider, flop, bytes, tflops, gbps}. The machine_info hook adds the GPU, the torch and triton versions and the
git commit to the JSON's header.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

WARMUP_ROUNDS = 5
ROUNDS = 30


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    try:
        git = ["git", "rev-parse", "--short=12", "HEAD"]
        commit = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
        machine_info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without .git (a remote GPU machine): the caller names the commit.
        machine_info["git_commit"] = os.environ.get("BEGAN_FAST_COMMIT", "unknown")


@pytest.fixture
def measure(benchmark):
    """measure(fn, *, flop, bytes, layer, shape, direction, batch, provider): time fn() and record its rates.

    fn runs the work once; the GPU is synchronized inside each timed call, so a round is the work's full
    latency. flop and bytes are per call (flop None where the op is memory-bound and a FLOP rate means nothing).
    """

    def run(fn: Callable[[], object], *, flop: float | None, bytes: float, **info) -> None:
        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.group = f"{info['layer']} {info['direction']} b{info['batch']}"
        benchmark.extra_info.update(info, flop=flop, bytes=bytes)
        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing was timed
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["tflops"] = None if flop is None else flop / median / 1e12
        benchmark.extra_info["gbps"] = bytes / median / 1e9

    return run
