"""The method bench's workload: a regression that mixes two regimes, for a capacity-limited MLP.

Inputs z are uniform in [-1, 1]^2; the target is an 8-dimensional smooth function of z
drawn from random sine features. Where z0 < 0.7 (85% of the samples) it is a gentle one
(low frequencies); where z0 >= 0.7 (the hard regime, 15%) it is a different, faster one.
The regime is visible in the input (z0), so a router can learn it.

The model is deliberately small (2 -> 8 -> 8 -> 8, tanh) and trained with a constant
learning rate long enough to reach its capacity limit: more steps barely move its loss.
Sharing 8 hidden units between both regimes, it fits the majority regime and underfits
the hard one, so the per-sample losses single the hard regime out; a fork of the same
network trained on those samples spends all its units there and fits it far better.
That is the situation the fork -> gate -> MoE loop is for (bench/method.py measures it).

    onthefly run bench/_mixture.py                 # the generalist (about 8,000 steps)
    onthefly run bench/_mixture.py --epochs 2      # quicker

`make_split`, `build_model` and `HARD_FROM` are importable, so the bench can score an
exported model on the hard regime of the test set.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

HARD_FROM = 0.7
"""The hard regime is z0 >= HARD_FROM (15% of uniform samples in [-1, 1])."""
OUT = 8
"""Target dimensions: the per-sample loss averages over them, so it is high over the whole
hard regime rather than only where a single residual happens to peak."""
NOISE = 0.05


def _sine_features(units: int, freq: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, units, generator=g) * freq * math.pi
    phase = torch.rand(units, generator=g) * 2 * math.pi
    a = torch.randn(units, OUT, generator=g) / math.sqrt(units)
    return w, phase, a


_EASY = _sine_features(8, 0.5, 100)
_HARD = _sine_features(8, 1.5, 200)


def target(z: Tensor) -> Tensor:
    """The noiseless target: the gentle map below HARD_FROM, the fast one from it on."""

    def f(p: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        w, phase, a = p
        return torch.sin(z @ w + phase) @ a

    return torch.where((z[:, :1] >= HARD_FROM), f(_HARD), f(_EASY))


def is_hard(z: Tensor) -> Tensor:
    return z[:, 0] >= HARD_FROM


def make_split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 2, generator=g) * 2 - 1
    y = target(z) + NOISE * torch.randn(n, OUT, generator=g)
    return TensorDataset(z, y)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, OUT))


def splits(n: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    return make_split(n, 1), make_split(2048, 2), make_split(4096, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=64)
    p.add_argument("--n", type=int, default=8192, help="training samples")
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args()

    from onthefly import Trainer

    # One thread: the model is tiny, and several workers (forks, the merge worker) share
    # the cores; more threads only add contention.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val, test = splits(args.n)
    model = build_model()
    Trainer(
        project="bench",
        run_name="mixture",
        max_epochs=args.epochs,
        val_every_n_epochs=8,
        do_test_after=True,
        val_slices={"hard": lambda z, y: is_hard(z)},
    ).fit(
        model,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        nn.MSELoss(),
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=1024),
        DataLoader(test, batch_size=1024),
    )


if __name__ == "__main__":
    main()
