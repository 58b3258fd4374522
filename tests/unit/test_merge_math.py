"""Known answers for the merge math: SWA, BatchNorm recalibration, Fisher soup, adapters, distill."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly_worker.merge_math import (
    LoRALinear,
    adapter_deltas,
    adapter_factors,
    adapter_fuse,
    add_adapters,
    diagonal_fisher,
    distill,
    fisher_soup,
    kl_to_teacher,
    merge_adapters,
    recalibrate_batchnorm,
    swa_average,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _close(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a
    )


# --------------------------------------------------------------------------- SWA


def test_swa_of_identical_models_is_the_model() -> None:
    m = _mlp(0, bn=True)
    m(torch.randn(16, 4))  # move BN stats and the counter
    s = m.state_dict()
    out = swa_average([s, s, s])
    assert out.keys() == s.keys()
    for k in s:
        assert out[k].dtype == s[k].dtype
        assert torch.allclose(out[k], s[k], atol=1e-7)
        assert out[k].data_ptr() != s[k].data_ptr()  # never aliases the input


def test_swa_weighted_and_integer_buffers() -> None:
    a = {"w": torch.zeros(3), "n": torch.tensor(5), "idx": torch.tensor([1, 2])}
    b = {"w": torch.ones(3), "n": torch.tensor(9), "idx": torch.tensor([7, 7])}
    a["num_batches_tracked"] = torch.tensor(2)
    b["num_batches_tracked"] = torch.tensor(8)
    out = swa_average([a, b], weights=[3, 1])
    assert torch.allclose(out["w"], torch.full((3,), 0.25))
    assert (
        out["num_batches_tracked"].item() == 8 and out["num_batches_tracked"].dtype == torch.int64
    )
    assert out["idx"].tolist() == [1, 2] and out["n"].item() == 5


def test_swa_keeps_low_precision_dtypes() -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}
    out = swa_average([a, b])
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 3.0]


def test_swa_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="different keys"):
        swa_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        swa_average([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])
    with pytest.raises(ValueError, match="weights"):
        swa_average([{"a": torch.zeros(1)}] * 2, weights=[1, -1])


# --------------------------------------------------------------------------- BatchNorm


def _bn_data() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor(
        [3.0, -1.0, 0.0]
    )


def test_recalibration_gives_the_true_batch_statistics() -> None:
    x = _bn_data()
    bn = nn.BatchNorm1d(3, momentum=0.1)
    model = nn.Sequential(bn, nn.Dropout(0.5)).eval()
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    # One batch: running stats equal the data's mean and unbiased variance exactly.
    used = recalibrate_batchnorm(model, DataLoader(TensorDataset(x), batch_size=64), "cpu")
    assert used == 1
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var(0, unbiased=True), atol=1e-5)
    # Equal batches: a cumulative (not exponential) average, so the mean is exact again.
    used = recalibrate_batchnorm(model, DataLoader(TensorDataset(x), batch_size=16), "cpu")
    assert used == 4
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    batch_vars = torch.stack([x[i : i + 16].var(0) for i in range(0, 64, 16)]).mean(0)
    assert torch.allclose(bn.running_var, batch_vars, atol=1e-5)
    assert bn.num_batches_tracked.item() == 4
    # Modes and momentum are restored.
    assert not model.training and not bn.training and bn.momentum == 0.1


def test_recalibration_preserves_the_training_rng_and_respects_max_batches() -> None:
    x = _bn_data()
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    used = recalibrate_batchnorm(
        model, DataLoader(TensorDataset(x), batch_size=8), "cpu", max_batches=2
    )
    assert used == 2
    assert torch.equal(torch.rand(5), expected)


def test_recalibration_reports_the_samples_it_forwarded() -> None:
    # The merge worker charges them as compute (1/3 of a sample-step each, like the gate's
    # expert forwards): SWA on a BatchNorm model used to show 0 sample-steps.
    x = _bn_data()[:60]
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    info: dict[str, int] = {}
    used = recalibrate_batchnorm(
        model, DataLoader(TensorDataset(x), batch_size=16), "cpu", info=info
    )
    assert used == 4 and info == {"samples": 60}  # 16 + 16 + 16 + 12
    info = {}
    recalibrate_batchnorm(
        model, DataLoader(TensorDataset(x), batch_size=16), "cpu", max_batches=2, info=info
    )
    assert info == {"samples": 32}


def test_recalibration_with_an_empty_loader_raises_and_keeps_stats() -> None:
    bn = nn.BatchNorm1d(3)
    assert bn.running_mean is not None
    bn.running_mean.fill_(7.0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(bn, [], "cpu")
    assert bool((bn.running_mean == 7.0).all())


def test_recalibration_without_batchnorm_is_a_no_op() -> None:
    assert recalibrate_batchnorm(_mlp(0), [torch.randn(2, 4)], "cpu") == 0


# --------------------------------------------------------------------------- Fisher


def _regression(n: int = 40) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).sum(dim=1)


def _manual_fisher(model: nn.Linear, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    # d/dw (w.x + b - y)^2 = 2 r x, d/db = 2 r
    with torch.no_grad():
        r = model(x) - y  # (n, 1)
    gw = 2 * r * x  # (n, 3)
    gb = 2 * r  # (n, 1)
    return {"weight": (gw**2).mean(0, keepdim=True), "bias": (gb**2).mean(0)}


def test_diagonal_fisher_matches_the_closed_form() -> None:
    x, y = _regression()
    model = nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fisher = diagonal_fisher(model, loader, _mse, "cpu", max_samples=1000, chunk_size=5)
    expected = _manual_fisher(model, x, y)
    assert _close(fisher, expected, atol=1e-5)
    # max_samples truncates mid-batch.
    fisher = diagonal_fisher(model, loader, _mse, "cpu", max_samples=20)
    assert _close(fisher, _manual_fisher(model, x[:20], y[:20]), atol=1e-5)


class _Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot trace it, the per-sample loop can. (The bare
    parameter keeps it off the batched Linear/Conv2d path.)"""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        if float(x.sum()) > 1e9:  # never true, but vmap cannot decide it
            return x[:, :1]
        return self.lin(x) * self.scale


def test_diagonal_fisher_falls_back_to_a_loop_when_vmap_fails() -> None:
    x, y = _regression()
    model = _Branchy()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.warns(RuntimeWarning, match="one backward per sample"):
        fisher = diagonal_fisher(model, loader, _mse, "cpu", max_samples=1000)
    expected = _manual_fisher(model.lin, x, y)  # scale = 1: lin's gradients are unchanged
    assert _close(
        {k: v for k, v in fisher.items() if k != "scale"},
        {f"lin.{k}": v for k, v in expected.items()},
        atol=1e-5,
    )
    assert all(p.requires_grad for p in model.parameters())


def test_diagonal_fisher_uses_eval_mode_and_restores_train_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.9), nn.Linear(4, 1))
    model.train()
    x, y = _regression(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    a = diagonal_fisher(model, loader, _mse, "cpu", max_samples=8)
    b = diagonal_fisher(model, loader, _mse, "cpu", max_samples=8)
    assert _close(a, b, atol=0)  # deterministic: no dropout, BN running stats untouched
    assert model.training
    assert set(a) == {n for n, _ in model.named_parameters()}


_CE = nn.CrossEntropyLoss(reduction="none")


def _per_sample_reference(model: nn.Module, x: Tensor, y: Tensor, loss=_CE) -> dict[str, Tensor]:
    """Mean of squared gradients from one ordinary backward per sample, in eval mode."""
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            out[n] += p.grad.detach() ** 2
    return {n: v / x.shape[0] for n, v in out.items()}


class _SharedLayer(nn.Module):
    """The same Linear applied twice: its per-sample gradient sums both uses before squaring."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.body(x)))))


class _Sequence(nn.Module):
    """A Linear over [batch, time, features]: per-sample gradients sum over time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


def _with_norms() -> nn.Module:
    """Conv + BatchNorm2d + LayerNorm + BatchNorm1d with running statistics of real data."""
    torch.manual_seed(4)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(4 * 10 * 10),
        nn.Linear(4 * 10 * 10, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 2, 10, 10) * 2 + 1)
    return m


def _cnn_for_fisher() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, dilation=2, padding=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 5 * 5, 3),
    )


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (6,)),
        (_SharedLayer, (6,)),
        (_Sequence, (5, 6)),
        (_cnn_for_fisher, (2, 10, 10)),
        (_with_norms, (2, 10, 10)),
    ],
    ids=["mlp", "shared-layer", "sequence", "cnn", "batchnorm-layernorm"],
)
def test_batched_fisher_equals_one_backward_per_sample(make, shape) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(70, *shape), torch.randint(0, 3, (70,))
    info: dict[str, object] = {}
    # Batches of 32 and max_samples 70: the check chunk, full chunks and a cut batch.
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    got = diagonal_fisher(model, loader, _CE, "cpu", max_samples=70, info=info)
    assert info == {"method": "batched", "samples": 70}
    expected = _per_sample_reference(model, x, y)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-7), k


def test_batched_fisher_is_refused_for_a_loss_that_mixes_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def mixing(out: Tensor, target: Tensor) -> Tensor:
        # Per sample it is the plain loss; over a batch each row is reweighted by the others.
        lo = _CE(out, target)
        return lo * lo.shape[0] * torch.softmax(lo, dim=0)

    info: dict[str, object] = {}
    with pytest.warns(RuntimeWarning, match="batched per-sample gradients are not usable"):
        got = diagonal_fisher(model, [(x, y)], mixing, "cpu", max_samples=40, info=info)
    assert info["method"] == "vmap"
    expected = _per_sample_reference(model, x, y)  # mixing == _CE one sample at a time
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-7), k


def test_fisher_of_other_layers_uses_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.Linear(8, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    info: dict[str, object] = {}
    got = diagonal_fisher(model, [(x, y)], _CE, "cpu", max_samples=20, info=info)
    assert info["method"] == "vmap"
    expected = _per_sample_reference(model, x, y)
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-7), k


def test_fisher_soup_equal_fishers_is_the_plain_average() -> None:
    a, b = _mlp(0, bn=True).state_dict(), _mlp(1, bn=True).state_dict()
    params = {n for n, _ in _mlp(0, bn=True).named_parameters()}
    g = torch.Generator().manual_seed(3)
    f = {k: torch.rand(a[k].shape, generator=g) for k in params}
    soup = fisher_soup([a, b], [f, f])
    assert _close(soup, swa_average([a, b]), atol=1e-6)
    assert soup["1.num_batches_tracked"].dtype == torch.int64


def test_fisher_soup_one_dominant_fisher_gives_that_model() -> None:
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    fa = {k: torch.full_like(v, 1e6) for k, v in a.items()}
    fb = {k: torch.full_like(v, 1e-6) for k, v in b.items()}
    assert _close(fisher_soup([a, b], [fa, fb]), a, atol=1e-5)
    assert _close(fisher_soup([a, b], [fb, fa]), b, atol=1e-5)


def test_fisher_soup_is_per_coordinate_and_scale_invariant() -> None:
    a = {"w": torch.tensor([0.0, 0.0])}
    b = {"w": torch.tensor([1.0, 1.0])}
    fa = {"w": torch.tensor([3.0, 1.0])}
    fb = {"w": torch.tensor([1.0, 3.0])}
    soup = fisher_soup([a, b], [fa, fb])
    assert torch.allclose(soup["w"], torch.tensor([0.25, 0.75]), atol=1e-6)
    scaled = fisher_soup([a, b], [{"w": fa["w"] * 1e-9}, {"w": fb["w"] * 1e-9}])
    assert torch.allclose(scaled["w"], soup["w"], atol=1e-6)


def test_fisher_soup_refuses_to_silently_become_an_average() -> None:
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    zero = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="every Fisher is zero"):
        fisher_soup([a, b], [zero, zero])
    with pytest.raises(ValueError, match="empty"):
        fisher_soup([a, b], [{}, {}])
    with pytest.raises(ValueError, match="different keys"):
        fisher_soup([a, b], [{"w": torch.ones(2)}, {"v": torch.ones(2)}])
    with pytest.raises(ValueError, match="finite and >= 0"):
        fisher_soup([a, b], [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.ones(2)}])


def test_fisher_soup_from_computed_fishers_leans_to_the_informed_model() -> None:
    # Model a was fit on data that exercises input 0, b on data that exercises input 1; the
    # soup should take coordinate 0 from a and coordinate 1 from b.
    g = torch.Generator().manual_seed(0)
    xa = torch.zeros(32, 2)
    xa[:, 0] = torch.randn(32, generator=g)
    xb = torch.zeros(32, 2)
    xb[:, 1] = torch.randn(32, generator=g)
    ma, mb = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        ma.weight.copy_(torch.tensor([[1.0, 9.0]]))
        mb.weight.copy_(torch.tensor([[-9.0, 2.0]]))
    ya, yb = xa @ torch.tensor([[0.0], [0.0]]), xb @ torch.tensor([[0.0], [0.0]])
    fa = diagonal_fisher(ma, [(xa, ya)], _mse, "cpu", 32)
    fb = diagonal_fisher(mb, [(xb, yb)], _mse, "cpu", 32)
    soup = fisher_soup([ma.state_dict(), mb.state_dict()], [fa, fb])
    assert torch.allclose(soup["weight"], torch.tensor([[1.0, 2.0]]), atol=1e-4)


# --------------------------------------------------------------------------- adapters


def _perturb_adapters(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def test_lora_starts_as_the_base_and_only_adapters_train() -> None:
    model = _mlp(0, bn=True)
    x = torch.randn(5, 4)
    model.eval()
    before = model(x)
    names = add_adapters(model, rank=2, alpha=4)
    assert names == ["0", "3"]
    assert torch.allclose(model(x), before)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "3.lora_A", "3.lora_B"]
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model, rank=2)


def test_adapter_fuse_equals_the_adapted_model() -> None:
    original = _mlp(0)
    base_state = copy.deepcopy(original.state_dict())
    adapted = copy.deepcopy(original)
    add_adapters(adapted, rank=2, alpha=8)
    _perturb_adapters(adapted, 1)
    x = torch.randn(7, 4)
    want = adapted(x)

    for deltas in (adapter_deltas(adapted), adapter_factors(adapted)):
        fused = adapter_fuse(base_state, [deltas])  # one adapter: weight 1
        plain = copy.deepcopy(original)
        plain.load_state_dict(fused)
        assert torch.allclose(plain(x), want, atol=1e-5)
    assert torch.equal(original.state_dict()["0.weight"], base_state["0.weight"])


def test_adapter_fuse_weights_several_adapters() -> None:
    base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.ones(2)}
    a1, b1 = torch.ones(1, 3), torch.ones(2, 1)
    d2 = torch.full((2, 3), 4.0)
    fused = adapter_fuse(base, [{"fc": (a1, b1, 2.0)}, {"fc.weight": d2}], weights=[0.5, 0.25])
    assert torch.allclose(fused["fc.weight"], torch.full((2, 3), 0.5 * 2.0 + 0.25 * 4.0))
    assert torch.equal(fused["fc.bias"], base["fc.bias"])
    with pytest.raises(ValueError, match="not in the base state"):
        adapter_fuse(base, [{"nope": d2}])
    with pytest.raises(ValueError, match="shape"):
        adapter_fuse(base, [{"fc": torch.zeros(3, 3)}])


def test_merge_adapters_restores_the_original_keys_types_and_flags() -> None:
    original = _mlp(0, bn=True)
    original.get_parameter("1.weight").requires_grad_(False)  # a user-frozen parameter
    model = copy.deepcopy(original)
    add_adapters(model, rank=3)
    _perturb_adapters(model, 2)
    model.eval()
    x = torch.randn(6, 4)
    want = model(x)
    merged = merge_adapters(model)
    assert list(merged.state_dict().keys()) == list(original.state_dict().keys())
    assert [type(m) for m in merged.modules()] == [type(m) for m in original.modules()]
    assert torch.allclose(merged(x), want, atol=1e-5)
    flags = {n: p.requires_grad for n, p in merged.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in original.named_parameters()}
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_adapters(merged)


def test_add_adapters_errors() -> None:
    with pytest.raises(ValueError, match="no Linear"):
        add_adapters(nn.Sequential(nn.ReLU()), rank=1)
    with pytest.raises(ValueError, match="exceeds"):
        LoRALinear(nn.Linear(2, 8), rank=3)


# --------------------------------------------------------------------------- distillation


def test_distill_lowers_kl_to_the_teacher() -> None:
    teacher = _mlp(10).eval()
    student = _mlp(11)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    loader = DataLoader(TensorDataset(x), batch_size=32, shuffle=False)

    def teacher_fn(inp: Tensor) -> Tensor:
        return teacher(inp)

    before = kl_to_teacher(student, teacher_fn, loader, temperature=2.0, device="cpu")
    after = distill(student, teacher_fn, loader, steps=150, lr=0.01, temperature=2.0, device="cpu")
    assert after < 0.2 * before
    assert student.training  # mode restored


def test_distill_a_regression_lowers_the_mse_to_the_teacher_ensemble() -> None:
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).eval() for _ in "ab"]
    student = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = torch.randn(256, 2, generator=g)  # regression targets: never used by distillation
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)

    def ensemble(inp: Tensor) -> Tensor:
        return torch.stack([t(inp) for t in teachers]).mean(0)

    def first(batch: object) -> tuple[Tensor, Tensor]:
        assert isinstance(batch, (list, tuple))
        return batch[0], batch[1]

    before = kl_to_teacher(student, ensemble, loader, 1.0, "cpu", batch_fn=first, objective="mse")
    with torch.no_grad():
        direct = float(torch.mean((student(x) - ensemble(x)) ** 2))
    assert before == pytest.approx(direct, rel=1e-5)  # the MSE to the ensemble's mean output
    after = distill(
        student, ensemble, loader, steps=300, lr=0.01, temperature=2.0, device="cpu",
        batch_fn=first, objective="mse",
    )  # fmt: skip
    assert after < 0.1 * before, (before, after)
    with pytest.raises(ValueError, match="objective must be one of kl, mse"):
        distill(student, ensemble, loader, 1, 0.1, 1.0, "cpu", batch_fn=first, objective="l1")


def test_distill_checks_shapes() -> None:
    student = _mlp(0)
    with pytest.raises(ValueError, match="differ"):
        distill(
            student,
            lambda inp: torch.zeros(inp.shape[0], 5),
            [torch.randn(4, 4)],
            1,
            0.1,
            1.0,
            "cpu",
        )
