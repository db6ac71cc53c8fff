"""What the command-line scripts share: the --device and --data flags, and errors and warnings printed as one line."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from began_fast.config import ConfigError
from began_fast.distributed import World, cores_per_rank, machine_cores

# A negative number in scientific notation, which argparse (Python 3.10 to 3.13) reads as a flag, not as a value.
NEGATIVE_SCIENTIFIC = re.compile(r"-(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (a missing argument, `--steps abc`) are one line on stderr, exit 2, rather
    than the whole usage text and then the error. `--lr -1e-4` is read as `--lr=-1e-4`, so the value is checked as
    one (argparse said that --lr's argument was missing). `error_prefix` goes before the message, as every other
    error of the script has it ("rank R of N: " under torchrun)."""

    error_prefix = ""

    def parse_known_args(self, args=None, namespace=None):
        given = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        for arg in given:
            # After a flag spelt in full that takes one value (argparse's own table of them: an abbreviation, or a
            # flag that takes none, keeps argparse's message about it), before any "--".
            action = self._option_string_actions.get(joined[-1]) if joined and "--" not in joined else None
            if action is not None and action.nargs is None and NEGATIVE_SCIENTIFIC.fullmatch(arg):
                joined[-1] += "=" + arg
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def error(self, message: str):
        say_line(f"error: {self.error_prefix}{message} (see {self.prog} --help)")
        sys.exit(2)


def output_path(text: str) -> Path:
    """argparse type of a flag naming where to write: an empty value (an unset shell variable) is refused, as it
    would name the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give a path")
    return Path(text)


def input_path(text: str) -> Path:
    """argparse type of an argument naming what to read: an empty value is refused as output_path refuses it (read
    as the working directory, it was reported as '. is not a run folder')."""
    return output_path(text)


def check_writable(path: Path, flag: str, *, folder: bool = False, create: bool = True) -> None:
    """Before any work is done: that `path`, given by `flag`, can be written, as a folder to write into or (folder
    False) as a file that atomic_write replaces (a temporary file beside it, renamed over it). Creates the missing
    folders, or (create False: checks that come before others that may still refuse the call) tries a write in the
    nearest one there is; ConfigError naming the flag otherwise."""
    for existing in (path, *path.parents):
        if existing.exists():
            if existing != path and not existing.is_dir():
                raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
            break
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; expected a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; expected a file name")
    where = path if folder else path.parent
    if not create:
        where = next(existing for existing in (where, *where.parents) if existing.exists())
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write into {where} ({e.strerror})") from None


def check_workers(workers: int, fewest: int) -> None:
    """Refuse a --workers outside [fewest, 4 per core of this process's share]: decoding is CPU-bound, so more
    processes only take more memory (--workers 100000 started that many, then ran out of it). Each torchrun rank
    starts its own workers, so its share is its part of the machine's cores (cores_per_rank): 8 ranks on 16 cores
    were each allowed 64, 512 processes in all."""
    cores, machine = cores_per_rank(), machine_cores()
    most = 4 * cores
    if not fewest <= workers <= most:
        share = "" if cores == machine else f" of this rank's {cores}, its share of the {machine} it may run on"
        raise ConfigError(f"--workers must be in [{fewest}, {most}] (4 per core{share}), got {workers}")


def print_result(text: str) -> None:
    """`text` on stdout: a script's result (a table, JSON). A reader that went away early (`| head -1`) is no error
    of the script's: the rest of the text is dropped, stdout then goes to /dev/null (Python's flush at exit would
    fail again, with a traceback), and the script goes on to write its files."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def check_one_process(script: str) -> None:
    """ConfigError when torchrun started `script`, one of those that run in one process (all but train.py), as
    several: each would do the whole job, on the same GPU, and write the same files."""
    processes = World.from_env().world_size  # a torchrun environment that is not one: said as train.py says it
    if processes > 1:
        raise ConfigError(
            f"{script} runs in one process, and torchrun started {processes} (WORLD_SIZE): start it with python; "
            "only train.py trains across processes"
        )


def check_seed(seed: int) -> None:
    """--seed seeds torch.Generator, which takes [0, 2**63 - 1): ConfigError otherwise."""
    if not 0 <= seed < 2**63 - 1:
        raise ConfigError(f"--seed must be in [0, 2**63 - 1), got {seed}")


def resolve_device(requested: str | None) -> str:
    """--device: cpu, cuda or cuda:N; None means cuda when PyTorch sees a GPU, else cpu. ConfigError otherwise.
    cuda:N becomes the current CUDA device: Triton launches its kernels on the current device's stream, and a CUDA
    graph captures there, whatever device the tensors are on (on GPU 0, with pointers into GPU N)."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cpu":  # cpu:0 is the one CPU device too
        if device.index not in (None, 0):
            raise ConfigError(f"--device {requested}: the CPU is one device; give --device cpu")
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    if device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return requested


def check_impl_env() -> None:
    """BEGAN_FAST_IMPL, which overrides the networks' impl="auto" (ops.resolve_impl): ConfigError when it is set to
    no impl, before any work; otherwise the first layer of the first forward raises a ValueError there."""
    from began_fast.ops import impl_override

    try:
        impl_override()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def data_path(given: str | None) -> str | None:
    """--data as an absolute path (a run resumes from any folder); None (not given) means the built-in faces. An
    empty value (an unset shell variable) is refused: it would name the working directory."""
    if given is None:
        return None
    if not given.strip():
        raise ConfigError(
            "--data is empty: give a CelebA folder, an image folder or an HDF5 file, or leave --data out for the "
            "built-in faces"
        )
    return str(Path(given).resolve())


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker reaches the main process wrapped
    in the worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), whose
    last line is the original "package.module.DataError: message"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):
        name, colon, message = lines[-1].partition(": ")  # "package.module.DataError: message"
        return message if colon and name.split(".")[-1] == type(error).__name__ else lines[-1]
    return " ".join(lines)


# A failed CPU allocation (torch's DefaultCPUAllocator): "... can't allocate memory: you tried to allocate N bytes."
CPU_OUT_OF_MEMORY = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
# Out of GPU memory outside PyTorch's caching allocator: a CUDA call that failed (torch.AcceleratorError: a graph's
# instantiation, a library's workspace) or Triton loading a kernel's binary onto the GPU.
GPU_OUT_OF_MEMORY = re.compile(r"(?:CUDA error|Triton Error \[CUDA\]): out of memory")


def out_of_memory(error: RuntimeError, what: str) -> str | None:
    """When `error` is a failed allocation, one line that says so ("CUDA out of memory: the step does not fit this
    GPU's memory"): sizes too large for the device are bad input, to which the script adds what to lower. None for
    any other error."""
    if isinstance(error, torch.OutOfMemoryError):  # "CUDA out of memory. Tried to allocate ...": its first sentence
        return f"{one_line(error).split('. ')[0]}: {what} does not fit this GPU's memory"
    if gpu := GPU_OUT_OF_MEMORY.search(str(error)):
        return f"{gpu[0]}: {what} does not fit this GPU's memory"
    if cpu := CPU_OUT_OF_MEMORY.search(str(error)):
        return f"cannot allocate {int(cpu[1]):,} bytes: {what} does not fit this machine's memory"
    return None


# What Python's own stderr does with what UTF-8 cannot encode: a path that is not UTF-8 (its bytes decoded as lone
# surrogates) is written as '\udce9', where a strict encode raised in the middle of saying the error.
STDERR_ERRORS = "backslashreplace"


def say_line(line: str) -> None:
    """`line` on stderr in one write: the ranks of a torchrun job share the launcher's stderr, and lines written in
    parts can interleave. A progress bar on stderr is cleared first and drawn again after it (tqdm's
    external_write_mode), so the line does not land in the middle of the bar's. A stderr with no file descriptor
    (replaced in the process, as pytest's capsys does) gets it as text."""
    with tqdm.external_write_mode(file=sys.stderr):
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
            print(line, file=sys.stderr)
            return
        sys.stderr.flush()
        os.write(fd, (line + "\n").encode(errors=STDERR_ERRORS))


@contextlib.contextmanager
def warnings_as_lines(prefix: str = ""):
    """Within it a warning is printed as one line, "warning: <prefix><message>", not as Python's "file:line:
    Category: message" with the source line under it."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_args, **_kwargs: say_line(f"warning: {prefix}{one_line(message)}")
        yield


def say_line_in_a_handler(line: str, below_a_bar: bool) -> None:
    """`line` on stderr from a signal handler, which runs between two bytecodes of the code it interrupts: straight
    to stderr's descriptor, past Python's stream buffer and tqdm's lock, which that code may hold (say, blocked
    writing a progress bar to a full pipe: say_line would then raise into it). below_a_bar: start a new line first.
    A line that cannot be written is left out."""
    text = ("\n" if below_a_bar else "") + line + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced in the process (pytest's capsys)
        fd = None
    try:
        if fd is None:
            sys.stderr.write(text)
        else:
            os.write(fd, text.encode(errors=STDERR_ERRORS))
    except (OSError, ValueError, RuntimeError):
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; a scheduler's preemption or time limit, `timeout`
_stop_state: list[list[int]] = []  # the signals received within each open stop_signals(), innermost last


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C's SIGINT, or SIGTERM: `timeout`, a scheduler, `docker stop`) within stop_signals();
    the script ends with one line and status 128 + signum, as train.py does."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum

    @property
    def what(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"


def interruption(error: KeyboardInterrupt) -> Interrupted:
    """`error` as an Interrupted: a plain KeyboardInterrupt (Python's own Ctrl-C handler) is a SIGINT."""
    return error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)


@contextlib.contextmanager
def stop_signals():
    """Within it SIGINT and SIGTERM raise Interrupted, and are remembered: check_stop() raises it again. Python drops
    an exception raised while a finalizer runs (a weakref callback, an h5py or PIL object freed), so a Ctrl-C that
    lands there would be lost and the script would finish and exit 0; a script calls check_stop() in its loops and
    before it replaces an earlier output. Without the SIGTERM handler, a SIGTERM would end it at once, with no
    line and its temporary files left behind."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    def unraisable(info):  # the dropped stop signal is check_stop()'s to raise: no traceback for it
        if not isinstance(info.exc_value, Interrupted):
            previous_hook(info)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    _stop_state.append(received)
    try:
        yield
    finally:
        _stop_state.pop()
        sys.unraisablehook = previous_hook
        for signum, old in previous.items():
            signal.signal(signum, old)


def check_stop() -> None:
    """Raise Interrupted if a stop signal came within stop_signals() (see there)."""
    if _stop_state and _stop_state[-1]:
        raise Interrupted(_stop_state[-1][0])


@contextlib.contextmanager
def stop_signals_held():
    """Within stop_signals(): a stop signal during the block (an earlier output going out and the new one in) is
    raised once the block is done, not in the middle of it."""
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if held:
        if _stop_state:
            _stop_state[-1].extend(held)
        raise Interrupted(held[0])
