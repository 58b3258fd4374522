"""Whether the training thread makes progress, and where it is when it does not.

The heartbeat comes from a thread of its own, so a worker whose training loop is stuck in
user code (a Dataset that blocks, a deadlocked loader, an endless loop in a callback) still
beats; only a frozen process stops beating. The heartbeat therefore also says how long
the training thread has made no progress (no training step, no evaluation batch) while
not waiting on purpose (paused, or waiting for commands), and where that thread is: the
supervisor reports it, so a user sees `train.py:42 in __getitem__` instead of a silent run.

Progress is counted cheaply: the training step is the heartbeat's own `step`, evaluation
batches call `tick()` (one integer add), and waits for commands run inside `idle()`.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_units = 0
_idle = 0

_LIBRARY_DIRS = tuple(
    os.path.normcase(os.path.realpath(p)) + os.sep
    for p in {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
)
_OUR_DIRS = tuple(
    os.path.normcase(os.path.realpath(os.path.join(os.path.dirname(__file__), "..", d))) + os.sep
    for d in ("onthefly_worker", "onthefly", "onthefly_proto")
)


def tick() -> None:
    """One unit of progress that is not a training step (an evaluation batch)."""
    global _units
    _units += 1


@contextmanager
def idle() -> Iterator[None]:
    """The training thread waits here on purpose (paused, waiting for commands)."""
    global _idle
    _idle += 1
    try:
        yield
    finally:
        _idle -= 1


def _kind(filename: str) -> str:
    """'ours', 'library' (stdlib, site-packages, frozen) or 'user' for a frame's file."""
    if filename.startswith("<"):
        return "library"
    path = os.path.normcase(os.path.realpath(filename))
    if path.startswith(_OUR_DIRS):
        return "ours"
    if path.startswith(_LIBRARY_DIRS) or "site-packages" in path or "dist-packages" in path:
        return "library"
    return "user"


def _short(frame: FrameType) -> str:
    code = frame.f_code
    name = code.co_filename
    kind = _kind(name)
    if kind == "user":
        try:
            shown = os.path.relpath(name)
        except ValueError:
            shown = name
        if shown.startswith(".." + os.sep):
            shown = name
    elif kind == "ours":
        shown = name[name.rfind("onthefly") :]
    else:
        parts = name.replace(os.sep, "/").split("/")
        shown = "/".join(parts[-3:]) if "site-packages" in name else "/".join(parts[-2:])
    return f"{shown}:{frame.f_lineno} in {code.co_name}"


def where(thread_id: int) -> str:
    """The thread's innermost frame, and when that is not the user's own code, the
    innermost frame that is (else OnTheFly's, which tells training from evaluation)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    inner = _short(frame)
    if _kind(frame.f_code.co_filename) == "user":
        return inner
    ours = None
    f: FrameType | None = frame.f_back
    while f is not None:
        kind = _kind(f.f_code.co_filename)
        if kind == "user":
            return f"{inner}, called from {_short(f)}"
        if kind == "ours" and ours is None:
            ours = f
        f = f.f_back
    return f"{inner}, called from {_short(ours)}" if ours is not None else inner


class StallClock:
    """Seconds the watched thread has made no progress, sampled by the heartbeat thread."""

    def __init__(self, step: Callable[[], int], thread_id: int | None = None) -> None:
        self._step = step
        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self._seen: tuple[int, int] | None = None
        self._since = time.monotonic()

    def sample(self) -> tuple[float, str]:
        """(seconds without progress, and then where the thread is; 0 and "" while it
        progresses or waits on purpose)."""
        now = time.monotonic()
        seen = (self._step(), _units)
        if seen != self._seen or _idle:
            self._seen, self._since = seen, now
            return 0.0, ""
        stalled = now - self._since
        return stalled, where(self.thread_id)
