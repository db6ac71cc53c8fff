"""The portable loader: a torch DataLoader over a source, in the resumable order of BatchOrder."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import weakref

import torch

from began_fast.data.sampler import BatchOrder
from began_fast.wording import counted


class _FlippedItems(torch.utils.data.Dataset):
    """Item (i, flip) is source[i], mirrored left-right when flip is true: (3, S, S) uint8."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, bool]) -> torch.Tensor:
        index, flip = item
        image = self.source[index]
        return image.flip(-1) if flip else image


def _leave_stop_signals_to_the_loop(worker_id: int) -> None:
    """A worker's start: Ctrl-C (SIGINT) reaches the whole process group, and a scheduler's SIGTERM (a time limit,
    a preemption, `kill -TERM -PGID`) every process of the job; both are the training loop's to handle (it finishes
    the step and writes a checkpoint). A worker they ended would make the DataLoader raise in the loop wherever it
    was, in the middle of writing that checkpoint too. The workers end with their loader (TorchLoader.close), or
    within seconds of their process if it is killed outright (they watch it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# The loaders with worker processes still running. At the interpreter's exit, multiprocessing ends the processes
# left with SIGTERM, which ours ignore, and then waits for them; PyTorch shuts them down before that only when it
# pins memory. So every loader left open is closed first (atexit runs its hooks last registered first, and this one
# is registered after multiprocessing's and PyTorch's: at the first loader with workers).
_open_loaders: weakref.WeakSet[TorchLoader] = weakref.WeakSet()


def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        loader.close()


class _BatchSampler:
    """BatchOrder as DataLoader's batch_sampler: lists of (index, flip) pairs."""

    def __init__(self, order: BatchOrder, flip: bool):
        self.order, self.flip = order, flip

    def __iter__(self):
        for indices, flips in self.order:
            yield list(zip(indices.tolist(), (flips & self.flip).tolist(), strict=True))


class TorchLoader:
    """Iterator of float32 (B, 3, S, S) batches in [-1, 1] on `device`, x = u8 / 127.5 - 1.

    Workers decode and flip uint8 images (a quarter of float32's bytes to move); the batch goes to the device
    pinned and non-blocking when the device is CUDA, and is converted to float there.
    Batch order and flips: `order`, a BatchOrder over this source (its batch size is this rank's).
    """

    def __init__(
        self,
        source,
        order: BatchOrder,
        *,
        flip: bool = True,
        num_workers: int = 2,
        device: torch.device | str = "cpu",
    ):
        order.check_covers(len(source))
        self.source, self.batch_size, self.num_workers = source, order.batch_size, num_workers
        self.device = torch.device(device)
        workers = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
        self._loader = torch.utils.data.DataLoader(
            _FlippedItems(source),
            batch_sampler=_BatchSampler(order, flip),
            num_workers=num_workers,
            worker_init_fn=_leave_stop_signals_to_the_loop,
            pin_memory=self.device.type == "cuda",
            **workers,
        )
        before = set(multiprocessing.active_children())
        self._batches = iter(self._loader)  # starts the (persistent) workers
        self._workers = [child for child in multiprocessing.active_children() if child not in before]
        if self._workers:
            if not _open_loaders:
                atexit.unregister(_close_open_loaders)
                atexit.register(_close_open_loaders)
            _open_loaders.add(self)

    def close(self) -> None:
        """End the worker processes: in order, as PyTorch does when its iterator goes (each takes the end-of-work
        signal, or is terminated, within a few seconds), and then any still alive is killed, since they ignore
        SIGTERM. The loader yields no more batches after it."""
        self._batches = self._loader = None  # the only references to the iterator: its __del__ shuts the workers down
        for worker in self._workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        self._workers = []
        _open_loaders.discard(self)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            raise RuntimeError("this TorchLoader was closed: it yields no more batches")
        batch = next(self._batches).to(self.device, non_blocking=True)
        return batch.float().div_(127.5).sub_(1.0)

    def describe(self) -> str:
        workers = counted(self.num_workers, "worker")
        return f"torch DataLoader ({workers}, batch {self.batch_size}) over {self.source.describe()}"
