"""role=health for attach_lightning scripts: the determinism check as two resumed workers.

A Trainer.fit script is replayed twice inside one side process (health_role.py), which
owns the training step. A Lightning script's step belongs to Lightning (its fit loop,
precision plugin, clipping, accumulation, the user's hooks), and one `trainer.fit` per
process is all a Lightning trainer is built for. So the supervisor starts the script
twice, as two side processes, and each one is exactly what `onthefly resume` would
start: the user's script, reaching `trainer.fit`, resumed by OnTheFly from the
checkpoint (weights, optimizer, schedulers, scaler, every RNG, Lightning's loop state,
the data cursor). Each trains K batches through Lightning's own fit loop, then stops,
and saves what it ended with (model, optimizer state by parameter name, torch RNG) into
the check's folder. The second compares its result with the first's, tensor by tensor,
and answers the health request with the verdict (naming the first tensor that differs).

A replay sends nothing about its steps (no metrics, per-sample losses, checkpoints or
epochs): the run it replays is not touched, and neither is its training worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from onthefly_worker import checkpoint as ckpt
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.health import compare_replays
from onthefly_worker.health_role import DEFAULT_STEPS, replay_result, side_process_verdict

if TYPE_CHECKING:
    from onthefly_worker.lightning import _LightningRun

ISOLATION = (
    "two side processes, each the script resumed from the checkpoint by Lightning's own fit loop"
)
PEER_WAIT_S = 300.0
"""How long the comparing replay waits for the other one's result (the supervisor's own
deadline for the whole check is shorter, and stops both processes when it passes)."""


def prepare_replay(run: _LightningRun) -> str:
    """Before fit: read the health spec; the checkpoint to resume from (session-relative).

    The replay trains its K batches whatever the trainer's epoch and step limits (a
    finished run's last checkpoint is replayable too), without validation."""
    spec = run.spec
    rel = str(spec.get("file") or spec.get("checkpoint") or "")
    if not rel:
        raise OnTheFlyError("the health spec names no checkpoint")
    k = int(spec.get("steps", DEFAULT_STEPS) or DEFAULT_STEPS)
    if k < 1:
        raise OnTheFlyError(f"the determinism check needs at least 1 step, got {k}")
    if not spec.get("out"):
        raise OnTheFlyError("the health spec names no file for the replay's result")
    run.replay_steps = k
    from onthefly_worker.lightning import train_for_steps

    train_for_steps(run.trainer, -1)  # the replay stops itself after its K batches
    return rel


def check_replayable(run: _LightningRun, head: dict[str, Any]) -> None:
    """The checkpoint must be an attach_lightning one this replay can resume; a fork's
    checkpoint replays on the fork's own selection."""
    rel = str(run.spec.get("checkpoint") or "")
    if head.get("framework") != "lightning":
        raise OnTheFlyError(
            f"{rel} was written by Trainer.fit, not attach_lightning: it is replayed by the "
            "Trainer's side process, not a Lightning one"
        )
    if head.get("adapters"):
        raise OnTheFlyError(
            f"{rel} is a fork trained with low-rank adapters; replaying adapter forks is not built yet"
        )
    if (head.get("lightning") or {}).get("loops") is None:
        raise OnTheFlyError(f"{rel} has no Lightning loop state to resume from")
    fork_spec = head.get("spec") or {}
    if head.get("role") == "fork" and fork_spec.get("indices_file"):
        assert run.env is not None
        run.subset = np.load(os.path.join(run.env.session_dir, str(fork_spec["indices_file"])))


def _wait_for(path: str, deadline: float) -> None:
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise OnTheFlyError(
                f"the other replay's result ({os.path.basename(path)}) did not arrive within "
                f"{PEER_WAIT_S:.0f} s"
            )
        time.sleep(0.05)


def replay_and_report(run: _LightningRun, fit: Callable[[], Any]) -> int:
    """Run the replay (`fit` resumes and trains K batches), save its result and, in the
    comparing process, answer the health request; the process exit code."""
    assert run.env is not None
    spec, env = run.spec, run.env
    cid = str(spec.get("command_id") or "")
    t0 = time.perf_counter()
    try:
        try:
            fit()
        finally:
            run.teardown()  # the connection stays open for the answer below
        if run.replayed < run.replay_steps:
            raise OnTheFlyError(
                f"the replay trained {run.replayed} of {run.replay_steps} steps: Lightning's fit "
                "loop ended early (no train batches left?)"
            )
        seconds = time.perf_counter() - t0
        mine = replay_result(run.module, run.trainer.optimizers[0])
        ckpt.write_atomic(mine, os.path.join(env.session_dir, str(spec["out"])))
        peer = str(spec.get("peer") or "")
        if not peer:
            return 0  # the first replay: its result file is its answer
        peer_path = os.path.join(env.session_dir, peer)
        _wait_for(peer_path, time.monotonic() + PEER_WAIT_S)
        theirs = torch.load(peer_path, map_location="cpu", weights_only=True)
        head = run._restore_state or {}
        cur = head.get("cursor") or {}
        verdict = side_process_verdict(
            compare_replays([theirs, mine], seconds),
            checkpoint=str(spec.get("checkpoint") or ""),
            checkpoint_step=int((head.get("counters") or {}).get("step", 0)),
            steps=run.replay_steps,
            start=(int(cur.get("epoch", 0)), int(cur.get("batch", 0))),
            end=(run.epoch, run.batch),
            isolation=ISOLATION,
            device=str(run.module.device),
            seconds=time.perf_counter() - t0,
            processes="in two side processes",
        )
    except Exception as e:  # the check could not run: say why, as data
        if run.conn is not None:
            run.conn.ack(cid, False, f"{type(e).__name__}: {e}", {"pid": os.getpid()})
            run.conn.close()
        return 1
    assert run.conn is not None
    run.conn.ack(
        cid,
        True,
        f"determinism: {verdict.verdict}",
        {"pid": os.getpid(), "verdicts": [verdict.to_dict()]},
    )
    run.conn.close()
    return 0


__all__ = ["ISOLATION", "check_replayable", "prepare_replay", "replay_and_report"]
