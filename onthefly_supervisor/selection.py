"""Selection SPECs: which samples a fork trains on, chosen from per-sample losses.

A SPEC is the small string that the CLI, the dashboard, plan cards and the wire share:

    all                     every seen sample
    quantile:LO:HI          the samples whose loss rank lies in [LO, HI) (0 <= LO < HI <= 1),
                            e.g. quantile:0.85:1.0 is the hardest 15 %
    kmeans:auto             residual clustering with k picked by silhouette (2..8);
    kmeans:auto:cluster=J   the highest-mean-loss cluster unless cluster=J names one
    kmeans:K[:cluster=J]    the same with a fixed k
    indices:FILE            explicit sample ids: .npy, text/CSV (one id per line, or an id
                            column under a header), or what export-slice writes (CSV, JSON,
                            Parquet: its sample_id column)

Losses are a dense float array indexed by sample id with NaN for samples not seen yet
(that is how the session store keeps them). Non-finite losses are treated as unseen:
an Inf cannot be ranked against the others or standardized, and a selection must never
silently depend on it.

This module is supervisor-side, so it uses numpy and scikit-learn only (no torch).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GRAMMAR = (
    "all | quantile:LO:HI (0<=LO<HI<=1) | kmeans:auto[:cluster=J] | kmeans:K[:cluster=J] "
    "| indices:FILE"
)
"""The valid SPEC grammar, quoted in every parse error so the user can fix the spec."""

Kind = Literal["all", "quantile", "kmeans", "indices"]

AUTO_K_RANGE = range(2, 9)
"""Candidate k for kmeans:auto. More than 8 residual clusters is rarely a useful fork."""

AUTO_K_SUBSAMPLE = 10_000
"""Silhouette is O(n^2); scoring on at most this many samples keeps auto-k bounded."""

# kmeans:auto does not choose a k whose smallest cluster is tiny: a handful of outliers
# would win the silhouette and become a "regime" too small to fork a specialist on. Every
# cluster must hold at least MIN_CLUSTER_ABS samples and at least MIN_CLUSTER_FRAC of the
# (sub)sample (`min_cluster_size`); with fewer than twice that many seen samples no split
# qualifies and one cluster holds all (said in the description). An explicit kmeans:K is
# kept as asked (a fork still refuses a selection under MIN_FORK_SAMPLES).
MIN_CLUSTER_FRAC = 0.02
"""kmeans:auto: the smallest cluster's least share of the (sub)sample (2 %)."""
MIN_CLUSTER_ABS = 10
"""kmeans:auto: the smallest cluster's least size in samples."""

MIN_FORK_SAMPLES = 2
"""The fewest samples a fork trains on. One sample cannot train a BatchNorm model (a batch
of one has no variance); from two on every batch of a fork has at least two samples,
because a selection's odd last sample joins the batch before it (onthefly_worker/data.py)."""

SILHOUETTE_SUBSAMPLE = 4_000
"""Points used to score each candidate k (drawn from the auto-k subsample). Silhouette
differences between k are stable at a few thousand points, and this keeps the seven
O(n^2) scorings to about a second in all."""

MINIBATCH_ABOVE = 20_000
"""Above this many samples, fit MiniBatchKMeans on a subsample and assign all with predict."""

FIT_SUBSAMPLE = 100_000
"""Samples used to fit the centroids of a large data set; predict then assigns every sample."""

MAX_LABELS_IN_MIX = 10
"""ClusterInfo.label_mix keeps the most common labels only, so the record stays small."""


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad selection spec {spec!r}: {why}; valid: {GRAMMAR}")


@dataclass(frozen=True)
class SelectionSpec:
    """A parsed SPEC. Build it with `parse_spec`; `str(spec)` gives the canonical string."""

    kind: Kind
    """all | quantile | kmeans | indices."""
    lo: float = 0.0
    """quantile: lower loss-rank fraction, inclusive."""
    hi: float = 1.0
    """quantile: upper loss-rank fraction, exclusive (1.0 includes the maximum)."""
    k: int | Literal["auto"] = "auto"
    """kmeans: the number of clusters, or "auto" to pick it by silhouette."""
    cluster: int | None = None
    """kmeans: the cluster to select (ids ordered by mean loss, 0 = easiest); None = hardest."""
    path: str | None = None
    """indices: the file of sample ids, as written in the spec (resolved at select time)."""

    def __post_init__(self) -> None:
        text = str(self)
        if self.kind not in ("all", "quantile", "kmeans", "indices"):
            raise _bad(text, f"unknown kind {self.kind!r}")
        if self.kind == "quantile" and not (
            math.isfinite(self.lo) and math.isfinite(self.hi) and 0.0 <= self.lo < self.hi <= 1.0
        ):
            raise _bad(
                text, f"quantile bounds must satisfy 0<=LO<HI<=1, got LO={self.lo} HI={self.hi}"
            )
        if self.kind == "kmeans":
            if self.k != "auto" and (
                isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2
            ):
                raise _bad(
                    text,
                    f"K must be 'auto' or an integer >= 2 (use 'all' for one group), got {self.k!r}",
                )
            if self.cluster is not None and (
                isinstance(self.cluster, bool)
                or not isinstance(self.cluster, int)
                or self.cluster < 0
            ):
                raise _bad(text, f"cluster must be an integer >= 0, got {self.cluster!r}")
            if isinstance(self.k, int) and self.cluster is not None and self.cluster >= self.k:
                raise _bad(
                    text,
                    f"cluster={self.cluster} does not exist with K={self.k} (ids 0..{self.k - 1})",
                )
        if self.kind == "indices" and not self.path:
            raise _bad(text, "indices needs a file: indices:FILE")

    def __str__(self) -> str:
        if self.kind == "quantile":
            return f"quantile:{self.lo:g}:{self.hi:g}"
        if self.kind == "kmeans":
            base = f"kmeans:{self.k}"
            return base if self.cluster is None else f"{base}:cluster={self.cluster}"
        if self.kind == "indices":
            return f"indices:{self.path}"
        return str(self.kind)


_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _parse_fraction(spec: str, name: str, text: str) -> float:
    if not _FLOAT.match(text.strip()):
        raise _bad(spec, f"{name} must be a number in [0, 1], got {text!r}")
    return float(text)


def parse_spec(spec: str) -> SelectionSpec:
    """Parse a SPEC string; a bad spec raises ValueError naming the bad part and the grammar."""
    if not isinstance(spec, str):
        raise ValueError(
            f"a selection spec must be a string, got {type(spec).__name__}; valid: {GRAMMAR}"
        )
    text = spec.strip()
    if not text:
        raise _bad(spec, "it is empty")
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "all":
        if rest:
            raise _bad(spec, f"'all' takes no arguments, got {rest!r}")
        return SelectionSpec(kind="all")
    if kind == "quantile":
        parts = rest.split(":") if rest else []
        if len(parts) != 2:
            raise _bad(
                spec, f"quantile needs exactly LO and HI (quantile:LO:HI), got {len(parts)} part(s)"
            )
        lo = _parse_fraction(spec, "LO", parts[0])
        hi = _parse_fraction(spec, "HI", parts[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise _bad(spec, f"quantile bounds must satisfy 0<=LO<HI<=1, got LO={lo:g} HI={hi:g}")
        return SelectionSpec(kind="quantile", lo=lo, hi=hi)
    if kind == "kmeans":
        parts = [p.strip() for p in rest.split(":")] if rest else []
        if not parts or not parts[0]:
            raise _bad(spec, "kmeans needs K or auto (kmeans:auto or kmeans:K)")
        if len(parts) > 2:
            raise _bad(spec, f"too many parts after kmeans: {rest!r}")
        k: int | Literal["auto"]
        if parts[0].lower() == "auto":
            k = "auto"
        elif parts[0].isdigit():
            k = int(parts[0])
            if k < 2:
                raise _bad(
                    spec, f"K must be an integer >= 2 (use 'all' for one group), got {parts[0]!r}"
                )
        else:
            raise _bad(spec, f"K must be 'auto' or an integer >= 2, got {parts[0]!r}")
        cluster: int | None = None
        if len(parts) == 2:
            key, eq, value = parts[1].partition("=")
            if key.strip().lower() != "cluster" or not eq:
                raise _bad(spec, f"expected cluster=J after kmeans:{parts[0]}, got {parts[1]!r}")
            if not value.strip().isdigit():
                raise _bad(spec, f"cluster must be an integer >= 0, got {value.strip()!r}")
            cluster = int(value)
        return SelectionSpec(kind="kmeans", k=k, cluster=cluster)
    if kind == "indices":
        # Everything after the first colon is the path, so Windows drive letters and
        # colons in file names survive.
        path = rest.strip()
        if not path:
            raise _bad(spec, "indices needs a file: indices:FILE")
        return SelectionSpec(kind="indices", path=path)
    raise _bad(spec, f"unknown kind {kind!r}")


@dataclass
class ClusterInfo:
    """One residual cluster. Ids are ordered by mean loss: 0 is the easiest cluster."""

    id: int
    size: int
    mean_loss: float
    indices: np.ndarray
    """Sample ids in the cluster, int64, sorted."""
    label_mix: dict[int, int] | None = None
    """Counts of the most common labels in the cluster (at most 10), when labels were given."""


@dataclass
class Selection:
    """The result of `select`: which samples, and a human-readable account of why."""

    indices: np.ndarray
    """Selected sample ids, int64, sorted, unique."""
    spec: str
    """The canonical spec that produced this selection."""
    description: str
    """One or two sentences for the dashboard / plan card."""
    clusters: list[ClusterInfo] | None = None
    """kmeans only: every cluster found, ordered by mean loss."""
    selected_cluster: int | None = None
    """kmeans only: the id of the selected cluster."""
    n_seen: int = 0
    """How many samples had a finite loss."""
    extra: dict[str, float] = field(default_factory=dict)
    """Numbers behind the description (loss thresholds, silhouette), for reports."""


def check_fork_size(selection: Selection, batch_size: int | None = None) -> str:
    """Refuse a selection too small to train a fork on (ValueError naming its size and the
    minimum, MIN_FORK_SAMPLES); else a note when it is smaller than one batch of the
    parent's loader (`batch_size`, when known), "" otherwise."""
    n = int(selection.indices.size)
    what = f"the selection {selection.spec}"
    if selection.clusters is not None and len(selection.clusters) == 1:
        # A "specialist" on every seen sample is the generalist trained on: nothing to fork.
        why = selection.description.split("; ", 1)[1] if "; " in selection.description else ""
        raise ValueError(
            f"{what} found one cluster, every one of the {n} seen samples"
            + (f" ({why})" if why else "")
            + ": no specialist to fork. `quantile:0.9:1.0` selects the hardest tail, "
            "`kmeans:K` a fixed number of clusters (`onthefly clusters --select kmeans:K` "
            "shows them), `all` forks on everything"
        )
    if selection.selected_cluster is not None and selection.clusters:
        what += f" (cluster {selection.selected_cluster} of {len(selection.clusters)})"
    if n < MIN_FORK_SAMPLES:
        raise ValueError(
            f"{what} has {n} sample{'' if n == 1 else 's'}; a fork needs at least "
            f"{MIN_FORK_SAMPLES} (a batch of one sample cannot train BatchNorm): widen the "
            "selection"
        )
    if batch_size and n < batch_size:
        return (
            f"{n} samples, fewer than one batch of the parent's loader (~{batch_size}): "
            f"every step trains on all {n}"
        )
    return ""


@contextmanager
def _limit_threads(threads: int) -> Iterator[None]:
    # sklearn's k-means uses OpenMP/BLAS pools sized to the whole machine; the
    # supervisor shares that machine with training workers, so it pins its pools.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        # Without it, the small n_init values below are what keeps the cost bounded.
        yield
        return
    with threadpool_limits(limits=threads):
        yield


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def select(
    spec: str | SelectionSpec,
    losses: np.ndarray,
    features: np.ndarray | None = None,
    seed: int = 0,
    base_dir: str | os.PathLike[str] | None = None,
    labels: np.ndarray | None = None,
    threads: int | None = None,
    embedding: np.ndarray | None = None,
) -> Selection:
    """Apply a SPEC to a dense per-sample loss array (NaN = unseen).

    `features` (n,) or (n, d), rows indexed like `losses`, adds residual features for
    kmeans (loss history over epochs, margin); NaN entries are imputed with the column
    mean of the seen samples because a history column is naturally missing for samples a
    run has not revisited. `embedding` (n, e) adds a representation block (e.g. the
    penultimate layer): standardized like the rest, then scaled so the block as a whole
    weighs as much as the residual columns together (16 embedding columns would otherwise
    outvote loss and margin 16 to 2). `labels` (n,) ints fill ClusterInfo.label_mix.
    `base_dir` resolves a relative indices:FILE (default: the current directory).
    `threads` caps the BLAS/OpenMP pools during k-means (default min(4, cpus)).
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    loss = np.asarray(losses)
    if loss.ndim != 1:
        raise ValueError(f"losses must be a 1-D array indexed by sample id, got shape {loss.shape}")
    if not np.issubdtype(loss.dtype, np.floating):
        loss = loss.astype(np.float64)
    seen_mask = np.isfinite(loss)
    n_seen = int(seen_mask.sum())
    n_nonfinite = int(np.count_nonzero(~seen_mask & ~np.isnan(loss)))
    note = f" ({n_nonfinite} non-finite losses treated as unseen)" if n_nonfinite else ""
    text = str(parsed)

    if parsed.kind == "indices":
        return _select_indices(parsed, loss, seen_mask, base_dir)
    if n_seen == 0:
        raise ValueError(
            f"the selection {text} is empty: none of the {loss.size} samples has a finite loss yet"
        )
    seen_ids = np.flatnonzero(seen_mask).astype(np.int64)

    if parsed.kind == "all":
        return Selection(
            indices=seen_ids,
            spec=text,
            description=f"all {n_seen} seen samples of {loss.size}{note}",
            n_seen=n_seen,
        )
    if parsed.kind == "quantile":
        return _select_quantile(parsed, loss, seen_ids, note)
    embed_dims = 0
    if embedding is not None:
        emb = np.asarray(embedding)
        if emb.ndim != 2 or emb.shape[0] != loss.shape[0]:
            raise ValueError(
                f"embedding must have shape (n, e) with n = {loss.shape[0]} (one row per "
                f"sample id), got {emb.shape}"
            )
        if features is not None:
            f0 = np.asarray(features)
            f0 = f0[:, None] if f0.ndim == 1 else f0
            if f0.ndim != 2 or f0.shape[0] != loss.shape[0]:
                raise ValueError(
                    f"features must have shape (n,) or (n, d) with n = {loss.shape[0]} (one "
                    f"row per sample id), got {f0.shape}"
                )
            features = np.concatenate([f0, emb], axis=1)
        else:
            features = emb
        embed_dims = int(emb.shape[1])
    return _select_kmeans(
        parsed,
        loss,
        seen_ids,
        features,
        labels,
        seed,
        _default_threads() if threads is None else threads,
        note,
        embed_dims,
    )


def _select_quantile(
    spec: SelectionSpec, loss: np.ndarray, seen_ids: np.ndarray, note: str
) -> Selection:
    # By rank rather than by threshold value: ties and heavy tails then cannot make a
    # 15 % slice hold 60 % of the data, and adjacent slices partition the samples.
    # Ties are broken by sample id (stable sort), so the result is deterministic.
    n = seen_ids.size
    order = seen_ids[np.argsort(loss[seen_ids], kind="stable")]
    start = math.floor(spec.lo * n + 0.5)
    stop = math.floor(spec.hi * n + 0.5)
    text = str(spec)
    if stop <= start:
        raise ValueError(
            f"the selection {text} is empty: {n} seen samples give loss ranks [{start}, {stop}); "
            "widen the quantile range"
        )
    chosen = order[start:stop]
    lo_loss = float(loss[chosen[0]])
    hi_loss = float(loss[chosen[-1]])
    return Selection(
        indices=np.sort(chosen),
        spec=text,
        description=(
            f"{chosen.size} of {n} seen samples with loss rank in [{spec.lo:g}, {spec.hi:g}) "
            f"(loss {lo_loss:.4g}..{hi_loss:.4g}){note}"
        ),
        n_seen=n,
        extra={"loss_min": lo_loss, "loss_max": hi_loss},
    )


def _feature_matrix(
    loss: np.ndarray, seen_ids: np.ndarray, features: np.ndarray | None, embed_dims: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Standardized residual features of the seen samples, float32 (n_seen, d); the last
    `embed_dims` columns of `features` are an embedding block, scaled after standardizing
    so its total variance equals the number of other columns (loss included).

    Built in one preallocated float32 array and standardized in place: at 1M x 64 every
    extra copy costs ~0.25 GB and a float64 one twice that, and copies were most of the
    time of a clustering run.
    """
    notes: list[str] = []
    n_total = loss.shape[0]
    all_seen = seen_ids.size == n_total
    f: np.ndarray | None = None
    if features is not None:
        f = np.asarray(features)
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2 or f.shape[0] != n_total:
            raise ValueError(
                f"features must have shape (n,) or (n, d) with n = {n_total} (one row per "
                f"sample id), got {f.shape}"
            )
        if not np.issubdtype(f.dtype, np.number):
            raise ValueError(f"features must be numeric, got dtype {f.dtype}")
    d = 1 + (f.shape[1] if f is not None else 0)
    x = np.empty((seen_ids.size, d), dtype=np.float32)
    x[:, 0] = loss if all_seen else loss[seen_ids]
    if f is not None and d > 1:
        x[:, 1:] = f if all_seen else f[seen_ids]
        bad = ~np.isfinite(x[:, 1:])
        if bad.any():
            empty = bad.all(axis=0)
            if empty.any():
                notes.append(f"{int(empty.sum())} feature column(s) with no finite value dropped")
                x = np.ascontiguousarray(x[:, np.concatenate([[True], ~empty])])
                bad = bad[:, ~empty]
                if embed_dims:
                    embed_dims -= int(np.count_nonzero(np.asarray(empty)[-embed_dims:]))
            if bad.any():
                feats = x[:, 1:]
                means = np.nanmean(np.where(bad, np.nan, feats), axis=0)
                rows, cols = np.nonzero(bad)
                feats[rows, cols] = means[cols]
                x[:, 1:] = feats
                notes.append(f"{int(bad.sum())} missing feature value(s) imputed with column means")
    mean, std = _column_moments(x)
    # A constant column carries no information; dividing by 1 keeps it at 0 instead of NaN.
    std[std == 0] = 1.0
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)
    if embed_dims > 0:
        others = x.shape[1] - embed_dims
        x[:, others:] *= np.float32(math.sqrt(others / embed_dims))
        notes.append(
            f"the {embed_dims} embedding column(s) weigh as much as the {others} residual "
            "column(s) together"
        )
    return x, notes


def _column_moments(x: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population std in float64, over row chunks (Chan et al.'s merge).

    float32 sums over 1M rows lose digits, and a float64 copy of the whole matrix is what
    we avoid; merging per-chunk (mean, M2) is exact in float64 and numerically stable.
    """
    n = 0
    mean = np.zeros(x.shape[1], dtype=np.float64)
    m2 = np.zeros(x.shape[1], dtype=np.float64)
    for i in range(0, x.shape[0], chunk):
        c = x[i : i + chunk].astype(np.float64)
        nc = c.shape[0]
        mc = c.mean(axis=0)
        m2c = ((c - mc) ** 2).sum(axis=0)
        delta = mc - mean
        tot = n + nc
        mean = mean + delta * (nc / tot)
        m2 = m2 + m2c + delta**2 * (n * nc / tot)
        n = tot
    return mean, np.sqrt(m2 / max(n, 1))


def _n_distinct(x: np.ndarray, cap: int) -> int:
    """Distinct rows in x, or any number >= cap once that many are found (enough to bound k)."""
    head = int(np.unique(x[:20_000], axis=0).shape[0])
    if head >= cap or x.shape[0] <= 20_000:
        return head
    # Heavily duplicated data: only then pay for the full count.
    return int(np.unique(x, axis=0).shape[0])


def _fit_kmeans(x: np.ndarray, k: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Labels for every row of x. Large inputs: fit on a subsample, assign all with predict."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    with warnings.catch_warnings():
        # Duplicate points can leave fewer distinct clusters than k; the caller checks sizes.
        warnings.simplefilter("ignore")
        if x.shape[0] <= MINIBATCH_ABOVE:
            return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        fit_rows = x
        if x.shape[0] > FIT_SUBSAMPLE:
            fit_rows = x[np.sort(rng.choice(x.shape[0], FIT_SUBSAMPLE, replace=False))]
        model = MiniBatchKMeans(
            n_clusters=k, n_init=3, batch_size=4096, random_state=seed, max_no_improvement=10
        ).fit(fit_rows)
        return model.predict(x)


def min_cluster_size(n: int) -> int:
    """The smallest cluster kmeans:auto keeps among `n` (sub)sampled points: MIN_CLUSTER_ABS
    samples, and MIN_CLUSTER_FRAC of them when that is more."""
    return max(1, MIN_CLUSTER_ABS, math.ceil(MIN_CLUSTER_FRAC * n))


def _auto_k(
    x: np.ndarray, seed: int, rng: np.random.Generator, k_max: int, notes: list[str]
) -> tuple[int, dict[int, float]]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    sub = x
    if x.shape[0] > AUTO_K_SUBSAMPLE:
        sub = x[np.sort(rng.choice(x.shape[0], AUTO_K_SUBSAMPLE, replace=False))]
    score_rows = np.arange(sub.shape[0])
    if sub.shape[0] > SILHOUETTE_SUBSAMPLE:
        score_rows = np.sort(rng.choice(sub.shape[0], SILHOUETTE_SUBSAMPLE, replace=False))
    scores: dict[int, float] = {}
    n_sub = sub.shape[0]
    min_size = min_cluster_size(n_sub)
    tiny: list[int] = []
    for k in AUTO_K_RANGE:
        if k > k_max:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lab = KMeans(n_clusters=k, n_init=2, random_state=seed).fit_predict(sub)
        if np.bincount(lab, minlength=k).min() < min_size:
            tiny.append(k)
            continue
        lab_s = lab[score_rows]
        if np.unique(lab_s).size < 2 or np.unique(lab_s).size >= score_rows.size:
            continue
        scores[k] = float(silhouette_score(sub[score_rows], lab_s))
    if tiny:
        ks = ", ".join(str(k) for k in tiny)
        notes.append(f"k={ks} not chosen: a cluster smaller than {min_size} of {n_sub} samples")
    if not scores:
        return 1, scores
    # Highest silhouette; ties go to the smaller k (simpler forks).
    best = max(scores, key=lambda kk: (scores[kk], -kk))
    return best, scores


def _select_kmeans(
    spec: SelectionSpec,
    loss: np.ndarray,
    seen_ids: np.ndarray,
    features: np.ndarray | None,
    labels: np.ndarray | None,
    seed: int,
    threads: int,
    note: str,
    embed_dims: int = 0,
) -> Selection:
    text = str(spec)
    # Validate everything before the (possibly long) clustering.
    lab_arr: np.ndarray | None = None
    if labels is not None:
        lab_arr = np.asarray(labels)
        if lab_arr.shape != loss.shape:
            raise ValueError(
                f"labels must have shape {loss.shape} (one per sample id), got {lab_arr.shape}"
            )
        lab_arr = lab_arr[seen_ids]
    x, notes = _feature_matrix(loss, seen_ids, features, embed_dims)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    distinct = _n_distinct(x, cap=max(AUTO_K_RANGE) + 1)
    scores: dict[int, float] = {}
    with _limit_threads(threads):
        if spec.k == "auto":
            k_max = min(max(AUTO_K_RANGE), distinct - 1)
            least = min_cluster_size(min(n, AUTO_K_SUBSAMPLE))
            if k_max < 2:
                k = 1
                notes.append(
                    f"too few distinct seen samples ({distinct}) to cluster: one cluster holds all"
                )
            elif n < 2 * least:
                k = 1
                notes.append(
                    f"too few seen samples ({n}) to split: kmeans:auto keeps no cluster under "
                    f"{least} samples, so one cluster holds all"
                )
            else:
                k, scores = _auto_k(x, seed, rng, k_max, notes)
                if k == 1:
                    notes.append(
                        "no k in 2..8 gave two non-trivial clusters: one cluster holds all"
                    )
        else:
            k = int(spec.k)
            if distinct < k:
                raise ValueError(
                    f"the selection {text} needs at least {k} distinct seen samples to form {k} "
                    f"clusters, got {distinct} (of {n} seen); use a smaller K or kmeans:auto"
                )
        raw = np.zeros(n, dtype=np.int64) if k == 1 else _fit_kmeans(x, k, seed, rng)

    seen_loss = loss[seen_ids]
    # Re-number clusters by mean loss so ids mean something to a person (0 = easiest)
    # and the default (the hardest cluster) is simply the last one.
    present = np.unique(raw)
    means = np.array([seen_loss[raw == c].mean() for c in present])
    order = present[np.argsort(means, kind="stable")]
    remap = np.full(int(raw.max()) + 1, -1, dtype=np.int64)
    remap[order] = np.arange(order.size)
    lab = remap[raw]
    k_found = int(order.size)

    clusters: list[ClusterInfo] = []
    for c in range(k_found):
        member = lab == c
        mix = None
        if lab_arr is not None:
            mix = {
                int(key): int(cnt)
                for key, cnt in Counter(lab_arr[member].tolist()).most_common(MAX_LABELS_IN_MIX)
            }
        clusters.append(
            ClusterInfo(
                id=c,
                size=int(member.sum()),
                mean_loss=float(seen_loss[member].mean()),
                indices=seen_ids[member],
                label_mix=mix,
            )
        )
    chosen = k_found - 1 if spec.cluster is None else spec.cluster
    if chosen >= k_found:
        raise ValueError(
            f"the selection {text} names cluster {chosen} but only {k_found} cluster(s) were found "
            f"(ids 0..{k_found - 1}, ordered by mean loss)"
        )
    picked = clusters[chosen]
    if picked.size == 0:  # pragma: no cover - clusters are built from present labels
        raise ValueError(f"the selection {text} is empty: cluster {chosen} has no samples")
    how = (
        f"k={k_found} chosen by silhouette" if spec.k == "auto" and k_found > 1 else f"k={k_found}"
    )
    which = "the highest-mean-loss cluster" if spec.cluster is None else f"cluster {chosen}"
    desc = (
        f"{picked.size} of {n} seen samples: {which} (mean loss {picked.mean_loss:.4g}) of a "
        f"k-means on {x.shape[1]} standardized residual feature(s), {how}{note}"
    )
    if notes:
        desc += "; " + "; ".join(notes)
    extra = {f"silhouette_k{kk}": s for kk, s in scores.items()}
    return Selection(
        indices=picked.indices.copy(),
        spec=text,
        description=desc,
        clusters=clusters,
        selected_cluster=chosen,
        n_seen=n,
        extra=extra,
    )


ID_COLUMNS = ("sample_id", "id", "index", "idx")
"""Column names an indices file's ids may be under (export-slice writes sample_id)."""

INDICES_FORMATS = (
    ".npy (an integer array); text or CSV (ids separated by newlines, commas or spaces, or a "
    "sample_id/id/index column under a header); JSON (a list of ids, or export-slice's "
    '{"slice": ..., "rows": [{"sample_id": ...}]}); Parquet (a sample_id column, as '
    "export-slice writes)"
)
"""What `indices:FILE` reads, quoted when a file cannot be read."""

_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)


def _unreadable(path: str, why: str) -> ValueError:
    return ValueError(f"indices file {path!r}: {why}; supported: {INDICES_FORMATS}")


def _int_ids(values: list[object], path: str, where: str) -> np.ndarray:
    """Integer ids from parsed JSON/Parquet values; the first non-integer is named (`where`
    is a format string for its position, e.g. "row {} sample_id")."""
    out: list[int] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not (
            isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v == int(v))
        ):
            raise ValueError(
                f"indices file {path!r}: {where.format(i)}: {v!r} is not an integer sample id"
            )
        out.append(int(v))
    return np.asarray(out, dtype=np.int64)


def _json_ids(path: str, text: str) -> np.ndarray:
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _unreadable(path, f"not valid JSON ({exc})") from None
    if isinstance(doc, dict):
        rows = doc.get("rows")
        if isinstance(rows, list):  # what export-slice writes
            doc = rows
        else:
            key = next((k for k in ("sample_ids", "indices", "ids") if k in doc), None)
            if key is None:
                raise _unreadable(path, "a JSON object without a 'rows' or 'ids' list")
            doc = doc[key]
    if not isinstance(doc, list):
        raise _unreadable(path, f"JSON {type(doc).__name__} where a list of ids was expected")
    if doc and all(isinstance(r, dict) for r in doc):
        col = next((c for c in ID_COLUMNS if c in doc[0]), None)
        if col is None:
            raise _unreadable(path, f"JSON rows without a sample_id field (keys {sorted(doc[0])})")
        missing = next((i for i, r in enumerate(doc) if col not in r), None)
        if missing is not None:
            raise ValueError(f"indices file {path!r}: row {missing} has no {col!r}")
        return _int_ids([r[col] for r in doc], path, "row {} " + col)
    return _int_ids(list(doc), path, "item {}")


def _parquet_ids(path: str) -> np.ndarray:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the explorer extra
        raise _unreadable(path, "a Parquet file, and reading Parquet needs pyarrow") from None
    try:
        schema = pq.read_schema(path)
        col = next((c for c in ID_COLUMNS if c in schema.names), None)
        if col is None:
            raise _unreadable(path, f"a Parquet file without a sample_id column ({schema.names})")
        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("indices file"):
            raise
        raise _unreadable(path, f"not a readable Parquet file ({exc})") from None
    return _int_ids(values, path, "row {} " + col)


def _read_ids(path: str) -> np.ndarray:
    """Sample ids from .npy, text/CSV, JSON or Parquet (see INDICES_FORMATS); order is kept so
    errors can name the first bad id."""
    lower = path.lower()
    if lower.endswith(".npy"):
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic != b"\x93NUMPY":
            raise ValueError(
                f"indices file {path!r} is not a .npy file (no NumPy header); write it with "
                "numpy.save, or give the ids as text/CSV, JSON or Parquet"
            )
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"indices file {path!r} is not a plain .npy array: {exc}") from exc
        if arr.ndim > 1 and sum(d > 1 for d in arr.shape) > 1:
            raise ValueError(
                f"indices file {path!r} holds a {arr.ndim}-D array of shape {arr.shape}; "
                "give a 1-D array of sample ids"
            )
        arr = np.ravel(arr)
        if np.issubdtype(arr.dtype, np.integer):
            return arr.astype(np.int64)
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            return arr.astype(np.int64)
        raise ValueError(
            f"indices file {path!r} must hold integer sample ids, got dtype {arr.dtype}"
        )
    with open(path, "rb") as fh:
        raw = fh.read()
    if lower.endswith((".parquet", ".pq")) or raw[:4] == b"PAR1":
        return _parquet_ids(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _unreadable(path, "not text (utf-8), .npy, JSON or Parquet") from None
    if lower.endswith(".json") or text.lstrip()[:1] in ("{", "["):
        return _json_ids(path, text)
    lines = [ln.strip() for ln in text.splitlines()]
    numbered = [(i, ln) for i, ln in enumerate(lines, start=1) if ln and not ln.startswith("#")]
    if not numbered:
        return np.zeros(0, dtype=np.int64)
    first = numbered[0][1]
    cells = [t.strip().strip('"').strip("'") for t in re.split(r"[,\t;]", first)]
    names = [t.lower() for t in cells]
    tokens = [t for t in re.split(r"[,\s;]+", first) if t]
    ids: list[int] = []
    # A header row (a CSV written by export-slice) names an id column, or holds no number at
    # all. A first line with a number in it is data (1.5 is a bad id, not a column name).
    header = any(c in names for c in ID_COLUMNS) or not any(_NUMBER.fullmatch(t) for t in tokens)
    if header:
        col = next((names.index(c) for c in ID_COLUMNS if c in names), 0)
        for lineno, ln in numbered[1:]:
            row = [t.strip().strip('"') for t in re.split(r"[,\t;]", ln)]
            if col >= len(row) or not _INT.fullmatch(row[col]):
                got = repr(row[col]) if col < len(row) else "missing"
                raise ValueError(
                    f"indices file {path!r} line {lineno}: column {cells[col]!r} is {got}, "
                    "not an integer id"
                )
            ids.append(int(row[col]))
        return np.asarray(ids, dtype=np.int64)
    for lineno, ln in numbered:
        for tok in re.split(r"[,\s;]+", ln):
            if not tok:
                continue
            if not _INT.fullmatch(tok):
                raise ValueError(
                    f"indices file {path!r} line {lineno}: {tok!r} is not an integer id"
                )
            ids.append(int(tok))
    return np.asarray(ids, dtype=np.int64)


def _select_indices(
    spec: SelectionSpec,
    loss: np.ndarray,
    seen_mask: np.ndarray,
    base_dir: str | os.PathLike[str] | None,
) -> Selection:
    assert spec.path is not None  # guaranteed by SelectionSpec validation
    path = os.path.expanduser(spec.path)
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(base_dir) if base_dir is not None else os.getcwd(), path)
    if not os.path.isfile(path):
        raise ValueError(f"the indices file {spec.path!r} does not exist (looked at {path})")
    ids = _read_ids(path)
    n = loss.shape[0]
    bad = np.flatnonzero((ids < 0) | (ids >= n))
    if bad.size:
        raise ValueError(
            f"indices file {spec.path!r}: sample id {int(ids[bad[0]])} is out of range [0, {n}) "
            f"({bad.size} bad id(s) in all)"
        )
    chosen = np.unique(ids)
    if chosen.size == 0:
        raise ValueError(f"the selection {spec} is empty: the file {spec.path!r} holds no ids")
    unseen = int(np.count_nonzero(~seen_mask[chosen]))
    desc = f"{chosen.size} sample ids from {spec.path}"
    if chosen.size != ids.size:
        desc += f" ({ids.size - chosen.size} duplicate(s) dropped)"
    if unseen:
        desc += f"; {unseen} of them have no loss yet"
    return Selection(
        indices=chosen.astype(np.int64),
        spec=str(spec),
        description=desc,
        n_seen=int(seen_mask.sum()),
    )
