"""Pause latency: command -> paused (checkpoint written), in ms and in training steps.

Drives a real `onthefly run` of the MLP workload over gRPC: Pause (waits for the worker's
acknowledgement, which comes after the pause checkpoint is on disk), then Resume, 10
times. Prints the median and max.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from onthefly_proto import onthefly_pb2 as pb
from onthefly_proto import onthefly_pb2_grpc as pbg

WORK = Path(__file__).resolve().parent / "_workload.py"


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                sys.executable,
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
                "200000",
            ],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            cj = Path(d) / ".onthefly" / "sessions" / "latest" / "connection.json"
            while not cj.exists():
                time.sleep(0.05)
            time.sleep(0.1)
            conn = json.loads(cj.read_text())
            md = (("x-onthefly-token", conn["token"]),)
            stub = pbg.ControlServiceStub(grpc.insecure_channel(conn["addr"]))
            while True:
                st = stub.GetStatus(pb.StatusRequest(), metadata=md)
                if st.runs and st.runs[0].step > 200:
                    break
                time.sleep(0.1)
            ms, steps = [], []
            for _ in range(10):
                before = stub.GetStatus(pb.StatusRequest(), metadata=md).runs[0].step
                t = time.perf_counter()
                reply = stub.Pause(pb.RunRequest(run="main", wait=True), metadata=md, timeout=60)
                ms.append(1000 * (time.perf_counter() - t))
                steps.append(json.loads(reply.payload_json)["step"] - before)
                stub.Resume(pb.RunRequest(run="main"), metadata=md, timeout=60)
                time.sleep(0.3)
            print(
                f"pause latency: median {statistics.median(ms):.1f} ms (max {max(ms):.1f} ms), "
                f"median {statistics.median(steps):.0f} steps after the request (max {max(steps)}); "
                "includes writing the pause checkpoint; steps counted from the last flushed step, which lags by up to one 50 ms flush"
            )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
