"""Automode: run the pure planner on the session's metric streams and execute its cards.

Every couple of seconds the detectors look at the generalist's step metrics and
per-sample losses; `policy.plan` turns detections into plan cards under its safeguards
(cooldowns, caps, budget). Cards are persisted and streamed as `plan` events. With
automode on they execute at once; with it off they wait for approve / edit / reject.
Execution goes through ControlService (a loopback client with the session token), the
same calls the CLI and the dashboard make — the planner never touches processes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import planner as pl
from onthefly_supervisor.client import Connection, ControlClient
from onthefly_supervisor.lifecycle import RunStatus

if TYPE_CHECKING:
    from onthefly_supervisor.supervisor import Supervisor

EDITABLE = {"selection", "budget_steps", "lr_mul", "wd_mul", "adapters_rank", "method", "grad_clip"}


@dataclass
class Execution:
    """What a started card launched, so its outcome can be judged when it ends."""

    card: pl.PlanCard
    runs: list[str] = field(default_factory=list)
    before: float | None = None
    started_step: int = 0
    adopt: str = ""


class Autopilot:
    def __init__(
        self, sup: Supervisor, config: pl.PlannerConfig | None = None, interval_s: float = 1.0
    ) -> None:
        self.sup = sup
        # Defaults sized for short CPU runs (minutes, hundreds of steps); PlannerConfig's own
        # defaults are for long jobs.
        self.config = config or pl.PlannerConfig(
            base_cooldown_steps=100,
            stabilize_watch_steps=50,
            fork_budget_steps=200,
            fork_lr_multipliers=(1.0,),
            explore_budget_steps=150,
            # The generalist itself is the "no change" arm of an exploration.
            explore_lr_multipliers=(0.3, 3.0),
            max_parallel_children=3,
            gate_steps=1000,
            merge_every_steps=10**9,
            max_total_budget_steps=5000,
        )
        self.state = pl.PlannerState()
        self.cards: dict[str, pl.PlanCard] = {}
        self.running: dict[str, Execution] = {}
        self.interval_s = interval_s
        self._last = 0.0
        self._client: ControlClient | None = None
        self._lock = threading.RLock()
        self.blocked: list[dict[str, Any]] = []
        sup.control_hooks.update(
            {
                "ListPlans": self.list_plans,
                "ApprovePlan": self.approve,
                "RejectPlan": self.reject,
                "EditPlan": self.edit,
                "SetAutomode": self.set_automode,
            }
        )
        sup.tick_hooks.append(self.tick)
        sup.busy_hooks.append(lambda: bool(self.running))
        sup.final_hooks.append(self.finalize)
        self.baseline_run = ""
        self.baseline_pending = False
        self.report_dir = ""

    # -- ControlService client (the planner acts only through it) -----------------------------
    @property
    def client(self) -> ControlClient:
        if self._client is None:
            sup = self.sup
            self._client = ControlClient(
                Connection(f"127.0.0.1:{sup.port}", sup.token, sup.session_id, sup.dir, 0),
                timeout=120,
            )
        return self._client

    def _call(self, method: str, req: Any) -> Any:
        return self.client.call(method, req)

    # -- RPC hooks -------------------------------------------------------------------------
    def list_plans(self, req: pb.ListPlansRequest) -> pb.PlanList:
        with self._lock:
            cards = list(self.cards.values())
        if req.status:
            cards = [c for c in cards if c.status.value == req.status]
        return pb.PlanList(plans=[card_to_proto(c) for c in cards])

    def _card(self, plan_id: str) -> pl.PlanCard:
        from onthefly_supervisor.supervisor import ControlError

        card = self.cards.get(plan_id)
        if card is None:
            raise ControlError(
                grpc.StatusCode.NOT_FOUND, f"no plan {plan_id!r} (see `onthefly plans`)"
            )
        return card

    def approve(self, req: pb.PlanRequest) -> pb.ActionReply:
        from onthefly_supervisor.supervisor import ControlError

        with self._lock:
            card = self._card(req.plan_id)
            if card.status is not pl.PlanStatus.PROPOSED:
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} is {card.status.value}, not proposed",
                )
            self._set(card.with_status(pl.PlanStatus.APPROVED))
        threading.Thread(target=self._execute, args=(card.plan_id,), daemon=True).start()
        return pb.ActionReply(
            ok=True,
            message=f"plan {card.plan_id} approved: {card.action.value} ({card.reason.value})",
        )

    def reject(self, req: pb.PlanRequest) -> pb.ActionReply:
        from onthefly_supervisor.supervisor import ControlError

        with self._lock:
            card = self._card(req.plan_id)
            if card.status not in (pl.PlanStatus.PROPOSED, pl.PlanStatus.APPROVED):
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} is {card.status.value}; only proposed or approved plans can be rejected",
                )
            card = card.with_status(pl.PlanStatus.REJECTED)
            self._set(card)
            self.state = pl.apply_outcome(self.state, card, {"status": "rejected"}, self.config)
        return pb.ActionReply(ok=True, message=f"plan {card.plan_id} rejected")

    def edit(self, req: pb.EditPlanRequest) -> pb.ActionReply:
        from onthefly_supervisor.supervisor import ControlError

        with self._lock:
            card = self._card(req.plan_id)
            if card.status is not pl.PlanStatus.PROPOSED:
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} is {card.status.value}; only proposed plans can be edited",
                )
            bad = sorted(set(req.values) - EDITABLE)
            if bad:
                raise ValueError(
                    f"cannot edit {', '.join(bad)}; editable: {', '.join(sorted(EDITABLE))}"
                )
            recipe = dict(card.training_recipe)
            merge = dict(card.merge_recipe)
            kw: dict[str, Any] = {}
            for k, v in req.values.items():
                if k == "selection":
                    kw["selection"] = pl.validate_selection(v)
                elif k == "budget_steps":
                    n = int(v)
                    if n < 1:
                        raise ValueError(f"budget_steps={v}: must be >= 1")
                    kw["budget_steps"] = n
                elif k == "method":
                    if v not in pl.MERGE_METHODS:
                        raise ValueError(f"method={v}: one of {', '.join(pl.MERGE_METHODS)}")
                    merge["method"] = v
                else:
                    x = float(v)
                    if not (math.isfinite(x) and x >= 0):
                        raise ValueError(f"{k}={v}: must be a finite number >= 0")
                    recipe[k] = int(x) if k == "adapters_rank" else x
            card = replace(card, training_recipe=recipe, merge_recipe=merge, **kw)
            self._set(card)
        return pb.ActionReply(
            ok=True,
            message=f"plan {card.plan_id} edited: {', '.join(f'{k}={v}' for k, v in req.values.items())}",
        )

    def set_automode(self, req: pb.AutomodeRequest) -> pb.ActionReply:
        self.sup.automode = bool(req.enabled)
        self.sup.bus.publish("session", "", state="automode", automode=self.sup.automode)
        return pb.ActionReply(ok=True, message=f"automode {'on' if req.enabled else 'off'}")

    # -- persistence -------------------------------------------------------------------------
    def _set(self, card: pl.PlanCard) -> None:
        self.cards[card.plan_id] = card
        d = card.to_dict()
        self.sup.store.put_plan(card.plan_id, card.status.value, d)
        self.sup.bus.publish("plan", card.target_run, **d)

    # -- the loop ----------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        # Cards wait for a person when automode is off: a slower look costs the run less CPU.
        if now - self._last < (self.interval_s if self.sup.automode else 3 * self.interval_s):
            return
        self._last = now
        self._judge_running()
        main = self.sup.store.run("main")
        if main is None or main.status not in (RunStatus.RUNNING, RunStatus.COMPLETED):
            return
        finished = main.status is RunStatus.COMPLETED
        if finished and (not self.sup.automode or self.report_dir):
            return
        # After the generalist finished, only what a finished model can still use is
        # planned: specialists on its hard samples, then a gate / merge over them.
        detections = self.detect("main", sample_only=finished)
        ctx = {
            "checkpoint_steps": [c["step"] for c in self.sup.store.checkpoints("main")],
            "grad_clip": float(main.config.get("grad_clip", 0.0) or 0.0),
            "active_children": sum(len(e.runs) for e in self.running.values()),
        }
        with self._lock:
            result = pl.plan(detections, self.state, self.config, main.step, ctx)
            self.blocked = [b.to_dict() for b in result.blocked]
            if not result.cards:
                return
            self.state = pl.record_proposed(self.state, result.cards)
            for c in result.cards:
                self._set(c)
        for c in result.cards:
            if self.sup.automode:
                with self._lock:
                    self._set(c.with_status(pl.PlanStatus.APPROVED))
                threading.Thread(target=self._execute, args=(c.plan_id,), daemon=True).start()

    def detect(self, run_id: str, sample_only: bool = False) -> list[pl.Detection]:
        st = self.sup.store
        out: list[pl.Detection] = []
        if sample_only:
            return self._sample_detections(run_id, None)
        # One query, newest 1000 steps: loss and grad norm aligned step by step.
        rows = st.query(
            "SELECT step, loss, grad_norm FROM metrics WHERE run_id = ? ORDER BY step DESC LIMIT 1000",
            (run_id,),
        )[::-1]
        if not rows:
            return out
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        loss = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        gn = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
        since = int(steps[-1]) - 200
        for d in (
            # A NaN grad norm means "not measured" (e.g. a skipped step); Inf means bad gradients.
            pl.detect_nonfinite(steps, loss, np.where(np.isnan(gn), 0.0, gn)),
            pl.detect_spike(steps, loss, since_step=since, metric="loss"),
            pl.detect_spike(
                steps, np.where(np.isfinite(gn), gn, np.nan), since_step=since, metric="grad_norm"
            ),
            pl.detect_plateau(steps, loss, window=min(200, max(50, steps.size // 2))),
            pl.detect_drift(steps, loss),
        ):
            if d is not None:
                out.append(d)
        return out + self._sample_detections(run_id, int(steps[-1]))

    def _sample_detections(self, run_id: str, step: int | None) -> list[pl.Detection]:
        arrays = self.sup.arrays
        run = self.sup.store.run(run_id)
        if run is None:
            return []
        epochs = arrays.epochs(run_id)
        done = [e for e in epochs if e < run.epoch or run.status is RunStatus.COMPLETED]
        if len(done) < 2:
            return []
        per = [a for a in (arrays.get(run_id, e) for e in done[-3:]) if a is not None]
        d = pl.detect_high_loss_tail(per, step=run.step if step is None else step)
        return [d] if d is not None else []

    # -- execution ---------------------------------------------------------------------------
    def _execute(self, plan_id: str) -> None:
        with self._lock:
            card = self.cards[plan_id].with_status(pl.PlanStatus.RUNNING)
            self.state = pl.record_started(self.state, plan_id)
            self._set(card)
            ex = Execution(
                card, started_step=(self.sup.store.run(card.target_run) or _Empty()).step
            )
        try:
            self._launch(card, ex)
        except grpc.RpcError as e:
            self._finish(card, ex, "failed", f"{e.details()}")
            return
        except Exception as e:
            self._finish(card, ex, "failed", f"{type(e).__name__}: {e}")
            return
        with self._lock:
            # A stabilization has no child runs: it is judged over its watch window.
            self.running[plan_id] = ex

    def _launch(self, card: pl.PlanCard, ex: Execution) -> None:
        r = card.training_recipe
        target = card.target_run
        run = self.sup.store.run(target)
        ex.before = (
            run.val_loss
            if run is not None and run.val_loss is not None
            else (run.last_loss if run else None)
        )
        if card.action is pl.Action.STABILIZE:
            values = {"lr_mul": float(r.get("lr_mul", 0.5))}
            if r.get("grad_clip"):
                values["grad_clip"] = float(r["grad_clip"])
            self._call("SetHyperParams", pb.HyperParamsRequest(run=target, values=values))
            ex.before = run.last_loss if run else None
        elif card.action is pl.Action.FORK:
            v = (r.get("variants") or [{}])[0]
            reply = self._call(
                "Fork",
                pb.ForkRequest(
                    run=target,
                    select=card.selection,
                    budget_steps=card.budget_steps,
                    lr_mul=float(r.get("lr_mul", v.get("lr_mul", 1.0))),
                    wd_mul=float(r.get("wd_mul", 1.0)),
                    adapters_rank=int(r.get("adapters_rank", 0) or 0),
                    name=f"{card.plan_id}-fork",
                ),
            )
            ex.runs = [reply.run_id]
            losses = self.sup.method.latest_losses(target)[0]
            sel_idx = json.loads(reply.payload_json or "{}")
            idx = (
                np.load(f"{self.sup.dir}/forks/{reply.run_id}/indices.npy")
                if sel_idx
                else np.arange(losses.size)
            )
            seen = losses[idx][np.isfinite(losses[idx])]
            ex.before = float(seen.mean()) if seen.size else None
        elif card.action is pl.Action.EXPLORE:
            variants = r.get("variants") or [{"lr_mul": 1.0}]
            rungs = (r.get("race") or {}).get("rung_steps") or [card.budget_steps]
            first = int(rungs[0]) if rungs else card.budget_steps
            for i, v in enumerate(variants[: max(1, self.config.max_parallel_children)]):
                reply = self._call(
                    "Fork",
                    pb.ForkRequest(
                        run=target,
                        select="all",
                        budget_steps=max(1, first),
                        lr_mul=float(v.get("lr_mul", 1.0)),
                        name=f"{card.plan_id}-v{i}",
                    ),
                )
                ex.runs.append(reply.run_id)
            ex.adopt = "lr_mul"
        elif card.action is pl.Action.GATE:
            experts = list(card.gate_recipe.get("experts") or [target])
            reply = self._call(
                "TrainGate",
                pb.GateRequest(
                    runs=experts,
                    name=f"{card.plan_id}-moe",
                    options_json=json.dumps(
                        {
                            "steps": card.budget_steps or 200,
                            "temperature": card.gate_recipe.get("temperature", 1.0),
                            "balance_weight": card.gate_recipe.get("balance_weight", 0.01),
                        }
                    ),
                ),
            )
            ex.runs = [reply.run_id]
        elif card.action is pl.Action.MERGE:
            m = card.merge_recipe
            reply = self._call(
                "Merge",
                pb.MergeRequest(
                    method=str(m.get("method", "swa")),
                    runs=list(m.get("runs") or []),
                    name=f"{card.plan_id}-merge",
                ),
            )
            ex.runs = [reply.run_id]
        else:
            raise ValueError(f"unknown action {card.action}")

    def _judge_running(self) -> None:
        st = self.sup.store
        for ex in list(self.running.values()):
            card = ex.card
            if card.action is pl.Action.STABILIZE:
                run = st.run(card.target_run)
                if run is None:
                    continue
                if run.status.terminal or run.step >= ex.started_step + card.budget_steps:
                    ok = run.status is not RunStatus.FAILED
                    self._finish(card, ex, "done" if ok else "failed", "", improved=ok)
                continue
            runs = [st.run(r) for r in ex.runs]
            if any(r is None or not r.status.terminal for r in runs):
                continue
            failed = [r for r in runs if r is not None and r.status is not RunStatus.COMPLETED]
            if failed and len(failed) == len(runs):
                self._finish(card, ex, "failed", failed[0].error)
                continue
            good = [r for r in runs if r is not None and r.status is RunStatus.COMPLETED]
            after: float | None
            if card.action is pl.Action.FORK:
                evs = [e for e in st.evals(good[0].run_id) if e["split"] == "slice:self"]
                after = evs[-1]["loss"] if evs else None
            else:
                vals: list[tuple[float, Any]] = []
                for r in good:
                    score = r.val_loss if r.val_loss is not None else r.test_loss
                    if score is not None:
                        vals.append((float(score), r))
                after = min(v[0] for v in vals) if vals else None
                if ex.adopt and vals:
                    best = min(vals, key=lambda v: v[0])[1]
                    mul = float(best.spec.get("lr_mul", 1.0))
                    if (
                        mul != 1.0
                        and self.sup.live_worker(card.target_run) is not None
                        and ex.before is not None
                        and after is not None
                        and after < ex.before
                    ):
                        try:
                            self._call(
                                "SetHyperParams",
                                pb.HyperParamsRequest(run=card.target_run, values={"lr_mul": mul}),
                            )
                        except grpc.RpcError:
                            pass
            improved = ex.before is not None and after is not None and after < ex.before
            used = sum(r.step for r in good)
            self._finish(card, ex, "done", "", improved=improved, after=after, used=used)

    def _finish(
        self,
        card: pl.PlanCard,
        ex: Execution,
        status: str,
        error: str,
        improved: bool = False,
        after: float | None = None,
        used: int | None = None,
    ) -> None:
        with self._lock:
            self.running.pop(card.plan_id, None)
            outcome: dict[str, Any] = {
                "status": status,
                "improved": improved,
                "runs": ex.runs,
                "step": (self.sup.store.run(card.target_run) or _Empty()).step,
            }
            if used is not None:
                outcome["budget_used_steps"] = used
            try:
                self.state = pl.apply_outcome(self.state, card, outcome, self.config)
            except ValueError:
                pass
            diag = dict(card.diagnostics)
            diag["outcome"] = {
                "status": status,
                "improved": improved,
                "before": ex.before,
                "after": after,
                "runs": ex.runs,
                "error": error,
            }
            new = replace(card, diagnostics=diag).with_status(
                pl.PlanStatus.DONE if status == "done" else pl.PlanStatus.FAILED
            )
            self._set(new)

    # -- end of an automode session: matched-compute baseline, then the report ---------------
    def finalize(self) -> bool:
        """Called when the session would end; True = more work was started, call again later."""
        st = self.sup.store
        if not self.sup.automode:
            return False
        self._last = 0.0
        self.tick()  # one more planning round on the finished generalist
        waiting = (pl.PlanStatus.PROPOSED, pl.PlanStatus.APPROVED, pl.PlanStatus.RUNNING)
        if self.running or any(c.status in waiting for c in self.cards.values()):
            return True
        if self.baseline_pending:
            run = st.run(self.baseline_run)
            if run is None or not run.status.terminal:
                return True
            self.baseline_pending = False
        main = st.run("main")
        # Everything beyond the generalist: specialists, gate training, distillation.
        extra = sum(
            r.sample_steps for r in st.runs() if r.run_id not in ("main", self.baseline_run)
        )
        if (
            not self.baseline_run
            and main is not None
            and main.status is RunStatus.COMPLETED
            and extra > 0
        ):
            # The fair comparison: the generalist trained on for the same extra compute.
            steps_per = max(1, int(round(main.sample_steps / max(1, main.step))))
            budget = max(1, int(round(extra / steps_per)))
            try:
                reply = self._call(
                    "Fork",
                    pb.ForkRequest(run="main", select="all", budget_steps=budget, name="baseline"),
                )
            except grpc.RpcError as e:
                self.sup.bus.publish(
                    "log",
                    "",
                    level="warning",
                    text=f"matched-compute baseline not run: {e.details()}",
                )
            else:
                self.baseline_run = reply.run_id
                self.baseline_pending = True
                self.sup.bus.publish(
                    "log",
                    "",
                    level="info",
                    text=f"matched-compute baseline {reply.run_id}: main for {budget} more steps ({extra} sample-steps, as the specialists used)",
                )
                return True
        if not self.report_dir:
            from onthefly_supervisor.report import write_report

            self.report_dir = self.sup.dir
            try:
                paths = write_report(
                    self.sup.dir, self.sup.dir, baseline_run=self.baseline_run, blocked=self.blocked
                )
                self.sup.bus.publish("log", "", level="info", text=f"report: {paths['html']}")
                print(f"[onthefly] report: {paths['html']} and {paths['json']}", flush=True)
            except Exception as e:  # the report must not turn a good run into a failure
                self.sup.bus.publish(
                    "log", "", level="error", text=f"report failed: {type(e).__name__}: {e}"
                )
        return False


class _Empty:
    step = 0


def card_to_proto(c: pl.PlanCard) -> pb.PlanCard:
    recipe = {
        "training": dict(c.training_recipe),
        "gate": dict(c.gate_recipe),
        "merge": dict(c.merge_recipe),
    }
    return pb.PlanCard(
        plan_id=c.plan_id,
        action=c.action.value,
        reason=c.reason.value,
        status=c.status.value,
        selection=c.selection,
        recipe_json=json.dumps(recipe, default=str),
        budget_steps=int(c.budget_steps),
        cooldown_steps=int(c.cooldown_steps),
        diagnostics_json=json.dumps(dict(c.diagnostics), default=str),
        created=0.0,
        run_id=c.target_run,
    )
