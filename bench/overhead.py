"""Supervised step time ÷ raw PyTorch step time, measured in one run, interleaved.

The raw loop and the `onthefly run` worker train the same model on the same data for the
same steps on one CPU thread each. OnTheFly's number is the wall time between step W and
the last step as recorded by the worker (the supervisor, the per-sample loss stream and
the store all run meanwhile, on the same machine). Start-up (imports, spawn) is excluded
from both. Prints `overhead ratio: X.XXX` per model (median over the pairs).

This VM's speed drifts by ±10% over tens of seconds (other tenants), and a run right after
a busy one measures slower. So the raw loop is timed twice around each supervised run: in
the worker process itself, right before and right after fit() (seconds apart: the
`overhead ratio` divides by their mean), and in processes of its own before and after the
`onthefly run` (tens of seconds apart: printed as `separate-process ratio`, a cross-check
that the worker process itself, e.g. its imports or environment, slows nothing down).
BENCH_REPS rounds (default 5) give the medians; BENCH_MODELS=mlp (or cnn) runs one model.

A steadier number comes with it on Linux: the share of the supervised run's wall time that
the worker's training thread was on a CPU (from /proc/<pid>/schedstat, sampled while it
trains). The raw loop's is ~100%; what is missing is time that thread waited for the GIL
(held by the packing and gRPC threads) or for a CPU (taken by the supervisor and those
threads). It does not drift with the VM's speed as step times do, so it shows changes of a
fraction of a percent that the ratio cannot. The rest of the overhead is work the training
thread itself does per step (bench/recorder_ab.py and bench/loop_overhead.py isolate it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_workload.py"
PY = sys.executable


def raw(model: str, steps: int, warmup: int) -> float:
    out = subprocess.run(
        [PY, str(WORK), "raw", "--model", model, "--steps", str(steps), "--warmup", str(warmup)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["step_ms"])


def _worker_pid(supervisor: int) -> int | None:
    """The `onthefly run` worker's pid (a child of the supervisor), on Linux."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == supervisor and b"onthefly_worker" in cmd:
            return int(stat.parent.name)
    return None


def _on_cpu_ns(pid: int) -> int | None:
    """Nanoseconds the process's main thread (the training thread) has run on a CPU."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _last_step(db_path: str) -> int:
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(
                db.execute("SELECT max(step) FROM metrics WHERE run_id='main'").fetchone()[0] or 0
            )
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def supervised(model: str, steps: int, warmup: int) -> tuple[float, float, float | None]:
    """(supervised ms/step, the raw loop's ms/step in the same process: mean of the
    timings before and after fit(), the training thread's on-CPU share of the wall time
    while it trained or None where /proc does not say)."""
    with tempfile.TemporaryDirectory() as d:
        inline = os.path.join(d, "inline-raw.json")
        cmd = [
            PY,
            "-m",
            "onthefly_supervisor",
            "run",
            "--headless",
            "--port",
            "0",
            str(WORK),
            "onthefly",
            "--model",
            model,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--inline-raw",
            inline,
        ]
        db_path = os.path.join(d, ".onthefly", "sessions", "latest", "session.db")
        proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Sample the training thread's CPU time from the first stored step past the warm-up
        # to the last one stored before the run's end (flushes land every ~50 ms).
        first: tuple[int, float] | None = None
        last: tuple[int, float] | None = None
        pid: int | None = None
        while proc.poll() is None:
            time.sleep(0.05)
            if pid is None:
                pid = _worker_pid(proc.pid)
                continue
            step = _last_step(db_path) if os.path.exists(db_path) else 0
            ns = _on_cpu_ns(pid)
            if ns is None or step <= warmup or step >= steps:
                continue
            if first is None:
                first = (ns, time.monotonic())
            else:
                last = (ns, time.monotonic())
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"onthefly run failed ({proc.returncode}): {err.decode()[-2000:]}")
        on_cpu = (
            (last[0] - first[0]) / 1e9 / (last[1] - first[1])
            if first is not None and last is not None and last[1] - first[1] > 0.5
            else None
        )
        db = sqlite3.connect(db_path)
        rows = db.execute(
            "SELECT step, t FROM metrics WHERE run_id='main' AND step IN (?, ?) ORDER BY step",
            (warmup, steps),
        ).fetchall()
        db.close()
        (s0, t0), (s1, t1) = rows
        with open(inline) as f:
            around = json.load(f)
        return 1000 * (t1 - t0) / (s1 - s0), (around["before_ms"] + around["after_ms"]) / 2, on_cpu


def main() -> None:
    reps = int(os.environ.get("BENCH_REPS", "5"))
    only = os.environ.get("BENCH_MODELS", "mlp,cnn").split(",")
    for model, steps in (("mlp", 2000), ("cnn", 250)):
        if model not in only:
            continue
        rounds = []  # (raw in its own processes, raw in the worker process, supervised)
        on_cpu = []
        for _ in range(reps):
            before = raw(model, steps, 50)
            sup, inline, busy = supervised(model, steps, 50)
            rounds.append(((before + raw(model, steps, 50)) / 2, inline, sup))
            if busy is not None:
                on_cpu.append(busy)
        inline_r = [s / i for _, i, s in rounds]
        separate_r = [s / r for r, _, s in rounds]
        print(
            f"{model}: raw {statistics.median(r[1] for r in rounds):.3f} ms/step in the worker "
            f"process, {statistics.median(r[0] for r in rounds):.3f} in its own · onthefly "
            f"{statistics.median(r[2] for r in rounds):.3f} ms/step · ratios "
            + ", ".join(f"{x:.3f}" for x in inline_r)
        )
        print(
            f"{model} separate-process ratio: {statistics.median(separate_r):.3f} ("
            + ", ".join(f"{x:.3f}" for x in separate_r)
            + ")"
        )
        if on_cpu:
            print(
                f"{model} training thread on a CPU: {100 * statistics.median(on_cpu):.1f}% of "
                "the wall time (" + ", ".join(f"{100 * x:.1f}" for x in on_cpu) + ")"
            )
        print(f"{model} overhead ratio: {statistics.median(inline_r):.3f}")


if __name__ == "__main__":
    main()
