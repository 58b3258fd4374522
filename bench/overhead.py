"""Supervised step time ÷ raw PyTorch step time, measured in one run, interleaved.

The raw loop and the `onthefly run` worker train the same model on the same data for the
same steps on one CPU thread each. OnTheFly's number is the wall time between step W and
the last step as recorded by the worker (the supervisor, the per-sample loss stream and
the store all run meanwhile, on the same machine). Start-up (imports, spawn) is excluded
from both. Prints `overhead ratio: X.XXX` per model (median over the pairs).

This VM's speed drifts by ±10% over tens of seconds (other tenants), and a run right after
a busy one measures slower, so each pair runs raw, supervised, raw and divides by the mean
of the two raw runs; BENCH_REPS pairs (default 5) give the median.
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


def supervised(model: str, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as d:
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
        return 1000 * (t1 - t0) / (s1 - s0)


def main() -> None:
    reps = int(os.environ.get("BENCH_REPS", "5"))
    for model, steps in (("mlp", 2000), ("cnn", 250)):
        pairs = []
        for _ in range(reps):
            before = raw(model, steps, 50)
            s = supervised(model, steps, 50)
            r = (before + raw(model, steps, 50)) / 2
            pairs.append((r, s, s / r))
        ratios = [p[2] for p in pairs]
        print(
            f"{model}: raw {statistics.median(p[0] for p in pairs):.3f} ms/step · onthefly "
            f"{statistics.median(p[1] for p in pairs):.3f} ms/step · ratios "
            + ", ".join(f"{x:.3f}" for x in ratios)
        )
        print(f"{model} overhead ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
