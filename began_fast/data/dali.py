"""The NVIDIA DALI loader: JPEGs decoded on the GPU (or, without one, on the CPU), same output as TorchLoader.

Two pipelines, one contract: float (B, 3, S, S) batches in [-1, 1], x = u8 / 127.5 - 1, on `device`. Both are fed
batch-wise by fn.external_source in BatchOrder's order, with BatchOrder's flips, so their batches hold the
TorchLoader's images in the TorchLoader's order for the same seed, and a resumed run (start_step) continues exactly.

- Image folders (CelebA or any folder): the encoded bytes of the batch's files (which the source has already
  screened: truncated JPEGs and non-images are left out and counted by its SkippedImagesWarning, since DALI's
  decoder fails the whole batch on one bad file; a file that fails later, deleted or damaged inside, is found
  with PIL when DALI fails, and the pipeline is rebuilt at the same step with it replaced by the next file, as the
  torch loader replaces it), a decoder that reads only the crop window (ROI decode; "mixed" =
  nvJPEG on the GPU, "cpu" without one; grayscale and CMYK come out RGB), an antialiased Lanczos resize to S (PIL's
  LANCZOS filter: 3 lobes, widened by the scale factor), the mirror, and the normalisation to NCHW.
- HDF5 (already cropped images): the batch's rows, resized only when stored at another size.

The files are read in the consumer's thread as DALI asks for batches to prefetch: about 15 us a file from the page
cache (measured on a 2-core EPYC), so one thread feeds some 60,000 images/s; the decoding and resizing run on DALI's
threads or the GPU. Both iterate forever; an epoch's last partial global batch is dropped, as BatchOrder does.
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
from began_fast.data import default_workers
from began_fast.data.errors import DataError, check_folder_there
from began_fast.data.hdf5 import DATASET
from began_fast.data.images import crop_box, load_image
from began_fast.data.sampler import BatchOrder
from began_fast.wording import counted

# DALI has no bfloat16: bf16 batches are normalised in float32 and cast by torch.
OUTPUT_TYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


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


def _folder_pipeline(source, image_size, dtype, batches, decoder):
    encoded, mirror = fn.external_source(source=batches, num_outputs=2, batch=True)
    start, shape = _crop_window(encoded, source.crop, source.crop_size, source.files[0])
    images = fn.decoders.image_slice(
        encoded,
        start=start,
        shape=shape,
        axis_names="WH",
        device=decoder,
        output_type=types.RGB,
        jpeg_fancy_upsampling=True,  # chroma upsampled as libjpeg does (PIL), also in nvJPEG
    )
    return _normalise(_resize(images, image_size), mirror, dtype)


class _OrderedBatches:
    """Batch-wise external source: each next() is this rank's (read(indices), flips (B,) int32) of the next step in
    BatchOrder's order; the flips are all 0 without `flip`."""

    def __init__(self, order: BatchOrder, flip: bool, read):
        self.order, self.flip, self.read = order, flip, read

    def __iter__(self):
        for indices, flips in self.order:
            yield self.read(indices.numpy()), (flips.numpy() & self.flip).astype(np.int32)


class _EncodedFiles:
    """A folder's files (source: an ImageFolder) as encoded bytes, one uint8 array per file, for DALI's decoder.

    A file in `broken` (one DALI could not decode, see DaliLoader.__next__) or that cannot be read any more is
    replaced by the next one of the list, as the torch loader replaces a file it cannot decode.
    """

    def __init__(self, source):
        self.source, self.files, self.root, self.broken = source, source.files, source.root, set()

    def __call__(self, indices: np.ndarray) -> list[np.ndarray]:
        return [self.read(i) for i in indices]

    def read(self, index: int) -> np.ndarray:
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            if i in self.broken:
                continue
            try:
                return np.fromfile(self.files[i], dtype=np.uint8)
            except OSError as error:
                check_folder_there(self.root)  # as the torch loader
                self.drop(i, error)
        raise DataError(f"none of the {len(self.files)} image files can be read any more")

    def drop(self, index: int, error: Exception) -> None:
        """Leave file `index` out from now on, with the folder's one warning about it: the reconstruction grid's
        reads of the folder, meeting it too, say nothing more."""
        self.broken.add(index)
        self.source.failed(index, error)


class _Hdf5Rows:
    """An HDF5 file's `images` rows as (B, s, s, 3) uint8 (stored size s; flat rows reshaped)."""

    def __init__(self, source):
        self.source, self.file = source, None

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self.file is None:  # opened by the thread that feeds DALI, and kept open
            self.file = h5py.File(self.source.path, "r")
        rows = self.file[DATASET]
        # h5py reads a point selection only in increasing order: read sorted, then put back in order.
        stored = self.source.stored_size
        ascending = np.argsort(indices)
        batch = np.empty((len(indices), stored, stored, 3), np.uint8)
        batch[ascending] = rows[indices[ascending]].reshape(-1, stored, stored, 3)
        return batch


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
    loader). source: cfg's source at image_size, opened by the caller; order: a BatchOrder over it, whose batches
    and flips these are (as the torch loader's are), so a resume continues exactly.
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        source,
        order: BatchOrder,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 2,
    ):
        if dtype not in OUTPUT_TYPES:
            raise DataError(f"the DALI loader makes float32, float16 or bfloat16 batches, got {dtype}")
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, order.batch_size
        self.prefetch, self.source = prefetch, source
        order.check_covers(len(source))
        if self.source.kind not in ("celeba", "folder", "hdf5"):
            raise DataError(f"the DALI loader reads image folders and HDF5 files, not the {self.source.kind} source")
        self.flip, self.image_size = cfg.flip, image_size
        on_gpu = self.device.type == "cuda"
        self.decoder = "mixed" if on_gpu else "cpu"
        workers = default_workers("folder") if cfg.num_workers is None else cfg.num_workers
        self.num_threads = max(1, workers)
        self._files = _EncodedFiles(self.source) if self.source.kind != "hdf5" else None
        self._order = order
        self.batches_per_epoch = order.batches_per_epoch
        self._start(order.start_step)

    def _start(self, step: int) -> None:
        """Build the pipeline whose first batch is that of `step`."""
        on_gpu = self.device.type == "cuda"
        pipeline = pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if on_gpu
            else None,
            prefetch_queue_depth=self.prefetch,
        )
        order = self._order.continued_at(step)
        if self._files is None:
            batches = _OrderedBatches(order, self.flip, _Hdf5Rows(self.source))
            pipe = pipeline(_hdf5_pipeline)(self.source, self.image_size, self.dtype, batches, on_gpu)
        else:
            batches = _OrderedBatches(order, self.flip, self._files)
            pipe = pipeline(_folder_pipeline)(self.source, self.image_size, self.dtype, batches, self.decoder)
        pipe.build()
        # The external source never ends: no reader, no epochs inside DALI (BatchOrder has them). The first batch is
        # made by the first next(), not here: a file DALI cannot decode in it fails there, where __next__ replaces it.
        self._batches = DALIGenericIterator(
            pipe, ["images"], last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False
        )
        self.step = step

    @property
    def epoch(self) -> int:
        """The completed epochs: an epoch is `batches_per_epoch` batches in both pipelines (the one a resume on
        another number of ranks went on with, fewer or more)."""
        return self._order.position(self.step)[0]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        while True:
            try:
                batch = next(self._batches)
                break
            except RuntimeError as error:  # DALI's decoder fails a whole batch on one file it cannot decode
                if self._files is None:
                    raise
                if not self._drop_undecodable():
                    reason = str(error).strip().splitlines()[0]
                    raise DataError(
                        f"DALI failed on the batch of step {self.step} ({reason}) and PIL decodes each of its "
                        f"files; use --loader torch"
                    ) from None
                self._start(self.step)  # the same step again, with the broken files replaced
        self.step += 1
        return batch[0]["images"].to(self.dtype)

    def _drop_undecodable(self) -> bool:
        """After DALI failed a batch: decode with PIL every file of the batches it may have been preparing (this
        step's and the prefetched ones) and drop those that fail. Whether any was dropped."""
        dropped = False
        for step in range(self.step, self.step + self.prefetch + 2):
            indices, _ = self._order.batch(step)
            for i in indices.tolist():
                if i in self._files.broken:
                    continue
                try:
                    path = self.source.files[i]
                    load_image(
                        path, self.image_size, self.source.crop, self.source.crop_size, path in self.source.large
                    )
                except (OSError, ValueError, Image.DecompressionBombError) as error:
                    self._files.drop(i, error)
                    dropped = True
        return dropped

    def describe(self) -> str:
        return (
            f"DALI ({self.decoder} decode, {counted(self.num_threads, 'thread')}, prefetch {self.prefetch}, batch "
            f"{self.batch_size}, shard {self._order.rank} of {self._order.world_size}) over {self.source.describe()}"
        )
