"""Protobuf <-> plain data for the supervisor side. Protobuf types stop here."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.events import Event
from onthefly_supervisor.lifecycle import Role, RunStatus, WorkerState
from onthefly_supervisor.store import RunRow

ROLE_TO_PB = {
    Role.TRAIN: pb.ROLE_TRAIN,
    Role.FORK: pb.ROLE_FORK,
    Role.MERGE: pb.ROLE_MERGE,
    Role.HEALTH: pb.ROLE_HEALTH,
    Role.STANDBY: pb.ROLE_STANDBY,
}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
WORKER_STATE_TO_PB = {
    WorkerState.STARTING: pb.WORKER_STATE_STARTING,
    WorkerState.ATTACHED: pb.WORKER_STATE_ATTACHED,
    WorkerState.RUNNING: pb.WORKER_STATE_RUNNING,
    WorkerState.PAUSED: pb.WORKER_STATE_PAUSED,
    WorkerState.STOPPING: pb.WORKER_STATE_STOPPING,
    WorkerState.SUCCEEDED: pb.WORKER_STATE_SUCCEEDED,
    WorkerState.FAILED: pb.WORKER_STATE_FAILED,
    WorkerState.STOPPED: pb.WORKER_STATE_STOPPED,
}
WORKER_STATE_FROM_PB = {v: k for k, v in WORKER_STATE_TO_PB.items()}
RUN_STATUS_TO_PB = {
    RunStatus.PENDING: pb.RUN_STATUS_PENDING,
    RunStatus.RUNNING: pb.RUN_STATUS_RUNNING,
    RunStatus.PAUSED: pb.RUN_STATUS_PAUSED,
    RunStatus.COMPLETED: pb.RUN_STATUS_COMPLETED,
    RunStatus.FAILED: pb.RUN_STATUS_FAILED,
    RunStatus.STOPPED: pb.RUN_STATUS_STOPPED,
}
RUN_STATUS_FROM_PB = {v: k for k, v in RUN_STATUS_TO_PB.items()}


def _f(x: float | None) -> float:
    return math.nan if x is None else float(x)


def run_to_proto(r: RunRow) -> pb.RunInfo:
    return pb.RunInfo(
        run_id=r.run_id,
        name=r.name,
        kind=r.kind,
        status=RUN_STATUS_TO_PB[r.status],
        parents=r.parents,
        step=r.step,
        epoch=r.epoch,
        last_loss=_f(r.last_loss),
        val_loss=_f(r.val_loss),
        test_loss=_f(r.test_loss),
        sample_steps=r.sample_steps,
        created=r.created,
        ended=r.ended or 0.0,
        config_json=json.dumps(r.config),
        last_checkpoint=r.last_checkpoint,
        error=r.error,
    )


def event_to_proto(ev: Event) -> pb.Event:
    return pb.Event(
        seq=ev.seq,
        time=ev.time,
        kind=ev.kind,
        run_id=ev.run_id,
        payload_json=json.dumps(ev.payload, default=str),
    )


def metric_point(m: pb.StepMetric) -> dict[str, Any]:
    def fin(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {
        "step": int(m.step),
        "epoch": int(m.epoch),
        "batch": int(m.batch),
        "time": float(m.time),
        "loss": fin(m.loss),
        "lr": fin(m.lr),
        "grad_norm": fin(m.grad_norm),
        "samples_per_s": fin(m.samples_per_s),
        "step_time_ms": fin(m.step_time_ms),
        "data_time_ms": fin(m.data_time_ms),
        "memory_mb": fin(m.memory_mb),
        "extra": {k: float(v) for k, v in m.extra.items() if math.isfinite(v)},
    }


def unpack_samples(msg: pb.SampleLosses) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views of the packed ids (int64 LE) and losses (float32 LE)."""
    n = int(msg.count)
    if len(msg.ids) != 8 * n or len(msg.losses) != 4 * n:
        raise ValueError(
            f"SampleLosses count {n} does not match its buffers ({len(msg.ids)} id bytes, {len(msg.losses)} loss bytes)"
        )
    return np.frombuffer(msg.ids, dtype="<i8"), np.frombuffer(msg.losses, dtype="<f4")


def unpack_sample_extras(msg: pb.SampleLosses) -> dict[str, np.ndarray]:
    """Classification extras (margin, pred, labels) when the worker sent them."""
    n = int(msg.count)
    if not msg.margins:
        return {}
    if len(msg.margins) != 4 * n or len(msg.preds) != 4 * n or len(msg.labels) != 4 * n:
        raise ValueError("SampleLosses margins/preds/labels do not match its count")
    return {
        "margin": np.frombuffer(msg.margins, dtype="<f4"),
        "pred": np.frombuffer(msg.preds, dtype="<i4").astype(np.int64),
        "labels": np.frombuffer(msg.labels, dtype="<i4").astype(np.int64),
    }


def error_from_proto(e: pb.WorkerError) -> dict[str, Any]:
    return {
        "message": e.message,
        "traceback": e.traceback,
        "filename": e.filename,
        "lineno": e.lineno,
        "time": e.time,
    }
