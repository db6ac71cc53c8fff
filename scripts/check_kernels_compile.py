"""Compile every Triton kernel specialization that training launches, for an NVIDIA GPU architecture, with no GPU.

Triton's interpreter (the CPU test lane) checks what the kernels compute, not whether they compile: a kernel that
the interpreter runs can still fail in Triton's compiler or ask for more shared memory than the GPU has. This
script closes that gap on any machine. It runs one real training step of each preset and precision on the CPU
with every launch of kernels/conv_elu.py and kernels/balance.py replaced by a compile, down to the cubin (Triton
bundles ptxas), for the target architecture: the same specializations (dtypes, constexprs, the integer and
pointer-alignment attributes) a GPU run compiles first. Nothing is launched: the CPU tensors only stand in for
CUDA ones, so the step computes nothing meaningful, and the kernels' results are never read.

--configs smallest compiles the smallest tile of each autotuned kernel (the quick check CI runs); --configs all
compiles every tile autotuning would try. It fails (exit 1) when a compile fails or a kernel needs more shared
memory per block than the architecture has, and prints one line per compiled kernel.

Usage: TRITON_INTERPRET must be unset.
  python scripts/check_kernels_compile.py [--preset gpu64 paper64 ...] [--amp none bf16 fp16] [--configs smallest]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.runtime import Autotuner  # noqa: E402

# Shared memory one block may use (the opt-in maximum), per compute capability.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
AMPS = {"none": None, "bf16": "bf16", "fp16": "fp16"}


@dataclasses.dataclass
class Compile:
    """One compile: a kernel at one specialization and one autotuning config, run in the background."""

    kernel: str
    variant: str  # the dtypes and the launch's constexprs
    config: str
    result: Future  # of (the compiled kernel, seconds)


def _timed(compile_fn, *args, **kwargs):
    start = time.perf_counter()
    return compile_fn(*args, **kwargs), time.perf_counter() - start


def _specialization(value):
    """What Triton specializes an argument on: a tensor's dtype and 16-byte alignment, an integer being 1 or a
    multiple of 16, any other value itself."""
    if torch.is_tensor(value):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, value % 16 == 0
    return value


class CompileOnly:
    """Stands in for a @triton.jit or @triton.autotune kernel: `kernel[grid](*args, **kwargs)` submits one compile
    per new specialization and config to `pool`, and launches nothing."""

    def __init__(self, kernel, configs: str, pool: ThreadPoolExecutor, compiles: list[Compile]):
        self.kernel, self.configs, self.pool, self.compiles = kernel, configs, pool, compiles
        self.autotuned = isinstance(kernel, Autotuner)
        self.jit = kernel.fn if self.autotuned else kernel
        self.jit.device_caches[0]  # the argument binder, built once here rather than raced for by the threads
        self.seen: set[tuple] = set()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.submit(args, kwargs, grid)

    def tiles(self, args, kwargs) -> list[dict]:
        if not self.autotuned:  # a plain @triton.jit: its launch arguments are the whole config
            return [{}]
        self.kernel.nargs = dict(zip(self.kernel.arg_names, args, strict=False))  # args: the positional ones
        configs = self.kernel.prune_configs(kwargs)
        self.kernel.nargs = None
        if self.configs == "smallest":
            configs = [min(configs, key=lambda config: math.prod(config.kwargs.values()))]
        return [config.all_kwargs() for config in configs]

    def submit(self, args, kwargs, grid):
        specialization = tuple(map(_specialization, (*args, *kwargs.values())))
        dtypes = dict.fromkeys(
            str(a.dtype).removeprefix("torch.") for a in (*args, *kwargs.values()) if torch.is_tensor(a)
        )
        constexprs = [f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k != "INTERPRETED"]
        for tile in self.tiles(args, kwargs):
            if (specialization, tuple(tile.items())) in self.seen:
                continue
            self.seen.add((specialization, tuple(tile.items())))
            config = " ".join(f"{k}={v}" for k, v in tile.items())
            result = self.pool.submit(_timed, self.jit.warmup, *args, grid=grid, **kwargs, **tile)
            self.compiles.append(Compile(self.jit.__name__, " ".join([*dtypes, *constexprs]), config, result))


class CompileOnlyDriver:
    """The part of a Triton driver that compiling needs: the target, and device 0 with its default stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int, configs: str, jobs: int, compiles: list[Compile]):
    """Inside: every launch of the project's kernels submits its compile for sm_`arch`, run on `jobs` threads at
    once (Triton's passes and ptxas leave the GIL), and the Triton conv layers take CPU tensors (nothing is
    launched). On leaving, the compiles have ended."""
    from triton.runtime.driver import driver

    import kernels.conv_elu

    with contextlib.ExitStack() as stack:
        # Triton reads the target from its active driver; without a GPU there is none to read it from.
        stack.enter_context(mock.patch.object(driver, "_active", CompileOnlyDriver(arch)))
        stack.enter_context(mock.patch.object(kernels.conv_elu, "runs_on", lambda device: True))
        # Entered after the driver, so left before it: leaving waits for the compiles while the target is set.
        pool = stack.enter_context(ThreadPoolExecutor(jobs))
        for module, name, kernel in kernels.launched_kernels():
            stack.enter_context(mock.patch.object(module, name, CompileOnly(kernel, configs, pool, compiles)))
        yield pool


def run_one_step(preset: str, skip: bool, amp: str | None) -> None:
    """One fast training step of the preset (with the paper's skip connections if `skip`) on the CPU with the
    Triton impl, as `scripts/train.py --amp AMP` runs it."""
    from began_fast.config import get_preset
    from began_fast.fast_step import FastStep
    from began_fast.model import Discriminator, Generator

    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = dataclasses.replace(cfg.model, skip=skip)
    G, D = Generator(model, impl="triton"), Discriminator(model, impl="triton")
    step = FastStep(G, D, cfg.train, "cpu", amp=amp, impl="triton")
    size = model.image_size
    step(torch.rand(cfg.train.batch_size, 3, size, size) * 2 - 1)


def report(compiles: list[Compile], arch: int) -> int:
    """Print one line per compile (ok, or FAILED and why); return how many failed."""
    failures = 0
    limit = MAX_SHARED_BYTES[arch]
    for c in compiles:
        name = f"{c.kernel} [{c.variant}]" + (f" [{c.config}]" if c.config else "")
        try:
            kernel, seconds = c.result.result()
        except Exception as error:  # noqa: BLE001 (a compile error of any kind is what this script reports)
            failures += 1
            # A CompilationError's text opens with the source position; its message is its last line.
            message = getattr(error, "error_message", None) or str(error).strip().splitlines()[0]
            print(f"FAILED  {name}: {type(error).__name__}: {message}")
            continue
        shared = kernel.metadata.shared
        if shared > limit:
            failures += 1
            print(f"FAILED  {name}: needs {shared} B of shared memory per block, sm_{arch} has {limit} B")
        else:
            print(f"ok      {name}: {seconds:.1f} s, {shared} B of shared memory")
    return failures


def main(argv=None) -> int:
    from began_fast.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["gpu64", "paper64", "paper128"])
    parser.add_argument("--skip", action="store_true", help="also each preset with the paper's skip connections")
    parser.add_argument("--amp", nargs="+", choices=list(AMPS), default=list(AMPS))
    parser.add_argument("--configs", choices=("smallest", "all"), default="smallest")
    parser.add_argument("--arch", type=int, choices=sorted(MAX_SHARED_BYTES), default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, this script compiles the kernels rather than interpreting")

    compiles: list[Compile] = []
    start = time.perf_counter()
    with compile_only(args.arch, args.configs, args.jobs, compiles):
        for preset in args.preset:
            for skip in (False, True) if args.skip else (False,):
                for amp in args.amp:
                    run_one_step(preset, skip, AMPS[amp])
    failures = report(compiles, args.arch)
    print(
        f"{len(compiles)} kernel compiles for sm_{args.arch} in {time.perf_counter() - start:.0f} s on "
        f"{args.jobs} threads: {failures} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
