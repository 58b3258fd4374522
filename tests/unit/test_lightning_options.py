"""attach_lightning(val_slices=...): the option is checked by the same code as
Trainer(val_slices=...) (same messages, naming attach_lightning), and the slice sums the
Lightning callback accumulates from Lightning's own validation batches equal a direct
computation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.lightning import LightningOptions
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.slices import SliceSums, evaluate_positions

BAD_SLICES: list[tuple[Any, str]] = [
    ({}, "must be a non-empty dict"),
    ([("a", [1])], "must be a non-empty dict"),
    ({"bad name!": [1]}, "slice names are 1-64 letters"),
    ({"x" * 65: [1]}, "slice names are 1-64 letters"),
    ({3: [1]}, "slice names are 1-64 letters"),
    ({"x": 3.5}, "a predicate fn\\(inputs, targets\\) -> bools"),
    ({"x": ["a"]}, "a predicate fn\\(inputs, targets\\) -> bools"),
    ({"x": []}, "must be non-empty and >= 0"),
    ({"x": [2, -1]}, "must be non-empty and >= 0"),
]


def _message(make: Any) -> str:
    with pytest.raises(OnTheFlyError) as e:
        make()
    return str(e.value)


@pytest.mark.parametrize("slices,want", BAD_SLICES)
def test_bad_val_slices_refused_like_the_trainer(slices: Any, want: str) -> None:
    lit = _message(lambda: LightningOptions(val_slices=slices))
    native = _message(lambda: TrainerConfig(val_slices=slices))
    assert lit.startswith("attach_lightning(val_slices=")
    assert lit == native.replace("Trainer(", "attach_lightning(", 1)
    with pytest.raises(OnTheFlyError, match=want):
        LightningOptions(val_slices=slices)


def test_good_val_slices_accepted() -> None:
    assert LightningOptions().val_slices is None
    slices = {"rare": lambda x, y: y == 7, "first100": range(100), "a.b-c_1": [0, 5]}
    assert LightningOptions(val_slices=slices).val_slices is slices


def test_attach_lightning_checks_val_slices() -> None:
    L = pytest.importorskip("lightning")
    from onthefly_worker.lightning import attach_lightning

    class Lit(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)

    kw: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "devices": 1}
    with pytest.raises(OnTheFlyError, match=r"^attach_lightning\(val_slices='bad name!'\)"):
        attach_lightning(
            trainer=L.Trainer(**kw),
            model=Lit(),
            loss_fn=nn.CrossEntropyLoss(),
            val_slices={"bad name!": [1]},
        )
    trainer = L.Trainer(**kw)
    att = attach_lightning(
        trainer=trainer,
        model=Lit(),
        loss_fn=nn.CrossEntropyLoss(),
        val_slices={"pos": lambda x, y: y == 1, "head": range(3)},
    )
    assert att.options.val_slices is not None and set(att.options.val_slices) == {"pos", "head"}


def _data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    return x, y, nn.Linear(4, 2)


def test_slice_sums_over_batches_match_a_direct_computation() -> None:
    # What the Lightning callback does per validation batch: masks from the batch, then the
    # per-sample losses its forward hook computed (and the hits, for classification).
    x, y, model = _data()
    sums = SliceSums({"pos": lambda xb, yb: yb == 1, "none": lambda xb, yb: yb > 5, "p": [1]})
    assert set(sums.preds) == {"pos", "none"}  # positions are evaluated on their own
    with torch.no_grad():
        out = model(x)
        each = nn.functional.cross_entropy(out, y, reduction="none")
    for lo in range(0, 30, 8):
        sl = slice(lo, lo + 8)
        masks = sums.masks(x[sl], y[sl], len(y[sl]))
        sums.add(masks, each[sl], out[sl].argmax(1) == y[sl])
    res = sums.results(classif=True)
    pos = y == 1
    assert res["pos"][0] == pytest.approx(float(each[pos].mean()), rel=1e-5)
    assert res["pos"][1] == pytest.approx(float((out.argmax(1) == y)[pos].float().mean()))
    assert res["pos"][2] == int(pos.sum())
    assert math.isnan(res["none"][0]) and res["none"][2] == 0
    assert math.isnan(sums.results(classif=False)["pos"][1])


def test_positions_use_the_given_forward_and_refuse_outside_the_val_set() -> None:
    x, y, model = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    loss = PerSampleLoss(nn.CrossEntropyLoss())
    calls: list[int] = []

    def forward(xb: torch.Tensor) -> torch.Tensor:  # e.g. the logits out of a richer output
        calls.append(len(xb))
        return model(xb)

    res = evaluate_positions(
        model, loader, loss, torch.device("cpu"), {"head": range(5), "p": lambda a, b: b}, forward
    )
    with torch.no_grad():
        each = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert set(res) == {"head"} and calls == [5]
    assert res["head"][0] == pytest.approx(float(each[:5].mean()), rel=1e-5)
    with pytest.raises(OnTheFlyError, match=r"val_slices\['far'\]: position 30 is outside"):
        evaluate_positions(model, loader, loss, torch.device("cpu"), {"far": [0, 30]})
