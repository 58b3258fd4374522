"""Regression with a hard regime: the example `make demo` runs, and the fork / gate demo.

y = sin(2*pi*x) for x < 0.7, and a fast sine (12 cycles per unit) for x >= 0.7. A small
MLP fits the smooth part within a few epochs and barely dents the fast part, so the
per-sample loss separates the two regimes: the top 15% of losses are (almost) all in
x >= 0.7. That is what a specialist fork is for:

    make demo                                            # = onthefly run --headless --port 0 examples/regimes.py
    onthefly run --keep-alive examples/regimes.py        # then, from another terminal:
    onthefly fork --select quantile:0.85:1.0 --budget-steps 300
    onthefly gate main fork-1                            # route between generalist and specialist
    onthefly runs                                        # compare val/test losses in the lineage

At the end the generalist prints its test loss on each regime.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

HARD_FROM = 0.7


def target(x: torch.Tensor) -> torch.Tensor:
    smooth = torch.sin(2 * math.pi * x)
    fast = 0.8 * torch.sin(2 * math.pi * 12 * x)
    return torch.where(x < HARD_FROM, smooth, fast)


def make_split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g)
    y = target(x) + 0.02 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def region_losses(model: nn.Module, ds: TensorDataset) -> tuple[float, float]:
    x, y = ds.tensors
    with torch.no_grad():
        err = (model(x) - y).pow(2).squeeze(1)
    hard = x.squeeze(1) >= HARD_FROM
    return float(err[~hard].mean()), float(err[hard].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n", type=int, default=4096, help="training samples")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--fast", action="store_true", help="2 epochs on 2048 samples")
    p.add_argument(
        "--slices",
        action="store_true",
        help="report the val loss of each region (val_slices): automode can fork on a weak one",
    )
    args = p.parse_args()
    if args.fast:
        args.epochs, args.n = 2, 2048

    train, val, test = make_split(args.n, 1), make_split(512, 2), make_split(512, 3)
    model = nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    result = Trainer(
        project="examples",
        run_name="regimes",
        max_epochs=args.epochs,
        val_every_n_epochs=1,
        do_test_after=True,
        val_slices={
            "easy": lambda x, y: x[:, 0] < HARD_FROM,
            "hard": lambda x, y: x[:, 0] >= HARD_FROM,
        }
        if args.slices
        else None,
    ).fit(
        model,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        nn.MSELoss(),
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=512),
        DataLoader(test, batch_size=512),
    )
    easy, hard = region_losses(model.eval(), test)
    print(
        f"[regimes] {result['status']} at step {result['step']}: test MSE {easy:.4f} on x < {HARD_FROM}, "
        f"{hard:.4f} on x >= {HARD_FROM}",
        flush=True,
    )


if __name__ == "__main__":
    main()
