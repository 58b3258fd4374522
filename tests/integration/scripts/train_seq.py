"""A plain nn.Sequential classifier with two regimes, for the fork / gate / merge tests."""

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from onthefly import Trainer

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--step-sleep", type=float, default=0.0)
args = p.parse_args()

g = torch.Generator().manual_seed(3)
x = torch.randn(1200, 8, generator=g)
# Regime A (x0 < 0.5): a linear rule; regime B: a rule the small net learns slowly.
easy = x[:, 0] < 0.5
y = torch.where(easy, (x[:, 1] > 0).long(), ((x[:, 2] * x[:, 3]) > 0).long())
train = TensorDataset(x[:900], y[:900])
val = TensorDataset(x[900:1050], y[900:1050])
test = TensorDataset(x[1050:], y[1050:])


def collate(batch):  # --step-sleep makes each step slower, so tests can act mid-run
    if args.step_sleep:
        time.sleep(args.step_sleep)
    return default_collate(batch)


model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
Trainer(project="method", max_epochs=args.epochs, val_every_n_epochs=1, do_test_after=True).fit(
    model,
    opt,
    nn.CrossEntropyLoss(),
    DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate),
    DataLoader(val, batch_size=128),
    DataLoader(test, batch_size=128),
)
