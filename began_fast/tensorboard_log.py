"""The run's TensorBoard log (tensorboard/ in the run folder), when tensorboard is installed (an optional extra).

SummaryWriter writes its events on a thread of its own. A write that fails there (the run folder deleted or
unmounted under the run, a full disk) is kept by the thread, and raised by the writer's next call; Python's hook for
a thread's exception first printed its traceback, and the error named the event file as bytes. Here it is raised
once, at the window whose scalars could not be written, as one line that names the log's folder.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


class TensorBoardLog:
    """scalars() and close() over a SummaryWriter whose thread's failures come back as one OSError."""

    def __init__(self, writer, folder: Path):
        self.writer, self.folder = writer, folder
        self._previous_hook = threading.excepthook
        threading.excepthook = self._hook

    def _hook(self, args) -> None:
        # TensorBoard's writer thread (tensorboard's _AsyncWriterThread) keeps its exception for the next call.
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self._previous_hook(args)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """values ({tag: value}) at `step`, flushed: a write the thread failed is raised here, not windows later."""
        try:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as e:
            what = f"cannot write the TensorBoard log in {self.folder}"
            raise (OSError(f"{what}: {e}") if e.errno is None else OSError(e.errno, f"{what}: {e.strerror}")) from e

    def close(self) -> None:
        """Flush and close; a failed write was said by scalars() already."""
        with contextlib.suppress(OSError):
            self.writer.close()
        if threading.excepthook == self._hook:
            threading.excepthook = self._previous_hook


def open_tensorboard(out: Path, start: int) -> TensorBoardLog | None:
    """The log of a run that starts after step `start`, in `out`/tensorboard; None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # TensorBoard hides the events at purge_step and after it in the folder's earlier files: those a run that then
    # died logged after the checkpoint this one resumes (open_stats drops their rows), or every one of a dead start.
    return TensorBoardLog(SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1), out / "tensorboard")
