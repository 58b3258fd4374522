"""Typed Trainer configuration; validation fails fast and names the option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from onthefly_worker.errors import OnTheFlyError


@dataclass
class TrainerConfig:
    project: str = "default"
    """Project name, shown in the dashboard and stored with the session."""
    run_name: str = "main"
    """Display name of the generalist run (its id is always `main`)."""
    max_epochs: int = 1
    """Stop after this many epochs (>= 1)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = no step limit."""
    do_test_after: bool = False
    """Run the test loader once training stops."""
    val_every_n_epochs: int = 0
    """Validate every N epochs; 0 disables validation."""
    seed: int | None = None
    """Seed of the data order; None = the session seed (ONTHEFLY_SEED, default 0)."""
    checkpoint_every_n_steps: int = 0
    """Also checkpoint on this step cadence (pause, epoch end and stop always checkpoint)."""
    amp: bool = False
    """Mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU."""
    grad_clip: float = 0.0
    """Clip the total gradient norm to this value; 0 disables clipping."""
    device: str | None = None
    """"cpu", "cuda", "cuda:1"...; None = CUDA when available, else CPU."""
    scheduler_interval: str = "epoch"
    """When to call scheduler.step(): "epoch" or "step" (ReduceLROnPlateau: per epoch, on val loss)."""
    nonfinite_patience: int = 20
    """Consecutive non-finite losses tolerated (the step is skipped) before the run fails."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> OnTheFlyError:
            return OnTheFlyError(f"Trainer({name}={value!r}): {want}")

        if not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise bad("max_epochs", self.max_epochs, "must be an integer >= 1")
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise bad("max_steps", self.max_steps, "must be an integer >= 0 (0 = no limit)")
        if not isinstance(self.val_every_n_epochs, int) or self.val_every_n_epochs < 0:
            raise bad("val_every_n_epochs", self.val_every_n_epochs, "must be an integer >= 0")
        if not isinstance(self.checkpoint_every_n_steps, int) or self.checkpoint_every_n_steps < 0:
            raise bad(
                "checkpoint_every_n_steps", self.checkpoint_every_n_steps, "must be an integer >= 0"
            )
        if self.grad_clip < 0:
            raise bad("grad_clip", self.grad_clip, "must be >= 0")
        if self.scheduler_interval not in ("epoch", "step"):
            raise bad("scheduler_interval", self.scheduler_interval, 'must be "epoch" or "step"')
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "must be an integer or None")
        if self.nonfinite_patience < 1:
            raise bad("nonfinite_patience", self.nonfinite_patience, "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TrainerConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OnTheFlyError(
                f"Trainer() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)
