"""Planner policy on plain data: mapping, cooldowns, caps, dedupe, adaptive back-off,
the card lifecycle and successive halving."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onthefly_supervisor.planner.detectors import Detection, DetectionKind
from onthefly_supervisor.planner.policy import (
    Action,
    PlanCard,
    PlannerConfig,
    PlannerState,
    PlanStatus,
    Reason,
    apply_outcome,
    effective_cooldown,
    explain_blocked,
    halving_rungs,
    plan,
    propose,
    record_proposed,
    record_started,
    successive_halving,
    validate_selection,
)


def det(kind: DetectionKind, step: int = 1000, subject: str = "", **numbers: float) -> Detection:
    return Detection(kind, step, 0.8, f"{kind.value} at {step}", numbers, subject=subject)


NAN = det(DetectionKind.NONFINITE, 990, subject="loss", last_finite_step=989)
SPIKE = det(DetectionKind.SPIKE, 995, subject="loss", z=9.0)
DRIFT_UP = det(DetectionKind.DRIFT, 995, subject="loss", direction=1.0)
DRIFT_DOWN = det(DetectionKind.DRIFT, 995, subject="loss", direction=-1.0)
PLATEAU = det(DetectionKind.PLATEAU)
TAIL = det(DetectionKind.HIGH_LOSS_TAIL, q=0.85)
CLUSTER = det(DetectionKind.RESIDUAL_CLUSTER, subject="3")
SLICE = det(DetectionKind.WEAK_SLICE, subject="night")

CTX: dict[str, Any] = {
    "checkpoint_steps": [500, 900, 980, 995],
    "bf16_supported": True,
    "slice_selections": {"night": "indices:slices/night.npy"},
}


def one(detection: Detection, **cfg: Any) -> PlanCard:
    cards = propose([detection], PlannerState(), PlannerConfig(**cfg), 1000, CTX)
    assert len(cards) == 1, explain_blocked([detection], PlannerState(), PlannerConfig(), 1000, CTX)
    return cards[0]


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("detection", "action", "reason", "selection"),
    [
        (NAN, Action.STABILIZE, Reason.NONFINITE, "all"),
        (SPIKE, Action.STABILIZE, Reason.INSTABILITY_SPIKE, "all"),
        (DRIFT_UP, Action.STABILIZE, Reason.INSTABILITY_SPIKE, "all"),
        (PLATEAU, Action.EXPLORE, Reason.LOSS_PLATEAU, "all"),
        (TAIL, Action.FORK, Reason.HIGH_LOSS_TAIL, "quantile:0.85:1.0"),
        (CLUSTER, Action.FORK, Reason.RESIDUAL_CLUSTER, "kmeans:auto"),
        (SLICE, Action.FORK, Reason.SLICE_UNDERPERFORMANCE, "indices:slices/night.npy"),
    ],
)
def test_each_detection_maps_to_its_action(
    detection: Detection, action: Action, reason: Reason, selection: str
) -> None:
    card = one(detection)
    assert (card.action, card.reason, card.selection) == (action, reason, selection)
    assert card.status is PlanStatus.PROPOSED and card.created_step == 1000
    assert card.plan_id == "plan-0001" and card.target_run == "main"
    assert card.diagnostics["detection"]["kind"] == detection.kind.value


def test_downward_drift_is_not_acted_on() -> None:
    assert propose([DRIFT_DOWN], PlannerState(), PlannerConfig(), 1000, CTX) == []


def test_stabilize_recipe_rolls_back_before_the_bad_step() -> None:
    card = one(NAN)
    r = card.training_recipe
    assert r["rollback_to_step"] == 980  # latest checkpoint strictly before step 990
    assert r["skip_offending_batches"] and r["offending_steps"] == [990]
    assert r["lr_mul"] == 0.5 and r["grad_clip"] == 1.0 and r["bf16"] is True
    assert card.cost_steps == 0 and card.children == 0


def test_stabilize_keeps_tighter_clip_and_handles_missing_checkpoint() -> None:
    ctx = {"grad_clip": 0.25}
    card = propose([SPIKE], PlannerState(), PlannerConfig(), 1000, ctx)[0]
    assert card.training_recipe["grad_clip"] == 0.25
    assert card.training_recipe["rollback_to_step"] is None
    assert card.training_recipe["bf16"] is False
    assert "No checkpoint before step 995" in card.diagnostics["summary"]


def test_grad_norm_spike_is_repaired_in_place_but_a_loss_spike_rolls_back() -> None:
    gn_spike = det(DetectionKind.SPIKE, 995, subject="grad_norm", z=9.0)
    r = one(gn_spike).training_recipe
    assert r["rollback_to_step"] is None and not r["skip_offending_batches"]
    assert r["lr_mul"] < 1.0 and r["grad_clip"] > 0
    assert one(SPIKE).training_recipe["rollback_to_step"] is not None


def test_drift_is_repaired_without_rollback() -> None:
    r = one(DRIFT_UP).training_recipe
    assert r["rollback_to_step"] is None and not r["skip_offending_batches"]


def test_nonfinite_outranks_spike_in_one_stabilize_card() -> None:
    res = plan([SPIKE, NAN], PlannerState(), PlannerConfig(), 1000, CTX)
    assert [c.reason for c in res.cards] == [Reason.NONFINITE]
    assert any("proposed this round" in b.why for b in res.blocked)


def test_explore_races_lr_variants_with_successive_halving() -> None:
    card = one(PLATEAU, max_parallel_children=3)
    r = card.training_recipe
    assert [v["lr_mul"] for v in r["variants"]] == [0.3, 1.0, 3.0]
    assert r["race"] == {"method": "successive_halving", "eta": 3, "rung_steps": [200, 600]}
    assert card.children == 3 and card.cost_steps == 3 * 200 + 1 * 400


def test_fork_card_carries_recipe_and_planned_gate() -> None:
    card = one(TAIL)
    assert card.training_recipe["early_stop"]["patience_evals"] == 3
    assert [v["lr_mul"] for v in card.training_recipe["variants"]] == [1.0, 0.5]
    assert card.gate_recipe == {
        "kind": "switch_softmax",
        "temperature": 1.0,
        "balance_weight": 0.01,
        "steps": 500,
    }


def test_weak_slice_without_a_selection_is_blocked_with_reason() -> None:
    res = plan([SLICE], PlannerState(), PlannerConfig(), 1000, {})
    assert res.cards == ()
    assert "no selection is known for slice 'night'" in res.blocked[0].why


# --------------------------------------------------------------------------- safeguards


def test_cooldown_is_respected_and_explained() -> None:
    cfg = PlannerConfig(base_cooldown_steps=1000)
    state = record_proposed(PlannerState(), propose([TAIL], PlannerState(), cfg, 1000, CTX))
    card = state.pending[0]
    state = apply_outcome(state, one(TAIL), {"status": "rejected"})
    assert state.pending == () and card.plan_id == "plan-0001"
    res = plan([TAIL], state, cfg, 1999, CTX)
    assert res.cards == ()
    assert res.blocked[0].retry_at_step == 2000 and "cooldown" in res.blocked[0].why
    cards = propose([TAIL], state, cfg, 2000, CTX)
    assert len(cards) == 1 and cards[0].plan_id == "plan-0002"


def test_dedupe_while_pending_even_after_cooldown() -> None:
    cfg = PlannerConfig(base_cooldown_steps=10, max_parallel_children=4)
    state = record_proposed(PlannerState(), propose([TAIL], PlannerState(), cfg, 1000, CTX))
    res = plan([TAIL], state, cfg, 5000, CTX)
    assert res.cards == () and "still pending" in res.blocked[0].why
    # A different selection is a different plan.
    other = det(DetectionKind.HIGH_LOSS_TAIL, q=0.9)
    assert propose([other], state, cfg, 5000, CTX)[0].selection == "quantile:0.9:1.0"


def test_one_card_per_action_per_round() -> None:
    cards = propose(
        [TAIL, CLUSTER], PlannerState(), PlannerConfig(max_parallel_children=8), 1000, CTX
    )
    assert [c.action for c in cards] == [Action.FORK]


def test_children_cap_blocks_and_trims() -> None:
    cfg = PlannerConfig(max_parallel_children=2, base_cooldown_steps=0)
    state = record_proposed(PlannerState(), propose([TAIL], PlannerState(), cfg, 1000, CTX))
    state = record_started(state, "plan-0001")
    assert state.active_children == 2
    res = plan([CLUSTER, PLATEAU], state, cfg, 1001, CTX)
    assert res.cards == ()
    assert all("children cap" in b.why for b in res.blocked)
    # The pool reports manual forks too: 1 of 3 slots busy leaves 2 for explore's 3 variants.
    cfg3 = PlannerConfig(max_parallel_children=3)
    card = propose([PLATEAU], PlannerState(), cfg3, 1000, {"active_children": 1})[0]
    assert [v["lr_mul"] for v in card.training_recipe["variants"]] == [0.3, 1.0]
    assert card.training_recipe["race"]["rung_steps"] == [200, 600]
    # Explore needs two variants to race; one free slot is not enough.
    res = plan([PLATEAU], PlannerState(), cfg3, 1000, {"active_children": 2})
    assert res.cards == () and "needs 2" in res.blocked[0].why


def test_a_race_frees_the_slots_of_its_stopped_losers() -> None:
    # An explore race of 3 variants started; rung 1 stopped two of them. The caller's count
    # of processes still going (1) is what the cap sees, not the card's 3 until it ends.
    cfg = PlannerConfig(max_parallel_children=3, base_cooldown_steps=0)
    explore = propose([PLATEAU], PlannerState(), cfg, 1000, CTX)[0]
    state = record_started(record_proposed(PlannerState(), [explore]), explore.plan_id)
    assert state.active_children == 3
    assert plan([TAIL], state, cfg, 1001, CTX).cards == ()  # no count given: all 3 held
    card = propose([TAIL], state, cfg, 1001, {**CTX, "active_children": 1})[0]
    assert card.action is Action.FORK and card.children == 2  # both fork variants fit
    # A fork (1 slot) still running beside a new explore leaves it 2 of its 3 variants.
    trimmed = propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "active_children": 1})[0]
    assert [v["lr_mul"] for v in trimmed.training_recipe["variants"]] == [0.3, 1.0]
    full = propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "active_children": 0})[0]
    assert [v["lr_mul"] for v in full.training_recipe["variants"]] == [0.3, 1.0, 3.0]


def test_budget_cap_blocks_with_numbers() -> None:
    # Two variants race 333 steps, the survivor goes on to 1000: 2*333 + 667 = 1333.
    cfg = PlannerConfig(max_total_budget_steps=1200, fork_budget_steps=1000)
    res = plan([TAIL], PlannerState(), cfg, 1000, CTX)
    assert res.cards == ()
    assert "budget cap: 0 of 1200" in res.blocked[0].why and "needs 1333" in res.blocked[0].why


def test_budget_is_reserved_spent_and_trued_up() -> None:
    cfg = PlannerConfig(max_total_budget_steps=2000, base_cooldown_steps=0, max_parallel_children=4)
    card = propose([TAIL], PlannerState(), cfg, 1000, CTX)[0]
    state = record_proposed(PlannerState(), [card])
    assert state.reserved_budget_steps == card.cost_steps == 1333
    # Reserved budget already counts: a second fork does not fit.
    assert propose([CLUSTER], state, cfg, 1001, CTX) == []
    state = record_started(state, card.plan_id)
    assert state.budget_spent_steps == 1333 and state.reserved_budget_steps == 0
    state = apply_outcome(state, card, {"improved": True, "budget_used_steps": 400})
    assert state.budget_spent_steps == 400 and state.active_children == 0
    assert propose([CLUSTER], state, cfg, 1002, CTX) != []


def test_instability_comes_first() -> None:
    res = plan([TAIL, SPIKE, PLATEAU], PlannerState(), PlannerConfig(), 1000, CTX)
    assert [c.action for c in res.cards] == [Action.STABILIZE]
    assert {b.action for b in res.blocked} == {Action.FORK, Action.EXPLORE}
    assert all("unstable" in b.why for b in res.blocked)
    # While the stabilization is pending nothing else is proposed either.
    state = record_proposed(PlannerState(), res.cards)
    assert propose([TAIL], state, PlannerConfig(), 1001, CTX) == []


def test_plateau_is_not_trusted_next_to_a_drift() -> None:
    res = plan([PLATEAU, DRIFT_DOWN], PlannerState(), PlannerConfig(), 1000, CTX)
    assert res.cards == () and "drift" in res.blocked[0].why


# --------------------------------------------------------------------------- adaptive cooldown


def test_adaptive_cooldown_doubles_caps_and_resets() -> None:
    cfg = PlannerConfig(base_cooldown_steps=100, max_cooldown_multiplier=4.0, give_up_after=10)
    card = one(TAIL)
    state = PlannerState()
    seen = []
    for _ in range(4):
        state = apply_outcome(state, card, {"metric_before": 1.0, "metric_after": 1.1}, cfg)
        seen.append(effective_cooldown(state, cfg, Action.FORK))
    assert seen == [200, 400, 400, 400]
    assert effective_cooldown(state, cfg, Action.EXPLORE) == 100  # per action kind
    state = apply_outcome(state, card, {"metric_before": 1.0, "metric_after": 0.9}, cfg)
    assert effective_cooldown(state, cfg, Action.FORK) == 100
    assert state.consecutive_failures["fork"] == 0


def test_failed_doubles_rejected_does_not() -> None:
    card = one(TAIL)
    state = apply_outcome(PlannerState(), card, {"status": "rejected"})
    assert state.cooldown_multiplier == {}
    state = apply_outcome(state, card, {"status": "failed"})
    assert state.cooldown_multiplier["fork"] == 2.0
    state = apply_outcome(state, card, {"status": "done"})  # no evidence = no improvement
    assert state.cooldown_multiplier["fork"] == 4.0
    state = apply_outcome(
        state, card, {"metric_before": 0.5, "metric_after": 0.7, "higher_is_better": True}
    )
    assert state.cooldown_multiplier["fork"] == 1.0
    with pytest.raises(ValueError, match="status"):
        apply_outcome(state, card, {"status": "exploded"})


def test_gives_up_after_repeated_failures() -> None:
    cfg = PlannerConfig(give_up_after=2, base_cooldown_steps=0)
    card = one(TAIL)
    state = PlannerState()
    for _ in range(2):
        state = apply_outcome(state, card, {"improved": False}, cfg)
    res = plan([TAIL], state, cfg, 10_000, CTX)
    assert res.cards == () and "did not help 2 times" in res.blocked[0].why


# --------------------------------------------------------------------------- gate & merge


def test_gate_after_forks_complete_then_merge_on_cadence() -> None:
    cfg = PlannerConfig(
        merge_every_steps=5000,
        base_cooldown_steps=0,
        max_parallel_children=4,
        merge_max_lag_steps=4000,  # fork-1 was forked at step 1000, the merge is at 5000
    )
    fork = propose([TAIL], PlannerState(), cfg, 1000, CTX)[0]
    state = record_started(record_proposed(PlannerState(), [fork]), fork.plan_id)
    # A second fork still running holds the gate back.
    fork2 = propose([CLUSTER], state, cfg, 1100, CTX)[0]
    state = record_started(record_proposed(state, [fork2]), fork2.plan_id)
    state = apply_outcome(state, fork, {"improved": True, "runs": ["fork-1"]}, cfg)
    assert [s.run_id for s in state.ungated] == ["fork-1"]
    res = plan([], state, cfg, 2000, CTX)
    assert res.cards == () and "waiting for 1 fork" in res.blocked[0].why
    assert res.blocked[1].action is Action.MERGE and res.blocked[1].retry_at_step == 5000
    state = apply_outcome(state, fork2, {"improved": False}, cfg)

    gate = propose([], state, cfg, 2100, CTX)[0]
    assert gate.action is Action.GATE and gate.reason is Reason.HIGH_LOSS_TAIL
    assert gate.gate_recipe["experts"] == ["main", "fork-1"]
    assert gate.gate_recipe["kind"] == "switch_softmax"
    state = record_proposed(state, [gate])
    assert propose([], state, cfg, 2200, CTX) == []  # gate pending: deduped
    state = apply_outcome(state, gate, {"improved": True, "runs": ["moe-1"]}, cfg)
    assert state.ungated == () and len(state.unmerged) == 1

    merge = propose([], state, cfg, 5000, CTX)[0]
    assert merge.action is Action.MERGE and merge.reason is Reason.MERGE_CADENCE
    assert merge.merge_recipe == {
        "method": "swa",
        "runs": ["main", "fork-1"],
        "bn_recalibration": True,
    }
    state = apply_outcome(record_proposed(state, [merge]), merge, {"improved": True, "step": 5200})
    assert state.unmerged == () and state.last_merge_step == 5200
    assert propose([], state, cfg, 20_000, CTX) == []


def test_distill_merge_costs_its_steps() -> None:
    from onthefly_supervisor.planner.policy import Specialist

    state = PlannerState(unmerged=(Specialist("f", Reason.HIGH_LOSS_TAIL, "plan-0001"),))
    cfg = PlannerConfig(merge_method="distill", merge_every_steps=0, distill_steps=700)
    card = propose([], state, cfg, 10, CTX)[0]
    assert card.merge_recipe["method"] == "distill" and card.cost_steps == 700


# --------------------------------------------------------------------------- data types


def test_card_round_trips_through_strict_json() -> None:
    card = one(NAN)
    text = json.dumps(card.to_dict(), allow_nan=False)
    back = PlanCard.from_dict(json.loads(text))
    assert back == card
    with pytest.raises(ValueError, match="unknown field"):
        PlanCard.from_dict({**card.to_dict(), "colour": "red"})


def test_card_lifecycle_transitions() -> None:
    card = one(TAIL)
    running = card.with_status("approved").with_status(PlanStatus.RUNNING)
    assert running.with_status("done").status is PlanStatus.DONE
    assert card.with_status("rejected").pending is False
    with pytest.raises(ValueError, match="cannot go from proposed to done"):
        card.with_status("done")
    with pytest.raises(ValueError, match="cannot go from done"):
        running.with_status("done").with_status("running")


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"action": "teleport"}, "action"),
        ({"reason": "vibes"}, "reason"),
        ({"selection": "quantile:0.9:0.1"}, "PlanCard.selection=.*bounds"),
        ({"selection": "random:5"}, "PlanCard.selection=.*unknown kind"),
        ({"budget_steps": -1}, "budget_steps"),
        ({"action": "merge", "merge_recipe": {"method": "average"}}, "merge_recipe"),
        ({"status": "maybe"}, "status"),
    ],
)
def test_card_validation_names_the_field(kw: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {
        "plan_id": "p",
        "action": "fork",
        "reason": "high_loss_tail",
        "selection": "all",
    }
    with pytest.raises(ValueError, match=field):
        PlanCard(**{**base, **kw})


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("all", "all"),
        ("quantile:0.85:1.0", "quantile:0.85:1"),
        ("kmeans:auto", "kmeans:auto"),
        ("kmeans:4:cluster=2", "kmeans:4:cluster=2"),
        ("indices:a.npy", "indices:a.npy"),
    ],
)
def test_selection_grammar_is_the_cli_grammar(spec: str, canonical: str) -> None:
    assert validate_selection(spec) == canonical


def test_dedupe_uses_canonical_selection() -> None:
    a = one(TAIL)
    b = PlanCard.from_dict({**a.to_dict(), "plan_id": "plan-0009", "selection": "quantile:0.85:1"})
    assert a.selection != b.selection and a.dedupe_key == b.dedupe_key
    state = record_proposed(PlannerState(), [b])
    res = plan([TAIL], state, PlannerConfig(max_parallel_children=4), 9000, CTX)
    assert res.cards == () and "the same plan (plan-0009) is still pending" in res.blocked[0].why


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"max_parallel_children": 0}, "max_parallel_children"),
        ({"max_total_budget_steps": -5}, "max_total_budget_steps"),
        ({"base_cooldown_steps": 1.5}, "base_cooldown_steps"),
        ({"cooldown_overrides": {"dance": 3}}, "cooldown_overrides"),
        ({"cooldown_overrides": {"fork": -1}}, "cooldown_overrides"),
        ({"cooldown_growth": 0.5}, "cooldown_growth"),
        ({"max_cooldown_multiplier": 0.0}, "max_cooldown_multiplier"),
        ({"give_up_after": 0}, "give_up_after"),
        ({"fork_lr_multipliers": ()}, "fork_lr_multipliers"),
        ({"explore_lr_multipliers": (1.0,)}, "explore_lr_multipliers"),
        ({"explore_lr_multipliers": (1.0, -2.0)}, "explore_lr_multipliers"),
        ({"halving_eta": 1}, "halving_eta"),
        ({"stabilize_lr_mul": 2.0}, "stabilize_lr_mul"),
        ({"stabilize_grad_clip": 0.0}, "stabilize_grad_clip"),
        ({"gate_balance_weight": -1.0}, "gate_balance_weight"),
        ({"merge_method": "average"}, "merge_method"),
        ({"min_completed_for_merge": 0}, "min_completed_for_merge"),
    ],
)
def test_config_validation_names_the_field(kw: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"PlannerConfig.{name}="):
        PlannerConfig(**kw)


def test_state_round_trips_through_json() -> None:
    cfg = PlannerConfig(base_cooldown_steps=0)
    fork = propose([TAIL], PlannerState(), cfg, 1000, CTX)[0]
    state = record_started(record_proposed(PlannerState(), [fork]), fork.plan_id)
    state = apply_outcome(state, fork, {"improved": True, "runs": ["f1"]}, cfg)
    state = record_proposed(state, propose([PLATEAU], state, cfg, 1200, CTX))
    back = PlannerState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    assert back == state


def test_record_started_unknown_plan() -> None:
    with pytest.raises(ValueError, match="plan-0042"):
        record_started(PlannerState(), "plan-0042")


# --------------------------------------------------------------------------- successive halving


def test_halving_rungs() -> None:
    assert halving_rungs(900, 9, 3) == [100, 300, 900]
    assert halving_rungs(600, 3, 3) == [200, 600]
    assert halving_rungs(1000, 2, 3) == [333, 1000]
    assert halving_rungs(50, 1, 3) == [50]
    with pytest.raises(ValueError, match="eta"):
        halving_rungs(100, 3, 1)


def test_successive_halving_keeps_the_best_per_rung() -> None:
    scores = {f"v{i}": [float(i), float(10 - i)] for i in range(9)}
    assert successive_halving({k: v[:0] for k, v in scores.items()}, [100, 300, 900]) == sorted(
        scores
    )
    rung0 = {k: v[:1] for k, v in scores.items()}
    assert successive_halving(rung0, [100, 300, 900]) == ["v0", "v1", "v2"]
    # At rung 1 the order flips among the three survivors.
    assert successive_halving(scores, [100, 300, 900]) == ["v2"]


def test_successive_halving_waits_and_ranks_nan_last() -> None:
    scores: dict[str, list[float]] = {"a": [float("nan")], "b": [2.0], "c": [3.0]}
    assert successive_halving(scores, [10, 30]) == ["b"]
    assert successive_halving({"a": [1.0], "b": [], "c": [3.0]}, [10, 30]) == ["a", "b", "c"]
    assert successive_halving({"x": [1.0], "y": [1.0], "z": [1.0]}, [10, 30]) == ["x"]
    with pytest.raises(ValueError, match="rung_steps"):
        successive_halving(scores, [30, 10])


# --------------------------------------------------------------------------- property: caps hold

KINDS = [NAN, SPIKE, DRIFT_UP, DRIFT_DOWN, PLATEAU, TAIL, CLUSTER, SLICE]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(KINDS), max_size=4),
            st.integers(0, 400),
            st.sampled_from(["done", "failed", "rejected", "keep"]),
            st.booleans(),
        ),
        max_size=25,
    ),
    st.integers(1, 4),
    st.integers(0, 20_000),
)
def test_caps_and_dedupe_hold_under_any_sequence(
    rounds: list[tuple[list[Detection], int, str, bool]], max_children: int, budget: int
) -> None:
    cfg = PlannerConfig(
        max_parallel_children=max_children, max_total_budget_steps=budget, base_cooldown_steps=50
    )
    state, step = PlannerState(), 0
    cards_by_id: dict[str, PlanCard] = {}
    for detections, dt, ending, improved in rounds:
        step += dt
        cards = propose(detections, state, cfg, step, CTX)
        keys = [c.dedupe_key for c in cards] + [p.key for p in state.pending]
        assert len(keys) == len(set(keys))
        assert len({c.action for c in cards}) == len(cards)
        state = record_proposed(state, cards)
        for c in cards:
            cards_by_id[c.plan_id] = c
            state = record_started(state, c.plan_id)
        assert state.active_children + state.reserved_children <= max_children
        assert state.budget_spent_steps + state.reserved_budget_steps <= budget
        if ending != "keep" and state.pending:
            done = cards_by_id[state.pending[0].plan_id]
            state = apply_outcome(state, done, {"status": ending, "improved": improved}, cfg)


# --------------------------------------------------------------------------- variant races


def test_lr_variants_spread_log_uniformly_over_one_decade() -> None:
    from onthefly_supervisor.variants import spread_lr_multipliers

    m = spread_lr_multipliers(1.0, 4)
    assert m[0] == pytest.approx(10**-0.5) and m[-1] == pytest.approx(10**0.5)
    ratios = [b / a for a, b in zip(m, m[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * 3)  # evenly spaced in log space
    assert spread_lr_multipliers(0.2, 3)[1] == pytest.approx(0.2)  # odd n: the centre itself
    assert spread_lr_multipliers(0.5, 1) == [0.5]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="variants"):
            spread_lr_multipliers(1.0, bad)  # type: ignore[arg-type]


def test_race_rungs_halve_to_one_and_refuse_a_too_small_budget() -> None:
    from onthefly_supervisor.variants import race_rungs

    assert race_rungs(300, 4, 2) == [75, 150, 300]  # 4 -> 2 -> 1
    assert race_rungs(150, 3, 3) == [50, 150]  # 3 -> 1
    assert race_rungs(40, 5, 2) == [10, 20, 40]  # 5 -> 2 -> 1
    with pytest.raises(ValueError, match="too small to race 8 variants"):
        race_rungs(4, 8, 2)
    with pytest.raises(ValueError, match="2..16 variants"):
        race_rungs(100, 1, 2)
    with pytest.raises(ValueError, match="eta"):
        race_rungs(100, 4, 1)


def test_rung_keeps_the_better_half_and_records_why_the_rest_stop() -> None:
    from onthefly_supervisor.variants import decide_rung

    res = decide_rung({"f1": 0.5, "f2": 0.3, "f3": 0.9, "f4": 0.4}, eta=2, rung=0, step=75)
    assert res.ranked == ("f2", "f4", "f1", "f3")
    assert res.promoted == ("f2", "f4") and res.stopped == ("f1", "f3")  # variant order
    assert "lost the race at rung 1 (step 75)" in res.reasons["f1"]
    assert "ranked 4 of 4" in res.reasons["f3"] and "best f2 at 0.3" in res.reasons["f3"]
    json.dumps(res.to_dict(), allow_nan=False)


def test_rung_never_promotes_diverged_or_missing_variants() -> None:
    from onthefly_supervisor.variants import decide_rung

    res = decide_rung(
        {"a": math.inf, "b": None, "c": 0.7, "d": math.nan},
        eta=2,
        rung=1,
        step=150,
        metric="val",
        notes={"b": "it failed at step 90 before the rung"},
    )
    # Two of four may go on, but only one has a finite loss.
    assert res.promoted == ("c",) and res.stopped == ("a", "b", "d")
    assert "not finite" in res.reasons["a"] and "not finite" in res.reasons["d"]
    assert "failed at step 90" in res.reasons["b"]
    # Ties go to the earlier variant, so a race is deterministic.
    tie = decide_rung({"y": 1.0, "x": 1.0, "z": 2.0}, eta=3, rung=0, step=10)
    assert tie.promoted == ("y",) and tie.stopped == ("x", "z")
    nobody = decide_rung({"a": None, "b": math.nan}, eta=2, rung=0, step=10)
    assert nobody.promoted == () and nobody.stopped == ("a", "b")


# --------------------------------------------------------------------------- remedies


def test_nonfinite_stabilize_skips_every_nonfinite_step_since_the_first() -> None:
    ctx = {**CTX, "nonfinite_steps": [700, 990, 991, 993, 1200]}
    card = propose([NAN], PlannerState(), PlannerConfig(max_skip_batches=3), 1000, ctx)[0]
    r = card.training_recipe
    # Only from the detected one on (700 is older history), capped at max_skip_batches.
    assert r["offending_steps"] == [990, 991, 993] and r["rollback_to_step"] == 980
    assert "skip the batch(es) of step(s) 990, 991, 993" in card.diagnostics["summary"]


def test_no_rollback_when_the_supervisor_cannot_restart_the_run() -> None:
    ctx = {**CTX, "rollback_supported": False, "bf16_note": "bf16 not applied: fp32 run"}
    card = propose([SPIKE], PlannerState(), PlannerConfig(), 1000, ctx)[0]
    r = card.training_recipe
    assert r["rollback_to_step"] is None and r["offending_steps"] == []
    assert not r["skip_offending_batches"] and r["lr_mul"] == 0.5
    assert "cannot restart" in card.diagnostics["summary"]
    assert card.diagnostics["bf16"] == "bf16 not applied: fp32 run"


def test_merge_fires_when_the_generalist_finished_before_the_cadence() -> None:
    from onthefly_supervisor.planner.policy import Specialist

    cfg = PlannerConfig(merge_every_steps=500)
    state = PlannerState(unmerged=(Specialist("fork-1", Reason.HIGH_LOSS_TAIL, "plan-0001"),))
    early = plan([], state, cfg, 300, CTX)
    assert early.cards == () and early.blocked[0].retry_at_step == 500
    final = propose([], state, cfg, 300, {**CTX, "final": True})
    assert [c.action for c in final] == [Action.MERGE]
    assert final[0].merge_recipe["runs"] == ["main", "fork-1"]  # the parent stays in it


def test_turning_automode_on_approves_the_cards_waiting_for_a_person(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.autopilot import Autopilot
    from onthefly_supervisor.planner.policy import PlanStatus

    published: list[tuple[str, dict[str, Any]]] = []
    sup = SimpleNamespace(
        automode=False,
        bus=SimpleNamespace(publish=lambda kind, run, **kw: published.append((kind, kw))),
        store=SimpleNamespace(put_plan=lambda *a: None, set_meta=lambda *a: None),
        control_hooks={},
        tick_hooks=[],
        busy_hooks=[],
        final_hooks=[],
    )
    ap = Autopilot(sup)  # type: ignore[arg-type]
    executed: list[str] = []
    monkeypatch.setattr(ap, "_execute", executed.append)
    base: dict[str, Any] = {"action": "fork", "reason": "high_loss_tail", "selection": "all"}
    ap._set(PlanCard(plan_id="plan-0001", **base))
    ap._set(PlanCard(plan_id="plan-0002", **base).with_status(PlanStatus.REJECTED))
    reply = ap.set_automode(pb.AutomodeRequest(enabled=True))
    assert reply.ok and "approved the pending plan-0001 (fork)" in reply.message
    deadline = time.time() + 5
    while not executed and time.time() < deadline:
        time.sleep(0.01)
    assert executed == ["plan-0001"]  # the rejected card stays rejected
    assert ap.cards["plan-0001"].status is PlanStatus.APPROVED
    assert ap.cards["plan-0002"].status is PlanStatus.REJECTED
    assert ap.set_automode(pb.AutomodeRequest(enabled=False)).message == "automode off"


def test_editing_lr_mul_of_an_explore_card_changes_what_is_raced() -> None:
    from types import SimpleNamespace

    import numpy as np

    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.autopilot import Autopilot, Execution

    sup = SimpleNamespace(
        automode=False,
        bus=SimpleNamespace(publish=lambda kind, run, **kw: None),
        store=SimpleNamespace(put_plan=lambda *a: None, run=lambda r: None, evals=lambda r: []),
        method=SimpleNamespace(latest_losses=lambda r: (np.array([1.0]),)),
        control_hooks={},
        tick_hooks=[],
        busy_hooks=[],
        final_hooks=[],
    )
    ap = Autopilot(sup)  # type: ignore[arg-type]
    card = ap._explain_variants(propose([PLATEAU], PlannerState(), ap.config, 1000, CTX)[0])
    assert card.diagnostics["variants"] == "races lr x1/x0.3/x3"
    ap._set(card)

    def edit(value: str) -> str:
        req = pb.EditPlanRequest(plan_id=card.plan_id, values={"lr_mul": value})
        return str(ap.edit(req).message)

    assert edit("0.5").endswith("edited: lr_mul=0.5 (races lr x0.15/x0.5/x1.5)")
    got = ap.cards[card.plan_id]
    assert [v["lr_mul"] for v in got.training_recipe["variants"]] == pytest.approx([0.15, 0.5, 1.5])
    assert "no x1 arm" in got.diagnostics["variants"]
    # A second edit sets the centre again (it does not multiply the first).
    edit("2")
    got = ap.cards[card.plan_id]
    assert [v["lr_mul"] for v in got.training_recipe["variants"]] == pytest.approx([0.6, 2, 6])
    summary = got.diagnostics["summary"]
    assert summary.count("races lr") == 1 and "races lr x0.6/x2/x6 (" in summary
    with pytest.raises(ValueError, match="must be > 0"):
        edit("0")
    # The race that starts is the edited one.
    sent: list[Any] = []

    def call(method: str, req: Any) -> Any:
        sent.append(req)
        return SimpleNamespace(payload_json='{"runs": ["fork-1"], "race": "race-1"}', run_id="")

    ap._call = call  # type: ignore[method-assign]
    ap._launch(got, Execution(got))
    assert list(sent[0].variant_lr_muls) == pytest.approx([0.6, 2, 6])


def test_a_served_session_takes_over_its_stored_plan_cards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`onthefly serve` (or resume) of a finished session: `plans approve` used to answer
    "no plan ..." because the new supervisor started with no cards."""
    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.server import ControlServicer
    from onthefly_supervisor.supervisor import Supervisor, SupervisorConfig
    from onthefly_supervisor.variants import Race
    from tests.unit.test_supervisor_units import Aborted, FakeContext, FakeLauncher

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    first = Supervisor(
        SupervisorConfig(script=str(script), project_dir=str(tmp_path), port=0),
        launcher=FakeLauncher(),
    )
    first.start()
    try:
        st = first.store
        base: dict[str, Any] = {"selection": "quantile:0.85:1", "created_step": 40}
        fork_done = PlanCard(
            "plan-0001",
            Action.FORK,
            Reason.HIGH_LOSS_TAIL,
            status=PlanStatus.DONE,
            diagnostics={"outcome": {"status": "done", "improved": True, "runs": ["fork-1"]}},
            **base,
        )
        explore = PlanCard(
            "plan-0002", Action.EXPLORE, Reason.LOSS_PLATEAU, "all", status=PlanStatus.RUNNING
        )
        gate = PlanCard(
            "plan-0003", Action.GATE, Reason.HIGH_LOSS_TAIL, "all", status=PlanStatus.RUNNING
        )
        proposed = PlanCard("plan-0004", Action.FORK, Reason.RESIDUAL_CLUSTER, **base)
        approved = PlanCard(
            "plan-0005",
            Action.MERGE,
            Reason.MERGE_CADENCE,
            "all",
            merge_recipe={"method": "swa", "runs": ["main", "fork-1"]},
            status=PlanStatus.APPROVED,
        )
        for c in (fork_done, explore, gate, proposed, approved):
            st.put_plan(c.plan_id, c.status.value, c.to_dict())
        race = Race("race-1", "main", ["fork-2", "fork-3"], {}, [50, 150], 3, "val")
        race.name = "plan-0002"
        st.set_meta("race:race-1", race.to_dict())
    finally:
        first.shutdown()

    served = Supervisor(
        SupervisorConfig(
            script=str(script),
            project_dir=str(tmp_path),
            port=0,
            resume_dir=first.dir,
            serve_only=True,
            keep_alive=True,
        ),
        launcher=FakeLauncher(),
    )
    ap = served.autopilot
    executed: list[str] = []
    monkeypatch.setattr(ap, "_execute", executed.append)
    served.start()
    try:
        svc = ControlServicer(served)
        listed = svc.ListPlans(pb.ListPlansRequest(), FakeContext())
        assert {p.plan_id: p.status for p in listed.plans} == {
            "plan-0001": "done",
            "plan-0002": "running",  # its race is found: judged when it ends
            "plan-0003": "failed",  # nothing it started was found
            "plan-0004": "proposed",
            "plan-0005": "approved",
        }
        assert "ended with the previous supervisor" in str(
            ap.cards["plan-0003"].diagnostics["outcome"]["error"]
        )
        assert ap.running["plan-0002"].race == "race-1"
        reply = svc.ApprovePlan(pb.PlanRequest(plan_id="plan-0004"), FakeContext())
        assert reply.ok and "approved" in reply.message
        reply = svc.ApprovePlan(pb.PlanRequest(plan_id="plan-0005"), FakeContext())
        assert "never started; starting it" in reply.message
        deadline = time.time() + 5
        while len(executed) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert sorted(executed) == ["plan-0004", "plan-0005"]
        ctx = FakeContext()
        with pytest.raises(Aborted):
            svc.ApprovePlan(pb.PlanRequest(plan_id="plan-0001"), ctx)
        assert "is done, not proposed" in ctx.details
        # The planner's memory is back: the improving specialist waits for a gate, and the
        # next card gets a new id.
        assert [s.run_id for s in ap.state.ungated] == ["fork-1"]
        assert ap.state.next_seq == 6
        assert {p.plan_id for p in ap.state.pending} == {"plan-0002", "plan-0004", "plan-0005"}
    finally:
        served.shutdown()


# --------------------------------------------------------------------------- timing of specialists


def test_loss_tail_and_cluster_forks_wait_for_the_plateau_or_the_end() -> None:
    """The demo forked on the loss tail at steps ~200-800 of 4,096, from a generalist far
    from its plateau: weak specialists that still joined the gate."""
    early = {**CTX, "plateau_step": None}  # the caller tracks plateaus: none seen yet
    for d in (TAIL, CLUSTER):
        res = plan([d], PlannerState(), PlannerConfig(), 300, early)
        assert res.cards == ()
        assert res.blocked[0].action is Action.FORK and "still improving" in res.blocked[0].why
    # A plateau in this round, one seen earlier, or the finished run lets it go.
    cfg = PlannerConfig(max_parallel_children=5)
    assert {c.action for c in propose([TAIL, PLATEAU], PlannerState(), cfg, 1000, early)} == {
        Action.FORK,
        Action.EXPLORE,
    }
    assert propose([TAIL], PlannerState(), PlannerConfig(), 1000, {**early, "plateau_step": 800})
    assert propose([CLUSTER], PlannerState(), PlannerConfig(), 1000, {**early, "final": True})
    # A plateau next to a drift is not trusted for this either.
    assert propose([TAIL, PLATEAU, DRIFT_DOWN], PlannerState(), PlannerConfig(), 1000, early) == []
    # A weak validation slice the user named is not held back; nor is anything when off.
    assert propose([SLICE], PlannerState(), PlannerConfig(), 300, early)
    assert propose([TAIL], PlannerState(), PlannerConfig(fork_requires_plateau=False), 300, early)
    # A caller that leaves plateau_step out does not track plateaus: nothing is held back.
    assert propose([TAIL], PlannerState(), PlannerConfig(), 300, CTX)


def test_a_newer_specialist_on_the_same_samples_supersedes_the_older_one() -> None:
    """Each demo run gated over 3 loss-tail specialists, the early ones weak: the gate takes
    the one forked from the newest weights per selection."""
    cfg = PlannerConfig(base_cooldown_steps=0, merge_every_steps=0, merge_max_lag_steps=10_000)
    state = PlannerState()
    # The planner forks the same samples again only once the gate has judged the specialist
    # on them (next test); two forks on them can still end up waiting together, e.g. a
    # specialist of a fork that was still running when the supervisor restarted.
    first = propose([TAIL], state, cfg, 1000, CTX)[0]
    second = replace(first, plan_id="plan-0099", created_step=2500)
    forks = [first, second]
    for card in forks:
        state = record_started(record_proposed(state, [card]), card.plan_id)
    for card, run in ((first, "fork-1"), (second, "fork-2")):
        state = apply_outcome(
            state,
            card,
            {"improved": True, "runs": [run], "parent_step": card.created_step + 20},
            cfg,
        )
    assert [(s.run_id, s.parent_step) for s in state.ungated] == [("fork-2", 2520)]
    assert [s.run_id for s in state.unmerged] == ["fork-2"]
    # A specialist on other samples is kept beside it.
    other = propose([CLUSTER], state, cfg, 2600, CTX)[0]
    state = record_started(record_proposed(state, [other]), other.plan_id)
    state = apply_outcome(state, other, {"improved": True, "runs": ["fork-3"]}, cfg)
    gate = propose([], state, cfg, 3000, CTX)[0]
    assert gate.action is Action.GATE
    assert gate.gate_recipe["experts"] == ["main", "fork-2", "fork-3"]
    # Older specialists arriving late (a slow fork) do not push out a newer one.
    late = apply_outcome(
        state, forks[0], {"improved": True, "runs": ["fork-0"], "parent_step": 500}, cfg
    )
    assert [s.run_id for s in late.ungated] == ["fork-2", "fork-3", "fork-0"]


def test_the_same_samples_are_forked_again_only_after_the_gate_judged_their_specialist() -> None:
    """An lr-0 run in automode forked its loss tail every 100 steps (8 specialists on the same
    samples, each superseding the last) while its gates kept losing to main."""
    cfg = PlannerConfig(base_cooldown_steps=100, merge_every_steps=0)
    state = PlannerState()
    card = propose([TAIL], state, cfg, 100, CTX)[0]
    state = record_started(record_proposed(state, [card]), card.plan_id)
    state = apply_outcome(state, card, {"improved": True, "runs": ["fork-1"]}, cfg)
    res = plan([TAIL], state, cfg, 300, CTX)
    assert [c.action for c in res.cards] == [Action.GATE]
    why = next(b.why for b in res.blocked if b.action is Action.FORK)
    assert "specialist fork-1" in why and "waits for the gate to judge it" in why
    # A specialist on other samples is no reason to wait.
    assert Action.FORK in [c.action for c in plan([CLUSTER], state, cfg, 300, CTX).cards]
    gate = res.cards[0]
    state = record_started(record_proposed(state, [gate]), gate.plan_id)
    state = apply_outcome(state, gate, {"improved": False, "runs": ["moe-1"]}, cfg)
    # Routing to it did not beat main: forking more is tried half as often.
    assert effective_cooldown(state, cfg, Action.FORK) == 200
    assert [c.action for c in propose([TAIL], state, cfg, 299, CTX)] == []
    assert [c.action for c in propose([TAIL], state, cfg, 300, CTX)] == [Action.FORK]
    # A gate that helps leaves the fork cooldown alone.
    fresh = record_started(record_proposed(PlannerState(), [gate]), gate.plan_id)
    fresh = apply_outcome(fresh, gate, {"improved": True, "runs": ["moe-1"]}, cfg)
    assert effective_cooldown(fresh, cfg, Action.FORK) == 100


def test_explore_is_not_proposed_when_its_race_cannot_end_before_the_run() -> None:
    """The demo's plateau race always ended after main, its lr never adopted."""
    cfg = PlannerConfig(max_parallel_children=3)
    need = propose([PLATEAU], PlannerState(), cfg, 1000, CTX)[0].cost_steps
    assert need == 3 * 200 + 400
    res = plan([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "steps_left": need - 1})
    assert res.cards == ()
    why = res.blocked[0].why
    assert f"main has {need - 1} steps left, fewer than the {need} steps its race" in why
    assert "too late to adopt" in why
    assert propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "steps_left": need})
    # Trimmed to 2 variants by the children cap, it needs less.
    trimmed = {**CTX, "steps_left": 2 * 200 + 400, "active_children": 1}
    assert [c.children for c in propose([PLATEAU], PlannerState(), cfg, 1000, trimmed)] == [2]
    # Unknown length (None) or a finished run does not hold it back.
    assert propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "steps_left": None})
    assert propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, "steps_left": 1, "final": True})
    # With the measured pace: a fork starts in 5 s (at each of the 2 rungs: survivors restart
    # from their rung checkpoints) and trains 150 steps/s while main trains 300 steps/s, so
    # the race's 1000 steps take 300 * (2 * 5 + 1000 / 150) = 5000 of main's.
    pace = {"target_steps_per_s": 300.0, "fork_startup_s": 5.0, "fork_steps_per_s": 150.0}
    res = plan([PLATEAU], PlannerState(), cfg, 1000, {**CTX, **pace, "steps_left": 4999})
    assert res.cards == () and "fewer than the ~5000 its race takes" in res.blocked[0].why
    assert "a fork starts in ~5.0 s, at each of its 2 rung(s)" in res.blocked[0].why
    assert propose([PLATEAU], PlannerState(), cfg, 1000, {**CTX, **pace, "steps_left": 5000})


def test_a_weight_space_merge_takes_only_specialists_on_the_targets_trajectory() -> None:
    """Cadence SWA of main with a specialist forked thousands of steps earlier made models
    3-12x worse than main."""
    from onthefly_supervisor.planner.policy import Specialist

    old = Specialist("fork-1", Reason.HIGH_LOSS_TAIL, "plan-0001", "quantile:0.85:1", 141)
    cfg = PlannerConfig(merge_every_steps=500)
    state = PlannerState(unmerged=(old,))
    res = plan([], state, cfg, 4096, {**CTX, "final": True})
    assert res.cards == ()
    why = res.blocked[0].why
    assert res.blocked[0].action is Action.MERGE and "fork-1 (step 141)" in why
    assert "waits for a specialist forked from main's current weights" in why
    # Forked from the finished main's last checkpoint: on its trajectory.
    new = Specialist("fork-5", Reason.RESIDUAL_CLUSTER, "plan-0008", "kmeans:auto", 4096)
    state = PlannerState(unmerged=(old, new))
    card = propose([], state, cfg, 4096, {**CTX, "final": True})[0]
    assert card.merge_recipe["runs"] == ["main", "fork-5"]
    # merge_max_lag_steps widens it; distillation is not a weight average and takes all.
    lag = PlannerConfig(merge_every_steps=500, merge_max_lag_steps=4000)
    assert propose([], state, lag, 4096, CTX)[0].merge_recipe["runs"] == [
        "main",
        "fork-1",
        "fork-5",
    ]
    distill = PlannerConfig(merge_every_steps=0, merge_method="distill")
    runs = propose([], PlannerState(unmerged=(old,)), distill, 4096, CTX)[0].merge_recipe["runs"]
    assert runs == ["main", "fork-1"]


def test_automode_measures_the_runs_shape_and_pace_and_rejects_a_losing_merge(
    tmp_path: Path,
) -> None:
    """What the planner is given about the race's room (steps left, pace), and a cadence
    merge that loses to main is marked rejected on its card and in the report."""
    from dataclasses import replace
    from types import SimpleNamespace

    from onthefly_supervisor.autopilot import Autopilot, Execution
    from onthefly_supervisor.lifecycle import RunStatus
    from onthefly_supervisor.report import build
    from onthefly_supervisor.store import RunRow, Store

    store = Store(str(tmp_path))
    t0 = 1000.0
    store.add_run(
        RunRow("main", "main", "main", RunStatus.RUNNING, [], t0, config={"max_steps": 0})
    )
    # main's first step 4 s after it was created, then 200 steps/s.
    store.add_metrics(
        "main", [{"step": s, "epoch": 0, "time": t0 + 4 + s / 200, "loss": 1.0} for s in range(1, 1001)]
    )  # fmt: skip
    sup = SimpleNamespace(
        store=store,
        shape={"main": (32, 128)},
        bus=SimpleNamespace(publish=lambda *a, **kw: None),
        control_hooks={},
        tick_hooks=[],
        busy_hooks=[],
        final_hooks=[],
    )
    ap = Autopilot(sup)  # type: ignore[arg-type]
    main = store.run("main")
    assert main is not None and ap._steps_left(main) == 4096 - 1000
    assert ap._steps_left(replace(main, config={"max_steps": 3000})) == 2000
    # Before any fork, a fork is taken to step as fast as main and to start in twice main's
    # start-up (it starts while main trains on the same cores).
    assert ap._race_pace(main) == pytest.approx(
        {"target_steps_per_s": 200.0, "fork_startup_s": 8.01, "fork_steps_per_s": 200.0}
    )
    store.add_run(RunRow("fork-1", "f", "fork", RunStatus.COMPLETED, ["main"], t0 + 10))
    store.add_metrics(
        "fork-1", [{"step": s, "epoch": 0, "time": t0 + 17 + s / 50, "loss": 1.0} for s in range(1, 101)]
    )  # fmt: skip
    pace = ap._race_pace(main)
    assert (pace["fork_startup_s"], pace["fork_steps_per_s"]) == pytest.approx((7.02, 50.0))

    # A merge 3x worse than main on val: rejected.
    store.update_run("main", val_loss=0.04)
    store.add_run(
        RunRow("merge-1", "plan-0001-merge", "merge", RunStatus.COMPLETED, ["main", "fork-1"], t0)
    )
    store.update_run("merge-1", val_loss=0.12, test_loss=0.13)
    card = PlanCard(
        "plan-0001",
        Action.MERGE,
        Reason.MERGE_CADENCE,
        "all",
        merge_recipe={"method": "swa", "runs": ["main", "fork-1"]},
        status=PlanStatus.RUNNING,
    )
    ap.cards[card.plan_id] = card
    ap.state = record_started(record_proposed(ap.state, [card]), card.plan_id)
    ap.running[card.plan_id] = Execution(card, runs=["merge-1"], before=0.04)
    ap._judge_running()
    out = ap.cards["plan-0001"].diagnostics["outcome"]
    assert out["verdict"] == "rejected" and not out["improved"]
    assert out["summary"] == (
        "merge-1 loses to main: val loss 0.12 vs 0.04 (3.00x); rejected, main stays the catch-all"
    )
    store.close()
    rep = build(str(tmp_path))
    runs = {r["run_id"]: r for r in rep["runs"]}
    assert runs["merge-1"]["rejected"] == out["summary"] and "rejected" not in runs["main"]
    assert rep["comparison"]["best_run"] != "merge-1"
