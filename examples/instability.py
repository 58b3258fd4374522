"""Training that goes unstable at a known step: what automode's numerics detector catches.

The model's output becomes NaN for `--nan-steps` consecutive training steps starting at
`--nan-at-step`. The Trainer skips every step whose loss is not finite (the weights stay
clean), logs a warning per skipped step, and fails the run with a clear message only if
that goes on for `nonfinite_patience` steps. The NaN points are in the metric stream, so
the planner proposes a "stabilize" plan card: roll back to the last checkpoint before the
NaN, skip the batches of the NaN steps, lower the lr and clip gradients (the restarted
process counts its forward calls from zero, so here the NaN comes back later: a model
that breaks on a step count, not on data, is what the cooldown then leaves to the
trainer's own skipping):

    onthefly run --automode examples/instability.py       # the planner acts on its cards
    onthefly run --keep-alive examples/instability.py     # then: onthefly plans
    onthefly run examples/instability.py --nan-steps 25   # more than the patience: the run fails
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer


class FlakyNet(nn.Module):
    """An MLP whose output is NaN on chosen training steps (counted by its own forward calls)."""

    def __init__(self, nan_at: int, nan_steps: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
        self.nan_at, self.nan_steps = nan_at, nan_steps
        self.train_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.training:
            self.train_calls += 1
            if self.nan_at <= self.train_calls < self.nan_at + self.nan_steps:
                return out * float("nan")
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nan-at-step", type=int, default=30)
    p.add_argument("--nan-steps", type=int, default=3)
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(2048, 1, generator=g)).tanh()
    model = FlakyNet(args.nan_at_step, args.nan_steps)
    Trainer(project="examples", run_name="instability", max_epochs=args.epochs).fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        nn.MSELoss(),
        DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
    )


if __name__ == "__main__":
    main()
