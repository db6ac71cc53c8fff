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
memory per block than the architecture has, and prints one line per compiled kernel as its compile ends.

Usage: TRITON_INTERPRET must be unset.
  python scripts/check_kernels_compile.py [--preset gpu64 paper64 ...] [--amp none bf16 fp16] [--configs smallest]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    import torch

    from kernels import precompile


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


@contextlib.contextmanager
def compile_only(arch: int, configs: str, jobs: int, compiles: list[Compile], ended=None):
    """Inside: every launch of the project's kernels submits its compiles for sm_`arch` (kernels.precompile), run on
    `jobs` threads at once, each recorded in `compiles` and, when `ended` is given, passed to ended(compile) as it
    ends (on a compiling thread); yields the function that submits one (for other kernels, through
    precompile.CompileOnly). On leaving, the compiles have ended."""

    def submit(jit, args, kwargs, grid, tile):
        dtypes = dict.fromkeys(
            str(a.dtype).removeprefix("torch.") for a in (*args, *kwargs.values()) if torch.is_tensor(a)
        )
        constexprs = [f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k != "INTERPRETED"]
        result = pool.submit(_timed, jit.warmup, *args, grid=grid, **kwargs, **tile)
        config = " ".join(f"{k}={v}" for k, v in tile.items())
        compiles.append(Compile(jit.__name__, " ".join([*dtypes, *constexprs]), config, result))
        if ended is not None:
            result.add_done_callback(lambda _, compile=compiles[-1]: ended(compile))

    # The pool is left first, while the target is still set: leaving it waits for the compiles.
    with precompile.compiling_for(arch), ThreadPoolExecutor(jobs) as pool, precompile.compile_only(submit, configs):
        yield submit


def preset_step(preset: str, skip: bool, amp: str | None, device: str = "cpu"):
    """The preset's fast step (with the paper's skip connections if `skip`) on the Triton impl, as
    `scripts/train.py --amp AMP` builds it, and the shape of its batch."""
    from began_fast.config import get_preset
    from began_fast.fast_step import FastStep
    from began_fast.model import Discriminator, Generator

    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = dataclasses.replace(cfg.model, skip=skip)
    G, D = Generator(model, impl="triton").to(device), Discriminator(model, impl="triton").to(device)
    size = model.image_size
    return FastStep(G, D, cfg.train, device, amp=amp, impl="triton"), (cfg.train.batch_size, 3, size, size)


def run_one_step(preset: str, skip: bool, amp: str | None) -> None:
    """One fast training step of the preset on the CPU (preset_step)."""
    step, shape = preset_step(preset, skip, amp)
    step(torch.rand(shape) * 2 - 1)


def outcome(c: Compile, arch: int) -> tuple[bool, str]:
    """(whether the ended compile `c` failed, its line: ok, or FAILED and why)."""
    name = f"{c.kernel} [{c.variant}]" + (f" [{c.config}]" if c.config else "")
    try:
        kernel, seconds = c.result.result()
    except Exception as error:  # noqa: BLE001 (a compile error of any kind is what this script reports)
        # A CompilationError's text opens with the source position; its message is its last line.
        message = getattr(error, "error_message", None) or str(error).strip().splitlines()[0]
        return True, f"FAILED  {name}: {type(error).__name__}: {message}"
    shared, limit = kernel.metadata.shared, MAX_SHARED_BYTES[arch]
    if shared > limit:
        return True, f"FAILED  {name}: needs {shared} B of shared memory per block, sm_{arch} has {limit} B"
    return False, f"ok      {name}: {seconds:.1f} s, {shared} B of shared memory"


def main(argv=None) -> int:
    from began_fast.cli import OneLineParser
    from began_fast.config import PRESETS
    from began_fast.wording import counted

    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["gpu64", "paper64", "paper128"])
    parser.add_argument("--skip", action="store_true", help="also each preset with the paper's skip connections")
    parser.add_argument("--amp", nargs="+", choices=list(AMPS), default=list(AMPS))
    parser.add_argument("--configs", choices=("smallest", "all"), default="smallest")
    parser.add_argument("--arch", type=int, choices=sorted(MAX_SHARED_BYTES), default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.jobs < 1:  # ThreadPoolExecutor's ValueError would end it in a traceback
        parser.error(f"--jobs must be >= 1 (compiling threads), got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, this script compiles the kernels rather than interpreting")

    compiles: list[Compile] = []
    start = time.perf_counter()

    def say(c: Compile) -> None:  # as each compile ends: a run stopped at a time limit has logged those that ended
        sys.stdout.write(outcome(c, args.arch)[1] + "\n")  # one write, whole among the threads'
        sys.stdout.flush()

    with compile_only(args.arch, args.configs, args.jobs, compiles, ended=say):
        for preset in args.preset:
            for skip in (False, True) if args.skip else (False,):
                for amp in args.amp:
                    run_one_step(preset, skip, AMPS[amp])
    failures = sum(outcome(c, args.arch)[0] for c in compiles)
    print(
        f"{len(compiles)} kernel compiles for sm_{args.arch} in {time.perf_counter() - start:.0f} s on "
        f"{counted(args.jobs, 'thread')}: {failures} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
