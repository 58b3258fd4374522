"""Supervisor commands at step boundaries: the half the native loop and the Lightning
callback share. A subclass supplies the hooks (how to checkpoint, evaluate, stop, reach
the optimizer); the protocol — pause blocks without spinning until resume or stop, every
command is acknowledged with what happened — lives here once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import activity
from onthefly_worker.connection import Command, WorkerConnection
from onthefly_worker.errors import OnTheFlyError, root_cause
from onthefly_worker.recorder import Recorder


class CommandLoop(ABC):
    conn: WorkerConnection | None
    rec: Recorder | None
    paused: bool
    stop_reason: str
    run_test_on_stop: bool
    step: int
    hb_s: float

    # -- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _checkpoint(self, reason: str, wait: bool = False) -> str:
        """Write a checkpoint in the run's own format; "" when it could not be written."""

    @abstractmethod
    def _status(self, state: pb.WorkerState.ValueType, message: str = "") -> None: ...

    @abstractmethod
    def _eval_loader(self, split: str) -> DataLoader | None: ...

    @abstractmethod
    def _run_eval(self, loader: DataLoader, split: str) -> dict[str, Any]: ...

    @abstractmethod
    def _param_groups(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _set_grad_clip(self, value: float) -> None: ...

    @abstractmethod
    def _log(self, text: str, level: str = "info") -> None: ...

    def _test_after_training(
        self, run: Callable[[], dict[str, Any]], checkpoint: str
    ) -> dict[str, Any]:
        """The test pass once training has ended and its weights are in `checkpoint`: a
        test set that fails says where the weights are and that resume runs only it."""
        try:
            return run()
        except Exception:
            self._log(
                f"the test pass failed after training ended (step {self.step}); the trained "
                f"weights are in {checkpoint}: fix the test data and `onthefly resume` runs "
                "only the test pass",
                "warning",
            )
            raise

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    # -- `python train.py`: Ctrl+C / SIGTERM --------------------------------------------------
    interrupted: int = 0
    """The signal that stopped the run at a step boundary (0: none): Ctrl+C/SIGTERM on
    `python train.py`, or on the `onthefly run` supervisor (its Stop carries the signal)."""
    _interrupt_said_elsewhere = False

    @contextlib.contextmanager
    def graceful_signals(self, enabled: bool) -> Iterator[None]:
        """`python train.py` (`enabled`): the first Ctrl+C/SIGTERM stops the run at the next
        step boundary with a checkpoint, as `onthefly run` does (`onthefly resume` continues
        it); a second one interrupts at once. Handlers the script installed are left alone."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        defaults: dict[int, Any] = {
            signal.SIGINT: signal.default_int_handler,
            signal.SIGTERM: signal.SIG_DFL,
        }
        mine = [sig for sig, h in defaults.items() if signal.getsignal(sig) is h]

        def on_signal(signum: int, _frame: Any) -> None:
            if self.interrupted:
                for sig in mine:
                    signal.signal(sig, defaults[sig])
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.interrupted = signum
            what = "Ctrl+C" if signum == signal.SIGINT else "SIGTERM"
            self._request_stop(f"interrupted ({what})")
            self.run_test_on_stop = False
            self.paused = False
            if self.conn is not None:
                self.conn.command_event.set()
            print(
                f"[onthefly] {what}: stopping at the next step boundary with a checkpoint "
                "(again to interrupt at once)",
                file=sys.stderr,
                flush=True,
            )

        for sig in mine:
            signal.signal(sig, on_signal)
        try:
            yield
        finally:
            for sig in mine:
                if signal.getsignal(sig) is on_signal:
                    signal.signal(sig, defaults[sig])

    def end_as_interrupted(self, step: int, checkpoint: str) -> None:
        """After a run stopped by `graceful_signals`: say where, then end the script as the
        signal asks (KeyboardInterrupt for Ctrl+C, exit 128 + N otherwise)."""
        if not self.interrupted:
            return
        if not self._interrupt_said_elsewhere:
            print(
                f"[onthefly] stopped at step {step} ({checkpoint or 'no checkpoint'}); "
                "`onthefly resume` continues it",
                file=sys.stderr,
                flush=True,
            )
        if self.interrupted == signal.SIGINT:
            # The script ends as Ctrl+C ends it (a `try/except KeyboardInterrupt` around
            # fit() still sees it), but an uncaught one prints no traceback: the line above
            # says what happened.
            stop = KeyboardInterrupt()
            previous = sys.excepthook

            def quiet(kind: type[BaseException], value: BaseException, tb: Any) -> None:
                if value is not stop:
                    previous(kind, value, tb)

            sys.excepthook = quiet
            raise stop
        raise SystemExit(128 + self.interrupted)

    def _health(self, cmd: Command) -> None:
        assert self.conn is not None
        self.conn.ack(cmd.command_id, False, "health checks are not built for this kind of run yet")

    def _health_on(
        self,
        cmd: Command,
        loader: DataLoader,
        model: nn.Module,
        **context: Any,
    ) -> None:
        """Run the requested health checks on the live `model` with batches drawn from
        `loader`'s data set (RNG, weights and data order untouched) and acknowledge `cmd`.
        `context` completes what the checks take (health.run_checks): loss, optimizer,
        device, autocast, scaler, order (an EpochOrder), epoch, seed, data_wait_ms,
        step_ms, and optionally `replay_steps` (K: an in-process determinism replay)."""
        from onthefly_worker import health
        from onthefly_worker.data import dataset_size
        from onthefly_worker.evaluation import preserved_rng

        assert self.conn is not None
        opts = dict(cmd.args.get("options") or {})
        order, epoch, seed = context.pop("order"), int(context.pop("epoch")), context.pop("seed")
        replay_k = context.pop("replay_steps", 0)
        try:
            with preserved_rng():
                hb = health.draw_batches(
                    loader, int(opts.get("batches", 4)), context["device"], seed=seed
                )
                if replay_k:
                    k = int(opts.get("replay_steps", replay_k))
                    opt, loss, autocast = context["optimizer"], context["loss"], context["autocast"]
                    context["replay"] = lambda: health.replay_steps(
                        model, opt, loss, hb[:k], autocast=autocast
                    )
                verdicts = health.run_checks(
                    str(cmd.args.get("check") or "") or None,
                    model=model,
                    batches=hb,
                    dataset_len=dataset_size(loader),
                    ids_seen_by_epoch=[order.order(e) for e in range(max(0, epoch - 1), epoch + 1)],
                    labels=health.labels_of(loader.dataset),
                    **context,
                )
        except Exception as e:  # a bad check name, missing context, a data set that cannot be read
            self.conn.ack(cmd.command_id, False, f"{type(e).__name__}: {e}")
            return
        self.conn.ack(
            cmd.command_id,
            True,
            f"health: {health.worst(verdicts)}",
            {
                "run_id": str(getattr(self, "run_id", "")),
                "step": self.step,
                "verdicts": [v.to_dict() for v in verdicts],
            },
        )

    def _embed_source(self) -> tuple[nn.Module, DataLoader, torch.device | str] | None:
        """(model, training loader, device) to embed the training set with; None = no way.

        The native loop keeps them as `model`, `train_loader` and `device`; another kind of
        run overrides this or answers the embed command with a clear "not available".
        """
        model = getattr(self, "model", None)
        loader = getattr(self, "train_loader", None)
        if isinstance(model, nn.Module) and isinstance(loader, DataLoader):
            return model, loader, getattr(self, "device", None) or "cpu"
        return None

    def _embed(self, cmd: Command) -> None:
        """Write the penultimate-layer embedding of every training sample (embed.py)."""
        from onthefly_worker import embed

        conn = self.conn
        assert conn is not None
        src = self._embed_source()
        env = getattr(self, "env", None)
        session_dir = getattr(env, "session_dir", "") or (
            conn.welcome.session_dir if conn.welcome is not None else ""
        )
        run_id = str(getattr(self, "run_id", "") or (conn.welcome.run_id if conn.welcome else ""))
        if src is None or not session_dir or not run_id:
            conn.ack(
                cmd.command_id,
                False,
                "no embedding: this kind of run does not expose its model and training loader",
            )
            return
        try:
            ok, message, payload = embed.embed_to_session(
                *src,
                session_dir,
                run_id,
                self.step,
                int(cmd.args.get("max_dims") or embed.MAX_DIMS),
            )
        except Exception as e:  # a data set that cannot be read, a model that fails in eval
            conn.ack(cmd.command_id, False, f"no embedding: {type(e).__name__}: {e}")
            return
        conn.ack(cmd.command_id, ok, message, payload)

    def _on_demand_eval(self, cmd: Command, loader: DataLoader, split: str) -> None:
        """An eval pass asked for from outside (`onthefly test`). It fails alone: a loader
        or model that raises answers the command with the root cause and training goes on
        (evaluation restores the model's mode and every RNG, whatever happens)."""
        conn = self.conn
        assert conn is not None
        try:
            res = self._run_eval(loader, split)
        except Exception as e:  # the user's test data or model: not a reason to end the run
            script = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv[0] else None
            why = f"{split} pass failed: {root_cause(e, script)}; training goes on"
            conn.send(log=pb.LogLine(level="warning", text=why))
            conn.ack(cmd.command_id, False, why)
            return
        conn.ack(cmd.command_id, True, f"{split} loss {res['loss']:.4f}", res)

    # -- the protocol --------------------------------------------------------------------------
    def _poll(self) -> None:
        """Handle queued supervisor commands; block here (no spinning) while paused."""
        conn = self.conn
        assert conn is not None
        while True:
            conn.command_event.clear()
            while conn.commands:
                self._handle(conn.commands.popleft())
            if not self.paused or self.stop_reason:
                return
            if conn.closed.is_set():
                raise OnTheFlyError(f"lost the supervisor while paused: {conn.describe_error()}")
            with activity.idle():
                conn.command_event.wait(self.hb_s)

    def _handle(self, cmd: Command) -> None:
        conn = self.conn
        assert conn is not None and self.rec is not None
        if cmd.kind == "lost":
            if self.stop_reason:
                return  # stopping anyway (the supervisor may end as it stops us)
            # No worker outlives its supervisor: training on unrecorded would leave a
            # session whose status, checkpoints and per-sample data no longer say what ran.
            raise OnTheFlyError(
                f"lost the supervisor at step {self.step} ({conn.describe_error()}): the run "
                "stops here; `onthefly resume` continues it from its last recorded checkpoint"
            )
        if cmd.kind == "pause":
            if not self.paused:
                self.rec.flush()
                rel = self._checkpoint("pause", wait=True)
                self.paused = True
                self._status(pb.WORKER_STATE_PAUSED, f"paused at step {self.step}")
                conn.ack(
                    cmd.command_id,
                    True,
                    f"paused at step {self.step}",
                    {"step": self.step, "checkpoint": rel},
                )
            else:
                conn.ack(cmd.command_id, True, "already paused", {"step": self.step})
        elif cmd.kind == "resume":
            was = self.paused
            self.paused = False
            if was:
                self._status(pb.WORKER_STATE_RUNNING, f"resumed at step {self.step}")
            conn.ack(
                cmd.command_id, True, "resumed" if was else "was not paused", {"step": self.step}
            )
        elif cmd.kind == "checkpoint":
            rel = self._checkpoint(str(cmd.args.get("reason", "request")), wait=True)
            conn.ack(
                cmd.command_id,
                bool(rel),
                rel or "the checkpoint could not be written (see the log)",
                {"checkpoint": rel, "step": self.step},
            )
        elif cmd.kind == "eval":
            split = str(cmd.args.get("split", "test"))
            loader = self._eval_loader(split)
            if loader is None:
                conn.ack(cmd.command_id, False, f"this run has no {split} loader")
            else:
                self._on_demand_eval(cmd, loader, split)
        elif cmd.kind == "stop":
            self._request_stop(str(cmd.args.get("reason") or "stop requested"))
            signum = int(cmd.args.get("signal") or 0)
            if signum in (signal.SIGINT, signal.SIGTERM) and not self.interrupted:
                # The supervisor ends on Ctrl+C/SIGTERM: fit() ends the script as that signal
                # would (end_as_interrupted); the supervisor says where to resume from.
                self.interrupted = signum
                self._interrupt_said_elsewhere = True
            if cmd.args.get("run_test"):
                self.run_test_on_stop = True
            elif cmd.args.get("skip_test"):
                self.run_test_on_stop = False
            self.paused = False
            self._status(pb.WORKER_STATE_STOPPING, self.stop_reason)
            conn.ack(cmd.command_id, True, f"stopping at step {self.step}")
        elif cmd.kind == "set_hparams":
            vals = {k: float(v) for k, v in cmd.args.get("values", {}).items()}
            for g in self._param_groups():
                if "lr" in vals:
                    g["lr"] = vals["lr"]
                if "lr_mul" in vals:
                    g["lr"] = g["lr"] * vals["lr_mul"]
                if "weight_decay" in vals and "weight_decay" in g:
                    g["weight_decay"] = vals["weight_decay"]
            if "grad_clip" in vals:
                self._set_grad_clip(vals["grad_clip"])
            conn.ack(cmd.command_id, True, f"set {', '.join(sorted(vals))}", vals)
        elif cmd.kind == "health":
            self._health(cmd)
        elif cmd.kind == "embed":
            self._embed(cmd)
        else:
            conn.ack(cmd.command_id, False, f"unknown command {cmd.kind}")
