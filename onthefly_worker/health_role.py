"""role=health: the determinism check, replayed in a side process from a checkpoint.

For `onthefly health --check determinism` (and for all checks) the supervisor starts the
user's script once more with ONTHEFLY_ROLE=health and a spec naming one checkpoint of
the run and K. When the script reaches `Trainer.fit`, this module takes over:

1. it loads the checkpoint (weights_only, sha256 verified against the store);
2. twice, from the checkpoint each time: a fresh copy of the model, optimizer,
   scheduler and loss the script built (as a resumed worker would have them), the
   checkpoint's model/optimizer/scheduler/scaler state and every RNG restored, then K
   training steps from the checkpoint's data cursor in the run's own data order
   (`EpochOrder` + `epoch_loader`: same permutation, same loader-worker seeds), with the
   same step as the training loop (autocast, GradScaler, clipping, non-finite skip,
   per-step or per-epoch scheduler);
3. it compares the sha256 of every resulting tensor (model, optimizer state named by
   parameter, torch RNG) and names the first that differs;
4. it answers the request that started it with the verdict (numbers and a plain-language
   hint, as the other checks) and exits.

The training worker is not involved: it keeps training, and its weights, RNG and data
order are never touched. The checks that need the live state (numerics, gradients,
activations, data, throughput) still run inside the training worker.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import checkpoint as ckpt
from onthefly_worker import env as wenv
from onthefly_worker.config import TrainerConfig
from onthefly_worker.connection import PROTOCOL_VERSION, WorkerConnection
from onthefly_worker.data import (
    EpochOrder,
    batch_len,
    data_fingerprint,
    dataset_size,
    epoch_loader,
    split_batch,
    to_device,
)
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.health import Verdict, check_determinism
from onthefly_worker.losses import PerSampleLoss

MODE = "side-process"
DEFAULT_STEPS = 5


class _Objects:
    """What the script built, as one replay uses it."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Any
    ) -> None:
        self.model = model
        self.opt = optimizer
        self.sched = scheduler
        self.loss_fn = loss_fn


def _fresh_copies(objs: _Objects) -> tuple[Callable[[], _Objects], str]:
    """A factory of independent copies of the script's objects, and how they are isolated.

    Deep copies (made before any replay) give every replay the objects exactly as the
    script built them, Python attributes included, like a resumed worker gets. A model
    that cannot be deep-copied is replayed on the script's own objects with their state
    reloaded from the checkpoint each time (tensor state only).
    """
    try:
        pristine = copy.deepcopy((objs.model, objs.opt, objs.sched, objs.loss_fn))
    except Exception:  # noqa: BLE001 - an unpicklable member: fall back, and say so
        return (
            lambda: objs
        ), "state reloaded into the script's objects (they cannot be deep-copied)"

    def make() -> _Objects:
        m, o, s, lf = copy.deepcopy(pristine)
        if s is not None:
            _track_step_called(o)
        return _Objects(m, o, s, lf)

    return make, "fresh copies of the script's model, optimizer, scheduler and loss"


def _track_step_called(opt: torch.optim.Optimizer) -> None:
    """What an LR scheduler does to its optimizer when it is built: wrap `step` to note
    that it was called. A deep copy of the optimizer loses the wrapper, and the copied
    scheduler would then warn that `optimizer.step()` was overridden."""
    step = opt.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return
    ref = weakref.ref(opt)
    func = step.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        o = ref()
        assert o is not None
        o._opt_called = True  # type: ignore[attr-defined]
        return func.__get__(o, o.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state index -> parameter name (the state dict numbers them in group order)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out: dict[int, str] = {}
    i = 0
    for g in opt.param_groups:
        for p in g["params"]:
            out[i] = by_id.get(id(p), str(i))
            i += 1
    return out


def replay_result(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model state, optimizer state (named by parameter) and the torch RNG after a replay."""
    out: dict[str, Any] = {
        f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()
    }
    names = _param_names(model, opt)
    for idx, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            name = f"optimizer.{names.get(int(idx), str(idx))}.{key}"
            out[name] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    out["rng.torch"] = torch.get_rng_state()
    return out


def side_process_verdict(
    verdict: Verdict,
    *,
    checkpoint: str,
    checkpoint_step: int,
    steps: int,
    start: tuple[int, int],
    end: tuple[int, int],
    isolation: str,
    device: str,
    seconds: float,
    processes: str = "in a side process",
) -> Verdict:
    """A replay comparison as the answer to `onthefly health`: where the replays started,
    how they were isolated, and that the training worker was not involved."""
    where = (
        f"replayed {steps} step{'s' if steps != 1 else ''} from checkpoint {checkpoint} (step "
        f"{checkpoint_step}, epoch {start[0]}, batch {start[1]}) twice {processes} (pid "
        f"{os.getpid()}), the training worker untouched: "
    )
    numbers = {
        **verdict.numbers,
        "mode": MODE,
        "pid": os.getpid(),
        "checkpoint": checkpoint,
        "checkpoint_step": checkpoint_step,
        "steps": steps,
        "start_epoch": start[0],
        "start_batch": start[1],
        "end_epoch": end[0],
        "end_batch": end[1],
        "isolation": isolation,
        "device": device,
        "replay_seconds": verdict.numbers.get("seconds", 0.0),
        "seconds": seconds,
    }
    return Verdict(verdict.check, verdict.verdict, where + verdict.hint, numbers)


class HealthWorker:
    """The side process: load, replay twice, compare, report, exit."""

    def __init__(
        self,
        cfg: TrainerConfig,
        env: wenv.WorkerEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        train_loader: DataLoader,
        scheduler: Any = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.objs = _Objects(model, optimizer, scheduler, loss_fn)
        self.train_loader = train_loader
        self.spec: dict[str, Any] = env.read_spec()
        self.device = cfg.torch_device()
        self.conn: WorkerConnection | None = None

    # -- the role ----------------------------------------------------------------------------
    def serve(self) -> int:
        """Run the check and report it; the exit code (0: a verdict was delivered)."""
        hello = pb.Hello(
            role=pb.ROLE_HEALTH,
            pid=os.getpid(),
            run_id=self.env.run_id,
            project=self.cfg.project,
            run_name=self.env.run_id,
            dataset_size=dataset_size(self.train_loader),
            config_json=json.dumps({"health_of": self.spec.get("run_id", "")}),
            model_summary=type(self.objs.model).__name__,
            device=str(self.device),
            data_fingerprint=data_fingerprint(self.train_loader),
            protocol_version=PROTOCOL_VERSION,
            framework="native",
        )
        self.conn = WorkerConnection(self.env.addr, self.env.token, self.env.worker_id)
        self.conn.send(hello=hello)
        welcome = self.conn.wait_welcome(30.0)
        self.conn.start_heartbeat(welcome.heartbeat_interval_s, lambda: 0)
        cid = str(self.spec.get("command_id", ""))
        try:
            verdict = self.run()
        except Exception as e:  # the check could not run: say why, as data
            self.conn.ack(cid, False, f"{type(e).__name__}: {e}", {"pid": os.getpid()})
            code = 1
        else:
            self.conn.ack(
                cid,
                True,
                f"determinism: {verdict.verdict}",
                {"pid": os.getpid(), "verdicts": [verdict.to_dict()]},
            )
            code = 0
        finally:
            self.conn.close()
        return code

    def run(self) -> Verdict:
        rel = str(self.spec.get("checkpoint", ""))
        if not rel:
            raise OnTheFlyError("the health spec names no checkpoint")
        path = os.path.join(self.env.session_dir, str(self.spec.get("file") or rel))
        k = int(self.spec.get("steps", DEFAULT_STEPS) or DEFAULT_STEPS)
        if k < 1:
            raise OnTheFlyError(f"the determinism check needs at least 1 step, got {k}")
        t0 = time.perf_counter()
        expected = str(self.spec.get("sha256") or "") or None
        head = ckpt.load(path, map_location=self.device, expected_sha256=expected)
        if head.get("framework") == "lightning":
            raise OnTheFlyError(
                f"{rel} was written by attach_lightning; the side-process replay runs Trainer.fit scripts"
            )
        if head.get("adapters"):
            raise OnTheFlyError(
                f"{rel} is a fork trained with low-rank adapters; replaying adapter forks is not built yet"
            )
        cfg = self._run_config(head)
        cur = head["cursor"]
        start_epoch, start_batch, seed = int(cur["epoch"]), int(cur["batch"]), int(cur["seed"])
        step0 = int(head["counters"]["step"])
        subset = None
        run_spec = head.get("spec") or {}
        if head.get("role") == "fork" and run_spec.get("indices_file"):
            subset = np.load(os.path.join(self.env.session_dir, str(run_spec["indices_file"])))
        # The run's live gradient clip (set_hparams, a rollback) is in the checkpoint.
        clip = float(head["grad_clip"]) if head.get("grad_clip") is not None else cfg.grad_clip
        skip = cur.get("skip") or ()
        del head
        order = EpochOrder(self.train_loader, seed, subset)
        order.set_skip(skip)  # batches the run skips (a rollback) are skipped here too
        make, isolation = _fresh_copies(self.objs)
        positions: list[tuple[int, int]] = []

        def replay() -> dict[str, Any]:
            objs = make()
            # The checkpoint is read again for each replay: an optimizer's load_state_dict
            # may keep the loaded tensors, which the first replay would then have changed.
            state = ckpt.load(path, map_location=self.device)
            where = self._replay(objs, state, cfg, clip, order, k)
            positions.append(where)
            return replay_result(objs.model, objs.opt)

        verdict = check_determinism(replay, runs=2)
        end = positions[0] if positions else (start_epoch, start_batch)
        return side_process_verdict(
            verdict,
            checkpoint=rel,
            checkpoint_step=step0,
            steps=k,
            start=(start_epoch, start_batch),
            end=end,
            isolation=isolation,
            device=str(self.device),
            seconds=time.perf_counter() - t0,
        )

    # -- one replay --------------------------------------------------------------------------
    def _run_config(self, head: dict[str, Any]) -> TrainerConfig:
        """The run's config as the checkpoint recorded it (the script's, where it cannot be read)."""
        recorded = head.get("config")
        if isinstance(recorded, dict):
            try:
                return TrainerConfig.from_kwargs(
                    {k: v for k, v in recorded.items() if k != "val_slices"}
                )
            except (OnTheFlyError, TypeError, ValueError):
                pass
        return self.cfg

    def _replay(
        self,
        objs: _Objects,
        state: dict[str, Any],
        cfg: TrainerConfig,
        clip: float,
        order: EpochOrder,
        k: int,
    ) -> tuple[int, int]:
        """K training steps from the checkpoint in `state`, as the training loop takes them."""
        device = self.device
        model, opt, sched = objs.model, objs.opt, objs.sched
        model.to(device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        amp_dtype: torch.dtype | None = None
        scaler: Any = None
        if cfg.amp:
            if device.type == "cuda":
                amp_dtype = torch.float16
                scaler = torch.amp.GradScaler("cuda")
                if state.get("scaler") is not None:
                    scaler.load_state_dict(state["scaler"])
            else:
                amp_dtype = torch.bfloat16

        def autocast() -> contextlib.AbstractContextManager[Any]:
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=amp_dtype)

        loss = PerSampleLoss(objs.loss_fn)
        cur = state["cursor"]
        epoch, batch, seed = int(cur["epoch"]), int(cur["batch"]), int(cur["seed"])
        ckpt.restore_rng(state["rng"])
        del state
        params = [p for g in opt.param_groups for p in g["params"]]
        model.train()
        done = 0
        epoch_losses: list[float] = []
        while done < k:
            batches = order.batches(epoch)
            if not batches:
                raise OnTheFlyError("the train loader has no batches to replay")
            if batch >= len(batches):
                self._end_epoch(sched, cfg, epoch_losses)
                epoch, batch, epoch_losses = epoch + 1, 0, []
                continue
            todo = batches[batch : batch + (k - done)]
            for raw in epoch_loader(self.train_loader, todo, seed, epoch):
                x, y = split_batch(raw)
                x, y = to_device(x, device), to_device(y, device)
                n = batch_len(x) or len(todo[0])
                opt.zero_grad(set_to_none=True)
                with autocast():
                    out = model(x)
                    total, _ = loss(out, y, n)
                value = float(total.detach().float().item())
                if math.isfinite(value):
                    epoch_losses.append(value)
                    if scaler is not None:
                        scaler.scale(total).backward()
                        scaler.unscale_(opt)
                    else:
                        total.backward()
                    grads = [p.grad for p in params if p.grad is not None]
                    norm = (
                        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                        if grads
                        else None
                    )
                    if scaler is None and norm is not None and not bool(torch.isfinite(norm)):
                        opt.zero_grad(set_to_none=True)  # the loop skips such an update
                    else:
                        if clip > 0 and norm is not None:
                            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
                        if scaler is not None:
                            scaler.step(opt)
                            scaler.update()
                        else:
                            opt.step()
                        if sched is not None and cfg.scheduler_interval == "step":
                            sched.step()
                batch += 1
                done += 1
        return epoch, batch

    @staticmethod
    def _end_epoch(sched: Any, cfg: TrainerConfig, losses: list[float]) -> None:
        if sched is None or cfg.scheduler_interval != "epoch":
            return
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # The run steps it on its validation loss; a replay has only its own train loss.
            sched.step(float(np.mean(losses)) if losses else math.inf)
        else:
            sched.step()


def serve_health(
    cfg: TrainerConfig,
    env: wenv.WorkerEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Any,
    train_loader: DataLoader,
    scheduler: Any = None,
) -> int:
    """Trainer.fit's entry for role=health; returns the process exit code."""
    return HealthWorker(cfg, env, model, optimizer, loss_fn, train_loader, scheduler).serve()


__all__ = [
    "DEFAULT_STEPS",
    "MODE",
    "HealthWorker",
    "replay_result",
    "serve_health",
    "side_process_verdict",
]
