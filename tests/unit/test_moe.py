"""The gate (SwitchGate/MoE/train_gate) and the code-free model file format."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.moe import (
    FORMAT_MOE,
    GateInput,
    MoE,
    SwitchGate,
    export_model,
    export_moe,
    gate_sample_steps,
    load_model,
    module_to_spec,
    router_hidden,
    spec_to_module,
    train_gate,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the gate

W_LEFT = torch.tensor([[2.0], [-1.0]])
W_RIGHT = torch.tensor([[-3.0], [0.5]])


def _two_regimes(n: int = 512, seed: int = 0) -> tuple[Tensor, Tensor]:
    """y = x W_LEFT where x0 < 0, x W_RIGHT where x0 >= 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = torch.where(x[:, :1] < 0, x @ W_LEFT, x @ W_RIGHT)
    return x, y


def _expert(w: Tensor) -> nn.Linear:
    e = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        e.weight.copy_(w.T)
    return e


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean(dim=1)


def _moe(hidden: int = 0, gate_input: GateInput = "input") -> MoE:
    torch.manual_seed(0)
    # Two input dimensions, or two experts with one output each: 2 features either way.
    gate = SwitchGate(2, 2, hidden=hidden, temperature=0.5)
    return MoE([_expert(W_LEFT), _expert(W_RIGHT)], gate, gate_input=gate_input)


def test_untrained_gate_is_the_uniform_ensemble_with_unit_balance_loss() -> None:
    moe = _moe()
    x, _ = _two_regimes(16)
    out = moe(x)
    mean = (moe.experts[0](x) + moe.experts[1](x)) / 2
    assert torch.allclose(out, mean, atol=1e-6)
    assert moe.last_aux_loss is not None and moe.last_aux_loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0], ids=["cached", "streaming"])
@pytest.mark.parametrize("gate_input", ["input", "expert_outputs"])
def test_gate_training_beats_either_expert_alone(gate_input: GateInput, cache_bytes: int) -> None:
    moe = _moe(hidden=8, gate_input=gate_input)
    x, y = _two_regimes()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    frozen = [p.clone() for p in moe.experts.parameters()]
    hist = train_gate(
        moe,
        loader,
        _mse,
        steps=300,
        lr=0.05,
        balance_weight=0.01,
        device="cpu",
        cache_bytes=cache_bytes,
    )
    assert len(hist.task_loss) == 300 and len(hist.aux_loss) == 300 and len(hist.usage) == 2
    assert hist.cached is (cache_bytes > 0)
    assert hist.router_samples == 300 * 64
    # Cached: the experts ran once over the 512 samples; streaming: on every step's batch.
    assert hist.expert_samples == (512 if cache_bytes else 300 * 64)
    assert all(torch.equal(a, b) for a, b in zip(frozen, moe.experts.parameters(), strict=True))
    assert all(p.requires_grad for p in moe.experts.parameters())  # flags restored

    moe.eval()
    xt, yt = _two_regimes(1000, seed=1)
    with torch.no_grad():
        gated = _mse(moe(xt), yt).mean().item()
        left = _mse(moe.experts[0](xt), yt).mean().item()
        right = _mse(moe.experts[1](xt), yt).mean().item()
        moe.hard = True
        switched = _mse(moe(xt), yt).mean().item()
    print(
        f"gate {gate_input}: gated {gated:.4f} switched {switched:.4f} left {left:.4f} right {right:.4f}"
    )
    assert gated < 0.2 * min(left, right), (gated, left, right)
    assert switched < 0.2 * min(left, right), (switched, left, right)
    assert hist.task_loss[-1] < hist.task_loss[0]


class _Counting(nn.Module):
    """A frozen linear expert that counts the samples it ran on."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.lin = _expert(w)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += x.shape[0]
        return self.lin(x)


def test_cached_gate_training_runs_the_experts_once_and_matches_streaming_routing() -> None:
    x, y = _two_regimes(256)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    experts = [_Counting(W_LEFT), _Counting(W_RIGHT)]
    torch.manual_seed(0)
    moe = MoE(experts, SwitchGate(2, 2, hidden=8, temperature=0.5))
    hist = train_gate(moe, loader, _mse, steps=200, lr=0.05, seed=3)
    assert hist.cached
    assert [e.calls for e in experts] == [256, 256]  # one pass, not 200 x 32 samples
    # The router still learned the split: each regime goes to its own expert.
    xt, _ = _two_regimes(200, seed=5)
    with torch.no_grad():
        top = moe.gate(xt).argmax(dim=1)
    right = xt[:, 0] >= 0
    assert (top == right.long()).float().mean().item() > 0.9


def test_gate_falls_back_to_streaming_when_the_cache_would_be_too_large() -> None:
    x, y = _two_regimes(256)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    moe = _moe(hidden=4)
    hist = train_gate(moe, loader, _mse, steps=20, lr=0.05, cache_bytes=100)
    assert not hist.cached and len(hist.task_loss) == 20
    # The batches tried for the cache count too: one batch before the limit, then 20 steps.
    assert hist.expert_samples == 32 + 20 * 32


def test_gate_sample_steps_counts_expert_forwards_and_the_router() -> None:
    moe = _moe(hidden=0)  # two 2-parameter experts; a 2x2 router + 2 biases = 6 parameters
    hist = train_gate(
        moe, DataLoader(TensorDataset(*_two_regimes(96)), batch_size=32), _mse, steps=10, lr=0.01
    )
    assert (hist.expert_samples, hist.router_samples) == (96, 320)
    # experts: 96 samples x 2 experts / 3; router: 320 samples x 6 / 2 parameters.
    assert gate_sample_steps(moe, hist) == 64 + 960


def test_router_hidden_stays_small_next_to_the_experts() -> None:
    assert router_hidden(64, 3, 40_000) == 32  # big experts: the cap
    # (in + 1) * h + (h + 1) * n <= share * expert params: (2 + 1) * 6 + 7 * 3 = 39 <= 42.
    assert router_hidden(2, 3, 168) == 6
    assert router_hidden(2, 3, 20) == 0  # not even 2 units fit: a linear router
    with pytest.raises(ValueError):
        router_hidden(0, 3, 100)


def test_hard_mode_runs_only_the_chosen_expert() -> None:
    calls = [0, 0]

    class Counting(nn.Module):
        def __init__(self, i: int, value: float) -> None:
            super().__init__()
            self.i, self.value = i, value

        def forward(self, x: Tensor) -> Tensor:
            calls[self.i] += x.shape[0]
            return torch.full((x.shape[0], 1), self.value)

    gate = SwitchGate(2, 2)
    with torch.no_grad():
        assert isinstance(gate.router, nn.Linear)
        gate.router.weight.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
    moe = MoE([Counting(0, -1.0), Counting(1, 1.0)], gate, hard=True).eval()
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    out = moe(x)
    assert out.squeeze(1).tolist() == [-1.0, 1.0, 1.0]
    assert calls == [1, 2]


def test_moe_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="routes over 3 experts"):
        MoE([nn.Identity()], SwitchGate(2, 3))
    moe = MoE([nn.Identity(), nn.Identity()], SwitchGate(3, 2))
    with pytest.raises(ValueError, match="expects 3 features"):
        moe(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="float inputs"):
        moe(torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- module specs


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, kernel_size=(3, 1), stride=1, padding="same", groups=2),
        nn.GELU(approximate="tanh"),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.LayerNorm(6, eps=1e-3),
        nn.Dropout(0.3),
        nn.Linear(6, 5),
        nn.LeakyReLU(0.2),
        nn.Sequential(nn.Linear(5, 3), nn.SiLU(), nn.Identity(), nn.Tanh(), nn.Sigmoid()),
        nn.Softmax(dim=-1),
    )


def test_module_spec_round_trip_gives_identical_outputs() -> None:
    model = _convnet()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # non-trivial BN running stats
    model.eval()
    spec = module_to_spec(model)
    rebuilt = spec_to_module(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(rebuilt(x), model(x))
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]


def test_module_spec_containers_and_embeddings() -> None:
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 4, padding_idx=0),
            "blocks": nn.ModuleList([nn.Linear(4, 4), nn.Conv1d(4, 2, 3), nn.BatchNorm1d(2)]),
            "named": nn.Sequential(),
        }
    )
    model["named"].add_module("proj", nn.Linear(4, 2))
    rebuilt = spec_to_module(module_to_spec(model))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert isinstance(rebuilt, nn.ModuleDict)
    emb = rebuilt["emb"]
    assert isinstance(emb, nn.Embedding) and emb.padding_idx == 0


def test_custom_classes_and_hooks_are_refused_with_the_class_name() -> None:
    class MyBlock(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(ValueError, match=r"'1' of class .*MyBlock.*factory=") as err:
        module_to_spec(nn.Sequential(nn.ReLU(), MyBlock()))
    # The supported classes are named by where to find them, not listed (~40 on one line).
    assert "SUPPORTED_MODULES" in str(err.value) and "AdaptiveMaxPool2d" not in str(err.value)
    with pytest.raises(ValueError, match="MyLinear"):
        module_to_spec(MyLinear(2, 2))
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        module_to_spec(hooked)


def test_spec_to_module_refuses_unknown_types_and_arguments() -> None:
    with pytest.raises(ValueError, match="'os.system' is not supported"):
        spec_to_module({"type": "os.system", "args": {}})
    with pytest.raises(ValueError, match="unknown argument"):
        spec_to_module(
            {"type": "Linear", "args": {"in_features": 2, "out_features": 2, "device": "meta"}}
        )


# --------------------------------------------------------------------------- files


def test_export_model_round_trip_and_weights_only(tmp_path: Path) -> None:
    model = _convnet().eval()
    path = tmp_path / "model.pt"
    export_model(model, path)
    payload = torch.load(path, weights_only=True)  # plain data + tensors only
    assert payload["format"] == "onthefly.model/1"
    loaded = load_model(path)
    assert not loaded.training
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_factory_is_opt_in_code_execution(tmp_path: Path) -> None:
    model = nn.Bilinear(2, 3, 4)  # not in the spec allowlist
    with pytest.raises(ValueError, match="Bilinear"):
        export_model(model, tmp_path / "no.pt")
    path = tmp_path / "bilinear.pt"
    kwargs = {"in1_features": 2, "in2_features": 3, "out_features": 4}
    export_model(model, path, factory="torch.nn:Bilinear", factory_kwargs=kwargs)
    with pytest.raises(ValueError, match="allow_import=True"):
        load_model(path)
    loaded = load_model(path, allow_import=True)
    a, b = torch.randn(5, 2), torch.randn(5, 3)
    assert torch.equal(loaded(a, b), model(a, b))
    with pytest.raises(ValueError, match="package.module:callable"):
        export_model(model, tmp_path / "bad.pt", factory="not a path")


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an OnTheFly model file"):
        load_model(path)


def test_moe_export_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    experts = [
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
        nn.Sequential(nn.Linear(6, 3)),
    ]
    gate = SwitchGate(6, 2, hidden=4, temperature=0.7)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    moe = MoE(experts, gate).eval()
    x = torch.randn(9, 6)
    moe.hard = True
    want_hard = moe(x)
    moe.hard = False
    want = moe(x)
    path = tmp_path / "moe.pt"
    export_moe(moe, path)
    assert torch.load(path, weights_only=True)["format"] == FORMAT_MOE
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from onthefly_worker.moe import load_model
        m = load_model({str(path)!r})
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            soft = m(x)
            m.hard = True
            hard = m(x)
        torch.save({{"soft": soft, "hard": hard}}, {str(tmp_path / "out.pt")!r})
        assert "onthefly_supervisor" not in sys.modules
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got["soft"], want)
    assert torch.equal(got["hard"], want_hard)


def test_damaged_files_fail_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    export_model(nn.Sequential(nn.Linear(3, 2)), path)
    payload = torch.load(path, weights_only=True)
    payload["model"]["spec"]["children"][0][1]["args"]["in_features"] = 10**12
    torch.save(payload, path)
    with pytest.raises(
        ValueError, match=r"first '0.weight': spec \(2, 1000000000000\), stored \(2, 3\)"
    ):
        load_model(path)


def test_models_with_adapters_must_be_merged_before_export(tmp_path: Path) -> None:
    from onthefly_worker.merge_math import add_adapters

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    add_adapters(model, rank=1)
    with pytest.raises(ValueError, match="merge_adapters"):
        export_model(model, tmp_path / "m.pt")


def test_export_moe_with_an_explicit_factory_expert(tmp_path: Path) -> None:
    torch.manual_seed(0)
    moe = MoE([nn.Linear(3, 2), nn.Linear(3, 2)], SwitchGate(3, 2)).eval()
    path = tmp_path / "moe.pt"
    factory = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}}
    export_moe(moe, path, expert_specs=[None, factory])
    with pytest.raises(ValueError, match="expert 1 is built by the factory 'torch.nn:Linear'"):
        load_model(path)
    loaded = load_model(path, allow_import=True)
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), moe(x))
    moe.hard = True
    assert moe(torch.zeros(0, 3)).shape == (0, 2)
    with pytest.raises(ValueError, match="got 1 expert specs for 2 experts"):
        export_moe(moe, path, expert_specs=[None])
