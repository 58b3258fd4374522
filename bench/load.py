"""Training step time with 8 concurrent event watchers + CLI calls ÷ without, in one run.

The same `onthefly run` workload twice, interleaved: once alone, once while 8 clients
follow WatchEvents from sequence 0 and a ninth polls GetStatus every 100 ms. Also prints
the supervisor's peak RSS under load. Prints `load ratio: X.XXX` (goal ~1.0).
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg

WORK = Path(__file__).resolve().parent / "_workload.py"
PY = sys.executable
STEPS = 1500


def run(watchers: int) -> tuple[float, float]:
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
                str(WORK),
                "onthefly",
                "--model",
                "mlp",
                "--steps",
                str(STEPS),
            ],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cj = Path(d) / ".onthefly" / "sessions" / "latest" / "connection.json"
        while not cj.exists():
            time.sleep(0.02)
        time.sleep(0.05)
        conn = json.loads(cj.read_text())
        md = (("x-onthefly-token", conn["token"]),)
        stop = threading.Event()
        peak = [0.0]

        def watch() -> None:
            ch = grpc.insecure_channel(conn["addr"])
            try:
                for _ in pbg.ControlServiceStub(ch).WatchEvents(
                    pb.WatchRequest(from_seq=0), metadata=md
                ):
                    if stop.is_set():
                        break
            except grpc.RpcError:
                pass
            ch.close()

        def poll() -> None:
            ch = grpc.insecure_channel(conn["addr"])
            stub = pbg.ControlServiceStub(ch)
            while not stop.is_set():
                try:
                    stub.GetStatus(pb.StatusRequest(), metadata=md, timeout=5)
                except grpc.RpcError:
                    break
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
                    peak[0] = max(peak[0], rss / 1024)
                except (OSError, StopIteration):
                    pass
                time.sleep(0.1)
            ch.close()

        threads = [threading.Thread(target=watch, daemon=True) for _ in range(watchers)]
        threads.append(threading.Thread(target=poll, daemon=True))
        for t in threads:
            t.start()
        proc.wait()
        stop.set()
        db = sqlite3.connect(os.path.join(d, ".onthefly", "sessions", "latest", "session.db"))
        (s0, t0), (s1, t1) = db.execute(
            "SELECT step, t FROM metrics WHERE run_id='main' AND step IN (100, ?) ORDER BY step",
            (STEPS,),
        ).fetchall()
        db.close()
        return 1000 * (t1 - t0) / (s1 - s0), peak[0]


def main() -> None:
    ratios = []
    for _ in range(int(os.environ.get("BENCH_REPS", "3"))):
        alone, _ = run(0)
        loaded, rss = run(8)
        ratios.append(loaded / alone)
        print(
            f"alone {alone:.3f} ms/step · 8 watchers + status polling {loaded:.3f} ms/step · supervisor peak RSS {rss:.0f} MiB"
        )
    print(f"load ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
