"""GPU paths: forks pinned with CUDA_VISIBLE_DEVICES, AMP on CUDA. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, SCRIPTS, cli, cli_json, start

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]


def test_fork_is_pinned_to_a_gpu(tmp_path: Path) -> None:
    live = start(tmp_path, SCRIPTS / "train_seq.py", "--epochs", "3", extra=("--keep-alive",))
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=180)
        r = cli(
            "fork",
            "--select",
            "quantile:0.8:1.0",
            "--budget-steps",
            "20",
            "--wait",
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        st = live.status()
        fork = next(w for w in st["workers"] if w["run_id"] == "fork-1")
        assert fork["gpu"] != "", "the allocator pinned the fork to a GPU"
        assert st["gpus"] and st["gpus"][0]["name"]
        # The fork's worker really trained on the GPU it was pinned to (CUDA_VISIBLE_DEVICES
        # leaves it exactly one device, which torch calls cuda:0).
        import json
        import sqlite3

        db = sqlite3.connect(live.session_dir / "session.db")
        attached = [
            json.loads(r[0])
            for r in db.execute(
                "SELECT payload FROM events WHERE kind = 'attached' AND run_id = 'fork-1'"
            )
        ]
        db.close()
        assert attached and str(attached[0]["device"]).startswith("cuda"), attached
        assert str(fork["gpu"]) in {str(g["index"]) for g in st["gpus"]}, (fork, st["gpus"])
    finally:
        live.proc.send_signal(2)
        live.finish(120)


def test_amp_on_cuda(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "onthefly_supervisor",
            "run",
            "--headless",
            "--port",
            "0",
            str(EXAMPLES / "amp_scheduler.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli_json("runs", cwd=tmp_path)["runs"][0]["status"] == "completed"
