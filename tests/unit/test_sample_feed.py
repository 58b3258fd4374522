"""The sample feed: the worker's writer, the supervisor's reader, and the order of feed
records against the worker's stream (a record is handled after the stream messages queued
before it was written, and before those queued after)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.feeds import FeedError, FeedReader
from onthefly_supervisor.lifecycle import WorkerState
from onthefly_worker.connection import SampleFeed
from tests.unit.test_supervisor_units import _sup


def _files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "feeds"))


def test_records_come_back_in_order_across_files_and_read_files_are_deleted(
    tmp_path: Path,
) -> None:
    reader = FeedReader(str(tmp_path), "w-0")
    assert reader.rel == os.path.join("feeds", "w-0") and _files(tmp_path) == ["w-0.000000"]
    feed = SampleFeed(str(tmp_path / reader.rel), segment_bytes=100)
    sent = [bytes([i]) * (10 + 7 * i) for i in range(12)]
    for data in sent[:5]:
        feed.write(data)
    assert len(_files(tmp_path)) > 1, "100-byte files: the feed went on in new ones"
    got = reader.records()
    assert got == sent[:5]
    assert len(_files(tmp_path)) == 1, "files read to their end marker are deleted"
    for data in sent[5:]:
        feed.write(data)
    assert reader.records() == sent[5:]
    assert reader.records() == []
    feed.close()
    assert reader.close() == 0
    assert _files(tmp_path) == []


def test_a_record_still_being_written_waits_and_a_torn_one_is_reported(tmp_path: Path) -> None:
    reader = FeedReader(str(tmp_path), "w-0")
    path = tmp_path / "feeds" / "w-0.000000"
    record = (5).to_bytes(4, "little") + b"hello"
    with open(path, "ab") as f:
        f.write(record[:6])
        f.flush()
        assert reader.records() == [], "half a record is not a record"
        f.write(record[6:] + (9).to_bytes(4, "little") + b"abc")
        f.flush()
    assert reader.records() == [b"hello"]
    assert reader.close() == 7, "the incomplete last record's bytes (a killed worker)"


def test_a_length_no_worker_writes_is_an_error(tmp_path: Path) -> None:
    reader = FeedReader(str(tmp_path), "w-0")
    (tmp_path / "feeds" / "w-0.000000").write_bytes((2**31).to_bytes(4, "little"))
    with pytest.raises(FeedError, match="is not one"):
        reader.records()


def test_a_new_reader_clears_what_an_earlier_worker_of_that_id_left(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "feeds")
    for k in range(3):
        (tmp_path / "feeds" / f"w-0.{k:06d}").write_bytes(b"stale")
    (tmp_path / "feeds" / "w-00.000000").write_bytes(b"another worker's")
    reader = FeedReader(str(tmp_path), "w-0")
    assert _files(tmp_path) == ["w-0.000000", "w-00.000000"]
    assert (tmp_path / "feeds" / "w-0.000000").read_bytes() == b""
    assert reader.records() == []


def _samples(ids: list[int], value: float, reset: bool = False) -> pb.SampleLosses:
    return pb.SampleLosses(
        run_id="main",
        epoch=0,
        count=len(ids),
        ids=np.asarray(ids, "<i8").tobytes(),
        losses=np.full(len(ids), value, "<f4").tobytes(),
        reset=reset,
    )


def test_feed_records_keep_their_place_among_the_streams_messages(tmp_path: Path) -> None:
    """A resumed worker sends a reset of the epoch's rest on its stream, then trains: the
    feed's losses, written after the reset was queued, must not be wiped by it, even when
    the feed is read before the stream's message arrives."""
    sup = _sup(tmp_path)
    try:
        (wid,) = [w for w in sup.workers if sup.workers[w].state is WorkerState.STARTING]
        hello = pb.Hello(run_id="main", dataset_size=8, steps_per_epoch=1, max_epochs=1)
        link, welcome = sup.attach(hello, wid)
        rel = welcome.welcome.sample_feed
        assert rel == os.path.join("feeds", wid)
        feed = SampleFeed(os.path.join(sup.dir, rel))

        def record(after: int, body: pb.SampleLosses) -> None:
            msg = pb.WorkerMessage(worker_id=wid, after_stream=after, samples=body)
            feed.write(msg.SerializeToString())

        # Queued on the stream: hello (1), the reset (2). Then the feed: losses of 0-3.
        record(2, _samples([0, 1, 2, 3], 0.5))
        with link.lock:
            sup._drain_feed(link)  # the feed's poll comes first...
        assert len(link.backlog) == 1, "...and holds the record back for the stream"
        sup.on_stream_message(
            link, pb.WorkerMessage(worker_id=wid, samples=_samples(list(range(8)), np.nan, True))
        )
        with link.lock:
            sup._drain_feed(link)
        arr = sup.arrays.get("main", 0)
        assert arr is not None
        np.testing.assert_array_equal(arr[:4], 0.5)
        assert np.isnan(arr[4:]).all()
        # A stream message sent after a record (an epoch's end) finds it handled first.
        record(2, _samples([4, 5], 1.5))
        sup.on_stream_message(link, pb.WorkerMessage(worker_id=wid, log=pb.LogLine(text="x")))
        arr = sup.arrays.get("main", 0)
        assert arr is not None
        np.testing.assert_array_equal(arr[4:6], 1.5)
        # The stream ends: what is left is handled, and the feed's files are deleted.
        record(9, _samples([6, 7], 2.5))
        sup.close_feed(link)
        arr = sup.arrays.get("main", 0)
        assert arr is not None
        np.testing.assert_array_equal(arr[6:], 2.5)
        assert _files(Path(sup.dir)) == []
        feed.close()
        sup.detach(wid)  # (no worker to answer the shutdown's stop)
    finally:
        sup.shutdown()


def test_feeds_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONTHEFLY_SAMPLE_FEED", "0")
    sup = _sup(tmp_path)
    try:
        (wid,) = list(sup.workers)
        link, welcome = sup.attach(pb.Hello(run_id="main", dataset_size=8), wid)
        assert welcome.welcome.sample_feed == "" and link.feed is None
        sup.detach(wid)
    finally:
        sup.shutdown()


def test_a_feed_that_fails_to_write_hands_over_to_the_stream_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """A write error (disk full) gives the feed up: that message and every later one go on
    the stream, after a warning that says so."""
    import queue
    import threading

    from onthefly_worker.connection import WorkerConnection

    reader = FeedReader(str(tmp_path), "w-0")
    conn = object.__new__(WorkerConnection)
    conn.worker_id = "w-0"
    conn.closed = threading.Event()
    conn._out = queue.Queue()
    conn._send_lock = threading.Lock()
    conn._queued = 1
    conn._feed = SampleFeed(str(tmp_path / reader.rel))
    conn.send_bulk(samples=_samples([0], 1.0))
    assert conn._out.empty() and len(reader.records()) == 1
    os.close(conn._feed._fd)  # the next write fails (EBADF) as a full disk's would (ENOSPC)
    conn.send_bulk(samples=_samples([1], 2.0))
    conn.send_bulk(samples=_samples([2], 3.0))
    sent = [conn._out.get_nowait() for _ in range(3)]
    assert sent[0].WhichOneof("body") == "log" and "go on the gRPC stream" in sent[0].log.text
    assert [np.frombuffer(m.samples.ids, "<i8").tolist() for m in sent[1:]] == [[1], [2]]
    assert conn._feed is None and conn._queued == 4
    assert reader.records() == []


def test_a_resumed_session_starts_without_the_feeds_its_killed_supervisor_left(
    tmp_path: Path,
) -> None:
    from onthefly_supervisor.supervisor import Supervisor, SupervisorConfig
    from tests.unit.test_supervisor_units import FakeLauncher

    sup = _sup(tmp_path)
    sdir = sup.dir
    sup.shutdown()
    os.makedirs(os.path.join(sdir, "feeds"), exist_ok=True)
    Path(sdir, "feeds", "fork-1-0.000003").write_bytes(b"left by a killed supervisor")
    again = Supervisor(
        SupervisorConfig(
            script=str(tmp_path / "train.py"), project_dir=str(tmp_path), port=0, resume_dir=sdir
        ),
        launcher=FakeLauncher(),
    )
    again.start()
    try:
        assert not os.path.exists(os.path.join(sdir, "feeds", "fork-1-0.000003"))
    finally:
        for wid in list(again.workers):
            again.launcher.stopped.add(wid)  # type: ignore[attr-defined]
        again.shutdown()


def test_feeds_of_a_live_supervisor_are_left_alone(tmp_path: Path) -> None:
    import json

    from onthefly_supervisor.feeds import clear_stale_feeds

    os.makedirs(tmp_path / "feeds")
    (tmp_path / "feeds" / "main-0.000000").write_bytes(b"live")
    (tmp_path / "connection.json").write_text(json.dumps({"pid": os.getppid()}))
    clear_stale_feeds(str(tmp_path))
    assert _files(tmp_path) == ["main-0.000000"], "its supervisor (a live pid) still reads it"
    (tmp_path / "connection.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    clear_stale_feeds(str(tmp_path))
    assert not (tmp_path / "feeds").exists()
