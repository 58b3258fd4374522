"""Racing fork variants by successive halving: `onthefly fork --variants N` and automode's explore.

A race starts N fork runs from the same parent checkpoint, on the same selection and the
same data order (one seed), that differ only in their recipe (by default the lr
multiplier, spread log-uniformly over one decade centred on the requested one). The
final budget is split into rungs (`halving_rungs`: N=4, eta=2, 300 steps -> 75, 150,
300). Every variant trains to the first rung and stops there by itself, at exactly that
step (the worker's `race.stop_at`), reporting its loss on its slice and on the
validation set; so the comparison is at equal steps, whatever the processes' speeds,
and a variant that waits for the others holds no process, no GPU and no fork slot.
When every variant of the rung has reported, the best 1/eta (the better half by
default) are promoted: each restarts from its own rung checkpoint (bit-exact, like any
resume) to the next rung. The rest end as stopped runs with the reason recorded. At the
last rung one variant is left; it trains to the full budget and ends as the race's
winner (a completed run). Every variant stays in the lineage.

That is the "sync" mode: a rung is decided when every variant has reported. The default
mode, "asha" (asynchronous successive halving, Li et al. 2020), does not wait: whenever a
variant finishes a rung it is promoted at once if it ranks in the top floor(m / eta) of
the m variants that have finished that rung so far (`asha_promotions`), so a fast good
variant goes on while slow ones still train; a variant that never ranks there stays
parked at its rung (holding nothing) and ends as lost when the race ends. When nothing
trains and nothing can be promoted, the best parked variant of the highest rung goes
straight to the full budget (as one survivor does in sync mode), so a race always ends.

This module holds the pure decisions (`spread_lr_multipliers`, `race_rungs`,
`decide_rung`, `asha_promotions`) and a small driver (`Races`) that the supervisor ticks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.planner.policy import halving_rungs

if TYPE_CHECKING:
    from onthefly_supervisor.method import MethodOps
    from onthefly_supervisor.supervisor import Supervisor

LR_SPAN = 10.0
"""The lr multipliers of a race span this factor (one decade), log-uniformly."""
MAX_VARIANTS = 16
MODES = ("asha", "sync")
"""How rungs are decided: asynchronously as variants report (asha) or all at once (sync)."""
METRICS = ("slice", "val")
"""What a rung compares: the loss on the fork's selection (`slice:self`) or on val."""
_SPLIT = {"slice": "slice:self", "val": "val"}


# --------------------------------------------------------------------------- pure decisions


def spread_lr_multipliers(center: float, n: int, span: float = LR_SPAN) -> list[float]:
    """`n` lr multipliers spread log-uniformly over [center/sqrt(span), center*sqrt(span)].

    A deterministic grid (not random draws), so a race is reproducible; with an odd `n`
    the middle variant is `center` itself. n=4, center=1: 0.316, 0.681, 1.47, 3.16.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"variants {n!r}: must be an integer >= 1")
    if not (math.isfinite(center) and center > 0):
        raise ValueError(f"lr multiplier {center!r}: must be a positive number")
    if not (math.isfinite(span) and span >= 1):
        raise ValueError(f"span {span!r}: must be >= 1")
    if n == 1:
        return [float(center)]
    return [float(center * span ** (i / (n - 1) - 0.5)) for i in range(n)]


def halvings(n: int, eta: int) -> int:
    """How many rungs cut `n` variants down to one, keeping max(1, alive // eta) each time."""
    k, alive = 0, max(1, n)
    while alive > 1:
        alive = max(1, alive // eta)
        k += 1
    return k


def race_rungs(budget_steps: int, n: int, eta: int) -> list[int]:
    """Cumulative step counts of the rungs; the last is the full budget.

    ValueError (one line) when the budget is too small to give every rung its own steps.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_VARIANTS:
        raise ValueError(f"--variants {n!r}: a race needs 2..{MAX_VARIANTS} variants")
    if isinstance(eta, bool) or not isinstance(eta, int) or not 2 <= eta <= 8:
        raise ValueError(f"race eta {eta!r}: must be an integer in 2..8")
    rungs = halving_rungs(int(budget_steps), n, eta)
    k = halvings(n, eta)
    if len(rungs) != k + 1:
        raise ValueError(
            f"--budget-steps {budget_steps} is too small to race {n} variants in {k + 1} rungs "
            f"(eta {eta}): use at least {eta**k} steps"
        )
    return rungs


@dataclass(frozen=True)
class RungResult:
    """What a rung decided: who goes on, who stops, and why."""

    rung: int
    """0-based index of the rung."""
    step: int
    """The step every variant was compared at."""
    metric: str
    scores: Mapping[str, float | None]
    """Score per variant run; None = no score (failed, stopped early, no evaluation)."""
    ranked: tuple[str, ...]
    """Variants with a finite score, best first (ties broken by variant order)."""
    promoted: tuple[str, ...]
    stopped: tuple[str, ...]
    reasons: Mapping[str, str]
    """Why each stopped variant stopped (one line, for the run's record)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "step": self.step,
            "metric": self.metric,
            "scores": {
                k: (v if v is not None and math.isfinite(v) else None)
                for k, v in self.scores.items()
            },
            "ranked": list(self.ranked),
            "promoted": list(self.promoted),
            "stopped": list(self.stopped),
            "reasons": dict(self.reasons),
        }


def decide_rung(
    scores: Mapping[str, float | None],
    eta: int,
    rung: int,
    step: int,
    metric: str = "slice",
    notes: Mapping[str, str] | None = None,
) -> RungResult:
    """Successive halving at one rung: the best max(1, n // eta) of the n variants that
    entered it go on (lower is better); NaN/Inf and missing scores never go on. Ties go to
    the variant that comes first in `scores` (variant order), so a race is deterministic.

    `notes` explains a missing score (e.g. "failed: ..."); it becomes that variant's reason.
    """
    if eta < 2:
        raise ValueError(f"decide_rung(eta={eta!r}): must be >= 2")
    if not scores:
        raise ValueError("decide_rung: no variants")
    notes = notes or {}
    ranked = tuple(rank(scores, list(scores)))
    finite = {k: _inf(scores[k]) for k in ranked}  # finite already: _inf only narrows the type
    keep = max(1, len(scores) // eta)
    promoted = ranked[:keep]
    stopped = tuple(k for k in scores if k not in promoted)
    what = "slice" if metric == "slice" else metric
    reasons: dict[str, str] = {}
    best = promoted[0] if promoted else ""
    for k in stopped:
        v = scores[k]
        if k in finite:
            reasons[k] = (
                f"lost the race at rung {rung + 1} (step {step}): {what} loss {finite[k]:.4g}, "
                f"ranked {ranked.index(k) + 1} of {len(scores)}; best {best} at {finite[best]:.4g}"
            )
        elif v is not None:
            reasons[k] = f"dropped at rung {rung + 1} (step {step}): its {what} loss is not finite"
        else:
            why = notes.get(k) or f"no {what} loss at step {step}"
            reasons[k] = f"dropped at rung {rung + 1} (step {step}): {why}"
    return RungResult(
        rung=rung,
        step=step,
        metric=metric,
        scores=dict(scores),
        ranked=ranked,
        promoted=tuple(promoted),
        stopped=stopped,
        reasons=reasons,
    )


def rank(scores: Mapping[str, float | None], order: Sequence[str]) -> list[str]:
    """The variants with a finite score, best (lowest) first; a tie goes to the variant that
    comes first in `order` (the race's variant order), so every decision is deterministic."""
    pos = {k: i for i, k in enumerate(order)}
    finite = {k: float(v) for k, v in scores.items() if v is not None and math.isfinite(v)}
    return sorted(finite, key=lambda k: (finite[k], pos[k]))


def asha_promotions(
    finished: Mapping[str, float | None],
    eta: int,
    already: Sequence[str],
    order: Sequence[str] | None = None,
) -> list[str]:
    """ASHA at one rung: of the m variants that have `finished` it so far (with their
    scores; lower is better), the top floor(m / eta) with a finite score go on; returns
    those not promoted `already`, best first. Ties go to the variant earlier in `order`
    (default: the order of `finished`), not to the one that happened to finish first."""
    if eta < 2:
        raise ValueError(f"asha_promotions(eta={eta!r}): must be >= 2")
    ranked = rank(finished, list(finished) if order is None else order)
    done = set(already)
    return [k for k in ranked[: len(finished) // eta] if k not in done]


# --------------------------------------------------------------------------- the driver


@dataclass
class Race:
    race_id: str
    parent: str
    runs: list[str]
    """Every variant's run id, in variant order."""
    recipes: dict[str, dict[str, float]]
    rungs: list[int]
    eta: int
    metric: str
    name: str = ""
    rung: int = 0
    """Index of the rung the alive variants are training towards."""
    alive: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    """running | done | failed"""
    winner: str = ""
    error: str = ""
    mode: str = "sync"
    at: dict[str, int] = field(default_factory=dict)
    """asha: the rung each variant trains towards or is parked at."""
    finished: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """asha: per rung index (as text), the variants that finished it and their scores."""
    promoted: dict[str, list[str]] = field(default_factory=dict)
    """asha: per rung index (as text), the variants promoted out of it, in order."""

    def slots(self, status: Mapping[str, RunStatus]) -> int:
        """Fork slots the race holds now, given each run's status: its variants still going
        (training or queued), and those that stopped at a rung and may still be sent on
        (sync: waiting for their rung's verdict; asha: parked while a variant still going,
        or one that may itself be sent on, can still finish that rung and outrank them).
        Losers, a variant that reached the full budget and an ended race hold none: their
        processes are gone."""
        if self.status != "running":
            return 0
        last = len(self.rungs) - 1
        going = [r for r in self.alive if r in status and not status[r].terminal]
        stopped = [r for r in self.alive if r in status and status[r].terminal]
        if self.mode != "asha":
            return len(going) + (len(stopped) if self.rung < last else 0)
        maybe: list[str] = []
        for k in range(last):
            if any(self.at.get(v, 0) <= k for v in going) or any(
                self.at.get(v, 0) < k for v in maybe
            ):
                maybe += [r for r in stopped if self.at.get(r, 0) == k]
        return len(going) + len(maybe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "race_id": self.race_id,
            "name": self.name,
            "parent": self.parent,
            "runs": list(self.runs),
            "recipes": {k: dict(v) for k, v in self.recipes.items()},
            "rungs": list(self.rungs),
            "eta": self.eta,
            "metric": self.metric,
            "rung": self.rung,
            "alive": list(self.alive),
            "history": list(self.history),
            "status": self.status,
            "winner": self.winner,
            "error": self.error,
            "mode": self.mode,
            "at": dict(self.at),
            "finished": {
                k: {r: (v if v is not None and math.isfinite(v) else None) for r, v in d.items()}
                for k, d in self.finished.items()
            },
            "promoted": {k: list(v) for k, v in self.promoted.items()},
        }


def race_from_dict(d: Mapping[str, Any]) -> Race:
    """A race as `Race.to_dict()` stored it (the store's `race:<id>` meta entry)."""
    return Race(
        race_id=str(d["race_id"]),
        parent=str(d["parent"]),
        runs=[str(x) for x in d["runs"]],
        recipes={str(k): {str(a): float(b) for a, b in v.items()} for k, v in d["recipes"].items()},
        rungs=[int(x) for x in d["rungs"]],
        eta=int(d["eta"]),
        metric=str(d["metric"]),
        name=str(d.get("name", "")),
        rung=int(d.get("rung", 0)),
        alive=[str(x) for x in d.get("alive", [])],
        history=list(d.get("history", [])),
        status=str(d.get("status", "running")),
        winner=str(d.get("winner", "")),
        error=str(d.get("error", "")),
        mode=str(d.get("mode", "sync")),
        at={str(k): int(v) for k, v in (d.get("at") or {}).items()},
        finished={
            str(k): {str(r): (None if v is None else float(v)) for r, v in fin.items()}
            for k, fin in (d.get("finished") or {}).items()
        },
        promoted={str(k): [str(x) for x in v] for k, v in (d.get("promoted") or {}).items()},
    )


class Races:
    """The supervisor side of racing: starts variants, judges rungs, promotes and stops."""

    def __init__(self, sup: Supervisor, method: MethodOps) -> None:
        self.sup = sup
        self.method = method
        self.races: dict[str, Race] = {}
        sup.tick_hooks.append(self.tick)
        # A race between rungs has no live worker; the session must not end then.
        sup.final_hooks.append(self.active)

    def active(self) -> bool:
        return any(r.status == "running" for r in self.races.values())

    def resume(self) -> list[str]:
        """Go on with the races that were running when the session's previous supervisor
        ended (`onthefly resume`): each variant that was training (or queued) when it ended
        restarts from its latest checkpoint, bit-exact like any resume (from the parent's
        checkpoint if it had none yet); finished and parked variants keep their place.
        Returns the ids of the races that go on."""
        st = self.sup.store
        out = []
        for row in st.query("SELECT key FROM meta WHERE key LIKE 'race:%' ORDER BY key"):
            d = st.get_meta(row["key"])
            if not isinstance(d, dict) or d.get("status") != "running":
                continue
            race = race_from_dict(d)
            self.races[race.race_id] = race
            restarted = []
            for rid in race.alive:
                run = st.run(rid)
                if run is None or run.status.terminal:
                    continue  # finished its rung (or ended): the next tick judges it
                ck = st.latest_checkpoint(rid)
                self.sup._set_run_status(rid, RunStatus.PENDING)
                self.method.queue_fork(rid, resume=self.sup.continue_from(rid, ck))
                restarted.append(f"{rid} from {ck['path'] if ck else 'the parent checkpoint'}")
            self.sup.bus.publish(
                "log",
                race.parent,
                level="info",
                text=f"{race.race_id} resumes ({race.mode})"
                + (f": restarting {', '.join(restarted)}" if restarted else ""),
            )
            self._save(race)
            out.append(race.race_id)
        return out

    def _next_id(self) -> str:
        n = 1
        while f"race-{n}" in self.races or self.sup.store.get_meta(f"race:race-{n}") is not None:
            n += 1
        return f"race-{n}"

    def start(
        self,
        parent: str,
        lr_muls: Sequence[float],
        budget: int,
        eta: int,
        metric: str,
        make_fork: Any,
        name: str = "",
        mode: str = "asha",
    ) -> Race:
        """Create the variant runs through `make_fork(lr_mul, name, extra_spec) -> run_id`
        (the MethodOps fork path: same selection, checkpoint and seed) and start rung 1."""
        n = len(lr_muls)
        if metric not in METRICS:
            raise ValueError(f"race metric {metric!r}: one of {', '.join(METRICS)}")
        if mode not in MODES:
            raise ValueError(f"race mode {mode!r}: one of {', '.join(MODES)}")
        rungs = race_rungs(budget, n, eta)
        race_id = self._next_id()
        race = Race(race_id, parent, [], {}, rungs, eta, metric, name=name or race_id, mode=mode)
        first_stop = rungs[0] if len(rungs) > 1 else 0
        for i, m in enumerate(lr_muls):
            extra = {
                "race": {
                    "id": race_id,
                    "variant": i,
                    "rungs": rungs,
                    "eta": eta,
                    "metric": metric,
                    "stop_at": first_stop,
                    "state": "running",
                    "mode": mode,
                }
            }
            run_id = make_fork(float(m), f"{race.name}-v{i}", extra)
            race.runs.append(run_id)
            race.recipes[run_id] = {"lr_mul": float(m)}
            race.at[run_id] = 0
        race.alive = list(race.runs)
        self.races[race_id] = race
        self._save(race)
        return race

    # -- persistence ---------------------------------------------------------------------
    def _save(self, race: Race) -> None:
        d = race.to_dict()
        self.sup.store.set_meta(f"race:{race.race_id}", d)
        self.sup.bus.publish("race", race.parent, **d)

    def _set_spec(self, run_id: str, **race_fields: Any) -> dict[str, Any]:
        """Update a variant's race fields in its spec file (read by its next worker) and row."""
        st = self.sup.store
        run = st.run(run_id)
        assert run is not None
        spec = dict(run.spec)
        spec["race"] = {**dict(spec.get("race") or {}), **race_fields}
        path = os.path.join(self.sup.dir, "forks", run_id, "spec.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        os.replace(tmp, path)
        st.update_run(run_id, spec_json=json.dumps(spec))
        return spec

    # -- the tick ------------------------------------------------------------------------
    def tick(self) -> None:
        for race in list(self.races.values()):
            if race.status == "running":
                if race.mode == "asha":
                    self._advance_asha(race)
                else:
                    self._advance(race)

    def _score(self, run_id: str, step: int, metric: str) -> tuple[float | None, str]:
        rows = self.sup.store.query(
            "SELECT loss FROM evals WHERE run_id = ? AND split = ? AND step = ? ORDER BY t DESC LIMIT 1",
            (run_id, _SPLIT[metric], step),
        )
        if not rows:
            return None, f"it reported no {metric} loss at step {step}"
        v = rows[0]["loss"]
        return (math.inf if v is None else float(v)), ""

    def _advance(self, race: Race) -> None:
        st = self.sup.store
        runs = {rid: st.run(rid) for rid in race.alive}
        if any(r is None or not r.status.terminal for r in runs.values()):
            return  # someone is still training (or queued) towards the rung
        last = race.rung == len(race.rungs) - 1
        step = race.rungs[race.rung]
        if last:
            done = [
                rid for rid, r in runs.items() if r is not None and r.status is RunStatus.COMPLETED
            ]
            if not done:
                errs = [
                    f"{rid}: {r.status.value} {r.error}".strip() for rid, r in runs.items() if r
                ]
                self._finish(race, "", "the last variant did not complete: " + "; ".join(errs))
                return
            final = {rid: self._score(rid, runs[rid].step, race.metric)[0] for rid in done}  # type: ignore[union-attr]
            best = min(done, key=lambda k: (_inf(final[k]), race.runs.index(k)))
            for rid in race.alive:
                if rid != best:
                    self._lose(rid, f"completed, but {best} finished the race better")
            self._win(race, best)
            return
        scores: dict[str, float | None] = {}
        notes: dict[str, str] = {}
        for rid, r in runs.items():
            assert r is not None
            if r.status is RunStatus.STOPPED and r.step >= step:
                scores[rid], note = self._score(rid, step, race.metric)
            else:
                scores[rid] = None
                note = f"it {r.status.value} at step {r.step} before the rung" + (
                    f" ({r.error})" if r.error else ""
                )
            if note:
                notes[rid] = note
        res = decide_rung(scores, race.eta, race.rung, step, race.metric, notes)
        race.history.append(res.to_dict())
        for rid in res.stopped:
            self._lose(rid, res.reasons[rid])
        if not res.promoted:
            self._finish(race, "", f"no variant finished rung {race.rung + 1} with a finite loss")
            return
        # One survivor goes straight to the full budget (a later cut would have no one to cut).
        race.rung = len(race.rungs) - 1 if len(res.promoted) == 1 else race.rung + 1
        race.alive = list(res.promoted)
        for rid in res.promoted:
            if not self._promote(race, rid, race.rung):
                race.alive.remove(rid)
        self.sup.bus.publish(
            "log",
            race.parent,
            level="info",
            text=f"{race.race_id} rung {res.rung + 1} (step {step}, {race.metric} loss): "
            + ", ".join(
                f"{k} {_fmt(res.scores[k])}{' ✓' if k in res.promoted else ''}" for k in res.ranked
            ),
        )
        if not race.alive:
            self._finish(race, "", "no promoted variant could be restarted")
            return
        self._save(race)

    def _promote(self, race: Race, rid: str, rung: int) -> bool:
        """Send a variant on towards `rung` from its rung checkpoint; False if it cannot go."""
        nxt = 0 if rung == len(race.rungs) - 1 else race.rungs[rung]
        self._set_spec(rid, stop_at=nxt, state="running", rung=rung)
        ck = self.sup.store.latest_checkpoint(rid)
        if ck is None:
            self._lose(rid, "promoted, but its rung checkpoint is missing")
            return False
        self.sup._set_run_status(rid, RunStatus.PENDING)
        self.method.queue_fork(rid, resume=str(ck["path"]))
        return True

    def _advance_asha(self, race: Race) -> None:
        st = self.sup.store
        last = len(race.rungs) - 1
        changed = moved = False
        # 1. Variants that reached their rung (or ended before it) are recorded.
        for rid in list(race.alive):
            r = st.run(rid)
            k = race.at.get(rid, 0)
            fin = race.finished.setdefault(str(k), {})
            if r is None or not r.status.terminal or rid in fin:
                continue
            step = race.rungs[k]
            reached = (
                r.status is RunStatus.COMPLETED
                if k == last
                else r.status is RunStatus.STOPPED and r.step >= step
            )
            if reached:
                fin[rid] = self._score(rid, r.step if k == last else step, race.metric)[0]
            else:
                race.alive.remove(rid)
                self._lose(
                    rid,
                    f"dropped at rung {k + 1} (step {step}): it {r.status.value} at step {r.step}"
                    + (f" ({r.error})" if r.error else ""),
                )
            changed = True
        # 2. Promotions, the highest rung first (a variant further on is closer to the end).
        for k in range(last - 1, -1, -1):
            fin = race.finished.get(str(k), {})
            already = race.promoted.setdefault(str(k), [])
            for rid in asha_promotions(fin, race.eta, already, race.runs):
                already.append(rid)
                race.at[rid] = k + 1
                self._record_promotion(race, k, rid, fin)
                if not self._promote(race, rid, k + 1):
                    race.alive.remove(rid)
                changed = moved = True
        # 3. The end: nothing trains and nothing more can be promoted.
        training = [
            rid for rid in race.alive if rid not in race.finished.get(str(race.at.get(rid, 0)), {})
        ]
        if not training and not moved:
            done_last = {
                rid: v for rid, v in race.finished.get(str(last), {}).items() if rid in race.alive
            }
            if not done_last and self._rescue(race):
                changed = True
            else:
                self._end_asha(race, done_last)
                return
        if changed:
            self._save(race)

    def _record_promotion(
        self, race: Race, k: int, rid: str, fin: Mapping[str, float | None]
    ) -> None:
        ranked = rank(fin, race.runs)
        race.history.append(
            {
                "rung": k,
                "step": race.rungs[k],
                "metric": race.metric,
                "scores": {
                    x: (v if v is not None and math.isfinite(v) else None) for x, v in fin.items()
                },
                "ranked": ranked,
                "promoted": [rid],
                "stopped": [],
                "reasons": {},
                "of": len(race.runs),
            }
        )
        self.sup.bus.publish(
            "log",
            race.parent,
            level="info",
            text=f"{race.race_id}: {rid} promoted from rung {k + 1} (step {race.rungs[k]}, "
            f"{race.metric} loss {_fmt(fin.get(rid))}, ranked {ranked.index(rid) + 1} of the "
            f"{len(fin)} that finished it so far)",
        )

    def _rescue(self, race: Race) -> bool:
        """Nothing trains, nothing is promotable and no one reached the full budget (a
        promoted variant failed): the best parked variant of the highest rung goes straight
        to the full budget. False when there is none."""
        last = len(race.rungs) - 1
        for k in range(last - 1, -1, -1):
            fin = race.finished.get(str(k), {})
            moved = set(race.promoted.get(str(k), []))
            parked = {rid: v for rid, v in fin.items() if rid in race.alive and rid not in moved}
            ranked = rank(parked, race.runs)
            if ranked:
                best = ranked[0]
                race.promoted.setdefault(str(k), []).append(best)
                race.at[best] = last
                self._record_promotion(race, k, best, fin)
                if not self._promote(race, best, last):
                    race.alive.remove(best)
                return True
        return False

    def _end_asha(self, race: Race, done_last: Mapping[str, float | None]) -> None:
        if not done_last:
            self._finish(race, "", "no variant reached the full budget")
            for rid in list(race.alive):
                self._lose(rid, "the race ended without a winner")
            return
        best = min(done_last, key=lambda x: (_inf(done_last[x]), race.runs.index(x)))
        for rid in race.alive:
            if rid == best:
                continue
            k = race.at.get(rid, 0)
            if k == len(race.rungs) - 1:
                self._lose(rid, f"completed, but {best} finished the race better")
                continue
            fin = race.finished.get(str(k), {})
            ranked = rank(fin, race.runs)
            v = fin.get(rid)
            if rid in ranked:
                # Where it was cut and its rank there; a variant promoted out of earlier
                # rungs says so (it was in their top 1/eta, just not in this one's).
                past = f", after promotion past rung{'s 1-' if k > 1 else ' '}{k}" if k > 0 else ""
                why = (
                    f"lost the race at rung {k + 1} (step {race.rungs[k]}){past}: {race.metric} "
                    f"loss {_fmt(v)}, ranked {ranked.index(rid) + 1} of the {len(fin)} that "
                    f"finished rung {k + 1}, never in that rung's top 1/{race.eta}"
                )
            else:
                why = f"dropped at rung {k + 1} (step {race.rungs[k]}): " + (
                    "its loss is not finite" if v is not None else f"no {race.metric} loss"
                )
            self._lose(rid, why)
        self._win(race, best)

    def _win(self, race: Race, best: str) -> None:
        self._set_spec(best, state="won")
        self.sup.bus.publish(
            "log",
            best,
            level="info",
            text=f"{race.race_id}: {best} won the race ({race.recipes[best]})",
        )
        self._finish(race, best, "")

    def _lose(self, run_id: str, reason: str) -> None:
        self._set_spec(run_id, state="lost", reason=reason)
        run = self.sup.store.run(run_id)
        if run is not None and run.status in (RunStatus.COMPLETED, RunStatus.FAILED):
            # A completed run stays completed and a failed one failed; the reason is added.
            self.sup.store.update_run(run_id, error=reason)
        else:
            self.sup._set_run_status(run_id, RunStatus.STOPPED, reason)

    def _finish(self, race: Race, winner: str, error: str) -> None:
        if not winner:
            error = self._with_root_cause(race, error)
        race.status = "done" if winner else "failed"
        race.winner = winner
        race.error = error
        race.alive = [winner] if winner else []
        self._save(race)

    def _with_root_cause(self, race: Race, error: str) -> str:
        """A failed race's message, with the root cause of its first failed variant (every
        variant failing, e.g. on the same bad selection, otherwise reads as just "no variant
        reached the full budget")."""
        failed = [
            r
            for r in (self.sup.store.run(rid) for rid in race.runs)
            if r is not None and r.status is RunStatus.FAILED
        ]
        if not failed:
            return error
        who = (
            f"all {len(race.runs)} variants failed"
            if len(failed) == len(race.runs)
            else f"{len(failed)} of {len(race.runs)} variants failed"
        )
        cause = (failed[0].error or "no cause recorded").strip().splitlines()[0]
        return f"{error}: {who}; {failed[0].run_id}: {cause}"


def _inf(v: float | None) -> float:
    return math.inf if v is None or not math.isfinite(v) else v


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
