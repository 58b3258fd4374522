"""Errors that cross the process boundary as data, and the user-facing error types."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from types import FrameType, TracebackType


class OnTheFlyError(RuntimeError):
    """A problem with how OnTheFly is used; the message names the option and the fix."""


_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_user_file(fname: str, script_dir: str | None) -> bool:
    """Whether a frame's file is the user's code: not OnTheFly, not an installed package
    (torch, Lightning), not the standard library, a frozen bootstrap module (runpy,
    importlib) or generated code ("<string>"), unless it lies under the script's folder."""
    if fname.startswith("<"):
        # "<frozen runpy>", or "<string>": code generated at run time, such as a
        # dataclass's __init__ (TrainerConfig's validation), never the user's file.
        return False
    fname = os.path.abspath(fname)
    if script_dir and fname.startswith(script_dir):
        return True
    return not ("site-packages" in fname or fname.startswith(_OURS) or "/lib/python" in fname)


def _innermost_user(frames: list[tuple[str, int]], script_dir: str | None) -> tuple[str, int]:
    return _innermost_user_or_none(frames, script_dir) or _innermost(frames)


def _innermost(frames: list[tuple[str, int]]) -> tuple[str, int]:
    return (os.path.abspath(frames[-1][0]), frames[-1][1]) if frames else ("", 0)


def _innermost_user_or_none(
    frames: list[tuple[str, int]], script_dir: str | None
) -> tuple[str, int] | None:
    for fname, lineno in reversed(frames):
        if _is_user_file(fname, script_dir):
            return os.path.abspath(fname), lineno
    return None


def _calling_user_frame(script_dir: str | None) -> tuple[str, int] | None:
    """The innermost user frame of the current call stack: for an exception caught inside
    `Trainer.fit()` (whose traceback starts at the catching frame and so holds only library
    frames), the line of the user's script that called fit()."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if _is_user_file(f.f_code.co_filename, script_dir):
            return os.path.abspath(f.f_code.co_filename), f.f_lineno
        f = f.f_back
    return None


def innermost_user_frame(
    tb: TracebackType | None, script_dir: str | None = None
) -> tuple[str, int]:
    """The deepest frame that is not inside OnTheFly, torch or the standard library.

    That is where the user's bug most likely lives, so it is what the root cause names.
    When the traceback holds no such frame (it was caught inside the library), the user's
    frame that called into the library (the current stack's innermost user frame) is named;
    only when there is none either, the traceback's innermost frame.
    """
    frames = [(f.f_code.co_filename, n) for f, n in traceback.walk_tb(tb)]
    return (
        _innermost_user_or_none(frames, script_dir)
        or _calling_user_frame(script_dir)
        or _innermost(frames)
    )


_LOADER_WORKER = re.compile(r"^Caught \w+ in (DataLoader worker process \d+)\.")
_FRAME = re.compile(r'^\s*File "(.+)", line (\d+), in ')


def _from_loader_worker(exc: BaseException, script_dir: str | None) -> tuple[str, str, int] | None:
    """An exception a DataLoader worker process raised, re-raised by torch in this process
    with the original traceback as text: (message, file, line) of the original, so the
    root cause names the user's `__getitem__`, not torch's re-raise."""
    text = str(exc)
    head = _LOADER_WORKER.match(text)
    if head is None or "Original Traceback" not in text:
        return None
    lines = text.rstrip().splitlines()
    frames = [(m.group(1), int(m.group(2))) for m in map(_FRAME.match, lines) if m]
    if not frames:
        return None
    filename, lineno = _innermost_user(frames, script_dir)
    last = lines[-1].strip()
    return f"{last} (raised in {head.group(1)})", filename, lineno


def _syntax_error_site(exc: BaseException) -> tuple[str, str, int] | None:
    """A SyntaxError (IndentationError, TabError) in a source file: (message, file, line)
    of the bad source line itself. Its traceback ends in the importer (runpy, importlib),
    never in the file that does not parse. None for code compiled from a string
    (`<string>`): there the frame that called compile()/eval() is the better answer."""
    if not isinstance(exc, SyntaxError) or not exc.filename or exc.filename.startswith("<"):
        return None
    message = f"{type(exc).__name__}: {exc.msg}" if exc.msg else f"{type(exc).__name__}: {exc}"
    return message, os.path.abspath(exc.filename), int(exc.lineno or 0)


def error_record(exc: BaseException, script_dir: str | None = None) -> dict[str, object]:
    filename, lineno = innermost_user_frame(exc.__traceback__, script_dir)
    message = f"{type(exc).__name__}: {exc}"
    worker = _from_loader_worker(exc, script_dir) or _syntax_error_site(exc)
    if worker is not None:
        message, filename, lineno = worker
    return {
        "message": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "filename": filename,
        "lineno": lineno,
        "time": time.time(),
    }


def root_cause(exc: BaseException, script_dir: str | None = None) -> str:
    """One line: the exception and where it was raised in the user's code,
    `KeyError: 'x' (/path/train.py:12)` (the supervisor's form for a failed worker)."""
    rec = error_record(exc, script_dir)
    where = f" ({rec['filename']}:{rec['lineno']})" if rec["filename"] else ""
    return f"{rec['message']}{where}"


def write_error_file(path: str, record: dict[str, object]) -> None:
    """Write the error record atomically; the earliest record wins (it is the root cause)."""
    if not path or os.path.exists(path):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
