"""Per-slice validation losses: `Trainer(val_slices={"rare": lambda x, y: y == 7})`.

A slice is a predicate over a batch, `fn(inputs, targets)` returning one bool per sample
(a bool tensor, array or list), or a sequence of positions in the validation set. Every
validation pass reports the overall loss as split `val` and each slice's mean
per-sample loss as split `val_slice:<name>` (same forward pass for predicates; index
slices are evaluated on their own small loader). Predicates are also applied once to the
training set (data loading only, no forward), and the matching training positions are
written to `slices/<name>.train.npy` in the session: that is the selection automode
forks a specialist on when it finds the slice weak.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from onthefly_worker.data import batch_len, split_batch, to_device
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.evaluation import EvalAborted, EvalTotals, evaluate_model, preserved_rng
from onthefly_worker.losses import PerSampleLoss

Result = tuple[float, float, int]


def _mask(name: str, fn: Callable[[Any, Any], Any], x: Any, y: Any, n: int) -> torch.Tensor:
    try:
        m = fn(x, y)
    except Exception as e:
        raise OnTheFlyError(f"val_slices[{name!r}] raised {type(e).__name__}: {e}") from e
    t = torch.as_tensor(np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m))
    if t.dim() != 1 or t.numel() != n:
        raise OnTheFlyError(
            f"val_slices[{name!r}] must return one bool per sample ({n}), got shape {tuple(t.shape)}"
        )
    return t.to(torch.bool)


class SliceSums:
    """Running loss sums of the predicate slices over evaluation batches.

    Shared by `evaluate_with_slices` (its own loop) and the Lightning callback (batches of
    Lightning's validation loop, per-sample losses from the forward hook): `masks` applies
    the predicates to a batch, `add` accumulates that batch's per-sample losses (and hits,
    for classification), `results` gives each slice's (loss, accuracy, n)."""

    def __init__(self, slices: Mapping[str, Any]) -> None:
        self.preds = {k: v for k, v in slices.items() if callable(v)}
        self._sums = {k: [0.0, 0, 0] for k in self.preds}  # loss sum, count, correct

    def masks(self, x: Any, y: Any, n: int) -> dict[str, torch.Tensor]:
        return {k: _mask(k, fn, x, y, n) for k, fn in self.preds.items()}

    def add(
        self, masks: Mapping[str, torch.Tensor], per: torch.Tensor, hit: torch.Tensor | None
    ) -> None:
        if not masks:
            return
        per = per.float().detach().cpu()
        hit = hit.cpu() if hit is not None else None
        for k, m in masks.items():
            s = self._sums[k]
            s[0] += float(per[m].sum())
            s[1] += int(m.sum())
            if hit is not None:
                s[2] += int(hit[m].sum())

    def results(self, classif: bool) -> dict[str, Result]:
        """{slice: (mean loss, accuracy or NaN unless classification, n)}; NaN loss for a
        slice no sample fell into."""
        return {
            k: (ls / c if c else math.nan, ok / c if (classif and c) else math.nan, int(c))
            for k, (ls, c, ok) in self._sums.items()
        }


def evaluate_positions(
    model: nn.Module,
    loader: DataLoader,
    loss: PerSampleLoss,
    device: torch.device,
    slices: Mapping[str, Any],
    forward: Callable[[Any], Any] | None = None,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    abort: Callable[[], bool] | None = None,
) -> dict[str, Result]:
    """{slice: result} for the slices given as validation-set positions, each evaluated on
    its own small loader over `loader`'s dataset (predicate slices are skipped); `abort`
    as evaluate_model's."""
    out: dict[str, Result] = {}
    for k, v in slices.items():
        if callable(v):
            continue
        ids = [int(i) for i in v]
        size = len(loader.dataset)  # type: ignore[arg-type]
        if max(ids) >= size:
            raise OnTheFlyError(
                f"val_slices[{k!r}]: position {max(ids)} is outside the validation set (size {size})"
            )
        sub = DataLoader(
            Subset(loader.dataset, ids),
            batch_size=loader.batch_size or 256,
            collate_fn=loader.collate_fn,
        )
        out[k] = evaluate_model(
            model, sub, loss, device, forward=forward, context=context, abort=abort
        )
    return out


@torch.no_grad()
def evaluate_with_slices(
    model: nn.Module,
    loader: DataLoader,
    loss: PerSampleLoss,
    device: torch.device,
    slices: Mapping[str, Any],
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    forward: Callable[[Any], Any] | None = None,
    abort: Callable[[], bool] | None = None,
) -> tuple[Result, dict[str, Result]]:
    """(overall result, {slice: result}) with results as evaluate_model's (loss, accuracy, n);
    `abort` as evaluate_model's.

    Predicate slices share the overall pass; a slice no sample fell into has NaN loss.
    `forward` replaces `model(x)` (e.g. to pick the logits out of a richer output)."""
    fwd = forward or model
    sums = SliceSums(slices)
    was_training = model.training
    totals = EvalTotals(loss)
    with preserved_rng():
        model.eval()
        try:
            for raw in loader:
                if abort is not None and abort():
                    raise EvalAborted
                x, y = split_batch(raw)
                n = batch_len(x)
                masks = sums.masks(x, y, n)
                xd, yd = to_device(x, device), to_device(y, device)
                with context():
                    out = fwd(xd)
                    _, per = loss(out, yd, n)
                hit = totals.add(per, out, yd, n)
                sums.add(masks, per.float().detach().cpu(), None if hit is None else hit.cpu())
        finally:
            model.train(was_training)
    out_slices = sums.results(totals.classif)
    out_slices.update(
        evaluate_positions(
            model, loader, loss, device, slices, forward=forward, context=context, abort=abort
        )
    )
    return totals.result(), out_slices


def write_train_selections(
    train_loader: DataLoader, slices: Mapping[str, Any], session_dir: str
) -> dict[str, int]:
    """Apply the predicate slices to the training set once; write `slices/<name>.train.npy`
    (training positions) for every non-empty one. Returns {name: size}."""
    preds = {k: v for k, v in slices.items() if callable(v)}
    if not preds:
        return {}
    ds = train_loader.dataset
    found: dict[str, list[np.ndarray]] = {k: [] for k in preds}
    pos = 0
    with preserved_rng():
        ld = DataLoader(
            ds,
            batch_size=train_loader.batch_size or 256,
            shuffle=False,
            collate_fn=train_loader.collate_fn,
        )
        for raw in ld:
            x, y = split_batch(raw)
            n = batch_len(x)
            for k, fn in preds.items():
                m = _mask(k, fn, x, y, n).numpy()
                found[k].append(np.flatnonzero(m) + pos)
            pos += n
    d = os.path.join(session_dir, "slices")
    os.makedirs(d, exist_ok=True)
    sizes: dict[str, int] = {}
    for k, parts in found.items():
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        sizes[k] = int(ids.size)
        if ids.size:
            path = os.path.join(d, f"{k}.train.npy")
            tmp = path + ".tmp.npy"
            np.save(tmp, ids)
            os.replace(tmp, path)
    return sizes
