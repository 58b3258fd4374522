"""Automode decisions as pure functions: detections in, plan cards out.

The planner never touches a process, a file or the network. The supervisor feeds it
detections and a :class:`PlannerState`, gets :class:`PlanCard` s back, executes (or
waits for approval of) them through ``ControlService``, and reports what happened with
:func:`record_proposed`, :func:`record_started` and :func:`apply_outcome`, each of which
returns a *new* state. Keeping policy apart from mechanism means every safeguard
(cooldowns, caps, dedupe, adaptive back-off) is a unit test on plain data, and a
session's planner can be replayed from its stored events.

Lifecycle of a card (``PlanStatus``)::

    proposed -> approved -> running -> done | failed
    proposed -> rejected,  approved -> rejected

With automode on the supervisor approves immediately; with it off a person does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from onthefly_supervisor.planner.detectors import Detection, DetectionKind
from onthefly_supervisor.selection import parse_spec

__all__ = [
    "MERGE_METHODS",
    "VALID_PLAN_TRANSITIONS",
    "Action",
    "Blocked",
    "PendingPlan",
    "PlanCard",
    "PlanResult",
    "PlanStatus",
    "PlannerConfig",
    "PlannerState",
    "Reason",
    "Specialist",
    "apply_outcome",
    "effective_cooldown",
    "explain_blocked",
    "halving_rungs",
    "plan",
    "propose",
    "record_proposed",
    "record_started",
    "successive_halving",
    "validate_selection",
]


class Action(str, Enum):
    """What a plan card asks the supervisor to do."""

    FORK = "fork"
    """Start short-budget specialist runs on a selection of samples (children processes)."""
    MERGE = "merge"
    """Unify the parent and completed specialists into one new run (merge worker)."""
    STABILIZE = "stabilize"
    """Repair the target run in place: roll back, skip bad batches, lower LR, clip, bf16."""
    EXPLORE = "explore"
    """Race a few hyper-parameter variants of the target run with successive halving."""
    GATE = "gate"
    """Train a small router over the parent and its specialists (merge worker)."""


class Reason(str, Enum):
    """Why a card was proposed; the UI groups and explains cards by it."""

    INSTABILITY_SPIKE = "instability_spike"
    """A loss/grad-norm spike or an upward drift of the loss."""
    NONFINITE = "nonfinite"
    """A NaN or Inf in the loss or gradient norm."""
    HIGH_LOSS_TAIL = "high_loss_tail"
    """The same samples stay in the top loss quantile."""
    RESIDUAL_CLUSTER = "residual_cluster"
    """A cluster of samples has a much higher loss than the rest."""
    LOSS_PLATEAU = "loss_plateau"
    """The training loss stopped improving."""
    SLICE_UNDERPERFORMANCE = "slice_underperformance"
    """A validation slice stays worse than the overall loss."""
    MERGE_CADENCE = "merge_cadence"
    """Periodic merge of completed specialists back into one model."""


class PlanStatus(str, Enum):
    """Where a plan card is in its life."""

    PROPOSED = "proposed"
    """Produced by the planner; waiting for approval (automode off) or execution."""
    APPROVED = "approved"
    """Accepted by a person or by automode; waiting for resources to start."""
    RUNNING = "running"
    """Being executed: children started, rollback applied, or merge worker busy."""
    DONE = "done"
    """Finished; its outcome was recorded with :func:`apply_outcome`."""
    FAILED = "failed"
    """Execution failed (a child crashed, the merge raised...)."""
    REJECTED = "rejected"
    """A person declined it, or it was withdrawn before it started."""


VALID_PLAN_TRANSITIONS: frozenset[tuple[PlanStatus, PlanStatus]] = frozenset(
    {
        (PlanStatus.PROPOSED, PlanStatus.APPROVED),
        (PlanStatus.PROPOSED, PlanStatus.REJECTED),
        (PlanStatus.APPROVED, PlanStatus.RUNNING),
        (PlanStatus.APPROVED, PlanStatus.REJECTED),
        (PlanStatus.RUNNING, PlanStatus.DONE),
        (PlanStatus.RUNNING, PlanStatus.FAILED),
    }
)

MERGE_METHODS: tuple[str, ...] = ("swa", "distill", "fisher_soup", "adapter_fuse")
_WEIGHT_SPACE_MERGES = ("swa", "fisher_soup", "adapter_fuse")
"""Merges that average (or add) weights, which only makes sense for runs of one trajectory."""

_PENDING_STATUSES = (PlanStatus.PROPOSED, PlanStatus.APPROVED, PlanStatus.RUNNING)


def validate_selection(spec: str) -> str:
    """Check a selection SPEC and return its canonical form (``quantile:0.85:1.0`` ->
    ``quantile:0.85:1``); ``ValueError`` names the bad part and the grammar.

    Delegates to :func:`onthefly_supervisor.selection.parse_spec`, so plan cards accept
    exactly what ``onthefly fork --select`` and the dashboard accept.
    """
    return str(parse_spec(spec))


def _json_safe(x: Any) -> Any:
    """Plain JSON values: enums to their value, tuples to lists, NaN/Inf to None."""
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class PlanCard:
    """One proposed action with everything needed to execute, approve or edit it."""

    plan_id: str
    """Stable id (``plan-0007``); the CLI's ``onthefly plans approve ID`` uses it."""
    action: Action
    """What to do."""
    reason: Reason
    """Why: which evidence led to it."""
    selection: str
    """Which samples it acts on, as a SPEC (``all``, ``quantile:0.85:1.0``, ...)."""
    training_recipe: Mapping[str, Any] = field(default_factory=dict)
    """How children train or how the run is repaired: lr_mul, wd_mul, variants, race,
    early_stop, grad_clip, bf16, rollback_to_step, skip_offending_batches..."""
    gate_recipe: Mapping[str, Any] = field(default_factory=dict)
    """Router to train over parent + specialists (``kind``, ``temperature``,
    ``balance_weight``, ``steps``, ``experts``); empty when no gate is involved."""
    merge_recipe: Mapping[str, Any] = field(default_factory=dict)
    """``method`` (swa | distill | fisher_soup | adapter_fuse) and ``runs``; empty unless merging."""
    budget_steps: int = 0
    """Steps per child at the final rung (fork/explore), gate/distill steps, or the
    observation window of a stabilization."""
    cooldown_steps: int = 0
    """Cooldown of this action kind at proposal time (adaptive; for the UI)."""
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    """Evidence for people: the detection, thresholds, a one-line summary."""
    created_step: int = 0
    """Training step of the target run when the card was proposed."""
    status: PlanStatus = PlanStatus.PROPOSED
    """Lifecycle state; change it only with :meth:`with_status`."""
    target_run: str = "main"
    """The run the action applies to (the parent of a fork, the run to stabilize)."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> ValueError:
            return ValueError(f"PlanCard.{name}={value!r}: {want}")

        try:
            object.__setattr__(self, "action", Action(self.action))
        except ValueError:
            raise bad(
                "action", self.action, f"must be one of {[a.value for a in Action]}"
            ) from None
        try:
            object.__setattr__(self, "reason", Reason(self.reason))
        except ValueError:
            raise bad(
                "reason", self.reason, f"must be one of {[r.value for r in Reason]}"
            ) from None
        try:
            object.__setattr__(self, "status", PlanStatus(self.status))
        except ValueError:
            raise bad(
                "status", self.status, f"must be one of {[s.value for s in PlanStatus]}"
            ) from None
        if not self.plan_id:
            raise bad("plan_id", self.plan_id, "must be a non-empty string")
        try:
            validate_selection(self.selection)
        except ValueError as e:
            raise bad("selection", self.selection, str(e)) from None
        if int(self.budget_steps) < 0:
            raise bad("budget_steps", self.budget_steps, "must be >= 0")
        if int(self.cooldown_steps) < 0:
            raise bad("cooldown_steps", self.cooldown_steps, "must be >= 0")
        method = self.merge_recipe.get("method")
        if self.action is Action.MERGE and method not in MERGE_METHODS:
            raise bad(
                "merge_recipe", dict(self.merge_recipe), f"method must be one of {MERGE_METHODS}"
            )
        for name in ("training_recipe", "gate_recipe", "merge_recipe", "diagnostics"):
            object.__setattr__(self, name, dict(getattr(self, name)))

    @property
    def dedupe_key(self) -> str:
        """Cards with the same key do the same thing; only one may be pending at a time."""
        sel = validate_selection(self.selection)
        return f"{self.action.value}|{self.reason.value}|{sel}|{self.target_run}"

    @property
    def children(self) -> int:
        """Child processes the card occupies while running (forks and explore races)."""
        if self.action in (Action.FORK, Action.EXPLORE):
            return max(1, len(self.training_recipe.get("variants", ())))
        return 0

    @property
    def cost_steps(self) -> int:
        """Extra training steps the card may spend, counted against the total budget.

        A race spends ``alive(rung) * (rung length)`` summed over its rungs (an upper
        bound: early stopping only lowers it). Stabilization repairs the run in place
        and costs nothing extra; gate and distillation cost their steps.
        """
        if self.action is Action.STABILIZE:
            return 0
        if self.action in (Action.FORK, Action.EXPLORE):
            race = self.training_recipe.get("race") or {}
            rungs = [int(r) for r in race.get("rung_steps", ())] or [int(self.budget_steps)]
            eta = int(race.get("eta", 3))
            return _race_cost(self.children, rungs, eta)
        return int(self.budget_steps)

    def with_status(self, new: PlanStatus | str) -> PlanCard:
        """The one way to change a card's status; refuses transitions not in the table."""
        target = PlanStatus(new)
        if (self.status, target) not in VALID_PLAN_TRANSITIONS:
            raise ValueError(
                f"plan {self.plan_id}: cannot go from {self.status.value} to {target.value}"
            )
        return replace(self, status=target)

    @property
    def pending(self) -> bool:
        return self.status in _PENDING_STATUSES

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanCard:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PlanCard.from_dict: unknown field(s) {', '.join(unknown)}")
        kw = dict(d)
        for name in ("budget_steps", "cooldown_steps", "created_step"):
            if name in kw:
                kw[name] = int(kw[name])
        for name in ("training_recipe", "gate_recipe", "merge_recipe", "diagnostics"):
            if kw.get(name) is None:
                kw[name] = {}
        return cls(**kw)


def _race_cost(n_variants: int, rung_steps: Sequence[int], eta: int) -> int:
    alive = max(1, n_variants)
    cost, prev = 0, 0
    for r in rung_steps:
        cost += alive * (int(r) - prev)
        prev = int(r)
        alive = max(1, alive // eta)
    return cost


def halving_rungs(budget_steps: int, n_variants: int, eta: int = 3) -> list[int]:
    """Cumulative step budgets of successive-halving rungs ending at ``budget_steps``.

    Each rung keeps ``max(1, n // eta)`` variants, so with ``k`` halvings until one
    variant is left there are ``k + 1`` rungs at ``budget / eta^(k - i)``: cheap early
    rungs weed out bad variants, and only the survivor trains the full budget.
    """
    if eta < 2:
        raise ValueError(f"halving_rungs(eta={eta!r}): must be >= 2")
    if budget_steps < 1:
        raise ValueError(f"halving_rungs(budget_steps={budget_steps!r}): must be >= 1")
    halvings, alive = 0, max(1, n_variants)
    while alive > 1:
        alive = max(1, alive // eta)
        halvings += 1
    rungs = [max(1, int(round(budget_steps / eta ** (halvings - i)))) for i in range(halvings + 1)]
    out: list[int] = []
    for r in rungs:
        if not out or r > out[-1]:
            out.append(r)
    return out


def successive_halving(
    scores_by_variant: Mapping[str, Sequence[float]],
    rung_steps: Sequence[int],
    eta: int = 3,
) -> list[str]:
    """Variants still in the race after the rungs every survivor has completed.

    ``scores_by_variant[v][r]`` is variant ``v``'s metric (lower is better, e.g. val
    loss) at the end of rung ``r``; ``rung_steps`` are the rungs' cumulative step
    budgets (only their count matters here: it bounds how many cuts happen). At each
    completed rung the best ``max(1, n // eta)`` variants survive; a rung that some
    survivor has not reported yet stops the evaluation (its verdict is not in).
    NaN/Inf scores rank last, so a diverged variant never wins; ties break by name so
    the result is deterministic. Returned best first.
    """
    if eta < 2:
        raise ValueError(f"successive_halving(eta={eta!r}): must be >= 2")
    steps = [int(s) for s in rung_steps]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(s <= 0 for s in steps):
        raise ValueError(f"successive_halving(rung_steps={steps!r}): must be positive, increasing")

    def key(v: str, r: int) -> tuple[float, str]:
        s = float(scores_by_variant[v][r])
        return (s if math.isfinite(s) else math.inf, v)

    alive = sorted(scores_by_variant)
    for r in range(len(steps)):
        if len(alive) <= 1 or any(len(scores_by_variant[v]) <= r for v in alive):
            break
        ranked = sorted(alive, key=lambda v: key(v, r))
        alive = ranked[: max(1, len(alive) // eta)]
    return alive


# --------------------------------------------------------------------------- config & state


def _default_cooldown_overrides() -> dict[str, int]:
    return {Action.STABILIZE.value: 200}


@dataclass(frozen=True)
class PlannerConfig:
    """Safeguards and recipes of automode; every field is validated when built."""

    max_parallel_children: int = 2
    """Most child processes (fork/explore variants) planner cards may occupy at once."""
    max_total_budget_steps: int = 50_000
    """Most extra training steps all cards together may spend in a session (fair-compute cap);
    0 allows only stabilizations, which cost nothing extra."""
    base_cooldown_steps: int = 1000
    """Steps after proposing an action before proposing the same kind again."""
    cooldown_overrides: Mapping[str, int] = field(default_factory=_default_cooldown_overrides)
    """Per-action base cooldown replacing ``base_cooldown_steps`` (keys are action names).
    Stabilization is short by default: an unstable run should not wait long for help."""
    cooldown_growth: float = 2.0
    """Factor applied to an action's cooldown each time its outcome did not improve the metric."""
    max_cooldown_multiplier: float = 16.0
    """Upper bound of the adaptive multiplier, so a failing remedy is retried eventually."""
    give_up_after: int = 4
    """Consecutive non-improving outcomes after which an action is no longer proposed."""
    fork_budget_steps: int = 1000
    """Final-rung steps of a specialist fork."""
    fork_lr_multipliers: tuple[float, ...] = (1.0, 0.5)
    """LR multipliers of the fork variants raced in the first rung; in priority order (when
    the children cap leaves fewer slots, the first ones are kept)."""
    fork_wd_mul: float = 1.0
    """Weight-decay multiplier for specialists."""
    fork_requires_plateau: bool = True
    """Loss-tail and residual-cluster forks on a running target wait until its loss has
    plateaued (``context['plateau_step']`` or a plateau detection in the round) or it has
    finished: a specialist forked while the generalist still improves fast starts from
    weights far from its final ones and is superseded by the next one. A weak validation
    slice (the user named it) is forked on at once."""
    adapter_rank: int = 0
    """Train low-rank adapters of this rank instead of full weights; 0 = full weights."""
    explore_budget_steps: int = 600
    """Final-rung steps of a plateau exploration race."""
    explore_lr_multipliers: tuple[float, ...] = (0.3, 1.0, 3.0)
    """LR multipliers raced on a plateau, in priority order (see ``fork_lr_multipliers``);
    keep 1.0 in so "no change" can win."""
    halving_eta: int = 3
    """Successive-halving reduction factor: each rung keeps 1/eta of the variants."""
    early_stop_patience: int = 3
    """Evaluations without improvement before a child stops early."""
    stabilize_lr_mul: float = 0.5
    """LR multiplier applied by a stabilization."""
    stabilize_wd_mul: float = 1.0
    """Weight-decay multiplier applied by a stabilization."""
    stabilize_grad_clip: float = 1.0
    """Gradient-norm clip set by a stabilization (a tighter existing clip is kept)."""
    stabilize_watch_steps: int = 200
    """Steps after a stabilization over which its outcome is judged."""
    max_skip_batches: int = 16
    """Most offending batches one rollback skips (the first non-finite steps)."""
    gate_steps: int = 500
    """Training steps of the router."""
    gate_temperature: float = 1.0
    """Softmax temperature of the ``switch_softmax`` router."""
    gate_balance_weight: float = 0.01
    """Weight of the load-balance auxiliary loss of the router."""
    merge_every_steps: int = 5000
    """Merge cadence: steps between merges of completed specialists."""
    merge_method: str = "swa"
    """Merge method for cadence merges: swa, distill, fisher_soup or adapter_fuse."""
    min_completed_for_merge: int = 1
    """Completed, improving specialists needed before a cadence merge is proposed."""
    merge_max_lag_steps: int = 0
    """A weight-space merge (swa, fisher_soup, adapter_fuse) takes only specialists forked
    from the target's weights at most this many target steps ago: it averages points of
    one trajectory, and a specialist forked from older weights sits on another branch than
    the target has since taken (0: only specialists forked from its current weights, such
    as the ones forked once it finished). Distillation takes any specialist."""
    distill_steps: int = 1000
    """Student training steps when ``merge_method`` is distill."""

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"PlannerConfig.{name}={getattr(self, name)!r}: {want}")

        def int_at_least(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"must be an integer >= {lo}")

        for name, lo in (
            ("max_parallel_children", 1),
            ("max_total_budget_steps", 0),
            ("base_cooldown_steps", 0),
            ("give_up_after", 1),
            ("fork_budget_steps", 1),
            ("adapter_rank", 0),
            ("explore_budget_steps", 1),
            ("halving_eta", 2),
            ("early_stop_patience", 1),
            ("stabilize_watch_steps", 0),
            ("max_skip_batches", 1),
            ("gate_steps", 1),
            ("merge_every_steps", 0),
            ("min_completed_for_merge", 1),
            ("distill_steps", 1),
            ("merge_max_lag_steps", 0),
        ):
            int_at_least(name, lo)
        if not isinstance(self.fork_requires_plateau, bool):
            raise bad("fork_requires_plateau", "must be true or false")
        overrides = dict(self.cooldown_overrides)
        for k, v in overrides.items():
            if k not in {a.value for a in Action}:
                raise bad("cooldown_overrides", f"unknown action {k!r}")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad("cooldown_overrides", f"cooldown of {k!r} must be an integer >= 0")
        object.__setattr__(self, "cooldown_overrides", overrides)
        if not (self.cooldown_growth >= 1.0):
            raise bad("cooldown_growth", "must be >= 1 (1 disables adaptive cooldowns)")
        if not (self.max_cooldown_multiplier >= 1.0):
            raise bad("max_cooldown_multiplier", "must be >= 1")
        for name in ("fork_lr_multipliers", "explore_lr_multipliers"):
            mults = tuple(float(m) for m in getattr(self, name))
            if not mults or any(not (math.isfinite(m) and m > 0) for m in mults):
                raise bad(name, "must be a non-empty list of positive numbers")
            object.__setattr__(self, name, mults)
        if len(self.explore_lr_multipliers) < 2:
            raise bad("explore_lr_multipliers", "needs at least 2 variants to race")
        for name in ("fork_wd_mul", "stabilize_wd_mul", "gate_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(name, "must be a positive number")
        if not (0 < self.stabilize_lr_mul <= 1):
            raise bad("stabilize_lr_mul", "must be in (0, 1]: stabilizing never raises the LR")
        if not (math.isfinite(self.stabilize_grad_clip) and self.stabilize_grad_clip > 0):
            raise bad("stabilize_grad_clip", "must be a positive number")
        if not (math.isfinite(self.gate_balance_weight) and self.gate_balance_weight >= 0):
            raise bad("gate_balance_weight", "must be >= 0")
        if self.merge_method not in MERGE_METHODS:
            raise bad("merge_method", f"must be one of {MERGE_METHODS}")

    def base_cooldown(self, action: Action) -> int:
        return int(self.cooldown_overrides.get(action.value, self.base_cooldown_steps))


@dataclass(frozen=True)
class PendingPlan:
    """A card the planner proposed and has not heard the end of."""

    plan_id: str
    action: Action
    key: str
    """The card's dedupe key."""
    children: int
    cost_steps: int
    started: bool = False
    """True once :func:`record_started` moved its cost into the spent budget."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PendingPlan:
        return cls(
            plan_id=str(d["plan_id"]),
            action=Action(d["action"]),
            key=str(d["key"]),
            children=int(d["children"]),
            cost_steps=int(d["cost_steps"]),
            started=bool(d.get("started", False)),
        )


@dataclass(frozen=True)
class Specialist:
    """A completed fork that improved on its selection, waiting to be gated/merged."""

    run_id: str
    reason: Reason
    plan_id: str
    selection: str = ""
    """The fork card's selection (canonical); with ``reason`` it says which specialists
    cover the same samples, so a newer one supersedes an older one."""
    parent_step: int | None = None
    """Step of the target's checkpoint it was forked from (None: not known)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "reason": self.reason.value,
            "plan_id": self.plan_id,
            "selection": self.selection,
            "parent_step": self.parent_step,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Specialist:
        step = d.get("parent_step")
        return cls(
            run_id=str(d["run_id"]),
            reason=Reason(d["reason"]),
            plan_id=str(d["plan_id"]),
            selection=str(d.get("selection", "")),
            parent_step=None if step is None else int(step),
        )


@dataclass(frozen=True)
class PlannerState:
    """Everything the planner remembers between calls; replaced, never mutated."""

    last_action_step: Mapping[str, int] = field(default_factory=dict)
    """Step at which the last card of each action kind was proposed (cooldown origin)."""
    cooldown_multiplier: Mapping[str, float] = field(default_factory=dict)
    """Adaptive multiplier per action kind (1 = base cooldown; doubles on no improvement)."""
    consecutive_failures: Mapping[str, int] = field(default_factory=dict)
    """Non-improving outcomes in a row per action kind (reset on improvement)."""
    pending: tuple[PendingPlan, ...] = ()
    """Cards proposed, approved or running."""
    budget_spent_steps: int = 0
    """Extra steps of cards that started (trued up with actual use when they end)."""
    ungated: tuple[Specialist, ...] = ()
    """Improving specialists not covered by a gate yet."""
    unmerged: tuple[Specialist, ...] = ()
    """Improving specialists not merged yet."""
    last_merge_step: int = 0
    """Step of the last completed merge (start of the merge cadence)."""
    next_seq: int = 1
    """Sequence number of the next plan id."""

    @property
    def active_children(self) -> int:
        """Children occupied by started cards."""
        return sum(p.children for p in self.pending if p.started)

    @property
    def reserved_children(self) -> int:
        """Children that proposed/approved cards will need when they start."""
        return sum(p.children for p in self.pending if not p.started)

    @property
    def reserved_budget_steps(self) -> int:
        return sum(p.cost_steps for p in self.pending if not p.started)

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_action_step": dict(self.last_action_step),
            "cooldown_multiplier": dict(self.cooldown_multiplier),
            "consecutive_failures": dict(self.consecutive_failures),
            "pending": [p.to_dict() for p in self.pending],
            "budget_spent_steps": self.budget_spent_steps,
            "ungated": [s.to_dict() for s in self.ungated],
            "unmerged": [s.to_dict() for s in self.unmerged],
            "last_merge_step": self.last_merge_step,
            "next_seq": self.next_seq,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlannerState:
        return cls(
            last_action_step={str(k): int(v) for k, v in d.get("last_action_step", {}).items()},
            cooldown_multiplier={
                str(k): float(v) for k, v in d.get("cooldown_multiplier", {}).items()
            },
            consecutive_failures={
                str(k): int(v) for k, v in d.get("consecutive_failures", {}).items()
            },
            pending=tuple(PendingPlan.from_dict(p) for p in d.get("pending", ())),
            budget_spent_steps=int(d.get("budget_spent_steps", 0)),
            ungated=tuple(Specialist.from_dict(s) for s in d.get("ungated", ())),
            unmerged=tuple(Specialist.from_dict(s) for s in d.get("unmerged", ())),
            last_merge_step=int(d.get("last_merge_step", 0)),
            next_seq=int(d.get("next_seq", 1)),
        )


def effective_cooldown(state: PlannerState, config: PlannerConfig, action: Action) -> int:
    """Base cooldown of ``action`` times its adaptive multiplier."""
    mul = min(state.cooldown_multiplier.get(action.value, 1.0), config.max_cooldown_multiplier)
    return int(round(config.base_cooldown(action) * mul))


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Blocked:
    """A card the evidence called for but a safeguard held back, and why."""

    action: Action
    reason: Reason
    why: str
    """Plain-language explanation for the UI and the CI report."""
    detection_kind: str | None = None
    retry_at_step: int | None = None
    """When a cooldown is the obstacle: the first step at which it would be allowed."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class PlanResult:
    """What one planning round produced: cards to run and cards held back."""

    cards: tuple[PlanCard, ...]
    blocked: tuple[Blocked, ...]


_INSTABILITY_RANK = {DetectionKind.NONFINITE: 0, DetectionKind.SPIKE: 1, DetectionKind.DRIFT: 2}


def _is_instability(d: Detection) -> bool:
    if d.kind is DetectionKind.DRIFT:
        return d.numbers.get("direction", 1.0) > 0
    return d.kind in (DetectionKind.NONFINITE, DetectionKind.SPIKE)


@dataclass
class _Round:
    """Bookkeeping of one :func:`plan` call (local, never escapes)."""

    state: PlannerState
    config: PlannerConfig
    step: int
    children_used: int
    budget_used: int
    pending_keys: dict[str, str]
    proposed_actions: dict[Action, str]
    unstable: bool
    drift_seen: bool
    seq: int
    cards: list[PlanCard] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)
    steps_left: int | None = None
    """Steps the target has left by its run's shape (None: not known, or it has finished)."""
    pace: tuple[float, float, float] | None = None
    """Measured (target steps/s, fork start-up s, fork steps/s), or None: a race needs as
    many target steps as it trains."""

    def race_needs(self, cost_steps: int, rungs: int, target: str) -> tuple[int, str]:
        """Target steps that pass while a race of ``cost_steps`` over ``rungs`` rungs runs,
        and how that was told: every rung after the first restarts its survivors from their
        rung checkpoints, so the winner pays a fork's start-up once per rung."""
        if self.pace is None:
            return cost_steps, f"the {cost_steps} steps its race trains"
        rate, startup, fork_rate = self.pace
        need = int(math.ceil(round(rate * (startup * rungs + cost_steps / fork_rate), 6)))
        return need, (
            f"the ~{need} its race takes (a fork starts in ~{startup:.1f} s, at each of its "
            f"{rungs} rung(s), and its variants train {cost_steps} steps at ~{fork_rate:.0f} "
            f"steps/s, while {target} trains ~{rate:.0f} steps/s)"
        )

    def block(
        self,
        action: Action,
        reason: Reason,
        why: str,
        d: Detection | None,
        retry: int | None = None,
    ) -> None:
        self.blocked.append(Blocked(action, reason, why, d.kind.value if d else None, retry))

    def try_add(self, draft: PlanCard, d: Detection | None) -> bool:
        """Run the safeguards on ``draft``; add it (possibly trimmed) or record why not."""
        a, r, cfg = draft.action, draft.reason, self.config
        if draft.dedupe_key in self.pending_keys:
            self.block(
                a, r, f"the same plan ({self.pending_keys[draft.dedupe_key]}) is still pending", d
            )
            return False
        if a is Action.FORK:
            sel = validate_selection(draft.selection)
            waiting = next(
                (s for s in self.state.ungated if s.reason is r and s.selection == sel), None
            )
            if waiting is not None:
                # A newer specialist on the same samples would supersede this one before the
                # gate has judged whether specialists on them help at all.
                self.block(
                    a,
                    r,
                    f"specialist {waiting.run_id} ({waiting.plan_id}) on {waiting.selection} "
                    "waits for the gate to judge it; another fork on the same samples would "
                    "supersede it unused",
                    d,
                )
                return False
        fails = self.state.consecutive_failures.get(a.value, 0)
        if fails >= cfg.give_up_after:
            self.block(
                a,
                r,
                f"{a.value} did not help {fails} times in a row; the planner no longer proposes "
                "it (a person should look at this run)",
                d,
            )
            return False
        if a in self.proposed_actions:
            self.block(
                a, r, f"a {a.value} plan ({self.proposed_actions[a]}) was proposed this round", d
            )
            return False
        last = self.state.last_action_step.get(a.value)
        cooldown = effective_cooldown(self.state, cfg, a)
        if last is not None and self.step < last + cooldown:
            self.block(
                a,
                r,
                f"cooldown: the last {a.value} plan was at step {last}; the next is allowed at "
                f"step {last + cooldown}",
                d,
                last + cooldown,
            )
            return False
        if a is not Action.STABILIZE and self.unstable:
            self.block(a, r, "the run is unstable; stabilizing it comes first", d)
            return False
        if r is Reason.LOSS_PLATEAU and self.drift_seen:
            self.block(
                a, r, "a drift (change point) was detected; the plateau trend test assumes none", d
            )
            return False
        free = cfg.max_parallel_children - self.children_used
        if draft.children > free:
            floor = 2 if a is Action.EXPLORE else 1
            if free < floor:
                self.block(
                    a,
                    r,
                    f"children cap: {self.children_used} of {cfg.max_parallel_children} child "
                    f"processes are running or reserved; this plan needs {floor}",
                    d,
                )
                return False
            draft = _trim_variants(draft, free, cfg.halving_eta)
        rungs = (draft.training_recipe.get("race") or {}).get("rung_steps", ())
        need, how = self.race_needs(draft.cost_steps, max(1, len(rungs)), draft.target_run)
        if a is Action.EXPLORE and self.steps_left is not None and need > self.steps_left:
            # Its winner is adopted by the target's live worker: a race that ends after the
            # target only spends compute (which then also enlarges the baseline's budget).
            self.block(
                a,
                r,
                f"{draft.target_run} has {self.steps_left} steps left, fewer than {how}; "
                f"{draft.children} lr variants over rungs {'/'.join(str(x) for x in rungs)}: "
                "the winner would arrive after it has finished, too late to adopt",
                d,
            )
            return False
        remaining = cfg.max_total_budget_steps - self.budget_used
        if draft.cost_steps > remaining:
            self.block(
                a,
                r,
                f"budget cap: {self.budget_used} of {cfg.max_total_budget_steps} steps are spent or "
                f"reserved; this plan needs {draft.cost_steps}",
                d,
            )
            return False
        card = replace(draft, plan_id=f"plan-{self.seq:04d}")
        self.seq += 1
        self.cards.append(card)
        self.children_used += card.children
        self.budget_used += card.cost_steps
        self.pending_keys[card.dedupe_key] = card.plan_id
        self.proposed_actions[a] = card.plan_id
        if a is Action.STABILIZE:
            self.unstable = True
        return True


def _pace(ctx: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """(target steps/s, fork start-up s, fork steps/s) from the context, when all are given."""
    try:
        pace = (
            float(ctx["target_steps_per_s"]),
            float(ctx["fork_startup_s"]),
            float(ctx["fork_steps_per_s"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    rate, startup, fork_rate = pace
    ok = all(math.isfinite(x) for x in pace) and rate > 0 and startup >= 0 and fork_rate > 0
    return pace if ok else None


def _trim_variants(card: PlanCard, keep: int, eta: int) -> PlanCard:
    """Keep the first ``keep`` variants (configured order = priority) and re-plan the race."""
    recipe = dict(card.training_recipe)
    variants = list(recipe.get("variants", ()))[:keep]
    recipe["variants"] = variants
    recipe["race"] = _race(card.budget_steps, len(variants), eta)
    return replace(card, training_recipe=recipe)


def _race(budget: int, n: int, eta: int) -> dict[str, Any]:
    return {"method": "successive_halving", "eta": eta, "rung_steps": halving_rungs(budget, n, eta)}


def _variants(mults: Sequence[float], wd_mul: float | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in mults:
        v: dict[str, Any] = {"name": f"lr_x{m:g}", "lr_mul": float(m)}
        if wd_mul is not None:
            v["wd_mul"] = float(wd_mul)
        out.append(v)
    return out


def _rollback_target(checkpoint_steps: Sequence[int], before_step: int) -> int | None:
    good = [int(s) for s in checkpoint_steps if int(s) < before_step]
    return max(good) if good else None


def _gate_recipe(cfg: PlannerConfig, experts: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "switch_softmax",
        "temperature": cfg.gate_temperature,
        "balance_weight": cfg.gate_balance_weight,
        "steps": cfg.gate_steps,
    }
    if experts:
        out["experts"] = list(experts)
    return out


def _base_card(
    rnd: _Round, action: Action, reason: Reason, selection: str, target: str, **kw: Any
) -> PlanCard:
    return PlanCard(
        plan_id="draft",
        action=action,
        reason=reason,
        selection=selection,
        cooldown_steps=effective_cooldown(rnd.state, rnd.config, action),
        created_step=rnd.step,
        target_run=target,
        **kw,
    )


def _stabilize_card(rnd: _Round, d: Detection, target: str, ctx: Mapping[str, Any]) -> PlanCard:
    cfg = rnd.config
    reason = Reason.NONFINITE if d.kind is DetectionKind.NONFINITE else Reason.INSTABILITY_SPIKE
    # A drift is gradual: there is no single bad batch and no obviously good checkpoint,
    # so it is repaired from the current weights; NaN and spikes roll back before them.
    # A gradient-norm spike with a sane loss is repaired in place (lr down, clip): the
    # weights are not known to be bad, and the norm may be sampled (grad_norm_every).
    point_event = d.kind is DetectionKind.NONFINITE or (
        d.kind is DetectionKind.SPIKE and d.subject != "grad_norm"
    )
    can_roll_back = bool(ctx.get("rollback_supported", True))
    rollback = (
        _rollback_target(ctx.get("checkpoint_steps", ()), d.step)
        if point_event and can_roll_back
        else None
    )
    offending: list[int] = []
    if point_event:
        offending = [d.step]
        if d.kind is DetectionKind.NONFINITE:
            # Every non-finite step since the first one (the trainer skipped their updates,
            # but the batches stay suspect), up to max_skip_batches.
            later = sorted({int(s) for s in ctx.get("nonfinite_steps", ()) if int(s) >= d.step})
            offending = sorted({d.step, *later})[: cfg.max_skip_batches]
    current_clip = float(ctx.get("grad_clip", 0.0) or 0.0)
    clip = (
        min(current_clip, cfg.stabilize_grad_clip) if current_clip > 0 else cfg.stabilize_grad_clip
    )
    recipe: dict[str, Any] = {
        "rollback_to_step": rollback,
        "skip_offending_batches": rollback is not None,
        "offending_steps": offending if rollback is not None else [],
        "lr_mul": cfg.stabilize_lr_mul,
        "wd_mul": cfg.stabilize_wd_mul,
        "grad_clip": clip,
        "bf16": bool(ctx.get("bf16_supported", False)),
        "variants": [],
    }
    note = d.message
    if rollback is not None:
        note += (
            f" Roll back to the checkpoint at step {rollback} and skip the batch(es) of step(s) "
            f"{', '.join(str(s) for s in offending)}."
        )
    elif point_event and not can_roll_back:
        note += (
            " No rollback: the training process is the user's own (python train.py), which the "
            "supervisor cannot restart; repairing from the current weights."
        )
    elif point_event:
        note += f" No checkpoint before step {d.step}: repairing from the current weights."
    diagnostics: dict[str, Any] = {"summary": note, "detection": d.to_dict()}
    if ctx.get("bf16_note"):
        diagnostics["bf16"] = str(ctx["bf16_note"])
    return _base_card(
        rnd,
        Action.STABILIZE,
        reason,
        "all",
        target,
        training_recipe=recipe,
        budget_steps=cfg.stabilize_watch_steps,
        diagnostics=diagnostics,
    )


def _fork_card(rnd: _Round, reason: Reason, selection: str, d: Detection, target: str) -> PlanCard:
    cfg = rnd.config
    variants = _variants(cfg.fork_lr_multipliers, cfg.fork_wd_mul)
    recipe: dict[str, Any] = {
        "lr_mul": variants[0]["lr_mul"],
        "wd_mul": cfg.fork_wd_mul,
        "variants": variants,
        "race": _race(cfg.fork_budget_steps, len(variants), cfg.halving_eta),
        "early_stop": {
            "patience_evals": cfg.early_stop_patience,
            "metric": "val_loss_on_selection",
        },
        "adapters_rank": cfg.adapter_rank,
    }
    return _base_card(
        rnd,
        Action.FORK,
        reason,
        selection,
        target,
        training_recipe=recipe,
        gate_recipe=_gate_recipe(cfg),
        budget_steps=cfg.fork_budget_steps,
        diagnostics={"summary": d.message, "detection": d.to_dict()},
    )


def _explore_card(rnd: _Round, d: Detection, target: str) -> PlanCard:
    cfg = rnd.config
    variants = _variants(cfg.explore_lr_multipliers)
    recipe: dict[str, Any] = {
        "variants": variants,
        "race": _race(cfg.explore_budget_steps, len(variants), cfg.halving_eta),
        "early_stop": {"patience_evals": cfg.early_stop_patience, "metric": "val_loss"},
        "on_finish": "adopt_winner",
    }
    return _base_card(
        rnd,
        Action.EXPLORE,
        Reason.LOSS_PLATEAU,
        "all",
        target,
        training_recipe=recipe,
        budget_steps=cfg.explore_budget_steps,
        diagnostics={"summary": d.message, "detection": d.to_dict()},
    )


def plan(
    detections: Sequence[Detection],
    state: PlannerState,
    config: PlannerConfig,
    step: int,
    context: Mapping[str, Any] | None = None,
) -> PlanResult:
    """Map detections to plan cards under the safeguards; also say what was held back.

    Mapping: NaN/Inf -> stabilize (``nonfinite``); spike or upward drift -> stabilize
    (``instability_spike``); plateau -> explore (LR variants raced by successive
    halving; not when the running target has too few steps left for the race to end
    first); high-loss tail / residual cluster / weak slice -> fork on that selection (the
    first two, on a running target, once it has plateaued); completed specialists (the
    newest per selection) -> a gate once no fork is pending, and a merge every
    ``merge_every_steps`` (a weight-space merge only of those on the target's trajectory,
    ``merge_max_lag_steps``). At most one card per action kind per round.

    Safeguards, in order: dedupe against pending cards, give-up after repeated
    non-improving outcomes, per-action adaptive cooldown, instability first (nothing
    else is proposed while the run is unstable or a stabilization is pending), no
    plateau verdict next to a drift (Page-Hinkley-aware: a change point breaks the
    trend test), children cap (fork/explore variants are trimmed to the free slots
    when possible), total budget cap.

    ``context`` (all optional): ``target_run`` (default ``main``); ``checkpoint_steps``
    of the target run (rollback targets); ``bf16_supported``; ``grad_clip`` currently
    set; ``active_children``: fork processes still going or about to start, manual forks
    included, but not the stopped losers of a race nor finished forks (without it, every
    started card holds all its slots until it ends); ``slice_selections`` mapping a slice
    name to a SPEC (a weak slice without one cannot be forked and is reported as
    blocked); ``nonfinite_steps`` (every recent step with a non-finite loss or gradient: a
    NaN stabilization skips all of them from the first on); ``rollback_supported`` (False when the supervisor cannot
    restart the run's process: no rollback, repair in place); ``bf16_note`` (why bf16 is
    or is not part of a stabilization, shown on the card); ``final`` (the target run has
    finished: unmerged specialists are merged without waiting for the cadence);
    ``plateau_step`` (the step at which the target's loss was first found on a plateau, or
    None: with ``fork_requires_plateau``, loss-tail and residual-cluster forks on a running
    target wait for it or for a plateau detection in this round; a caller that leaves the
    key out does not track plateaus, and forks are not held back); ``steps_left`` (steps the
    running target has left by its run's shape, epochs x steps per epoch or max_steps: an
    explore whose race would end after the target is not proposed); ``target_steps_per_s``,
    ``fork_startup_s`` and ``fork_steps_per_s`` (measured pace: with all three, the race's
    length in target steps is ``target_steps_per_s * (fork_startup_s * rungs + cost_steps /
    fork_steps_per_s)``: a start-up per rung, its variants' steps counted one after the
    other; without, its ``cost_steps``).
    """
    ctx: Mapping[str, Any] = context or {}
    target = str(ctx.get("target_run", "main"))
    final = bool(ctx.get("final", False))
    # The caller's count of processes still going replaces the card-based one, which holds
    # every slot of a started card until the card ends (a race's stopped losers included).
    live = int(ctx["active_children"]) if "active_children" in ctx else state.active_children
    pending_stabilize = any(p.action is Action.STABILIZE for p in state.pending)
    rnd = _Round(
        state=state,
        config=config,
        step=int(step),
        children_used=live + state.reserved_children,
        budget_used=state.budget_spent_steps + state.reserved_budget_steps,
        pending_keys={p.key: p.plan_id for p in state.pending},
        proposed_actions={},
        unstable=pending_stabilize or any(_is_instability(d) for d in detections),
        drift_seen=any(d.kind is DetectionKind.DRIFT for d in detections),
        seq=state.next_seq,
        steps_left=None if final or ctx.get("steps_left") is None else int(ctx["steps_left"]),
        pace=_pace(ctx),
    )
    # A plateau next to a drift is not trusted (see try_add); one seen earlier is kept by the
    # caller: the plateau test misses some looks at a flat but noisy loss.
    plateaued = (
        final
        or "plateau_step" not in ctx  # a caller that does not track plateaus
        or ctx["plateau_step"] is not None
        or (not rnd.drift_seen and any(d.kind is DetectionKind.PLATEAU for d in detections))
    )

    unstable = sorted(
        (d for d in detections if _is_instability(d)),
        key=lambda d: (_INSTABILITY_RANK[d.kind], -d.severity, d.step),
    )
    for d in unstable:
        rnd.try_add(_stabilize_card(rnd, d, target, ctx), d)

    others = sorted(
        (d for d in detections if not _is_instability(d) and d.kind is not DetectionKind.DRIFT),
        key=lambda d: (-d.severity, d.kind.value, d.step),
    )
    for d in others:
        if d.kind is DetectionKind.PLATEAU:
            rnd.try_add(_explore_card(rnd, d, target), d)
        elif (
            d.kind in (DetectionKind.HIGH_LOSS_TAIL, DetectionKind.RESIDUAL_CLUSTER)
            and config.fork_requires_plateau
            and not plateaued
        ):
            reason = (
                Reason.HIGH_LOSS_TAIL
                if d.kind is DetectionKind.HIGH_LOSS_TAIL
                else Reason.RESIDUAL_CLUSTER
            )
            rnd.block(
                Action.FORK,
                reason,
                f"{target} is still improving (no loss plateau detected yet): a specialist "
                f"forked now would start from weights far from {target}'s final ones; it is "
                "forked once the loss plateaus or the run finishes",
                d,
            )
        elif d.kind is DetectionKind.HIGH_LOSS_TAIL:
            q = d.numbers.get("q", 0.85)
            sel = f"quantile:{q:g}:1.0" if 0.0 <= q < 1.0 else "quantile:0.85:1.0"
            rnd.try_add(_fork_card(rnd, Reason.HIGH_LOSS_TAIL, sel, d, target), d)
        elif d.kind is DetectionKind.RESIDUAL_CLUSTER:
            # The selection re-clusters at execution time and, without cluster=J, takes
            # the highest-loss cluster: the one the detector flagged. The detector's label
            # id is not used because selection numbers clusters by mean loss instead.
            sel = "kmeans:auto"
            rnd.try_add(_fork_card(rnd, Reason.RESIDUAL_CLUSTER, sel, d, target), d)
        elif d.kind is DetectionKind.WEAK_SLICE:
            spec = dict(ctx.get("slice_selections", {})).get(d.subject)
            try:
                slice_sel = validate_selection(spec) if spec is not None else None
            except ValueError as e:
                rnd.block(Action.FORK, Reason.SLICE_UNDERPERFORMANCE, str(e), d)
                continue
            if slice_sel is None:
                rnd.block(
                    Action.FORK,
                    Reason.SLICE_UNDERPERFORMANCE,
                    f"no selection is known for slice {d.subject!r} (pass slice_selections)",
                    d,
                )
                continue
            rnd.try_add(_fork_card(rnd, Reason.SLICE_UNDERPERFORMANCE, slice_sel, d, target), d)

    _propose_gate(rnd, target)
    _propose_merge(rnd, target, final=final)
    return PlanResult(cards=tuple(rnd.cards), blocked=tuple(rnd.blocked))


def _propose_gate(rnd: _Round, target: str) -> None:
    specialists = rnd.state.ungated
    if not specialists:
        return
    reason = specialists[0].reason
    forks_pending = sum(p.action is Action.FORK for p in rnd.state.pending) + sum(
        c.action is Action.FORK for c in rnd.cards
    )
    if forks_pending:
        rnd.block(
            Action.GATE,
            reason,
            f"waiting for {forks_pending} fork plan(s) to finish so the gate covers every specialist",
            None,
        )
        return
    experts = [target] + [s.run_id for s in specialists]
    draft = _base_card(
        rnd,
        Action.GATE,
        reason,
        "all",
        target,
        gate_recipe=_gate_recipe(rnd.config, experts),
        budget_steps=rnd.config.gate_steps,
        diagnostics={
            "summary": f"Route between {target} and {len(specialists)} specialist(s) with a learned gate.",
            "specialists": [s.to_dict() for s in specialists],
        },
    )
    rnd.try_add(draft, None)


def _propose_merge(rnd: _Round, target: str, final: bool = False) -> None:
    cfg = rnd.config
    specialists = rnd.state.unmerged
    if len(specialists) < cfg.min_completed_for_merge:
        return
    due = rnd.state.last_merge_step + cfg.merge_every_steps
    # When the target has finished, what is left unmerged is merged once more.
    if rnd.step < due and not final:
        rnd.block(
            Action.MERGE,
            Reason.MERGE_CADENCE,
            f"next cadence merge is due at step {due}",
            None,
            due,
        )
        return
    if cfg.merge_method in _WEIGHT_SPACE_MERGES:
        # Averaging weights is sound along one trajectory (SWA averages its snapshots); a
        # specialist forked from older weights sits on a branch the target has left since.
        oldest = rnd.step - cfg.merge_max_lag_steps
        on = [s for s in specialists if s.parent_step is None or s.parent_step >= oldest]
        if len(on) < cfg.min_completed_for_merge:
            off = ", ".join(
                f"{s.run_id} (step {s.parent_step})" for s in specialists if s not in on
            )
            rnd.block(
                Action.MERGE,
                Reason.MERGE_CADENCE,
                f"no specialist is on {target}'s trajectory: {off} forked from {target}'s "
                f"weights more than {cfg.merge_max_lag_steps} steps before its step {rnd.step} "
                f"(merge_max_lag_steps); a {cfg.merge_method} merge averages weights of one "
                f"trajectory, so it waits for a specialist forked from {target}'s current weights",
                None,
            )
            return
        specialists = tuple(on)
    runs = [target] + [s.run_id for s in specialists]
    recipe: dict[str, Any] = {"method": cfg.merge_method, "runs": runs}
    if cfg.merge_method == "swa":
        recipe["bn_recalibration"] = True
    if cfg.merge_method == "distill":
        recipe["teacher"] = "ensemble"
    draft = _base_card(
        rnd,
        Action.MERGE,
        Reason.MERGE_CADENCE,
        "all",
        target,
        merge_recipe=recipe,
        budget_steps=cfg.distill_steps if cfg.merge_method == "distill" else 0,
        diagnostics={
            "summary": f"Merge {len(specialists)} specialist(s) into {target} ({cfg.merge_method}); "
            f"{target} stays the catch-all.",
            "specialists": [s.to_dict() for s in specialists],
        },
    )
    rnd.try_add(draft, None)


def propose(
    detections: Sequence[Detection],
    state: PlannerState,
    config: PlannerConfig,
    step: int,
    context: Mapping[str, Any] | None = None,
) -> list[PlanCard]:
    """The cards :func:`plan` would propose now (see it for the rules)."""
    return list(plan(detections, state, config, step, context).cards)


def explain_blocked(
    detections: Sequence[Detection],
    state: PlannerState,
    config: PlannerConfig,
    step: int,
    context: Mapping[str, Any] | None = None,
) -> list[Blocked]:
    """Why the evidence did not turn into cards now (see :func:`plan`)."""
    return list(plan(detections, state, config, step, context).blocked)


# --------------------------------------------------------------------------- state updates


def record_proposed(state: PlannerState, cards: Sequence[PlanCard]) -> PlannerState:
    """Remember cards just proposed: they become pending and start their cooldowns.

    The cooldown starts at proposal, not completion, so a card a person rejects is not
    proposed again at the very next step.
    """
    last = dict(state.last_action_step)
    pending = list(state.pending)
    seq = state.next_seq
    for c in cards:
        last[c.action.value] = int(c.created_step)
        pending.append(PendingPlan(c.plan_id, c.action, c.dedupe_key, c.children, c.cost_steps))
        m = re.fullmatch(r"plan-(\d+)", c.plan_id)
        seq = max(seq + 1, int(m.group(1)) + 1) if m else seq + 1
    return replace(state, last_action_step=last, pending=tuple(pending), next_seq=seq)


def record_started(state: PlannerState, plan_id: str) -> PlannerState:
    """A pending card started: its children become active and its cost is spent."""
    pending = list(state.pending)
    for i, p in enumerate(pending):
        if p.plan_id == plan_id:
            if p.started:
                return state
            pending[i] = replace(p, started=True)
            return replace(
                state,
                pending=tuple(pending),
                budget_spent_steps=state.budget_spent_steps + p.cost_steps,
            )
    raise ValueError(f"record_started: plan {plan_id!r} is not pending")


_OUTCOME_STATUSES = ("done", "failed", "rejected")


def _improved(outcome: Mapping[str, Any]) -> bool:
    if "improved" in outcome:
        return bool(outcome["improved"])
    before, after = outcome.get("metric_before"), outcome.get("metric_after")
    if before is None or after is None:
        return False
    b, a = float(before), float(after)
    if not (math.isfinite(b) and math.isfinite(a)):
        return False
    return a > b if outcome.get("higher_is_better", False) else a < b


def apply_outcome(
    state: PlannerState,
    card: PlanCard,
    outcome: Mapping[str, Any],
    config: PlannerConfig | None = None,
) -> PlannerState:
    """Fold the end of a card into the state; adaptive cooldown lives here.

    ``outcome`` keys: ``status`` (``done`` | ``failed`` | ``rejected``, default done);
    ``improved`` (bool) or ``metric_before``/``metric_after`` (+ ``higher_is_better``,
    default False); ``runs`` (fork: the specialist run ids that won; merge/gate: the new
    run); ``budget_used_steps`` (actual extra steps, to true up the reserved cost);
    ``step`` (when it ended; merge cadence restarts there); ``parent_step`` (fork: the
    step of the target's checkpoint the specialist was forked from; default the card's
    ``created_step``).

    An improving fork's specialist supersedes those of earlier forks on the same reason and
    selection forked from older weights: they leave the gate's and merge's waiting lists.

    A done card that improved the metric resets its action's cooldown multiplier and
    failure count; a done card that did not, or a failed one, multiplies the cooldown
    by ``cooldown_growth`` (2 by default, capped) and counts a failure, so a remedy
    that does not work is tried less and less often. No evidence of improvement counts
    as none: the planner slows down when it cannot see results. A rejection is a
    person's choice, not evidence about the remedy, and only clears the pending entry.
    """
    status = str(outcome.get("status", "done"))
    if status not in _OUTCOME_STATUSES:
        raise ValueError(
            f"apply_outcome: outcome['status']={status!r}: must be one of {_OUTCOME_STATUSES}"
        )
    cfg = config or PlannerConfig()
    was = next((p for p in state.pending if p.plan_id == card.plan_id), None)
    pending = tuple(p for p in state.pending if p.plan_id != card.plan_id)
    spent = state.budget_spent_steps
    if was is not None and was.started and "budget_used_steps" in outcome:
        spent = max(0, spent - was.cost_steps + int(outcome["budget_used_steps"]))
    state = replace(state, pending=pending, budget_spent_steps=spent)
    if status == "rejected":
        return state

    a = card.action.value
    improved = status == "done" and _improved(outcome)
    mul = dict(state.cooldown_multiplier)
    fails = dict(state.consecutive_failures)

    def slow_down(action: str) -> None:
        mul[action] = min(mul.get(action, 1.0) * cfg.cooldown_growth, cfg.max_cooldown_multiplier)

    if improved:
        mul[a] = 1.0
        fails[a] = 0
    else:
        slow_down(a)
        fails[a] = fails.get(a, 0) + 1
        if card.action is Action.GATE and status == "done":
            # The gate is what a specialist's own slice gain is for: when routing to them
            # does not beat the target, forking more of them is tried less often too.
            slow_down(Action.FORK.value)
    state = replace(state, cooldown_multiplier=mul, consecutive_failures=fails)

    if card.action is Action.FORK and improved:
        runs = [str(r) for r in outcome.get("runs", ())] or [card.plan_id]
        sel = validate_selection(card.selection)
        step = outcome.get("parent_step")
        parent_step = int(card.created_step) if step is None else int(step)
        new = tuple(Specialist(r, card.reason, card.plan_id, sel, parent_step) for r in runs)

        def current(s: Specialist) -> bool:
            # A specialist on the same samples forked from newer weights of the target
            # supersedes it: the gate and merges take the newest one per selection.
            return not (
                s.reason is card.reason
                and s.selection == sel
                and (s.parent_step is None or s.parent_step <= parent_step)
            )

        state = replace(
            state,
            ungated=tuple(s for s in state.ungated if current(s)) + new,
            unmerged=tuple(s for s in state.unmerged if current(s)) + new,
        )
    elif card.action is Action.GATE and status == "done":
        covered = set(card.gate_recipe.get("experts", ()))
        state = replace(state, ungated=tuple(s for s in state.ungated if s.run_id not in covered))
    elif card.action is Action.MERGE and status == "done":
        covered = set(card.merge_recipe.get("runs", ()))
        state = replace(
            state,
            unmerged=tuple(s for s in state.unmerged if s.run_id not in covered),
            last_merge_step=int(outcome.get("step", card.created_step)),
        )
    return state
