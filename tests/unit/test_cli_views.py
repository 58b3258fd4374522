"""What the terminal views show: `onthefly status` / `runs` / `plans` text, the live
terminal view's lines, and automode's end-of-session report line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import cli
from onthefly_supervisor.events import Event, EventBus
from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.planner.policy import (
    Action,
    Detection,
    DetectionKind,
    PlanCard,
    PlannerConfig,
    PlannerState,
    PlanStatus,
    plan,
)
from onthefly_supervisor.store import RunRow, Store

ROLLED_BACK = {
    "skipped_batches": [
        {"epoch": 0, "batch": 13, "step": 183, "reason": "plan-0001: nonfinite", "rollback": 1},
        {"epoch": 1, "batch": 2, "step": None, "reason": "by hand", "rollback": 2},
    ],
    "rollbacks": [
        {"n": 1, "from_step": 190, "to_step": 180, "lr_mul": 0.5, "grad_clip": 1.0, "bf16": False},
        {"n": 2, "from_step": 240, "to_step": 220, "lr_mul": 1.0, "grad_clip": 0.0, "bf16": False},
    ],
}


def _session(tmp_path: Path) -> Path:
    sdir = tmp_path / "s1"
    st = Store(str(sdir))
    try:
        st.add_run(RunRow("main", "main", "main", RunStatus.RUNNING, [], 1.0, spec=ROLLED_BACK))
        st.add_run(
            RunRow(
                "fork-1",
                "fork-1",
                "fork",
                RunStatus.COMPLETED,
                ["main"],
                2.0,
                spec={"samples": 64, "selection": "quantile:0.9:1.0"},
            )
        )
    finally:
        st.close()
    return sdir


def _main_line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.lstrip().startswith(prefix))


def test_runs_text_shows_rollbacks_and_skipped_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdir = _session(tmp_path)
    assert cli.main(["runs", "--session", str(sdir)]) == 0
    out = capsys.readouterr().out
    line = _main_line(out, "└─ main")
    assert "rolled back 2x (last step 240 -> 220)" in line, line
    assert "skipped batches 0:13 (step 183), 1:2" in line, line
    fork = _main_line(out, "└─ fork-1")
    assert "rolled back" not in fork and "skipped" not in fork, fork


def test_status_text_shows_rollbacks_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sdir = _session(tmp_path)
    nan = float("nan")
    reply = pb.SessionStatus(
        session_id="s1",
        session_dir=str(sdir),
        state="running",
        runs=[
            pb.RunInfo(
                run_id="main",
                kind="main",
                status=pb.RUN_STATUS_RUNNING,
                step=230,
                last_loss=0.5,
                val_loss=nan,
                test_loss=nan,
            )
        ],
    )
    monkeypatch.setattr(
        cli, "_client", lambda session=None: SimpleNamespace(ping=lambda timeout=3.0: reply)
    )
    assert cli.main(["status"]) == 0
    line = _main_line(capsys.readouterr().out, "run main")
    assert "rolled back 2x (last step 240 -> 220)" in line, line
    assert "skipped batches 0:13 (step 183), 1:2" in line, line


def test_rollback_note_is_compact() -> None:
    one = {"rollbacks": ROLLED_BACK["rollbacks"][:1], "skipped_batches": []}
    assert cli._rollback_note(one) == " · rolled back 1x (step 190 -> 180, lr x0.5, clip 1)"
    many = {"skipped_batches": [{"epoch": 0, "batch": b, "step": None} for b in range(7)]}
    assert cli._rollback_note(many) == " · skipped batches 0:0, 0:1, 0:2, 0:3 +3 more"
    assert cli._rollback_note({}) == ""


def test_plans_without_a_live_supervisor_reads_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    root = tmp_path / ".onthefly" / "sessions"
    sdir = root / "20250101-000000-abcd"
    st = Store(str(sdir))
    try:
        card = PlanCard(
            plan_id="plan-0001",
            action="fork",
            reason="high_loss_tail",
            selection="quantile:0.9:1.0",
            budget_steps=200,
            diagnostics={"summary": "the loss tail is heavy"},
        )
        st.put_plan(card.plan_id, "done", card.to_dict())
        waiting = PlanCard(
            plan_id="plan-0002", action="explore", reason="loss_plateau", selection="all"
        )
        st.put_plan(waiting.plan_id, "proposed", waiting.to_dict())
    finally:
        st.close()
    (root / "latest").symlink_to(sdir.name)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plans"]) == 0
    out = capsys.readouterr().out
    assert "plan-0001" in out and "done" in out and "the loss tail is heavy" in out, out
    assert "plan-0002" in out and "proposed" in out, out
    assert "approve, reject and edit need a live one" in out, out
    assert cli.main(["plans", "--json", "--session", sdir.name]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["live"] is False and doc["session_id"] == sdir.name
    assert [(p["plan_id"], p["status"]) for p in doc["plans"]] == [
        ("plan-0001", "done"),
        ("plan-0002", "proposed"),
    ]
    assert doc["plans"][0]["recipe"]["training"] == {}
    # Numbers are numbers and encoded objects are objects (a script reads them as they are).
    assert doc["plans"][0]["budget_steps"] == 200
    assert doc["plans"][0]["diagnostics"]["summary"] == "the loss tail is heavy"
    assert not any(k.endswith("_json") for k in doc["plans"][0]), doc["plans"][0]
    # Acting on a card needs the live supervisor, and the error says so.
    assert cli.main(["approve", "plan-0002"]) == 1
    err = capsys.readouterr().err
    assert "approve needs a live supervisor" in err and "`onthefly plans`" in err, err


def _view(store: Any, bus: Any = None) -> Any:
    from onthefly_supervisor.tui import TerminalView

    sup = SimpleNamespace(output_hooks=[], store=store, bus=bus)
    view = TerminalView(sup, rich_mode=False)  # type: ignore[arg-type]
    lines: list[str] = []
    view.print = lines.append  # type: ignore[method-assign]
    return view, lines


def test_a_forks_header_shows_its_selection_size(tmp_path: Path) -> None:
    st = Store(str(_session(tmp_path)), readonly=True)
    try:
        view, lines = _view(st)
        for run_id in ("main", "fork-1"):
            view._on_event(
                Event(
                    1,
                    time.time(),
                    "attached",
                    run_id,
                    {"model": "MLP", "device": "cpu", "dataset_size": 1000, "steps_per_epoch": 2},
                )
            )
    finally:
        st.close()
    assert lines[0] == "[onthefly] main: MLP on cpu · 1000 samples · 2 steps/epoch"
    assert lines[1] == (
        "[onthefly] fork-1: MLP on cpu · 64 of 1000 samples (quantile:0.9:1.0) · 2 steps/epoch"
    )


def test_automode_prints_the_report_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onthefly_supervisor import report
    from onthefly_supervisor.autopilot import Autopilot

    st = Store(str(tmp_path / "s"))
    bus = EventBus(st)
    sup = SimpleNamespace(
        automode=True,
        store=st,
        bus=bus,
        dir=str(tmp_path / "s"),
        control_hooks={},
        tick_hooks=[],
        busy_hooks=[],
        final_hooks=[],
    )
    ap = Autopilot(sup)  # type: ignore[arg-type]
    monkeypatch.setattr(ap, "tick", lambda: None)
    monkeypatch.setattr(
        report,
        "write_report",
        lambda *a, **kw: {"html": "/x/report.html", "json": "/x/report.json"},
    )
    printed: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **kw: printed.append(" ".join(map(str, a))))
    view, lines = _view(st, bus)
    try:
        assert ap.finalize() is False
        for ev in bus.follow(0, alive=lambda: False):
            view._on_event(ev)
    finally:
        bus.close()
        st.close()
    shown = [x for x in printed + lines if "report: " in x]
    assert shown == ["[onthefly] report: /x/report.html and /x/report.json"], shown


def test_an_explore_card_says_what_it_races_and_why_a_multiplier_is_left_out() -> None:
    from onthefly_supervisor.autopilot import Autopilot

    sup = SimpleNamespace(control_hooks={}, tick_hooks=[], busy_hooks=[], final_hooks=[])
    ap = Autopilot(sup)  # type: ignore[arg-type]
    cfg = ap.config
    assert cfg.max_parallel_children == 3 and cfg.explore_lr_multipliers == (0.3, 1.0, 3.0)
    plateau = Detection(DetectionKind.PLATEAU, 1000, 0.9, "the loss has stopped moving")
    for busy, want in (
        (0, "races lr x1/x0.3/x3"),
        (
            1,
            "races lr x1/x0.3; x3 left out: 1 of the 3 child-process slots were running or "
            "reserved when it was proposed (children cap), leaving 2",
        ),
    ):
        res = plan([plateau], PlannerState(), cfg, 1000, {"active_children": busy})
        card = ap._explain_variants(res.cards[0])
        assert card.action is Action.EXPLORE and card.status is PlanStatus.PROPOSED
        assert card.diagnostics["variants"] == want
        assert card.diagnostics["summary"] == f"the loss has stopped moving; {want}"
    # A card that races nothing configured as a race is left as it is.
    assert PlannerConfig().fork_lr_multipliers == (1.0, 0.5)
    fork = PlanCard(plan_id="plan-0009", action="gate", reason="high_loss_tail", selection="all")
    assert ap._explain_variants(fork) is fork


def test_wait_run_reads_the_outcome_from_the_store_when_the_supervisor_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fork --wait`: a fork that fails after the main run completed ends the session, and
    the supervisor with it, between two polls. The command still reports the fork's outcome
    (it said 'the supervisor ... does not answer')."""
    sdir = tmp_path / "s1"
    st = Store(str(sdir))
    try:
        st.add_run(RunRow("main", "main", "main", RunStatus.COMPLETED, [], 1.0))
        st.add_run(RunRow("fork-1", "fork-1", "fork", RunStatus.FAILED, ["main"], 2.0))
        st.update_run("fork-1", error="MemoryError: CUDA out of memory (simulated)")
    finally:
        st.close()
    monkeypatch.setattr(cli, "resolve_session", lambda _s=None: str(sdir))

    def gone(*_a: Any, **_k: Any) -> Any:
        raise cli.CliError("the supervisor at 127.0.0.1:1 does not answer (it has stopped?)")

    monkeypatch.setattr(cli, "_rpc", gone)
    out = cli._wait_run(SimpleNamespace(), "fork-1", {"message": "fork-1: started"}, timeout=5)  # type: ignore[arg-type]
    assert out["ok"] is False and out["run"]["status"] == "failed"
    assert "MemoryError" in out["message"]


def test_status_of_a_stopped_session_says_resume_continues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_spine_defects import _finished_session

    monkeypatch.chdir(tmp_path)
    _finished_session(tmp_path, "s1", RunStatus.STOPPED)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "no live supervisor (stopped; `onthefly resume` continues" in out, out
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"


def test_the_compare_table_shows_a_missing_loss_as_a_dash(capsys: Any) -> None:
    """NaN (a run without a val loader) and None read as "—"; Inf (diverged) stays."""
    from onthefly_supervisor.cli import _print_matrix

    _print_matrix(["main", "fork-1"], ["val", "fork-1"], [float("nan"), 0.5, None, float("inf")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split() == ["main", "—", "0.5"] and rows[2].split() == ["fork-1", "—", "inf"]


def test_gpus_option_is_checked_when_parsed() -> None:
    import argparse

    from onthefly_supervisor.cli import _gpus

    assert _gpus("auto") == "auto" and _gpus("0, 1") == "0, 1"
    for bad in ("banana", "-1", "0,,1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="comma list of GPU indices"):
            _gpus(bad)


def test_the_worker_table_shows_a_stalled_training_thread() -> None:
    import threading

    from rich.console import Console

    from onthefly_supervisor.lifecycle import Role, WorkerState
    from onthefly_supervisor.pool import Worker, WorkerSpec
    from onthefly_supervisor.tui import TerminalView

    def worker(wid: str, stalled: float) -> Worker:
        spec = WorkerSpec(
            worker_id=wid, run_id=wid, role=Role.TRAIN, script=__file__, argv=[], cwd="."
        )
        return Worker(spec, state=WorkerState.RUNNING, stalled_s=stalled)

    sup = SimpleNamespace(
        output_hooks=[],
        session_id="s",
        port=1,
        cfg=SimpleNamespace(script="t.py"),
        lock=threading.Lock(),
        workers={"a": worker("a", 37.4), "b": worker("b", 1.0)},
    )
    view = TerminalView(sup, rich_mode=False)  # type: ignore[arg-type]
    console = Console(width=200, record=True)
    console.print(view._render())
    rows = {line.split()[0]: line for line in console.export_text().splitlines() if line.strip()}
    assert "running · stalled 37 s" in rows["a"], rows
    assert "stalled" not in rows["b"], rows  # one heartbeat without a step is a slow step


def test_the_report_picks_its_best_run_on_val_loss_not_test(tmp_path: Path) -> None:
    from onthefly_supervisor.lifecycle import RunStatus
    from onthefly_supervisor.report import build
    from onthefly_supervisor.store import RunRow

    store = Store(str(tmp_path))
    t0 = time.time()
    for rid, kind, val, test in (
        ("main", "main", 0.30, 0.31),
        ("fork-1", "fork", 0.20, 0.29),  # best on val
        ("merge-1", "merge", 0.25, 0.10),  # best on test: picking it would peek at test
    ):
        store.add_run(RunRow(rid, rid, kind, RunStatus.COMPLETED, [], t0))
        store.update_run(rid, val_loss=val, test_loss=test)
    store.close()
    c = build(str(tmp_path))["comparison"]
    assert (c["best_run"], c["best_chosen_on"], c["best_test_loss"]) == ("fork-1", "val", 0.29)
    # No run has a val loss: chosen on test, and the report says so.
    store = Store(str(tmp_path))
    for rid in ("main", "fork-1", "merge-1"):
        store.update_run(rid, val_loss=None)
    store.close()
    c = build(str(tmp_path))["comparison"]
    assert (c["best_run"], c["best_chosen_on"]) == ("merge-1", "test")


def test_runs_shows_a_lost_race_as_a_race_note_not_an_error() -> None:
    from onthefly_supervisor.cli import _error_note

    lost = {"state": "lost", "reason": "x"}
    assert _error_note({"error": "", "status": "completed", "spec": {}}) == ""
    assert (
        _error_note(
            {"error": "lost the race at rung 1", "status": "stopped", "spec": {"race": lost}}
        )
        == " · race: lost the race at rung 1"
    )
    assert (
        _error_note({"error": "completed, but fork-6 finished the race better", "status": "completed", "spec": {"race": lost}})
        == " · race: completed, but fork-6 finished the race better"
    )  # fmt: skip
    assert (
        _error_note({"error": "boom", "status": "failed", "spec": {"race": lost}})
        == " · error: boom"
    )


def test_the_live_samples_per_second_is_the_wall_clock_rate() -> None:
    from onthefly_supervisor.tui import RunView

    rv = RunView()
    # Steps of 100 samples taking 10 ms each (10,000/s while stepping), but one batch of 5
    # steps every second (data loading, evaluation...): 500 samples/s on the wall clock.
    # The first batch alone has no wall-clock span yet: its steps' own rate meanwhile.
    rv.add_rate([100.0 - 0.04 + i * 0.01 for i in range(5)], [10_000.0] * 5, [10.0] * 5)
    assert rv.sps == pytest.approx(10_000.0)
    for k in range(1, 6):
        t = 100.0 + k
        rv.add_rate([t - 0.04 + i * 0.01 for i in range(5)], [10_000.0] * 5, [10.0] * 5)
    assert rv.sps == pytest.approx(500.0)
    for k in range(6, 30):  # the window keeps the last ~10 s
        rv.add_rate([100.0 + k], [10_000.0], [10.0])
    assert rv.sps == pytest.approx(100.0)


def test_a_connection_file_left_by_a_killed_supervisor_is_no_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import os
    import subprocess

    from onthefly_supervisor.client import NoSupervisor, read_connection

    gone = subprocess.Popen(["true"])
    gone.wait()
    root = tmp_path / ".onthefly" / "sessions"
    sdir = root / "20260101-000000-dead"
    sdir.mkdir(parents=True)
    Store(str(sdir)).close()
    # Its port may belong to another supervisor by now: it must not be dialled.
    conn = {"host": "127.0.0.1", "port": 47621, "token": "t", "pid": gone.pid}
    (sdir / "connection.json").write_text(json.dumps({**conn, "session_id": sdir.name}))
    (root / "latest").symlink_to(sdir.name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoSupervisor, match="has no live supervisor \\(its supervisor is gone\\)"):
        read_connection()
    assert cli.main(["status"]) == 0  # the stored status, not a gRPC traceback
    assert "no live supervisor" in capsys.readouterr().out
    # The one live session of the project is reached instead.
    live = root / "20260101-000001-live"
    live.mkdir()
    (live / "connection.json").write_text(
        json.dumps({**conn, "pid": os.getpid(), "session_id": live.name})
    )
    assert read_connection().session_dir == str(live)
    # --session names the one meant (here the dead one, whatever is live).
    assert cli.main(["status", "--json", "--session", sdir.name]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["session_id"] == sdir.name and doc["live"] is False


def test_sessions_gc_keeps_the_newest_that_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from onthefly_supervisor.store import point_latest

    root = tmp_path / ".onthefly" / "sessions"
    made = []
    for i, trained in enumerate([True, True, False, True, False, False]):
        sdir = root / f"20260101-00000{i}-abcd"
        st = Store(str(sdir))
        st.add_run(RunRow("main", "main", "main", RunStatus.COMPLETED, [], time.time()))
        if trained:  # `onthefly run train.py --help` trains nothing
            st.update_run("main", step=10)
        st.close()
        made.append(sdir.name)
    point_latest(str(root / made[-1]))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sessions", "gc", "--keep", "2"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 session(s) (3 that never trained), kept the newest 2 that trained" in out
    left = sorted(p.name for p in root.iterdir() if p.name != "latest")
    assert left == [made[1], made[3]]
    assert os.path.realpath(root / "latest") == str(root / made[3])


def test_epochs_are_counted_from_one_like_python_train_py() -> None:
    from onthefly_supervisor.tui import _epoch_of

    assert _epoch_of(0, 3) == "1/3" and _epoch_of(2, 3) == "3/3"
    assert _epoch_of(6, 0) == "7"  # a fork or a max_steps run ends on steps


def test_a_merge_that_lost_to_its_target_shows_as_rejected() -> None:
    from onthefly_supervisor.tui import plan_status

    lost = {"status": "done", "diagnostics": {"outcome": {"status": "done", "verdict": "rejected"}}}
    assert plan_status(lost) == "done · rejected"
    assert plan_status({"status": "done", "diagnostics": {"outcome": {"status": "done"}}}) == "done"
    assert plan_status({"status": "proposed"}) == "proposed"


def test_a_note_every_fork_repeats_is_printed_once() -> None:
    view, lines = _view(None)
    gn = "gradient norm measured every {} steps (it costs {} ms of a {} ms step); set Trainer(grad_norm_every=1) to measure it on every step"
    for i, (run_id, text) in enumerate(
        [
            ("main", gn.format(4, "0.033", "0.83")),
            ("fork-1", gn.format(2, "0.067", "4.16")),
            ("fork-1", "epoch 1 ended 0.06 s after the last checkpoint: ..."),
        ]
    ):
        view._on_event(Event(i, time.time(), "log", run_id, {"level": "note", "text": text}))
    assert lines == [
        f"[onthefly] main: {gn.format(4, '0.033', '0.83')}",
        "[onthefly] fork-1: epoch 1 ended 0.06 s after the last checkpoint: ...",
    ]


def test_the_rate_starts_again_after_a_resume() -> None:
    """After `onthefly resume` the step line read '8.94 samples/s': the window spanned the
    pause."""
    view, _lines = _view(None)
    rv = view._run("main")
    rv.add_rate([100.0, 101.0, 102.0], [1000.0] * 3, [100.0] * 3)
    for i, status in enumerate(("running", "paused", "running")):
        view._on_event(Event(i, time.time(), "run_status", "main", {"status": status}))
    rv.add_rate([160.0, 161.0], [1000.0] * 2, [100.0] * 2)
    assert rv.sps == pytest.approx(1000.0)  # not (3 steps' samples) / 61 s
