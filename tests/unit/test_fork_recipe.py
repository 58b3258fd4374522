"""A fork's recipe on the user's own optimizer and scheduler: adapters with any optimizer
(AdamW's constructor rejects a key of its own defaults), per-group lr/wd with the fork's
multipliers, the lr schedule, and the early-stopping rule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker import checkpoint as ckpt
from onthefly_worker import env as wenv
from onthefly_worker import merge_math as mm
from onthefly_worker import recipe
from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.trainer import _Loop


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def _two_groups(net: nn.Sequential, cls: Any = torch.optim.AdamW) -> torch.optim.Optimizer:
    """Body and head in groups of their own, each with its own lr and weight decay."""
    return cls(
        [
            {"params": [*net[0].parameters(), *net[2].parameters()], "lr": 1e-3},
            {"params": net[4].parameters(), "lr": 5e-3, "weight_decay": 0.2},
        ],
        lr=1e-3,
        weight_decay=0.05,
    )


# -- constructor_kwargs / optimizer_like ------------------------------------------------------
def test_constructor_kwargs_drops_what_adamw_rejects() -> None:
    opt = torch.optim.AdamW(_net().parameters())
    kw = recipe.constructor_kwargs(torch.optim.AdamW, opt.defaults)
    assert "lr" in kw and "weight_decay" in kw
    rejected = set(opt.defaults) - set(kw)
    for k in rejected:  # what is left out is exactly what the constructor does not take
        with pytest.raises(TypeError):
            torch.optim.AdamW(_net().parameters(), **{k: opt.defaults[k]})
    torch.optim.AdamW(_net().parameters(), **kw)


def test_constructor_kwargs_follows_kwargs_to_the_base_class() -> None:
    class Mine(torch.optim.AdamW):
        def __init__(self, params: Any, flavour: str = "x", **kw: Any) -> None:
            self.flavour = flavour
            super().__init__(params, **kw)

    opt = Mine(_net().parameters(), flavour="y", lr=0.01)
    kw = recipe.constructor_kwargs(Mine, {**opt.defaults, "flavour": "y"})
    assert kw["flavour"] == "y" and kw["lr"] == 0.01
    assert "decoupled_weight_decay" not in kw
    recipe.optimizer_like(opt, [{"params": list(_net().parameters())}])


# -- train_adapters ------------------------------------------------------------------------
def test_adapters_join_the_group_of_the_layer_they_adapt_and_keep_its_settings() -> None:
    net = _net()
    opt = _two_groups(net)
    for g in opt.param_groups:  # the fork's multipliers, applied before the adapters
        g["lr"] *= 0.5
        g["weight_decay"] *= 3.0
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    mm.add_adapters(net, 4, skip_small=True)  # the 2-output head is too small for rank 4
    how = recipe.train_adapters(opt, net)
    assert "group of the layer it adapts" in how and "group 0" in how
    g0, g1 = opt.param_groups
    lora = {id(p) for n, p in net.named_parameters() if "lora_" in n}
    assert {id(p) for p in g0["params"]} == lora and g1["params"] == []
    assert g0["lr"] == pytest.approx(0.5e-3) and g0["weight_decay"] == pytest.approx(0.15)
    assert g1["lr"] == pytest.approx(2.5e-3) and g1["weight_decay"] == pytest.approx(0.6)
    # It trains, only the adapters move, and the scheduler (which holds this optimizer)
    # decays the adapters' lr.
    base = net[0].base.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
    assert torch.equal(net[0].base.weight, base)
    assert net[0].lora_B.abs().sum() > 0
    assert g0["lr"] == pytest.approx(0.5e-4)
    assert opt.state_dict()["param_groups"][0]["params"] == list(range(len(lora)))


def test_adapters_of_a_layer_the_optimizer_does_not_train_use_group_0() -> None:
    net = _net()
    opt = torch.optim.AdamW(
        [{"params": net[2].parameters(), "lr": 0.1}, {"params": net[4].parameters(), "lr": 0.2}]
    )
    mm.add_adapters(net, 4, skip_small=True)
    how = recipe.train_adapters(opt, net)
    assert "does not train 0, so their adapters use group 0's settings" in how
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[0] == {id(net[0].lora_A), id(net[0].lora_B), id(net[2].lora_A), id(net[2].lora_B)}
    assert ids[1] == set()


@pytest.mark.parametrize(
    "cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad]
)
def test_adapters_train_with_state_the_constructor_creates(cls: Any) -> None:
    net = _net()
    opt = _two_groups(net, cls)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()  # parent state for the full weights, to be dropped
    mm.add_adapters(net, 4, skip_small=True)
    recipe.train_adapters(opt, net)
    assert all(any(p is q for g in opt.param_groups for q in g["params"]) for p in opt.state)
    opt.zero_grad()
    net(torch.randn(4, 8)).sum().backward()
    opt.step()  # Adagrad reads the sums its constructor creates
    opt.load_state_dict(opt.state_dict())


def test_scale_scheduler_lrs_keeps_a_multiplier_through_a_lambda_schedule() -> None:
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    opt.param_groups[0]["lr"] *= 0.5
    recipe.scale_scheduler_lrs(sched, 0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 2)
    chained = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
            torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5),
        ],
        milestones=[2],
    )
    before = [list(s.base_lrs) for s in chained._schedulers]
    recipe.scale_scheduler_lrs(chained, 0.1)
    assert [list(s.base_lrs) for s in chained._schedulers] == [
        [b * 0.1 for b in bl] for bl in before
    ]


# -- the Trainer's fork start: adapters vs full weights ------------------------------------
def _fork_loop(
    tmp_path: Path, adapters: int, lr_mul: float = 0.5, wd_mul: float = 4.0, restore: bool = True
) -> tuple[_Loop, list[str]]:
    """A Trainer fork loop restored from a parent checkpoint, as a fork worker does it,
    with the script's own AdamW (two groups) and StepLR."""
    parent = _net()
    popt = _two_groups(parent)
    psched = torch.optim.lr_scheduler.StepLR(popt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    for _ in range(7):  # the parent trains a little: moments, a decayed lr
        popt.zero_grad()
        nn.functional.cross_entropy(parent(x), y).backward()
        popt.step()
        psched.step()
    session = tmp_path / f"session-{adapters}"
    rel = "checkpoints/main/step-00000007.pt"
    state = {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "run_id": "main",
        "role": "train",
        "adapters": None,
        "model": parent.state_dict(),
        "optimizer": popt.state_dict(),
        "scheduler": psched.state_dict(),
        "scaler": None,
        "rng": ckpt.capture_rng(),
        "cursor": {"epoch": 0, "batch": 7, "seed": 0, "skip": []},
        "grad_clip": 0.0,
        "counters": {"step": 7, "sample_steps": 7 * 64},
        "config": {},
        "spec": {},
    }
    ckpt.write_atomic(state, str(session / rel))
    (session / "forks").mkdir()
    np.save(session / "forks" / "idx.npy", np.arange(32))
    spec = session / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "checkpoint": rel,
                "indices_file": "forks/idx.npy",
                "budget_steps": 20,
                "lr_mul": lr_mul,
                "wd_mul": wd_mul,
                "adapters_rank": adapters,
            }
        )
    )
    env = wenv.WorkerEnv(
        addr="127.0.0.1:1",
        token="t",
        worker_id="fork-1-0",
        role="fork",
        run_id="fork-1",
        session_dir=str(session),
        error_file="",
        resume="",
        spec=str(spec),
        attempt=0,
    )
    model = _net()  # the fork re-runs the script: fresh objects
    opt = _two_groups(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    loop = _Loop(
        TrainerConfig(project="t", max_epochs=1), env, model, opt, nn.CrossEntropyLoss(), loader,
        None, None, sched,
    )  # fmt: skip
    logs: list[str] = []
    loop.log = lambda text, level="info": logs.append(text)  # type: ignore[method-assign]
    if restore:
        loop._restore()
    return loop, logs


def _lrs_and_wds(loop: _Loop, steps: int) -> list[list[tuple[float, float]]]:
    """Train `steps` steps as the Trainer does (step, then the step-interval scheduler)."""
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    seen = []
    for _ in range(steps):
        loop.opt.zero_grad()
        nn.functional.cross_entropy(loop.model(x), y).backward()
        loop.opt.step()
        loop.sched.step()
        seen.append([(g["lr"], g["weight_decay"]) for g in loop.opt.param_groups])
    return seen


def test_adapter_fork_with_adamw_follows_the_schedule_like_a_full_weight_fork(
    tmp_path: Path,
) -> None:
    full, _ = _fork_loop(tmp_path, adapters=0)
    lora, logs = _fork_loop(tmp_path, adapters=4)
    assert lora.adapters and any("rank-4 adapters on 2 linear layer(s)" in t for t in logs)
    assert any("optimizer group of the layer it adapts (group 0)" in t for t in logs), logs
    assert lora.opt is lora.sched.optimizer  # the scheduler still drives the fork's optimizer
    a, b = _lrs_and_wds(full, 7), _lrs_and_wds(lora, 7)
    assert a == b
    # The parent's per-group lr at its step 7 (1e-3 / 5e-3, halved twice), x0.5, then
    # halved by the fork's own StepLR every 3 steps; wd x4 per group.
    assert b[0] == [(pytest.approx(1e-3 / 8), 0.2), (pytest.approx(5e-3 / 8), 0.8)]
    assert b[3][1][0] == pytest.approx(5e-3 / 16) and b[6][1][0] == pytest.approx(5e-3 / 32)
    # Checkpoint and resume (a promoted race variant): the same groups, state and lr.
    state = lora.state_dict()
    assert set(state["adapters"]) == {"0.weight", "2.weight"}
    again, _ = _fork_loop(tmp_path / "again", adapters=4, restore=False)
    again.opt.param_groups[0]["lr"] = 123.0  # overwritten by the checkpoint's
    again._restore_adapters(state)
    assert [g["lr"] for g in again.opt.param_groups] == [g["lr"] for g in lora.opt.param_groups]
    assert again.opt.state_dict()["state"].keys() == lora.opt.state_dict()["state"].keys()


def test_a_fork_from_an_ended_schedule_starts_from_the_scripts_lr() -> None:
    """A parent whose cosine schedule reached lr 0: its fork would train nothing (every
    step a no-op, races decided on ties). It starts from the script's own lr instead, times
    --lr-mul, with a fresh schedule, and says so; a group still training keeps its lr."""
    net = _net()
    opt = _two_groups(net)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = opt.state_dict()
    state["param_groups"][1]["lr"] = 1e-4  # a group whose decay did not end
    fresh = _two_groups(_net())
    fsched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh, T_max=5)
    script = recipe.start_lrs(fresh)
    fresh.load_state_dict(state)
    said = recipe.apply_fork_recipe(fresh, [fsched], {"lr_mul": 2.0, "wd_mul": 0.0}, script, 50)
    assert [g["lr"] for g in fresh.param_groups] == [pytest.approx(2e-3), pytest.approx(2e-4)]
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.0, 0.0]  # wd_mul 0: none
    assert fsched.base_lrs == [pytest.approx(2e-3), pytest.approx(1e-2)]
    assert "step 50 is ~0 (its schedule has ended)" in said and "group 0: 0 -> 0.001" in said
    assert "x2 (--lr-mul)" in said and "group 1" not in said
    fresh.step()
    fsched.step()
    assert 0 < fresh.param_groups[0]["lr"] < 2e-3  # the fresh cosine decays from there
    # A parent mid-schedule: its lr times the multiplier, nothing said.
    mid = _two_groups(_net())
    assert recipe.apply_fork_recipe(mid, [], {"lr_mul": 0.5}, recipe.start_lrs(mid), 3) == ""
    assert [g["lr"] for g in mid.param_groups] == [5e-4, 2.5e-3]
    assert [g["weight_decay"] for g in mid.param_groups] == [0.05, 0.2]  # wd_mul unset: x1


# -- early stopping ------------------------------------------------------------------------
def test_early_stop_from_spec_defaults_and_errors() -> None:
    assert recipe.EarlyStop.from_spec({"budget_steps": 300}) is None
    assert recipe.EarlyStop.from_spec({"early_stop": {"patience": 0}}) is None
    es = recipe.EarlyStop.from_spec({"budget_steps": 300, "early_stop": {"patience": 3}})
    assert es is not None and (es.every, es.metric, es.min_delta) == (30, "slice", 0.0)
    assert es.split == "slice:self"
    es = recipe.EarlyStop.from_spec({"budget_steps": 5, "early_stop": {"patience": 2}})
    assert es is not None and es.every == 1
    with pytest.raises(OnTheFlyError, match="one of slice, val"):
        recipe.EarlyStop.from_spec({"early_stop": {"patience": 2, "metric": "acc"}})


def test_early_stop_counts_evaluations_without_an_improvement_above_min_delta() -> None:
    es = recipe.EarlyStop(patience=2, min_delta=0.01, every=10)
    assert not es.due(0) and es.due(10) and not es.due(15)
    es.start(0, 1.0)
    assert not es.update(10, 0.95)  # better by 0.05: the new best
    assert not es.update(20, 0.945)  # better, but not by more than 0.01
    assert not es.update(30, 0.90)  # resets the count
    assert not es.update(40, math.nan)  # not finite: no improvement
    assert es.update(50, 0.95)
    s = es.summary()
    assert (s["step"], s["best"], s["best_step"], s["evals"], s["last"]) == (50, 0.90, 30, 5, 0.95)
    assert "stopped early at step 50" in es.describe() and "best 0.9 at step 30" in es.describe()


# -- automode: the plan card's early_stop reaches the fork request -------------------------
def _autopilot(tmp_path: Path, publish: Any, store: Any, **more: Any) -> Any:
    """An Autopilot over a stand-in supervisor: its bus's publish, its store, `more`."""
    from types import SimpleNamespace

    from onthefly_supervisor.autopilot import Autopilot

    sup = SimpleNamespace(
        automode=False,
        bus=SimpleNamespace(publish=publish),
        store=store,
        dir=str(tmp_path),
        control_hooks={},
        tick_hooks=[],
        busy_hooks=[],
        final_hooks=[],
        **more,
    )
    return Autopilot(sup)  # type: ignore[arg-type]


def test_automode_forks_and_explores_use_the_cards_early_stop(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.autopilot import Execution
    from onthefly_supervisor.planner.detectors import Detection, DetectionKind
    from onthefly_supervisor.planner.policy import PlannerState, propose

    logs: list[str] = []
    evals: list[dict[str, Any]] = []
    ap = _autopilot(
        tmp_path,
        publish=lambda kind, run, **kw: logs.append(str(kw.get("text"))),
        store=SimpleNamespace(put_plan=lambda *a: None, run=lambda r: None, evals=lambda r: evals),
        method=SimpleNamespace(latest_losses=lambda r: (np.array([1.0]),)),
    )
    sent: list[Any] = []

    def call(method: str, req: Any) -> Any:
        sent.append(req)
        return SimpleNamespace(payload_json='{"runs": ["fork-1"], "race": "race-1"}', run_id="")

    ap._call = call  # type: ignore[method-assign]
    (tmp_path / "forks" / "fork-1").mkdir(parents=True)
    np.save(tmp_path / "forks" / "fork-1" / "indices.npy", np.arange(1))

    def card(kind: DetectionKind) -> Any:
        d = Detection(kind, 1000, 0.8, kind.value, {"q": 0.85})
        return propose([d], PlannerState(), ap.config, 1000, {"active_children": 0})[0]

    fork = card(DetectionKind.HIGH_LOSS_TAIL)
    assert fork.training_recipe["early_stop"]["patience_evals"] == 3
    ap._launch(fork, Execution(fork))
    assert (sent[-1].early_stop_patience, sent[-1].early_stop_metric) == (3, "slice")
    assert sent[-1].early_stop_every == 0  # the supervisor's default: budget / 10

    explore = card(DetectionKind.PLATEAU)
    ap._launch(explore, Execution(explore))  # the run reports no val loss: no early stop
    assert sent[-1].early_stop_patience == 0
    assert any("no early stopping (main reports no validation loss)" in t for t in logs), logs
    evals.append({"split": "val", "step": 10, "loss": 1.0})
    ap._launch(explore, Execution(explore))
    assert (sent[-1].early_stop_patience, sent[-1].early_stop_metric) == (3, "val")

    ap._set(fork)
    reply = ap.edit(pb.EditPlanRequest(plan_id=fork.plan_id, values={"early_stop_patience": "0"}))
    assert reply.ok
    edited = ap.cards[fork.plan_id]
    ap._launch(edited, Execution(edited))
    assert sent[-1].early_stop_patience == 0
    with pytest.raises(ValueError, match="whole number"):
        ap.edit(pb.EditPlanRequest(plan_id=fork.plan_id, values={"early_stop_patience": "1.5"}))


def test_fork_request_early_stop_options_are_checked_and_resolved() -> None:
    from types import SimpleNamespace

    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.method import MethodOps

    evals: list[dict[str, Any]] = []
    ops = SimpleNamespace(sup=SimpleNamespace(store=SimpleNamespace(evals=lambda r: evals)))
    parent = SimpleNamespace(run_id="main")

    def opts(budget: int = 300, **kw: Any) -> dict[str, Any]:
        req = pb.ForkRequest(run="main", select="all", **kw)
        return MethodOps._early_stop_options(ops, req, parent, budget)  # type: ignore[arg-type]

    assert opts() == {}
    assert opts(early_stop_patience=3) == {
        "early_stop": {"patience": 3, "metric": "slice", "min_delta": 0.0, "every": 30}
    }
    got = opts(early_stop_patience=2, early_stop_every=7, early_stop_min_delta=0.5)
    assert got["early_stop"]["every"] == 7 and got["early_stop"]["min_delta"] == 0.5
    for kw, msg in (
        ({"early_stop_every": 5}, "need --early-stop-patience"),
        ({"early_stop_patience": -1}, "must be in 0..1000000"),
        ({"early_stop_patience": 2, "early_stop_metric": "acc"}, "one of slice, val"),
        ({"early_stop_patience": 2, "early_stop_min_delta": -1}, "finite number >= 0"),
        ({"early_stop_patience": 2, "early_stop_every": -3}, "must be >= 1"),
        ({"early_stop_patience": 2, "early_stop_metric": "val"}, "reports no validation loss"),
        ({"early_stop_patience": 10, "early_stop_every": 30}, "cannot stop a 300-step fork"),
    ):
        with pytest.raises(ValueError, match=msg):
            opts(**kw)
    evals.append({"split": "val"})
    assert opts(early_stop_patience=2, early_stop_metric="val")["early_stop"]["metric"] == "val"


def test_runs_view_says_where_a_fork_stopped_early() -> None:
    from onthefly_supervisor.cli import _early_stop_note

    assert _early_stop_note({}) == ""
    spec = {
        "early_stopped": {
            "step": 60, "metric": "slice", "best": 0.4123, "best_step": 30, "patience": 3,
            "min_delta": 0.01,
        }
    }  # fmt: skip
    assert _early_stop_note(spec) == (
        " · stopped early at step 60 (slice loss best 0.4123 at step 30; no gain > 0.01 in 3 evals)"
    )


def test_an_explore_card_is_not_approved_once_its_run_has_finished(tmp_path: Path) -> None:
    """Its race exists to hand the winning lr to the run: after the run ends, approving it
    would only spend compute (a card proposed at a plateau can wait that long)."""
    from types import SimpleNamespace

    from onthefly_proto import onthefly_pb2 as pb
    from onthefly_supervisor.lifecycle import RunStatus
    from onthefly_supervisor.planner.detectors import Detection, DetectionKind
    from onthefly_supervisor.planner.policy import PlannerState, propose
    from onthefly_supervisor.supervisor import ControlError

    status = {"main": RunStatus.RUNNING}
    ap = _autopilot(
        tmp_path,
        publish=lambda *a, **kw: None,
        store=SimpleNamespace(
            put_plan=lambda *a: None,
            run=lambda r: SimpleNamespace(status=status[r]) if r in status else None,
            evals=lambda r: [],
        ),
    )
    d = Detection(DetectionKind.PLATEAU, 1000, 0.8, "plateau", {})
    explore = propose([d], PlannerState(), ap.config, 1000, {"active_children": 0})[0]
    ap._set(explore)
    status["main"] = RunStatus.COMPLETED
    with pytest.raises(ControlError, match="but main has completed: reject it"):
        ap.approve(pb.PlanRequest(plan_id=explore.plan_id))
    assert ap.cards[explore.plan_id].status.value == "proposed"
    # A stabilize card repairs the run's worker in place: refused too, not "approved" and
    # then failed with "worker main-0 ended before answering".
    spike = Detection(
        DetectionKind.SPIKE, 1000, 0.9, "gradient-norm spike", {}, subject="grad_norm"
    )
    stabilize = propose([spike], PlannerState(), ap.config, 1000, {"active_children": 0})[0]
    assert stabilize.action.value == "stabilize"
    ap._set(stabilize)
    with pytest.raises(ControlError, match="repairs main in place, but main has completed"):
        ap.approve(pb.PlanRequest(plan_id=stabilize.plan_id))
    assert ap.cards[stabilize.plan_id].status.value == "proposed"
