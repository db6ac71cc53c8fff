"""Frechet Inception Distance through torch-fidelity (an optional dependency: it pulls in torchvision).

torch-fidelity's Inception v3 is the TensorFlow FID network converted bit-exactly, so its FID matches the
published numbers. Its weights are not downloaded here: they are read from the torch hub cache, where
torch-fidelity itself would put them, or from a path the user gives. Without them FID fails with one line that
says where to put which file, never a silent skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
from torch.utils.data import Dataset

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
# The first conv of torch-fidelity's FeatureExtractorInceptionV3, whose state dict its weights file holds.
INCEPTION_STATE_KEY = "Conv2d_1a_3x3.conv.weight"
# Its last layer: the TensorFlow FID network's 1008 classes. torchvision's ImageNet Inception, whose state dict has the
# same first conv, has 1000 (and an auxiliary classifier, AuxLogits); torch-fidelity's strict load fails on it.
INCEPTION_FC_KEY, INCEPTION_FC_SHAPE = "fc.weight", (1008, 2048)


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


def check_inception_weights(path: Path) -> None:
    """Refuse a file that is not a state dict of torch-fidelity's Inception: torch-fidelity would fail on it with a
    traceback from torch.load or load_state_dict, after the SWD was computed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a torch.save archive
        raise FIDUnavailableError(
            f"the Inception weights {path} cannot be read by torch.load ({type(e).__name__}): expected "
            f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
        ) from None
    if not isinstance(state, dict) or INCEPTION_STATE_KEY not in state:
        raise FIDUnavailableError(
            f"the Inception weights {path} are not torch-fidelity's Inception state dict (no {INCEPTION_STATE_KEY}): "
            f"expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
        )
    fc = state.get(INCEPTION_FC_KEY)
    fc_shape = tuple(fc.shape) if torch.is_tensor(fc) else None
    if fc_shape != INCEPTION_FC_SHAPE or any(name.startswith("AuxLogits.") for name in state):
        found = "none" if fc_shape is None else " x ".join(map(str, fc_shape))
        raise FIDUnavailableError(
            f"the Inception weights {path} are not the FID network's (its {INCEPTION_FC_KEY} is {found}, the FID "
            f"network's is 1008 x 2048 with no AuxLogits: torchvision's ImageNet Inception is another network): "
            f"expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
        )


def require_fid(weights: str | Path | None = None) -> Path:
    """Check, before any work is done, that FID can be computed: the weights file and the library, both told in one
    line when both are missing. Returns the weights file."""
    missing = []
    try:
        path = inception_weights_path(weights)
        check_inception_weights(path)
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

    device = torch.device(device)
    # torch-fidelity takes only cuda=True and moves its network and batches with .cuda(), onto the current CUDA
    # device: cuda:N is made the current one while it runs (not yet run on a machine with several GPUs).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        metrics = torch_fidelity.calculate_metrics(
            input1=_Images(images_a.cpu()),
            input2=_Images(images_b.cpu()),
            fid=True,
            feature_extractor_weights_path=str(weights_path),
            cuda=device.type == "cuda",
            batch_size=batch_size,
            cache=False,
            save_cpu_ram=True,  # its DataLoader then reads our in-memory tensors in-process, without 4 worker processes
            verbose=False,
        )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])
