"""The contract between the supervisor and a worker process: environment variables.

The supervisor re-runs the user's script with these set, the way `torchrun` re-runs a
script per rank. A process without ONTHEFLY_ADDR is not a worker: `Trainer.fit` then
starts a supervisor for itself (see `selfhost.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

ADDR = "ONTHEFLY_ADDR"
TOKEN = "ONTHEFLY_TOKEN"
WORKER_ID = "ONTHEFLY_WORKER_ID"
ROLE = "ONTHEFLY_ROLE"
RUN_ID = "ONTHEFLY_RUN_ID"
ERROR_FILE = "ONTHEFLY_ERROR_FILE"
SESSION_DIR = "ONTHEFLY_SESSION_DIR"
SEED = "ONTHEFLY_SEED"
RESUME = "ONTHEFLY_RESUME"
SPEC = "ONTHEFLY_SPEC"
ATTEMPT = "ONTHEFLY_ATTEMPT"
FIT_MARKER = "ONTHEFLY_FIT_MARKER"
STANDBY = "ONTHEFLY_STANDBY"
""""1" in a warm standby: its script starts as a fork would (ONTHEFLY_ROLE=fork), but at
fit() it waits for the supervisor to say which fork it is (see standby.py)."""

ROLES = ("train", "fork", "merge", "health")


@dataclass(frozen=True)
class WorkerEnv:
    """What the supervisor told this worker process."""

    addr: str
    """host:port of the supervisor's gRPC server (always loopback)."""
    token: str
    """Session token sent as `x-onthefly-token` metadata on every call."""
    worker_id: str
    role: str
    """One of ROLES."""
    run_id: str
    session_dir: str
    """Absolute path of the session folder; checkpoints are written below it."""
    error_file: str
    """Where an uncaught exception is written as JSON (message, traceback, time)."""
    resume: str
    """Checkpoint (relative to session_dir) to continue from; empty for a fresh start."""
    spec: str
    """Path of a JSON file with the role's spec (fork selection/recipe, merge method)."""
    attempt: int
    standby: bool = False
    """A warm spare for the next fork: wait at fit() for the fork's identity (standby.py)."""

    def read_spec(self) -> dict[str, Any]:
        """The role's spec (fork selection/recipe, merge method...); {} when there is none."""
        if not self.spec:
            return {}
        with open(self.spec, encoding="utf-8") as f:
            spec = json.load(f)
        return dict(spec)

    @staticmethod
    def from_environ(environ: dict[str, str] | None = None) -> WorkerEnv | None:
        e = os.environ if environ is None else environ
        addr = e.get(ADDR, "")
        if not addr:
            return None
        role = e.get(ROLE, "train")
        if role not in ROLES:
            raise RuntimeError(f"{ROLE}={role!r} is not one of {', '.join(ROLES)}")
        return WorkerEnv(
            addr=addr,
            token=e.get(TOKEN, ""),
            worker_id=e.get(WORKER_ID, "main-0"),
            role=role,
            run_id=e.get(RUN_ID, "main"),
            session_dir=e.get(SESSION_DIR, ""),
            error_file=e.get(ERROR_FILE, ""),
            resume=e.get(RESUME, ""),
            spec=e.get(SPEC, ""),
            attempt=int(e.get(ATTEMPT, "0") or 0),
            standby=e.get(STANDBY, "") == "1",
        )


def session_seed(environ: dict[str, str] | None = None) -> int | None:
    """The seed every worker applies before the user's script runs (None: disabled)."""
    e = os.environ if environ is None else environ
    raw = e.get(SEED, "0").strip().lower()
    if raw in ("", "none", "off"):
        return None
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"{SEED}={raw!r} is not an integer (or 'none')") from None
