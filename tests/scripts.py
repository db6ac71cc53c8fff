"""The user's scripts (scripts/*.py) imported as modules, so that tests call their main() in-process: a CLI
subprocess costs seconds of start-up that CI's time limit cannot spare; and what such a test does to them."""

import importlib.util
import signal
import sys
import weakref
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


def dropped_by_a_finalizer(signum: int) -> None:
    """A stop signal that comes while a finalizer runs (PIL's and h5py's objects free themselves in them): Python
    drops the exception the script's handler raises there, and the script goes on."""

    class Held:
        pass

    held = Held()
    weakref.finalize(held, signal.raise_signal, signum)
    del held
