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
BENCH_REPS rounds (default 5) give the medians.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
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


def supervised(model: str, steps: int, warmup: int) -> tuple[float, float]:
    """(supervised ms/step, the raw loop's ms/step in the same process: mean of the
    timings before and after fit())."""
    with tempfile.TemporaryDirectory() as d:
        inline = os.path.join(d, "inline-raw.json")
        subprocess.run(
            [
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
            ],
            cwd=d,
            capture_output=True,
            text=True,
            check=True,
        )
        db = sqlite3.connect(os.path.join(d, ".onthefly", "sessions", "latest", "session.db"))
        rows = db.execute(
            "SELECT step, t FROM metrics WHERE run_id='main' AND step IN (?, ?) ORDER BY step",
            (warmup, steps),
        ).fetchall()
        db.close()
        (s0, t0), (s1, t1) = rows
        with open(inline) as f:
            around = json.load(f)
        return 1000 * (t1 - t0) / (s1 - s0), (around["before_ms"] + around["after_ms"]) / 2


def main() -> None:
    reps = int(os.environ.get("BENCH_REPS", "5"))
    for model, steps in (("mlp", 2000), ("cnn", 250)):
        rounds = []  # (raw in its own processes, raw in the worker process, supervised)
        for _ in range(reps):
            before = raw(model, steps, 50)
            sup, inline = supervised(model, steps, 50)
            rounds.append(((before + raw(model, steps, 50)) / 2, inline, sup))
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
        print(f"{model} overhead ratio: {statistics.median(inline_r):.3f}")


if __name__ == "__main__":
    main()
