"""`max_steps` alone is the limit (as in Lightning): max_epochs=None means one epoch only when
no max_steps is given."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.trainer import _Loop
from tests.conftest import train_env


class _Keep:
    commands: list[Any] = []
    command_event = threading.Event()

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, **body: Any) -> None:
        self.sent.append(body)

    send_bulk = send


def _trained_steps(
    tmp_path: Path, n: int = 40, conn: _Keep | None = None, x: Any = None, **kwargs: Any
) -> int:
    """Run the training loop in-process on n samples (a connection that keeps what is sent)."""
    env = train_env(tmp_path)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(n, 4) if x is None else x
    loader = DataLoader(TensorDataset(x, torch.randint(0, 2, (n,))), batch_size=4)
    loop = _Loop(
        TrainerConfig(**kwargs), env, model, opt, nn.CrossEntropyLoss(), loader, None, None, None
    )
    loop._checkpoint = lambda *a, **k: ""  # type: ignore[method-assign]
    conn = conn or _Keep()
    loop.conn = conn  # type: ignore[assignment]
    loop.rec = loop.make_recorder(conn.send)
    try:
        loop._train()
    finally:
        loop.rec.flush()
        loop.writer.wait()
    return loop.step


@pytest.mark.parametrize(
    ("kwargs", "steps", "limit"),
    [
        ({"max_steps": 15}, 15, 0),  # 10 steps an epoch: max_steps alone goes past one epoch
        ({}, 10, 1),  # neither: one epoch
        ({"max_epochs": 1, "max_steps": 15}, 10, 1),  # both: whichever comes first
        ({"max_epochs": 3, "max_steps": 25}, 25, 3),
    ],
)
def test_max_steps_alone_is_the_limit(
    tmp_path: Path, kwargs: dict[str, Any], steps: int, limit: int
) -> None:
    assert TrainerConfig(**kwargs).epoch_limit == limit
    assert _trained_steps(tmp_path, **kwargs) == steps


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_epochs_must_be_a_positive_integer_or_none(bad: object) -> None:
    with pytest.raises(OnTheFlyError, match=r"max_epochs=.*must be an integer >= 1 \(or None"):
        TrainerConfig(max_epochs=bad)  # type: ignore[arg-type]


def test_an_empty_dataset_says_so(tmp_path: Path) -> None:
    """Not "lower the batch size or set drop_last=False", which cannot help."""
    with pytest.raises(OnTheFlyError, match="the train loader's dataset is empty"):
        _trained_steps(tmp_path, n=0)


def test_the_step_that_runs_out_nonfinite_patience_has_its_losses_recorded(
    tmp_path: Path,
) -> None:
    """Every step's per-sample losses reach the store, the failing one's included (its
    NaN values were lost when the run failed before recording it)."""
    conn = _Keep()
    with pytest.raises(OnTheFlyError, match="non-finite for 3 consecutive steps"):
        _trained_steps(
            tmp_path, conn=conn, x=torch.full((40, 4), float("nan")), nonfinite_patience=3
        )
    steps = [p.step for m in conn.sent if "samples" in m for p in m["samples"].metrics.points]
    assert steps == [1, 2, 3]
