"""A Lightning module that needs constructor arguments, attached with a `model_factory`.

`WineClassifier(encoder, n_classes, lr)` is built from a separately constructed encoder,
so it cannot be re-created as `WineClassifier()`. Whenever OnTheFly needs a fresh copy of
the model beside the live one (the merge worker loading checkpoints for a merge, a gate,
a comparison or an export) it calls the factory. All three forms the README shows work;
`--factory-form` picks one:

    callable:  model_factory=build_model
    tuple:     model_factory=(build_model, (hidden,), {"lr": lr})
    dict:      model_factory={"factory": build_model, "args": (hidden,), "kwargs": {"lr": lr}}

Data: scikit-learn's bundled wine recognition set (178 samples, 13 features, 3 classes).

    onthefly run --keep-alive examples/model_factory.py    # then, from another terminal:
    onthefly fork --select quantile:0.8:1.0 --budget-steps 40
    onthefly merge --method swa main fork-1                 # the merge worker uses the factory
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from onthefly import attach_lightning


class Encoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.out_dim = hidden
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WineClassifier(L.LightningModule):
    def __init__(self, encoder: Encoder, n_classes: int, lr: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, n_classes)
        self.loss = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.log("train_acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_model(hidden: int = 32, lr: float = 3e-3) -> WineClassifier:
    return WineClassifier(Encoder(13, hidden), n_classes=3, lr=lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--factory-form", choices=["callable", "tuple", "dict"], default="tuple")
    args = p.parse_args()

    wine = load_wine()
    x = torch.tensor(wine.data, dtype=torch.float32)
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    y = torch.tensor(wine.target, dtype=torch.long)
    train, val = random_split(
        TensorDataset(x, y), [142, 36], generator=torch.Generator().manual_seed(0)
    )
    train_loader = DataLoader(train, batch_size=16, shuffle=True)
    val_loader = DataLoader(val, batch_size=36)

    factory: Any
    if args.factory_form == "callable":
        factory = lambda: build_model(args.hidden, lr=args.lr)  # noqa: E731 - the README's callable form
    elif args.factory_form == "tuple":
        factory = (build_model, (args.hidden,), {"lr": args.lr})
    else:
        factory = {"factory": build_model, "args": (args.hidden,), "kwargs": {"lr": args.lr}}

    model = build_model(args.hidden, lr=args.lr)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    attach_lightning(
        trainer=trainer,
        model=model,
        project="examples",
        run_name="wine-factory",
        train_loader=train_loader,
        val_loader=val_loader,
        test_loader=val_loader,
        loss_fn=model.loss,
        do_test_after=True,
        model_factory=factory,
    )
    trainer.fit(model, train_loader, val_loader)


if __name__ == "__main__":
    main()
