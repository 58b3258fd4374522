"""Regression with two regimes that a small generalist underfits: the example `make demo` runs.

Inputs z are uniform in [-1, 1]^2; the target is an 8-dimensional smooth function of z
made of random sine features: a gentle one where z0 < 0.7 (85% of the samples) and a
different, faster one where z0 >= 0.7 (the hard regime, 15%). The regime is visible in
the input (z0), so a router can learn it.

The model is deliberately small (2 -> 8 -> 8 -> 8, tanh: 168 parameters) and trained with
a constant learning rate for 4,096 steps (128 epochs of 32 batches), near its capacity
limit: training it on barely moves its loss. Sharing 8 hidden units between both regimes,
it fits the majority regime and underfits the hard one (its test MSE there is about 5x
the overall), so the per-sample losses single the hard regime out: most of the top 15%
of training losses are in z0 >= 0.7. A specialist fork of the same network trained on
those samples spends all its units there, and a gate routing between the generalist and
the specialists beats the generalist trained on for the same compute. That is the loop
automode runs in `make demo`; by hand:

    make demo                                            # = onthefly run --automode --headless --port 0 examples/regimes.py
    onthefly run --keep-alive examples/regimes.py        # then, from another terminal:
    onthefly fork --select quantile:0.85:1.0 --budget-steps 300
    onthefly gate main fork-1                            # route between generalist and specialist
    onthefly runs                                        # compare val/test losses in the lineage

Batches of 256 average out how many hard samples a batch happens to draw: with batches
of 64 the batch loss jumped past automode's spike threshold twice in 4,096 steps and the
planner could roll a healthy run back. Data and model are those of bench/_mixture.py (the
method bench), trained in half its steps with 4x its batch. At the end the generalist
prints its test loss on each regime.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

HARD_FROM = 0.7
"""The hard regime is z0 >= HARD_FROM (15% of uniform samples in [-1, 1])."""
OUT = 8
"""Target dimensions: the per-sample loss averages over them, so it is high over the whole
hard regime rather than only where a single residual happens to peak."""


def _sine_features(freq: float, seed: int, units: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, units, generator=g) * freq * math.pi
    phase = torch.rand(units, generator=g) * 2 * math.pi
    a = torch.randn(units, OUT, generator=g) / math.sqrt(units)
    return w, phase, a


_EASY = _sine_features(0.5, 100)
_HARD = _sine_features(1.5, 200)


def target(z: Tensor) -> Tensor:
    """The noiseless target: the gentle map below HARD_FROM, the fast one from it on."""

    def f(p: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        w, phase, a = p
        return torch.sin(z @ w + phase) @ a

    return torch.where(z[:, :1] >= HARD_FROM, f(_HARD), f(_EASY))


def make_split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 2, generator=g) * 2 - 1
    y = target(z) + 0.05 * torch.randn(n, OUT, generator=g)
    return TensorDataset(z, y)


def region_losses(model: nn.Module, ds: TensorDataset) -> tuple[float, float]:
    z, y = ds.tensors
    with torch.no_grad():
        err = (model(z) - y).pow(2).mean(dim=1)
    hard = z[:, 0] >= HARD_FROM
    return float(err[~hard].mean()), float(err[hard].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=128)
    p.add_argument("--n", type=int, default=8192, help="training samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--fast", action="store_true", help="2 epochs on 2048 samples")
    p.add_argument(
        "--slices",
        action="store_true",
        help="report the val loss of each regime (val_slices): automode can fork on a weak one",
    )
    args = p.parse_args()
    if args.fast:
        args.epochs, args.n = 2, 2048

    # One thread: the model is tiny, and the forks and the gate's worker share the cores
    # with it; more threads only add contention.
    torch.set_num_threads(1)
    train, val, test = make_split(args.n, 1), make_split(2048, 2), make_split(4096, 3)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, OUT))
    result = Trainer(
        project="examples",
        run_name="regimes",
        max_epochs=args.epochs,
        val_every_n_epochs=1,
        do_test_after=True,
        val_slices={
            "easy": lambda z, y: z[:, 0] < HARD_FROM,
            "hard": lambda z, y: z[:, 0] >= HARD_FROM,
        }
        if args.slices
        else None,
    ).fit(
        model,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        nn.MSELoss(),
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=1024),
        DataLoader(test, batch_size=1024),
    )
    easy, hard = region_losses(model.eval(), test)
    print(
        f"[regimes] {result['status']} at step {result['step']}: test MSE {easy:.4f} on "
        f"z0 < {HARD_FROM}, {hard:.4f} on z0 >= {HARD_FROM}",
        flush=True,
    )


if __name__ == "__main__":
    main()
