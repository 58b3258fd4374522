"""The recorder's share of a training step, interleaved in one process: a steadier A/B than
`overhead.py` for changes to the recording path.

The same MLP step as bench/_workload.py's (128-256-256-10, batch 128, SGD with momentum, one
thread) runs in blocks of BLOCK steps, alternately without and with recording, NB pairs of
blocks; each block's thread CPU time per step is divided by the block's before it, so the
VM's drift (seconds to minutes) cancels. Prints the median ratio and its quartiles.

    python bench/recorder_ab.py            # the real Recorder: packing thread, messages built
                                            # and serialized (no gRPC, no supervisor)
    python bench/recorder_ab.py hold       # only keep each step's (output, target) for a
                                            # flush's worth of steps, as the recorder does
    python bench/recorder_ab.py classify   # only Recorder.classification, the per-step check
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from onthefly_worker.recorder import Recorder

BLOCK = int(os.environ.get("BLOCK", "100"))
NB = int(os.environ.get("NB", "60"))
B = 128
FLUSH_STEPS = 42  # steps in a 64 KB flush at batch 128 (12 bytes a sample)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "record"
    if mode not in ("record", "hold", "classify"):
        raise SystemExit(f"unknown mode {mode!r}: record, hold or classify")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x_all = torch.randn(8192, 128)
    y_all = torch.randint(0, 10, (8192,))
    ids_of = [np.arange(i, i + B) for i in range(8192 - B)]

    def send(**kw: Any) -> None:
        kw["samples"].SerializeToString()

    rec = Recorder(send, "main", torch.device("cpu"))
    rec.per_sample = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")
    rec.plain_ce = -100
    held: list[Any] = []
    cpu: dict[bool, list[float]] = {False: [], True: []}
    step = 0
    for blk in range(2 * NB):
        on = blk % 2 == 1
        c0 = time.thread_time()
        for _ in range(BLOCK):
            i = (step * B) % (8192 - B)
            step += 1
            x, y = x_all[i : i + B], y_all[i : i + B]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            value = float(loss.item())
            loss.backward()
            opt.step()
            if not on:
                continue
            pair = Recorder.classification(out, y)
            assert pair is not None
            if mode == "record":
                rec.record(
                    step, 0, step, ids_of[i], pair, value, 0.01, math.nan, 1.3, 0.1, cls=pair
                )
            elif mode == "hold":
                held.append((ids_of[i], pair, value))
                if len(held) > FLUSH_STEPS:
                    held.clear()
        cpu[on].append((time.thread_time() - c0) / BLOCK * 1e6)
    rec.flush()
    ratios = [b / a for a, b in zip(cpu[False], cpu[True], strict=True)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"{mode}: {statistics.median(cpu[False]):.1f} us/step without, "
        f"{statistics.median(cpu[True]):.1f} with · ratio {q2:.4f} (quartiles {q1:.4f}-{q3:.4f}; "
        f"{NB} pairs of {BLOCK}-step blocks)"
    )


if __name__ == "__main__":
    main()
