"""The suite's guard against a hang: every test runs under pytest-timeout's limit (tests/conftest.py), so a test that
hangs fails by name instead of holding CI until CI's own limit ends it with no name."""

import subprocess
import sys
import textwrap

import pytest

pytest_timeout = pytest.importorskip("pytest_timeout", reason="pytest-timeout (the `test` extra) is not installed")


def test_every_test_runs_under_a_timeout(request):
    if not request.config.pluginmanager.hasplugin("timeout"):
        pytest.skip("pytest-timeout is switched off (-p no:timeout)")
    timeout = pytest_timeout.get_env_settings(request.config).timeout
    assert timeout is not None and timeout > 0


def test_a_test_that_hangs_fails_by_name_and_the_next_one_runs(tmp_path):
    """The limit stops a test stuck waiting on a child process, the kind of hang seen here (a forked worker that never
    ends), fails that test, and the session goes on to the next test."""
    (tmp_path / "test_hang.py").write_text(
        textwrap.dedent(
            """
            import subprocess
            import sys

            def test_waits_for_a_child_that_never_ends():
                subprocess.run([sys.executable, "-c", "import time; time.sleep(600)"])

            def test_after_it():
                pass
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "3", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED test_hang.py::test_waits_for_a_child_that_never_ends - Failed: Timeout" in done.stdout
    assert "1 failed, 1 passed" in done.stdout
