"""Roll a training run back to a good checkpoint and skip the batches that made it unstable.

`onthefly rollback --skip-step 30 --lr-mul 0.5 --grad-clip 1` (and automode's stabilize
cards) land here through the `Rollback` RPC. The supervisor:

1. maps the offending steps to their batches with the metrics table's (epoch, batch)
   columns, as positions in the epoch's full data order (a run that already skips batches
   trains fewer per epoch, so the recorded position is translated back);
2. picks the latest checkpoint before the first offending step (or the one asked for);
3. stops the run's worker (the ordinary stop path), forgets the abandoned timeline
   (metrics, evals and checkpoints after that checkpoint), records the skipped batches in
   the run's spec (`skipped_batches`, `rollbacks`) and as a `rollback` event;
4. starts a new worker that resumes from the checkpoint with the overrides: the data
   order leaves the skipped batches out (`EpochOrder.skip`, saved in every later
   checkpoint), lr x lr_mul, gradient clipping, and bf16 instead of fp16 mixed precision
   where the GPU supports it (the worker logs what it applied and what it could not).

The RPC answers once the new worker trains again.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.lifecycle import Role, RunStatus, WorkerState

if TYPE_CHECKING:
    from onthefly_supervisor.supervisor import Supervisor

START_TIMEOUT_S = 180.0


def canonical_batch(skipped: list[int], position: int) -> int:
    """Position in the epoch's full order of the `position`-th batch a run trained, given
    the positions (full order) it skips in that epoch; the worker's EpochOrder agrees."""
    for b in sorted(skipped):
        if b <= position:
            position += 1
    return position


def trained_position(skipped: list[int], batch: int) -> int:
    """Inverse of canonical_batch: where a (not skipped) batch sits among the trained ones."""
    return batch - sum(1 for b in skipped if b < batch)


@dataclass
class _Pending:
    run_id: str
    checkpoint: str
    to_step: int
    spec_file: str
    record: dict[str, Any]
    skipped: list[dict[str, Any]]
    old_worker: str
    phase: str = "stopping"
    new_worker: str = ""
    ok: bool = False
    message: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class Rollbacks:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        sup.control_hooks["Rollback"] = self.rollback
        sup.tick_hooks.append(self.tick)
        # Between the old worker's exit and the new one's start the session must not end.
        sup.final_hooks.append(lambda: bool(self.pending))

    def _err(self, code: grpc.StatusCode, msg: str) -> Exception:
        from onthefly_supervisor.supervisor import ControlError

        return ControlError(code, msg)

    # -- the RPC -----------------------------------------------------------------------------
    def rollback(self, req: pb.RollbackRequest) -> pb.ActionReply:
        sup, st = self.sup, self.sup.store
        run = sup.resolve_run(req.run or "main")
        pre = grpc.StatusCode.FAILED_PRECONDITION
        if run.kind != "main":
            raise self._err(
                pre, f"rollback restarts the training run (main); {run.run_id} is a {run.kind}"
            )
        if sup.cfg.owner_pid:
            raise self._err(
                pre,
                "the training run is your own `python train.py` process, which the supervisor "
                "cannot restart; start it with `onthefly run SCRIPT` to allow rollbacks",
            )
        if str((run.config or {}).get("framework", "")) == "lightning":
            raise self._err(
                pre,
                f"run {run.run_id} is an attach_lightning run: rollback (skipping batches, "
                "lr/clip overrides on restart) is built for Trainer.fit runs only; nothing "
                "was changed",
            )
        w = sup.live_worker(run.run_id)
        if w is None:
            raise self._err(
                pre, f"run {run.run_id} has no live worker (status: {run.status.value})"
            )
        for name, v in (("lr_mul", req.lr_mul), ("grad_clip", req.grad_clip)):
            if not (math.isfinite(v) and 0 <= v <= 1000):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a number in [0, 1000]")
        prior = [dict(b) for b in run.spec.get("skipped_batches", [])]
        skip_of: dict[int, list[int]] = {}
        for old in prior:
            skip_of.setdefault(int(old["epoch"]), []).append(int(old["batch"]))
        new: list[dict[str, Any]] = []
        for s in sorted(set(req.skip_steps)):
            rows = st.query(
                "SELECT epoch, batch, loss, grad_norm FROM metrics WHERE run_id = ? AND step = ?"
                " ORDER BY rowid DESC LIMIT 1",
                (run.run_id, int(s)),
            )
            if not rows:
                raise ValueError(f"--skip-step {s}: run {run.run_id} has no metrics at step {s}")
            if rows[0]["batch"] is None:
                raise ValueError(
                    f"--skip-step {s}: the metrics of step {s} do not say which batch it was "
                    "(written by an older version); use --skip EPOCH:BATCH"
                )
            e = int(rows[0]["epoch"])
            new.append(
                {
                    "epoch": e,
                    "batch": canonical_batch(skip_of.get(e, []), int(rows[0]["batch"])),
                    "step": int(s),
                    "loss": rows[0]["loss"],
                    "grad_norm": rows[0]["grad_norm"],
                }
            )
        for ref in req.skip_batches:
            e, bi = int(ref.epoch), int(ref.batch)
            if e < 0 or bi < 0:
                raise ValueError(f"--skip {e}:{bi}: epoch and batch must be >= 0")
            if bi in skip_of.get(e, []):
                raise ValueError(f"batch {bi} of epoch {e} is already skipped")
            per_epoch, epochs = sup.shape.get(run.run_id, (0, 0))
            if per_epoch and bi >= per_epoch:
                raise ValueError(
                    f"--skip {e}:{bi}: run {run.run_id} has {per_epoch} batches an epoch "
                    f"(0..{per_epoch - 1})"
                )
            if epochs and e >= epochs:
                raise ValueError(
                    f"--skip {e}:{bi}: run {run.run_id} trains {epochs} epochs (0..{epochs - 1})"
                )
            rows = st.query(
                "SELECT step, loss, grad_norm FROM metrics WHERE run_id = ? AND epoch = ? AND batch = ?"
                " ORDER BY rowid DESC LIMIT 1",
                (run.run_id, e, trained_position(skip_of.get(e, []), bi)),
            )
            new.append(
                {
                    "epoch": e,
                    "batch": bi,
                    "step": int(rows[0]["step"]) if rows else None,
                    "loss": rows[0]["loss"] if rows else None,
                    "grad_norm": rows[0]["grad_norm"] if rows else None,
                }
            )
        seen: set[tuple[int, int]] = {(int(b["epoch"]), int(b["batch"])) for b in prior}
        unique: list[dict[str, Any]] = []
        for b in new:
            if (b["epoch"], b["batch"]) not in seen:
                seen.add((b["epoch"], b["batch"]))
                unique.append(b)
        new = unique
        if not new and not req.checkpoint:
            raise ValueError(
                "nothing to roll back: name the batches to skip (--skip-step STEP or --skip "
                "EPOCH:BATCH) or a --checkpoint"
            )
        steps = [int(b["step"]) for b in new if b["step"] is not None]
        first = min(steps) if steps else None
        cks = st.checkpoints(run.run_id)
        if req.checkpoint:
            ck = next((c for c in cks if c["path"] == req.checkpoint), None)
            if ck is None:
                raise self._err(
                    grpc.StatusCode.NOT_FOUND,
                    f"checkpoint {req.checkpoint!r} is not one of run {run.run_id}'s",
                )
            if first is not None and int(ck["step"]) >= first:
                raise ValueError(
                    f"checkpoint {req.checkpoint} is at step {ck['step']}, not before the first "
                    f"skipped batch (step {first})"
                )
        else:
            good = [c for c in cks if first is None or int(c["step"]) < first]
            if not good:
                raise self._err(
                    pre,
                    f"run {run.run_id} has no checkpoint before step {first} to roll back to "
                    f"(checkpoints at steps {[c['step'] for c in cks] or 'none'}); "
                    "checkpoint_every_n_steps (or checkpoint_min_interval_s=0, every epoch end) "
                    "makes them more frequent",
                )
            ck = max(good, key=lambda c: (int(c["step"]), float(c["t"])))
        with self._lock:
            if run.run_id in self.pending:
                raise self._err(pre, f"a rollback of {run.run_id} is already in progress")
            n = len(run.spec.get("rollbacks", [])) + 1
            reason = req.reason or "rollback requested"
            for item in new:
                item.update(reason=reason, rollback=n)
            record = {
                "n": n,
                "from_step": int(run.step),
                "to_step": int(ck["step"]),
                "checkpoint": str(ck["path"]),
                "skipped": [
                    {"epoch": b["epoch"], "batch": b["batch"], "step": b["step"]} for b in new
                ],
                "lr_mul": float(req.lr_mul or 1.0),
                "grad_clip": float(req.grad_clip),
                "bf16": bool(req.bf16),
                "reason": reason,
                "time": time.time(),
            }
            overrides = {
                "checkpoint": str(ck["path"]),
                "skip": sorted({(int(b["epoch"]), int(b["batch"])) for b in prior + new}),
                "lr_mul": record["lr_mul"],
                "grad_clip": record["grad_clip"],
                "bf16": record["bf16"],
                "reason": reason,
            }
            d = os.path.join(sup.dir, "rollbacks")
            os.makedirs(d, exist_ok=True)
            spec_file = os.path.join(d, f"{run.run_id}-{n}.json")
            with open(spec_file, "w", encoding="utf-8") as f:
                json.dump({"rollback": overrides}, f)
            st.pin_checkpoint(str(ck["path"]))
            p = _Pending(
                run.run_id,
                str(ck["path"]),
                int(ck["step"]),
                spec_file,
                record,
                new,
                w.spec.worker_id,
            )
            self.pending[run.run_id] = p
        try:
            sup.request_stop(
                run.run_id, f"rollback to step {ck['step']} ({reason})", skip_test=True
            )
        except Exception:
            with self._lock:
                self.pending.pop(run.run_id, None)
            raise
        if not p.done.wait(START_TIMEOUT_S):
            raise self._err(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the rollback of {run.run_id} did not restart its worker within {START_TIMEOUT_S:.0f} s",
            )
        if not p.ok:
            raise self._err(pre, p.message)
        return pb.ActionReply(
            ok=True, run_id=run.run_id, message=p.message, payload_json=json.dumps(record)
        )

    # -- the tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.pending:
            return
        for p in list(self.pending.values()):
            try:
                self._advance(p)
            except Exception as e:  # never leave a caller waiting on a broken rollback
                self._end(p, False, f"rollback failed: {type(e).__name__}: {e}")

    def _end(self, p: _Pending, ok: bool, message: str) -> None:
        with self._lock:
            self.pending.pop(p.run_id, None)
        p.ok, p.message = ok, message
        p.done.set()

    def _advance(self, p: _Pending) -> None:
        sup, st = self.sup, self.sup.store
        if p.phase == "stopping":
            old = sup.workers.get(p.old_worker)
            if old is not None and not old.state.terminal:
                return
            with sup.lock:
                others = [
                    w
                    for w in sup.workers.values()
                    if w.spec.run_id == p.run_id
                    and w.spec.worker_id != p.old_worker
                    and not w.state.terminal
                ]
            run = st.run(p.run_id)
            if run is None:
                self._end(p, False, f"run {p.run_id} disappeared")
                return
            if others:
                self._end(
                    p, False, f"{p.run_id} was restarted meanwhile ({others[0].spec.worker_id})"
                )
                return
            if run.status is RunStatus.COMPLETED:
                self._end(
                    p,
                    False,
                    f"{p.run_id} completed before the rollback could stop it; nothing was rolled back",
                )
                return
            ckpts = st.checkpoints(p.run_id)
            pinned = {c["path"] for c in ckpts if c["pinned"]}
            ck_row = next((c for c in ckpts if c["path"] == p.checkpoint), None)
            if ck_row is not None:
                # Later epochs' per-sample losses belong to the abandoned timeline; the rest of
                # the checkpoint's own epoch is reset by the resumed worker (it knows the order).
                sup.arrays.drop_epochs_after(p.run_id, int(ck_row["epoch"]))
            for rel in st.discard_after(p.run_id, p.to_step):
                if rel in pinned:
                    continue  # a fork started from it: keep the file
                try:
                    os.unlink(os.path.join(sup.dir, rel))
                except FileNotFoundError:
                    pass
            spec = dict(run.spec)
            spec["skipped_batches"] = list(spec.get("skipped_batches", [])) + p.skipped
            spec["rollbacks"] = list(spec.get("rollbacks", [])) + [p.record]
            st.update_run(p.run_id, spec_json=json.dumps(spec))
            sup._set_run_status(p.run_id, RunStatus.PENDING)
            started = sup.spawn(p.run_id, Role.TRAIN, resume=p.checkpoint, spec_file=p.spec_file)
            p.new_worker, p.phase = started.spec.worker_id, "starting"
            sup.bus.publish("rollback", p.run_id, **p.record)
            return
        w = sup.workers.get(p.new_worker)
        if w is None:
            self._end(p, False, "the restarted worker is gone")
            return
        if w.state.terminal:
            cause = w.exit.describe() if w.exit else w.state.value
            self._end(p, False, f"the restarted worker of {p.run_id} ended: {cause}")
            return
        if w.state in (WorkerState.RUNNING, WorkerState.PAUSED):
            r = p.record
            skipped = ", ".join(
                f"(epoch {b['epoch']}, batch {b['batch']}"
                + (f", step {b['step']})" if b["step"] is not None else ")")
                for b in r["skipped"]
            )
            extra = [f"lr x{r['lr_mul']:g}"] if r["lr_mul"] != 1.0 else []
            if r["grad_clip"]:
                extra.append(f"grad clip {r['grad_clip']:g}")
            if r["bf16"]:
                extra.append("bf16 where supported")
            self._end(
                p,
                True,
                f"{p.run_id} rolled back from step {r['from_step']} to step {r['to_step']} "
                f"({r['checkpoint']}), skipping {skipped or 'no batch'}"
                + (f"; {', '.join(extra)}" if extra else "")
                + f"; worker {w.spec.worker_id} trains again",
            )
