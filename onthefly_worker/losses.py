"""Per-sample loss from the training forward pass itself.

The user's loss is re-run with `reduction='none'` on the same outputs (no extra model
forward). For a reducing `nn` loss module on a small output (the common classifier or
regressor: at most `SMALL_OUTPUT` elements), the scalar for backward is the user's own
loss call and the per-sample values come from a second, gradient-free `reduction='none'`
call: a fused loss is a single autograd node, which on a ~2 ms step is cheaper than
reducing the per-sample tensor in Python-visible ops, and the gradients are exactly the
user's. On a large output (a language model's logits) the loss is computed once, with
`reduction='none'`, and reduced exactly as the user's reduction would be.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from onthefly_worker.errors import OnTheFlyError

LossFn = Callable[..., torch.Tensor]

# Outputs up to this many elements get the "user's loss + gradient-free per-sample" path.
SMALL_OUTPUT = 1 << 20
# Outputs up to this many elements may have their per-sample losses computed later, batched
# over many steps, off the training thread (see `PerSampleLoss.deferrable`).
DEFER_OUTPUT = 1 << 16

# torch's own losses whose reduction='none' value for a sample depends only on that sample's
# row of output and target: computing them on many steps' rows concatenated gives exactly
# the per-step values. Exact types only: a subclass may override forward.
_ROW_INDEPENDENT: tuple[type[nn.Module], ...] = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.MultiLabelSoftMarginLoss,
    nn.PoissonNLLLoss,
)


# Of those, the losses whose target holds class ids or probabilities, never broadcast.
_CLASS_TARGETS: tuple[type[nn.Module], ...] = (nn.CrossEntropyLoss, nn.NLLLoss)


def _loss_name(name: str) -> str:
    """How messages name the user's loss."""
    return "loss_fn" if name == "loss_fn" else f"loss_fn {name}"


def _scalar_loss_error(
    name: str, ignores_reduction: bool = False, module: bool = False
) -> OnTheFlyError:
    why = (
        "returned a scalar even with reduction='none' (its forward ignores its `reduction` "
        "attribute)"
        if ignores_reduction and module
        else "returned a scalar even when called with reduction='none'"
        if ignores_reduction
        else "returned a scalar and has no reduction='none'"
    )
    fix = (
        # A module of the user's own (e.g. CE + a regulariser): say how to make it work.
        "give it a `reduction` attribute that its forward honours ('none': one loss per "
        "sample, e.g. F.cross_entropy(..., reduction='none') plus the regulariser per "
        "sample), or make it return one loss per sample"
        if module
        else "pass an nn loss module (e.g. nn.CrossEntropyLoss()), a function that accepts "
        "reduction=, or one that returns one loss per sample"
    )
    return OnTheFlyError(
        f"{_loss_name(name)} {why}: OnTheFly records the loss of every sample from the training forward "
        f"pass, so {fix}"
    )


def _one_row(a: Any) -> Any:
    return a.unsqueeze(0) if isinstance(a, torch.Tensor) else a


def _detached(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) else a


def _batched(obj: Any, batch: int) -> bool:
    """A tensor, or a tuple/list/dict of them, each with the batch as its first dimension
    (what vmap can split into samples)."""
    leaves, _ = tree_flatten(obj)
    return bool(leaves) and all(
        isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch for a in leaves
    )


def _per_row(raw: torch.Tensor, batch: int, denom: torch.Tensor | None = None) -> torch.Tensor:
    """One loss per sample from a reduction='none' tensor whose first dimension is the batch.

    A sample with several elements (tokens, pixels) gets their mean, or, given `denom` (one
    value per element: the class weight of a CrossEntropy/NLL target, 0 where the target is
    `ignore_index`), the user's 'mean' restricted to that sample: the sum of its element
    losses over the sum of its `denom` (its valid tokens' class weights, or their count);
    a single class-weighted target likewise (w_y * CE / w_y: its unweighted loss).
    A sample with no valid element has loss 0 (NaN would read as "not seen" in the store).
    """
    if raw.dim() == 0:
        raise OnTheFlyError("internal: per-sample loss is a scalar")
    if raw.shape[0] != batch:
        raise OnTheFlyError(
            f"the per-sample loss has shape {tuple(raw.shape)} but the batch has {batch} samples; "
            "the loss's first dimension must be the batch"
        )
    if raw.dim() == 1 and (denom is None or denom.shape != raw.shape):
        return raw
    if denom is None or denom.shape != raw.shape:
        return raw.reshape(batch, -1).mean(dim=1)
    num = raw.reshape(batch, -1).sum(dim=1)
    den = denom.reshape(batch, -1).sum(dim=1).to(num.dtype)
    some = den > 0
    return torch.where(some, num / torch.where(some, den, torch.ones_like(den)), 0.0)


class PerSampleLoss:
    """Wraps the user's loss: `__call__(output, target, batch) -> (loss_for_backward, per_sample)`."""

    def __init__(self, loss_fn: Any) -> None:
        if loss_fn is None or not callable(loss_fn):
            raise OnTheFlyError(
                f"loss_fn must be callable (e.g. nn.CrossEntropyLoss()), got {loss_fn!r}"
            )
        self.user = loss_fn
        # One of torch's own loss modules: it takes a tensor, never a tuple or dict.
        self._torch_loss = isinstance(loss_fn, nn.modules.loss._Loss) and type(
            loss_fn
        ).__module__.startswith("torch.")
        self.reduction: str = "mean"
        self._none: LossFn | None = None
        self._kwarg = False
        if isinstance(loss_fn, nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
            self.reduction = str(loss_fn.reduction)
            clone = copy.copy(loss_fn)  # shares parameters/buffers (e.g. class weights)
            clone.reduction = "none"  # type: ignore[assignment]
            self._none = clone
        elif not isinstance(loss_fn, nn.Module):
            try:
                params = inspect.signature(loss_fn).parameters
                self._kwarg = "reduction" in params or any(
                    p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
                )
                default = params["reduction"].default if "reduction" in params else None
                if default in ("mean", "sum"):
                    self.reduction = default  # (what its plain call reduces by; for notes)
            except (TypeError, ValueError):
                self._kwarg = False
        self.name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        # A loss that only ever returns a scalar (no reduction='none' to ask for): each
        # sample's loss is the user's loss on that sample alone (torch.func.vmap over the
        # batch), checked to give the user's scalar back as their mean or sum (_check_rows).
        self.by_rows = False
        self._rows_checked = False
        self._row_independent = (
            self._none is not None
            and type(loss_fn) in _ROW_INDEPENDENT
            and self.reduction in ("mean", "sum")
        )

    def plain_ce_ignore_index(self) -> int | None:
        """The `ignore_index` of a plain `nn.CrossEntropyLoss` (no class weights, no label
        smoothing, mean/sum): its per-sample losses on [N, C] float32 logits and class
        ids are `logsumexp - true logit`, which the recorder computes together with the
        margins (one pass over the logits instead of two); None for any other loss."""
        fn = self.user
        if (
            type(fn) is nn.CrossEntropyLoss
            and self._row_independent
            and fn.weight is None
            and float(fn.label_smoothing) == 0.0
        ):
            return int(fn.ignore_index)
        return None

    def deferrable(self, output: Any, target: Any) -> bool:
        """True when `per_sample(output, target)` may run later on another thread, batched
        with other steps' rows, and give exactly what it would give now: one of torch's
        row-independent losses on a small output and target batch, outside autocast (whose
        casts a later call would not see)."""
        return (
            self._row_independent
            and isinstance(output, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and output.dim() >= 1
            and target.dim() >= 1
            and output.shape[0] == target.shape[0]
            # An elementwise loss on shapes that broadcast, e.g. output (B, 1) against target
            # (B,) (torch warns), pairs every row with every target of its batch: rows of
            # other steps must not join in.
            and (type(self.user) in _CLASS_TARGETS or output.shape == target.shape)
            and output.numel() <= DEFER_OUTPUT
            and target.numel() <= DEFER_OUTPUT
            and not torch.is_autocast_enabled(output.device.type)
        )

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The reduction='none' loss of each row (gradient-free): the deferred half of
        `__call__` for a `deferrable` batch, or many of them concatenated."""
        assert self._none is not None
        with torch.no_grad():
            return self._rows(self._none(output, target), target, int(output.shape[0]))

    def _rows(self, raw: torch.Tensor, target: Any, batch: int) -> torch.Tensor:
        """Per-sample values of `raw`; a CrossEntropy/NLL sample with several targets
        (a sequence) is normalised by its own valid tokens' class weights (see _per_row); a
        'batchmean' sample (KLDivLoss) is the sum of its elements."""
        if self.reduction == "batchmean" and raw.dim() > 1 and raw.shape[0] == batch:
            # nn.KLDivLoss(reduction="batchmean") is the sum over the batch size: a sample's
            # loss is the sum of its elements, so the samples' mean is the user's loss.
            return raw.reshape(batch, -1).sum(dim=1)
        denom = None
        if isinstance(target, torch.Tensor) and (
            raw.dim() > 1 or getattr(self._none, "weight", None) is not None
        ):
            # (A single class-weighted target follows the same rule: w_y * CE / w_y.)
            denom = self._token_weights(target)
        return _per_row(raw, batch, denom)

    def row_weights(self, target: Any, batch: int) -> torch.Tensor | None:
        """Each sample's weight in the user's 'mean' over many samples: the summed class
        weights of its valid targets (CrossEntropy/NLL with class-index targets; 0 for a
        sample whose targets are all `ignore_index`), so sum(per * w) / sum(w) is the
        user's loss over a whole dataset; None for any other loss (plain mean)."""
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            return None
        w = self._token_weights(target)
        if w is None or w.shape[0] != batch:
            return None
        return w.reshape(batch, -1).sum(dim=1).float()

    def ignore_index(self) -> int | None:
        """The `ignore_index` of a CrossEntropy/NLL loss; None for any other loss."""
        fn = self._none
        return int(fn.ignore_index) if isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss)) else None

    def _token_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """CrossEntropy/NLL with class-index targets: each target's weight in the 'mean'
        reduction (its class weight, or 1), 0 where it is `ignore_index`; else None."""
        fn = self._none
        if not isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return None
        if target.dtype not in (torch.int64, torch.int32, torch.long):
            return None
        valid = target != fn.ignore_index
        weight = fn.weight
        if weight is None:
            return valid
        # An ignored target may lie outside the classes (ignore_index=255): index with 0.
        return weight[torch.where(valid, target, torch.zeros_like(target))] * valid

    def _weighted_denominator(self, target: torch.Tensor) -> torch.Tensor | None:
        """CrossEntropy/NLL 'mean' divides by the summed class weights of the targets.
        No host sync: ignored targets (loss 0) are left out, as in PyTorch."""
        w = self._token_weights(target)
        return None if w is None else w.sum()

    @property
    def who(self) -> str:
        """How messages name the user's loss."""
        return _loss_name(self.name)

    def rows_of(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """For a `by_rows` loss: the user's loss on each sample alone, one value per row
        (keeps the graph when gradients are enabled)."""
        fn = self.user

        def one(o: Any, t: Any) -> torch.Tensor:
            return fn(tree_map(_one_row, o), tree_map(_one_row, t))

        return torch.func.vmap(one)(output, target)

    def _rows_or_error(self, output: Any, target: Any, batch: int) -> torch.Tensor:
        """`rows_of` on the detached output, gradient-free; the scalar-loss error when the
        output or target is not split into samples by its first dimension."""
        if not (_batched(output, batch) and _batched(target, batch)):
            raise self._scalar_error()
        with torch.no_grad():
            return self.rows_of(tree_map(_detached, output), target)

    def _scalar_error(self) -> OnTheFlyError:
        """The error for a loss that returns a scalar where one loss per sample is needed."""
        return _scalar_loss_error(
            self.name,
            ignores_reduction=self._none is not None or self._kwarg,
            module=isinstance(self.user, nn.Module)
            and type(self.user).__module__ != "torch.nn.modules.loss",
        )

    def _adopt_rows(
        self, output: Any, target: Any, total: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """The user's loss returned a scalar and there is no reduction='none' to ask for:
        take each sample's loss as the loss on that sample alone, if that gives the user's
        scalar back (else a clear error, as before)."""
        base = self._scalar_error()
        try:
            # (a warning the loss gives on one sample, e.g. std() of one value, is moot: the
            # check below refuses such a loss with the reason)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per = self._rows_or_error(output, target, batch)
        except OnTheFlyError:
            raise
        except Exception as e:  # noqa: BLE001 - vmap's own reason, in the user's error
            raise OnTheFlyError(
                f"{base}. (Its value on each sample alone, computed with torch.func.vmap, "
                f"failed too: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        if not isinstance(per, torch.Tensor) or tuple(per.shape) != (batch,):
            shape = tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
            raise OnTheFlyError(f"{base}. (On one sample it returned {shape}, not a scalar)")
        self.by_rows = True
        self._check_rows(per, total)
        return per

    def _check_rows(self, per: torch.Tensor, total: torch.Tensor) -> None:
        """On the first batch with finite values: the per-sample losses must give the user's
        scalar back as their mean (or sum), else the loss depends on the batch as a whole
        and has no per-sample value."""
        t = total.detach().float()
        p = per.detach().float()
        if not bool(torch.isfinite(t)):
            return  # checked on a later batch
        mean, tot = p.mean(), p.sum()
        # (a finite batch loss from non-finite sample losses is neither: isclose is False)
        if bool(torch.isclose(t, mean, rtol=1e-3, atol=1e-6)):
            self.reduction = "mean"
        elif bool(torch.isclose(t, tot, rtol=1e-3, atol=1e-6)):
            self.reduction = "sum"
        else:
            raise OnTheFlyError(
                f"{self.who} returned a scalar ({float(t):.6g}) that is neither the "
                f"mean ({float(mean):.6g}) nor the sum ({float(tot):.6g}) of its value on each "
                "sample alone: it depends on the batch as a whole (e.g. a contrastive or "
                "batch-normalised loss), so a sample has no loss of its own. OnTheFly records "
                "every sample's loss: make loss_fn accept reduction= (or return one loss per "
                "sample)"
            )
        self._rows_checked = True

    def __call__(self, output: Any, target: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._torch_loss and not isinstance(output, torch.Tensor):
            # torch's own message would point into this wrapper's reduction='none' call.
            raise OnTheFlyError(
                f"the model returned a {type(output).__name__}, and {type(self.user).__name__} "
                "takes a tensor: return the prediction tensor from forward(), or pass a "
                "loss_fn that unpacks it (giving one loss per sample, or taking reduction=)"
            )
        if self.by_rows:
            total = self.user(output, target)
            if not isinstance(total, torch.Tensor) or total.dim() != 0:
                raise OnTheFlyError(
                    f"{self.who} returned a scalar before and now "
                    f"{type(total).__name__} {tuple(getattr(total, 'shape', ()))}"
                )
            per = self._rows_or_error(output, target, batch)
            if not self._rows_checked:
                self._check_rows(per, total)
            return total, per
        if (
            self._none is not None
            and self.reduction in ("mean", "sum")
            and isinstance(output, torch.Tensor)
            and output.numel() <= SMALL_OUTPUT
            and torch.is_grad_enabled()
        ):
            total = self.user(output, target)
            with torch.no_grad():
                raw = self._none(output, target)
            if not isinstance(total, torch.Tensor) or total.dim() != 0:
                raise OnTheFlyError(
                    f"loss_fn {self.name} with reduction={self.reduction!r} did not return a scalar tensor"
                )
            if not isinstance(raw, torch.Tensor):
                raise OnTheFlyError(f"loss_fn returned {type(raw).__name__}, not a tensor")
            if raw.dim() == 0:
                return total, self._adopt_rows(output, target, total, batch)
            return total, self._rows(raw, target, batch)
        if self._none is not None:
            raw = self._none(output, target)
        elif self._kwarg and torch.is_grad_enabled():
            # A function that takes reduction=: backward uses its own plain call (its
            # default reduction, and whatever else it adds, e.g. a weight penalty); the
            # per-sample values come from a second, gradient-free reduction='none' call.
            total = self.user(output, target)
            if isinstance(total, torch.Tensor) and total.dim() == 0:
                with torch.no_grad():
                    raw = self.user(output, target, reduction="none")
                if not isinstance(raw, torch.Tensor):
                    raise OnTheFlyError(f"loss_fn returned {type(raw).__name__}, not a tensor")
                if raw.dim() == 0:
                    return total, self._adopt_rows(output, target, total, batch)
                return total, self._rows(raw, target, batch).detach()
            raw = total  # its plain call gives one loss per sample: reduced below
        elif self._kwarg:
            raw = self.user(output, target, reduction="none")
        else:
            raw = self.user(output, target)
        if not isinstance(raw, torch.Tensor):
            raise OnTheFlyError(f"loss_fn returned {type(raw).__name__}, not a tensor")
        if raw.dim() == 0:  # (asked for reduction='none', it ignored it: the same scalar)
            return raw, self._adopt_rows(output, target, raw, batch)
        per = self._rows(raw, target, batch)
        if self.reduction == "sum":
            total = raw.sum()
        elif self.reduction == "batchmean":  # nn.KLDivLoss: the sum over the batch size
            total = raw.sum() / batch
        else:
            denom = self._weighted_denominator(target) if isinstance(target, torch.Tensor) else None
            total = raw.sum() / denom if denom is not None else raw.mean()
        return total, per.detach()
