"""Sample feeds: the files a worker appends its per-sample loss flushes to (see the proto's
`Welcome.sample_feed`).

A flush sent on the gRPC stream wakes, per message, the worker's stream-sender and event
threads and the supervisor's reader thread; on a small VM each of those wake-ups takes
time from the training thread (bench/overhead_ab.py: ~2.5% of a 2 ms step at ~25 flushes
a second). A write to a file wakes nobody. The supervisor reads the feed on its own clock
(every ~100 ms) and before each message of the worker's stream, so everything the worker
wrote before a stream message is handled before it.

Format: records of a little-endian uint32 length and that many bytes of a serialized
`WorkerMessage`; a zero length ends the file, and the feed continues in the next one
(`<base>.000001`, ...). The worker starts a new file every few MB, so a long run's feed
never holds more than one file's worth on disk, and that only until it is read.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil

# A record longer than this is not one the worker wrote (the stream's own limit is 64 MB).
MAX_RECORD = 64 * 1024 * 1024
_READ_CHUNK = 1 << 20


class FeedError(ValueError):
    pass


class FeedReader:
    """Reads one worker's feed: `records()` returns the complete records written since the
    last call, following the worker from file to file and deleting each file once read."""

    def __init__(self, session_dir: str, worker_id: str) -> None:
        self.rel = os.path.join("feeds", worker_id)
        self._base = os.path.join(session_dir, self.rel)
        self._seg = 0
        self._buf = bytearray()
        self._pos = 0  # start of the unread data in _buf
        os.makedirs(os.path.dirname(self._base), mode=0o700, exist_ok=True)
        self.remove()  # files a worker of this id left in an earlier supervisor's life
        fd = os.open(self._path(0), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        self._f: io.FileIO | None = open(self._path(0), "rb", buffering=0)  # noqa: SIM115

    def _path(self, k: int) -> str:
        return f"{self._base}.{k:06d}"

    def records(self) -> list[bytes]:
        """The complete records written since the last call, in order. A record still being
        written stays for the next call."""
        out: list[bytes] = []
        while self._f is not None:
            chunk = self._f.read(_READ_CHUNK)
            if chunk:
                self._buf += chunk
            ended = self._parse(out)
            if ended:
                self._next_file()
                continue
            if not chunk or len(chunk) < _READ_CHUNK:
                break
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _parse(self, out: list[bytes]) -> bool:
        """Complete records from the buffer into `out`; True at the end-of-file marker."""
        buf, pos = self._buf, self._pos
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "little")
            if n == 0:
                self._pos = pos + 4
                return True
            if n > MAX_RECORD:
                raise FeedError(f"feed {self._path(self._seg)}: a record of {n} bytes is not one")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        self._pos = pos
        return False

    def _next_file(self) -> None:
        """The worker wrote the end marker: its next file exists (it creates it first)."""
        assert self._f is not None
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(self._seg))
        self._seg += 1
        self._buf = bytearray()  # (nothing follows the marker in its file)
        self._pos = 0
        try:
            self._f = open(self._path(self._seg), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError as e:
            self._f = None
            raise FeedError(f"feed {self._base}: the file after the end marker is missing") from e

    def close(self) -> int:
        """Stop reading and delete the feed's files; returns the bytes of an incomplete last
        record left unread (a worker killed while writing it)."""
        left = len(self._buf) - self._pos
        if self._f is not None:
            self._f.close()
            self._f = None
        self.remove()
        return left

    def remove(self) -> None:
        for p in glob.glob(glob.escape(self._base) + ".[0-9]*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def clear_stale_feeds(session_dir: str) -> None:
    """Delete the sample feeds an earlier supervisor of this session left when it was
    killed (its workers died with it). Not while that supervisor lives (its pid in the
    session's connection.json): they are its workers' feeds."""
    try:
        with open(os.path.join(session_dir, "connection.json"), encoding="utf-8") as f:
            pid = int(json.load(f).get("pid", 0))
        if pid > 0 and pid != os.getpid():
            os.kill(pid, 0)
            return
    except (OSError, ValueError):
        pass  # no connection file, or its supervisor is gone
    shutil.rmtree(os.path.join(session_dir, "feeds"), ignore_errors=True)
