"""The gate: a learned router over frozen experts, and a code-free model file format.

`MoE` mixes the parent run and its specialists with a small `SwitchGate` (softmax at a
temperature, with the Switch-Transformer load-balance loss), `train_gate` fits only the
router, and `export_moe` / `export_model` / `load_model` write and read ONE file that
loads with `torch.load(weights_only=True)` — without the supervisor, and without
unpickling any code.

Because weights_only refuses pickled modules, a file stores, per model, its state dict
and a declarative *module spec*: nested `{"type": "Linear", "args": {...}}` dicts over an
allowlist of standard torch.nn layers. A custom nn.Module cannot be described that way;
for it the exporter takes `factory="package.module:callable"`, and the loader imports
and calls that only when asked to with `load_model(path, allow_import=True)` — the same
trust decision as running the package's code.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onthefly_worker.data import batch_len, split_batch, to_device
from onthefly_worker.merge_math import LoRALinear, take_rows

GateInput = Literal["input", "expert_outputs"]

FORMAT_MODEL = "onthefly.model/1"
"""Format tag of a single-model file."""
FORMAT_MOE = "onthefly.moe/1"
"""Format tag of a mixture-of-experts file."""


# --------------------------------------------------------------------------- the gate


class SwitchGate(nn.Module):
    """Router: probabilities over experts, softmax(router(x) / temperature).

    `hidden=0` is a linear router; `hidden>0` adds one ReLU hidden layer. The last layer
    starts at zero, so an untrained gate is the uniform ensemble of its experts: training
    can only start from (and improve on) plain averaging.
    """

    def __init__(
        self, in_features: int, n_experts: int, hidden: int = 0, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if in_features < 1 or n_experts < 1 or hidden < 0:
            raise ValueError(
                f"SwitchGate needs in_features >= 1, n_experts >= 1, hidden >= 0; got "
                f"{in_features}, {n_experts}, {hidden}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_features = in_features
        self.n_experts = n_experts
        self.hidden = hidden
        self.router: nn.Module
        last: nn.Linear
        if hidden:
            last = nn.Linear(hidden, n_experts)
            self.router = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), last)
        else:
            last = nn.Linear(in_features, n_experts)
            self.router = last
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        # A buffer, so it travels with the state dict and can be tuned after training.
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def logits(self, x: Tensor) -> Tensor:
        return self.router(x)

    def forward(self, x: Tensor) -> Tensor:
        t = self.temperature
        assert isinstance(t, Tensor)
        return F.softmax(self.router(x) / t, dim=-1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, for the model file."""
        t = self.temperature
        assert isinstance(t, Tensor)
        return {
            "in_features": self.in_features,
            "n_experts": self.n_experts,
            "hidden": self.hidden,
            "temperature": float(t),
        }


def _rows(t: Tensor) -> Tensor:
    """(B, ...) -> (B, features); explicit sizes, because reshape(0, -1) is ambiguous."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def balance_loss(probs: Tensor) -> Tensor:
    """Switch-Transformer load-balance loss n * sum_e f_e * P_e of gate probabilities (B, n).

    f_e is the fraction of rows whose top-1 is e (not differentiable), P_e the mean
    probability of e: 1 for perfectly balanced routing, n when every row goes to one expert.
    """
    n = probs.shape[-1]
    frac = F.one_hot(probs.argmax(dim=-1), n).to(probs.dtype).mean(dim=0)
    return n * (frac.detach() * probs.mean(dim=0)).sum()


def mix(probs: Tensor, stacked: Tensor) -> Tensor:
    """The soft mixture: sum_e probs[:, e] * stacked[:, e, ...] for expert outputs (B, E, ...)."""
    p = probs.to(stacked.dtype).reshape(probs.shape + (1,) * (stacked.dim() - 2))
    return (p * stacked).sum(dim=1)


class MoE(nn.Module):
    """A soft mixture of experts: y = sum_e gate_e(x) * expert_e(x).

    * `gate_input="input"`: the router sees the flattened input (float inputs of a fixed
      size). `"expert_outputs"`: it sees the concatenated, detached expert outputs — for
      inputs a linear router cannot use (token ids, large images).
    * `hard=True` switches to top-1 routing in eval mode: each sample gets exactly its
      chosen expert's output (not scaled by the gate), and with `gate_input="input"` only
      that expert runs on it. Training always uses the soft mixture (it is differentiable).
    * After every forward, `last_aux_loss` holds the load-balance loss
      n_experts * sum_e f_e * P_e (f_e: fraction of samples whose top-1 is e; P_e: mean
      gate probability of e). It is 1 for perfectly balanced routing, n_experts when all
      samples go to one expert. `last_gate` holds the detached gate probabilities.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gate: SwitchGate,
        gate_input: GateInput = "input",
        hard: bool = False,
    ) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("MoE needs at least one expert")
        if gate.n_experts != len(experts):
            raise ValueError(
                f"the gate routes over {gate.n_experts} experts but {len(experts)} were given"
            )
        if gate_input not in ("input", "expert_outputs"):
            raise ValueError(f"gate_input must be 'input' or 'expert_outputs', got {gate_input!r}")
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.gate_input: GateInput = gate_input
        self.hard = hard
        self.last_aux_loss: Tensor | None = None
        self.last_gate: Tensor | None = None

    def _route_features(self, x: Any, outs: list[Tensor] | None) -> Tensor:
        if self.gate_input == "input":
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"gate_input='input' needs one tensor input (batch first), got "
                    f"{type(x).__name__}; use gate_input='expert_outputs'"
                )
            if not x.is_floating_point():
                raise ValueError(
                    f"gate_input='input' needs float inputs, got {x.dtype}; use "
                    "gate_input='expert_outputs' for token ids"
                )
            feats = _rows(x)
        else:
            assert outs is not None
            feats = torch.cat([_rows(o.detach()) for o in outs], dim=1)
        if feats.shape[1] != self.gate.in_features:
            raise ValueError(
                f"the gate expects {self.gate.in_features} features per sample, the "
                f"{self.gate_input} gives {feats.shape[1]}"
            )
        w = next(self.gate.parameters())
        return feats.to(w.dtype)

    def _expert_outputs(self, x: Any) -> list[Tensor]:
        outs = []
        for i, e in enumerate(self.experts):
            o = e(x)
            if not isinstance(o, Tensor):
                raise ValueError(
                    f"expert {i} returned {type(o).__name__}; MoE experts must return one tensor"
                )
            outs.append(o)
        for i, o in enumerate(outs[1:], start=1):
            if o.shape != outs[0].shape:
                raise ValueError(
                    f"expert {i} output {tuple(o.shape)} differs from expert 0's {tuple(outs[0].shape)}"
                )
        return outs

    def forward(self, x: Any) -> Tensor:
        """`x`: the experts' input as training gives it to the model (a tensor, or a dict or
        tuple the model unpacks; batch dimension first)."""
        hard = self.hard and not self.training
        outs: list[Tensor] | None = None
        if self.gate_input == "expert_outputs" or not hard or batch_len(x) == 0:
            # (An empty batch has no rows to route; running every expert on it gives the
            # output shape.)
            outs = self._expert_outputs(x)
        probs = self.gate(self._route_features(x, outs))
        top = probs.argmax(dim=-1)
        self.last_aux_loss = balance_loss(probs)
        self.last_gate = probs.detach()
        if hard:
            return self._switch(x, top, outs)
        assert outs is not None
        return mix(probs, torch.stack(outs, dim=1))

    def _switch(self, x: Any, top: Tensor, outs: list[Tensor] | None) -> Tensor:
        if outs is not None:
            stacked = torch.stack(outs, dim=1)
            idx = top.reshape((-1, 1) + (1,) * (stacked.dim() - 2)).expand(
                (-1, 1) + tuple(stacked.shape[2:])
            )
            return stacked.gather(1, idx).squeeze(1)
        result: Tensor | None = None
        for e, expert in enumerate(self.experts):
            rows = (top == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = expert(take_rows(x, rows))
            if result is None:
                result = y.new_empty((batch_len(x),) + tuple(y.shape[1:]))
            result[rows] = y
        assert result is not None  # every row has a top-1 expert
        return result


@dataclass
class GateHistory:
    """What `train_gate` did, step by step, and the compute it spent."""

    task_loss: list[float] = field(default_factory=list)
    """Mean task loss of the MoE output on each step's batch."""
    aux_loss: list[float] = field(default_factory=list)
    """Load-balance loss on each step (1 = balanced)."""
    usage: list[float] = field(default_factory=list)
    """Fraction of the last step's samples routed (top-1) to each expert."""
    cached: bool = False
    """True when the experts ran once over the data and the router trained on their stored
    outputs; False when every step ran the experts again (data too large to store)."""
    expert_samples: int = 0
    """Samples that went through (every one of) the frozen experts' forward pass."""
    router_samples: int = 0
    """Samples that went through a router training step (forward + backward)."""


DEFAULT_CACHE_BYTES = 256 << 20
"""train_gate stores the experts' outputs (and the router's inputs and the targets) for
data sets up to this size and then trains the router on the stored tensors; larger data
sets stream (the experts run on every step)."""


def router_hidden(
    in_features: int, n_experts: int, expert_params: int, cap: int = 32, share: float = 0.25
) -> int:
    """Width of the router's hidden layer: `cap`, shrunk so the router keeps at most `share`
    of one expert's parameter count (a router as large as its experts would cost as much as
    they do, to train and to run); 0 (a linear router) when not even 2 units fit."""
    if in_features < 1 or n_experts < 1 or cap < 0 or not share > 0:
        raise ValueError(
            f"router_hidden needs in_features, n_experts >= 1, cap >= 0, share > 0; got "
            f"{in_features}, {n_experts}, {cap}, {share}"
        )
    # Parameters of a one-hidden-layer router: (in + 1) * h + (h + 1) * n.
    fit = int((share * expert_params - n_experts) // (in_features + 1 + n_experts))
    h = min(cap, fit)
    return h if h >= 2 else 0


def gate_sample_steps(moe: MoE, hist: GateHistory) -> int:
    """Compute of a gate training in training-sample-steps of one expert, for matched-compute
    comparisons: each frozen expert's forward on a sample is 1/3 of a training step (forward
    + 2x backward); a router training step on a sample counts as a training step scaled by
    the router's parameter count over an expert's (mean over the experts)."""
    n = len(moe.experts)
    expert_params = sum(p.numel() for p in moe.experts.parameters()) / max(1, n)
    router_params = sum(p.numel() for p in moe.gate.parameters())
    experts = hist.expert_samples * n / 3
    router = hist.router_samples * router_params / max(1.0, expert_params)
    return int(math.ceil(experts + router))


def _take(batch: Any, batch_fn: Callable[[Any], tuple[Any, Any]] | None) -> tuple[Any, Any]:
    return batch_fn(batch) if batch_fn is not None else split_batch(batch)


def _cache_outputs(
    moe: MoE,
    loader: Iterable[Any],
    dev: torch.device,
    batch_fn: Callable[[Any], tuple[Any, Any]] | None,
    limit: int,
) -> tuple[tuple[Tensor, Tensor, Tensor] | None, int, int]:
    """One pass of the frozen experts over the loader: (router inputs, stacked expert
    outputs, targets), or None when they would exceed `limit` bytes or the targets are not
    tensors; plus the samples the experts ran on and the first batch's size."""
    feats: list[Tensor] = []
    outs: list[Tensor] = []
    ys: list[Tensor] = []
    used = seen = first = 0
    with torch.no_grad():
        for batch in loader:
            x, y = _take(batch, batch_fn)
            x, y = to_device(x, dev), to_device(y, dev)
            if not isinstance(y, Tensor):
                return None, seen, first
            o = moe._expert_outputs(x)
            f = moe._route_features(x, o)
            st = torch.stack(o, dim=1)
            seen += batch_len(x)
            first = first or batch_len(x)
            used += sum(t.numel() * t.element_size() for t in (f, st, y))
            if used > limit:
                return None, seen, first
            feats.append(f)
            outs.append(st)
            ys.append(y)
    if not feats:
        raise ValueError("train_gate: the loader yielded no batches")
    return (torch.cat(feats), torch.cat(outs), torch.cat(ys)), seen, first


def train_gate(
    moe: MoE,
    loader: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    lr: float,
    balance_weight: float = 0.01,
    device: torch.device | str = "cpu",
    batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    seed: int = 0,
) -> GateHistory:
    """Fit only the router: loss = mean(loss_fn(moe(x), y)) + balance_weight * aux.

    The experts are frozen and kept in eval mode (their BatchNorm statistics and dropout
    must behave as they will at inference); their `requires_grad` flags and modes are
    restored afterwards. `loss_fn` may return per-sample losses or a scalar.

    Frozen experts in eval mode give the same output for the same input every time, so
    when the data fit in `cache_bytes` they run ONCE over the loader and the router
    trains on their stored outputs (minibatches of the loader's first batch size,
    reshuffled each epoch by `seed`): the experts cost one forward per sample instead of
    one per sample per step. A loader with random augmentation is then seen with one
    draw of it. Otherwise (or with `cache_bytes=0`) every step runs the experts.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if balance_weight < 0:
        raise ValueError(f"balance_weight must be >= 0, got {balance_weight}")
    dev = torch.device(device)
    flags = [(p, p.requires_grad) for p in moe.experts.parameters()]
    modes = {m: m.training for m in moe.modules()}
    for p, _ in flags:
        p.requires_grad_(False)
    opt = torch.optim.Adam(moe.gate.parameters(), lr=lr)
    hist = GateHistory()

    def update(probs: Tensor, out: Tensor, y: Tensor) -> None:
        task = loss_fn(out, y)
        task = task.mean() if task.dim() > 0 else task
        aux = moe.last_aux_loss
        assert aux is not None
        loss = task + balance_weight * aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_gate: the loss became {loss.item()}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.task_loss.append(task.item())
        hist.aux_loss.append(aux.item())
        hist.router_samples += int(probs.shape[0])

    try:
        moe.train()
        moe.experts.eval()
        cache: tuple[Tensor, Tensor, Tensor] | None = None
        bs = 1
        if cache_bytes > 0:
            cache, hist.expert_samples, bs = _cache_outputs(moe, loader, dev, batch_fn, cache_bytes)
        if cache is not None:
            hist.cached = True
            feats, stacked, ys = cache
            g = torch.Generator().manual_seed(seed)
            n = feats.shape[0]
            bs = max(1, min(bs, n))
            order = torch.randperm(n, generator=g)
            at = 0
            for _ in range(steps):
                if at + bs > n:  # a new epoch (a short tail would be a noisy step)
                    order, at = torch.randperm(n, generator=g), 0
                rows = order[at : at + bs].to(dev)
                at += bs
                probs = moe.gate(feats[rows])
                moe.last_aux_loss = balance_loss(probs)
                moe.last_gate = probs.detach()
                update(probs, mix(probs, stacked[rows]), ys[rows])
        else:
            step = 0
            while step < steps:
                empty = True
                for batch in loader:
                    empty = False
                    x, y = _take(batch, batch_fn)
                    x, y = to_device(x, dev), to_device(y, dev)
                    out = moe(x)
                    assert moe.last_gate is not None
                    hist.expert_samples += int(moe.last_gate.shape[0])
                    update(moe.last_gate, out, y)
                    step += 1
                    if step >= steps:
                        break
                if empty:
                    raise ValueError("train_gate: the loader yielded no batches")
        if moe.last_gate is not None:
            top = moe.last_gate.argmax(dim=-1)
            hist.usage = F.one_hot(top, moe.gate.n_experts).float().mean(dim=0).tolist()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, mode in modes.items():
            m.training = mode
    return hist


# --------------------------------------------------------------------------- module specs

_BIAS = "__bias__"  # argument read as `module.bias is not None`


def _args(*names: str) -> tuple[str, ...]:
    return names


_CONV = _args(
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    _BIAS,
    "padding_mode",
)
_CONVT = _args(
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "output_padding",
    "groups",
    _BIAS,
    "dilation",
    "padding_mode",
)
_BN = _args("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAXPOOL = _args("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")

_LEAVES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, _args("in_features", "out_features", _BIAS)),
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "Conv3d": (nn.Conv3d, _CONV),
    "ConvTranspose1d": (nn.ConvTranspose1d, _CONVT),
    "ConvTranspose2d": (nn.ConvTranspose2d, _CONVT),
    "BatchNorm1d": (nn.BatchNorm1d, _BN),
    "BatchNorm2d": (nn.BatchNorm2d, _BN),
    "BatchNorm3d": (nn.BatchNorm3d, _BN),
    "LayerNorm": (nn.LayerNorm, _args("normalized_shape", "eps", "elementwise_affine", _BIAS)),
    "GroupNorm": (nn.GroupNorm, _args("num_groups", "num_channels", "eps", "affine")),
    "Embedding": (
        nn.Embedding,
        _args(
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ),
    ),
    "Dropout": (nn.Dropout, _args("p", "inplace")),
    "Dropout1d": (nn.Dropout1d, _args("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, _args("p", "inplace")),
    "ReLU": (nn.ReLU, _args("inplace")),
    "ReLU6": (nn.ReLU6, _args("inplace")),
    "LeakyReLU": (nn.LeakyReLU, _args("negative_slope", "inplace")),
    "ELU": (nn.ELU, _args("alpha", "inplace")),
    "GELU": (nn.GELU, _args("approximate")),
    "SiLU": (nn.SiLU, _args("inplace")),
    "Mish": (nn.Mish, _args("inplace")),
    "Hardswish": (nn.Hardswish, _args("inplace")),
    "Tanh": (nn.Tanh, _args()),
    "Sigmoid": (nn.Sigmoid, _args()),
    "Softplus": (nn.Softplus, _args("beta", "threshold")),
    "Softmax": (nn.Softmax, _args("dim")),
    "LogSoftmax": (nn.LogSoftmax, _args("dim")),
    "Identity": (nn.Identity, _args()),
    "Flatten": (nn.Flatten, _args("start_dim", "end_dim")),
    "Unflatten": (nn.Unflatten, _args("dim", "unflattened_size")),
    "MaxPool1d": (nn.MaxPool1d, _MAXPOOL),
    "MaxPool2d": (nn.MaxPool2d, _MAXPOOL),
    "AvgPool1d": (
        nn.AvgPool1d,
        _args("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    ),
    "AvgPool2d": (
        nn.AvgPool2d,
        _args(
            "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"
        ),
    ),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, _args("output_size")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _args("output_size")),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, _args("output_size", "return_indices")),
}
_CONTAINERS: dict[str, type[nn.Module]] = {
    "Sequential": nn.Sequential,
    "ModuleList": nn.ModuleList,
    "ModuleDict": nn.ModuleDict,
}
SUPPORTED_MODULES = tuple(sorted(_LEAVES) + sorted(_CONTAINERS))
"""torch.nn classes `module_to_spec` can describe (exact classes, not subclasses)."""

_MAX_DEPTH = 64


def _plain(value: Any, where: str) -> Any:
    """Constructor arguments as plain data (what weights_only can store), or a clear error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_plain(v, where) for v in value)
    raise ValueError(
        f"{where}: argument value {value!r} of type {type(value).__name__} is not plain data"
    )


class UnsupportedModule(ValueError):
    """A module that `module_to_spec` cannot describe; `summary` says which and why, without
    the advice (the CLI and the Python API phrase that differently)."""

    def __init__(self, summary: str) -> None:
        self.summary = summary
        super().__init__(
            f"{summary}. For a custom model pass factory='package.module:callable' (an "
            "importable function that builds it) to export_model/export_moe"
        )


def _unsupported(path: str, module: nn.Module, why: str) -> UnsupportedModule:
    cls = type(module)
    return UnsupportedModule(
        f"cannot describe module {path or '<root>'!r} of class {cls.__module__}.{cls.__qualname__} as a "
        f"spec: {why} (the {len(SUPPORTED_MODULES)} torch.nn classes in "
        "onthefly_worker.moe.SUPPORTED_MODULES, e.g. Linear, Conv2d, BatchNorm2d, Sequential, "
        "are rebuilt without your code)"
    )


def module_to_spec(module: nn.Module, _path: str = "", _depth: int = 0) -> dict[str, Any]:
    """A declarative spec that `spec_to_module` rebuilds (without weights) into the same module.

    Only exact torch.nn classes from SUPPORTED_MODULES qualify (a subclass may override
    forward); modules with hooks are refused because a spec cannot carry them. Raises
    ValueError naming the first module that cannot be described.
    """
    if _depth > _MAX_DEPTH:
        raise ValueError(f"module nesting deeper than {_MAX_DEPTH} at {_path!r}")
    name = type(module).__name__
    if isinstance(module, LoRALinear):
        raise ValueError(
            f"module {_path or '<root>'!r} still carries LoRA adapters; call merge_adapters(model) "
            "before exporting"
        )
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        raise _unsupported(_path, module, "it has hooks, which a spec cannot carry")
    if name in _CONTAINERS and type(module) is _CONTAINERS[name]:
        children = [
            [
                child_name,
                module_to_spec(child, f"{_path}.{child_name}" if _path else child_name, _depth + 1),
            ]
            for child_name, child in module.named_children()
        ]
        return {"type": name, "children": children}
    if name in _LEAVES and type(module) is _LEAVES[name][0]:
        if next(module.children(), None) is not None:
            raise _unsupported(_path, module, "it has extra submodules")
        args: dict[str, Any] = {}
        for arg in _LEAVES[name][1]:
            if arg == _BIAS:
                args["bias"] = getattr(module, "bias", None) is not None
            else:
                args[arg] = _plain(getattr(module, arg), f"{_path or '<root>'}.{arg}")
        return {"type": name, "args": args}
    raise _unsupported(_path, module, "it is not one of the supported torch.nn classes")


def spec_to_module(spec: Mapping[str, Any], _depth: int = 0) -> nn.Module:
    """Build the module a spec describes (fresh weights). Never imports or runs other code."""
    if _depth > _MAX_DEPTH:
        raise ValueError(f"module spec nesting deeper than {_MAX_DEPTH}")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise ValueError(f"a module spec must be a dict with a 'type' string, got {spec!r:.200}")
    name = spec["type"]
    if name in _CONTAINERS:
        container = _CONTAINERS[name]()
        children = spec.get("children", [])
        if not isinstance(children, (list, tuple)):
            raise ValueError(f"{name} spec: 'children' must be a list of [name, spec]")
        for i, item in enumerate(children):
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not isinstance(item[0], str)
            ):
                raise ValueError(f"{name} spec: child {i} must be [name, spec]")
            if name == "ModuleList" and item[0] != str(i):
                raise ValueError(
                    f"ModuleList spec: child {i} is named {item[0]!r}, expected {str(i)!r}"
                )
            container.add_module(item[0], spec_to_module(item[1], _depth + 1))
        return container
    if name not in _LEAVES:
        raise ValueError(
            f"module spec type {name!r} is not supported; supported: {', '.join(SUPPORTED_MODULES)}"
        )
    cls, allowed = _LEAVES[name]
    args = spec.get("args", {})
    if not isinstance(args, Mapping):
        raise ValueError(f"{name} spec: 'args' must be a dict")
    valid = {"bias" if a == _BIAS else a for a in allowed}
    unknown = sorted(set(args) - valid)
    if unknown:
        raise ValueError(f"{name} spec: unknown argument(s) {unknown}; valid: {sorted(valid)}")
    clean = {k: _plain(v, f"{name}.{k}") for k, v in args.items()}
    return cls(**clean)


# --------------------------------------------------------------------------- files


def _check_factory(factory: str) -> None:
    mod, sep, attr = factory.partition(":")
    if (
        not sep
        or not mod
        or not attr
        or not all(p.isidentifier() for p in mod.split(".") + attr.split("."))
    ):
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")


def _plain_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if not isinstance(k, str):
            raise ValueError(f"factory kwargs keys must be strings, got {k!r}")
        out[k] = _plain_value(v, f"factory kwargs[{k!r}]")
    return out


def _plain_value(v: Any, where: str) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain_value(x, where) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain_value(x, where) for x in v]
    return _plain(v, where)


def _import_factory(factory: str) -> Callable[..., nn.Module]:
    _check_factory(factory)
    mod_name, _, attr = factory.partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory {factory!r} is not callable")
    factory_fn: Callable[..., nn.Module] = obj
    return factory_fn


def _check_shapes(module: nn.Module, state: Mapping[str, Any], what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: the stored state is not a dict of tensors")
    stored = {k: tuple(v.shape) for k, v in state.items()}
    if expected != stored:
        diff = sorted(
            k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k)
        )
        k = diff[0]
        raise ValueError(
            f"{what}: the stored weights do not fit the module spec ({len(diff)} mismatch(es); "
            f"first {k!r}: spec {expected.get(k)}, stored {stored.get(k)})"
        )


def _build(entry: Mapping[str, Any], what: str, allow_import: bool) -> nn.Module:
    factory = entry.get("factory")
    if factory is not None:
        if not allow_import:
            raise ValueError(
                f"{what} is built by the factory {factory!r}; loading it imports and runs that code. "
                "Pass allow_import=True if you trust it"
            )
        module = _import_factory(str(factory))(**dict(entry.get("factory_kwargs") or {}))
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"factory {factory!r} returned {type(module).__name__}, not an nn.Module"
            )
    else:
        # Check the spec against the stored weights on the meta device first (no memory):
        # a damaged or hostile file then fails with a clear message instead of
        # allocating whatever sizes it names.
        with torch.device("meta"):
            probe = spec_to_module(entry["spec"])
        _check_shapes(probe, entry["state"], what)
        module = spec_to_module(entry["spec"])
    state = entry["state"]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{what}: the stored weights do not fit the rebuilt module: {exc}"
        ) from exc
    return module


def _entry(module: nn.Module, what: str, how: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """One stored model: its spec or factory, and its weights on CPU."""
    entry: dict[str, Any] = {"spec": None, "factory": None, "factory_kwargs": {}}
    if isinstance(how, str):
        _check_factory(how)
        entry["factory"] = how
    elif isinstance(how, Mapping) and "factory" in how:
        _check_factory(str(how["factory"]))
        entry["factory"] = str(how["factory"])
        entry["factory_kwargs"] = _plain_kwargs(how.get("kwargs"))
    elif isinstance(how, Mapping):
        entry["spec"] = dict(how)
    elif how is None:
        try:
            entry["spec"] = module_to_spec(module)
        except UnsupportedModule as exc:
            raise UnsupportedModule(f"{what}: {exc.summary}") from exc
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from exc
    else:
        raise ValueError(
            f"{what}: expected a module spec dict, a factory string or None, got {type(how).__name__}"
        )
    entry["state"] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    # Rebuild now, so a file that would not load is never written. A factory is the
    # caller's own code, named by the caller, so importing it here is no new trust.
    _build(entry, what, allow_import=True)
    return entry


def _save_atomic(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Write one model as one file (an MoE goes through `export_moe`).

    Without `factory`, the architecture is stored as a module spec (ValueError naming
    the first unsupported class otherwise). With `factory="package.module:callable"`
    (plus plain-data `factory_kwargs`) the loader rebuilds it by calling that — opt-in
    code execution, see `load_model(allow_import=True)`.
    """
    if isinstance(model, MoE):
        if factory is not None:
            raise ValueError("export an MoE with export_moe(moe, path, expert_specs=[...])")
        export_moe(model, path)
        return
    how: Mapping[str, Any] | str | None = None
    if factory is not None:
        how = {"factory": factory, "kwargs": dict(factory_kwargs or {})}
    payload = {
        "format": FORMAT_MODEL,
        "torch": str(torch.__version__),
        "model": _entry(model, "model", how),
    }
    _save_atomic(payload, path)


def export_moe(
    moe: MoE,
    path: str | os.PathLike[str],
    expert_specs: Sequence[Mapping[str, Any] | str | None] | None = None,
) -> None:
    """Write an MoE (experts, gate, routing mode) as one weights_only-loadable file.

    `expert_specs[i]` says how to rebuild expert i: None (derive a module spec), a module
    spec dict, a factory string "package.module:callable", or
    `{"factory": "...", "kwargs": {...}}`.
    """
    n = len(moe.experts)
    specs: Sequence[Mapping[str, Any] | str | None] = (
        [None] * n if expert_specs is None else expert_specs
    )
    if len(specs) != n:
        raise ValueError(f"got {len(specs)} expert specs for {n} experts")
    experts = [_entry(e, f"expert {i}", specs[i]) for i, e in enumerate(moe.experts)]
    gate_state = {k: v.detach().cpu().clone() for k, v in moe.gate.state_dict().items()}
    payload = {
        "format": FORMAT_MOE,
        "torch": str(torch.__version__),
        "experts": experts,
        "gate": {"config": moe.gate.config(), "state": gate_state},
        "gate_input": moe.gate_input,
        "hard": bool(moe.hard),
    }
    _save_atomic(payload, path)


def load_model(
    path: str | os.PathLike[str],
    allow_import: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a file written by export_model / export_moe, in eval mode on `device`.

    The file is read with `torch.load(weights_only=True)`, so reading it never runs code.
    Only a file that names a factory needs `allow_import=True`, which imports that module
    and calls the factory: do that only for files you trust.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT_MODEL, FORMAT_MOE):
        tag = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{os.fspath(path)!r} is not an OnTheFly model file (format {tag!r}; expected "
            f"{FORMAT_MODEL!r} or {FORMAT_MOE!r})"
        )
    model: nn.Module
    if payload["format"] == FORMAT_MODEL:
        model = _build(payload["model"], "model", allow_import)
    else:
        experts = [_build(e, f"expert {i}", allow_import) for i, e in enumerate(payload["experts"])]
        gate = SwitchGate(**payload["gate"]["config"])
        gate.load_state_dict(payload["gate"]["state"], strict=True)
        model = MoE(experts, gate, gate_input=payload["gate_input"], hard=bool(payload["hard"]))
    return model.to(device).eval()
