"""Benchmark: k-means selection over per-sample residual features.

Targets (2 cores): a fixed-k clustering of 1M x 64 features in <= 5 s, and kmeans:auto
(silhouette over k = 2..8 on a subsample, then predict for all) in <= 30 s. Prints the
times and their ratio to the target (< 1.0 = within target).

    python bench/cluster.py [--n 1000000] [--d 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onthefly_supervisor.selection import select


def synthetic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Losses and features with 4 planted regimes of different difficulty."""
    rng = np.random.default_rng(seed)
    regime = rng.integers(0, 4, size=n)
    centers = rng.normal(0, 3, size=(4, d - 1)).astype(np.float32)
    feats = centers[regime] + rng.normal(0, 1, size=(n, d - 1)).astype(np.float32)
    losses = (regime * 0.5 + rng.gamma(2.0, 0.1, size=n)).astype(np.float32)
    losses[rng.random(n) < 0.01] = np.nan  # a few unseen samples, as in a live session
    return losses, feats


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64, help="total features including the loss")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    losses, feats = synthetic(args.n, args.d)
    print(f"data: {args.n} x {args.d} features, threads={args.threads}")

    # Cold: the first call in a process also pays sklearn's imports and thread-pool start.
    t0 = time.perf_counter()
    sel = select("kmeans:8", losses, feats, threads=args.threads)
    cold = time.perf_counter() - t0
    print(f"kmeans:8     {cold:6.2f} s  cold (first call in the process)")

    # Warm: what the long-lived supervisor pays per selection.
    t0 = time.perf_counter()
    sel = select("kmeans:8", losses, feats, threads=args.threads)
    fixed = time.perf_counter() - t0
    print(f"kmeans:8     {fixed:6.2f} s  (target 5 s, ratio {fixed / 5:.2f})  -> {sel.description}")

    t0 = time.perf_counter()
    sel = select("kmeans:auto", losses, feats, threads=args.threads)
    auto = time.perf_counter() - t0
    print(f"kmeans:auto  {auto:6.2f} s  (target 30 s, ratio {auto / 30:.2f}) -> {sel.description}")

    t0 = time.perf_counter()
    sel = select("quantile:0.85:1.0", losses)
    q = time.perf_counter() - t0
    print(f"quantile     {q:6.2f} s  -> {sel.description}")


if __name__ == "__main__":
    main()
