"""`onthefly` command line: the contract that docs, tests and the dashboard share."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import serde
from onthefly_supervisor.client import (
    ControlClient,
    NoSupervisor,
    connect,
    live_sessions,
    supervisor_alive,
)
from onthefly_supervisor.store import Store, resolve_session, sessions_root
from onthefly_supervisor.supervisor import (
    DEFAULT_PORT,
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    install_signal_handlers,
)


class CliError(Exception):
    pass


def _die(msg: str, code: int = 1) -> int:
    print(f"onthefly: error: {msg}", file=sys.stderr)
    return code


# -- run / serve / resume --------------------------------------------------------------------
def _script_path(script: str) -> str:
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        raise CliError(f"script not found: {script}")
    return path


def session_seed(text: str | None) -> int | None:
    """--seed / ONTHEFLY_SEED as the session seed: an integer, 'none' (no seeding), or
    unset (0)."""
    raw = "0" if text is None else text.strip().lower()
    if raw in ("", "none", "off"):
        return None
    try:
        return int(raw)
    except ValueError:
        raise CliError(f"--seed / ONTHEFLY_SEED {text!r}: give an integer or 'none'") from None


def cmd_run(a: argparse.Namespace) -> int:
    if not a.script:
        raise CliError("run needs your training script: onthefly run train.py [ARGS...]")
    script = _script_path(a.script)
    cfg = SupervisorConfig(
        script=script,
        argv=tuple(a.args),
        port=a.port,
        seed=session_seed(a.seed if a.seed is not None else os.environ.get("ONTHEFLY_SEED")),
        automode=a.automode,
        headless=a.headless,
        keep_alive=a.keep_alive,
        max_restarts=a.max_restarts,
        gpus=a.gpus,
        hang_timeout_s=a.hang_timeout,
        warm_forks=a.warm_forks,
    )
    try:
        sup = Supervisor(cfg)
    except ValueError as e:  # a bad option value (e.g. --gpus naming a GPU that is not there)
        raise CliError(str(e)) from None
    return _serve(sup, headless=a.headless)


def _serve(sup: Supervisor, headless: bool) -> int:
    from onthefly_supervisor.tui import TerminalView

    should_stop = install_signal_handlers(sup)
    seq0 = sup.bus.last_seq if sup.cfg.resume_dir else 0  # a resumed session: show only what is new
    try:
        sup.start()
    except BaseException:
        sup.shutdown()
        raise
    view = TerminalView(
        sup,
        rich_mode=False if headless else None,
        from_seq=seq0,
    )
    view.print(
        f"[onthefly] session {sup.session_id} · supervisor on tcp://127.0.0.1:{sup.port} · store {os.path.relpath(sup.dir)}"
    )
    view.start()
    code = 1
    try:
        code = sup.serve(should_stop)
    finally:
        time.sleep(0.3)  # let the view drain the last events
        view.stop()
    if code in (130, 143):  # SIGINT, SIGTERM
        bare = sup.without_checkpoint
        if bare:
            line = (
                f"interrupted; {', '.join(bare)} had no checkpoint yet — `onthefly resume` "
                f"starts {'it' if len(bare) == 1 else 'them'} from the beginning"
            )
        elif sup.left_unfinished:
            line = (
                "interrupted; unfinished runs were checkpointed — `onthefly resume` continues them"
            )
        else:
            line = "interrupted; no run was unfinished"
        print(f"[onthefly] {line}", file=sys.stderr)
    elif code != 0:
        cause = sup.root_cause() or "the main run failed"
        what = "" if sup.failed_after_run else "main run failed: "
        print(f"[onthefly] {what}{cause}", file=sys.stderr)
    else:
        print(
            f"[onthefly] done · session {sup.session_id} · `onthefly runs` for the lineage",
            flush=True,
        )
    return code


def cmd_serve(a: argparse.Namespace) -> int:
    """`onthefly serve [SESSION]`: serve a finished session to the dashboard and the CLI.

    With --owner-pid (internal): self-hosted mode, `python train.py` started us and that
    process is the main worker.
    """
    if not a.owner_pid:
        sdir = resolve_session(a.args[0] if a.args else None)
        port = DEFAULT_PORT if a.port == "auto" else int(a.port)
        script = os.path.abspath(a.script) if a.script else _meta_script(sdir)
        if not os.path.isfile(script):
            raise CliError(f"--script {a.script}: no such file")
        cfg = SupervisorConfig(
            script=script, port=port, resume_dir=sdir, serve_only=True, keep_alive=True
        )
        return _serve(Supervisor(cfg), headless=True)
    if a.args and a.args[0] == "--":
        a.args = a.args[1:]
    if not a.args:
        raise CliError("serve needs -- SCRIPT [ARGS...]")
    port = -1 if a.port == "auto" else int(a.port)
    cfg = SupervisorConfig(
        script=os.path.abspath(a.args[0]) if a.args[0] else "",
        argv=tuple(a.args[1:]),
        port=port,
        owner_pid=a.owner_pid,
        project=a.project,
        run_name=a.run_name,
        seed=session_seed(os.environ.get("ONTHEFLY_SEED")),
    )
    sup = Supervisor(cfg)
    should_stop = install_signal_handlers(sup)
    try:
        sup.start()
    except BaseException as e:
        sup.shutdown()
        return _die(str(e))
    sys.stdout.write(json.dumps(sup.connection_info()) + "\n")
    sys.stdout.flush()
    log = open(os.path.join(sup.dir, "logs", "supervisor.log"), "a", encoding="utf-8")  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    return sup.serve(should_stop)


def cmd_resume(a: argparse.Namespace) -> int:
    # With a live supervisor, `resume` resumes a paused run; otherwise it continues a session.
    try:
        client = connect(a.session)
        client.ping()
    except (NoSupervisor, FileNotFoundError):
        client = None
    if client is not None:
        return _act(client, "Resume", a.run)
    sdir = resolve_session(a.session)
    never = _never_reached_fit(sdir)
    if never:
        raise CliError(
            f"session {os.path.basename(sdir)} has nothing to resume: {never}; "
            "`onthefly run SCRIPT [ARGS...]` starts it again"
        )
    script = os.path.abspath(a.script) if a.script else _meta_script(sdir)
    if not os.path.isfile(script):
        raise CliError(f"--script {a.script}: no such file")
    restored = not a.automode and _session_meta(sdir, "automode", False) is True
    automode = bool(a.automode) or restored
    sup = Supervisor(
        SupervisorConfig(
            script=script,
            port=a.port,
            resume_dir=sdir,
            max_restarts=a.max_restarts,
            keep_alive=a.keep_alive,
            automode=automode,
        )
    )
    if restored:
        print("[onthefly] automode on, as the session had it", flush=True)
    return _serve(sup, headless=a.headless)


def _never_reached_fit(sdir: str) -> str:
    """Why the session's main run has nothing to continue when its script ended cleanly
    before Trainer.fit() (e.g. `onthefly run train.py --help`); "" otherwise."""
    if not _never_trained(sdir):
        return ""
    try:
        st = Store(sdir, readonly=True)
    except Exception:  # noqa: BLE001 - unreadable: resume says what is wrong
        return ""
    try:
        main = st.run("main")
    finally:
        st.close()
    error = (main.error or "") if main is not None else ""
    return error.splitlines()[0] if "exited before Trainer.fit()" in error else ""


def _session_meta(sdir: str, key: str, default: Any) -> Any:
    st = Store(sdir, readonly=True)
    try:
        return st.get_meta(key, default)
    finally:
        st.close()


def _meta_script(sdir: str) -> str:
    script = _session_meta(sdir, "script", "")
    if not script or not os.path.isfile(script):
        raise CliError(
            f"the session's script {script!r} is missing; give its copy with "
            "`onthefly resume --script PATH` or `onthefly serve --script PATH` (an imported "
            "session keeps the original path)"
        )
    return str(script)


# -- live control ----------------------------------------------------------------------------
@contextlib.contextmanager
def _served(session: str | None, script: str | None) -> Iterator[ControlClient]:
    """A supervisor serving an ended session for one command (`onthefly serve`, started
    here and shut down after): the commands that need the session's script (exporting a
    model rebuilds it) work on a finished session as on a live one."""
    import subprocess
    import tempfile

    sdir = resolve_session(session)
    sid = os.path.basename(sdir)
    cmd = [sys.executable, "-m", "onthefly_supervisor", "serve", "--port", "0"]
    if script:
        cmd += ["--script", os.path.abspath(script)]
    print(f"[onthefly] session {sid} has ended: serving it for this command", file=sys.stderr)
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(sdir))))
    client: ControlClient | None = None
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*cmd, sid], cwd=project, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    lines = log.read().decode(errors="replace").strip().splitlines()
                    why = lines[-1] if lines else f"exit code {proc.returncode}"
                    raise CliError(f"could not serve session {sid}: {why}")
                with contextlib.suppress(NoSupervisor, FileNotFoundError, grpc.RpcError):
                    client = connect(sid, project)
                    client.ping()
                if client is not None:
                    break
                if time.monotonic() > deadline:
                    raise CliError(f"session {sid}: its supervisor did not start in 120 s")
                time.sleep(0.2)
            yield client
        finally:
            if proc.poll() is None and client is not None:
                with contextlib.suppress(Exception):
                    client.call("Shutdown", pb.ShutdownRequest(reason="command done"), timeout=10)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait()


def _ended_session(session: str | None) -> str | None:
    """The folder of `session` (default: latest) when it has ended and no live supervisor
    could be meant instead (none of its own, and for the default no other live session
    here); None otherwise."""
    sdir = resolve_session(session)
    if supervisor_alive(sdir) or (session is None and live_sessions(".")):
        return None
    return sdir


def _client(session: str | None = None) -> ControlClient:
    try:
        c = connect(session)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    except NoSupervisor as e:
        raise CliError(str(e)) from None
    if session is None:
        with contextlib.suppress(FileNotFoundError):
            latest = resolve_session(None)
            if os.path.realpath(latest) != os.path.realpath(c.conn.session_dir):
                print(
                    f"[onthefly] the latest session {os.path.basename(latest)} has ended; "
                    f"this goes to the live session {os.path.basename(c.conn.session_dir)}",
                    file=sys.stderr,
                )
    return c


def _rpc(client: ControlClient, method: str, request: Any, timeout: float | None = None) -> Any:
    try:
        return client.call(method, request, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE,):
            raise CliError(
                f"the supervisor at {client.conn.addr} does not answer (it has stopped?)"
            ) from None
        raise CliError(f"{e.details()} [{code.name}]") from None


def _act(client: ControlClient, method: str, run: str, timeout: float = 60.0) -> int:
    reply = _rpc(
        client,
        method,
        pb.RunRequest(run=run or "", wait=True, timeout_s=timeout),
        timeout=timeout + 5,
    )
    print(reply.message)
    return 0 if reply.ok else 1


def cmd_simple(a: argparse.Namespace) -> int:
    method = {"pause": "Pause", "test": "Test", "stop": "Stop", "checkpoint": "Checkpoint"}[a.cmd]
    try:
        client = _client(a.session)
    except CliError:
        sdir = _ended_session(a.session)
        if sdir is None:
            raise
        from onthefly_supervisor.client import has_unfinished_main

        resumable = has_unfinished_main(sdir) and not _never_reached_fit(sdir)
        raise CliError(
            f"session {os.path.basename(sdir)} has ended: no run trains to {a.cmd}"
            + (" (`onthefly resume` continues its unfinished runs)" if resumable else "")
        ) from None
    return _act(client, method, a.run)


def cmd_shutdown(a: argparse.Namespace) -> int:
    client = _client()
    reply = _rpc(client, "Shutdown", pb.ShutdownRequest(reason=a.reason), timeout=30)
    print(reply.message)
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            client.call("GetStatus", pb.StatusRequest(), timeout=2)
        except grpc.RpcError:
            print("supervisor stopped")
            return 0
        time.sleep(0.2)
    print(f"the supervisor still answers after {a.timeout:.0f} s", file=sys.stderr)
    return 1


def _status_dict(st: pb.SessionStatus) -> dict[str, Any]:
    return {
        "session_id": st.session_id,
        "session_dir": st.session_dir,
        "script": st.script,
        "argv": list(st.argv),
        "state": st.state,
        "port": st.port,
        "automode": st.automode,
        "last_event_seq": st.last_event_seq,
        "workers": [
            {
                "worker_id": w.worker_id,
                "run_id": w.run_id,
                "role": _role_name(w.role),
                "state": serde.WORKER_STATE_FROM_PB[w.state].value
                if w.state in serde.WORKER_STATE_FROM_PB
                else "",
                "pid": w.pid,
                "attempt": w.attempt,
                "gpu": w.gpu,
                "step": w.step,
                "epoch": w.epoch,
                "exit_code": w.exit_code,
                "exit_signal": w.exit_signal,
                "stalled_s": round(w.stalled_s, 1),
                "stuck_at": w.stuck_at,
            }
            for w in st.workers
        ],
        "runs": [_run_dict(r) for r in st.runs],
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "utilization": g.utilization,
                "memory_used_mb": g.memory_used_mb,
                "memory_total_mb": g.memory_total_mb,
                "workers": list(g.worker_ids),
            }
            for g in st.gpus
        ],
    }


def _role_name(role: int) -> str:
    r = serde.ROLE_FROM_PB.get(role)  # type: ignore[call-overload]
    return r.value if r is not None else ""


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _run_dict(r: pb.RunInfo) -> dict[str, Any]:
    status = serde.RUN_STATUS_FROM_PB.get(r.status)
    return {
        "run_id": r.run_id,
        "name": r.name,
        "kind": r.kind,
        "status": status.value if status else "",
        "parents": list(r.parents),
        "step": r.step,
        "epoch": r.epoch,
        "last_loss": _nan_none(r.last_loss),
        "val_loss": _nan_none(r.val_loss),
        "test_loss": _nan_none(r.test_loss),
        "sample_steps": r.sample_steps,
        "last_checkpoint": r.last_checkpoint,
        "error": r.error,
    }


def cmd_status(a: argparse.Namespace) -> int:
    try:
        client = _client(a.session)
        try:
            st = client.ping(timeout=10)
        except grpc.RpcError as e:  # e.g. another supervisor now holds a dead one's port
            raise CliError(
                f"the supervisor at {client.conn.addr} did not answer as session "
                f"{client.conn.session_id}: {e.details()} [{e.code().name}]"
            ) from None
    except (CliError, NoSupervisor) as e:
        try:
            sdir = resolve_session(a.session)
        except FileNotFoundError:  # no session at all: an error
            raise CliError(str(e)) from None
        if supervisor_alive(sdir):  # its supervisor lives but does not answer
            raise CliError(str(e)) from None
        return _stored_status(sdir, a.json)
    d = {**_status_dict(st), "live": True}
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    specs = _run_specs(d["session_dir"])
    print(f"session {d['session_id']} · {d['state']} · tcp://127.0.0.1:{d['port']} · {d['script']}")
    for w in d["workers"]:
        print(
            f"  worker {w['worker_id']:<10} {w['role']:<6} {w['state']:<10} pid {w['pid']:<7} gpu {w['gpu'] or 'cpu':<4} step {w['step']}"
            + (
                f" · no progress for {w['stalled_s']:.0f} s at {w['stuck_at']}"
                if w["stuck_at"]
                else ""
            )
        )
    for r in d["runs"]:
        print(
            f"  run {r['run_id']:<10} {r['kind']:<5} {r['status']:<10} step {r['step']:<7} loss {_f(r['last_loss'])} val {_f(r['val_loss'])}"
            + _rollback_note(specs.get(r["run_id"], {}))
            + _early_stop_note(specs.get(r["run_id"], {}))
        )
    for g in d["gpus"]:
        print(
            f"  gpu {g['index']} {g['name']} {g['utilization']:.0f}% {g['memory_used_mb']:.0f}/{g['memory_total_mb']:.0f} MiB {','.join(g['workers'])}"
        )
    return 0


def _stored_status(sdir: str, as_json: bool) -> int:
    """`onthefly status` without a live supervisor: the session's stored state (exit 0, so a
    script tells finished from crashed by the runs' statuses). A supervisor that died
    without cleaning up (SIGKILL) left its connection.json: its unfinished runs show as
    'stopped (supervisor gone)'."""
    st = Store(sdir, readonly=True)
    try:
        runs = st.runs()
        script, argv = st.get_meta("script", ""), st.get_meta("argv", [])
    finally:
        st.close()
    gone = os.path.exists(os.path.join(sdir, "connection.json"))
    main = next((r for r in runs if r.run_id == "main"), None)
    main_status = main.status.value if main is not None else ""
    state = (
        "supervisor gone"
        if gone
        else main_status
        if main_status in ("failed", "stopped")
        else "finished"
    )
    keys = "run_id name kind parents step epoch last_loss val_loss test_loss sample_steps"
    keys += " last_checkpoint error"
    rows = [{k: getattr(r, k) for k in keys.split()} | {"status": r.status.value} for r in runs]
    if as_json:
        d = {
            "session_id": os.path.basename(sdir),
            "session_dir": sdir,
            "script": script,
            "argv": argv,
            "state": state,
            "live": False,
            "workers": [],
            "runs": rows,
            "gpus": [],
        }
        print(json.dumps(d, indent=2))
        return 0
    where = (
        "from its last checkpoint"
        if main is not None and main.last_checkpoint
        else "from the beginning (it has no checkpoint)"
    )
    why = (
        "gone: killed? `onthefly resume` continues its runs"
        if gone
        else f"{state}; `onthefly resume` continues {where}"
        if state in ("stopped", "failed")
        else f"{state}; `onthefly runs` for the lineage"
    )
    print(f"session {os.path.basename(sdir)} · no live supervisor ({why}) · {script}")
    for r, row in zip(runs, rows, strict=True):
        shown = "stopped (supervisor gone)" if gone and not r.status.terminal else row["status"]
        print(
            f"  run {row['run_id']:<10} {row['kind']:<5} {shown:<10} step {row['step']:<7} loss {_f(row['last_loss'])} val {_f(row['val_loss'])}"
        )
    return 0


def _f(x: Any) -> str:
    return "—" if x is None else f"{x:.4g}"


def _run_specs(sdir: str) -> dict[str, dict[str, Any]]:
    """Each run's spec from the session store (read-only), for what the status RPC does not
    carry (rollbacks, skipped batches); empty when the store cannot be read."""
    try:
        st = Store(sdir, readonly=True)
    except Exception:  # noqa: BLE001 - the live view goes on without the extras
        return {}
    try:
        return {r.run_id: r.spec for r in st.runs()}
    except Exception:  # noqa: BLE001
        return {}
    finally:
        st.close()


def _rollback_note(spec: dict[str, Any], max_batches: int = 4) -> str:
    """' · rolled back 1x (step 190 -> 180, lr x0.5, clip 1) · skipped batches 0:13 (step
    183)': a run's rollbacks and the batches it leaves out (epoch:batch, as `onthefly
    rollback --skip` takes them), or '' when it has none."""
    rbs = [r for r in spec.get("rollbacks") or [] if isinstance(r, dict)]
    skipped = [b for b in spec.get("skipped_batches") or [] if isinstance(b, dict)]
    out = ""
    if rbs:
        last = rbs[-1]
        how = [f"step {last.get('from_step', '?')} -> {last.get('to_step', '?')}"]
        lr_mul = last.get("lr_mul")
        if isinstance(lr_mul, (int, float)) and lr_mul != 1.0:
            how.append(f"lr x{lr_mul:g}")
        if last.get("grad_clip"):
            how.append(f"clip {last['grad_clip']:g}")
        if last.get("bf16"):
            how.append("bf16")
        label = "last " if len(rbs) > 1 else ""
        out += f" · rolled back {len(rbs)}x ({label}{', '.join(how)})"
    if skipped:
        shown = ", ".join(
            f"{b.get('epoch', '?')}:{b.get('batch', '?')}"
            + (f" (step {b['step']})" if b.get("step") is not None else "")
            for b in skipped[:max_batches]
        )
        more = f" +{len(skipped) - max_batches} more" if len(skipped) > max_batches else ""
        out += f" · skipped batches {shown}{more}"
    return out


def _error_note(r: dict[str, Any]) -> str:
    """' · error: ...' for a run's error; a raced variant that lost (completed or stopped,
    not failed) is no error: ' · race: lost the race at rung 1 ...'."""
    if not r["error"]:
        return ""
    race = (r.get("spec") or {}).get("race") or {}
    if race.get("state") == "lost" and r["status"] != "failed":
        return f" · race: {r['error']}"
    return f" · error: {r['error']}"


def _early_stop_note(spec: dict[str, Any]) -> str:
    """' · stopped early at step 60 (slice loss best 0.41 at step 30, 3 evals without
    gain)' for a fork that early stopping ended, or ''."""
    es = spec.get("early_stopped")
    if not isinstance(es, dict):
        return ""
    best = es.get("best")
    shown = (
        f"best {best:.4g} at step {es.get('best_step')}"
        if isinstance(best, float)
        else "no finite value"
    )
    delta = f" > {es['min_delta']:g}" if es.get("min_delta") else ""
    return (
        f" · stopped early at step {es.get('step')} ({es.get('metric')} loss {shown}; "
        f"no gain{delta} in {es.get('patience')} evals)"
    )


def _cell(v: Any) -> str:
    """A loss in a table: 4 significant digits; — for none (NaN: no such split)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def _print_matrix(runs: list[str], slices: list[str], losses: list[Any]) -> None:
    """Runs as rows, slices as columns, losses row-major (as CompareRequest returns them)."""
    width = max([len(s) for s in slices] + [10])
    print(f"{'run':<12}" + "".join(f"{s:>{width + 2}}" for s in slices))
    for i, r in enumerate(runs):
        row = losses[i * len(slices) : (i + 1) * len(slices)]
        print(f"{r:<12}" + "".join(f"{_cell(v):>{width + 2}}" for v in row))


# -- store-backed views (work on finished sessions too) ---------------------------------------
def cmd_runs(a: argparse.Namespace) -> int:
    sdir = resolve_session(a.session)
    st = Store(sdir, readonly=True)
    try:
        runs = [r.to_dict() for r in st.runs()]
        evals = st.evals()
        comparison = st.get_meta("comparison")
        epochs = st.last_epochs()
    finally:
        st.close()
    for r in runs:
        r.pop("config", None)
        # `last_loss` is the last step's; the last finished epoch's mean is the steadier one.
        last = epochs.get(r["run_id"], {})
        r["train_loss"] = last.get("train_loss")
        r["train_loss_epoch"] = last.get("epoch")
        r["evals"] = [
            {k: e[k] for k in ("split", "step", "epoch", "loss", "accuracy", "samples")}
            for e in evals
            if e["run_id"] == r["run_id"]
        ]
    for r in runs:
        own = [e for e in r["evals"] if e["split"] == "slice:self"]
        r["slice_loss"] = own[-1]["loss"] if own else None
        r["early_stopped"] = (r.get("spec") or {}).get("early_stopped")
    if a.json:
        print(
            json.dumps(
                {"session_id": os.path.basename(sdir), "runs": runs, "comparison": comparison},
                indent=2,
            )
        )
        return 0
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for r in runs:
        if r["parents"]:
            children.setdefault(r["parents"][0], []).append(r)  # shown once, under its first parent
        else:
            roots.append(r)

    def show(r: dict[str, Any], depth: int) -> None:
        also = f" ← {', '.join(r['parents'])}" if len(r["parents"]) > 1 else ""
        pad = "  " * depth + ("└─ " if depth else "")
        print(
            f"{pad}{r['run_id']} ({r['kind']}, {r['status']}){also} step {r['step']} loss {_f(r['last_loss'])}"
            + (
                f" (epoch {r['train_loss_epoch'] + 1} train {_f(r['train_loss'])})"
                if r["train_loss"] is not None
                else ""
            )
            + (f" own slice {_f(r['slice_loss'])}" if r["slice_loss"] is not None else "")
            + f" val {_f(r['val_loss'])} test {_f(r['test_loss'])} · {r['sample_steps']} sample-steps"
            + _rollback_note(r.get("spec") or {})
            + _early_stop_note(r.get("spec") or {})
            + _error_note(r)
        )
        for c in children.get(r["run_id"], []):
            show(c, depth + 1)

    print(f"session {os.path.basename(sdir)}")
    for r in roots:
        show(r, 1)
    if comparison and comparison.get("runs") and comparison.get("slices"):
        when = time.strftime("%H:%M:%S", time.localtime(float(comparison.get("t", 0))))
        print(f"loss of each run on each slice (`onthefly compare`, {when}):")
        _print_matrix(comparison["runs"], comparison["slices"], comparison["losses"])
    else:
        print("`onthefly compare` adds each run's loss on every other run's slice")
    return 0


def cmd_sessions(a: argparse.Namespace) -> int:
    root = sessions_root()
    names = (
        sorted(n for n in os.listdir(root) if n != "latest" and not n.startswith("."))
        if os.path.isdir(root)
        else []
    )
    if a.action == "ls":
        latest = (
            os.path.basename(os.path.realpath(os.path.join(root, "latest")))
            if os.path.exists(os.path.join(root, "latest"))
            else ""
        )
        rows: list[dict[str, Any]] = []
        for n in names:
            d = os.path.join(root, n)
            if not os.path.exists(os.path.join(d, "session.db")):
                continue
            try:
                st = Store(d, readonly=True)
                runs = st.runs()
                script = st.get_meta("script", "")
                st.close()
            except Exception as e:  # a damaged session is listed, not fatal
                rows.append({"session_id": n, "error": str(e)})
                continue
            live = supervisor_alive(d)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(d) for f in fs)
            main = next((r for r in runs if r.run_id == "main"), None)
            # Killed (SIGKILL): its connection.json stays, naming a dead pid.
            gone = not live and os.path.exists(os.path.join(d, "connection.json"))
            unfinished = main is not None and not main.status.terminal
            rows.append(
                {
                    "session_id": n,
                    "script": script,
                    "runs": len(runs),
                    "status": "stopped (supervisor gone)"
                    if gone and unfinished
                    else (main.status.value if main else ""),
                    "live": live,
                    "bytes": size,
                    "latest": n == latest,
                }
            )
        if a.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no sessions in {root}")
        else:
            width = max((len(str(r.get("status", ""))) for r in rows), default=10)
            for r in rows:
                if "error" in r:
                    print(f"{r['session_id']}  (unreadable: {r['error']})")
                    continue
                mark = "*" if r["latest"] else " "
                print(
                    f"{mark} {r['session_id']}  {r['status']:<{width}} {r['runs']:>3} run(s)  {r['bytes'] / 2**20:7.1f} MiB  {'live ' if r['live'] else ''}{r['script']}"
                )
        return 0
    if a.action == "rm":
        if not a.session:
            raise CliError("sessions rm needs a SESSION id")
        d = resolve_session(a.session)
        if supervisor_alive(d):
            raise CliError(
                f"session {a.session} is live; end it first (`onthefly shutdown` in its project)"
            )
        shutil.rmtree(d)
        _fix_latest(root)
        print(f"removed {os.path.basename(d)}")
        return 0
    if a.action == "gc":
        keep = a.keep
        if keep < 0:
            raise CliError(f"sessions gc --keep {keep}: must be >= 0 (how many newest to keep)")
        # A session that never trained (`onthefly run train.py --help`, a script that failed
        # before its first step) does not count towards --keep: it goes, and the newest N
        # that trained stay.
        empty = [n for n in names if _never_trained(os.path.join(root, n))]
        trained = [n for n in names if n not in empty]
        removed = []
        for n in empty + (trained[:-keep] if keep else trained):
            d = os.path.join(root, n)
            if supervisor_alive(d):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(n)
        _fix_latest(root)
        gone_empty = len([n for n in removed if n in empty])
        print(
            f"removed {len(removed)} session(s)"
            + (f" ({gone_empty} that never trained)" if gone_empty else "")
            + f", kept the newest {keep} that trained"
        )
        return 0
    if a.action == "check":
        from onthefly_supervisor.archive import check_session

        d = resolve_session(a.session)
        problems = check_session(d)
        if a.json:
            print(
                json.dumps(
                    {"session_id": os.path.basename(d), "ok": not problems, "problems": problems},
                    indent=2,
                )
            )
            return 1 if problems else 0
        if problems:
            for p in problems:
                print(f"problem: {p}")
            return 1
        print(f"session {os.path.basename(d)}: ok")
        return 0
    if a.action == "prune":
        from onthefly_supervisor.archive import prune_checkpoints

        d = resolve_session(a.session)
        removed = prune_checkpoints(d, keep_last=a.keep)
        print(f"removed {len(removed)} checkpoint(s) no run, fork, plan or pin refers to")
        return 0
    raise CliError(f"unknown sessions action {a.action}")


def _never_trained(sdir: str) -> bool:
    """No run of the session trained a step and it holds no checkpoint (an unreadable
    store counts as trained: gc keeps what it cannot judge)."""
    try:
        st = Store(sdir, readonly=True)
    except Exception:  # noqa: BLE001 - unreadable: keep it
        return False
    try:
        steps = st.query("SELECT COALESCE(MAX(step), 0) AS s FROM runs")[0]["s"]
        ckpts = st.query("SELECT COUNT(*) AS n FROM checkpoints")[0]["n"]
        return int(steps) == 0 and int(ckpts) == 0
    except Exception:  # noqa: BLE001
        return False
    finally:
        st.close()


def _serving(sdir: str) -> ControlClient | None:
    """A client of the live supervisor serving the session folder `sdir`, or None when the
    session has none (finished, or its supervisor does not answer)."""
    if not supervisor_alive(sdir):
        return None
    try:
        client = connect(sdir)
    except (NoSupervisor, FileNotFoundError, OSError, ValueError, KeyError):
        return None
    try:
        st = client.ping(timeout=10)
        if os.path.realpath(st.session_dir) == os.path.realpath(sdir):
            return client
    except (NoSupervisor, grpc.RpcError):
        pass
    client.close()
    return None


def _abs_indices(spec: str) -> str:
    """indices:FILE with FILE made absolute from this command's folder (a live supervisor
    would resolve a relative one from its own)."""
    kind, sep, rest = spec.strip().partition(":")
    if kind.strip().lower() != "indices" or not sep or not rest.strip():
        return spec
    return f"indices:{os.path.abspath(os.path.expanduser(rest.strip()))}"


def _select_live(
    client: ControlClient, run: str, spec: str, fmt: str, path: str, force: bool
) -> tuple[Any, dict[str, Any]]:
    """Export a slice through the live supervisor (the selection path of a fork, embedding
    included): its reply and the slice definition stored with the file."""
    from onthefly_supervisor.slices import read_slice_definition

    reply = _rpc(
        client,
        "ExportSlice",
        pb.ExportSliceRequest(run=run, select=spec, format=fmt, path=path, force=force),
        timeout=600,
    )
    try:
        return reply, read_slice_definition(reply.path, fmt)
    except ValueError as e:
        raise CliError(str(e)) from None


def _offline_note(sdir: str, run: str, spec: str) -> None:
    """Say on stderr what a kmeans selection without a live supervisor clustered on."""
    from onthefly_supervisor.selection import parse_spec
    from onthefly_supervisor.slices import offline_embedding_note

    try:
        kmeans = parse_spec(spec).kind == "kmeans"
    except ValueError:
        return
    if kmeans:
        print(f"note: {offline_embedding_note(sdir, run)}", file=sys.stderr)


def cmd_export_slice(a: argparse.Namespace) -> int:
    from onthefly_supervisor.slices import export_slice

    sdir = resolve_session(a.session)
    client = _serving(sdir)
    if client is not None:
        # The live supervisor selects as a fork does (kmeans: the same embedding source).
        try:
            reply, definition = _select_live(
                client, a.run, _abs_indices(a.select), a.format, os.path.abspath(a.output), a.force
            )
        finally:
            client.close()
        path, rows = reply.path, int(reply.rows)
        sel_spec, description = str(definition["spec"]), str(definition["description"])
    else:
        try:
            res = export_slice(
                sdir,
                a.run,
                a.select,
                a.format,
                os.path.abspath(a.output),
                force=a.force,
                base_dir=os.getcwd(),
            )
        except (ValueError, FileExistsError) as e:
            raise CliError(str(e)) from None
        _offline_note(sdir, a.run, a.select)
        path, rows, sel_spec, description = res.path, res.rows, res.spec, res.description
    if a.json:
        print(
            json.dumps({"path": path, "rows": rows, "spec": sel_spec, "description": description})
        )
    else:
        print(f"wrote {rows} rows to {path} ({description})")
    return 0


def cmd_clusters(a: argparse.Namespace) -> int:
    """The clusters of a k-means selection: stored with a fork, or computed now (no fork)."""
    from onthefly_supervisor.selection import parse_spec
    from onthefly_supervisor.slices import select_in_session, slice_definition

    sdir = resolve_session(a.session)
    if a.select:
        try:
            kmeans = parse_spec(a.select).kind == "kmeans"
        except ValueError as e:
            raise CliError(str(e)) from None
        if not kmeans:
            raise CliError(f"--select {a.select}: not a kmeans selection, so it has no clusters")
        client = _serving(sdir)
        if client is not None:
            # Through the live supervisor: the selection path and embedding of a fork.
            import tempfile

            with tempfile.TemporaryDirectory(prefix="onthefly-clusters-") as tmp:
                try:
                    _, doc = _select_live(
                        client, a.run, a.select, "json", os.path.join(tmp, "slice.json"), False
                    )
                finally:
                    client.close()
        else:
            try:
                sdir, run_id, name, data, sel = select_in_session(
                    sdir, a.run, a.select, base_dir=os.getcwd(), recent=True
                )
            except (ValueError, FileNotFoundError) as e:
                raise CliError(str(e)) from None
            _offline_note(sdir, run_id, a.select)
            doc = slice_definition(sdir, run_id, name, data.epoch, sel)
        doc.pop("columns", None)
    else:
        st = Store(sdir, readonly=True)
        try:
            row = st.find_run(a.run)
            known = ", ".join(r.run_id for r in st.runs())
        finally:
            st.close()
        if row is None:
            raise CliError(f"unknown run {a.run!r}; known runs: {known or '(none)'}")
        path = os.path.join(sdir, "forks", row.run_id, "clusters.json")
        if not os.path.isfile(path):
            raise CliError(
                f"{row.run_id} was not forked on a kmeans selection, so no clusters are stored "
                f"with it; `onthefly clusters --run {row.run_id} --select kmeans:auto` clusters "
                "its samples now"
            )
        with open(path, encoding="utf-8") as f:
            clusters = json.load(f)
        spec = row.spec
        sel_spec = str(spec.get("selection", ""))
        m = re.search(r"cluster=(\d+)", sel_spec)
        doc = {
            "run": str((row.parents or [""])[0]),
            "fork": row.run_id,
            "spec": sel_spec,
            "description": spec.get("description", ""),
            "selected_cluster": int(m.group(1)) if m else len(clusters) - 1,
            "clusters": clusters,
        }
    if a.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(f"{doc.get('fork') or doc['run']}: {doc['spec']} · {doc['description']}")
    print(f"{'cluster':>7} {'size':>8} {'mean loss':>11}  label mix")
    for c in doc["clusters"]:
        mark = "*" if c["id"] == doc["selected_cluster"] else " "
        mix = c.get("label_mix") or {}
        total = sum(int(v) for v in mix.values()) or 1
        mix_s = ", ".join(
            f"{k}: {100 * int(v) / total:.0f}%"
            for k, v in sorted(mix.items(), key=lambda kv: -int(kv[1]))[:5]
        )
        more = f" (+{len(mix) - 5} more)" if len(mix) > 5 else ""
        print(f"{mark}{c['id']:>6} {c['size']:>8} {c['mean_loss']:>11.4g}  {mix_s or '-'}{more}")
    print("* = the selected cluster (clusters are ordered by mean loss)")
    return 0


def cmd_export_session(a: argparse.Namespace) -> int:
    from onthefly_supervisor.archive import export_session

    sdir = resolve_session(a.session)
    try:
        res = export_session(sdir, os.path.abspath(a.output), force=a.force)
    except (ValueError, FileExistsError, IsADirectoryError) as e:
        raise CliError(str(e)) from None
    if a.json:
        print(
            json.dumps(
                {"path": res.path, "sha256": res.sha256, "files": res.files, "bytes": res.bytes}
            )
        )
    else:
        print(
            f"wrote {res.path} ({res.files} files, {res.bytes / 2**20:.1f} MiB, sha256 {res.sha256})"
        )
    return 0


def cmd_import_session(a: argparse.Namespace) -> int:
    from onthefly_supervisor.archive import import_session

    if not os.path.isfile(a.file):
        raise CliError(f"no archive at {a.file}")
    try:
        res = import_session(os.path.abspath(a.file), ".")
    except ValueError as e:
        raise CliError(f"import refused: {e}") from None
    if a.json:
        print(
            json.dumps(
                {"session_id": res.session_id, "session_dir": res.session_dir, "files": res.files}
            )
        )
    else:
        from onthefly_supervisor.client import has_unfinished_main

        then = (
            "`onthefly resume` continues it"
            if has_unfinished_main(res.session_dir)
            else "`onthefly runs` shows it, `onthefly serve` serves it to the dashboard"
        )
        print(f"imported session {res.session_id} ({res.files} files); {then}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from onthefly_supervisor.report import write_report

    sdir = resolve_session(a.session)
    st = Store(sdir, readonly=True)
    try:
        baseline = next(
            (r.run_id for r in st.runs() if r.name == "baseline" and r.kind == "fork"), ""
        )
    finally:
        st.close()
    out = os.path.abspath(a.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(
            f"report -o {a.output}: that is a file; give a folder (the report writes "
            "report.json and report.html into it)"
        )
    paths = write_report(sdir, out, baseline_run=baseline)
    print(f"wrote {paths['json']} and {paths['html']}")
    return 0


def _fix_latest(root: str) -> None:
    link = os.path.join(root, "latest")
    if os.path.islink(link) and not os.path.exists(link):
        os.unlink(link)
        rest = sorted(
            n for n in os.listdir(root) if n != "latest" and os.path.isdir(os.path.join(root, n))
        )
        if rest:
            os.symlink(rest[-1], link)


# -- method commands: RPCs (the supervisor says clearly what is not built) --------------------
def cmd_rpc(a: argparse.Namespace) -> int:
    c = a.cmd
    if c in ("approve", "reject", "edit", "automode"):
        try:
            client = connect()
        except NoSupervisor:
            sid = os.path.basename(resolve_session(None))
            raise CliError(
                f"{c} needs a live supervisor and session {sid} has none (it has ended); "
                "`onthefly plans` lists its stored plan cards"
            ) from None
        except FileNotFoundError as err:
            raise CliError(str(err)) from None
    elif c == "export-model":
        try:
            client = _client(a.session)
        except CliError:
            if _ended_session(a.session) is None:
                raise
            with _served(a.session, a.script) as client:
                return _rpc_command(a, client)
        return _rpc_command(a, client)
    else:
        client = _client()
    return _rpc_command(a, client)


def _rpc_command(a: argparse.Namespace, client: ControlClient) -> int:
    c = a.cmd
    if c == "fork":
        if a.budget_steps < 1:
            raise CliError(f"--budget-steps {a.budget_steps}: must be >= 1")
        if not (math.isfinite(a.lr_mul) and a.lr_mul > 0):
            raise CliError(f"--lr-mul {a.lr_mul:g}: must be a finite number > 0")
        if not a.select.strip():
            raise CliError(
                "--select is empty; give a SPEC (all, quantile:LO:HI, kmeans:auto, indices:FILE)"
            )
        if a.variants < 1:
            raise CliError(
                f"--variants {a.variants}: must be >= 1 (1 = one fork, N >= 2 = race N variants)"
            )
        if a.variants == 1 and (a.race_eta is not None or a.race_metric or a.race_mode):
            raise CliError("--race-eta/--race-metric/--race-mode need --variants N with N >= 2")
        if a.race_eta is not None and not 2 <= a.race_eta <= 8:
            raise CliError(f"--race-eta {a.race_eta}: must be an integer in 2..8")
        req: Any = pb.ForkRequest(
            run=a.run,
            select=a.select,
            budget_steps=a.budget_steps,
            lr_mul=a.lr_mul,
            adapters_rank=a.adapters,
            variants=a.variants,
            name=a.name or "",
            race_eta=a.race_eta or 0,
            race_metric=a.race_metric or "",
            race_mode=a.race_mode or "",
            early_stop_patience=a.early_stop_patience,
            early_stop_metric=a.early_stop_metric or "",
            early_stop_min_delta=a.early_stop_min_delta,
            early_stop_every=a.early_stop_every,
        )
        if a.wd_mul is not None:
            req.wd_mul = a.wd_mul  # set (0 = no weight decay); unset = the script's
        method = "Fork"
    elif c == "rollback":
        skips = []
        for text in a.skip:
            e, _, b = text.partition(":")
            try:
                skips.append(pb.BatchRef(epoch=int(e), batch=int(b)))
            except ValueError:
                raise CliError(f"--skip {text!r}: use EPOCH:BATCH, e.g. --skip 1:13") from None
        req, method = (
            pb.RollbackRequest(
                run=a.run,
                checkpoint=a.checkpoint or "",
                skip_steps=a.skip_step,
                skip_batches=skips,
                lr_mul=a.lr_mul,
                grad_clip=a.grad_clip,
                bf16=a.bf16,
                reason=a.reason or "",
            ),
            "Rollback",
        )
    elif c in ("gate", "merge"):
        opts = json.dumps({"allow_failed": True}) if a.allow_failed else ""
        req, method = (
            (pb.GateRequest(runs=a.runs, name=a.name or "", options_json=opts), "TrainGate")
            if c == "gate"
            else (
                pb.MergeRequest(method=a.method, runs=a.runs, name=a.name or "", options_json=opts),
                "Merge",
            )
        )
    elif c == "health":
        req, method = pb.HealthRequest(run=a.run, check=a.check or ""), "RunHealthCheck"
    elif c == "export-slice":
        req, method = (
            pb.ExportSliceRequest(
                run=a.run,
                select=a.select,
                format=a.format,
                path=os.path.abspath(a.output),
                force=a.force,
            ),
            "ExportSlice",
        )
    elif c == "export-model":
        req, method = (
            pb.ExportModelRequest(
                run=a.run, path=os.path.abspath(a.output), force=a.force, factory=a.factory or ""
            ),
            "ExportModel",
        )
    elif c == "export-session":
        req, method = (
            pb.ExportSessionRequest(
                session=a.session or "", path=os.path.abspath(a.output), force=a.force
            ),
            "ExportSession",
        )
    elif c == "import-session":
        req, method = pb.ImportSessionRequest(path=os.path.abspath(a.file)), "ImportSession"
    elif c in ("approve", "reject"):
        req, method = (
            pb.PlanRequest(plan_id=a.plan_id),
            "ApprovePlan" if c == "approve" else "RejectPlan",
        )
    elif c == "edit":
        vals = {}
        for kv in a.values:
            if "=" not in kv:
                raise CliError(f"edit expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            vals[k] = v
        req, method = pb.EditPlanRequest(plan_id=a.plan_id, values=vals), "EditPlan"
    elif c == "compare":
        req, method = pb.CompareRequest(runs=a.runs, slices=a.slices or []), "CompareExperts"
    elif c == "automode":
        req, method = pb.AutomodeRequest(enabled=a.state == "on"), "SetAutomode"
    else:
        raise CliError(f"unknown command {c}")
    reply = _rpc(client, method, req, timeout=600)
    d = _doc(reply)
    race = (d.get("payload") or {}).get("race") if c == "fork" else None
    # With --json, stdout holds only the JSON document; progress lines go to stderr.
    progress = sys.stderr if getattr(a, "json", False) else sys.stdout
    if race and getattr(a, "wait", False):
        d = _wait_race(client, str(race), d, progress=progress)
    elif c in ("fork", "gate", "merge") and getattr(a, "wait", False) and d.get("run_id"):
        d = _wait_run(client, d["run_id"], d, progress=progress)
    if getattr(a, "json", False):
        print(json.dumps(d, indent=2))
    elif c == "compare":
        _print_matrix(d.get("runs", []), d.get("slices", []), d.get("losses", []))
    elif c == "health":
        for v in d.get("verdicts", []):
            print(f"{v.get('check', ''):<12} {v.get('verdict', ''):<5} {v.get('hint', '')}")
    else:
        print(d.get("message") or json.dumps(d, indent=2))
    return 0 if d.get("ok", True) else 1


def _doc(msg: Any) -> dict[str, Any]:
    """A reply as the JSON document `--json` prints: every field (0, "" and [] included),
    64-bit integers as numbers, and each `*_json` text field as the object it encodes
    (under the name without `_json`)."""
    from google.protobuf.json_format import MessageToDict

    def unpack(v: Any) -> Any:
        if isinstance(v, list):
            return [unpack(x) for x in v]
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}
        for k, x in v.items():
            if k.endswith("_json") and isinstance(x, str):
                try:
                    out[k[: -len("_json")]] = json.loads(x) if x else None
                    continue
                except ValueError:
                    pass
            out[k] = unpack(x)
        return out

    return unpack(
        MessageToDict(
            msg,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
    )


def cmd_plans(a: argparse.Namespace) -> int:
    """The plan cards: from the live supervisor, else (a finished or killed session) from
    the session store, read-only."""
    client: ControlClient | None = None
    try:
        live_client = connect(a.session)
        live_client.ping()
        client = live_client
    except NoSupervisor:
        pass  # finished or killed: its store has the cards
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if client is not None:
        reply = _rpc(client, "ListPlans", pb.ListPlansRequest(), timeout=60)
        d = _doc(reply)
        sid, live = client.conn.session_id, True
    else:
        sdir = resolve_session(a.session)
        d = _doc(pb.PlanList(plans=_stored_plans(sdir)))
        sid, live = os.path.basename(sdir), False
    if a.json:
        print(json.dumps({**d, "session_id": sid, "live": live}, indent=2))
        return 0
    plans = d.get("plans", [])
    if not plans:
        print("no plan cards yet" if live else f"session {sid} has no plan cards")
    from onthefly_supervisor.tui import plan_status

    for p in plans:
        diag = p.get("diagnostics") or {}
        print(
            f"{p['plan_id']:<10} {plan_status(p):<9} {p.get('action', ''):<9} {p.get('reason', ''):<22} {p.get('selection', ''):<18} {diag.get('summary', '')}"
        )
    if not live:
        print(
            f"(session {sid} has no live supervisor: these are its stored cards; approve, "
            "reject and edit need a live one)"
        )
    return 0


def _stored_plans(sdir: str) -> list[pb.PlanCard]:
    """The plan cards a session's store kept, as ListPlans returns them."""
    from onthefly_supervisor import planner as pl
    from onthefly_supervisor.autopilot import card_to_proto

    st = Store(sdir, readonly=True)
    try:
        cards = st.plans()
    finally:
        st.close()
    out = []
    for c in cards:
        try:
            out.append(card_to_proto(pl.PlanCard.from_dict(c)))
        except (ValueError, TypeError):  # a card another version wrote: its plain fields
            out.append(
                pb.PlanCard(
                    plan_id=str(c.get("plan_id", "")),
                    action=str(c.get("action", "")),
                    reason=str(c.get("reason", "")),
                    status=str(c.get("status", "")),
                    selection=str(c.get("selection", "")),
                    diagnostics_json=json.dumps(c.get("diagnostics") or {}, default=str),
                    run_id=str(c.get("target_run", "")),
                )
            )
    return out


# -- parser ----------------------------------------------------------------------------------
def _stored_run(run_id: str) -> dict[str, Any] | None:
    """A run as the store of the latest session has it, once its supervisor is gone."""
    try:
        sdir = resolve_session(None)
    except FileNotFoundError:
        return None
    if supervisor_alive(sdir):
        return None
    st = Store(sdir, readonly=True)
    try:
        row = st.run(run_id)
    finally:
        st.close()
    return None if row is None else row.to_dict()


def _wait_run(
    client: ControlClient,
    run_id: str,
    reply: dict[str, Any],
    timeout: float = 1800,
    progress: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Follow a new run until it ends; the reply then carries its outcome."""
    print(reply.get("message", ""), flush=True, file=progress)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            runs = [_run_dict(x) for x in _rpc(client, "ListRuns", pb.ListRunsRequest()).runs]
        except CliError:
            # The supervisor ended meanwhile (its session's work was done, e.g. a fork that
            # failed after the main run completed): the store has the run's outcome.
            stored = _stored_run(run_id)
            if stored is None:
                raise
            runs = [stored]
        d = next((x for x in runs if x["run_id"] == run_id), None)
        if d is not None and d["status"] in ("completed", "failed", "stopped"):
            msg = f"{run_id} {d['status']}: val loss {_f(d['val_loss'])} · test loss {_f(d['test_loss'])}"
            try:
                spec = _run_specs(resolve_session(None)).get(run_id, {})
            except (OSError, ValueError):
                spec = {}
            msg += _early_stop_note(spec)
            if spec.get("early_stopped"):
                d["early_stopped"] = spec["early_stopped"]
            if d["error"]:
                msg += f" · {d['error']}"
            return {
                "ok": d["status"] == "completed",
                "run_id": run_id,
                "message": msg,
                "run": d,
            }
        time.sleep(0.3)
    raise CliError(f"{run_id} did not finish within {timeout:.0f} s")


def _wait_race(
    client: ControlClient,
    race_id: str,
    reply: dict[str, Any],
    timeout: float = 1800,
    progress: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Follow a race's `race` events until it has a winner (or failed)."""
    print(reply.get("message", ""), flush=True, file=progress)
    deadline = time.time() + timeout
    stream = client.watch(kinds=["race"])
    seen = 0
    try:
        for ev in stream:
            p = json.loads(ev.payload_json or "{}")
            if p.get("race_id") != race_id:
                continue
            for h in p.get("history", [])[seen:]:
                scores = h.get("scores", {})
                line = ", ".join(
                    f"{k} {_f(scores.get(k))}{' (goes on)' if k in h.get('promoted', []) else ''}"
                    for k in h.get("ranked", [])
                )
                print(
                    f"rung {h['rung'] + 1} at step {h['step']} ({h['metric']} loss): {line}",
                    flush=True,
                    file=progress,
                )
            seen = len(p.get("history", []))
            if p.get("status") in ("done", "failed"):
                ok = p["status"] == "done"
                for line in _race_losers(client, p):
                    print(line, flush=True, file=progress)
                msg = (
                    f"{race_id}: {p['winner']} won (lr x{p['recipes'][p['winner']]['lr_mul']:.3g}); "
                    f"{len(p['runs']) - 1} other variant(s) stopped"
                    if ok
                    else f"{race_id} failed: {p.get('error', '')}"
                )
                return {"ok": ok, "run_id": p.get("winner", ""), "message": msg, "race": p}
            if time.time() > deadline:
                break
    finally:
        stream.cancel()
    raise CliError(f"{race_id} did not finish within {timeout:.0f} s")


def _race_losers(client: ControlClient, race: dict[str, Any]) -> list[str]:
    """One line per variant that did not win, with its run's own reason ("lost the race at
    rung 1 (step 75): slice loss ..."): ASHA's rung lines show only the promoted so far."""
    try:
        runs = {
            d["run_id"]: d
            for d in (_run_dict(x) for x in _rpc(client, "ListRuns", pb.ListRunsRequest()).runs)
        }
    except CliError:
        return []
    out = []
    for rid in race.get("runs") or []:
        d = runs.get(rid)
        if rid == race.get("winner") or d is None:
            continue
        out.append(f"{rid} {d['status']}" + (f": {d['error']}" if d.get("error") else ""))
    return out


def _gpus(text: str) -> str:
    if text != "auto" and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(
            f"--gpus must be 'auto' or a comma list of GPU indices (e.g. 0,1), got {text!r}"
        )
    return text


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, got {s!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be 0..65535, got {v}")
    return v


def _warm_forks(text: str) -> int:
    from onthefly_supervisor.warmpool import MAX_WARM_FORKS, parse_warm_forks

    try:
        return parse_warm_forks(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a number of standbys 0..{MAX_WARM_FORKS}, got {text!r}"
        ) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onthefly")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onthefly", description="Take control of PyTorch training while it runs."
    )
    p.add_argument("--version", action="version", version=f"onthefly {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a training script under a supervisor")
    r.add_argument("--automode", action="store_true", help="let the planner act on its plan cards")
    r.add_argument("--headless", action="store_true", help="plain log lines, no live view")
    r.add_argument("--keep-alive", action="store_true", help="stay up after the work is done")
    r.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"loopback port (default {DEFAULT_PORT}; 0 = any free port)",
    )
    r.add_argument(
        "--seed",
        default=None,
        metavar="N|none",
        help="session seed applied in every worker (default: ONTHEFLY_SEED, else 0; 'none': "
        "no seeding)",
    )
    r.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart a crashed main worker from its last checkpoint",
    )
    r.add_argument(
        "--gpus", type=_gpus, default="auto", help="'auto' or a comma list of GPU indices for forks"
    )
    r.add_argument(
        "--hang-timeout",
        type=float,
        default=30.0,
        help="seconds without a heartbeat before a worker counts as hung (and is stopped); "
        "a training thread without progress this long is reported with where it is",
    )
    r.add_argument(
        "--warm-forks",
        type=_warm_forks,
        default="auto",
        metavar="N|auto",
        help="standby copies of the script kept ready to become forks (auto: 1; on a CPU-only "
        "machine with < 4 cores it starts after the first fork)",
    )
    r.add_argument("script", nargs="?", default=None, help="your training script")
    r.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser(
        "serve", help="serve a finished session (dashboard, forks, exports) until Ctrl+C"
    )
    s.add_argument("--owner-pid", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--project", default="default", help=argparse.SUPPRESS)
    s.add_argument("--run-name", default="main", help=argparse.SUPPRESS)
    s.add_argument(
        "--port",
        default="auto",
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}; 0 = any free one)",
    )
    s.add_argument(
        "--script",
        default=None,
        help="the session's script, when it is not at its recorded path (an imported session)",
    )
    s.add_argument("args", nargs=argparse.REMAINDER, metavar="SESSION", help="(default: latest)")
    s.set_defaults(fn=cmd_serve)

    st = sub.add_parser("status", help="the live session: workers, runs, GPUs")
    st.add_argument("--json", action="store_true")
    st.add_argument("--session", default=None, help="a session's id (default: latest)")
    st.set_defaults(fn=cmd_status)

    for name, text in (
        ("pause", "pause at the next step boundary (writes a checkpoint)"),
        ("test", "run the test loader now"),
        ("stop", "stop at the next step boundary"),
        ("checkpoint", "write a checkpoint now"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--run", default="main")
        c.add_argument("--session", default=None, help="a live session's id (default: latest)")
        c.set_defaults(fn=cmd_simple)

    sd = sub.add_parser(
        "shutdown",
        help="end the supervisor (e.g. one started with --keep-alive or by `serve`): live "
        "workers stop at a step boundary with a checkpoint; `onthefly resume` continues",
    )
    sd.add_argument("--reason", default="", help="shown in the session's log")
    sd.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to exit")
    sd.set_defaults(fn=cmd_shutdown)

    rs = sub.add_parser("resume", help="resume a paused run, or continue an unfinished session")
    rs.add_argument("session", nargs="?", default=None)
    rs.add_argument("--run", default="main")
    rs.add_argument("--port", type=_port, default=DEFAULT_PORT)
    rs.add_argument("--max-restarts", type=int, default=0)
    rs.add_argument("--keep-alive", action="store_true")
    rs.add_argument("--headless", action="store_true")
    rs.add_argument(
        "--automode",
        action="store_true",
        help="let the planner act on its plan cards (a session that had automode on when it "
        "ended gets it again without this)",
    )
    rs.add_argument(
        "--script",
        default=None,
        help="the training script to continue with, when the session's is elsewhere (an "
        "imported session)",
    )
    rs.set_defaults(fn=cmd_resume)

    ru = sub.add_parser("runs", help="the lineage tree with metrics")
    ru.add_argument("--json", action="store_true")
    ru.add_argument("--session", default=None)
    ru.set_defaults(fn=cmd_runs)

    se = sub.add_parser(
        "sessions",
        help="ls | rm SESSION | gc [--keep N] | check [SESSION] | prune [SESSION] [--keep N]",
    )
    se.add_argument("action", choices=["ls", "rm", "gc", "check", "prune"])
    se.add_argument("session", nargs="?", default=None)
    se.add_argument("--keep", type=int, default=5)
    se.add_argument("--json", action="store_true")
    se.set_defaults(fn=cmd_sessions)

    f = sub.add_parser("fork", help="fork a short-budget specialist on a selection")
    f.add_argument("--run", default="main")
    f.add_argument(
        "--select",
        required=True,
        help="all | quantile:LO:HI | kmeans:auto[:cluster=K] | indices:FILE",
    )
    f.add_argument("--budget-steps", type=int, default=300)
    f.add_argument("--lr-mul", type=float, default=1.0)
    f.add_argument(
        "--wd-mul",
        type=float,
        default=None,
        help="multiply the weight decay (default 1; 0 = none)",
    )
    f.add_argument("--adapters", type=int, default=0, metavar="RANK")
    f.add_argument(
        "--variants",
        type=int,
        default=1,
        metavar="N",
        help="race N variants (lr spread log-uniformly over one decade around --lr-mul) by "
        "successive halving; the winner completes, the others end stopped",
    )
    f.add_argument(
        "--race-eta",
        type=int,
        default=None,
        help="each rung keeps the best 1/ETA, 2..8 (default 2)",
    )
    f.add_argument(
        "--race-metric",
        choices=["slice", "val"],
        default=None,
        help="compare variants on their slice (default) or on the validation loss",
    )
    f.add_argument(
        "--race-mode",
        choices=["asha", "sync"],
        default=None,
        help="asha (default): promote a variant as soon as it ranks in the top 1/ETA of those "
        "that finished its rung so far; sync: wait for every variant of a rung",
    )
    f.add_argument(
        "--early-stop-patience",
        type=int,
        default=0,
        metavar="N",
        help="end the fork (completed) when its metric has not improved for N evaluations in "
        "a row (a raced variant: once sent on to the full budget); 0 = off",
    )
    f.add_argument(
        "--early-stop-metric",
        choices=["slice", "val"],
        default=None,
        help="what early stopping watches: the loss on the fork's selection (default) or val",
    )
    f.add_argument(
        "--early-stop-min-delta",
        type=float,
        default=0.0,
        metavar="D",
        help="an improvement must exceed D (default 0: any decrease)",
    )
    f.add_argument(
        "--early-stop-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="steps between early-stop evaluations (default: budget / 10)",
    )
    f.add_argument("--name", default=None)
    f.add_argument("--json", action="store_true")
    f.add_argument("--wait", action="store_true", help="wait until the fork run ends")
    f.set_defaults(fn=cmd_rpc)

    rb = sub.add_parser(
        "rollback",
        help="restart a run from a good checkpoint, skipping the batches that made it unstable",
    )
    rb.add_argument("--run", default="main")
    rb.add_argument(
        "--checkpoint", default=None, help="default: the latest before the first skipped batch"
    )
    rb.add_argument(
        "--skip-step",
        type=int,
        action="append",
        default=[],
        metavar="STEP",
        help="skip the batch trained at this step (repeatable)",
    )
    rb.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="EPOCH:BATCH",
        help="skip this batch (its position in the epoch's data order; repeatable)",
    )
    rb.add_argument("--lr-mul", type=float, default=0.0, help="multiply the lr (e.g. 0.5)")
    rb.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm")
    rb.add_argument(
        "--bf16", action="store_true", help="fp16 mixed precision -> bf16 where supported"
    )
    rb.add_argument("--reason", default=None)
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(fn=cmd_rpc)

    g = sub.add_parser("gate", help="train a router over experts -> MoE run")
    g.add_argument("runs", nargs="+")
    g.add_argument("--name", default=None)
    g.add_argument("--json", action="store_true")
    g.add_argument("--no-wait", dest="wait", action="store_false", help="return once queued")
    g.add_argument(
        "--allow-failed",
        action="store_true",
        help="use a failed run's partial (latest) checkpoint instead of refusing it",
    )
    g.set_defaults(fn=cmd_rpc, wait=True)

    m = sub.add_parser("merge", help="merge runs (swa | distill | fisher_soup | adapter_fuse)")
    m.add_argument(
        "--method", required=True, choices=["swa", "distill", "fisher_soup", "adapter_fuse"]
    )
    m.add_argument("runs", nargs="+")
    m.add_argument("--name", default=None)
    m.add_argument("--json", action="store_true")
    m.add_argument("--no-wait", dest="wait", action="store_false", help="return once queued")
    m.add_argument(
        "--allow-failed",
        action="store_true",
        help="use a failed run's partial (latest) checkpoint instead of refusing it",
    )
    m.set_defaults(fn=cmd_rpc, wait=True)

    cp = sub.add_parser(
        "compare", help="loss of each run on each slice (own data, other forks', val, test)"
    )
    cp.add_argument("runs", nargs="*")
    cp.add_argument(
        "--slices",
        nargs="*",
        default=None,
        help="val, test, or fork run ids (default: val + every fork)",
    )
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=cmd_rpc)

    h = sub.add_parser("health", help="health checks with verdicts")
    h.add_argument("--run", default="main")
    h.add_argument(
        "--check",
        choices=["determinism", "numerics", "gradients", "activations", "data", "throughput"],
    )
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_rpc)

    es = sub.add_parser("export-slice", help="write a slice of samples to CSV/Parquet/JSON")
    es.add_argument("--run", default="main")
    es.add_argument("--select", required=True)
    es.add_argument("--format", required=True, choices=["csv", "parquet", "json"])
    es.add_argument("-o", "--output", required=True)
    es.add_argument("--force", action="store_true")
    es.add_argument("--json", action="store_true")
    es.add_argument("--session", default=None)
    es.set_defaults(fn=cmd_export_slice)

    cl = sub.add_parser(
        "clusters",
        help="browse k-means clusters: a fork's (stored), or a run's now with --select kmeans:...",
    )
    cl.add_argument("--run", default="main", help="a fork made on kmeans, or any run with --select")
    cl.add_argument("--select", default=None, help="kmeans:auto | kmeans:K (computed now, no fork)")
    cl.add_argument("--json", action="store_true")
    cl.add_argument("--session", default=None)
    cl.set_defaults(fn=cmd_clusters)

    em = sub.add_parser("export-model", help="write a run's model (or the MoE) as one file")
    em.add_argument("--run", default="main")
    em.add_argument("-o", "--output", required=True)
    em.add_argument("--force", action="store_true")
    em.add_argument(
        "--factory", default=None, help="package.module:callable that rebuilds a custom model class"
    )
    em.add_argument("--json", action="store_true")
    em.add_argument("--session", default=None, help="a session's id (default: latest)")
    em.add_argument(
        "--script",
        default=None,
        help="the session's script, when it is not at its recorded path (an ended, imported "
        "session: its model is rebuilt by running the script)",
    )
    em.set_defaults(fn=cmd_rpc)

    ex = sub.add_parser("export-session", help="one checksummed archive of the session")
    ex.add_argument("session", nargs="?", default=None)
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--force", action="store_true")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(fn=cmd_export_session)

    im = sub.add_parser("import-session", help="restore an exported session")
    im.add_argument("file")
    im.add_argument("--json", action="store_true")
    im.set_defaults(fn=cmd_import_session)

    rp = sub.add_parser("report", help="report.json + report.html with plots")
    rp.add_argument("session", nargs="?", default=None)
    rp.add_argument("-o", "--output", required=True)
    rp.set_defaults(fn=cmd_report)

    pl = sub.add_parser(
        "plans",
        help="the planner's plan cards (from the store, read-only, when no supervisor is live)",
    )
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--session", default=None)
    pl.set_defaults(fn=cmd_plans)
    for name in ("approve", "reject"):
        c = sub.add_parser(name, help=f"{name} a plan card")
        c.add_argument("plan_id")
        c.add_argument("--json", action="store_true")
        c.set_defaults(fn=cmd_rpc)
    ed = sub.add_parser("edit", help="edit a plan card: KEY=VALUE...")
    ed.add_argument("plan_id")
    ed.add_argument(
        "values", nargs="+", metavar="KEY=VALUE", help="keys: " + ", ".join(PLAN_EDIT_KEYS)
    )
    ed.add_argument("--json", action="store_true")
    ed.set_defaults(fn=cmd_rpc)
    am = sub.add_parser("automode", help="turn the planner's automode on or off")
    am.add_argument("state", choices=["on", "off"])
    am.add_argument("--json", action="store_true")
    am.set_defaults(fn=cmd_rpc)
    return p


# What `onthefly edit` may change on a proposed card (autopilot.EDITABLE; a unit test keeps
# the two the same without importing the planner for every command line).
PLAN_EDIT_KEYS = (
    "adapters_rank",
    "budget_steps",
    "early_stop_patience",
    "grad_clip",
    "lr_mul",
    "method",
    "selection",
    "wd_mul",
)


def _positionals_first(args: list[str], takes_value: set[str]) -> list[str]:
    """`args` with its positionals ahead of its options. argparse gives an optional second
    positional (`sessions check [SESSION]`) nothing once an option comes between the two
    (`sessions check --json ID` would be refused)."""
    pos: list[str] = []
    opts: list[str] = []
    it = iter(args)
    for x in it:
        if x == "--":
            pos.extend(it)
            break
        if x.startswith("-") and len(x) > 1:
            opts.append(x)
            value = next(it, None) if x in takes_value else None
            if value is not None:
                opts.append(value)
        else:
            pos.append(x)
    return pos + opts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plans"] and args[1:2] and args[1] in ("approve", "reject", "edit", "automode"):
        args = args[1:]  # `onthefly plans approve ID` reads as well as `onthefly approve ID`
    if args[:1] == ["sessions"]:
        args = ["sessions", *_positionals_first(args[1:], takes_value={"--keep"})]
    a = parser.parse_args(args)
    try:
        return int(a.fn(a))
    except (CliError, SupervisorError, FileNotFoundError, NoSupervisor) as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `onthefly status | head`
        return 0
    except OSError as e:  # an output path the system refuses (permissions, a file as folder)
        return _die(f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e))


if __name__ == "__main__":
    sys.exit(main())
