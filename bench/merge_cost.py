"""Merge costs: arithmetic in ns per parameter per model, and Fisher estimation vs training.

1. Merge arithmetic (the merge worker's `merge_math` on state dicts already in memory):
   `swa_average`, `fisher_soup` (Fishers given) and `adapter_fuse` (rank-r deltas) over k
   models of P parameters; prints seconds / (P x k) in ns. Goal (issue 4): <= 10 ns.
2. Fisher estimation (`diagonal_fisher`: batched per-sample gradients for Linear/Conv2d
   models, torch.func otherwise; the line says which was used; as the
   merge worker runs it for `fisher_soup` with its default 256 samples per model) against
   the compute that trained the models: the Fisher's wall time is converted into training
   sample-steps of the same model (measured here: forward + backward + SGD step at the
   training batch size), then divided by the sample-steps the models were trained for.
   Goal: <= 1%. The training budget defaults to the bench workload's main run plus one
   fork (see --main-sample-steps / --fork-sample-steps); the break-even budget is printed
   too.

    python bench/merge_cost.py [--params 4000000] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onthefly_worker import merge_math as mm  # noqa: E402

NS_GOAL = 10.0
FISHER_GOAL = 0.01
FISHER_SAMPLES = 256  # merge_role's default per model (fisher_samples option)


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # first call: allocator and thread-pool warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def states(params: int, k: int) -> list[dict[str, torch.Tensor]]:
    """k state dicts shaped like an MLP with 1024-wide layers (weights + biases)."""
    width = 1024
    layers = max(1, params // (width * width + width))
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        sd: dict[str, torch.Tensor] = {}
        for i in range(layers):
            sd[f"l{i}.weight"] = torch.randn(width, width, generator=g)
            sd[f"l{i}.bias"] = torch.randn(width, generator=g)
        out.append(sd)
    return out


def arithmetic(params: int, reps: int) -> None:
    for k in (2, 4):
        sds = states(params, k)
        n = sum(t.numel() for t in sds[0].values())
        fishers = [{key: t.abs() + 0.1 for key, t in sd.items()} for sd in sds]
        rank = 8
        g = torch.Generator().manual_seed(1)
        deltas = [
            {
                key: (
                    torch.randn(rank, t.shape[1], generator=g),
                    torch.randn(t.shape[0], rank, generator=g),
                    0.5,
                )
                for key, t in sd.items()
                if t.dim() == 2
            }
            for sd in sds
        ]
        for name, fn in (
            ("swa_average", lambda sds=sds: mm.swa_average(sds)),
            ("fisher_soup", lambda sds=sds, f=fishers: mm.fisher_soup(sds, f)),
            ("adapter_fuse", lambda sds=sds, d=deltas: mm.adapter_fuse(sds[0], d)),
        ):
            t = timed(fn, reps)
            ns = 1e9 * t / (n * k)
            print(
                f"{name:<13} k={k}  {n / 1e6:5.2f} M params  {t * 1e3:8.1f} ms  "
                f"{ns:6.2f} ns/param/model  (goal <= {NS_GOAL:.0f}: ratio {ns / NS_GOAL:.2f})"
            )


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def fisher_vs_training(main_ss: int, fork_ss: int) -> None:
    """The bench workload's two models (bench/_workload.py), with its batch sizes."""
    for name, make, shape, bs in (("mlp", _mlp, (128,), 128), ("cnn", _cnn, (3, 32, 32), 64)):
        _fisher_one(name, make(), shape, bs, main_ss, fork_ss)


def _fisher_one(
    name: str, model: nn.Module, shape: tuple[int, ...], bs: int, main_ss: int, fork_ss: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2048, *shape)
    y = torch.randint(0, 10, (2048,))
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batches = list(loader)

    def train(steps: int = 20) -> None:
        for i in range(steps):
            xb, yb = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()

    t_train = timed(train, 3) / (20 * bs)  # seconds per training sample-step
    per_sample = nn.CrossEntropyLoss(reduction="none")
    how: dict[str, object] = {}
    t_fisher = timed(
        lambda: mm.diagonal_fisher(model, loader, per_sample, "cpu", FISHER_SAMPLES, info=how), 3
    )
    equiv = t_fisher / t_train  # in training sample-steps
    models = 2  # a soup of the main run and one fork: one Fisher each
    ratio = models * equiv / (main_ss + fork_ss)
    print(
        f"fisher {name} ({how.get('method')} per-sample gradients): {FISHER_SAMPLES} samples "
        f"in {t_fisher * 1e3:.1f} ms = "
        f"{equiv:,.0f} training sample-steps ({t_fisher / FISHER_SAMPLES * 1e6:.0f} us/sample vs "
        f"{t_train * 1e6:.1f} us per training sample-step)"
    )
    print(
        f"fisher {name} / training compute: {100 * ratio:.3f}% for main ({main_ss:,}) + fork "
        f"({fork_ss:,}) sample-steps (goal <= {100 * FISHER_GOAL:.0f}%: ratio "
        f"{ratio / FISHER_GOAL:.2f}); within the goal for models trained on >= "
        f"{models * equiv / FISHER_GOAL:,.0f} sample-steps in total"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=4_000_000, help="parameters per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--main-sample-steps",
        type=int,
        default=1000 * 128,
        help="main run's training (bench workload: 1000 steps x batch 128)",
    )
    ap.add_argument(
        "--fork-sample-steps",
        type=int,
        default=300 * 128,
        help="one fork's training (the default 300-step budget x batch 128)",
    )
    args = ap.parse_args()
    if args.params < 1 or args.threads < 1 or args.reps < 1:
        ap.error("--params, --threads and --reps must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}")
    arithmetic(args.params, args.reps)
    fisher_vs_training(args.main_sample_steps, args.fork_sample_steps)


if __name__ == "__main__":
    main()
