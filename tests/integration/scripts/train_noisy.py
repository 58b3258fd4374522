"""A model for the determinism health check: deterministic, or (--noise) with noise drawn
from os.urandom in forward, which no seed can pin down.

The feature layer is frozen (a fine-tuned backbone) and BatchNorm normalises the input
only, so the noise reaches exactly the head: the check must name 'model.head.weight' as
the first tensor that differs, and leave the frozen layer out of the differing ones.
"""

import argparse
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=50)
p.add_argument("--step-sleep", type=float, default=0.05)
p.add_argument("--noise", action="store_true")
args = p.parse_args()

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 16, generator=g)
y = (x.sum(1) > 0).long()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(16, affine=False)
        self.features = nn.Linear(16, 32)
        self.features.requires_grad_(False)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        if self.training and args.step_sleep:
            time.sleep(args.step_sleep)
        h = torch.relu(self.features(self.norm(x)))
        if args.noise and self.training:
            seeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
            h = h + 0.01 * torch.randn(h.shape, generator=seeded)
        return self.head(h)


model = Net()
opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.05, momentum=0.9)
Trainer(project="tests", run_name="noisy", max_epochs=args.epochs, checkpoint_every_n_steps=4).fit(
    model, opt, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
)
