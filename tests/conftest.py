"""Test lanes (docs/DESIGN.md section 5): without a GPU the Triton kernels run through the interpreter, which must be
switched on before any @triton.jit function is defined; tests marked `cuda` are skipped."""

import importlib.util
import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# A test that hangs fails by name after this many seconds, through pytest-timeout (the `test` extra), instead of holding
# CI until its own limit: 5x the slowest test on a loaded 2-core CPU (175 s). `--timeout N` or PYTEST_TIMEOUT set
# another (0: none); without pytest-timeout installed, nothing is timed.
SUITE_TIMEOUT_S = 900
os.environ.setdefault("PYTEST_TIMEOUT", str(SUITE_TIMEOUT_S))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Whether this run's kernels go through Triton's interpreter (decided once, here, before any kernel is defined).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def _interpreter_takes_runtime_loop_bounds() -> bool:
    """Whether Triton's interpreter runs a loop whose bound is a run-time value, as every kernel here has.

    Triton 3.6's interpreter (the one torch 2.11 pins) reads such a bound with int() of a 1-element NumPy array,
    which NumPy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.7.0
    squeezes it first. Without this check that pair fails every kernel test with an InterpreterError."""
    import triton
    import triton.language as tl

    @triton.jit
    def count_to(out_ptr, n):
        count = 0
        for _ in range(tl.program_id(0), n):
            count += 1
        tl.store(out_ptr, count)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # NumPy 1.25 to 2.3 only warn (pyproject.toml's filterwarnings)
            warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
            count_to[(1,)](out, 3)
    except triton.runtime.errors.InterpreterError as error:
        if "0-dimensional" in str(error):
            return False
        raise
    return True


def pytest_configure(config):
    if INTERPRETING and not _interpreter_takes_runtime_loop_bounds():
        import numpy
        import triton

        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter, which runs the kernel tests without a GPU, cannot run "
            f"with NumPy {numpy.__version__}: install NumPy below 2.4 (pip install 'numpy<2.4') or Triton 3.7 or "
            "newer (with the torch release that pins it)"
        )
    if INTERPRETING:
        from bounds_checked import missing_internals

        if missing := missing_internals():
            import triton

            raise pytest.UsageError(
                f"tests/bounds_checked.py, which checks the interpreted kernels' memory accesses, wraps parts of "
                f"Triton's interpreter that Triton {triton.__version__} lacks ({', '.join(missing)}): update it"
            )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def interpreted_kernels_bounds_checked():
    """Without a GPU, every kernel a test launches has its loads and stores checked against the bounds of the tensors it
    was given (tests/bounds_checked.py): the interpreter checks none, and an unmasked access passes parity tests."""
    if not INTERPRETING:
        yield
        return
    from bounds_checked import bounds_checked

    with bounds_checked():
        yield


@pytest.fixture
def device():
    """The device the parity tests run on: the GPU when there is one (compiled kernels), else the CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def sigterm_recorded():
    """SIGTERM recorded instead of ending pytest, for a test of a script that should handle it itself: one that does
    not lets it through to this record, and its test fails instead of killing the test run."""
    import signal

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)
