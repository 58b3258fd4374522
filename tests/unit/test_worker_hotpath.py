"""The worker's per-step pieces: per-sample loss, the recorder's packing thread, the grad-norm cadence."""

from __future__ import annotations

import math
import re
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import losses
from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.recorder import Recorder


def test_small_output_backward_is_the_users_own_loss() -> None:
    torch.manual_seed(0)
    out = torch.randn(32, 5, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    total, per = PerSampleLoss(nn.CrossEntropyLoss())(out, y, 32)
    expect = nn.CrossEntropyLoss()(out, y)
    assert torch.equal(total, expect)  # bitwise: the same fused call
    assert torch.allclose(per, nn.CrossEntropyLoss(reduction="none")(out, y))
    assert not per.requires_grad
    total.backward()
    g_ours = out.grad.clone()
    out.grad = None
    expect.backward()
    assert torch.equal(g_ours, out.grad)


def test_large_output_reduces_the_per_sample_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "SMALL_OUTPUT", 10)
    out = torch.randn(8, 4, requires_grad=True)
    y = torch.randn(8, 4)
    for reduction in ("mean", "sum"):
        total, per = PerSampleLoss(nn.MSELoss(reduction=reduction))(out, y, 8)
        assert torch.allclose(total, nn.MSELoss(reduction=reduction)(out, y))
        assert per.shape == (8,)
        assert torch.allclose(per, ((out - y) ** 2).mean(dim=1).detach())


def test_weighted_cross_entropy_matches_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.tensor([1.0, 3.0, 0.5])
    out = torch.randn(16, 3)
    y = torch.randint(0, 3, (16,))
    small, _ = PerSampleLoss(nn.CrossEntropyLoss(weight=w))(out, y, 16)
    monkeypatch.setattr(losses, "SMALL_OUTPUT", 1)
    large, _ = PerSampleLoss(nn.CrossEntropyLoss(weight=w))(out, y, 16)
    assert torch.allclose(small, large)


def _recorder(sent: list[dict[str, object]], **kw: object) -> Recorder:
    return Recorder(lambda **m: sent.append(m), "main", torch.device("cpu"), **kw)  # type: ignore[arg-type]


def _ce_recorder(sent: list[dict[str, object]], psl: PerSampleLoss, **kw: object) -> Recorder:
    """A recorder computing `psl`'s deferred per-sample losses, fused when it is a plain CE."""
    rec = _recorder(sent, **kw)
    rec.per_sample = psl.per_sample
    rec.plain_ce = psl.plain_ce_ignore_index()
    return rec


def _record_logits(
    rec: Recorder, step: int, ids: np.ndarray, out: torch.Tensor, y: torch.Tensor, loss: float = 1.0
) -> None:
    """One classification step of epoch 0, deferred as the trainer defers it."""
    rec.record(
        step, 0, step - 1, ids, (out, y), loss, 0.1, None, 2.0, 0.1,
        cls=Recorder.classification(out, y),
    )  # fmt: skip


def test_recorder_sends_every_sample_in_order_with_margins_and_epoch_mean() -> None:
    sent: list[dict[str, object]] = []
    rec = _recorder(sent, flush_interval_s=0.0)  # a hand-off on every step
    rng = np.random.default_rng(0)
    all_ids, all_loss = [], []
    for step in range(1, 41):
        ids = rng.permutation(1000)[:8]
        per = torch.rand(8)
        logits = torch.randn(8, 4)
        labels = torch.randint(0, 4, (8,))
        rec.record(
            step,
            0,
            step - 1,
            ids,
            per,
            float(per.mean()),
            0.1,
            None,
            2.0,
            0.1,
            cls=Recorder.classification(logits, labels),
        )
        all_ids.append(ids)
        all_loss.append(per.numpy())
    mean = rec.take_epoch_mean()
    samples = [m["samples"] for m in sent if "samples" in m]
    # One message per flush: the samples carry the same steps' metrics.
    assert not any("metrics" in m for m in sent)
    metrics = [s.metrics for s in samples]  # type: ignore[attr-defined]
    assert isinstance(samples[0], pb.SampleLosses)
    ids = np.concatenate([np.frombuffer(s.ids, "<i8") for s in samples])  # type: ignore[attr-defined]
    vals = np.concatenate([np.frombuffer(s.losses, "<f4") for s in samples])  # type: ignore[attr-defined]
    assert np.array_equal(ids, np.concatenate(all_ids))
    assert np.array_equal(vals, np.concatenate(all_loss))
    steps = [p.step for mb in metrics for p in mb.points]  # type: ignore[attr-defined]
    assert steps == list(range(1, 41))
    assert all(math.isnan(p.grad_norm) for mb in metrics for p in mb.points)  # type: ignore[attr-defined]
    assert mean == pytest.approx(float(np.concatenate(all_loss).mean()), rel=1e-6)
    margins = np.frombuffer(samples[0].margins, "<f4")  # type: ignore[attr-defined]
    assert margins.shape == (8,)


def test_steps_the_training_thread_never_came_back_for_are_sent_after_a_while() -> None:
    """A loop stuck after its last step (a stalled loader, user code that hangs) still
    gets its recorded steps to the supervisor, which would otherwise show the last flush."""
    sent: list[dict[str, object]] = []
    rec = _recorder(sent, flush_interval_s=60.0)  # no hand-off from the training thread
    rec.stale_after_s = 0.2
    for step in (1, 2, 3):
        rec.record(
            step, 0, step - 1, np.arange(4) + 4 * step, torch.rand(4), 0.5, 0.1, None, 2.0, 0.1
        )
    deadline = time.monotonic() + 5.0
    while not sent and time.monotonic() < deadline:
        time.sleep(0.02)
    [msg] = [m["samples"] for m in sent]
    assert [p.step for p in msg.metrics.points] == [1, 2, 3]  # type: ignore[attr-defined]
    rec.record(4, 0, 3, np.arange(4), torch.rand(4), 0.5, 0.1, None, 2.0, 0.1)
    rec.flush()  # and the next steps go on as before
    assert [p.step for m in sent for p in m["samples"].metrics.points] == [1, 2, 3, 4]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.5]), label_smoothing=0.1),
        nn.MSELoss(),
        nn.CrossEntropyLoss(reduction="sum"),
    ],
)
def test_deferred_per_sample_losses_equal_the_per_step_ones(loss_fn: nn.Module) -> None:
    """Deferred (output, target) pairs, computed batched on the packing thread, give bitwise
    the values the per-step call gives, in order, mixed with ordinary per-sample tensors."""
    psl = PerSampleLoss(loss_fn)
    sent: list[dict[str, object]] = []
    rec = _recorder(sent, flush_interval_s=10.0)  # one hand-off, at flush
    rec.per_sample = psl.per_sample
    torch.manual_seed(0)
    expect = []
    for step in range(1, 31):
        b = 5 if step % 7 == 0 else 8  # a short batch too
        out = torch.randn(b, 4, requires_grad=True)
        y = (
            torch.randint(0, 4, (b,))
            if isinstance(loss_fn, nn.CrossEntropyLoss)
            else torch.randn(b, 4)
        )
        total, per = psl(out, y, b)
        expect.append(per.numpy().copy())
        assert psl.deferrable(out, y)
        assert torch.equal(total, loss_fn(out, y))
        item = (out.detach(), y) if step % 5 else per  # every 5th step not deferred
        rec.record(
            step, 0, step - 1, np.arange(b), item, float(total.detach()), 0.1, None, 2.0, 0.1
        )
    rec.flush()
    vals = np.concatenate(
        [np.frombuffer(m["samples"].losses, "<f4") for m in sent if "samples" in m]  # type: ignore[attr-defined]
    )
    assert np.array_equal(vals, np.concatenate(expect))


def test_only_torchs_row_independent_losses_defer() -> None:
    class Mine(nn.MSELoss):  # a subclass may change forward: not deferred
        pass

    out, y = torch.randn(4, 3), torch.randn(4, 3)
    assert PerSampleLoss(nn.MSELoss()).deferrable(out, y)
    assert not PerSampleLoss(Mine()).deferrable(out, y)
    assert not PerSampleLoss(lambda o, t, reduction="mean": (o - t).pow(2).mean()).deferrable(
        out, y
    )
    assert not PerSampleLoss(nn.MSELoss(reduction="none")).deferrable(out, y)
    big = torch.randn(losses.DEFER_OUTPUT + 1, 1)
    assert not PerSampleLoss(nn.MSELoss()).deferrable(big, big)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not PerSampleLoss(nn.MSELoss()).deferrable(out, y)
    # Output (B, 1) against target (B,) broadcasts to (B, B): each row's value is its mean over
    # its own batch's targets, as the user's loss is; other steps' rows must not join in (a
    # new user's regression stored means over the whole epoch's targets).
    col, flat = torch.randn(24, 1), torch.randn(24)
    psl = PerSampleLoss(nn.MSELoss())
    assert not psl.deferrable(col, flat)
    with pytest.warns(UserWarning):  # torch's own warning about the shapes
        assert torch.allclose(psl.per_sample(col, flat), ((col - flat[None]) ** 2).mean(1))
    # Class ids never broadcast: CrossEntropy stays deferrable.
    assert PerSampleLoss(nn.CrossEntropyLoss()).deferrable(
        torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    )


def test_recorder_margins_are_true_minus_best_other() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    margin, pred, _ = Recorder._margins(logits, labels)
    assert margin.tolist() == [2.0, -3.0, 0.0]
    assert pred.tolist()[:2] == [0, 2]


def test_recorder_nonfinite_losses_are_left_out_of_the_epoch_mean() -> None:
    sent: list[dict[str, object]] = []
    rec = _recorder(sent)
    rec.record(1, 0, 0, np.arange(3), torch.tensor([1.0, math.nan, 3.0]), 2.0, 0.1, 1.0, 1.0, 0.0)
    assert rec.take_epoch_mean() == pytest.approx(2.0)


def test_recorder_send_failure_surfaces_on_the_training_thread() -> None:
    def broken(**_: object) -> None:
        raise ConnectionError("stream closed")

    rec = Recorder(broken, "main", torch.device("cpu"))
    rec.record(1, 0, 0, np.arange(2), torch.rand(2), 1.0, 0.1, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="stream closed"):
        rec.flush()


def test_recorder_packs_off_the_training_thread() -> None:
    threads: list[str] = []
    rec = Recorder(
        lambda **_: threads.append(threading.current_thread().name), "main", torch.device("cpu")
    )
    rec.record(1, 0, 0, np.arange(2), torch.rand(2), 1.0, 0.1, 1.0, 1.0, 0.0)
    rec.flush()
    assert threads and all(t == "onthefly-recorder" for t in threads)


def test_grad_norm_every_is_validated() -> None:
    with pytest.raises(OnTheFlyError, match="grad_norm_every"):
        TrainerConfig(grad_norm_every=-1)
    assert TrainerConfig(grad_norm_every=4).grad_norm_every == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "Trainer(device='tpu'): must be a torch device"),
        ({"amp": "yes"}, "Trainer(amp='yes'): must be True or False"),
        ({"do_test_after": "yes"}, "Trainer(do_test_after='yes'): must be True or False"),
        ({"grad_clip": "1"}, "Trainer(grad_clip='1'): must be a number >= 0"),
        ({"grad_clip": float("inf")}, "Trainer(grad_clip=inf): must be a number >= 0"),
        ({"max_steps": True}, "Trainer(max_steps=True): must be an integer >= 0"),
        ({"nonfinite_patience": 2.5}, "Trainer(nonfinite_patience=2.5): must be an integer"),
        ({"project": ""}, "Trainer(project=''): must be a non-empty string"),
    ],
)
def test_device_and_amp_are_checked_when_the_trainer_is_built(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(OnTheFlyError, match=re.escape(message)):
        TrainerConfig(**kwargs)  # type: ignore[arg-type]
    assert TrainerConfig(device="cpu", amp=True).torch_device().type == "cpu"


class _Broken(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:
            raise KeyError(f"no record {i}")
        return torch.tensor(float(i))


def test_root_cause_of_a_loader_worker_error_names_the_users_getitem() -> None:
    from onthefly_worker.errors import error_record

    loader = torch.utils.data.DataLoader(_Broken(), batch_size=2, num_workers=1)
    with pytest.raises(KeyError) as info:
        list(loader)
    rec = error_record(info.value)
    assert rec["message"] == "KeyError: 'no record 5' (raised in DataLoader worker process 0)"
    assert rec["filename"] == __file__ and rec["lineno"] > 0
    with open(__file__) as f:
        line = f.read().splitlines()[int(rec["lineno"]) - 1]  # type: ignore[call-overload]
    assert "raise KeyError" in line
    assert "Original Traceback" in str(rec["traceback"])  # the whole story stays in the record


def _record_steps(rec: Recorder, steps: range, epoch: int = 0) -> None:
    for step in steps:
        per = torch.full((4,), float(step))
        rec.record(
            step, epoch, step, np.arange(4) + 4 * step, per, float(step), 0.1, None, 1.0, 0.1
        )


def test_end_epoch_does_not_wait_and_its_message_follows_the_epochs_losses() -> None:
    """The training thread hands the epoch's end to the packing thread and goes on; the
    EpochEnd that the callback sends comes after every loss of the epoch, with its mean,
    and the next epoch's mean starts from zero."""
    sent: list[dict[str, object]] = []
    gate = threading.Event()

    def send(**m: object) -> None:
        gate.wait(10)  # a slow connection: packing stalls until the test lets it go
        sent.append(m)

    rec = Recorder(send, "main", torch.device("cpu"), flush_interval_s=10.0)
    _record_steps(rec, range(1, 6))
    means: list[float] = []
    rec.end_epoch(lambda mean: (means.append(mean), send(epoch_end=mean)))
    assert not sent and not means  # returned while the packing thread is stalled
    _record_steps(rec, range(6, 8), epoch=1)
    gate.set()
    second = rec.take_epoch_mean()
    kinds = [next(iter(m)) for m in sent]
    assert kinds == ["samples", "epoch_end", "samples"]
    assert means == [pytest.approx(3.0)]  # mean of steps 1..5, each 4 samples
    assert second == pytest.approx(6.5)


def test_a_due_flush_after_a_short_step_waits_for_the_next_backward() -> None:
    """With hand_off_at_backward, a flush found due after a short step is handed to the
    packing thread at the next `before_backward()` (packing then overlaps backward, which
    runs without the GIL); after a long step, or when the next step records without a
    backward (a skipped update), it is handed off at once."""
    sent: list[dict[str, object]] = []
    rec = _recorder(sent, flush_interval_s=0.0)  # every step finds a flush due
    rec.hand_off_at_backward = True

    def record(step: int, step_ms: float) -> None:
        per = torch.full((4,), float(step))
        rec.record(step, 0, step, np.arange(4) + 4 * step, per, 1.0, 0.1, None, step_ms, 0.1)

    def steps_sent() -> list[int]:
        rec.wait_sent(rec._handed)
        return [p.step for m in sent for p in m["samples"].metrics.points]  # type: ignore[attr-defined]

    record(1, 2.0)
    assert rec._handed == 0  # due, held for the next backward
    rec.before_backward()
    assert steps_sent() == [1]
    rec.before_backward()  # nothing due: nothing handed off
    assert rec._handed == 1
    record(2, 2.0)
    record(3, 2.0)  # no backward in between: step 2's flush goes now, with step 3 held
    assert steps_sent() == [1, 2]
    record(4, 500.0)  # a long step: at once (steps 3 and 4)
    assert steps_sent() == [1, 2, 3, 4]
    record(5, 2.0)
    rec.flush()  # a flush never waits for a backward
    assert steps_sent() == [1, 2, 3, 4, 5]
    # An epoch's end may wait for the next epoch's first backward (at_backward=True) ...
    means: list[float] = []
    rec.end_epoch(means.append, at_backward=True)
    assert rec._handed == 5 and not means
    rec.before_backward()
    rec.wait_sent(rec._handed)
    assert means == [pytest.approx(3.0)]  # steps 1..5, all 4 samples each
    # ... or for nothing (the default), and a stalled loop sends it after stale_after_s.
    rec.end_epoch(means.append)
    rec.wait_sent(rec._handed)
    assert len(means) == 2
    rec.stale_after_s = 0.1
    rec.end_epoch(means.append, at_backward=True)
    deadline = time.monotonic() + 5
    while len(means) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(means) == 3


def test_wait_sent_orders_a_message_from_another_thread_after_earlier_steps() -> None:
    """A checkpoint's CheckpointSaved is sent from the writer's thread; waiting for the
    buffers handed off before the checkpoint puts it after their losses on the wire."""
    sent: list[str] = []
    gate = threading.Event()

    def send(**m: object) -> None:
        gate.wait(10)
        sent.append(next(iter(m)))

    rec = Recorder(send, "main", torch.device("cpu"), flush_interval_s=0.0)
    _record_steps(rec, range(1, 4))
    handed = rec.hand_off()  # nothing left to hand off: the count
    assert handed == 3

    def writer_thread() -> None:
        rec.wait_sent(handed)
        sent.append("checkpoint")

    t = threading.Thread(target=writer_thread)
    t.start()
    t.join(0.2)
    assert t.is_alive() and not sent  # held back: the losses before it are not sent yet
    gate.set()
    t.join(10)
    assert sent == ["samples"] * 3 + ["checkpoint"]


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_plain_cross_entropy_losses_and_margins_come_from_one_pass(scale: float) -> None:
    """A plain CrossEntropyLoss's deferred steps: losses equal reduction='none' (to float32
    rounding; 0 at ignore_index) and margins/predictions equal the separate computation."""
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    psl = PerSampleLoss(loss_fn)
    assert psl.plain_ce_ignore_index() == -1
    assert PerSampleLoss(nn.CrossEntropyLoss(label_smoothing=0.1)).plain_ce_ignore_index() is None
    assert PerSampleLoss(nn.CrossEntropyLoss(weight=torch.ones(3))).plain_ce_ignore_index() is None
    assert PerSampleLoss(nn.NLLLoss()).plain_ce_ignore_index() is None
    sent: list[dict[str, object]] = []
    rec = _ce_recorder(sent, psl, flush_interval_s=10.0)
    rec.stale_after_s = 60.0  # one flush: no hand-off of steps "left waiting" on a busy machine
    torch.manual_seed(1)
    outs, ys = [], []
    for step in range(1, 21):
        out = torch.randn(16, 5) * scale
        y = torch.randint(0, 5, (16,))
        y[step % 16] = -1  # an ignored target
        outs.append(out)
        ys.append(y)
        _record_logits(rec, step, np.arange(16), out, y)
    rec.flush()
    msg = next(m["samples"] for m in sent if "samples" in m)
    got = np.frombuffer(msg.losses, "<f4")  # type: ignore[attr-defined]
    o, t = torch.cat(outs), torch.cat(ys)
    ref = nn.functional.cross_entropy(o, t, reduction="none", ignore_index=-1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert (got[(t == -1).numpy()] == 0).all()
    margin, pred, label = Recorder._margins(o, t)
    assert np.array_equal(np.frombuffer(msg.margins, "<f4"), margin.numpy())  # type: ignore[attr-defined]
    assert np.array_equal(np.frombuffer(msg.preds, "<i4"), pred.numpy())  # type: ignore[attr-defined]
    assert np.array_equal(np.frombuffer(msg.labels, "<i4"), label.numpy())  # type: ignore[attr-defined]


def test_a_single_class_weighted_target_follows_the_sequence_rule() -> None:
    """w_y * CE / w_y: a sample's unweighted loss (the README's rule for a sequence's
    valid tokens, now also for one target); an ignored sample records 0."""
    fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]), ignore_index=-100)
    out = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, -100, 1, 0])
    total, per = PerSampleLoss(fn)(out.requires_grad_(True), y, 6)
    assert torch.allclose(total, fn(out, y))
    plain = nn.functional.cross_entropy(out.detach(), y, reduction="none")
    assert torch.allclose(per, plain) and per[3] == 0.0


@pytest.mark.parametrize("case", ["weighted", "ignored", "sequences"])
def test_evaluation_gives_the_users_loss_over_the_whole_set(case: str) -> None:
    """The val/test loss is the user's loss over the set (class weights, ignore_index and
    a sequence's valid tokens weigh samples as the user's 'mean' does), and accuracy counts
    only samples whose target is not ignored."""
    from torch.utils.data import DataLoader, TensorDataset

    from onthefly_worker.evaluation import evaluate_model

    g = torch.Generator().manual_seed(2)
    if case == "sequences":
        x = torch.randn(40, 5, 4, generator=g)
        y = torch.randint(0, 3, (40, 5), generator=g)
        y[::2, 2:] = -100  # every other sample is 2 tokens long, the rest 5
        model: nn.Module = nn.Sequential(nn.Linear(4, 3))
        fwd = lambda t: model(t).transpose(1, 2)  # noqa: E731 - (B, C, T)
        fn = nn.CrossEntropyLoss()
    else:
        x = torch.randn(40, 4, generator=g)
        y = torch.randint(0, 3, (40,), generator=g)
        model = nn.Linear(4, 3)
        fwd = model
        fn = nn.CrossEntropyLoss(
            weight=torch.tensor([1.0, 3.0, 0.5]) if case == "weighted" else None
        )
        if case == "ignored":
            y[::4] = -100
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # batches of 16, 16 and 8
    loss, acc, n = evaluate_model(
        model, loader, PerSampleLoss(fn), torch.device("cpu"), forward=fwd
    )
    with torch.no_grad():
        out = fwd(x)
        assert n == 40 and loss == pytest.approx(float(fn(out, y)), rel=1e-5)
        if case == "ignored":
            valid = y != -100
            assert acc == pytest.approx(float((out.argmax(1) == y)[valid].float().mean()))


@pytest.mark.parametrize("fused", [True, False])
def test_the_epochs_train_loss_is_the_users_loss_over_the_epoch(fused: bool) -> None:
    """Deferred steps weigh their samples as the user's 'mean' does: ignored targets (the
    fused plain-CE pass) and class weights (the deferred weighted-CE pass)."""
    fn = (
        nn.CrossEntropyLoss()
        if fused
        else nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]))
    )
    psl = PerSampleLoss(fn)
    sent: list[dict[str, object]] = []
    rec = _ce_recorder(sent, psl)
    rec.row_weights = psl.row_weights
    assert (rec.plain_ce is not None) is fused
    g = torch.Generator().manual_seed(1)
    outs, ys = [], []
    for step in range(1, 6):
        out, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
        y[step % 8] = -100
        outs.append(out)
        ys.append(y)
        _record_logits(rec, step, np.arange(8) + 8 * step, out, y, float(fn(out, y)))
    mean = rec.take_epoch_mean()
    assert mean == pytest.approx(float(fn(torch.cat(outs), torch.cat(ys))), rel=1e-5)


@pytest.mark.parametrize("classes", [2, 10, 33, 100])
def test_host_cross_entropy_and_margins_match_the_torch_pass(classes: int) -> None:
    """The CPU path (numpy on class-major logits) gives the torch pass's losses (to float32
    rounding), margins, predictions (first class on ties, the NaN's class on a NaN row)
    and labels, 0 loss at ignore_index."""
    from onthefly_worker.recorder import _ce_and_margins, _ce_and_margins_host

    torch.manual_seed(classes)
    logits = torch.randn(300, classes) * 3
    logits[3, 1] = float("nan")
    logits[7] = logits[7, 0]  # every class ties
    target = torch.randint(0, classes, (300,))
    target[5] = -100
    ref = [t.numpy() for t in _ce_and_margins(logits, target, -100)]
    got = _ce_and_margins_host(np.ascontiguousarray(logits.numpy().T), target.numpy(), -100)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[0][5] == 0.0
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    assert got[2][7] == 0 and got[2][3] == 1
    np.testing.assert_array_equal(got[3], ref[3])


def test_a_model_returning_a_tuple_to_a_torch_loss_is_a_clear_error() -> None:
    psl = PerSampleLoss(nn.CrossEntropyLoss())
    with pytest.raises(OnTheFlyError, match="the model returned a tuple, and CrossEntropyLoss"):
        psl((torch.randn(4, 3), torch.randn(4)), torch.tensor([0, 1, 2, 0]), 4)
    # A loss function of the user's own may take what the model returns.
    own = PerSampleLoss(lambda out, y: nn.functional.cross_entropy(out[0], y, reduction="none"))
    total, per = own((torch.randn(4, 3), torch.randn(4)), torch.tensor([0, 1, 2, 0]), 4)
    assert per.shape == (4,)


def _cadence(norm_s: float, step_s: float, steps: int) -> tuple[int, list[str]]:
    """The auto grad-norm cadence `_Loop._calibrate_grad_norm` picks after `steps` measured
    steps whose norm took `norm_s` of a `step_s` step, and the notes it logged."""
    from types import SimpleNamespace

    from onthefly_worker.trainer import _Loop

    notes: list[str] = []
    loop = SimpleNamespace(
        grad_clip=0.0,
        scaler=None,
        gn_every=0,
        _gn_cal=[],
        log=lambda text, level="info": notes.append(text),
    )
    for _ in range(steps):
        _Loop._calibrate_grad_norm(loop, norm_s, time.perf_counter() - step_s)  # type: ignore[arg-type]
    return loop.gn_every, notes


def test_grad_norm_cadence_is_timed_after_the_warm_up_steps() -> None:
    from onthefly_worker.trainer import _GN_TIMED_STEPS, _GN_WARMUP_STEPS, GRAD_NORM_BUDGET

    # Not decided during the warm-up steps nor before enough steps were timed.
    assert _cadence(50e-6, 1.8e-3, _GN_WARMUP_STEPS + _GN_TIMED_STEPS - 1)[0] == 0
    # The bench MLP's numbers: a 50 us norm of a 1.8 ms step (2.8%) runs every 12th step.
    every, notes = _cadence(50e-6, 1.8e-3, _GN_WARMUP_STEPS + _GN_TIMED_STEPS)
    assert every == math.ceil(50e-6 / (GRAD_NORM_BUDGET * 1.8e-3)) == 12
    assert len(notes) == 1 and "measured every 12 steps" in notes[0], notes
    # A norm that is cheap next to the step: every step, nothing said.
    assert _cadence(10e-6, 50e-3, 40) == (1, [])
    # At most every 16th step, however costly.
    assert _cadence(1e-3, 1e-3, 40)[0] == 16


@pytest.mark.parametrize("mix", ["float64", "classes", "bfloat16"])
def test_a_flush_of_mixed_logits_is_not_fused_and_keeps_every_loss(mix: str) -> None:
    """The fused cross-entropy pass takes float32 [B, C] logits with one C over the whole
    flush; a flush mixing class counts or dtypes falls back to the per-run computation,
    with the same per-sample values as reduction='none' per step."""
    psl = PerSampleLoss(nn.CrossEntropyLoss())
    sent: list[dict[str, object]] = []
    rec = _ce_recorder(sent, psl, flush_interval_s=10.0)
    torch.manual_seed(2)
    refs = []
    for step in range(1, 5):
        c = 7 if mix == "classes" and step == 3 else 5
        out = torch.randn(8, c)
        if step == 2 and mix != "classes":
            out = out.to(getattr(torch, mix))
        y = torch.randint(0, 5, (8,))
        refs.append(nn.functional.cross_entropy(out.float(), y, reduction="none"))
        _record_logits(rec, step, np.arange(8) + 8 * step, out, y)
    rec.flush()
    msgs = [m["samples"] for m in sent if "samples" in m]
    got = np.concatenate([np.frombuffer(m.losses, "<f4") for m in msgs])  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        got,
        torch.cat(refs).numpy(),
        rtol=1e-2 if mix == "bfloat16" else 1e-5,
        atol=1e-2 if mix == "bfloat16" else 1e-5,
    )
    ids = np.concatenate([np.frombuffer(m.ids, "<i8") for m in msgs])  # type: ignore[attr-defined]
    assert ids.tolist() == list(range(8, 40))


def test_step_values_reach_the_host_as_floats_whatever_they_were() -> None:
    """Losses and grad norms arrive as floats, None (not measured: NaN) or scalar tensors of
    any dtype, and become the metrics' floats in step order."""
    from onthefly_worker.recorder import _host_floats

    got = _host_floats(
        [
            1.5,
            None,
            torch.tensor(2.25),
            torch.tensor(3.0, dtype=torch.float64),
            torch.tensor(0.5, dtype=torch.bfloat16),
            torch.tensor([4.0]),
            7,
        ]
    )
    assert got[0] == 1.5 and math.isnan(got[1])
    assert got[2:] == [2.25, 3.0, 0.5, 4.0, 7.0]
    assert all(type(v) is float for v in got)
