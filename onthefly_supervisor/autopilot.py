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
import os
import re
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
from onthefly_supervisor.variants import race_from_dict

if TYPE_CHECKING:
    from onthefly_supervisor.supervisor import Supervisor

EDITABLE = {
    "selection",
    "budget_steps",
    "lr_mul",
    "wd_mul",
    "adapters_rank",
    "method",
    "grad_clip",
    "early_stop_patience",
}


@dataclass
class Execution:
    """What a started card launched, so its outcome can be judged when it ends."""

    card: pl.PlanCard
    runs: list[str] = field(default_factory=list)
    before: float | None = None
    started_step: int = 0
    adopt: str = ""
    race: str = ""
    """Id of the variants race the card started (fork/explore with several variants)."""
    rollback: dict[str, Any] | None = None
    """What a stabilization's rollback did (from the Rollback RPC)."""


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
            # An unstable run should not wait long for help (the default is 200 steps).
            cooldown_overrides={"stabilize": 50},
            explore_budget_steps=150,
            # Raced by successive halving from the same checkpoint; x1 is the "no change" arm.
            explore_lr_multipliers=(0.3, 1.0, 3.0),
            max_parallel_children=3,
            gate_steps=1000,
            # Completed specialists are merged back (SWA) every 500 generalist steps, and once
            # more when the generalist has finished; the generalist stays the catch-all.
            merge_every_steps=500,
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
        self.slice_margin = 0.2
        """A validation slice is weak when its loss stays this much (relative) above the overall."""
        self.leftover: list[str] = []
        """Cards approved before the previous supervisor ended that never started."""
        self.plateau_step: dict[str, int] = {}
        """Per run: the step at which its loss was first found on a plateau (see plan)."""
        self.examined: dict[str, tuple[int, float]] = {}
        """Per run: the last step the spike detectors examined and its time, so each look
        examines every step since the previous one (a spike is judged once, whenever the
        planner happens to look)."""
        if getattr(getattr(sup, "cfg", None), "resume_dir", ""):
            self._reload()

    # -- a served or resumed session -----------------------------------------------------------
    def _reload(self) -> None:
        """Take over the stored plan cards of a session this supervisor serves or resumes, so
        `plans`, approve, reject and edit work on them as on the previous supervisor's.

        The planner's state is rebuilt by replaying the cards in order (cooldowns, adaptive
        back-off, budget spent, specialists waiting for a gate or merge): proposed and
        approved cards are pending again, done/failed/rejected ones are folded in with
        their recorded outcome. A card that was running is taken over when what it started
        can still be found (its race, named after it, or its run): it is judged when that
        ends. Otherwise its execution ended with the previous supervisor, and it fails
        saying so."""
        cards: list[pl.PlanCard] = []
        for d in self.sup.store.plans():
            try:
                cards.append(pl.PlanCard.from_dict(d))
            except (ValueError, KeyError, TypeError):
                continue  # a card this version cannot read stays in the store, unlisted
        state = pl.PlannerState()
        lost: list[pl.PlanCard] = []
        for c in cards:
            state = pl.record_proposed(state, [c])
            if c.status in (pl.PlanStatus.DONE, pl.PlanStatus.FAILED):
                state = pl.record_started(state, c.plan_id)
                out = dict(c.diagnostics.get("outcome") or {})
                runs = [str(r) for r in out.get("runs") or ()]
                outcome: dict[str, Any] = {
                    "status": c.status.value,
                    "improved": bool(out.get("improved")),
                    "runs": runs[:1] if out.get("race") else runs,
                    "step": int(out.get("step", c.created_step) or 0),
                }
                if out.get("budget_used_steps") is not None:
                    outcome["budget_used_steps"] = int(out["budget_used_steps"])
                if out.get("parent_step") is not None:
                    outcome["parent_step"] = int(out["parent_step"])
                state = pl.apply_outcome(state, c, outcome, self.config)
            elif c.status is pl.PlanStatus.REJECTED:
                state = pl.apply_outcome(state, c, {"status": "rejected"}, self.config)
            elif c.status is pl.PlanStatus.RUNNING:
                state = pl.record_started(state, c.plan_id)
                ex = self._take_over(c)
                if ex is None:
                    lost.append(c)
                else:
                    self.running[c.plan_id] = ex
            elif c.status is pl.PlanStatus.APPROVED:
                self.leftover.append(c.plan_id)
        self.cards = {c.plan_id: c for c in cards}
        self.state = state
        # The previous supervisor judged the steps it saw: spikes are looked for after them.
        for row in self.sup.store.query(
            "SELECT step, t FROM metrics WHERE run_id = 'main' ORDER BY step DESC LIMIT 1"
        ):
            self.examined["main"] = (int(row[0]), float(row[1]))
        for c in cards:  # an explore card is proposed on a plateau of its target
            if c.action is pl.Action.EXPLORE and c.reason is pl.Reason.LOSS_PLATEAU:
                first = self.plateau_step.get(c.target_run, c.created_step)
                self.plateau_step[c.target_run] = min(first, c.created_step)
        for c in lost:
            self._finish(
                c,
                Execution(c),
                "failed",
                "its execution ended with the previous supervisor (nothing it started was found)",
            )

    def _take_over(self, card: pl.PlanCard) -> Execution | None:
        """The execution of a card that was running when the previous supervisor ended, found
        by what it started (names given in _launch); None when nothing is found."""
        st = self.sup.store
        ex = Execution(card, started_step=card.created_step)
        if card.action is pl.Action.STABILIZE:
            return ex  # judged on its target run over its watch window
        if card.action in (pl.Action.FORK, pl.Action.EXPLORE):
            for row in st.query("SELECT key FROM meta WHERE key LIKE 'race:%'"):
                d = st.get_meta(row["key"])
                if isinstance(d, dict) and d.get("name") == card.plan_id:
                    ex.race = str(d.get("race_id", ""))
                    ex.runs = [str(x) for x in d.get("runs") or ()]
                    ex.adopt = "lr_mul" if card.action is pl.Action.EXPLORE else ""
                    return ex
            name = f"{card.plan_id}-fork"
        elif card.action is pl.Action.GATE:
            name = f"{card.plan_id}-moe"
        else:
            name = f"{card.plan_id}-merge"
        ex.runs = [r.run_id for r in st.runs() if r.name == name]
        return ex if ex.runs else None

    def _start_leftover(self, plan_id: str) -> bool:
        """Start a card approved before the previous supervisor ended; False if it is not one."""
        with self._lock:
            if plan_id not in self.leftover:
                return False
            self.leftover.remove(plan_id)
        threading.Thread(target=self._execute, args=(plan_id,), daemon=True).start()
        return True

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
            if card.status is pl.PlanStatus.APPROVED and self._start_leftover(card.plan_id):
                return pb.ActionReply(
                    ok=True,
                    message=f"plan {card.plan_id} was approved before the previous supervisor "
                    f"ended and never started; starting it: {card.action.value}",
                )
            if card.status is not pl.PlanStatus.PROPOSED:
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} is {card.status.value}, not proposed",
                )
            target = self.sup.store.run(card.target_run)
            if card.action is pl.Action.EXPLORE and target is not None and target.status.terminal:
                # Its race exists to hand the winning lr to the run, which can no longer
                # take it: racing now would only spend compute.
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} races lr multipliers for {card.target_run} to adopt, "
                    f"but {card.target_run} has {target.status.value}: reject it, or race forks "
                    "yourself (`onthefly fork --variants N`)",
                )
            if card.action is pl.Action.STABILIZE and target is not None and target.status.terminal:
                # It repairs the run's worker in place, and that worker is gone.
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"plan {card.plan_id} repairs {card.target_run} in place, but "
                    f"{card.target_run} has {target.status.value}: reject it (`onthefly "
                    f"reject {card.plan_id}`)",
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
                    if not v.strip().lstrip("+").isdigit():
                        raise ValueError(f"budget_steps={v}: must be a whole number >= 1")
                    n = int(v)
                    if n < 1:
                        raise ValueError(f"budget_steps={v}: must be >= 1")
                    kw["budget_steps"] = n
                elif k == "method":
                    if v not in pl.MERGE_METHODS:
                        raise ValueError(f"method={v}: one of {', '.join(pl.MERGE_METHODS)}")
                    merge["method"] = v
                else:
                    try:
                        x = float(v)
                    except ValueError:
                        raise ValueError(f"{k}={v}: must be a number") from None
                    if not (math.isfinite(x) and x >= 0):
                        raise ValueError(f"{k}={v}: must be a finite number >= 0")
                    if k == "early_stop_patience":  # 0 turns early stopping off
                        if x != int(x):
                            raise ValueError(f"{k}={v}: must be a whole number >= 0")
                        recipe["early_stop"] = {
                            **dict(recipe.get("early_stop") or {}),
                            "patience_evals": int(x),
                        }
                        continue
                    if k == "lr_mul" and recipe.get("variants"):
                        recipe["variants"] = _scale_lr_variants(recipe, x, v)
                    recipe[k] = int(x) if k == "adapters_rank" else x
            card = replace(card, training_recipe=recipe, merge_recipe=merge, **kw)
            if "lr_mul" in req.values:
                card = self._explain_variants(card)
            self._set(card)
        note = ""
        if "lr_mul" in req.values and card.training_recipe.get("variants"):
            raced = [float(x["lr_mul"]) for x in card.training_recipe["variants"]]
            note = f" (races lr {'/'.join(f'x{m:.3g}' for m in raced)})"
        return pb.ActionReply(
            ok=True,
            message=f"plan {card.plan_id} edited: "
            f"{', '.join(f'{k}={v}' for k, v in req.values.items())}{note}",
        )

    def set_automode(self, req: pb.AutomodeRequest) -> pb.ActionReply:
        self.sup.automode = bool(req.enabled)
        self.sup.store.set_meta("automode", self.sup.automode)
        self.sup.bus.publish("session", "", state="automode", automode=self.sup.automode)
        started: list[pl.PlanCard] = []
        if self.sup.automode:
            # The cards waiting for a person are approved too: automode acts on what the
            # planner proposes, pending cards included, not only on what comes next.
            with self._lock:
                for card in list(self.cards.values()):
                    if card.status is pl.PlanStatus.PROPOSED:
                        self._set(card.with_status(pl.PlanStatus.APPROVED))
                        started.append(card)
            for card in started:
                threading.Thread(target=self._execute, args=(card.plan_id,), daemon=True).start()
        also = (
            "; approved the pending "
            + ", ".join(f"{c.plan_id} ({c.action.value})" for c in started)
            if started
            else ""
        )
        return pb.ActionReply(ok=True, message=f"automode {'on' if req.enabled else 'off'}{also}")

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
        if self.sup.automode:
            for plan_id in list(self.leftover):
                self._start_leftover(plan_id)
        main = self.sup.store.run("main")
        if main is None or main.status not in (RunStatus.RUNNING, RunStatus.COMPLETED):
            return
        finished = main.status is RunStatus.COMPLETED
        if finished and (not self.sup.automode or self.report_dir):
            return
        # After the generalist finished, only what a finished model can still use is
        # planned: specialists on its hard samples, then a gate / merge over them.
        detections = self.detect("main", sample_only=finished)
        kinds = {d.kind for d in detections}
        if pl.DetectionKind.PLATEAU in kinds and pl.DetectionKind.DRIFT not in kinds:
            self.plateau_step.setdefault("main", main.step)
        bf16, bf16_note = self._bf16(main)
        ctx = {
            "checkpoint_steps": [c["step"] for c in self.sup.store.checkpoints("main")],
            "grad_clip": float(main.config.get("grad_clip", 0.0) or 0.0),
            "active_children": self._active_children(),
            "nonfinite_steps": self._nonfinite_steps("main"),
            "rollback_supported": not self.sup.cfg.owner_pid,
            "bf16_supported": bf16,
            "bf16_note": bf16_note,
            "slice_selections": self._slice_selections(),
            "final": finished,
            "plateau_step": self.plateau_step.get("main"),
            "steps_left": self._steps_left(main),
            **(self._race_pace(main) if not finished else {}),
        }
        with self._lock:
            result = pl.plan(detections, self.state, self.config, main.step, ctx)
            self.blocked = [b.to_dict() for b in result.blocked]
            if not result.cards:
                return
            self.state = pl.record_proposed(self.state, result.cards)
            cards = [self._explain_variants(c) for c in result.cards]
            for c in cards:
                self._set(c)
        for c in cards:
            if self.sup.automode:
                with self._lock:
                    self._set(c.with_status(pl.PlanStatus.APPROVED))
                threading.Thread(target=self._execute, args=(c.plan_id,), daemon=True).start()

    def _active_children(self) -> int:
        """Fork processes going now or about to, for the planner's children cap: every race's
        variants still going or still able to go on (its stopped losers hold nothing), every
        other fork run still going (a person's forks too), and all the slots of a started card
        whose launch has not returned yet."""
        st = self.sup.store
        runs = st.runs()
        status = {r.run_id: r.status for r in runs}
        n = 0
        in_race: set[str] = set()
        launched = {r.name for r in runs}  # a card's race is named after it, a lone fork -fork
        for row in st.query("SELECT key FROM meta WHERE key LIKE 'race:%'"):
            d = st.get_meta(row["key"])
            if not isinstance(d, dict):
                continue
            launched.add(str(d.get("name", "")))
            if d.get("status") == "running":
                race = race_from_dict(d)
                in_race.update(race.runs)
                n += race.slots(status)
        n += sum(
            1
            for r in runs
            if r.kind == "fork" and not r.status.terminal and r.run_id not in in_race
        )
        # A started card whose launch has not returned holds all it asked for, unless what it
        # launched is already counted above.
        n += sum(
            p.children
            for p in self.state.pending
            if p.started
            and p.plan_id not in self.running
            and not {p.plan_id, f"{p.plan_id}-fork"} & launched
        )
        return n

    def _explain_variants(self, card: pl.PlanCard) -> pl.PlanCard:
        """Say on a fork/explore card which lr multipliers it races, and why any configured
        one is left out: the planner trims a race to the child-process slots that are free
        when it proposes the card (the first ones in the configured order are kept)."""
        if card.action is pl.Action.EXPLORE:
            configured = self.config.explore_lr_multipliers
        elif card.action is pl.Action.FORK:
            configured = self.config.fork_lr_multipliers
        else:
            return card
        raced = [float(v.get("lr_mul", 1.0)) for v in card.training_recipe.get("variants") or ()]
        if len(configured) < 2 or not raced:
            return card
        # An edit of lr_mul scales every variant (see edit); trimming keeps the first ones,
        # so the first raced variant is the first configured one, scaled.
        scale = raced[0] / configured[0]
        configured = tuple(m * scale for m in configured)
        # As _launch orders them: the x1 arm first, so a tie keeps the lr unchanged.
        shown = "/".join(f"x{m:.3g}" for m in sorted(raced, key=lambda m: m != 1.0))
        what = f"races lr {shown}" if len(raced) > 1 else f"one fork at lr {shown}, no race"
        if not math.isclose(scale, 1.0, rel_tol=1e-9):
            what += f" (lr_mul edited: the configured multipliers scaled by {scale:.3g}" + (
                "; no x1 arm, so the winner's lr is adopted only if it beats "
                f"{card.target_run}'s loss at the start)"
                if card.action is pl.Action.EXPLORE
                and not any(math.isclose(m, 1.0, rel_tol=1e-9) for m in raced)
                else ")"
            )
        left_out = [m for m in configured if not any(math.isclose(m, r) for r in raced)]
        if left_out:
            cap = self.config.max_parallel_children
            text = (
                f"{what}; {'/'.join(f'x{m:.3g}' for m in left_out)} left out: "
                f"{cap - len(raced)} of the {cap} child-process slots were running or "
                f"reserved when it was proposed (children cap), leaving {len(raced)}"
            )
        else:
            text = what
        diag = dict(card.diagnostics)
        old = str(diag.get("variants", ""))
        diag["variants"] = text
        summary = str(diag.get("summary", ""))
        if old and summary.endswith(old):  # explained before (an edit): replace that part
            summary = summary[: -len(old)].removesuffix("; ")
        diag["summary"] = f"{summary}; {text}" if summary else text
        return replace(card, diagnostics=diag)

    def detect(self, run_id: str, sample_only: bool = False) -> list[pl.Detection]:
        st = self.sup.store
        out: list[pl.Detection] = []
        if sample_only:
            return self._sample_detections(run_id, None)
        # One query: loss, grad norm and the step's batch size aligned step by step (samples/s
        # x step time = the samples of that step, as the worker measured), and when each step
        # was recorded. The newest 1000 steps at least (trend tests); every step since the
        # previous look plus the spike detectors' history when more (at most _MAX_LOOK).
        last = self.examined.get(run_id)
        limit = 1000
        if last is not None:
            top = st.query("SELECT MAX(step) FROM metrics WHERE run_id = ?", (run_id,))
            newest = int(top[0][0]) if top and top[0][0] is not None else 0
            limit = min(_MAX_LOOK, max(limit, newest - last[0] + _SPIKE_HISTORY))
        rows = st.query(
            "SELECT step, loss, grad_norm, samples_per_s * step_time_ms / 1000.0, t FROM metrics"
            " WHERE run_id = ? ORDER BY step DESC LIMIT ?",
            (run_id, limit),
        )[::-1]
        if not rows:
            return out
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        loss = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        gn = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
        # Rounded: the product carries float32 rounding; 0 (no step time) means unknown.
        batch = np.array(
            [np.nan if not r[3] else round(float(r[3])) for r in rows], dtype=np.float64
        )
        times = np.array([r[4] for r in rows], dtype=np.float64)
        since = _first_unexamined(steps, times, last)
        # The smaller last batch of an epoch is noisier, not a spike: both spike detectors
        # judge every step at its own batch size.
        found = [
            d
            for d in (
                pl.detect_spike(steps, loss, since_step=since, metric="loss", batch_sizes=batch),
                pl.detect_spike(
                    steps,
                    np.where(np.isfinite(gn), gn, np.nan),
                    since_step=since,
                    metric="grad_norm",
                    batch_sizes=batch,
                    min_ratio=GRAD_SPIKE_MIN_RATIO,
                ),
            )
            if d is not None
        ]
        # A loss spike is an instability only when the loss stays up: one hard batch whose
        # loss is back to normal on the next steps (BatchNorm, dropout, small batches with a
        # few hard samples) is not, and lowering the learning rate for it hurt healthy runs.
        # Judged once _SPIKE_AFTER steps follow it; until then it waits for the next look.
        spikes: list[pl.Detection] = []
        wait_at: int | None = None
        for sp in found:
            verdict = _loss_stays_up(sp, steps, loss) if sp.subject == "loss" else True
            if verdict is None:
                wait_at = sp.step
            elif verdict:
                spikes.append(sp)
        if wait_at is not None:  # what comes after it is looked at again with it
            spikes = [sp for sp in spikes if sp.step < wait_at]
        # Examined up to the newest step, or up to the first spike found: a detector reports
        # the first one, so the next look goes on right after it (a later spike is not lost).
        # A spike still waiting for its next steps is looked at again from the step before it.
        i = len(steps) - 1
        if wait_at is not None:
            i = int(np.flatnonzero(steps == wait_at)[-1]) - 1
        elif found:
            i = int(np.flatnonzero(steps == min(sp.step for sp in found))[-1])
        if i >= 0:
            self.examined[run_id] = (
                int(steps[i]),
                float(times[i]) if found else float(times.max()),
            )
        trend = slice(-1000, None)  # the trend tests see the newest 1000 steps, as before
        for d in (
            # A NaN grad norm means "not measured" (e.g. a skipped step); Inf means bad gradients.
            pl.detect_nonfinite(steps[trend], loss[trend], np.where(np.isnan(gn), 0.0, gn)[trend]),
            *spikes,
            pl.detect_plateau(
                steps[trend], loss[trend], window=min(200, max(50, steps[trend].size // 2))
            ),
            pl.detect_drift(steps[trend], loss[trend]),
            self._weak_slice(run_id),
        ):
            if d is not None:
                out.append(d)
        return out + self._sample_detections(run_id, int(steps[-1]))

    def _race_pace(self, run: Any) -> dict[str, float]:
        """How fast a race goes beside ``run``, measured: ``run``'s steps/s over its newest
        200 steps; the newest forks' time from creation to their first step and their
        steps/s (medians of the last 3). Before any fork has stepped, ``run``'s own pace and
        twice its own start-up: a fork re-runs the same script, but starts while ``run``
        trains on the same cores (in the demo, on 2 cores, forks took 1.8-2x as long as
        main had). Empty when ``run`` has no pace yet."""
        st = self.sup.store

        def rate(rows: list[Any]) -> float | None:
            if len(rows) < 2:
                return None
            n = max(int(r[0]) for r in rows) - min(int(r[0]) for r in rows)
            span = max(float(r[1]) for r in rows) - min(float(r[1]) for r in rows)
            return n / span if n > 0 and span > 0 else None

        newest = st.query(
            "SELECT step, t FROM metrics WHERE run_id = ? ORDER BY step DESC LIMIT 200",
            (run.run_id,),
        )
        own = rate(newest)
        if own is None:
            return {}
        startups: list[float] = []
        rates: list[float] = []
        for r in sorted((r for r in st.runs() if r.kind == "fork"), key=lambda r: r.created)[-3:]:
            rows = st.query("SELECT step, t FROM metrics WHERE run_id = ?", (r.run_id,))
            fork_rate = rate(rows)
            if fork_rate is not None:
                startups.append(max(0.0, min(float(x[1]) for x in rows) - r.created))
                rates.append(fork_rate)
        if not startups:
            first = st.query(
                "SELECT t FROM metrics WHERE run_id = ? ORDER BY step LIMIT 1", (run.run_id,)
            )
            startups, rates = [2.0 * max(0.0, float(first[0][0]) - run.created)], [own]
        return {
            "target_steps_per_s": own,
            "fork_startup_s": float(np.median(startups)),
            "fork_steps_per_s": float(np.median(rates)),
        }

    def _steps_left(self, run: Any) -> int | None:
        """Steps a running run has left by its shape: max_steps, or epochs x steps per epoch
        (the smaller when both are set); None when it has finished or its length is unknown."""
        if run.status.terminal:
            return None
        per_epoch, epochs = getattr(self.sup, "shape", {}).get(run.run_id, (0, 0))
        by_epochs = int(per_epoch) * int(epochs) if per_epoch > 0 and epochs > 0 else 0
        known = [x for x in (by_epochs, int(run.config.get("max_steps") or 0)) if x > 0]
        return max(0, min(known) - int(run.step)) if known else None

    def _weak_slice(self, run_id: str) -> pl.Detection | None:
        """Per-slice validation losses the user reports (Trainer(val_slices=...)), aligned with
        the overall validation loss of the same evaluation."""
        rows = self.sup.store.query(
            "SELECT split, step, loss FROM evals WHERE run_id = ? AND (split = 'val' OR split LIKE 'val_slice:%')"
            " ORDER BY t",
            (run_id,),
        )
        overall = {int(r["step"]): r["loss"] for r in rows if r["split"] == "val"}
        if len(overall) < 2:
            return None
        steps = sorted(overall)
        per: dict[str, dict[int, float | None]] = {}
        for r in rows:
            if r["split"] != "val":
                per.setdefault(r["split"].split(":", 1)[1], {})[int(r["step"])] = r["loss"]
        if not per:
            return None

        def num(v: float | None) -> float:
            return math.nan if v is None else float(v)

        return pl.detect_weak_slices(
            {k: [num(v.get(s)) for s in steps] for k, v in per.items()},
            [num(overall[s]) for s in steps],
            margin=self.slice_margin,
            persist=min(3, len(steps)),
            eval_steps=steps,
        )

    def _slice_selections(self) -> dict[str, str]:
        """Training-set selections of the user's val slices (written by the main worker)."""
        d = os.path.join(self.sup.dir, "slices")
        out: dict[str, str] = {}
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".train.npy"):
                    out[name[: -len(".train.npy")]] = f"indices:{os.path.join(d, name)}"
        return out

    def _nonfinite_steps(self, run_id: str) -> list[int]:
        rows = self.sup.store.query(
            # Non-finite losses are stored as NULL (an Inf grad norm is indistinguishable from
            # "not measured" in the store, so only the loss marks a bad batch here).
            "SELECT step FROM metrics WHERE run_id = ? AND loss IS NULL ORDER BY step DESC LIMIT 64",
            (run_id,),
        )
        return sorted(int(r["step"]) for r in rows)

    def _bf16(self, run: Any) -> tuple[bool, str]:
        """Whether a stabilization can switch the run to bf16, and why (for the card)."""
        if not run.config.get("amp"):
            return False, (
                "bf16 not applied: the run trains in fp32 (amp=False); bf16 replaces fp16 mixed "
                "precision and would only lower precision here"
            )
        rows = self.sup.store.query(
            "SELECT payload FROM events WHERE kind = 'attached' AND run_id = ? ORDER BY seq DESC LIMIT 1",
            (run.run_id,),
        )
        device = str(json.loads(rows[0]["payload"]).get("device", "")) if rows else ""
        if not device.startswith("cuda"):
            return False, "bf16 not applied: amp on CPU already runs bf16 autocast"
        cc = _min_compute_capability()
        if cc is not None and cc < (8, 0):
            return (
                False,
                f"bf16 not applied: the GPU (compute capability {cc[0]}.{cc[1]}) has no bf16",
            )
        return (
            True,
            "fp16 autocast -> bf16 (fp32's exponent range; no GradScaler), where torch reports bf16 support",
        )

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
            ex.before = run.last_loss if run else None
            offending = [int(s) for s in r.get("offending_steps") or ()]
            if r.get("rollback_to_step") is not None and offending:
                # Roll back to the last good checkpoint and skip the offending batches; the
                # RPC answers once the restarted worker trains again.
                reply = self.client.call(
                    "Rollback",
                    pb.RollbackRequest(
                        run=target,
                        skip_steps=offending,
                        lr_mul=float(r.get("lr_mul", 0.5)),
                        grad_clip=float(r.get("grad_clip") or 0.0),
                        bf16=bool(r.get("bf16")),
                        reason=f"{card.plan_id}: {card.reason.value}",
                    ),
                    timeout=240,
                )
                ex.rollback = {**json.loads(reply.payload_json or "{}"), "message": reply.message}
                ex.started_step = int(ex.rollback.get("to_step", ex.started_step))
                return
            values = {"lr_mul": float(r.get("lr_mul", 0.5))}
            if r.get("grad_clip"):
                values["grad_clip"] = float(r["grad_clip"])
            self._call("SetHyperParams", pb.HyperParamsRequest(run=target, values=values))
        elif card.action in (pl.Action.FORK, pl.Action.EXPLORE):
            explore = card.action is pl.Action.EXPLORE
            variants = list(r.get("variants") or [{"lr_mul": r.get("lr_mul", 1.0)}])
            # The x1 arm first: a tie (no evidence either way) then keeps the lr unchanged.
            muls = sorted((float(v.get("lr_mul", 1.0)) for v in variants), key=lambda m: m != 1.0)
            req = pb.ForkRequest(
                run=target,
                select=card.selection if not explore else "all",
                budget_steps=card.budget_steps,
                wd_mul=float(r.get("wd_mul", 1.0)),
                adapters_rank=int(r.get("adapters_rank", 0) or 0),
                name=card.plan_id if len(muls) > 1 else f"{card.plan_id}-fork",
            )
            metric = "slice"
            has_val = any(e["split"] == "val" for e in self.sup.store.evals(target))
            self._early_stop(req, card, has_val)
            if len(muls) > 1:
                race = r.get("race") or {}
                metric = "val" if explore and has_val else "slice"
                req.variant_lr_muls.extend(muls)
                req.race_eta = int(race.get("eta", self.config.halving_eta))
                req.race_metric = metric
            else:
                req.lr_mul = float(r.get("lr_mul", muls[0]))
            reply = self._call("Fork", req)
            payload = json.loads(reply.payload_json or "{}")
            ex.runs = [str(x) for x in payload.get("runs") or [reply.run_id]]
            ex.race = str(payload.get("race", ""))
            if explore:
                ex.adopt = "lr_mul"
                if metric == "slice":
                    ex.before = self._mean_loss(target, None)
            else:
                idx = np.load(f"{self.sup.dir}/forks/{ex.runs[0]}/indices.npy")
                ex.before = self._mean_loss(target, idx)
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

    def _early_stop(self, req: pb.ForkRequest, card: pl.PlanCard, has_val: bool) -> None:
        """The card's `early_stop` ({"patience_evals": N, "metric": ...}) on the fork
        request: a fork watches its slice loss, an explore (all the data) its val loss;
        evaluated every budget/10 steps. Off when the card's budget is too short for N
        evaluations, or for an explore whose target reports no val loss (its slice is the
        whole training set, too costly to evaluate ten times)."""
        es = card.training_recipe.get("early_stop") or {}
        patience = int(es.get("patience_evals", 0) or 0)
        if patience <= 0:
            return
        val = str(es.get("metric") or "") == "val_loss"
        why = ""
        if val and not has_val:
            why = f"{card.target_run} reports no validation loss"
        elif patience * max(1, card.budget_steps // 10) >= card.budget_steps:
            why = f"a {card.budget_steps}-step budget is too short for {patience} evaluations"
        if why:
            self.sup.bus.publish(
                "log",
                card.target_run,
                level="info",
                text=f"{card.plan_id}: no early stopping ({why})",
            )
            return
        req.early_stop_patience = patience
        req.early_stop_metric = "val" if val else "slice"

    def _mean_loss(self, run_id: str, idx: np.ndarray | None) -> float | None:
        """Mean of the latest per-sample training losses (over `idx`, or every sample)."""
        losses = self.sup.method.latest_losses(run_id)[0]
        seen = losses if idx is None else losses[idx]
        seen = seen[np.isfinite(seen)]
        return float(seen.mean()) if seen.size else None

    def _first_score(self, run_id: str, split: str) -> tuple[int, float] | None:
        evs = [e for e in self.sup.store.evals(run_id) if e["split"] == split]
        if not evs or evs[0]["loss"] is None:
            return None
        return int(evs[0]["step"]), float(evs[0]["loss"])

    def _score(self, run_id: str, split: str) -> float | None:
        evs = [e for e in self.sup.store.evals(run_id) if e["split"] == split]
        return evs[-1]["loss"] if evs else None

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
                    # Measured, not assumed: the median training loss over the steps since
                    # the plan acted, and "improved" only if every one of them was finite.
                    rows = st.query(
                        "SELECT loss FROM metrics WHERE run_id = ? AND step > ?",
                        (card.target_run, ex.started_step),
                    )
                    losses = np.array(
                        [np.nan if r[0] is None else r[0] for r in rows], dtype=np.float64
                    )
                    stable = losses.size > 0 and bool(np.isfinite(losses).all())
                    self._finish(
                        card,
                        ex,
                        "done" if ok else "failed",
                        run.error if not ok else "",
                        improved=ok and stable,
                        after=float(np.median(losses)) if stable else None,
                    )
                continue
            if ex.race:
                self._judge_race(ex)
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
                after = self._score(good[0].run_id, "slice:self")
                start = self._first_score(good[0].run_id, "slice:self")
                if start is not None and after is not None and start[0] < good[0].step:
                    # Like with like: the fork's slice loss at its start (the parent's
                    # weights, eval mode) instead of the parent's training-time losses.
                    ex.before = start[1]
            else:
                vals = [
                    float(v)
                    for v in (r.val_loss if r.val_loss is not None else r.test_loss for r in good)
                    if v is not None
                ]
                after = min(vals) if vals else None
            improved = ex.before is not None and after is not None and after < ex.before
            used = sum(r.step for r in good)
            summary = verdict = ""
            if card.action is pl.Action.MERGE and not improved and ex.before and after:
                # A merge that loses to the run it merged into is no candidate: the report
                # marks it rejected, and the target stays the catch-all.
                verdict = "rejected"
                summary = (
                    f"{', '.join(r.run_id for r in good)} loses to {card.target_run}: val loss "
                    f"{after:.4g} vs {ex.before:.4g} ({after / ex.before:.2f}x); rejected, "
                    f"{card.target_run} stays the catch-all"
                )
            self._finish(
                card,
                ex,
                "done",
                "",
                improved=improved,
                after=after,
                used=used,
                summary=summary,
                verdict=verdict,
            )

    def _judge_race(self, ex: Execution) -> None:
        """A fork/explore card that raced variants: judged once the race has its winner."""
        st, card = self.sup.store, ex.card
        race = st.get_meta(f"race:{ex.race}")
        if race is None or race.get("status") == "running":
            return
        used = sum(r.step for r in (st.run(x) for x in ex.runs) if r is not None)
        summary = _race_summary(race)
        if race["status"] != "done":
            self._finish(
                card, ex, "failed", race.get("error", ""), used=used, race=race, summary=summary
            )
            return
        winner = str(race["winner"])
        split = "slice:self" if race.get("metric") == "slice" else "val"
        after = self._score(winner, split)
        won = st.run(winner)
        start = self._first_score(winner, "slice:self")
        if (
            card.action is pl.Action.FORK
            and split == "slice:self"
            and won is not None
            and start is not None
            and start[0] < won.step
        ):
            # As for a single fork: the winner's slice loss before its first step (the
            # parent's weights, eval mode), not the parent's training-time losses.
            ex.before = start[1]
        improved = ex.before is not None and after is not None and after < ex.before
        if ex.adopt:
            mul = float(race["recipes"][winner]["lr_mul"])
            control = any(float(v["lr_mul"]) == 1.0 for v in race["recipes"].values())
            if mul != 1.0 and (control or improved):
                # It beat the no-change arm at equal steps (or the generalist itself).
                if self.sup.live_worker(card.target_run) is not None:
                    try:
                        self._call(
                            "SetHyperParams",
                            pb.HyperParamsRequest(run=card.target_run, values={"lr_mul": mul}),
                        )
                        summary += f"; {card.target_run} adopted lr x{mul:g}"
                        improved = True
                    except grpc.RpcError as e:
                        summary += f"; lr x{mul:g} not adopted: {e.details()}"
                else:
                    summary += f"; {card.target_run} has finished, lr x{mul:g} not adopted"
            elif mul == 1.0:
                summary += f"; the lr of {card.target_run} stays (the x1 arm won)"
        ex.runs = [winner] + [x for x in ex.runs if x != winner]
        self._finish(
            card,
            ex,
            "done",
            "",
            improved=improved,
            after=after,
            used=used,
            race=race,
            summary=summary,
        )

    def _finish(
        self,
        card: pl.PlanCard,
        ex: Execution,
        status: str,
        error: str,
        improved: bool = False,
        after: float | None = None,
        used: int | None = None,
        race: dict[str, Any] | None = None,
        summary: str = "",
        verdict: str = "",
    ) -> None:
        with self._lock:
            self.running.pop(card.plan_id, None)
            outcome: dict[str, Any] = {
                "status": status,
                "improved": improved,
                # A race's specialist is its winner alone.
                "runs": ex.runs[:1] if race is not None else ex.runs,
                "step": (self.sup.store.run(card.target_run) or _Empty()).step,
            }
            if used is not None:
                outcome["budget_used_steps"] = used
            parent_step = (
                self._parent_step(ex.runs[0]) if card.action is pl.Action.FORK and ex.runs else None
            )
            if parent_step is not None:
                outcome["parent_step"] = parent_step
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
                # What a later supervisor needs to rebuild the planner's state (_reload).
                "step": outcome["step"],
                "budget_used_steps": used,
            }
            if parent_step is not None:
                diag["outcome"]["parent_step"] = parent_step
            if verdict:
                diag["outcome"]["verdict"] = verdict
            if summary:
                diag["outcome"]["summary"] = summary
            if race is not None:
                diag["outcome"]["race"] = race
            if ex.rollback is not None:
                diag["outcome"]["rollback"] = ex.rollback
                diag["outcome"]["summary"] = ex.rollback.get("message", "")
            new = replace(card, diagnostics=diag).with_status(
                pl.PlanStatus.DONE if status == "done" else pl.PlanStatus.FAILED
            )
            self._set(new)

    def _parent_step(self, run_id: str) -> int | None:
        """Step of the parent's checkpoint a fork started from (its spec names the file)."""
        st = self.sup.store
        run = st.run(run_id)
        path = str((run.spec if run is not None else {}).get("checkpoint") or "")
        if not path:
            return None
        rows = st.query("SELECT step FROM checkpoints WHERE path = ?", (path,))
        if rows:
            return int(rows[0][0])
        m = re.search(r"step-(\d+)\.pt$", path)
        return int(m.group(1)) if m else None

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
            # Samples per step from the steps themselves (samples/s x step time = batch size),
            # not sample_steps / step: a rollback keeps the abandoned timeline's compute in
            # sample_steps while the step counter goes back.
            row = st.query(
                "SELECT AVG(samples_per_s * step_time_ms / 1000.0) FROM metrics"
                " WHERE run_id = 'main' AND step_time_ms > 0",
                (),
            )
            per_step = float(row[0][0]) if row and row[0][0] else 0.0
            if per_step <= 0:
                per_step = main.sample_steps / max(1, main.step)
            steps_per = max(1, int(round(per_step)))
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
                # One line: the terminal view prints the session's log events (the dashboard
                # and the store get the same line).
                self.sup.bus.publish(
                    "log", "", level="info", text=f"report: {paths['html']} and {paths['json']}"
                )
            except Exception as e:  # the report must not turn a good run into a failure
                self.sup.bus.publish(
                    "log", "", level="error", text=f"report failed: {type(e).__name__}: {e}"
                )
        return False


class _Empty:
    step = 0


_SPIKE_HISTORY = 100
"""Steps before the first unexamined one that the spike detectors need as history (their
trailing window is 50 steps)."""
_MAX_LOOK = 20_000
"""Most metric rows one look reads: bounds the memory of a look after a long pause."""


# The steps after a loss spike that tell a hard batch (the loss is back) from an instability.
_SPIKE_AFTER = 5

GRAD_SPIKE_MIN_RATIO = 4.0
"""A gradient-norm spike is an instability only at 4x its recent median or more: a healthy
AdamW/BatchNorm run's norm reaches 2-3x a tight median (many robust deviations), and
halving its lr for that made it ~10% worse."""


def _loss_stays_up(d: pl.Detection, steps: np.ndarray, loss: np.ndarray) -> bool | None:
    """Whether the loss after spike `d` stays up: the median of the next _SPIKE_AFTER
    finite losses is still more than half the detector's threshold (in robust standard
    deviations) above the median before it. None while fewer steps follow it."""
    i = int(np.flatnonzero(steps == d.step)[-1])
    after = loss[i + 1 :]
    after = after[np.isfinite(after)][:_SPIKE_AFTER]
    if after.size < _SPIKE_AFTER:
        return None
    med, z, value = d.numbers["median"], d.numbers["z"], d.numbers["value"]
    scale = (value - med) / z if z > 0 else 0.0
    if not scale > 0:
        return True
    return bool((float(np.median(after)) - med) / scale > d.numbers["z_threshold"] / 2)


def _first_unexamined(
    steps: np.ndarray, times: np.ndarray, last: tuple[int, float] | None
) -> int | None:
    """``since_step`` for the spike detectors: the step before the first one recorded after
    the previous look (``last`` = its newest step and time), so every step is examined once
    however the looks fall; None (everything) on the first look. Steps are told apart by
    the time they were recorded, not their number: after a rollback the run trains the
    same step numbers again, and those steps are new."""
    if last is None:
        return None
    new = np.flatnonzero(times > last[1])
    if new.size == 0:
        return int(steps[-1])  # nothing new
    return int(steps[new[0]]) - 1


def _scale_lr_variants(recipe: Any, lr_mul: float, text: str) -> list[dict[str, Any]]:
    """A card that races lr variants: ``lr_mul`` is the multiplier of its first variant (a
    fork's) or the centre its variants spread around (explore's, 1 when never set), so an
    edit scales every variant by new / old: explore x0.3/x1/x3 edited to lr_mul=0.5 races
    x0.15/x0.5/x1.5, and a later lr_mul=2 makes it x0.6/x2/x6 (not a product of edits)."""
    if lr_mul <= 0:
        raise ValueError(f"lr_mul={text}: must be > 0 (the plan races lr multipliers)")
    variants = [dict(v) for v in recipe.get("variants") or ()]
    old = float(recipe.get("lr_mul", 1.0) or 0.0)
    if old <= 0:
        old = float(variants[0].get("lr_mul", 1.0))
    for v in variants:
        v["lr_mul"] = float(v.get("lr_mul", 1.0)) * lr_mul / old
        v["name"] = f"lr_x{v['lr_mul']:.3g}"
    return variants


def _race_summary(race: dict[str, Any]) -> str:
    """One line per race for the plan card: every rung's ranking, then the winner."""
    parts = []
    for h in race.get("history", []):
        scores = h.get("scores", {})
        ranked = ", ".join(
            f"{k} {scores[k]:.4g}{'*' if k in h.get('promoted', []) else ''}"
            for k in h.get("ranked", [])
            if scores.get(k) is not None
        )
        parts.append(f"rung {h['rung'] + 1} @ step {h['step']} ({h['metric']} loss): {ranked}")
    if race.get("status") == "done":
        w = race["winner"]
        parts.append(f"winner {w} (lr x{float(race['recipes'][w]['lr_mul']):.3g})")
    else:
        parts.append(f"no winner: {race.get('error', '')}")
    return f"{race['race_id']}: " + "; ".join(parts)


def _min_compute_capability() -> tuple[int, int] | None:
    """The lowest CUDA compute capability of the GPUs NVML sees; None if it cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        caps = [
            tuple(pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    except Exception:  # no NVML: the worker checks torch.cuda.is_bf16_supported() itself
        return None
    return (int(min(caps)[0]), int(min(caps)[1])) if caps else None


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
