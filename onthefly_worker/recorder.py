"""Buffers step metrics and per-sample losses, and flushes them as few, packed messages.

Per step the training loop only appends references (the loss tensors stay where they
are, so there is no device sync per step); a flush every ~50 ms or 64 KB concatenates,
copies to host once, packs ids as int64 and losses as float32 bytes, and queues one
`SampleLosses` and one `MetricsBatch` message.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Any

import numpy as np
import torch

from onthefly_proto import onthefly_pb2 as pb

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Recorder:
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
        self._ids: list[np.ndarray] = []
        self._per: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._gnorms: list[torch.Tensor | float] = []
        self._points: list[tuple[int, int, int, float, float, float, float, float]] = []
        self._extra: list[dict[str, float]] = []
        self._cls: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._epoch = -1
        self._pending = 0
        self._last_flush = time.monotonic()
        self.epoch_sum = 0.0
        self.epoch_count = 0
        self.sent_samples = 0

    def record(
        self,
        step: int,
        epoch: int,
        batch: int,
        ids: np.ndarray,
        per: torch.Tensor,
        loss: torch.Tensor,
        lr: float,
        grad_norm: torch.Tensor | float,
        step_ms: float,
        data_ms: float,
        extra: dict[str, float] | None = None,
        cls: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`cls` = (logits [B, C], labels [B]) of a classification batch; margins and
        predictions are computed at flush time, batched over many steps."""
        if epoch != self._epoch and self._ids:
            self.flush()
        self._epoch = epoch
        self._ids.append(ids)
        self._per.append(per)
        self._losses.append(loss.detach())
        self._gnorms.append(grad_norm)
        n = len(ids)
        sps = n / (step_ms / 1000.0) if step_ms > 0 else 0.0
        self._points.append((step, epoch, batch, time.time(), lr, sps, step_ms, data_ms))
        self._extra.append(extra or {})
        self._cls.append(cls)
        self._pending += 12 * n
        if (
            self._pending >= self.max_pending_bytes
            or time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._ids:
            return
        ids = np.concatenate(self._ids).astype("<i8", copy=False)
        per = (
            torch.cat([p.reshape(-1) for p in self._per])
            .float()
            .cpu()
            .numpy()
            .astype("<f4", copy=False)
        )
        losses = torch.stack([x.float() for x in self._losses]).cpu().tolist()
        gns = [float(g) if not isinstance(g, torch.Tensor) else g for g in self._gnorms]
        tensors = [g for g in gns if isinstance(g, torch.Tensor)]
        if tensors:
            values = iter(torch.stack([t.float() for t in tensors]).cpu().tolist())
            gns = [next(values) if isinstance(g, torch.Tensor) else g for g in gns]
        finite = per[np.isfinite(per)]
        self.epoch_sum += float(finite.sum(dtype=np.float64))
        self.epoch_count += int(finite.size)
        mem = memory_mb(self.device)
        points = []
        for (step, epoch, batch, t, lr, sps, sms, dms), loss, gn, extra in zip(
            self._points, losses, gns, self._extra, strict=True
        ):
            points.append(
                pb.StepMetric(
                    step=step,
                    epoch=epoch,
                    batch=batch,
                    time=t,
                    loss=loss,
                    lr=lr,
                    grad_norm=float(gn) if gn is not None else math.nan,
                    samples_per_s=sps,
                    step_time_ms=sms,
                    data_time_ms=dms,
                    memory_mb=mem,
                    extra=extra,
                )
            )
        first, last = self._points[0][0], self._points[-1][0]
        cls_kw: dict[str, bytes] = {}
        parts = [c for c in self._cls if c is not None]
        if parts and len(parts) == len(self._cls) and len({c[0].shape[1] for c in parts}) == 1:
            margin, pred, label = self._margins(
                torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts])
            )
            cls_kw = {
                "margins": margin.cpu().numpy().astype("<f4").tobytes(),
                "preds": pred.cpu().numpy().astype("<i4").tobytes(),
                "labels": label.cpu().numpy().astype("<i4").tobytes(),
            }
        self._send(
            samples=pb.SampleLosses(
                run_id=self.run_id,
                epoch=self._epoch,
                count=int(ids.size),
                ids=ids.tobytes(),
                losses=per.tobytes(),
                first_step=first,
                last_step=last,
                **cls_kw,
            )
        )
        self._send(metrics=pb.MetricsBatch(run_id=self.run_id, points=points))
        self.sent_samples += int(ids.size)
        self._ids.clear()
        self._per.clear()
        self._losses.clear()
        self._gnorms.clear()
        self._points.clear()
        self._extra.clear()
        self._cls.clear()
        self._pending = 0

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
            true = o.gather(1, y[:, None]).squeeze(1)
            others = o.scatter(1, y[:, None], float("-inf"))
            return true - others.max(dim=1).values, o.argmax(dim=1), target

    def take_epoch_mean(self) -> float:
        self.flush()
        mean = self.epoch_sum / self.epoch_count if self.epoch_count else math.nan
        self.epoch_sum = 0.0
        self.epoch_count = 0
        return mean
