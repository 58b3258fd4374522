"""Skipping batches after a rollback (EpochOrder) and per-slice validation losses, on plain
tensors: the worker-side halves of the stabilize and weak-slice remedies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_supervisor.rollback import canonical_batch, trained_position
from onthefly_worker.config import TrainerConfig
from onthefly_worker.data import EpochOrder
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.slices import evaluate_with_slices, write_train_selections


def _order(skip=()) -> EpochOrder:  # type: ignore[no-untyped-def]
    ds = TensorDataset(torch.arange(40.0))
    return EpochOrder(DataLoader(ds, batch_size=4, shuffle=True), seed=7, skip=skip)


def test_skipped_batches_are_left_out_and_the_rest_keep_their_order() -> None:
    full = _order().batches(2)
    o = _order(skip=[(2, 3), (2, 0), (5, 1)])
    kept = o.batches(2)
    assert len(full) == 10 and len(kept) == 8
    assert [b.tolist() for b in kept] == [full[i].tolist() for i in range(10) if i not in (0, 3)]
    assert [b.tolist() for b in o.batches(1)] == [b.tolist() for b in _order().batches(1)]
    assert o.skipped == [[2, 0], [2, 3], [5, 1]]  # what a checkpoint stores
    # The trained position of a batch maps back to its place in the full order, both ways.
    for pos in range(8):
        canon = o.canonical_batch(2, pos)
        assert kept[pos].tolist() == full[canon].tolist()
        assert canonical_batch([3, 0], pos) == canon
        assert trained_position([3, 0], canon) == pos


def test_skip_outside_the_epoch_or_malformed_is_a_clear_error() -> None:
    with pytest.raises(OnTheFlyError, match="cannot skip batch 10 of epoch 0: the epoch has 10"):
        _order(skip=[(0, 10)]).batches(0)
    with pytest.raises(OnTheFlyError, match="must be >= 0"):
        _order(skip=[(0, -1)])
    with pytest.raises(OnTheFlyError, match="pair"):
        _order(skip=[(0, 1, 2)])


def _data() -> tuple[DataLoader, nn.Module, PerSampleLoss]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 2)
    return (
        DataLoader(TensorDataset(x, y), batch_size=8),
        model,
        PerSampleLoss(nn.CrossEntropyLoss()),
    )


def test_slice_losses_match_a_direct_computation() -> None:
    loader, model, loss = _data()
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    slices = {
        "pos": lambda xb, yb: yb == 1,
        "first5": [0, 1, 2, 3, 4],
        "none": lambda xb, yb: yb > 5,
    }
    overall, per = evaluate_with_slices(model, loader, loss, torch.device("cpu"), slices)
    with torch.no_grad():
        each = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert overall[0] == pytest.approx(float(each.mean()), rel=1e-5) and overall[2] == 30
    assert per["pos"][0] == pytest.approx(float(each[y == 1].mean()), rel=1e-5)
    assert per["pos"][2] == int((y == 1).sum())
    assert per["first5"][0] == pytest.approx(float(each[:5].mean()), rel=1e-5)
    assert math.isnan(per["none"][0]) and per["none"][2] == 0


def test_predicate_slices_mark_the_training_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    loader, _, _ = _data()
    y = loader.dataset.tensors[1]  # type: ignore[attr-defined]
    sizes = write_train_selections(
        loader, {"pos": lambda xb, yb: yb == 1, "none": lambda xb, yb: yb > 5}, str(tmp_path)
    )
    assert sizes == {"pos": int((y == 1).sum()), "none": 0}
    ids = np.load(tmp_path / "slices" / "pos.train.npy")
    assert ids.tolist() == torch.nonzero(y == 1).flatten().tolist()
    assert not (tmp_path / "slices" / "none.train.npy").exists()  # nothing to fork on


def test_bad_slices_are_refused_with_the_option_named() -> None:
    with pytest.raises(OnTheFlyError, match="val_slices"):
        TrainerConfig(val_slices={"bad name!": [1]})
    with pytest.raises(OnTheFlyError, match="predicate"):
        TrainerConfig(val_slices={"x": 3.5})
    with pytest.raises(OnTheFlyError, match="non-empty"):
        TrainerConfig(val_slices={"x": []})
    cfg = TrainerConfig(val_slices={"a": lambda x, y: y > 0, "b": [1, 2]})
    assert cfg.to_dict()["val_slices"] == {"a": "predicate", "b": "2 positions"}
    loader, model, loss = _data()
    with pytest.raises(OnTheFlyError, match="one bool per sample"):
        evaluate_with_slices(model, loader, loss, torch.device("cpu"), {"w": lambda x, y: [True]})


def test_a_selection_never_leaves_a_one_sample_batch() -> None:
    # A fork's selection of 21 samples at batch size 4: the 21st joins the last batch (a
    # 1-sample batch breaks BatchNorm in training mode); 22 keeps a 2-sample last batch.
    ds = TensorDataset(torch.arange(40.0))
    for n, sizes in ((21, [4, 4, 4, 4, 5]), (22, [4, 4, 4, 4, 4, 2]), (1, [1])):
        sub = np.arange(n) * 2
        o = EpochOrder(DataLoader(ds, batch_size=4, shuffle=True), seed=7, subset=sub)
        got = o.batches(3)
        assert [len(b) for b in got] == sizes
        assert sorted(np.concatenate(got).tolist()) == sub.tolist()
    # The whole dataset keeps the user's own batching (a last batch of 1 stays).
    full = EpochOrder(DataLoader(TensorDataset(torch.arange(41.0)), batch_size=4), seed=7)
    assert [len(b) for b in full.batches(0)][-2:] == [4, 1]
