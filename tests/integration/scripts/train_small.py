"""A tiny, configurable training script for integration tests (torchelastic's bin/echo1.py idea).

Flags make it slow, crash, hang, emit NaN, never call fit, or use loader workers, dropout,
BatchNorm, a scheduler and momentum, so each test drives a real worker the way a user's
script would.
"""

import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from onthefly import Trainer

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--n", type=int, default=512)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--optim", default="sgd", choices=["sgd", "adam"])
p.add_argument("--step-sleep", type=float, default=0.0)
p.add_argument(
    "--fork-step-sleep",
    type=float,
    default=None,
    help="the step sleep of a fork of this script (default: --step-sleep); lets a test pace "
    "the main run without slowing the forks automode starts",
)
p.add_argument("--crash-at-step", type=int, default=0)
p.add_argument("--crash-once-file", default="")
p.add_argument("--nan-at-step", type=int, default=0)
p.add_argument("--num-workers", type=int, default=0)
p.add_argument("--no-fit", action="store_true")
p.add_argument("--raise-before-fit", action="store_true")
p.add_argument("--bad-batch", action="store_true")
p.add_argument("--scalar-loss", action="store_true")
p.add_argument("--regression", action="store_true")
p.add_argument("--checkpoint-every", type=int, default=0)
p.add_argument("--ckpt-min-interval", type=float, default=None)
p.add_argument("--val", action="store_true")
p.add_argument("--test", action="store_true")
p.add_argument("--data-raise-at", type=int, default=-1)
p.add_argument("--fork-oom", action="store_true", help="a fork of this script runs out of memory")
p.add_argument("--nan-sample", type=int, default=-1, help="this training sample reads as NaN")
p.add_argument(
    "--nan-once-file", default="", help="with --nan-sample: only until this file exists (a glitch)"
)
p.add_argument("--slices", action="store_true", help="report val slices (label 0 / label 1)")
p.add_argument(
    "--nan-grad-at-step", type=int, default=0, help="finite loss, NaN gradients at this step"
)
p.add_argument("--grad-norm-every", type=int, default=0)
p.add_argument("--second-fit", action="store_true", help="call Trainer.fit a second time")
p.add_argument("--exit-after-fit", type=int, default=0, help="sys.exit(N) after fit()")
p.add_argument("--after-fit-file", default="", help="write this file when fit() returns")
p.add_argument(
    "--plateau-per-step", action="store_true", help="ReduceLROnPlateau stepped every step"
)
p.add_argument("--iterable", action="store_true", help="train data as an IterableDataset")
p.add_argument(
    "--bad-test-loader",
    action="store_true",
    help="a test loader whose record 40 is missing (KeyError), for `onthefly test`",
)
p.add_argument(
    "--slow-val",
    type=float,
    default=0.0,
    help="with --val: each val sample takes this many seconds (batches of 8); the first "
    "writes ./val-started",
)
args = p.parse_args()
if args.fork_step_sleep is not None and os.environ.get("ONTHEFLY_ROLE") == "fork":
    args.step_sleep = args.fork_step_sleep


class Data(Dataset):
    def __init__(self, n: int, regression: bool, poison: int = -1) -> None:
        self.poison = poison
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 16, generator=g)
        w = torch.randn(16, generator=g)
        if regression:
            self.y = (self.x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
        else:
            self.y = (self.x @ w > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == args.data_raise_at:
            raise OSError(f"corrupt record {i}")
        if args.bad_batch:
            return {"weird": self.x[i]}
        if i == self.poison:
            once = args.nan_once_file
            if not once or not os.path.exists(once):
                if once:
                    open(once, "w").close()
                return self.x[i] * float("nan"), self.y[i]
        return self.x[i], self.y[i]


class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Net(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, out)
        )
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training:
            step = self.calls
            if args.step_sleep:
                time.sleep(args.step_sleep)
            crash = args.crash_at_step and step == args.crash_at_step
            if crash and not (args.crash_once_file and os.path.exists(args.crash_once_file)):
                if args.crash_once_file:
                    open(args.crash_once_file, "w").close()
                    os.kill(os.getpid(), 9)
                raise ValueError(f"boom at step {step}")
            if args.nan_at_step and step == args.nan_at_step:
                return self.body(x) * float("nan")
            if args.nan_grad_at_step and step == args.nan_grad_at_step:
                return _NanGrad.apply(self.body(x))
        return self.body(x)


if args.fork_oom and os.environ.get("ONTHEFLY_ROLE") == "fork":
    raise MemoryError("CUDA out of memory (simulated in the fork)")

if args.raise_before_fit:
    raise RuntimeError("failed while building the data")

ds = Data(args.n, args.regression, poison=args.nan_sample)
if args.iterable:

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (ds[i] for i in range(len(ds)))

    ds = Stream()
train = DataLoader(
    ds, batch_size=args.batch_size, shuffle=not args.iterable, num_workers=args.num_workers
)
val = DataLoader(Data(128, args.regression), batch_size=64) if args.val else None
if args.val and args.slow_val:

    class SlowVal(Data):
        def __getitem__(self, i: int):
            if not os.path.exists("val-started"):
                open("val-started", "w").close()
            time.sleep(args.slow_val)
            return super().__getitem__(i)

    val = DataLoader(SlowVal(128, args.regression), batch_size=8)
test = DataLoader(Data(128, args.regression), batch_size=64) if args.test else None
if args.bad_test_loader:

    class MissingRecord(Data):
        def __getitem__(self, i: int):
            if i == 40:
                raise KeyError(f"test record {i} missing")
            return super().__getitem__(i)

    test = DataLoader(MissingRecord(128, args.regression), batch_size=16)
model = Net(1 if args.regression else 2)
if args.optim == "sgd":
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
else:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
sched: object = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
if args.plateau_per_step:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5)
if args.scalar_loss:

    def loss_fn(out, y):  # scaled by the batch's own spread: no per-sample value
        return ((out[:, -1] - y.float()) ** 2).sum() / len(y) / (1 + y.float().std())
else:
    loss_fn = nn.MSELoss() if args.regression else nn.CrossEntropyLoss()

if args.no_fit:  # returns normally without calling fit (a sys.exit(0) is a deliberate end)
    print("built everything, but forgot to call fit")

kw = {
    "project": "tests",
    "run_name": "small",
    "max_epochs": args.epochs,
    "val_every_n_epochs": 1 if args.val else 0,
    "do_test_after": args.test,
    "checkpoint_every_n_steps": args.checkpoint_every,
    "grad_norm_every": args.grad_norm_every,
    "val_slices": {
        "label0": lambda x, y: y.reshape(-1) <= 0,
        "label1": lambda x, y: y.reshape(-1) > 0,
    }
    if args.slices
    else None,
}
if args.plateau_per_step:
    kw["scheduler_interval"] = "step"
if args.ckpt_min_interval is not None:
    kw["checkpoint_min_interval_s"] = args.ckpt_min_interval
if not args.no_fit:
    Trainer(**kw).fit(model, opt, loss_fn, train, val, test, scheduler=sched)
if args.second_fit:  # e.g. a fine-tuning phase after pre-training
    Trainer(project="tests", run_name="finetune", max_epochs=1).fit(model, opt, loss_fn, train)
if args.after_fit_file:
    with open(args.after_fit_file, "w") as f:
        f.write("the code after fit() ran")
if args.exit_after_fit:
    sys.exit(args.exit_after_fit)
