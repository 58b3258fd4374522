"""Merges and the gate on a model whose input is a dict (the model unpacks it), called
exactly as training calls it: `model(inputs)`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from onthefly_worker import merge_math as mm
from onthefly_worker import moe as moe_mod


class DictNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.relu(self.bn(self.body(inp["x"] * inp["mask"])))
        return self.head(h)


class DictData(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(6, generator=g)
        return {"inputs": {"x": x, "mask": (x > -1).float()}, "targets": i % 3}


LOADER = DataLoader(DictData(), batch_size=16)
CE = nn.CrossEntropyLoss(reduction="none")


def _reference_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    """One backward per sample, on each sample's inputs sliced by hand."""
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    n = 0
    for batch in LOADER:
        inp, y = batch["inputs"], batch["targets"]
        for i in range(len(y)):
            model.zero_grad()
            one = {k: v[i : i + 1] for k, v in inp.items()}
            CE(model(one), y[i : i + 1]).sum().backward()
            for name, p in model.named_parameters():
                assert p.grad is not None
                out[name] += p.grad.pow(2)
            n += 1
    return {k: v / n for k, v in out.items()}


def test_the_fisher_of_a_dict_input_model_is_the_per_sample_one() -> None:
    model = DictNet(0)
    ref = _reference_fisher(model)
    info: dict[str, Any] = {}
    got = mm.diagonal_fisher(model, LOADER, CE, "cpu", max_samples=40, info=info)
    assert info["samples"] == 40
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7)


def test_recalibration_and_distillation_call_the_model_as_training_does() -> None:
    model = DictNet(1)
    assert mm.recalibrate_batchnorm(model, LOADER, "cpu") == 3  # batches forwarded
    teacher = DictNet(2).eval()
    batch = next(iter(LOADER))
    with torch.no_grad():
        logits = teacher(batch["inputs"])
    loss = mm.distill_step(model, logits, batch["inputs"], temperature=2.0)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("hard", [False, True])
def test_the_gate_routes_dict_inputs_over_its_experts(hard: bool) -> None:
    experts = [DictNet(3).eval(), DictNet(4).eval()]
    gate = moe_mod.SwitchGate(in_features=6, n_experts=2)
    moe = moe_mod.MoE(experts, gate, gate_input="expert_outputs", hard=hard)
    hist = moe_mod.train_gate(moe, LOADER, CE, steps=4, lr=0.05)
    assert hist.cached  # the frozen experts ran once over the dict batches
    moe.eval()
    batch = next(iter(LOADER))
    with torch.no_grad():
        out = moe(batch["inputs"])
        each = torch.stack([e(batch["inputs"]) for e in experts], dim=1)
    assert out.shape == (16, 3)
    probs = moe.last_gate
    assert probs is not None
    if hard:  # each row is its top expert's output
        torch.testing.assert_close(out, each[torch.arange(16), probs.argmax(1)])
    else:
        torch.testing.assert_close(out, (probs[:, :, None] * each).sum(1))
    with pytest.raises(ValueError, match="gate_input='input' needs one tensor input"):
        moe_mod.MoE(experts, gate, gate_input="input")(batch["inputs"])
