"""The NVIDIA DALI loader: JPEGs decoded on the GPU (or, without one, on the CPU), same output as TorchLoader.

Two pipelines, one contract: float (B, 3, S, S) batches in [-1, 1], x = u8 / 127.5 - 1, on `device`.

- Image folders (CelebA or any folder): DALI's file reader over the source's `files` (which the source has
  already screened: truncated JPEGs and non-images are left out and counted by its SkippedImagesWarning, since
  DALI's decoder fails the whole batch on one bad file), a decoder that reads only the crop window (ROI decode;
  "mixed" = nvJPEG on the GPU, "cpu" without one; grayscale and CMYK come out RGB), an antialiased Lanczos
  resize to S (PIL's LANCZOS filter: 3 lobes, widened by the scale factor), a per-sample random mirror, and the
  normalisation to NCHW. The file list is shuffled once by `seed` and reshuffled after every epoch by the same
  seed on every rank, so the ranks' contiguous shards are disjoint and together cover every file once per epoch.
- HDF5 (already cropped images): fn.external_source fed batch-wise in BatchOrder's order, with BatchOrder's flips,
  so its batches are the TorchLoader's batches for the same seed.

Both iterate forever: an epoch boundary resets the DALI iterator and the next batch comes from the next epoch; an
epoch's last partial batch is dropped (LastBatchPolicy.DROP).
"""

from __future__ import annotations

import h5py
import numpy as np
import nvidia.dali.math as dali_math
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from began_fast.config import DataConfig
from began_fast.data import default_workers, open_source
from began_fast.data.errors import DataError
from began_fast.data.hdf5 import DATASET
from began_fast.data.images import crop_box
from began_fast.data.sampler import BatchOrder

READER = "files"
# DALI has no bfloat16: bf16 batches are normalised in float32 and cast by torch.
OUTPUT_TYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


def _seed(*key: int) -> int:
    """A 31-bit DALI seed hashed from the whole key, so (seed, rank) pairs never collide as seed + rank would."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0] & 0x7FFFFFFF)


def _normalise(images, mirror, dtype: torch.dtype):
    """(S, S, 3) uint8 HWC samples -> (3, S, S) in [-1, 1]: (u8 - 127.5) / 127.5, mirrored where mirror is 1."""
    return fn.crop_mirror_normalize(
        images, dtype=OUTPUT_TYPES[dtype], output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror
    )


def _resize(images, image_size: int):
    # Antialiased Lanczos-3, as PIL's Image.resize(LANCZOS) that the torch loader uses.
    return fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LANCZOS3, antialias=True)


def _crop_window(encoded, crop: str, crop_size: int | None, first_file: str):
    """(start, shape) of each sample's square crop box in absolute (x, y) pixels: constants or DALI CPU nodes.

    celeba: the box does not depend on the image size, so crop_box gives it once (the source checked that it fits
    every file). center: crop_box's centred square, computed per sample from the JPEG header's (H, W, C).
    """
    if crop == "celeba":
        with Image.open(first_file) as image:
            left, top, size = crop_box(image.width, image.height, crop, crop_size)
        return [left, top], [size, size]
    height_width_channels = fn.peek_image_shape(encoded, dtype=types.INT32)  # image_slice takes int32 pixels
    height, width = height_width_channels[0], height_width_channels[1]
    if crop_size is None:
        size = dali_math.min(width, height)
        return fn.stack((width - size) // 2, (height - size) // 2), fn.stack(size, size)
    return fn.stack((width - crop_size) // 2, (height - crop_size) // 2), [crop_size, crop_size]


def _folder_pipeline(source, image_size, dtype, flip, seed, rank, world_size, decoder):
    files = [source.files[i] for i in np.random.default_rng(_seed(seed)).permutation(len(source.files))]
    encoded, _ = fn.readers.file(
        files=files,
        shard_id=rank,
        num_shards=world_size,
        shuffle_after_epoch=True,
        seed=_seed(seed),  # the same on every rank, so every rank reshuffles the same way
        pad_last_batch=True,  # an epoch ends on its own batch instead of borrowing the next epoch's files
        name=READER,
    )
    start, shape = _crop_window(encoded, source.crop, source.crop_size, files[0])
    images = fn.decoders.image_slice(
        encoded,
        start=start,
        shape=shape,
        axis_names="WH",
        device=decoder,
        output_type=types.RGB,
        jpeg_fancy_upsampling=True,  # chroma upsampled as libjpeg does (PIL), also in nvJPEG
    )
    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    return _normalise(_resize(images, image_size), mirror, dtype)


class _Hdf5Batches:
    """Batch-wise external source: each next() is this rank's (images (B, s, s, 3) uint8, flips (B,) int32) in
    BatchOrder's order, read from the file's `images` dataset (stored size s; flat rows reshaped)."""

    def __init__(self, source, order: BatchOrder, flip: bool):
        self.source, self.order, self.flip = source, order, flip

    def __iter__(self):
        with h5py.File(self.source.path, "r") as f:
            rows = f[DATASET]
            stored = self.source.stored_size
            for indices, flips in self.order:
                # h5py reads a point selection only in increasing order: read sorted, then put back in order.
                indices = indices.numpy()
                ascending = np.argsort(indices)
                batch = np.empty((len(indices), stored, stored, 3), np.uint8)
                batch[ascending] = rows[indices[ascending]].reshape(-1, stored, stored, 3)
                yield batch, (flips.numpy() & self.flip).astype(np.int32)


def _hdf5_pipeline(source, image_size, dtype, batches, on_gpu):
    images, mirror = fn.external_source(source=batches, num_outputs=2, batch=True, layout=["HWC", ""])
    if on_gpu:
        images = images.gpu()
    if source.stored_size != image_size:
        images = _resize(images, image_size)
    return _normalise(images, mirror, dtype)


class DaliLoader:
    """Iterator of (B, 3, S, S) batches in [-1, 1] (float32, or `dtype`) on `device`, decoded by NVIDIA DALI.

    device: a CUDA device decodes with nvJPEG ("mixed") and returns batches there; "cpu" runs DALI's CPU pipeline.
    cfg.num_workers: DALI's CPU threads (at least 1). prefetch: batches DALI prepares ahead of the consumer.
    Infinite: iterate for as many steps as the run needs; `step` counts the batches returned, `epoch` the
    completed epochs and `batches_per_epoch` (len) is this rank's number of batches in an epoch.
    Only image folders and HDF5 files are read; the built-in faces have no files to decode (use the torch or gpu
    loader). start_step: the step a resumed run continues at. An HDF5 file is read in BatchOrder's order, so a
    resume continues it exactly (the same batches and flips as the torch loader); an image folder's reader
    shuffles inside DALI, and a resumed run starts a new shuffled epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        batch_size: int,
        *,
        device: torch.device | str,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 2,
    ):
        if dtype not in OUTPUT_TYPES:
            raise DataError(f"the DALI loader makes float32, float16 or bfloat16 batches, got {dtype}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank} of {world_size}")
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.source = open_source(cfg, image_size)
        if self.source.kind not in ("celeba", "folder", "hdf5"):
            raise DataError(f"the DALI loader reads image folders and HDF5 files, not the {self.source.kind} source")
        on_gpu = self.device.type == "cuda"
        self.decoder = "mixed" if on_gpu else "cpu"
        workers = default_workers("folder") if cfg.num_workers is None else cfg.num_workers
        self.num_threads = max(1, workers)
        pipeline = pipeline_def(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if on_gpu
            else None,
            seed=_seed(seed, rank),  # the mirror coins: different on every rank
            prefetch_queue_depth=prefetch,
        )
        if self.source.kind == "hdf5":
            order = BatchOrder(len(self.source), batch_size, seed, start_step, rank=rank, world_size=world_size)
            self.batches_per_epoch = order.batches_per_epoch
            batches = _Hdf5Batches(self.source, order, cfg.flip)
            pipe = pipeline(_hdf5_pipeline)(self.source, image_size, dtype, batches, on_gpu)
            reader = None
        else:
            files = len(self.source.files)
            shard = files * (rank + 1) // world_size - files * rank // world_size  # DALI's shard bounds
            self.batches_per_epoch = shard // batch_size
            if self.batches_per_epoch == 0:
                raise DataError(
                    f"rank {rank} of {world_size} gets {shard} of the {files} images, fewer than one batch of "
                    f"{batch_size}; use a smaller batch size or more images"
                )
            decoder = self.decoder
            pipe = pipeline(_folder_pipeline)(self.source, image_size, dtype, cfg.flip, seed, rank, world_size, decoder)
            reader = READER
        pipe.build()
        self._batches = DALIGenericIterator(
            pipe, ["images"], reader_name=reader, auto_reset=True, last_batch_policy=LastBatchPolicy.DROP
        )
        self.step = start_step

    @property
    def epoch(self) -> int:
        """This rank's completed epochs: an epoch is `batches_per_epoch` batches in both pipelines."""
        return self.step // self.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        try:
            batch = next(self._batches)
        except StopIteration:  # end of a reader epoch: auto_reset has rewound the reader; start the next epoch
            batch = next(self._batches)
        self.step += 1
        return batch[0]["images"].to(self.dtype)

    def describe(self) -> str:
        return (
            f"DALI ({self.decoder} decode, {self.num_threads} threads, prefetch {self.prefetch}, batch "
            f"{self.batch_size}, shard {self.rank} of {self.world_size}) over {self.source.describe()}"
        )
