"""A fork's recipe applied to the user's own optimizer and scheduler.

Shared by the native `Trainer` loop and the Lightning callback:

* `optimizer_like` builds another optimizer of the user's type from its defaults, passing
  only the keyword arguments its constructor accepts (an optimizer's `defaults` may hold
  keys that its constructor rejects: torch 2.13's AdamW has `decoupled_weight_decay`).
* `train_adapters` points the user's optimizer at the low-rank adapters `add_adapters`
  just added, in place: each adapter joins the parameter group of the layer it adapts, so
  every group keeps its hyper-parameters (the fork's lr/wd multipliers included), and the
  user's lr scheduler, which holds that optimizer object, goes on scheduling it.
* `scale_scheduler_lrs` keeps an lr multiplier through schedulers that compute the lr
  from their `base_lrs` (LambdaLR, CosineAnnealingLR...).
* `EarlyStop` decides when a fork stops early: its slice (or val) loss, evaluated every
  `every` steps, has not improved by more than `min_delta` for `patience` evaluations.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onthefly_worker.errors import OnTheFlyError

_KW = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def constructor_kwargs(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `values` that `cls(params, **kwargs)` accepts.

    A constructor with `**kwargs` forwards them to its base class (the usual subclassing
    pattern), so the names its bases accept count too, up to `torch.optim.Optimizer`."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return dict(values)  # not introspectable: pass everything, as before
        names |= {n for n, p in params.items() if p.kind in _KW}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    names -= {"self", "params"}
    return {k: v for k, v in values.items() if k in names}


def optimizer_like(
    opt: torch.optim.Optimizer, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """A new optimizer of `opt`'s type over `groups` (dicts with "params" and any
    per-group hyper-parameters, which are kept as given), built from `opt.defaults`."""
    return type(opt)(groups, **constructor_kwargs(type(opt), opt.defaults))


def _group_of(where: dict[int, int], layer: nn.Module) -> int | None:
    for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
        if p is not None and id(p) in where:
            return where[id(p)]
    return None


def train_adapters(opt: torch.optim.Optimizer, model: nn.Module) -> str:
    """Make `opt` train `model`'s trainable parameters (its LoRA adapters, after
    `add_adapters` froze everything else) instead of the parameters it was built with.

    In place, so whatever holds the optimizer (the user's lr scheduler, Lightning) keeps
    working: each group's parameter list becomes the adapters of the layers whose weights
    it held (an adapter of a layer the optimizer did not train joins group 0), the groups'
    hyper-parameters stay as they are (the lr/wd multipliers already applied to them), and
    the optimizer state of the frozen weights is dropped. State an optimizer creates in its
    constructor (Adagrad's sums) comes from a fresh optimizer of the same type over the
    adapters. Returns a sentence for the fork's log saying how the adapters were grouped.
    """
    from onthefly_worker.merge_math import LoRALinear

    groups = opt.param_groups
    where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    new: list[list[torch.Tensor]] = [[] for _ in groups]
    orphans: list[str] = []
    placed: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        i = _group_of(where, m.base)
        if i is None:
            orphans.append(name)
            i = 0
        for p in (m.lora_A, m.lora_B):
            if p.requires_grad and id(p) not in placed:
                new[i].append(p)
                placed.add(id(p))
    for p in model.parameters():  # anything else left trainable stays where it was
        if p.requires_grad and id(p) not in placed:
            new[where.get(id(p), 0)].append(p)
            placed.add(id(p))
    if not placed:
        raise OnTheFlyError("--adapters: the model has no trainable adapter parameters")
    note = ""
    fresh: dict[Any, Any] = {}
    try:
        with torch.no_grad():
            twin = optimizer_like(
                opt,
                [
                    {**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                    for g, ps in zip(groups, new, strict=True)
                    if ps
                ],
            )
        fresh = dict(twin.state)
    except (TypeError, ValueError, RuntimeError) as e:
        # Most optimizers create their state at the first step anyway.
        note = f"; its state starts empty ({type(opt).__name__}(...) failed: {e})"
    opt.state.clear()
    opt.state.update(fresh)
    for g, ps in zip(groups, new, strict=True):
        g["params"][:] = ps  # the same list object: an optimizer may hold a reference to it
    used = [i for i, ps in enumerate(new) if ps]
    if orphans:
        how = (
            f"the optimizer does not train {', '.join(orphans)}, so their adapters use group 0's "
            f"settings; the others use the group of the layer they adapt ({_groups(used)})"
        )
    elif len(groups) == 1:
        how = "the adapters use the optimizer's settings (one parameter group)"
    else:
        how = f"each adapter uses the optimizer group of the layer it adapts ({_groups(used)})"
    return how + note


def _groups(used: list[int]) -> str:
    return ("group " if len(used) == 1 else "groups ") + ", ".join(str(i) for i in used)


def scale_scheduler_lrs(sched: Any, mul: float) -> None:
    """Scale a scheduler's `base_lrs` (and those of the schedulers it chains) by `mul`, so
    one that computes the lr from them keeps a multiplier applied to the groups' lr."""
    if sched is None or mul == 1.0:
        return
    base = getattr(sched, "base_lrs", None)
    if isinstance(base, list):
        sched.base_lrs = [b * mul for b in base]
    for child in getattr(sched, "_schedulers", None) or ():
        scale_scheduler_lrs(child, mul)


# A parent's lr at or below this fraction of the script's own lr means its schedule has
# ended (cosine/linear decay to 0): a fork starting there would not train.
ENDED_LR_FRACTION = 1e-6


def start_lrs(opt: Any) -> list[float]:
    """The script's own lr of each parameter group (a scheduler's `initial_lr`, else the
    group's lr), read before a checkpoint's optimizer state replaces them."""
    return [float(g.get("initial_lr", g["lr"])) for g in opt.param_groups]


def apply_fork_recipe(
    opt: Any, schedulers: list[Any], spec: dict[str, Any], script_lrs: list[float], step: int
) -> str:
    """A fork's optimizer, loaded from its parent's checkpoint: each group's lr times
    `lr_mul` and weight decay times `wd_mul` (0 = none), the schedulers' base_lrs scaled
    alike. A group whose lr at the checkpoint is ~0 (its schedule has ended) starts from the
    script's own lr instead, times `lr_mul`: the returned sentence says so ("" otherwise)."""
    lr_mul = float(spec.get("lr_mul", 1.0) or 1.0)
    wd = spec.get("wd_mul")
    wd_mul = 1.0 if wd is None else float(wd)
    ended: list[str] = []
    for i, g in enumerate(opt.param_groups):
        start = script_lrs[i] if i < len(script_lrs) else 0.0
        if start > 0 and g["lr"] <= ENDED_LR_FRACTION * start:
            ended.append(f"group {i}: {g['lr']:.3g} -> {start:.3g}")
            g["lr"] = start
        g["lr"] = g["lr"] * lr_mul
        if "weight_decay" in g:
            g["weight_decay"] = g["weight_decay"] * wd_mul
    # The script's scheduler starts afresh on the fork's lr; one that computes the lr from
    # its base_lrs would drop the multiplier at its first step otherwise.
    for sched in schedulers:
        scale_scheduler_lrs(sched, lr_mul)
    if not ended:
        return ""
    return (
        f"the parent's learning rate at step {step} is ~0 (its schedule has ended), so the "
        f"fork would not train: it starts from the script's own lr instead ({'; '.join(ended)}"
        f"{f', then x{lr_mul:g} (--lr-mul)' if lr_mul != 1.0 else ''}) and its scheduler "
        "starts afresh"
    )


METRICS = ("slice", "val")


@dataclass
class EarlyStop:
    """Stop a fork when its metric has not improved by more than `min_delta` over its best
    for `patience` evaluations in a row; it is evaluated every `every` steps, and its value
    where early stopping starts (before the fork's first step, or where a raced variant goes
    on to the full budget) is the first best."""

    patience: int
    metric: str = "slice"
    min_delta: float = 0.0
    every: int = 1
    best: float | None = None
    best_step: int = -1
    bad: int = 0
    evals: int = 0
    last: float | None = None
    stopped_at: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> EarlyStop | None:
        """From a fork spec's `early_stop` entry; None when there is none (or patience 0)."""
        d = spec.get("early_stop") or {}
        patience = int(d.get("patience", 0) or 0)
        if patience <= 0:
            return None
        metric = str(d.get("metric") or "slice")
        if metric not in METRICS:
            raise OnTheFlyError(f"early stop metric {metric!r}: one of {', '.join(METRICS)}")
        budget = int(spec.get("budget_steps", 0) or 0)
        every = int(d.get("every", 0) or 0) or max(1, budget // 10)
        return cls(patience, metric, float(d.get("min_delta", 0.0) or 0.0), every)

    @property
    def split(self) -> str:
        """The eval split the metric is reported as."""
        return "slice:self" if self.metric == "slice" else "val"

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def start(self, step: int, value: float) -> None:
        """The value before training (not an evaluation that can run out the patience)."""
        if math.isfinite(value) and self.best is None:
            self.best, self.best_step = value, step

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when the fork should stop here."""
        self.evals += 1
        self.last = value
        if math.isfinite(value) and (self.best is None or value < self.best - self.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        if self.bad >= self.patience:
            self.stopped_at = step
            return True
        return False

    def summary(self) -> dict[str, Any]:
        """What the run's record says about the stop."""
        return {
            "step": self.stopped_at,
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "last": self.last,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "every": self.every,
            "evals": self.evals,
        }

    def describe(self) -> str:
        best = "n/a" if self.best is None else f"{self.best:.4g} at step {self.best_step}"
        delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (
            f"stopped early at step {self.stopped_at}: {self.metric} loss did not improve{delta} "
            f"in {self.patience} evaluation(s) (every {self.every} steps); best {best}"
        )
