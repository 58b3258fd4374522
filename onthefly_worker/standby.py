"""A warm standby: the user's script, started ahead of time as the next fork, waiting at fit().

The supervisor's warm pool starts the script with the environment of a fork
(ONTHEFLY_ROLE=fork, GPU pinning and thread bounds already decided) plus
ONTHEFLY_STANDBY=1, so everything the script does before fit() (imports, data set-up,
model construction) happens exactly as in a cold fork, just earlier. At fit() the worker
attaches as a standby and blocks on an event (no CPU; heartbeats from a thread of their
own) until the supervisor sends `AssignRole(role=ROLE_FORK, spec_json={"env": {...}})`.
It then takes on that fork's environment (worker id, run id, spec file, error file, fit
marker), closes the standby stream and carries on as that fork would have from fit():
a fork's start costs a checkpoint load and a first step instead of a whole script start-up.
"""

from __future__ import annotations

import json
import os

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import env as wenv
from onthefly_worker.connection import PROTOCOL_VERSION, ConnectionLost, WorkerConnection
from onthefly_worker.errors import OnTheFlyError


def wait_for_role(env: wenv.WorkerEnv, framework: str) -> wenv.WorkerEnv:
    """Attach as a standby, wait for a fork to become, and return that fork's WorkerEnv.

    Exits the process quietly (SystemExit(0)) when the supervisor stops the standby or ends
    its stream instead of assigning it a fork.
    """
    conn = WorkerConnection(env.addr, env.token, env.worker_id)
    conn.send(
        hello=pb.Hello(
            role=pb.ROLE_STANDBY,
            pid=os.getpid(),
            protocol_version=PROTOCOL_VERSION,
            framework=framework,
        )
    )
    try:
        welcome = conn.wait_welcome(30.0)
        conn.start_heartbeat(welcome.heartbeat_interval_s, lambda: 0)
        assigned = _wait(conn)
    finally:
        conn.close(timeout=5.0)
    return _become(assigned)


def _wait(conn: WorkerConnection) -> dict[str, str]:
    while True:
        conn.command_event.wait()  # interruptible by SIGTERM (it raises SystemExit)
        conn.command_event.clear()
        while conn.commands:
            cmd = conn.commands.popleft()
            if cmd.kind == "assign":
                return _parse_assignment(cmd.args)
            if cmd.kind == "stop":
                raise SystemExit(0)
            conn.ack(
                cmd.command_id, ok=False, message="this is a standby worker: it has no run yet"
            )
        if conn.closed.is_set():
            if conn.error is not None:
                raise ConnectionLost(
                    f"the supervisor ended this standby's stream: {conn.describe_error()}"
                )
            raise SystemExit(0)  # the supervisor is shutting down


def _parse_assignment(args: dict[str, object]) -> dict[str, str]:
    if args.get("role") != pb.ROLE_FORK:
        raise OnTheFlyError(f"a standby can only become a fork, not role {args.get('role')!r}")
    try:
        spec = json.loads(str(args.get("spec_json") or "{}"))
    except ValueError as e:
        raise OnTheFlyError(f"the standby's assignment is not JSON: {e}") from None
    env = spec.get("env") if isinstance(spec, dict) else None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k.startswith("ONTHEFLY_") and isinstance(v, str)
        for k, v in env.items()
    ):
        raise OnTheFlyError("the standby's assignment must carry {'env': {ONTHEFLY_*: str}}")
    if env.get(wenv.ROLE) != "fork" or not env.get(wenv.RUN_ID):
        raise OnTheFlyError("the standby's assignment names no fork run")
    return env


def _become(assigned: dict[str, str]) -> wenv.WorkerEnv:
    for k in [k for k in os.environ if k.startswith("ONTHEFLY_") and k not in assigned]:
        if k not in ("ONTHEFLY_PARENT_PID",):
            del os.environ[k]
    os.environ.update(assigned)
    marker = os.environ.get(wenv.FIT_MARKER, "")
    if marker:  # the fork reached fit() (as the standby did)
        with open(marker, "a", encoding="utf-8"):
            pass
    new = wenv.WorkerEnv.from_environ()
    if new is None or new.standby:
        raise OnTheFlyError("the standby's assignment left no usable worker environment")
    return new
