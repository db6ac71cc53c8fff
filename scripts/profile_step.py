"""Where the fast step's GPU time goes: each kernel's device time per step, the Triton kernels against the PyTorch
ops around them (GPU only).

Builds the fast step of a preset (the Triton kernels, --amp, the built-in faces resident on the GPU), then
  1. times one step replayed from its CUDA graph and one step run eagerly, with CUDA events (medians of --repeats);
  2. profiles --steps eager steps with torch.profiler: the kernels the graph replays, launched one by one, each
     one's device time summed and divided by the steps.
It prints a table, per kernel: Triton's or PyTorch's, launches and device time per step, share of the step. With
--out DIR it also writes the table (profile.md) and the profiler's Chrome trace (trace.json) there.

    python scripts/profile_step.py [--preset paper64] [--batch 16] [--amp bf16|fp16|none] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    import torch


KERNEL_NAME_WIDTH = 80
TABLE_ROWS = 40
BUILTIN_IMAGES = 2048


def triton_kernel_names() -> set[str]:
    """The names the profiler gives this project's Triton kernels: their Python function names."""
    from kernels import launched_kernels

    return {name for _, name, _ in launched_kernels()}


def build_step(preset: str, batch: int, amp: str | None):
    """The fast step on the GPU, with a function that runs it eagerly on a batch drawn on the device, and the
    CUDA-graph version of it (captured after warm-up steps that leave the state as it was)."""
    from began_fast.config import DataConfig, get_preset
    from began_fast.data import make_batches
    from began_fast.fast_step import CudaGraphStep, FastStep
    from began_fast.model import Discriminator, Generator

    cfg = get_preset(preset)
    train_cfg = dataclasses.replace(cfg.train, batch_size=batch)
    device = torch.device("cuda")
    torch.manual_seed(0)
    G = Generator(cfg.model, impl="triton").to(device)
    D = Discriminator(cfg.model, impl="triton").to(device)
    step = FastStep(G, D, train_cfg, device, amp=amp, impl="triton")
    count = max(BUILTIN_IMAGES, batch)  # at least one batch
    # As train.py feeds it (make_feed): eagerly the stream's next batch; in the graph, gathered into its buffer
    # from the indices staged before each replay.
    batches = make_batches(
        DataConfig(builtin_count=count, loader="gpu"), cfg.model.image_size, batch, device=device, seed=0
    )

    def eager() -> None:
        step(next(batches))

    shape = (batch, 3, cfg.model.image_size, cfg.model.image_size)
    graph = CudaGraphStep(step, shape, stream=batches)
    return eager, graph


def median_ms(run, repeats: int) -> float:
    """The median device time of `run`, in ms, each call between two CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class KernelTime:
    name: str
    triton: bool
    launches: float  # per step
    us: float  # device time per step


def kernel_times(averages, steps: int, triton_names: set[str]) -> list[KernelTime]:
    """Per-step launches and device time of each kernel (memcpy and memset included) in a profiler's
    key_averages(), longest first."""
    rows = [
        KernelTime(e.key, e.key in triton_names, e.count / steps, e.self_device_time_total / steps)
        for e in averages
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    return sorted(rows, key=lambda row: row.us, reverse=True)


def report(rows: list[KernelTime], graph_ms: float, eager_ms: float, title: str) -> str:
    """The markdown table and its summary lines."""
    total = sum(row.us for row in rows)
    lines = [f"# {title}", ""]
    lines.append(f"- one step replayed from its CUDA graph: {graph_ms:.3f} ms; run eagerly: {eager_ms:.3f} ms")
    for triton, kind in ((True, "Triton kernels"), (False, "PyTorch's kernels, memcpy and memset")):
        part = [row for row in rows if row.triton == triton]
        us = sum(row.us for row in part)
        launches = sum(row.launches for row in part)
        lines.append(
            f"- {kind}: {launches:.0f} launches, {us / 1e3:.3f} ms of device time per step "
            f"({us / total:.1%} of the kernels' {total / 1e3:.3f} ms)"
        )
    lines += ["", "| kernel | by | launches / step | us / step | share |", "| --- | --- | --- | --- | --- |"]
    for row in rows[:TABLE_ROWS]:
        name = row.name if len(row.name) <= KERNEL_NAME_WIDTH else row.name[: KERNEL_NAME_WIDTH - 3] + "..."
        by = "Triton" if row.triton else "PyTorch"
        lines.append(f"| `{name}` | {by} | {row.launches:g} | {row.us:.1f} | {row.us / total:.1%} |")
    if len(rows) > TABLE_ROWS:
        rest = rows[TABLE_ROWS:]
        lines.append(
            f"| {len(rest)} more kernels | | {sum(r.launches for r in rest):g} | {sum(r.us for r in rest):.1f} | "
            f"{sum(r.us for r in rest) / total:.1%} |"
        )
    return "\n".join(lines) + "\n"


def export_trace(prof, path: Path) -> None:
    """The profiler's Chrome trace at `path`, whole or not at all: written to a temporary file beside it, then renamed
    over it. Kineto raises nothing when it cannot write the file (it logs an error and returns): OSError then, and an
    earlier trace stays."""
    from began_fast.atomic_files import TEMPORARY_SUFFIX, durable_replace

    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        prof.export_chrome_trace(str(tmp))
        if not tmp.is_file():
            raise OSError(f"cannot write {path}: the profiler wrote no trace (see its error above)")
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    from began_fast import provenance
    from began_fast.atomic_files import atomic_write
    from began_fast.cli import OneLineParser, check_one_process, check_writable, one_line, out_of_memory, output_path
    from began_fast.config import PRESETS, ConfigError

    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper64")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="eager steps profiled (default 10)")
    parser.add_argument("--repeats", type=int, default=50, help="steps timed per median (default 50)")
    parser.add_argument("--out", type=output_path, help="folder for profile.md and trace.json")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    try:
        check_one_process("profile_step.py")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():  # not a flag's fault: no pointer to --help
        print("error: no CUDA GPU: the profile times the fast step's kernels on one", file=sys.stderr)
        return 2
    try:
        if args.out is not None:  # before the minutes of GPU work; create=False: a profile that fails makes no folder
            check_writable(args.out, "--out", folder=True, create=False)
        eager, graph = build_step(args.preset, args.batch, None if args.amp == "none" else args.amp)
        graph_ms, eager_ms = median_ms(graph, args.repeats), median_ms(eager, args.repeats)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                eager()
            torch.cuda.synchronize()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        ran_out = out_of_memory(e, "the step")
        if ran_out is None:
            raise
        print(f"error: {ran_out}; lower --batch", file=sys.stderr)
        return 2
    rows = kernel_times(prof.key_averages(), args.steps, triton_kernel_names())
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}, commit {provenance.commit()}"
    title = f"fast step, {args.preset}, batch {args.batch}, amp {args.amp}, {torch.cuda.get_device_name()}, {versions}"
    text = report(rows, graph_ms, eager_ms, title)
    print(text, end="")
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            # The trace first: when it cannot be written, the earlier trace.json and profile.md stay a pair.
            export_trace(prof, args.out / "trace.json")
            atomic_write(args.out / "profile.md", lambda f: f.write(text.encode()))
        except OSError as e:  # the table is on stdout above: the profile is not lost
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
