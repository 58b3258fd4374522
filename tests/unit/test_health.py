"""Health checks: each one tripped by a model built to trip it, healthy cases ok, and the
proof that running every check leaves training exactly where it was."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from onthefly_worker import health
from onthefly_worker.health import (
    Verdict,
    check_activations,
    check_data,
    check_determinism,
    check_gradients,
    check_numerics,
    check_throughput,
    draw_batches,
    first_difference,
    labels_of,
    replay_steps,
    run_checks,
    state_hashes,
    time_step_breakdown,
)
from onthefly_worker.losses import PerSampleLoss

CE = PerSampleLoss(nn.CrossEntropyLoss())


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine thread
    contention makes timings (and the suite) erratic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(hidden: int = 32, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, 4)
    )


def batches(k: int = 3, n: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(k)
    ]


def num(v: Verdict, key: str) -> Any:
    """One of a verdict's numbers, as the JSON consumer would use it (untyped)."""
    return v.numbers[key]


def layer(model: nn.Sequential, i: int) -> nn.Linear:
    m = model[i]
    assert isinstance(m, nn.Linear)
    return m


def json_roundtrip(v: Verdict) -> dict[str, Any]:
    d = v.to_dict()
    return json.loads(json.dumps(d, allow_nan=False))  # strict JSON, as the dashboard parses it


# -- the verdict -----------------------------------------------------------------------------


def test_verdict_is_strict_json_and_validated() -> None:
    raw: dict[str, Any] = {"a": math.nan, "b": [math.inf, np.float32(1.5)], "c": np.int64(3)}
    v = Verdict("numerics", "fail", "h", raw)
    d = json_roundtrip(v)
    assert d["numbers"] == {"a": "nan", "b": ["inf", 1.5], "c": 3}
    with pytest.raises(ValueError, match="ok, warn, fail"):
        bad: Any = "bad"
        Verdict("numerics", bad, "h")
    assert health.worst([Verdict("a", "ok", ""), Verdict("b", "warn", "")]) == "warn"


# -- numerics --------------------------------------------------------------------------------


def test_numerics_ok_on_a_healthy_model() -> None:
    v = check_numerics(mlp(), CE, batches())
    assert v.verdict == "ok", v.hint
    json_roundtrip(v)


def test_numerics_fails_naming_the_nan_weight() -> None:
    model = mlp()
    with torch.no_grad():
        layer(model, 2).weight[3, 5] = math.nan
    v = check_numerics(model, CE, batches())
    assert v.verdict == "fail"
    assert num(v, "nonfinite_params") == ["2.weight"]
    assert "'2.weight'" in v.hint
    json_roundtrip(v)


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * 1000)


def test_numerics_names_the_layer_where_the_overflow_starts() -> None:
    model = nn.Sequential(nn.Linear(8, 8), Exp(), nn.Linear(8, 4))
    v = check_numerics(model, CE, batches())
    assert v.verdict == "fail"
    assert num(v, "first_nonfinite_activation") == "1"
    assert "'1' turns a finite input into NaN/Inf" in v.hint


def test_numerics_reports_a_collapsed_amp_scale() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-4)
    v = check_numerics(mlp(), CE, batches(1), scaler, scale_history=[1.0, 0.5, 0.25, 0.125, 0.0625])
    assert v.verdict == "warn"
    assert num(v, "amp_scale") == 2.0**-4
    assert num(v, "amp_overflow_steps") == 4
    assert num(v, "amp_last_step_overflowed") is True
    assert "loss scale" in v.hint


# -- gradients -------------------------------------------------------------------------------


class Scaled(nn.Module):
    """A layer whose output is scaled by a constant (a stand-in for a bad init / missing norm)."""

    def __init__(self, lin: nn.Linear, k: float) -> None:
        super().__init__()
        self.lin, self.k = lin, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.k


def test_gradients_ok_on_a_healthy_model() -> None:
    v = check_gradients(mlp(), CE, batches())
    assert v.verdict == "ok", v.hint
    assert len(num(v, "layers")) == 6
    json_roundtrip(v)


def test_gradients_name_the_exploding_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), Scaled(nn.Linear(16, 16), 1e6), nn.ReLU(), nn.Linear(16, 4)
    )
    v = check_gradients(model, CE, batches())
    assert v.verdict == "fail"
    assert "2.lin.weight" in num(v, "exploding")
    assert "exploding" in v.hint and "grad_clip" in v.hint
    row = next(r for r in num(v, "layers") if r["name"] == "2.lin.weight")
    assert row["ratio"] > 1e3


def test_gradients_flag_vanishing_behind_a_dead_relu() -> None:
    model = mlp()
    with torch.no_grad():
        layer(model, 0).bias.fill_(
            -100.0
        )  # everything after layer 0 is dead: layer 0 gets no gradient
    v = check_gradients(model, CE, batches())
    assert v.verdict == "warn"
    assert {"0.weight", "0.bias"} <= set(num(v, "vanishing"))


def test_a_bias_right_before_batchnorm_is_explained_not_flagged_as_vanishing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)), nn.ReLU(), nn.Linear(16, 4)
    )
    v = check_gradients(model, CE, batches())
    assert v.verdict == "ok", v.hint
    assert num(v, "bias_before_batchnorm") == ["0.0.bias"]
    assert "'0.0.bias'" in v.hint and "BatchNorm" in v.hint and "bias=False" in v.hint
    # The same bias behind a dead ReLU elsewhere would still be flagged: only the cancelled one
    # is explained away.
    assert "0.0.bias" not in num(v, "vanishing")


def test_gradients_under_a_grad_scaler_are_unscaled() -> None:
    plain = check_gradients(mlp(), CE, batches())
    scaled = check_gradients(
        mlp(), CE, batches(), scaler=torch.amp.GradScaler("cpu", init_scale=1024.0)
    )
    assert scaled.verdict == "ok"
    assert num(scaled, "total_grad_norm") == pytest.approx(num(plain, "total_grad_norm"), rel=1e-5)


# -- activations -----------------------------------------------------------------------------


def test_activations_ok_on_a_healthy_model() -> None:
    v = check_activations(mlp(), batches())
    assert v.verdict == "ok", v.hint
    assert num(v, "activation_layers") == 2


def test_activations_fail_on_a_dead_relu_layer() -> None:
    model = mlp()
    with torch.no_grad():
        layer(model, 2).bias.fill_(-100.0)
    v = check_activations(model, batches())
    assert v.verdict == "fail"
    assert num(v, "worst_dead_layer") == "3"
    assert num(v, "worst_dead_fraction") == pytest.approx(1.0)
    assert "'3' (ReLU)" in v.hint


def test_activations_warn_on_a_half_dead_gelu_layer() -> None:
    model = mlp(act=nn.GELU)
    with torch.no_grad():
        layer(model, 0).bias[:20].fill_(-100.0)  # 20 of 32 units never positive: 62% dead
    v = check_activations(model, batches())
    assert v.verdict == "warn"
    assert num(v, "worst_dead_layer") == "1"
    assert num(v, "worst_dead_fraction") == pytest.approx(20 / 32)


def test_activations_fail_on_saturated_tanh() -> None:
    model = mlp(act=nn.Tanh)
    with torch.no_grad():
        layer(model, 2).weight.mul_(1000.0)
    v = check_activations(model, batches())
    assert v.verdict == "fail"
    assert num(v, "worst_saturated_layer") == "3"
    assert "flat ends" in v.hint


# -- data ------------------------------------------------------------------------------------


def perms(n: int, epochs: int) -> list[np.ndarray]:
    return [np.random.default_rng(e).permutation(n) for e in range(epochs)]


def test_data_ok_when_shuffled_balanced_and_fast() -> None:
    labels = np.arange(400) % 4
    v = check_data(400, perms(400, 2), labels, [1.0] * 50, [10.0] * 50)
    assert v.verdict == "ok", v.hint
    assert num(v, "label_entropy") == pytest.approx(1.0)
    assert num(v, "loader_share") == pytest.approx(0.1)
    json_roundtrip(v)


def test_data_warns_on_one_class() -> None:
    v = check_data(100, perms(100, 1), np.zeros(100, dtype=np.int64), [], [])
    assert v.verdict == "warn"
    assert num(v, "classes") == 1 and num(v, "majority_share") == 1.0
    assert "every label is 0" in v.hint


def test_data_warns_on_a_rare_class_and_duplicates_and_fails_out_of_range() -> None:
    labels = np.array([0] * 500 + [1] * 495 + [2] * 5)
    order = np.concatenate([np.arange(1000), [3, 4]])
    v = check_data(1000, [order], labels, [], [])
    assert v.verdict == "warn"
    assert num(v, "rare_classes") == ["2"] and num(v, "duplicates_per_epoch") == [2]
    v = check_data(10, [np.arange(12)], None, [], [])
    assert v.verdict == "fail" and num(v, "out_of_range_ids") == 2


class SlowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.004)
        return torch.full((8,), float(i)), torch.tensor(i % 4)


def test_data_warns_when_the_loader_is_the_bottleneck() -> None:
    """Time a real loop the way the trainer does: step time includes the data wait."""
    model = mlp()
    loader = DataLoader(SlowDataset(), batch_size=8)
    waits: list[float] = []
    steps: list[float] = []
    with torch.no_grad():
        t_prev = time.perf_counter()
        for x, _ in loader:
            t_data = time.perf_counter()
            model(x)
            t_end = time.perf_counter()
            waits.append((t_data - t_prev) * 1e3)
            steps.append((t_end - t_prev) * 1e3)
            t_prev = t_end
    v = check_data(64, [np.arange(64)], np.arange(64) % 4, waits, steps)
    assert v.verdict == "warn"
    assert float(num(v, "loader_share")) > 0.3
    assert "num_workers" in v.hint and "pin_memory" in v.hint


def test_labels_of_reads_cheap_label_sources() -> None:
    ds = TensorDataset(torch.randn(10, 2), torch.arange(10) % 3)
    whole, part = labels_of(ds), labels_of(torch.utils.data.Subset(ds, [1, 2]))
    assert whole is not None and whole.tolist() == (np.arange(10) % 3).tolist()
    assert part is not None and part.tolist() == [1, 2]
    assert labels_of(SlowDataset()) is None


# -- throughput ------------------------------------------------------------------------------


def test_throughput_breakdown_ok_and_loader_bound_warn() -> None:
    ok = check_throughput(
        {"data": [1.0] * 10, "forward": [4.0] * 10, "backward": [8.0] * 10, "optimizer": [2.0] * 10}
    )
    assert ok.verdict == "ok", ok.hint
    assert num(ok, "backward_share") == pytest.approx(8 / 15)
    phases = num(ok, "phases")
    assert [p["phase"] for p in phases] == ["data", "forward", "backward", "optimizer"]
    slow = check_throughput({"data": [20.0] * 10, "forward": [4.0] * 10, "backward": [8.0] * 10})
    assert slow.verdict == "warn" and "num_workers" in slow.hint
    assert check_throughput({}).verdict == "warn"


def test_time_step_breakdown_measures_every_phase() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = time_step_breakdown(model, CE, opt, batches(3), "cpu")
    assert set(out) == {"forward", "backward", "optimizer"}
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in out.values())
    assert check_throughput(out).verdict in ("ok", "warn")


# -- determinism -----------------------------------------------------------------------------


def fixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a.weight": torch.randn(4, 4, generator=g), "b.bias": torch.randn(4, generator=g)}


def test_determinism_ok_when_replays_match() -> None:
    v = check_determinism(fixed_state)
    assert v.verdict == "ok" and num(v, "identical") is True
    json_roundtrip(v)


def test_determinism_fails_naming_the_noisy_tensor() -> None:
    def noisy() -> dict[str, torch.Tensor]:
        s = fixed_state()
        # Entropy from the OS, like racing GPU atomics: no seed can pin it down. (Noise from
        # torch's global RNG would not do: every replay starts from the same RNG state.)
        noise = torch.from_numpy(np.random.default_rng().random(4)).float()
        s["b.bias"] = s["b.bias"] + noise * 1e-3
        return s

    v = check_determinism(noisy, runs=3)
    assert v.verdict == "fail"
    assert num(v, "first_difference") == "b.bias"
    assert 0 < float(num(v, "max_abs_diff")) < 1e-3
    assert num(v, "differing") == ["b.bias"]
    assert "'b.bias'" in v.hint and "use_deterministic_algorithms" in v.hint
    with pytest.raises(ValueError, match="runs >= 2"):
        check_determinism(fixed_state, runs=1)


def test_state_hash_helpers() -> None:
    a = fixed_state()
    b = {k: v.clone() for k, v in a.items()}
    assert state_hashes(a) == state_hashes(b)
    assert first_difference(a, b) is None
    b["b.bias"][2] += 0.25
    got = first_difference(a, b)
    assert got is not None
    name, diff = got
    assert name == "b.bias" and diff == pytest.approx(0.25)
    assert first_difference(a, {"a.weight": a["a.weight"]}) == ("b.bias", math.inf)
    assert first_difference({"x": torch.tensor([0.0])}, {"x": torch.tensor([-0.0])}) == ("x", 0.0)
    nested = {"model": a, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}}
    assert "optimizer.state.0.step" in state_hashes(nested)
    assert state_hashes({"x": torch.zeros(2)}) != state_hashes(
        {"x": torch.zeros(2, dtype=torch.float64)}
    )


def test_replay_steps_is_deterministic_on_cpu() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    v = check_determinism(lambda: replay_steps(model, opt, CE, batches(3)))
    assert v.verdict == "ok", v.hint
    assert int(num(v, "tensors")) > 4


# -- dispatch --------------------------------------------------------------------------------


def test_run_checks_rejects_unknown_names_and_missing_context() -> None:
    with pytest.raises(
        ValueError,
        match="valid checks: numerics, gradients, activations, data, throughput, determinism",
    ):
        run_checks(["numerics", "entropy"])
    with pytest.raises(ValueError, match="determinism check needs replay"):
        run_checks(["determinism"], model=mlp())


def test_run_checks_turns_a_crashing_check_into_a_fail_verdict() -> None:
    def broken() -> dict[str, torch.Tensor]:
        raise RuntimeError("side process died")

    (v,) = run_checks(["determinism"], replay=broken)
    assert v.verdict == "fail" and "side process died" in v.hint


def test_run_checks_runs_what_the_context_allows() -> None:
    vs = run_checks(None, model=mlp(), loss=CE, batches=batches(2))
    assert [v.check for v in vs] == ["numerics", "gradients", "activations"]
    assert run_checks(["all"], step_breakdown={"forward": [1.0]})[0].check == "throughput"
    got = run_checks(
        "numerics, gradients", model=mlp(), loss=nn.CrossEntropyLoss(), batches=batches(1)
    )
    assert [(v.check, v.verdict) for v in got] == [("numerics", "ok"), ("gradients", "ok")]


# -- no disturbance --------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(32, 32),
            nn.Tanh(),
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    elif isinstance(obj, np.ndarray):
        h.update(obj.tobytes())
    else:
        h.update(repr(obj).encode())


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, str]:
    """Everything training depends on, each part hashed separately so a failure names it."""

    def sha(obj: Any) -> str:
        h = hashlib.sha256()
        _digest(obj, h)
        return h.hexdigest()

    return {
        "params": sha(dict(model.named_parameters())),
        "buffers": sha(dict(model.named_buffers())),  # BN running stats + num_batches_tracked
        "grads": sha({n: p.grad for n, p in model.named_parameters()}),
        "optimizer": sha(opt.state_dict()),
        "scheduler": sha(sched.state_dict()),
        "modes": sha([(n, m.training) for n, m in model.named_modules()]),
        "python_rng": sha(random.getstate()),
        "numpy_rng": sha(np.random.get_state()),
        "torch_rng": sha(torch.get_rng_state()),
        "cuda_rng": sha(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []),
    }


@pytest.mark.parametrize("training", [True, False])
def test_every_check_leaves_training_untouched(training: bool) -> None:
    torch.manual_seed(5)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = PerSampleLoss(nn.CrossEntropyLoss())
    ds = TensorDataset(torch.randn(96, 8), torch.arange(96) % 4)
    loader = DataLoader(ds, batch_size=16, shuffle=True)
    for x, y in list(loader)[:3]:  # a few real steps: optimizer state, moved BN stats, live grads
        opt.zero_grad()
        total, _ = loss(model(x), y, len(x))
        total.backward()
        opt.step()
        sched.step()
    model.train(training)
    random.seed(11)
    np.random.seed(11)
    before = fingerprint(model, opt, sched)
    bn = model.body[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_batches_tracked is not None
    assert int(bn.num_batches_tracked) == 3  # the BN buffers have moved: a real test

    hb = draw_batches(loader, 2, "cpu")
    vs = run_checks(
        None,
        model=model,
        loss=loss,
        optimizer=opt,
        batches=hb,
        device=torch.device("cpu"),
        dataset_len=len(ds),
        ids_seen_by_epoch=perms(len(ds), 2),
        labels=labels_of(ds),
        data_wait_ms=[0.5] * 8,
        step_ms=[5.0] * 8,
        replay=lambda: replay_steps(model, opt, loss, hb),
    )
    assert [v.check for v in vs] == list(health.CHECKS)
    assert all(v.numbers.get("error") is None for v in vs), [v.hint for v in vs]
    after = fingerprint(model, opt, sched)
    assert after == before
    assert model.training is training

    # End to end: the next training step equals the one a twin that never saw the checks
    # takes from the same state and the same RNG.
    twin, twin_opt = copy.deepcopy((model, opt))
    rng = torch.get_rng_state()
    x, y = next(iter(DataLoader(ds, batch_size=16)))
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.set_rng_state(rng)
        o.zero_grad()
        total, _ = loss(m(x), y, len(x))
        total.backward()
        o.step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True)
    )


def np_key() -> np.ndarray:
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)
    return np.array(state[1], copy=True)


def test_draw_batches_does_not_consume_the_training_iterator_or_rng() -> None:
    ds = TensorDataset(torch.arange(40, dtype=torch.float32).reshape(20, 2), torch.arange(20) % 2)
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    torch.manual_seed(1)
    reference = [xy[1].tolist() for xy in loader]
    torch.manual_seed(1)
    it = iter(loader)
    first = next(it)[1].tolist()
    rng = (torch.get_rng_state(), random.getstate(), np_key())
    a = draw_batches(loader, 2, "cpu")
    b = draw_batches(loader, 2, "cpu")
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np_key(), rng[2])
    rest = [xy[1].tolist() for xy in it]
    assert [first, *rest] == reference
    assert len(a) == 2 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))


# -- determinism in a side process (role=health) ---------------------------------------------


class _Data(Dataset):
    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class _Net(nn.Module):
    """BatchNorm on the input, a frozen feature layer (a fine-tuned backbone), dropout, a head.

    `noise`: entropy from the OS in forward (no seed can pin it down).
    `drift_after`: forward changes after that many calls, through a plain Python counter
    (state a resumed worker starts fresh, so each replay must too).
    """

    def __init__(self, noise: bool = False, drift_after: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8, affine=False)
        self.features = nn.Linear(8, 16)
        self.features.requires_grad_(False)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 2)
        self.noise = noise
        self.drift_after = drift_after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.drop(torch.relu(self.features(self.norm(x))))
        if self.noise:
            g = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(8), "little") >> 1)
            h = h + 0.01 * torch.randn(h.shape, generator=g)
            np.random.seed(None)  # re-seed numpy from the OS: the next replay gets other noise
        if self.drift_after and self.calls > self.drift_after:
            h = h * 2.0
        return self.head(h)


def _health_setup(tmp_path: Any, net: _Net, batch: int = 3, sha: str | None = None) -> Any:
    """The script's objects, a checkpoint of a run at (epoch 0, `batch`), a role=health env."""
    from onthefly_worker import checkpoint as ckpt
    from onthefly_worker import env as wenv
    from onthefly_worker.config import TrainerConfig
    from onthefly_worker.health_role import HealthWorker

    torch.manual_seed(0)
    loader = DataLoader(_Data(), batch_size=8, shuffle=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    # A few steps of "training" so the checkpoint has momentum and moved BN statistics.
    for x, y in list(loader)[:batch]:
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    cfg = TrainerConfig(project="t", max_epochs=3)
    state = {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "run_id": "main",
        "role": "train",
        "adapters": None,
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "rng": ckpt.capture_rng(),
        "cursor": {"epoch": 0, "batch": batch, "seed": 7, "skip": []},
        "grad_clip": 0.0,
        "counters": {"step": batch, "sample_steps": 8 * batch},
        "config": cfg.to_dict(),
        "spec": {},
    }
    rel = "checkpoints/main/step-00000003.pt"
    digest, _ = ckpt.write_atomic(state, str(tmp_path / rel))
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"command_id": "c1", "checkpoint": rel, "sha256": sha or digest, "steps": 4})
    )
    env = wenv.WorkerEnv(
        addr="127.0.0.1:1",
        token="t",
        worker_id="health-main-0",
        role="health",
        run_id="health-main",
        session_dir=str(tmp_path),
        error_file="",
        resume="",
        spec=str(spec),
        attempt=0,
    )
    # A fresh "script": new objects, as the side process builds them before fit().
    fresh = _Net(net.noise, net.drift_after)
    fopt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    fsched = torch.optim.lr_scheduler.StepLR(fopt, step_size=1, gamma=0.5)
    return HealthWorker(cfg, env, fresh, fopt, loss_fn, loader, fsched)


def test_side_process_replay_is_deterministic_across_an_epoch_boundary(tmp_path: Any) -> None:
    import os

    worker = _health_setup(tmp_path, _Net())
    before = {k: v.clone() for k, v in worker.objs.model.state_dict().items()}
    v = worker.run()
    assert v.verdict == "ok", v.hint
    n = v.numbers
    assert n["mode"] == "side-process" and n["pid"] == os.getpid()
    assert n["steps"] == 4 and (n["start_epoch"], n["start_batch"]) == (0, 3)
    assert (n["end_epoch"], n["end_batch"]) == (1, 2), "5 batches an epoch: 2 left, then 2 more"
    assert int(n["tensors"]) >= 8 and n["differing"] == []
    assert "checkpoints/main/step-00000003.pt" in v.hint and "side process" in v.hint
    assert "fresh copies" in str(n["isolation"])
    # The script's own objects are only templates: the replays ran on copies.
    assert all(torch.equal(before[k], t) for k, t in worker.objs.model.state_dict().items())
    json_roundtrip(v)


def test_side_process_replay_names_the_nondeterministic_tensor(tmp_path: Any) -> None:
    v = _health_setup(tmp_path, _Net(noise=True)).run()
    assert v.verdict == "fail"
    n = v.numbers
    # The frozen features never change; the head is the first tensor the noise reaches.
    assert n["first_difference"] == "model.head.weight", n
    differing = list(n["differing"])
    assert "model.features.weight" not in differing and "model.features.bias" not in differing
    assert "optimizer.head.weight.momentum_buffer" in differing  # named by parameter
    assert "'model.head.weight'" in v.hint


def test_side_process_replays_start_from_a_fresh_script_state(tmp_path: Any) -> None:
    # forward changes after 6 calls: a second replay on the same objects would see 4 + 4.
    v = _health_setup(tmp_path, _Net(drift_after=6)).run()
    assert v.verdict == "ok", v.hint


def test_side_process_refuses_a_corrupt_checkpoint(tmp_path: Any) -> None:
    worker = _health_setup(tmp_path, _Net(), sha="0" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        worker.run()
