"""Finding and calling the live supervisor of a session (CLI, planner, tests)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg
from onthefly_supervisor.store import resolve_session, sessions_root

TOKEN_KEY = "x-onthefly-token"


class NoSupervisor(RuntimeError):
    pass


@dataclass
class Connection:
    addr: str
    token: str
    session_id: str
    session_dir: str
    pid: int


def supervisor_alive(sdir: str) -> bool:
    """Whether the session folder's supervisor process (its connection.json's pid) lives."""
    try:
        with open(os.path.join(sdir, "connection.json"), encoding="utf-8") as f:
            pid = int(json.load(f).get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def live_sessions(project_dir: str = ".") -> list[str]:
    """The session folders of this project whose supervisor is alive, oldest first."""
    root = sessions_root(project_dir)
    try:
        names = sorted(n for n in os.listdir(root) if n != "latest" and not n.startswith("."))
    except OSError:
        return []
    dirs = [os.path.realpath(os.path.join(root, n)) for n in names]
    return [d for d in dirs if supervisor_alive(d)]


def read_connection(session: str | None = None, project_dir: str = ".") -> Connection:
    sdir = resolve_session(session, project_dir)
    path = os.path.join(sdir, "connection.json")
    # A connection.json whose supervisor is gone (SIGKILL leaves it behind) is no
    # connection: its port may belong to another supervisor by now.
    alive = supervisor_alive(sdir)
    if not alive and session is None:
        # The latest session has ended but an earlier one started here is still live (two
        # `onthefly run`s in one project): the only live one is the one meant.
        live = [d for d in live_sessions(project_dir) if d != sdir]
        if len(live) == 1:
            sdir, path, alive = live[0], os.path.join(live[0], "connection.json"), True
        elif live:
            raise NoSupervisor(
                f"the latest session {os.path.basename(sdir)} has ended and "
                f"{len(live)} sessions are live here ("
                + ", ".join(os.path.basename(d) for d in live)
                + "); name one with --session ID"
            )
    if not alive:
        resume = ", `onthefly resume` continues its runs" if has_unfinished_main(sdir) else ""
        how = "its supervisor is gone" if os.path.exists(path) else "it has ended"
        raise NoSupervisor(
            f"session {os.path.basename(sdir)} has no live supervisor ({how}); "
            f"`onthefly serve` serves it for this command{resume}"
        )
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    return Connection(
        addr=info.get("addr") or f"{info['host']}:{info['port']}",
        token=info["token"],
        session_id=info["session_id"],
        session_dir=sdir,
        pid=int(info.get("pid", 0)),
    )


def has_unfinished_main(sdir: str) -> bool:
    """Whether `onthefly resume` has something to continue (its main run did not complete);
    True when the store cannot be read, so the hint errs on the side of mentioning it."""
    import sqlite3
    import urllib.parse

    db = urllib.parse.quote(os.path.abspath(os.path.join(sdir, "session.db")))
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT status FROM runs WHERE kind = 'main'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return True
    return any(r[0] != "completed" for r in rows)


class ControlClient:
    def __init__(self, conn: Connection, timeout: float = 60.0) -> None:
        self.conn = conn
        self.timeout = timeout
        self.channel = grpc.insecure_channel(conn.addr)
        self.stub = pbg.ControlServiceStub(self.channel)
        self.metadata = ((TOKEN_KEY, conn.token),)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        fn = getattr(self.stub, method)
        return fn(request, metadata=self.metadata, timeout=timeout or self.timeout)

    def watch(self, from_seq: int = 0, kinds: list[str] | None = None, client: str = "cli") -> Any:
        return self.stub.WatchEvents(
            pb.WatchRequest(from_seq=from_seq, kinds=kinds or [], client=client),
            metadata=self.metadata,
        )

    def ping(self, timeout: float = 3.0) -> pb.SessionStatus:
        try:
            return self.call("GetStatus", pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise NoSupervisor(
                    f"the supervisor of session {self.conn.session_id} at {self.conn.addr} does not answer "
                    "(it was killed?); `onthefly resume` continues the session"
                ) from None
            raise

    def close(self) -> None:
        self.channel.close()


def connect(session: str | None = None, project_dir: str = ".") -> ControlClient:
    return ControlClient(read_connection(session, project_dir))
