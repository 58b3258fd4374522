"""Worker entry point: `python -m onthefly_worker.launch SCRIPT [ARGS...]`.

The supervisor starts every worker through this module. It is wrapped once, the way
torchelastic's `@record` wraps a rank: the parent-death signal is armed first (no worker
outlives its supervisor), then the user's script runs as `__main__`, and an uncaught
exception is written to the JSON error file the supervisor named, so the root cause
crosses the process boundary as data.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import time
from types import TracebackType

from onthefly_worker import env as wenv
from onthefly_worker.errors import error_record, write_error_file

EXIT_NO_FIT = 3
_PR_SET_PDEATHSIG = 1


def arm_parent_death_signal(expected_parent: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies (Linux); no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    # The parent may have died before prctl took effect: then we were re-parented.
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)


def _sigterm_to_exit(signum: int, _frame: object) -> None:
    # SIGTERM becomes an exception so `finally:` blocks (checkpoint flush, stream close) run.
    raise SystemExit(128 + signum)


def _record(message: str, script: str) -> dict[str, object]:
    return {
        "message": message,
        "traceback": "",
        "filename": script,
        "lineno": 0,
        "time": time.time(),
    }


def _error_file() -> str:
    return os.environ.get(wenv.ERROR_FILE, "")


def _from_script(tb: TracebackType | None, script: str) -> TracebackType | None:
    """The part of a traceback that starts at the script's own frame (None if it has none)."""
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == script:
            return tb
        tb = tb.tb_next
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m onthefly_worker.launch SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    parent = int(os.environ.get("ONTHEFLY_PARENT_PID", "0") or 0)
    arm_parent_death_signal(parent)
    signal.signal(signal.SIGTERM, _sigterm_to_exit)

    script = os.path.abspath(argv[0])
    sys.argv = [argv[0], *argv[1:]]
    script_dir = os.path.dirname(script)
    sys.path.insert(0, script_dir)
    # The error file and fit marker are read when needed, not now: a warm standby learns
    # at fit() which fork it is, and from then on writes that fork's files.
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        # The script ended itself (`--help`, an argparse error, sys.exit()): its exit code
        # is the answer, before fit() as after it. The supervisor tells from the fit marker
        # whether anything was trained and says so once; "never called fit" is only for a
        # script that returns without ever reaching fit().
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # as Python does for sys.exit("message")
            write_error_file(_error_file(), _record(f"SystemExit: {e.code}", script))
        return code
    except BaseException as e:  # noqa: BLE001 - every failure must reach the supervisor as data
        write_error_file(_error_file(), error_record(e, script_dir))
        tb = _from_script(e.__traceback__, script)
        if not isinstance(e, Exception) or (tb is None and not isinstance(e, SyntaxError)):
            raise
        # The traceback `python script.py` would print: from the script's frame on, without
        # this launcher's and runpy's frames above it (a syntax error: none, only its line).
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        return 1
    marker = os.environ.get(wenv.FIT_MARKER, "")
    if marker and not os.path.exists(marker):
        msg = (
            f"{os.path.basename(script)} finished without calling Trainer.fit(), quickstart() "
            "or trainer.fit() after attach_lightning(): nothing was trained"
        )
        # The supervisor reports it from the error file (the worker no longer prints it too).
        write_error_file(_error_file(), _record(f"OnTheFlyError: {msg}", script))
        return EXIT_NO_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
