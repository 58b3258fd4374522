"""The OnTheFly Trainer: the user's training loop, owned by a worker process.

`Trainer(...).fit(model, optimizer, loss_fn, train_loader, ...)` connects to the
supervisor (starting one when the script was run as plain `python train.py`) and does
what this worker's role says: train the generalist, or train a fork from a parent
checkpoint on a selection of samples.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import checkpoint as ckpt
from onthefly_worker import env as wenv
from onthefly_worker import recipe
from onthefly_worker.config import TrainerConfig
from onthefly_worker.connection import PROTOCOL_VERSION, Command, WorkerConnection
from onthefly_worker.control import CommandLoop
from onthefly_worker.data import (
    EpochOrder,
    batch_len,
    data_fingerprint,
    dataset_size,
    epoch_loader,
    selection_loader,
    split_batch,
    to_device,
    unused_batch_keys,
)
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.evaluation import EvalAborted, evaluate_model, report_eval
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.recorder import Recorder

_FIT_CALLED = ""
"""Set by the first `Trainer.fit` of a training process: a second one is refused."""

ROLE_TO_PB = {
    "train": pb.ROLE_TRAIN,
    "fork": pb.ROLE_FORK,
    "merge": pb.ROLE_MERGE,
    "health": pb.ROLE_HEALTH,
}


# Auto grad-norm cadence (_calibrate_grad_norm): the norm may cost this share of a step,
# timed on the steps after the first _GN_WARMUP_STEPS. Measured on a ~1.8 ms MLP step
# (bench/overhead.py), the norm took ~50 us (2.8%): at 1% it ran every 3 steps.
GRAD_NORM_BUDGET = 0.0025
_GN_WARMUP_STEPS = 10
_GN_TIMED_STEPS = 20


def _log(msg: str) -> None:
    print(f"[onthefly] {msg}", flush=True)


def mark_fit_reached() -> None:
    marker = os.environ.get(wenv.FIT_MARKER, "")
    if marker:
        with open(marker, "a", encoding="utf-8"):
            pass


def connect(env: wenv.WorkerEnv, hello: pb.Hello, timeout: float = 30.0) -> WorkerConnection:
    conn = WorkerConnection(env.addr, env.token, env.worker_id)
    conn.send(hello=hello)
    conn.wait_welcome(timeout)
    return conn


class Trainer:
    """Train any `nn.Module` with live control. See TrainerConfig for every option."""

    def __init__(self, project: str = "default", run_name: str = "main", **options: Any) -> None:
        self.config = TrainerConfig.from_kwargs(
            {"project": project, "run_name": run_name, **options}
        )
        self.state: dict[str, Any] = {}

    # The signature the product READMEs promise.
    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        test_loader: DataLoader | None = None,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        mark_fit_reached()
        if not isinstance(model, nn.Module):
            raise OnTheFlyError(
                f"fit(model=...) must be a torch.nn.Module, got {type(model).__name__}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OnTheFlyError(
                f"fit(optimizer=...) must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(train_loader, DataLoader):
            raise OnTheFlyError(
                f"fit(train_loader=...) must be a torch DataLoader, got {type(train_loader).__name__}"
            )
        for name, ld in (("val_loader", val_loader), ("test_loader", test_loader)):
            if ld is not None and not isinstance(ld, DataLoader):
                raise OnTheFlyError(
                    f"fit({name}=...) must be a torch DataLoader or None, got {type(ld).__name__}"
                )
        if dataset_size(train_loader) < 0:
            kind = (
                "an IterableDataset"
                if isinstance(train_loader.dataset, torch.utils.data.IterableDataset)
                else f"a {type(train_loader.dataset).__name__} without __len__"
            )
            raise OnTheFlyError(
                f"fit(train_loader=...) reads {kind}; OnTheFly needs a map-style dataset (with "
                "__len__ and __getitem__): it records every sample's loss by its position and "
                "owns the data order (pause, resume and forks replay it exactly)"
            )
        global _FIT_CALLED
        if _FIT_CALLED:
            raise OnTheFlyError(
                f"Trainer.fit() was already called in this script ({_FIT_CALLED}); OnTheFly "
                "records one run per script (its per-sample losses, checkpoints and forks "
                "belong to that run): train the second phase in a script of its own, or in the "
                "same fit() (e.g. with a scheduler)"
            )
        env = wenv.WorkerEnv.from_environ()
        if env is None:
            from onthefly_worker import selfhost

            env = selfhost.ensure_supervisor(self.config)
        if env.standby:  # a warm spare: wait here until the supervisor makes it a fork
            from onthefly_worker.standby import wait_for_role

            env = wait_for_role(env, framework="native")
        if env.role == "merge":
            from onthefly_worker.merge_role import MergeWorker

            MergeWorker(
                self.config, env, model, optimizer, loss_fn, train_loader, val_loader, test_loader
            ).serve()
            raise SystemExit(0)
        if env.role == "health":
            # A side process for the determinism check: replay from a checkpoint, report, exit.
            from onthefly_worker.health_role import serve_health

            raise SystemExit(
                serve_health(self.config, env, model, optimizer, loss_fn, train_loader, scheduler)
            )
        _FIT_CALLED = f"run {env.run_id}"
        loop = _Loop(
            self.config,
            env,
            model,
            optimizer,
            loss_fn,
            train_loader,
            val_loader,
            test_loader,
            scheduler,
        )
        try:
            result = loop.run()
        except OnTheFlyError as e:
            # Our own errors say what to do in their message (and were reported as the
            # run's cause already): the script's traceback ends at its fit() line.
            raise e.with_traceback(None) from None
        self.state = result
        loop.end_as_interrupted(result["step"], result["checkpoint"])
        if env.role != "train":
            # A fork worker's job ends with its role; the rest of the script is the generalist's.
            raise SystemExit(0 if result.get("status") == "completed" else 1)
        return result


class _Loop(CommandLoop):
    def __init__(
        self,
        cfg: TrainerConfig,
        env: wenv.WorkerEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        test_loader: DataLoader | None,
        scheduler: Any,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.model = model
        self.opt = optimizer
        self.loss = PerSampleLoss(loss_fn)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.sched = scheduler
        self.spec: dict[str, Any] = env.read_spec()
        self.run_id = env.run_id
        self.seed = cfg.seed if cfg.seed is not None else (wenv.session_seed() or 0)
        if "seed" in self.spec:
            self.seed = int(self.spec["seed"])
        self.device = cfg.torch_device()
        self.amp_dtype: torch.dtype | None = None
        self.scaler: Any = None
        if cfg.amp:
            if self.device.type == "cuda":
                self.amp_dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda")
            else:
                self.amp_dtype = torch.bfloat16
        self.step = 0
        self.epoch = 0
        self.batch = 0
        self.sample_steps = 0
        self.paused = False
        self.stop_reason = ""
        self.run_test_on_stop = cfg.do_test_after
        self.nonfinite_run = 0
        self.nonfinite_total = 0
        self._epoch_nonfinite = 0  # this epoch's steps with a non-finite loss
        self.grad_clip = cfg.grad_clip
        # Gradient-norm cadence (see TrainerConfig.grad_norm_every); 0 until calibrated.
        self.gn_every = cfg.grad_norm_every
        self._gn_cal: list[tuple[float, float]] = []  # (norm s, step s) of this process's steps
        self._gn_ok_step = 0  # the last step whose gradients were measured finite
        self._batch_checked = False
        self._rows_noted = False
        self._nonfinite_evals: set[str] = set()  # splits whose non-finite loss was said
        self._plateau_skip_said = False
        # Set when non-finite steps run out nonfinite_patience (raised after the step's record).
        self._nonfinite_failure: OnTheFlyError | None = None
        self.writer = ckpt.AsyncWriter()
        self.epoch_ckpt = ckpt.EpochGate(cfg.checkpoint_min_interval_s, self.log, "Trainer")
        self.last_checkpoint = ""
        self.last_good = ""
        self._written: list[tuple[int, str]] = []  # (step, path): checkpoints this run started
        self.adapters = False
        self.budget = int(self.spec.get("budget_steps", 0) or 0)
        # A raced fork variant stops at its rung to be compared with the others (variants.py).
        self.rung_stop = int((self.spec.get("race") or {}).get("stop_at", 0) or 0)
        # --early-stop-patience: a fork stops when its slice (or val) loss stops improving;
        # a raced variant only on its way to the full budget (rungs compare at equal steps).
        self.early = recipe.EarlyStop.from_spec(self.spec) if env.role == "fork" else None
        self.early_stopped: dict[str, Any] | None = None
        # split -> (step, result) of its latest evaluation: not twice at one step
        self._evaluated: dict[str, tuple[int, dict[str, Any]]] = {}
        subset = None
        if env.role == "fork":
            subset = np.load(os.path.join(env.session_dir, self.spec["indices_file"]))
        self.order = EpochOrder(train_loader, self.seed, subset)
        self.conn: WorkerConnection | None = None
        self.rec: Recorder | None = None
        self.data_ms: collections.deque[float] = collections.deque(maxlen=512)
        self.step_ms: collections.deque[float] = collections.deque(maxlen=512)
        self.flush_s = 0.05
        self.hb_s = 1.0
        self._last_hb = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with self.graceful_signals(self._console()):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.model.to(self.device)
        hello = pb.Hello(
            role=ROLE_TO_PB[self.env.role],
            pid=os.getpid(),
            run_id=self.run_id,
            project=self.cfg.project,
            run_name=str(self.spec.get("name", self.cfg.run_name)),
            dataset_size=dataset_size(self.train_loader),
            steps_per_epoch=len(self.order.batches(0)),
            max_epochs=self.cfg.epoch_limit,
            max_steps=self.budget or self.cfg.max_steps,
            config_json=json.dumps(self.cfg.to_dict()),
            model_summary=f"{type(self.model).__name__} ({sum(p.numel() for p in self.model.parameters()):,} parameters)",
            device=str(self.device),
            data_fingerprint=data_fingerprint(self.train_loader),
            protocol_version=PROTOCOL_VERSION,
            framework="native",
        )
        self.conn = connect(self.env, hello)
        welcome = self.conn.welcome
        assert welcome is not None
        self.flush_s = welcome.flush_interval_s
        self.hb_s = welcome.heartbeat_interval_s
        self.rec = self.make_recorder(self.conn.send_bulk, self.flush_s)
        self.conn.start_heartbeat(self.hb_s, lambda: self.step, watch=True)
        status = "failed"
        if self.env.role == "train" and not self.env.resume:
            self._note_validation()
            self._note_scheduler()
            self._note_persistent_workers()
            self._note_loss_units()
        try:
            self._restore()
            self._check_early_stop_setup()
            subset = self.order.subset
            if (
                self.env.role == "fork"
                and not self.env.resume
                and subset is not None
                and subset.size < dataset_size(self.train_loader)
            ):
                # The slice loss before any fork step (the parent's weights, eval mode), so
                # the fork's gain is measured like with like: slice:self at its end vs here.
                # (Not for a fork on all the data, such as the matched-compute baseline.)
                start = self._evaluate(self._slice_loader(), "slice:self")
                if self.early is not None and self.early.metric == "slice":
                    self.early.start(self.step, float(start["loss"]))
            self._early_stop_start()
            self._status(pb.WORKER_STATE_RUNNING, "training")
            self._train()
            # The trained weights are safe before any evaluation: a test set that fails
            # loses nothing (`onthefly resume` then runs only the test pass).
            self._checkpoint("stop" if self.stop_reason else "final", wait=True)
            if self.run_test_on_stop and self.test_loader is not None:
                loader = self.test_loader
                test = self._test_after_training(
                    lambda: self._evaluate(loader, "test"), self.last_checkpoint
                )
                if self._console():
                    print(f"[onthefly] test loss {test['loss']:.4f}", flush=True)
            if self.env.role == "fork":
                self._fork_reports()
            status = "stopped" if self.stop_reason else "completed"
            self.conn.send(
                finished=pb.RunFinished(
                    run_id=self.run_id,
                    status=pb.RUN_STATUS_STOPPED if self.stop_reason else pb.RUN_STATUS_COMPLETED,
                    step=self.step,
                    epoch=self.epoch,
                    final_checkpoint=self.last_checkpoint,
                    summary_json=json.dumps(
                        {
                            "sample_steps": self.sample_steps,
                            "nonfinite_steps": self.nonfinite_total,
                            **({"early_stop": self.early_stopped} if self.early_stopped else {}),
                        }
                    ),
                )
            )
            return {
                "status": status,
                "step": self.step,
                "epoch": self.epoch,
                "checkpoint": self.last_checkpoint,
            }
        except (SystemExit, KeyboardInterrupt) as e:
            # A stop from outside (SIGTERM/Ctrl+C), not an error of the script. Under
            # `onthefly run` the supervisor stops the worker itself; Ctrl+C on `python
            # train.py` lands here, so the run says it was stopped (not failed) and where it
            # can continue from.
            if isinstance(e, KeyboardInterrupt) and self._console():
                with contextlib.suppress(Exception):
                    where = self.last_checkpoint or "the beginning"
                    self.log(
                        f"interrupted (Ctrl+C) at step {self.step}; `onthefly resume` continues "
                        f"from {where}",
                        "warning",
                    )
                    self.conn.send(
                        finished=pb.RunFinished(
                            run_id=self.run_id,
                            status=pb.RUN_STATUS_STOPPED,
                            step=self.step,
                            epoch=self.epoch,
                            final_checkpoint=self.last_checkpoint,
                        )
                    )
            raise
        except BaseException as e:
            if self.rec is not None:
                with contextlib.suppress(Exception):
                    self.rec.flush()
            self.conn.send_error(e)
            raise
        finally:
            self.writer.wait()
            self.conn.close()

    def make_recorder(self, send: Callable[..., None], flush_s: float = 0.05) -> Recorder:
        """The recorder of this loop's steps, computing deferred per-sample losses (and a
        plain CrossEntropy's margins) the way this loop's loss does."""
        rec = Recorder(send, self.run_id, self.device, flush_s)
        rec.per_sample = self.loss.per_sample
        rec.row_weights = self.loss.row_weights
        rec.plain_ce = self.loss.plain_ce_ignore_index()
        rec.hand_off_at_backward = True  # _train calls rec.before_backward()
        return rec

    def _status(self, state: pb.WorkerState.ValueType, message: str = "") -> None:
        assert self.conn is not None
        self.conn.send(
            status=pb.StatusUpdate(
                run_id=self.run_id, state=state, message=message, step=self.step, epoch=self.epoch
            )
        )
        # `python train.py`: a pause / resume / stop from another terminal shows here too.
        shown = state != pb.WORKER_STATE_RUNNING or message.startswith("resumed")
        if message and shown and self._console():
            if state == pb.WORKER_STATE_STOPPING:
                message = f"stopping at step {self.step}: {message}"
            print(f"[onthefly] {message}", flush=True)

    def log(self, text: str, level: str = "info") -> None:
        assert self.conn is not None
        self.conn.send(log=pb.LogLine(level=level, text=text))
        if level in ("warning", "error", "note") and self._console():
            print(
                f"[onthefly] {level}: {text}" if level != "note" else f"[onthefly] {text}",
                flush=True,
            )

    def _log(self, text: str, level: str = "info") -> None:
        self.log(text, level)

    def _console(self) -> bool:
        """`python train.py`: the supervisor has no terminal view, so the training process
        prints its epoch lines, warnings and the final test loss itself."""
        return bool(os.environ.get("ONTHEFLY_SELFHOSTED")) and self.env.role == "train"

    # -- restore / checkpoint ----------------------------------------------------------------
    def _restore(self) -> None:
        path = ""
        fork_parent = False
        if self.env.resume:
            path = self.env.resume
        elif self.env.role == "fork":
            path = self.spec["checkpoint"]
            fork_parent = True
        if not path:
            return
        full = os.path.join(self.env.session_dir, path)
        state = ckpt.load(full, map_location=self.device, expected_sha256=None)
        script_lrs = recipe.start_lrs(self.opt)
        if not fork_parent and state.get("adapters") and self.spec.get("adapters_rank"):
            self._restore_adapters(state)
        else:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        if fork_parent:
            restarted = recipe.apply_fork_recipe(
                self.opt,
                [self.sched] if self.sched is not None else [],
                self.spec,
                script_lrs,
                int(state["counters"]["step"]),
            )
            if restarted:
                self.log(restarted, "warning")
            ckpt.restore_rng(state["rng"])
            rank = int(self.spec.get("adapters_rank", 0) or 0)
            if rank > 0:
                from onthefly_worker import merge_math as mm

                names = mm.add_adapters(self.model, rank, skip_small=True)
                if not names:
                    raise OnTheFlyError("--adapters: the model has no nn.Linear layers to adapt")
                self.model.to(self.device)
                # The script's optimizer object (its groups' lr/wd, multipliers applied, and
                # the scheduler that holds it) now trains the adapters.
                how = recipe.train_adapters(self.opt, self.model)
                self.adapters = True
                self.log(f"fork trains rank-{rank} adapters on {len(names)} linear layer(s); {how}")
            self.log(f"fork started from {path} (parent step {state['counters']['step']})")
            return
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        cur = state["cursor"]
        self.epoch, self.batch = int(cur["epoch"]), int(cur["batch"])
        self.seed = int(cur["seed"])
        self.order.seed = self.seed
        self.order.set_skip(cur.get("skip") or ())
        if state.get("grad_clip") is not None:
            self.grad_clip = float(state["grad_clip"])
        self.step = int(state["counters"]["step"])
        self.sample_steps = int(state["counters"]["sample_steps"])
        self._gn_ok_step = self.step
        self._written.append((self.step, path))
        partial = state["counters"].get("epoch_loss")
        if partial and self.rec is not None:
            self.rec.set_epoch_partial(float(partial[0]), float(partial[1]))
        if not self.cfg.grad_norm_every:
            self.gn_every = int(state["counters"].get("grad_norm_every", 0) or 0)
        self.log(
            f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, "
            f"{self.batch} batch(es) into it)"
        )
        rollback = self.spec.get("rollback")
        if rollback:
            self._apply_rollback(dict(rollback), path)
        self._forget_rest_of_epoch()

    def _forget_rest_of_epoch(self) -> None:
        """A resumed run records the rest of its epoch again: what an earlier attempt
        recorded after the checkpoint (an abandoned timeline after a rollback, batches it
        now skips) is reset to not-seen first, so the epoch's array holds this timeline only."""
        assert self.conn is not None
        trained = self.order.batches(self.epoch)[: self.batch]
        done = np.concatenate(trained) if trained else np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(self.order.order(self.epoch), done).astype("<i8")
        if rest.size:
            self.conn.send(
                samples=pb.SampleLosses(
                    run_id=self.run_id,
                    epoch=self.epoch,
                    count=int(rest.size),
                    ids=rest.tobytes(),
                    losses=np.full(rest.size, np.nan, dtype="<f4").tobytes(),
                    first_step=self.step,
                    last_step=self.step,
                    reset=True,
                )
            )

    def _restore_adapters(self, state: dict[str, Any]) -> None:
        """Resume a fork that trains low-rank adapters (a raced variant promoted to its next
        rung): base weights from the parent checkpoint (they are frozen), buffers (BatchNorm
        statistics) from this checkpoint, then the adapters and their optimizer state."""
        from onthefly_worker import merge_math as mm

        parent = ckpt.load(
            os.path.join(self.env.session_dir, self.spec["checkpoint"]),
            map_location=self.device,
            expected_sha256=None,
        )
        mm.restore_adapters(self.model, int(self.spec["adapters_rank"]), parent["model"], state)
        self.model.to(self.device)
        recipe.train_adapters(self.opt, self.model)  # the groups as the fork's start made them
        self.opt.load_state_dict(state["optimizer"])
        self.adapters = True

    def _apply_rollback(self, rb: dict[str, Any], path: str) -> None:
        """The supervisor restarted this run from a good checkpoint after an instability:
        skip the offending batches, lower the lr, clip gradients, bf16 where supported."""
        skip = [tuple(int(v) for v in p) for p in rb.get("skip") or ()]
        self.order.set_skip(sorted({*(tuple(p) for p in self.order.skipped), *skip}))
        done = [
            f"skipping {len(skip)} batch(es) {', '.join(f'(epoch {e}, batch {b})' for e, b in skip)}"
        ]
        lr_mul = float(rb.get("lr_mul", 1.0) or 1.0)
        if lr_mul != 1.0:
            for g in self.opt.param_groups:
                g["lr"] = g["lr"] * lr_mul
            if self.sched is not None and hasattr(self.sched, "base_lrs"):
                # Schedulers that compute the lr from base_lrs would undo the change otherwise.
                self.sched.base_lrs = [b * lr_mul for b in self.sched.base_lrs]
            done.append(f"lr x{lr_mul:g}")
        clip = float(rb.get("grad_clip", 0.0) or 0.0)
        if clip > 0:
            self.grad_clip = clip
            done.append(f"gradient clip {clip:g}")
        if rb.get("bf16"):
            if self.amp_dtype is torch.bfloat16:
                done.append("bf16: already on (bf16 autocast)")
            elif (
                self.amp_dtype is torch.float16
                and self.device.type == "cuda"
                and torch.cuda.is_bf16_supported()
            ):
                # bf16 has fp32's exponent range: no overflow to Inf, so no GradScaler needed.
                self.amp_dtype, self.scaler = torch.bfloat16, None
                done.append("bf16 autocast instead of fp16 (GradScaler dropped)")
            else:
                why = (
                    "this GPU has no bf16 support"
                    if self.amp_dtype is torch.float16
                    else "the run trains in fp32 (amp=False); bf16 only replaces fp16 mixed precision"
                )
                done.append(f"bf16 not applied: {why}")
        self.log(f"rollback to {path}: " + "; ".join(done), "warning")

    def state_dict(self) -> dict[str, Any]:
        model_state = self.model.state_dict()
        adapters = None
        if self.adapters:
            from onthefly_worker import merge_math as mm

            adapters = mm.saved_adapters(self.model)
            # The plain model (adapters folded in) keeps the original state-dict keys.
            model_state = mm.folded_state_dict(self.model)
        return {
            "adapters": adapters,
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "run_id": self.run_id,
            "role": self.env.role,
            "model": model_state,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.capture_rng(),
            "cursor": {
                "epoch": self.epoch,
                "batch": self.batch,
                "seed": self.seed,
                "skip": self.order.skipped,
            },
            "grad_clip": float(self.grad_clip),
            "counters": {
                "step": self.step,
                "sample_steps": self.sample_steps,
                "grad_norm_every": self.gn_every,
                # The epoch's mean loss so far (none at an epoch's start).
                "epoch_loss": list(self.rec.epoch_partial())
                if self.rec is not None and self.batch > 0
                else [0.0, 0],
            },
            "config": self.cfg.to_dict(),
            "spec": self.spec,
        }

    def _checkpoint(self, reason: str, wait: bool = False) -> str:
        assert self.conn is not None
        self.epoch_ckpt.checkpointed()
        state = self.state_dict()
        rel = os.path.join("checkpoints", self.run_id, f"step-{self.step:08d}.pt")
        path = os.path.join(self.env.session_dir, rel)
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "reason": reason,
            "rel": rel,
        }
        conn = self.conn
        step, epoch, batch = self.step, self.epoch, self.batch

        rec = self.rec
        # This step's losses too: a resume from this checkpoint starts after them.
        handed = rec.hand_off() if rec is not None else 0

        def done(saved: ckpt.SavedCheckpoint | None, err: BaseException | None) -> None:
            if rec is not None:
                rec.wait_sent(handed)  # after the metrics and losses recorded before it
            if saved is not None:
                conn.send(
                    checkpoint=pb.CheckpointSaved(
                        run_id=self.run_id,
                        path=rel,
                        sha256=saved.sha256,
                        step=step,
                        epoch=epoch,
                        batch=batch,
                        reason=reason,
                        bytes=saved.nbytes,
                    )
                )
            else:
                # A full disk or an unwritable store must not kill the run: training goes on,
                # and the last good checkpoint (written atomically) is still there.
                prev = self.last_good or "none yet"
                conn.send(
                    log=pb.LogLine(
                        level="error",
                        text=f"checkpoint {rel} failed: {type(err).__name__}: {err}; training continues, the previous checkpoint ({prev}) is intact",
                    )
                )

        def track(saved: ckpt.SavedCheckpoint | None, err: BaseException | None) -> None:
            if saved is not None:
                self.last_good = rel
            done(saved, err)

        self.writer.submit_live(state, path, meta, track)
        self._written.append((step, rel))
        if wait:
            self.writer.wait()
            if self.writer.error is not None:
                self.writer.error = None
                return ""
        self.last_checkpoint = rel
        return rel

    # -- commands ----------------------------------------------------------------------------
    # CommandLoop hooks
    def _eval_loader(self, split: str) -> DataLoader | None:
        return self.test_loader if split == "test" else self.val_loader

    def _run_eval(self, loader: DataLoader, split: str) -> dict[str, Any]:
        out = self._evaluate(loader, split)
        if self._console():  # an on-demand pass (`onthefly test`) of `python train.py`
            print(f"[onthefly] {split} loss {out['loss']:.4f} (step {self.step})", flush=True)
        return out

    def _param_groups(self) -> list[dict[str, Any]]:
        return self.opt.param_groups

    def _set_grad_clip(self, value: float) -> None:
        self.grad_clip = value

    def _health(self, cmd: Command) -> None:
        """Health checks on the live run, without moving its weights, RNG or data order."""
        self._health_on(
            cmd,
            self.train_loader,
            self.model,
            loss=self.loss,
            optimizer=self.opt,
            device=self.device,
            autocast=self._autocast,
            scaler=self.scaler,
            order=self.order,
            epoch=self.epoch,
            seed=self.seed,
            data_wait_ms=list(self.data_ms),
            step_ms=list(self.step_ms),
            replay_steps=3,
        )

    # -- training ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _done(self) -> bool:
        if self.stop_reason or self.early_stopped:
            return True
        if self.rung_stop and self.step >= self.rung_stop:
            self.stop_reason = f"race rung at step {self.rung_stop}: waiting for the other variants"
            return True
        limit = self.budget or self.cfg.max_steps
        return bool(limit and self.step >= limit)

    def _train(self) -> None:
        assert self.conn is not None and self.rec is not None
        model, opt, rec = self.model, self.opt, self.rec
        conn = self.conn
        params = [p for g in opt.param_groups for p in g["params"]]
        max_epochs = (self.cfg.epoch_limit or 10**9) if self.env.role != "fork" else 10**9
        on_cpu = self.device.type == "cpu"
        # A fork's epoch-interval scheduler steps every main-run epoch of steps.
        fork_epoch = (
            self.order.full_epoch_steps
            if self.env.role == "fork"
            and self.sched is not None
            and self.cfg.scheduler_interval == "epoch"
            else 0
        )
        window: list[float] = []  # the training losses since (ReduceLROnPlateau's metric)
        if not self.order.batches(self.epoch) and not self.order.skip:
            n = self.order.n if self.order.subset is None else self.order.subset.size
            if n <= 0:
                raise OnTheFlyError("the train loader's dataset is empty: nothing to train on")
            raise OnTheFlyError(
                f"the train loader yields no batch: {n} sample(s) at batch_size "
                f"{self.order.batch_size} with drop_last={self.order.drop_last}; lower the "
                "batch size or set drop_last=False"
            )
        model.train()
        self._poll()
        while self.epoch < max_epochs and not self._done():
            batches = self.order.batches(self.epoch)
            if self.batch >= len(batches):
                self._end_epoch(len(batches))
                continue
            loader = epoch_loader(self.train_loader, batches[self.batch :], self.seed, self.epoch)
            t_epoch = time.perf_counter()
            t_prev = time.perf_counter()
            it = iter(loader)
            while True:
                try:
                    raw = next(it)
                except StopIteration:
                    break
                t_data = time.perf_counter()
                ids = batches[self.batch]
                x, y = split_batch(raw)
                if not self._batch_checked:
                    self._batch_checked = True
                    self._note_unused_keys(raw)
                if not on_cpu:  # (a CPU loader's tensors are where the model is)
                    x = to_device(x, self.device)
                    y = to_device(y, self.device)
                n = batch_len(x) or len(ids)
                opt.zero_grad(set_to_none=True)
                with self._autocast():
                    out = model(x)
                    # (logits, labels) for the margins, when a classification batch.
                    cls = Recorder.classification(out, y)
                    if self.loss.deferrable(out, y):
                        # The user's loss for backward now; the per-sample values later on
                        # the recorder's thread, batched over many steps (same values).
                        total = self.loss.user(out, y)
                        per: Any = cls if cls is not None else (out.detach(), y.detach())
                    else:
                        total, per = self.loss(out, y, n)
                if self.loss.by_rows and not self._rows_noted:
                    self._note_by_rows()
                # One host read of the loss per step (the value is recorded as a float, so
                # the recorder never has to gather loss tensors).
                loss_value = float(total.item())
                gnorm = math.nan
                if math.isfinite(loss_value):
                    rec.before_backward()
                    if self.scaler is not None:
                        self.scaler.scale(total).backward()
                        self.scaler.unscale_(opt)
                    else:
                        total.backward()
                    norm_t = None
                    grads = None
                    every = self.gn_every
                    if (
                        every <= 1
                        or self.grad_clip > 0
                        or self.scaler is not None
                        or (self.step + 1) % every == 0
                    ):
                        t_norm = time.perf_counter()
                        grads = [p.grad for p in params if p.grad is not None]
                        if grads:
                            norm_t = torch.linalg.vector_norm(
                                torch.stack(torch._foreach_norm(grads))
                            )
                            gnorm = float(norm_t.item())
                        if not every:
                            self._calibrate_grad_norm(time.perf_counter() - t_norm, t_prev)
                        if math.isfinite(gnorm):
                            self._gn_ok_step = self.step + 1
                    if self.scaler is None and grads and not math.isfinite(gnorm):
                        # Like GradScaler: an update with Inf/NaN gradients would poison the weights.
                        gnorm = math.inf  # reported as Inf: NaN on the wire means "not measured"
                        opt.zero_grad(set_to_none=True)
                        self._nonfinite("gradients")
                    else:
                        if self.grad_clip > 0 and norm_t is not None:
                            # The norm is already known: clip with it instead of computing it again.
                            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm_t)
                        self.nonfinite_run = 0
                        if self.scaler is not None:
                            self.scaler.step(opt)
                            self.scaler.update()
                        else:
                            opt.step()
                        if self.sched is not None and self.cfg.scheduler_interval == "step":
                            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                                self.sched.step(loss_value)  # on this step's training loss
                            else:
                                self.sched.step()
                else:
                    if self.nonfinite_run == 0:
                        self._check_weights(f"at step {self.step + 1} (its loss is non-finite)")
                    self._nonfinite("loss", self._nonfinite_samples(per, ids))
                    self._epoch_nonfinite += 1
                self.step += 1
                self.sample_steps += n
                b = self.batch
                self.batch += 1
                t_end = time.perf_counter()
                self.data_ms.append((t_data - t_prev) * 1000.0)
                self.step_ms.append((t_end - t_prev) * 1000.0)
                rec.record(
                    self.step,
                    self.epoch,
                    b,
                    ids,
                    per,
                    loss_value,
                    float(opt.param_groups[0]["lr"]),
                    gnorm,
                    (t_end - t_prev) * 1000.0,
                    (t_data - t_prev) * 1000.0,
                    cls=cls,
                )
                if self._nonfinite_failure is not None:
                    raise self._nonfinite_failure
                if fork_epoch:
                    window.append(loss_value)
                    if self.step % fork_epoch == 0:
                        self._fork_epoch_sched(window)
                        window = []
                t_prev = t_end
                every = self.cfg.checkpoint_every_n_steps
                if every and self.step % every == 0:
                    self._checkpoint("cadence")
                if self.early is not None and self.early.due(self.step):
                    self._early_stop_check()
                if conn.commands:
                    rec.flush()
                    self._poll()
                    t_prev = time.perf_counter()
                if self._done():
                    break
            del it
            if self.batch >= len(batches):
                self._end_epoch(len(batches), time.perf_counter() - t_epoch)
                if conn.commands:
                    # A pause or stop sent during the epoch's validation takes effect now,
                    # not after one more step.
                    rec.flush()
                    self._poll()
        self._check_weights(f"when training ended at step {self.step}")
        rec.flush()

    def _check_early_stop_setup(self) -> None:
        """Say how the fork stops early, or refuse a setup where it cannot."""
        es = self.early
        if es is None:
            return
        if es.metric == "val" and self.val_loader is None:
            raise OnTheFlyError(
                "--early-stop-metric val: the script gives fit() no val_loader; use the "
                "default (slice) or pass a val_loader"
            )
        when = (
            f"once the race sends it on to the full budget (now training to rung step "
            f"{self.rung_stop})"
            if self.rung_stop
            else f"from step {self.step}"
        )
        self.log(
            f"early stopping on the {es.metric} loss every {es.every} steps, patience "
            f"{es.patience}, min delta {es.min_delta:g}, {when}"
        )

    def _early_stop_start(self) -> None:
        """The metric where early stopping starts is its first best: the slice loss the
        fork has just reported before its first step, else measured here (not reported: a
        raced variant's rung already reported it, and val is reported at the fork's end)."""
        es = self.early
        if es is None or self.rung_stop or es.best is not None:
            return
        loader = self._slice_loader() if es.metric == "slice" else self.val_loader
        assert loader is not None
        loss, _, _ = evaluate_model(
            self.model, loader, self.loss, self.device, context=self._autocast
        )
        es.start(self.step, loss)

    def _early_stop_check(self) -> None:
        """Evaluate the early-stop metric on its cadence; stop the fork when it has run out
        of patience. Not on the step that ends the budget (the fork stops there anyway and
        reports its slice and val loss), nor while a raced variant trains to a rung."""
        es = self.early
        limit = self.budget or self.cfg.max_steps
        if es is None or self.rung_stop or self.stop_reason or (limit and self.step >= limit):
            return
        assert self.rec is not None
        self.rec.flush()  # the step's metrics before its evaluation
        loader = self._slice_loader() if es.metric == "slice" else self.val_loader
        assert loader is not None
        value = float(self._evaluate(loader, es.split)["loss"])
        if es.update(self.step, value):
            self.early_stopped = es.summary()
            self.log(es.describe())

    def _note_validation(self) -> None:
        """Say once when a val_loader will not be used on a schedule (val_every_n_epochs
        unset), and what a ReduceLROnPlateau then steps on; and when do_test_after has no
        test_loader to test on."""
        if self.cfg.do_test_after and self.test_loader is None:
            self.log(
                "do_test_after=True but fit() got no test_loader: no test pass will run",
                "warning",
            )
        plateau = isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.val_loader is None and plateau and self.cfg.scheduler_interval == "epoch":
            self.log(
                "ReduceLROnPlateau without a val_loader: it steps on each epoch's training loss",
                "warning",
            )
        if self.val_loader is None or self.cfg.val_every_n_epochs:
            return
        text = (
            "val_loader given without val_every_n_epochs: no periodic validation (it runs on "
            "demand: the dashboard, forks' reports); set val_every_n_epochs=1 to validate every epoch"
        )
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            text += "; ReduceLROnPlateau steps on the epoch's training loss meanwhile"
        self.log(text, "warning")

    def _note_loss_units(self) -> None:
        """Say once when the user's loss sums over the batch: the step loss shown is then a
        batch sum, while the epoch's train loss, val/test losses and per-sample losses are
        means over samples (side by side they would read as a 100x train/val gap)."""
        if self.loss.reduction == "sum":
            self.log(
                f"{self.loss.name}(reduction='sum'): each step's loss is the "
                "batch's sum; the epoch's train loss, the val/test losses and the per-sample "
                "losses are per-sample means, so compare those with each other",
                "warning",
            )

    def _note_by_rows(self) -> None:
        """Say once how a loss that only returns scalars gets per-sample values, and what
        that costs."""
        self._rows_noted = True
        self.log(
            f"{self.loss.who} returns one scalar for the batch: each sample's loss "
            "is its value on that sample alone (torch.func.vmap, one extra gradient-free "
            f"pass per step), checked to give the batch's {self.loss.reduction} back; a "
            "loss_fn that accepts reduction= (or an nn loss module) makes that pass free",
            "note",
        )

    def _note_scheduler(self) -> None:
        """Say once when a scheduler built to step every batch (OneCycleLR, CyclicLR) is
        stepped once per epoch (the default scheduler_interval): its schedule then covers a
        handful of steps of its total and the learning rate never follows it."""
        per_batch = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
        if self.cfg.scheduler_interval == "epoch" and isinstance(self.sched, per_batch):
            self.log(
                f"{type(self.sched).__name__} is stepped once per epoch "
                "(scheduler_interval='epoch', the default), but it is built to step every "
                "batch; pass Trainer(scheduler_interval='step') to follow its schedule",
                "warning",
            )

    def _note_persistent_workers(self) -> None:
        """Say once that the loader's workers start again every epoch: each epoch's loader
        is built from the epoch's data order, and workers seeded from (seed, epoch) are what
        makes a resume draw the same random augmentations."""
        if getattr(self.train_loader, "persistent_workers", False):
            self.log(
                "the train loader's persistent_workers=True is not kept: its worker processes "
                "start again each epoch (each epoch's loader follows OnTheFly's data order, "
                "and workers seeded per epoch make a resume repeat the same augmentations); "
                "work done in worker_init_fn runs once per epoch",
                "note",
            )

    def _note_unused_keys(self, batch: Any) -> None:
        """Say once when a dict batch carries keys the model never sees, or a tuple batch
        items past (inputs, target): fine for a sample weight or an index, but a model with
        two inputs (x1, x2, y) would otherwise train silently on x2 as its target."""
        if isinstance(batch, (tuple, list)) and len(batch) > 2:
            rest = "batch[2]" if len(batch) == 3 else f"batch[2:] ({len(batch) - 2} items)"
            self.log(
                f"each batch has {len(batch)} items: OnTheFly calls "
                f"model(batch[0]) and the loss on (output, batch[1]), and {rest} is not used "
                "(fine for a sample weight or index). If the model takes several inputs or "
                "the target is not second, yield (inputs, target) with the inputs as one "
                "tuple or dict the model unpacks",
                "warning",
            )
            return
        unused, xk, yk = unused_batch_keys(batch)
        if unused:
            self.log(
                f"the batches carry {', '.join(repr(k) for k in unused)} beside {xk!r}/{yk!r}: "
                f"OnTheFly calls model(batch[{xk!r}]) and the loss on batch[{yk!r}], so "
                "these keys are not passed to the model (e.g. an attention mask); put what "
                "the model needs into the inputs (a tuple or dict the model unpacks)",
                "warning",
            )

    def _calibrate_grad_norm(self, norm_s: float, t_step_start: float) -> None:
        """Auto cadence: measure the norm every N steps where N is the smallest (1-16) at
        which it costs <= GRAD_NORM_BUDGET of a step, timed on this process's steps 11-30
        (its first steps warm up allocators and caches, also after a resume: timed there,
        a step looks slower and the norm cheaper). Clipping and AMP measure every step."""
        if self.grad_clip > 0 or self.scaler is not None:
            return
        self._gn_cal.append((norm_s, time.perf_counter() - t_step_start))
        if len(self._gn_cal) < _GN_WARMUP_STEPS + _GN_TIMED_STEPS:
            return
        timed = self._gn_cal[_GN_WARMUP_STEPS:]
        norm_med = float(np.median([c[0] for c in timed]))
        step_med = float(np.median([c[1] for c in timed]))
        self.gn_every = max(
            1, min(16, math.ceil(norm_med / max(GRAD_NORM_BUDGET * step_med, 1e-9)))
        )
        if self.gn_every > 1:
            self.log(
                f"gradient norm measured every {self.gn_every} steps (it costs "
                f"{norm_med * 1e3:.3f} ms of a {step_med * 1e3:.2f} ms step); "
                "set Trainer(grad_norm_every=1) to measure it on every step",
                "note",
            )

    def _check_weights(self, why: str) -> None:
        """With the gradient norm measured only every N steps, an update with NaN/Inf
        gradients can go through unseen on the steps between; the weights are then
        non-finite for good, and so is every later loss. Checked (one norm pass over the
        parameters) on the first non-finite loss of a streak and when training ends: such a
        run fails, naming the steps, instead of skipping updates or 'completing'."""
        if self.gn_every <= 1 or self.grad_clip > 0 or self.scaler is not None:
            return  # every update was checked (and skipped when non-finite)
        weights = [p.detach() for g in self.opt.param_groups for p in g["params"]]
        if not weights or bool(torch.isfinite(torch.stack(torch._foreach_norm(weights))).all()):
            return
        ok = self._gn_ok_step
        good = [c for c in self._written if c[0] <= ok]
        where = (
            f"checkpoint {good[-1][1]} (step {good[-1][0]}) holds weights from before it"
            if good
            else f"no checkpoint of this run precedes step {ok + 1}"
        )
        raise OnTheFlyError(
            f"the weights are non-finite {why}: an update with NaN/Inf gradients was applied "
            f"after step {ok}, on a step whose gradient norm was not measured (it is measured "
            f"every {self.gn_every} steps to keep its cost under 1% of a step); {where}. "
            "Trainer(grad_norm_every=1) checks every update and skips bad ones; a lower "
            "learning rate or grad_clip avoids them"
        )

    def _nonfinite_samples(self, per: Any, ids: np.ndarray) -> str:
        """Which samples of a batch with a non-finite loss have one (dataset positions), so
        the warning points at the data; "" when it cannot tell (every sample finite: the
        reduction overflowed)."""
        try:
            vals = self.loss.per_sample(*per) if isinstance(per, tuple) else per
            flat = vals.detach().float().cpu().numpy().reshape(-1)
        except Exception:  # noqa: BLE001 - a warning's detail must not fail the step
            return ""
        if flat.size != len(ids):
            return ""
        bad = np.asarray(ids)[~np.isfinite(flat)]
        if bad.size == 0:
            return ""
        shown = ", ".join(str(int(i)) for i in bad[:8])
        more = f" and {bad.size - 8} more" if bad.size > 8 else ""
        return f"; non-finite for sample(s) {shown}{more} (dataset positions)"

    def _nonfinite(self, what: str, detail: str = "") -> None:
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        self.log(
            f"non-finite {what} at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch + 1})"
            f"{detail}: update skipped",
            "warning",
        )
        if self.nonfinite_run >= self.cfg.nonfinite_patience:
            verb = "were" if what == "gradients" else "was"
            # Raised once the step is recorded: its per-sample losses are stored too.
            self._nonfinite_failure = OnTheFlyError(
                f"the {what} {verb} non-finite for {self.nonfinite_run} consecutive steps "
                f"(last at step {self.step + 1}, epoch {self.epoch + 1}); lower the learning rate, "
                "enable grad_clip, or check the data"
            )

    def _end_epoch(self, n_batches: int, seconds: float = 0.0) -> None:
        assert self.conn is not None and self.rec is not None
        conn, run_id, epoch, step = self.conn, self.run_id, self.epoch, self.step
        bad, self._epoch_nonfinite = self._epoch_nonfinite, 0
        means: list[float] = []

        def send_end(mean: float) -> None:  # on the recorder's thread, after the last losses
            means.append(mean)
            # In the sample feed, after the epoch's last losses: a stream message here
            # would wake the stream's threads and the supervisor's, every epoch.
            conn.send_bulk(
                epoch_end=pb.EpochEnd(
                    run_id=run_id,
                    epoch=epoch,
                    step=step,
                    train_loss=mean,
                    seconds=seconds,
                    nonfinite_steps=bad,
                )
            )

        self.rec.end_epoch(send_end, at_backward=True)
        # A fork's epoch is one pass over its slice: it validates at its end (and on its
        # early-stop cadence), and its epoch-interval scheduler steps once per main-run
        # epoch of steps (`_fork_epoch_sched`), not per pass over the slice.
        fork = self.env.role == "fork"
        every = self.cfg.val_every_n_epochs
        validate = bool(
            not fork and every and (epoch + 1) % every == 0 and self.val_loader is not None
        )
        plateau = (
            not fork
            and self.sched is not None
            and isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
        )
        if validate or self._console() or plateau:
            # Only these read the epoch's mean here, or must follow its end on the wire; the
            # common case does not wait for the recorder thread at all.
            self.rec.flush()
        mean = means[0] if means else math.nan
        val_loss = None
        val_acc = None
        val_given_up = False
        if validate and self.val_loader is not None:
            # An early-stop check may have just validated these weights (same step).
            if self._at_this_step("val"):
                val_loss = self._evaluated["val"][1]["loss"]
                val_acc = self._evaluated["val"][1].get("accuracy")
            else:
                try:
                    res = self._evaluate(self.val_loader, "val", abortable=True)
                    val_loss, val_acc = res["loss"], res.get("accuracy")
                except EvalAborted:
                    # A stop must not wait for a long validation pass (the supervisor's
                    # SIGTERM would then lose the epoch): the epoch's checkpoint and the
                    # stop follow at once.
                    val_given_up = True
                    self.log(
                        f"validation at the end of epoch {epoch + 1} given up: a stop "
                        "arrived during it (no val loss recorded for this epoch)",
                        "warning",
                    )
        if self._console():
            # `python train.py`: no terminal view of its own, so a line per epoch here.
            val = f" · val loss {val_loss:.4f}" if val_loss is not None else ""
            if val and isinstance(val_acc, float) and math.isfinite(val_acc):
                val += f" · accuracy {val_acc:.4g}"  # as `onthefly run` shows it
            train = f"{mean:.4f}" if math.isfinite(mean) else "—"
            if bad:
                train += f" ({bad} non-finite step{'s' if bad != 1 else ''} left out)"
            print(
                f"[onthefly] epoch {epoch + 1}{f'/{n}' if (n := self.cfg.epoch_limit) else ''}"
                f" · train loss {train}{val}",
                flush=True,
            )
        if self.sched is not None and self.cfg.scheduler_interval == "epoch" and not fork:
            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = val_loss if val_loss is not None else mean
                if val_given_up:
                    pass  # its metric is the val loss, which this epoch has none of
                elif math.isfinite(metric):
                    self.sched.step(metric)
                elif not self._plateau_skip_said:
                    # A NaN would count as "no improvement" and cut the learning rate.
                    self._plateau_skip_said = True
                    self.log(
                        f"ReduceLROnPlateau not stepped at epoch {epoch + 1}: its metric "
                        f"({'val' if val_loss is not None else 'train'} loss) is {metric}; "
                        "it is not stepped on non-finite values (said once)",
                        "warning",
                    )
            else:
                self.sched.step()
        self.epoch += 1
        self.batch = 0
        if self.epoch_ckpt.due(epoch):
            self._checkpoint("epoch")

    def _fork_epoch_sched(self, losses: list[float]) -> None:
        """A fork's epoch-interval scheduler, once per main-run epoch of steps: the schedule
        runs at the main run's pace whatever the slice's size (a pass over a 5-batch slice
        is not an epoch). ReduceLROnPlateau steps on the mean finite training loss of those
        steps (a fork validates at its end)."""
        assert self.sched is not None
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            finite = [v for v in losses if math.isfinite(v)]
            if finite:
                self.sched.step(sum(finite) / len(finite))
        else:
            self.sched.step()

    def _evaluate(self, loader: DataLoader, split: str, abortable: bool = False) -> dict[str, Any]:
        """Evaluate and report; `abortable`: a stop (command, lost supervisor, or signal)
        arriving during the pass raises EvalAborted between batches."""
        abort = None
        if abortable:
            assert self.conn is not None
            conn, had = self.conn, self.stop_reason

            def abort() -> bool:
                return self.stop_reason != had or any(
                    c.kind in ("stop", "lost") for c in conn.commands
                )

        out = self._evaluate_once(loader, split, abort)
        self._evaluated[split] = (self.step, out)
        return out

    def _at_this_step(self, split: str) -> bool:
        done = self._evaluated.get(split)
        return done is not None and done[0] == self.step

    def _evaluate_once(
        self, loader: DataLoader, split: str, abort: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        assert self.conn is not None
        slices = self.cfg.val_slices if split == "val" else None
        if not slices:
            result = evaluate_model(
                self.model, loader, self.loss, self.device, context=self._autocast, abort=abort
            )
            self._note_nonfinite_eval(split, result[0], result[2])
            return report_eval(self.conn, self.run_id, split, self.step, self._eval_epoch(), result)
        from onthefly_worker import slices as sl

        if self.env.role == "train" and not getattr(self, "_slices_written", False):
            self._slices_written = True
            sizes = sl.write_train_selections(self.train_loader, slices, self.env.session_dir)
            if sizes:
                self.log(
                    "val slices in the training set: "
                    + ", ".join(f"{k} {n} samples" for k, n in sizes.items())
                )
        overall, per = sl.evaluate_with_slices(
            self.model, loader, self.loss, self.device, slices, context=self._autocast, abort=abort
        )
        self._note_nonfinite_eval(split, overall[0], overall[2])
        for name, res in per.items():  # before the overall loss: a reader sees them together
            report_eval(
                self.conn, self.run_id, f"val_slice:{name}", self.step, self._eval_epoch(), res
            )
        return report_eval(self.conn, self.run_id, split, self.step, self._eval_epoch(), overall)

    def _eval_epoch(self) -> int:
        """The epoch the weights being evaluated finished in: at an epoch's end (the next
        one not begun) that epoch, so a test after training and the last validation at the
        same step name the same epoch."""
        return self.epoch - 1 if self.batch == 0 and self.epoch > 0 else self.epoch

    def _note_nonfinite_eval(self, split: str, loss: float, samples: int) -> None:
        """A non-finite evaluation loss is stored as "no value"; say why, once per split."""
        if not math.isfinite(loss) and split not in self._nonfinite_evals:
            self._nonfinite_evals.add(split)
            if samples == 0:
                self.log(
                    f"the {split} loader yielded no samples (step {self.step}): there is no "
                    f"{split} loss to report (said once)",
                    "warning",
                )
                return
            self.log(
                f"{split} loss is {loss} at step {self.step}: at least one {split} sample gives "
                "a non-finite loss (check that data for NaN/Inf; said once)",
                "warning",
            )

    def _slice_loader(self) -> DataLoader:
        """The fork's own slice: the train data restricted to its selection, in order."""
        assert self.order.subset is not None
        return selection_loader(self.train_loader, self.order.subset, self.order.batch_size)

    def _fork_reports(self) -> None:
        """A fork reports its loss on its own slice (train data restricted to it) and on val."""
        if self.order.subset is None:
            return
        # Not twice at one step (same weights): an early-stop check or the epoch's
        # validation may have just measured it.
        if not self._at_this_step("slice:self"):
            self._evaluate(self._slice_loader(), "slice:self")
        if self.val_loader is not None and not self._at_this_step("val"):
            self._evaluate(self.val_loader, "val")
        if self.test_loader is not None and not self.run_test_on_stop:
            self._evaluate(self.test_loader, "test")  # (do_test_after has just tested it)
