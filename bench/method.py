"""Does the method work? Generalist -> fork specialists -> gate (MoE) and merges, against the
generalist trained on for the same total compute, on the same data.

For each data set it drives a real session through the CLI (supervisor, fork workers,
merge worker), exactly as a user would:

    onthefly run --keep-alive SCRIPT                      # the generalist ("main")
    onthefly fork --select quantile:0.85:1.0              # fork-1: the loss tail
    onthefly fork --select kmeans:auto                    # fork-2: the hardest residual cluster
    onthefly fork --select quantile:0.85:1.0 --adapters R # fork-3: low-rank, for adapter_fuse
    onthefly gate main fork-1 fork-2                      # moe-1: switch_softmax router
    onthefly merge --method swa|fisher_soup|distill main fork-1; adapter_fuse fork-3
    onthefly fork --select all --budget-steps N --name baseline

Compute is what the product counts per run (`sample_steps` in `onthefly runs --json`):
one sample through a training step (forward + backward) is 1; the gate's frozen experts
only run forward, 1/3 each per sample; a Fisher soup's per-sample gradients count 1 per
sample per model. A result's compute is main's
plus that of every run it was built from (the MoE: fork-1, fork-2 and the gate; a merge:
its parents and the merge itself). The baseline is `main` continued (its checkpoint,
optimizer and learning rate) on all the data for the LARGEST of those, so it gets at
least as much compute as any result it is compared with.

Test loss overall comes from the product (each run's test evaluation); the hard slice
is scored here on exported models (`onthefly export-model` -> `onthefly.load_model`)
on the TEST set: for the mixture, the hard regime by construction; for digits, the
three classes with the highest generalist loss on the validation set (chosen on val,
measured on test, so the choice does not favour any model on the test noise).

    python bench/method.py                  # mixture (regimes of a regression) + digits
    python bench/method.py --only mixture   # one data set
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TERMINAL = ("completed", "failed", "stopped")


def cli(cwd: str, *args: str, timeout: float = 900) -> str:
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


def cli_json(cwd: str, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli(cwd, *args, "--json"))
    return out


def runs(cwd: str) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in cli_json(cwd, "runs")["runs"]}


def wait_runs(cwd: str, ids: list[str], timeout: float = 900) -> dict[str, dict[str, Any]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            rs = runs(cwd)
        except RuntimeError:  # the supervisor is still starting
            time.sleep(0.5)
            continue
        if all(rs.get(i, {}).get("status") in TERMINAL for i in ids):
            bad = [i for i in ids if rs[i]["status"] != "completed"]
            if bad:
                raise RuntimeError(
                    "; ".join(f"{i} {rs[i]['status']}: {rs[i].get('error', '')}" for i in bad)
                )
            return rs
        time.sleep(0.5)
    raise TimeoutError(f"runs {ids} did not finish within {timeout:.0f} s")


def pipeline_compute(rs: dict[str, dict[str, Any]], rid: str) -> int:
    """Sample-steps of `rid` and every run it descends from (main included)."""
    seen: set[str] = set()
    todo = [rid]
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo.extend(rs[r]["parents"])
    return sum(int(rs[r]["sample_steps"]) for r in seen)


def bootstrap_ratio(a: Tensor, b: Tensor, draws: int = 2000) -> tuple[float, float]:
    """95% interval of mean(a) / mean(b) over test samples resampled with replacement
    (paired: the same samples for both): how much of a ratio is test-set noise."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a.shape[0], (draws, a.shape[0]), generator=g)
    r = a[idx].mean(dim=1) / b[idx].mean(dim=1)
    q = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=r.dtype))
    return float(q[0]), float(q[1])


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem.lstrip("_") + "_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    script: str
    args: list[str]
    classification: bool
    budget: int
    """Steps of each fork."""
    adapter_rank: int
    """Rank of fork-3's low-rank adapters (below the width of the layers they adapt)."""
    hard_desc: str
    per_sample: Callable[[Tensor, Tensor], Tensor]
    test: Callable[[], tuple[Tensor, Tensor]]
    hard_mask: Callable[[dict[str, nn.Module]], Tensor]
    """Given the loaded models (main at least), which test samples form the hard slice."""
    notes: list[str] = field(default_factory=list)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).reshape(out.shape[0], -1).mean(dim=1)


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def mixture() -> Workload:
    mod = _import(ROOT / "bench" / "_mixture.py")
    _, _, test = mod.splits(8192)
    z, y = test.tensors
    return Workload(
        name="mixture (8-output regression, a hard regime z0 >= 0.7 that a 2-8-8-8 MLP underfits)",
        script="bench/_mixture.py",
        args=[],
        classification=False,
        budget=1000,
        adapter_rank=4,
        hard_desc=f"hard regime z0 >= {mod.HARD_FROM} ({int(mod.is_hard(z).sum())} of {len(z)} test samples)",
        per_sample=_mse,
        test=lambda: (z, y),
        hard_mask=lambda models: mod.is_hard(z),
    )


def digits(epochs: int) -> Workload:
    mod = _import(ROOT / "examples" / "digits_cnn.py")
    _, val_loader, test_loader = mod.build_loaders(64)
    xv, yv = (torch.cat(t) for t in zip(*val_loader, strict=True))
    xt, yt = (torch.cat(t) for t in zip(*test_loader, strict=True))
    w = Workload(
        name=f"digits (sklearn's bundled 8x8 digits, examples/digits_cnn.py, {epochs} epochs)",
        script="examples/digits_cnn.py",
        args=["--epochs", str(epochs)],
        classification=True,
        budget=150,
        adapter_rank=8,
        hard_desc="",
        per_sample=_ce,
        test=lambda: (xt, yt),
        hard_mask=lambda models: torch.zeros(0, dtype=torch.bool),
    )

    def hard_mask(models: dict[str, nn.Module]) -> Tensor:
        with torch.no_grad():
            lv = _ce(models["main"](xv), yv)
        per_class = torch.stack([lv[yv == c].mean() for c in range(10)])
        worst = per_class.argsort(descending=True)[:3].tolist()
        mask = torch.isin(yt, torch.tensor(worst))
        w.hard_desc = (
            f"classes {sorted(worst)} (highest generalist val loss; {int(mask.sum())} of "
            f"{len(yt)} test samples)"
        )
        return mask

    w.hard_mask = hard_mask
    return w


# --------------------------------------------------------------------------- one session


def one(w: Workload) -> dict[str, float]:
    t0 = time.time()
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
                str(ROOT / w.script),
                *w.args,
            ],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_runs(d, ["main"])
            b = str(w.budget)
            replies = [
                cli_json(d, "fork", "--select", sel, "--budget-steps", b, *extra)
                for sel, extra in (
                    ("quantile:0.85:1.0", ()),
                    ("kmeans:auto", ()),
                    ("quantile:0.85:1.0", ("--adapters", str(w.adapter_rank))),
                )
            ]
            forks = [r["run_id"] for r in replies]
            fork_lines = [str(r.get("message", "")) for r in replies]
            wait_runs(d, forks)
            q, km, ad = forks
            moe = cli_json(d, "gate", "main", q, km, "--no-wait")["run_id"]
            wait_runs(d, [moe])
            rows: list[tuple[str, str]] = [
                ("generalist (main)", "main"),
                (f"specialist {q} (quantile:0.85:1.0)", q),
                (f"specialist {km} (kmeans:auto)", km),
                (f"MoE {moe}: gate over main, {q}, {km}", moe),
            ]
            for m in ["swa", "fisher_soup"] + (["distill"] if w.classification else []):
                rows.append(
                    (
                        f"{m} (main + {q})",
                        cli_json(d, "merge", "--method", m, "main", q, "--no-wait")["run_id"],
                    )
                )
            rows.append(
                (
                    f"adapter_fuse ({ad})",
                    cli_json(d, "merge", "--method", "adapter_fuse", ad, "--no-wait")["run_id"],
                )
            )
            rs = wait_runs(d, [rid for _, rid in rows])
            main = rs["main"]
            # Each result's compute: main plus every run in its lineage after main.
            compute = {rid: pipeline_compute(rs, rid) for _, rid in rows}
            extra = max(compute.values()) - main["sample_steps"]
            # Samples per step of a pass over all the data (a short last batch included),
            # rounded down so that the baseline never gets less than `extra`.
            per_step = max(1, main["sample_steps"] // max(1, main["step"]))
            budget = max(1, math.ceil(extra / per_step))
            base = cli_json(
                d, "fork", "--select", "all", "--budget-steps", str(budget), "--name", "baseline"
            )["run_id"]
            rs = wait_runs(d, [base])
            compute[base] = pipeline_compute(rs, base)
            rows.insert(1, (f"baseline {base}: main + {budget} steps on all data", base))

            # The hard slice, scored on exported models.
            models: dict[str, nn.Module] = {}
            from onthefly import load_model

            for _, rid in rows:
                path = str(Path(d) / f"{rid}.pt")
                cli(d, "export-model", "--run", rid, "-o", path)
                models[rid] = load_model(path).eval()
            x, y = w.test()
            mask = w.hard_mask(models)
            ours: dict[str, tuple[float, float]] = {}
            per_sample: dict[str, Tensor] = {}
            with torch.no_grad():
                for rid, model in models.items():
                    per = w.per_sample(model(x), y)
                    ours[rid] = (float(per.mean()), float(per[mask].mean()))
                    per_sample[rid] = per
        finally:
            proc.terminate()
            proc.wait(60)

    print(f"\n== {w.name}")
    print("\n".join(fork_lines))
    print(
        "compute = sample-steps as the product counts them (runs --json): "
        + ", ".join(f"{k} {r['sample_steps']}" for k, r in rs.items())
    )
    print(f"hard slice: {w.hard_desc}")
    bt, bh = rs[base]["test_loss"], ours[base][1]
    print(
        f"{'result':<48}{'compute':>9}{'test loss':>11}{'÷ base':>8}{'hard slice':>12}{'÷ base':>8}"
    )
    for label, rid in rows:
        tl = rs[rid]["test_loss"]
        if tl is None:
            print(f"{label:<48}{compute[rid]:>9}{'failed':>11}  {rs[rid]['error'][:60]}")
            continue
        hl = ours[rid][1]
        print(f"{label:<48}{compute[rid]:>9}{tl:>11.4f}{tl / bt:>8.3f}{hl:>12.4f}{hl / bh:>8.3f}")
        if abs(ours[rid][0] - tl) > 1e-3 * max(1.0, abs(tl)):
            print(f"  (note: the exported {rid} scores {ours[rid][0]:.4f} on the test set here)")
    print(
        f"(compute of a result: main + the runs it was built from; the baseline got the "
        f"largest of them, {compute[base]} >= {compute[moe]} of the MoE)"
    )
    ratio, hard_ratio = rs[moe]["test_loss"] / bt, ours[moe][1] / bh
    lo, hi = bootstrap_ratio(per_sample[moe], per_sample[base])
    hlo, hhi = bootstrap_ratio(per_sample[moe][mask], per_sample[base][mask])
    tag = w.name.split(" ")[0]
    print(
        f"{tag} moe/baseline test-loss ratio: {ratio:.3f} (95% paired bootstrap {lo:.3f}..{hi:.3f})"
    )
    print(
        f"{tag} moe/baseline hard-slice test-loss ratio: {hard_ratio:.3f} "
        f"(95% paired bootstrap {hlo:.3f}..{hhi:.3f})"
    )
    print(f"({time.time() - t0:.0f} s)")
    return {"ratio": ratio, "hard_ratio": hard_ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["mixture", "digits"], default=None)
    p.add_argument(
        "--digits-epochs", type=int, default=40, help="its val loss plateaus by about 25"
    )
    a = p.parse_args()
    if a.only in (None, "mixture"):
        one(mixture())
    if a.only in (None, "digits"):
        one(digits(a.digits_epochs))


if __name__ == "__main__":
    main()
