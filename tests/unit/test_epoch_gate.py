"""Epoch-end checkpoints at most every `checkpoint_min_interval_s` (EpochGate), and the option's validation."""

from __future__ import annotations

import time

import pytest

from onthefly_worker.checkpoint import EpochGate
from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError


def test_zero_interval_checkpoints_every_epoch() -> None:
    notes: list[str] = []
    gate = EpochGate(0, lambda text, level: notes.append(text), "Trainer")
    assert all(gate.due(e) for e in range(5))
    assert notes == []


def test_short_epochs_skip_until_the_interval_has_passed() -> None:
    notes: list[tuple[str, str]] = []
    gate = EpochGate(0.2, lambda text, level: notes.append((text, level)), "Trainer")
    assert not gate.due(0)
    assert not gate.due(1)
    # Said once, naming the option that restores every-epoch checkpoints.
    assert len(notes) == 1 and "Trainer(checkpoint_min_interval_s=0)" in notes[0][0]
    assert notes[0][1] == "note"  # on the terminal, not only in the store
    time.sleep(0.25)
    assert gate.due(2)
    gate.checkpointed()
    assert not gate.due(3)
    assert len(notes) == 1


def test_any_checkpoint_restarts_the_interval() -> None:
    gate = EpochGate(0.2, lambda text, level: None, "attach_lightning")
    time.sleep(0.25)
    gate.checkpointed()  # e.g. a pause's checkpoint
    assert not gate.due(0)


@pytest.mark.parametrize("bad", [-1, float("nan"), "2", True, None])
def test_bad_interval_is_refused_naming_the_option(bad: object) -> None:
    with pytest.raises(OnTheFlyError, match="checkpoint_min_interval_s"):
        TrainerConfig.from_kwargs({"checkpoint_min_interval_s": bad})


def test_default_and_zero_are_accepted() -> None:
    assert TrainerConfig().checkpoint_min_interval_s == 2.0
    assert (
        TrainerConfig.from_kwargs({"checkpoint_min_interval_s": 0}).checkpoint_min_interval_s == 0
    )
