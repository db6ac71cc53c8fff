"""Training images: the sources (built-in faces, CelebA folder, image folder, HDF5) and the loaders that turn
them into float batches in [-1, 1] (torch DataLoader, GPU-resident, NVIDIA DALI).

A source is a torch Dataset whose item i is a (3, S, S) uint8 tensor, already cropped and resized, with a
one-line `describe()` and a `kind` ("builtin", "celeba", "folder" or "hdf5"); folder sources also list their
`files`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import h5py
import torch

from began_fast.config import DataConfig
from began_fast.data.builtin import BuiltinFaces
from began_fast.data.errors import DataError, SkippedImagesWarning
from began_fast.data.folder import ImageFolder, default_crop
from began_fast.data.gpu_resident import MEMORY_SHARE, GpuResidentSet, GpuResidentStream, fits
from began_fast.data.hdf5 import Hdf5Images
from began_fast.data.holdout import TrainingImages, held_out_images
from began_fast.data.images import crop_box
from began_fast.data.loader import TorchLoader
from began_fast.data.sampler import BatchOrder
from began_fast.distributed import cores_per_rank
from began_fast.wording import counted

__all__ = [
    "BatchOrder",
    "DataError",
    "GpuResidentSet",
    "SkippedImagesWarning",
    "TorchLoader",
    "crop_box",
    "dali_install_command",
    "dali_installed",
    "default_crop",
    "detect_source",
    "fitted_crop",
    "held_out_images",
    "make_batches",
    "open_source",
]

CELEBA_FOLDER = "img_align_celeba"
HDF5_SUFFIXES = (".h5", ".hdf5")


def detect_source(path: str | None) -> tuple[str, str | None]:
    """(kind, path) for source="auto": None -> builtin; .h5/.hdf5 or an HDF5 file -> hdf5; a folder that is or
    holds img_align_celeba -> celeba (the path becomes that folder); any other folder -> folder."""
    if path is None:
        return "builtin", None
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist; expected an image folder or an HDF5 file")
    if os.path.isdir(path):
        if os.path.basename(os.path.normpath(path)) == CELEBA_FOLDER:
            return "celeba", path
        if os.path.isdir(os.path.join(path, CELEBA_FOLDER)):
            return "celeba", os.path.join(path, CELEBA_FOLDER)
        return "folder", path
    if path.lower().endswith(HDF5_SUFFIXES) or h5py.is_hdf5(path):
        return "hdf5", path
    raise DataError(f"data path {path} is a file but not HDF5; expected an image folder or an .h5 file")


def resolve_source(cfg: DataConfig) -> tuple[str, str | None]:
    """(kind, path) of the source that cfg names; the path is what is read (a CelebA folder given by its parent:
    its img_align_celeba). DataError when the path is missing or not of the kind cfg.source asks for."""
    if cfg.source == "auto":
        return detect_source(cfg.path)
    if cfg.source == "builtin":
        if cfg.path is not None:
            raise DataError(f"the builtin source takes no data path, got {cfg.path}")
        return "builtin", None
    if cfg.path is None:
        raise DataError(f"the {cfg.source} source needs a data path")
    detected, detected_path = detect_source(cfg.path)
    if (cfg.source == "hdf5") != (detected == "hdf5"):
        raise DataError(f"data path {cfg.path} is not a {cfg.source} source (it looks like {detected})")
    return cfg.source, detected_path if detected == cfg.source else cfg.path


def fitted_crop(cfg: DataConfig, given: set[str] | frozenset[str] = frozenset(), resumed: bool = False) -> DataConfig:
    """cfg's crop settings as a run saves them. An image folder's default crop is written out: the folder's kind is
    told by its name, so a CelebA folder moved under another name would be cropped as a plain one when the run
    resumes, without a word. On a resume onto an HDF5 file (the one prepare_celeba made of the run's folder, say)
    the saved crop settings are dropped, as the file holds cropped images; those `given` anew are kept, and refused
    when it is opened. A path that cannot be resolved stays as it is: opening it says why."""
    try:
        kind, _ = resolve_source(cfg)
    except DataError:
        return cfg
    if kind in ("celeba", "folder") and cfg.crop is None:
        return dataclasses.replace(cfg, crop=default_crop(kind))
    if kind == "hdf5" and resumed and not given & {"crop", "crop_size"}:
        return dataclasses.replace(cfg, crop=None, crop_size=None)
    return cfg


def open_source(cfg: DataConfig, image_size: int):
    """The images a run trains on: the source that cfg names, at image_size x image_size (see the package
    docstring), less its last cfg.holdout images (data/holdout.py)."""
    kind, path = resolve_source(cfg)
    if kind in ("builtin", "hdf5") and (cfg.crop is not None or cfg.crop_size is not None):
        where = "the built-in faces" if kind == "builtin" else f"{path}, an HDF5 file of cropped images"
        raise DataError(f"--crop and --crop-size act on image folders, not on {where}; leave them out")
    if kind == "builtin":
        if cfg.holdout >= cfg.builtin_count:
            raise DataError(f"--holdout {cfg.holdout} must leave training images: the set holds {cfg.builtin_count}")
        return BuiltinFaces(cfg.builtin_count - cfg.holdout, image_size, cfg.builtin_seed)
    source = (
        Hdf5Images(path, image_size) if kind == "hdf5" else ImageFolder(path, image_size, cfg.crop, cfg.crop_size, kind)
    )
    return TrainingImages(source, cfg.holdout) if cfg.holdout else source


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (looked up without importing it, which takes seconds)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_install_command() -> str:
    """The pip command that installs the DALI build for this torch's CUDA major version (DALI ships one per major
    version; a CPU-only torch gets the CUDA 12 one, whose CPU pipeline needs no GPU)."""
    extra = "dali-cuda13" if (torch.version.cuda or "").startswith("13.") else "dali"
    return f"pip install 'began-fast[{extra}]'"


def make_batches(
    cfg: DataConfig,
    image_size: int,
    batch_size: int,
    *,
    device: torch.device | str,
    seed: int,
    start_step: int = 0,
    start_position: tuple[int, int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    source=None,
):
    """An iterator of float32 (B, 3, S, S) batches in [-1, 1] on `device`, with a one-line `describe()`.

    source: cfg's source at image_size when the caller has opened it already (opening a folder checks every file),
    else it is opened here. start_step, start_position: where a resumed run goes on (BatchOrder).

    cfg.loader: "torch" -> TorchLoader; "gpu" -> GpuResidentStream (all images in device memory, gathered on the
    device); "dali" -> DaliLoader (GPU JPEG decoding); "auto" -> gpu-resident on CUDA for hdf5 and
    builtin sources that fit in memory, DALI on CUDA for image folders when it is installed, torch otherwise.
    """
    device = torch.device(device)
    loader = cfg.loader
    dali = loader == "dali" or loader == "auto" and device.type == "cuda" and _folder_source(cfg)
    if dali and not dali_installed():
        if loader == "dali":
            raise DataError(f"--loader dali needs NVIDIA DALI: {dali_install_command()}")
        dali = False
    source = open_source(cfg, image_size) if source is None else source
    if cfg.holdout and len(source) < batch_size * world_size:  # BatchOrder would count them as the data set's
        global_batch = f"{batch_size * world_size} (batch {batch_size} x {counted(world_size, 'rank')})"
        raise DataError(
            f"the data set has {counted(len(source), 'training image')} once --holdout {cfg.holdout} are held out, "
            f"fewer than one global batch of {global_batch}"
        )
    order = BatchOrder(
        len(source), batch_size, seed, start_step, start_position=start_position, rank=rank, world_size=world_size
    )
    if dali:
        from began_fast.data.dali import DaliLoader

        return DaliLoader(cfg, image_size, source, order, device=device)
    resident = loader == "gpu" or loader == "auto" and device.type == "cuda" and source.kind in ("hdf5", "builtin")
    if resident and fits(len(source), image_size, device):
        return GpuResidentStream(GpuResidentSet(source, device), order, flip=cfg.flip)
    if loader == "gpu":
        need = len(source) * 3 * image_size**2 / 2**30
        raise DataError(
            f"--loader gpu: the {len(source)} images need {need:.1f} GiB, more than {MEMORY_SHARE:.0%} of the free "
            f"memory of {device}; use --loader torch or dali"
        )
    workers = default_workers(source.kind) if cfg.num_workers is None else cfg.num_workers
    return TorchLoader(source, order, flip=cfg.flip, num_workers=workers, device=device)


def default_workers(kind: str) -> int:
    """Decoding workers when none are asked for: the built-in faces are already in memory, where worker processes
    only add copies between processes; a file-backed source decodes in up to 8, at most this rank's share of the
    CPU cores (torchrun's ranks on a machine each start their own)."""
    return 0 if kind == "builtin" else min(8, cores_per_rank())


def _folder_source(cfg: DataConfig) -> bool:
    """Whether cfg names a CelebA or image folder (the sources DALI decodes)."""
    if cfg.source != "auto":
        return cfg.source in ("celeba", "folder")
    return detect_source(cfg.path)[0] in ("celeba", "folder")
