"""Checkpoints: written atomically, read back with one clear error when the file is not one of ours.

A checkpoint is a dict saved with torch.save:
  format        CHECKPOINT_FORMAT
  model_config, train_config, data_config   the dataclasses as dicts
  step          steps completed
  G, D          state_dicts (the same keys for impl="torch" and impl="triton")
  trainer       the training step's state: optimizers, k_t, learning rates, lr-decay window, RNG states
  fixed_z       the noise of the sample grids, so a resumed run keeps drawing the same faces
  data_images   the number of training images the run read (a resume on a changed data set says so)
  run_id        the run's name, also in its config.json (a checkpoint of another run is not resumed in its folder)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from pathlib import Path

import torch

from began_fast.config import ModelConfig
from began_fast.model import Discriminator, Generator, carry_at

CHECKPOINT_FORMAT = "began-fast/1"
# mkstemp creates files readable by their owner only; a run folder's files get the mode any new file would.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message is one line meant for the user."""


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX, so a crash or Ctrl-C mid-write leaves the old file whole; the folder is
    synced after it, so the new name survives a power loss too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync(path.parent)


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished file `tmp` over `path`, as atomic_write does for a file written by another library
    (h5py): its data is synced before the rename and the folder after, so a crash or power loss leaves either the
    old file or the whole new one, never the new name on missing data."""
    _sync(tmp)
    os.replace(tmp, path)
    _sync(Path(path).parent)


def _sync(path: str | Path) -> None:
    """fsync a file's data or a folder's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically. OSError when it cannot be written (say, the disk is full); the file
    that was there stays whole."""

    def write(f) -> None:
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        except (OSError, RuntimeError) as e:  # torch's zip writer may report a failed write as a RuntimeError
            cause = e if isinstance(e, OSError) or not isinstance(e.__context__, OSError) else e.__context__
            reason = " ".join(str(cause).split()) or type(cause).__name__
            raise OSError(f"cannot write checkpoint {path}: {reason}") from e

    atomic_write(path, write)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files that atomic_write leaves in `folder` when its process is killed mid-write (a
    checkpoint's can be hundreds of MB). Call it only where no other process writes into the folder."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint at `path`, a .pt file or a run folder (its latest.pt); CheckpointError when it is not one."""
    path = Path(path)
    if path.is_dir():
        if not (path / "latest.pt").is_file():
            raise CheckpointError(f"{path} is a folder without a latest.pt; expected a .pt file or a run folder")
        path = path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file written by began-fast)")
    # torch.save writes a zip archive with a CRC32 per record, which torch.load does not check: damaged tensor
    # bytes would load as wrong weights without a word.
    try:
        damaged = zipfile.ZipFile(path).testzip() if zipfile.is_zipfile(path) else None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):  # ValueError: a garbled name
        damaged = "its index or a record's header"
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({damaged} fails its checksum); copy an earlier snapshot (step_XXXXXXX.pt) "
            "over it"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds for a damaged file
        reason = type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); is it a began-fast .pt file?") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a began-fast checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


def misfit(path: str | Path, error: Exception) -> CheckpointError:
    """A readable began-fast checkpoint whose contents this version cannot use (written by another version, or
    edited): one line naming the first problem."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = f"{type(error).__name__}: {detail}"
    return CheckpointError(f"checkpoint {path} does not fit this version of began-fast ({what})")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_config_of(state: dict) -> ModelConfig:
    return ModelConfig(**state["model_config"])


def load_models(
    path: str | Path, device: str | torch.device = "cpu", impl: str = "auto"
) -> tuple[Generator, Discriminator, dict]:
    """Rebuild G and D from a checkpoint, in eval mode on `device`; also returns the whole checkpoint dict."""
    state = load_checkpoint(path)
    try:
        cfg = model_config_of(state)
        G, D = Generator(cfg, impl=impl), Discriminator(cfg, impl=impl)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except (KeyError, TypeError, RuntimeError) as e:  # a missing entry, an unknown setting, a wrong shape
        raise misfit(path, e) from None
    # A finished vanishing residual has carry 0; mid-run, the carry of the step the checkpoint was taken at.
    carry = carry_at(state["step"], cfg)
    G.set_carry(carry)
    D.set_carry(carry)
    return G.to(device).eval(), D.to(device).eval(), state
