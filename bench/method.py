"""Does the method work? Generalist -> fork specialists -> gate / merges, against the
generalist trained on for the same total compute (sample-steps), on the same data.

For each data set it runs a real session through the CLI (supervisor, fork workers,
merge worker), then prints a table of test losses and
`moe/baseline test-loss ratio: X.XXX` (goal <= 0.85 overall).

    python bench/method.py               # regimes (hard-region regression) + digits (sklearn)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def cli(cwd: str, *args: str, timeout: float = 600) -> str:
    r = subprocess.run(
        [PY, "-m", "onthefly_supervisor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"onthefly {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}"
        )
    return r.stdout


def runs(cwd: str) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in json.loads(cli(cwd, "runs", "--json"))["runs"]}


def one(name: str, script: str, args: list[str], classification: bool, budget: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "onthefly_supervisor",
                "run",
                "--headless",
                "--keep-alive",
                "--port",
                "0",
                str(ROOT / script),
                *args,
            ],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                try:
                    if runs(d).get("main", {}).get("status") == "completed":
                        break
                except RuntimeError:
                    pass
                time.sleep(0.5)
            cli(d, "fork", "--select", "quantile:0.85:1.0", "--budget-steps", str(budget), "--wait")
            cli(d, "fork", "--select", "kmeans:auto", "--budget-steps", str(budget), "--wait")
            cli(
                d,
                "fork",
                "--select",
                "quantile:0.7:1.0",
                "--budget-steps",
                str(budget),
                "--adapters",
                "8",
                "--wait",
            )
            cli(d, "gate", "main", "fork-1", "fork-2")
            results: list[tuple[str, str]] = [("moe (gate over main, fork-1, fork-2)", "moe-1")]
            methods = ["swa", "fisher_soup"] + (["distill"] if classification else [])
            for i, m in enumerate(methods, start=1):
                cli(d, "merge", "--method", m, "main", "fork-1")
                results.append((f"{m} (main + fork-1)", f"merge-{i}"))
            cli(d, "merge", "--method", "adapter_fuse", "fork-3")
            results.append(("adapter_fuse (fork-3)", f"merge-{len(methods) + 1}"))
            rs = runs(d)
            extra = sum(r["sample_steps"] for k, r in rs.items() if k != "main")
            main = rs["main"]
            per_step = max(1, round(main["sample_steps"] / max(1, main["step"])))
            out = cli(
                d,
                "fork",
                "--select",
                "all",
                "--budget-steps",
                str(max(1, round(extra / per_step))),
                "--name",
                "baseline",
                "--wait",
            )
            base_id = out.split(":")[0].strip()
            rs = runs(d)
            base = rs[base_id]["test_loss"]
            print(
                f"\n{name}: generalist test loss {main['test_loss']:.4f}; specialists used {extra} sample-steps; "
                f"baseline = main trained on for the same compute ({base_id}): test loss {base:.4f}"
            )
            print(f"{'result':<40}{'test loss':>12}{'÷ baseline':>12}")
            for label, rid in results:
                tl = rs[rid]["test_loss"]
                print(
                    f"{label:<40}{tl:>12.4f}{tl / base:>12.3f}"
                    if tl is not None
                    else f"{label:<40}{'failed':>12}  {rs[rid]['error'][:60]}"
                )
            cmp = cli(
                d, "compare", "main", "fork-1", "moe-1", base_id, "--slices", "fork-1", "test"
            )
            print(
                "loss on the hard slice (fork-1's selection) and on the test set:\n" + cmp.rstrip()
            )
            moe = rs["moe-1"]["test_loss"]
            print(f"{name} moe/baseline test-loss ratio: {moe / base:.3f}")
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    one("regimes (regression, hard region x >= 0.7)", "examples/regimes.py", [], False, 300)
    one("digits (sklearn, CNN)", "examples/digits_cnn.py", [], True, 150)


if __name__ == "__main__":
    main()
