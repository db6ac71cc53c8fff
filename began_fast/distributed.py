"""Data-parallel BEGAN across the ranks of a `torchrun` job (one process per GPU, one or several machines).

Why not DistributedDataParallel: the fast step runs one custom backward over [x; fake] with per-sample weight-
gradient scales and may be captured whole in a CUDA graph, so the step calls the collectives itself, at fixed
points of its body (see `Collectives`). What makes N ranks of per-rank batch B train like one process of batch N*B:
  - every rank starts from the same parameters (the same seed builds the same networks, or all load one checkpoint);
  - rank r sees rows [r*B, (r+1)*B) of each global batch of images (data.BatchOrder) and of noise (StepState.draw_z:
    every rank draws the global z from the shared seed and keeps its own rows);
  - G's and D's gradients are averaged over the ranks after backward, before the optimizers: the mean of the
    per-rank gradients of per-rank means is the gradient of the global mean;
  - L_real and L_fake are averaged before the k_t update, and k_t, M, L_D, L_G are recomputed from the global
    means, so every rank holds the same k_t bit for bit (all-reduce hands every rank the same sum) and scales its
    fake samples' weight gradients by the same -k_t.
A single-process run uses none of this: its step holds `collectives=None` and torch.distributed is never started.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import math
import os
import re
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from began_fast.config import ConfigError
from began_fast.reference import BalanceResult, began_balance

DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a typo or "never", which would hang a job on a dead rank
# The process group's own timeout is this much longer than --dist-timeout, which the training loop's HangGuard
# enforces with one line first (hang_guard.py); the process group's timeout is the backstop outside the loop.
PROCESS_GROUP_MARGIN_S = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The process that started this one, as early as it can be read: a launcher that ended before end_with_launcher()
# shows as another parent then (not as PID 1: in a container the launcher may be PID 1).
_PARENT_AT_IMPORT = os.getppid()


class CollectiveError(RuntimeError):
    """A collective failed or timed out (another rank died or hung); the message is one line meant for the user."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE and LOCAL_RANK (the GPU index on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment (env://); a plain `python` run is rank 0 of 1."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = os.environ.get(name, str(default))
            if not text.isdigit():
                raise ConfigError(f"environment variable {name} must be a non-negative integer, got {text!r}")
            values[name] = int(text)
        rank, world_size = values["RANK"], values["WORLD_SIZE"]
        if world_size < 1 or rank >= world_size:
            raise ConfigError(f"RANK must be in [0, WORLD_SIZE) and WORLD_SIZE >= 1, got RANK={rank} of {world_size}")
        return cls(rank, world_size, values["LOCAL_RANK"])

    def device(self, requested: str) -> str:
        """The device of this rank: `cuda` means this machine's GPU number LOCAL_RANK; cpu as given. An explicit
        cuda:N is refused when there are several ranks: it would put every rank of the machine on one GPU."""
        if self.world_size == 1 or torch.device(requested).type == "cpu":
            return requested
        if torch.device(requested).index is not None:
            raise ConfigError(
                f"--device {requested} would put every rank on one GPU; under torchrun give --device cuda (rank r "
                "takes its machine's GPU LOCAL_RANK; CUDA_VISIBLE_DEVICES picks which GPUs those are)"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {self.local_rank} needs GPU {self.local_rank}, but this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per machine (--nproc-per-node)"
            )
        return f"cuda:{self.local_rank}"


def machine_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_rank() -> int:
    """This process's share of the CPU cores for work of its own: torchrun's ranks on this machine
    (LOCAL_WORLD_SIZE) share them; a process of its own has them all. Under `torchrun --numa-binding` each rank
    may run on its own cores already, and is then given a share of those: fewer threads than it could run."""
    ranks_here = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, machine_cores() // max(1, int(ranks_here) if ranks_here.isdigit() else 1))


def lr_factor(rule: str, world_size: int) -> float:
    """The factor the lr is multiplied by for a global batch world_size times the per-rank batch:
    "none" keeps the paper's lr; "linear" scales it with the global batch (Goyal et al. 2017); "sqrt" with its
    square root (the variance of the gradient estimate falls as 1 / batch). TrainConfig checks the rule."""
    return {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[rule]


class Collectives:
    """The collectives a data-parallel step and loop need, over the default process group.

    Every rank must call the same methods in the same order (the step's body does, and the loop calls `max_`
    on the same steps everywhere). On NCCL the calls enqueue device work without a host sync, so a CUDA graph can
    capture them. A failure the call sees raises CollectiveError naming the rank and the timeout: gloo's failures
    (a closed connection, a timeout); NCCL reports its own later, from PyTorch's watchdog thread, which ends the
    process with its own log.
    """

    def __init__(self, world: World, timeout_s: float):
        self.world, self.timeout_s = world, timeout_s

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def rank(self) -> int:
        return self.world.rank

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        try:
            dist.all_reduce(tensor, op=op)
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL its subclass DistBackendError
            raise self.failure(e) from None

    def failure(
        self, error: BaseException, what: str = "a collective failed or timed out", cause: str = "died or hung"
    ) -> CollectiveError:
        """error as one line: which rank saw it, the timeout, and the likely cause."""
        detail = _gist(error)
        return CollectiveError(
            f"rank {self.rank} of {self.world_size}: {what} (--dist-timeout {self.timeout_s:g} s); another rank "
            f"probably {cause}; check the other ranks' logs ({detail})"
        )

    def average_gradients(self, params) -> None:
        """Replace each parameter's .grad with its mean over the ranks, in one all-reduce of one flat buffer.
        params: one network's parameters (one dtype), all with a gradient."""
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        # Divide before summing (as DDP does): an fp16-scaled gradient then cannot overflow in the sum alone.
        flat.div_(self.world_size)
        self._all_reduce(flat)
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    def global_balance(self, res: BalanceResult, k: torch.Tensor, gamma: float, lambda_k: float) -> BalanceResult:
        """res with L_real and L_fake replaced by their means over the ranks, and L_D, L_G, k_next and M
        recomputed from them (reference.began_balance). Detached: only for k_t and statistics."""
        means = torch.stack([res.l_real, res.l_fake]).detach().float().div(self.world_size)
        self._all_reduce(means)
        return began_balance(*means.unbind(0), k, gamma, lambda_k)

    def check_same(
        self,
        fingerprint: dict[str, int],
        device: torch.device | str,
        remedy: str = "give every rank the same flags and, to resume, the same latest.pt",
    ) -> None:
        """Raise ConfigError, on every rank, when a value of `fingerprint` ({what: int64}, the same keys
        on every rank) differs between the ranks; its message ends with `remedy`. Two tiny all-reduces; call it
        once per fingerprint, before training."""
        values = torch.tensor(list(fingerprint.values()), dtype=torch.int64, device=device)
        low, high = values.clone(), values.clone()
        self._all_reduce(low, op=dist.ReduceOp.MIN)
        self._all_reduce(high, op=dist.ReduceOp.MAX)
        differing = [what for what, a, b in zip(fingerprint, low.tolist(), high.tolist(), strict=True) if a != b]
        if differing:
            raise ConfigError(
                f"the {self.world_size} ranks do not start from the same run: {' and '.join(differing)} differ "
                f"between ranks; {remedy}"
            )

    def max_(self, number: int, device: torch.device) -> int:
        """The largest of `number` (a small integer) over the ranks (one tiny all-reduce and a host sync: call it
        rarely)."""
        value = torch.tensor(float(number), device=device)
        self._all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())


def _gist(error: BaseException) -> str:
    """The first sentence of error's message, without the source location gloo puts before it ("[.../pair.cc:553]
    Connection closed by peer [host]:port. This is typically caused by ... GLHF!"); its type where it has none."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    message = re.sub(r"^\[[^\]]*:\d+\]\s*", "", first_line)
    return message.split(". ")[0] or type(error).__name__


def start(world: World, device: torch.device | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Collectives | None:
    """Join the job's process group (env://): NCCL for a CUDA device, gloo otherwise. None for a single process.

    In the training loop a hang ends the rank after timeout_s through HangGuard. Elsewhere, and as a backstop, a
    collective that does not finish within timeout_s + PROCESS_GROUP_MARGIN_S raises (gloo) or, on NCCL, makes
    PyTorch's watchdog end the process with its own log (PyTorch's default TORCH_NCCL_ASYNC_ERROR_HANDLING=3, which
    does not abort the communicator first: that abort can itself hang).
    """
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(f"--dist-timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds (a week), got {timeout_s}")
    if world.world_size == 1:
        return None
    end_with_launcher()
    device = torch.device(device)
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    backend = "nccl" if device.type == "cuda" else "gloo"
    _import_holders_of_the_default_group()
    collectives = Collectives(world, timeout_s)
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=world.rank,
            world_size=world.world_size,
            timeout=datetime.timedelta(seconds=timeout_s + PROCESS_GROUP_MARGIN_S),
            **kwargs,
        )
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError when the rendezvous fails
        what, cause = "could not join the job's process group", "did not start, or MASTER_ADDR:MASTER_PORT is wrong"
        raise collectives.failure(e, what, cause) from None
    return collectives


def _import_holders_of_the_default_group() -> None:
    """Import, before the process group exists, the torch modules whose functions take `dist.group.WORLD` as a
    default argument (torch.distributed.nn's, which torch._dynamo imports, as torch.optim's first optimizer does):
    a default argument keeps the group found at import, so a module imported after init_process_group holds the
    group, and destroy_process_group() cannot free it. Its gloo threads then live on into the interpreter's exit,
    where they can abort a rank that finished its work (SIGABRT, "terminate called without an active exception"),
    and torchrun reports the job as failed. Imported first, those defaults hold None."""
    import torch._dynamo  # noqa: F401


def end_with_launcher() -> None:
    """Have Linux send this rank SIGTERM when the process that started it (torchrun's agent) ends.

    torchrun starts each rank in a session of its own (torch's SubprocessHandler: start_new_session=True), so a
    SIGKILL to the launcher's process group (`kill -9 -PGID`, `timeout -s KILL`, an OOM kill of the launcher) ends
    the launcher alone: without this its ranks would train on as orphans to their last step, holding the run
    folder's lock, so that the job's --resume is refused. With it they stop as a SIGTERM to the job stops them:
    together at their next statistics read, rank 0 writing a checkpoint (stop_on_interrupt; outside the loop the
    default action ends the rank). Only under torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _PARENT_AT_IMPORT:  # the launcher ended before prctl
        signal.raise_signal(signal.SIGTERM)


def stop() -> None:
    """Leave the process group, if one was started (NCCL warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
