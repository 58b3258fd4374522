"""When the supervisor writes per-sample arrays: every epoch end, at most once a second per
run (a tiny dataset ends many epochs a second), and labels only when they change."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onthefly_proto import onthefly_pb2 as pb
from onthefly_supervisor.lifecycle import WorkerState
from onthefly_supervisor.store import SampleArrays
from tests.unit.test_supervisor_units import _sup


def test_unchanged_labels_are_not_dirty_and_evict_writes_only_what_it_drops(
    tmp_path: Path,
) -> None:
    arrays = SampleArrays(str(tmp_path))
    ids = np.arange(4)
    labels = {"labels": np.array([1, 0, 1, 2], dtype=np.int32)}
    arrays.ingest("main", 0, 4, ids, np.ones(4, np.float32), labels)
    arrays.persist()
    assert arrays._dirty == set()
    arrays.ingest("main", 1, 4, ids, np.ones(4, np.float32), labels)
    assert arrays._dirty == {("main", 1, "loss")}, "the same labels again: nothing to rewrite"
    arrays.ingest("main", 2, 4, ids, np.ones(4, np.float32))
    arrays.evict("main", 2)
    assert os.path.exists(arrays.path("main", 1)) and not os.path.exists(arrays.path("main", 2))
    assert ("main", 2, "loss") in arrays._dirty and arrays.get("main", 2) is not None
    arrays.ingest("main", 2, 4, ids[:1], np.ones(1, np.float32), {"labels": np.array([3])})
    assert ("main", -1, "labels") in arrays._dirty, "changed labels are written again"


def test_epoch_ends_write_at_most_once_a_second_and_nothing_waits_longer(
    tmp_path: Path,
) -> None:
    sup = _sup(tmp_path)
    try:
        (wid,) = [w for w in sup.workers if sup.workers[w].state is WorkerState.STARTING]
        sup.attach(pb.Hello(run_id="main", dataset_size=4), wid)

        def epoch(e: int) -> None:
            sup.on_worker_message(
                wid,
                pb.WorkerMessage(
                    samples=pb.SampleLosses(
                        run_id="main",
                        epoch=e,
                        count=4,
                        ids=np.arange(4, dtype="<i8").tobytes(),
                        losses=np.full(4, e, "<f4").tobytes(),
                    )
                ),
            )
            sup.on_worker_message(
                wid, pb.WorkerMessage(epoch_end=pb.EpochEnd(run_id="main", epoch=e, step=e))
            )

        def on_disk(e: int) -> bool:
            return os.path.exists(sup.arrays.path("main", e))

        epoch(0)
        assert on_disk(0), "the first epoch end writes at once"
        epoch(1)
        epoch(2)
        assert not on_disk(1) and not on_disk(2), "ends within a second wait in memory"
        assert sup.arrays.get("main", 1) is not None
        sup._epoch_persisted["main"] -= 1.0  # a second later
        epoch(3)
        assert all(on_disk(e) for e in range(4)), "the next write takes the ones that waited"
        np.testing.assert_array_equal(np.load(sup.arrays.path("main", 1)), 1.0)
        sup.detach(wid)
    finally:
        sup.shutdown()
