"""Typed Trainer configuration; validation fails fast and names the option."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from onthefly_worker.errors import OnTheFlyError


def check_val_slices(val_slices: Any, owner: str) -> None:
    """Validate a `val_slices` option (`Trainer(...)` or `attach_lightning(...)`, named by
    `owner` in the error): a non-empty {name: predicate or validation-set positions}."""

    def bad(value: Any, want: str) -> OnTheFlyError:
        return OnTheFlyError(f"{owner}(val_slices={value!r}): {want}")

    if not isinstance(val_slices, dict) or not val_slices:
        raise bad(val_slices, "must be a non-empty dict {name: slice}")
    for name, sl in val_slices.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise bad(name, "slice names are 1-64 letters, digits, '_', '-' or '.'")
        if callable(sl):
            continue
        try:
            ids = [int(i) for i in sl]
        except (TypeError, ValueError):
            raise bad(
                {name: type(sl).__name__},
                "each slice is a predicate fn(inputs, targets) -> bools, or a sequence "
                "of validation-set positions",
            ) from None
        if not ids or min(ids) < 0:
            raise bad(name, "a slice of positions must be non-empty and >= 0")


def describe_val_slices(val_slices: dict[str, Any]) -> dict[str, str]:
    """A JSON-able summary of `val_slices` for the run's config: "predicate" or "N positions"."""
    return {
        k: "predicate" if callable(v) else f"{len(list(v))} positions"
        for k, v in val_slices.items()
    }


def is_seconds(value: Any) -> bool:
    """A number of seconds >= 0 (int or float, not bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(value >= 0)


@dataclass
class TrainerConfig:
    project: str = "default"
    """Project name, shown in the dashboard and stored with the session."""
    run_name: str = "main"
    """Display name of the generalist run (its id is always `main`)."""
    max_epochs: int | None = None
    """Stop after this many epochs (>= 1). None (the default): one epoch, or no epoch limit
    when `max_steps` is set, as in Lightning (`max_steps` alone is the limit)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = no step limit."""
    do_test_after: bool = False
    """Run the test loader once training stops."""
    val_every_n_epochs: int = 0
    """Validate every N epochs; 0 disables validation."""
    seed: int | None = None
    """Seed of the data order; None = the session seed (ONTHEFLY_SEED, default 0)."""
    checkpoint_every_n_steps: int = 0
    """Also checkpoint on this step cadence (pause, stop and the end of training always checkpoint)."""
    checkpoint_min_interval_s: float = 2.0
    """An epoch end checkpoints when at least this many seconds have passed since the last
    checkpoint; 0 = every epoch end (epochs of a fraction of a second would otherwise spend
    several percent of training on checkpoints)."""
    amp: bool = False
    """Mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU."""
    grad_clip: float = 0.0
    """Clip the total gradient norm to this value; 0 disables clipping."""
    grad_norm_every: int = 0
    """Measure the gradient norm (and check the gradients for NaN/Inf) every N steps; 0 = auto:
    every step when clipping or with AMP, otherwise the smallest N (1-16) at which measuring
    costs <= 0.25% of a step, timed on steps 11-30 and kept in the checkpoint."""
    device: str | None = None
    """"cpu", "cuda", "cuda:1"...; None = CUDA when available, else CPU."""
    scheduler_interval: str = "epoch"
    """When to call scheduler.step(): "epoch" or "step" (ReduceLROnPlateau: per epoch, on val loss)."""
    nonfinite_patience: int = 20
    """Consecutive non-finite losses tolerated (the step is skipped) before the run fails."""
    val_slices: dict[str, Any] | None = None
    """Named slices whose validation loss is reported next to the overall one, each as
    `val_slice:<name>`: a predicate `fn(inputs, targets) -> one bool per sample` (applied
    to the validation batches, and once to the training set so automode can fork a
    specialist on a weak slice), or a sequence of positions in the validation set
    (reported, not forkable). Names: letters, digits, `_`, `-`, `.` (at most 64)."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> OnTheFlyError:
            return OnTheFlyError(f"Trainer({name}={value!r}): {want}")

        if self.max_epochs is not None and (
            not isinstance(self.max_epochs, int)
            or isinstance(self.max_epochs, bool)
            or self.max_epochs < 1
        ):
            raise bad(
                "max_epochs",
                self.max_epochs,
                "must be an integer >= 1 (or None: one epoch, no epoch limit with max_steps)",
            )

        def count(v: Any, lo: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        for name in ("project", "run_name"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise bad(name, v, "must be a non-empty string")
        if not count(self.max_steps, 0):
            raise bad("max_steps", self.max_steps, "must be an integer >= 0 (0 = no limit)")
        if not count(self.val_every_n_epochs, 0):
            raise bad("val_every_n_epochs", self.val_every_n_epochs, "must be an integer >= 0")
        if not isinstance(self.do_test_after, bool):
            raise bad("do_test_after", self.do_test_after, "must be True or False")
        if not count(self.checkpoint_every_n_steps, 0):
            raise bad(
                "checkpoint_every_n_steps", self.checkpoint_every_n_steps, "must be an integer >= 0"
            )
        if not is_seconds(self.checkpoint_min_interval_s):
            raise bad(
                "checkpoint_min_interval_s",
                self.checkpoint_min_interval_s,
                "must be a number of seconds >= 0 (0 = every epoch end)",
            )
        if (
            not isinstance(self.grad_clip, (int, float))
            or isinstance(self.grad_clip, bool)
            or not math.isfinite(self.grad_clip)
            or self.grad_clip < 0
        ):
            raise bad("grad_clip", self.grad_clip, "must be a number >= 0 (0 = no clipping)")
        if not count(self.grad_norm_every, 0):
            raise bad("grad_norm_every", self.grad_norm_every, "must be an integer >= 0 (0 = auto)")
        if self.scheduler_interval not in ("epoch", "step"):
            raise bad("scheduler_interval", self.scheduler_interval, 'must be "epoch" or "step"')
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**32
        ):
            raise bad("seed", self.seed, f"must be None or an integer in 0..{2**32 - 1}")
        if not count(self.nonfinite_patience, 1):
            raise bad("nonfinite_patience", self.nonfinite_patience, "must be an integer >= 1")
        if not isinstance(self.amp, bool):
            raise bad("amp", self.amp, "must be True or False")
        if self.device is not None:
            self._check_device(bad)
        if self.val_slices is not None:
            check_val_slices(self.val_slices, "Trainer")

    @property
    def epoch_limit(self) -> int:
        """The epochs to train; 0 = no epoch limit (`max_steps` alone stops the run)."""
        if self.max_epochs is not None:
            return self.max_epochs
        return 0 if self.max_steps else 1

    def _check_device(self, bad: Any) -> None:
        import torch

        try:
            dev = torch.device(self.device)  # type: ignore[arg-type]
        except (RuntimeError, TypeError) as e:
            raise bad(
                "device", self.device, 'must be a torch device such as "cpu" or "cuda:0"'
            ) from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise bad("device", self.device, 'CUDA is not available on this machine (use "cpu")')
        if dev.type not in ("cpu", "cuda", "mps"):
            raise bad("device", self.device, 'OnTheFly trains on "cpu", "cuda" or "mps"')

    def torch_device(self) -> Any:
        """`device`, or CUDA when available, else CPU (a torch.device)."""
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.val_slices is not None:
            out["val_slices"] = describe_val_slices(self.val_slices)
        return out

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TrainerConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OnTheFlyError(
                f"Trainer() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)
