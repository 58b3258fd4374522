"""GPU inventory and allocation via pynvml (nvidia-ml-py); empty on machines without NVIDIA GPUs."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Gpu:
    index: int
    name: str
    memory_total_mb: float
    memory_used_mb: float = 0.0
    utilization: float = 0.0
    workers: list[str] = field(default_factory=list)


class GpuAllocator:
    """Pins each fork worker to the least-loaded allowed GPU (one worker per GPU by default).

    `gpus` is "auto" (every GPU NVML sees, restricted by our own CUDA_VISIBLE_DEVICES) or
    an explicit comma list of indices.
    """

    def __init__(self, gpus: str = "auto", per_gpu: int = 1) -> None:
        self.per_gpu = per_gpu
        self._lock = threading.Lock()
        self._nvml: Any = None
        self.gpus: list[Gpu] = []
        self.error = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            n = pynvml.nvmlDeviceGetCount()
            for i in range(n):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                self.gpus.append(
                    Gpu(i, name if isinstance(name, str) else name.decode(), mem.total / 2**20)
                )
        except Exception as e:  # no driver / no GPU: CPU-only machine
            self.error = str(e)
            self.gpus = []
        allowed = _parse_allowed(gpus)
        if allowed is not None:
            missing = [i for i in allowed if i not in {g.index for g in self.gpus}]
            if missing:
                raise ValueError(
                    f"--gpus {gpus}: GPU(s) {missing} not found (NVML sees {len(self.gpus)} GPU(s)"
                    + (f"; {self.error}" if self.error else "")
                    + ")"
                )
            self.gpus = [g for g in self.gpus if g.index in allowed]

    def refresh(self) -> list[Gpu]:
        if self._nvml is None:
            return self.gpus
        p = self._nvml
        for g in self.gpus:
            try:
                h = p.nvmlDeviceGetHandleByIndex(g.index)
                g.utilization = float(p.nvmlDeviceGetUtilizationRates(h).gpu)
                mem = p.nvmlDeviceGetMemoryInfo(h)
                g.memory_used_mb = mem.used / 2**20
            except Exception:
                pass
        return self.gpus

    def acquire(self, worker_id: str) -> str:
        """CUDA_VISIBLE_DEVICES for a new worker; "" when no GPU is free (it runs on CPU)."""
        with self._lock:
            self.refresh()
            free = [g for g in self.gpus if len(g.workers) < self.per_gpu]
            if not free:
                return ""
            g = min(free, key=lambda g: (len(g.workers), g.utilization, g.memory_used_mb))
            g.workers.append(worker_id)
            return str(g.index)

    def has_free(self) -> bool:
        """Whether `acquire` would pin a new worker to a GPU now."""
        with self._lock:
            return any(len(g.workers) < self.per_gpu for g in self.gpus)

    def rename(self, old: str, new: str) -> None:
        """A worker's GPU passes to its new id (a warm standby becoming a fork keeps its GPU)."""
        with self._lock:
            for g in self.gpus:
                g.workers = [new if w == old else w for w in g.workers]

    def release(self, worker_id: str) -> None:
        with self._lock:
            for g in self.gpus:
                if worker_id in g.workers:
                    g.workers.remove(worker_id)


def _parse_allowed(spec: str) -> list[int] | None:
    if not spec or spec == "auto":
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is None or env.strip() == "":
            return None
        try:
            return [int(x) for x in env.split(",") if x.strip()]
        except ValueError:
            return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--gpus must be 'auto' or a comma list of GPU indices, got {spec!r}"
        ) from None
