"""Method requests refused up front (one clear line, no run created) or accepted with what
they will do said: tiny fork selections, merges of an MoE, failed parents of a gate or a
merge. A real Supervisor with a fake launcher: no worker ever runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.server import ControlServicer
from onthefly_supervisor.store import RunRow
from onthefly_supervisor.supervisor import Supervisor
from tests.unit.test_supervisor_units import Aborted, FakeContext, _sup

N = 1000


@pytest.fixture
def sup(tmp_path: Path) -> Any:
    s = _sup(tmp_path)
    st = s.store
    st.update_run("main", dataset_size=N, step=48, sample_steps=48 * 63)
    st.set_run_status("main", RunStatus.COMPLETED)
    ids = np.arange(N, dtype=np.int64)
    s.arrays.ingest("main", 0, N, ids, np.linspace(0, 1, N, dtype=np.float32))
    s.arrays.persist()
    s.shape["main"] = (16, 3)  # 1000 samples in 16 batches: a batch size of ~63

    def run(rid: str, kind: str, status: RunStatus, parents: list[str], step: int | None) -> None:
        if rid != "main":
            st.add_run(RunRow(rid, rid, kind, status, parents, time.time(), dataset_size=N))
        if step is not None:
            st.add_checkpoint(rid, f"checkpoints/{rid}/step-{step:08d}.pt", "", step, 0, 0, "x", 1)

    run("main", "main", RunStatus.COMPLETED, [], 48)
    run("fork-1", "fork", RunStatus.COMPLETED, ["main"], 30)
    run("moe-1", "moe", RunStatus.COMPLETED, ["main", "fork-1"], 0)
    run("fork-2", "fork", RunStatus.RUNNING, ["main"], 12)
    st.set_run_status("fork-2", RunStatus.FAILED, "the worker was killed by SIGKILL\nmore")
    run("fork-3", "fork", RunStatus.RUNNING, ["main"], None)
    st.set_run_status("fork-3", RunStatus.FAILED, "RuntimeError: boom")
    yield s
    s.shutdown()


def _refused(svc: ControlServicer, method: str, req: Any) -> tuple[grpc.StatusCode, str]:
    ctx = FakeContext()
    with pytest.raises(Aborted):
        getattr(svc, method)(req, ctx)
    assert ctx.code is not None and "\n" not in ctx.details, ctx.details
    return ctx.code, ctx.details


def _run_ids(sup: Supervisor) -> set[str]:
    return {r.run_id for r in sup.store.runs()}


def test_a_fork_too_small_to_train_on_is_refused_before_any_run(sup: Supervisor) -> None:
    svc = ControlServicer(sup)
    before = _run_ids(sup)
    one = Path(sup.dir).parent / "one.txt"
    one.write_text("7\n")
    for spec in ("quantile:0.999:1.0", f"indices:{one}"):
        for variants in (0, 2):
            code, msg = _refused(svc, "Fork", pb.ForkRequest(select=spec, variants=variants))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "has 1 sample; a fork needs at least 2" in msg, msg
    assert _run_ids(sup) == before and not (Path(sup.dir) / "forks").exists()


def test_a_fork_under_one_batch_says_how_many_samples_it_has(sup: Supervisor) -> None:
    reply = ControlServicer(sup).Fork(
        pb.ForkRequest(select="quantile:0.995:1.0", budget_steps=5), FakeContext()
    )
    assert reply.ok and reply.run_id == "fork-4"
    assert "5 samples, fewer than one batch of the parent's loader (~63)" in reply.message
    run = sup.store.run("fork-4")
    assert run is not None and "every step trains on all 5" in run.spec["description"]


@pytest.mark.parametrize("method", ["swa", "fisher_soup", "distill", "adapter_fuse"])
def test_merging_an_moe_is_refused_up_front(sup: Supervisor, method: str) -> None:
    before = _run_ids(sup)
    code, msg = _refused(
        ControlServicer(sup), "Merge", pb.MergeRequest(method=method, runs=["main", "moe-1"])
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"merge --method {method}: moe-1 is an MoE (a gate over main, fork-1)" in msg
    assert _run_ids(sup) == before


def test_failed_parents_need_allow_failed(sup: Supervisor) -> None:
    svc = ControlServicer(sup)
    before = _run_ids(sup)
    for method, req in (
        ("Merge", pb.MergeRequest(method="swa", runs=["main", "fork-2"])),
        ("TrainGate", pb.GateRequest(runs=["main", "fork-2"])),
    ):
        code, msg = _refused(svc, method, req)
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "run fork-2 failed (the worker was killed by SIGKILL); its latest checkpoint" in msg
        assert "(step 12) is partial. Pass --allow-failed to use it anyway" in msg
    allow = json.dumps({"allow_failed": True})
    # No checkpoint at all: nothing to use, flag or not.
    code, msg = _refused(
        svc, "TrainGate", pb.GateRequest(runs=["main", "fork-3"], options_json=allow)
    )
    assert "fork-3 failed before its first checkpoint (RuntimeError: boom)" in msg
    assert _run_ids(sup) == before
    seq = sup.store.last_seq()
    reply = svc.Merge(
        pb.MergeRequest(method="swa", runs=["main", "fork-2"], options_json=allow), FakeContext()
    )
    assert reply.ok and "fork-2 failed: its partial checkpoint at step 12 is used" in reply.message
    merged = sup.store.run(reply.run_id)
    assert merged is not None and merged.spec["options"] == {}  # the flag is not a merge option
    sup._flush_live_events(force=True)
    logs = [
        json.loads(e["payload"]).get("text", "")
        for e in sup.store.events_after(seq)
        if e["kind"] == "log"
    ]
    assert f"{reply.run_id}: fork-2 failed: its partial checkpoint at step 12 is used" in logs
    reply = svc.TrainGate(
        pb.GateRequest(runs=["main", "fork-2"], options_json=allow), FakeContext()
    )
    assert reply.ok and "partial checkpoint at step 12" in reply.message


def _adapter_fork(sup: Supervisor, rid: str, base: str) -> None:
    sup.store.add_run(
        RunRow(
            rid, rid, "fork", RunStatus.COMPLETED, ["main"], time.time(), dataset_size=N,
            spec={"adapters_rank": 4, "checkpoint": base},
        )
    )  # fmt: skip
    sup.store.add_checkpoint(rid, f"checkpoints/{rid}/step-00000020.pt", "", 20, 0, 0, "x", 1)


def test_adapter_fuse_of_adapters_on_different_bases_is_refused(sup: Supervisor) -> None:
    """An adapter is an update to the weights it trained on: fused onto another fork's
    base it is not what was learned."""
    _adapter_fork(sup, "fork-4", "checkpoints/main/step-00000010.pt")
    _adapter_fork(sup, "fork-5", "checkpoints/main/step-00000048.pt")
    before = _run_ids(sup)
    code, msg = _refused(
        ControlServicer(sup),
        "Merge",
        pb.MergeRequest(method="adapter_fuse", runs=["fork-4", "fork-5"]),
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "trained on different base weights (fork-4 on checkpoints/main/step-00000010.pt" in msg
    assert _run_ids(sup) == before


def test_forking_a_merge_or_an_adapter_fork_is_refused_saying_what_to_fork(
    sup: Supervisor,
) -> None:
    """Neither can be continued by a fork (a merge never trained; an adapter fork's base is
    frozen): refused up front, not by a worker failing on a torch error."""
    _adapter_fork(sup, "fork-4", "checkpoints/main/step-00000010.pt")
    sup.store.add_run(
        RunRow(
            "merge-1", "merge-1", "merge", RunStatus.COMPLETED, ["main", "fork-1"], time.time(),
            dataset_size=N, spec={"method": "swa"},
        )
    )  # fmt: skip
    svc = ControlServicer(sup)
    before = _run_ids(sup)
    code, msg = _refused(svc, "Fork", pb.ForkRequest(run="merge-1", select="all"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot fork merge-1: a merge (swa of main, fork-1) has weights but never" in msg
    assert "export-model --run merge-1" in msg
    code, msg = _refused(svc, "Fork", pb.ForkRequest(run="fork-4", select="all"))
    assert "cannot fork fork-4: it trains rank-4 adapters on frozen base weights" in msg
    assert "fork its parent (main) instead, with --adapters RANK" in msg
    out = str(Path(sup.dir).parent / "slice.csv")
    code, msg = _refused(
        svc,
        "ExportSlice",
        pb.ExportSliceRequest(run="merge-1", select="all", format="csv", path=out),
    )
    assert "run merge-1 is a merge of main, fork-1: it never trained" in msg, msg
    assert _run_ids(sup) == before
    # A folder given as the slice's file: a clear INVALID_ARGUMENT, not UNKNOWN.
    code, msg = _refused(
        svc,
        "ExportSlice",
        pb.ExportSliceRequest(run="main", select="all", format="csv", path=str(Path(sup.dir))),
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "is a directory" in msg, msg


def test_wd_mul_zero_means_no_weight_decay_and_unset_means_the_scripts(sup: Supervisor) -> None:
    svc = ControlServicer(sup)
    none = svc.Fork(pb.ForkRequest(select="all", wd_mul=0.0), FakeContext())
    same = svc.Fork(pb.ForkRequest(select="all"), FakeContext())
    specs = {r.run_id: r.spec for r in sup.store.runs()}
    assert specs[none.run_id]["wd_mul"] == 0.0 and specs[same.run_id]["wd_mul"] == 1.0
    code, msg = _refused(svc, "Fork", pb.ForkRequest(select="all", wd_mul=-1.0))
    assert "--wd-mul -1.0: must be a finite number in [0, 1000] (0 = no weight decay)" in msg


def test_a_run_name_must_be_usable_as_a_reference(sup: Supervisor) -> None:
    """--name is another way to say --run: names that are (or look like) run ids, that
    another run has, or that no reference can carry are refused before any run exists."""
    svc = ControlServicer(sup)
    before = _run_ids(sup)
    for name, says in (
        ("main", "run ids"),
        ("fork-9", "run ids"),
        ("fork-1", "run ids"),
        ("../x", "letters, digits"),
        ("a b", "letters, digits"),
        ("x" * 65, "letters, digits"),
    ):
        for method, req in (
            ("Fork", pb.ForkRequest(select="all", budget_steps=10, name=name)),
            ("Merge", pb.MergeRequest(method="swa", runs=["main", "fork-1"], name=name)),
            ("TrainGate", pb.GateRequest(runs=["main", "fork-1"], name=name)),
        ):
            code, msg = _refused(svc, method, req)
            assert code is grpc.StatusCode.INVALID_ARGUMENT and says in msg, (name, msg)
    sup.store.add_run(RunRow("fork-7", "tails", "fork", RunStatus.COMPLETED, ["main"], 1.0))
    code, msg = _refused(svc, "Fork", pb.ForkRequest(select="all", budget_steps=10, name="tails"))
    assert "run fork-7 already has that name" in msg, msg
    assert _run_ids(sup) == before | {"fork-7"}
