"""Checkpoint costs against bare PyTorch, measured in the same process, interleaved.

(a) blocked: what the training thread waits for, `snapshot()` of a ~200 MB model state
    (a copy into the reused shared-memory arena) + `AsyncWriter.submit()`, vs a plain
    `copy_` of the same bytes into warm buffers -> "snapshot bandwidth ratio" and
    "blocked bandwidth ratio" (goal >= 0.5)
(b) write: submit -> callback of the background write (the writer process: torch.save,
    sha256, fsync, rename, folder fsync) vs bare `torch.save(path)` + fsync of the same
    state in this process -> "write throughput ratio" (goal >= 0.9)
(c) training: steps/s of a small MLP loop (1 torch thread, as the pool caps a CPU
    worker) while a background write is in flight vs the same loop alone, in adjacent
    windows of the same length -> "training throughput during write ratio" (goal >= 0.95)
(d) resume: `checkpoint.load` + load_state_dict + one step vs
    `torch.load(mmap=True, weights_only=True)` + load_state_dict + one step
    -> "resume cost ratio" (time ÷ time; lower is better, 1.0 = as cheap as mmap)

Each ratio is the median over interleaved repetitions, so drift on a shared machine hits
both sides alike. "diag" lines split a cost into its parts, to say where time goes.

    python bench/checkpoint.py [--mb 200] [--reps 5] [--train-rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onthefly_worker import checkpoint as ckpt  # noqa: E402 - after the path fix-up


def big_model(mb: int) -> nn.Module:
    """Square Linear layers of width 2048 (16 MiB each) up to about `mb` MB of fp32."""
    width = 2048
    layers = max(1, round(mb * 2**20 / (width * width * 4)))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint dict shaped like the Trainer's (model, optimizer, rng, cursor...)."""
    return {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": ckpt.capture_rng(),
        "cursor": {"epoch": 0, "batch": 0, "seed": 0},
        "counters": {"step": 0, "sample_steps": 0},
    }


def tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(obj))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of a and of b, alternating a/b so both see the same conditions."""
    ta, tb = [], []
    a(), b()  # warm-up: first-touch page faults, allocator, file cache
    for _ in range(reps):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def gbps(n: int, s: float) -> float:
    return n / s / 1e9


class Background:
    """An AsyncWriter whose writer process is up (started by a first, discarded write)."""

    def __init__(self, d: str) -> None:
        self.d = d
        self.writer = ckpt.AsyncWriter()
        self.done = threading.Event()
        self.result: tuple[Any, Any] = (None, None)

    def warm_up(self, state: dict[str, Any], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.writer.last_mode != "process":
            if time.monotonic() > deadline:
                raise SystemExit("the checkpoint writer process did not come up")
            self.write(ckpt.snapshot(state))
            self.wait()
            if self.writer.last_mode != "process":
                time.sleep(0.5)

    def write(self, snap: dict[str, Any], name: str = "bg.pt") -> None:
        self.done.clear()

        def cb(saved: Any, err: Any) -> None:
            self.result = (saved, err)
            self.done.set()

        self.writer.submit(snap, os.path.join(self.d, name), {}, cb)

    def wait(self) -> None:
        self.writer.wait()
        if self.result[1] is not None:
            raise SystemExit(f"background write failed: {self.result[1]}")


# ------------------------------------------------------------------------------ (a)


def bench_blocked(state: dict[str, Any], bg: Background, reps: int) -> None:
    src = tensors(state)
    n = nbytes(state)
    warm = [torch.empty_like(t) for t in src]

    def copy_into_warm() -> None:
        for d, s in zip(warm, src, strict=True):
            d.copy_(s)

    def snap() -> None:
        ckpt.snapshot(state)  # dropped at once: the arena is free for the next one

    t_snap, t_copy = interleaved(snap, copy_into_warm, reps)
    blocked: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s = ckpt.snapshot(state)
        bg.write(s)
        blocked.append(time.perf_counter() - t0)
        del s
        bg.wait()
    t_blocked = statistics.median(blocked)
    print(
        f"(a) snapshot {gbps(n, t_snap):5.2f} GB/s   snapshot+submit {gbps(n, t_blocked):5.2f} "
        f"GB/s ({t_blocked * 1e3:.0f} ms blocked)   copy_ {gbps(n, t_copy):5.2f} GB/s   "
        f"({n / 1e6:.0f} MB, {len(src)} tensors)"
    )
    # The first snapshot of a size creates its arena (reserved and zeroed by the kernel):
    # a one-off, like the first torch.empty of that size.
    cold = ckpt._Arena(sum(ckpt._aligned(t.numel() * t.element_size()) for t in src))
    t0 = time.perf_counter()
    views, off = [], 0
    for t in src:
        views.append(cold.view(off, t.dtype, t.shape))
        off += ckpt._aligned(t.numel() * t.element_size())
    ckpt._copy_all(views, src)
    t_cold = time.perf_counter() - t0
    print(
        f"    diag: first snapshot of a new size (arena created and faulted in) "
        f"{gbps(n, t_cold):5.2f} GB/s, once per size; later snapshots reuse it"
    )
    print(f"snapshot bandwidth ratio: {t_copy / t_snap:.2f}  (goal >= 0.5)")
    print(f"blocked bandwidth ratio: {t_copy / t_blocked:.2f}  (snapshot + submit; goal >= 0.5)")


# ------------------------------------------------------------------------------ (b)


def bare_save(state: dict[str, Any], path: str) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_write(state: dict[str, Any], bg: Background, d: str, reps: int) -> None:
    thread_path = os.path.join(d, "thread.pt")
    held = [ckpt.snapshot(state)]  # one snapshot, written again and again
    # Each write makes a new file, as a run's checkpoints do (step-N.pt); the previous one
    # is removed outside the timing, so neither side pays for freeing an old file's blocks.
    bg_path, bare_path = os.path.join(d, "bg-new.pt"), os.path.join(d, "bare-new.pt")

    def gone(path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)

    def background() -> None:
        bg.write(held[0], os.path.basename(bg_path))
        bg.wait()

    bg_times, bare_times = [], []
    for i in range(reps + 1):  # the first pair warms up
        gone(bg_path)
        t_one = timed(background)
        gone(bare_path)
        t_two = timed(lambda: bare_save(state, bare_path))
        if i:
            bg_times.append(t_one)
            bare_times.append(t_two)
    t_bg, t_bare = statistics.median(bg_times), statistics.median(bare_times)
    saved = bg.result[0]
    assert saved is not None and saved.sha256 == ckpt.sha256_file(saved.path), "sha256 mismatch"
    size = os.path.getsize(saved.path)
    t_thread = statistics.median(
        timed(lambda: ckpt.write_atomic(held[0], thread_path)) for _ in range(3)
    )
    held.clear()
    print(
        f"(b) background write {gbps(size, t_bg):5.2f} GB/s (submit -> callback, writer process "
        f"{ckpt.writer_process_pid()})   torch.save+fsync {gbps(size, t_bare):5.2f} GB/s   "
        f"({size / 1e6:.0f} MB file, sha256 verified)"
    )
    print(
        f"    diag: the same write in this process (write_atomic) {gbps(size, t_thread):5.2f} GB/s"
    )
    print(f"write throughput ratio: {t_bare / t_bg:.2f}  (goal >= 0.9)")


# ------------------------------------------------------------------------------ (c)


def bench_training(state: dict[str, Any], bg: Background, rounds: int, threads: int) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(mlp.parameters(), lr=0.01)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(mlp(x), y).backward()
        opt.step()

    def steps_until(stop: Callable[[], bool]) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while not stop():
            step()
            n += 1
        return n, time.perf_counter() - t0

    def bare_in_thread(path: str) -> threading.Thread:
        t = threading.Thread(target=bare_save, args=(state, path), daemon=True)
        t.start()
        return t

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    ratios, ratios_thread, during_rates, alone_rates = [], [], [], []
    try:
        steps_until(lambda t_end=time.perf_counter() + 0.5: time.perf_counter() > t_end)
        for _ in range(rounds):
            snap = ckpt.snapshot(state)  # blocked time is (a); this is the time after it
            bg.write(snap)
            del snap
            n_w, t_w = steps_until(bg.done.is_set)
            bg.wait()
            t_end = time.perf_counter() + t_w
            n_a, t_a = steps_until(lambda t_end=t_end: time.perf_counter() > t_end)
            during, alone = n_w / t_w, n_a / t_a
            during_rates.append(during)
            alone_rates.append(alone)
            ratios.append(during / alone)
            # What a writer thread in this process costs (the old design), for comparison.
            th = bare_in_thread(os.path.join(bg.d, "bare-thread.pt"))
            n_t, t_t = steps_until(lambda th=th: not th.is_alive())
            t_end = time.perf_counter() + t_t
            n_b, t_b = steps_until(lambda t_end=t_end: time.perf_counter() > t_end)
            ratios_thread.append((n_t / t_t) / (n_b / t_b))
    finally:
        torch.set_num_threads(old)
    print(
        f"(c) training {statistics.median(alone_rates):7.1f} steps/s alone   "
        f"{statistics.median(during_rates):7.1f} steps/s while the writer process writes   "
        f"({rounds} rounds; training on {threads} torch thread(s), {os.cpu_count()} cpus)"
    )
    print(
        f"    diag: a bare torch.save on a thread of this process: {statistics.median(ratios_thread):.2f} "
        "of alone (the GIL: what the writer process avoids); per-round ratios "
        + " ".join(f"{r:.2f}" for r in ratios)
    )
    print(
        f"training throughput during write ratio: {statistics.median(ratios):.2f}  (goal >= 0.95)"
    )


# ------------------------------------------------------------------------------ (d)


def bench_resume(model: nn.Module, opt: torch.optim.Optimizer, d: str, reps: int) -> None:
    path = os.path.join(d, "resume.pt")
    ckpt.write_atomic(state_of(model, opt), path)
    x = torch.randn(1, 2048)  # one row: the step is the weight update, not a big matmul

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def via_onthefly() -> None:
        st = ckpt.load(path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        one_step()

    def via_mmap() -> None:
        st = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        one_step()

    t_ot, t_mm = interleaved(via_onthefly, via_mmap, reps)
    t_load, t_mload = interleaved(
        lambda: ckpt.load(path),
        lambda: torch.load(path, mmap=True, weights_only=True, map_location="cpu"),
        reps,
    )
    print(
        f"(d) resume via checkpoint.load {t_ot * 1e3:7.1f} ms   via torch.load(mmap=True) "
        f"{t_mm * 1e3:7.1f} ms   (each + load_state_dict + one step)"
    )
    print(
        f"    diag: the load alone {t_load * 1e3:7.1f} ms vs {t_mload * 1e3:7.1f} ms with mmap "
        "(checkpoint.load is an mmap load plus format checks; load_state_dict pages the "
        "tensors in)"
    )
    print(f"resume cost ratio: {t_ot / t_mm:.2f}  (1.0 = as cheap as mmap; lower is better)")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=int, default=200, help="model state size in MB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-rounds", type=int, default=7)
    ap.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads for (c); the pool caps a CPU worker's threads the same way",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = big_model(args.mb)
    # Momentum buffers are part of a real checkpoint but would double the size: plain SGD
    # keeps the state at the requested size.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    state = state_of(model, opt)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cpus, state {nbytes(state) / 1e6:.0f} MB, load "
        f"{os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        bg = Background(d)
        t_up = time.perf_counter()
        bg.warm_up(state)
        print(
            f"writer process {ckpt.writer_process_pid()} up in {time.perf_counter() - t_up:.1f} s"
        )
        bench_blocked(state, bg, args.reps)
        bench_write(state, bg, d, args.reps)
        bench_training(state, bg, args.train_rounds, args.train_threads)
        bench_resume(model, opt, d, max(args.reps, 7))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
