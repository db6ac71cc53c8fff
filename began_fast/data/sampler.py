"""A deterministic, resumable order of batches: the same (seed, step) always gives the same batch.

Step s of a run lies in epoch e = s // batches_per_epoch. Epoch e visits the items in the order of a permutation
drawn by a torch.Generator seeded with (seed, e); its batches_per_epoch = num_items // (batch_size * world_size)
global batches are consecutive slices of that permutation and the epoch's last partial batch is dropped, so a
batch never straddles two epochs. The flips of step s come from a generator seeded with (seed, s). Nothing
depends on the step a run began at, which is what makes a resumed run (--resume) see exactly the batches an
uninterrupted one would.

A run resumed with another global batch (on another number of ranks) goes on from its data position, which its
checkpoint keeps: the epoch it was in and how many of that epoch's items its batches had taken. It takes the rest
of that epoch in batches of the new size (dropping the last partial one), then whole epochs as above, so no item
comes twice in an epoch and none is left out but the partial batches. With the same global batch the position is
the one the step gives, and the order is as above.

Sharding: a global batch has batch_size * world_size items; rank r takes its slice [r*B, (r+1)*B). The ranks'
slices are disjoint and together make the global batch, so world_size ranks of batch B see the same items per
step as one process of batch world_size*B.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from began_fast.data.errors import DataError
from began_fast.seeds import FLIPS, PERMUTATION, generator
from began_fast.wording import counted


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside [0, world_size) or a world_size below 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank} of {world_size}")


def data_position(
    num_items: int, global_batch: int, step: int, start_step: int = 0, start_position: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(epoch, offset): the global batch of `step` is items [offset, offset + global_batch) of the epoch's
    permutation, in a run that was at `start_position` at `start_step` (None: where the step puts it; see the
    module docstring). An offset past the last whole batch (the data set shrank) goes on with the next epoch."""
    if step < start_step:
        raise ValueError(f"step {step} comes before the start, step {start_step}")
    batches_per_epoch = num_items // global_batch
    if start_position is None:
        epoch, j = divmod(start_step, batches_per_epoch)
        start_position = epoch, j * global_batch
    epoch, offset = start_position
    steps = step - start_step
    left = max(0, (num_items - offset) // global_batch)  # whole global batches left in the start epoch
    if steps < left:
        return epoch, offset + steps * global_batch
    epochs, j = divmod(steps - left, batches_per_epoch)
    return epoch + 1 + epochs, j * global_batch


class BatchOrder:
    """Iterable of (indices LongTensor (B,), flips BoolTensor (B,)) for steps start_step, start_step+1, ...

    Infinite: a training loop stops after its number of steps. See the module docstring for the order;
    start_position: the data position (epoch, offset) a resumed run's checkpoint kept, None for the step's own.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        start_position: tuple[int, int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_rank(rank, world_size)
        if batch_size < 1 or start_step < 0:
            raise DataError(f"batch_size must be >= 1 and start_step >= 0, got {batch_size} and {start_step}")
        if start_position is not None and min(start_position) < 0:
            raise DataError(f"a data position is an epoch and an offset, both >= 0, got {start_position}")
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise DataError(
                f"the data set has {counted(num_items, 'image')}, fewer than one global batch of {global_batch} "
                f"(batch {batch_size} x {counted(world_size, 'rank')})"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.start_position, self.rank, self.world_size = start_step, start_position, rank, world_size
        self.batches_per_epoch = num_items // global_batch
        self._epoch, self._permutation = -1, None

    def check_covers(self, num_items: int) -> None:
        """Refuse a loader's data set of another size than this order's: its indices would skip or overrun it."""
        if num_items != self.num_items:
            raise DataError(f"the batch order is over {self.num_items} items, the loader's data set has {num_items}")

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the items in `epoch`: a LongTensor permutation of range(num_items)."""
        if epoch != self._epoch:
            self._permutation = torch.randperm(self.num_items, generator=generator(self.seed, PERMUTATION, epoch))
            self._epoch = epoch
        return self._permutation

    def position(self, step: int) -> tuple[int, int]:
        """The data position (epoch, offset) of `step`, at or after the start (data_position)."""
        global_batch = self.batch_size * self.world_size
        return data_position(self.num_items, global_batch, step, self.start_step, self.start_position)

    def continued_at(self, step: int) -> BatchOrder:
        """This order from `step` on, as a BatchOrder that starts there."""
        return BatchOrder(
            self.num_items,
            self.batch_size,
            self.seed,
            step,
            start_position=self.position(step),
            rank=self.rank,
            world_size=self.world_size,
        )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (indices, flips) of `step`, at or after the start."""
        epoch, offset = self.position(step)
        global_batch = self.batch_size * self.world_size
        start = offset + self.rank * self.batch_size
        indices = self.permutation(epoch)[start : start + self.batch_size]
        flips = torch.rand(global_batch, generator=generator(self.seed, FLIPS, step)) < 0.5
        return indices, flips[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1
