"""The worker's link to the supervisor: one gRPC stream, and a sample feed.

A sender thread drains an outgoing queue into `WorkerService.Attach`; a receiver thread
turns supervisor commands into plain `Command` records on a deque that the training loop
polls at step boundaries (one `len()` per step: no locks, no syscalls on the hot path).
The recorder's per-sample loss flushes go to the sample feed the welcome names (a file
the supervisor reads on its own clock; see the proto's `Welcome.sample_feed`): a write
wakes no other thread, where a stream message wakes two of ours and one of the
supervisor's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
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
    sample_feed: str = ""


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
            w.sample_feed,
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


class SampleFeed:
    """Appends records to a worker's sample feed (format: the proto's Welcome.sample_feed),
    starting a new file every `segment_bytes` so the supervisor can delete read ones."""

    def __init__(self, base: str, segment_bytes: int = 8 * 1024 * 1024) -> None:
        self._base = base
        self._seg = 0
        self._size = 0
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()  # one record at a time, from any thread
        # The supervisor made the first file; later ones are ours (O_TRUNC: a stale one).
        self._fd = os.open(self._path(0), os.O_WRONLY | os.O_APPEND)

    def _path(self, k: int) -> str:
        return f"{self._base}.{k:06d}"

    def write(self, data: bytes) -> None:
        """One record, in one write. Raises OSError (disk full...); the record may then be
        partly written, and the reader never takes an incomplete record, so the caller
        sends it another way and writes nothing more here."""
        with self._lock:
            if self._size and self._size + 4 + len(data) > self.segment_bytes:
                nxt = os.open(
                    self._path(self._seg + 1),
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                    0o600,
                )
                _write_all(self._fd, b"\0\0\0\0")  # the end marker: go on in the next file
                os.close(self._fd)
                self._fd, self._seg, self._size = nxt, self._seg + 1, 0
            _write_all(self._fd, len(data).to_bytes(4, "little") + data)
            self._size += 4 + len(data)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):  # (a feed given up after an I/O error)
                    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("write returned 0")
        view = view[n:]


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
        # Messages put on the stream so far (under _send_lock): a feed record carries the
        # count, and the supervisor handles it after that many of the stream's messages.
        self._queued = 0
        self._send_lock = threading.Lock()
        self._feed: SampleFeed | None = None
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
                    self._open_feed(cmd)
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
        msg = pb.WorkerMessage(worker_id=self.worker_id, time=time.time(), **body)
        with self._send_lock:
            self._out.put(msg)
            self._queued += 1

    def send_bulk(self, **body: Any) -> None:
        """Like `send`, through the sample feed when the supervisor gave one (the recorder's
        flushes). The supervisor handles it after every message queued on the stream before
        it and before every message sent after this returns, as if it were on the stream.
        A feed that fails to write (disk full) is given up: this message and the rest go on
        the stream, and nothing is lost."""
        feed = self._feed
        if feed is None or self.closed.is_set():
            self.send(**body)
            return
        with self._send_lock:
            after = self._queued
        msg = pb.WorkerMessage(
            worker_id=self.worker_id, time=time.time(), after_stream=after, **body
        )
        try:
            feed.write(msg.SerializeToString())
        except OSError as e:
            self._feed = None
            feed.close()
            self.send(
                log=pb.LogLine(
                    level="warning",
                    text=f"sample feed write failed ({e}): per-sample losses go on the "
                    "gRPC stream from now on",
                )
            )
            self.send(**body)

    def _open_feed(self, welcome: Welcome) -> None:
        if not welcome.sample_feed:
            return
        path = os.path.normpath(os.path.join(welcome.session_dir, welcome.sample_feed))
        if not path.startswith(os.path.normpath(welcome.session_dir) + os.sep):
            return  # not inside the session: not a feed we write to
        try:
            self._feed = SampleFeed(path)
        except OSError as e:
            self.send(
                log=pb.LogLine(
                    level="warning",
                    text=f"sample feed {path} not opened ({e}): per-sample losses go on "
                    "the gRPC stream",
                )
            )

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
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
