"""Shared fixtures: real supervisors and workers on loopback, in a temp project folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "integration" / "scripts"
EXAMPLES = ROOT / "examples"
PY = sys.executable


def cli(
    *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [PY, "-m", "onthefly_supervisor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def train_env(session_dir: Path) -> Any:
    """The environment of a `main` train worker, for running the training loop in-process."""
    from onthefly_worker.env import WorkerEnv

    return WorkerEnv(
        addr="127.0.0.1:1", token="t", worker_id="main-0", role="train", run_id="main",
        session_dir=str(session_dir), error_file="", resume="", spec="", attempt=0,
    )  # fmt: skip


def cli_json(*args: str, cwd: Path) -> Any:
    """`onthefly ARGS --json` in `cwd`, parsed. It runs the CLI's own `main()` in this
    process: the tests poll `status`/`runs` every 0.2 s, and a fresh interpreter per poll
    costs ~0.4 s of CPU on a 2-core CI machine (the wall-time gain measured small: the waits
    are the workers' own). `cli()` still runs the installed entry point as its own process."""
    from onthefly_supervisor.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--json"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


@dataclass
class Live:
    proc: subprocess.Popen[str]
    cwd: Path
    session_dir: Path
    conn: dict[str, Any]

    def status(self) -> dict[str, Any]:
        return cli_json("status", cwd=self.cwd)

    def wait_for(self, pred: Any, timeout: float = 30, every: float = 0.2) -> dict[str, Any]:
        deadline = time.time() + timeout
        last: dict[str, Any] = {}
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"supervisor exited ({self.proc.returncode}) while waiting: {self.output()}"
                )
            try:
                last = self.status()
                if pred(last):
                    return last
            except AssertionError:
                pass
            time.sleep(every)
        raise AssertionError(
            f"condition not met in {timeout}s; last status: {json.dumps(last)[:2000]}"
        )

    def main_run(self, st: dict[str, Any]) -> dict[str, Any]:
        return next(r for r in st["runs"] if r["run_id"] == "main")

    def worker_pids(self, st: dict[str, Any]) -> list[int]:
        return [w["pid"] for w in st["workers"] if w["pid"]]

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stdout.read() if self.proc.stdout else ""


def start(
    cwd: Path,
    script: Path,
    *args: str,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Live:
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "onthefly_supervisor",
            "run",
            "--headless",
            "--port",
            "0",
            *extra,
            str(script),
            *args,
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=e,
    )
    latest = cwd / ".onthefly" / "sessions" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        cj = latest / "connection.json"
        if cj.exists():
            try:
                conn = json.loads(cj.read_text())
                return Live(proc, cwd, latest.resolve(), conn)
            except ValueError:
                pass
        if proc.poll() is not None:
            raise AssertionError(
                f"supervisor exited early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("supervisor did not write connection.json")


def wait_main_step(project: Path, step: int, timeout: float = 60) -> None:
    """Wait (at most `timeout` s) until the latest session's main run has trained `step`
    steps: for a `python train.py` run, which `start()` does not launch."""
    db = project / ".onthefly" / "sessions" / "latest" / "session.db"
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = cli_json("runs", cwd=project)["runs"] if db.exists() else []
        if runs and runs[0]["step"] >= step:
            return
        time.sleep(0.2)


def interrupt_plain_python(
    project: Path, script: Path, args: tuple[str, ...], sig: int, timeout: float = 60
) -> str:
    """`python SCRIPT ARGS` in the project, sent `sig` once its main run has trained 20
    steps; checks it stopped with a checkpoint at its step (status `stopped`, exit by the
    signal, the 'stopped at step N' line); returns its output."""
    p = subprocess.Popen(
        [PY, str(script), *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not a background job's
    )
    try:
        wait_main_step(project, 20, timeout)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode in (128 + sig, -sig), (p.returncode, out)
    main = cli_json("runs", cwd=project)["runs"][0]
    assert main["status"] == "stopped", main
    step = main["step"]
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    assert (sdir / "checkpoints" / "main" / f"step-{step:08d}.pt").exists(), out
    assert f"stopped at step {step} (checkpoints/main/step-{step:08d}.pt)" in out, out
    assert "Traceback" not in out, out  # the line says it all
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # No test may leave processes behind: kill anything still listed in a connection file.
    for cj in tmp_path.glob(".onthefly/sessions/*/connection.json"):
        try:
            pid = json.loads(cj.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
