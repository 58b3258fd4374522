"""The worker's own training loop against a raw PyTorch loop, in one process, interleaved.

No supervisor and no gRPC: `_Loop._train` runs with a connection that drops messages, so
this isolates the per-step cost of OnTheFly's loop (per-sample loss, grad-norm cadence,
recorder) from the supervisor and the transport. Prints the median ratio per variant:

    python bench/loop_overhead.py [PAIRS]     # "no-ckpt": epoch-end checkpoints disabled
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.config import TrainerConfig
from onthefly_worker.env import WorkerEnv
from onthefly_worker.trainer import _Loop

EPOCHS = 6


class _NullConnection:
    commands: list[Any] = []
    command_event = threading.Event()

    def send(self, **_: Any) -> None:
        pass

    send_bulk = send


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(8192, 128), torch.randint(0, 10, (8192,))
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, drop_last=True)
    steps = EPOCHS * len(loader)
    env = WorkerEnv("-", "-", "w", "train", "main", tempfile.mkdtemp(), "", "", "", 0)

    def raw() -> float:
        t = time.perf_counter()
        for _ in range(EPOCHS):
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
        return (time.perf_counter() - t) / steps

    def ours(checkpoints: bool) -> float:
        cfg = TrainerConfig.from_kwargs({"max_epochs": EPOCHS})
        lp = _Loop(cfg, env, model, opt, loss_fn, loader, None, None, None)
        if not checkpoints:
            lp._checkpoint = lambda *a, **k: ""  # type: ignore[method-assign]
        conn = _NullConnection()
        lp.conn = conn  # type: ignore[assignment]
        lp.rec = lp.make_recorder(conn.send)
        t = time.perf_counter()
        lp._train()
        lp.writer.wait()
        return (time.perf_counter() - t) / steps

    raw()
    ours(True)
    ratios: dict[str, list[float]] = {"full": [], "no-ckpt": []}
    base = []
    for _ in range(pairs):
        r = raw()
        base.append(r)
        ratios["full"].append(ours(True) / r)
        ratios["no-ckpt"].append(ours(False) / r)
    print(f"raw step {statistics.median(base) * 1e3:.3f} ms ({steps} steps, {pairs} pairs)")
    for name, v in ratios.items():
        print(f"loop/raw ({name}): {statistics.median(v):.3f}")


if __name__ == "__main__":
    main()
