"""End a torchrun rank with one line when its training loop stops making progress (another rank died or hung).

Why the collectives' own timeout is not enough on GPUs: the all-reduces a CUDA graph replays are invisible to
NCCL's watchdog, and a hung collective inside a graph stalls the GPU's queue, so the host can block in a later
graph launch before it ever reaches the eager, watchdog-tracked all-reduce of the next statistics read. Where the
watchdog does fire, it ends the process with its own multi-line log. This guard watches the host instead: the loop
calls `beat()` after every step, and a thread ends the process with one line (and exit status 1) when no beat
came for the timeout. The process group's own timeout is `PROCESS_GROUP_MARGIN_S` longer (distributed.start), so
on a hang this line comes first. On gloo a crashed rank is still reported at once by the collective that sees the
closed connection; NCCL reports a failure only through the watchdog, so on GPUs this guard also ends the ranks that a
crash on another machine left waiting (torchrun stops those of the crashed rank's machine).

The process ends through os._exit: a rank stuck in a CUDA call cannot unwind, and a clean exit would wait for the
hung GPU work. Rank 0's own long work between steps (pictures, evaluation, checkpoints) runs `paused()`, so a
checkpoint is never cut in half; the other ranks' wait for it counts against their timeout, as it does for a
collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from tqdm import tqdm

from began_fast.distributed import Collectives


class HangGuard:
    """Ends the process when `collectives.timeout_s` pass after the last `beat()` outside `paused()` blocks.

    Inert for a single process (collectives None). Armed by the first beat, so the first step's compiling and
    autotuning never count; used as a context manager, it stops watching on exit.
    """

    def __init__(self, collectives: Collectives | None, exit_process=os._exit):
        self.collectives, self._exit_process = collectives, exit_process
        self._last_beat: float | None = None  # None: not armed, or paused
        self._last_step = None
        self._closed = threading.Event()
        self._thread = None
        if collectives is not None:
            self._thread = threading.Thread(target=self._watch, name="began-fast hang guard", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """This rank finished `step`."""
        self._last_step, self._last_beat = step, time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """This rank's own work that may take long and must not be cut (rank 0's pictures, evaluations,
        checkpoints); the clock restarts after it."""
        armed, self._last_beat = self._last_beat is not None, None
        try:
            yield
        finally:
            if armed:
                self._last_beat = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HangGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _watch(self) -> None:
        timeout_s = self.collectives.timeout_s
        while not self._closed.wait(min(1.0, timeout_s / 10)):
            last = self._last_beat
            if last is not None and time.monotonic() - last > timeout_s:
                error = TimeoutError(f"the last step this rank finished is step {self._last_step}")
                failure = self.collectives.failure(error, "no training step finished within the timeout")
                # tqdm.write: on a line of its own even under rank 0's progress bar.
                tqdm.write(f"error: {failure}", file=sys.stderr)
                sys.stderr.flush()
                self._exit_process(1)
                return
