"""Shared by the pytest-benchmark suites under bench/ (GPU only; see bench/README.md).

`measure` times one case with pytest-benchmark's pedantic mode: each round makes `calls` calls back to back and then
synchronizes the GPU, so the host queues the next call while the GPU runs the last (as a training loop does) and the
round ends when the work has. It records what scripts/bench_report.py reads back from the JSON: extra_info = {layer,
shape, direction, batch, provider, calls_per_round, flop, bytes, tflops, gbps}; pytest-benchmark's statistics are per
round, the rates per call. A case interrupted (a phase's time limit sends SIGINT) is marked failed, for every suite,
so the JSON pytest-benchmark then writes holds the cases that finished and not a part of that one. The machine_info
hook adds the GPU, the torch and triton versions and the git commit to the JSON's header.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import torch

from began_fast import provenance

WARMUP_ROUNDS = 5
ROUNDS = 30


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # Which GPU of that name: files measured on two (the device machine changed between calls) are not one run.
    properties = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    machine_info["cuda_uuid"] = str(getattr(properties, "uuid", ""))
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["git_commit"] = provenance.commit()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A case interrupted (KeyboardInterrupt: a phase's time limit sends SIGINT) is marked failed. pytest-benchmark
    marks a case failed on an Exception only: on KeyboardInterrupt it would write that case's rounds so far into the
    JSON, or, none finished, fail to write the JSON at all."""
    outcome = yield
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if outcome.excinfo is not None and benchmark is not None:
        benchmark.has_error = True


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """pytest-benchmark writes the JSON here (after reading the CPU's description in a subprocess, a second or so): a
    SIGINT now would leave it empty, so one is ignored until the JSON is written."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def measure(benchmark):
    """measure(fn, *, flop, bytes, layer, shape, direction, batch, provider, calls=1, rounds=ROUNDS,
    warmup_rounds=WARMUP_ROUNDS): time fn() and record its rates.

    fn runs the work once; a round runs it `calls` times and synchronizes the GPU. flop and bytes are per call (flop
    None where the op is memory-bound and a FLOP rate means nothing).
    """

    def run(
        fn: Callable[[], object],
        *,
        flop: float | None,
        bytes: float,
        calls: int = 1,
        rounds: int = ROUNDS,
        warmup_rounds: int = WARMUP_ROUNDS,
        **info,
    ) -> None:
        def timed():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        benchmark.group = f"{info['layer']} {info['direction']} b{info['batch']}"
        benchmark.extra_info.update(info, calls_per_round=calls, flop=flop, bytes=bytes)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing was timed
            return
        per_call = benchmark.stats.stats.median / calls
        benchmark.extra_info["tflops"] = None if flop is None else flop / per_call / 1e12
        benchmark.extra_info["gbps"] = bytes / per_call / 1e9

    return run
