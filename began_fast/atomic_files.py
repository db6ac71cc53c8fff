"""Files written whole or not at all: a crash, a Ctrl-C or a full disk mid-write leaves the old file as it was.

Checkpoints, sample grids, reports, stats and evaluation results go through atomic_write; a file written by another
library (h5py) through durable_replace.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

# The ending of atomic_write's temporary files, which names them as ours: a killed run's are removed, no others.
TEMPORARY_SUFFIX = ".began-fast.tmp"
# mkstemp creates files readable by their owner only; a run folder's files get the mode any new file would.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX, so a crash or Ctrl-C mid-write leaves the old file whole; the folder is
    synced after it, so the new name survives a power loss too. A system error in the writing (a full disk) is
    raised as an OSError that names `path` ("[Errno 28] cannot write PATH: No space left on device"): the system's
    own names no file, or the temporary one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # something that is no folder where the folder should be (mkdir's message names neither)
        what = "a link to a folder that is not there" if path.parent.is_symlink() else "a file, not a folder"
        raise OSError(errno.ENOTDIR, f"cannot write {path}: {path.parent} is {what}") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as e:  # a read-only folder: the system's message names the temporary file, never `path`
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
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


def remove_stale_temporaries(folder: Path, of: str | None = None) -> None:
    """Remove the temporaries ours leave in `folder` when their process is killed mid-write: atomic_write's files (a
    checkpoint's can be hundreds of MB), and folders named with TEMPORARY_SUFFIX (sample.py draws its images into
    one); only those of the file or folder named `of` when given. Call it only where no other process of ours writes
    into the folder (or, with `of`, that file); other programs' files stay, even in a run folder such as --out . or
    --out ~."""
    for stale in folder.glob(("." if of is None else f".{of}.") + "*" + TEMPORARY_SUFFIX):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
