"""Errors that cross the process boundary as data, and the user-facing error types."""

from __future__ import annotations

import json
import os
import time
import traceback
from types import TracebackType


class OnTheFlyError(RuntimeError):
    """A problem with how OnTheFly is used; the message names the option and the fix."""


def innermost_user_frame(
    tb: TracebackType | None, script_dir: str | None = None
) -> tuple[str, int]:
    """The deepest frame that is not inside OnTheFly, torch or the standard library.

    That is where the user's bug most likely lives, so it is what the root cause names.
    """
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    best = ("", 0)
    fallback = ("", 0)
    for frame, lineno in traceback.walk_tb(tb):
        fname = os.path.abspath(frame.f_code.co_filename)
        fallback = (fname, lineno)
        library = "site-packages" in fname or fname.startswith(ours) or "/lib/python" in fname
        if library and not (script_dir and fname.startswith(script_dir)):
            continue
        best = (fname, lineno)
    return best if best[0] else fallback


def error_record(exc: BaseException, script_dir: str | None = None) -> dict[str, object]:
    filename, lineno = innermost_user_frame(exc.__traceback__, script_dir)
    return {
        "message": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "filename": filename,
        "lineno": lineno,
        "time": time.time(),
    }


def write_error_file(path: str, record: dict[str, object]) -> None:
    """Write the error record atomically; the earliest record wins (it is the root cause)."""
    if not path or os.path.exists(path):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
