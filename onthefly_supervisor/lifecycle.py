"""Lifecycles of workers and runs: one str Enum each, an explicit transition table, and
one function that changes state. The proto enums mirror these (see serde.py)."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """What a worker process was started to do."""

    TRAIN = "train"
    """The generalist ("main") run."""
    FORK = "fork"
    """A short-budget specialist trained from a parent checkpoint on a selection."""
    MERGE = "merge"
    """The dedicated, long-lived merge worker (SWA, distill, Fisher soup, adapter fuse, gate)."""
    HEALTH = "health"
    """A side process that replays steps from a checkpoint (determinism check)."""
    STANDBY = "standby"
    """A warm spare: the script ran up to fit() and waits, idle, to become the next fork."""


class WorkerState(str, Enum):
    """Lifecycle of one worker process (one attempt)."""

    STARTING = "starting"
    """Spawned; its script runs but it has not attached yet (imports, data set-up)."""
    ATTACHED = "attached"
    """Its stream is open and its hello was accepted; it is setting up its role."""
    RUNNING = "running"
    """Training or doing its role."""
    PAUSED = "paused"
    """Waiting at a step boundary with a checkpoint written; no CPU spent."""
    STOPPING = "stopping"
    """Asked to stop; SIGTERM then SIGKILL follow if it does not exit in time."""
    SUCCEEDED = "succeeded"
    """Exited with code 0 after finishing its role."""
    FAILED = "failed"
    """Exited non-zero, raised, missed heartbeats, or was killed by a signal."""
    STOPPED = "stopped"
    """Exited after a stop from the user or the supervisor."""

    @property
    def terminal(self) -> bool:
        return self in (WorkerState.SUCCEEDED, WorkerState.FAILED, WorkerState.STOPPED)


_W = WorkerState
WORKER_TRANSITIONS: frozenset[tuple[WorkerState, WorkerState]] = frozenset(
    {
        (_W.STARTING, _W.ATTACHED),
        (_W.STARTING, _W.STOPPING),
        (_W.STARTING, _W.FAILED),
        (_W.STARTING, _W.SUCCEEDED),  # a script may exit 0 before attaching (e.g. --help)
        (_W.STARTING, _W.STOPPED),
        (_W.ATTACHED, _W.RUNNING),
        (_W.ATTACHED, _W.PAUSED),
        (_W.ATTACHED, _W.STOPPING),
        (_W.ATTACHED, _W.SUCCEEDED),
        (_W.ATTACHED, _W.FAILED),
        (_W.ATTACHED, _W.STOPPED),
        (_W.RUNNING, _W.PAUSED),
        (_W.RUNNING, _W.STOPPING),
        (_W.RUNNING, _W.SUCCEEDED),
        (_W.RUNNING, _W.FAILED),
        (_W.RUNNING, _W.STOPPED),
        (_W.PAUSED, _W.RUNNING),
        (_W.PAUSED, _W.STOPPING),
        (_W.PAUSED, _W.FAILED),
        (_W.PAUSED, _W.STOPPED),
        (_W.PAUSED, _W.SUCCEEDED),
        (_W.STOPPING, _W.STOPPED),
        (_W.STOPPING, _W.FAILED),
        (_W.STOPPING, _W.SUCCEEDED),
    }
)


class RunStatus(str, Enum):
    """Lifecycle of a run (a node of the session's lineage DAG)."""

    PENDING = "pending"
    """Created; its worker has not started training yet."""
    RUNNING = "running"
    """A worker trains it now."""
    PAUSED = "paused"
    """Its worker waits at a step boundary."""
    COMPLETED = "completed"
    """Finished its budget / epochs."""
    FAILED = "failed"
    """Its worker failed and no restart is left; `error` holds the root cause."""
    STOPPED = "stopped"
    """Stopped by the user, or left unfinished when the supervisor ended (resumable)."""

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED)


_R = RunStatus
RUN_TRANSITIONS: frozenset[tuple[RunStatus, RunStatus]] = frozenset(
    {
        (_R.PENDING, _R.RUNNING),
        (_R.PENDING, _R.PAUSED),
        (_R.PENDING, _R.FAILED),
        (_R.PENDING, _R.STOPPED),
        (_R.PENDING, _R.COMPLETED),
        (_R.RUNNING, _R.PAUSED),
        (_R.RUNNING, _R.COMPLETED),
        (_R.RUNNING, _R.FAILED),
        (_R.RUNNING, _R.STOPPED),
        (_R.RUNNING, _R.PENDING),  # restart after a worker crash
        (_R.PAUSED, _R.RUNNING),
        (_R.PAUSED, _R.STOPPED),
        (_R.PAUSED, _R.FAILED),
        (_R.PAUSED, _R.COMPLETED),
        (_R.PAUSED, _R.PENDING),
        (_R.STOPPED, _R.PENDING),  # `onthefly resume` continues an unfinished run
        (_R.FAILED, _R.PENDING),
    }
)


class InvalidTransition(ValueError):
    pass


def check_worker_transition(old: WorkerState, new: WorkerState) -> None:
    if old != new and (old, new) not in WORKER_TRANSITIONS:
        raise InvalidTransition(f"worker cannot go from {old.value} to {new.value}")


def check_run_transition(old: RunStatus, new: RunStatus) -> None:
    if old != new and (old, new) not in RUN_TRANSITIONS:
        raise InvalidTransition(f"run cannot go from {old.value} to {new.value}")
