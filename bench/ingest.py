"""Per-sample losses ingested by the supervisor per second, end to end.

A sender process attaches to a real supervisor over gRPC on loopback, as a worker does, and
sends packed SampleLosses messages (64 Ki samples each, as a worker's flush would) the way
the recorder does: through its sample feed (the default), and, for comparison, on its gRPC
stream (ONTHEFLY_SAMPLE_FEED=0). We time from the first to the last sample landing in the
dense per-epoch array. Also printed: the in-process ingest path alone (unpack + scatter),
the ceiling the transport adds to. Prints `ingest: X.X M samples/s` for the sample feed
(target >= 10 M/s on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import serde
from onthefly_supervisor.pool import WorkerExit
from onthefly_supervisor.store import SampleArrays
from onthefly_supervisor.supervisor import Supervisor, SupervisorConfig

N_DATA = 1_000_000
PER_MSG = 65_536
MESSAGES = 300

SENDER = r"""
import os, sys, numpy as np
from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker.connection import WorkerConnection
c = WorkerConnection(os.environ["ONTHEFLY_ADDR"], os.environ["ONTHEFLY_TOKEN"], os.environ["ONTHEFLY_WORKER_ID"])
c.send(hello=pb.Hello(role=pb.ROLE_TRAIN, pid=os.getpid(), run_id="main", dataset_size=%(n)d))
c.wait_welcome(30)
rng = np.random.default_rng(0)
msgs = []
for i in range(8):
    ids = rng.integers(0, %(n)d, %(per)d).astype("<i8").tobytes()
    losses = rng.random(%(per)d, dtype=np.float32).astype("<f4").tobytes()
    msgs.append(pb.SampleLosses(run_id="main", epoch=0, count=%(per)d, ids=ids, losses=losses))
for i in range(%(m)d):
    c.send_bulk(samples=msgs[i %% 8])
c.close(60)
"""


class SenderLauncher:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, spec: Any, attempt: int) -> int:
        env = dict(os.environ, **spec.env)
        code = SENDER % {"n": N_DATA, "per": PER_MSG, "m": MESSAGES}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        return self.proc.pid

    def poll(self, worker_id: str) -> WorkerExit | None:
        assert self.proc is not None
        rc = self.proc.poll()
        return None if rc is None else WorkerExit(rc, "", None)

    def stop(self, worker_id: str, grace_s: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def signal(self, worker_id: str, sig: int) -> None:
        pass

    def close(self) -> None:
        self.stop("", 0)


def in_process() -> float:
    with tempfile.TemporaryDirectory() as d:
        arrays = SampleArrays(d)
        rng = np.random.default_rng(0)
        msg = pb.SampleLosses(
            run_id="main",
            epoch=0,
            count=PER_MSG,
            ids=rng.integers(0, N_DATA, PER_MSG).astype("<i8").tobytes(),
            losses=rng.random(PER_MSG, dtype=np.float32).tobytes(),
        )
        raw = msg.SerializeToString()
        t = time.perf_counter()
        for _ in range(200):
            m = pb.SampleLosses.FromString(raw)
            ids, losses = serde.unpack_samples(m)
            arrays.ingest("main", 0, N_DATA, ids, losses)
        return 200 * PER_MSG / (time.perf_counter() - t)


def end_to_end(feed: bool) -> float:
    os.environ["ONTHEFLY_SAMPLE_FEED"] = "1" if feed else "0"
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "x.py")
        open(script, "w").close()
        launcher = SenderLauncher()
        sup = Supervisor(SupervisorConfig(script=script, project_dir=d, port=0), launcher=launcher)
        sup.start()
        total = MESSAGES * PER_MSG
        t0 = None
        deadline = time.time() + 120
        while sup.arrays.ingested < total and time.time() < deadline:
            if t0 is None and sup.arrays.ingested > 0:
                t0 = time.perf_counter()
            time.sleep(0.001)
        t1 = time.perf_counter()
        got = sup.arrays.ingested
        sup.shutdown()
        assert got == total, f"only {got} of {total} samples arrived"
        assert t0 is not None
        # The first message's samples arrived at t0: count the rest over the measured span.
        return (total - PER_MSG) / (t1 - t0)


def main() -> None:
    ip = in_process()
    print(f"in-process unpack+scatter: {ip / 1e6:.1f} M samples/s")
    stream = end_to_end(feed=False)
    print(f"gRPC stream: {stream / 1e6:.1f} M samples/s ({PER_MSG} samples per message)")
    feed = end_to_end(feed=True)
    print(
        f"ingest: {feed / 1e6:.1f} M samples/s (end to end through the sample feed, "
        f"{PER_MSG} samples per message)"
    )


if __name__ == "__main__":
    main()
