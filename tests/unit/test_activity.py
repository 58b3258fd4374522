"""The heartbeat's view of the training thread: progress, waits on purpose, where it is."""

from __future__ import annotations

import queue
import threading
import time

from onthefly_worker import activity


def _blocked_in_user_code(release: threading.Event, ident: list[int]) -> None:
    ident.append(threading.get_ident())
    release.wait(10)  # a library frame (threading.py) called from this file's frame


def test_where_names_the_library_frame_and_the_user_frame_that_called_it() -> None:
    release, ident = threading.Event(), []
    t = threading.Thread(target=_blocked_in_user_code, args=(release, ident))
    t.start()
    try:
        while not ident:
            time.sleep(0.01)
        time.sleep(0.05)
        at = activity.where(ident[0])
        inner, _, caller = at.partition(", called from ")
        assert "threading.py:" in inner and inner.endswith(" in wait"), at
        assert caller.startswith("tests/unit/test_activity.py:") and caller.endswith(
            " in _blocked_in_user_code"
        ), at
    finally:
        release.set()
        t.join()
    assert activity.where(ident[0]) == ""  # a thread that is gone


def test_stall_clock_counts_from_the_last_step_or_evaluation_batch() -> None:
    step = [0]
    clock = activity.StallClock(lambda: step[0])
    assert clock.sample() == (0.0, "")  # the first sample starts the clock
    time.sleep(0.05)
    stalled, at = clock.sample()
    assert stalled >= 0.04
    assert "test_activity.py:" in at and "in test_stall_clock" in at, at
    step[0] += 1
    assert clock.sample() == (0.0, "")
    time.sleep(0.02)
    assert clock.sample()[0] > 0
    activity.tick()  # an evaluation batch is progress too
    assert clock.sample() == (0.0, "")


def test_waiting_for_commands_on_purpose_is_not_a_stall() -> None:
    clock = activity.StallClock(lambda: 0)
    clock.sample()
    time.sleep(0.02)
    with activity.idle():
        time.sleep(0.02)
        assert clock.sample() == (0.0, "")
    # The clock restarts when the wait ends: the time paused does not count.
    assert clock.sample()[0] < 0.02


def test_the_heartbeat_thread_reports_the_watched_thread() -> None:
    got: queue.Queue[tuple[float, str]] = queue.Queue()
    done = threading.Event()

    def training_thread() -> None:
        clock = activity.StallClock(lambda: 0)  # created on the watched thread, like fit()
        threading.Thread(
            target=lambda: [got.put(clock.sample()), time.sleep(0.05), got.put(clock.sample())]
        ).start()
        done.wait(5)

    t = threading.Thread(target=training_thread)
    t.start()
    try:
        assert got.get(timeout=5) == (0.0, "")
        stalled, at = got.get(timeout=5)
        assert stalled > 0, at
        assert ", called from tests/unit/test_activity.py:" in at and at.endswith(
            " in training_thread"
        ), at
    finally:
        done.set()
        t.join()
