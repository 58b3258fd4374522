"""Session events: persisted with dense sequence numbers, replayable, fanned out live.

A watcher asks for everything after its last seen sequence number: the store replays the
gap, then it follows the live tail. Nothing is lost across a reconnect.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from onthefly_supervisor.store import Store


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    run_id: str
    payload: dict[str, Any]


class EventBus:
    def __init__(self, store: Store, keep: int = 20000) -> None:
        self.store = store
        self._tail: collections.deque[Event] = collections.deque(maxlen=keep)
        self._cond = threading.Condition()
        self._closed = False
        self.last_seq = store.last_seq()
        self.watchers = 0
        self.dashboards = 0
        self.remote_watchers = 0  # WatchEvents streams open now (dashboards, the CLI)
        self.last_remote_end = 0.0  # time.monotonic() when one last ended

    def publish(self, kind: str, run_id: str = "", **payload: Any) -> Event:
        t = time.time()
        with self._cond:
            seq = self.store.add_event(kind, run_id, payload, t)
            ev = Event(seq, t, kind, run_id, payload)
            self._tail.append(ev)
            self.last_seq = seq
            self._cond.notify_all()
        return ev

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _from_tail(self, after: int) -> list[Event] | None:
        """Events after `after` from memory, or None when the tail no longer reaches back."""
        if not self._tail:
            return [] if after >= self.last_seq else None
        first = self._tail[0].seq
        if after + 1 < first:
            return None
        # Sequence numbers are dense, so the position is arithmetic: no scan of the tail.
        out = list(itertools.islice(self._tail, max(0, after + 1 - first), None))
        return [e for e in out if e.seq > after] if out and out[0].seq <= after else out

    def replay(self, after: int) -> Iterator[Event]:
        import json

        while True:
            rows = self.store.events_after(after, 2000)
            if not rows:
                return
            for r in rows:
                after = r["seq"]
                yield Event(r["seq"], r["t"], r["kind"], r["run_id"], json.loads(r["payload"]))

    def follow(self, after: int, alive: Any = None, poll_s: float = 0.5) -> Iterator[Event]:
        """Every event with seq > after, then live ones until `alive()` is false or the bus closes."""
        with self._cond:
            self.watchers += 1
        try:
            while True:
                with self._cond:
                    batch = self._from_tail(after)
                    if batch is not None and not batch:
                        if self._closed:
                            return
                        self._cond.wait(poll_s)
                        batch = self._from_tail(after)
                if batch is None:
                    for ev in self.replay(after):
                        after = ev.seq
                        yield ev
                    continue
                for ev in batch:
                    after = ev.seq
                    yield ev
                if alive is not None and not alive():
                    return
                if self._closed and after >= self.last_seq:
                    return
        finally:
            with self._cond:
                self.watchers -= 1
