"""One-time notes for setups that train, but not as the user likely meant: a per-batch LR
scheduler stepped per epoch, dict batches with keys the model never sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.config import TrainerConfig
from onthefly_worker.data import unused_batch_keys
from onthefly_worker.trainer import _Loop
from tests.conftest import train_env


def _loop(tmp_path: Path, sched_kind: str, interval: str) -> tuple[_Loop, list[tuple[str, str]]]:
    env = train_env(tmp_path)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched: object = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40)
        if sched_kind == "onecycle"
        else torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1)
        if sched_kind == "cyclic"
        else torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    )
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    loop = _Loop(
        TrainerConfig(max_epochs=1, scheduler_interval=interval), env, model, opt,
        nn.CrossEntropyLoss(), loader, None, None, sched,
    )  # fmt: skip
    logs: list[tuple[str, str]] = []
    loop.log = lambda text, level="info": logs.append((level, text))  # type: ignore[method-assign]
    return loop, logs


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
def test_a_per_batch_scheduler_stepped_per_epoch_is_a_warning(tmp_path: Path, kind: str) -> None:
    loop, logs = _loop(tmp_path, kind, "epoch")
    loop._note_scheduler()
    assert len(logs) == 1 and logs[0][0] == "warning"
    assert "scheduler_interval='step'" in logs[0][1]


@pytest.mark.parametrize(("kind", "interval"), [("onecycle", "step"), ("step", "epoch")])
def test_no_note_when_the_interval_fits(tmp_path: Path, kind: str, interval: str) -> None:
    loop, logs = _loop(tmp_path, kind, interval)
    loop._note_scheduler()
    assert logs == []


def test_dict_batches_name_the_keys_the_model_never_sees(tmp_path: Path) -> None:
    batch = {"input_ids": 1, "attention_mask": 2, "labels": 3, "idx": 4}
    assert unused_batch_keys(batch) == (["attention_mask", "idx"], "input_ids", "labels")
    assert unused_batch_keys({"x": 1, "y": 2}) == ([], "x", "y")
    assert unused_batch_keys((1, 2, 3)) == ([], "", "")
    loop, logs = _loop(tmp_path, "step", "epoch")
    loop._note_unused_keys(batch)
    assert len(logs) == 1 and logs[0][0] == "warning"
    assert "'attention_mask', 'idx'" in logs[0][1] and "model(batch['input_ids'])" in logs[0][1]
    logs.clear()
    loop._note_unused_keys({"x": 1, "y": 2})
    assert logs == []


def test_tuple_batches_past_inputs_and_target_are_named(tmp_path: Path) -> None:
    """(x1, x2, y) would train on x2 as the target: said once, with what is used."""
    loop, logs = _loop(tmp_path, "step", "epoch")
    loop._note_unused_keys((torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2)))
    assert len(logs) == 1 and logs[0][0] == "warning"
    assert "each batch has 3 items" in logs[0][1] and "batch[2] is not used" in logs[0][1]
    logs.clear()
    loop._note_unused_keys([1, 2, 3, 4])
    assert "has 4 items" in logs[0][1] and "batch[2:] (2 items)" in logs[0][1]
    logs.clear()
    loop._note_unused_keys((torch.zeros(2, 4), torch.zeros(2)))
    assert logs == []


def test_do_test_after_without_a_test_loader_and_plateau_without_val_are_warnings(
    tmp_path: Path,
) -> None:
    env = train_env(tmp_path)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    loop = _Loop(
        TrainerConfig(do_test_after=True), env, model, opt, nn.CrossEntropyLoss(), loader,
        None, None, sched,
    )  # fmt: skip
    logs: list[tuple[str, str]] = []
    loop.log = lambda text, level="info": logs.append((level, text))  # type: ignore[method-assign]
    loop._note_validation()
    assert [lv for lv, _ in logs] == ["warning", "warning"], logs
    assert "no test_loader: no test pass will run" in logs[0][1]
    assert "ReduceLROnPlateau without a val_loader" in logs[1][1]
    logs.clear()
    for split in ("val", "val", "test"):
        loop._note_nonfinite_eval(split, float("nan"), 10)
    loop._note_nonfinite_eval("val", 0.5, 10)
    assert [t.split(" loss is nan at step 0")[0] for _, t in logs] == ["val", "test"], logs
    logs.clear()
    loop._note_nonfinite_eval("slice:self", float("nan"), 0)  # an empty loader
    assert logs == [
        (
            "warning",
            "the slice:self loader yielded no samples (step 0): there is no slice:self loss "
            "to report (said once)",
        )
    ], logs


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_summed_loss_says_which_numbers_compare(tmp_path: Path, reduction: str) -> None:
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 2)), batch_size=4)
    loop = _Loop(
        TrainerConfig(max_epochs=1), train_env(tmp_path), model,
        torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(reduction=reduction), loader,
        None, None, None,
    )  # fmt: skip
    logs: list[tuple[str, str]] = []
    loop.log = lambda text, level="info": logs.append((level, text))  # type: ignore[method-assign]
    loop._note_loss_units()
    if reduction == "mean":
        assert logs == []
    else:
        assert len(logs) == 1 and "each step's loss is the batch's sum" in logs[0][1], logs


def test_an_evaluation_names_the_epoch_its_weights_finished_in(tmp_path: Path) -> None:
    """The last validation of an epoch and a test right after it (at the same step) name
    the same epoch, though the loop has moved on to the next one's first batch."""
    loop, _ = _loop(tmp_path, "step", "epoch")
    loop.epoch, loop.batch = 1, 2  # the validation at the end of epoch 1 (batches done)
    assert loop._eval_epoch() == 1
    loop.epoch, loop.batch = 2, 0  # the epoch ended: a test after training
    assert loop._eval_epoch() == 1
    loop.epoch, loop.batch = 0, 0  # before any training
    assert loop._eval_epoch() == 0
