"""Penultimate-layer embeddings on demand (onthefly_worker/embed.py): shape, order, and no
trace on training (mode, RNG, BatchNorm statistics)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import embed
from onthefly_worker.connection import Command, command_from_proto


class Net(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3)
        )
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(n: int = 50) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=16, shuffle=True)


def _rng_fingerprint() -> tuple[float, float, float]:
    # Drawing consumes the states, so take a snapshot to compare instead of drawing twice.
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_embedding_shape_order_and_no_trace_on_training() -> None:
    torch.manual_seed(1)
    model = Net(hidden=32)
    loader = _data(50)
    model.train()
    model(torch.randn(16, 8))  # non-trivial BatchNorm running statistics
    bn = model.body[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = _rng_fingerprint()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    res = embed.embed_dataset(model, loader, "cpu")
    assert _rng_fingerprint() == expected  # every RNG where it was

    assert res.array is not None and res.reason == ""
    assert res.array.shape == (50, 16) and res.array.dtype == np.float32
    assert res.layer == "head" and res.raw_dims == 32
    assert model.training  # mode restored
    for k, v in bn.state_dict().items():
        assert torch.equal(v, stats[k]), k  # eval mode: BatchNorm statistics untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k

    # Row i is sample i (dataset order despite shuffle=True), projected by the fixed matrix.
    model.eval()
    with torch.no_grad():
        feats = model.body(loader.dataset.tensors[0])  # type: ignore[attr-defined]
    proj = embed.projection(32, 16)
    assert proj is not None
    np.testing.assert_allclose(res.array, (feats @ proj).numpy(), rtol=1e-5, atol=1e-5)
    # The projection is fixed: a second call gives the same array.
    model.train()
    again = embed.embed_dataset(model, loader, "cpu")
    assert again.array is not None and np.array_equal(again.array, res.array)


def test_narrow_representation_is_kept_as_is() -> None:
    model = Net(hidden=6)
    res = embed.embed_dataset(model, _data(20), "cpu", max_dims=16)
    assert res.array is not None and res.array.shape == (20, 6) and res.raw_dims == 6


def test_eval_mode_is_restored_too() -> None:
    model = Net()
    model.eval()
    embed.embed_dataset(model, _data(20), "cpu")
    assert not model.training


def test_no_linear_layer_gives_a_reason() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    res = embed.embed_dataset(model, _data(20), "cpu")
    assert res.array is None and "no nn.Linear" in res.reason
    ok, msg, payload = embed.embed_to_session(model, _data(20), "cpu", "/nonexistent", "main", 3)
    assert not ok and "no nn.Linear" in msg and "no nn.Linear" in payload["reason"]


def test_unused_last_linear_gives_a_reason() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(8, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    res = embed.embed_dataset(Odd(), _data(20), "cpu")
    assert res.array is None and "unused" in res.reason and "not called" in res.reason


def test_dict_batches_and_a_custom_collate() -> None:
    class Dicts(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.full((8,), float(i)), "y": torch.tensor(i % 3)}

    model = Net(hidden=4)
    loader = DataLoader(Dicts(), batch_size=4, shuffle=True)
    res = embed.embed_dataset(model, loader, "cpu")
    assert res.array is not None and res.array.shape == (10, 4)


def test_embed_to_session_writes_atomically_and_keeps_the_newest(tmp_path: Path) -> None:
    model = Net()
    loader = _data(30)
    ok, msg, payload = embed.embed_to_session(model, loader, "cpu", str(tmp_path), "main", 5)
    assert ok, msg
    assert payload["path"] == "samples/main/embed-step-00000005.npy" and payload["dims"] == 16
    arr = np.load(tmp_path / payload["path"])
    assert arr.shape == (30, 16) and arr.dtype == np.float32
    ok, _, payload2 = embed.embed_to_session(model, loader, "cpu", str(tmp_path), "main", 12)
    assert ok
    names = sorted(p.name for p in (tmp_path / "samples" / "main").iterdir())
    assert names == ["embed-step-00000012.npy"]  # older ones dropped, no temp files left


def test_the_embed_command_crosses_the_wire() -> None:
    cmd = command_from_proto(pb.SupervisorCommand(command_id="c1", embed=pb.Embed(max_dims=8)))
    assert cmd == Command("embed", "c1", {"max_dims": 8})


def test_bad_max_dims() -> None:
    with pytest.raises(ValueError, match="max_dims"):
        embed.embed_dataset(Net(), _data(10), "cpu", max_dims=0)


def test_rng_drawn_inside_forward_is_given_back() -> None:
    class Noisy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            random.random()
            np.random.rand()
            return self.head(self.body(x) + 0.0 * torch.rand_like(x[:, :1]))

    model, loader = Noisy(), _data(20)
    for seed_fn in (random.seed, np.random.seed, torch.manual_seed):
        seed_fn(3)
    expected = _rng_fingerprint()
    for seed_fn in (random.seed, np.random.seed, torch.manual_seed):
        seed_fn(3)
    res = embed.embed_dataset(model, loader, "cpu")
    assert res.array is not None
    assert _rng_fingerprint() == expected
