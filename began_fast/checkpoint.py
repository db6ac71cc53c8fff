"""Checkpoints: written atomically, read back with one clear error when the file is not one of ours.

A checkpoint is a dict saved with torch.save:
  format        CHECKPOINT_FORMAT
  model_config, train_config, data_config   the dataclasses as dicts
  step          steps completed
  G, D          state_dicts (the same keys for impl="torch" and impl="triton")
  trainer       the training step's state: optimizers, k_t, learning rates, lr-decay window, RNG states
  fixed_z       the noise of the sample grids, so a resumed run keeps drawing the same faces
  data_images   the number of training images the run read (a resume on a changed data set says so)
  data_digest   train.training_images_digest of those images (a resume on other data of the same size says so)
  data_position the epoch the step's batch comes from and how many of its images the run's batches had taken
                (data.BatchOrder: a resume with another global batch goes on from there)
  run_id        the run's name, also in its config.json (a checkpoint of another run is not resumed in its folder)
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import torch

from began_fast.atomic_files import atomic_write
from began_fast.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from began_fast.model import Discriminator, Generator, carry_after

CHECKPOINT_FORMAT = "began-fast/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message is one line meant for the user."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically. OSError when it cannot be written (say, the disk is full); the file
    that was there stays whole."""

    def write(f) -> None:
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        except (OSError, RuntimeError) as e:  # torch's zip writer may report a failed write as a RuntimeError
            cause = e if isinstance(e, OSError) or not isinstance(e.__context__, OSError) else e.__context__
            if isinstance(cause, OSError) and cause.errno is not None:  # atomic_write names the file, as for others
                raise OSError(cause.errno, cause.strerror) from e
            reason = " ".join(str(cause).split()) or type(cause).__name__
            raise OSError(f"cannot write checkpoint {path}: {reason}") from e

    atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint at `path`, a .pt file or a run folder (its latest.pt); CheckpointError when it is not one."""
    path = Path(path)
    if path.is_dir() and (path / "latest.pt").exists():
        path = path / "latest.pt"
    elif path.is_dir() and path.suffix != ".pt":
        raise CheckpointError(f"{path} is a folder without a latest.pt; expected a .pt file or a run folder")
    if path.is_dir():  # a latest.pt, or a folder named as a checkpoint, that is no file
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; expected a .pt file written by began-fast")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file written by began-fast)")
    # torch.save writes a zip archive with a CRC32 per record, which torch.load does not check: damaged tensor
    # bytes would load as wrong weights without a word.
    damaged = None
    if zipfile.is_zipfile(path):
        try:
            record = zipfile.ZipFile(path).testzip()
            damaged = None if record is None else f"{record} fails its checksum"
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):  # ValueError: a garbled name
            damaged = "its index or a record's header cannot be read"
    elif _starts_a_zip_archive(path):  # the archive's index, written last, is missing
        damaged = "it ends early, as a write to a full disk or a copy cut short leaves it"
    elif path.stat().st_size == 0:  # torch.load's EOFError would say nothing of it
        damaged = "it is empty, 0 bytes"
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({damaged}); copy an earlier snapshot (step_XXXXXXX.pt) over it"
        )
    try:
        # weights_only: a checkpoint holds tensors, dicts, lists and numbers only; a pickled object in a file handed
        # to evaluate.py or sample.py is refused, its code never run (torch.load's weights_only=False runs it)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        reason = type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); is it a began-fast .pt file?") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a began-fast checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    for key, kind in _ENTRIES.items():  # what the readers take for granted, checked once here
        if not isinstance(state.get(key), kind) or (key == "step" and (isinstance(state[key], bool) or state[key] < 0)):
            found = "missing" if key not in state else f"{state[key]!r:.40}"
            raise CheckpointError(
                f"checkpoint {path} does not fit this version of began-fast (its {key!r} is {found}; expected "
                f"{'an int >= 0' if key == 'step' else 'a ' + kind.__name__})"
            )
    return state


def _starts_a_zip_archive(path: Path) -> bool:
    """Whether the file begins as torch.save's zip archive does, with a record's local header."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# The entries every checkpoint holds, and their types.
_ENTRIES = {
    "step": int,
    "model_config": dict,
    "train_config": dict,
    "data_config": dict,
    "G": dict,
    "D": dict,
    "trainer": dict,
    "fixed_z": torch.Tensor,
}


MISFIT_DETAIL_CHARS = 300  # of the problem quoted in misfit's line (a list of missing keys can be long)


def misfit(path: str | Path, error: Exception) -> CheckpointError:
    """A readable began-fast checkpoint whose contents this version cannot use (written by another version, or
    edited): one line naming the first problem."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # load_state_dict's first line is a heading ("Error(s) in loading state_dict for Generator:"); its problem follows.
    detail = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
    if len(detail) > MISFIT_DETAIL_CHARS:
        detail = detail[: MISFIT_DETAIL_CHARS - 3] + "..."
    what = f"{type(error).__name__}: {detail}"
    return CheckpointError(f"checkpoint {path} does not fit this version of began-fast ({what})")


def another_runs(latest: Path, state: dict, folder: dict) -> str | None:
    """Why checkpoint `state`, read from a run folder's `latest`, is not the run of the folder's config.json (parsed:
    `folder`), whose stats and pictures stand beside it; None where it is, or where either names no run (older)."""
    run_id = state.get("run_id")
    folder_run = folder["run"].get("run_id") if isinstance(folder.get("run"), dict) else None
    if None in (run_id, folder_run) or run_id == folder_run:
        return None
    return f"{latest} belongs to another run ({run_id}) than the folder's config.json and stats.jsonl ({folder_run})"


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def saved_configs(state: dict, path: str | Path) -> dict:
    """The {"model", "train", "data"} configs of checkpoint `state` (read from `path`); CheckpointError when they
    are not this version's (a setting it does not know, or a value out of range)."""
    try:
        return {
            "model": ModelConfig(**state["model_config"]),
            "train": TrainConfig(**state["train_config"] | {"betas": tuple(state["train_config"]["betas"])}),
            "data": DataConfig(**state["data_config"]),
        }
    except (KeyError, TypeError, ConfigError) as e:  # written by another version of began-fast, or edited
        raise misfit(path, e) from None


def load_models(
    path: str | Path, device: str | torch.device = "cpu", impl: str = "auto"
) -> tuple[Generator, Discriminator, dict]:
    """Rebuild G and D from a checkpoint, in eval mode on `device`; also returns the whole checkpoint dict."""
    state = load_checkpoint(path)
    cfg = saved_configs(state, path)["model"]
    try:
        G, D = Generator(cfg, impl=impl), Discriminator(cfg, impl=impl)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except (KeyError, TypeError, RuntimeError) as e:  # a missing entry, an unknown setting, a wrong shape
        raise misfit(path, e) from None
    carry = carry_after(state["step"], cfg)
    G.set_carry(carry)
    D.set_carry(carry)
    return G.to(device).eval(), D.to(device).eval(), state
