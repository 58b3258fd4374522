"""Data order owned by the worker.

The permutation of an epoch is a pure function of (seed, epoch), the sample ids of each
batch are known in the main process before the batch is loaded, and a mid-epoch resume
starts the batch sampler at batch k, so skipped samples are never loaded. The user's
DataLoader is re-created around this sampler with the user's own dataset, batch size,
collate function, worker count and pinning.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)

from onthefly_worker.errors import OnTheFlyError

_GOLDEN = 0x9E3779B97F4A7C15


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch): neighbouring epochs get unrelated orders."""
    x = (seed * 6364136223846793005 + (epoch + 1) * _GOLDEN) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def dataset_size(loader: DataLoader) -> int:
    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        return -1
    try:
        return len(ds)  # type: ignore[arg-type]
    except TypeError:
        return -1


class EpochOrder:
    """Computes the index order of an epoch as the user's loader would have drawn it.

    * RandomSampler (shuffle=True) without replacement: a permutation from (seed, epoch).
    * SequentialSampler (shuffle=False): 0..n-1.
    * Any other sampler (weighted, subset, custom): iterated under a torch RNG forked and
      seeded from (seed, epoch), so the order is reproducible and the training RNG is
      untouched (`random` and numpy's global RNG are seeded and restored the same way).
    * A batch_sampler of the user's own (not torch's BatchSampler): its batches, drawn the
      same way, as they come (bucketing and grouping stay).
    `subset` restricts training to those dataset positions (a fork's selection).

    `skip` lists batches never to train on, as (epoch, batch) pairs where `batch` is the
    batch's position in the epoch's full order (what a run without skipped batches records
    in its metrics). A rollback uses it to step over the batches that made the loss
    non-finite or spike: `batches()` leaves them out, so the training loop never loads
    them, and the order of every other batch is unchanged. The set is deterministic and
    saved in checkpoints (see `skipped`), so a resumed run skips the same batches.
    """

    def __init__(
        self,
        loader: DataLoader,
        seed: int,
        subset: np.ndarray | None = None,
        skip: Iterable[Sequence[int]] = (),
    ) -> None:
        self.loader = loader
        self.seed = seed
        self.n = dataset_size(loader)
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        if self.subset is not None and self.subset.size == 0:
            raise OnTheFlyError("the selection is empty: there are no samples to train on")
        self.sampler = loader.sampler
        self.user_batch_sampler = loader.batch_sampler
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        # A batch sampler of the user's own (bucketing by length, one class per batch...):
        # each epoch's batches are drawn from it, as they come, instead of cutting its
        # sampler's order into fixed-size chunks (which would throw its grouping away).
        self.custom: Iterable[Any] | None = None
        self._drawn_cache: dict[int, list[np.ndarray]] = {}
        self.skip: dict[int, frozenset[int]] = {}
        if self.batch_size is None:
            bsamp = self.user_batch_sampler
            if isinstance(bsamp, BatchSampler) and type(bsamp).__iter__ is BatchSampler.__iter__:
                self.batch_size = int(bsamp.batch_size)
                self.drop_last = bool(bsamp.drop_last)
                self.sampler = bsamp.sampler
            else:
                self.custom = bsamp
                try:
                    len(bsamp)  # type: ignore[arg-type]
                except TypeError:
                    raise OnTheFlyError(
                        f"the train loader's batch_sampler ({type(bsamp).__name__}) has no "
                        "__len__; OnTheFly draws each epoch's batches from it and needs to know "
                        "where an epoch ends"
                    ) from None
                bs = getattr(bsamp, "batch_size", None)
                if isinstance(bs, int) and bs >= 1:
                    self.batch_size = bs
                else:  # its batch size is that of its largest batch
                    self.batch_size = max(map(len, self.batches(0)), default=1)
                self.drop_last = bool(getattr(bsamp, "drop_last", False))
                self.sampler = getattr(bsamp, "sampler", self.sampler)
        self.set_skip(skip)

    @property
    def full_epoch_steps(self) -> int:
        """Steps in an epoch of the whole loader (the main run's epoch), whatever `subset`
        a fork trains on: its epoch-interval scheduler steps at this cadence."""
        if self.custom is not None:
            return max(1, len(self.custom))  # type: ignore[arg-type]
        try:
            n = len(self.sampler)  # type: ignore[arg-type]
        except TypeError:
            n = self.n
        bs = max(1, int(self.batch_size or 1))
        return max(1, n // bs if self.drop_last else -(-n // bs))

    def set_skip(self, pairs: Iterable[Sequence[int]]) -> None:
        """Replace the skipped batches; (epoch, batch) pairs of non-negative integers."""
        out: dict[int, set[int]] = {}
        for p in pairs:
            if len(p) != 2:
                raise OnTheFlyError(f"a skipped batch is an (epoch, batch) pair, got {list(p)!r}")
            e, b = int(p[0]), int(p[1])
            if e < 0 or b < 0:
                raise OnTheFlyError(f"skipped batch (epoch {e}, batch {b}): must be >= 0")
            out.setdefault(e, set()).add(b)
        self.skip = {e: frozenset(v) for e, v in out.items()}

    @property
    def skipped(self) -> list[list[int]]:
        """The skipped batches as sorted [epoch, batch] pairs (checkpoint-safe plain ints)."""
        return [[e, b] for e in sorted(self.skip) for b in sorted(self.skip[e])]

    def canonical_batch(self, epoch: int, position: int) -> int:
        """Position of the `position`-th trained batch of `epoch` in the epoch's full order."""
        for b in sorted(self.skip.get(epoch, ())):
            if b <= position:
                position += 1
        return position

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample ids in training order (a subset's, when there is one)."""
        if self.custom is not None:
            batches = self._drawn(epoch)
            return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        s = epoch_seed(self.seed, epoch)
        if self.subset is not None:
            g = torch.Generator().manual_seed(s)
            if isinstance(self.sampler, SequentialSampler):
                return self.subset.copy()
            return self.subset[torch.randperm(len(self.subset), generator=g).numpy()]
        if isinstance(self.sampler, SequentialSampler):
            return np.arange(self.n, dtype=np.int64)
        if (
            isinstance(self.sampler, RandomSampler)
            and not self.sampler.replacement
            and self.sampler.num_samples == self.n
        ):
            g = torch.Generator().manual_seed(s)
            return torch.randperm(self.n, generator=g).numpy()
        # Generic sampler: draw it with a private, seeded RNG (its length many indices: a
        # sampler that never ends must not be drawn into memory forever).
        try:
            limit = len(self.sampler)  # type: ignore[arg-type]
        except TypeError:
            raise OnTheFlyError(
                f"the train loader's sampler ({type(self.sampler).__name__}) has no __len__; "
                "OnTheFly draws each epoch's order from it and needs to know where an epoch ends"
            ) from None
        idx = _seeded_draw(self.sampler, s, limit)
        return np.asarray(idx, dtype=np.int64)

    def _drawn(self, epoch: int) -> list[np.ndarray]:
        """The user's batch sampler's batches for `epoch`, drawn with a private RNG seeded
        from (seed, epoch), so a resumed run draws the same ones; a selection keeps each
        batch's members that it holds (its grouping stays) and drops emptied batches."""
        assert self.custom is not None
        if epoch in self._drawn_cache:
            return self._drawn_cache[epoch]
        bsamp = self.custom
        limit = len(bsamp)  # type: ignore[arg-type]
        drawn = [
            np.asarray(list(b), dtype=np.int64).reshape(-1)
            for b in _seeded_draw(bsamp, epoch_seed(self.seed, epoch), limit)
        ]
        if self.subset is not None:
            drawn = [b[np.isin(b, self.subset)] for b in drawn]
        drawn = [b for b in drawn if b.size]
        if len(self._drawn_cache) >= 2:  # the current epoch and the one before it
            self._drawn_cache.pop(min(self._drawn_cache))
        self._drawn_cache[epoch] = drawn
        return drawn

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The batches (sample ids) to train on in `epoch`, skipped ones left out."""
        if self.custom is not None:
            return self._skipped(epoch, self._drawn(epoch))
        order = self.order(epoch)
        bs = int(self.batch_size or 1)
        n_full = len(order) // bs
        out = [order[i * bs : (i + 1) * bs] for i in range(n_full)]
        if not self.drop_last and len(order) % bs:
            if self.subset is not None and len(order) % bs == 1 and out:
                # A selection's last sample joins the batch before it: a 1-sample batch
                # breaks BatchNorm in training mode, and the user's own data never made one.
                out[-1] = order[(n_full - 1) * bs :]
            else:
                out.append(order[n_full * bs :])
        return self._skipped(epoch, out)

    def _skipped(self, epoch: int, out: list[np.ndarray]) -> list[np.ndarray]:
        skip = self.skip.get(epoch)
        if skip:
            beyond = sorted(b for b in skip if b >= len(out))
            if beyond:
                raise OnTheFlyError(
                    f"cannot skip batch {beyond[0]} of epoch {epoch}: the epoch has {len(out)} batches"
                )
            out = [b for i, b in enumerate(out) if i not in skip]
        return out


def _seeded_draw(sampler: Any, seed: int, limit: int) -> list[Any]:
    """The first `limit` items of a sampler, drawn under a private torch RNG seeded with
    `seed` (the sampler's own generator, or its inner sampler's, is seeded the same way and
    restored after), leaving the global RNGs as they were."""
    gens = [
        g
        for g in (
            getattr(sampler, "generator", None),
            getattr(getattr(sampler, "sampler", None), "generator", None),
        )
        if isinstance(g, torch.Generator)
    ]
    saved = [g.get_state() for g in gens]
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Samplers written with `random` or numpy's global RNG draw the same way too.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        for g in gens:
            g.manual_seed(seed)
        try:
            return list(itertools.islice(iter(sampler), limit))
        finally:
            for g, st in zip(gens, saved, strict=True):
                g.set_state(st)
            random.setstate(py_state)
            np.random.set_state(np_state)


class _ListBatchSampler(Sampler[list[int]]):
    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._batches)


def selection_loader(loader: DataLoader, subset: np.ndarray, batch_size: int | None) -> DataLoader:
    """The train data restricted to a fork's selection, in order, for evaluation (its
    `slice:self` loss): the user's dataset and collate, batches of at least 64."""
    sub = Subset(loader.dataset, subset.tolist())
    return DataLoader(sub, batch_size=max(int(batch_size or 256), 64), collate_fn=loader.collate_fn)


def _alive(pid: int) -> bool:
    """Whether the process runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: what kill(0) said
    return state not in ("Z", "X")


class _DieWithTrainingWorker:
    """A loader worker's worker_init_fn: the kernel SIGKILLs the loader process when the
    training worker that started it dies (PR_SET_PDEATHSIG), then the user's own
    worker_init_fn runs. Without it a loader process of a SIGKILLed worker lingers until
    torch's watchdog notices (up to ~5 s). Picklable for spawn/forkserver contexts when
    the user's function is. (The signal follows the thread that created the process; the
    loader's workers end with its iterator, which the thread iterating it holds.)"""

    def __init__(self, parent_pid: int, user: Callable[[int], None] | None) -> None:
        self.parent_pid = parent_pid
        self.user = user

    def __call__(self, worker_id: int) -> None:
        from onthefly_worker.launch import arm_parent_death_signal

        # Under a forkserver context the loader process is the fork server's child, not the
        # training worker's: the signal then follows the fork server (which ends with the
        # training worker), and only a training worker that is already gone ends us here.
        arm_parent_death_signal(0)
        # (Armed after the training worker died, the signal never comes: a worker that died
        # between the fork and here is dead or a zombie now.)
        if os.getppid() != self.parent_pid and not _alive(self.parent_pid):
            os._exit(1)
        if self.user is not None:
            self.user(worker_id)


def epoch_loader(
    loader: DataLoader, batches: Sequence[np.ndarray], seed: int, epoch: int
) -> DataLoader:
    """The user's DataLoader, re-created to yield exactly `batches` in order.

    The generator seeds the loader workers' base seed from (seed, epoch) instead of the
    global torch RNG, so creating an iterator does not disturb training randomness. Its
    worker processes die with the training worker (see _DieWithTrainingWorker).
    """
    init = loader.worker_init_fn
    if loader.num_workers > 0 and not isinstance(init, _DieWithTrainingWorker):
        init = _DieWithTrainingWorker(os.getpid(), init)
    kwargs: dict[str, Any] = {
        "batch_sampler": _ListBatchSampler(batches),
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": init,
        "generator": torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0x5DEECE66D),
    }
    if loader.num_workers > 0:
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs)


# The (inputs, target) key pairs a dict batch may use, tried in this order.
DICT_BATCH_KEYS: tuple[tuple[str, str], ...] = (
    ("x", "y"),
    ("input", "target"),
    ("inputs", "targets"),
    ("inputs", "labels"),
    ("input_ids", "labels"),
    ("features", "label"),
    ("image", "label"),
)


def _dict_keys(batch: dict[Any, Any]) -> tuple[str, str] | None:
    """The (input, target) key pair of a dict batch, the first of DICT_BATCH_KEYS it has."""
    return next(((xk, yk) for xk, yk in DICT_BATCH_KEYS if xk in batch and yk in batch), None)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, target) from what the loader yielded, or a clear error naming the structure."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        keys = _dict_keys(batch)
        if keys is not None:
            return batch[keys[0]], batch[keys[1]]
        pairs = ", ".join(f"{xk}/{yk}" for xk, yk in DICT_BATCH_KEYS)
        raise OnTheFlyError(
            f"the loader yielded a dict with keys {sorted(batch, key=str)}; OnTheFly needs "
            f"(inputs, target): use one of the key pairs {pairs}, or yield a tuple"
        )
    raise OnTheFlyError(
        f"the loader yielded a {type(batch).__name__}; OnTheFly needs (inputs, target) pairs "
        "(a tuple/list of at least two items, or a dict with x/y, input/target, inputs/labels... keys)"
    )


def unused_batch_keys(batch: Any) -> tuple[list[str], str, str]:
    """For a dict batch: (the keys the model never sees, the input key, the target key):
    OnTheFly calls model(batch[input key]) and the loss on batch[target key], so e.g. an
    `attention_mask` beside `input_ids`/`labels` is not passed on. ([], "", "") otherwise."""
    keys = _dict_keys(batch) if isinstance(batch, dict) else None
    if keys is None:
        return [], "", ""
    return sorted(str(k) for k in batch if k not in keys), keys[0], keys[1]


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def batch_len(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (list, tuple)) and x:
        return batch_len(x[0])
    if isinstance(x, dict) and x:
        return batch_len(next(iter(x.values())))
    return 0


def data_fingerprint(loader: DataLoader, k: int = 4) -> str:
    """sha256 over the first k samples, so a fork can tell that its data equals the parent's."""
    ds = loader.dataset
    h = hashlib.sha256()
    n = dataset_size(loader)
    h.update(str(n).encode())
    if n <= 0:
        return h.hexdigest()
    with torch.random.fork_rng(devices=[]):
        for i in range(min(k, n)):
            try:
                _hash_into(h, ds[i])
            except Exception:  # a dataset whose __getitem__ needs more than an int, odd types
                return h.hexdigest()
    return h.hexdigest()


def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _hash_into(h, o)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _hash_into(h, obj[key])
    else:
        h.update(repr(obj).encode())


__all__ = [
    "BatchSampler",
    "EpochOrder",
    "batch_len",
    "data_fingerprint",
    "dataset_size",
    "epoch_loader",
    "epoch_seed",
    "split_batch",
    "to_device",
]
