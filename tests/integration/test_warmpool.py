"""Warm pool end to end: a standby copy of the script becomes the next fork.

No timings are asserted here (bench/fork_latency.py measures them); these tests check that
a fork really runs in the pre-started process, completes like a cold fork, leaves the
parent training, that the pool refills, that a failing start-up is reported, and that no
process outlives the session.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SCRIPTS, Live, cli, cli_json, pid_alive, start

SMALL = SCRIPTS / "train_small.py"


def _standbys(st: dict[str, Any], state: str | None = None) -> list[dict[str, Any]]:
    return [
        w
        for w in st["workers"]
        if w["role"] == "standby" and (state is None or w["state"] == state)
    ]


def _stop_and_check_no_orphans(live: Live, pids: set[int]) -> tuple[int, str]:
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGINT)
    code, out = live.finish(90)
    deadline = time.time() + 10
    while time.time() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    left = sorted(p for p in pids if pid_alive(p))
    assert not left, f"processes outlived the session: {left}"
    return code, out


def test_a_fork_runs_in_the_warm_standby_and_the_pool_refills(project: Path) -> None:
    live = start(
        project, SMALL, "--epochs", "400", "--step-sleep", "0.02", extra=("--warm-forks", "1")
    )
    pids: set[int] = set()
    try:
        st = live.wait_for(lambda s: bool(_standbys(s, "attached")), timeout=120)
        (standby,) = _standbys(st)
        pids |= set(live.worker_pids(st))
        assert standby["run_id"] == "" and standby["pid"] != live.worker_pids(st)[0]
        assert [r["run_id"] for r in cli_json("runs", cwd=project)["runs"]] == ["main"]

        r = cli(
            "fork",
            "--select",
            "quantile:0.5:1.0",
            "--budget-steps",
            "20",
            "--wait",
            cwd=project,
            timeout=180,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fork-1 completed" in r.stdout
        st = live.wait_for(
            lambda s: any(
                w["worker_id"] == "fork-1-0" and w["state"] == "succeeded" for w in s["workers"]
            )
        )
        fork = next(w for w in st["workers"] if w["worker_id"] == "fork-1-0")
        assert fork["role"] == "fork" and fork["run_id"] == "fork-1"
        assert fork["pid"] == standby["pid"], "the fork ran in the pre-started standby process"
        assert standby["worker_id"] not in {w["worker_id"] for w in st["workers"]}

        runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
        assert set(runs) == {"main", "fork-1"}, "standbys are not runs"
        assert runs["fork-1"]["status"] == "completed" and runs["fork-1"]["step"] == 20
        assert runs["fork-1"]["parents"] == ["main"]
        assert {"slice:self"} <= {e["split"] for e in runs["fork-1"]["evals"]}

        # The parent kept training, and the pool refilled with a new process.
        step = live.main_run(st)["step"]
        st = live.wait_for(
            lambda s: (
                live.main_run(s)["step"] > step
                and live.main_run(s)["status"] == "running"
                and any(w["pid"] != standby["pid"] for w in _standbys(s, "attached"))
            ),
            timeout=120,
        )
        pids |= set(live.worker_pids(st))
        logs = live.session_dir / "logs"
        assert (logs / "fork-1-0.log").exists()
        assert "became fork-1-0" in (logs / f"{standby['worker_id']}.log").read_text()
    finally:
        code, out = _stop_and_check_no_orphans(live, pids)
    assert code == 130, out


def test_a_standby_whose_start_up_fails_is_reported_and_not_respawned_in_a_loop(
    project: Path,
) -> None:
    # --fork-oom: the script raises MemoryError at start-up in a fork process (a standby
    # starts as a fork would), while the main run trains normally.
    live = start(
        project,
        SMALL,
        "--epochs",
        "400",
        "--step-sleep",
        "0.02",
        "--fork-oom",
        extra=("--warm-forks", "1"),
    )
    pids: set[int] = set()
    try:
        st = live.wait_for(lambda s: bool(_standbys(s, "failed")), timeout=120)
        pids |= set(live.worker_pids(st))
        failed = _standbys(st, "failed")[0]
        assert failed["exit_code"] != 0
        # A fork now is cold (the pool backs off) or takes the retry standby: either way it
        # fails with the script's own error, and the parent is unharmed.
        r = cli(
            "fork",
            "--select",
            "quantile:0.5:1.0",
            "--budget-steps",
            "10",
            "--wait",
            cwd=project,
            timeout=120,
        )
        assert r.returncode != 0 and "MemoryError" in r.stdout + r.stderr
        st = live.wait_for(lambda s: live.main_run(s)["status"] == "running")
        pids |= set(live.worker_pids(st))
    finally:
        code, out = _stop_and_check_no_orphans(live, pids)
    assert code == 130, out
    sid = failed["worker_id"]
    assert f"error in {sid}: MemoryError: CUDA out of memory (simulated in the fork)" in out
    assert f"standby {sid} failed in the script's start-up: MemoryError" in out
    assert "next standby in 5 s" in out
    runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
    assert set(runs) == {"main", "fork-1"}
    assert runs["main"]["status"] == "stopped" and not runs["main"]["error"]
    assert runs["fork-1"]["status"] == "failed" and "MemoryError" in runs["fork-1"]["error"]


def test_a_lightning_fork_runs_in_the_warm_standby(project: Path) -> None:
    pytest.importorskip("lightning")
    from tests.integration.test_lightning import _script

    live = start(
        project,
        _script(project),
        "--epochs",
        "2",
        extra=("--keep-alive", "--warm-forks", "1"),
    )
    pids: set[int] = set()
    try:
        st = live.wait_for(
            lambda s: live.main_run(s)["status"] == "completed" and bool(_standbys(s, "attached")),
            timeout=150,
        )
        (standby,) = _standbys(st, "attached")
        pids |= set(live.worker_pids(st))
        r = cli(
            "fork",
            "--select",
            "quantile:0.8:1.0",
            "--budget-steps",
            "12",
            "--wait",
            cwd=project,
            timeout=150,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fork-1 completed" in r.stdout
        st = live.wait_for(
            lambda s: any(
                w["worker_id"] == "fork-1-0" and w["state"] == "succeeded" for w in s["workers"]
            )
        )
        fork = next(w for w in st["workers"] if w["worker_id"] == "fork-1-0")
        assert fork["pid"] == standby["pid"]
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
        assert runs["fork-1"]["status"] == "completed" and runs["fork-1"]["step"] == 12
        assert {"slice:self", "val"} <= {e["split"] for e in runs["fork-1"]["evals"]}
        pids |= set(live.worker_pids(live.status()))
    finally:
        _stop_and_check_no_orphans(live, pids)
