"""The first thing every script imports: a Ctrl-C while it imports its libraries (torch alone takes seconds, the
moment a user sees a mistyped flag) ends it with one line and status 130, as a Ctrl-C later does, not with a
traceback through the import machinery. It imports nothing heavy itself, so it is in place before torch is."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def quiet_ctrl_c_while_importing():
    """Nothing was written yet, so there is nothing to say but that."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted while starting", file=sys.stderr)
        sys.exit(130)
