"""Buffers step metrics and per-sample losses, and flushes them as few, packed messages.

Per step the training loop only appends references (the loss tensors stay where they
are, so there is no device sync per step); every ~50 ms or 64 KB a packing thread
concatenates, copies to host once, packs ids as int64 and losses as float32 bytes, and
queues one `SampleLosses` message that carries the same steps' `MetricsBatch`.
"""

from __future__ import annotations

import math
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from onthefly_proto import onthefly_pb2 as pb

# A due flush waits for the next backward (Recorder.before_backward) only after a step this
# short: packing then costs the step a noticeable share, and the wait (the next step's data
# and forward) is brief. After a longer step it is handed off at once.
_DEFER_BELOW_MS = 25.0

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Pending:
    """One flush worth of buffered steps, handed to the packing thread as a whole.

    The training thread appends one tuple per step to `steps`, the least work a step can
    do, and the packing thread unzips them (`unzip`): `record()` takes ~3 us instead of
    the ~17 us of nine list appends (bench/recorder_ab.py measures the whole recorder's
    share of a step)."""

    __slots__ = (
        "cls",
        "end",
        "epoch",
        "extra",
        "gnorms",
        "ids",
        "losses",
        "per",
        "points",
        "steps",
    )

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        # Set by `Recorder.end_epoch`: called on the packing thread with the epoch's mean
        # once this buffer (the epoch's last) is sent.
        self.end: Callable[[float], None] | None = None
        # (ids, per, loss, grad_norm, step, batch, time, lr, step_ms, data_ms, extra, cls)
        self.steps: list[tuple[Any, ...]] = []
        self.ids: list[np.ndarray] = []
        self.per: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[torch.Tensor | float] = []
        self.gnorms: list[torch.Tensor | float | None] = []
        self.points: list[tuple[int, int, int, float, float, float, float, float]] = []
        self.extra: list[dict[str, float] | None] = []
        self.cls: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def unzip(self) -> None:
        """The steps' tuples into the per-field lists (on the packing thread), transposed in
        one `zip` rather than appended field by field."""
        if not self.steps:
            return
        ids, per, loss, gn, step, batch, t, lr, sms, dms, extra, cls = zip(*self.steps, strict=True)
        self.ids, self.per, self.losses, self.gnorms = list(ids), list(per), list(loss), list(gn)
        self.extra, self.cls = list(extra), list(cls)
        epoch = self.epoch
        self.points = [
            (s, epoch, b, ts, r, len(i) / (ms / 1000.0) if ms > 0 else 0.0, ms, d)
            for s, b, ts, r, i, ms, d in zip(step, batch, t, lr, ids, sms, dms, strict=True)
        ]
        self.steps = []


class Recorder:
    """Per step, `record` only appends references. Every ~50 ms or 64 KB the buffer is handed
    to one packing thread, which concatenates, copies to host once, computes margins, builds
    the messages and queues them: that work overlaps the training thread's GIL-free compute
    (backward, optimizer) instead of adding to the step. `flush()` hands off and waits, so
    after it returns everything recorded so far has been sent (pause, epoch end, stop)."""

    def __init__(
        self,
        send: Any,
        run_id: str,
        device: torch.device,
        flush_interval_s: float = 0.05,
        max_pending_bytes: int = 64 * 1024,
    ) -> None:
        self._send = send
        self.run_id = run_id
        self.device = device
        self.flush_interval_s = flush_interval_s
        self.max_pending_bytes = max_pending_bytes
        # A flush is due at this many samples (12 bytes each: an int64 id, a float32 loss).
        self._max_samples = max(1, max_pending_bytes // 12)
        self._buf = _Pending(-1)
        self._pending = 0  # samples buffered
        self._last_flush = time.monotonic()
        self.epoch_sum = 0.0
        self.epoch_count: float = 0  # samples, or their weights (see _weights)
        self.sent_samples = 0
        self._mem = 0.0
        self._mem_at = -1.0
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._inflight = 0
        self._handed = 0  # buffers handed to the packing thread (under _lock)
        self._packed = 0  # of those, sent (packing thread only)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Guards the buffer: the training thread records into it and hands it off; the
        # packing thread takes it when it has waited `stale_after_s` (`_hand_off_stale`).
        self._lock = threading.Lock()
        self.stale_after_s = 1.0
        # Computes deferred per-sample losses from (output, target) pairs, batched.
        self.per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # The ignore_index when the loss is a plain CrossEntropyLoss (PerSampleLoss.
        # plain_ce_ignore_index): its deferred losses and the margins then come from one
        # pass over the logits (`_ce_and_margins`).
        self.plain_ce: int | None = None
        # Each sample's weight in the user's 'mean' from deferred steps' targets
        # (PerSampleLoss.row_weights): the epoch's train loss is then the user's loss.
        self.row_weights: Callable[[torch.Tensor, int], torch.Tensor | None] | None = None
        # A loop that calls `before_backward()` each step sets this: a due flush is then
        # handed to the packing thread when the next backward starts (see before_backward).
        self.hand_off_at_backward = False
        self._due = False

    def record(
        self,
        step: int,
        epoch: int,
        batch: int,
        ids: np.ndarray,
        per: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        loss: torch.Tensor | float,
        lr: float,
        grad_norm: torch.Tensor | float | None,
        step_ms: float,
        data_ms: float,
        extra: dict[str, float] | None = None,
        cls: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`cls` = (logits [B, C], labels [B]) of a classification batch; margins and
        predictions are computed at flush time, batched over many steps. `per` is the
        per-sample loss tensor, or (output, target) whose per-sample losses `per_sample`
        computes at flush time, batched the same way."""
        if self._error is not None:
            self._raise_error()
        if self._thread is None:  # (it also sends steps left unsent too long: _hand_off_stale)
            self._start_thread()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        with self._lock:
            if self._due:  # due at the last step and no backward since (a skipped update)
                self._hand_off_locked()
            buf = self._buf
            if epoch != buf.epoch:
                if buf.steps:
                    self._hand_off_locked()
                buf = self._buf
                buf.epoch = epoch
            buf.steps.append(
                (
                    ids,
                    per,
                    loss,
                    grad_norm,
                    step,
                    batch,
                    time.time(),
                    lr,
                    step_ms,
                    data_ms,
                    extra,
                    cls,
                )
            )
            self._pending += len(ids)
            if (
                self._pending >= self._max_samples
                or time.monotonic() - self._last_flush >= self.flush_interval_s
            ):
                if self.hand_off_at_backward and step_ms < _DEFER_BELOW_MS:
                    self._due = True
                else:
                    self._hand_off_locked()

    def before_backward(self) -> None:
        """Hand a due flush to the packing thread now, as the step's backward starts.

        The packing thread needs the GIL for most of its work (~0.4 ms a flush); backward
        runs without it for its whole length, so packing then overlaps it instead of the
        loop's GIL-bound Python (the next batch's collation, module calls) and the training
        thread rarely waits for the GIL. Handing off where record() finds the flush due (the
        end of a step) lands the packing on the next step's data loading instead."""
        if self._due:
            with self._lock:
                self._hand_off_locked()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._pack_loop, name="onthefly-recorder", daemon=True
        )
        self._thread.start()

    def _hand_off(self) -> None:
        self._raise_error()
        with self._lock:
            self._hand_off_locked()

    def _hand_off_locked(self) -> None:
        self._due = False
        self._last_flush = time.monotonic()
        buf = self._buf
        if not buf.steps and buf.end is None:
            return
        self._buf = _Pending(buf.epoch)
        self._pending = 0
        if self._thread is None:
            self._start_thread()
        with self._cond:
            self._inflight += 1
            self._handed += 1
        self._queue.put(buf)

    def hand_off(self) -> int:
        """Hand what is buffered to the packing thread now, without waiting for it; returns
        how many buffers have been handed off so far (for `wait_sent`)."""
        self._hand_off()
        return self._handed

    def epoch_partial(self) -> tuple[float, float]:
        """(sum, count or weight) of the finite per-sample losses recorded so far this epoch (waits for
        the packing thread): a checkpoint carries them, so a run resumed mid-epoch reports
        the whole epoch's mean, not the mean of the batches after the resume."""
        self.flush()
        return self.epoch_sum, self.epoch_count

    def set_epoch_partial(self, total: float, count: float) -> None:
        self.flush()
        self.epoch_sum, self.epoch_count = float(total), float(count)

    def wait_sent(self, handed: int, timeout: float = 30.0) -> None:
        """Wait (on any thread but the packing one) until the first `handed` buffers are
        sent: a message sent after this follows them on the connection."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._packed < handed and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def end_epoch(self, then: Callable[[float], None], at_backward: bool = False) -> None:
        """Close the epoch without waiting for the packing thread: it sends what is still
        buffered, then calls `then(mean)` with the epoch's mean per-sample loss (NaN when
        no finite loss was seen) and starts the next epoch's mean. Messages `then` sends
        therefore follow the epoch's last per-sample losses on the connection.

        `at_backward` (with hand_off_at_backward): hand off at the next epoch's first
        backward instead of now, as a due flush is (see before_backward): the packing then
        overlaps that backward, not the next epoch's start (its loader and first batch),
        which it slowed by ~1 ms an epoch. A flush (validation, a checkpoint, a pause, the
        end of training) hands it off at once."""
        self._buf.end = then
        if at_backward and self.hand_off_at_backward:
            self._due = True
        else:
            self._hand_off()

    def flush(self) -> None:
        """Send everything recorded so far, and wait until it is queued on the connection."""
        self._hand_off()
        with self._cond:
            while self._inflight:
                self._cond.wait(1.0)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"sending training metrics failed: {err}") from err

    def _pack_loop(self) -> None:
        while True:
            try:
                buf = self._queue.get(timeout=self.stale_after_s)
            except queue.Empty:
                self._hand_off_stale()
                continue
            try:
                with torch.no_grad():
                    self._pack(buf)
            except BaseException as e:  # noqa: BLE001 - surfaced on the training thread
                self._error = e
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._packed += 1
                    self._cond.notify_all()

    def _hand_off_stale(self) -> None:
        """Steps recorded long ago and not yet handed off (the training thread has not come
        back to `record` since: a stalled loader, a loop stuck in user code) are sent from
        here, so the supervisor shows where the run is instead of its last flush."""
        with self._lock:
            buf = self._buf
            if (buf.steps or buf.end is not None) and (
                time.monotonic() - self._last_flush >= self.stale_after_s
            ):
                self._hand_off_locked()

    def _per_sample_values(
        self, items: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Flat per-sample loss tensors in step order; deferred (output, target) pairs with
        the same trailing shapes and dtypes are computed in one call on their rows
        concatenated (the losses allowed to defer are row-independent)."""
        out: list[torch.Tensor] = []
        run: list[tuple[torch.Tensor, torch.Tensor]] = []

        def key(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[Any, ...]:
            o, t = pair
            return (o.shape[1:], o.dtype, o.device, t.shape[1:], t.dtype)

        def compute() -> None:
            if not run:
                return
            assert self.per_sample is not None, "deferred per-sample losses need per_sample"
            if len(run) == 1:
                out.append(self.per_sample(*run[0]).reshape(-1))
            else:
                o = torch.cat([p[0] for p in run])
                t = torch.cat([p[1] for p in run])
                out.append(self.per_sample(o, t).reshape(-1))
            run.clear()

        for item in items:
            if isinstance(item, tuple):
                if run and key(run[-1]) != key(item):
                    compute()
                run.append(item)
            else:
                compute()
                out.append(item.reshape(-1))
        compute()
        return out

    def _memory(self) -> float:
        now = time.monotonic()
        if now - self._mem_at >= 0.5:  # /proc is read at most twice a second
            self._mem, self._mem_at = memory_mb(self.device), now
        return self._mem

    def _pack(self, buf: _Pending) -> None:
        buf.unzip()
        if buf.ids:
            self._pack_steps(buf)
        if buf.end is not None:
            mean = self.epoch_sum / self.epoch_count if self.epoch_count else math.nan
            self.epoch_sum = 0.0
            self.epoch_count = 0
            buf.end(mean)

    def _fused(self, buf: _Pending) -> tuple[torch.Tensor | np.ndarray, ...] | None:
        """(losses, margins, preds, labels) of a buffer of deferred plain-CrossEntropy
        classification steps, from one pass over their logits; None for anything else.
        The Trainer records such a step's margins (`cls`) from the same output and target
        as its deferred pair, so computing both from the pair is the same thing, once."""
        if self.plain_ce is None or any(c is None for c in buf.cls):
            return None
        pairs = buf.per
        if not all(isinstance(p, tuple) for p in pairs):
            return None
        try:  # one check of the concatenation instead of one per step
            logits = torch.cat([p[0] for p in pairs])
            target = torch.cat([p[1] for p in pairs])
        except (RuntimeError, TypeError):  # mixed devices, or shapes that do not line up
            return None
        if not (
            logits.dim() == 2
            and logits.dtype == torch.float32
            and target.dim() == 1
            and not target.is_floating_point()
            and target.shape[0] == logits.shape[0]
            # a float32 concatenation of float32 steps only (cat promotes mixed dtypes)
            and all(p[0].dtype == torch.float32 for p in pairs)
        ):
            return None
        if logits.device.type == "cpu":
            # On the host: numpy on the class-major logits (one transposing copy) after
            # two torch calls in all (each torch call is a GIL hand-off the training thread
            # may wait on; concatenating in torch runs without the GIL).
            return _ce_and_margins_host(
                np.ascontiguousarray(logits.numpy().T), target.numpy(), self.plain_ce
            )
        return _ce_and_margins(logits, target, self.plain_ce)

    def _weights(self, buf: _Pending, labels: np.ndarray | None, n: int) -> np.ndarray | None:
        """Each sample's weight in the epoch's mean when the user's 'mean' weighs samples
        unequally (class weights, ignore_index, a sequence's valid tokens; see
        PerSampleLoss.row_weights), for deferred steps whose targets the buffer holds;
        None for a plain mean. `labels`: the fused pass's labels on the host."""
        if labels is not None:  # a plain CrossEntropyLoss: only ignored targets weigh 0
            # (in numpy: every torch call is a GIL hand-off the training thread may wait on)
            valid = labels != self.plain_ce
            return None if valid.all() else valid.astype(np.float64)
        if self.row_weights is None or not all(isinstance(p, tuple) for p in buf.per):
            return None
        targets = [p[1] for p in buf.per if isinstance(p, tuple)]
        if len({(t.shape[1:], t.dtype, t.device) for t in targets}) != 1:
            return None
        w = self.row_weights(torch.cat(targets), n)
        return None if w is None else _host(w, "<f8")

    def _add_to_epoch(self, per: np.ndarray, w: np.ndarray | None) -> None:
        """Add a flush's finite per-sample losses to the epoch's mean: plainly, or weighted
        as the user's 'mean' weighs the samples (`w`, see _weights)."""
        if w is None:
            total = float(per.sum(dtype=np.float64))
            if math.isfinite(total):  # the common case: no mask needed
                self.epoch_sum += total
                self.epoch_count += per.size
                return
            w = np.ones(per.size)
        ok = np.isfinite(per)
        self.epoch_sum += float((per[ok].astype(np.float64) * w[ok]).sum())
        self.epoch_count += float(w[ok].sum())

    def _pack_steps(self, buf: _Pending) -> None:
        ids = np.concatenate(buf.ids).astype("<i8", copy=False)
        fused = self._fused(buf)
        per_t = fused[0] if fused is not None else torch.cat(self._per_sample_values(buf.per))
        per = _host(per_t, "<f4")
        losses = _host_floats(buf.losses)
        gns = _host_floats(buf.gnorms)
        labels = _host(fused[3], "<i8") if fused is not None else None
        self._add_to_epoch(per, self._weights(buf, labels, per.size))
        mem = self._memory()
        points = [
            pb.StepMetric(
                step=step,
                epoch=epoch,
                batch=batch,
                time=t,
                loss=loss,
                lr=lr,
                grad_norm=gn,
                samples_per_s=sps,
                step_time_ms=sms,
                data_time_ms=dms,
                memory_mb=mem,
                extra=extra or None,
            )
            for (step, epoch, batch, t, lr, sps, sms, dms), loss, gn, extra in zip(
                buf.points, losses, gns, buf.extra, strict=True
            )
        ]
        first, last = buf.points[0][0], buf.points[-1][0]
        cls_kw: dict[str, bytes] = {}
        margins: tuple[torch.Tensor | np.ndarray, ...] | None = (
            fused[1:] if fused is not None else None
        )
        parts = [c for c in buf.cls if c is not None]
        if (
            margins is None
            and parts
            and len(parts) == len(buf.cls)
            and len({c[0].shape[1] for c in parts}) == 1
        ):
            margins = self._margins(
                torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts])
            )
        if margins is not None:
            margin, pred, label = margins
            cls_kw = {
                "margins": _host(margin, "<f4").tobytes(),
                "preds": _host(pred, "<i4").tobytes(),
                "labels": (
                    _host(label, "<i4") if labels is None else labels.astype("<i4")
                ).tobytes(),
            }
        # One message per flush: every gRPC message costs the training thread GIL
        # hand-offs with the sending threads (a worker switched ~1,300 times in 2,000 steps).
        msg = pb.SampleLosses(
            run_id=self.run_id,
            epoch=buf.epoch,
            count=int(ids.size),
            ids=ids.tobytes(),
            losses=per.tobytes(),
            first_step=first,
            last_step=last,
            metrics=pb.MetricsBatch(run_id=self.run_id, points=points),
        )
        if cls_kw:
            msg.margins, msg.preds, msg.labels = (
                cls_kw["margins"],
                cls_kw["preds"],
                cls_kw["labels"],
            )
        self._send(samples=msg)
        self.sent_samples += int(ids.size)

    @staticmethod
    def classification(output: object, target: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, labels) to keep for margins, when output is [B, C] logits (C <= 1024, so
        holding a flush's worth is cheap) and target [B] class ids; else None."""
        if not (
            isinstance(output, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and output.dim() == 2
            and target.dim() == 1
            and output.shape[0] == target.shape[0]
            and 2 <= output.shape[1] <= 1024
            and not target.is_floating_point()
        ):
            return None
        return output.detach(), target.detach()

    @staticmethod
    def _margins(
        logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            o = logits.float()
            y = target.long().clamp(0, o.shape[1] - 1)
            # The best other class: the row max with the true class masked out (topk(2) on
            # CPU costs 2-4x as much for 10-64 classes).
            true = o.gather(1, y[:, None]).squeeze(1)
            best_other = o.scatter(1, y[:, None], float("-inf")).amax(1)
            return true - best_other, o.argmax(1), target

    def take_epoch_mean(self) -> float:
        """`end_epoch` and wait for the mean."""
        got: list[float] = []
        self.end_epoch(got.append)
        self.flush()
        return got[0]


def _ce_and_margins(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (0 where the target is `ignore_index`, as reduction='none'
    gives), margin, prediction and label of [N, C] float32 logits, from one max pass:
    loss = log(sum(exp(x - max))) - (x_true - max), the same arithmetic as
    log_softmax + nll_loss (torch's CPU log_softmax is ~6x slower on few classes)."""
    with torch.no_grad():
        top, pred = logits.max(1)
        # Ignored targets may lie outside the classes: margins read class 0 there, as before.
        y = target.long().clamp(0, logits.shape[1] - 1)[:, None]
        true = logits.gather(1, y).squeeze(1)
        lse = (logits - top[:, None]).exp().sum(1).log()
        loss = (lse - (true - top)).masked_fill(target == ignore_index, 0.0)
        best_other = logits.scatter(1, y, float("-inf")).amax(1)
        return loss, true - best_other, pred, target


def _ce_and_margins_host(
    logits_cn: np.ndarray, target: np.ndarray, ignore_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_ce_and_margins` in numpy, on class-major [C, N] float32 logits (a private copy: it
    is overwritten): every reduction runs across rows of N contiguous values, which numpy
    vectorises, where a reduction over each sample's few classes does not."""
    n = logits_cn.shape[1]
    cols = np.arange(n)
    y = np.clip(target, 0, logits_cn.shape[0] - 1)
    top = logits_cn.max(axis=0)
    c = logits_cn.shape[0]
    if c <= 100:
        # argmax over axis 0 is not vectorised; a max over axis 0 is: weigh each class's
        # "reaches the row max" by c - class, and the largest weight is the first such class.
        weight = np.arange(c, 0, -1, dtype=np.int8)[:, None]
        pred = c - ((logits_cn == top) * weight).max(axis=0).astype(np.int64)
        nan = np.isnan(top)  # a NaN row: the NaN's class, as torch's max gives
        if nan.any():
            pred[nan] = np.isnan(logits_cn[:, nan]).argmax(axis=0)
    else:
        pred = logits_cn.argmax(axis=0)
    true = logits_cn[y, cols]
    shifted = logits_cn - top
    np.exp(shifted, out=shifted)
    loss = np.log(shifted.sum(axis=0)) - (true - top)
    loss[target == ignore_index] = 0.0
    logits_cn[y, cols] = -np.inf
    return loss, true - logits_cn.max(axis=0), pred, target


def _host(t: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """A tensor as a host array of `dtype`. Every torch call releases and re-takes the GIL,
    and each time the training thread may have to wait for it, so a CPU tensor takes none:
    `.numpy()` shares its memory and numpy converts the dtype (a bfloat16 tensor, which
    numpy has no type for, is widened by torch first)."""
    if isinstance(t, np.ndarray):
        return t.astype(dtype, copy=False)
    if t.dtype == torch.bfloat16 or t.device.type != "cpu":
        t = t.float().cpu() if t.is_floating_point() else t.cpu()
    return t.numpy().astype(dtype, copy=False)


def _host_floats(values: Sequence[torch.Tensor | float | None]) -> list[float]:
    """Python floats from a mix of floats, None (not measured: NaN) and scalar tensors: CPU
    tensors one `.item()` each (~0.2 us), device tensors with one host copy for them all
    (one sync instead of one per tensor)."""
    out: list[float] = []
    dev: list[int] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.device.type == "cpu":
                out.append(float(v.item()))
                continue
            dev.append(len(out))
            out.append(math.nan)
        else:
            out.append(math.nan if v is None else float(v))
    if dev:
        host = torch.stack([values[i].reshape(()).float() for i in dev]).cpu().tolist()  # type: ignore[union-attr]
        for i, x in zip(dev, host, strict=True):
            out[i] = x
    return out
