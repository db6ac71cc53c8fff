"""What a training run writes in its folder, by name, and the check that keeps the other scripts' outputs (an
evaluation's JSON, a comparison's plot) from replacing any of it."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from began_fast.config import ConfigError

RUN_LOCK = ".began-fast.lock"  # held by the process that trains there (train.lock_run_folder)
PICTURES_RECORD = "pictures.json"  # {"step": S}, written after the last picture of step S (train.pictures_written)
# The pictures drawn at each sample step from its grid, the stats and D (train._write_pictures).
DRAWN_WITH_THE_GRIDS = ("progress.png", "progress.gif", "reconstruction.png", "convergence.png")
# Files and folders (train.check_run_entries: a name taken by the other kind stops the run), and the snapshots.
RUN_FILES = ("config.json", "stats.jsonl", "latest.pt", PICTURES_RECORD, *DRAWN_WITH_THE_GRIDS, RUN_LOCK)
RUN_FOLDERS = ("samples", "tensorboard")
SNAPSHOTS = "step_*.pt"  # snapshot_path's names


def snapshot_path(out: Path, step: int) -> Path:
    """The snapshot of step `step` in the run folder `out`."""
    return out / f"step_{step:07d}.pt"


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is a run's: its config.json beside its checkpoint or its lock file."""
    return (folder / "config.json").is_file() and any((folder / name).exists() for name in ("latest.pt", RUN_LOCK))


def check_not_a_runs_file(path: Path, flag: str) -> None:
    """ConfigError when `path`, an output given by `flag`, names a file a run wrote or writes in its folder (or in its
    samples/ or tensorboard/): its config.json is the only record of how the run ran, and its pictures are
    redrawn from no other copy."""
    folder = path.parent
    inside = folder.name in RUN_FOLDERS and holds_a_run(folder.parent)
    if inside or (holds_a_run(folder) and (path.name in RUN_FILES or fnmatch.fnmatch(path.name, SNAPSHOTS))):
        raise ConfigError(
            f"{flag} {path} is in the run {folder.parent if inside else folder}, whose files it would "
            "replace: give another file name"
        )
