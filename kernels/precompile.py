"""Compile the Triton kernels a piece of work launches, each autotuning config, all at once, launching none.

Triton compiles a kernel when it is first launched, and autotuning a new specialization compiles every config it
tries, one after another: a first gpu64 training step in bf16 compiles 135 kernels, 303 to 356 s on one core of a
2-core AMD EPYC (Triton 3.6, for sm_90), 158 to 177 s on both. Inside `compile_only`, each launch of the project's
kernels (kernels.launched_kernels) is replaced by `compile(jit, args, kwargs, grid, tile)` for each config
autotuning would try at that launch (after its pruning; or only the smallest), once per specialization: the work
runs to its end, but nothing runs on the device, so what it computes is meaningless and must be thrown away.

`precompile` runs such a dry run with the compiles on a thread pool (Triton's passes and ptxas leave the GIL). Each
compile lands in the kernel's in-memory cache, and in Triton's disk cache, under the key the real launch computes
(the same binder reads the same arguments: dtypes, 16-byte alignment, integers equal to 1 or divisible by 16,
constexprs, the config), so the real run and its autotuning then launch without compiling. `compiling_for` stands
in for a GPU that is not there, so the same dry run compiles for it on any machine. `CompilerTurn` lets the
processes of a machine take turns, so that the first compiles on all its cores and the others read its kernels from
the disk cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import torch
import triton
from triton import knobs
from triton.runtime import Autotuner
from triton.runtime.driver import driver

import kernels
import kernels.conv_elu
import kernels.interpreter

try:
    import fcntl
except ImportError:  # not POSIX: no flock, so no turns (CompilerTurn)
    fcntl = None

# compile(jit, args, kwargs, grid, tile): compile the @triton.jit function `jit` as kernel[grid](*args, **kwargs,
# **tile) would launch it.
CompileFn = Callable[[triton.runtime.JITFunction, tuple, dict, object, dict], None]


def _specialization(value):
    """What Triton specializes a run-time (not constexpr) argument on: a tensor's dtype and 16-byte alignment, an
    integer being 1, a multiple of 16, or too big for 32 bits; any other value, its type."""
    if torch.is_tensor(value):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, value % 16 == 0, -(2**31) <= value < 2**31
    return type(value)


class CompileOnly:
    """Stands in for a @triton.jit or @triton.autotune kernel: `kernel[grid](*args, **kwargs)` calls `compile` once
    per new specialization and config ("all" the configs autotuning would try there, or the "smallest"), and
    launches nothing."""

    def __init__(self, kernel, configs: str, compile: CompileFn):
        self.kernel, self.configs, self.compile = kernel, configs, compile
        self.autotuned = isinstance(kernel, Autotuner)
        self.jit = kernel.fn if self.autotuned else kernel
        # Specialized on the value: the constexpr parameters, and the launch options (num_warps, num_stages, ...),
        # which are no parameters.
        self.by_value = {param.name for param in self.jit.params if param.is_constexpr}
        self.parameters = set(self.jit.arg_names)
        self.seen: set[tuple] = set()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(args, kwargs, grid)

    def tiles(self, args, kwargs) -> list[dict]:
        if not self.autotuned:  # a plain @triton.jit: its launch arguments are the whole config
            return [{}]
        self.kernel.nargs = dict(zip(self.kernel.arg_names, args, strict=False))  # args: the positional ones
        configs = self.kernel.prune_configs(kwargs)
        self.kernel.nargs = None
        if self.configs == "smallest":
            configs = [kernels.conv_elu.smallest_tile(configs)]
        return [config.all_kwargs() for config in configs]

    def launch(self, args, kwargs, grid) -> None:
        # The argument binder of the launch's GPU (the launchers make their tensors' GPU current), built here, in
        # the launching thread, rather than raced for by the threads that compile.
        self.jit.device_caches[driver.active.get_current_device()]
        arguments = {**dict(zip(self.jit.arg_names, args, strict=False)), **kwargs}.items()
        specialization = tuple(
            (name, value if name in self.by_value or name not in self.parameters else _specialization(value))
            for name, value in arguments
        )
        for tile in self.tiles(args, kwargs):
            if (specialization, tuple(tile.items())) not in self.seen:
                self.seen.add((specialization, tuple(tile.items())))
                self.compile(self.jit, args, kwargs, grid, tile)


@contextlib.contextmanager
def compile_only(compile: CompileFn, configs: str = "all"):
    """Inside, every launch of the project's kernels is a call of `compile` per new specialization and config
    (CompileOnly)."""
    with contextlib.ExitStack() as stack:
        for module, name, kernel in kernels.launched_kernels():
            stack.enter_context(mock.patch.object(module, name, CompileOnly(kernel, configs, compile)))
        yield


@dataclasses.dataclass(frozen=True)
class Precompiled:
    compiles: int  # asked for: compiled, or read from Triton's disk cache where an earlier process compiled it
    failed: int  # left to the real launch, which compiles again and raises (or, autotuning, skips that config)
    seconds: float
    first_failure: str = ""  # the first failed compile's error_line


def _warm_up(device: int, jit, args, kwargs, grid, tile) -> None:
    """Compile `jit` as it would be launched, into its cache for GPU `device` (a pool thread's current GPU is 0)."""
    on_device = torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext()
    with on_device:
        jit.warmup(*args, grid=grid, **kwargs, **tile)


def precompile(work: Callable[[], object], threads: int) -> Precompiled:
    """Run `work` with every launch of the project's kernels replaced by compiles of each config autotuning would
    try there, `threads` at a time on a pool, and return when all have ended (each then in its kernel's cache).
    What `work` computes is meaningless: undo its effects. Stopped (an error, Ctrl-C), it drops the compiles not
    yet started, so that it waits only for those running, not for minutes of compiles nothing will use."""
    start = time.perf_counter()
    compiles = []

    def submit(jit, args, kwargs, grid, tile):
        # Whichever thread launches (on CUDA, autograd runs backward on threads of its own), the pool compiles.
        device = driver.active.get_current_device()
        compiles.append(pool.submit(_warm_up, device, jit, args, kwargs, grid, tile))

    with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
        try:
            with compile_only(submit):
                work()
            concurrent.futures.wait(compiles)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # leaving the pool then waits for the running ones only
            raise
    errors = [future.exception() for future in compiles if future.exception() is not None]
    return Precompiled(len(compiles), len(errors), time.perf_counter() - start, error_line(errors[0]) if errors else "")


def error_line(error: BaseException) -> str:
    """A compile's error in one line: "Type: its message's first line", 200 characters of it at most (Triton's
    compile errors quote the kernel's source)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


class CompilerTurn:
    """Which process of a machine compiles into Triton's disk cache first. The processes of a machine that start one
    step together (torchrun's ranks, a sweep's runs) would each compile the same kernels into the same cache, each on
    its share of the cores; instead the first to take the turn compiles on all of them, and the others wait for it,
    then find its kernels in the cache. An exclusive flock on a file in the cache folder, held by the first from
    entering to leaving, and released by the OS however its process ends; a waiter's shared lock is granted when it
    is. `first`: True where this process holds the turn, False where another does (`wait` for it), None where the
    cache's file system cannot lock (each process then compiles on its own share). A process forked (not exec'd)
    while the turn is held holds it too, until it ends: fork nothing in between."""

    LOCK_NAME = "began_fast_compile.lock"

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.path = os.path.join(cache_dir or knobs.cache.dir, self.LOCK_NAME)
        self.file, self.first = None, None

    def __enter__(self) -> CompilerTurn:
        if fcntl is None:
            return self
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file = open(self.path, "a+")  # readable too: NFS grants a shared lock only to a reader
        except OSError:  # a cache folder this process cannot write
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.first = True
        except BlockingIOError:
            self.first = False
        except OSError:  # a file system without locks (ENOLCK, EOPNOTSUPP)
            pass
        return self

    def wait(self, limit_s: float, poll_s: float = 0.1) -> bool:
        """Where another process holds the turn, wait until it lets go (its compiles then in the cache), at most
        `limit_s` seconds (a process stopped while it holds the turn must not stop this one for ever). Whether the
        wait ended with the turn let go (False too where the lock stops answering: this process then goes on)."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(poll_s)
                continue
            except OSError:  # a file system that took the exclusive lock but refuses a shared one
                return False
            fcntl.flock(self.file, fcntl.LOCK_UN)  # the shared lock only said the turn was let go
            return True

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # lets go of the lock


class _AbsentGpuDriver:
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
def compiling_for(arch: int):
    """Inside, Triton compiles for an NVIDIA GPU of compute capability `arch` (90: Hopper) whether or not one is
    present, and the Triton conv layers take CPU tensors (to stand in for CUDA ones in a dry run: launching them
    would fail). Only for compiling: nothing may launch inside."""
    # Triton reads the target from its active driver; without a GPU there is none to read it from.
    with (
        mock.patch.object(driver, "_active", _AbsentGpuDriver(arch)),
        mock.patch.object(kernels.interpreter, "runs_on", lambda device: True),
    ):
        yield
