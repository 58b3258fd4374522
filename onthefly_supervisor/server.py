"""gRPC servicers. Thin: validate, call the Supervisor, convert at the boundary.

Every RPC passes the token interceptor first. A refused request is a gRPC status with a
message that names the problem, never a crash of the supervisor.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg
from onthefly_supervisor import serde
from onthefly_supervisor.lifecycle import Role
from onthefly_supervisor.supervisor import TOKEN_KEY, ControlError, Supervisor

T = TypeVar("T")


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call without the session token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._token):
                    return continuation(handler_call_details)
                break
        return _deny(continuation(handler_call_details))


def _deny(handler: Any) -> Any:
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or wrong session token (see connection.json)"
        )

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def _guard(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ControlError as e:
        context.abort(e.code, e.message)
    except (ValueError, KeyError, IsADirectoryError, NotADirectoryError) as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e).strip("'\""))
    except FileNotFoundError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except FileExistsError as e:
        context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
    raise AssertionError("unreachable")


class WorkerServicer(pbg.WorkerServiceServicer):
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def Attach(
        self, request_iterator: Iterator[pb.WorkerMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.SupervisorCommand]:
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("body") != "hello":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message of Attach must be hello"
            )
        wid = first.worker_id
        link, welcome = _guard(context, lambda: self.sup.attach(first.hello, wid))
        yield welcome

        def read() -> None:
            try:
                for msg in request_iterator:
                    self.sup.on_stream_message(link, msg)
            except grpc.RpcError:
                pass
            finally:
                try:
                    self.sup.close_feed(link)
                finally:
                    link.closed.set()
                    link.out.put(None)

        reader = threading.Thread(target=read, name=f"onthefly-attach-{wid}", daemon=True)
        reader.start()
        try:
            while True:
                cmd = link.out.get()
                if cmd is None:
                    return
                yield cmd
        finally:
            self.sup.detach(wid)


class ControlServicer(pbg.ControlServiceServicer):
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    # -- status & events ---------------------------------------------------------------------
    def GetStatus(
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.SessionStatus:
        sup = self.sup
        with sup.lock:
            workers = list(sup.workers.values())
        runs = sup.store.runs()
        live = [w for w in workers if not w.state.terminal and w.spec.role is not Role.STANDBY]
        state = (
            "running"
            if live
            else (
                "failed"
                if any(r.status.value == "failed" and r.run_id == "main" for r in runs)
                else "finished"
            )
        )
        gpus = [
            pb.GpuInfo(
                index=g.index,
                name=g.name,
                utilization=g.utilization,
                memory_used_mb=g.memory_used_mb,
                memory_total_mb=g.memory_total_mb,
                worker_ids=g.workers,
            )
            for g in sup.gpu.refresh()
        ]
        return pb.SessionStatus(
            session_id=sup.session_id,
            session_dir=sup.dir,
            script=str(sup.store.get_meta("script", sup.cfg.script)),
            argv=list(sup.store.get_meta("argv", list(sup.cfg.argv))),
            started=sup.started,
            automode=sup.automode,
            workers=[
                pb.WorkerInfo(
                    worker_id=w.spec.worker_id,
                    run_id=w.spec.run_id,
                    role=serde.ROLE_TO_PB[w.spec.role],
                    state=serde.WORKER_STATE_TO_PB[w.state],
                    pid=w.pid,
                    attempt=w.attempt,
                    gpu=w.spec.gpu,
                    step=w.step,
                    epoch=w.epoch,
                    last_seen=w.last_seen,
                    stalled_s=w.stalled_s,
                    stuck_at=w.stuck_at,
                    exit_code=(w.exit.exit_code or 0) if w.exit else 0,
                    exit_signal=w.exit.signal_name if w.exit else "",
                )
                for w in workers
            ],
            runs=[serde.run_to_proto(r) for r in runs],
            gpus=gpus,
            last_event_seq=sup.bus.last_seq,
            state=state,
            port=sup.port,
        )

    def WatchEvents(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        if request.from_seq < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_seq must be >= 0")
        kinds = set(request.kinds)
        dash = request.client == "dashboard"
        bus = self.sup.bus
        with self.sup.lock:
            bus.remote_watchers += 1
            bus.dashboards += int(dash)
        try:
            for ev in bus.follow(int(request.from_seq), alive=context.is_active):
                if kinds and ev.kind not in kinds:
                    continue
                yield serde.event_to_proto(ev)
        finally:
            with self.sup.lock:
                bus.remote_watchers -= 1
                bus.dashboards -= int(dash)
                bus.last_remote_end = time.monotonic()

    # -- run control -------------------------------------------------------------------------
    def _act(
        self, request: pb.RunRequest, context: grpc.ServicerContext, verb: str, **body: Any
    ) -> pb.ActionReply:
        def go() -> pb.ActionReply:
            timeout = request.timeout_s or 30.0
            run, p = self.sup.command(
                request.run,
                wait=True if verb in ("pause", "checkpoint", "test") else request.wait,
                timeout=timeout,
                **body,
            )
            if not p.event.is_set():
                return pb.ActionReply(
                    ok=True, message=f"{verb} sent to {run.run_id}", run_id=run.run_id
                )
            if not p.ok:
                raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, p.message)
            return pb.ActionReply(
                ok=True,
                message=p.message,
                run_id=run.run_id,
                payload_json=json.dumps(p.payload) if p.payload is not None else "",
            )

        return _guard(context, go)

    def Pause(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._act(request, context, "pause", pause=pb.Pause(reason="user"))

    def Resume(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._act(request, context, "resume", resume=pb.Resume())

    def Test(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._act(request, context, "test", eval=pb.RunEval(split="test"))

    def Checkpoint(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._act(
            request, context, "checkpoint", checkpoint=pb.CheckpointNow(reason="request")
        )

    def SetHyperParams(
        self, request: pb.HyperParamsRequest, context: grpc.ServicerContext
    ) -> pb.ActionReply:
        allowed = {"lr", "lr_mul", "weight_decay", "grad_clip"}
        bad = sorted(set(request.values) - allowed)
        if bad:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown hyper-parameter(s) {', '.join(bad)}; settable: {', '.join(sorted(allowed))}",
            )
        for k, v in request.values.items():
            if not math.isfinite(v) or v < 0:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{k}={v} must be a finite number >= 0"
                )
        rr = pb.RunRequest(run=request.run, wait=True)
        return self._act(
            rr, context, "set", set_hparams=pb.SetHyperParams(values=dict(request.values))
        )

    def Stop(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        run = _guard(context, lambda: self.sup.request_stop(request.run, "stopped by the user"))
        return pb.ActionReply(ok=True, message=f"stopping {run.run_id}", run_id=run.run_id)

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ActionReply:
        live = _guard(context, lambda: self.sup.request_shutdown(request.reason))
        what = f"; stopping {live} at a step boundary with a checkpoint" if live else ""
        return pb.ActionReply(
            ok=True, message=f"supervisor of session {self.sup.session_id} shutting down{what}"
        )

    # -- read-only views ---------------------------------------------------------------------
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.RunList:
        if request.session and request.session != self.sup.session_id:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"this supervisor serves session {self.sup.session_id}, not {request.session}",
            )
        return pb.RunList(runs=[serde.run_to_proto(r) for r in self.sup.store.runs()])

    def GetMetrics(
        self, request: pb.MetricsRequest, context: grpc.ServicerContext
    ) -> pb.MetricSeries:
        def go() -> pb.MetricSeries:
            run = self.sup.resolve_run(request.run)
            if request.max_points < 0 or request.from_step < 0 or request.to_step < 0:
                raise ValueError("max_points, from_step and to_step must be >= 0")
            key = request.key or "loss"
            try:
                steps, vals = self.sup.store.metric_series(
                    run.run_id, key, int(request.from_step), int(request.to_step)
                )
            except KeyError:
                raise ControlError(
                    grpc.StatusCode.NOT_FOUND, f"run {run.run_id} has no metric {key!r}"
                ) from None
            total = int(steps.size)
            if request.max_points and total > request.max_points:
                steps, vals = minmax_downsample(steps, vals, int(request.max_points))
            return pb.MetricSeries(
                run_id=run.run_id,
                key=key,
                steps=steps.tolist(),
                values=vals.tolist(),
                total_points=total,
            )

        return _guard(context, go)

    def GetLossDistribution(
        self, request: pb.DistributionRequest, context: grpc.ServicerContext
    ) -> pb.LossDistribution:
        def go() -> pb.LossDistribution:
            run = self.sup.resolve_run(request.run)
            epochs = self.sup.arrays.epochs(run.run_id)
            if not epochs:
                raise ControlError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"run {run.run_id} has no per-sample losses yet",
                )
            epoch = epochs[-1] if request.epoch < 0 else int(request.epoch)
            if epoch not in epochs:
                raise ControlError(
                    grpc.StatusCode.NOT_FOUND,
                    f"run {run.run_id} has no losses for epoch {epoch} (epochs: {epochs})",
                )
            arr = self.sup.arrays.get(run.run_id, epoch)
            assert arr is not None
            if request.select:
                raise ControlError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "restricting the distribution to a selection is not built yet",
                )
            bins = int(request.bins or 50)
            if not 1 <= bins <= 10000:
                raise ValueError(f"bins={bins} must be in 1..10000")
            seen = arr[np.isfinite(arr)]
            counts, edges = (
                np.histogram(seen, bins=bins)
                if seen.size
                else (np.zeros(bins, dtype=np.int64), np.linspace(0, 1, bins + 1))
            )
            q = np.quantile(seen, [0.5, 0.9, 0.99]) if seen.size else [math.nan] * 3
            return pb.LossDistribution(
                run_id=run.run_id,
                epoch=epoch,
                bin_edges=edges.tolist(),
                counts=counts.tolist(),
                p50=float(q[0]),
                p90=float(q[1]),
                p99=float(q[2]),
                mean=float(seen.mean()) if seen.size else math.nan,
                seen=int(seen.size),
                total=int(arr.size),
                epochs=epochs,
            )

        return _guard(context, go)

    # -- not built yet: say so, never fake success -------------------------------------------
    def _hook(self, name: str, request: Any, context: grpc.ServicerContext, what: str) -> Any:
        fn = self.sup.control_hooks.get(name)
        if fn is None:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{what} is not built yet in this version of OnTheFly",
            )
        return _guard(context, lambda: fn(request))

    def Fork(self, request: pb.ForkRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._hook("Fork", request, context, "fork")

    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.ServicerContext
    ) -> pb.ActionReply:
        return self._hook("Rollback", request, context, "rollback")

    def Merge(self, request: pb.MergeRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._hook("Merge", request, context, "merge")

    def TrainGate(self, request: pb.GateRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._hook("TrainGate", request, context, "gate training")

    def CompareExperts(
        self, request: pb.CompareRequest, context: grpc.ServicerContext
    ) -> pb.Comparison:
        return self._hook("CompareExperts", request, context, "comparing experts")

    def ExportSlice(
        self, request: pb.ExportSliceRequest, context: grpc.ServicerContext
    ) -> pb.ExportReply:
        return self._hook("ExportSlice", request, context, "slice export")

    def ExportModel(
        self, request: pb.ExportModelRequest, context: grpc.ServicerContext
    ) -> pb.ExportReply:
        return self._hook("ExportModel", request, context, "model export")

    def ExportSession(
        self, request: pb.ExportSessionRequest, context: grpc.ServicerContext
    ) -> pb.ExportReply:
        return self._hook("ExportSession", request, context, "session export")

    def ImportSession(
        self, request: pb.ImportSessionRequest, context: grpc.ServicerContext
    ) -> pb.ExportReply:
        return self._hook("ImportSession", request, context, "session import")

    def ListPlans(self, request: pb.ListPlansRequest, context: grpc.ServicerContext) -> pb.PlanList:
        return self._hook("ListPlans", request, context, "the planner")

    def ApprovePlan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._hook("ApprovePlan", request, context, "the planner")

    def RejectPlan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.ActionReply:
        return self._hook("RejectPlan", request, context, "the planner")

    def EditPlan(
        self, request: pb.EditPlanRequest, context: grpc.ServicerContext
    ) -> pb.ActionReply:
        return self._hook("EditPlan", request, context, "the planner")

    def SetAutomode(
        self, request: pb.AutomodeRequest, context: grpc.ServicerContext
    ) -> pb.ActionReply:
        return self._hook("SetAutomode", request, context, "automode")

    def RunHealthCheck(
        self, request: pb.HealthRequest, context: grpc.ServicerContext
    ) -> pb.HealthReport:
        return self._hook("RunHealthCheck", request, context, "health checks")


def minmax_downsample(
    steps: np.ndarray, vals: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the min and max of each bucket (in step order), so spikes survive downsampling."""
    n = steps.size
    buckets = max(1, max_points // 2)
    if n <= max_points or buckets >= n:
        return steps, vals
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    out_idx: list[int] = []
    finite = np.where(np.isfinite(vals), vals, np.nan)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b <= a:
            continue
        seg = finite[a:b]
        if np.all(np.isnan(seg)):
            out_idx.append(int(a))
            continue
        i_min = int(np.nanargmin(seg)) + a
        i_max = int(np.nanargmax(seg)) + a
        out_idx.extend(sorted({i_min, i_max}))
    idx = np.asarray(out_idx, dtype=np.int64)
    return steps[idx], vals[idx]
