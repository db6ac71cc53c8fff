"""The GPU-resident data set: every image in device memory as uint8, batches drawn on the device.

Layout: one (N, 3, S, S) uint8 tensor (NCHW). A batch is a gather along dim 0, which is then already the
(B, 3, S, S) layout the model reads: no transpose per step. uint8 keeps CelebA at 64 px in 2.5 GB (202,599 x
12,288 bytes); the conversion to float happens on the B gathered images only.

Randomness: indices (torch.randint, with replacement) and flips (torch.rand < 0.5) are drawn ON the device with
its Philox generator. Nothing reads a value back to the host, so sampling can be captured in a CUDA graph: the
captured kernels read the generator's seed and offset from device memory, and each replay advances the offset,
so every replay draws a fresh batch. (A non-default generator must be registered with the graph,
torch.cuda.CUDAGraph.register_generator_state.) This stream is not resumable step for step: a resumed or
graph-captured run continues with a new RNG stream. Sampling with replacement is the usual choice for a GAN: each
step sees B uniform draws, as in expectation an epoch-based order does.

Sharding (torchrun): every rank seeds the same generator and draws the indices and flips of the whole global batch
of world_size * B images, then gathers only its rows [rank*B, (rank+1)*B). The ranks' rows together are that global
batch, so world_size ranks of batch B see exactly the images one process of batch world_size*B sees (the few
extra random numbers are cheap next to the gather, which each rank does for its own rows only).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from began_fast.data.errors import DataError
from began_fast.data.sampler import check_rank, derived_seed

# The share of free memory the images may take: the rest is for the model, its activations and the optimizer.
MEMORY_SHARE = 0.5


def fits(num_images: int, image_size: int, device: torch.device | str) -> bool:
    """Whether num_images uint8 images of 3 x S x S fit in MEMORY_SHARE of the device's free memory."""
    device = torch.device(device)
    needed = num_images * 3 * image_size * image_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return needed <= MEMORY_SHARE * free


class GpuResidentSet:
    """All images of a source (or an array) as one (N, 3, S, S) uint8 tensor on `device`.

    source_or_uint8_array: an ImageSource (its `as_uint8()` when it has one, else its items stacked), a uint8
    tensor or numpy array of shape (N, 3, S, S), or of shape (N, S, S, 3) (NHWC, as HDF5 files store it).
    """

    def __init__(self, source_or_uint8_array, device: torch.device | str):
        self.device = torch.device(device)
        images = source_or_uint8_array
        self.description = images.describe() if hasattr(images, "describe") else "array"
        if hasattr(images, "as_uint8"):
            images = images.as_uint8()
        elif hasattr(images, "__getitem__") and not isinstance(images, (torch.Tensor, np.ndarray)):
            images = torch.stack([images[i] for i in range(len(images))])
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise DataError(
                f"GpuResidentSet needs uint8 images (N, 3, S, S) or (N, S, S, 3), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        if images.shape[2] != images.shape[3] or len(images) == 0:
            raise DataError(f"GpuResidentSet needs a non-empty set of square images, got {tuple(images.shape)}")
        self.images = images.contiguous().to(self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def sample_into(
        self,
        out: torch.Tensor,
        generator: torch.Generator | None = None,
        flip: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Fill `out`, a float (B, 3, S, S) tensor on the device, with B random images in [-1, 1], randomly
        mirrored left-right when flip is true: rows [rank*B, (rank+1)*B) of a global batch of world_size*B draws
        (see the module docstring). Capturable in a CUDA graph.
        """
        batch = out.shape[0]
        rows = slice(rank * batch, (rank + 1) * batch)
        global_batch = world_size * batch
        indices = torch.randint(len(self), (global_batch,), device=self.device, generator=generator)[rows]
        images = self.images.index_select(0, indices)
        if flip:
            mirrored = (torch.rand(global_batch, device=self.device, generator=generator) < 0.5)[rows]
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        out.copy_(images).div_(127.5).sub_(1.0)  # x = u8 / 127.5 - 1

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        flip: bool = True,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ) -> torch.Tensor:
        """B random images, (B, 3, S, S) of `dtype` in [-1, 1] on the device (see sample_into)."""
        out = torch.empty(batch_size, 3, self.image_size, self.image_size, device=self.device, dtype=dtype)
        self.sample_into(out, generator, flip, rank=rank, world_size=world_size)
        return out

    def describe(self) -> str:
        megabytes = self.images.numel() / 2**20
        return f"{self.device.type}-resident uint8 NCHW ({megabytes:.0f} MiB) of {self.description}"


class GpuResidentStream:
    """Iterator of this rank's (B, 3, S, S) float32 batches, sampled from a GpuResidentSet with its own device
    generator: rows [rank*B, (rank+1)*B) of each global batch of world_size*B draws.

    The generator is seeded with (seed, start_step), the same on every rank: reproducible for a given start, but a
    resumed run draws a new stream (see the module docstring).
    """

    def __init__(
        self,
        images: GpuResidentSet,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
    ):
        check_rank(rank, world_size)
        self.images, self.batch_size, self.flip = images, batch_size, flip
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(images.device).manual_seed(derived_seed(seed, start_step))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.images.sample(
            self.batch_size, self.generator, flip=self.flip, rank=self.rank, world_size=self.world_size
        )

    def sample_into(self, out: torch.Tensor) -> None:
        """This rank's next batch into `out` (capturable in a CUDA graph, see GpuResidentSet.sample_into)."""
        self.images.sample_into(out, self.generator, self.flip, rank=self.rank, world_size=self.world_size)

    def describe(self) -> str:
        shard = f", rank {self.rank}'s rows of a {self.world_size}-rank global batch" if self.world_size > 1 else ""
        where = self.images.device.type
        return f"{where}-side sampler (batch {self.batch_size}, with replacement{shard}) over {self.images.describe()}"
