"""Fork, gate, merge, compare, export-model: the method's orchestration in the supervisor.

Forks are new worker processes (the user's script, role=fork) pinned to a GPU by the
allocator and capped in number; gates, merges, comparisons and model exports are jobs
for the one long-lived merge worker (role=merge). Every result is a new run in the
lineage; the parent stays the catch-all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import selection as sel
from onthefly_supervisor.lifecycle import Role, RunStatus, WorkerState
from onthefly_supervisor.store import RunRow

if TYPE_CHECKING:
    from onthefly_supervisor.supervisor import PendingAck, Supervisor

MERGE_METHODS = ("swa", "distill", "fisher_soup", "adapter_fuse")
HEALTH_CHECKS = ("determinism", "numerics", "gradients", "activations", "data", "throughput")
DETERMINISM_STEPS = 5
"""K: training steps the determinism check replays (twice) from the checkpoint."""
DETERMINISM_TIMEOUT_S = 300.0
"""The side process's time for start-up (the script up to fit) and both replays."""
MERGE_RUN = "merger"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The ids runs are given (fork-3, merge-1, moe-2, race-1...), and the main run's.
_AUTO_ID = re.compile(r"main|(fork|merge|moe|race|variant|standby|health)-\d+(-\d+)?")
EMBED_DIMS = 16
"""Width of the penultimate-layer embedding a kmeans selection asks a live worker for."""
EMBED_TIMEOUT_S = 30.0
"""How long a kmeans fork waits for the parent's embedding (one inference pass over the
training set). Past it the fork goes on with the newest saved embedding, if any; the
worker still finishes and writes its file, so the next selection has it."""
EMBED_ENDED_TIMEOUT_S = 180.0
"""An ended run is embedded by the merge worker: its start-up (the script up to fit) included."""


@dataclass
class Job:
    job_id: str
    spec: dict[str, Any]
    out_run: str
    ack: PendingAck | None = None
    sent: bool = False
    created: float = field(default_factory=time.time)


class MethodOps:
    def __init__(self, sup: Supervisor) -> None:
        from onthefly_supervisor.supervisor import ControlError

        self.sup = sup
        self.ControlError = ControlError
        self.jobs: list[Job] = []
        self.fork_queue: list[str] = []
        self.fork_resume: dict[str, str] = {}
        self.merge_worker_id = ""
        self._ids_lock = threading.Lock()
        self._reserved_ids: set[str] = set()
        sup.control_hooks.update(
            {
                "Fork": self.fork,
                "Merge": self.merge,
                "TrainGate": self.gate,
                "CompareExperts": self.compare,
                "ExportModel": self.export_model,
                "RunHealthCheck": self.health,
                "ExportSlice": self.export_slice,
                "ExportSession": self.export_session,
                "ImportSession": self.import_session,
            }
        )
        sup.tick_hooks.append(self.tick)
        sup.busy_hooks.append(lambda: bool(self.jobs) or bool(self.fork_queue))
        from onthefly_supervisor.rollback import Rollbacks
        from onthefly_supervisor.variants import Races

        self.races = Races(sup, self)
        self.rollbacks = Rollbacks(sup)

    def _err(self, code: grpc.StatusCode, msg: str) -> Exception:
        return self.ControlError(code, msg)

    def _next_id(self, prefix: str, reserve: bool = True) -> str:
        """The next free run id; reserved until the process ends, so two requests served at
        once (automode starts a fork and an explore race in the same round) never get the
        same id before either run is in the store."""
        with self._ids_lock:
            ids = {r.run_id for r in self.sup.store.runs()} | self._reserved_ids
            n = 1
            while f"{prefix}-{n}" in ids:
                n += 1
            if reserve:
                self._reserved_ids.add(f"{prefix}-{n}")
            return f"{prefix}-{n}"

    def _check_name(self, name: str) -> None:
        """A run's --name is another way to refer to it (`--run NAME`), so it must be one:
        made of letters, digits, '.', '_', '-', not an id another run has or will get
        (fork-N, merge-N, moe-N...), and not the name of a run already in the session."""
        if not name:
            return
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"--name {name[:40]!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit"
            )
        if _AUTO_ID.fullmatch(name):
            raise ValueError(f"--name {name!r}: names like this are run ids; choose another")
        owner = next((r.run_id for r in self.sup.store.runs() if name in (r.run_id, r.name)), None)
        if owner is None and name in self._reserved_ids:
            owner = name
        if owner is not None:
            raise ValueError(f"--name {name!r}: run {owner} already has that name or id")

    # -- selection over the parent's latest per-sample losses ---------------------------------
    def _loss_epochs(self, run_id: str) -> list[int]:
        """The epochs with per-sample losses; a clear error when there are none yet."""
        epochs = self.sup.arrays.epochs(run_id)
        if not epochs:
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id} has no per-sample losses yet; let it train for a few steps",
            )
        return epochs

    def latest_losses(self, run_id: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        arrays = self.sup.arrays
        epochs = self._loss_epochs(run_id)
        losses: np.ndarray | None = None
        margin: np.ndarray | None = None
        for e in reversed(epochs):  # the most recent loss known for every sample
            a = arrays.get(run_id, e)
            if a is None:
                continue
            m = arrays.get(run_id, e, "margin")
            if losses is None:
                losses = a.astype(np.float32, copy=True)
                margin = m.astype(np.float32, copy=True) if m is not None else None
            else:
                fill = ~np.isfinite(losses) & np.isfinite(a)
                losses[fill] = a[fill]
                if margin is not None and m is not None:
                    margin[fill] = m[fill]
            if np.isfinite(losses).all():
                break
        assert losses is not None
        labels = arrays.get(run_id, -1, "labels")
        return losses, margin, labels

    def embedding(self, run_id: str, n: int) -> tuple[np.ndarray | None, str]:
        """The run's penultimate-layer embedding as float32 (n, d) rows by sample id, and a
        note for the selection's description ("embedding: ..." or "no embedding (why)").

        A live worker is asked for a fresh one (onthefly_worker/embed.py; one inference pass,
        never a per-step cost); a run that has ended is embedded from its latest checkpoint
        by the merge worker (`embed_ended_run`). When neither answers, the newest saved
        samples/<run>/embed-step-*.npy is used.
        """
        from onthefly_supervisor.slices import embedding_features

        if self.sup.live_worker(run_id) is not None:
            rel, why = self.request_embedding(run_id)
        else:
            rel, why = self.embed_ended_run(run_id)
        return embedding_features(self.sup.dir, run_id, n, fresh=rel, why=why)

    def embed_ended_run(self, run_id: str) -> tuple[str, str]:
        """A run without a live worker (it ended): its saved embedding when one is as new as
        its latest checkpoint, else the merge worker embeds that checkpoint. (path, "") or
        ("", why not)."""
        from onthefly_supervisor.slices import newest_embedding

        run = self.sup.resolve_run(run_id)
        if run.kind == "moe":
            return "", f"{run_id} is an MoE run (no single penultimate layer)"
        ck = self.sup.store.latest_checkpoint(run_id)
        if ck is None:
            return "", f"run {run_id} has no live worker and no checkpoint"
        saved = newest_embedding(self.sup.dir, run_id)
        if saved is not None and saved[1] >= int(ck["step"]):
            return saved[0], ""
        try:
            job = self._submit(
                {"job": "embed", "run": self._entry(run), "max_dims": EMBED_DIMS}, ""
            )
            ack = self._wait(job, EMBED_ENDED_TIMEOUT_S)
        except self.ControlError as e:
            return "", e.message
        payload = ack.payload if isinstance(ack.payload, dict) else {}
        if ack.ok and payload.get("path"):
            return str(payload["path"]), ""
        return "", str(ack.message or "the merge worker did not embed")

    def request_embedding(self, run_id: str) -> tuple[str, str]:
        """Ask the run's live worker to write its embedding: (relative path, "") on success,
        ("", why not) otherwise (no live worker, no nn.Linear, no answer in time...)."""
        sup = self.sup
        if sup.live_worker(run_id) is None:
            return "", f"run {run_id} has no live worker"
        try:
            _, ack = sup.command(
                run_id, wait=True, timeout=EMBED_TIMEOUT_S, embed=pb.Embed(max_dims=EMBED_DIMS)
            )
        except self.ControlError as e:
            return "", e.message
        payload = ack.payload if isinstance(ack.payload, dict) else {}
        if ack.ok and payload.get("path"):
            return str(payload["path"]), ""
        return "", str(payload.get("reason") or ack.message or "the worker did not embed")

    # -- fork --------------------------------------------------------------------------------
    def fork(self, req: pb.ForkRequest) -> pb.ActionReply:
        sup = self.sup
        self._check_name(req.name)
        parent = sup.resolve_run(req.run or "main")
        if parent.kind == "moe":
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot fork the MoE run {parent.run_id}; fork one of its experts",
            )
        if parent.kind == "merge":
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot fork {parent.run_id}: a merge ({parent.spec.get('method', '')} of "
                f"{', '.join(parent.parents)}) has weights but never trained (no per-sample "
                "losses, no data order to go on from); fork one of its parents, or "
                f"`onthefly export-model --run {parent.run_id}` to use its weights",
            )
        if parent.spec.get("adapters_rank"):
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot fork {parent.run_id}: it trains rank-{parent.spec.get('adapters_rank')} "
                "adapters on frozen base weights, which a fork does not continue; fork its "
                f"parent ({', '.join(parent.parents) or 'main'}) instead, with --adapters RANK "
                "for another adapter fork",
            )
        budget = int(req.budget_steps or 300)
        if not 1 <= budget <= 10_000_000:
            raise ValueError(f"--budget-steps {budget}: must be in 1..10000000")
        lr_mul = float(req.lr_mul or 1.0)
        wd_mul = float(req.wd_mul) if req.HasField("wd_mul") else 1.0
        if not (math.isfinite(lr_mul) and 0 < lr_mul <= 1000):
            raise ValueError(f"--lr-mul {lr_mul}: must be a finite number in (0, 1000]")
        if not (math.isfinite(wd_mul) and 0 <= wd_mul <= 1000):
            raise ValueError(
                f"--wd-mul {wd_mul}: must be a finite number in [0, 1000] (0 = no weight decay)"
            )
        if req.adapters_rank < 0 or req.adapters_rank > 4096:
            raise ValueError(
                f"--adapters {req.adapters_rank}: must be 0 (full weights) or a rank in 1..4096"
            )
        race = self._race_options(req, parent, lr_mul)
        early = self._early_stop_options(req, parent, budget)
        spec_str = req.select or "all"
        cwd = str(sup.store.get_meta("cwd", os.getcwd()))
        parsed = sel.parse_spec(spec_str)  # a bad spec fails before any embedding work
        self._loss_epochs(parent.run_id)  # a clear error when it has none yet
        # The selection reads the arrays from the session folder, exactly as export-slice
        # and `onthefly clusters` do (the same spec picks the same samples in all three).
        sup.arrays.persist()
        from onthefly_supervisor.slices import select_in_session, selection_seed

        seed = selection_seed(sup.store.get_meta("seed", 0))

        _, _, _, _, selection = select_in_session(
            sup.dir, parent.run_id, parsed, base_dir=cwd, embedding=self.embedding, recent=True
        )
        # Too few samples to train on: refused now, not by a fork failing at its first step.
        small = sel.check_fork_size(selection, self._batch_size())
        if small:
            selection.description += f"; {small}"
        ckpt_rel = self._parent_checkpoint(parent, req.checkpoint)
        if race is not None:
            return self._start_race(
                req, parent, selection, ckpt_rel, budget, wd_mul, seed, *race, early=early
            )
        run_id = self._create_fork(
            parent,
            selection,
            ckpt_rel,
            budget,
            lr_mul,
            wd_mul,
            int(req.adapters_rank),
            req.name,
            seed,
            early,
        )
        self._start_queued_forks()
        return pb.ActionReply(
            ok=True,
            run_id=run_id,
            message=f"{run_id}: fork of {parent.run_id} on {selection.indices.size} samples ({selection.description}), budget {budget} steps"
            + (
                f", training rank-{req.adapters_rank} low-rank adapters (the base weights frozen)"
                if req.adapters_rank
                else ""
            )
            + _early_note(early),
            payload_json=json.dumps(
                {
                    "samples": int(selection.indices.size),
                    "selection": selection.spec,
                    "checkpoint": ckpt_rel,
                    **early,
                }
            ),
        )

    def _early_stop_options(
        self, req: pb.ForkRequest, parent: RunRow, budget: int
    ) -> dict[str, Any]:
        """`{"early_stop": {patience, metric, min_delta, every}}` for the fork spec, or {}
        when the fork trains its whole budget; one-line errors."""
        patience = int(req.early_stop_patience)
        others = req.early_stop_metric or req.early_stop_min_delta or req.early_stop_every
        if patience < 0 or patience > 1_000_000:
            raise ValueError(f"--early-stop-patience {patience}: must be in 0..1000000 (0 = off)")
        if patience == 0:
            if others:
                raise ValueError(
                    "--early-stop-metric/--early-stop-min-delta/--early-stop-every need "
                    "--early-stop-patience N (N >= 1)"
                )
            return {}
        metric = req.early_stop_metric or "slice"
        if metric not in ("slice", "val"):
            raise ValueError(f"--early-stop-metric {metric!r}: one of slice, val")
        if metric == "val" and not any(
            e["split"] == "val" for e in self.sup.store.evals(parent.run_id)
        ):
            raise ValueError(
                f"--early-stop-metric val: run {parent.run_id} reports no validation loss "
                "(give fit() a val_loader and val_every_n_epochs)"
            )
        min_delta = float(req.early_stop_min_delta)
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"--early-stop-min-delta {min_delta}: must be a finite number >= 0")
        every = int(req.early_stop_every)
        if every < 0:
            raise ValueError(f"--early-stop-every {every}: must be >= 1 (0 = budget / 10)")
        every = every or max(1, budget // 10)
        if patience * every >= budget:
            raise ValueError(
                f"--early-stop-patience {patience} with an evaluation every {every} steps "
                f"cannot stop a {budget}-step fork before its end; lower the patience or "
                "--early-stop-every"
            )
        return {
            "early_stop": {
                "patience": patience,
                "metric": metric,
                "min_delta": min_delta,
                "every": every,
            }
        }

    def _batch_size(self) -> int | None:
        """The training loader's batch size (every worker runs the same script), estimated
        from the main run's dataset size and steps per epoch, or from its samples per step;
        None when unknown."""
        main = self.sup.store.run("main")
        if main is None:
            return None
        steps = self.sup.shape.get("main", (0, 0))[0]
        if main.dataset_size > 0 and steps > 0:
            return math.ceil(main.dataset_size / steps)
        if main.step > 0 and main.sample_steps > 0:
            return round(main.sample_steps / main.step)
        return None

    def _race_options(
        self, req: pb.ForkRequest, parent: RunRow, lr_mul: float
    ) -> tuple[list[float], int, str, str] | None:
        """(lr multipliers, eta, metric, mode) of a race, None for a single fork; one-line
        errors."""
        from onthefly_supervisor import variants as va

        if req.variants < 0:
            raise ValueError(f"--variants {req.variants}: must be >= 1")
        muls = [float(m) for m in req.variant_lr_muls]
        if muls:
            if req.variants not in (0, len(muls)):
                raise ValueError(
                    f"--variants {req.variants} but {len(muls)} variant lr multipliers were given"
                )
            if len(muls) < 2:
                raise ValueError("variant_lr_muls: a race needs at least 2 variants")
            for m in muls:
                if not (math.isfinite(m) and 0 < m <= 1000):
                    raise ValueError(
                        f"variant lr multiplier {m}: must be a finite number in (0, 1000]"
                    )
        elif req.variants > 1:
            if req.variants > va.MAX_VARIANTS:
                raise ValueError(f"--variants {req.variants}: at most {va.MAX_VARIANTS}")
            muls = va.spread_lr_multipliers(lr_mul, int(req.variants))
        else:
            if req.race_eta or req.race_metric or req.race_mode:
                raise ValueError("race_eta/race_metric/race_mode need --variants N (N >= 2)")
            return None
        eta = int(req.race_eta or 2)
        metric = req.race_metric or "slice"
        if metric not in va.METRICS:
            raise ValueError(f"race metric {metric!r}: one of {', '.join(va.METRICS)}")
        if metric == "val" and not any(
            e["split"] == "val" for e in self.sup.store.evals(parent.run_id)
        ):
            raise ValueError(
                f"race metric val: run {parent.run_id} reports no validation loss "
                "(give fit() a val_loader and val_every_n_epochs)"
            )
        mode = req.race_mode or "asha"
        if mode not in va.MODES:
            raise ValueError(f"race mode {mode!r}: one of {', '.join(va.MODES)}")
        va.race_rungs(int(req.budget_steps or 300), len(muls), eta)  # validates the budget
        return muls, eta, metric, mode

    def _start_race(
        self,
        req: pb.ForkRequest,
        parent: RunRow,
        selection: sel.Selection,
        ckpt_rel: str,
        budget: int,
        wd_mul: float,
        seed: int,
        muls: list[float],
        eta: int,
        metric: str,
        mode: str,
        early: dict[str, Any] | None = None,
    ) -> pb.ActionReply:
        # One data order for every variant: they differ only in their recipe.
        common = {
            "seed": seed + 1000 + int(self._next_id("fork", reserve=False).split("-")[1]),
            **(early or {}),
        }

        def make(m: float, name: str, extra: dict[str, Any]) -> str:
            return self._create_fork(
                parent,
                selection,
                ckpt_rel,
                budget,
                m,
                wd_mul,
                int(req.adapters_rank),
                name,
                seed,
                {**common, **extra},
            )

        race = self.races.start(
            parent.run_id, muls, budget, eta, metric, make, name=req.name, mode=mode
        )
        self._start_queued_forks()
        rungs = "/".join(str(r) for r in race.rungs)
        return pb.ActionReply(
            ok=True,
            run_id=race.runs[0],
            message=f"{race.race_id}: {len(race.runs)} variants of {parent.run_id} ({', '.join(race.runs)}) "
            f"on {selection.indices.size} samples ({selection.description}), lr x"
            + "/".join(f"{m:.3g}" for m in muls)
            + f"; rungs at {rungs} steps, each keeps the best 1/{eta} by {metric} loss ({mode})"
            + _early_note(early or {}, race=True),
            payload_json=json.dumps(
                {
                    "race": race.race_id,
                    "runs": race.runs,
                    "lr_muls": muls,
                    "rungs": race.rungs,
                    "eta": eta,
                    "metric": metric,
                    "mode": mode,
                    "samples": int(selection.indices.size),
                    "selection": selection.spec,
                    "checkpoint": ckpt_rel,
                    **(early or {}),
                }
            ),
        )

    def _create_fork(
        self,
        parent: RunRow,
        selection: sel.Selection,
        ckpt_rel: str,
        budget: int,
        lr_mul: float,
        wd_mul: float,
        adapters_rank: int,
        name: str,
        seed: int,
        extra_spec: dict[str, Any] | None = None,
    ) -> str:
        """Create one fork run (spec, selection file, lineage) and queue its worker."""
        sup = self.sup
        run_id = self._next_id("fork")
        fdir = os.path.join(sup.dir, "forks", run_id)
        os.makedirs(fdir, exist_ok=True)
        np.save(os.path.join(fdir, "indices.npy"), selection.indices)
        spec = {
            "parent": parent.run_id,
            "checkpoint": ckpt_rel,
            "indices_file": os.path.join("forks", run_id, "indices.npy"),
            "selection": selection.spec,
            "description": selection.description,
            "budget_steps": budget,
            "lr_mul": lr_mul,
            "wd_mul": wd_mul,
            "adapters_rank": adapters_rank,
            "name": name or run_id,
            "seed": seed + 1000 + int(run_id.split("-")[1]),
            "samples": int(selection.indices.size),
            "selection_extra": selection.extra,
            **(extra_spec or {}),
        }
        with open(os.path.join(fdir, "spec.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f)
        if selection.clusters:
            with open(os.path.join(fdir, "clusters.json"), "w", encoding="utf-8") as f:
                json.dump(
                    [
                        {
                            "id": c.id,
                            "size": c.size,
                            "mean_loss": c.mean_loss,
                            "label_mix": c.label_mix,
                        }
                        for c in selection.clusters
                    ],
                    f,
                    default=str,
                )
        sup.store.pin_checkpoint(ckpt_rel)
        sup.store.add_run(
            RunRow(
                run_id,
                name or run_id,
                "fork",
                RunStatus.PENDING,
                [parent.run_id],
                time.time(),
                spec=spec,
                dataset_size=parent.dataset_size,
            )
        )
        sup.bus.publish("run_created", run_id, run=sup.store.run(run_id).to_dict())  # type: ignore[union-attr]
        self.fork_queue.append(run_id)
        return run_id

    def queue_fork(self, run_id: str, resume: str = "") -> None:
        """Queue a fork worker for an existing fork run (a promoted race variant resumes)."""
        if resume:
            self.fork_resume[run_id] = resume
        self.fork_queue.append(run_id)
        self._start_queued_forks()

    def _parent_checkpoint(self, parent: RunRow, requested: str) -> str:
        sup = self.sup
        if requested:
            known = {c["path"] for c in sup.store.checkpoints(parent.run_id)}
            if requested not in known:
                raise self._err(
                    grpc.StatusCode.NOT_FOUND,
                    f"checkpoint {requested!r} is not one of run {parent.run_id}'s",
                )
            return requested
        if sup.live_worker(parent.run_id) is not None:
            # A fresh checkpoint, so the fork starts from the parent's current weights.
            _, ack = sup.command(
                parent.run_id, wait=True, timeout=60.0, checkpoint=pb.CheckpointNow(reason="fork")
            )
            if ack.ok and ack.payload and ack.payload.get("checkpoint"):
                deadline = time.time() + 10
                rel = str(ack.payload["checkpoint"])
                while time.time() < deadline and not any(
                    c["path"] == rel for c in sup.store.checkpoints(parent.run_id)
                ):
                    time.sleep(0.02)
        ck = sup.store.latest_checkpoint(parent.run_id)
        if ck is None:
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {parent.run_id} has no checkpoint to fork from yet",
            )
        return str(ck["path"])

    def _start_queued_forks(self) -> None:
        sup = self.sup
        with sup.lock:
            # A fork that has reported its end and holds no GPU is only exiting (seconds of
            # interpreter teardown): its slot is free for the next queued fork.
            live = sum(
                1
                for w in sup.workers.values()
                if w.spec.role is Role.FORK
                and not w.state.terminal
                and not (w.spec.worker_id in sup.finished and not w.spec.gpu)
            )
        while self.fork_queue and live < sup.cfg.max_parallel_forks:
            run_id = self.fork_queue.pop(0)
            spec_file = os.path.join(sup.dir, "forks", run_id, "spec.json")
            resume = self.fork_resume.pop(run_id, "")
            sup.spawn(run_id, Role.FORK, resume=resume, spec_file=spec_file, gpu=True)
            live += 1

    # -- merge-worker jobs ---------------------------------------------------------------------
    def _ensure_merge_worker(self) -> None:
        sup = self.sup
        w = sup.workers.get(self.merge_worker_id) if self.merge_worker_id else None
        if w is not None and not w.state.terminal:
            return
        w = sup.spawn(MERGE_RUN, Role.MERGE)
        self.merge_worker_id = w.spec.worker_id

    def _entry(self, run: RunRow) -> dict[str, Any]:
        ck = self.sup.store.latest_checkpoint(run.run_id)
        if ck is None:
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run.run_id} has no checkpoint yet (status {run.status.value})",
            )
        assert ck is not None
        self.sup.store.pin_checkpoint(str(ck["path"]))
        return {
            "run_id": run.run_id,
            "checkpoint": str(ck["path"]),
            "indices_file": run.spec.get("indices_file"),
            "base_checkpoint": run.spec.get("checkpoint"),
            "kind": run.kind,
        }

    def _submit(self, spec: dict[str, Any], out_run: str) -> Job:
        self._ensure_merge_worker()
        job = Job(uuid.uuid4().hex, spec, out_run)
        self.jobs.append(job)
        self.tick()
        return job

    def tick(self) -> None:
        sup = self.sup
        self._start_queued_forks()
        if not self.jobs:
            return
        w = sup.workers.get(self.merge_worker_id)
        if w is None:
            return
        if w.state.terminal:
            cause = w.exit.describe() if w.exit else "the merge worker exited"
            for job in self.jobs:
                if job.out_run:
                    sup._set_run_status(
                        job.out_run, RunStatus.FAILED, f"merge worker failed: {cause}"
                    )
                if job.ack is not None:
                    job.ack.ok, job.ack.message = False, f"merge worker failed: {cause}"
                    job.ack.event.set()
            self.jobs.clear()
            return
        if w.state not in (WorkerState.ATTACHED, WorkerState.RUNNING):
            return
        from onthefly_supervisor.supervisor import PendingAck

        for job in self.jobs:
            if not job.sent:
                job.ack = job.ack or PendingAck()
                with sup.lock:
                    sup.pending[job.job_id] = job.ack
                sup._send(
                    w.spec.worker_id,
                    pb.SupervisorCommand(
                        command_id=job.job_id,
                        assign=pb.AssignRole(role=pb.ROLE_MERGE, spec_json=json.dumps(job.spec)),
                    ),
                )
                job.sent = True
                if job.out_run:
                    sup._set_run_status(job.out_run, RunStatus.RUNNING)
        for job in list(self.jobs):
            if job.ack is not None and job.ack.event.is_set():
                self.jobs.remove(job)
                if job.out_run and not job.ack.ok:
                    run = sup.store.run(job.out_run)
                    if run is not None and not run.status.terminal:
                        sup._set_run_status(job.out_run, RunStatus.FAILED, job.ack.message)
                    elif run is not None and run.status is RunStatus.FAILED and not run.error:
                        sup.store.update_run(job.out_run, error=job.ack.message)

    def _wait(self, job: Job, timeout: float) -> PendingAck:
        from onthefly_supervisor.supervisor import PendingAck

        job.ack = job.ack or PendingAck()
        if not job.ack.event.wait(timeout):
            raise self._err(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the merge worker did not finish within {timeout:.0f} s",
            )
        return job.ack

    def _runs(self, refs: list[str], least: int, what: str) -> list[RunRow]:
        if len(refs) < least:
            raise ValueError(f"{what} needs at least {least} run(s), got {len(refs)}")
        runs = [self.sup.resolve_run(r) for r in refs]
        if len({r.run_id for r in runs}) != len(runs):
            raise ValueError(f"{what}: a run is named twice")
        return runs

    def merge(self, req: pb.MergeRequest) -> pb.ActionReply:
        self._check_name(req.name)
        if req.method not in MERGE_METHODS:
            raise ValueError(
                f"unknown merge method {req.method!r}; use one of {', '.join(MERGE_METHODS)}"
            )
        least = 1 if req.method in ("adapter_fuse", "distill") else 2
        runs = self._runs(list(req.runs), least, f"merge --method {req.method}")
        opts = json.loads(req.options_json) if req.options_json else {}
        if not isinstance(opts, dict):
            raise ValueError("options_json must be a JSON object")
        allow_failed = bool(opts.pop("allow_failed", False))
        # Everything that would fail the merge worker is refused here, before a run exists.
        for r in runs:
            if r.kind == "moe":
                experts = " ".join(r.parents)
                raise ValueError(
                    f"merge --method {req.method}: {r.run_id} is an MoE (a gate over "
                    f"{', '.join(r.parents)}), not one model's weights; merge its experts "
                    f"instead (onthefly merge --method {req.method} {experts})"
                )
        if req.method == "adapter_fuse":
            for r in runs:
                if not r.spec.get("adapters_rank"):
                    raise ValueError(
                        f"run {r.run_id} was not trained with adapters (use `onthefly fork --adapters RANK`)"
                    )
            bases = {str(r.spec.get("checkpoint") or "") for r in runs}
            if len(bases) > 1:
                # Each adapter is an update to the weights it was trained on: added to
                # other weights it is not what was learned.
                raise ValueError(
                    "merge --method adapter_fuse: the adapters were trained on different base "
                    "weights ("
                    + ", ".join(f"{r.run_id} on {r.spec.get('checkpoint')}" for r in runs)
                    + "); fuse adapter forks of the same checkpoint, or use swa/distill"
                )
        partial = self._check_failed(runs, f"merge --method {req.method}", allow_failed)
        parents = [self._entry(r) for r in runs]
        run_id = self._next_id("merge")
        self.sup.store.add_run(
            RunRow(
                run_id,
                req.name or run_id,
                "merge",
                RunStatus.PENDING,
                [r.run_id for r in runs],
                time.time(),
                spec={"method": req.method, "options": opts},
            )
        )
        self.sup.bus.publish("run_created", run_id, run=self.sup.store.run(run_id).to_dict())  # type: ignore[union-attr]
        self._log_partial(run_id, partial)
        self._submit(
            {
                "job": "merge",
                "method": req.method,
                "out_run": run_id,
                "parents": parents,
                "options": opts,
            },
            run_id,
        )
        return pb.ActionReply(
            ok=True,
            run_id=run_id,
            message=f"{run_id}: {req.method} of {', '.join(r.run_id for r in runs)} queued in the merge worker"
            + "".join(f"; {p}" for p in partial),
        )

    def _check_failed(self, runs: list[RunRow], what: str, allow: bool) -> list[str]:
        """Refuse runs whose worker failed (their latest checkpoint is whatever it reached,
        not a finished run) unless `allow` (--allow-failed); then one line per such run saying
        which partial checkpoint is used. A run that failed before any checkpoint is refused
        either way."""
        notes: list[str] = []
        for r in runs:
            if r.status is not RunStatus.FAILED:
                continue
            cause = (r.error or "no cause recorded").strip().splitlines()[0]
            if len(cause) > 200:
                cause = cause[:197] + "..."
            ck = self.sup.store.latest_checkpoint(r.run_id)
            if ck is None:
                raise self._err(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{what}: run {r.run_id} failed before its first checkpoint ({cause}); "
                    "there are no weights to use",
                )
            if not allow:
                raise self._err(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{what}: run {r.run_id} failed ({cause}); its latest checkpoint (step "
                    f"{int(ck['step'])}) is partial. Pass --allow-failed to use it anyway",
                )
            notes.append(
                f"{r.run_id} failed: its partial checkpoint at step {int(ck['step'])} is used"
            )
        return notes

    def _log_partial(self, run_id: str, notes: list[str]) -> None:
        for note in notes:
            self.sup.bus.publish("log", run_id, level="warning", text=f"{run_id}: {note}")

    def gate(self, req: pb.GateRequest) -> pb.ActionReply:
        self._check_name(req.name)
        runs = self._runs(list(req.runs), 2, "gate")
        for r in runs:
            if r.kind == "moe":
                raise ValueError(f"run {r.run_id} is already an MoE; gate its experts instead")
        opts = json.loads(req.options_json) if req.options_json else {}
        if not isinstance(opts, dict):
            raise ValueError("options_json must be a JSON object")
        partial = self._check_failed(runs, "gate", bool(opts.pop("allow_failed", False)))
        parents = [self._entry(r) for r in runs]
        run_id = self._next_id("moe")
        self.sup.store.add_run(
            RunRow(
                run_id,
                req.name or run_id,
                "moe",
                RunStatus.PENDING,
                [r.run_id for r in runs],
                time.time(),
                spec={"gate": "switch_softmax", "options": opts},
            )
        )
        self.sup.bus.publish("run_created", run_id, run=self.sup.store.run(run_id).to_dict())  # type: ignore[union-attr]
        self._log_partial(run_id, partial)
        self._submit(
            {"job": "gate", "out_run": run_id, "parents": parents, "options": opts}, run_id
        )
        return pb.ActionReply(
            ok=True,
            run_id=run_id,
            message=f"{run_id}: switch_softmax gate over {', '.join(r.run_id for r in runs)} queued in the merge worker"
            + "".join(f"; {p}" for p in partial),
        )

    def compare(self, req: pb.CompareRequest) -> pb.Comparison:
        runs = self._runs(
            list(req.runs)
            or [
                r.run_id
                for r in self.sup.store.runs()
                if r.status is RunStatus.COMPLETED or r.kind == "main"
            ],
            1,
            "compare",
        )
        entries = [self._entry(r) for r in runs]
        slices: list[dict[str, Any]] = []
        names = list(req.slices) or ["val"] + [
            r.run_id for r in self.sup.store.runs() if r.kind == "fork"
        ]
        for name in names:
            if name in ("val", "test"):
                slices.append({"name": name, "split": name})
                continue
            run = self.sup.resolve_run(name)
            if not run.spec.get("indices_file"):
                slices.append({"name": f"{run.run_id} (all data)", "indices_file": None})
            else:
                slices.append({"name": run.run_id, "indices_file": run.spec["indices_file"]})
        job = self._submit({"job": "compare", "runs": entries, "slices": slices}, "")
        ack = self._wait(job, 600)
        if not ack.ok:
            raise self._err(grpc.StatusCode.FAILED_PRECONDITION, ack.message)
        p = ack.payload or {}
        # Kept in the store: `onthefly runs` shows the newest matrix beside the lineage.
        self.sup.store.set_meta(
            "comparison",
            {
                "runs": list(p.get("runs", [])),
                "slices": list(p.get("slices", [])),
                "losses": [None if v is None else float(v) for v in p.get("losses", [])],
                "t": time.time(),
            },
        )
        return pb.Comparison(
            runs=p.get("runs", []),
            slices=p.get("slices", []),
            losses=[float("nan") if v is None else v for v in p.get("losses", [])],
        )

    def health(self, req: pb.HealthRequest) -> pb.HealthReport:
        """Health checks: determinism replays from a checkpoint in a side process (role=health);
        the other checks run inside the run's live worker, at the same time. One report."""
        if req.check and req.check not in HEALTH_CHECKS:
            raise ValueError(f"unknown check {req.check!r}; one of {', '.join(HEALTH_CHECKS)}")
        run = self.sup.resolve_run(req.run or "main")
        wanted = [req.check] if req.check else list(HEALTH_CHECKS)
        live_checks = [c for c in wanted if c != "determinism"]
        if live_checks and self.sup.live_worker(run.run_id) is None:
            raise self._err(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run.run_id} is not training ({run.status.value}); the {', '.join(live_checks)} "
                "check(s) run inside its live worker",
            )
        side = _DeterminismCheck.start(self, run) if "determinism" in wanted else None
        verdicts: list[dict[str, Any]] = []
        step = None
        try:
            if live_checks:
                _, ack = self.sup.command(
                    run.run_id,
                    wait=True,
                    timeout=300.0,
                    health=pb.HealthCheck(check=",".join(live_checks)),
                )
                if not ack.ok:
                    raise self._err(grpc.StatusCode.FAILED_PRECONDITION, ack.message)
                verdicts = list((ack.payload or {}).get("verdicts", []))
                step = (ack.payload or {}).get("step")
        except BaseException:
            if side is not None:
                side.cancel()
            raise
        if side is not None:
            verdicts.insert(0, side.result())
        self.sup.bus.publish("health", run.run_id, step=step, verdicts=verdicts)
        return pb.HealthReport(
            run_id=run.run_id,
            verdicts=[
                pb.HealthVerdict(
                    check=v["check"],
                    verdict=v["verdict"],
                    hint=v["hint"],
                    numbers_json=json.dumps(v.get("numbers", {})),
                )
                for v in verdicts
            ],
        )

    def export_slice(self, req: pb.ExportSliceRequest) -> pb.ExportReply:
        from onthefly_supervisor.slices import export_slice

        if not req.path or not os.path.isabs(req.path):
            raise ValueError("export-slice needs an absolute output path chosen by the user")
        # The losses ingested so far, on disk before they are read (right after a pause the
        # current epoch's array may not have been persisted yet).
        self.sup.arrays.persist()
        sel.parse_spec(req.select or "all")  # a bad spec fails before any embedding work
        # kmeans: the embedding comes from where a fork's does (the live worker, or the merge
        # worker for an ended run, else the newest saved one), so the spec picks the same
        # samples here, in a fork and in `onthefly clusters`.
        res = export_slice(
            self.sup.dir,
            req.run or "main",
            req.select or "all",
            req.format,
            req.path,
            force=req.force,
            base_dir=str(self.sup.store.get_meta("cwd", os.getcwd())),
            embedding=self.embedding,
        )
        return pb.ExportReply(
            ok=True,
            path=res.path,
            rows=res.rows,
            message=f"wrote {res.rows} rows ({res.description})",
        )

    def export_session(self, req: pb.ExportSessionRequest) -> pb.ExportReply:
        from onthefly_supervisor.archive import export_session

        if req.session and req.session != self.sup.session_id:
            raise self._err(
                grpc.StatusCode.NOT_FOUND,
                f"this supervisor serves session {self.sup.session_id}, not {req.session}",
            )
        if not req.path or not os.path.isabs(req.path):
            raise ValueError("export-session needs an absolute output path chosen by the user")
        self.sup.arrays.persist()
        res = export_session(self.sup.dir, req.path, force=req.force)
        return pb.ExportReply(
            ok=True,
            path=res.path,
            sha256=res.sha256,
            rows=res.files,
            message=f"wrote {res.path} ({res.files} files)",
        )

    def import_session(self, req: pb.ImportSessionRequest) -> pb.ExportReply:
        from onthefly_supervisor.archive import import_session

        if not req.path or not os.path.isabs(req.path):
            raise ValueError("import-session needs an absolute archive path")
        if not os.path.isfile(req.path):
            raise FileNotFoundError(f"no archive at {req.path}")
        project = str(self.sup.store.get_meta("cwd", os.getcwd()))
        res = import_session(req.path, project)
        return pb.ExportReply(
            ok=True,
            path=res.session_dir,
            rows=res.files,
            message=f"imported session {res.session_id}; `onthefly resume {res.session_id}` continues it",
        )

    def export_model(self, req: pb.ExportModelRequest) -> pb.ExportReply:
        run = self.sup.resolve_run(req.run or "main")
        path = os.path.abspath(req.path)
        if not req.path:
            raise ValueError("export-model needs an output path (-o FILE)")
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{req.path} is a folder; -o names the file to write (e.g. {req.path}/model.pt)"
            )
        if os.path.exists(path) and not req.force:
            raise FileExistsError(f"{req.path} exists; pass --force to overwrite it")
        if not os.path.isdir(os.path.dirname(path)):
            raise FileNotFoundError(f"folder {os.path.dirname(path)} does not exist")
        if req.factory and ":" not in req.factory:
            raise ValueError(f"--factory {req.factory!r}: use package.module:callable")
        job = self._submit(
            {"job": "export_model", "run": self._entry(run), "path": path, "factory": req.factory},
            "",
        )
        ack = self._wait(job, 600)
        if not ack.ok:
            raise self._err(grpc.StatusCode.FAILED_PRECONDITION, ack.message)
        return pb.ExportReply(ok=True, path=path, message=ack.message, sha256=_sha256(path))


def _early_note(early: dict[str, Any], race: bool = False) -> str:
    """'; early stop on the slice loss every 30 steps, patience 3' for a fork's reply."""
    es = early.get("early_stop")
    if not es:
        return ""
    delta = f", min delta {es['min_delta']:g}" if es["min_delta"] else ""
    when = " (of a variant sent on to the full budget)" if race else ""
    return (
        f"; early stop{when} on the {es['metric']} loss every {es['every']} steps, patience "
        f"{es['patience']}{delta}"
    )


def _not_run(hint: str, mode: str, **numbers: Any) -> dict[str, Any]:
    """A determinism verdict for a check that could not run (a finding, not an RPC error)."""
    return {
        "check": "determinism",
        "verdict": "fail" if mode == "side-process" else "warn",
        "hint": hint,
        "numbers": {"mode": mode, **numbers},
    }


class _DeterminismCheck:
    """The determinism check of one health request: a role=health worker replaying K steps
    from the run's latest checkpoint twice (see onthefly_worker/health_role.py).

    The worker reports as the ack of a command id made up here. `result()` always returns
    a verdict: the worker's, or one that says plainly why there is none (the process
    failed, timed out, the run has no checkpoint, or the run is not a Trainer.fit run).
    """

    def __init__(self, ops: MethodOps, ready: dict[str, Any] | None = None) -> None:
        self.ops = ops
        self.ready = ready
        self.worker: Any = None
        self.first: Any = None  # Lightning: the replay whose result the worker's is compared with
        self.ack: PendingAck | None = None
        self.cid = ""
        self.folder = ""
        self.deadline = 0.0

    @classmethod
    def start(cls, ops: MethodOps, run: RunRow) -> _DeterminismCheck:
        sup = ops.sup
        if run.kind not in ("main", "fork"):
            return cls(
                ops,
                _not_run(
                    f"the determinism check could not run: run {run.run_id} is a {run.kind} result, "
                    "which was not trained by steps that could be replayed",
                    "side-process",
                    error=f"{run.kind} run",
                ),
            )
        lightning = str((run.config or {}).get("framework", "")) == "lightning"
        ck = sup.store.latest_checkpoint(run.run_id)
        if ck is None and sup.live_worker(run.run_id) is not None:
            # No checkpoint yet (early in the first epoch): ask the worker for one.
            try:
                _, ack = sup.command(
                    run.run_id,
                    wait=True,
                    timeout=60.0,
                    checkpoint=pb.CheckpointNow(reason="health"),
                )
                rel = str((ack.payload or {}).get("checkpoint") or "") if ack.ok else ""
                deadline = time.time() + 10
                while rel and time.time() < deadline and ck is None:
                    ck = next(
                        (c for c in sup.store.checkpoints(run.run_id) if c["path"] == rel), None
                    )
                    if ck is None:
                        time.sleep(0.02)
            except ops.ControlError:
                ck = None
        if ck is None:
            return cls(
                ops,
                _not_run(
                    f"the determinism check could not run: run {run.run_id} has no checkpoint to "
                    "replay from yet",
                    "side-process",
                    error="no checkpoint",
                ),
            )
        from onthefly_supervisor.supervisor import PendingAck

        check = cls(ops)
        check.cid = uuid.uuid4().hex
        rel = str(ck["path"])
        check.folder = os.path.join(sup.dir, "health", check.cid[:12])
        os.makedirs(check.folder, exist_ok=True)
        # A hard link keeps the file for the replay even if the keep policy prunes it now.
        file = os.path.relpath(os.path.join(check.folder, "checkpoint.pt"), sup.dir)
        try:
            os.link(os.path.join(sup.dir, rel), os.path.join(sup.dir, file))
        except OSError:
            file = rel
        spec = {
            "command_id": check.cid,
            "run_id": run.run_id,
            "checkpoint": rel,
            "file": file,
            "sha256": ck.get("sha256") or "",
            "steps": DETERMINISM_STEPS,
        }
        specs = [spec]
        if lightning:
            # Lightning owns the step, so each replay is the script resumed by Lightning's own
            # fit loop, one per process (onthefly_worker/lightning_health.py): the first saves
            # its result, the second compares with it and answers.
            out = [
                os.path.relpath(os.path.join(check.folder, f"replay-{i}.pt"), sup.dir)
                for i in (0, 1)
            ]
            specs = [
                {**spec, "command_id": "", "out": out[0]},
                {**spec, "out": out[1], "peer": out[0]},
            ]
        spec_files = []
        for i, one in enumerate(specs):
            spec_files.append(os.path.join(check.folder, f"spec-{i}.json"))
            with open(spec_files[-1], "w", encoding="utf-8") as f:
                json.dump(one, f)
        check.ack = PendingAck()
        with sup.lock:
            sup.pending[check.cid] = check.ack
        check.deadline = time.monotonic() + DETERMINISM_TIMEOUT_S
        try:
            for sf in spec_files:
                w = sup.spawn(f"health-{run.run_id}", Role.HEALTH, spec_file=sf, gpu=True)
                check.first, check.worker = check.worker, w
        except Exception as e:  # noqa: BLE001 - reported as the verdict
            check._stop()
            check._cleanup()
            check.ready = _not_run(
                f"the determinism check could not run: the side process did not start ({e})",
                "side-process",
                error=str(e),
            )
        return check

    def result(self) -> dict[str, Any]:
        if self.ready is not None:
            return self.ready
        assert self.ack is not None and self.worker is not None
        w, ack = self.worker, self.ack
        wid = w.spec.worker_id
        try:
            ended_at: float | None = None
            while not ack.event.wait(0.2):
                first = self.first
                if first is not None and first.state.terminal and first.exit and not first.exit.ok:
                    self._stop()
                    return _not_run(
                        "the determinism check could not run: the first replay (side process "
                        f"pid {first.pid}) failed: {first.exit.describe()}",
                        "side-process",
                        error=first.exit.describe(),
                        pid=first.pid,
                    )
                if w.state.terminal:
                    # Its last messages may still be on their way: give them a moment.
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() - ended_at > 3.0:
                        cause = w.exit.describe() if w.exit else "it exited"
                        return _not_run(
                            "the determinism check could not run: the side process "
                            f"(pid {w.pid}) ended before reporting: {cause}",
                            "side-process",
                            error=cause,
                            pid=w.pid,
                        )
                if time.monotonic() > self.deadline:
                    self._stop()
                    return _not_run(
                        f"the determinism check did not finish within {DETERMINISM_TIMEOUT_S:.0f} s "
                        f"(side process pid {w.pid} stopped): the script's start-up or "
                        f"{DETERMINISM_STEPS} training steps (twice) took longer, or its data loader hangs",
                        "side-process",
                        error="timeout",
                        pid=w.pid,
                        timeout_s=DETERMINISM_TIMEOUT_S,
                    )
            payload = ack.payload or {}
            if not ack.ok:
                return _not_run(
                    f"the determinism check could not run in its side process (pid "
                    f"{payload.get('pid', w.pid)}): {ack.message}",
                    "side-process",
                    error=ack.message,
                    pid=payload.get("pid", w.pid),
                )
            got = [v for v in payload.get("verdicts", []) if v.get("check") == "determinism"]
            if not got:
                return _not_run(
                    f"the side process (worker {wid}) answered without a determinism verdict",
                    "side-process",
                    error="no verdict",
                )
            return dict(got[0])
        finally:
            self._cleanup()

    def cancel(self) -> None:
        if self.ready is None and self.worker is not None:
            self._stop()
        self._cleanup()

    def _stop(self) -> None:
        for w in (self.worker, self.first):
            if w is not None and not w.state.terminal:
                threading.Thread(
                    target=self.ops.sup.launcher.stop, args=(w.spec.worker_id, 2.0), daemon=True
                ).start()

    def _cleanup(self) -> None:
        sup = self.ops.sup
        if self.cid:
            with sup.lock:
                sup.pending.pop(self.cid, None)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last check leaves no empty health/ behind
                os.rmdir(os.path.dirname(self.folder))
            self.folder = ""


def _sha256(path: str) -> str:
    from onthefly_supervisor.archive import sha256_file

    return sha256_file(path)
