"""Evaluation shared by the native loop, the Lightning callback and the merge worker."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker.connection import WorkerConnection
from onthefly_worker.data import batch_len, split_batch, to_device
from onthefly_worker.losses import PerSampleLoss


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Evaluation and health checks must not move the training RNG (python, numpy, torch)."""
    py = random.getstate()
    npst = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    loss: PerSampleLoss,
    device: torch.device,
    forward: Callable[[Any], Any] | None = None,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[float, float, int]:
    """(mean per-sample loss, accuracy or NaN unless classification, samples) in eval mode.

    The model's train/eval mode and every RNG are restored afterwards, so evaluating in the
    middle of training changes nothing about the training trajectory.
    """
    fwd = forward or model
    was_training = model.training
    total, count, correct, classif = 0.0, 0, 0, True
    with preserved_rng():
        model.eval()
        try:
            for raw in loader:
                x, y = split_batch(raw)
                x = to_device(x, device)
                y = to_device(y, device)
                n = batch_len(x)
                with context():
                    out = fwd(x)
                    _, per = loss(out, y, n)
                total += float(per.float().sum())
                count += n
                if (
                    classif
                    and isinstance(out, torch.Tensor)
                    and out.dim() == 2
                    and isinstance(y, torch.Tensor)
                    and y.dim() == 1
                    and not y.is_floating_point()
                ):
                    correct += int((out.argmax(dim=1) == y).sum())
                else:
                    classif = False
        finally:
            model.train(was_training)
    mean = total / count if count else math.nan
    acc = correct / count if (classif and count) else math.nan
    return mean, acc, count


def report_eval(
    conn: WorkerConnection,
    run_id: str,
    split: str,
    step: int,
    epoch: int,
    result: tuple[float, float, int],
) -> dict[str, Any]:
    loss, acc, count = result
    conn.send(
        eval=pb.EvalResult(
            run_id=run_id,
            split=split,
            step=step,
            epoch=epoch,
            loss=loss,
            accuracy=acc,
            samples=count,
        )
    )
    return {"split": split, "loss": loss, "accuracy": acc, "samples": count, "step": step}
