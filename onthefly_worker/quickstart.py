"""`quickstart(...)`: the one-call entry point from the product README."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from onthefly_worker.trainer import Trainer


def quickstart(
    project: str,
    run_name: str,
    model: nn.Module,
    optimizer: Any,
    loss_fn: Any,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    test_loader: DataLoader | None = None,
    max_epochs: int = 1,
    do_test_after: bool = False,
    scheduler: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Train `model` under OnTheFly; validates every epoch when a val_loader is given."""
    options.setdefault("val_every_n_epochs", 1 if val_loader is not None else 0)
    trainer = Trainer(
        project=project,
        run_name=run_name,
        max_epochs=max_epochs,
        do_test_after=do_test_after,
        **options,
    )
    return trainer.fit(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        test_loader=test_loader,
        scheduler=scheduler,
    )
