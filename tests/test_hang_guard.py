"""HangGuard (hang_guard.py): a rank whose loop finishes no step for the timeout ends with one line; steps, pauses,
the first step and a single process never trigger it. The end-to-end case (a rank of a real two-rank run stops)
is in test_distributed.py."""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import began_fast.hang_guard as hang_guard
from began_fast.distributed import DEFAULT_TIMEOUT_S, PROCESS_GROUP_MARGIN_S, Collectives, World
from began_fast.hang_guard import HangGuard

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 0.3
# Where the guard must stay silent between beats: a test thread held up for most of 0.3 s (a garbage collection of
# the suite's objects on a loaded 2-core machine) would pass for a hung step there.
STEADY_TIMEOUT_S = 1.0


class ExitRecorder:
    """Stands in for os._exit: records the status instead of ending the test process."""

    def __init__(self):
        self.codes, self.called = [], threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.called.set()


def guard(exit_hook, rank=1, timeout_s=TIMEOUT_S):
    return HangGuard(Collectives(World(rank, 2, rank), timeout_s), exit_process=exit_hook)


def test_no_step_for_the_timeout_ends_the_rank_with_one_line(capsys):
    recorder = ExitRecorder()
    with guard(recorder) as g:
        g.beat(7)
        assert recorder.called.wait(10 * TIMEOUT_S + 5)
    assert recorder.codes == [1]
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: rank 1 of 2: no training step finished")
    assert f"--dist-timeout {TIMEOUT_S:g} s" in message and "the last step this rank finished is step 7" in message


def test_steps_pauses_and_the_first_step_do_not_trigger_it():
    recorder = ExitRecorder()
    with guard(recorder, timeout_s=STEADY_TIMEOUT_S) as g:
        time.sleep(2 * STEADY_TIMEOUT_S)  # not armed yet: the first step compiles and autotunes for as long as it needs
        for step in range(20):
            g.beat(step)
            time.sleep(STEADY_TIMEOUT_S / 6)
        with g.paused():  # rank 0's pictures, evaluation, checkpoint
            time.sleep(2 * STEADY_TIMEOUT_S)
        time.sleep(STEADY_TIMEOUT_S / 3)  # the clock restarted after the pause
    assert not recorder.called.is_set()


def test_a_single_process_has_no_guard():
    with HangGuard(None) as g:
        g.beat(1)
        with g.paused():
            assert not any(thread.name == "began-fast hang guard" for thread in threading.enumerate())


def test_it_ends_a_process_whose_main_thread_is_blocked():
    """The real os._exit, with the main thread stuck in a call that never returns (as in a hung CUDA sync)."""
    program = textwrap.dedent(
        f"""
        import time
        from began_fast.distributed import Collectives, World
        from began_fast.hang_guard import HangGuard

        with HangGuard(Collectives(World(3, 4, 1), {TIMEOUT_S})) as guard:
            guard.beat(12)
            time.sleep(600)
        """
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 3 of 4: no training step finished within")


def test_a_step_that_hangs_right_after_a_pause_still_ends_the_rank():
    """The clock restarts after rank 0's pictures or checkpoint: the step after them hanging is caught too."""
    recorder = ExitRecorder()
    with guard(recorder) as g:
        g.beat(3)
        with g.paused():
            time.sleep(TIMEOUT_S / 3)
        assert recorder.called.wait(10 * TIMEOUT_S + 5)  # no beat after the pause
    assert recorder.codes == [1]


def test_a_pause_before_the_first_step_does_not_arm_it():
    """Work paused before the first beat (setup on rank 0) leaves the first step's compiling unwatched."""
    recorder = ExitRecorder()
    with guard(recorder) as g:
        with g.paused():
            time.sleep(TIMEOUT_S / 3)
        time.sleep(4 * TIMEOUT_S)
    assert not recorder.called.is_set()


def test_it_ends_the_rank_soon_after_the_timeout_passes():
    """It looks often (a tenth of the timeout): the process group's own timeout, PROCESS_GROUP_MARGIN_S later, must
    not fire first with its multi-line log, which a guard looking once per timeout could let happen."""
    timeout_s, recorder = 3.0, ExitRecorder()  # 1.2 s of slack for a loaded machine; the mutant takes 1.8x
    with HangGuard(Collectives(World(1, 2, 1), timeout_s), exit_process=recorder) as g:
        time.sleep(timeout_s / 5)  # a step between the guard's looks
        g.beat(5)
        beat = time.monotonic()
        assert recorder.called.wait(4 * timeout_s)
        assert time.monotonic() - beat < 1.5 * timeout_s


def test_at_the_default_timeout_it_ends_the_rank_within_a_second_of_it(monkeypatch):
    """It looks at least once a second, also at the default --dist-timeout (600 s): one that looked every tenth of
    the timeout (60 s) would let the process group's own timeout, PROCESS_GROUP_MARGIN_S (30 s) later, fire first
    with its multi-line log. A clock that jumps stands in for the ten minutes."""
    jumped = [0.0]
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: time.monotonic() + jumped[0])})
    monkeypatch.setattr(hang_guard, "time", clock)
    recorder = ExitRecorder()
    with HangGuard(Collectives(World(1, 2, 1), DEFAULT_TIMEOUT_S), exit_process=recorder) as g:
        g.beat(41)
        jumped[0] = DEFAULT_TIMEOUT_S - PROCESS_GROUP_MARGIN_S  # a long step, within the timeout
        assert not recorder.called.wait(1.5)
        jumped[0] = DEFAULT_TIMEOUT_S + 0.1
        assert recorder.called.wait(5.0)
    assert recorder.codes == [1]
