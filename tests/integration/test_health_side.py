"""The determinism health check replays from a checkpoint in a side process (role=health).

The live run keeps training while it happens, and ends bitwise equal to a run that never
had a health check; a model with unseeded noise is caught, naming the tensor; a side
process that cannot run says why. The live run here also writes its checkpoints through
the background writer process (ONTHEFLY_CKPT_INLINE_MAX_BYTES=0 and
ONTHEFLY_CKPT_PROCESS_MIN_BYTES=0), so the same test
proves that path bit-exact and its sha256s right.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from onthefly_worker.checkpoint import sha256_file
from tests.conftest import SCRIPTS, cli, start
from tests.integration.test_determinism import COMMON, SMALL, final_hash, run_plain

NOISY = SCRIPTS / "train_noisy.py"


def verdicts(stdout: str) -> dict[str, dict[str, Any]]:
    out = {}
    for v in json.loads(stdout)["verdicts"]:
        v["numbers"] = v["numbers"] or {}  # --json prints numbers_json as an object (or null)
        out[v["check"]] = v
    return out


def main_worker(st: dict[str, Any]) -> dict[str, Any]:
    return next(w for w in st["workers"] if w["run_id"] == "main" and w["role"] == "train")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_determinism_runs_in_a_side_process_and_training_goes_on_unchanged(
    tmp_path: Path,
) -> None:
    (tmp_path / "ref").mkdir()
    ref = run_plain(tmp_path / "ref", "--checkpoint-every", "7")
    proj = tmp_path / "live"
    proj.mkdir()
    live = start(
        proj,
        SMALL,
        *COMMON,
        "--checkpoint-every",
        "7",
        "--step-sleep",
        "0.25",
        env={"ONTHEFLY_CKPT_PROCESS_MIN_BYTES": "0", "ONTHEFLY_CKPT_INLINE_MAX_BYTES": "0"},
    )
    try:
        before = live.wait_for(lambda s: live.main_run(s)["step"] >= 10, timeout=120)
        worker = main_worker(before)
        r = cli("health", "--json", cwd=proj, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        got = verdicts(r.stdout)
        assert set(got) == {
            "determinism",
            "numerics",
            "gradients",
            "activations",
            "data",
            "throughput",
        }
        det = got["determinism"]
        n = det["numbers"]
        assert det["verdict"] == "ok", det["hint"]
        assert n["mode"] == "side-process" and n["identical"] is True
        assert n["pid"] != worker["pid"] and n["steps"] >= 1
        assert str(n["checkpoint"]).startswith("checkpoints/main/step-")
        assert "side process" in det["hint"]
        after = live.status()
        # The training worker kept training, in the same process, while the replay ran.
        assert main_worker(after)["pid"] == worker["pid"]
        assert live.main_run(after)["step"] > live.main_run(before)["step"]
        # Its checkpoints go through its writer process (a child of the worker).
        assert any("_writer_main" in _cmdline(c) for c in _children(worker["pid"])), (
            "no checkpoint writer process under the training worker"
        )
        side = [w for w in after["workers"] if w["role"] == "health"]
        assert [w["pid"] for w in side] == [n["pid"]], after["workers"]
        code, out = live.finish(300)
        assert code == 0, out
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
    # Weights unaffected: bit for bit the run without a health check.
    assert final_hash(proj) == ref
    # Every checkpoint the writer process wrote has the sha256 the store recorded.
    db = sqlite3.connect(live.session_dir / "session.db")
    rows = db.execute("SELECT path, sha256 FROM checkpoints WHERE run_id = 'main'").fetchall()
    assert rows
    for rel, sha in rows:
        p = live.session_dir / rel
        if p.exists():  # older ones may have been pruned by the keep policy
            assert sha256_file(str(p)) == sha, rel
    assert not list(live.session_dir.glob("checkpoints/main/*.tmp-*"))
    assert not (live.session_dir / "health").exists(), "the side process's folder was left behind"


def test_determinism_names_the_tensor_a_noisy_model_changes_and_failures_are_verdicts(
    tmp_path: Path,
) -> None:
    live = start(tmp_path, NOISY, "--noise")
    try:
        before = live.wait_for(lambda s: live.main_run(s)["step"] >= 6, timeout=120)
        r = cli("health", "--check", "determinism", "--json", cwd=tmp_path, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        det = verdicts(r.stdout)["determinism"]
        n = det["numbers"]
        assert det["verdict"] == "fail", det["hint"]
        assert n["mode"] == "side-process" and n["pid"] != main_worker(before)["pid"]
        # The noise enters right before the head; the frozen layer is never touched.
        assert n["first_difference"] == "model.head.weight", n
        assert "model.features.weight" not in n["differing"]
        assert "'model.head.weight'" in det["hint"]

        # A side process that cannot run gives a verdict saying why, not a hang.
        assert cli("pause", cwd=tmp_path).returncode == 0
        st = live.wait_for(lambda s: live.main_run(s)["status"] == "paused")
        ck = live.session_dir / live.main_run(st)["last_checkpoint"]
        data = bytearray(ck.read_bytes())
        data[len(data) // 2] ^= 0xFF
        ck.write_bytes(bytes(data))
        r = cli("health", "--check", "determinism", "--json", cwd=tmp_path, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        det = verdicts(r.stdout)["determinism"]
        assert det["verdict"] == "fail" and "could not run" in det["hint"], det["hint"]
        assert "corrupt" in det["hint"], det["hint"]
        assert live.proc.poll() is None
    finally:
        live.proc.send_signal(signal.SIGINT)
        live.finish()


def test_determinism_of_a_lightning_run_replays_in_two_processes_and_catches_noise(
    project: Path,
) -> None:
    pytest.importorskip("lightning")
    from tests.integration.test_lightning import _script

    live = start(project, _script(project), "--epochs", "40", "--step-sleep", "0.05", "--noise")
    try:
        before = live.wait_for(lambda s: live.main_run(s)["step"] >= 3, timeout=120)
        r = cli("health", "--check", "determinism", "--json", cwd=project, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        det = verdicts(r.stdout)["determinism"]
        n = det["numbers"]
        assert det["verdict"] == "fail", det["hint"]
        assert n["mode"] == "side-process" and n["pid"] != main_worker(before)["pid"], n
        assert n["first_difference"].startswith("model.net."), n
        assert f"'{n['first_difference']}'" in det["hint"], det["hint"]
        assert "two side processes" in det["hint"], det["hint"]
        # The replays sent nothing as the run: its steps go on from where they were.
        after = live.status()
        assert live.main_run(after)["status"] == "running"
        assert live.main_run(after)["step"] > live.main_run(before)["step"]
    finally:
        live.proc.send_signal(signal.SIGINT)
        live.finish()
