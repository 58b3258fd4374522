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
from onthefly_worker import activity
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


class EvalAborted(Exception):
    """An evaluation given up between batches because `abort()` said so (a stop arrived)."""


class EvalTotals:
    """The sums behind an evaluation's (loss, accuracy, samples). The loss is the user's
    over the whole set: per-sample values weighted as the user's 'mean' weighs them
    (`PerSampleLoss.row_weights`: class weights, ignore_index, a sequence's valid tokens),
    else their plain mean; accuracy counts samples whose target is not ignore_index."""

    def __init__(self, loss: PerSampleLoss) -> None:
        self.loss = loss
        self.total, self.weight, self.count = 0.0, 0.0, 0
        self.correct, self.judged, self.classif = 0, 0, True

    def add(self, per: torch.Tensor, out: Any, y: Any, n: int) -> torch.Tensor | None:
        """Add a batch; returns its per-sample hits (argmax == target, where they are
        computed) when it is a classification batch, else None."""
        per = per.detach().float()
        w = self.loss.row_weights(y, n)
        if w is None:
            self.total += float(per.sum())
            self.weight += n
        else:
            w = w.to(per.device)
            self.total += float((per * w).sum())
            self.weight += float(w.sum())
        self.count += n
        if not (
            self.classif
            and isinstance(out, torch.Tensor)
            and out.dim() == 2
            and isinstance(y, torch.Tensor)
            and y.dim() == 1
            and not y.is_floating_point()
        ):
            self.classif = False
            return None
        hit = out.argmax(dim=1) == y
        ignore = self.loss.ignore_index()
        if ignore is None:
            self.correct += int(hit.sum())
            self.judged += n
        else:
            valid = y != ignore
            self.correct += int((hit & valid).sum())
            self.judged += int(valid.sum())
        return hit

    def result(self) -> tuple[float, float, int]:
        mean = self.total / self.weight if self.weight > 0 else math.nan
        acc = self.correct / self.judged if (self.classif and self.judged) else math.nan
        return mean, acc, self.count


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    loss: PerSampleLoss,
    device: torch.device,
    forward: Callable[[Any], Any] | None = None,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    abort: Callable[[], bool] | None = None,
) -> tuple[float, float, int]:
    """(the loss over the set, accuracy or NaN unless classification, samples) in eval
    mode (see EvalTotals). `abort` is asked before each batch: True raises EvalAborted.

    The model's train/eval mode and every RNG are restored afterwards, so evaluating in the
    middle of training changes nothing about the training trajectory.
    """
    fwd = forward or model
    was_training = model.training
    totals = EvalTotals(loss)
    with preserved_rng():
        model.eval()
        try:
            for raw in loader:
                if abort is not None and abort():
                    raise EvalAborted
                x, y = split_batch(raw)
                x = to_device(x, device)
                y = to_device(y, device)
                n = batch_len(x)
                with context():
                    out = fwd(x)
                    _, per = loss(out, y, n)
                totals.add(per, out, y, n)
                activity.tick()
        finally:
            model.train(was_training)
    return totals.result()


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
