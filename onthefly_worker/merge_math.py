"""The math of merging runs: pure functions over state dicts and small training loops.

Everything here takes models, state dicts (`dict[str, Tensor]`) and loaders and returns
new tensors; nothing talks to the supervisor, so the merge worker and the tests call
the same code. The methods:

* `swa_average` — (weighted) average of weights; follow it with `recalibrate_batchnorm`,
  because averaged weights do not match any model's BatchNorm running statistics.
* `diagonal_fisher` + `fisher_soup` — Fisher-weighted averaging (Matena & Raffel, 2022):
  each coordinate leans toward the model whose loss is most sensitive to it.
* `LoRALinear`, `add_adapters`, `adapter_deltas`, `merge_adapters`, `adapter_fuse` —
  low-rank adapters for cheap forks, and folding their deltas back into full weights.
* `distill_step` / `distill` — train a student on a teacher's soft targets (Hinton et al.),
  or, for a regression model (`objective="mse"`), on the teacher's outputs by MSE.

Integer tensors (BatchNorm's `num_batches_tracked`, index buffers) are never averaged:
averaging counters into floats would corrupt them. Models must already be on `device`;
the loops move batches, not models (the caller owns placement, e.g. a pinned GPU).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from onthefly_worker.data import batch_len, split_batch, to_device

StateDict = dict[str, Tensor]
BatchFn = Callable[[Any], tuple[Any, Any]]
"""Splits what a loader yields into (inputs, target); default: the worker's `split_batch`."""


# --------------------------------------------------------------------------- helpers


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _check_states(states: Sequence[Mapping[str, Tensor]], what: str = "states") -> list[str]:
    """The common key order; raises naming the first key or shape that differs."""
    if not states:
        raise ValueError(f"{what}: need at least one state dict")
    keys = list(states[0].keys())
    ref = set(keys)
    for i, s in enumerate(states[1:], start=1):
        other = set(s.keys())
        if other != ref:
            missing = sorted(ref - other)
            extra = sorted(other - ref)
            raise ValueError(
                f"{what}[{i}] has different keys from {what}[0]: missing {missing[:3]}, extra "
                f"{extra[:3]}; merging needs models of the same architecture"
            )
        for k in keys:
            if s[k].shape != states[0][k].shape:
                raise ValueError(
                    f"{what}[{i}][{k!r}] has shape {tuple(s[k].shape)}, {what}[0] has "
                    f"{tuple(states[0][k].shape)}; merging needs models of the same architecture"
                )
    return keys


def _normalized_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} models")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w}")
    return [x / total for x in w]


def _acc_dtype(t: Tensor) -> torch.dtype:
    # Half/bfloat16 sums lose digits; accumulate in at least float32, return the original dtype.
    if t.is_complex():
        return t.dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _non_float(key: str, tensors: Sequence[Tensor]) -> Tensor:
    """Integer/bool entries: counters take the max (most batches seen), the rest the first."""
    if key.endswith("num_batches_tracked"):
        return torch.stack([t.to(tensors[0].device) for t in tensors]).max(dim=0).values.clone()
    return tensors[0].clone()


def _inputs(batch: Any, batch_fn: BatchFn | None) -> Any:
    if batch_fn is not None:
        return batch_fn(batch)[0]
    # Recalibration and distillation need no targets, so unlabeled batches are fine:
    # a bare tensor or a 1-tuple (what TensorDataset(x) yields).
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0]
    return split_batch(batch)[0]


def _forward(model: nn.Module, x: Any) -> Any:
    """The model on a batch's inputs exactly as training calls it: `model(inputs)`, also
    when the inputs are a dict or a tuple (the model unpacks them)."""
    return model(x)


def take_rows(x: Any, rows: slice | Tensor) -> Any:
    """These rows (a slice, or an index tensor) of every tensor of a batch's inputs (a
    tensor, or a dict/list/tuple of them, batch dimension first); other leaves are kept."""
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.dim() > 0 else t, x)


def _cycle(loader: Iterable[Any], what: str) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{what}: the loader yielded no batches")


# --------------------------------------------------------------------------- SWA


def swa_average(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Uniform (or weighted) average of state dicts of one architecture.

    Floating tensors are averaged (accumulated in >= float32, returned in their own
    dtype); integer tensors are not: `num_batches_tracked` takes the max and any other
    integer buffer is taken from the first state. Weights are normalized to sum to 1.
    The result lives on the first state's devices and never aliases the inputs.
    """
    keys = _check_states(states)
    w = _normalized_weights(len(states), weights)
    out: StateDict = {}
    for k in keys:
        ts = [s[k] for s in states]
        if not _is_float(ts[0]):
            out[k] = _non_float(k, ts)
            continue
        acc = torch.zeros_like(ts[0], dtype=_acc_dtype(ts[0]))
        for wi, t in zip(w, ts, strict=True):
            acc.add_(t.detach().to(device=acc.device, dtype=acc.dtype), alpha=wi)
        out[k] = acc.to(ts[0].dtype)
    return out


def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    max_batches: int | None = None,
    batch_fn: BatchFn | None = None,
    info: dict[str, Any] | None = None,
) -> int:
    """Recompute every BatchNorm's running statistics from data; returns the batches used
    (and sets `info["samples"]` to the samples forwarded, for compute accounting).

    Averaged (SWA / soup) weights produce activations whose statistics match none of the
    parents' running stats, so they are reset and re-estimated with `momentum=None`
    (a cumulative average over batches: each batch counts equally, unlike the
    exponential average used in training). The forward runs in train mode under
    `no_grad`; the global RNG state is forked so dropout in this pass does not change the
    training run's randomness. Module modes and momenta are restored afterwards.
    A model without BatchNorm is left untouched (returns 0).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    dev = torch.device(device)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    # Kept so that a failing loader leaves the model exactly as it was.
    saved = {m: [t.clone() for t in _bn_stats(m)] for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    used = samples = 0
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    ok = False
    try:
        model.train()
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            for batch in loader:
                if max_batches is not None and used >= max_batches:
                    break
                x = to_device(_inputs(batch, batch_fn), dev)
                _forward(model, x)
                used += 1
                samples += batch_len(x)
        if used == 0:
            raise ValueError(
                "recalibrate_batchnorm: the loader yielded no batches, so the running statistics "
                "cannot be estimated"
            )
        ok = True
        if info is not None:
            info["samples"] = samples
    finally:
        for mod, mode in modes.items():
            mod.training = mode
        for m in bns:
            m.momentum = momenta[m]
            if not ok:
                with torch.no_grad():
                    for t, old in zip(_bn_stats(m), saved[m], strict=True):
                        t.copy_(old)
    return used


def _bn_stats(m: _BatchNorm) -> list[Tensor]:
    stats = [m.running_mean, m.running_var, m.num_batches_tracked]
    return [t for t in stats if isinstance(t, Tensor)]


# --------------------------------------------------------------------------- Fisher


def diagonal_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn_per_sample: Callable[[Tensor, Tensor], Tensor],
    device: torch.device | str,
    max_samples: int,
    batch_fn: BatchFn | None = None,
    chunk_size: int = 32,
    info: dict[str, Any] | None = None,
) -> StateDict:
    """Empirical diagonal Fisher: the mean over samples of squared per-sample gradients.

    Returns `{parameter name: tensor}` for every parameter (frozen ones included, so a
    soup weights every parameter), in float32 on `device`.

    Three ways to the same numbers, fastest first:

    * batched — when every module holding parameters is a plain `nn.Linear`,
      `nn.Conv2d` (groups=1, zero padding), BatchNorm with running statistics or
      `nn.LayerNorm`, one forward + backward per chunk gives each
      module's input and output gradient per sample, and the per-sample weight gradients
      are their outer products (Linear), unfold products (Conv2d) or sums of the gradient
      times the normalised input (BatchNorm, LayerNorm): a few matmuls instead
      of one traced gradient per sample (~20x cheaper on a small MLP). It needs
      `loss_fn_per_sample` to give one loss per row of a batch; it is checked against one
      backward per sample on the first few samples, and a mismatch (a loss that couples the rows)
      falls back with a warning.
    * `torch.func` (`vmap(grad(functional_call))`) over chunks of `chunk_size` samples;
      chunking bounds memory at chunk_size x #params.
    * one backward per sample, when vmap cannot trace the model (data-dependent control
      flow, unsupported ops); it warns.

    `info`, when given, receives `method` (batched / vmap / loop) and `samples`.

    The model runs in eval mode: in train mode BatchNorm would couple the samples of a
    batch (a "per-sample" gradient would depend on its neighbours) and dropout noise
    would inflate the Fisher.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = torch.device(device)
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ValueError("diagonal_fisher: the model has no parameters")
    was_training = model.training
    model.eval()
    fisher = {
        n: torch.zeros_like(p, dtype=torch.float32, device=dev) for n, p in model.named_parameters()
    }
    seen = 0
    use_vmap = True
    batched = _BatchedGrads.plan(model)
    method = "batched" if batched is not None else "vmap"

    def per_sample(xc: Tensor, yc: Tensor) -> StateDict:
        nonlocal use_vmap, method
        if use_vmap:
            try:
                return _sq_grads_vmap(model, loss_fn_per_sample, xc, yc)
            except Exception as exc:  # torch.func raises many types; fall back once
                warnings.warn(
                    f"diagonal_fisher: vmap per-sample gradients failed for this model "
                    f"({type(exc).__name__}: {exc}); using one backward per sample",
                    RuntimeWarning,
                    stacklevel=3,
                )
                use_vmap = False
        if method != "batched":
            method = "loop"
        return _sq_grads_loop(model, loss_fn_per_sample, xc, yc)

    try:
        for batch in loader:
            if seen >= max_samples:
                break
            if batch_fn is not None:
                x, y = batch_fn(batch)
            else:
                x, y = split_batch(batch)
            x, y = to_device(x, dev), to_device(y, dev)
            if not isinstance(y, Tensor) or y.dim() == 0 or batch_len(x) != int(y.shape[0]):
                raise ValueError(
                    "diagonal_fisher needs a target tensor with one row per sample (batch "
                    "dimension first) and inputs of as many rows; pass batch_fn to adapt the "
                    "loader's batches"
                )
            take = min(int(y.shape[0]), max_samples - seen)
            x, y = take_rows(x, slice(0, take)), y[:take]
            start = 0
            if batched is not None and seen == 0:
                # The check: the first few samples both ways must agree.
                n_check = min(_FISHER_CHECK, take)
                xc, yc = take_rows(x, slice(0, n_check)), y[:n_check]
                # One plain backward per sample: for a handful, cheaper than tracing vmap.
                ref = _sq_grads_loop(model, loss_fn_per_sample, xc, yc)
                why = batched.verify(loss_fn_per_sample, xc, yc, ref)
                if why:
                    warnings.warn(
                        f"diagonal_fisher: batched per-sample gradients are not usable here "
                        f"({why}); computing them one sample at a time",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    batched, method = None, "vmap" if use_vmap else "loop"
                for n in names:
                    fisher[n].add_(ref[n])
                start = n_check
            step = batched.chunk if batched is not None else chunk_size
            for lo in range(start, take, step):
                xc, yc = take_rows(x, slice(lo, lo + step)), y[lo : lo + step]
                if batched is not None:
                    sq = batched.sq_grads(loss_fn_per_sample, xc, yc)
                else:
                    sq = per_sample(xc, yc)
                for n in names:
                    fisher[n].add_(sq[n])
            seen += take
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("diagonal_fisher: the loader yielded no samples")
    for n in names:
        fisher[n].div_(seen)
    if info is not None:
        info.update(method=method, samples=seen)
    return fisher


_FISHER_CHECK = 4
"""Samples on which the batched Fisher path is checked against the per-sample one."""


class _BatchedGrads:
    """Squared per-sample gradients of Linear / Conv2d / norm layers from one batched
    backward.

    A layer's weight gradient for sample i is the product of what flowed into the layer
    and the gradient of its output, for that sample alone (rows do not mix in eval mode):
    `g_i^T a_i` for Linear (summed over any middle dimensions), `g_i unfold(a_i)^T` for
    Conv2d, `sum(g_i * x_hat_i)` for BatchNorm (running statistics) and LayerNorm. The
    gradients are taken with respect to the layer outputs only, so autograd
    never builds the (unneeded) batch-summed weight gradients.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]], largest: int) -> None:
        self.model = model
        self.layers = layers
        # Per-sample gradients are materialised chunk x (largest layer) floats at most:
        # bounded near 64 MB, never below 8 samples.
        self.chunk = max(8, min(512, (16 << 20) // max(1, largest)))

    @classmethod
    def plan(cls, model: nn.Module) -> _BatchedGrads | None:
        named = dict(model.named_parameters())
        layers: list[tuple[str, nn.Module]] = []
        covered: set[str] = set()
        largest = 0
        for prefix, m in model.named_modules():
            own = [n for n, _ in m.named_parameters(recurse=False)]
            if not own:
                continue
            ok = (
                type(m) is nn.Linear
                or (
                    type(m) is nn.Conv2d
                    and m.groups == 1
                    and m.padding_mode == "zeros"
                    and not isinstance(m.padding, str)
                )
                # In eval mode with running statistics BatchNorm is a per-channel affine
                # map of each sample alone; LayerNorm always normalises a sample alone.
                or (type(m) in _BATCHNORMS and m.track_running_stats)
                or type(m) is nn.LayerNorm
            )
            if not ok or not set(own) <= {"weight", "bias"}:
                return None
            full = [f"{prefix}.{n}" if prefix else n for n in own]
            if any(f not in named for f in full):
                return None
            covered.update(full)
            layers.append((prefix, m))
            largest = max(largest, sum(p.numel() for _, p in m.named_parameters(recurse=False)))
        if not layers or covered != set(named):
            return None
        return cls(model, layers, largest)

    def sq_grads(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
    ) -> StateDict:
        """Sum over the batch of squared per-sample gradients, keyed like named_parameters."""
        calls: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for _, m in self.layers}
        handles = []

        def hook(m: nn.Module, inp: tuple[Any, ...], out: Tensor) -> None:
            calls[id(m)].append((inp[0].detach(), out))

        params = [p for _, m in self.layers for p in m.parameters(recurse=False)]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            for _, m in self.layers:
                handles.append(m.register_forward_hook(hook))
            with torch.enable_grad():
                losses = loss_fn(self.model(x), y)
                if losses.dim() != 1 or losses.shape[0] != y.shape[0]:
                    raise _NotRowwise(
                        f"the per-sample loss has shape {tuple(losses.shape)}, not ({y.shape[0]},)"
                    )
                outs = [o for c in calls.values() for _, o in c]
                grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
        it = iter(grads)
        result: StateDict = {}
        for prefix, m in self.layers:
            pairs = [(a, next(it)) for a, _ in calls[id(m)]]
            pairs = [(a, g) for a, g in pairs if g is not None]
            w, b = _layer_sq_grads(m, pairs, int(y.shape[0]))
            result[f"{prefix}.weight" if prefix else "weight"] = w
            if m.bias is not None:
                result[f"{prefix}.bias" if prefix else "bias"] = b
        return result

    def verify(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        reference: Mapping[str, Tensor],
    ) -> str:
        """'' when the batched path reproduces `reference` on (x, y); else why not."""
        try:
            got = self.sq_grads(loss_fn, x, y)
        except _NotRowwise as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - any failure means: use the per-sample path
            return f"{type(e).__name__}: {e}"
        for k, ref in reference.items():
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            if not torch.allclose(got[k], ref, rtol=1e-3, atol=1e-5 * max(scale, 1e-12)):
                return f"{k} differs from the per-sample gradients (a loss that mixes rows?)"
        return ""


class _NotRowwise(ValueError):
    pass


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _norm_grads(m: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (weight, bias) gradients of an eval-mode BatchNorm or a LayerNorm:
    sums of g * x_hat and of g over everything but the sample and the parameter's dims."""
    if isinstance(m, nn.LayerNorm):
        k = len(m.normalized_shape)
        dims = tuple(range(a.dim() - k, a.dim()))
        mu = a.mean(dim=dims, keepdim=True)
        var = a.var(dim=dims, unbiased=False, keepdim=True)
        xh = (a - mu) / torch.sqrt(var + m.eps)
        over = tuple(range(1, a.dim() - k))
    else:
        assert isinstance(m, _BATCHNORMS)
        assert m.running_mean is not None and m.running_var is not None
        shape = (1, -1) + (1,) * (a.dim() - 2)
        rm = m.running_mean.float().reshape(shape)
        rv = m.running_var.float().reshape(shape)
        xh = (a - rm) / torch.sqrt(rv + m.eps)
        over = tuple(range(2, a.dim()))
    w, b = g * xh, g
    if over:
        w, b = w.sum(dim=over), b.sum(dim=over)
    return w, b


def _layer_sq_grads(
    m: nn.Module, pairs: list[tuple[Tensor, Tensor]], batch: int
) -> tuple[Tensor, Tensor]:
    """(sum_i w_grad_i^2, sum_i b_grad_i^2) of one layer from its calls' (input, grad out)."""
    assert isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, *_BATCHNORMS))
    assert m.weight is not None
    w_shape = m.weight.shape
    n_out = int(w_shape[0])
    if not pairs:
        zeros = torch.zeros(w_shape, dtype=torch.float32, device=m.weight.device)
        return zeros, zeros.clone()
    if isinstance(m, nn.Linear) and len(pairs) == 1 and pairs[0][0].dim() == 2:
        # One call on [B, in]: sum_i (g_i a_i^T)^2 = (g^2)^T (a^2), nothing materialised.
        a, g = (t.float() for t in pairs[0])
        g2 = g * g
        return g2.t() @ (a * a), g2.sum(0)
    gw: Tensor | None = None
    gb: Tensor | None = None
    for a, g in pairs:
        a, g = a.float(), g.float()
        if isinstance(m, (nn.LayerNorm, *_BATCHNORMS)):
            w, bias = _norm_grads(m, a, g)
        elif isinstance(m, nn.Linear):
            a3 = a.reshape(batch, -1, a.shape[-1])  # [B, L, in]
            g3 = g.reshape(batch, -1, g.shape[-1])  # [B, L, out]
            w = torch.bmm(g3.transpose(1, 2), a3)  # [B, out, in]
            bias = g3.sum(1)
        else:
            assert not isinstance(m.padding, str)  # plan() admits numeric padding only
            cols = F.unfold(
                a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            )  # [B, in*kh*kw, L]
            g3 = g.reshape(batch, n_out, -1)  # [B, out, L]
            w = torch.bmm(g3, cols.transpose(1, 2)).reshape(batch, *w_shape)
            bias = g3.sum(2)
        gw = w if gw is None else gw + w
        gb = bias if gb is None else gb + bias
    assert gw is not None and gb is not None
    return gw.pow(2).sum(0), gb.pow(2).sum(0)


def _sq_grads_vmap(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Any, y: Tensor
) -> StateDict:
    """Sum over the chunk of squared per-sample gradients, via torch.func."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, Tensor], xi: Any, yi: Tensor) -> Tensor:
        one_row = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, xi)
        out = functional_call(model, (p, buffers), (one_row,))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g[n].float().pow(2).sum(dim=0) for n in params}


def _sq_grads_loop(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Any, y: Tensor
) -> StateDict:
    """The same sum with one ordinary backward per sample (for models vmap cannot trace)."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    out = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(int(y.shape[0])):
            with torch.enable_grad():
                loss = loss_fn(model(take_rows(x, slice(i, i + 1))), y[i : i + 1]).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (n, _), gi in zip(named, grads, strict=True):
                if gi is not None:
                    out[n].add_(gi.detach().float().pow(2))
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return out


def fisher_soup(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    eps: float = 1e-8,
    weights: Sequence[float] | None = None,
) -> StateDict:
    """Fisher-weighted average: theta = sum_i w_i F_i theta_i / sum_i w_i F_i, per coordinate.

    Every key in the Fisher dicts (normally every parameter, from `diagonal_fisher`) is
    Fisher-weighted; the remaining state keys are buffers: floating ones are averaged
    uniformly (recalibrate BatchNorm afterwards), integer ones follow `swa_average`.

    `eps` is relative: eps x (mean Fisher over all models and coordinates) is added to
    every F_i. It only decides coordinates where every model's Fisher is ~0 (there the
    soup is a plain average) and makes the soup invariant to rescaling the loss.
    Raises if the Fishers are all zero or do not cover the same keys: a soup that quietly
    became a plain average would be a wrong answer, not a merge.
    """
    keys = _check_states(states)
    if len(fishers) != len(states):
        raise ValueError(f"got {len(fishers)} Fisher dicts for {len(states)} models")
    if eps <= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a small positive number, got {eps}")
    fkeys = list(fishers[0].keys())
    if not fkeys:
        raise ValueError(
            "fisher_soup: the Fisher dicts are empty; compute them with diagonal_fisher"
        )
    for i, f in enumerate(fishers):
        if set(f.keys()) != set(fkeys):
            raise ValueError(f"fishers[{i}] covers different keys from fishers[0]")
    state_keys = set(keys)
    for k in fkeys:
        if k not in state_keys:
            raise ValueError(f"fisher_soup: Fisher key {k!r} is not in the state dicts")
        for i, (f, s) in enumerate(zip(fishers, states, strict=True)):
            if f[k].shape != s[k].shape:
                raise ValueError(
                    f"fishers[{i}][{k!r}] has shape {tuple(f[k].shape)} but the parameter has "
                    f"{tuple(s[k].shape)}"
                )
            if not _is_float(s[k]):
                raise ValueError(f"fisher_soup: {k!r} is not a floating tensor; it has no Fisher")
    w = _normalized_weights(len(states), weights)

    total = 0.0
    count = 0
    for i, f in enumerate(fishers):
        for k in fkeys:
            fk = f[k].detach()
            if not torch.isfinite(fk).all() or (fk < 0).any():
                raise ValueError(f"fishers[{i}][{k!r}] must be finite and >= 0")
            total += float(fk.double().sum())
            count += fk.numel()
    scale = total / max(count, 1)
    if scale <= 0:
        raise ValueError(
            "fisher_soup: every Fisher is zero, so the soup is undefined (it would silently be a "
            "plain average); check the Fisher data, or use swa_average"
        )
    floor = eps * scale

    uniform = swa_average([{k: s[k] for k in keys if k not in fishers[0]} for s in states])
    out: StateDict = {}
    for k in keys:
        if k not in fishers[0]:
            out[k] = uniform[k]
            continue
        ref = states[0][k]
        dev = ref.device
        # float32 sums for float32/half models (a k-model weighted mean loses nothing that
        # matters at ~1e-7 relative error); float64 ones keep float64.
        acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
        num = torch.zeros_like(ref, dtype=acc, device=dev)
        den = torch.zeros_like(ref, dtype=acc, device=dev)
        for wi, s, f in zip(w, states, fishers, strict=True):
            fw = f[k].detach().to(dev, acc).add(floor).mul_(wi)
            num.addcmul_(fw, s[k].detach().to(dev, acc))
            den.add_(fw)
        out[k] = num.div_(den).to(ref.dtype)
    return out


# --------------------------------------------------------------------------- adapters


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update: y = base(x) + scale * x A^T B^T.

    A (rank x in) starts random and B (out x rank) starts at zero, so the wrapped layer
    computes exactly what the base did until training moves B (Hu et al., 2021).
    `scale = alpha / rank`, so changing the rank does not change the update's size.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(in, out) = {min(base.in_features, base.out_features)} "
                "of the layer; a full-rank adapter is just a full fine-tune"
            )
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta(self) -> Tensor:
        """The update to the base weight, scale * B @ A (out x in)."""
        return (self.lora_B @ self.lora_A).detach() * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (the base itself is not modified)."""
        b = self.base
        out = nn.Linear(
            b.in_features,
            b.out_features,
            bias=b.bias is not None,
            device=b.weight.device,
            dtype=b.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(b.weight + self.delta().to(b.weight.dtype))
            if b.bias is not None:
                assert out.bias is not None
                out.bias.copy_(b.bias)
        out.weight.requires_grad_(self.base_requires_grad.get("weight", True))
        if out.bias is not None:
            out.bias.requires_grad_(self.base_requires_grad.get("bias", True))
        out.train(b.training)
        return out


_FROZEN_ATTR = "_onthefly_adapter_frozen"


def add_adapters(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    target: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
    skip_small: bool = False,
) -> list[str]:
    """Wrap every `target` submodule in a LoRALinear, in place; returns the wrapped names.

    `skip_small=True` leaves (frozen) the layers whose min(in, out) is not above `rank`
    (e.g. a 2-class head): a low-rank adapter cannot be smaller than such a layer.

    Every other parameter of the model is frozen too, so the adapters are the fork's
    whole change and `adapter_deltas` describes it completely (buffers such as BatchNorm
    running stats are not parameters and still update in train mode). The match is on the
    exact class: subclasses of nn.Linear (e.g. MultiheadAttention's out_proj) are used by
    their owners through `.weight` and would break if wrapped.
    """
    targets = target if isinstance(target, tuple) else (target,)
    if any(t is not nn.Linear for t in targets):
        raise ValueError(f"only nn.Linear can carry LoRA adapters here, got target={targets}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has adapters; merge_adapters first")
    names = [n for n, m in model.named_modules() if type(m) in targets]
    if skip_small and names:
        small = [n for n in names if _min_dim(model.get_submodule(n)) <= rank]
        if len(small) == len(names):
            widest = max(_min_dim(model.get_submodule(n)) for n in names)
            raise ValueError(
                f"adapters of rank {rank}: no nn.Linear of the model is wider than the rank "
                f"(its {len(names)} Linear layer(s) have at most {widest} in/out features); "
                f"use a rank below {widest}"
            )
        names = [n for n in names if n not in small]
    if not names:
        raise ValueError(
            f"the model has no {', '.join(t.__name__ for t in targets)} submodules to adapt"
        )
    if "" in names:
        raise ValueError("the model is itself an nn.Linear; wrap it in LoRALinear directly")
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        lora = LoRALinear(base, rank, alpha)
        # The base was frozen above; remember what it was before so merge restores it.
        lora.base_requires_grad = {pn: f"{n}.{pn}" in frozen for pn, _ in base.named_parameters()}
        setattr(parent, child, lora)
    object.__setattr__(model, _FROZEN_ATTR, [f for f in frozen if not _under(f, names)])
    return names


def _min_dim(m: nn.Module) -> int:
    assert isinstance(m, nn.Linear)
    return min(m.in_features, m.out_features)


def _under(param: str, modules: Sequence[str]) -> bool:
    return any(param.startswith(m + ".") for m in modules)


def _adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not found:
        raise ValueError("the model has no LoRA adapters (add_adapters was not called)")
    return found


def adapter_deltas(model: nn.Module) -> StateDict:
    """`{"<module>.weight": scale * B @ A}` keyed like the original model's state dict."""
    return {f"{n}.weight": m.delta() for n, m in _adapters(model)}


def adapter_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """`{"<module>.weight": (A, B, scale)}`: the compact form (rank x (in + out) numbers)."""
    return {
        f"{n}.weight": (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scale)
        for n, m in _adapters(model)
    }


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and return the model.

    The LoRALinear modules are replaced by plain nn.Linear, so the state dict keys equal
    the original model's again, and the parameters frozen by `add_adapters` get their
    previous `requires_grad` back.
    """
    for n, m in _adapters(model):
        parent_name, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
    for n in getattr(model, _FROZEN_ATTR, []):
        model.get_parameter(n).requires_grad_(True)
    if hasattr(model, _FROZEN_ATTR):
        object.__delattr__(model, _FROZEN_ATTR)
    return model


def folded_state_dict(model: nn.Module) -> StateDict:
    """The state dict `merge_adapters` would give, without touching or copying the model:
    each adapted layer's `base.weight` + scale * B @ A under the original `<layer>.weight`
    key, its bias under `<layer>.bias`, and no adapter entries."""
    sd = model.state_dict()
    for n, m in _adapters(model):
        pre = f"{n}." if n else ""
        w = sd.pop(f"{pre}base.weight")
        sd[f"{pre}weight"] = w + m.delta().to(w.dtype)
        if f"{pre}base.bias" in sd:
            sd[f"{pre}bias"] = sd.pop(f"{pre}base.bias")
        sd.pop(f"{pre}lora_A")
        sd.pop(f"{pre}lora_B")
    return sd


def saved_adapters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """A checkpoint's `adapters` entry: `{"<layer>.weight": {"A", "B", "scale"}}`."""
    return {
        k: {"A": a, "B": b, "scale": float(sc)} for k, (a, b, sc) in adapter_factors(model).items()
    }


def restore_adapters(
    model: nn.Module,
    rank: int,
    base: Mapping[str, Tensor],
    fork_state: Mapping[str, Any],
) -> None:
    """Rebuild a fork that trains adapters from its checkpoint `fork_state`: the frozen base
    weights are `base` (the parent checkpoint's model; the fork's own `model` entry has the
    adapters folded in), buffers such as BatchNorm statistics come from the fork's
    checkpoint, then rank-`rank` adapters are added (as `add_adapters(skip_small=True)`) and
    loaded from its `adapters` factors `{"<layer>.weight": {"A": ..., "B": ...}}`. The
    optimizer is the caller's: its adapter parameters are the model's trainable ones."""
    model.load_state_dict(base)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in fork_state["model"].items():
            if k in buffers:
                buffers[k].copy_(v)
    factors: Mapping[str, Mapping[str, Tensor]] = fork_state["adapters"]
    add_adapters(model, rank, skip_small=True)
    with torch.no_grad():
        for n, m in _adapters(model):
            f = factors.get(f"{n}.weight")
            if f is not None:
                m.lora_A.copy_(f["A"])
                m.lora_B.copy_(f["B"])


AdapterDelta = Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, float]


def adapter_fuse(
    base_state: Mapping[str, Tensor],
    adapter_deltas: Sequence[Mapping[str, AdapterDelta]],
    weights: Sequence[float] | None = None,
) -> StateDict:
    """W' = W + sum_i w_i * delta_i for every adapted weight; other entries are copied.

    Each delta is a full tensor (from `adapter_deltas`, already scaled), `(A, B)` (scale
    1) or `(A, B, scale)` giving `scale * B @ A`. Names are state-dict keys
    ("fc.weight"); a module name ("fc") is accepted and means its ".weight".
    `weights` default to 1/n: the average of the forks' updates, which for one adapter is
    exactly the adapted model. Use weights of 1.0 for task-arithmetic style addition.
    """
    n = len(adapter_deltas)
    if n == 0:
        raise ValueError("adapter_fuse: no adapter deltas given")
    if weights is None:
        w = [1.0 / n] * n
    else:
        w = [float(x) for x in weights]
        if len(w) != n or any(not math.isfinite(x) for x in w):
            raise ValueError(f"adapter_fuse: need {n} finite weights, got {list(weights)}")
    out: StateDict = {k: v.detach().clone() for k, v in base_state.items()}
    acc: dict[str, Tensor] = {}
    for i, deltas in enumerate(adapter_deltas):
        for name, d in deltas.items():
            key = name if name in out else f"{name}.weight"
            if key not in out:
                raise ValueError(
                    f"adapter_fuse: adapter {i} targets {name!r}, which is not in the base state"
                )
            base = out[key]
            if isinstance(d, Tensor):
                delta = d.detach()
            elif isinstance(d, tuple) and len(d) in (2, 3):
                a, b = d[0].detach(), d[1].detach()
                scale = float(d[2]) if len(d) == 3 else 1.0
                if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                    raise ValueError(
                        f"adapter_fuse: adapter {i} {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                        "must be (r x in) and (out x r)"
                    )
                delta = (b.float() @ a.float()) * scale
            else:
                raise ValueError(
                    f"adapter_fuse: adapter {i} {name!r} must be a tensor, (A, B) or (A, B, scale)"
                )
            if delta.shape != base.shape:
                raise ValueError(
                    f"adapter_fuse: adapter {i} {name!r} has shape {tuple(delta.shape)}, the weight "
                    f"{key!r} has {tuple(base.shape)}"
                )
            prev = acc.get(key)
            term = delta.to(base.device, torch.float32) * w[i]
            acc[key] = term if prev is None else prev + term
    for key, total in acc.items():
        out[key] = (out[key].float() + total).to(out[key].dtype)
    return out


# --------------------------------------------------------------------------- distillation


def distill_step(student: nn.Module, teacher_logits: Tensor, x: Any, temperature: float) -> Tensor:
    """The distillation loss T^2 * KL(teacher_T || student_T) for one batch (with grad).

    `_T` is the softmax at temperature T; the T^2 factor keeps gradient sizes comparable
    across temperatures (Hinton et al., 2015). Logits have classes in the last dimension;
    leading dimensions (batch, sequence) are flattened and averaged over.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = _forward(student, x)
    if not isinstance(s, Tensor):
        raise ValueError(
            f"distill needs the student to return a logits tensor, got {type(s).__name__}"
        )
    if s.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(s.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    c = s.shape[-1]
    log_p_s = F.log_softmax(s.reshape(-1, c).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.reshape(-1, c).detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mse_step(student: nn.Module, teacher_out: Tensor, x: Any) -> Tensor:
    """The regression distillation loss for one batch (with grad): the mean squared error
    between the student's outputs and the teacher's (any shape, the same for both)."""
    s = _forward(student, x)
    if not isinstance(s, Tensor):
        raise ValueError(
            f"distill needs the student to return an output tensor, got {type(s).__name__}"
        )
    if s.shape != teacher_out.shape:
        raise ValueError(
            f"student outputs {tuple(s.shape)} and teacher outputs {tuple(teacher_out.shape)} differ"
        )
    return F.mse_loss(s.float(), teacher_out.detach().float())


OBJECTIVES = ("kl", "mse")
"""distill's objectives: "kl" to a classifier teacher's soft targets, "mse" to a regression
teacher's outputs."""


def _objective_step(
    objective: str, temperature: float
) -> Callable[[nn.Module, Tensor, Any], Tensor]:
    if objective == "kl":
        return lambda student, t, x: distill_step(student, t, x, temperature)
    if objective == "mse":
        return mse_step
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def kl_to_teacher(
    student: nn.Module,
    teacher_fn: Callable[[Any], Tensor],
    loader: Iterable[Any],
    temperature: float,
    device: torch.device | str,
    max_batches: int | None = None,
    batch_fn: BatchFn | None = None,
    objective: str = "kl",
) -> float:
    """Mean distillation loss (T^2 KL, or the MSE with objective="mse") of the student in
    eval mode over the loader."""
    step = _objective_step(objective, temperature)
    dev = torch.device(device)
    was = student.training
    student.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and n >= max_batches:
                    break
                x = to_device(_inputs(batch, batch_fn), dev)
                total += float(step(student, teacher_fn(x), x))
                n += 1
    finally:
        student.train(was)
    if n == 0:
        raise ValueError("kl_to_teacher: the loader yielded no batches")
    return total / n


def distill(
    student: nn.Module,
    teacher_fn: Callable[[Any], Tensor],
    loader: Iterable[Any],
    steps: int,
    lr: float,
    temperature: float,
    device: torch.device | str,
    batch_fn: BatchFn | None = None,
    eval_batches: int = 10,
    objective: str = "kl",
) -> float:
    """Train `student` toward `teacher_fn`'s soft targets for `steps` Adam steps.

    The caller initialises the student (normally a copy of the parent run's model, so
    distillation starts from the generalist and only has to absorb the specialists);
    this function only trains it. `teacher_fn(x) -> logits` runs under no_grad — an MoE,
    or an ensemble (pass log of the mean probabilities: log-probs are valid logits).
    With objective="mse" (a regression model) `teacher_fn(x)` returns the teacher's
    outputs (e.g. the ensemble's mean) and the student is fit to them by mean squared
    error; `temperature` is then unused. Returns the final loss to the teacher
    (`kl_to_teacher` on up to `eval_batches` batches after training).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = _objective_step(objective, temperature)
    dev = torch.device(device)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    was = student.training
    student.train()
    try:
        batches = _cycle(loader, "distill")
        for _ in range(steps):
            x = to_device(_inputs(next(batches), batch_fn), dev)
            with torch.no_grad():
                t = teacher_fn(x)
            loss = step(student, t, x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill: the loss became {loss.item()}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        student.train(was)
    return kl_to_teacher(
        student, teacher_fn, loader, temperature, dev, eval_batches, batch_fn, objective
    )
