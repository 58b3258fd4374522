"""Checkpoints: everything needed to continue a run exactly, written atomically.

Training is blocked only for an in-memory snapshot. `snapshot()` copies every tensor into
a shared-memory arena (an anonymous memfd, Linux) that is kept and reused by the next
snapshot of the same size, so the copy goes to warm pages with no allocation and no page
faults: it runs at the speed of a plain `copy_`.

`AsyncWriter` hands the snapshot to a long-lived writer *process* (one per worker,
started on the first large checkpoint) which maps the same arena, so nothing is copied or
pickled but a small skeleton (the nesting, the non-tensor values and where each tensor
lives). The writer torch.saves to a temp file while a second thread hashes what is already
written and starts its writeback to disk (`_TailHasher`), fsyncs, renames into place,
fsyncs the folder and reports (sha256, bytes) or the error. A thread would do the same work under the training
process's GIL: torch.save holds it, and training slowed to about half its speed during a
write. The writer process ignores SIGINT/SIGTERM (the worker decides when to stop and
waits for its last checkpoint), dies with the worker (parent-death signal, and EOF on its
socket), and is a fresh interpreter (`subprocess`, not `os.fork`: forking a process
whose OpenMP pool or gRPC threads are running can hang the child).

A training loop's own checkpoints go through `AsyncWriter.submit_live`: a small state (up
to `INLINE_MAX_BYTES`, e.g. an MLP checkpointed every epoch) is serialized right there
into memory and a thread writes, hashes and fsyncs the bytes with the GIL released, so
no background torch.save competes with training for the GIL. Larger snapshots below
`PROCESS_MIN_BYTES`, a platform without memfd, and any snapshot submitted while the
writer process is still starting (importing torch takes seconds) or after it died are
written by a thread in this process instead: the same file, the same hash, the same
callback, only sharing the GIL. Loading always uses `weights_only=True`:
a checkpoint (or an imported session) can never run code.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import hashlib
import io
import itertools
import mmap
import os
import pickle
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

FORMAT = "onthefly-checkpoint"
VERSION = 1

_ALIGN = 64  # every tensor in an arena starts on a cache line (and torch's mmap alignment)
_MAX_FREE_ARENAS = 2  # two arenas let a snapshot be taken while the previous one is written
_MAX_SPAWNS = 3  # writer processes started per worker before we stop trying (in-thread only)


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r} is not a number of bytes") from None
    if value < 0:
        raise RuntimeError(f"{name}={raw!r} must be >= 0")
    return value


PROCESS_MIN_BYTES = _env_bytes("ONTHEFLY_CKPT_PROCESS_MIN_BYTES", 16 << 20)
"""Snapshots at least this large are written by the writer process; smaller ones by a
thread (a process hop costs more than the GIL does for a few megabytes)."""

INLINE_MAX_BYTES = _env_bytes("ONTHEFLY_CKPT_INLINE_MAX_BYTES", 4 << 20)
"""`AsyncWriter.submit_live`: states up to this size are serialized on the submitting thread
(torch.save into memory, about a millisecond per MB) and only the bytes go to a background
thread, which writes, hashes and fsyncs them with the GIL released. A thread running
torch.save instead holds the GIL in bursts that the training thread waits on, and a busy
machine stretches each wait to a scheduler slice: on 2 loaded cores epoch-end checkpoints
of a small MLP cost it ~19% of its step time that way, ~0% this way."""

WRITER_NICE = _env_bytes("ONTHEFLY_CKPT_WRITER_NICE", 10)
"""Niceness of the writer process: when it and training want the same core, training wins."""

_HAVE_MEMFD = sys.platform.startswith("linux") and hasattr(os, "memfd_create")


# -- shared-memory arenas --------------------------------------------------------------------


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Arena:
    """One anonymous shared-memory block that snapshot tensors are views of.

    The block is reserved up front (posix_fallocate: a clear error now instead of a
    SIGBUS on a page that cannot be backed later) and stays mapped for reuse. It is free
    when every tensor handed out from it has been garbage collected: a snapshot that is
    being written is held by its writer job until the write is done.
    """

    _ids = itertools.count(1)

    def __init__(self, capacity: int) -> None:
        self.id = next(self._ids)
        self.capacity = capacity
        self.fd = os.memfd_create(f"onthefly-ckpt-{self.id}", os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, capacity)
            self.mm = mmap.mmap(self.fd, capacity, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        probe = torch.frombuffer(self.mm, dtype=torch.uint8, count=1)
        self.addr = probe.data_ptr()
        del probe
        self.leases: list[weakref.ref[torch.Tensor]] = []
        self.reserved = False  # leased, its tensors not handed out yet (see _ArenaPool.lease)

    def view(self, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A tensor of `shape` at `offset`, with a storage of its own (exactly its bytes)."""
        n = shape.numel() * dtype.itemsize
        flat = torch.frombuffer(self.mm, dtype=torch.uint8, count=n, offset=offset)
        return flat.view(dtype).view(shape)

    def free(self) -> bool:
        return not self.reserved and all(r() is None for r in self.leases)

    def contains(self, ptr: int) -> bool:
        return self.addr <= ptr < self.addr + self.capacity

    def close(self) -> bool:
        try:
            self.mm.close()
        except BufferError:  # a tensor still views it (a derived view outlived its snapshot)
            return False
        os.close(self.fd)
        return True


class _ArenaPool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arenas: list[_Arena] = []
        self.closed_ids: list[int] = []  # the writer process unmaps these with its next job

    def lease(self, need: int) -> _Arena | None:
        """A free arena of at least `need` bytes (the smallest that fits), else a new one."""
        with self.lock:
            free = [a for a in self.arenas if a.free()]
            fits = [a for a in free if a.capacity >= need]
            if fits:
                arena = min(fits, key=lambda a: a.capacity)
                free.remove(arena)
            else:
                arena = None
            # Free arenas that cannot serve this size, and any beyond the cache limit, go.
            keep = 0 if arena is None else 1
            for a in sorted(free, key=lambda a: a.capacity, reverse=True):
                if a.capacity >= need and keep < _MAX_FREE_ARENAS:
                    keep += 1
                    continue
                if a.close():
                    self.arenas.remove(a)
                    self.closed_ids.append(a.id)
            if arena is None:
                try:
                    arena = _Arena(need)
                except OSError:
                    return None  # no shared memory to be had: the caller clones instead
                self.arenas.append(arena)
            arena.leases = []
            arena.reserved = True  # until hand_out(): no other thread may lease it meanwhile
            return arena

    def hand_out(self, arena: _Arena, views: list[torch.Tensor]) -> None:
        """The arena now lives as long as these tensors do."""
        with self.lock:
            arena.leases = [weakref.ref(v) for v in views]
            arena.reserved = False

    def find(self, ptr: int) -> _Arena | None:
        with self.lock:
            for a in self.arenas:
                if a.contains(ptr):
                    return a
        return None

    def take_closed(self) -> list[int]:
        with self.lock:
            out, self.closed_ids = self.closed_ids, []
            return out


_POOL = _ArenaPool()


def _arena_eligible(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and t.device.type != "meta"
        and t.numel() > 0
    )


def _collect(obj: Any, out: dict[int, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        if _arena_eligible(obj):
            out.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def _rebuild(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        got = copies.get(id(obj))
        return got if got is not None else obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _rebuild(v, copies) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, copies) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, copies) for v in obj)
    return obj


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        cpu = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device.type == "cpu"]
        other = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device.type != "cpu"]
        if cpu:
            try:
                torch._foreach_copy_([d for d, _ in cpu], [s.detach() for _, s in cpu])
            except (RuntimeError, TypeError, AttributeError):
                for d, s in cpu:
                    d.copy_(s.detach())
        for d, s in other:
            d.copy_(s.detach())


def snapshot(obj: Any) -> Any:
    """Deep copy of a checkpoint state with every tensor on CPU, so training can go on at once.

    Dicts, lists and tuples are rebuilt; other values are shared. Dense tensors are copied
    into a reused shared-memory arena (one `copy_` each, to warm pages); the same tensor
    object twice stays one copy. The copies stay valid as long as they are referenced: the
    arena is reused only once every tensor of this snapshot is garbage, so hold on to the
    returned structure (not to views derived from its tensors) for as long as you need it.
    Without memfd, or for sparse/quantized/empty tensors, tensors are cloned as before.
    """
    found: dict[int, torch.Tensor] = {}
    _collect(obj, found)
    copies: dict[int, torch.Tensor] = {}
    if found and _HAVE_MEMFD:
        need = sum(_aligned(t.numel() * t.element_size()) for t in found.values())
        arena = _POOL.lease(need)
        if arena is not None:
            try:
                off = 0
                for key, t in found.items():
                    copies[key] = arena.view(off, t.dtype, t.shape)
                    off += _aligned(t.numel() * t.element_size())
                _copy_all(list(copies.values()), list(found.values()))
            finally:
                _POOL.hand_out(arena, list(copies.values()))
    return _rebuild(obj, copies)


# -- RNG -------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """All RNG states (python, numpy, torch CPU, every CUDA device) as weights_only-safe values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    py_version, py_key, py_gauss = random.getstate()
    out: dict[str, Any] = {
        # The 625-word Mersenne Twister state as one tensor, not a tuple of 625 ints: the
        # snapshot and torch.save walk every container element, and the tuple was most of
        # the cost of checkpointing a small model.
        "python": (py_version, torch.tensor(py_key, dtype=torch.int64), py_gauss),
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
    key = py[1].tolist() if isinstance(py[1], torch.Tensor) else py[1]  # older: a tuple
    random.setstate((py[0], tuple(key), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ---------------------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk now,
    without waiting. None where libc does not have it (the final fsync then does it all)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start

    return start_writeback


_START_WRITEBACK = _sync_file_range()
_HASH_CHUNK = 4 << 20


class _TailHasher:
    """Hashes a file while torch.save is still writing it: a thread reads back (from the
    page cache) what is already written, hashes it and starts its writeback to disk
    (sync_file_range), so hashing and most of the disk time overlap the save instead of
    following it, and the final fsync has little left to wait for.

    torch.save's zip writer only ever appends, so bytes behind the end of the file never
    change once written; the tests compare this digest with a read-back of the finished
    file. Both threads release the GIL (torch's C++ writer, os.readv, hashlib).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.error: BaseException | None = None
        self._writer_done = threading.Event()
        self._fd = -1
        self._thread = threading.Thread(
            target=self._follow, name="onthefly-ckpt-sha256", daemon=True
        )
        self._thread.start()

    def _open(self) -> bool:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return False
        return True

    def _follow(self) -> None:
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        try:
            while True:
                finished = self._writer_done.is_set()  # read before the file: no lost tail
                k = os.readv(self._fd, [buf]) if self._open() else 0
                if k:
                    self.sha.update(view[:k])
                    if _START_WRITEBACK is not None:
                        _START_WRITEBACK(self._fd, self.nbytes, k)
                    self.nbytes += k
                elif finished:
                    return
                else:
                    self._writer_done.wait(0.002)
        except BaseException as e:  # noqa: BLE001 - re-raised by digest(), on the caller's thread
            self.error = e

    def digest(self) -> tuple[str, int]:
        """After the writer is done: wait for the hash of the whole file."""
        self._writer_done.set()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.error is not None:
            raise self.error
        return self.sha.hexdigest(), self.nbytes


_TAIL_HASH_MIN_BYTES = 8 << 20
"""Smaller checkpoints are hashed after the save: a follower thread would cost more than
the few milliseconds it could hide (and compete for the GIL when a thread writes them)."""


def _save_hashed(state: Any, tmp: str) -> tuple[str, int]:
    """torch.save to `tmp` (its fast C++ file writer) while a `_TailHasher` hashes what is
    written (small states: hashed after), then fsync; (sha256, bytes)."""
    if _nbytes(state) < _TAIL_HASH_MIN_BYTES:
        torch.save(state, tmp)
        _fsync_path(tmp)
        return sha256_file(tmp), os.path.getsize(tmp)
    hasher = _TailHasher(tmp)
    try:
        torch.save(state, tmp)
    finally:
        digest, nbytes = hasher.digest()
    _fsync_path(tmp)
    if nbytes != os.path.getsize(tmp):
        raise OSError(f"checkpoint {tmp} changed size while it was hashed")
    return digest, nbytes


def _write_via(state: Any, path: str, tmp: str) -> tuple[str, int]:
    return _replace_atomic(path, tmp, lambda t: _save_hashed(state, t))


def _replace_atomic(
    path: str, tmp: str, write: Callable[[str], tuple[str, int]]
) -> tuple[str, int]:
    """`write(tmp)` (it fsyncs the file and returns (sha256, bytes)), then rename it to
    `path` and fsync the folder; the temp file never stays behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        digest, nbytes = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(os.path.dirname(path) or ".")
    return digest, nbytes


def serialize(state: Any) -> memoryview:
    """`torch.save` of `state` into memory: the bytes a checkpoint file holds."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer()


def _write_bytes(data: memoryview | bytes, tmp: str) -> tuple[str, int]:
    view = memoryview(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(view).hexdigest(), len(view)


def write_bytes_atomic(data: memoryview | bytes, path: str) -> tuple[str, int]:
    """Serialized checkpoint bytes to `path` via temp file + fsync + rename; (sha256, bytes).
    Every step but a few bytecodes runs with the GIL released (write, sha256, fsync)."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    return _replace_atomic(path, tmp, lambda t: _write_bytes(data, t))


def write_atomic(state: dict[str, Any], path: str) -> tuple[str, int]:
    """torch.save to `path` via temp file + fsync + rename, in this thread; (sha256, bytes)."""
    return _write_via(state, path, f"{path}.tmp-{os.getpid()}-{threading.get_ident()}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while k := f.readinto(buf):
            h.update(view[:k])
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


# -- the writer process: wire format ---------------------------------------------------------


class _Ref(NamedTuple):
    """Where a snapshot tensor lives: the writer process rebuilds it from its arena mapping."""

    arena: int
    offset: int  # of the tensor's storage in the arena
    nbytes: int  # of the storage
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


class _NotInArena(Exception):
    pass


def _encode(obj: Any, used: dict[int, _Arena]) -> Any:
    """The state with each arena tensor replaced by a _Ref; small odd tensors stay inline."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise _NotInArena
        if not _arena_eligible(obj):
            return obj  # sparse, quantized, empty: pickled inline (they are small or rare)
        st = obj.untyped_storage()
        arena = _POOL.find(st.data_ptr())
        if arena is None or st.data_ptr() + st.nbytes() > arena.addr + arena.capacity:
            raise _NotInArena
        used[arena.id] = arena
        return _Ref(
            arena.id,
            st.data_ptr() - arena.addr,
            st.nbytes(),
            obj.dtype,
            tuple(obj.shape),
            tuple(obj.stride()),
            int(obj.storage_offset()),
        )
    if isinstance(obj, dict):
        return {k: _encode(v, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v, used) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_encode(v, used) for v in obj)
    return obj


def _decode(obj: Any, maps: dict[int, mmap.mmap], storages: dict[tuple[int, int, int], Any]) -> Any:
    if isinstance(obj, _Ref):
        key = (obj.arena, obj.offset, obj.nbytes)
        flat = storages.get(key)
        if flat is None:
            flat = torch.frombuffer(
                maps[obj.arena], dtype=torch.uint8, count=obj.nbytes, offset=obj.offset
            )
            storages[key] = flat
        return flat.view(obj.dtype).as_strided(obj.shape, obj.stride, obj.storage_offset)
    if isinstance(obj, dict):
        return {k: _decode(v, maps, storages) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, maps, storages) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_decode(v, maps, storages) for v in obj)
    return obj


_HEADER = struct.Struct("!QI")  # payload bytes, number of file descriptors that follow


def _send(sock: socket.socket, msg: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data), len(fds or [])) + data)
    if fds:
        # One byte carries the descriptors (SCM_RIGHTS); the receiver reads exactly it.
        socket.send_fds(sock, [b"F"], fds)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the checkpoint writer's socket closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    size, nfds = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    # Only ever a socketpair between a worker and its own writer child (same user, same
    # trust): never a network peer, never a file from a session or an archive.
    msg = pickle.loads(_recv_exact(sock, size))
    fds: list[int] = []
    if nfds:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1, nfds)
        if data != b"F" or len(fds) != nfds:
            raise EOFError("the checkpoint writer's socket lost the arena descriptors")
    return msg, fds


def _error_to_wire(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "message": str(e),
        "errno": getattr(e, "errno", None) if isinstance(e, OSError) else None,
        "strerror": getattr(e, "strerror", None),
        "filename": getattr(e, "filename", None),
        "filename2": getattr(e, "filename2", None),
    }


def _error_from_wire(w: dict[str, Any]) -> BaseException:
    """The writer process's exception, rebuilt as the same builtin type where possible."""
    if w.get("errno") is not None:
        # OSError(errno, ...) picks the subclass itself (IsADirectoryError, PermissionError...).
        return OSError(
            w["errno"], w.get("strerror") or "", w.get("filename"), None, w.get("filename2")
        )
    builtin = getattr(builtins, str(w.get("type")), None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return builtin(w.get("message", ""))
        except Exception:  # noqa: BLE001 - an exception type with an odd constructor
            pass
    return RuntimeError(f"{w.get('type')}: {w.get('message')}")


# -- the writer process: child side ----------------------------------------------------------


def _writer_main() -> None:
    """Entry point of the writer process (a fresh interpreter started by `_WriterProcess`)."""
    from onthefly_worker.launch import arm_parent_death_signal

    arm_parent_death_signal(int(os.environ.get("ONTHEFLY_WRITER_PARENT", "0") or 0))
    # Ctrl+C and the supervisor's SIGTERM go to the worker, which finishes its last
    # checkpoint through us before it exits: we stop when its socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(WRITER_NICE)  # background work: training keeps the CPU when they compete
    sock = socket.socket(fileno=int(os.environ["ONTHEFLY_WRITER_FD"]))
    torch.set_num_threads(1)
    maps: dict[int, mmap.mmap] = {}
    _send(sock, {"op": "ready", "pid": os.getpid()})
    while True:
        try:
            msg, fds = _recv(sock)
        except (EOFError, ConnectionError, OSError):
            return
        for aid, fd in zip(msg.get("arena_ids", []), fds, strict=True):
            maps[aid] = mmap.mmap(
                fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            os.close(fd)
        for aid in msg.get("drop", []):
            m = maps.pop(aid, None)
            if m is not None:
                with contextlib.suppress(BufferError):
                    m.close()
        if msg.get("op") != "write":
            continue
        reply: dict[str, Any] = {"job": msg["job"]}
        try:
            state = _decode(msg["state"], maps, {})
            digest, nbytes = _write_via(state, msg["path"], msg["tmp"])
            reply.update(ok=True, sha256=digest, nbytes=nbytes)
        except BaseException as e:  # noqa: BLE001 - every failure goes back as data
            reply.update(ok=False, error=_error_to_wire(e))
        state = None
        try:
            _send(sock, reply)
        except OSError:  # the worker is gone; so are we
            return


# -- the writer process: parent side ---------------------------------------------------------


class _Job:
    def __init__(
        self,
        owner: AsyncWriter,
        state: Any,
        path: str,
        meta: dict[str, Any],
        done: Callable[[SavedCheckpoint | None, BaseException | None], None],
    ) -> None:
        self.owner = owner
        self.state: Any = state
        self.path = path
        self.meta = meta
        self.done = done
        self.event = threading.Event()
        self.tmp = ""
        self.data: memoryview | None = None  # serialized already (`submit_live`, small states)

    def finish(self, saved: SavedCheckpoint | None, err: BaseException | None) -> None:
        if self.event.is_set():
            return
        try:
            if err is not None:
                self.owner.error = err
                self.done(None, err)
            else:
                try:
                    self.done(saved, None)
                except BaseException as e:  # noqa: BLE001 - as the thread writer always did
                    self.owner.error = e
                    self.done(None, e)
        except BaseException as e:  # noqa: BLE001 - a failing callback must not kill the writer
            print(f"[onthefly] checkpoint callback failed: {type(e).__name__}: {e}", flush=True)
        finally:
            self.state = None  # frees the arena for the next snapshot
            self.event.set()

    def write_here(self) -> None:
        """Write in this process (the thread it is called on)."""
        try:
            if self.data is not None:
                sha, n = write_bytes_atomic(self.data, self.path)
                self.data = None
            else:
                sha, n = write_atomic(self.state, self.path)
        except BaseException as e:  # noqa: BLE001 - reported through the callback
            self.finish(None, e)
            return
        self.finish(SavedCheckpoint(self.path, sha, n, self.meta), None)

    def write_in_thread(self) -> None:
        threading.Thread(target=self.write_here, name="onthefly-ckpt", daemon=True).start()


class _WriterProcess:
    """The long-lived writer process of this worker and the thread that talks to it.

    The thread starts the process (so the parent-death signal is tied to a thread that
    lives exactly as long as the process is needed), then reads replies and calls the
    callbacks. If the process dies, its pending jobs are written in this process instead.
    """

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.dead = threading.Event()
        self.send_lock = threading.Lock()  # one message on the socket at a time
        self.jobs_lock = threading.Lock()
        self.jobs: dict[int, _Job] = {}
        self.mapped: set[int] = set()
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.cause = ""
        self._ids = itertools.count(1)
        self.thread = threading.Thread(target=self._serve, name="onthefly-ckpt-writer", daemon=True)
        self.thread.start()

    def _spawn(self) -> socket.socket:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["ONTHEFLY_WRITER_FD"] = str(child_end.fileno())
        env["ONTHEFLY_WRITER_PARENT"] = str(os.getpid())
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = "1"
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from onthefly_worker.checkpoint import _writer_main; _writer_main()",
                ],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            child_end.close()
        return parent_end

    def _serve(self) -> None:
        try:
            self.sock = self._spawn()
            while True:
                msg, _ = _recv(self.sock)
                if msg.get("op") == "ready":
                    self.pid = int(msg.get("pid", 0))
                    self.ready.set()
                    continue
                with self.jobs_lock:
                    job = self.jobs.pop(int(msg["job"]), None)
                if job is None:
                    continue
                if msg.get("ok"):
                    job.finish(
                        SavedCheckpoint(job.path, str(msg["sha256"]), int(msg["nbytes"]), job.meta),
                        None,
                    )
                else:
                    job.finish(None, _error_from_wire(dict(msg.get("error") or {})))
        except BaseException as e:  # noqa: BLE001 - EOF, a broken pipe, or the spawn failing
            self.cause = f"{type(e).__name__}: {e}"
        finally:
            self._died()

    def _died(self) -> None:
        self.dead.set()
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        if code is not None:
            self.cause = f"exit code {code}" if code >= 0 else f"signal {-code}"
        with self.jobs_lock:
            pending = list(self.jobs.values())
            self.jobs.clear()
        for job in pending:  # the process died mid-write: write these here instead
            if job.tmp:
                with contextlib.suppress(OSError):
                    os.unlink(job.tmp)
            print(
                f"[onthefly] the checkpoint writer process stopped ({self.cause}); writing "
                f"{os.path.basename(job.path)} in the worker instead",
                flush=True,
            )
            job.write_in_thread()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()

    def submit(self, job: _Job) -> bool:
        """Send the job to the process; False when it cannot take it (then write it here)."""
        if not self.ready.is_set() or self.dead.is_set() or self.sock is None:
            return False
        used: dict[int, _Arena] = {}
        try:
            state = _encode(job.state, used)
        except _NotInArena:
            return False
        with self.send_lock:
            jid = next(self._ids)
            new = [a for a in used.values() if a.id not in self.mapped]
            job.tmp = f"{job.path}.tmp-{os.getpid()}-w{jid}"
            msg = {
                "op": "write",
                "job": jid,
                "path": job.path,
                "tmp": job.tmp,
                "state": state,
                "arena_ids": [a.id for a in new],
                "drop": [i for i in _POOL.take_closed() if i in self.mapped],
            }
            with self.jobs_lock:
                if self.dead.is_set():
                    return False
                self.jobs[jid] = job
            try:
                _send(self.sock, msg, [a.fd for a in new])
            except (OSError, pickle.PicklingError, TypeError, AttributeError):
                with self.jobs_lock:
                    if self.jobs.pop(jid, None) is None:
                        return True  # the process died meanwhile and took the job over
                return False
            self.mapped.update(a.id for a in new)
            self.mapped.difference_update(msg["drop"])
        return True

    def close(self, timeout: float = 2.0) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_WRITER: _WriterProcess | None = None
_WRITER_LOCK = threading.Lock()
_SPAWNS = 0
_BYTES_JOBS: queue.SimpleQueue[_Job] | None = None


def _bytes_writer() -> queue.SimpleQueue[_Job]:
    """The queue of this process's one long-lived thread that writes serialized states."""
    global _BYTES_JOBS
    with _WRITER_LOCK:
        if _BYTES_JOBS is None:
            jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

            def run() -> None:
                while True:
                    jobs.get().write_here()

            threading.Thread(target=run, name="onthefly-ckpt-bytes", daemon=True).start()
            _BYTES_JOBS = jobs
        return _BYTES_JOBS


def _writer_process(start: bool) -> _WriterProcess | None:
    """This worker's writer process; started (lazily, at most _MAX_SPAWNS times) if asked."""
    global _WRITER, _SPAWNS
    with _WRITER_LOCK:
        w = _WRITER
        if (w is None or w.dead.is_set()) and start and _SPAWNS < _MAX_SPAWNS and _HAVE_MEMFD:
            _SPAWNS += 1
            w = _WRITER = _WriterProcess()
        return w


def writer_process_pid() -> int:
    """Pid of this worker's checkpoint writer process once it is up; 0 when there is none."""
    w = _WRITER
    return w.pid if w is not None and w.ready.is_set() and not w.dead.is_set() else 0


def _shutdown_writer() -> None:
    w = _WRITER
    if w is not None:
        w.close()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) must not hold the writer's socket or reuse arenas.
    global _WRITER, _POOL, _SPAWNS, _WRITER_LOCK, _BYTES_JOBS
    _WRITER_LOCK = threading.Lock()  # another thread may have held it at the fork
    _BYTES_JOBS = None  # its thread did not survive the fork
    w = _WRITER
    if w is not None and w.sock is not None:
        with contextlib.suppress(OSError):
            os.close(w.sock.detach())
    _WRITER, _POOL, _SPAWNS = None, _ArenaPool(), _MAX_SPAWNS


atexit.register(_shutdown_writer)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _nbytes(obj: Any) -> int:
    found: dict[int, torch.Tensor] = {}
    _collect(obj, found)
    return sum(t.numel() * t.element_size() for t in found.values())


class EpochGate:
    """Whether an epoch end writes a checkpoint: when at least `min_interval_s` seconds have
    passed since the last checkpoint (of any reason), or always with 0. Epochs of a fraction
    of a second would otherwise spend several percent of training on checkpoints nobody
    needs (each one is serialized, written, fsynced and registered); pause, stop, the end
    of training and `checkpoint_every_n_steps` always checkpoint. `note` is called once,
    with a sentence, the first time an epoch end is skipped."""

    def __init__(self, min_interval_s: float, note: Callable[[str, str], None], owner: str) -> None:
        self.min_interval_s = float(min_interval_s)
        self._note = note
        self._owner = owner
        self._last = time.monotonic()
        self._said = False

    def checkpointed(self) -> None:
        self._last = time.monotonic()

    def due(self, epoch: int) -> bool:
        if self.min_interval_s <= 0:
            return True
        if time.monotonic() - self._last >= self.min_interval_s:
            return True
        if not self._said:
            self._said = True
            self._note(
                f"epoch {epoch + 1} ended {time.monotonic() - self._last:.2f} s after the last "
                f"checkpoint: epoch ends checkpoint at most every {self.min_interval_s:g} s "
                f"({self._owner}(checkpoint_min_interval_s=0) checkpoints every epoch; pause, "
                "stop and the end of training always do)",
                "note",
            )
        return False


class AsyncWriter:
    """Writes checkpoints in the background, one at a time per writer (bounded memory).

    `submit(state, path, meta, done)` returns at once; `done(saved, None)` or
    `done(None, error)` is called from a background thread when the file is in place (or
    could not be written: the previous checkpoint is untouched). A state that is not a
    `snapshot()` is snapshotted first. `wait()` returns once the last callback has run.
    """

    def __init__(self, process_min_bytes: int | None = None) -> None:
        self._job: _Job | None = None
        self.error: BaseException | None = None
        self.process_min_bytes = (
            PROCESS_MIN_BYTES if process_min_bytes is None else process_min_bytes
        )
        self.last_mode = ""  # "process" or "thread": where the last checkpoint was written

    def submit(
        self,
        state: dict[str, Any],
        path: str,
        meta: dict[str, Any],
        done: Callable[[SavedCheckpoint | None, BaseException | None], None],
    ) -> None:
        self.wait()
        big = _nbytes(state) >= self.process_min_bytes
        proc = _writer_process(start=big)
        job = _Job(self, state, path, meta, done)
        if big and proc is not None and proc.ready.is_set() and not proc.dead.is_set():
            if not proc.submit(job):
                # Tensors that are not in an arena (a state that was not snapshotted).
                job.state = snapshot(state)
                if proc.submit(job):
                    self._job, self.last_mode = job, "process"
                    return
            else:
                self._job, self.last_mode = job, "process"
                return
        self._job, self.last_mode = job, "thread"
        job.write_in_thread()

    def submit_live(
        self,
        state: dict[str, Any],
        path: str,
        meta: dict[str, Any],
        done: Callable[[SavedCheckpoint | None, BaseException | None], None],
    ) -> None:
        """`submit` for a state whose tensors are still training: what it needs is copied
        before this returns. A small state (`INLINE_MAX_BYTES`) is serialized here and its
        bytes written by a GIL-free thread; a larger one is snapshotted for the writer
        process."""
        if _nbytes(state) > INLINE_MAX_BYTES:
            self.submit(snapshot(state), path, meta, done)
            return
        data = serialize(state)  # before waiting: it overlaps the previous write
        self.wait()
        job = _Job(self, None, path, meta, done)
        job.data = data
        self._job, self.last_mode = job, "inline"
        _bytes_writer().put(job)

    def wait(self) -> None:
        job = self._job
        if job is not None:
            job.event.wait()
            self._job = None
