"""A small CNN on scikit-learn's bundled digits (8x8 grey images, 10 classes), native Trainer.

Shows OnTheFly on real images with no download: per-sample loss for all 1,297 training
digits every epoch (plus the margin, prediction and label of each, so the dashboard can
list the digits the model confuses), validation every epoch and a test at the end.

    onthefly run examples/digits_cnn.py              # or: python examples/digits_cnn.py
    onthefly run examples/digits_cnn.py --epochs 1   # quicker
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from onthefly import Trainer


def build_loaders(batch_size: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    digits = load_digits()
    x = (
        torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    )  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    train, val, test = random_split(
        TensorDataset(x, y), [1297, 250, 250], generator=torch.Generator().manual_seed(0)
    )
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(val, batch_size=250),
        DataLoader(test, batch_size=250),
    )


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()

    train, val, test = build_loaders(args.batch_size)
    model = build_model()
    Trainer(
        project="examples",
        run_name="digits-cnn",
        max_epochs=args.epochs,
        val_every_n_epochs=1,
        do_test_after=True,
    ).fit(
        model,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        nn.CrossEntropyLoss(),
        train,
        val,
        test,
    )


if __name__ == "__main__":
    main()
