"""Faults, bad input and load: it keeps working and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg
from tests.conftest import SCRIPTS, cli, cli_json, pid_alive, start

SMALL = SCRIPTS / "train_small.py"


def test_hung_worker_is_detected_and_reported(tmp_path: Path) -> None:
    live = start(
        tmp_path, SMALL, "--epochs", "50", "--step-sleep", "0.02", extra=("--hang-timeout", "3")
    )
    st_ = live.wait_for(lambda s: live.main_run(s)["step"] >= 5)
    pid = live.worker_pids(st_)[0]
    t0 = time.time()
    os.kill(pid, signal.SIGSTOP)
    code, out = live.finish(60)
    took = time.time() - t0
    assert code != 0
    assert "hung" in out and "no heartbeat" in out, out
    assert took < 3 + 10, f"detected after {took:.1f} s (timeout 3 s + 1 s heartbeat + reaping)"
    assert not pid_alive(pid)
    main = cli_json("runs", cwd=tmp_path)["runs"][0]
    assert main["status"] == "failed" and "hung" in main["error"]


STUCK = """
import sys, time, torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from onthefly import Trainer

class Blocking(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 40 and not getattr(self, "waited", False):
            self.waited = True
            time.sleep(float(sys.argv[1]))  # a loader that blocks, mid-epoch
        time.sleep(0.001)  # (the run then lasts a few heartbeats)
        return torch.full((4,), float(i % 5)), i % 2

model = nn.Linear(4, 2)
loader = DataLoader(Blocking(), batch_size=8)
Trainer(project="p", max_epochs=40).fit(
    model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), loader
)
"""


def test_a_loop_stuck_in_user_code_is_reported_where_it_is_and_not_stopped(
    tmp_path: Path,
) -> None:
    # Heartbeats come from a thread of their own, so the process is alive and not "hung";
    # the training thread makes no progress: the session says where it is, keeps it, and
    # says when it moves again.
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    live = start(tmp_path, script, "5", extra=("--hang-timeout", "2"))
    st_ = live.wait_for(
        lambda s: any(w["stuck_at"] for w in s["workers"] if w["role"] == "train"), timeout=60
    )
    w = next(w for w in st_["workers"] if w["role"] == "train")
    assert w["stuck_at"].startswith("stuck.py:14 in __getitem__"), w
    assert w["stalled_s"] >= 1 and w["step"] == 5, w
    text = cli("status", cwd=tmp_path).stdout
    assert "no progress for" in text and "stuck.py:14 in __getitem__" in text, text
    code, out = live.finish(120)
    assert code == 0, out
    assert (
        "has made no progress for 2 s (step 5, the process is alive); its training thread is "
        "at stuck.py:14 in __getitem__" in out
    ), out
    assert "resumed progress" in out and "hung" not in out, out
    main = cli_json("runs", cwd=tmp_path)["runs"][0]
    assert main["status"] == "completed" and main["step"] == 320, main


def test_unwritable_checkpoint_is_a_clear_error_and_the_previous_one_survives(
    tmp_path: Path,
) -> None:
    live = start(
        tmp_path, SMALL, "--epochs", "2", "--step-sleep", "0.05", "--checkpoint-every", "5"
    )
    # Occupy the exact path of the step-10 checkpoint: its atomic rename must fail.
    blocker = live.session_dir / "checkpoints" / "main" / "step-00000010.pt"
    blocker.mkdir(parents=True)
    code, out = live.finish(120)
    assert code == 0, out
    assert "checkpoint checkpoints/main/step-00000010.pt failed" in out
    assert "previous checkpoint (checkpoints/main/step-00000005.pt) is intact" in out
    good = live.session_dir / "checkpoints" / "main" / "step-00000005.pt"
    assert torch.load(good, weights_only=True)["counters"]["step"] == 5
    assert blocker.is_dir() and not any(blocker.iterdir())
    assert not list((live.session_dir / "checkpoints" / "main").glob("*.tmp-*")), (
        "no temp files left"
    )


def test_oom_in_a_fork_leaves_the_parent_unharmed(tmp_path: Path) -> None:
    live = start(tmp_path, SMALL, "--epochs", "8", "--step-sleep", "0.02", "--fork-oom")
    try:
        live.wait_for(lambda s: live.main_run(s)["step"] >= 20)
        r = cli(
            "fork",
            "--select",
            "quantile:0.5:1.0",
            "--budget-steps",
            "10",
            "--wait",
            cwd=tmp_path,
            timeout=120,
        )
        assert r.returncode != 0
        assert "MemoryError" in r.stdout + r.stderr
        code, out = live.finish(120)
        assert code == 0, out
        runs = {r["run_id"]: r for r in cli_json("runs", cwd=tmp_path)["runs"]}
        assert runs["main"]["status"] == "completed"
        assert runs["fork-1"]["status"] == "failed" and "MemoryError" in runs["fork-1"]["error"]
    finally:
        if live.proc.poll() is None:
            live.proc.kill()


def test_worker_sigkill_keeps_every_loss_sent_before_it(tmp_path: Path) -> None:
    live = start(tmp_path, SMALL, "--epochs", "20", "--step-sleep", "0.01", "--n", "256")
    st_ = live.wait_for(lambda s: live.main_run(s)["epoch"] >= 3)
    os.kill(live.worker_pids(st_)[0], signal.SIGKILL)
    code, out = live.finish(60)
    assert code != 0 and "killed by SIGKILL" in out
    for e in range(3):  # epochs completed before the kill: complete on disk
        arr = np.load(live.session_dir / "samples" / "main" / f"epoch-{e:04d}.npy")
        assert np.isfinite(arr).all()
    assert cli("sessions", "check", cwd=tmp_path).returncode == 0


def test_watchers_reconnect_without_losing_events_under_load(tmp_path: Path) -> None:
    live = start(tmp_path, SMALL, "--epochs", "6", "--step-sleep", "0.005", "--n", "1024")
    token = (("x-onthefly-token", live.conn["token"]),)
    results: dict[int, list[int]] = {}

    def watcher(i: int) -> None:
        ch = grpc.insecure_channel(live.conn["addr"])
        stub = pbg.ControlServiceStub(ch)
        seqs: list[int] = []
        last = 0
        # Watchers 0-3 drop their stream every ~40 events and reconnect from their last seq.
        while True:
            stream = stub.WatchEvents(pb.WatchRequest(from_seq=last, client="cli"), metadata=token)
            n = 0
            try:
                for ev in stream:
                    seqs.append(ev.seq)
                    last = ev.seq
                    n += 1
                    if (
                        ev.kind == "session"
                        and json.loads(ev.payload_json).get("state") == "finished"
                    ):
                        results[i] = seqs
                        ch.close()
                        return
                    if i < 4 and n >= 40:
                        stream.cancel()
                        break
            except grpc.RpcError:
                pass
            if live.proc.poll() is not None and stream is not None and n == 0:
                results[i] = seqs
                return

    threads = [threading.Thread(target=watcher, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for _ in range(10):  # CLI calls meanwhile
        assert cli("status", "--json", cwd=tmp_path).returncode == 0
    code, out = live.finish(180)
    for t in threads:
        t.join(30)
    assert code == 0, out
    assert len(results) == 8
    full = results[7]
    assert full == list(range(1, len(full) + 1)), "dense, ordered sequence numbers"
    for i in range(8):
        assert results[i] == full, f"watcher {i} saw a different event stream"


FUZZ_METHODS = [
    ("Pause", pb.RunRequest),
    ("Fork", pb.ForkRequest),
    ("Merge", pb.MergeRequest),
    ("GetMetrics", pb.MetricsRequest),
    ("GetLossDistribution", pb.DistributionRequest),
    ("ExportSlice", pb.ExportSliceRequest),
    ("ExportModel", pb.ExportModelRequest),
    ("EditPlan", pb.EditPlanRequest),
    ("SetHyperParams", pb.HyperParamsRequest),
    ("TrainGate", pb.GateRequest),
    ("RunHealthCheck", pb.HealthRequest),
]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    project = tmp_path_factory.mktemp("fuzz")
    live = start(project, SMALL, "--epochs", "2", "--n", "256", extra=("--keep-alive",))
    live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=120)
    ch = grpc.insecure_channel(live.conn["addr"])
    yield live, ch
    ch.close()
    live.proc.send_signal(signal.SIGINT)
    live.finish(60)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(FUZZ_METHODS),
    payload=st.binary(max_size=200),
    text=st.text(max_size=60),
    number=st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True)),
)
def test_fuzzed_requests_never_crash_the_supervisor(
    fuzz_target, method, payload: bytes, text: str, number: object
) -> None:  # type: ignore[no-untyped-def]
    live, ch = fuzz_target
    name, req_type = method
    token = (("x-onthefly-token", live.conn["token"]),)
    call = ch.unary_unary(
        f"/onthefly.v1.ControlService/{name}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # Raw bytes (often not a valid message at all), then a valid message with odd field values.
    try:
        call(payload, metadata=token, timeout=30)
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.UNAVAILABLE
    msg = req_type()
    for f in msg.DESCRIPTOR.fields:
        try:
            if f.type == f.TYPE_STRING and not f.is_repeated:
                setattr(msg, f.name, text)
            elif (
                f.type in (f.TYPE_INT32, f.TYPE_INT64)
                and not f.is_repeated
                and isinstance(number, int)
            ):
                setattr(
                    msg,
                    f.name,
                    max(-(2**31), min(2**31 - 1, number)) if f.type == f.TYPE_INT32 else number,
                )
            elif f.type == f.TYPE_DOUBLE and not f.is_repeated and isinstance(number, float):
                setattr(msg, f.name, number)
            elif f.is_repeated and f.type == f.TYPE_STRING:
                getattr(msg, f.name).extend([text, "main"])
        except (TypeError, ValueError):
            pass
    if name == "ExportSlice" or name == "ExportModel":
        msg.path = str(live.cwd / "fuzz-out" / (text.replace("/", "_")[:20] or "x"))  # type: ignore[attr-defined]
    try:
        getattr(pbg.ControlServiceStub(ch), name)(msg, metadata=token, timeout=60)
    except grpc.RpcError as e:
        assert e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN), (
            name,
            e.code(),
            e.details(),
        )
    assert live.proc.poll() is None
    assert (
        pbg.ControlServiceStub(ch)
        .GetStatus(pb.StatusRequest(), metadata=token, timeout=10)
        .session_id
    )


def test_paths_from_requests_cannot_escape(fuzz_target) -> None:  # type: ignore[no-untyped-def]
    live, ch = fuzz_target
    stub = pbg.ControlServiceStub(ch)
    token = (("x-onthefly-token", live.conn["token"]),)
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../b"):
        with pytest.raises(grpc.RpcError) as ei:
            stub.Fork(
                pb.ForkRequest(run="main", select="all", checkpoint=bad), metadata=token, timeout=30
            )
        assert ei.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ExportSession(
            pb.ExportSessionRequest(path="relative/out.tar"), metadata=token, timeout=30
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as ei:
        stub.ListRuns(pb.ListRunsRequest(session="../other"), metadata=token, timeout=30)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
