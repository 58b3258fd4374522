"""Checkpoints: everything needed to continue a run exactly, written atomically.

Training is blocked only for an in-memory snapshot (tensors cloned); the file is written
by a background thread to a temp file, fsynced, renamed into place, and its sha256 is
computed on the way out. Loading always uses `weights_only=True`: a checkpoint (or an
imported session) can never run code.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FORMAT = "onthefly-checkpoint"
VERSION = 1


def snapshot(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU memory, so training can go on at once."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


def capture_rng() -> dict[str, Any]:
    """All RNG states (python, numpy, torch CPU, every CUDA device) as weights_only-safe values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(state: dict[str, Any], path: str) -> tuple[str, int]:
    """torch.save to `path` via temp file + fsync + rename; returns (sha256, bytes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        # torch.save to a path uses its C++ writer (a Python file wrapper is ~2x slower);
        # the hash is then read back from the page cache before fsync makes it durable.
        torch.save(state, tmp)
        digest, nbytes = _sha256_and_size(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest, nbytes


def _sha256_and_size(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while True:
            k = f.readinto(buf)
            if not k:
                break
            h.update(view[:k])
            n += k
    return h.hexdigest(), n


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(
    path: str, map_location: Any = "cpu", expected_sha256: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True, verifying its sha256 when one is known."""
    if expected_sha256:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ValueError(
                f"checkpoint {path} is corrupt: sha256 {actual[:12]}… != recorded {expected_sha256[:12]}…"
            )
    # mmap: tensors are paged in on use instead of read up front (resume costs ~ one step).
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an OnTheFly checkpoint")
    if int(state.get("version", 0)) > VERSION:
        raise ValueError(f"{path} was written by a newer OnTheFly (format {state.get('version')})")
    return state


@dataclass
class SavedCheckpoint:
    path: str
    sha256: str
    nbytes: int
    meta: dict[str, Any]


class AsyncWriter:
    """One background writer; a new save waits for the previous one (bounded memory)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(
        self,
        state: dict[str, Any],
        path: str,
        meta: dict[str, Any],
        done: Callable[[SavedCheckpoint | None, BaseException | None], None],
    ) -> None:
        self.wait()

        def run() -> None:
            try:
                sha, n = write_atomic(state, path)
                done(SavedCheckpoint(path, sha, n, meta), None)
            except BaseException as e:  # noqa: BLE001 - reported to the training loop
                self.error = e
                done(None, e)

        self._thread = threading.Thread(target=run, name="onthefly-ckpt", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
