"""Fork latency: command -> first fork step, cold and from the warm pool, in one run.

Two real sessions of the bench workload (bench/_workload.py, MLP on one thread) train a
main run while forks are requested over the control API, one after the other:
`--warm-forks 0` (every fork is a new process: the script's whole start-up) and
`--warm-forks 1` (a standby that already ran the start-up becomes the fork). For each fork:

  command -> first step = end of the fork's first training step (the time the fork stamps
                          on its step metric; same machine clock) - the moment before the
                          Fork RPC was sent
  split into: RPC (parent checkpoint + selection + spawn or hand-over), reply -> the fork's
              hello reaching the supervisor, hello -> end of the first step (checkpoint
              load + first step)

Alongside: `python -c "import torch"` and the script's own start-up (spawn -> the worker's
hello at fit(), measured on the standby processes, under the same load as the cold forks).
Goals (issue 4): warm <= 0.2 s on CPU; cold <= the script's own start-up + 0.5 s.
Also prints what an idle standby costs in CPU.

    python bench/fork_latency.py [--forks 5] [--budget 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onthefly_proto import onthefly_pb2 as pb  # noqa: E402
from onthefly_supervisor.client import ControlClient, connect  # noqa: E402

WORK = ROOT / "bench" / "_workload.py"
PY = sys.executable
WARM_GOAL_S = 0.2
COLD_MARGIN_S = 0.5


def import_torch_s(reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_startup_s() -> float:
    """The script on its own, no OnTheFly: python start, imports, data, model, one step.

    Timed to the line the workload prints after its step, not to the process exit
    (interpreter teardown with torch loaded takes a few hundred ms more)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [PY, str(WORK), "raw", "--model", "mlp", "--steps", "1", "--warmup", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t = time.perf_counter() - t0
    proc.stdout.close()
    if proc.wait() != 0 or not line:
        raise RuntimeError(f"{WORK.name} raw failed (exit code {proc.returncode})")
    return t


def _wait(pred: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(client: ControlClient) -> pb.SessionStatus:
    return client.call("GetStatus", pb.StatusRequest(), timeout=10)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def session(warm: int, forks: int, budget: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "onthefly_supervisor",
                "run",
                "--headless",
                "--port",
                "0",
                "--warm-forks",
                str(warm),
                str(WORK),
                "onthefly",
                "--model",
                "mlp",
                "--steps",
                "100000000",
            ],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sdir = Path(d) / ".onthefly" / "sessions" / "latest"
        try:
            _wait(lambda: (sdir / "connection.json").exists(), 60, "the supervisor")
            client = connect(project_dir=d)

            def main_step() -> int:
                runs = {r.run_id: r for r in _status(client).runs}
                return int(runs["main"].step) if "main" in runs else 0

            _wait(lambda: main_step() >= 100, 120, "the main run's first 100 steps")

            def ready_standby() -> pb.WorkerInfo | None:
                for w in _status(client).workers:
                    if w.role == pb.ROLE_STANDBY and w.state == pb.WORKER_STATE_ATTACHED:
                        return w
                return None

            rows = []
            plain: list[float] = []
            idle_cpu = None
            for _ in range(forks):
                standby_pid = 0
                if warm:
                    sb = _wait(ready_standby, 180, "a ready standby")
                    standby_pid = sb.pid
                    if idle_cpu is None:  # what an idle standby costs, before its first use
                        hz = os.sysconf("SC_CLK_TCK")
                        c0, t0 = _cpu_ticks(sb.pid), time.monotonic()
                        time.sleep(5.0)
                        idle_cpu = (_cpu_ticks(sb.pid) - c0) / hz / (time.monotonic() - t0)
                t_cmd = time.time()
                reply = client.call(
                    "Fork",
                    pb.ForkRequest(run="main", select="quantile:0.5:1.0", budget_steps=budget),
                    timeout=120,
                )
                t_reply = time.time()
                run_id = reply.run_id

                def done(run_id: str = run_id) -> bool:
                    st = _status(client)
                    run = next(r for r in st.runs if r.run_id == run_id)
                    workers = [w for w in st.workers if w.run_id == run_id]
                    return run.status in (
                        pb.RUN_STATUS_COMPLETED,
                        pb.RUN_STATUS_FAILED,
                    ) and all(w.state >= pb.WORKER_STATE_SUCCEEDED for w in workers)

                _wait(done, 180, f"{run_id} to finish")
                db = sqlite3.connect(sdir / "session.db")
                try:
                    first = db.execute(
                        "SELECT MIN(t) FROM metrics WHERE run_id = ? AND step = "
                        "(SELECT MIN(step) FROM metrics WHERE run_id = ?)",
                        (run_id, run_id),
                    ).fetchone()[0]
                    attached = db.execute(
                        "SELECT MIN(t) FROM events WHERE kind = 'attached' AND run_id = ?",
                        (run_id,),
                    ).fetchone()[0]
                    status = db.execute(
                        "SELECT status FROM runs WHERE run_id = ?", (run_id,)
                    ).fetchone()[0]
                    pid = db.execute(
                        "SELECT pid FROM workers WHERE run_id = ? ORDER BY started DESC",
                        (run_id,),
                    ).fetchone()[0]
                finally:
                    db.close()
                if status != "completed" or first is None:
                    raise RuntimeError(f"{run_id} did not complete ({status})")
                if warm and pid != standby_pid:
                    raise RuntimeError(f"{run_id} did not run in standby pid {standby_pid}")
                if not warm:  # the script's own start-up, under the same load as the forks
                    plain.append(plain_startup_s())
                rows.append(
                    {
                        "total": first - t_cmd,
                        "rpc": t_reply - t_cmd,
                        "to_attach": attached - t_reply,
                        "to_step": first - attached,
                    }
                )
            db = sqlite3.connect(sdir / "session.db")
            try:
                starts = {
                    r[0]: r[1]
                    for r in db.execute(
                        "SELECT worker_id, started FROM workers WHERE role IN ('standby', 'train')"
                    )
                }
                hellos = [
                    (json.loads(r[1]).get("worker_id"), r[0])
                    for r in db.execute("SELECT t, payload FROM events WHERE kind = 'attached'")
                ]
            finally:
                db.close()
            startup = {wid: t - starts[wid] for wid, t in hellos if wid in starts}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "forks": rows,
        "standby_startup": [v for k, v in startup.items() if k.startswith("standby-")],
        "plain_startup": plain,
        "idle_cpu": idle_cpu,
    }


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--forks", type=int, default=5, help="forks per mode (median reported)")
    ap.add_argument("--budget", type=int, default=5, help="steps per fork")
    args = ap.parse_args()
    if args.forks < 1 or args.budget < 1:
        ap.error("--forks and --budget must be >= 1")

    imp = import_torch_s()
    print(f'python -c "import torch":        {imp:6.3f} s (median of 3)')
    cold = session(0, args.forks, args.budget)
    warm = session(1, args.forks, args.budget)
    startup = statistics.median(cold["plain_startup"])
    print(
        f"script's own start-up:            {startup:6.3f} s (python {WORK.name} without OnTheFly: "
        f"imports, data, model, one step; median of {len(cold['plain_startup'])}, run beside "
        "the cold session's main run like the forks)"
    )
    if warm["standby_startup"]:
        print(
            f"standby start-up (spawn -> hello): {statistics.median(warm['standby_startup']):6.3f} s "
            f"(median of {len(warm['standby_startup'])}; paid ahead of the fork)"
        )
    for name, res in (("cold", cold), ("warm", warm)):
        rows = res["forks"]
        each = ", ".join(f"{r['total']:.3f}" for r in rows)
        print(
            f"{name} fork: command -> first step  {_med(rows, 'total'):6.3f} s median of {len(rows)} "
            f"[{each}]  = RPC {_med(rows, 'rpc'):.3f} "
            f"+ to hello {_med(rows, 'to_attach'):.3f} + hello -> first step {_med(rows, 'to_step'):.3f}"
        )
    w = _med(warm["forks"], "total")
    c = _med(cold["forks"], "total")
    print(
        f"warm fork latency: {w:.3f} s; goal <= {WARM_GOAL_S} s on CPU: ratio {w / WARM_GOAL_S:.2f} "
        f"({'met' if w <= WARM_GOAL_S else 'NOT met'})"
    )
    print(
        f"cold fork latency: {c:.3f} s = own start-up {startup:.3f} s + {c - startup:.3f} s; goal <= "
        f"start-up + {COLD_MARGIN_S} s: margin {c - startup:.3f} s "
        f"({'met' if c - startup <= COLD_MARGIN_S else 'NOT met'})"
    )
    paired = statistics.median(
        r["total"] - p for r, p in zip(cold["forks"], cold["plain_startup"], strict=True)
    )
    print(
        f"cold fork - own start-up, paired per fork (each start-up run right after its fork): "
        f"median {paired:.3f} s (less sensitive to a loaded machine than the difference of medians)"
    )
    print(f"warm/cold: {w / c:.3f} (the pool saves {c - w:.3f} s per fork)")
    if warm["idle_cpu"] is not None:
        print(f"idle standby: {100 * warm['idle_cpu']:.2f}% of one core (over 5 s)")


if __name__ == "__main__":
    main()
