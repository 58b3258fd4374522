"""AdamW in two parameter groups (own lr and weight decay each) with a per-step StepLR: the
fork recipe tests (adapters, lr/wd multipliers, the schedule, early stopping)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

g = torch.Generator().manual_seed(3)
x = torch.randn(700, 8, generator=g)
y = ((x[:, 2] * x[:, 3]) > 0).long()
train = TensorDataset(x[:600], y[:600])
val = TensorDataset(x[600:], y[600:])
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
opt = torch.optim.AdamW(
    [
        {"params": model[0].parameters(), "lr": 4e-3, "weight_decay": 0.01},
        {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 2e-3},
    ],
    weight_decay=0.1,
)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
Trainer(project="recipe", max_epochs=2, val_every_n_epochs=1, scheduler_interval="step").fit(
    model,
    opt,
    nn.CrossEntropyLoss(),
    DataLoader(train, batch_size=30, shuffle=True),
    DataLoader(val, batch_size=100),
    scheduler=sched,
)
