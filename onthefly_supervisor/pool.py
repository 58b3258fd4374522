"""Worker pool: what to launch (WorkerSpec), the live thing (Worker), how it ended (WorkerExit).

Policy lives in the supervisor (when to start, stop, restart); the mechanism is a small
launcher interface (start, poll, stop, close) so tests can swap in fakes and a DDP or Ray
launcher can replace local processes without the rest of the supervisor knowing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from onthefly_supervisor.lifecycle import Role, WorkerState, check_worker_transition


@dataclass(frozen=True)
class WorkerSpec:
    """What to launch: the user's script re-run in a role. Validated on creation."""

    worker_id: str
    run_id: str
    role: Role
    script: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    gpu: str = ""
    """CUDA_VISIBLE_DEVICES for the worker; "" = none set (CPU, or inherit)."""
    threads: int = 0
    """Bound on intra-op threads (OMP/MKL/torch) for CPU workers sharing cores; 0 = no bound."""
    log_path: str = ""
    error_file: str = ""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("WorkerSpec needs a worker_id")
        if not self.run_id and self.role is not Role.STANDBY:
            raise ValueError(f"WorkerSpec for a {self.role.value} worker needs a run_id")
        if not os.path.isfile(self.script):
            raise ValueError(f"script not found: {self.script}")
        if self.threads < 0:
            raise ValueError(f"WorkerSpec.threads must be >= 0, got {self.threads}")


def location(filename: object, lineno: object) -> str:
    """ " (file:line)" for an error's place, " (file)" when there is no line (0: the script as
    a whole, e.g. it never reached fit), "" without a file."""
    if not filename:
        return ""
    return f" ({filename}:{lineno})" if lineno else f" ({filename})"


@dataclass
class WorkerExit:
    """How a worker process ended."""

    exit_code: int | None
    signal_name: str
    error: dict[str, object] | None
    """The worker's JSON error file (message, traceback, filename, lineno, time), if any."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        if self.error and self.error.get("message"):
            where = location(self.error.get("filename"), self.error.get("lineno"))
            return f"{self.error['message']}{where}"
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exited with code {self.exit_code}"


@dataclass
class Worker:
    """A live worker: an instance of a WorkerSpec (one attempt)."""

    spec: WorkerSpec
    attempt: int = 0
    pid: int = 0
    state: WorkerState = WorkerState.STARTING
    started: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    step: int = 0
    epoch: int = 0
    exit: WorkerExit | None = None
    stop_requested: bool = False
    stalled_s: float = 0.0
    """Its training thread's time without progress, from its last heartbeat (activity.py)."""
    stuck_at: str = ""
    """Where that thread is, once stalled for a few seconds."""
    stall_reported: float = 0.0
    """The stall (seconds) the session was last told about; 0 while it progresses."""

    def transition(self, new: WorkerState) -> bool:
        """The one method that changes a worker's state; False when it is already there."""
        if new == self.state:
            return False
        check_worker_transition(self.state, new)
        self.state = new
        return True


class Launcher(Protocol):
    def start(self, spec: WorkerSpec, attempt: int) -> int: ...
    def poll(self, worker_id: str) -> WorkerExit | None: ...
    def stop(self, worker_id: str, grace_s: float) -> None: ...
    def signal(self, worker_id: str, sig: int) -> None: ...
    def close(self) -> None: ...


class RebindingLauncher(Launcher, Protocol):
    """A launcher whose running worker can take a new identity (the warm pool needs this)."""

    def rebind(self, worker_id: str, spec: WorkerSpec) -> None:
        """The process started as `worker_id` is `spec.worker_id` from now on: poll, stop and
        signal use the new id, its output goes to `spec.log_path`, its exit error is read from
        `spec.error_file` (the old error file too, for a failure before the hand-over landed)."""
        ...


def read_error_file(path: str) -> dict[str, object] | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class LocalLauncher:
    """Workers as local child processes, each in its own process group."""

    def __init__(self, on_output: Callable[[str, str], None] | None = None) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._specs: dict[str, WorkerSpec] = {}
        self._pumps: dict[str, threading.Thread] = {}
        self._old_error_files: dict[str, str] = {}
        self._current: dict[int, WorkerSpec] = {}
        """id(Popen) -> the spec the process runs now (changes when a standby becomes a fork)."""
        self.on_output = on_output

    def start(self, spec: WorkerSpec, attempt: int) -> int:
        # Our own ONTHEFLY_* (a self-hosted owner's) must not leak into the worker's contract;
        # the checkpoint writer's tuning knobs (ONTHEFLY_CKPT_*, see checkpoint.py) do pass.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ONTHEFLY_") or k.startswith("ONTHEFLY_CKPT_")
        }
        env.update(spec.env)
        env["ONTHEFLY_PARENT_PID"] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        # Loader workers fork the worker; they never use gRPC (see onthefly_worker/__init__).
        env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        if spec.gpu:
            env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        if spec.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[k] = str(spec.threads)
        if spec.error_file and os.path.exists(spec.error_file):
            os.unlink(spec.error_file)
        proc = subprocess.Popen(
            [sys.executable, "-m", "onthefly_worker.launch", spec.script, *spec.argv],
            cwd=spec.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl+C reaches the supervisor, which stops workers in order
        )
        self._procs[spec.worker_id] = proc
        self._specs[spec.worker_id] = spec
        self._current[id(proc)] = spec
        self._old_error_files.pop(spec.worker_id, None)
        t = threading.Thread(
            target=self._pump, args=(proc,), name=f"onthefly-out-{spec.worker_id}", daemon=True
        )
        self._pumps[spec.worker_id] = t
        t.start()
        return proc.pid

    def rebind(self, worker_id: str, spec: WorkerSpec) -> None:
        if worker_id not in self._procs:
            raise KeyError(f"no worker {worker_id!r} to rebind")
        proc = self._procs.pop(worker_id)
        old = self._specs.pop(worker_id)
        self._procs[spec.worker_id] = proc
        self._specs[spec.worker_id] = spec
        self._pumps[spec.worker_id] = self._pumps.pop(worker_id)
        if old.error_file and old.error_file != spec.error_file:
            self._old_error_files[spec.worker_id] = old.error_file
        if spec.log_path and spec.log_path != old.log_path:
            with _open_log(spec.log_path) as new_log:  # exists from now on, as a new worker's does
                new_log.write(
                    f"[onthefly] {spec.worker_id} runs in {worker_id} (pid {proc.pid})\n".encode()
                )
            if old.log_path:
                with _open_log(old.log_path) as old_log:
                    old_log.write(
                        f"[onthefly] {worker_id} became {spec.worker_id}; "
                        f"its output continues in {spec.log_path}\n".encode()
                    )
        self._current[id(proc)] = spec  # the pump switches log file and worker id on its next line

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the worker's output to its log file and hand each line to the supervisor."""
        assert proc.stdout is not None
        spec = self._current[id(proc)]
        log = _open_log(spec.log_path) if spec.log_path else None
        try:
            for raw in iter(proc.stdout.readline, b""):
                new = self._current[id(proc)]
                if new is not spec:  # rebound: a standby became a fork
                    if new.log_path != spec.log_path:
                        if log is not None:
                            log.close()
                        log = _open_log(new.log_path) if new.log_path else None
                    spec = new
                if log is not None:
                    log.write(raw)
                    log.flush()
                if self.on_output is not None:
                    self.on_output(spec.worker_id, raw.decode("utf-8", "replace").rstrip("\n"))
        finally:
            if log is not None:
                log.close()
            proc.stdout.close()

    def poll(self, worker_id: str) -> WorkerExit | None:
        proc = self._procs.get(worker_id)
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            return None
        pump = self._pumps.get(worker_id)
        if pump is not None:
            pump.join(2.0)  # the last lines (a traceback) arrive before the exit is reported
        spec = self._specs[worker_id]
        sig = ""
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
        error = read_error_file(spec.error_file)
        if error is None and worker_id in self._old_error_files:
            error = read_error_file(self._old_error_files[worker_id])
        return WorkerExit(code, sig, error)

    def signal(self, worker_id: str, sig: int) -> None:
        proc = self._procs.get(worker_id)
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, worker_id: str, grace_s: float) -> None:
        """SIGTERM, bounded wait, SIGKILL (to the whole process group: loader workers too)."""
        proc = self._procs.get(worker_id)
        if proc is None:
            return
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGCONT)
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        else:
            _killpg(proc.pid, signal.SIGKILL)  # stray loader workers left in the group

    def close(self) -> None:
        for wid in list(self._procs):
            self.stop(wid, 5.0)


def _open_log(path: str) -> BinaryIO:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "ab")  # noqa: SIM115 - the caller closes it


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
