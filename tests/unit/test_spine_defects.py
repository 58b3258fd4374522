"""Defects a new-user trial found in the spine, each pinned: an on-demand test pass that
raises, per-sample losses of padded sequences, a diverging run's epoch statistics, the
root cause of a SyntaxError, a busy port's leftover session, loader processes outliving
their worker, the exit code of SIGTERM, dict batch keys, and `status`/`sessions ls` on a
session without a live supervisor."""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor import cli
from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.store import RunRow, Store
from onthefly_supervisor.supervisor import (
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    install_signal_handlers,
    loss_stats,
)
from onthefly_worker import losses
from onthefly_worker.connection import Command, command_from_proto
from onthefly_worker.control import CommandLoop
from onthefly_worker.data import epoch_loader, split_batch
from onthefly_worker.errors import OnTheFlyError, error_record
from onthefly_worker.evaluation import evaluate_model
from onthefly_worker.losses import PerSampleLoss

# -- 1. an on-demand test pass that raises fails alone -------------------------------------


class _MissingRecord(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 40:
            raise KeyError(f"test record {i} missing")
        return torch.ones(4) * i, torch.zeros(1)


class _FakeConn:
    def __init__(self) -> None:
        self.acks: list[tuple[str, bool, str, Any]] = []
        self.sent: list[dict[str, Any]] = []

    def ack(self, command_id: str, ok: bool = True, message: str = "", payload: Any = None) -> None:
        self.acks.append((command_id, ok, message, payload))

    def send(self, **body: Any) -> None:
        self.sent.append(body)


class _Loop(CommandLoop):
    def __init__(self, test_loader: DataLoader) -> None:
        self.conn = _FakeConn()  # type: ignore[assignment]
        self.rec = object()  # type: ignore[assignment]
        self.paused, self.stop_reason, self.run_test_on_stop = False, "", False
        self.step, self.hb_s = 7, 0.1
        self.model = nn.Linear(4, 1)
        self.test_loader = test_loader

    def _checkpoint(self, reason: str, wait: bool = False) -> str:
        return ""

    def _status(self, state: pb.WorkerState.ValueType, message: str = "") -> None:
        pass

    def _eval_loader(self, split: str) -> DataLoader | None:
        return self.test_loader if split == "test" else None

    def _run_eval(self, loader: DataLoader, split: str) -> dict[str, Any]:
        loss, _, n = evaluate_model(
            self.model, loader, PerSampleLoss(nn.MSELoss()), torch.device("cpu")
        )
        return {"split": split, "loss": loss, "samples": n}

    def _param_groups(self) -> list[dict[str, Any]]:
        return []

    def _set_grad_clip(self, value: float) -> None:
        pass

    def _log(self, text: str, level: str = "info") -> None:
        assert self.conn is not None
        self.conn.send(log=pb.LogLine(level=level, text=text))


def test_a_test_pass_that_fails_after_training_says_where_the_weights_are() -> None:
    # Shared by the Trainer and attach_lightning: the final checkpoint precedes the pass.
    loop = _Loop(DataLoader(_MissingRecord(), batch_size=16))
    assert loop.test_loader is not None
    loader = loop.test_loader
    with pytest.raises(KeyError, match="test record 40 missing"):
        loop._test_after_training(
            lambda: loop._run_eval(loader, "test"), "checkpoints/main/step-00000007.pt"
        )
    (log,) = [b["log"] for b in loop.conn.sent if "log" in b]  # type: ignore[attr-defined]
    assert log.level == "warning" and log.text == (
        "the test pass failed after training ended (step 7); the trained weights are in "
        "checkpoints/main/step-00000007.pt: fix the test data and `onthefly resume` runs only "
        "the test pass"
    )
    loop.test_loader = DataLoader(TensorDataset(torch.zeros(8, 4), torch.zeros(8, 1)))
    ok = loop._test_after_training(lambda: loop._run_eval(loop.test_loader, "test"), "x")
    assert ok["samples"] == 8 and ok["loss"] >= 0


def test_an_on_demand_test_pass_that_raises_is_answered_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The user's script lives in this folder: its frames are the root cause.
    monkeypatch.setattr(sys, "argv", [__file__])
    loop = _Loop(DataLoader(_MissingRecord(), batch_size=16))
    loop.model.train()
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    loop._handle(Command("eval", "c1", {"split": "test"}))  # raised out of here before
    (cid, ok, message, _), *_ = loop.conn.acks  # type: ignore[attr-defined]
    assert cid == "c1" and not ok
    assert message.startswith("test pass failed: KeyError: 'test record 40 missing' (")
    assert f"{os.path.basename(__file__)}:" in message and "training goes on" in message
    logs = [b["log"] for b in loop.conn.sent if "log" in b]  # type: ignore[attr-defined]
    assert logs and logs[0].level == "warning" and "KeyError" in logs[0].text
    # Nothing of the run moved: train mode and RNG are back, later commands still work.
    assert loop.model.training
    assert torch.equal(torch.random.get_rng_state(), before)
    loop.test_loader = DataLoader(TensorDataset(torch.zeros(8, 4), torch.zeros(8, 1)))
    loop._handle(Command("eval", "c2", {"split": "test"}))
    assert loop.conn.acks[-1][:2] == ("c2", True)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "tests"),
    [({}, True), ({"skip_test": True}, False), ({"run_test": True}, True)],
)
def test_a_shutdown_or_rollback_stop_skips_the_do_test_after_pass(
    args: dict[str, Any], tests: bool
) -> None:
    """do_test_after tests when a user stops the run; not at a supervisor shutdown (Ctrl+C)
    or on a rollback's abandoned branch, whose Stop carries skip_test."""
    loop = _Loop(DataLoader(TensorDataset(torch.zeros(8, 4), torch.zeros(8, 1))))
    loop.run_test_on_stop = True  # do_test_after=True
    loop._handle(Command("stop", "", {"reason": "r", **args}))
    assert loop.stop_reason and loop.run_test_on_stop is tests
    msg = pb.SupervisorCommand(stop=pb.Stop(reason="r", skip_test=True))
    assert command_from_proto(msg).args["skip_test"] is True  # type: ignore[union-attr]


# -- 2. per-sample losses of padded sequences ------------------------------------------------


def _seq_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(6, 3, 5, generator=g)
    y = torch.randint(0, 3, (6, 5), generator=g)
    y[1, 2:] = -100  # padded
    y[3, :] = -100  # nothing but padding
    y[4, 0] = -100
    return out, y


@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 2.0, 0.5])])
@pytest.mark.parametrize("kind", ["ce", "nll"])
def test_a_sequence_samples_loss_is_the_users_mean_over_its_own_valid_tokens(
    weight: torch.Tensor | None, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, y = _seq_batch()
    if kind == "nll":
        out = out.log_softmax(1)
        fn: nn.Module = nn.NLLLoss(weight=weight, ignore_index=-100)
    else:
        fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-100)
    expect = []
    for i in range(6):
        valid = y[i] != -100
        expect.append(
            float(fn(out[i : i + 1, :, valid], y[i : i + 1, valid])) if valid.any() else 0.0
        )
    psl = PerSampleLoss(fn)
    o = out.clone().requires_grad_(True)
    total, per = psl(o, y, 6)  # the small-output path: the user's loss + a reduction='none' call
    assert torch.allclose(total, fn(out, y))
    assert torch.allclose(per, torch.tensor(expect), atol=1e-6), (per, expect)
    assert per[3] == 0.0  # no valid token: 0, not NaN (NaN reads as "not seen" in the store)
    deferred = psl.per_sample(out, y)  # the recorder thread's call
    assert torch.equal(deferred, per)
    monkeypatch.setattr(losses, "SMALL_OUTPUT", 1)  # the large-output path
    total_l, per_l = psl(out.clone().requires_grad_(True), y, 6)
    assert torch.allclose(total_l, fn(out, y)) and torch.allclose(per_l, per)


def test_sequence_per_sample_losses_batched_over_steps_are_bitwise_the_per_step_ones() -> None:
    psl = PerSampleLoss(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])))
    (o1, y1), (o2, y2) = _seq_batch(1), _seq_batch(2)
    assert psl.deferrable(o1, y1)
    both = psl.per_sample(torch.cat([o1, o2]), torch.cat([y1, y2]))
    assert torch.equal(both, torch.cat([psl.per_sample(o1, y1), psl.per_sample(o2, y2)]))


@pytest.mark.parametrize("small_output", [1 << 20, 1])
def test_an_ignore_index_outside_the_classes_is_not_used_as_a_weight_index(
    small_output: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "SMALL_OUTPUT", small_output)
    fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=255)
    out, y = _seq_batch()
    y = torch.where(y == -100, torch.full_like(y, 255), y)
    total, per = PerSampleLoss(fn)(out.requires_grad_(True), y, 6)
    assert torch.allclose(total, fn(out, y)) and per[3] == 0.0


def test_kl_div_batchmean_backward_is_the_users_loss() -> None:
    kl = nn.KLDivLoss(reduction="batchmean")
    o = torch.randn(4, 5).log_softmax(1).requires_grad_(True)
    t = torch.randn(4, 5).softmax(1)
    total, per = PerSampleLoss(kl)(o, t, 4)
    assert torch.allclose(total, kl(o, t))
    # A sample's loss is its KL (the sum over its elements): their mean is the user's loss
    # (it was the mean over the elements, 1/C of it).
    assert torch.allclose(per, nn.KLDivLoss(reduction="none")(o, t).sum(1))
    assert torch.allclose(per.mean(), total)


class _ScalarWithReduction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()


class _ScalarLoss(nn.modules.loss._Loss):
    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).abs().mean()


def _same_step(fn: Any, out: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """PerSampleLoss(fn) on (out, y): asserts backward gets exactly fn's own scalar and
    gradients; returns the per-sample losses."""
    total, per = PerSampleLoss(fn)(out, y, batch)
    assert torch.equal(total.detach(), fn(out, y).detach())
    if out.requires_grad:
        total.backward()
        g = out.grad.clone()
        out.grad = None
        fn(out, y).backward()
        assert torch.allclose(g, out.grad)
    assert not per.requires_grad and per.shape == (batch,)
    return per


@pytest.mark.parametrize("fn", [_ScalarWithReduction(), _ScalarLoss()])
@pytest.mark.parametrize("grad", [True, False])
def test_a_loss_module_that_ignores_reduction_none_gets_each_samples_own_loss(
    fn: nn.Module, grad: bool
) -> None:
    """A module whose forward only returns the batch's scalar: each sample's loss is the
    module on that sample alone (vmap), which averages back to the scalar."""
    torch.manual_seed(0)
    out = torch.randn(8, 1, requires_grad=grad)
    y = torch.randn(8, 1)
    with torch.set_grad_enabled(grad):
        per = _same_step(fn, out, y, 8)
    expected = torch.stack([fn(out[i : i + 1], y[i : i + 1]) for i in range(8)]).detach()
    assert torch.allclose(per, expected)
    assert torch.allclose(per.mean(), fn(out, y).detach())


def test_a_composite_loss_module_without_reduction_gets_each_samples_own_loss() -> None:
    class CePlusL2(nn.Module):  # CE + a regulariser: a scalar, no reduction attribute
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(out, y) + 0.01 * (out**2).mean()

    torch.manual_seed(1)
    out, y = torch.randn(8, 3, requires_grad=True), torch.randint(0, 3, (8,))
    per = _same_step(CePlusL2(), out, y, 8)
    ce = nn.functional.cross_entropy(out, y, reduction="none") + 0.01 * (out**2).mean(1)
    assert torch.allclose(per, ce.detach(), atol=1e-6)


def test_a_scalar_loss_of_a_tuple_output_gets_each_samples_own_loss() -> None:
    """A model returning (logits, features) and a loss that unpacks them: vmap splits
    every tensor of the tuple by sample."""

    def loss_fn(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        logits, feats = out
        return nn.functional.cross_entropy(logits, y) + 0.01 * feats.pow(2).mean()

    torch.manual_seed(2)
    logits = torch.randn(6, 3, requires_grad=True)
    feats = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    total, per = PerSampleLoss(loss_fn)((logits, feats), y, 6)
    assert torch.equal(total.detach(), loss_fn((logits, feats), y).detach())
    want = nn.functional.cross_entropy(logits, y, reduction="none") + 0.01 * feats.pow(2).mean(1)
    assert torch.allclose(per, want.detach(), atol=1e-6) and not per.requires_grad


def test_a_summing_scalar_loss_is_recognised_as_a_sum() -> None:
    def sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).sum()

    loss = PerSampleLoss(sse)
    out, y = torch.randn(5, 2), torch.randn(5, 2)
    _, per = loss(out, y, 5)
    assert torch.allclose(per, ((out - y) ** 2).sum(1)) and loss.reduction == "sum"


def test_a_scalar_loss_of_the_whole_batch_gets_a_clear_error() -> None:
    """A loss normalised by the batch's own statistics has no per-sample value: refused,
    with what to do, rather than recording numbers that are not the sample's loss."""

    def per_batch_scaled(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean() / (y.std() + 1e-3)

    def item_inside(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean() * float(y.abs().max().item())

    out, y = torch.randn(8, 1), torch.randn(8, 1)
    with pytest.raises(OnTheFlyError) as ei:
        PerSampleLoss(per_batch_scaled)(out, y, 8)
    msg = str(ei.value)
    assert "it depends on the batch as a whole" in msg and "accept reduction=" in msg, msg
    with pytest.raises(OnTheFlyError) as ei:
        PerSampleLoss(item_inside)(out, y, 8)
    msg = str(ei.value)  # vmap cannot run it: the reason is in the error
    assert "loss_fn item_inside returned a scalar and has no reduction='none'" in msg, msg
    assert "torch.func.vmap, failed too" in msg, msg


def _sum_by_default(out: torch.Tensor, y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    per = ((out - y) ** 2).squeeze(1)
    return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per


_W = torch.tensor([[0.5, -1.0]], requires_grad=True)


def _mean_plus_penalty(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    per = ((out - y) ** 2).squeeze(1)
    return per if reduction == "none" else per.mean() + _W.pow(2).sum()


def _none_by_default(out: torch.Tensor, y: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    return nn.functional.mse_loss(out, y, reduction=reduction).squeeze(1)


def _passes_kwargs(out: torch.Tensor, y: torch.Tensor, **kw: Any) -> torch.Tensor:
    return nn.functional.l1_loss(out, y, **kw).squeeze(-1) if kw else nn.functional.l1_loss(out, y)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (_sum_by_default, lambda o, y: ((o - y) ** 2).sum()),
        (_mean_plus_penalty, lambda o, y: ((o - y) ** 2).mean() + _W.pow(2).sum()),
        (_none_by_default, lambda o, y: ((o - y) ** 2).mean()),
        (_passes_kwargs, lambda o, y: (o - y).abs().mean()),
    ],
)
def test_a_loss_function_taking_reduction_trains_on_its_own_plain_call(
    fn: Any, expected: Any
) -> None:
    """Backward uses the function's own plain call (its default reduction, a penalty it
    adds), not the mean of its reduction='none' values; those are the per-sample losses."""
    out = torch.randn(6, 1, requires_grad=True)
    y = torch.randn(6, 1)
    total, per = PerSampleLoss(fn)(out, y, 6)
    assert torch.allclose(total, expected(out, y))
    assert torch.allclose(per, fn(out, y, reduction="none").reshape(6))
    assert not per.requires_grad
    total.backward()
    g = out.grad.clone()
    out.grad = None
    expected(out, y).backward()
    assert torch.allclose(g, out.grad)


def test_a_loss_function_ignoring_reduction_none_gets_each_samples_own_loss() -> None:
    def scalar_anyway(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return ((out - y) ** 2).mean()

    out, y = torch.randn(8, 1, requires_grad=True), torch.randn(8, 1)
    per = _same_step(scalar_anyway, out, y, 8)
    assert torch.allclose(per, ((out - y) ** 2).reshape(8).detach())


# -- 3. a diverging run's epoch statistics ---------------------------------------------------


def test_loss_stats_of_huge_float32_losses_are_finite_json() -> None:
    arr = np.full(256, 3.0e38, dtype=np.float32)  # a float32 sum overflows to inf
    arr[:3] = [np.inf, np.nan, 1.0]
    stats = loss_stats(arr)
    assert stats["seen"] == 254 and stats["total"] == 256
    assert stats["mean"] == pytest.approx((253 * float(np.float32(3.0e38)) + 1.0) / 254)
    json.dumps(stats, allow_nan=False)  # what the event store does with it
    assert loss_stats(np.full(4, np.nan, dtype=np.float32))["mean"] is None


# -- 4. a SyntaxError names the bad line ------------------------------------------------------


def test_a_syntax_error_names_its_file_and_line(tmp_path: Path) -> None:
    script = tmp_path / "syntax.py"
    script.write_text("import torch\nx = 1\ndef f(:\n  pass\n")
    with pytest.raises(SyntaxError) as ei:
        runpy.run_path(str(script), run_name="__main__")
    rec = error_record(ei.value, str(tmp_path))
    assert (rec["filename"], rec["lineno"]) == (str(script), 3)
    assert rec["message"] == "SyntaxError: invalid syntax"
    bad = tmp_path / "indent.py"
    bad.write_text("if True:\nprint(1)\n")
    with pytest.raises(IndentationError) as ie:
        runpy.run_path(str(bad))
    rec = error_record(ie.value, str(tmp_path))
    assert (rec["filename"], rec["lineno"]) == (str(bad), 2)
    assert str(rec["message"]).startswith("IndentationError: expected an indented block")


def test_a_syntax_error_from_compiled_text_names_the_calling_line() -> None:
    try:
        compile("1 +", "<string>", "exec")
    except SyntaxError as e:
        rec = error_record(e, os.path.dirname(__file__))
    assert rec["filename"] == __file__ and rec["message"].startswith("SyntaxError: ")  # type: ignore[union-attr]


def _library_step() -> None:
    raise OnTheFlyError("loss_fn returned a scalar")  # like onthefly_worker/losses.py


def _library_fit() -> dict[str, object]:
    """Like Trainer.fit(): the error is caught and sent inside the library, so its
    traceback starts here and holds library frames only (this file is under the repo)."""
    try:
        _library_step()
    except OnTheFlyError as e:
        return error_record(e)
    raise AssertionError("unreachable")


def test_an_error_caught_inside_fit_names_the_users_line_that_called_fit(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("def train(fit):\n    x = 1\n    return fit()\n")
    rec = runpy.run_path(str(script))["train"](_library_fit)
    assert (rec["filename"], rec["lineno"]) == (str(script), 3), rec
    assert rec["message"] == "OnTheFlyError: loss_fn returned a scalar"
    assert "_library_step" in str(rec["traceback"])  # the traceback itself is unchanged
    # No user frame on the stack either (pytest, this file): the innermost frame, as before.
    rec = _library_fit()
    assert (
        rec["filename"] == __file__ and rec["lineno"] == _library_step.__code__.co_firstlineno + 1
    )


# -- 5. a busy port leaves no session behind ----------------------------------------------------


def test_a_busy_port_leaves_no_session_folder(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sup = Supervisor(SupervisorConfig(script=str(script), project_dir=str(tmp_path), port=port))
        assert os.path.isdir(sup.dir)
        with pytest.raises(SupervisorError, match=f"port {port} on 127.0.0.1 is in use"):
            sup.start()
        sup.shutdown()  # what `onthefly run` does next
    root = tmp_path / ".onthefly" / "sessions"
    assert not os.path.exists(sup.dir)
    assert not root.exists() or list(root.iterdir()) == []


# -- 6. loader processes die with their training worker --------------------------------------

_PR_GET_PDEATHSIG = 2
_USER_INIT: list[int] = []


def _user_init(worker_id: int) -> None:
    _USER_INIT.append(worker_id + 100)


class _Probe(Dataset):
    """Each item: (the loader process's parent-death signal, its parent pid, what the
    user's worker_init_fn left)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        sig = ctypes.c_int(0)
        ctypes.CDLL("libc.so.6").prctl(_PR_GET_PDEATHSIG, ctypes.byref(sig))
        return torch.tensor([sig.value, os.getppid(), *(_USER_INIT or [-1])])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_epoch_loader_workers_get_a_parent_death_signal_and_the_users_init() -> None:
    user = DataLoader(_Probe(), batch_size=2, num_workers=2, worker_init_fn=_user_init)
    got = torch.cat(list(epoch_loader(user, [np.arange(2), np.arange(2, 4)], 0, 0)))
    for sig, ppid, init in got.tolist():
        assert sig == signal.SIGKILL and ppid == os.getpid()
        assert init in (100, 101)
    assert _USER_INIT == []  # ran in the loader processes, not here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver is POSIX-only")
@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_epoch_loader_workers_run_under_forkserver_and_spawn(context: str) -> None:
    """A forkserver's loader processes are the fork server's children, not the training
    worker's: they must not take that for "the training worker died" and exit."""
    user = DataLoader(
        TensorDataset(torch.arange(8)), batch_size=2, num_workers=2, multiprocessing_context=context
    )
    batches = [np.arange(i, i + 2) for i in range(0, 8, 2)]
    got = torch.cat([b[0] for b in epoch_loader(user, batches, 0, 0)])
    assert got.tolist() == list(range(8))


# -- 7. SIGTERM exits 143, SIGINT 130 ----------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_give_128_plus_their_number(sig: signal.Signals, code: int) -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = install_signal_handlers(None)  # type: ignore[arg-type]
        assert stop() == 0
        os.kill(os.getpid(), sig)
        assert stop() == code
        os.kill(os.getpid(), signal.SIGINT)  # a second signal hurries, it does not change the code
        assert stop() == code
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# -- 8. dict batches --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys", [("inputs", "labels"), ("input_ids", "labels"), ("image", "label"), ("x", "y")]
)
def test_dict_batches_with_common_keys(keys: tuple[str, str]) -> None:
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch({keys[0]: x, keys[1]: y, "attention_mask": x}) == (x, y)


def test_an_unknown_dict_batch_lists_every_accepted_pair() -> None:
    with pytest.raises(OnTheFlyError) as ei:
        split_batch({"pixels": 1, "klass": 2})
    msg = str(ei.value)
    for pair in ("x/y", "input/target", "inputs/targets", "inputs/labels", "input_ids/labels"):
        assert pair in msg
    assert "features/label" in msg and "image/label" in msg


# -- 9. status / sessions ls without a live supervisor ---------------------------------------


def _finished_session(root: Path, name: str, status: RunStatus) -> Path:
    sdir = root / ".onthefly" / "sessions" / name
    st = Store(str(sdir))
    try:
        st.set_meta("script", "/x/train.py")
        st.add_run(RunRow("main", "main", "main", status, [], 1.0))
    finally:
        st.close()
    latest = sdir.parent / "latest"
    if latest.is_symlink():
        latest.unlink()
    latest.symlink_to(name)
    return sdir


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_status_of_a_finished_session_prints_its_stored_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status"]) == 1  # no session at all: still an error
    assert "no OnTheFly session" in capsys.readouterr().err
    _finished_session(tmp_path, "s1", RunStatus.COMPLETED)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "no live supervisor (finished" in out
    assert "run main" in out and "completed" in out
    assert cli.main(["status", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["live"] is False and d["state"] == "finished" and d["session_id"] == "s1"
    assert d["runs"][0]["run_id"] == "main" and d["runs"][0]["status"] == "completed"


def test_a_killed_supervisor_shows_as_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    sdir = _finished_session(tmp_path, "s2", RunStatus.RUNNING)
    (sdir / "connection.json").write_text(
        json.dumps({"addr": "127.0.0.1:1", "token": "t", "session_id": "s2", "pid": _dead_pid()})
    )
    assert cli.main(["sessions", "ls"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "s2" in x)
    assert "stopped (supervisor gone)" in line and "running" not in line and "live" not in line
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "no live supervisor (gone" in out and "stopped (supervisor gone)" in out
    assert cli.main(["status", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["live"] is False and d["state"] == "supervisor gone"


def test_a_bad_trainer_option_names_the_users_line_not_generated_code(tmp_path: Path) -> None:
    """TrainerConfig validates in a dataclass's generated __init__ (file "<string>"): the
    error names the script's Trainer(...) line."""
    script = tmp_path / "badcfg.py"
    script.write_text(
        "from onthefly_worker.config import TrainerConfig\n\nTrainerConfig(max_epochs=0)\n"
    )
    with pytest.raises(OnTheFlyError) as info:
        runpy.run_path(str(script))
    rec = error_record(info.value, str(tmp_path))
    assert (rec["filename"], rec["lineno"]) == (str(script), 3), rec


def test_a_dead_training_worker_not_yet_reaped_counts_as_dead_for_its_loaders() -> None:
    # A loader process forked just before its training worker died arms its death signal
    # too late; it must see the worker (a zombie until reaped) as dead and exit.
    import subprocess
    import time as _time

    from onthefly_worker.data import _alive

    running = subprocess.Popen(["sleep", "5"])
    done = subprocess.Popen(["true"])
    try:
        deadline = _time.time() + 5
        while _time.time() < deadline:
            with open(f"/proc/{done.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            _time.sleep(0.01)
        assert _alive(running.pid) and not _alive(done.pid)  # a zombie is dead
    finally:
        running.kill()
        running.wait()
        done.wait()
    assert not _alive(done.pid)  # reaped


def test_persistent_workers_that_are_not_kept_are_said_to_be_not_kept(tmp_path: Path) -> None:
    """A new user's loader with persistent_workers=True started its workers again every
    epoch (its worker_init_fn ran each time) and nothing said so."""
    from onthefly_worker.trainer import _Loop

    logs: list[tuple[str, str]] = []
    loop = SimpleNamespace(
        train_loader=DataLoader(
            TensorDataset(torch.zeros(4, 1)), num_workers=1, persistent_workers=True
        ),
        log=lambda text, level="info": logs.append((text, level)),
    )
    _Loop._note_persistent_workers(loop)  # type: ignore[arg-type]
    assert len(logs) == 1 and logs[0][1] == "note"
    assert "persistent_workers=True is not kept" in logs[0][0]
    loop.train_loader = DataLoader(TensorDataset(torch.zeros(4, 1)))
    _Loop._note_persistent_workers(loop)  # type: ignore[arg-type]
    assert len(logs) == 1
