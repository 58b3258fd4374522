"""Mid-run health checks: numerics, gradients, activations, data, throughput, determinism.

The training worker calls these between two steps when the supervisor sends a `health`
command. Each check returns a `Verdict`: ok / warn / fail, a plain-language hint that
says what is wrong and what to do about it, and the numbers behind it.

The hard rule is that a check leaves training exactly where it found it: OnTheFly
promises that a run reproduces bit for bit whatever the user clicks, and a health check
is a click. So:

* forward passes go through `torch.func.functional_call` with *cloned* buffers, so the
  BatchNorm running statistics and `num_batches_tracked` that a train-mode forward
  updates land on throw-away copies, while the parameters are the live ones (no copy
  of the weights, no extra memory for them);
* gradients come from `torch.autograd.grad`, which returns them instead of
  accumulating into `.grad` (and never runs the post-accumulate hooks that DDP or an
  optimizer-in-backward hang on the parameters);
* the train/eval mode is never toggled: the checks see the model the way the training
  step sees it (dropout on, BatchNorm on batch statistics);
* every RNG (python, numpy, torch CPU, CUDA) is saved and restored around a check, and
  seeded inside, so asking twice gives the same answer;
* timings and replays run on deep copies of the model and optimizer, never the live
  ones;
* checks take their own batches (`draw_batches` reads them through a fresh, private
  loader), never the training iterator.

State that a model keeps in plain Python attributes (a counter in `self`) is outside
what PyTorch can see, so it is not protected.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset, TensorDataset

from onthefly_worker.data import batch_len, dataset_size, split_batch, to_device
from onthefly_worker.losses import PerSampleLoss

VerdictKind = Literal["ok", "warn", "fail"]
NumberValue = float | int | str | list[Any]
Batch = tuple[Any, Any]
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

VERDICTS: tuple[VerdictKind, ...] = ("ok", "warn", "fail")
_RANK: dict[str, int] = {"ok": 0, "warn": 1, "fail": 2}
_SEED = 0x0F1F  # fixed, so the same check on the same state gives the same numbers
_NAMED = 5  # how many layers a hint names before "and N more"


# -- the verdict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of one health check, as the dashboard and the CLI show it."""

    check: str
    """Which check: numerics, gradients, activations, data, throughput or determinism."""
    verdict: VerdictKind
    """ok: nothing to do; warn: worth a look; fail: training is (or will be) broken."""
    hint: str
    """What was found and what to do, in plain language."""
    numbers: dict[str, NumberValue] = field(default_factory=dict)
    """The measurements behind the verdict (JSON-serialisable through `to_dict`)."""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")
        if not self.check:
            raise ValueError("a verdict needs the name of its check")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only: NaN/Inf become the strings "nan"/"inf"/"-inf".

        json.dumps would otherwise write bare NaN, which JavaScript's JSON.parse (the
        dashboard) rejects.
        """
        return {
            "check": self.check,
            "verdict": self.verdict,
            "hint": self.hint,
            "numbers": {str(k): _jsonable(v) for k, v in self.numbers.items()},
        }


def worst(verdicts: Sequence[Verdict]) -> VerdictKind:
    """The most severe verdict of a report ("ok" for an empty one)."""
    out: VerdictKind = "ok"
    for v in verdicts:
        if _RANK[v.verdict] > _RANK[out]:
            out = v.verdict
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _jsonable(v.detach().cpu().tolist())
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(v, str) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _names(items: Sequence[str], limit: int = _NAMED) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100.0 * x:.2g}%"


# -- isolation -------------------------------------------------------------------------------


@contextlib.contextmanager
def _rng_sandbox(seed: int | None = _SEED) -> Iterator[None]:
    """Save every RNG, optionally seed them, and restore them on the way out.

    CUDA states are saved only when CUDA is already initialised; then seeding it is not
    a lazy call that could land later, on a context the check never saw.
    """
    py = random.getstate()
    npst = np.random.get_state()
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            if cuda is not None:
                torch.cuda.manual_seed_all(seed)
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel or torch.compile.

    DDP's forward expects a backward that all-reduces; a compiled graph hides the leaf
    modules from forward hooks. The eager module shares the same parameters and buffers.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = model.module
        assert isinstance(inner, nn.Module)
        return _unwrap(inner)
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return _unwrap(orig) if isinstance(orig, nn.Module) else model


def _as_loss(loss: Any) -> PerSampleLoss:
    return loss if isinstance(loss, PerSampleLoss) else PerSampleLoss(loss)


class _Sandbox:
    """Runs the live model with its parameters but on cloned buffers (see module docstring)."""

    def __init__(self, model: nn.Module, autocast: Autocast | None) -> None:
        self.model = _unwrap(model)
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self._autocast = autocast

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self._autocast() if self._autocast is not None else contextlib.nullcontext()

    def forward(self, x: Any) -> Any:
        return functional_call(self.model, self.buffers, (x,))


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _apply_loss(loss: PerSampleLoss, out: Any, y: Any, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch_len(x) or batch_len(y) or batch_len(out)
    return loss(out, y, n)


def _grads(
    total: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """d total / d params without touching `.grad` (autograd.grad returns, never accumulates)."""
    if not params or not total.requires_grad:
        return [None] * len(params)
    got = torch.autograd.grad(total, list(params), allow_unused=True, retain_graph=retain_graph)
    return [None if g is None else g.detach() for g in got]


def _amp_scale(scaler: Any) -> float:
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    return float(scaler.get_scale())


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _floats(ts: Sequence[torch.Tensor]) -> list[float]:
    """Many scalars to host with one sync when they share a device."""
    if not ts:
        return []
    try:
        return [float(v) for v in torch.stack([t.float() for t in ts]).tolist()]
    except RuntimeError:  # scalars on several devices (model parallel)
        return [float(t) for t in ts]


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(t.detach())).sum()


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n or "(model)", m) for n, m in model.named_modules() if next(m.children(), None) is None
    ]


def _require_batches(batches: Sequence[Batch], check: str) -> None:
    if not batches:
        raise ValueError(f"the {check} check needs at least one (inputs, target) batch")


# -- numerics --------------------------------------------------------------------------------


class _NonfiniteHooks:
    """Forward hooks on every leaf module: which outputs hold NaN/Inf, and was the input clean.

    Counts stay on the device during the forward; `end_batch` moves them to the host
    with one sync and remembers the first module, in call order, whose output went bad.
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[str, int] = {}
        self.first: tuple[str, bool, int] | None = None  # (module, input was finite, batch)
        self._calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._handles = [
            m.register_forward_hook(self._hook(name)) for name, m in _leaf_modules(model)
        ]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, args: Any, output: Any) -> None:
            outs = [t for t in _tensors(output) if t.is_floating_point() or t.is_complex()]
            if not outs:
                return
            bad_out = sum((_nonfinite(t) for t in outs), torch.zeros((), dtype=torch.int64))
            ins = [t for t in _tensors(args) if t.is_floating_point() or t.is_complex()]
            bad_in = sum((_nonfinite(t).to(bad_out.device) for t in ins), torch.zeros_like(bad_out))
            self._calls.append((name, bad_out, bad_in))

        return hook

    def end_batch(self, batch: int) -> None:
        if not self._calls:
            return
        flat = _floats([c[1] for c in self._calls] + [c[2] for c in self._calls])
        k = len(self._calls)
        for i, (name, _, _) in enumerate(self._calls):
            bad_out, bad_in = int(flat[i]), int(flat[k + i])
            if bad_out:
                self.counts[name] = self.counts.get(name, 0) + bad_out
                if self.first is None:
                    self.first = (name, bad_in == 0, batch)
        self._calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _scaler_report(
    scaler: Any, scale_history: Sequence[float] | None
) -> tuple[dict[str, NumberValue], list[str]]:
    """The AMP loss scale and what it says about fp16 overflow.

    GradScaler forgets its found-inf flags at `update()`, so between steps the only
    evidence is the scale itself: it halves on every overflow. A history of scales
    (one per step) gives the overflow count; without one, a growth tracker above zero
    proves the last step was clean, and zero is ambiguous (an overflow or a scheduled
    growth).
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return {"amp_scaler": "none"}, []
    scale = float(scaler.get_scale())
    state = scaler.state_dict()
    tracker = int(state.get("_growth_tracker", 0))
    numbers: dict[str, NumberValue] = {
        "amp_scaler": "on",
        "amp_scale": scale,
        "amp_growth_tracker": tracker,
    }
    pending: bool | None = None
    per_opt = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(per_opt, Mapping):
        flags = [
            t
            for st in per_opt.values()
            if isinstance(st, Mapping)
            for t in dict(st.get("found_inf_per_device", {})).values()
            if isinstance(t, torch.Tensor)
        ]
        if flags:
            pending = any(v > 0 for v in _floats(flags))
    hist = [float(s) for s in scale_history] if scale_history else []
    overflows = sum(1 for a, b in zip(hist, hist[1:], strict=False) if b < a)
    last: bool | str
    if pending is not None:
        last = pending
    elif len(hist) >= 2:
        last = hist[-1] < hist[-2]
    elif tracker > 0:
        last = False
    else:
        last = "unknown"
    numbers["amp_last_step_overflowed"] = last
    if hist:
        numbers["amp_overflow_steps"] = overflows
        numbers["amp_steps_seen"] = max(len(hist) - 1, 0)
    notes: list[str] = []
    if scale < 1.0:
        notes.append(
            f"the AMP loss scale has fallen to {scale:.3g}: fp16 gradients overflowed again and "
            "again, and at this scale small gradients underflow to zero. Look for a layer that "
            "overflows in fp16 (large activations, exp/softmax without max-subtraction), lower "
            "the learning rate, or train in bfloat16"
        )
    if len(hist) >= 20 and overflows / (len(hist) - 1) > 0.05:
        notes.append(
            f"{overflows} of the last {len(hist) - 1} steps overflowed in fp16 and were skipped "
            "by the GradScaler; a few are normal, this many means real updates are being lost"
        )
    return numbers, notes


def check_numerics(
    model: nn.Module,
    loss: PerSampleLoss | Any,
    batches: Sequence[Batch],
    scaler: Any = None,
    *,
    autocast: Autocast | None = None,
    scale_history: Sequence[float] | None = None,
) -> Verdict:
    """NaN/Inf in parameters, buffers, gradients, activations and the loss; AMP overflow.

    Names the first leaf module (in call order) whose output is non-finite and whether
    its input was still finite, because that is where the overflow starts; everything
    after it only propagates the NaN.
    """
    _require_batches(batches, "numerics")
    model = _unwrap(model)
    ploss = _as_loss(loss)
    params = _trainable(model)
    named = list(model.named_parameters())
    buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    live = [(n, p.grad) for n, p in named if p.grad is not None]
    counts = _floats(
        [_nonfinite(p) for _, p in named]
        + [_nonfinite(b) for _, b in buffers]
        + [_nonfinite(g) for _, g in live]
    )
    n_p, n_pb = len(named), len(named) + len(buffers)
    bad_params = [n for (n, _), c in zip(named, counts[:n_p], strict=True) if c]
    bad_buffers = [n for (n, _), c in zip(buffers, counts[n_p:n_pb], strict=True) if c]
    bad_live = [n for (n, _), c in zip(live, counts[n_pb:], strict=True) if c]

    bad_grads: dict[str, int] = {}
    bad_loss_batches: list[int] = []
    bad_samples = 0
    samples = 0
    losses: list[float] = []
    with _rng_sandbox(), torch.enable_grad():
        sb = _Sandbox(model, autocast)
        hooks = _NonfiniteHooks(sb.model)
        try:
            for i, (x, y) in enumerate(batches):
                with sb.autocast():
                    out = sb.forward(x)
                    total, per = _apply_loss(ploss, out, y, x)
                hooks.end_batch(i)
                if hooks.first is None:
                    bad_out = _floats([_nonfinite(t) for t in _tensors(out)])
                    if any(bad_out):
                        hooks.first = ("(the model's forward, outside any leaf module)", True, i)
                grads = _grads(total, [p for _, p in params])
                g_named = [(n, g) for (n, _), g in zip(params, grads, strict=True) if g is not None]
                vals = _floats(
                    [total.detach(), _nonfinite(per)] + [_nonfinite(g) for _, g in g_named]
                )
                losses.append(vals[0])
                if not math.isfinite(vals[0]):
                    bad_loss_batches.append(i)
                bad_samples += int(vals[1])
                samples += int(per.shape[0])
                for (n, _), c in zip(g_named, vals[2:], strict=True):
                    if c:
                        bad_grads[n] = bad_grads.get(n, 0) + int(c)
        finally:
            hooks.remove()

    amp, amp_notes = _scaler_report(scaler, scale_history)
    numbers: dict[str, NumberValue] = {
        "batches": len(batches),
        "samples": samples,
        "loss_per_batch": losses,
        "nonfinite_params": bad_params,
        "nonfinite_buffers": bad_buffers,
        "nonfinite_live_grads": bad_live,
        "nonfinite_grads": sorted(bad_grads),
        "nonfinite_activation_layers": sorted(hooks.counts),
        "first_nonfinite_activation": hooks.first[0] if hooks.first else "",
        "nonfinite_loss_batches": bad_loss_batches,
        "nonfinite_sample_losses": bad_samples,
        **amp,
    }
    if bad_params or bad_buffers:
        what = _names(bad_params + bad_buffers)
        return Verdict(
            "numerics",
            "fail",
            f"the weights themselves hold NaN/Inf ({what}): every prediction from here on is "
            "garbage and training cannot recover. Restore the last good checkpoint, then lower "
            "the learning rate or enable grad_clip so it does not happen again.",
            numbers,
        )
    if hooks.first is not None:
        name, clean_input, batch = hooks.first
        where = (
            f"layer '{name}' turns a finite input into NaN/Inf"
            if clean_input
            else f"the first NaN/Inf appears at the output of '{name}'"
        )
        return Verdict(
            "numerics",
            "fail",
            f"the forward pass produces NaN/Inf (health batch {batch}): {where}. Typical causes: "
            "an overflow (exp, large activations, division by a tiny number, log of 0) or, "
            "under fp16 autocast, a value above 65504. Normalise the inputs, lower the "
            "learning rate, or add an epsilon / clamp in that layer.",
            numbers,
        )
    if bad_loss_batches or bad_samples:
        return Verdict(
            "numerics",
            "fail",
            f"the model's outputs are finite but the loss is not ({bad_samples} of {samples} "
            "samples): check the targets (NaN labels, a class index outside the output range) "
            "and the loss itself (log of 0, division by a zero count).",
            numbers,
        )
    if bad_grads or bad_live:
        where = (
            f"the gradients of {_names(sorted(bad_grads))} hold NaN/Inf"
            if bad_grads
            else f"the gradients left by the last training step in {_names(bad_live)} hold NaN/Inf"
        )
        return Verdict(
            "numerics",
            "fail",
            f"the loss is finite but {where}: the backward pass overflows (often a "
            "sqrt/norm/pow at 0 or an fp16 overflow). Enable grad_clip, add an epsilon inside "
            "sqrt/norm, or lower the learning rate.",
            numbers,
        )
    if amp_notes:
        return Verdict("numerics", "warn", "; ".join(amp_notes) + ".", numbers)
    return Verdict(
        "numerics",
        "ok",
        f"no NaN or Inf in the weights, activations, loss or gradients on {samples} samples.",
        numbers,
    )


# -- gradients -------------------------------------------------------------------------------


def check_gradients(
    model: nn.Module,
    loss: PerSampleLoss | Any,
    batches: Sequence[Batch],
    *,
    autocast: Autocast | None = None,
    scaler: Any = None,
    vanish_ratio: float = 1e-7,
    explode_ratio: float = 1e3,
    explode_abs: float = 1e4,
    max_layers: int = 256,
) -> Verdict:
    """Per-parameter gradient norms of the mean loss over the batches, against the weight norm.

    The ratio ‖grad‖/‖weight‖ is what one optimizer step changes relative to what the
    layer holds: below 1e-7 the layer has stopped learning, above 1e3 a single step
    throws its weights away. The gradient is that of the user's loss before grad_clip,
    i.e. what the optimizer would see unclipped. With an enabled GradScaler the backward
    runs at its current loss scale and is unscaled afterwards, as in training, so fp16
    gradients that only survive thanks to the scale are not reported as vanishing.
    """
    _require_batches(batches, "gradients")
    model = _unwrap(model)
    ploss = _as_loss(loss)
    params = _trainable(model)
    sums: list[torch.Tensor | None] = [None] * len(params)
    scale = _amp_scale(scaler)
    tensors = [p for _, p in params]
    with _rng_sandbox(), torch.enable_grad():
        sb = _Sandbox(model, autocast)
        for x, y in batches:
            with sb.autocast():
                out = sb.forward(x)
                total, _ = _apply_loss(ploss, out, y, x)
            used_scale = scale
            grads = _grads(total * scale, tensors, retain_graph=True) if scale != 1.0 else []
            if scale != 1.0 and not all(
                bool(torch.isfinite(g).all()) for g in grads if g is not None
            ):
                used_scale = 1.0  # this scale overflows now; the GradScaler would back off
            if used_scale == 1.0:
                grads = _grads(total, tensors)
            for i, g in enumerate(grads):
                if g is not None:
                    g32 = g.float() / used_scale
                    prev = sums[i]
                    sums[i] = g32 if prev is None else prev + g32
    nb = len(batches)
    used = [(n, p, s / nb) for (n, p), s in zip(params, sums, strict=True) if s is not None]
    unused = [n for (n, _), s in zip(params, sums, strict=True) if s is None]
    norms = _floats(
        [torch.linalg.vector_norm(g) for _, _, g in used]
        + [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for _, p, _ in used]
    )
    k = len(used)
    rows: list[dict[str, Any]] = []
    exploding: list[tuple[str, float, float]] = []  # (name, ratio or nan, grad norm)
    vanishing: list[tuple[str, float]] = []
    nonfinite: list[str] = []
    for i, (name, _, _) in enumerate(used):
        gn, pn = norms[i], norms[k + i]
        ratio = gn / pn if pn > 0 else math.nan
        rows.append(
            {"name": name, "grad_norm": gn, "param_norm": pn, "ratio": ratio if pn > 0 else "n/a"}
        )
        if not math.isfinite(gn):
            nonfinite.append(name)
        elif gn > explode_abs or (pn > 0 and ratio > explode_ratio):
            exploding.append((name, ratio, gn))
        elif gn == 0 or (pn > 0 and ratio < vanish_ratio):
            vanishing.append((name, ratio if pn > 0 else 0.0))
    # A bias right before a BatchNorm cannot learn: the normalisation subtracts any
    # constant shift, so its gradient is zero by construction, not a training problem.
    cancelled = _biases_before_batchnorm(model) & {n for n, _ in vanishing}
    vanishing = [v for v in vanishing if v[0] not in cancelled]
    flagged = {n for n, _, _ in exploding} | {n for n, _ in vanishing} | set(nonfinite)
    rows.sort(key=lambda r: r["name"] not in flagged)  # flagged first, model order within
    total_norm = math.sqrt(sum(gn * gn for gn in norms[:k])) if k else 0.0
    exploding.sort(key=lambda e: -(e[1] if math.isfinite(e[1]) else e[2]))
    vanishing.sort(key=lambda e: e[1])
    numbers: dict[str, NumberValue] = {
        "batches": nb,
        "parameters": len(params),
        "total_grad_norm": total_norm,
        "exploding": [n for n, _, _ in exploding],
        "vanishing": [n for n, _ in vanishing],
        "nonfinite": nonfinite,
        "unused": unused,
        "bias_before_batchnorm": sorted(cancelled),
        "layers": rows[:max_layers],
        "layers_left_out": max(len(rows) - max_layers, 0),
    }
    if nonfinite:
        return Verdict(
            "gradients",
            "fail",
            f"the gradients of {_names(nonfinite)} are NaN/Inf; run the numerics check to find "
            "where the NaN starts, and lower the learning rate or enable grad_clip.",
            numbers,
        )
    if exploding:
        name, ratio, gn = exploding[0]
        rel = f"{ratio:.3g}× its weight norm" if math.isfinite(ratio) else f"norm {gn:.3g}"
        return Verdict(
            "gradients",
            "fail",
            f"exploding gradients in {_names([e[0] for e in exploding])} (worst: '{name}', "
            f"gradient {rel}): one optimizer step would wipe out what the layer has learned. "
            "Enable grad_clip (e.g. 1.0), lower the learning rate, or look for a layer whose "
            "output is scaled far too high (initialisation, a missing normalisation).",
            numbers,
        )
    if vanishing:
        name, ratio = vanishing[0]
        return Verdict(
            "gradients",
            "warn",
            f"vanishing gradients in {_names([v[0] for v in vanishing])} (worst: '{name}', "
            f"gradient {ratio:.3g}× its weight norm): these layers have effectively stopped "
            "learning. Common causes are dead ReLUs or saturated tanh/sigmoid after them "
            "(run the activations check), a learning-rate schedule that has decayed to nothing, "
            "or a very deep stack without residual connections or normalisation.",
            numbers,
        )
    if unused:
        return Verdict(
            "gradients",
            "warn",
            f"{_names(unused)} get no gradient at all: forward does not use them on these "
            "batches, or the graph is cut (.detach(), torch.no_grad(), .data). If they are meant "
            "to be frozen, set requires_grad=False so the optimizer skips them.",
            numbers,
        )
    note = (
        f" {_names(sorted(cancelled))} get(s) no gradient because a BatchNorm follows: it "
        "removes any constant shift, so such a bias never learns (bias=False saves it)."
        if cancelled
        else ""
    )
    return Verdict(
        "gradients",
        "ok",
        f"gradient norms of all {len(params)} parameter tensors are in a healthy range "
        f"(total norm {total_norm:.3g}).{note}",
        numbers,
    )


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of the biases of Linear/Conv layers followed directly by a BatchNorm in an
    nn.Sequential (the common pattern); the BatchNorm cancels them."""
    out: set[str] = set()
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        items = list(mod.named_children())
        for (name, layer), (_, nxt) in zip(items, items[1:], strict=False):
            bias = getattr(layer, "bias", None)
            if (
                isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and isinstance(bias, nn.Parameter)
                and isinstance(nxt, _BATCHNORMS)
            ):
                out.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return out


# -- activations -----------------------------------------------------------------------------

# ReLU6 subclasses Hardtanh, so the ReLU-like test must come first.
RELU_LIKE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Hardswish,
)
SATURATING: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)


def _saturated(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Elements where the activation is flat: within 1% of a bound of its range."""
    if isinstance(m, nn.Tanh):
        return y.abs() > 0.99
    if isinstance(m, nn.Sigmoid):
        return (y < 0.01) | (y > 0.99)
    if isinstance(m, nn.Hardtanh):
        return (y <= m.min_val) | (y >= m.max_val)
    return (y <= 0) | (y >= 1)  # Hardsigmoid


class _ActivationStats:
    """Per activation module: which units ever fire, and how many outputs are flat.

    A unit is one element of a sample's output (a feature, or a channel at one
    position), dead when it is ≤ 0 for every sample seen. When a later batch has a
    different per-sample shape (variable sequence length), only the element shares are
    updated for it, not the per-unit mask.
    """

    def __init__(self, model: nn.Module) -> None:
        self.kinds: dict[str, str] = {}
        self.alive: dict[str, torch.Tensor] = {}
        self.counts: dict[str, list[torch.Tensor]] = {}  # [le0 or saturated, numel]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, m in model.named_modules():
            if isinstance(m, RELU_LIKE):
                self.kinds[name] = "relu"
            elif isinstance(m, SATURATING):
                self.kinds[name] = "saturating"
            else:
                continue
            self._handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(m: nn.Module, _args: Any, output: Any) -> None:
            y = next(_tensors(output), None)
            if y is None or y.dim() == 0 or y.shape[0] == 0 or not y.is_floating_point():
                return
            y = y.detach()
            if self.kinds[name] == "relu":
                flat = (y > 0).reshape(y.shape[0], -1)
                fired = flat.any(dim=0)
                prev = self.alive.get(name)
                if prev is None:
                    self.alive[name] = fired
                elif prev.shape == fired.shape:
                    self.alive[name] = prev | fired
                hit = (~flat).sum()
            else:
                hit = _saturated(m, y).sum()
            c = self.counts.setdefault(name, [torch.zeros((), dtype=torch.int64, device=y.device)])
            c[0] = c[0] + hit
            c.append(torch.tensor(y.numel(), dtype=torch.int64, device=y.device))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def check_activations(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    autocast: Autocast | None = None,
    warn_at: float = 0.5,
    fail_at: float = 0.9,
) -> Verdict:
    """Dead ReLU-like units and saturated tanh/sigmoid outputs, per activation module.

    A dead unit passes no gradient, so the weights feeding it stop learning; a saturated
    tanh/sigmoid does the same through a near-zero slope. Only activation *modules* are
    seen (nn.ReLU, nn.GELU, ...); functional calls such as F.relu inside a forward are
    invisible to hooks.
    """
    _require_batches(batches, "activations")
    model = _unwrap(model)
    with _rng_sandbox(), torch.no_grad():
        sb = _Sandbox(model, autocast)
        stats = _ActivationStats(sb.model)
        try:
            for x, _ in batches:
                with sb.autocast():
                    sb.forward(x)
        finally:
            stats.remove()
    names = [n for n in stats.kinds if n in stats.counts]
    with_mask = [n for n in names if n in stats.alive]
    vals = _floats(
        [1.0 - stats.alive[n].float().mean() for n in with_mask]
        + [stats.counts[n][0] for n in names]
        + [torch.stack(stats.counts[n][1:]).sum() for n in names]
    )
    dead = dict(zip(with_mask, vals[: len(with_mask)], strict=True))
    k, off = len(names), len(with_mask)
    samples = sum(batch_len(x) for x, _ in batches)
    rows: list[dict[str, Any]] = []
    for i, n in enumerate(names):
        hit, numel = vals[off + i], vals[off + k + i]
        share = hit / numel if numel else 0.0
        row: dict[str, Any] = {"name": n, "type": type(sb.model.get_submodule(n)).__name__}
        if stats.kinds[n] == "relu":
            row.update(dead_fraction=dead.get(n, 0.0), nonpositive_share=share)
        else:
            row.update(saturated_share=share)
        rows.append(row)
    relu = sorted((r for r in rows if "dead_fraction" in r), key=lambda r: -r["dead_fraction"])
    sat = sorted((r for r in rows if "saturated_share" in r), key=lambda r: -r["saturated_share"])
    numbers: dict[str, NumberValue] = {
        "activation_layers": len(rows),
        "samples": samples,
        "worst_dead_layer": relu[0]["name"] if relu else "",
        "worst_dead_fraction": relu[0]["dead_fraction"] if relu else 0.0,
        "worst_saturated_layer": sat[0]["name"] if sat else "",
        "worst_saturated_share": sat[0]["saturated_share"] if sat else 0.0,
        "layers": relu + sat,
    }
    if not rows:
        return Verdict(
            "activations",
            "ok",
            "no activation modules (nn.ReLU, nn.GELU, nn.Tanh, ...) ran, so there is nothing to "
            "measure; activations applied as functions (F.relu, torch.tanh) are not visible here.",
            numbers,
        )
    findings: list[tuple[VerdictKind, str]] = []
    dead_rows = [r for r in relu if r["dead_fraction"] > warn_at]
    if dead_rows:
        r = dead_rows[0]
        level: VerdictKind = "fail" if r["dead_fraction"] > fail_at else "warn"
        findings.append(
            (
                level,
                f"{_pct(r['dead_fraction'])} of the units of '{r['name']}' ({r['type']}) never "
                f"output a positive value on {samples} samples (dead layers: "
                f"{_names([d['name'] for d in dead_rows])}). Dead units pass no gradient, so the "
                "layers before them stop learning. Usual causes: a learning rate that knocked "
                "the pre-activations negative, a large negative bias, or a poor initialisation; "
                "lower the learning rate, use Kaiming initialisation, add normalisation before "
                "the activation, or switch to LeakyReLU/GELU",
            )
        )
    flat = [r for r in sat if r["saturated_share"] > warn_at]
    if flat:
        r = flat[0]
        level = "fail" if r["saturated_share"] > fail_at else "warn"
        findings.append(
            (
                level,
                f"{_pct(r['saturated_share'])} of the outputs of '{r['name']}' ({r['type']}) sit "
                "at the flat ends of its range, where the slope is almost zero (saturated "
                f"layers: {_names([d['name'] for d in flat])}). Normalise the inputs of that "
                "layer, use a smaller initialisation, or lower the learning rate",
            )
        )
    if findings:
        verdict = max((f[0] for f in findings), key=lambda v: _RANK[v])
        return Verdict("activations", verdict, "; ".join(f[1] for f in findings) + ".", numbers)
    summary = []
    if relu:
        summary.append(
            f"at most {_pct(relu[0]['dead_fraction'])} dead units (in '{relu[0]['name']}')"
        )
    if sat:
        summary.append(
            f"at most {_pct(sat[0]['saturated_share'])} saturated outputs (in '{sat[0]['name']}')"
        )
    return Verdict(
        "activations", "ok", f"activations look healthy: {' and '.join(summary)}.", numbers
    )


# -- data ------------------------------------------------------------------------------------


def _epochs(ids: Sequence[np.ndarray] | np.ndarray | Sequence[int]) -> list[np.ndarray]:
    if isinstance(ids, np.ndarray):
        return [ids.reshape(-1)] if ids.ndim <= 1 else [np.asarray(r) for r in ids]
    seq = list(ids)
    if seq and isinstance(seq[0], (int, np.integer)):
        return [np.asarray(seq, dtype=np.int64)]
    return [np.asarray(e, dtype=np.int64).reshape(-1) for e in seq]


def _label_report(labels: np.ndarray | None) -> tuple[dict[str, NumberValue], list[str]]:
    if labels is None:
        return {"labels": "not available"}, []
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.size == 0:
        return {"labels": "empty"}, []
    if arr.ndim != 1:
        return {"labels": f"multi-dimensional {tuple(arr.shape)}: balance not checked"}, []
    if arr.dtype.kind == "f" and not np.all(np.equal(np.mod(arr[np.isfinite(arr)], 1), 0)):
        return {
            "labels": "continuous (regression): balance not checked",
            "label_mean": float(np.nanmean(arr)),
            "label_std": float(np.nanstd(arr)),
        }, []
    classes, counts = np.unique(arr, return_counts=True)
    shares = counts / counts.sum()
    k = len(classes)
    entropy = float(-(shares * np.log(shares)).sum() / math.log(k)) if k > 1 else 0.0
    major = int(np.argmax(counts))
    rare = [str(c) for c, s in zip(classes.tolist(), shares.tolist(), strict=True) if s < 0.01]
    numbers: dict[str, NumberValue] = {
        "classes": k,
        "majority_class": str(classes[major].item()),
        "majority_share": float(shares[major]),
        "minority_share": float(shares.min()),
        "label_entropy": entropy,
        "rare_classes": rare[:20],
    }
    notes: list[str] = []
    if k == 1:
        notes.append(
            f"every label is {classes[0].item()!r}: the model can reach a perfect loss by always "
            "predicting it and learns nothing. Check the label column and the loader's target"
        )
    elif shares[major] > 0.9:
        notes.append(
            f"class {classes[major].item()!r} is {_pct(float(shares[major]))} of the labels: "
            "accuracy will look good while the other classes are ignored. Use class weights "
            "(loss weight=...), a WeightedRandomSampler, or a per-class metric"
        )
    if rare and k > 1:
        notes.append(
            f"{len(rare)} class(es) ({', '.join(rare[:_NAMED])}) are under 1% of the labels: "
            "the model will barely see them. Oversample them or weight them in the loss"
        )
    return numbers, notes


def check_data(
    dataset_len: int,
    ids_seen_by_epoch: Sequence[np.ndarray] | np.ndarray | Sequence[int],
    labels: np.ndarray | None,
    data_wait_ms: Sequence[float],
    step_ms: Sequence[float],
    *,
    loader_share_warn: float = 0.3,
) -> Verdict:
    """Duplicate or out-of-range ids in an epoch's order, label balance, loader-bound time.

    `ids_seen_by_epoch` holds one array of sample ids per epoch, in visiting order (or a
    single array for one epoch). `step_ms` is the wall time per step including the data
    wait, as the trainer records it, so wait/step is the share of time the GPU/CPU sat
    idle waiting for the DataLoader.
    """
    epochs = _epochs(ids_seen_by_epoch)
    findings: list[tuple[VerdictKind, str]] = []
    dups: list[int] = []
    out_of_range = 0
    coverage: list[float] = []
    for order in epochs:
        n_unique = int(np.unique(order).size)
        dups.append(int(order.size) - n_unique)
        if dataset_len > 0:
            out_of_range += int(((order < 0) | (order >= dataset_len)).sum())
            coverage.append(n_unique / dataset_len)
    same_order = (
        len(epochs) >= 2
        and epochs[-1].size > 1
        and all(np.array_equal(epochs[i], epochs[i + 1]) for i in range(len(epochs) - 1))
    )
    numbers: dict[str, NumberValue] = {
        "dataset_len": int(dataset_len),
        "epochs_checked": len(epochs),
        "duplicates_per_epoch": dups,
        "out_of_range_ids": out_of_range,
        "coverage_per_epoch": coverage,
        "same_order_every_epoch": bool(same_order),
    }
    if out_of_range:
        findings.append(
            (
                "fail",
                f"{out_of_range} sample id(s) fall outside the data set (0..{dataset_len - 1}): "
                "the sampler and the data set disagree about its size; re-create the DataLoader "
                "after changing the data set",
            )
        )
    if any(dups):
        worst_dup = max(dups)
        findings.append(
            (
                "warn",
                f"an epoch visits {worst_dup} sample(s) more than once: expected with a sampler "
                "that draws with replacement (WeightedRandomSampler); otherwise the sampler "
                "or the data set lists some samples twice",
            )
        )
    if same_order:
        findings.append(
            (
                "warn",
                "every epoch visits the samples in the same order: pass shuffle=True to the "
                "training DataLoader unless the fixed order is deliberate (a curriculum)",
            )
        )

    label_numbers, label_notes = _label_report(labels)
    numbers.update(label_numbers)
    findings.extend(("warn", n) for n in label_notes)

    m = min(len(data_wait_ms), len(step_ms))
    if m:
        waits = np.asarray(data_wait_ms[-m:], dtype=np.float64)
        steps = np.asarray(step_ms[-m:], dtype=np.float64)
        share = float(waits.sum() / steps.sum()) if steps.sum() > 0 else 0.0
        numbers.update(
            steps_timed=m,
            loader_share=share,
            data_wait_ms_median=float(np.median(waits)),
            step_ms_median=float(np.median(steps)),
        )
        if share > loader_share_warn:
            findings.append(
                (
                    "warn",
                    f"the training loop spends {_pct(share)} of its time waiting for data: "
                    "the DataLoader is the bottleneck. Raise num_workers (one per free CPU core "
                    "is a good start), set pin_memory=True when training on a GPU, and move "
                    "heavy decoding/augmentation out of __getitem__ or cache it",
                )
            )
    else:
        numbers["loader_share"] = "not measured"

    if findings:
        verdict = max((f[0] for f in findings), key=lambda v: _RANK[v])
        return Verdict("data", verdict, "; ".join(f[1] for f in findings) + ".", numbers)
    parts = ["no duplicate ids"]
    classes, major = numbers.get("classes"), numbers.get("majority_share")
    if isinstance(classes, int) and isinstance(major, float):
        parts.append(f"{classes} classes, the largest {_pct(major)}")
    loader = numbers.get("loader_share")
    if isinstance(loader, float):
        parts.append(f"data loading takes {_pct(loader)} of step time")
    return Verdict("data", "ok", "the data looks healthy: " + "; ".join(parts) + ".", numbers)


def labels_of(dataset: Any) -> np.ndarray | None:
    """The label array of a data set when it exposes one cheaply, else None.

    Reads `.targets` / `.labels` (torchvision style) or a TensorDataset's second tensor,
    and follows `Subset`; it never iterates the data set, which may be slow or random.
    """
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    found: Any = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        found = dataset.tensors[1]
    else:
        for attr in ("targets", "labels"):
            if hasattr(dataset, attr):
                found = getattr(dataset, attr)
                break
    if found is None:
        return None
    if isinstance(found, torch.Tensor):
        found = found.detach().cpu().numpy()
    try:
        arr = np.asarray(found)
        n = len(dataset)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim >= 1 and arr.shape[0] == n else None


# -- throughput ------------------------------------------------------------------------------

_PHASES = ("data", "forward", "backward", "optimizer")


def _copy_for_side_work(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of model and optimizer that share no tensor with the live ones.

    Copied together so the optimizer copy points at the model copy's parameters. An LR
    scheduler wraps `optimizer.step` on the instance with a closure over the *live*
    optimizer; Optimizer.__getstate__ drops it, and we make sure of that before stepping.
    """
    m, o = copy.deepcopy((_unwrap(model), optimizer))
    o.__dict__.pop("step", None)
    live = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    mine = [id(t) for t in m.parameters()] + [id(p) for g in o.param_groups for p in g["params"]]
    if any(i in live for i in mine):
        raise RuntimeError("internal: the copied model shares tensors with the live one")
    return m, o


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step_breakdown(
    model: nn.Module,
    loss: PerSampleLoss | Any,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    device: torch.device | str,
    *,
    autocast: Autocast | None = None,
    warmup: int = 1,
    side_copy: Callable[[], tuple[nn.Module, torch.optim.Optimizer]] | None = None,
) -> dict[str, list[float]]:
    """Forward / backward / optimizer milliseconds per step, measured on deep copies.

    The first `warmup` steps are not recorded (allocator growth, cuDNN autotuning, lazy
    optimizer state). On CUDA each phase is closed by a synchronize, so the numbers are
    device time, not launch time. The copies need one more model + optimizer state in
    memory for the duration. `side_copy()` makes them when a plain deep copy cannot (a
    LightningModule wired to its trainer).
    """
    _require_batches(batches, "throughput")
    dev = torch.device(device)
    ploss = _as_loss(loss)
    m, opt = side_copy() if side_copy is not None else _copy_for_side_work(model, optimizer)
    out: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    ctx = autocast if autocast is not None else contextlib.nullcontext
    plan = [batches[i % len(batches)] for i in range(warmup)] + list(batches)
    with _rng_sandbox(), torch.enable_grad():
        for i, (x, y) in enumerate(plan):
            _sync(dev)
            t0 = time.perf_counter()
            with ctx():
                pred = m(x)
                total, _ = _apply_loss(ploss, pred, y, x)
            _sync(dev)
            t1 = time.perf_counter()
            total.backward()
            _sync(dev)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            t3 = time.perf_counter()
            if i >= warmup:
                out["forward"].append((t1 - t0) * 1e3)
                out["backward"].append((t2 - t1) * 1e3)
                out["optimizer"].append((t3 - t2) * 1e3)
    del m, opt
    return out


def check_throughput(
    step_breakdown: Mapping[str, Sequence[float]],
    *,
    loader_share_warn: float = 0.3,
    optimizer_share_warn: float = 0.4,
) -> Verdict:
    """Where a step's time goes: data wait / forward / backward / optimizer (ms).

    Shares are of the summed phase means (or of `step` when a total is given). A
    loader-bound loop and an optimizer that costs more than the model are the two cheap
    wins worth pointing out; everything else is reported, not judged.
    """
    phases = {k: np.asarray(list(v), dtype=np.float64) for k, v in step_breakdown.items() if len(v)}
    total_key = "step" if "step" in phases else ""
    parts = {k: v for k, v in phases.items() if k != total_key}
    if not parts:
        return Verdict(
            "throughput",
            "warn",
            "no step timings yet: let training run a few steps, then ask again.",
            {},
        )
    means = {k: float(v.mean()) for k, v in parts.items()}
    denom = float(phases["step"].mean()) if total_key else sum(means.values())
    order = [k for k in _PHASES if k in parts] + sorted(k for k in parts if k not in _PHASES)
    rows: list[dict[str, Any]] = []
    shares: dict[str, float] = {}
    for k in order:
        v = parts[k]
        shares[k] = means[k] / denom if denom > 0 else 0.0
        rows.append(
            {
                "phase": k,
                "median_ms": float(np.median(v)),
                "p90_ms": float(np.percentile(v, 90)),
                "mean_ms": means[k],
                "share": shares[k],
                "samples": int(v.size),
            }
        )
    numbers: dict[str, NumberValue] = {
        "phases": rows,
        "step_ms_mean": denom,
        **{f"{k}_share": s for k, s in shares.items()},
    }
    findings: list[str] = []
    if shares.get("data", 0.0) > loader_share_warn:
        findings.append(
            f"{_pct(shares['data'])} of each step is spent waiting for the DataLoader: raise "
            "num_workers, set pin_memory=True (GPU), and make __getitem__ cheaper"
        )
    if shares.get("optimizer", 0.0) > optimizer_share_warn:
        findings.append(
            f"the optimizer step takes {_pct(shares['optimizer'])} of each step, more than the "
            "model itself: pass foreach=True or fused=True to the optimizer (Adam/AdamW/SGD), "
            "or use a larger batch so the per-step overhead is shared by more samples"
        )
    if findings:
        return Verdict("throughput", "warn", "; ".join(findings) + ".", numbers)
    top = max(shares, key=lambda k: shares[k])
    return Verdict(
        "throughput",
        "ok",
        f"a step takes {denom:.3g} ms on average, most of it in {top} ({_pct(shares[top])}); "
        "nothing is obviously wasted.",
        numbers,
    )


# -- determinism -----------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested state (a checkpoint, an optimizer state dict) as one flat, ordered mapping."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, Mapping)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: obj}


def _tensor_sha(t: torch.Tensor) -> str:
    c = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{c.dtype}|{tuple(c.shape)}|".encode())
    if c.numel():
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_hashes(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """sha256 per tensor (dtype, shape and bytes) of a possibly nested state dict.

    Non-tensor leaves are hashed through their repr, so a changed step counter counts.
    """
    return {
        k: _tensor_sha(v)
        if isinstance(v, torch.Tensor)
        else hashlib.sha256(repr(v).encode()).hexdigest()
        for k, v in _flatten(state_dict).items()
    }


def _max_abs_diff(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return math.inf
        x, y = a.detach().cpu(), b.detach().cpu()
        if x.is_complex() or y.is_complex():
            x, y = (
                torch.view_as_real(x.to(torch.complex128)),
                torch.view_as_real(y.to(torch.complex128)),
            )
        if x.numel() == 0:
            return 0.0
        d = (x.double() - y.double()).abs()
        d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
        return float(d.max())
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    return math.inf


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, float] | None:
    """The first entry (in `a`'s order) that is not bit-identical in `b`, and by how much.

    The difference is the max absolute element difference (inf for a missing entry, a
    shape change, or a NaN on one side only; 0.0 when the bits differ but the values are
    equal, e.g. -0.0 against 0.0). None when the two are bit for bit the same.
    """
    fa, fb = _flatten(a), _flatten(b)
    ha, hb = state_hashes(fa), state_hashes(fb)
    for k in list(fa) + [k for k in fb if k not in fa]:
        if k not in ha or k not in hb:
            return k, math.inf
        if ha[k] != hb[k]:
            return k, _max_abs_diff(fa[k], fb[k])
    return None


def check_determinism(replay: Callable[[], Mapping[str, Any]], runs: int = 2) -> Verdict:
    """Replays the same steps `runs` times and compares the resulting states bit for bit.

    `replay()` restores a checkpoint, runs K steps (in a side process, or on copies) and
    returns the resulting state dict. Identical hashes mean pause/resume, forks and
    session import will reproduce this run exactly. Every call runs in its own RNG
    sandbox: it starts from the same global RNG state (as a checkpoint restore would
    give it) and cannot move the training RNG, even when the replay runs in process.
    """
    if runs < 2:
        raise ValueError(f"check_determinism needs runs >= 2 to compare anything, got {runs}")
    t0 = time.perf_counter()
    states: list[Mapping[str, Any]] = []
    for _ in range(runs):
        with _rng_sandbox(None):
            states.append(replay())
    return compare_replays(states, time.perf_counter() - t0)


def compare_replays(replays: Sequence[Mapping[str, Any]], seconds: float) -> Verdict:
    """The determinism verdict for the states that replays of the same steps from the same
    checkpoint ended with (in one process, or one per side process): ok when they are bit
    for bit the same, else fail naming the first tensor that differs and by how much."""
    runs = len(replays)
    if runs < 2:
        raise ValueError(f"comparing replays needs at least 2, got {runs}")
    states = [_flatten(r) for r in replays]
    hashes = [state_hashes(s) for s in states]
    base, base_h = states[0], hashes[0]
    differing: list[str] = []
    first: tuple[str, float] | None = None
    for s, h in zip(states[1:], hashes[1:], strict=True):
        keys = list(base) + [k for k in s if k not in base]
        for k in keys:
            if base_h.get(k) != h.get(k) and k not in differing:
                differing.append(k)
        if first is None:
            first = first_difference(base, s)
    numbers: dict[str, NumberValue] = {
        "runs": runs,
        "tensors": len(base),
        "identical": not differing,
        "differing": differing[:20],
        "differing_count": len(differing),
        "first_difference": first[0] if first else "",
        "max_abs_diff": first[1] if first else 0.0,
        "seconds": seconds,
    }
    if first is None:
        return Verdict(
            "determinism",
            "ok",
            f"{runs} replays from the same checkpoint gave bit-identical results "
            f"({len(base)} tensors): pause/resume, forks and imports reproduce this run exactly.",
            numbers,
        )
    name, diff = first
    return Verdict(
        "determinism",
        "fail",
        f"replaying the same steps from the same checkpoint gave different results: '{name}' "
        f"differs by up to {diff:.3g} ({len(differing)} of {len(base)} entries differ), so "
        "resumed runs and forks will drift from the original. Usual causes: non-deterministic "
        "GPU kernels (call torch.use_deterministic_algorithms(True), set "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 and torch.backends.cudnn.benchmark=False), or "
        "randomness outside torch's seeded RNG (python/numpy random in DataLoader workers "
        "without a worker_init_fn, time-based seeds, iteration over a set).",
        numbers,
    )


def replay_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: PerSampleLoss | Any,
    batches: Sequence[Batch],
    *,
    seed: int = _SEED,
    autocast: Autocast | None = None,
) -> dict[str, torch.Tensor]:
    """An in-process replay for `check_determinism`: K steps on deep copies, fixed seed.

    It starts from the live state (as a checkpoint would) and returns the copy's model
    and optimizer state. It exercises the kernels and the model's own randomness, not
    the data pipeline or checkpoint restore. `onthefly health` does not use it: the
    supervisor replays from a real checkpoint in a side process (health_role.py), which
    covers those too; this stays for direct use and tests.
    """
    _require_batches(batches, "determinism")
    ploss = _as_loss(loss)
    m, opt = _copy_for_side_work(model, optimizer)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with _rng_sandbox(seed), torch.enable_grad():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with ctx():
                total, _ = _apply_loss(ploss, m(x), y, x)
            total.backward()
            opt.step()
    state = {f"model.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    for k, v in _flatten(opt.state_dict()["state"]).items():
        if isinstance(v, torch.Tensor):
            state[f"optimizer.{k}"] = v.detach().clone()
    return state


# -- batches for the checks ------------------------------------------------------------------


def draw_batches(
    loader: DataLoader, k: int, device: torch.device | str, *, seed: int = _SEED
) -> list[Batch]:
    """`k` (inputs, target) batches for the checks, read through a private loader.

    The training iterator is never touched: a fresh single-process DataLoader over the
    same data set and collate function reads a seeded random subset, inside the RNG
    sandbox, so random augmentations neither consume the training RNG nor change from
    one health request to the next. An IterableDataset is read from a fresh iterator.
    """
    if k < 1:
        raise ValueError(f"draw_batches needs k >= 1, got {k}")
    bs = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 32
    n = dataset_size(loader)
    dev = torch.device(device)
    with _rng_sandbox(seed):
        if n > 0:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[: k * int(bs)].tolist()
            chunks = [idx[i : i + int(bs)] for i in range(0, len(idx), int(bs))]
            private = DataLoader(loader.dataset, batch_sampler=chunks, collate_fn=loader.collate_fn)
        else:
            private = DataLoader(loader.dataset, batch_size=int(bs), collate_fn=loader.collate_fn)
        out: list[Batch] = []
        for raw in private:
            x, y = split_batch(raw)
            out.append((to_device(x, dev), to_device(y, dev)))
            if len(out) >= k:
                break
    return out


# -- dispatch --------------------------------------------------------------------------------


def _run_numerics(c: Mapping[str, Any]) -> Verdict:
    return check_numerics(
        c["model"],
        c["loss"],
        c["batches"],
        c.get("scaler"),
        autocast=c.get("autocast"),
        scale_history=c.get("scale_history"),
    )


def _run_gradients(c: Mapping[str, Any]) -> Verdict:
    return check_gradients(
        c["model"], c["loss"], c["batches"], autocast=c.get("autocast"), scaler=c.get("scaler")
    )


def _run_activations(c: Mapping[str, Any]) -> Verdict:
    return check_activations(c["model"], c["batches"], autocast=c.get("autocast"))


def _run_data(c: Mapping[str, Any]) -> Verdict:
    return check_data(
        c["dataset_len"],
        c["ids_seen_by_epoch"],
        c.get("labels"),
        c.get("data_wait_ms") or [],
        c.get("step_ms") or [],
    )


def _run_throughput(c: Mapping[str, Any]) -> Verdict:
    breakdown = dict(c["step_breakdown"]) if "step_breakdown" in c else {}
    if not breakdown:
        breakdown = dict(
            time_step_breakdown(
                c["model"],
                c["loss"],
                c["optimizer"],
                c["batches"],
                c["device"],
                autocast=c.get("autocast"),
                side_copy=c.get("side_copy"),
            )
        )
    if "data" not in breakdown and c.get("data_wait_ms"):
        breakdown["data"] = list(c["data_wait_ms"])
    return check_throughput(breakdown)


def _run_determinism(c: Mapping[str, Any]) -> Verdict:
    return check_determinism(c["replay"], int(c.get("runs", 2)))


# name -> (runner, alternative sets of required context keys)
CHECKS: dict[str, tuple[Callable[[Mapping[str, Any]], Verdict], tuple[tuple[str, ...], ...]]] = {
    "numerics": (_run_numerics, (("model", "loss", "batches"),)),
    "gradients": (_run_gradients, (("model", "loss", "batches"),)),
    "activations": (_run_activations, (("model", "batches"),)),
    "data": (_run_data, (("dataset_len", "ids_seen_by_epoch"),)),
    "throughput": (
        _run_throughput,
        (("step_breakdown",), ("model", "loss", "optimizer", "batches", "device")),
    ),
    "determinism": (_run_determinism, (("replay",),)),
}


def run_checks(names: Sequence[str] | str | None = None, **context: Any) -> list[Verdict]:
    """Run the named checks (all that the context allows when `names` is None or "all").

    An unknown name, or a named check whose context is missing, raises ValueError before
    anything runs. A check that crashes (the model's forward raising, say) becomes a
    "fail" verdict carrying the error, so a health request never takes a worker down.
    """
    if isinstance(names, str):  # "gradients" or "numerics,gradients", as the CLI sends it
        names = names.split(",")
    wanted = [n.strip() for n in (names or []) if n.strip()]
    everything = not wanted or "all" in wanted
    unknown = [n for n in wanted if n not in CHECKS and n != "all"]
    if unknown:
        raise ValueError(
            f"unknown health check {', '.join(repr(n) for n in unknown)}; valid checks: "
            f"{', '.join(CHECKS)} (or 'all')"
        )
    present = {k for k, v in context.items() if v is not None}

    def runnable(name: str) -> bool:
        return any(set(keys) <= present for keys in CHECKS[name][1])

    if everything:
        todo = [n for n in CHECKS if runnable(n)]
    else:
        todo = list(dict.fromkeys(wanted))
        for n in todo:
            if not runnable(n):
                options = " or ".join("+".join(keys) for keys in CHECKS[n][1])
                raise ValueError(f"the {n} check needs {options} in its context")
    out: list[Verdict] = []
    for n in todo:
        try:
            out.append(CHECKS[n][0](context))
        except Exception as e:  # a broken check is a finding, not a crash of the worker
            out.append(
                Verdict(
                    n,
                    "fail",
                    f"the {n} check could not run: {type(e).__name__}: {e}",
                    {"error": f"{type(e).__name__}: {e}"},
                )
            )
    return out


__all__ = [
    "CHECKS",
    "RELU_LIKE",
    "SATURATING",
    "VERDICTS",
    "Verdict",
    "check_activations",
    "check_data",
    "check_determinism",
    "check_gradients",
    "check_numerics",
    "check_throughput",
    "draw_batches",
    "first_difference",
    "labels_of",
    "replay_steps",
    "run_checks",
    "state_hashes",
    "time_step_breakdown",
    "worst",
]
