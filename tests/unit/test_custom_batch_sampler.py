"""A batch_sampler of the user's own (bucketing, one class per batch) keeps its batches:
EpochOrder draws them each epoch, reproducibly, instead of cutting its sampler's order into
fixed-size chunks."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from onthefly_worker.data import EpochOrder
from onthefly_worker.errors import OnTheFlyError

LABELS = torch.arange(40) % 4  # 4 classes, 10 samples each


class _OneClassPerBatch(Sampler[list[int]]):
    """Shuffles each class with Python's `random` and yields batches of one class."""

    def __init__(self, batch_size: int | None) -> None:
        if batch_size is not None:
            self.batch_size = batch_size  # like most bucket samplers: an attribute
        self._bs = batch_size or 4

    def __iter__(self) -> Iterator[list[int]]:
        batches = []
        for c in range(4):
            idx = [i for i in range(40) if LABELS[i] == c]
            random.shuffle(idx)
            batches += [idx[j : j + self._bs] for j in range(0, len(idx), self._bs)]
        random.shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        return 4 * -(-10 // self._bs)


def _loader(bs: int | None) -> DataLoader:
    return DataLoader(
        TensorDataset(torch.randn(40, 3), LABELS), batch_sampler=_OneClassPerBatch(bs)
    )


@pytest.mark.parametrize("bs", [4, None])
def test_the_users_batches_are_kept_and_drawn_the_same_way_again(bs: int | None) -> None:
    order = EpochOrder(_loader(bs), seed=7)
    batches = order.batches(0)
    assert len(batches) == 12 and order.batch_size == 4
    assert all(len(set(LABELS[b].tolist())) == 1 for b in batches)  # one class per batch
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))
    # A resumed run (a new EpochOrder) draws the same batches; the next epoch others.
    again = EpochOrder(_loader(bs), seed=7).batches(0)
    assert [b.tolist() for b in again] == [b.tolist() for b in batches]
    assert [b.tolist() for b in order.batches(1)] != [b.tolist() for b in batches]
    assert order.order(0).tolist() == np.concatenate(batches).tolist()


def test_drawing_leaves_the_global_rngs_alone() -> None:
    loader = _loader(4)  # (its data draws from torch's RNG)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    EpochOrder(loader, seed=3).batches(0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_a_selection_keeps_its_members_in_their_groups_and_skips_apply() -> None:
    subset = np.arange(0, 40, 2)  # classes 0 and 2 only
    order = EpochOrder(_loader(4), seed=7, subset=subset)
    batches = order.batches(0)
    assert sorted(np.concatenate(batches).tolist()) == subset.tolist()
    assert all(len(set(LABELS[b].tolist())) == 1 for b in batches)
    order.set_skip([(0, 0)])
    assert [b.tolist() for b in order.batches(0)] == [b.tolist() for b in batches[1:]]


def test_a_batch_sampler_without_len_is_a_clear_error() -> None:
    class Endless(Sampler[list[int]]):
        def __iter__(self) -> Iterator[list[int]]:
            while True:
                yield [0, 1]

    loader = DataLoader(TensorDataset(torch.randn(4, 3)), batch_sampler=Endless())
    with pytest.raises(OnTheFlyError, match=r"batch_sampler \(Endless\) has no __len__"):
        EpochOrder(loader, seed=0)
