"""Warm pool: standby copies of the user's script, started ahead of time, that become forks.

Starting a fork cold costs the script's whole start-up (a Python process importing torch,
then the script's own data and model set-up) before its first step. A standby pays that
ahead of time: the pool starts the script with a fork's environment plus
ONTHEFLY_STANDBY=1; at fit() it attaches as a standby (role `standby`, no run) and blocks
without using CPU. `take()` (called by `Supervisor.spawn` for every fork) hands the next
fork to a standby instead of a new process: the fork's worker record takes the standby's
process (the launcher rebinds it to the fork's id, log and error file), the standby gets
`AssignRole(ROLE_FORK, {"env": <the fork's environment>})`, and attaches again as that
fork, so command -> first fork step is a checkpoint load plus one step.

Decisions:
* GPU pinning happens when the standby starts (through the same allocator and slot a cold
  fork would take), not at assignment: CUDA reads CUDA_VISIBLE_DEVICES once, and user
  scripts commonly touch CUDA before fit() (`torch.cuda.is_available()`, `.to("cuda")`),
  so a late pin would be silently ignored. A standby therefore holds its GPU slot; the
  fork it becomes keeps it. On a GPU machine the pool waits for a free slot rather than
  start a standby that would run on the wrong device. Thread bounds, likewise, are set at
  start (OMP_NUM_THREADS is read once).
* The script sees ONTHEFLY_ROLE=fork from its first line, so scripts that branch on the
  role before fit() behave as they do in a cold fork.
* Size (`onthefly run --warm-forks N|auto`): `auto` is one standby. It starts as soon as
  the main run is up on a machine with a GPU or at least 4 cores; on a CPU-only machine
  with fewer than 4 cores -- automode included -- it starts only after the session's
  first fork (which is cold): there the main run already uses the cores, and a standby's
  start-up (an import of torch plus the script's data set-up, ~2.5 s of CPU) would slow
  the main run's early steps for a fork that may never come, while a session that forks
  once tends to fork again (automode's planner, a user exploring slices), so from the
  second fork on they are warm. (Starting it eagerly in automode was tried: on 2 cores the
  slowed early steps changed timing-calibrated measurements such as the grad-norm cadence
  and with them what the planner saw.) An idle standby costs ~0 CPU (a blocked thread,
  one heartbeat a second) but holds the script's memory (torch plus its data set), so the
  default stays at one; `--warm-forks N` starts N as soon as the main run is up.
* A refill waits while a run or fork is starting (its start-up and first step are the
  latency that matters), and stops when no main run is left to fork from (unless the
  session is kept alive).
* A standby that fails during the script's start-up surfaces as an error event naming the
  cause and its log; the pool retries after 5 s, 10 s, then gives up for the session after
  three consecutive failures (forks then start cold and show the same error themselves).
* Standbys are not runs: they never appear in `onthefly runs`, do not keep a finished
  session alive, and are stopped with it (parent-death signal as for every worker).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.lifecycle import Role, WorkerState
from onthefly_supervisor.pool import Worker, WorkerExit

if TYPE_CHECKING:
    from onthefly_supervisor.supervisor import Supervisor

MAX_WARM_FORKS = 16
AUTO = -1
MAX_FAILURES = 3
BACKOFF_S = 5.0


@dataclass
class _Claim:
    """A fork that took a standby which had not finished its start-up yet."""

    fork: Worker
    claimed: float = field(default_factory=time.time)


def resolve_size(requested: int, gpus: int, cores: int) -> tuple[int, bool]:
    """(standbys, start eagerly?) for `--warm-forks requested` (AUTO = -1)."""
    if requested != AUTO:
        if not 0 <= requested <= MAX_WARM_FORKS:
            raise ValueError(f"--warm-forks {requested}: must be 'auto' or 0..{MAX_WARM_FORKS}")
        return requested, True
    return 1, bool(gpus or cores >= 4)


def parse_warm_forks(text: str) -> int:
    """The CLI value: 'auto' or a count."""
    if text.strip().lower() == "auto":
        return AUTO
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_WARM_FORKS:
        raise ValueError(
            f"--warm-forks {text!r}: must be 'auto' or a number of standbys 0..{MAX_WARM_FORKS}"
        )
    return n


class WarmPool:
    def __init__(self, sup: Supervisor, requested: int) -> None:
        self.sup = sup
        self.size, self.eager = resolve_size(requested, len(sup.gpu.gpus), os.cpu_count() or 1)
        if not hasattr(sup.launcher, "rebind"):
            self.size = 0  # a launcher that cannot hand a process to a new worker id
        self.forked = False
        self.claims: dict[str, _Claim] = {}
        self.standby_ids: set[str] = set()
        self._done: set[str] = set()
        self._ready_seen: set[str] = set()
        self._seq = 0
        self.failures = 0
        self.next_try = 0.0
        self.disabled = ""
        sup.tick_hooks.append(self.tick)

    # -- what the supervisor asks ------------------------------------------------------------
    def quiet(self, worker_id: str) -> bool:
        """A standby's own output stays in its log (it is the script's start-up, again)."""
        return worker_id in self.standby_ids

    def take(self, run_id: str, spec_file: str, resume: str = "") -> Worker | None:
        """The fork's worker, running in a standby's process; None when no standby is there.

        `resume` (a checkpoint) continues an existing fork run, e.g. a race variant promoted
        to its next rung; the standby takes it from the environment like any other field."""
        sup = self.sup
        self.forked = True
        if self.size == 0 or sup._shutdown.is_set():
            return None
        with sup.lock:
            free = [
                w
                for w in self._standbys()
                if not w.state.terminal
                and not w.stop_requested
                and w.spec.worker_id not in self.claims
                and w.spec.worker_id not in sup.hung
            ]
            ready = [w for w in free if w.state is WorkerState.ATTACHED and self._linked(w)]
            starting = [w for w in free if w.state is WorkerState.STARTING]
            # A standby still starting is never slower than a new process: it started earlier.
            pick = ready[0] if ready else min(starting, key=lambda w: w.started, default=None)
            if pick is None:
                return None
            wid = sup._new_worker_id(run_id)
            attempt = sup.restarts.get(run_id, 0)
            spec = sup.worker_spec(
                wid, run_id, Role.FORK, attempt, resume=resume, spec_file=spec_file
            )
            spec = replace(spec, gpu=pick.spec.gpu, threads=pick.spec.threads)
            sup.gpu.rename(pick.spec.worker_id, wid)
            fork = Worker(spec, attempt=attempt, pid=pick.pid)
            sup.workers[wid] = fork
            self.claims[pick.spec.worker_id] = _Claim(fork)
            sup._publish_worker(fork)
            if pick.state is WorkerState.ATTACHED:
                self._hand_over(pick)
        return fork

    # -- monitor -----------------------------------------------------------------------------
    def tick(self) -> None:
        sup = self.sup
        if sup._shutdown.is_set() or self.size == 0:
            return
        with sup.lock:
            standbys = self._standbys()
        for w in standbys:
            wid = w.spec.worker_id
            if w.state.terminal:
                if wid not in self._done:
                    self._done.add(wid)
                    self._ended(w)
                continue
            if w.state is WorkerState.ATTACHED:
                if wid not in self._ready_seen:
                    self._ready_seen.add(wid)
                    self.failures = 0
                    sup.bus.publish(
                        "log",
                        "",
                        worker_id=wid,
                        level="info",
                        text=f"standby {wid} (pid {w.pid}) is ready for the next fork, "
                        f"{time.time() - w.started:.1f} s after it started",
                    )
                if wid in self.claims:
                    with sup.lock:
                        self._hand_over(w)
        self._refill()

    def _standbys(self) -> list[Worker]:
        return [w for w in self.sup.workers.values() if w.spec.role is Role.STANDBY]

    def _linked(self, w: Worker) -> bool:
        link = self.sup.links.get(w.spec.worker_id)
        return link is not None and not link.closed.is_set()

    def _hand_over(self, standby: Worker) -> None:
        """The standby's process becomes the fork (caller holds sup.lock)."""
        sup = self.sup
        sid = standby.spec.worker_id
        claim = self.claims.pop(sid, None)
        if claim is None:  # already handed over (take() and tick() can race to it)
            return
        fork = claim.fork
        launcher = sup.launcher
        launcher.rebind(sid, fork.spec)  # type: ignore[attr-defined]
        self.standby_ids.discard(sid)
        self._done.add(sid)
        standby.transition(WorkerState.SUCCEEDED)
        sup._publish_worker(standby)
        sup.workers.pop(sid, None)
        cmd = pb.SupervisorCommand(
            assign=pb.AssignRole(role=pb.ROLE_FORK, spec_json=json.dumps({"env": fork.spec.env}))
        )
        try:
            sup._send(sid, cmd)
        except Exception:
            pass  # its stream is gone, so is the process: the exit shows under the fork's id
        waited = time.time() - claim.claimed
        sup.bus.publish(
            "log",
            fork.spec.run_id,
            worker_id=fork.spec.worker_id,
            level="info",
            text=f"{fork.spec.worker_id} runs in warm standby {sid} (pid {standby.pid})"
            + (f" after waiting {waited:.1f} s for its start-up" if waited > 0.05 else ""),
        )

    def _ended(self, w: Worker) -> None:
        sup = self.sup
        wid = w.spec.worker_id
        self.standby_ids.discard(wid)
        ex = w.exit or WorkerExit(None, "", None)
        claim = self.claims.pop(wid, None)
        if claim is not None:
            # It died before it could become the fork: the fork fails with its cause.
            sup._on_exit(claim.fork, ex)
        if w.stop_requested or sup._shutdown.is_set():
            return
        self.failures += 1
        log = os.path.relpath(w.spec.log_path, sup.dir) if w.spec.log_path else "its log"
        cause = ex.describe() if not ex.ok else "the script exited (code 0) before reaching fit()"
        if self.failures >= MAX_FAILURES:
            self.disabled = cause
            what = f"warm pool off for this session: {self.failures} standbys in a row failed; forks start cold"
        else:
            delay = BACKOFF_S * 2 ** (self.failures - 1)
            self.next_try = time.time() + delay
            what = f"next standby in {delay:.0f} s"
        err = dict(ex.error) if ex.error else {}
        sup.bus.publish(
            "error",
            "",
            worker_id=wid,
            message=str(err.get("message") or cause),
            traceback=str(err.get("traceback", "")),
            filename=str(err.get("filename", "")),
            lineno=int(err.get("lineno", 0) or 0),  # type: ignore[call-overload]
            time=float(err.get("time", time.time()) or time.time()),  # type: ignore[arg-type]
        )
        sup.bus.publish(
            "log",
            "",
            worker_id=wid,
            level="error",
            text=f"standby {wid} failed in the script's start-up: {cause} (output in {log}); {what}",
        )

    def _refill(self) -> None:
        sup = self.sup
        if self.disabled or time.time() < self.next_try:
            return
        if not (self.eager or self.forked):
            return
        with sup.lock:
            workers = list(sup.workers.values())
        live = [
            w
            for w in workers
            if w.spec.role is Role.STANDBY
            and not w.state.terminal
            and w.spec.worker_id not in self.claims
        ]
        if len(live) >= self.size:
            return
        if any(
            w.spec.role in (Role.TRAIN, Role.FORK)
            and w.state in (WorkerState.STARTING, WorkerState.ATTACHED)
            for w in workers
        ):
            return  # a run is starting: its start-up and first step come first
        main_live = any(w.spec.role is Role.TRAIN and not w.state.terminal for w in workers)
        if not (main_live or sup.cfg.keep_alive or sup.cfg.serve_only or sup.bus.dashboards):
            return  # nothing left to fork from: the session is winding down
        if sup.gpu.gpus and not sup.gpu.has_free():
            return  # a standby pins its GPU at start; wait for a free one
        self._start_one()

    def _start_one(self) -> None:
        sup = self.sup
        wid = f"standby-{self._seq}"
        self._seq += 1
        try:
            with sup.lock:
                gpu_id = sup.gpu.acquire(wid) if sup.gpu.gpus else ""
                spec = sup.worker_spec(wid, "", Role.STANDBY, gpu_id=gpu_id)
                env = {k: v for k, v in spec.env.items() if k not in ("ONTHEFLY_RUN_ID",)}
                env["ONTHEFLY_ROLE"] = Role.FORK.value  # the script starts as a cold fork would
                env["ONTHEFLY_STANDBY"] = "1"
                spec = replace(spec, env=env)
                self.standby_ids.add(wid)
                sup.launch(spec)
        except Exception as e:  # e.g. the script vanished: back off like a failed start-up
            self.standby_ids.discard(wid)
            sup.gpu.release(wid)
            self.failures += 1
            self.next_try = time.time() + BACKOFF_S * 2 ** (self.failures - 1)
            if self.failures >= MAX_FAILURES:
                self.disabled = str(e)
            sup.bus.publish("log", "", level="error", text=f"could not start standby {wid}: {e}")
