"""Supervisor pieces without a network: lifecycle, store, events, arrays, servicers."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.events import EventBus
from onthefly_supervisor.lifecycle import (
    RUN_TRANSITIONS,
    WORKER_TRANSITIONS,
    InvalidTransition,
    RunStatus,
    WorkerState,
    check_run_transition,
    check_worker_transition,
)
from onthefly_supervisor.pool import WorkerExit
from onthefly_supervisor.server import ControlServicer, TokenInterceptor, minmax_downsample
from onthefly_supervisor.store import RunRow, SampleArrays, Store
from onthefly_supervisor.supervisor import Supervisor, SupervisorConfig, SupervisorError


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)

    def is_active(self) -> bool:
        return True


class FakeLauncher:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: set[str] = set()

    def start(self, spec: Any, attempt: int) -> int:
        self.started.append(spec.worker_id)
        return 4242

    def poll(self, worker_id: str) -> WorkerExit | None:
        return WorkerExit(-15, "SIGTERM", None) if worker_id in self.stopped else None

    def stop(self, worker_id: str, grace_s: float) -> None:
        self.stopped.add(worker_id)

    def signal(self, worker_id: str, sig: int) -> None:
        pass

    def close(self) -> None:
        pass


def test_worker_transitions_are_explicit() -> None:
    check_worker_transition(WorkerState.STARTING, WorkerState.ATTACHED)
    check_worker_transition(WorkerState.RUNNING, WorkerState.PAUSED)
    with pytest.raises(InvalidTransition):
        check_worker_transition(WorkerState.SUCCEEDED, WorkerState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_worker_transition(WorkerState.STARTING, WorkerState.PAUSED)
    # Terminal states have no way out.
    for old, _new in WORKER_TRANSITIONS:
        assert not old.terminal
    for old, new in RUN_TRANSITIONS:
        assert old != new
    check_run_transition(RunStatus.STOPPED, RunStatus.PENDING)  # resume a stopped run
    with pytest.raises(InvalidTransition):
        check_run_transition(RunStatus.COMPLETED, RunStatus.RUNNING)


def test_store_runs_metrics_and_status(tmp_path: Path) -> None:
    st = Store(str(tmp_path))
    st.add_run(RunRow("main", "baseline", "main", RunStatus.PENDING, [], 1.0))
    st.add_run(RunRow("fork-1", "fork-1", "fork", RunStatus.PENDING, ["main"], 2.0))
    assert [r.run_id for r in st.runs()] == ["main", "fork-1"]
    assert st.edges() == [("main", "fork-1", "fork")]
    assert st.find_run("baseline").run_id == "main"  # type: ignore[union-attr]
    assert st.set_run_status("main", RunStatus.RUNNING) is RunStatus.PENDING
    st.set_run_status("fork-1", RunStatus.RUNNING)
    st.set_run_status("fork-1", RunStatus.COMPLETED)
    with pytest.raises(InvalidTransition):
        st.set_run_status("fork-1", RunStatus.RUNNING)
    pts = [
        {
            "step": i,
            "epoch": 0,
            "time": float(i),
            "loss": 1.0 / i,
            "lr": 0.1,
            "grad_norm": None,
            "extra": {"acc": 0.5},
        }
        for i in range(1, 101)
    ]
    st.add_metrics("main", pts)
    steps, vals = st.metric_series("main", "loss", 10, 20)
    assert steps.tolist() == list(range(10, 21))
    np.testing.assert_allclose(vals, 1.0 / np.arange(10, 21))
    steps, vals = st.metric_series("main", "acc")
    assert len(steps) == 100 and vals[0] == 0.5
    with pytest.raises(KeyError):
        st.metric_series("main", "nope")
    st.add_eval("main", "val", 100, 0, 0.25, 0.9, 64, {})
    assert st.run("main").val_loss == 0.25  # type: ignore[union-attr]
    steps, vals = st.metric_series("main", "val_loss")
    assert steps.tolist() == [100] and vals.tolist() == [0.25]
    with pytest.raises(ValueError):
        st.update_run("main", hacked=1)
    assert st.integrity_check() == []
    st.close()


def test_event_bus_replays_from_any_sequence(tmp_path: Path) -> None:
    st = Store(str(tmp_path))
    bus = EventBus(st, keep=5)
    for i in range(20):
        bus.publish("log", "main", text=f"line {i}")
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        for ev in bus.follow(3, alive=lambda: not stop.is_set(), poll_s=0.05):
            seen.append(ev.seq)
            if ev.seq >= 25:
                return

    t = threading.Thread(target=watch)
    t.start()
    for i in range(5):
        bus.publish("log", "main", text=f"live {i}")
    t.join(5)
    stop.set()
    # Every event after 3, none twice, even though the in-memory tail only keeps 5.
    assert seen == list(range(4, 26))
    bus.close()
    st.close()


def test_concurrent_persists_never_collide_and_the_newest_array_lands(tmp_path: Path) -> None:
    """An epoch end and a fork's selection persist at the same time while losses arrive:
    before, both wrote the same temp file (one rename then failed with FileNotFoundError)
    and an older copy could land after a newer one."""
    arr = SampleArrays(str(tmp_path))
    n = 4000
    errors: list[BaseException] = []
    stop = threading.Event()

    def persist_loop() -> None:
        while not stop.is_set():
            try:
                arr.persist()
                arr.persist(("main", 0))
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
                return

    threads = [threading.Thread(target=persist_loop) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(15):
        for i in range(0, n, 8):
            ids = np.arange(i, i + 8, dtype=np.int64)
            margins = np.full(8, float(i), dtype=np.float32)
            arr.ingest("main", 0, n, ids, ids.astype(np.float32), {"margin": margins})
    stop.set()
    for t in threads:
        t.join()
    arr.persist()
    assert not errors, errors
    d = tmp_path / "samples" / "main"
    assert np.array_equal(np.load(d / "epoch-0000.npy"), np.arange(n, dtype=np.float32))
    assert np.load(d / "margin-0000.npy")[-1] == n - 8
    assert sorted(p.name for p in d.iterdir()) == ["epoch-0000.npy", "margin-0000.npy"]


def test_sample_arrays_scatter_and_bounds(tmp_path: Path) -> None:
    arr = SampleArrays(str(tmp_path))
    ids = np.array([3, 1, 4], dtype=np.int64)
    arr.ingest(
        "main",
        0,
        6,
        ids,
        np.array([0.3, 0.1, 0.4], dtype=np.float32),
        {"labels": np.array([1, 0, 1])},
    )
    got = arr.get("main", 0)
    assert got is not None and got.shape == (6,)
    assert np.isnan(got[[0, 2, 5]]).all() and got[3] == np.float32(0.3)
    with pytest.raises(ValueError, match="outside the training dataset"):
        arr.ingest("main", 0, 6, np.array([6]), np.array([1.0], dtype=np.float32))
    with pytest.raises(ValueError, match="negative"):
        arr.ingest("main", 0, 6, np.array([-1]), np.array([1.0], dtype=np.float32))
    with pytest.raises(ValueError, match="differ"):
        arr.ingest("main", 0, 6, np.array([1, 2]), np.array([1.0], dtype=np.float32))
    arr.persist()
    on_disk = np.load(tmp_path / "samples" / "main" / "epoch-0000.npy")
    np.testing.assert_array_equal(on_disk, got)
    assert np.load(tmp_path / "samples" / "main" / "labels.npy").tolist() == [-1, 0, -1, 1, 1, -1]
    assert arr.epochs("main") == [0]


def test_minmax_downsample_keeps_spikes() -> None:
    steps = np.arange(100_000)
    vals = np.zeros(100_000)
    vals[54_321] = 100.0
    vals[77_777] = -50.0
    s, v = minmax_downsample(steps, vals, 500)
    assert len(s) <= 500
    assert 100.0 in v and -50.0 in v
    assert np.all(np.diff(s) > 0)


def _sup(tmp_path: Path) -> Supervisor:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    cfg = SupervisorConfig(script=str(script), project_dir=str(tmp_path), port=0)
    sup = Supervisor(cfg, launcher=FakeLauncher())
    sup.start()
    return sup


def test_servicer_refusals_without_network(tmp_path: Path) -> None:
    sup = _sup(tmp_path)
    try:
        svc = ControlServicer(sup)
        st = svc.GetStatus(pb.StatusRequest(), FakeContext())
        assert st.session_id == sup.session_id and st.runs[0].run_id == "main"
        cases: list[tuple[str, Any, grpc.StatusCode, str]] = [
            (
                "Pause",
                pb.RunRequest(run="main"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no live worker",
            ),
            ("Pause", pb.RunRequest(run="ghost"), grpc.StatusCode.NOT_FOUND, "no run 'ghost'"),
            (
                "Pause",
                pb.RunRequest(run="../../etc"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid run",
            ),
            (
                "GetMetrics",
                pb.MetricsRequest(run="main", key="loss", max_points=-1),
                grpc.StatusCode.INVALID_ARGUMENT,
                ">= 0",
            ),
            (
                "GetLossDistribution",
                pb.DistributionRequest(run="main"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no per-sample losses",
            ),
            (
                "SetHyperParams",
                pb.HyperParamsRequest(run="main", values={"momentum": 0.9}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown hyper-parameter",
            ),
            (
                "SetHyperParams",
                pb.HyperParamsRequest(run="main", values={"lr": float("nan")}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "finite",
            ),
            (
                "Merge",
                pb.MergeRequest(method="average", runs=["main"]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown merge method",
            ),
            (
                "Fork",
                pb.ForkRequest(run="main", select="all"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no per-sample losses",
            ),
            (
                "WatchEvents",
                pb.WatchRequest(from_seq=-1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "from_seq",
            ),
        ]
        for method, req, code, text in cases:
            ctx = FakeContext()
            with pytest.raises(Aborted):
                res = getattr(svc, method)(req, ctx)
                if method == "WatchEvents":
                    next(iter(res))
            assert ctx.code == code, (method, ctx.code, ctx.details)
            assert text in ctx.details, (method, ctx.details)
        runs = svc.ListRuns(pb.ListRunsRequest(), FakeContext())
        assert [r.run_id for r in runs.runs] == ["main"]
    finally:
        sup.shutdown()


def test_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    sup = _sup(tmp_path)
    try:
        script = tmp_path / "train.py"
        other = Supervisor(
            SupervisorConfig(script=str(script), project_dir=str(tmp_path / "b"), port=sup.port),
            launcher=FakeLauncher(),
        )
        with pytest.raises(SupervisorError, match=f"port {sup.port} on 127.0.0.1 is in use"):
            other.start()
        other.shutdown()
    finally:
        sup.shutdown()


def test_token_interceptor_denies_wrong_tokens() -> None:
    class Details:
        def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
            self.invocation_metadata = md

    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: "ok")
    icpt = TokenInterceptor("secret")
    assert (
        icpt.intercept_service(lambda d: handler, Details((("x-onthefly-token", "secret"),)))
        is handler
    )
    for md in ((), (("x-onthefly-token", "Secret"),), (("authorization", "secret"),)):
        denied = icpt.intercept_service(lambda d: handler, Details(md))
        assert denied is not handler
        ctx = FakeContext()
        with pytest.raises(Aborted):
            denied.unary_unary(None, ctx)
        assert ctx.code == grpc.StatusCode.UNAUTHENTICATED


def test_config_validation_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="--port 70000"):
        SupervisorConfig(script="x.py", port=70000)
    with pytest.raises(SupervisorError, match="--max-restarts -1"):
        SupervisorConfig(script="x.py", max_restarts=-1)


def test_a_script_named_like_a_package_imports_the_package(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "json.py").write_text("import json\nprint(json.dumps({'ok': True}))\n")
    r = subprocess.run(
        [sys.executable, str(tmp_path / "json.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"ok": true}'
    # Other scripts importing a sibling module of their folder are untouched.
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    (tmp_path / "main.py").write_text("import helper\nprint(helper.VALUE)\n")
    r = subprocess.run(
        [sys.executable, str(tmp_path / "main.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "7", r.stderr


def test_a_worker_that_ends_fails_its_unanswered_commands_at_once(tmp_path: Path) -> None:
    from onthefly_supervisor.supervisor import PendingAck

    sup = _sup(tmp_path)
    try:
        mine, other = PendingAck(worker_id="w-1"), PendingAck(worker_id="w-2")
        sup.pending.update({"a": mine, "b": other})
        sup.detach("w-1")
        assert mine.event.is_set() and not mine.ok and "ended before answering" in mine.message
        assert not other.event.is_set() and sup.pending == {"b": other}
    finally:
        sup.shutdown()


def test_run_ids_handed_out_at_once_never_collide(tmp_path: Path) -> None:
    """Automode starts a fork and an explore race in the same round on two threads: both
    Fork requests took fork-1 before either run was stored, and one failed with 'UNIQUE
    constraint failed: runs.run_id'."""
    import threading

    sup = _sup(tmp_path)
    try:
        ids: list[str] = []
        gate = threading.Barrier(8)

        def take() -> None:
            gate.wait()
            ids.append(sup.method._next_id("fork"))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(ids, key=lambda x: int(x.split("-")[1])) == [f"fork-{n}" for n in range(1, 9)]
        # A look ahead that creates nothing (a race's seed) reserves nothing.
        assert sup.method._next_id("fork", reserve=False) == "fork-9"
        assert sup.method._next_id("fork") == "fork-9"
    finally:
        sup.shutdown()


def test_a_checkpoint_is_recorded_only_after_the_losses_before_it_are_on_disk(
    tmp_path: Path,
) -> None:
    """A resume trains only what follows its checkpoint: the per-sample losses recorded
    before it must be on disk when the checkpoint is (a supervisor killed before its next
    periodic write lost them for good)."""
    sup = _sup(tmp_path)
    try:
        wid = next(iter(sup.workers))
        sup.dataset_sizes["main"] = 8
        ids = np.array([5, 1, 7, 2], dtype="<i8")
        losses = np.array([0.5, 1.5, 2.5, 3.5], dtype="<f4")
        sup.on_worker_message(
            wid,
            pb.WorkerMessage(
                samples=pb.SampleLosses(
                    run_id="main", epoch=3, count=4, ids=ids.tobytes(), losses=losses.tobytes()
                )
            ),
        )
        rel = "checkpoints/main/step-00000004.pt"
        os.makedirs(os.path.join(sup.dir, "checkpoints", "main"), exist_ok=True)
        Path(sup.dir, rel).write_bytes(b"x")
        sup.on_worker_message(
            wid,
            pb.WorkerMessage(
                checkpoint=pb.CheckpointSaved(
                    run_id="main", path=rel, sha256="x", step=4, epoch=3, batch=1, reason="cadence"
                )
            ),
        )
        assert sup.store.latest_checkpoint("main") is not None
        on_disk = np.load(sup.arrays.path("main", 3))
        np.testing.assert_array_equal(on_disk[ids], losses)
        assert np.isnan(on_disk[[0, 3, 4, 6]]).all()
    finally:
        sup.shutdown()
