"""Frechet Inception Distance through torch-fidelity (an optional dependency: it pulls in torchvision).

torch-fidelity's Inception v3 is the TensorFlow FID network converted bit-exactly, so its FID matches the
published numbers. Its weights are not downloaded here: they are read from the torch hub cache, where
torch-fidelity itself would put them, or from a path the user gives. Without them FID fails with one line that
says where to put which file, never a silent skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils.data import Dataset

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class FIDUnavailableError(ValueError):
    """FID cannot be computed here (weights or library missing); the message is one line for the user."""


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The Inception weights file: `path` when given, else torch-fidelity's file in the torch hub cache."""
    if path is not None:
        if not Path(path).is_file():
            raise FIDUnavailableError(f"--inception-weights {path} is not a file (expected {INCEPTION_WEIGHTS_FILE})")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file():
        raise FIDUnavailableError(
            f"FID needs the Inception weights {INCEPTION_WEIGHTS_FILE}: download {INCEPTION_WEIGHTS_URL} "
            f"into {cached.parent}/ or pass --inception-weights PATH"
        )
    return cached


def require_fid(weights: str | Path | None = None) -> Path:
    """Check, before any work is done, that FID can be computed: the weights file and the library, both told in one
    line when both are missing. Returns the weights file."""
    missing = []
    try:
        path = inception_weights_path(weights)
    except FIDUnavailableError as e:
        missing.append(str(e))
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append(
            "FID needs torch-fidelity and torchvision: pip install torch-fidelity torchvision (in a checkout of "
            "began-fast: pip install -e '.[fid]')"
        )
    if missing:
        raise FIDUnavailableError("; and ".join(missing))
    return path


class _Images(Dataset):
    """The (N, 3, S, S) uint8 tensor as the Dataset of (3, S, S) uint8 images torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> float:
    """FID between two (N, 3, S, S) uint8 image sets (torch-fidelity resizes them to 299x299 itself)."""
    weights_path = require_fid(weights)
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(images_a.cpu()),
        input2=_Images(images_b.cpu()),
        fid=True,
        feature_extractor_weights_path=str(weights_path),
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        cache=False,
        save_cpu_ram=True,  # its DataLoader then reads our in-memory tensors in-process, without 4 worker processes
        verbose=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])
