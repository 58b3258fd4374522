"""The bench workload: the same model, data and steps, as a raw PyTorch loop or under OnTheFly.

python bench/_workload.py raw --model mlp --steps 1500      # prints JSON timing
python bench/_workload.py rawserve --model mlp              # reads N, trains N raw steps, prints ms/step
onthefly run bench/_workload.py onthefly --model mlp ...    # timing read from the store
(--inline-raw FILE: the raw loop is also timed in that process, before and after fit;
 --raw-socket PATH: a thread of that process trains raw steps on request, for
 bench/overhead_ab.py, while the supervised run is paused)
"""

import argparse
import copy
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["raw", "rawserve", "onthefly"])
p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--warmup", type=int, default=50)
p.add_argument(
    "--inline-raw",
    metavar="FILE",
    help="onthefly mode: also time the raw loop before and after fit(), to FILE",
)
p.add_argument(
    "--raw-socket",
    metavar="PATH",
    help="onthefly mode: serve raw phases from a thread of this process on a Unix socket",
)
args = p.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
if args.model == "mlp":
    x = torch.randn(8192, 128)
    y = torch.randint(0, 10, (8192,))
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    bs = 128
else:
    x = torch.randn(2048, 3, 32, 32)
    y = torch.randint(0, 10, (2048,))
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    bs = 64
loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()
epochs = -(-args.steps // len(loader))


def raw_step(
    net: nn.Module, optim: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor
) -> None:
    """One plain PyTorch training step."""
    optim.zero_grad(set_to_none=True)
    loss = loss_fn(net(xb), yb)
    loss.backward()
    optim.step()


def raw_loop(net: nn.Module, optim: torch.optim.Optimizer) -> float:
    """The plain PyTorch loop over the same data for --steps steps; ms per step after --warmup."""
    step = 0
    t_start = 0.0
    for _ in range(epochs):
        for xb, yb in loader:
            raw_step(net, optim, xb, yb)
            step += 1
            if step == args.warmup:
                t_start = time.perf_counter()
            if step == args.steps:
                return 1000 * (time.perf_counter() - t_start) / (args.steps - args.warmup)
    raise SystemExit(f"the data gives fewer than {args.steps} steps")


def raw_copy() -> float:
    """`raw_loop` on a copy of the model and a fresh optimizer (the supervised run's own
    model and optimizer are left as they are)."""
    net = copy.deepcopy(model)
    return raw_loop(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))


def raw_serve() -> None:
    """For bench/overhead_ab.py: each line on stdin is a number of steps N; train N more raw
    steps (the same loop, continuing over epochs) and print their mean ms per step."""

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    it = batches()
    for line in sys.stdin:
        n = int(line)
        t = time.perf_counter()
        for _ in range(n):
            raw_step(model, opt, *next(it))
        print(json.dumps({"step_ms": 1000 * (time.perf_counter() - t) / n}), flush=True)


def raw_socket(path: str) -> None:
    """For bench/overhead_ab.py: raw phases from a thread of the supervised worker itself,
    on a copy of the model (its initial weights) and a loader of its own, run while the
    supervised run is paused (its training thread waits). The same process runs both, so
    a per-process speed offset (a few percent, either way, between two processes of the
    same code) cancels. The protocol is rawserve's: a line N in, a JSON line out."""
    net = copy.deepcopy(model)
    optim = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    own = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from own

    it = batches()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    with conn, conn.makefile("rw") as f:
        for line in f:
            n = int(line)
            t = time.perf_counter()
            for _ in range(n):
                raw_step(net, optim, *next(it))
            f.write(json.dumps({"step_ms": 1000 * (time.perf_counter() - t) / n}) + "\n")
            f.flush()


if args.mode == "raw":
    print(json.dumps({"step_ms": raw_loop(model, opt)}))
elif args.mode == "rawserve":
    raw_serve()
else:
    from onthefly import Trainer

    # With --inline-raw the same process also runs the raw loop right before and right
    # after fit() (the supervisor is up and idle then): three measurements seconds apart,
    # where separate processes are tens of seconds apart on a VM whose speed drifts.
    before = raw_copy() if args.inline_raw else None
    if args.raw_socket:
        threading.Thread(target=raw_socket, args=(args.raw_socket,), daemon=True).start()
    Trainer(project="bench", max_epochs=epochs, max_steps=args.steps).fit(
        model, opt, loss_fn, loader
    )
    if args.inline_raw:
        time.sleep(1.0)  # the supervisor finishes storing the run meanwhile
        with open(args.inline_raw, "w") as f:
            json.dump({"before_ms": before, "after_ms": raw_copy()}, f)
