"""The supervisor: one per session. Owns the store, the gRPC server, the worker pool.

Threads: gRPC server threads call `on_worker_message` and the control methods; the main
thread runs `serve()`, the monitor loop that reaps workers, detects hangs, restarts,
batches live events and decides when the session is over. Every state change goes
through `_set_worker_state` / `_set_run_status`, which also publish the event.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg
from onthefly_supervisor import serde
from onthefly_supervisor.events import EventBus
from onthefly_supervisor.feeds import FeedError, FeedReader, clear_stale_feeds
from onthefly_supervisor.gpu import GpuAllocator
from onthefly_supervisor.lifecycle import InvalidTransition, Role, RunStatus, WorkerState
from onthefly_supervisor.pool import Launcher, LocalLauncher, Worker, WorkerExit, WorkerSpec
from onthefly_supervisor.store import (
    RunRow,
    SampleArrays,
    Store,
    new_session_id,
    point_latest,
    sessions_root,
)

DEFAULT_PORT = 47621
TOKEN_KEY = "x-onthefly-token"
# Epoch-end writes of per-sample arrays, at most this often per run (see on_worker_message).
_EPOCH_PERSIST_S = 1.0


class SupervisorError(RuntimeError):
    """A clear, one-line problem that stops the supervisor from starting."""


class ControlError(Exception):
    """A refused control request; the servicer turns it into a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SupervisorConfig:
    script: str
    """The user's training script (absolute path)."""
    argv: tuple[str, ...] = ()
    """Arguments passed to the script, unchanged."""
    project_dir: str = "."
    """Where `.onthefly/sessions/` lives (the current directory, like lightning_logs/)."""
    port: int = DEFAULT_PORT
    """Loopback port; 0 = any free port; -1 = the default port, else any free one."""
    seed: int | None = 0
    """Session seed given to every worker (ONTHEFLY_SEED); None: no seeding ('none')."""
    automode: bool = False
    headless: bool = False
    keep_alive: bool = False
    """Stay up after the work is done (a dashboard keeps it up too while attached)."""
    max_restarts: int = 0
    """Restart a failed main worker from its last checkpoint up to this many times."""
    gpus: str = "auto"
    owner_pid: int = 0
    """Self-hosted mode (`python train.py`): that process is the main worker; we end with it."""
    project: str = "default"
    run_name: str = "main"
    hang_timeout_s: float = 30.0
    """A worker that sends nothing (not even heartbeats) for this long is stopped as hung."""
    stop_grace_s: float = 30.0
    """After a stop request, SIGTERM follows if the worker has not exited by then (then SIGKILL)."""
    flush_interval_ms: int = 50
    heartbeat_interval_ms: int = 1000
    resume_dir: str = ""
    """Continue the unfinished runs of this existing session folder instead of starting anew."""
    max_parallel_forks: int = 2
    keep_checkpoints: int = 3
    """Checkpoints kept per run by the automatic prune (referenced and pinned ones always stay)."""
    serve_only: bool = False
    """With resume_dir: serve the session (views, forks, merges, exports) without resuming its runs."""
    warm_forks: int = -1
    """Standby copies of the script kept ready to become forks (-1 = auto; see warmpool.py)."""

    @property
    def seed_meta(self) -> int | str:
        """The seed as the store and ONTHEFLY_SEED say it ('none': no seeding)."""
        return "none" if self.seed is None else self.seed

    def __post_init__(self) -> None:
        if not (self.warm_forks == -1 or 0 <= self.warm_forks <= 16):
            raise SupervisorError(f"--warm-forks {self.warm_forks}: must be 'auto' or 0..16")
        if not (self.port in (0, -1) or 1 <= self.port <= 65535):
            raise SupervisorError(f"--port {self.port}: must be 0 (any free port) or 1..65535")
        if self.max_restarts < 0:
            raise SupervisorError(f"--max-restarts {self.max_restarts}: must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            # numpy, scikit-learn's k-means and DataLoader generators take 0..2**32-1.
            raise SupervisorError(f"--seed {self.seed}: must be an integer in 0..{2**32 - 1}")
        if self.hang_timeout_s <= 0:
            raise SupervisorError("hang timeout must be > 0 seconds")


@dataclass
class PendingAck:
    event: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    message: str = ""
    payload: Any = None
    worker_id: str = ""


@dataclass
class WorkerLink:
    """The open Attach stream of a worker, and its sample feed (feeds.py) if it has one."""

    worker_id: str
    out: queue.Queue[pb.SupervisorCommand | None] = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)
    feed: FeedReader | None = None
    # Messages of the stream handled so far (the hello included): a feed record is handled
    # after the first `after_stream` of them.
    handled: int = 0
    # Feed records read and not yet handled (they wait for the stream's messages).
    backlog: collections.deque[pb.WorkerMessage] = field(default_factory=collections.deque)
    # Held while this worker's messages are handled: stream and feed take turns, in order.
    lock: threading.Lock = field(default_factory=threading.Lock)


class Supervisor:
    def __init__(self, cfg: SupervisorConfig, launcher: Launcher | None = None) -> None:
        self.cfg = cfg
        self.token = secrets.token_urlsafe(32)
        self.launcher: Launcher = launcher or LocalLauncher(on_output=self._on_output)
        self.lock = threading.RLock()
        self.workers: dict[str, Worker] = {}
        self.links: dict[str, WorkerLink] = {}
        self.external: set[str] = set()
        self.pending: dict[str, PendingAck] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.finished: dict[str, pb.RunFinished] = {}
        self.hung: set[str] = set()
        self.stop_deadline: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self._metric_buf: dict[str, list[dict[str, Any]]] = {}
        self._sample_dirty: dict[str, int] = {}
        self._sample_steps: dict[str, int] = {}
        self._last_persist = time.monotonic()
        self._last_prune = time.monotonic()
        self._last_sample_event = 0.0
        self._exit_code: int | None = None
        # The script failed after its run completed (its own code after fit(), or a second
        # fit()): the run keeps its status, `onthefly run` exits non-zero like `python` would.
        self._script_failed = ""
        # The main worker's exit code when the script ended itself before Trainer.fit()
        # (an argparse error exits 2): `onthefly run` exits with it, as `python` would.
        self._before_fit_code: int | None = None
        # The main worker's exit code when the script called sys.exit(N) after its run
        # completed.
        self._script_exit = 0
        self._owner_gone_noted = False
        self._root_cause = ""
        self.without_checkpoint: list[str] = []
        # The runs that were still going when the supervisor stopped (set by shutdown).
        self.left_unfinished: list[str] = []
        self._discard_dir = False
        self._shutdown = threading.Event()
        self._feed_thread: threading.Thread | None = None
        self._epoch_persisted: dict[str, float] = {}  # run -> when its epochs were last written
        self.output_hooks: list[Callable[[str, str], None]] = []
        self.dataset_sizes: dict[str, int] = {}
        self.shape: dict[str, tuple[int, int]] = {}
        """(steps per epoch, max epochs) of each run, as its worker reported at attach (0 =
        unknown)."""
        self.started = time.time()
        self.server: grpc.Server | None = None
        self.port = 0
        self.gpu = GpuAllocator(cfg.gpus)
        self.automode = cfg.automode
        self.control_hooks: dict[str, Callable[..., Any]] = {}
        self.tick_hooks: list[Callable[[], None]] = []
        self.busy_hooks: list[Callable[[], bool]] = []
        self.final_hooks: list[Callable[[], bool]] = []
        if cfg.resume_dir:
            self.dir = os.path.abspath(cfg.resume_dir)
            self.session_id = os.path.basename(self.dir)
        else:
            self.session_id = new_session_id()
            self.dir = os.path.join(sessions_root(cfg.project_dir), self.session_id)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self.store = Store(self.dir)
        self.bus = EventBus(self.store)
        self.arrays = SampleArrays(self.dir)
        from onthefly_supervisor.autopilot import Autopilot
        from onthefly_supervisor.method import MethodOps

        self.method = MethodOps(self)
        self.autopilot = Autopilot(self)
        from onthefly_supervisor.warmpool import WarmPool

        self.warm = WarmPool(self, cfg.warm_forks)

    # -- start / stop ------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._bind()
        except SupervisorError:
            # Nothing ran: shutdown() removes the new session folder instead of leaving an
            # empty session behind for `sessions ls` (a resumed session is kept, of course).
            self._discard_dir = not self.cfg.resume_dir
            raise
        clear_stale_feeds(self.dir)  # (before our connection.json replaces the last one)
        self._write_connection()
        point_latest(self.dir)
        st = self.store
        if self.cfg.resume_dir:
            # An imported or moved session: the script given (`--script`) is where it lives
            # now, and a project folder that is gone is this one; workers start from these.
            if self.cfg.script and self.cfg.script != st.get_meta("script", ""):
                st.set_meta("script", self.cfg.script)
            if not os.path.isdir(str(st.get_meta("cwd", ""))):
                st.set_meta("cwd", os.path.abspath(self.cfg.project_dir))
        st.set_meta("automode", bool(self.automode))  # what a resume turns on again
        if not self.cfg.resume_dir:
            st.set_meta("script", self.cfg.script)
            st.set_meta("argv", list(self.cfg.argv))
            st.set_meta("cwd", os.path.abspath(self.cfg.project_dir))
            st.set_meta("seed", self.cfg.seed_meta)
            st.set_meta("project", self.cfg.project)
            st.set_meta("created", self.started)
            st.add_run(
                RunRow("main", self.cfg.run_name, "main", RunStatus.PENDING, [], time.time())
            )
            self.bus.publish(
                "session",
                "",
                state="started",
                session_id=self.session_id,
                script=self.cfg.script,
                argv=list(self.cfg.argv),
            )
            self.bus.publish("run_created", "main", run=st.run("main").to_dict())  # type: ignore[union-attr]
        else:
            self.bus.publish("session", "", state="resumed", session_id=self.session_id)
        if self.cfg.owner_pid:
            self._register_external("main-0", "main", self.cfg.owner_pid)
        elif self.cfg.resume_dir:
            if not self.cfg.serve_only:
                self._resume_unfinished()
        else:
            self.spawn("main", Role.TRAIN)

    def _bind(self) -> None:
        from onthefly_supervisor.server import ControlServicer, TokenInterceptor, WorkerServicer

        def make() -> grpc.Server:
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="onthefly-rpc"),
                interceptors=[TokenInterceptor(self.token)],
                options=[
                    ("grpc.so_reuseport", 0),  # a second supervisor must not share our port
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ],
            )
            pbg.add_WorkerServiceServicer_to_server(WorkerServicer(self), server)
            pbg.add_ControlServiceServicer_to_server(ControlServicer(self), server)
            return server

        port = self.cfg.port
        candidates = [DEFAULT_PORT, 0] if port == -1 else [port]
        last = ""
        for p in candidates:
            if p and not _port_free(p):
                continue  # checked first: gRPC's own bind failure also logs a C-level line
            server = make()
            try:
                bound = server.add_insecure_port(f"127.0.0.1:{p}")
            except RuntimeError as e:
                bound, last = 0, str(e)
            if bound:
                self.server, self.port = server, bound
                server.start()
                return
            server.stop(None)
        raise SupervisorError(
            f"port {candidates[-1]} on 127.0.0.1 is in use (another OnTheFly session?); "
            "pass --port 0 to use any free port"
            + (f" [{last}]" if last and "in use" not in last else "")
        )

    def _write_connection(self) -> None:
        info = {
            "host": "127.0.0.1",
            "port": self.port,
            "addr": f"127.0.0.1:{self.port}",
            "token": self.token,
            "session_id": self.session_id,
            "session_dir": self.dir,
            "pid": os.getpid(),
            "started": self.started,
        }
        path = os.path.join(self.dir, "connection.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, path)

    def connection_info(self) -> dict[str, Any]:
        return {
            "addr": f"127.0.0.1:{self.port}",
            "token": self.token,
            "session_id": self.session_id,
            "session_dir": self.dir,
            "run_id": "main",
            "worker_id": "main-0",
            "error_file": os.path.join(self.dir, "logs", "main-0.error.json"),
        }

    def shutdown(self) -> None:
        """Always runs: stop workers (stop → SIGTERM → SIGKILL), persist, close."""
        if self._shutdown.is_set():
            return
        self._shutdown.set()
        with self.lock:
            live = [
                w
                for w in self.workers.values()
                if not w.state.terminal and w.spec.worker_id not in self.external
            ]
        told = []
        # Ending on Ctrl+C/SIGTERM (exit 128 + N): the workers' scripts end as that signal
        # ends a script (code after fit() does not run), as under `python train.py`.
        signum = self._exit_code - 128 if self._exit_code in (130, 143) else 0
        reason = (
            f"interrupted ({'Ctrl+C' if signum == signal.SIGINT else 'SIGTERM'})"
            if signum
            else "supervisor shutting down"
        )
        for w in live:
            try:
                # Attached workers stop at a step boundary and checkpoint; the rest get SIGTERM.
                self._send(
                    w.spec.worker_id,
                    pb.SupervisorCommand(
                        stop=pb.Stop(reason=reason, skip_test=True, signal=signum)
                    ),
                )
                told.append(w)
            except ControlError:
                self.launcher.stop(w.spec.worker_id, 3.0)
        deadline = time.monotonic() + min(self.cfg.stop_grace_s, 10.0)
        while time.monotonic() < deadline and any(
            self.launcher.poll(w.spec.worker_id) is None for w in told
        ):
            time.sleep(0.05)
        for w in live:
            self.launcher.stop(w.spec.worker_id, 3.0)
            self._reap(w.spec.worker_id)
        self.launcher.close()
        self._flush_live_events(force=True)
        self.arrays.persist()
        self._root_cause = self._cause()
        # What an interrupted session's last line says: runs `onthefly resume` would start
        # from the beginning, having no checkpoint yet.
        self.without_checkpoint = [
            r.run_id
            for r in self.store.runs()
            if r.status is not RunStatus.COMPLETED and not self.store.latest_checkpoint(r.run_id)
        ]
        with self.lock:
            self.left_unfinished = sorted(
                {w.spec.run_id for w in live if w.spec.role in (Role.TRAIN, Role.FORK)}
                | {r.run_id for r in self.store.runs() if not r.status.terminal}
            )
            for r in self.store.runs():
                if not r.status.terminal:
                    self._set_run_status(
                        r.run_id,
                        RunStatus.STOPPED,
                        "left unfinished when the supervisor stopped; " + _how_to_continue(r),
                    )
        self.bus.publish("session", "", state="finished", exit_code=self._exit_code or 0)
        self.bus.close()
        for link in self.links.values():
            link.out.put(None)
        # A watcher (the dashboard, the CLI) whose stream just ended is likely reconnecting
        # from its last seq: a moment (at most 1 s) to replay it the session's last events.
        linger = time.monotonic() + 1.0
        while (
            self.server is not None
            and time.monotonic() < linger
            and (self.bus.remote_watchers or time.monotonic() - self.bus.last_remote_end < 0.3)
        ):
            time.sleep(0.05)
        if self.server is not None:
            self.server.stop(grace=2.0).wait(3.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, "connection.json"))
        self.store.close()
        if self._discard_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- workers -----------------------------------------------------------------------------
    def _new_worker_id(self, run_id: str) -> str:
        n = sum(1 for w in self.workers if w.startswith(f"{run_id}-"))
        return f"{run_id}-{n}"

    def spawn(
        self, run_id: str, role: Role, resume: str = "", spec_file: str = "", gpu: bool = False
    ) -> Worker:
        if role is Role.FORK:
            # A standby that already ran the start-up (also for a fork that resumes).
            warm = self.warm.take(run_id, spec_file, resume)
            if warm is not None:
                return warm
        with self.lock:
            wid = self._new_worker_id(run_id)
            attempt = self.restarts.get(run_id, 0)
            gpu_id = self.gpu.acquire(wid) if gpu else ""
            spec = self.worker_spec(wid, run_id, role, attempt, resume, spec_file, gpu_id)
            return self.launch(spec, attempt)

    def worker_spec(
        self,
        wid: str,
        run_id: str,
        role: Role,
        attempt: int = 0,
        resume: str = "",
        spec_file: str = "",
        gpu_id: str = "",
    ) -> WorkerSpec:
        """What to launch for a worker: the script, its argv and the worker's environment."""
        script = self.store.get_meta("script", self.cfg.script)
        argv = tuple(self.store.get_meta("argv", list(self.cfg.argv)))
        cwd = self.store.get_meta("cwd", os.path.abspath(self.cfg.project_dir))
        threads = 0
        if role is not Role.TRAIN and not gpu_id:
            threads = max(1, (os.cpu_count() or 2) // 2)
        env = {
            "ONTHEFLY_ADDR": f"127.0.0.1:{self.port}",
            "ONTHEFLY_TOKEN": self.token,
            "ONTHEFLY_WORKER_ID": wid,
            "ONTHEFLY_ROLE": role.value,
            "ONTHEFLY_RUN_ID": run_id,
            "ONTHEFLY_SESSION_DIR": self.dir,
            "ONTHEFLY_SEED": str(self.store.get_meta("seed", self.cfg.seed_meta)),
            "ONTHEFLY_ERROR_FILE": os.path.join(self.dir, "logs", f"{wid}.error.json"),
            "ONTHEFLY_FIT_MARKER": os.path.join(self.dir, "logs", f"{wid}.fit"),
            "ONTHEFLY_ATTEMPT": str(attempt),
        }
        if resume:
            env["ONTHEFLY_RESUME"] = resume
        if spec_file:
            env["ONTHEFLY_SPEC"] = spec_file
        return WorkerSpec(
            worker_id=wid,
            run_id=run_id,
            role=role,
            script=script,
            argv=argv,
            cwd=cwd,
            env=env,
            gpu=gpu_id,
            threads=threads,
            log_path=os.path.join(self.dir, "logs", f"{wid}.log"),
            error_file=env["ONTHEFLY_ERROR_FILE"],
        )

    def launch(self, spec: WorkerSpec, attempt: int = 0) -> Worker:
        with self.lock:
            w = Worker(spec, attempt=attempt)
            self.workers[spec.worker_id] = w
            w.pid = self.launcher.start(spec, attempt)
            self._publish_worker(w)
        return w

    def _register_external(self, wid: str, run_id: str, pid: int) -> None:
        spec = WorkerSpec(
            worker_id=wid,
            run_id=run_id,
            role=Role.TRAIN,
            script=self.cfg.script,
            argv=self.cfg.argv,
            cwd=os.getcwd(),
        )
        w = Worker(spec, pid=pid)
        with self.lock:
            self.workers[wid] = w
            self.external.add(wid)
        self._publish_worker(w)

    def _publish_worker(self, w: Worker) -> None:
        d = self.worker_dict(w)
        self.store.upsert_worker(d)
        self.bus.publish("worker_state", w.spec.run_id, worker=d)

    def worker_dict(self, w: Worker) -> dict[str, Any]:
        ex = w.exit
        return {
            "worker_id": w.spec.worker_id,
            "run_id": w.spec.run_id,
            "role": w.spec.role.value,
            "state": w.state.value,
            "pid": w.pid,
            "attempt": w.attempt,
            "gpu": w.spec.gpu,
            "step": w.step,
            "epoch": w.epoch,
            "last_seen": w.last_seen,
            "stalled_s": round(w.stalled_s, 1),
            "stuck_at": w.stuck_at,
            "exit_code": ex.exit_code if ex else None,
            "exit_signal": ex.signal_name if ex else "",
            "started": w.started,
            "ended": time.time() if w.state.terminal else None,
            "error": ex.describe() if ex and not ex.ok else "",
        }

    def _set_worker_state(self, wid: str, state: WorkerState) -> None:
        with self.lock:
            w = self.workers.get(wid)
            if w is None:
                return
            try:
                changed = w.transition(state)
            except InvalidTransition as e:
                self.bus.publish("log", w.spec.run_id, worker_id=wid, level="debug", text=str(e))
                return
        if changed:
            self._publish_worker(w)

    def _set_run_status(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        try:
            old = self.store.set_run_status(run_id, status, error)
        except InvalidTransition as e:
            self.bus.publish("log", run_id, level="debug", text=str(e))
            return
        except KeyError:
            return
        if old != status or error:
            self.bus.publish(
                "run_status", run_id, status=status.value, previous=old.value, error=error or ""
            )

    def live_worker(self, run_id: str) -> Worker | None:
        """The worker that can take commands for a run now (attached, stream open, not done)."""
        with self.lock:
            for w in reversed(list(self.workers.values())):
                if w.spec.run_id != run_id or w.spec.worker_id in self.finished:
                    continue
                link = self.links.get(w.spec.worker_id)
                if link is None or link.closed.is_set():
                    continue
                if w.state in (
                    WorkerState.ATTACHED,
                    WorkerState.RUNNING,
                    WorkerState.PAUSED,
                    WorkerState.STOPPING,
                ):
                    return w
        return None

    # -- messages from workers ---------------------------------------------------------------
    def attach(self, hello: pb.Hello, worker_id: str) -> tuple[WorkerLink, pb.SupervisorCommand]:
        with self.lock:
            w = self.workers.get(worker_id)
            if w is None:
                raise ControlError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"unknown worker id {worker_id!r}: this supervisor did not start it",
                )
            if w.state is not WorkerState.STARTING:
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {worker_id} is already attached ({w.state.value})",
                )
            if hello.run_id and hello.run_id != w.spec.run_id:
                raise ControlError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"worker {worker_id} belongs to run {w.spec.run_id}, not {hello.run_id}",
                )
            link = WorkerLink(worker_id, handled=1)  # (the hello: the stream's first message)
            self.links[worker_id] = link
            if hello.pid:
                w.pid = hello.pid
            w.last_seen = time.time()
        run_id = w.spec.run_id
        if w.spec.role in (Role.MERGE, Role.STANDBY, Role.HEALTH):
            self._set_worker_state(worker_id, WorkerState.ATTACHED)
            self.bus.publish(
                "attached",
                "",
                worker_id=worker_id,
                pid=int(hello.pid),
                role=w.spec.role.value,
                device=hello.device,
            )
            return link, self._welcome(run_id)
        self.dataset_sizes[run_id] = int(hello.dataset_size)
        fields: dict[str, Any] = {
            "dataset_size": int(hello.dataset_size),
            "config_json": hello.config_json or "{}",
        }
        earlier = self.store.run(run_id)
        before = earlier.fingerprint if earlier is not None else ""
        if hello.data_fingerprint:
            fields["fingerprint"] = hello.data_fingerprint
        if run_id == "main" and hello.run_name:
            fields["name"] = hello.run_name
        if run_id == "main" and hello.project:
            self.store.set_meta("project", hello.project)  # the script's Trainer(project=...)
        self.store.update_run(run_id, **fields)
        # A restarted or resumed run against its own earlier attempt; a new fork against main.
        ref, whose = before, "its earlier attempt's (a restart or resume)"
        main = self.store.run("main") if not ref and run_id != "main" else None
        if main is not None:
            ref, whose = main.fingerprint, "the main run's"
        if ref and hello.data_fingerprint and ref != hello.data_fingerprint:
            self.bus.publish(
                "log",
                run_id,
                worker_id=worker_id,
                level="warning",
                text=f"this worker's training data differs from {whose} (data fingerprint "
                "mismatch): the script builds different data on each run, so the per-sample "
                "losses of different attempts are of different samples; seed it or build it "
                "deterministically",
            )
        self._set_worker_state(worker_id, WorkerState.ATTACHED)
        self._set_run_status(run_id, RunStatus.RUNNING)
        self.shape[run_id] = (int(hello.steps_per_epoch), int(hello.max_epochs))
        self.bus.publish(
            "attached",
            run_id,
            worker_id=worker_id,
            pid=int(hello.pid),
            dataset_size=int(hello.dataset_size),
            steps_per_epoch=int(hello.steps_per_epoch),
            max_epochs=int(hello.max_epochs),
            max_steps=int(hello.max_steps),
            model=hello.model_summary,
            device=hello.device,
            framework=hello.framework,
            project=hello.project,
        )
        return link, self._welcome(run_id, self._open_feed(link))

    def _welcome(self, run_id: str, feed: str = "") -> pb.SupervisorCommand:
        return pb.SupervisorCommand(
            welcome=pb.Welcome(
                session_id=self.session_id,
                session_dir=self.dir,
                run_id=run_id,
                flush_interval_ms=self.cfg.flush_interval_ms,
                heartbeat_interval_ms=self.cfg.heartbeat_interval_ms,
                sample_feed=feed,
            )
        )

    # -- a worker's messages: its stream and its sample feed, in order -------------------------
    def _open_feed(self, link: WorkerLink) -> str:
        """A sample feed for a worker that records per-sample losses; its path for the
        welcome, or "" (the worker then sends them on its stream) when feeds are off
        (ONTHEFLY_SAMPLE_FEED=0) or the file cannot be made."""
        if os.environ.get("ONTHEFLY_SAMPLE_FEED", "1") == "0":
            return ""
        try:
            link.feed = FeedReader(self.dir, link.worker_id)
        except OSError as e:
            self._worker_log_id(
                link.worker_id,
                "warning",
                f"no sample feed ({e}): per-sample losses come on the gRPC stream",
            )
            return ""
        with self.lock:
            if self._feed_thread is None:
                self._feed_thread = threading.Thread(
                    target=self._read_feeds, name="onthefly-feeds", daemon=True
                )
                self._feed_thread.start()
        return link.feed.rel

    def _read_feeds(self) -> None:
        """Every ~100 ms, the feeds' new records (a worker busy on its stream is read there)."""
        while not self._shutdown.wait(0.1):
            with self.lock:
                links = [lk for lk in self.links.values() if lk.feed is not None]
            for link in links:
                if link.lock.acquire(blocking=False):
                    try:
                        self._drain_feed(link)
                    finally:
                        link.lock.release()

    def on_stream_message(self, link: WorkerLink, msg: pb.WorkerMessage) -> None:
        """A message of a worker's stream, after the feed records written before it."""
        with link.lock:
            self._drain_feed(link)
            self.handle_worker_message(link.worker_id, msg)
            link.handled += 1

    def close_feed(self, link: WorkerLink) -> None:
        """The worker's stream ended: handle what its feed still holds, delete its files."""
        with link.lock:
            self._drain_feed(link, final=True)
            feed, link.feed = link.feed, None
        if feed is not None:
            left = feed.close()
            if left:
                self._worker_log_id(
                    link.worker_id,
                    "warning",
                    f"the sample feed ended in an incomplete record ({left} bytes): the "
                    "worker stopped while writing it (those steps' losses are not stored), "
                    "or the write failed and the worker sent it on its stream instead",
                )

    def _drain_feed(self, link: WorkerLink, final: bool = False) -> None:
        """(link.lock held) Handle the feed's records that the stream does not hold back;
        `final`: all of them (the stream has ended)."""
        feed = link.feed
        if feed is not None:
            try:
                for raw in feed.records():
                    msg = pb.WorkerMessage()
                    try:
                        msg.ParseFromString(raw)
                    except Exception as e:  # noqa: BLE001 - a bad record is logged, not fatal
                        self._worker_log_id(link.worker_id, "error", f"bad sample feed record: {e}")
                        continue
                    link.backlog.append(msg)
            except (FeedError, OSError) as e:
                link.feed = None
                feed.close()
                self._worker_log_id(
                    link.worker_id,
                    "error",
                    f"sample feed unreadable ({e}); this worker's later per-sample losses are lost",
                )
        while link.backlog and (final or link.backlog[0].after_stream <= link.handled):
            self.handle_worker_message(link.worker_id, link.backlog.popleft())

    def handle_worker_message(self, wid: str, msg: pb.WorkerMessage) -> None:
        """`on_worker_message`, with a bad message logged instead of raised: it must not end
        the worker's stream or the supervisor."""
        try:
            self.on_worker_message(wid, msg)
        except Exception as e:
            self._worker_log_id(wid, "error", f"bad message from {wid}: {type(e).__name__}: {e}")

    def _worker_log_id(self, wid: str, level: str, text: str, run_id: str = "") -> None:
        self.bus.publish("log", run_id, worker_id=wid, level=level, text=text)

    def detach(self, worker_id: str) -> None:
        with self.lock:
            link = self.links.pop(worker_id, None)
            # Nobody will answer these any more: fail them now instead of at their timeout.
            orphaned = [c for c, p in self.pending.items() if p.worker_id == worker_id]
            acks = [self.pending.pop(c) for c in orphaned]
        for p in acks:
            p.ok, p.message = False, f"worker {worker_id} ended before answering"
            p.event.set()
        if link is not None:
            link.closed.set()
            link.out.put(None)

    def _on_metrics(self, w: Worker, run_id: str, batch: pb.MetricsBatch) -> None:
        points = [serde.metric_point(p) for p in batch.points]
        if not points:
            return
        self.store.add_metrics(run_id, points, self._sample_steps.get(run_id))
        last = points[-1]
        w.step, w.epoch = last["step"], last["epoch"]
        with self.lock:
            self._metric_buf.setdefault(run_id, []).extend(points)

    def _on_samples(self, wid: str, run_id: str, samples: pb.SampleLosses) -> None:
        ids, losses = serde.unpack_samples(samples)
        size = self.dataset_sizes.get(run_id, -1)
        try:
            extras = serde.unpack_sample_extras(samples)
            self.arrays.ingest(run_id, int(samples.epoch), size, ids, losses, extras)
        except ValueError as e:
            self.bus.publish(
                "log",
                run_id,
                worker_id=wid,
                level="error",
                text=f"per-sample losses rejected: {e}",
            )
            return
        with self.lock:
            if run_id not in self._sample_steps:
                run = self.store.run(run_id)
                self._sample_steps[run_id] = run.sample_steps if run is not None else 0
            # Written with the next metrics flush (same transaction), not per message.
            if not samples.reset:  # a reset forgets losses: no compute was spent
                self._sample_steps[run_id] += int(samples.count)
            self._sample_dirty[run_id] = int(samples.epoch)

    def on_worker_message(self, wid: str, msg: pb.WorkerMessage) -> None:
        w = self.workers.get(wid)
        if w is None:
            return
        w.last_seen = time.time()
        run_id = w.spec.run_id
        body = msg.WhichOneof("body")
        if w.spec.role is Role.MERGE and body is not None:
            # The merge worker reports on the runs it creates; they are named in the message.
            target = getattr(getattr(msg, body), "run_id", "")
            if target and self.store.run(target) is not None:
                run_id = target
            elif body in ("metrics", "samples", "epoch_end", "checkpoint", "eval", "finished"):
                return
        if body == "status" and w.spec.role is Role.MERGE:
            st0 = serde.WORKER_STATE_FROM_PB.get(msg.status.state)
            if st0 is not None:
                self._set_worker_state(wid, st0)
            return
        if body == "metrics":
            self._on_metrics(w, run_id, msg.metrics)
        elif body == "samples":
            self._on_samples(wid, run_id, msg.samples)
            if msg.samples.HasField("metrics"):  # the same flush's steps, in one message
                self._on_metrics(w, run_id, msg.samples.metrics)
        elif body == "epoch_end":
            ee = msg.epoch_end
            now = time.monotonic()
            if now - self._epoch_persisted.get(run_id, -1.0) >= _EPOCH_PERSIST_S:
                # The epoch's arrays (and any earlier ones left dirty) to disk, the ones
                # before it out of memory. Epochs shorter than _EPOCH_PERSIST_S are written
                # together at most once that often (each write is 4 files, and a tiny
                # dataset ends several epochs a second); until then they are in memory.
                self._epoch_persisted[run_id] = now
                self.arrays.persist(run=run_id, before=int(ee.epoch) + 1)
                self.arrays.evict(run_id, int(ee.epoch))
            self._flush_live_events(force=True)
            self.bus.publish(
                "epoch_end",
                run_id,
                epoch=int(ee.epoch),
                step=int(ee.step),
                train_loss=_num(ee.train_loss),
                seconds=ee.seconds,
                nonfinite_steps=int(ee.nonfinite_steps),
            )
        elif body == "checkpoint":
            c = msg.checkpoint
            if not _inside(self.dir, c.path):
                self.bus.publish(
                    "log",
                    run_id,
                    worker_id=wid,
                    level="error",
                    text=f"checkpoint path {c.path!r} escapes the session folder; ignored",
                )
                return
            # The per-sample losses recorded before the checkpoint go to disk first: a
            # resume from it trains only what follows, so they must not wait for the next
            # periodic write (a supervisor killed in between lost them for good).
            self.arrays.persist(run=run_id)
            self.store.add_checkpoint(
                run_id,
                c.path,
                c.sha256,
                int(c.step),
                int(c.epoch),
                int(c.batch),
                c.reason,
                int(c.bytes),
            )
            self.bus.publish(
                "checkpoint",
                run_id,
                path=c.path,
                sha256=c.sha256,
                step=int(c.step),
                epoch=int(c.epoch),
                batch=int(c.batch),
                reason=c.reason,
                bytes=int(c.bytes),
            )
        elif body == "eval":
            e2 = msg.eval
            self.store.add_eval(
                run_id,
                e2.split,
                int(e2.step),
                int(e2.epoch),
                e2.loss,
                e2.accuracy,
                int(e2.samples),
                dict(e2.metrics),
            )
            self.bus.publish(
                "eval",
                run_id,
                split=e2.split,
                step=int(e2.step),
                epoch=int(e2.epoch),
                loss=_num(e2.loss),
                accuracy=_num(e2.accuracy),
                samples=int(e2.samples),
            )
        elif body == "status":
            st = serde.WORKER_STATE_FROM_PB.get(msg.status.state)
            if st is not None:
                self._set_worker_state(wid, st)
                if st is WorkerState.PAUSED:
                    self._set_run_status(run_id, RunStatus.PAUSED)
                elif st is WorkerState.RUNNING:
                    self._set_run_status(run_id, RunStatus.RUNNING)
            if msg.status.message:
                self.bus.publish(
                    "log", run_id, worker_id=wid, level="info", text=msg.status.message
                )
        elif body == "log":
            self.bus.publish(
                "log", run_id, worker_id=wid, level=msg.log.level or "info", text=msg.log.text
            )
        elif body == "error":
            err = serde.error_from_proto(msg.error)
            with self.lock:
                self.errors.setdefault(wid, err)
            self.bus.publish("error", run_id, worker_id=wid, **err)
        elif body == "ack":
            a = msg.ack
            with self.lock:
                p = self.pending.pop(a.command_id, None)
            if p is not None:
                p.ok, p.message = a.ok, a.message
                p.payload = json.loads(a.payload_json) if a.payload_json else None
                p.event.set()
        elif body == "finished":
            f = msg.finished
            if w.spec.role is not Role.MERGE:
                self.finished[wid] = f
            status = serde.RUN_STATUS_FROM_PB.get(f.status, RunStatus.COMPLETED)
            if run_id in self._sample_steps:
                self.store.update_run(run_id, sample_steps=self._sample_steps[run_id])
            self._flush_live_events(force=True)
            self.arrays.persist()
            summary: dict[str, Any] = json.loads(f.summary_json) if f.summary_json else {}
            if w.spec.role is Role.MERGE and isinstance(summary.get("sample_steps"), int):
                self.store.update_run(run_id, sample_steps=int(summary["sample_steps"]))
            early = summary.get("early_stop")
            if w.spec.role is Role.FORK and isinstance(early, dict):
                self._record_early_stop(run_id, early)
            failure = str(summary.get("error", "")) if status is RunStatus.FAILED else ""
            # A completed run carries no error (an earlier interruption's is in the events).
            done = "" if status is RunStatus.COMPLETED else None
            self._set_run_status(run_id, status, failure or done)
            self.bus.publish(
                "finished",
                run_id,
                status=status.value,
                step=int(f.step),
                epoch=int(f.epoch),
                checkpoint=f.final_checkpoint,
                **({"early_stop": early} if isinstance(early, dict) else {}),
            )
        elif body == "heartbeat":
            w.stalled_s, w.stuck_at = float(msg.heartbeat.stalled_s), msg.heartbeat.stuck_at

    def _worker_log(self, w: Worker, level: str, text: str) -> None:
        self._worker_log_id(w.spec.worker_id, level, text, w.spec.run_id)

    def _report_stall(self, w: Worker) -> None:
        """A worker that still beats but whose training thread has made no progress for the
        hang timeout: say where it is (a loop stuck in user code, a loader that blocks),
        again each time the stall has doubled, and when it moves again. It is not
        stopped: a slow step or evaluation is not a hang (`onthefly stop` stops it)."""
        wid, limit = w.spec.worker_id, self.cfg.hang_timeout_s
        if w.state is not WorkerState.RUNNING and w.state is not WorkerState.ATTACHED:
            return
        if w.stalled_s <= 0:
            if w.stall_reported:
                self._worker_log(w, "info", f"worker {wid} resumed progress (step {w.step})")
                w.stall_reported = 0.0
            return
        if w.stalled_s < max(limit, 2 * w.stall_reported):
            return
        w.stall_reported = w.stalled_s
        at = f"; its training thread is at {w.stuck_at}" if w.stuck_at else ""
        self._worker_log(
            w,
            "warning",
            f"worker {wid} has made no progress for {w.stalled_s:.0f} s (step {w.step}, "
            f"the process is alive){at}. Not stopped: a slow step is not a hang; "
            "`onthefly stop` stops it",
        )

    def _record_early_stop(self, run_id: str, early: dict[str, Any]) -> None:
        """A fork that stopped early: its record (spec `early_stopped`: step, metric, best
        value and step...) and an `early_stop` event; before its status changes, so whoever
        reacts to the status (a race) sees the record."""
        run = self.store.run(run_id)
        if run is not None:
            spec = {**run.spec, "early_stopped": early}
            self.store.update_run(run_id, spec_json=json.dumps(spec))
        self.bus.publish("early_stop", run_id, **early)

    def _on_output(self, wid: str, line: str) -> None:
        if self.warm.quiet(wid):
            return  # a standby's start-up output stays in its log; a failure is reported as an event
        for hook in self.output_hooks:
            hook(wid, line)

    # -- control -----------------------------------------------------------------------------
    def resolve_run(self, ref: str) -> RunRow:
        if len(ref) > 200 or any(c in ref for c in "/\\\x00"):
            raise ControlError(
                grpc.StatusCode.INVALID_ARGUMENT, f"invalid run reference {ref[:40]!r}"
            )
        run = self.store.find_run(ref or "main")
        if run is None:
            known = ", ".join(r.run_id for r in self.store.runs()) or "none"
            raise ControlError(
                grpc.StatusCode.NOT_FOUND, f"no run {ref!r} in this session (runs: {known})"
            )
        return run

    def _send(self, wid: str, cmd: pb.SupervisorCommand) -> None:
        link = self.links.get(wid)
        if link is None or link.closed.is_set():
            raise ControlError(
                grpc.StatusCode.FAILED_PRECONDITION, f"worker {wid} is not connected"
            )
        link.out.put(cmd)

    def command(
        self, run_ref: str, wait: bool, timeout: float, **body: Any
    ) -> tuple[RunRow, PendingAck]:
        run = self.resolve_run(run_ref)
        w = self.live_worker(run.run_id)
        if w is None:
            raise ControlError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run.run_id} has no live worker (status: {run.status.value})",
            )
        cid = uuid.uuid4().hex
        p = PendingAck(worker_id=w.spec.worker_id)
        with self.lock:
            self.pending[cid] = p
        self._send(w.spec.worker_id, pb.SupervisorCommand(command_id=cid, **body))
        if wait and not p.event.wait(timeout or 30.0):
            with self.lock:
                self.pending.pop(cid, None)
            raise ControlError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"worker {w.spec.worker_id} did not answer within {timeout or 30.0:.0f} s",
            )
        return run, p

    def request_stop(
        self,
        run_ref: str,
        reason: str = "stop requested",
        run_test: bool = False,
        skip_test: bool = False,
    ) -> RunRow:
        run = self.resolve_run(run_ref)
        w = self.live_worker(run.run_id)
        if w is None:
            raise ControlError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run.run_id} has no live worker (status: {run.status.value}); "
                "`onthefly shutdown` ends the supervisor itself",
            )
        w.stop_requested = True
        self.stop_deadline[w.spec.worker_id] = time.monotonic() + self.cfg.stop_grace_s
        self._send(
            w.spec.worker_id,
            pb.SupervisorCommand(
                command_id="", stop=pb.Stop(reason=reason, run_test=run_test, skip_test=skip_test)
            ),
        )
        self._set_worker_state(w.spec.worker_id, WorkerState.STOPPING)
        return run

    def request_shutdown(self, reason: str = "") -> str:
        """End the supervisor (`onthefly shutdown`): the monitor loop exits and `shutdown()`
        stops every live worker at a step boundary with a checkpoint, as on Ctrl-C. The exit
        code says how the main run fared (a run stopped here is not a failure)."""
        if self._shutdown.is_set():
            raise ControlError(
                grpc.StatusCode.FAILED_PRECONDITION, "the supervisor is already stopping"
            )
        with self.lock:
            live = sorted(
                {
                    w.spec.run_id
                    for w in self.workers.values()
                    if not w.state.terminal and w.spec.role in (Role.TRAIN, Role.FORK)
                }
            )
        # A worker still exiting after its run completed has nothing left to stop.
        live = [r for r in live if (run := self.store.run(r)) is None or not run.status.terminal]
        why = reason or "requested by the user"
        self.bus.publish("log", "", level="info", text=f"supervisor shutting down: {why}")
        main = self.store.run("main")
        failed = main is not None and main.status is RunStatus.FAILED
        if self._exit_code is None:
            self._exit_code = 1 if failed else 0
        return ", ".join(live)

    # -- monitor loop ------------------------------------------------------------------------
    def serve(self, should_stop: Callable[[], int | bool] | None = None) -> int:
        """Run until the session's work is done; returns the exit code. `should_stop`
        returns the exit code to stop with (128 + the signal's number) or True (130)."""
        try:
            while not self._shutdown.is_set():
                self.tick()
                if self._exit_code is not None:
                    break
                stop = should_stop() if should_stop is not None else 0
                if stop:
                    self._exit_code = 130 if stop is True else int(stop)
                    break
                time.sleep(0.1)
        finally:
            self.shutdown()
        return self._exit_code or 0

    def tick(self) -> None:
        now = time.time()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            wid = w.spec.worker_id
            if w.state.terminal:
                continue
            if wid in self.external:
                self._poll_external(w)
                continue
            ex = self.launcher.poll(wid)
            if ex is not None:
                self._on_exit(w, ex)
                continue
            if (
                w.state in (WorkerState.ATTACHED, WorkerState.RUNNING, WorkerState.PAUSED)
                and now - w.last_seen > self.cfg.hang_timeout_s
                and wid not in self.hung
            ):
                self.hung.add(wid)
                msg = f"worker {wid} sent nothing for {now - w.last_seen:.0f} s (heartbeat every {self.cfg.heartbeat_interval_ms / 1000:.0f} s): hung; stopping it"
                self.bus.publish("log", w.spec.run_id, worker_id=wid, level="error", text=msg)
                threading.Thread(target=self.launcher.stop, args=(wid, 2.0), daemon=True).start()
            self._report_stall(w)
            dl = self.stop_deadline.get(wid)
            if dl is not None and time.monotonic() > dl:
                del self.stop_deadline[wid]
                self._worker_log(
                    w,
                    "warning",
                    f"worker {wid} did not stop in {self.cfg.stop_grace_s:.0f} s: SIGTERM, then SIGKILL",
                )
                threading.Thread(target=self.launcher.stop, args=(wid, 5.0), daemon=True).start()
        for hook in list(self.tick_hooks):
            try:
                hook()
            except Exception as e:  # a hook must never stop the monitor loop
                self.bus.publish(
                    "log", "", level="error", text=f"internal: {type(e).__name__}: {e}"
                )
        self._flush_live_events()
        if time.monotonic() - self._last_persist > 5.0:
            self._last_persist = time.monotonic()
            self.arrays.persist()
        if time.monotonic() - self._last_prune > 30.0:
            self._last_prune = time.monotonic()
            self._prune()
        self._decide_exit()

    def _poll_external(self, w: Worker) -> None:
        wid = w.spec.worker_id
        alive = _pid_alive(w.pid)
        link = self.links.get(wid)
        done = wid in self.finished
        if done and (link is None or link.closed.is_set()):
            self._set_worker_state(wid, WorkerState.SUCCEEDED)
        elif not alive:
            err = self.errors.get(wid)
            ex = WorkerExit(None, "", err)
            w.exit = ex
            self._set_worker_state(wid, WorkerState.SUCCEEDED if done else WorkerState.FAILED)
            if not done:
                run = self.store.run(w.spec.run_id)
                if run is not None and not run.status.terminal:
                    cause = ex.describe() if err else "the training process exited before finishing"
                    self._set_run_status(w.spec.run_id, RunStatus.FAILED, cause)

    def _reap(self, wid: str) -> None:
        w = self.workers.get(wid)
        if w is None or w.state.terminal:
            return
        ex = self.launcher.poll(wid)
        if ex is not None:
            self._on_exit(w, ex)

    def _on_exit(self, w: Worker, ex: WorkerExit) -> None:
        wid = w.spec.worker_id
        run_id = w.spec.run_id
        if ex.error is None and wid in self.errors:
            ex.error = self.errors[wid]
        if wid in self.hung:  # the hang is the root cause, not how the stop landed
            ex.error = {
                "message": f"worker hung: no heartbeat for {self.cfg.hang_timeout_s:.0f} s; it was killed",
                "filename": "",
                "lineno": 0,
            }
        w.exit = ex
        if run_id in self._sample_steps:
            self.store.update_run(run_id, sample_steps=self._sample_steps[run_id])
        self.gpu.release(wid)
        self.detach(wid)
        self.stop_deadline.pop(wid, None)
        finished = wid in self.finished
        if (
            finished
            and w.spec.role is Role.TRAIN
            and not ex.ok
            and not ex.error
            and not ex.signal_name
            and not w.stop_requested
            and ex.exit_code
        ):
            # sys.exit(N) after fit(): the run completed; `onthefly run` exits N, as
            # `python train.py` would.
            self._script_exit = ex.exit_code
            self.bus.publish(
                "log",
                run_id,
                worker_id=wid,
                level="error",
                text=f"the script exited with code {ex.exit_code} after {run_id} completed",
            )
        if ex.ok or (finished and not ex.error):
            # Asked to stop, it stopped (its run ended "stopped", or it never said it ended);
            # a run that completed before the stop landed succeeded.
            completed = finished and self.finished[wid].status != pb.RUN_STATUS_STOPPED
            state = (
                WorkerState.STOPPED if w.stop_requested and not completed else WorkerState.SUCCEEDED
            )
        elif w.stop_requested and not ex.error:
            state = WorkerState.STOPPED
        else:
            state = WorkerState.FAILED
        self._set_worker_state(wid, state)
        run = self.store.run(run_id)
        if run is None or run.status.terminal:
            if (
                state is WorkerState.FAILED
                and w.spec.role is Role.TRAIN
                and run is not None
                and run.status is RunStatus.COMPLETED
            ):
                self._script_failed = ex.describe()
                self.bus.publish(
                    "log",
                    run_id,
                    worker_id=wid,
                    level="error",
                    text=f"the script failed after {run_id} completed: {self._script_failed}",
                )
            return
        before_fit = w.spec.role is Role.TRAIN and not _fit_reached(w)
        script = os.path.basename(w.spec.script)
        if state is WorkerState.SUCCEEDED:
            if before_fit:  # `--help`: the script ended itself, nothing to train
                self._set_run_status(
                    run_id,
                    RunStatus.STOPPED,
                    f"{script} exited before Trainer.fit() (exit code 0): nothing to train",
                )
            elif not finished:
                self._set_run_status(
                    run_id, RunStatus.FAILED, "the worker exited (code 0) without finishing its run"
                )
            return
        if state is WorkerState.STOPPED:
            self._set_run_status(run_id, RunStatus.STOPPED)
            return
        cause = ex.describe()
        if before_fit and ex.error is None and not ex.signal_name and ex.exit_code:
            cause = f"{script} exited with code {ex.exit_code} before Trainer.fit(): nothing was trained"
        restart = w.spec.role is Role.TRAIN and self.restarts.get(run_id, 0) < self.cfg.max_restarts
        if before_fit and not restart:
            # No "worker failed" line: the run's failure says the same, after the script's
            # own stderr (an argparse usage error, a traceback).
            if ex.exit_code and not ex.signal_name:
                self._before_fit_code = ex.exit_code
            self._set_run_status(run_id, RunStatus.FAILED, cause)
            return
        self.bus.publish(
            "log", run_id, worker_id=wid, level="error", text=f"worker {wid} failed: {cause}"
        )
        if restart:
            ck = self.store.latest_checkpoint(run_id)
            self.restarts[run_id] = self.restarts.get(run_id, 0) + 1
            n = self.restarts[run_id]
            where = (
                f"checkpoint {ck['path']} (step {ck['step']})"
                if ck
                else "the beginning (no checkpoint yet)"
            )
            self.bus.publish(
                "log",
                run_id,
                level="warning",
                text=f"restarting {run_id} from {where} (restart {n}/{self.cfg.max_restarts})",
            )
            self._set_run_status(run_id, RunStatus.PENDING)
            self.spawn(run_id, Role.TRAIN, resume=self.continue_from(run_id, ck))
            return
        self._set_run_status(run_id, RunStatus.FAILED, cause)

    def _resume_unfinished(self) -> None:
        runs = [
            r for r in self.store.runs() if r.status is not RunStatus.COMPLETED and r.kind == "main"
        ]
        races = self.method.races.resume()
        if not runs and not races:
            raise SupervisorError(f"session {self.session_id} has no unfinished run to resume")
        for r in self.store.runs():
            # A single fork, merge or gate the previous supervisor left running (killed, it
            # marked nothing) is not continued: say so, and a plan card waiting on it ends.
            if not r.status.terminal and r.kind != "main" and not _raced(r):
                self._set_run_status(
                    r.run_id,
                    RunStatus.STOPPED,
                    "left unfinished by the previous supervisor; " + _how_to_continue(r),
                )
        for r in runs:
            ck = self._intact_checkpoint(r.run_id)
            # Why it stopped ("was running when exported", "supervisor gone") is in the
            # events; the resumed run's record starts clean.
            self._set_run_status(r.run_id, RunStatus.PENDING, "")
            self.bus.publish(
                "log",
                r.run_id,
                level="info",
                text=f"resuming {r.run_id} from {ck['path'] if ck else 'the beginning'}",
            )
            self.spawn(r.run_id, Role.TRAIN, resume=self.continue_from(r.run_id, ck))

    def continue_from(self, run_id: str, ck: dict[str, Any] | None) -> str:
        """The resume path of a run restarting from checkpoint `ck` (None: from its start).
        What an earlier attempt recorded after that checkpoint (steps, evaluations) is
        trained again, so it is forgotten: kept, the steps would be stored twice (and a
        detector would read the repeat as a drift)."""
        self.store.discard_after(run_id, int(ck["step"]) if ck else 0)
        return str(ck["path"]) if ck else ""

    def _intact_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """The run's newest checkpoint whose file is there and whose sha256 is the one
        recorded when it was written; a damaged or missing newer one is said and passed
        over (the caller forgets what the run recorded after the one chosen: it trains again)."""
        from onthefly_supervisor.archive import sha256_file

        bad: list[str] = []
        for ck in reversed(self.store.checkpoints(run_id)):  # newest first
            path = os.path.join(self.dir, ck["path"])
            if not os.path.isfile(path):
                bad.append(f"{ck['path']} is missing")
                continue
            if ck["sha256"] and sha256_file(path) != ck["sha256"]:
                bad.append(f"{ck['path']} is damaged (its sha256 is not the one recorded)")
                continue
            break
        else:
            ck = None
        if bad:
            self.bus.publish(
                "log",
                run_id,
                level="warning",
                text="; ".join(bad)
                + f": resuming {run_id} from "
                + (f"the previous intact checkpoint, {ck['path']}" if ck else "the beginning"),
            )
        return ck

    def _decide_exit(self) -> None:
        with self.lock:
            active = [
                w
                for w in self.workers.values()
                if not w.state.terminal
                and not (w.spec.role is Role.MERGE and not self._busy())
                and w.spec.role is not Role.STANDBY  # a spare never keeps a session alive
            ]
        if self.cfg.owner_pid:
            if not _pid_alive(self.cfg.owner_pid) and not [
                w for w in active if w.spec.worker_id not in self.external
            ]:
                main = self.store.run("main")
                self._exit_code = (
                    0 if main is not None and main.status is RunStatus.COMPLETED else 1
                )
            elif not _pid_alive(self.cfg.owner_pid) and not self._owner_gone_noted:
                # The owner (`python train.py`) is gone: what the user started beside it
                # (forks, races, gates, merges) has a budget and finishes; the supervisor
                # exits after it, as `onthefly run` would.
                self._owner_gone_noted = True
                left = sorted(
                    {w.spec.run_id for w in active if w.spec.worker_id not in self.external}
                )
                self.bus.publish(
                    "log",
                    "",
                    level="info",
                    text=f"the training script exited; {', '.join(left)} finish(es) in the "
                    "background first (`onthefly status` shows them, `onthefly stop --run RUN` "
                    "ends one now)",
                )
            return
        if active:
            return
        if any([h() for h in self.final_hooks]):  # e.g. automode's baseline and report
            return
        if self.cfg.keep_alive or self.bus.dashboards > 0:
            return
        main = self.store.run("main")
        ok = main is not None and main.status in (RunStatus.COMPLETED, RunStatus.STOPPED)
        self._exit_code = 0 if ok and not self._script_failed else 1
        if ok and not self._script_failed and self._script_exit:
            self._exit_code = self._script_exit
        if main is not None and main.status is RunStatus.FAILED and self._before_fit_code:
            self._exit_code = self._before_fit_code

    def _prune(self) -> None:
        """Keep policy: old cadence checkpoints go; anything a run, fork, plan or pin refers to stays."""
        from onthefly_supervisor.archive import prune_checkpoints

        try:
            removed = prune_checkpoints(self.dir, keep_last=self.cfg.keep_checkpoints)
        except Exception as e:  # pruning is housekeeping: never fatal
            self.bus.publish("log", "", level="warning", text=f"checkpoint pruning skipped: {e}")
            return
        if removed:
            self.bus.publish(
                "log", "", level="debug", text=f"pruned {len(removed)} old checkpoint(s)"
            )

    def _busy(self) -> bool:
        return any(h() for h in self.busy_hooks)

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def root_cause(self) -> str:
        return self._root_cause if self._shutdown.is_set() else self._cause()

    @property
    def failed_after_run(self) -> bool:
        """The main run completed, then the script failed or exited non-zero."""
        return bool(self._script_failed or self._script_exit)

    def _cause(self) -> str:
        main = self.store.run("main")
        if main is not None and main.error:
            return main.error
        if self._script_failed:
            return f"the script failed after its run completed: {self._script_failed}"
        if self._script_exit:
            return f"the script exited with code {self._script_exit} after its run completed"
        return ""

    # -- live event batching -----------------------------------------------------------------
    def _flush_live_events(self, force: bool = False) -> None:
        with self.lock:
            bufs, self._metric_buf = self._metric_buf, {}
            dirty = dict(self._sample_dirty)
            do_samples = force or time.monotonic() - self._last_sample_event > 1.0
            if do_samples:
                self._sample_dirty.clear()
                self._last_sample_event = time.monotonic()
        for run_id, pts in bufs.items():
            cols: dict[str, list[Any]] = {
                k: [p[k] for p in pts]
                for k in (
                    "step",
                    "epoch",
                    "time",
                    "loss",
                    "lr",
                    "grad_norm",
                    "samples_per_s",
                    "step_time_ms",
                    "data_time_ms",
                    "memory_mb",
                )
            }
            extra_keys = sorted({k for p in pts for k in p["extra"]})
            for k in extra_keys:
                cols[k] = [p["extra"].get(k) for p in pts]
            self.bus.publish("metrics", run_id, **cols)
        if do_samples:
            for run_id, epoch in dirty.items():
                arr = self.arrays.get(run_id, epoch)
                if arr is None:
                    continue
                stats = loss_stats(arr)
                self.bus.publish("samples", run_id, epoch=epoch, **stats)

    def pause_all_for_test(self) -> None:  # pragma: no cover - debugging aid
        pass


def loss_stats(arr: np.ndarray) -> dict[str, Any]:
    """Quantiles and mean of the seen (finite) per-sample losses, in float64: a diverging
    run's float32 losses near 3e38 overflow a float32 sum. Every number is finite or None
    (the event store writes strict JSON)."""
    seen = arr[np.isfinite(arr)].astype(np.float64)
    if seen.size == 0:
        return {
            "seen": 0,
            "total": int(arr.size),
            "p50": None,
            "p90": None,
            "p99": None,
            "mean": None,
        }
    p50, p90, p99 = np.quantile(seen, [0.5, 0.9, 0.99])
    return {
        "seen": int(seen.size),
        "total": int(arr.size),
        "p50": _num(p50),
        "p90": _num(p90),
        "p99": _num(p99),
        "mean": _num(seen.mean()),
    }


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _inside(root: str, rel: str) -> bool:
    if not rel or os.path.isabs(rel):
        return False
    full = os.path.realpath(os.path.join(root, rel))
    return full.startswith(os.path.realpath(root) + os.sep)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fit_reached(w: Worker) -> bool:
    """Whether the worker's script reached Trainer.fit() (the worker creates its fit marker
    there); a worker started without one counts as having reached it."""
    marker = w.spec.env.get("ONTHEFLY_FIT_MARKER", "")
    return not marker or os.path.exists(marker)


def _raced(run: RunRow) -> bool:
    """Whether the run is a variant of a race (which `onthefly resume` continues)."""
    return isinstance((run.spec or {}).get("race"), dict)


def _how_to_continue(run: RunRow) -> str:
    """What continues an unfinished run: `onthefly resume` for the training run and a
    race's variants; a single fork, merge or gate is started again."""
    if run.kind == "main" or _raced(run):
        return "`onthefly resume` continues it"
    again = {"fork": "onthefly fork", "merge": "onthefly merge", "moe": "onthefly gate"}
    return (
        f"`onthefly resume` does not continue a single {run.kind} run: "
        f"`{again.get(run.kind, 'onthefly ' + run.kind)}` starts it again"
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; check its state where /proc is available.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def install_signal_handlers(sup: Supervisor) -> Callable[[], int]:
    """SIGINT/SIGTERM end the monitor loop so `finally:` stops workers in order. The
    returned callable gives the exit code to stop with, 128 + the first signal's number
    (SIGINT 130, SIGTERM 143, as a shell reports them), or 0 while none came."""
    got: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if got:  # second Ctrl+C: hurry
            sys.stderr.write("[onthefly] stopping now\n")
        else:
            got.append(int(signum))

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: 128 + got[0] if got else 0
