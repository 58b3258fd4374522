"""The GPU allocator against a fake NVML (CI has no GPU; tests/integration/test_gpu.py runs
the real thing where there is one): inventory, least-loaded choice, caps, --gpus and
CUDA_VISIBLE_DEVICES restrictions, and a machine without a driver."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from onthefly_supervisor.gpu import GpuAllocator


class _Mem:
    def __init__(self, total: float, used: float) -> None:
        self.total, self.used = total, used


class _Util:
    def __init__(self, gpu: float) -> None:
        self.gpu = gpu


def _fake_nvml(devices: list[dict[str, Any]], fail: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    def init() -> None:
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: devices[i]  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: h["name"].encode()  # bytes, as older bindings return  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem(h["total"], h["used"])  # type: ignore[attr-defined]
    m.nvmlDeviceGetUtilizationRates = lambda h: _Util(h["util"])  # type: ignore[attr-defined]
    return m


GIB = 2**30


@pytest.fixture
def devices(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    devs = [
        {"name": "H100 a", "total": 80 * GIB, "used": 10 * GIB, "util": 90.0},
        {"name": "H100 b", "total": 80 * GIB, "used": 1 * GIB, "util": 5.0},
        {"name": "H100 c", "total": 80 * GIB, "used": 30 * GIB, "util": 5.0},
    ]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(devs))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield devs


def test_inventory_and_least_loaded_first(devices: list[dict[str, Any]]) -> None:
    a = GpuAllocator()
    assert [(g.index, g.name, g.memory_total_mb) for g in a.gpus] == [
        (0, "H100 a", 80 * 1024),
        (1, "H100 b", 80 * 1024),
        (2, "H100 c", 80 * 1024),
    ]
    # Fewest workers, then lowest utilization, then least memory used: b, then c, then a.
    assert [a.acquire(w) for w in ("fork-1-0", "fork-2-0", "fork-3-0")] == ["1", "2", "0"]
    assert a.acquire("fork-4-0") == "" and not a.has_free(), "one worker per GPU: CPU now"
    a.release("fork-2-0")
    assert a.has_free() and a.acquire("fork-5-0") == "2"
    a.rename("fork-5-0", "fork-6-0")  # a standby becoming a fork keeps its GPU
    assert a.gpus[2].workers == ["fork-6-0"]


def test_live_numbers_are_read_at_each_choice(devices: list[dict[str, Any]]) -> None:
    a = GpuAllocator(per_gpu=2)
    assert a.acquire("w1") == "1"
    devices[1]["util"] = 99.0  # b got busy meanwhile (another tenant)
    # b has a worker already, a and c none: c, which is less busy than a.
    assert a.acquire("w2") == "2"
    assert a.gpus[1].utilization == 99.0 and a.gpus[2].memory_used_mb == 30 * 1024


def test_gpus_option_and_cuda_visible_devices_restrict_the_pool(
    devices: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [g.index for g in GpuAllocator("0,2").gpus] == [0, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    only = GpuAllocator("auto")
    assert [g.index for g in only.gpus] == [2] and only.acquire("w") == "2"
    with pytest.raises(ValueError, match=r"--gpus 0,5: GPU\(s\) \[5\] not found \(NVML sees 3"):
        GpuAllocator("0,5")
    with pytest.raises(ValueError, match="comma list of GPU indices"):
        GpuAllocator("first")


def test_no_driver_means_cpu_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([], fail=True))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a = GpuAllocator()
    assert a.gpus == [] and "NVML" in a.error
    assert a.acquire("fork-1-0") == "" and not a.has_free()
    with pytest.raises(ValueError, match=r"not found \(NVML sees 0 GPU\(s\); NVML Shared Library"):
        GpuAllocator("0")


def test_the_launcher_pins_a_worker_with_cuda_visible_devices(tmp_path: Any) -> None:
    import time

    from onthefly_supervisor.lifecycle import Role
    from onthefly_supervisor.pool import LocalLauncher, WorkerSpec

    out = tmp_path / "env.txt"
    script = tmp_path / "show_env.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(out)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>') + "
        "' ' + os.environ.get('OMP_NUM_THREADS', '<unset>'))\n"
    )
    launcher = LocalLauncher()
    try:
        for gpu, threads, want in (("3", 0, "3 "), ("", 2, "<unset> 2")):
            spec = WorkerSpec(
                f"fork-{gpu or 'cpu'}-0", "fork-1", Role.FORK, str(script), (), str(tmp_path),
                gpu=gpu, threads=threads,
            )  # fmt: skip
            launcher.start(spec, 0)
            deadline = time.time() + 60
            while launcher.poll(spec.worker_id) is None and time.time() < deadline:
                time.sleep(0.05)
            got = out.read_text()
            assert got.startswith(want), got
    finally:
        launcher.close()
