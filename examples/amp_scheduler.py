"""Mixed precision plus a learning-rate schedule stepped every batch, native Trainer.

`Trainer(amp=True)` runs the forward pass under autocast (bf16 on CPU; fp16 with a
GradScaler on CUDA) and `scheduler_interval="step"` calls `scheduler.step()` after every
optimizer step, so the lr curve in the dashboard is the schedule itself. The scheduler and
scaler states are in every checkpoint: pause/resume and kill/restart continue the
schedule where it was.

    onthefly run examples/amp_scheduler.py                     # OneCycleLR
    onthefly run examples/amp_scheduler.py --scheduler step    # StepLR, halving every 40 steps
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from onthefly import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--scheduler", choices=["onecycle", "step"], default="onecycle")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3072, 32, generator=g)
    w = torch.randn(32, 4, generator=g)
    y = (x @ w + 0.3 * torch.randn(3072, 4, generator=g)).argmax(dim=1)
    train, val = random_split(TensorDataset(x, y), [2560, 512], generator=g)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)

    model = nn.Sequential(
        nn.Linear(32, 128),
        nn.LayerNorm(128),
        nn.GELU(),
        nn.Linear(128, 128),
        nn.GELU(),
        nn.Linear(128, 4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    steps = args.epochs * len(train_loader)
    sched: torch.optim.lr_scheduler.LRScheduler
    if args.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)

    Trainer(
        project="examples",
        run_name=f"amp-{args.scheduler}",
        max_epochs=args.epochs,
        val_every_n_epochs=1,
        amp=True,
        scheduler_interval="step",
    ).fit(
        model,
        opt,
        nn.CrossEntropyLoss(),
        train_loader,
        DataLoader(val, batch_size=512),
        scheduler=sched,
    )


if __name__ == "__main__":
    main()
