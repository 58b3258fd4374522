"""The worker's one gRPC stream to the supervisor.

A sender thread drains an outgoing queue into `WorkerService.Attach`; a receiver thread
turns supervisor commands into plain `Command` records on a deque that the training loop
polls at step boundaries (one `len()` per step: no locks, no syscalls on the hot path).
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg
from onthefly_worker import activity

TOKEN_KEY = "x-onthefly-token"
PROTOCOL_VERSION = 1
_CLOSE = object()


@dataclass
class Command:
    """A supervisor command, converted from protobuf at the boundary."""

    # pause | resume | checkpoint | eval | stop | health | set_hparams | embed | assign, and
    # `lost` (not from the supervisor: its stream ended without our closing it)
    kind: str
    command_id: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Welcome:
    session_id: str
    session_dir: str
    run_id: str
    flush_interval_s: float
    heartbeat_interval_s: float


def command_from_proto(msg: pb.SupervisorCommand) -> Command | Welcome:
    body = msg.WhichOneof("body")
    cid = msg.command_id
    if body == "welcome":
        w = msg.welcome
        return Welcome(
            w.session_id,
            w.session_dir,
            w.run_id,
            (w.flush_interval_ms or 50) / 1000.0,
            (w.heartbeat_interval_ms or 1000) / 1000.0,
        )
    if body == "pause":
        return Command("pause", cid, {"reason": msg.pause.reason})
    if body == "resume":
        return Command("resume", cid)
    if body == "checkpoint":
        return Command("checkpoint", cid, {"reason": msg.checkpoint.reason or "request"})
    if body == "eval":
        return Command("eval", cid, {"split": msg.eval.split or "test"})
    if body == "stop":
        stop = msg.stop
        return Command(
            "stop",
            cid,
            {
                "reason": stop.reason,
                "run_test": stop.run_test,
                "skip_test": stop.skip_test,
                "signal": stop.signal,
            },
        )
    if body == "health":
        opts = json.loads(msg.health.options_json) if msg.health.options_json else {}
        return Command("health", cid, {"check": msg.health.check, "options": opts})
    if body == "set_hparams":
        return Command("set_hparams", cid, {"values": dict(msg.set_hparams.values)})
    if body == "embed":
        return Command("embed", cid, {"max_dims": msg.embed.max_dims})
    if body == "assign":
        return Command("assign", cid, {"role": msg.assign.role, "spec_json": msg.assign.spec_json})
    return Command("unknown", cid, {"body": str(body)})


class ConnectionLost(RuntimeError):
    pass


class WorkerConnection:
    """Open stream to the supervisor. `send()` never blocks the training loop."""

    def __init__(self, addr: str, token: str, worker_id: str) -> None:
        self.addr = addr
        self.worker_id = worker_id
        self._channel = grpc.insecure_channel(
            addr,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._stub = pbg.WorkerServiceStub(self._channel)
        self._out: queue.Queue[object] = queue.Queue()
        self.commands: collections.deque[Command] = collections.deque()
        self.command_event = threading.Event()
        self.welcome: Welcome | None = None
        self._welcome_event = threading.Event()
        self.error: BaseException | None = None
        self.closed = threading.Event()
        self._closing = False
        self._responses = self._stub.Attach(self._requests(), metadata=((TOKEN_KEY, token),))
        self._receiver = threading.Thread(target=self._receive, name="onthefly-recv", daemon=True)
        self._receiver.start()

    def _requests(self) -> Iterator[pb.WorkerMessage]:
        while True:
            item = self._out.get()
            if item is _CLOSE:
                return
            assert isinstance(item, pb.WorkerMessage)
            yield item

    def _receive(self) -> None:
        try:
            for msg in self._responses:
                cmd = command_from_proto(msg)
                if isinstance(cmd, Welcome):
                    self.welcome = cmd
                    self._welcome_event.set()
                else:
                    self.commands.append(cmd)
                    self.command_event.set()
        except grpc.RpcError as e:
            if not self.closed.is_set():
                self.error = e
        finally:
            if not self._closing and self.welcome is not None:
                # The supervisor went away (killed, or its machine's network): the training
                # loop learns it at its next step boundary (`lost`), like any command.
                self.commands.append(Command("lost"))
            self.closed.set()
            self._welcome_event.set()
            self.command_event.set()

    def send(self, **body: Any) -> None:
        """Queue one WorkerMessage with exactly one body field, e.g. send(log=pb.LogLine(...))."""
        if self.closed.is_set():
            return
        self._out.put(pb.WorkerMessage(worker_id=self.worker_id, time=time.time(), **body))

    def start_heartbeat(
        self, interval_s: float, step: Callable[[], int], watch: bool = False
    ) -> None:
        """Liveness from a thread of its own: a slow step is not a hang, a stopped process is.
        With `watch`, called on the training thread: each beat also says how long that
        thread has made no progress and where it is (see activity.py)."""
        clock = activity.StallClock(step) if watch else None

        def beat() -> None:
            while not self.closed.wait(interval_s):
                if clock is None:
                    self.send(heartbeat=pb.Heartbeat(step=step()))
                    continue
                stalled, at = clock.sample()
                self.send(heartbeat=pb.Heartbeat(step=step(), stalled_s=stalled, stuck_at=at))

        threading.Thread(target=beat, name="onthefly-heartbeat", daemon=True).start()

    def wait_welcome(self, timeout: float) -> Welcome:
        self._welcome_event.wait(timeout)
        if self.welcome is None:
            detail = self.describe_error()
            raise ConnectionLost(f"supervisor at {self.addr} did not welcome this worker: {detail}")
        return self.welcome

    def describe_error(self) -> str:
        e = self.error
        if isinstance(e, grpc.RpcError):
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            name = code.name if code is not None else "UNKNOWN"
            return f"{name}: {details}"
        return "no answer (is the supervisor running?)"

    def send_error(self, exc: BaseException) -> None:
        """An exception as data (message, traceback, innermost user frame, time)."""
        from onthefly_worker.errors import error_record

        rec = error_record(exc)
        self.send(
            error=pb.WorkerError(
                message=str(rec["message"]),
                traceback=str(rec["traceback"]),
                filename=str(rec["filename"]),
                lineno=int(rec["lineno"]),  # type: ignore[call-overload]
                time=float(rec["time"]),  # type: ignore[arg-type]
            )
        )

    def ack(self, command_id: str, ok: bool = True, message: str = "", payload: Any = None) -> None:
        if not command_id:
            return
        self.send(
            ack=pb.CommandAck(
                command_id=command_id,
                ok=ok,
                message=message,
                payload_json=json.dumps(payload) if payload is not None else "",
            )
        )

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, half-close the stream and wait for the supervisor to end it."""
        self._closing = True
        self._out.put(_CLOSE)
        deadline = time.monotonic() + timeout
        while not self._out.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        self._receiver.join(max(0.0, deadline - time.monotonic()))
        self.closed.set()
        self._channel.close()
