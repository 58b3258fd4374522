"""`python train.py`: the Trainer starts a supervisor for itself and attaches as the main worker.

The supervisor is a separate process (`python -m onthefly_supervisor serve --owner-pid`),
so the worker library never imports supervisor code. It prints one JSON line with the
connection details, then follows this process: when we exit, it finalises and exits.
Forks re-run this script's argv in their role.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from onthefly_worker import env as wenv
from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError


def ensure_supervisor(cfg: TrainerConfig) -> wenv.WorkerEnv:
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    cmd = [
        sys.executable,
        "-m",
        "onthefly_supervisor",
        "serve",
        "--owner-pid",
        str(os.getpid()),
        "--project",
        cfg.project,
        "--run-name",
        cfg.run_name,
        "--port",
        os.environ.get("ONTHEFLY_PORT", "auto"),
        "--",
        script,
        *sys.argv[1:],
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,
        start_new_session=True,  # Ctrl+C goes to the user's process, which owns the supervisor
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        code = proc.wait(timeout=30)
        raise OnTheFlyError(
            f"the OnTheFly supervisor failed to start (exit code {code}); see the lines above"
        )
    info = json.loads(line)
    proc.stdout.close()
    os.environ.update(
        {
            wenv.ADDR: info["addr"],
            wenv.TOKEN: info["token"],
            wenv.WORKER_ID: info["worker_id"],
            wenv.ROLE: "train",
            wenv.RUN_ID: info["run_id"],
            wenv.SESSION_DIR: info["session_dir"],
            wenv.ERROR_FILE: info.get("error_file", ""),
            "ONTHEFLY_SELFHOSTED": "1",
        }
    )
    # Keep a reference so the Popen object is not collected (it would not kill it, but be tidy).
    _children.append(proc)
    print(
        f"[onthefly] session {info['session_id']} · supervisor on tcp://{info['addr']} · "
        f"open 'OnTheFly: Show Dashboard' in VS Code, or run `onthefly status`",
        flush=True,
    )
    e = wenv.WorkerEnv.from_environ()
    assert e is not None
    return e


_children: list[subprocess.Popen[str]] = []
