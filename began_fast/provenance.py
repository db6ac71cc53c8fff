"""What a measured number names beside the device: the commit of the tree it was measured on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent


def commit(tree: Path = TREE) -> str:
    """The commit `tree` is: BEGAN_FAST_COMMIT when set (a copy of the tree on a GPU machine has no .git, and one
    copied into another repository would read that repository's HEAD), else git's HEAD, else "unknown"."""
    if os.environ.get("BEGAN_FAST_COMMIT"):
        return os.environ["BEGAN_FAST_COMMIT"]
    try:
        git = ["git", "rev-parse", "--short=12", "HEAD"]
        return subprocess.run(git, cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
