"""Warm pool policy with a fake launcher: sizing, refill, hand-over to a fork, failure backoff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import warmpool
from onthefly_supervisor.lifecycle import Role, RunStatus, WorkerState
from onthefly_supervisor.pool import WorkerExit, WorkerSpec
from onthefly_supervisor.supervisor import (
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    WorkerLink,
)


class RebindingFake:
    """Processes that never run: exits are set by the test; rebinding moves them."""

    def __init__(self) -> None:
        self.started: list[WorkerSpec] = []
        self.exits: dict[str, WorkerExit] = {}
        self.rebound: list[tuple[str, str]] = []
        self.pids: dict[str, int] = {}

    def start(self, spec: WorkerSpec, attempt: int) -> int:
        self.started.append(spec)
        self.pids[spec.worker_id] = 1000 + len(self.started)
        return self.pids[spec.worker_id]

    def poll(self, worker_id: str) -> WorkerExit | None:
        return self.exits.get(worker_id)

    def stop(self, worker_id: str, grace_s: float) -> None:
        self.exits.setdefault(worker_id, WorkerExit(-15, "SIGTERM", None))

    def signal(self, worker_id: str, sig: int) -> None:
        pass

    def close(self) -> None:
        pass

    def rebind(self, worker_id: str, spec: WorkerSpec) -> None:
        self.rebound.append((worker_id, spec.worker_id))
        self.pids[spec.worker_id] = self.pids.pop(worker_id)
        if worker_id in self.exits:
            self.exits[spec.worker_id] = self.exits.pop(worker_id)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def time(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(warmpool.time, "time", c.time)
    return c


def _sup(tmp_path: Path, warm: int) -> tuple[Supervisor, RebindingFake]:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    launcher = RebindingFake()
    cfg = SupervisorConfig(
        script=str(script), project_dir=str(tmp_path), port=0, warm_forks=warm, stop_grace_s=0.5
    )
    sup = Supervisor(cfg, launcher=launcher)
    sup.start()
    return sup, launcher


def _running(sup: Supervisor, wid: str) -> None:
    sup._set_worker_state(wid, WorkerState.ATTACHED)
    sup._set_worker_state(wid, WorkerState.RUNNING)


def _attach_standby(sup: Supervisor, wid: str) -> WorkerLink:
    link = WorkerLink(wid)
    sup.links[wid] = link
    sup._set_worker_state(wid, WorkerState.ATTACHED)
    return link


def _events(sup: Supervisor, kind: str) -> list[dict[str, Any]]:
    return [
        json.loads(r["payload"]) if isinstance(r["payload"], str) else dict(r["payload"])
        for r in sup.store.events_after(0, limit=100000)
        if r["kind"] == kind
    ]


def _standbys(launcher: RebindingFake) -> list[WorkerSpec]:
    return [s for s in launcher.started if s.role is Role.STANDBY]


def test_sizes_and_bad_values() -> None:
    assert warmpool.resolve_size(warmpool.AUTO, gpus=0, cores=2) == (1, False)
    assert warmpool.resolve_size(warmpool.AUTO, gpus=1, cores=2) == (1, True)
    assert warmpool.resolve_size(warmpool.AUTO, gpus=0, cores=8) == (1, True)
    assert warmpool.resolve_size(3, gpus=0, cores=2) == (3, True)
    assert warmpool.parse_warm_forks("auto") == warmpool.AUTO
    assert warmpool.parse_warm_forks("0") == 0
    for bad in ("-1", "17", "two"):
        with pytest.raises(ValueError, match="--warm-forks"):
            warmpool.parse_warm_forks(bad)
    with pytest.raises(SupervisorError, match="--warm-forks 99"):
        SupervisorConfig(script="x.py", warm_forks=99)


def test_standby_starts_after_main_runs_and_becomes_the_fork(tmp_path: Path, clock: Clock) -> None:
    sup, launcher = _sup(tmp_path, warm=1)
    try:
        sup.tick()
        assert _standbys(launcher) == [], "no standby while the main run is still starting"
        _running(sup, "main-0")
        sup.tick()
        (sb,) = _standbys(launcher)
        assert sb.env["ONTHEFLY_ROLE"] == "fork" and sb.env["ONTHEFLY_STANDBY"] == "1"
        assert "ONTHEFLY_RUN_ID" not in sb.env and sb.threads >= 1
        sup.tick()
        assert len(_standbys(launcher)) == 1, "one standby is the pool's size"
        link = _attach_standby(sup, sb.worker_id)
        st = sup.store.runs()
        assert [r.run_id for r in st] == ["main"], "a standby is not a run"

        spec_file = str(tmp_path / "spec.json")
        fork = sup.spawn("fork-1", Role.FORK, spec_file=spec_file, gpu=True)
        assert fork.spec.worker_id == "fork-1-0" and fork.pid == launcher.pids["fork-1-0"]
        assert launcher.rebound == [(sb.worker_id, "fork-1-0")]
        assert sb.worker_id not in sup.workers, "the standby's record is handed over"
        cmd = link.out.get_nowait()
        assert cmd is not None and cmd.WhichOneof("body") == "assign"
        assert cmd.assign.role == pb.ROLE_FORK
        env = json.loads(cmd.assign.spec_json)["env"]
        assert env["ONTHEFLY_RUN_ID"] == "fork-1" and env["ONTHEFLY_WORKER_ID"] == "fork-1-0"
        assert env["ONTHEFLY_SPEC"] == spec_file and env["ONTHEFLY_ROLE"] == "fork"
        assert "ONTHEFLY_STANDBY" not in env
        assert [s.worker_id for s in launcher.started if s.role is Role.FORK] == []

        # The pool refills once the fork is no longer starting.
        sup.tick()
        assert len(_standbys(launcher)) == 1
        _running(sup, "fork-1-0")
        sup.tick()
        assert len(_standbys(launcher)) == 2
    finally:
        sup.shutdown()


def test_a_fork_waits_for_a_starting_standby_and_fails_with_its_cause(
    tmp_path: Path, clock: Clock
) -> None:
    sup, launcher = _sup(tmp_path, warm=1)
    try:
        _running(sup, "main-0")
        sup.tick()
        (sb,) = _standbys(launcher)
        fork = sup.spawn("fork-1", Role.FORK, spec_file=str(tmp_path / "s.json"), gpu=True)
        assert fork.pid == launcher.pids[sb.worker_id] and launcher.rebound == []
        assert sup.workers[sb.worker_id].state is WorkerState.STARTING
        launcher.exits[sb.worker_id] = WorkerExit(
            1, "", {"message": "MemoryError: simulated", "filename": "train.py", "lineno": 3}
        )
        sup.tick()
        assert fork.state is WorkerState.FAILED
        run = sup.store.run("fork-1")
        # fork-1 was never added as a run in this unit test; the worker record carries the cause.
        assert run is None
        assert fork.exit is not None and "MemoryError: simulated" in fork.exit.describe()
    finally:
        sup.shutdown()


def test_failed_standbys_surface_and_back_off_then_stop(tmp_path: Path, clock: Clock) -> None:
    sup, launcher = _sup(tmp_path, warm=1)
    try:
        _running(sup, "main-0")
        for n in range(warmpool.MAX_FAILURES):
            sup.tick()
            started = _standbys(launcher)
            assert len(started) == n + 1
            launcher.exits[started[-1].worker_id] = WorkerExit(
                1,
                "",
                {
                    "message": "RuntimeError: no data",
                    "traceback": "Traceback ...",
                    "filename": "train.py",
                    "lineno": 7,
                },
            )
            sup.tick()  # the exit is seen, the error surfaces
            assert sup.workers[started[-1].worker_id].state is WorkerState.FAILED
            for _ in range(20):  # no tight loop: nothing new until the backoff is over
                sup.tick()
            assert len(_standbys(launcher)) == n + 1
            clock.t += warmpool.BACKOFF_S * 2**n + 0.1
        for _ in range(20):
            sup.tick()
        assert len(_standbys(launcher)) == warmpool.MAX_FAILURES, "the pool gave up"
        assert sup.warm.disabled
        errors = [e for e in _events(sup, "error") if e.get("worker_id", "").startswith("standby")]
        assert len(errors) == warmpool.MAX_FAILURES
        assert errors[0]["message"] == "RuntimeError: no data" and errors[0]["lineno"] == 7
        logs = [
            e["text"]
            for e in _events(sup, "log")
            if "failed in the script's start-up" in e.get("text", "")
        ]
        assert "RuntimeError: no data (train.py:7)" in logs[0] and "next standby in 5 s" in logs[0]
        assert "warm pool off" in logs[-1]
        # Forks still start, cold.
        fork = sup.spawn("fork-1", Role.FORK, spec_file=str(tmp_path / "s.json"), gpu=True)
        assert launcher.started[-1].worker_id == fork.spec.worker_id == "fork-1-0"
    finally:
        sup.shutdown()


def test_lazy_auto_pool_starts_after_the_first_fork(tmp_path: Path, clock: Clock) -> None:
    sup, launcher = _sup(tmp_path, warm=warmpool.AUTO)
    try:
        if sup.warm.eager:
            pytest.skip("this machine starts the pool eagerly (GPU or >= 4 cores)")
        _running(sup, "main-0")
        for _ in range(5):
            sup.tick()
        assert _standbys(launcher) == []
        fork = sup.spawn("fork-1", Role.FORK, spec_file=str(tmp_path / "s.json"), gpu=True)
        assert launcher.started[-1].worker_id == fork.spec.worker_id  # the first fork is cold
        _running(sup, fork.spec.worker_id)
        sup.tick()
        assert len(_standbys(launcher)) == 1
    finally:
        sup.shutdown()


def test_standbys_do_not_keep_a_finished_session_alive(tmp_path: Path, clock: Clock) -> None:
    sup, launcher = _sup(tmp_path, warm=1)
    try:
        _running(sup, "main-0")
        sup.tick()
        (sb,) = _standbys(launcher)
        _attach_standby(sup, sb.worker_id)
        sup.finished["main-0"] = pb.RunFinished(run_id="main")
        sup._set_run_status("main", RunStatus.COMPLETED)
        launcher.exits["main-0"] = WorkerExit(0, "", None)
        sup.tick()
        assert sup.exit_code == 0
        assert len(_standbys(launcher)) == 1, "no refill once nothing is left to fork from"
    finally:
        sup.shutdown()


def test_on_a_gpu_machine_the_standby_is_pinned_at_start_and_its_gpu_passes_to_the_fork(
    tmp_path: Path, clock: Clock
) -> None:
    from onthefly_supervisor.gpu import Gpu

    sup, launcher = _sup(tmp_path, warm=1)
    try:
        sup.gpu.gpus = [Gpu(0, "fake GPU", 1000.0)]  # per_gpu = 1
        _running(sup, "main-0")
        sup.tick()
        (sb,) = _standbys(launcher)
        assert sb.gpu == "0" and sb.threads == 0, "CUDA_VISIBLE_DEVICES is fixed at start"
        assert sup.gpu.gpus[0].workers == [sb.worker_id]
        _attach_standby(sup, sb.worker_id)
        fork = sup.spawn("fork-1", Role.FORK, spec_file=str(tmp_path / "s.json"), gpu=True)
        assert fork.spec.gpu == "0" and sup.gpu.gpus[0].workers == ["fork-1-0"]
        _running(sup, "fork-1-0")
        for _ in range(5):
            sup.tick()
        assert len(_standbys(launcher)) == 1, "no standby without a free GPU to pin it to"
        launcher.exits["fork-1-0"] = WorkerExit(0, "", None)
        sup.tick()  # the fork ends and frees the GPU ...
        sup.tick()  # ... and the pool refills on it
        assert len(_standbys(launcher)) == 2 and _standbys(launcher)[1].gpu == "0"
    finally:
        sup.shutdown()
