"""ASHA races: the pure promotion rule, and the driver on a real store with simulated variants.

The driver test plays the workers' part: a variant "trains" to the step its spec says
(`race.stop_at`, 0 = the full budget), reports its loss there and stops (or completes),
exactly the way fork workers do; the supervisor part (`Races`) is the real one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.store import RunRow, Store
from onthefly_supervisor.variants import Races, asha_promotions


def test_asha_promotes_the_top_fraction_of_those_finished_so_far() -> None:
    # Two of four finished: floor(2/2) = 1 goes on at once, the better one.
    assert asha_promotions({"a": 0.5, "b": 0.3}, eta=2, already=[]) == ["b"]
    # All four: the top two; b already went on, so only d is new.
    got = asha_promotions({"a": 0.5, "b": 0.3, "c": 0.9, "d": 0.1}, eta=2, already=["b"])
    assert got == ["d"]
    # An early promotion is never taken back, and a late better one still goes on (ASHA).
    assert asha_promotions({"a": 0.5, "b": 0.3, "c": 0.2}, eta=2, already=["b"]) == ["c"]
    # One finished of eta=3: nobody yet. Non-finite and missing scores never go on.
    assert asha_promotions({"a": 0.1}, eta=3, already=[]) == []
    assert asha_promotions({"a": math.nan, "b": None, "c": 1.0, "d": math.inf}, 2, []) == ["c"]
    # Ties go to variant order.
    assert asha_promotions({"y": 1.0, "x": 1.0}, eta=2, already=[]) == ["y"]
    with pytest.raises(ValueError, match="eta"):
        asha_promotions({"a": 1.0}, eta=1, already=[])


class _Bus:
    def __init__(self) -> None:
        self.logs: list[str] = []

    def publish(self, kind: str, run_id: str, **payload: Any) -> None:
        if kind == "log":
            self.logs.append(str(payload.get("text", "")))


class _Sup:
    def __init__(self, d: str) -> None:
        self.dir = d
        self.store = Store(d)
        self.bus = _Bus()
        self.tick_hooks: list[Any] = []
        self.final_hooks: list[Any] = []

    def _set_run_status(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        self.store.set_run_status(run_id, status, error)  # raises on a transition the
        # real supervisor would refuse: the driver must never ask for one


class _Method:
    def __init__(self) -> None:
        self.queued: list[str] = []

    def queue_fork(self, run_id: str, resume: str = "") -> None:
        self.queued.append(run_id)


def _race(
    tmp_path: Path, n: int, eta: int, budget: int, sup: _Sup | None = None, name: str = ""
) -> tuple[_Sup, _Method, Races, Any]:
    sup, method = sup or _Sup(str(tmp_path)), _Method()
    races = Races(sup, method)  # type: ignore[arg-type]

    def make(m: float, name: str, extra: dict[str, Any]) -> str:
        rid = f"fork-{len(sup.store.runs()) + 1}"
        spec = {"lr_mul": m, **extra}
        os.makedirs(os.path.join(sup.dir, "forks", rid), exist_ok=True)
        with open(os.path.join(sup.dir, "forks", rid, "spec.json"), "w") as f:
            json.dump(spec, f)
        sup.store.add_run(
            RunRow(rid, name, "fork", RunStatus.RUNNING, ["main"], time.time(), spec=spec)
        )
        return rid

    race = races.start("main", [0.5, 1.0, 2.0, 4.0][:n], budget, eta, "slice", make, name=name)
    return sup, method, races, race


def _train(sup: _Sup, rid: str, loss: float) -> None:
    """What a fork worker does: train to its stop_at (0 = the budget), report, end."""
    run = sup.store.run(rid)
    assert run is not None
    spec = json.loads(Path(sup.dir, "forks", rid, "spec.json").read_text())
    stop = int(spec["race"]["stop_at"]) or int(spec["race"]["rungs"][-1])
    sup.store.add_eval(rid, "slice:self", stop, 0, loss, math.nan, 10, {})
    sup.store.add_checkpoint(
        rid, f"checkpoints/{rid}/step-{stop}.pt", "0" * 64, stop, 0, 0, "race", 1
    )
    sup.store.update_run(rid, step=stop)
    final = stop == int(spec["race"]["rungs"][-1])
    sup.store.set_run_status(rid, RunStatus.COMPLETED if final else RunStatus.STOPPED)


def test_asha_race_promotes_early_and_ends_with_one_winner(tmp_path: Path) -> None:
    sup, method, races, race = _race(tmp_path, n=4, eta=2, budget=24)
    a, b, c, d = race.runs
    assert race.mode == "asha" and race.rungs == [6, 12, 24]
    _train(sup, a, 0.5)
    races.tick()
    assert method.queued == []  # 1 of 4 finished: floor(1/2) = 0 promotions
    _train(sup, b, 0.3)
    races.tick()
    # 2 finished: b goes on at once, while c and d are still training.
    assert method.queued == [b] and race.at[b] == 1
    assert sup.store.run(b).status is RunStatus.PENDING  # type: ignore[union-attr]
    assert any(f"{b} promoted from rung 1" in x for x in sup.bus.logs)
    _train(sup, c, 0.9)
    _train(sup, d, 0.1)
    sup.store.set_run_status(b, RunStatus.RUNNING)  # b's worker picked it up meanwhile
    races.tick()
    assert method.queued == [b, d]  # 4 finished: the top two, d is new
    _train(sup, b, 0.25)
    races.tick()
    # Rung 2 (step 12): 1 of 2 finished, nobody goes to the full budget yet.
    assert method.queued == [b, d]
    _train(sup, d, 0.05)
    races.tick()
    assert method.queued == [b, d, d] and race.at[d] == 2
    _train(sup, d, 0.01)
    races.tick()
    assert race.status == "done" and race.winner == d
    runs = {r.run_id: r for r in sup.store.runs()}
    assert runs[d].status is RunStatus.COMPLETED
    for rid in (a, b, c):
        assert runs[rid].status is RunStatus.STOPPED
    # Each loser says at which rung it was cut and its rank there: a and c at rung 1; b was
    # promoted out of rung 1 and cut at rung 2 (not "never in the top 1/2").
    assert runs[a].error == (
        "lost the race at rung 1 (step 6): slice loss 0.5, ranked 3 of the 4 that finished "
        "rung 1, never in that rung's top 1/2"
    )
    assert "ranked 4 of the 4 that finished rung 1" in runs[c].error
    assert runs[b].error == (
        "lost the race at rung 2 (step 12), after promotion past rung 1: slice loss 0.25, "
        "ranked 2 of the 2 that finished rung 2, never in that rung's top 1/2"
    )
    assert [h["promoted"] for h in race.history] == [[b], [d], [d]]
    saved = sup.store.get_meta(f"race:{race.race_id}")
    assert saved["status"] == "done" and saved["mode"] == "asha"
    json.dumps(saved, allow_nan=False)


def test_asha_race_rescues_when_the_promoted_variant_fails(tmp_path: Path) -> None:
    sup, method, races, race = _race(tmp_path, n=2, eta=2, budget=8)
    a, b = race.runs
    assert race.rungs == [4, 8]
    _train(sup, a, 0.2)
    _train(sup, b, 0.4)
    races.tick()
    assert method.queued == [a]
    sup.store.set_run_status(a, RunStatus.FAILED, "out of memory")
    # a is dropped; nothing trains and nothing is promotable, so the best parked
    # variant, b, goes straight to the full budget.
    races.tick()
    assert method.queued == [a, b] and race.at[b] == 1
    failed = sup.store.run(a)
    assert failed is not None and failed.status is RunStatus.FAILED  # stays failed
    assert "dropped at rung 2" in failed.error and "out of memory" in failed.error
    _train(sup, b, 0.3)
    races.tick()
    assert race.status == "done" and race.winner == b


def test_a_stored_race_round_trips(tmp_path: Path) -> None:
    from onthefly_supervisor.variants import race_from_dict

    sup, _, races, race = _race(tmp_path, n=3, eta=2, budget=40)
    a, b, _c = race.runs
    _train(sup, a, 0.5)
    _train(sup, b, 0.25)
    races.tick()
    stored = sup.store.get_meta(f"race:{race.race_id}")
    again = race_from_dict(stored)
    assert again == race
    assert again.finished["0"] == {a: 0.5, b: 0.25} and again.promoted["0"] == [b]


def test_a_tie_goes_to_the_earlier_variant_whatever_order_they_finish_in(tmp_path: Path) -> None:
    sup, method, races, race = _race(tmp_path, n=3, eta=3, budget=18)
    a, b, c = race.runs
    for rid in (c, b, a):  # they finish last variant first, all with the same loss
        _train(sup, rid, 0.5)
        races.tick()
    assert method.queued == [a], "the first variant (e.g. automode's x1 control arm) goes on"


@pytest.mark.parametrize("mode", ["asha", "sync"])
def test_a_race_whose_variants_all_fail_says_the_root_cause(tmp_path: Path, mode: str) -> None:
    """It used to say only "no variant reached the full budget"."""
    sup, _, races, race = _race(tmp_path, n=2, eta=2, budget=8)
    race.mode = mode
    cause = "RuntimeError: Expected more than 1 value per channel when training (model.py:12)"
    for rid in race.runs:
        sup.store.set_run_status(rid, RunStatus.FAILED, cause)
    races.tick()
    assert race.status == "failed"
    first = race.runs[0]
    assert "all 2 variants failed" in race.error and f"; {first}: " in race.error, race.error
    assert cause in race.error
    assert sup.store.get_meta(f"race:{race.race_id}")["error"] == race.error


def test_a_race_holds_slots_only_for_variants_still_going_or_able_to_go_on(
    tmp_path: Path,
) -> None:
    sup, method, races, race = _race(tmp_path, n=4, eta=2, budget=24)
    a, b, c, d = race.runs

    def slots() -> int:
        return race.slots({r.run_id: r.status for r in sup.store.runs()})

    assert slots() == 4
    _train(sup, a, 0.5)  # parked at rung 1, but c and d may still rank below it
    assert slots() == 4
    _train(sup, b, 0.3)
    races.tick()  # b goes on
    assert slots() == 4
    _train(sup, c, 0.9)
    _train(sup, d, 0.1)
    races.tick()  # all four finished rung 1: d goes on too; a and c can no longer
    assert method.queued == [b, d]
    assert slots() == 2
    sup.store.set_run_status(b, RunStatus.RUNNING)
    _train(sup, b, 0.25)
    sup.store.set_run_status(d, RunStatus.RUNNING)
    _train(sup, d, 0.05)
    races.tick()  # d to the full budget; b is parked for good (no one else left at rung 2)
    assert slots() == 1
    _train(sup, d, 0.01)
    assert slots() == 0  # the winner reached the full budget
    races.tick()
    assert race.status == "done" and slots() == 0


def test_a_sync_race_frees_its_losers_slots_at_the_rung_verdict(tmp_path: Path) -> None:
    sup, method = _Sup(str(tmp_path)), _Method()
    races = Races(sup, method)  # type: ignore[arg-type]
    made: list[str] = []

    def make(m: float, name: str, extra: dict[str, Any]) -> str:
        rid = f"fork-{len(made) + 1}"
        spec = {"lr_mul": m, **extra}
        os.makedirs(os.path.join(sup.dir, "forks", rid), exist_ok=True)
        Path(sup.dir, "forks", rid, "spec.json").write_text(json.dumps(spec))
        sup.store.add_run(
            RunRow(rid, name, "fork", RunStatus.RUNNING, ["main"], time.time(), spec=spec)
        )
        made.append(rid)
        return rid

    race = races.start("main", [0.3, 1.0, 3.0], 150, 3, "slice", make, mode="sync")

    def slots() -> int:
        return race.slots({r.run_id: r.status for r in sup.store.runs()})

    for rid, loss in zip(race.runs, (0.4, 0.2, 0.9), strict=True):
        _train(sup, rid, loss)
    assert slots() == 3  # stopped at rung 1, waiting for its verdict
    races.tick()
    assert method.queued == [race.runs[1]] and slots() == 1  # the two losers hold nothing


def test_automode_counts_only_the_forks_still_going(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from onthefly_supervisor import planner as pl
    from onthefly_supervisor.autopilot import Autopilot, Execution

    sup = _Sup(str(tmp_path))
    hooks: dict[str, Any] = {"control_hooks": {}, "tick_hooks": [], "busy_hooks": []}
    ap = Autopilot(SimpleNamespace(store=sup.store, bus=sup.bus, final_hooks=[], **hooks))  # type: ignore[arg-type]
    cfg = pl.PlannerConfig(max_parallel_children=4, base_cooldown_steps=0)
    card = pl.PlanCard(
        "plan-0001",
        pl.Action.EXPLORE,
        pl.Reason.LOSS_PLATEAU,
        "all",
        training_recipe={"variants": [{"lr_mul": m} for m in (0.5, 1, 2, 4)]},
        budget_steps=24,
    )
    ap.state = pl.record_started(pl.record_proposed(ap.state, [card]), card.plan_id)
    assert ap._active_children() == 4  # started, its launch not returned: all it asked for
    _, method, races, race = _race(tmp_path, n=4, eta=2, budget=24, sup=sup, name=card.plan_id)
    a, b, c, d = race.runs
    assert ap._active_children() == 4  # its race exists: counted once
    ap.running[card.plan_id] = Execution(card, runs=list(race.runs), race=race.race_id)
    assert ap._active_children() == 4
    for rid, loss in ((a, 0.5), (b, 0.3), (c, 0.9), (d, 0.1)):
        _train(sup, rid, loss)
    races.tick()  # b and d go on; a and c stopped for good
    assert ap._active_children() == 2
    sup.store.add_run(  # a person's fork beside it holds a slot too
        RunRow("fork-9", "manual", "fork", RunStatus.RUNNING, ["main"], time.time())
    )
    assert ap._active_children() == 3
    tail = pl.Detection(pl.DetectionKind.HIGH_LOSS_TAIL, 30, 0.8, "tail", {"q": 0.85})
    ctx = {"active_children": ap._active_children()}
    fork = pl.propose([tail], ap.state, cfg, 30, ctx)
    assert [c.action for c in fork] == [pl.Action.FORK] and fork[0].children == 1
