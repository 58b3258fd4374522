"""Pure detectors over training metric streams.

Every function here takes numpy arrays (or plain lists) and returns a result; none
touches a process, a file or the network, so the planner's judgement can be tested on
synthetic series and replayed on a stored session. Each ``detect_*`` returns a
:class:`Detection` or ``None`` and never raises on odd input: empty arrays, NaN/Inf and
too-short histories all mean "nothing to report", because a detector that crashes the
supervisor is worse than one that stays quiet.

Statistics are implemented with numpy and :mod:`math` only (scipy is not a
dependency): the normal CDF comes from :func:`math.erfc`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Detection",
    "DetectionKind",
    "batch_noise_factors",
    "detect_drift",
    "detect_high_loss_tail",
    "detect_nonfinite",
    "detect_plateau",
    "detect_residual_cluster",
    "detect_spike",
    "detect_weak_slices",
    "mann_kendall",
    "normal_sf",
    "page_hinkley",
    "persistent_tail_mask",
    "robust_zscores",
    "theil_sen_slope",
]

FloatArray = NDArray[np.float64]

# 1.4826 * MAD estimates the standard deviation of Gaussian data.
_MAD_TO_SIGMA = 1.482602218505602
# Exact Theil-Sen (all pairs) up to this many points; beyond it, sampled pairs.
_THEIL_SEN_EXACT_MAX = 400
_THEIL_SEN_SAMPLED_PAIRS = 200_000
# Cells per block of the O(n^2) Mann-Kendall sum, so memory stays bounded (~16 MB).
_MK_BLOCK_CELLS = 2_000_000
# Rows of the sliding-window matrix handled at once by robust_zscores.
_ZSCORE_CHUNK = 65_536


class DetectionKind(str, Enum):
    """What a detector saw; the planner maps each kind to an action."""

    NONFINITE = "nonfinite"
    """A loss or gradient norm became NaN or Inf."""
    SPIKE = "spike"
    """A single value jumped far above its recent robust level (``subject`` names the metric)."""
    PLATEAU = "plateau"
    """The loss stopped improving: no significant downward trend and a tiny slope."""
    DRIFT = "drift"
    """The mean of a metric shifted (Page-Hinkley); ``numbers['direction']`` is +1 up, -1 down."""
    HIGH_LOSS_TAIL = "high_loss_tail"
    """The same samples stay in the top loss quantile epoch after epoch."""
    RESIDUAL_CLUSTER = "residual_cluster"
    """A cluster of samples has a much higher loss than the rest (``subject`` = cluster id)."""
    WEAK_SLICE = "weak_slice"
    """A validation slice stays worse than the overall loss (``subject`` = worst slice)."""


@dataclass(frozen=True)
class Detection:
    """One finding of a detector: plain data the planner, UI and report all read."""

    kind: DetectionKind
    """Which detector fired."""
    step: int
    """Training step at which the condition holds (the offending step for spikes/NaN)."""
    severity: float
    """0..1; 0.5 means "just past the threshold", 1 means "as bad as it gets"."""
    message: str
    """One plain-language sentence for a person reading the dashboard or the CI log."""
    numbers: Mapping[str, float] = field(default_factory=dict)
    """The evidence (statistics, thresholds, counts) as floats, for the UI and the report."""
    subject: str = ""
    """What the finding is about: a metric name (``loss``, ``grad_norm``), a slice or a cluster."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DetectionKind):
            object.__setattr__(self, "kind", DetectionKind(self.kind))
        if not (0.0 <= self.severity <= 1.0) or math.isnan(self.severity):
            raise ValueError(f"Detection.severity must be in [0, 1], got {self.severity!r}")
        object.__setattr__(self, "numbers", {str(k): float(v) for k, v in self.numbers.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite numbers become ``None`` so strict JSON parsers accept it."""
        return {
            "kind": self.kind.value,
            "step": int(self.step),
            "severity": float(self.severity),
            "message": self.message,
            "numbers": {k: (v if math.isfinite(v) else None) for k, v in self.numbers.items()},
            "subject": self.subject,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Detection:
        numbers = {
            k: (math.nan if v is None else float(v)) for k, v in d.get("numbers", {}).items()
        }
        return cls(
            kind=DetectionKind(d["kind"]),
            step=int(d["step"]),
            severity=float(d["severity"]),
            message=str(d.get("message", "")),
            numbers=numbers,
            subject=str(d.get("subject", "")),
        )


# --------------------------------------------------------------------------- helpers


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _quiet(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Silence numpy floating-point warnings inside a detector.

    Extreme inputs (1e308, mixed Inf) overflow intermediate differences; every result
    is checked with ``isfinite`` afterwards, so the warnings would only be log noise in
    the supervisor.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kwargs)

    return wrapper


def _as_float(a: ArrayLike | None) -> FloatArray:
    if a is None:
        return np.zeros(0, dtype=np.float64)
    arr = np.asarray(a, dtype=np.float64)
    return arr.reshape(-1)


def _as_steps(steps: ArrayLike | None, n: int) -> NDArray[np.int64]:
    """Steps aligned with a series of length ``n``; missing steps fall back to the index."""
    s = np.asarray(steps if steps is not None else [], dtype=np.float64).reshape(-1)
    out = np.arange(n, dtype=np.int64)
    m = min(n, s.size)
    if m:
        head = s[:m]
        ok = np.isfinite(head)
        out[:m][ok] = np.clip(head[ok], -(2.0**62), 2.0**62).astype(np.int64)
    return out


def _severity(ratio: float) -> float:
    """Map "how many times past the threshold" (>= 1) to 0.5..1 smoothly.

    A ratio of 1 (just past) gives 0.5, 2 gives 0.75, infinity gives 1. Keeping every
    detector on the same scale lets the planner and the UI rank findings of different
    kinds without knowing their units.
    """
    if not math.isfinite(ratio):
        return 1.0
    r = max(ratio, 1.0)
    return float(min(1.0, max(0.0, 1.0 - 0.5 / r)))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def normal_sf(z: float) -> float:
    """Upper tail of the standard normal, P(Z > z), accurate far into the tail."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# --------------------------------------------------------------------------- non-finite


@_quiet
def detect_nonfinite(
    steps: ArrayLike, losses: ArrayLike, grad_norms: ArrayLike | None = None
) -> Detection | None:
    """First step whose loss or gradient norm is NaN or Inf.

    Non-finite values never recover by themselves (the weights are usually already
    poisoned), so the first one is what matters: the planner rolls back to a checkpoint
    before it. ``numbers['last_finite_step']`` is the last step before it where both
    metrics were finite (-1 if none), the natural rollback target.
    """
    loss = _as_float(losses)
    gn = _as_float(grad_norms)
    n = max(loss.size, gn.size)
    if n == 0:
        return None
    bad = np.zeros(n, dtype=bool)
    bad[: loss.size] |= ~np.isfinite(loss)
    bad[: gn.size] |= ~np.isfinite(gn)
    hits = np.flatnonzero(bad)
    if hits.size == 0:
        return None
    i = int(hits[0])
    st = _as_steps(steps, n)
    loss_bad = i < loss.size and not math.isfinite(loss[i])
    gn_bad = i < gn.size and not math.isfinite(gn[i])
    what = " and ".join(name for name, b in (("loss", loss_bad), ("gradient norm", gn_bad)) if b)
    value = loss[i] if loss_bad else gn[i]
    last_ok = int(st[i - 1]) if i > 0 else -1
    n_bad = int(bad[i:].sum())
    return Detection(
        kind=DetectionKind.NONFINITE,
        step=int(st[i]),
        severity=1.0,
        message=(
            f"The {what} became {'NaN' if math.isnan(value) else 'infinite'} at step {int(st[i])}; "
            f"the last step with finite values was {last_ok}."
        ),
        numbers={
            "index": float(i),
            "last_finite_step": float(last_ok),
            "loss_nonfinite": float(loss_bad),
            "grad_norm_nonfinite": float(gn_bad),
            "nonfinite_count": float(n_bad),
        },
        subject="loss" if loss_bad else "grad_norm",
    )


# --------------------------------------------------------------------------- spikes


@_quiet
def robust_zscores(
    values: ArrayLike,
    window: int = 50,
    min_history: int = 20,
    rel_floor: float = 0.01,
) -> FloatArray:
    """Robust z-score of each value against the ``window`` values before it.

    ``z[i] = (x[i] - median(h)) / (1.4826 * MAD(h))`` with ``h = x[i-window:i]``
    (non-finite history ignored). Median and MAD are used instead of mean and standard
    deviation because a spike must not inflate the very scale it is measured against.
    The scale is floored at ``rel_floor * |median|`` (and 1e-12) so a perfectly flat
    history does not turn a rounding-level wiggle into an "infinite" spike. Entries with
    fewer than ``min_history`` finite history points, or that are themselves
    non-finite, are NaN.
    """
    x = _as_float(values)
    n = x.size
    z = np.full(n, np.nan)
    if n == 0 or window < 1:
        return z
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(window, np.nan), clean])
    view = np.lib.stride_tricks.sliding_window_view(padded, window)[:n]
    for lo in range(0, n, _ZSCORE_CHUNK):
        hi = min(n, lo + _ZSCORE_CHUNK)
        w = view[lo:hi]
        count = np.isfinite(w).sum(axis=1)
        enough = count >= max(1, min_history)
        if not enough.any():
            continue
        med = np.full(hi - lo, np.nan)
        mad = np.full(hi - lo, np.nan)
        full = count == window
        part = enough & ~full
        if full.any():
            wf = w[full]
            m = np.median(wf, axis=1)
            med[full] = m
            mad[full] = np.median(np.abs(wf - m[:, None]), axis=1)
        if part.any():
            wp = w[part]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmedian(wp, axis=1)
                med[part] = m
                mad[part] = np.nanmedian(np.abs(wp - m[:, None]), axis=1)
        scale = np.maximum(_MAD_TO_SIGMA * mad, np.maximum(rel_floor * np.abs(med), 1e-12))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            zz = (x[lo:hi] - med) / scale
        zz[~enough | ~np.isfinite(x[lo:hi])] = np.nan
        z[lo:hi] = zz
    return z


def batch_noise_factors(batch_sizes: ArrayLike | None, n: int) -> tuple[FloatArray, float]:
    """``sqrt(b_i / b_ref)`` per point, and ``b_ref``, the median batch size (the usual one).

    Minibatch statistics get noisier as the batch shrinks: the standard deviation of a
    mean loss over ``b`` samples scales as ``1 / sqrt(b)``, and so does the norm of the
    mean gradient while gradient noise dominates it (``E|g_b|^2 = |g|^2 + tr(Sigma) / b``).
    The factor puts a point measured on ``b`` samples on the scale of the usual batch:
    the last, smaller batch of an epoch gets a factor below 1. Unknown, non-finite or
    non-positive sizes get 1 (nothing is known, nothing is rescaled), as does every point
    when no size is known.
    """
    f = np.ones(n, dtype=np.float64)
    b = _as_float(batch_sizes)[:n]
    ok = np.isfinite(b) & (b > 0)
    if not ok.any():
        return f, math.nan
    ref = float(np.median(b[ok]))
    f[: b.size][ok] = np.sqrt(b[ok] / ref)
    return f, ref


@_quiet
def detect_spike(
    steps: ArrayLike,
    values: ArrayLike,
    window: int = 50,
    z: float = 6.0,
    min_history: int = 20,
    *,
    since_step: int | None = None,
    metric: str = "loss",
    rel_floor: float = 0.01,
    batch_sizes: ArrayLike | None = None,
    batch_scaling: str = "auto",
    min_ratio: float = 1.0,
) -> Detection | None:
    """First upward spike (robust z-score above ``z``, and at least ``min_ratio`` times
    its recent median) after ``since_step``.

    ``min_ratio`` keeps a jump that is large only relative to a very steady history from
    counting: a healthy run's gradient norm can sit many robust deviations above a
    tight median at 2x it, which is no instability.

    Only upward jumps count: a loss or gradient norm that suddenly *drops* is not an
    instability. Points at or before ``since_step`` still serve as history, so the
    supervisor can call this on a trailing buffer and only ask about the new part.

    ``batch_sizes`` (samples per step, aligned with ``values``) makes points measured on
    different batch sizes comparable, so the smaller last batch of an epoch is not taken
    for a spike (see :func:`batch_noise_factors`). ``batch_scaling`` says how: ``"value"``
    rescales every value to the usual batch size (``x * sqrt(b / b_ref)``: a gradient
    norm, whose level rises on a small batch), ``"spread"`` divides only the point's
    deviation by its larger noise (``z * sqrt(b / b_ref)``: a mean loss, whose level
    does not depend on the batch size); ``"auto"`` is ``"value"`` for ``grad_norm`` and
    ``"spread"`` otherwise. Both are the noise-dominated bound: a real spike on a small
    batch is judged at most ``sqrt(b_ref / b)`` more leniently.

    False-alarm rate: with i.i.d. Gaussian noise the robust z of a clean point follows
    roughly a Student-t whose scale is estimated from ``window`` points; at the
    defaults (window 50, z 6) that is about 1e-5 per point, i.e. fewer than one alarm
    per 20,000 steps, and a steadily *decreasing* loss lowers it further (the trailing
    median sits above the current value). Heavy-tailed minibatch noise raises it; raise
    ``z`` for such runs.
    """
    if batch_scaling == "auto":
        batch_scaling = "value" if metric == "grad_norm" else "spread"
    if batch_scaling not in ("value", "spread"):
        raise ValueError(f"detect_spike(batch_scaling={batch_scaling!r}): 'value' or 'spread'")
    x = _as_float(values)
    n = x.size
    if n == 0:
        return None
    st = _as_steps(steps, n)
    factor, ref = batch_noise_factors(batch_sizes, n)
    xs = x * factor if batch_scaling == "value" else x
    zs = robust_zscores(xs, window=window, min_history=min_history, rel_floor=rel_floor)
    if batch_scaling == "spread":
        zs = zs * factor
    with np.errstate(invalid="ignore"):
        hit = zs > z
    if since_step is not None:
        hit &= st > since_step
    found: tuple[int, float] | None = None
    for i in np.flatnonzero(hit).tolist():
        hist = xs[max(0, i - window) : i]
        hist = hist[np.isfinite(hist)]
        med = float(np.median(hist))
        if min_ratio <= 1.0 or not (med > 0 and xs[i] < min_ratio * med):
            found = (int(i), med)
            break
    if found is None:
        return None
    i, med = found
    zi = float(zs[i])
    name = "gradient norm" if metric == "grad_norm" else metric
    fi = float(factor[i])
    batch_note = ""
    numbers = {
        "index": float(i),
        "value": float(x[i]),
        "median": med,
        "z": zi,
        "z_threshold": float(z),
        "ratio_to_median": float(xs[i] / med) if med != 0 else math.inf,
        "min_ratio": float(min_ratio),
        "window": float(window),
    }
    if math.isfinite(ref):
        b = ref * fi * fi
        numbers.update({"batch_size": b, "usual_batch_size": ref})
        if abs(fi - 1.0) > 1e-9:
            batch_note = f" (a batch of {b:.0f} samples, not the usual {ref:.0f}: " + (
                f"{_fmt(float(xs[i]))} at the usual batch size)"
                if batch_scaling == "value"
                else "its noise is scaled to match)"
            )
    return Detection(
        kind=DetectionKind.SPIKE,
        step=int(st[i]),
        severity=_severity(zi / z),
        message=(
            f"The {name} jumped to {_fmt(float(x[i]))} at step {int(st[i])}{batch_note}, "
            f"{zi:.1f} robust standard deviations above its recent median {_fmt(med)}."
        ),
        numbers=numbers,
        subject=metric,
    )


# --------------------------------------------------------------------------- trend tests


@_quiet
def theil_sen_slope(x: ArrayLike, y: ArrayLike, *, seed: int = 0) -> float:
    """Theil-Sen slope: the median of the slopes between all pairs of points.

    Robust to up to ~29% outliers (its breakdown point), which is why it measures
    loss trends here instead of least squares: one spiky minibatch cannot tilt it.
    Exact (all pairs, O(n^2)) up to 400 points; beyond that the median is taken over
    200,000 pairs drawn with a fixed ``seed``, so the result stays deterministic.
    Non-finite points are dropped; pairs with equal ``x`` are skipped. Returns NaN when
    fewer than two usable points remain.
    """
    xa = _as_float(x)
    ya = _as_float(y)
    m = min(xa.size, ya.size)
    xa, ya = xa[:m], ya[:m]
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = xa.size
    if n < 2:
        return math.nan
    if n <= _THEIL_SEN_EXACT_MAX:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=_THEIL_SEN_SAMPLED_PAIRS)
        j = rng.integers(0, n, size=_THEIL_SEN_SAMPLED_PAIRS)
    dx = xa[j] - xa[i]
    keep = dx != 0
    if not keep.any():
        return math.nan
    with np.errstate(over="ignore", invalid="ignore"):
        slopes = (ya[j][keep] - ya[i][keep]) / dx[keep]
    slopes = slopes[np.isfinite(slopes)]
    if slopes.size == 0:
        return math.nan
    return float(np.median(slopes))


@_quiet
def mann_kendall(y: ArrayLike) -> tuple[float, float, float]:
    """Mann-Kendall trend test: ``(S, z, two-sided p-value)``.

    ``S = sum_{i<j} sign(y_j - y_i)``; its null variance is corrected for ties,
    ``Var(S) = [n(n-1)(2n+5) - sum_t t(t-1)(2t+5)] / 18`` over groups of ``t`` equal
    values, and ``z`` uses the usual continuity correction (``(S - sign(S)) / sd``).
    The test is rank-based, so it needs no assumption about the noise distribution
    beyond independence, which suits minibatch losses. Non-finite values are dropped;
    fewer than 3 points give ``(0, 0, 1)``.
    """
    ya = _as_float(y)
    ya = ya[np.isfinite(ya)]
    n = ya.size
    if n < 3:
        return 0.0, 0.0, 1.0
    s = 0
    rows_per_block = max(1, _MK_BLOCK_CELLS // n)
    for lo in range(0, n - 1, rows_per_block):
        hi = min(n - 1, lo + rows_per_block)
        # Row r (= lo + k) against columns lo..n-1; triu(k=1) keeps only later values.
        block = np.sign(ya[None, lo:] - ya[lo:hi, None])
        s += int(np.triu(block, k=1).sum())
    _, counts = np.unique(ya, return_counts=True)
    t = counts[counts > 1].astype(np.float64)
    var = (n * (n - 1) * (2 * n + 5) - float(np.sum(t * (t - 1) * (2 * t + 5)))) / 18.0
    if var <= 0:
        return float(s), 0.0, 1.0
    if s > 0:
        z = (s - 1) / math.sqrt(var)
    elif s < 0:
        z = (s + 1) / math.sqrt(var)
    else:
        z = 0.0
    p = min(1.0, 2.0 * normal_sf(abs(z)))
    return float(s), float(z), float(p)


@_quiet
def detect_plateau(
    steps: ArrayLike,
    losses: ArrayLike,
    window: int = 200,
    alpha: float = 0.01,
    min_rel_slope: float = 0.02,
) -> Detection | None:
    """The loss has stopped improving over its last ``window`` finite points.

    Plateau means both (1) Mann-Kendall finds no significant downward trend
    (not ``z < 0 and p < alpha``) and (2) the relative change the Theil-Sen slope
    implies over the window, ``|slope| * (steps spanned) / |median loss|``, is below
    ``min_rel_slope``. Condition (1) alone would fire on any slow-but-real descent
    hidden in noise; condition (2) alone would fire on a fast descent measured by a
    noisy slope. Steps are used for the slope, so sparse logging is handled.

    Error rates (i.i.d. noise with relative standard deviation ``s``, window ``W``; the
    Theil-Sen estimate of the relative change has standard error
    ``SE ~= 1.05 * s * sqrt(12 / W)``):

    * false alarm on a loss that truly drops by a fraction ``D > min_rel_slope`` per
      window: at most ``Phi(-(D - min_rel_slope) / SE)`` per check, before the
      Mann-Kendall condition lowers it further. At the defaults (W=200,
      min_rel_slope=0.02) and s=5%: D=10% -> below 1e-9; D=5% -> below 1%.
    * miss on a truly flat loss: at most ``alpha / 2 + 2 * Phi(-min_rel_slope / SE)``
      per check (0.5% + 0.01% at s=2%; 0.5% + 12% at s=5%, which the next check,
      one window later, usually catches).
    """
    y = _as_float(losses)
    n = y.size
    if n == 0 or window < 3:
        return None
    st = _as_steps(steps, n).astype(np.float64)
    ok = np.isfinite(y)
    ys, xs = y[ok], st[ok]
    if ys.size < window:
        return None
    ys, xs = ys[-window:], xs[-window:]
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    slope = theil_sen_slope(xs, ys)
    if not math.isfinite(slope):
        return None
    s, zmk, p = mann_kendall(ys)
    span = float(xs[-1] - xs[0])
    level = float(np.median(ys))
    rel = abs(slope) * span / max(abs(level), 1e-12)
    if (zmk < 0 and p < alpha) or rel >= min_rel_slope:
        return None
    return Detection(
        kind=DetectionKind.PLATEAU,
        step=int(xs[-1]),
        severity=_severity(min_rel_slope / max(rel, 1e-12)),
        message=(
            f"The loss has plateaued around {_fmt(level)}: over the last {window} points "
            f"(steps {int(xs[0])}-{int(xs[-1])}) it changed by {100 * rel:.2g}% and shows no "
            f"significant downward trend (Mann-Kendall p={p:.2g})."
        ),
        numbers={
            "slope": slope,
            "rel_change": rel,
            "min_rel_slope": float(min_rel_slope),
            "level": level,
            "mk_s": s,
            "mk_z": zmk,
            "p_value": p,
            "alpha": float(alpha),
            "window_start_step": float(xs[0]),
            "window": float(window),
        },
        subject="loss",
    )


# --------------------------------------------------------------------------- drift


@_quiet
def page_hinkley(
    values: ArrayLike,
    delta: float,
    lambda_: float,
    *,
    direction: str = "up",
    min_instances: int = 30,
) -> int | None:
    """Page-Hinkley change detector: index of the first alarm, or ``None``.

    For an upward change it accumulates ``m_t = sum_{i<=t} (x_i - mean_i - delta)``
    (``mean_i`` the running mean) and alarms when ``m_t - min_{s<=t} m_s > lambda_``;
    ``delta`` is the change magnitude tolerated as noise, ``lambda_`` trades detection
    delay for false alarms. ``direction`` is ``"up"``, ``"down"`` or ``"both"``. No
    alarm is raised before ``min_instances`` values, while the running mean is still
    unreliable. Non-finite values are skipped (they do not move the statistic).
    """
    if direction not in ("up", "down", "both"):
        raise ValueError(f"page_hinkley(direction={direction!r}): must be 'up', 'down' or 'both'")
    x = _as_float(values)
    idx = np.flatnonzero(np.isfinite(x))
    if idx.size == 0:
        return None
    xs = x[idx]
    running_mean = np.cumsum(xs) / np.arange(1, xs.size + 1)
    dev = xs - running_mean
    first: int | None = None
    signs = {"up": (1.0,), "down": (-1.0,), "both": (1.0, -1.0)}[direction]
    for sign in signs:
        m = np.cumsum(sign * dev - delta)
        stat = m - np.minimum.accumulate(m)
        hit = stat > lambda_
        hit[: max(0, min_instances - 1)] = False
        where = np.flatnonzero(hit)
        if where.size:
            k = int(idx[where[0]])
            first = k if first is None else min(first, k)
    return first


@_quiet
def detect_drift(
    steps: ArrayLike,
    values: ArrayLike,
    window: int = 1000,
    delta_sigma: float = 0.5,
    lambda_sigma: float = 10.0,
    *,
    direction: str = "up",
    metric: str = "loss",
    min_instances: int = 30,
) -> Detection | None:
    """Sustained mean shift in the last ``window`` values (Page-Hinkley).

    The series is first divided by a robust noise scale, ``1.4826 * MAD(diff(x)) /
    sqrt(2)``: first differences cancel slow trends and level shifts, so the scale
    reflects step-to-step noise only and thresholds can be given in noise units.
    With ``delta = 0.5 sigma`` and ``lambda = 10 sigma`` the detector behaves like a
    one-sided CUSUM with k=0.5, h=10: on Gaussian noise about one false alarm per
    10^5 points (measured: 10 per 10^6), and a shift of 1 sigma (2 sigma) is caught
    after a median of about 17 (6) points. Direction ``"up"`` (default) watches for a loss that gets
    worse; a steadily decreasing loss never moves the upward statistic.
    """
    x = _as_float(values)
    n = x.size
    if n == 0:
        return None
    st = _as_steps(steps, n)
    lo = max(0, n - window)
    seg, seg_steps = x[lo:], st[lo:]
    finite = seg[np.isfinite(seg)]
    if finite.size < max(3, min_instances):
        return None
    d = np.diff(finite)
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
    if not math.isfinite(sigma) or sigma <= 0:
        sigma = max(float(np.std(finite)), 1e-12)
    norm = seg / sigma
    i = page_hinkley(
        norm, delta_sigma, lambda_sigma, direction=direction, min_instances=min_instances
    )
    if i is None:
        return None
    before = seg[:i][np.isfinite(seg[:i])]
    recent = seg[max(0, i - 10) : i + 1]
    recent = recent[np.isfinite(recent)]
    mean_before = float(np.mean(before)) if before.size else math.nan
    mean_recent = float(np.mean(recent)) if recent.size else math.nan
    shift = mean_recent - mean_before
    up = shift >= 0 if direction == "both" else direction == "up"
    return Detection(
        kind=DetectionKind.DRIFT,
        step=int(seg_steps[i]),
        severity=_severity(abs(shift) / (sigma * max(delta_sigma, 1e-12) * 2)),
        message=(
            f"The {metric} drifted {'up' if up else 'down'}: around step {int(seg_steps[i])} it "
            f"averages {_fmt(mean_recent)} against {_fmt(mean_before)} before "
            f"(Page-Hinkley, noise scale {_fmt(sigma)})."
        ),
        numbers={
            "index": float(lo + i),
            "mean_before": mean_before,
            "mean_recent": mean_recent,
            "shift_sigmas": shift / sigma,
            "sigma": sigma,
            "direction": 1.0 if up else -1.0,
            "delta_sigma": float(delta_sigma),
            "lambda_sigma": float(lambda_sigma),
        },
        subject=metric,
    )


# --------------------------------------------------------------------------- per-sample


@_quiet
def persistent_tail_mask(
    per_sample_losses_by_epoch: Sequence[ArrayLike], q: float = 0.85, persist_epochs: int = 2
) -> NDArray[np.bool_]:
    """Samples in the top ``1 - q`` loss tail in *each* of the last ``persist_epochs`` epochs.

    Arrays are indexed by sample id; NaN means "not seen that epoch", and an unseen
    sample is not counted as in the tail (persistence needs evidence every epoch).
    Arrays of different lengths are padded with NaN. The tail threshold is the
    ``q``-quantile of each epoch's seen losses, so a global loss decrease between
    epochs does not push everyone out of the tail.
    """
    arrays = [_as_float(a) for a in per_sample_losses_by_epoch]
    if persist_epochs < 1 or len(arrays) < persist_epochs:
        return np.zeros(max((a.size for a in arrays), default=0), dtype=bool)
    last = arrays[-persist_epochs:]
    n = max(a.size for a in last)
    mask = np.ones(n, dtype=bool)
    for a in last:
        full = np.full(n, np.nan)
        full[: a.size] = a
        finite = np.isfinite(full)
        if not finite.any():
            return np.zeros(n, dtype=bool)
        thr = float(np.quantile(full[finite], q))
        with np.errstate(invalid="ignore"):
            mask &= finite & (full >= thr)
    return mask


@_quiet
def detect_high_loss_tail(
    per_sample_losses_by_epoch: Sequence[ArrayLike],
    q: float = 0.85,
    persist_epochs: int = 2,
    *,
    min_persistence: float = 0.4,
    min_lift: float = 1.5,
    min_count: int = 8,
    step: int = 0,
) -> Detection | None:
    """A structural hard-sample tail: the same samples stay in the top loss quantile.

    If tail membership were random from epoch to epoch, only ``(1-q)^persist_epochs``
    of the samples would be in the tail every time; if the tail is a stable regime,
    ``1-q`` would be. ``persistence = fraction / (1-q)`` (the share of the latest tail
    that was in every earlier tail) places the observation between those: chance gives
    ``(1-q)^(persist_epochs-1)`` (0.15 at the defaults), a perfectly stable tail 1, and
    losses whose ranks correlate ~0.8 between epochs about 0.6. The detector fires when
    it is at least ``min_persistence``, the tail's
    mean loss is at least ``min_lift`` times the latest epoch's median, and at least
    ``min_count`` samples are involved: that is the evidence a specialist fork on
    ``quantile:q:1.0`` is worth its budget. ``step`` is stamped on the detection.
    """
    if not 0.0 < q < 1.0:
        return None
    mask = persistent_tail_mask(per_sample_losses_by_epoch, q, persist_epochs)
    if mask.size == 0 or not mask.any():
        return None
    last_arrays = [_as_float(a) for a in per_sample_losses_by_epoch[-persist_epochs:]]
    n = mask.size
    seen_all = np.ones(n, dtype=bool)
    for a in last_arrays:
        full = np.full(n, np.nan)
        full[: a.size] = a
        seen_all &= np.isfinite(full)
    count = int(mask.sum())
    denom = int(seen_all.sum())
    if denom == 0:
        return None
    fraction = count / denom
    persistence = fraction / (1.0 - q)
    chance = (1.0 - q) ** (persist_epochs - 1)
    latest = np.full(n, np.nan)
    latest[: last_arrays[-1].size] = last_arrays[-1]
    median = float(np.nanmedian(latest))
    tail_mean = float(np.mean(latest[mask]))
    lift = tail_mean / median if median > 0 else math.inf
    if count < min_count or persistence < min_persistence or lift < min_lift:
        return None
    return Detection(
        kind=DetectionKind.HIGH_LOSS_TAIL,
        step=int(step),
        severity=_severity(
            min(persistence / max(min_persistence, 1e-12), lift / max(min_lift, 1e-12))
        ),
        message=(
            f"{count} samples ({100 * fraction:.1f}% of those seen) stayed in the top "
            f"{100 * (1 - q):.0f}% loss tail for the last {persist_epochs} epochs; their mean "
            f"loss {_fmt(tail_mean)} is {lift:.1f}x the median."
        ),
        numbers={
            "fraction": fraction,
            "count": float(count),
            "seen": float(denom),
            "q": float(q),
            "persistence": persistence,
            "chance_persistence": chance,
            "tail_mean": tail_mean,
            "median": median,
            "lift": lift,
            "persist_epochs": float(persist_epochs),
        },
        subject=f"quantile:{q:g}:1.0",
    )


@_quiet
def detect_residual_cluster(
    labels: ArrayLike,
    losses: ArrayLike,
    *,
    min_lift: float = 1.5,
    min_frac: float = 0.01,
    min_count: int = 8,
    step: int = 0,
) -> Detection | None:
    """The cluster of samples whose mean loss stands out most from the overall mean.

    ``labels`` are cluster ids per sample (negative = unassigned, e.g. k-means noise);
    ``losses`` are the per-sample losses on the same ids (NaN = unseen). Clustering
    itself happens elsewhere (k-means with auto-k over residual features); this only
    judges the result, so it stays cheap and testable. Fires for the cluster with the
    highest ``lift = cluster mean / overall mean`` that has at least ``min_count``
    samples and ``min_frac`` of the seen ones, when the lift is at least ``min_lift``.
    """
    lab = np.asarray(labels).reshape(-1)
    loss = _as_float(losses)
    m = min(lab.size, loss.size)
    if m == 0:
        return None
    lab, loss = lab[:m], loss[:m]
    try:
        lab_f = lab.astype(np.float64)
    except (TypeError, ValueError):
        return None
    ok = np.isfinite(loss) & np.isfinite(lab_f)
    if not ok.any():
        return None
    lab_i = lab_f[ok].astype(np.int64)
    loss = loss[ok]
    overall = float(np.mean(loss))
    if not math.isfinite(overall) or overall <= 0:
        return None
    best: tuple[float, int, int, float] | None = None
    clusters = np.unique(lab_i[lab_i >= 0])
    for c in clusters:
        sel = lab_i == c
        size = int(sel.sum())
        if size < min_count or size / loss.size < min_frac:
            continue
        mean = float(np.mean(loss[sel]))
        lift = mean / overall
        if best is None or lift > best[0]:
            best = (lift, int(c), size, mean)
    if best is None or best[0] < min_lift:
        return None
    lift, c, size, mean = best
    return Detection(
        kind=DetectionKind.RESIDUAL_CLUSTER,
        step=int(step),
        severity=_severity(lift / max(min_lift, 1e-12)),
        message=(
            f"Cluster {c} ({size} samples, {100 * size / loss.size:.1f}%) has mean loss "
            f"{_fmt(mean)}, {lift:.1f}x the overall {_fmt(overall)}."
        ),
        numbers={
            "cluster": float(c),
            "lift": lift,
            "size": float(size),
            "fraction": size / loss.size,
            "cluster_mean": mean,
            "overall_mean": overall,
            "n_clusters": float(clusters.size),
        },
        subject=str(c),
    )


# --------------------------------------------------------------------------- slices


@_quiet
def detect_weak_slices(
    slice_metrics: Mapping[str, Sequence[float]],
    overall: Sequence[float],
    margin: float = 0.10,
    persist: int = 3,
    *,
    eval_steps: Sequence[int] | None = None,
    rising: bool = True,
) -> Detection | None:
    """Validation slices whose loss stays worse than the overall loss by a margin, or rises
    while the overall loss does not.

    A slice is weak when, in each of the last ``persist`` evaluations, its loss exceeds
    the overall loss by more than ``margin`` (relative: 0.10 = 10% worse). With
    ``rising``, a slice is also weak when its loss went up at each of the last ``persist``
    evaluations (needs ``persist + 1`` of them), by more than ``margin`` of the overall
    loss in all, while the overall loss did not, and it ends worse than the overall:
    training is leaving that slice behind. On pure noise (4 slices, 3% noise, margin 0.10,
    persist 3) about 0.2% of evaluations raise an alarm (tests/unit/test_detectors.py). Requiring
    persistence filters out evaluation noise on small slices. Series are aligned at
    their ends (the latest evaluation is the last entry of every list); a NaN breaks
    persistence. The detection's ``subject`` is the worst slice (largest mean relative
    gap); ``numbers`` holds ``gap:<slice>`` for every weak slice, ``rising:<slice>`` (1)
    for those caught by the trend, and ``n_weak``. ``eval_steps`` (aligned with
    ``overall``) gives the step to stamp; without it the evaluation index is used.
    """
    ov = _as_float(overall)
    if persist < 1 or ov.size < persist:
        return None
    ov_last = ov[-persist:]
    if not np.isfinite(ov_last).all():
        return None
    gaps: dict[str, float] = {}
    risers: set[str] = set()
    ov_trend = ov[-(persist + 1) :]
    ov_flat = ov_trend.size == persist + 1 and bool(
        np.isfinite(ov_trend).all() and ov_trend[-1] <= ov_trend[0]
    )
    for name, vals in slice_metrics.items():
        v = _as_float(vals)
        if v.size < persist:
            continue
        last = v[-persist:]
        if not np.isfinite(last).all():
            continue
        rel = (last - ov_last) / np.maximum(np.abs(ov_last), 1e-12)
        if bool(np.all(rel > margin)):
            gaps[str(name)] = float(np.mean(rel))
        elif rising and ov_flat and v.size >= persist + 1:
            trend = v[-(persist + 1) :]
            rise = (trend[-1] - trend[0]) / max(abs(float(ov_last[-1])), 1e-12)
            if (
                np.isfinite(trend).all()
                and bool(np.all(np.diff(trend) > 0))
                and rel[-1] > 0
                and rise > margin
            ):
                gaps[str(name)] = float(np.mean(rel))
                risers.add(str(name))
    if not gaps:
        return None
    worst = max(sorted(gaps), key=lambda k: gaps[k])
    g = gaps[worst]
    if eval_steps is not None and len(eval_steps) > 0:
        step = int(eval_steps[-1])
    else:
        step = int(ov.size - 1)
    others = len(gaps) - 1
    numbers: dict[str, float] = {f"gap:{k}": v for k, v in gaps.items()}
    numbers.update({f"rising:{k}": 1.0 for k in risers})
    numbers.update(
        {
            "n_weak": float(len(gaps)),
            "worst_gap": g,
            "margin": float(margin),
            "persist": float(persist),
            "slice_loss": float(_as_float(slice_metrics[worst])[-1]),
            "overall_loss": float(ov[-1]),
        }
    )
    return Detection(
        kind=DetectionKind.WEAK_SLICE,
        step=step,
        severity=_severity(g / max(margin, 1e-12)),
        message=(
            (
                f"Slice '{worst}' rose at each of the last {persist} evaluations while the "
                f"overall validation loss did not (now {100 * g:.0f}% worse on average)"
                if worst in risers
                else f"Slice '{worst}' has been {100 * g:.0f}% worse than the overall validation "
                f"loss for {persist} evaluations in a row"
            )
            + (f" ({others} other slice{'s' if others > 1 else ''} also weak)." if others else ".")
        ),
        numbers=numbers,
        subject=worst,
    )
