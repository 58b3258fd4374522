"""Exact continuation on CPU: pause/resume and kill/restart end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PY, SCRIPTS, cli, cli_json, start

SMALL = SCRIPTS / "train_small.py"
# Shuffling, dropout, BatchNorm, SGD momentum and a StepLR scheduler are all in train_small.py.
COMMON = ["--epochs", "3", "--n", "400", "--batch-size", "16", "--val", "--test"]


def final_hash(project: Path) -> str:
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    ck = max((sdir / "checkpoints" / "main").glob("step-*.pt"))
    state = torch.load(ck, weights_only=True)
    h = hashlib.sha256()
    for k in sorted(state["model"]):
        h.update(k.encode())
        h.update(state["model"][k].numpy().tobytes())
    for k in sorted(state["optimizer"]["state"]):
        for _name, t in sorted(state["optimizer"]["state"][k].items()):
            if isinstance(t, torch.Tensor):
                h.update(t.numpy().tobytes())
    return h.hexdigest()


def run_plain(project: Path, *extra: str) -> str:
    r = cli(
        "run", "--headless", "--port", "0", str(SMALL), *COMMON, *extra, cwd=project, timeout=180
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Loader workers fork the worker: gRPC's fork handlers must stay out of the output.
    assert "fork() handlers" not in r.stdout + r.stderr
    return final_hash(project)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_pause_resume_is_bit_exact(tmp_path: Path, workers: str) -> None:
    ref = (
        run_plain(tmp_path / "ref", "--num-workers", workers)
        if (tmp_path / "ref").mkdir() is None
        else ""
    )
    proj = tmp_path / "paused"
    proj.mkdir()
    live = start(proj, SMALL, *COMMON, "--num-workers", workers, "--step-sleep", "0.05")
    try:
        live.wait_for(lambda s: live.main_run(s)["step"] >= 10, timeout=60, every=0.05)
        # The pause must land mid-epoch (25 steps an epoch). The CLI's start-up decides where it
        # lands, so on a slow machine it can hit a boundary: then resume and pause again, which
        # the run must survive bit-exactly too.
        for _attempt in range(4):
            assert cli("pause", cwd=proj).returncode == 0
            st = live.wait_for(lambda s: live.main_run(s)["status"] == "paused")
            paused_at = live.main_run(st)["step"]
            if paused_at % 25 != 0:
                break
            assert cli("resume", cwd=proj).returncode == 0
            live.wait_for(lambda s, at=paused_at: live.main_run(s)["step"] > at, every=0.02)
        assert paused_at % 25 != 0, f"every pause landed on an epoch boundary ({paused_at})"
        # A test pass and every health check while paused must not change the trajectory.
        assert cli("test", cwd=proj).returncode == 0
        assert cli("health", cwd=proj, timeout=120).returncode == 0
        assert cli("resume", cwd=proj).returncode == 0
        code, out = live.finish(120)
        assert code == 0, out
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
    assert final_hash(proj) == ref


def test_kill_and_restart_from_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    ref = run_plain(tmp_path / "ref", "--checkpoint-every", "7")
    proj = tmp_path / "killed"
    proj.mkdir()
    marker = proj / "crashed-once"
    # SIGKILL of the worker itself at step 40 (mid-epoch 1); the supervisor restarts it from
    # the cadence checkpoint at step 35.
    r = cli(
        "run",
        "--headless",
        "--port",
        "0",
        "--max-restarts",
        "1",
        str(SMALL),
        *COMMON,
        "--checkpoint-every",
        "7",
        "--crash-at-step",
        "40",
        "--crash-once-file",
        str(marker),
        cwd=proj,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker.exists(), "the worker really was killed"
    assert "restarting main from checkpoint" in r.stdout
    assert final_hash(proj) == ref
    # The per-sample losses and each epoch's train loss are the uninterrupted run's too:
    # a checkpoint is recorded only after its steps' losses are sent, and it carries the
    # epoch's loss so far (the restart resumed mid-epoch 1).
    for (ea, a), (eb, b) in zip(epoch_arrays(tmp_path / "ref"), epoch_arrays(proj), strict=True):
        assert ea == eb and np.array_equal(a, b, equal_nan=True), ea
    assert epoch_losses(proj) == pytest.approx(epoch_losses(tmp_path / "ref"), rel=1e-9)
    assert_one_metric_row_per_step(proj)


def assert_one_metric_row_per_step(project: Path) -> None:
    """The steps an earlier attempt recorded after the checkpoint it resumed from are
    trained again: stored once, not twice."""
    db = sqlite3.connect(project / ".onthefly" / "sessions" / "latest" / "session.db")
    steps = [s for (s,) in db.execute("SELECT step FROM metrics WHERE run_id='main' ORDER BY step")]
    db.close()
    assert steps == list(range(1, len(steps) + 1)), [s for s in steps if steps.count(s) > 1][:10]


def epoch_arrays(project: Path) -> list[tuple[str, np.ndarray]]:
    d = (project / ".onthefly" / "sessions" / "latest" / "samples" / "main").resolve()
    return [(p.name, np.load(p)) for p in sorted(d.glob("epoch-*.npy"))]


def epoch_losses(project: Path) -> list[float]:
    db = sqlite3.connect(project / ".onthefly" / "sessions" / "latest" / "session.db")
    rows = db.execute(
        "SELECT payload FROM events WHERE kind='epoch_end' AND run_id='main' ORDER BY seq"
    ).fetchall()
    db.close()
    return [float(json.loads(p)["train_loss"]) for (p,) in rows]


def _session_dir(project: Path) -> Path:
    return (project / ".onthefly" / "sessions" / "latest").resolve()


def _steps_stored_past_checkpoint(session_dir: Path) -> bool:
    db = sqlite3.connect(f"file:{session_dir / 'session.db'}?mode=ro", uri=True)
    try:
        (m,) = db.execute("SELECT MAX(step) FROM metrics WHERE run_id='main'").fetchone()
        (c,) = db.execute("SELECT MAX(step) FROM checkpoints WHERE run_id='main'").fetchone()
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return m is not None and c is not None and m > c


def test_supervisor_killed_then_onthefly_resume_is_bit_exact(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    ref = run_plain(tmp_path / "ref", "--checkpoint-every", "7")
    proj = tmp_path / "killed"
    proj.mkdir()
    live = start(proj, SMALL, *COMMON, "--checkpoint-every", "7", "--step-sleep", "0.02")
    live.wait_for(lambda s: live.main_run(s)["step"] >= 30, timeout=60, every=0.05)
    # Until the store holds steps past the newest checkpoint: the resume trains them again.
    deadline = time.time() + 60
    while time.time() < deadline and not _steps_stored_past_checkpoint(live.session_dir):
        time.sleep(0.05)
    live.proc.kill()  # SIGKILL the supervisor: its worker dies with it
    live.proc.wait(10)
    r = cli("resume", "--headless", "--port", "0", cwd=proj, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming main from checkpoints/main/step-" in r.stdout
    assert final_hash(proj) == ref
    assert cli("sessions", "check", cwd=proj).returncode == 0
    assert_one_metric_row_per_step(proj)


def test_export_import_resume_in_a_fresh_folder_is_bit_exact(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    ref = run_plain(tmp_path / "ref")
    proj = tmp_path / "a"
    proj.mkdir()
    orig = proj / "train.py"  # gone by the time the session is imported elsewhere
    orig.write_text(SMALL.read_text())
    live = start(proj, orig, *COMMON, "--step-sleep", "0.02")
    live.wait_for(lambda s: live.main_run(s)["step"] >= 20, timeout=60, every=0.05)
    live.proc.send_signal(2)  # Ctrl+C: stop at a step boundary with a checkpoint
    code, out = live.finish(60)
    assert code == 130, out
    archive = tmp_path / "s.tar"
    r = cli("export-session", "-o", str(archive), cwd=proj)
    assert r.returncode == 0, r.stderr
    r = cli("export-session", "-o", str(archive), cwd=proj)
    assert r.returncode != 0 and "exists" in r.stderr
    orig.unlink()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = cli("import-session", str(archive), cwd=fresh)
    assert r.returncode == 0, r.stderr
    r = cli("resume", "--headless", "--port", "0", cwd=fresh)
    assert r.returncode != 0 and "`onthefly resume --script PATH`" in r.stderr, r.stderr
    r = cli("resume", "--headless", "--port", "0", "--script", "nope.py", cwd=fresh)
    assert r.returncode != 0 and "--script nope.py: no such file" in r.stderr, r.stderr
    # The script from wherever the user keeps it now (an imported session keeps its path).
    copy = fresh / "train_copy.py"
    copy.write_text(SMALL.read_text())
    r = cli("resume", "--headless", "--port", "0", "--script", str(copy), cwd=fresh, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert final_hash(fresh) == ref
    runs = cli_json("runs", cwd=fresh)["runs"]
    assert runs[0]["status"] == "completed" and not runs[0]["error"], runs[0]
    # The finished session served (forks, exports, dashboard) with the script's copy too.
    r = cli("serve", "--port", "0", "--script", "nope.py", cwd=fresh)
    assert r.returncode != 0 and "--script nope.py: no such file" in r.stderr, r.stderr
    serve = subprocess.Popen(
        [PY, "-m", "onthefly_supervisor", "serve", "--port", "0", "--script", str(copy)],
        cwd=fresh,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        st: dict = {}  # type: ignore[type-arg]
        while time.time() < deadline and not st.get("live"):
            time.sleep(0.3)
            st = cli_json("status", cwd=fresh)
        assert st.get("live") and st["script"] == str(copy), st
    finally:
        serve.send_signal(2)
        serve.wait(30)
