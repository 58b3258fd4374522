"""Checkpoint snapshots (shared-memory arenas) and the background writer process.

The writer process is real: these tests start it (a fresh interpreter importing torch)
and check the files it writes, its failure handling and that it dies with its worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from onthefly_worker import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def model_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    return {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "model": {
            "w": w,
            "w_t": w.t(),  # non-contiguous
            "b": torch.randn(64, generator=g).to(torch.bfloat16),
            "mask": torch.rand(10, generator=g) > 0.5,
            "steps": torch.tensor(7),
            "empty": torch.empty(0, 3),
            "sparse": torch.eye(4).to_sparse(),
        },
        "rng": ckpt.capture_rng(),
        "cursor": {"epoch": 1, "batch": 3, "seed": 5},
        "notes": ["a", ("b", 2)],
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[ckpt.SavedCheckpoint | None, BaseException | None]] = []

    def __call__(self, saved: ckpt.SavedCheckpoint | None, err: BaseException | None) -> None:
        self.calls.append((saved, err))


def write_through_process(writer: ckpt.AsyncWriter, state: Any, path: str, timeout: float = 120):
    """Submit until the writer process (which starts on the first large write) takes it."""
    deadline = time.monotonic() + timeout
    while True:
        rec = Recorder()
        writer.submit(ckpt.snapshot(state), path, {"p": path}, rec)
        writer.wait()
        if writer.last_mode == "process" or time.monotonic() > deadline:
            assert writer.last_mode == "process", "the writer process never came up"
            assert len(rec.calls) == 1
            return rec.calls[0]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def writer() -> Iterator[ckpt.AsyncWriter]:
    yield ckpt.AsyncWriter(process_min_bytes=0)


# -- snapshot --------------------------------------------------------------------------------


def test_snapshot_is_an_independent_copy() -> None:
    state = model_state()
    snap = ckpt.snapshot(state)
    assert_same(state, snap)
    state["model"]["w"].add_(1.0)
    assert not torch.equal(state["model"]["w"], snap["model"]["w"])
    assert snap["cursor"] is not state["cursor"] and snap["cursor"] == state["cursor"]


def test_snapshot_reuses_its_arena_and_never_overwrites_a_live_snapshot() -> None:
    state = model_state(1)
    first = ckpt.snapshot(state)
    ptr = first["model"]["w"].data_ptr()
    kept = ckpt.snapshot(state)  # `first` is alive: this one must live elsewhere
    assert kept["model"]["w"].data_ptr() != ptr
    expected = first["model"]["w"].clone()
    state["model"]["w"].mul_(3.0)
    del kept
    third = ckpt.snapshot(state)
    assert torch.equal(first["model"]["w"], expected), "a live snapshot was overwritten"
    assert torch.equal(third["model"]["w"], state["model"]["w"])
    del first, third
    # Same shapes, nothing alive: no new arena, the same memory every time.
    ptrs, arenas = set(), []
    for _ in range(5):
        again = ckpt.snapshot(state)
        ptrs.add(again["model"]["w"].data_ptr())
        arenas.append(sorted(a.id for a in ckpt._POOL.arenas))
        del again
    assert len(ptrs) == 1 and all(a == arenas[0] for a in arenas), (ptrs, arenas)


def test_snapshot_keeps_one_copy_of_a_tensor_named_twice() -> None:
    w = torch.randn(8, 8)
    snap = ckpt.snapshot({"a": w, "b": w})
    assert snap["a"] is snap["b"]


def test_snapshot_of_gpu_tensors_lands_on_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    snap = ckpt.snapshot({"w": torch.randn(16, device="cuda")})
    assert snap["w"].device.type == "cpu"


# -- the writer process ----------------------------------------------------------------------


def test_writer_process_writes_a_loadable_file_with_its_sha256(
    writer: ckpt.AsyncWriter, tmp_path: Path
) -> None:
    state = model_state(2)
    path = str(tmp_path / "c" / "step-1.pt")
    saved, err = write_through_process(writer, state, path)
    assert err is None and saved is not None
    assert saved.sha256 == ckpt.sha256_file(path) and saved.nbytes == os.path.getsize(path)
    assert saved.meta == {"p": path}
    assert ckpt.writer_process_pid() not in (0, os.getpid())
    loaded = torch.load(path, weights_only=True)
    assert_same(state, loaded)
    assert_same(state["model"], ckpt.load(path)["model"])
    assert not [p for p in os.listdir(tmp_path / "c") if ".tmp-" in p]


def test_a_state_that_was_not_snapshotted_is_written_too(
    writer: ckpt.AsyncWriter, tmp_path: Path
) -> None:
    write_through_process(writer, model_state(3), str(tmp_path / "warm.pt"))
    state = model_state(4)
    rec = Recorder()
    writer.submit(state, str(tmp_path / "raw.pt"), {}, rec)
    writer.wait()
    assert writer.last_mode == "process"
    ((saved, err),) = rec.calls
    assert err is None and saved is not None
    assert_same(state, torch.load(saved.path, weights_only=True))


def test_unwritable_path_reports_the_error_and_keeps_the_previous_file(
    writer: ckpt.AsyncWriter, tmp_path: Path
) -> None:
    good = str(tmp_path / "step-5.pt")
    saved, err = write_through_process(writer, model_state(5), good)
    assert err is None and saved is not None
    before = ckpt.sha256_file(good)
    blocked = tmp_path / "step-10.pt"
    blocked.mkdir()  # the rename onto a folder must fail
    rec = Recorder()
    writer.submit(ckpt.snapshot(model_state(6)), str(blocked), {}, rec)
    writer.wait()
    assert writer.last_mode == "process"
    ((saved, err),) = rec.calls
    assert saved is None and isinstance(err, IsADirectoryError), err
    assert writer.error is err
    writer.error = None
    assert ckpt.sha256_file(good) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_dead_writer_process_does_not_lose_checkpoints(
    writer: ckpt.AsyncWriter, tmp_path: Path
) -> None:
    write_through_process(writer, model_state(7), str(tmp_path / "a.pt"))
    pid = ckpt.writer_process_pid()
    os.kill(pid, signal.SIGKILL)
    proc = ckpt._WRITER
    assert proc is not None
    assert proc.dead.wait(30), "the worker did not notice its writer process died"
    state = model_state(8)
    rec = Recorder()
    writer.submit(ckpt.snapshot(state), str(tmp_path / "b.pt"), {}, rec)
    writer.wait()
    ((saved, err),) = rec.calls
    assert err is None and saved is not None, err
    assert_same(state, torch.load(saved.path, weights_only=True))
    # A later large write starts a new writer process.
    saved, err = write_through_process(writer, state, str(tmp_path / "c.pt"))
    assert err is None and ckpt.writer_process_pid() not in (0, pid)


def test_callbacks_run_once_each_when_writes_queue_up(tmp_path: Path) -> None:
    writers = [ckpt.AsyncWriter(process_min_bytes=0) for _ in range(3)]
    recs = [Recorder() for _ in writers]
    threads = [
        threading.Thread(
            target=lambda w=w, r=r, i=i: [
                w.submit(ckpt.snapshot(model_state(i)), str(tmp_path / f"{i}-{k}.pt"), {}, r)
                for k in range(3)
            ]
        )
        for i, (w, r) in enumerate(zip(writers, recs, strict=True))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.wait()
    for i, r in enumerate(recs):
        assert len(r.calls) == 3
        for saved, err in r.calls:
            assert err is None and saved is not None
            assert saved.sha256 == ckpt.sha256_file(saved.path)
            assert_same(model_state(i)["model"]["w"], torch.load(saved.path)["model"]["w"])


def test_writer_process_dies_with_its_worker(tmp_path: Path) -> None:
    code = (
        "import sys, time, torch\n"
        "from onthefly_worker import checkpoint as ckpt\n"
        "w = ckpt.AsyncWriter(process_min_bytes=0)\n"
        "state = {'x': torch.randn(1000)}\n"
        f"path = {str(tmp_path / 'x.pt')!r}\n"
        "while True:\n"
        "    w.submit(ckpt.snapshot(state), path, {}, lambda s, e: None); w.wait()\n"
        "    if w.last_mode == 'process': break\n"
        "    time.sleep(0.2)\n"
        "print(ckpt.writer_process_pid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        child = int(line)
        assert child > 0 and os.path.exists(f"/proc/{child}")
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the writer process outlived its worker"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def test_error_from_the_writer_process_keeps_its_type() -> None:
    e = ckpt._error_from_wire(ckpt._error_to_wire(PermissionError(13, "Permission denied", "/x")))
    assert isinstance(e, PermissionError) and e.filename == "/x"
    e = ckpt._error_from_wire(ckpt._error_to_wire(ValueError("bad")))
    assert type(e) is ValueError and str(e) == "bad"
    e = ckpt._error_from_wire({"type": "PicklingError", "message": "nope"})
    assert isinstance(e, RuntimeError) and "PicklingError: nope" in str(e)


# -- the hashing write -----------------------------------------------------------------------


@pytest.mark.parametrize("tail_min", [0, 8 << 20])
def test_hash_taken_while_writing_equals_the_file_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail_min: int
) -> None:
    # 0: every state is hashed by the thread following the file as torch.save writes it;
    # the default: these small states are hashed after the save. The digest must be the
    # file's, byte for byte, either way.
    monkeypatch.setattr(ckpt, "_TAIL_HASH_MIN_BYTES", tail_min)
    big = {f"layer{i}": torch.randn(300, 300) for i in range(4)}
    state = {**model_state(), "big": big, "half": torch.randn(512, 257).half()}
    for name, obj in (("small", model_state()), ("mixed", state), ("snap", ckpt.snapshot(state))):
        path = str(tmp_path / f"{name}.pt")
        digest, nbytes = ckpt.write_atomic(obj, path)
        assert digest == ckpt.sha256_file(path), name
        assert nbytes == os.path.getsize(path), name
        assert_same(torch.load(path, weights_only=True), obj, name)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "no temp file is left behind"


_FULL_DISK = """
import os, resource, signal, sys
import torch
from onthefly_worker import checkpoint as ckpt
path = sys.argv[1]
ckpt.write_atomic({"w": torch.zeros(10)}, path)
before = ckpt.sha256_file(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
try:
    ckpt.write_atomic({"big": torch.randn(400, 400), "w": torch.ones(10)}, path)
except Exception as e:
    print("raised", type(e).__name__, e)
else:
    print("no error")
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print("intact", ckpt.sha256_file(path) == before)
print("files", sorted(os.listdir(os.path.dirname(path))))
digest, _ = ckpt.write_atomic({"w": torch.full((10,), 2.0)}, path)
print("after", digest == ckpt.sha256_file(path))
"""


_FULL_DISK_LIVE = """
import os, resource, signal, sys
import torch
from onthefly_worker import checkpoint as ckpt
path = sys.argv[1]
w = ckpt.AsyncWriter()
got = []
w.submit_live({"w": torch.zeros(10)}, path, {}, lambda s, e: got.append((s, e)))
w.wait()
before = ckpt.sha256_file(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
w.submit_live({"big": torch.randn(400, 400)}, path, {}, lambda s, e: got.append((s, e)))
w.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print("mode", w.last_mode)
print("error", got[-1][0] is None and isinstance(got[-1][1], OSError))
print("intact", ckpt.sha256_file(path) == before)
print("files", sorted(os.listdir(os.path.dirname(path))))
"""


def test_a_live_state_is_serialized_before_submit_live_returns(tmp_path: Path) -> None:
    """Small states: torch.save into memory on the calling thread, the bytes written by a
    GIL-free thread. Training may change the tensors at once; the file has the old values."""
    writer = ckpt.AsyncWriter()
    state = model_state(4)
    del state["model"]["sparse"]  # torch.save handles it; kept out to compare with torch.equal
    expected = ckpt.snapshot(state)
    path = str(tmp_path / "live.pt")
    rec = Recorder()
    writer.submit_live(state, path, {"p": path}, rec)
    state["model"]["w"].add_(100.0)  # the next training step, before the write is done
    writer.wait()
    assert writer.last_mode == "inline"
    ((saved, err),) = rec.calls
    assert err is None and saved is not None
    assert saved.sha256 == ckpt.sha256_file(path) and saved.nbytes == os.path.getsize(path)
    assert_same(expected, torch.load(path, weights_only=True))
    assert os.listdir(tmp_path) == ["live.pt"]


def test_a_large_live_state_goes_to_the_snapshot_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt, "INLINE_MAX_BYTES", 1024)
    writer = ckpt.AsyncWriter(process_min_bytes=1 << 40)  # thread, not the process
    state = {"w": torch.randn(64, 64)}
    path = str(tmp_path / "big.pt")
    rec = Recorder()
    writer.submit_live(state, path, {}, rec)
    expected = state["w"].clone()
    state["w"].zero_()
    writer.wait()
    assert writer.last_mode == "thread"
    assert torch.equal(torch.load(path, weights_only=True)["w"], expected)


def test_an_inline_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_LIVE, str(tmp_path / "c.pt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "mode inline",
        "error True",
        "intact True",
        "files ['c.pt']",
    ], r.stdout


def test_a_write_that_hits_a_full_disk_raises_and_keeps_the_old_file(tmp_path: Path) -> None:
    # A real failing write: the file-size limit (EFBIG) stands in for a full disk.
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path / "c.pt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("raised"), r.stdout
    assert lines[1:] == ["intact True", "files ['c.pt']", "after True"], r.stdout
