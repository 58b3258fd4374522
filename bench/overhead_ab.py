"""Supervised ÷ raw step time, alternating every ~2 s in one run: a steadier overhead.py.

overhead.py compares a whole supervised run with raw loops seconds to tens of seconds away;
this VM's speed drifts by several percent over such times (the same code measured 1.04-1.34
per pair), more than the overhead it measures. Here both run at once, taking turns:

* `onthefly run bench/_workload.py onthefly` trains the workload for long, with per-sample
  losses recorded and stored as usual; the bench pauses and resumes it over gRPC (as
  `onthefly pause` / `onthefly resume` do);
* while it is paused (and its pause checkpoint written), raw PyTorch steps of the same
  workload (its model and data warm) train as many steps. By default they run on a thread
  of the supervised worker process itself (`_workload.py --raw-socket`: its own copy of
  the model and its own loader; the paused training thread waits without the GIL), so a
  per-process speed offset cancels too: two processes of the same code can run a few
  percent apart for their whole lives, either way (a CNN pair at 0.94, the next at 1.01).
  BENCH_AB_RAW=process runs them in a separate process instead (`_workload.py rawserve`).

Each supervised phase's step time is the wall time between its stored steps (`metrics.t`,
taken by the worker at each step's end; its first 0.25 s are left out as the resume's
warm-up), divided by the mean of the raw phases just before and after it, so drift over
seconds cancels. The bench starts BENCH_AB_PAIRS fresh runs (default 4) and prints the
median of their medians.

    python bench/overhead_ab.py                        # MLP (~2 ms steps), ~2.5 min
    BENCH_MODELS=cnn BENCH_AB_PHASE_S=3 python bench/overhead_ab.py
    (BENCH_AB_ROUNDS: phases per pair, default 6; BENCH_AB_PHASE_S: seconds, default 2)
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.client import ControlClient, connect

HERE = Path(__file__).resolve().parent
WORK = HERE / "_workload.py"
PY = sys.executable
ONTHEFLY = str(Path(PY).with_name("onthefly"))
PHASE_S = float(os.environ.get("BENCH_AB_PHASE_S", "2.0"))
# Left out after a resume (warm-up) and waited after a pause (its checkpoint is written).
SETTLE_S = float(os.environ.get("BENCH_AB_SETTLE_S", "0.25"))


def _client(project: str, deadline: float) -> ControlClient:
    while True:
        try:
            return connect(None, project_dir=project)
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _act(client: ControlClient, method: str) -> None:
    reply = client.call(method, pb.RunRequest(run="", wait=True, timeout_s=30), timeout=35)
    if not reply.ok:
        raise SystemExit(f"{method} failed: {reply.message}")


def _step(client: ControlClient) -> int:
    st = client.call("GetStatus", pb.StatusRequest(), timeout=5)
    return max((w.step for w in st.workers), default=0)


def _phase_ms(db: sqlite3.Connection, t0: float, t1: float) -> float | None:
    rows = db.execute(
        "SELECT step, t FROM metrics WHERE run_id='main' AND t >= ? AND t <= ? ORDER BY step",
        (t0, t1),
    ).fetchall()
    if len(rows) < 20:
        return None
    (s0, a), (s1, b) = rows[0], rows[-1]
    return 1000.0 * (b - a) / (s1 - s0)


def measure(model: str, rounds: int) -> list[float]:
    """One process pair: each supervised phase's step time ÷ the raw phases around it."""
    with tempfile.TemporaryDirectory(prefix="otf-bench-ab-", ignore_cleanup_errors=True) as d:
        return _measure_in(d, model, rounds)


class _RawSteps:
    """Raw phases: a line N to a rawserve protocol peer, its ms per step back."""

    def __init__(self, project: str, model: str, inproc: bool) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.sock: socket.socket | None = None
        self.f: TextIO | None = None
        self.path = os.path.join(project, "raw.sock")
        if not inproc:
            self.proc = subprocess.Popen(
                [PY, str(WORK), "rawserve", "--model", model],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def connect(self, deadline: float) -> None:
        """(in-process) The supervised worker's raw thread, once it listens."""
        if self.proc is not None:
            return
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                self.sock = s
                self.f = s.makefile("rw")
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def phase(self, seconds: float, step_ms: float) -> float:
        n = f"{max(20, int(seconds * 1000 / step_ms))}\n"
        if self.proc is not None:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(n)
            self.proc.stdin.flush()
            return float(json.loads(self.proc.stdout.readline())["step_ms"])
        assert self.f is not None
        self.f.write(n)
        self.f.flush()
        line = self.f.readline()
        if not line:
            raise SystemExit("the supervised worker's raw thread closed its socket")
        return float(json.loads(line)["step_ms"])

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        if self.sock is not None:
            self.sock.close()


def _measure_in(project: str, model: str, rounds: int) -> list[float]:
    inproc = os.environ.get("BENCH_AB_RAW", "inproc") != "process"
    raw = _RawSteps(project, model, inproc)
    sup = subprocess.Popen(
        [ONTHEFLY, "run", "--port", "0", str(WORK), "onthefly", "--model", model]
        + ["--steps", "100000000"]
        + (["--raw-socket", raw.path] if inproc else []),
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    raw_phase = raw.phase

    try:
        raw.connect(time.monotonic() + 60)
        client = _client(project, time.monotonic() + 60)
        deadline = time.monotonic() + 120
        while _step(client) < 200:  # past start-up and the grad-norm calibration
            if sup.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "the supervised run did not reach step 200 within 2 min (`onthefly run "
                    f"bench/_workload.py onthefly --model {model}` shows why)"
                )
            time.sleep(0.2)
        raw_ms = raw_phase(1.0, 2.0)  # warm-up of the raw process
        _act(client, "Pause")
        time.sleep(SETTLE_S)
        raws = [raw_phase(PHASE_S, raw_ms)]
        windows = []
        for _ in range(rounds):
            _act(client, "Resume")
            t0 = time.time() + SETTLE_S
            time.sleep(SETTLE_S + PHASE_S)
            t1 = time.time()
            _act(client, "Pause")
            windows.append((t0, t1))
            time.sleep(SETTLE_S)
            raws.append(raw_phase(PHASE_S, raws[-1]))
        _act(client, "Stop")
    finally:
        raw.close()
        try:
            sup.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sup.terminate()
            sup.wait()
    db_path = Path(project, ".onthefly", "sessions", "latest", "session.db")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ratios = []
        for i, (t0, t1) in enumerate(windows):
            ms = _phase_ms(db, t0, t1)
            if ms is not None:
                ratios.append(ms / ((raws[i] + raws[i + 1]) / 2))
        return ratios
    finally:
        db.close()


def main() -> None:
    pairs = int(os.environ.get("BENCH_AB_PAIRS", "4"))
    rounds = int(os.environ.get("BENCH_AB_ROUNDS", "6"))
    for model in os.environ.get("BENCH_MODELS", "mlp").split(","):
        per_pair = []
        for _ in range(pairs):
            r = measure(model, rounds)
            if r:
                per_pair.append(statistics.median(r))
                print(
                    f"{model}: pair {len(per_pair)}: median {per_pair[-1]:.3f} of "
                    + ", ".join(f"{x:.3f}" for x in sorted(r)),
                    flush=True,
                )
        if not per_pair:
            raise SystemExit(f"{model}: no phase had enough stored steps")
        print(
            f"{model} in-run overhead ratio: {statistics.median(per_pair):.3f} (median of "
            f"{len(per_pair)} process pairs, {rounds} alternating phases of {PHASE_S:g} s each)"
        )


if __name__ == "__main__":
    main()
