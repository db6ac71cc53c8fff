"""The user's scripts (scripts/*.py) imported as modules, so that tests call their main() in-process: a CLI
subprocess costs seconds of start-up that CI's time limit cannot spare."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    """scripts/<name>.py as a module, registered first: its dataclasses, and a process pool's workers, look the
    module up by name."""
    spec = importlib.util.spec_from_file_location(f"began_fast_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
