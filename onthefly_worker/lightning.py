"""`attach_lightning(...)`: OnTheFly for Lightning 2.x users who keep calling `trainer.fit(...)`.

The user's script stays a Lightning script. `attach_lightning` adds one Callback to the
trainer and wraps `trainer.fit` on that trainer instance; when fit starts, the worker
connects to the supervisor (starting one for a plain `python train.py`, exactly like
`Trainer.fit`) and does what this process's role says: train the generalist, or train
a fork from a parent checkpoint on a selection of samples for a step budget.

How each native guarantee is kept without owning the loop:

* **Sample ids.** Lightning owns the DataLoader, so the worker owns its *batch
  sampler*: the train loader Lightning requests is rebuilt around a batch sampler that
  yields OnTheFly's deterministic order (`EpochOrder`: a function of seed and epoch) and
  queues each batch's ids in the main process as it hands them to the loader. Batches
  reach `on_train_batch_start` in the order the sampler issued them (DataLoader keeps
  order, Lightning's prefetcher is FIFO), so popping the queue names the samples of
  the batch in hand. The batch the user's `training_step` receives is untouched. A
  dataset wrapper that returns `(index, item)` would work too, but it changes what
  `training_step` sees (or needs a collate that strips the index inside loader worker
  processes, where the ids cannot be reported from); the sampler route has neither cost.
  The loader is swapped where Lightning asks for it (the fit loop's data source), so a
  DataLoader passed to `fit`, a `train_dataloader()` hook and a LightningDataModule all work.
* **Per-sample loss with no extra forward.** A forward hook on the LightningModule sees
  the output of `self(x)` inside `training_step` and applies `loss_fn` with
  `reduction='none'` to it and the batch target, under `no_grad` (see docs/lightning.md
  for the measured cost). When a `training_step` never calls `self(...)`, the loss is
  taken from one extra eval-mode forward before backward, and the run says so once.
* **Control at batch boundaries.** Commands are polled in `on_train_batch_end`; a pause
  writes a checkpoint and blocks on the connection's command event (no spinning); stop
  sets `trainer.should_stop`.
* **Checkpoints** use the native format (model, optimizer, scheduler, scaler, RNG, data
  cursor, counters, config) plus the Lightning loop progress, so a restarted worker
  continues mid-epoch from the same batch.

Supported: automatic optimization with one optimizer on one device (Lightning's
`devices=1`), train data as one map-style DataLoader. Anything else fails fast with a
message saying so.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import activity, recipe
from onthefly_worker import checkpoint as ckpt
from onthefly_worker import env as wenv
from onthefly_worker import merge_math as mm
from onthefly_worker import slices as sl
from onthefly_worker.config import (
    TrainerConfig,
    check_val_slices,
    describe_val_slices,
    is_seconds,
)
from onthefly_worker.connection import PROTOCOL_VERSION, Command, WorkerConnection
from onthefly_worker.control import CommandLoop
from onthefly_worker.data import (
    EpochOrder,
    batch_len,
    data_fingerprint,
    dataset_size,
    epoch_seed,
    selection_loader,
    split_batch,
)
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.evaluation import evaluate_model, preserved_rng, report_eval
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.recorder import Recorder
from onthefly_worker.trainer import ROLE_TO_PB, connect, mark_fit_reached

if TYPE_CHECKING:  # lightning is optional: never imported at module import time
    import lightning.pytorch as pl

ModelFactory = Callable[[], nn.Module]
"""A zero-argument callable that builds a fresh copy of the user's model."""


# -- model_factory ---------------------------------------------------------------------------
def normalize_model_factory(spec: Any) -> ModelFactory | None:
    """Turn the README's three factory forms into one zero-argument closure.

    Accepted: a callable (a function or a class), a tuple `(callable, args, kwargs)` whose
    `args`/`kwargs` may be left out, or a dict `{"factory": callable, "args": ..., "kwargs":
    ...}`. The closure checks that what it builds is an `nn.Module`, so a wrong factory
    fails where it is called with a message that names it, not deep inside a checkpoint load.
    """
    if spec is None:
        return None
    args: Any = ()
    kwargs: Any = {}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"factory", "args", "kwargs"})
        if unknown:
            raise OnTheFlyError(
                f"model_factory dict has unknown key(s) {', '.join(map(str, unknown))}; "
                "use {'factory': callable, 'args': (...), 'kwargs': {...}}"
            )
        if "factory" not in spec:
            raise OnTheFlyError(
                "model_factory dict needs a 'factory' key: {'factory': callable, 'args': (...), 'kwargs': {...}}"
            )
        fn = spec["factory"]
        args = spec.get("args", ()) or ()
        kwargs = spec.get("kwargs", {}) or {}
    elif isinstance(spec, tuple):
        if not 1 <= len(spec) <= 3:
            raise OnTheFlyError(
                f"model_factory tuple must be (callable, args, kwargs) with args/kwargs optional; "
                f"got {len(spec)} items"
            )
        fn = spec[0]
        args = spec[1] if len(spec) > 1 and spec[1] is not None else ()
        kwargs = spec[2] if len(spec) > 2 and spec[2] is not None else {}
    elif callable(spec):
        fn = spec
    else:
        raise OnTheFlyError(
            f"model_factory must be a callable, a (callable, args, kwargs) tuple or a "
            f"{{'factory': ..., 'args': ..., 'kwargs': ...}} dict; got {type(spec).__name__}"
        )
    if not callable(fn):
        raise OnTheFlyError(f"model_factory's factory must be callable, got {type(fn).__name__}")
    if not isinstance(args, (tuple, list)):
        raise OnTheFlyError(
            f"model_factory args must be a tuple or list, got {type(args).__name__}"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise OnTheFlyError(
            f"model_factory kwargs must be a dict with string keys, got {type(kwargs).__name__}"
        )
    frozen_args = tuple(args)
    frozen_kwargs = dict(kwargs)
    name = getattr(fn, "__qualname__", type(fn).__name__)

    def build() -> nn.Module:
        model = fn(*frozen_args, **frozen_kwargs)
        if not isinstance(model, nn.Module):
            raise OnTheFlyError(
                f"model_factory {name}(...) returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    build.__qualname__ = f"model_factory[{name}]"
    return build


# -- outputs ---------------------------------------------------------------------------------
def prediction_of(output: Any) -> torch.Tensor:
    """The tensor the loss is applied to, from whatever `forward` returned.

    A tensor is used as is; a tuple/list contributes its first item (the `(logits, aux)`
    convention); a dict its `logits`/`preds`/`output`/`out` entry.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for key in ("logits", "preds", "output", "out"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    raise OnTheFlyError(
        f"the model's forward returned a {type(output).__name__}; OnTheFly applies loss_fn to a tensor, "
        "the first item of a tuple, or the 'logits' entry of a dict"
    )


# -- the owned train loader ------------------------------------------------------------------
class _OwnedBatchSampler(Sampler[list[int]]):
    """Yields OnTheFly's batches for the current epoch and queues their ids as it goes.

    The epoch and first batch are read when iteration starts (Lightning creates one
    iterator per epoch, sometimes before it announces the epoch), from the run's cursor.
    `len()` is the full epoch length: Lightning counts a resumed epoch from the batch it
    stopped at, so a resumed epoch that yields batches[k:] ends exactly where it should.
    """

    def __init__(
        self,
        order: EpochOrder,
        where: Callable[[], tuple[int, int]],
        issued: collections.deque[np.ndarray],
    ) -> None:
        self.order = order
        self._where = where
        self._issued = issued
        self.n_batches = len(order.batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self._where()
        self._issued.clear()  # ids the previous iterator issued but Lightning never consumed
        for ids in self.order.batches(epoch)[start:]:
            self._issued.append(ids)
            yield ids.tolist()

    def __len__(self) -> int:
        return self.n_batches


class _OwnedLoader(DataLoader):
    """The user's DataLoader settings around OnTheFly's batch sampler.

    Each new iterator reseeds the loader's private generator from (seed, epoch): loader
    worker seeds are then reproducible, and creating an iterator never draws from the
    global torch RNG (which would shift the training randomness, e.g. dropout).

    It is resumable in Lightning's sense (`state_dict`/`load_state_dict`): its state is
    the data cursor, so Lightning does not warn that a mid-epoch resume is unreliable
    (it is exact), and a Lightning checkpoint of the run carries the cursor too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._otf_reseed: Callable[[torch.Generator], None] = kwargs.pop("reseed")
        self._otf_cursor: _Cursor = kwargs.pop("cursor")
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Any:
        if isinstance(self.generator, torch.Generator):
            self._otf_reseed(self.generator)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return self._otf_cursor.get()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._otf_cursor.set(state)


class _Cursor:
    """Where the next train batch comes from: (epoch, batch within the epoch)."""

    def __init__(self, run: _LightningRun) -> None:
        self._run = run

    def get(self) -> dict[str, int]:
        return {"epoch": self._run.epoch, "batch": self._run.batch}

    def set(self, state: dict[str, int]) -> None:
        self._run.epoch, self._run.batch = int(state["epoch"]), int(state["batch"])


def _own_loader(
    loader: DataLoader, sampler: _OwnedBatchSampler, seed_of: Callable[[], int], cursor: _Cursor
) -> _OwnedLoader:
    def reseed(g: torch.Generator) -> None:
        g.manual_seed(seed_of() ^ 0x5DEECE66D)

    kwargs: dict[str, Any] = {
        "batch_sampler": sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": torch.Generator(),
        "reseed": reseed,
        "cursor": cursor,
    }
    if loader.num_workers > 0:
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["persistent_workers"] = loader.persistent_workers
    return _OwnedLoader(loader.dataset, **kwargs)


# -- options and handle ----------------------------------------------------------------------
@dataclass
class LightningOptions:
    """What `attach_lightning` was told, validated once."""

    project: str = "default"
    """Project name, shown in the dashboard and stored with the session."""
    run_name: str = "main"
    """Display name of the generalist run (its id is always `main`)."""
    do_test_after: bool = False
    """Evaluate `test_loader` once training stops."""
    seed: int | None = None
    """Seed of the data order; None = the session seed (ONTHEFLY_SEED, default 0)."""
    checkpoint_every_n_steps: int = 0
    """Also checkpoint on this step cadence (pause, stop and the end of training always checkpoint)."""
    checkpoint_min_interval_s: float = 2.0
    """An epoch end checkpoints when at least this many seconds have passed since the last
    checkpoint; 0 = every epoch end (as `Trainer(checkpoint_min_interval_s=...)`)."""
    val_slices: dict[str, Any] | None = None
    """Named validation slices reported as `val_slice:<name>` next to `val`, as for
    `Trainer(val_slices=...)`: a predicate `fn(inputs, targets) -> one bool per sample`
    or a sequence of validation-set positions."""

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project:
            raise OnTheFlyError(
                f"attach_lightning(project={self.project!r}): must be a non-empty string"
            )
        if not isinstance(self.run_name, str) or not self.run_name:
            raise OnTheFlyError(
                f"attach_lightning(run_name={self.run_name!r}): must be a non-empty string"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise OnTheFlyError(f"attach_lightning(seed={self.seed!r}): must be an integer or None")
        if not isinstance(self.checkpoint_every_n_steps, int) or self.checkpoint_every_n_steps < 0:
            raise OnTheFlyError(
                f"attach_lightning(checkpoint_every_n_steps={self.checkpoint_every_n_steps!r}): "
                "must be an integer >= 0"
            )
        if not is_seconds(self.checkpoint_min_interval_s):
            raise OnTheFlyError(
                f"attach_lightning(checkpoint_min_interval_s={self.checkpoint_min_interval_s!r}): "
                "must be a number of seconds >= 0 (0 = every epoch end)"
            )
        if self.val_slices is not None:
            check_val_slices(self.val_slices, "attach_lightning")


@dataclass
class LightningAttachment:
    """What `attach_lightning` returns: the live link between one Lightning trainer and OnTheFly."""

    options: LightningOptions
    model: nn.Module
    model_factory: ModelFactory | None
    result: dict[str, Any] = field(default_factory=dict)
    """After `trainer.fit`: status, step, epoch and final checkpoint of the run."""
    _run: _LightningRun | None = field(default=None, repr=False)

    def fresh_model(self) -> nn.Module:
        """A new, independent copy of the model for loading checkpoints beside the live one.

        Uses `model_factory` when one was given; otherwise a deep copy of the model with
        the trainer reference and OnTheFly's hooks stripped (a LightningModule pickles
        without its trainer).
        """
        if self.model_factory is not None:
            return self.model_factory()
        hooks = self._run.hook_ids() if self._run is not None else set()
        # OnTheFly's forward hook is a method of the live run (which holds the gRPC stream):
        # the memo keeps the copy from copying the run; the hook is dropped from it below.
        memo: dict[int, Any] = {id(self._run): self._run} if self._run is not None else {}
        try:
            clone = copy.deepcopy(self.model, memo)
        except Exception as e:
            raise OnTheFlyError(
                f"could not copy {type(self.model).__name__} ({type(e).__name__}: {e}); pass "
                "attach_lightning(model_factory=...) so OnTheFly can build a fresh model instead"
            ) from e
        for m in clone.modules():
            for hid in hooks & set(m._forward_hooks):
                del m._forward_hooks[hid]
        return clone


# -- the run ---------------------------------------------------------------------------------
class _LightningRun(CommandLoop):
    """All the state of one instrumented `trainer.fit`; the Lightning callback forwards here."""

    def __init__(
        self,
        att: LightningAttachment,
        trainer: pl.Trainer,
        loss_fn: Any,
        train_loader: DataLoader | None,
        val_loader: DataLoader | None,
        test_loader: DataLoader | None,
    ) -> None:
        self.att = att
        self.opts = att.options
        self.trainer = trainer
        self.loss = PerSampleLoss(loss_fn)
        self.user_train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.adapters = False
        """A fork training low-rank adapters (--adapters) instead of full weights."""
        # Recent step and data-wait times, for the throughput health check.
        self.step_ms: collections.deque[float] = collections.deque(maxlen=512)
        self.data_ms: collections.deque[float] = collections.deque(maxlen=512)
        self.env: wenv.WorkerEnv | None = None
        self.spec: dict[str, Any] = {}
        self.run_id = "main"
        self.seed = 0
        self.budget = 0
        self.rung_stop = 0
        """A raced fork variant's rung: it stops there (0 = train the whole budget)."""
        self.early: recipe.EarlyStop | None = None
        """--early-stop-patience: when the fork stops before its budget (recipe.py)."""
        self.early_stopped: dict[str, Any] | None = None
        self._evaluated: dict[str, int] = {}  # split -> the step it was last evaluated at
        self.replay_steps = 0
        """role=health: the steps this replay of a checkpoint trains (then it stops)."""
        self.replayed = 0
        self.subset: np.ndarray | None = None
        self.conn: WorkerConnection | None = None
        self.rec: Recorder | None = None
        self.writer = ckpt.AsyncWriter()
        self.epoch_ckpt = ckpt.EpochGate(
            att.options.checkpoint_min_interval_s, self._log, "attach_lightning"
        )
        self.last_checkpoint = ""
        self.flush_s = 0.05
        self.hb_s = 1.0
        # data
        self.order: EpochOrder | None = None
        self.source_loader: DataLoader | None = None
        self.issued: collections.deque[np.ndarray] = collections.deque()
        self.n_batches = 0
        self._source: Any = None
        self._source_orig: Any = None
        # counters and cursor (the next batch to train is batches(epoch)[batch])
        self.step = 0
        self.epoch = 0
        self.batch = 0
        self.sample_steps = 0
        # per-batch scratch
        self._phase: str | None = None
        self._ids: np.ndarray | None = None
        self._inputs: Any = None
        self._target: Any = None
        self._n = 0
        self._per: torch.Tensor | None = None
        self._cls: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gnorm: torch.Tensor | float = math.nan
        self._t_prev = 0.0
        self._t_data = 0.0
        self._t_epoch = 0.0
        self._warned_fallback = False
        # validation accumulators
        self._val_sum = 0.0
        self._val_count = 0
        self._val_correct = 0
        self._val_classif = True
        self._slice_sums: sl.SliceSums | None = None
        self._val_masks: dict[str, torch.Tensor] = {}
        self._slices_written = False
        self._warned_slices = False
        # lifecycle
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._restore_state: dict[str, Any] | None = None
        self._restore_kind = ""  # "resume" (this run's checkpoint) | "fork" (the parent's) | ""
        self._restore_path = ""
        self.paused = False
        self.stop_reason = ""
        self.stopping = False
        self.run_test_on_stop = self.opts.do_test_after
        self.finished = False
        self.status = "failed"

    # -- helpers ---------------------------------------------------------------------------
    def hook_ids(self) -> set[int]:
        return {h.id for h in self._hooks}

    def _log(self, text: str, level: str = "info") -> None:
        if self.conn is not None:
            self.conn.send(log=pb.LogLine(level=level, text=text))

    def _status(self, state: pb.WorkerState.ValueType, message: str = "") -> None:
        assert self.conn is not None
        self.conn.send(
            status=pb.StatusUpdate(
                run_id=self.run_id, state=state, message=message, step=self.step, epoch=self.epoch
            )
        )

    @property
    def module(self) -> pl.LightningModule:
        m = self.trainer.lightning_module
        assert m is not None
        return m

    @property
    def active(self) -> bool:
        return self.conn is not None and not self.finished

    # -- before fit ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Runs in the fit wrapper, before Lightning starts: find out this process's role."""
        env = wenv.WorkerEnv.from_environ()
        if env is None:
            from onthefly_worker import selfhost

            env = selfhost.ensure_supervisor(
                TrainerConfig(project=self.opts.project, run_name=self.opts.run_name)
            )
        self.env = env
        if env.role not in ("train", "fork", "merge", "health"):
            raise OnTheFlyError(
                f"this worker was started as role {env.role!r}; a Lightning script can run the "
                "'train', 'fork', 'merge' and 'health' roles"
            )
        self.spec = env.read_spec()
        self.run_id = env.run_id
        self.seed = self.opts.seed if self.opts.seed is not None else (wenv.session_seed() or 0)
        if "seed" in self.spec:
            self.seed = int(self.spec["seed"])
        path = ""
        if env.resume:
            path, self._restore_kind = env.resume, "resume"
        elif env.role == "fork":
            path, self._restore_kind = str(self.spec.get("checkpoint", "")), "fork"
            if not path:
                raise OnTheFlyError("the fork spec names no parent checkpoint")
        if env.role == "fork":
            self.budget = int(self.spec.get("budget_steps", 0) or 0)
            self.rung_stop = int((self.spec.get("race") or {}).get("stop_at", 0) or 0)
            if self.budget <= 0:
                raise OnTheFlyError(f"a fork needs budget_steps > 0, got {self.budget}")
            self.subset = np.load(os.path.join(env.session_dir, str(self.spec["indices_file"])))
            self.early = recipe.EarlyStop.from_spec(self.spec)
            # A fork trains on its selection for its budget, and reports at the end.
            train_for_steps(self.trainer, self.budget)
        elif env.role == "health":
            from onthefly_worker.lightning_health import prepare_replay

            path = prepare_replay(self)
            self._restore_kind = "resume"
        if path:
            full = os.path.join(env.session_dir, path)
            expected = (
                (str(self.spec.get("sha256") or "") or None) if env.role == "health" else None
            )
            self._restore_state = ckpt.load(full, map_location="cpu", expected_sha256=expected)
            self._restore_path = path
            if env.role == "health":
                from onthefly_worker.lightning_health import check_replayable

                check_replayable(self, self._restore_state)

    # -- fit start -------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._check_supported(trainer, module)
        state = self._restore_state
        if state is not None:
            if self._restore_kind == "resume":
                cur = state["cursor"]
                self.epoch, self.batch = int(cur["epoch"]), int(cur["batch"])
                self.seed = int(cur["seed"])
                self.step = int(state["counters"]["step"])
                self.sample_steps = int(state["counters"]["sample_steps"])
            # RNG first: materialising the loader below may already load the first batch.
            ckpt.restore_rng(state["rng"])
        self._own_train_data(trainer)
        self._connect(trainer, module)
        if state is not None:
            self._restore(trainer, module, state)
        self._hooks.append(module.register_forward_hook(self._on_forward))

    def _check_supported(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if module is not self.att.model:
            raise OnTheFlyError(
                f"trainer.fit got a different LightningModule ({type(module).__name__}) than "
                "attach_lightning(model=...); pass the same object to both"
            )
        if not module.automatic_optimization:
            raise OnTheFlyError(
                "attach_lightning supports automatic optimization (one optimizer stepped by Lightning); "
                f"{type(module).__name__} sets automatic_optimization=False, which is not supported yet"
            )
        n_opt = len(trainer.optimizers)
        if n_opt != 1:
            raise OnTheFlyError(
                f"attach_lightning supports exactly one optimizer from configure_optimizers(); "
                f"{type(module).__name__} configured {n_opt}"
            )
        if getattr(trainer, "overfit_batches", 0):
            raise OnTheFlyError(
                "attach_lightning does not support Trainer(overfit_batches=...): OnTheFly owns the "
                "train data order; use a Subset of the dataset instead"
            )

    def _own_train_data(self, trainer: pl.Trainer) -> None:
        """Make Lightning's fit loop request its train loader through us, and request it now.

        The fit loop's data source is where Lightning asks for the train loader (a loader
        passed to fit, the module's or the datamodule's `train_dataloader()`); wrapping it
        covers all three. Requesting it here rather than after the sanity check gives the
        Hello its dataset size and lets a resume start the epoch at the right batch.
        """
        source = trainer.fit_loop._data_source
        orig = source.dataloader
        self._source, self._source_orig = source, orig

        def owned() -> Any:
            return self._own(orig())

        source.dataloader = owned  # type: ignore[method-assign]
        trainer.fit_loop.setup_data()
        if self.order is None:
            raise OnTheFlyError(
                "Lightning did not request a train dataloader (limit_train_batches=0, or no "
                "training_step?); OnTheFly needs one to train"
            )

    def _own(self, loader: Any) -> DataLoader:
        if not isinstance(loader, DataLoader):
            raise OnTheFlyError(
                f"attach_lightning needs the train data as one torch DataLoader; got {type(loader).__name__} "
                "(lists, dicts and CombinedLoader of train loaders are not supported)"
            )
        if isinstance(loader.dataset, IterableDataset):
            raise OnTheFlyError(
                "attach_lightning needs a map-style train dataset (with __len__ and __getitem__): "
                "OnTheFly records the loss of every sample by its position, which an IterableDataset does not have"
            )
        order = EpochOrder(loader, self.seed, self.subset)
        if self.order is not None and order.n != self.order.n:
            raise OnTheFlyError(
                f"the reloaded train dataloader has {order.n} samples, the first had {self.order.n}; "
                "OnTheFly needs a fixed training set (reload_dataloaders_every_n_epochs with a changing dataset is not supported)"
            )
        self.order = order
        self.source_loader = loader
        sampler = _OwnedBatchSampler(order, lambda: (self.epoch, self.batch), self.issued)
        self.n_batches = sampler.n_batches
        return _own_loader(
            loader, sampler, lambda: epoch_seed(self.seed, self.epoch), _Cursor(self)
        )

    def _connect(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        env = self.env
        assert env is not None and self.source_loader is not None
        import lightning

        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        config = {
            "framework": "lightning",
            "lightning_version": lightning.__version__,
            "project": self.opts.project,
            "run_name": self.opts.run_name,
            "max_epochs": max_epochs,
            "max_steps": max(0, trainer.max_steps),
            "do_test_after": self.opts.do_test_after,
            "val_every_n_epochs": trainer.check_val_every_n_epoch or 0,
            "seed": self.seed,
            "checkpoint_every_n_steps": self.opts.checkpoint_every_n_steps,
            "checkpoint_min_interval_s": self.opts.checkpoint_min_interval_s,
            "grad_clip": float(trainer.gradient_clip_val or 0.0),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "device": str(module.device),
            "model_factory": self.att.model_factory is not None,
        }
        if self.opts.val_slices is not None:
            config["val_slices"] = describe_val_slices(self.opts.val_slices)
        n_params = sum(p.numel() for p in module.parameters())
        hello = pb.Hello(
            role=ROLE_TO_PB[env.role],
            pid=os.getpid(),
            run_id=self.run_id,
            project=self.opts.project,
            run_name=str(self.spec.get("name", self.opts.run_name)),
            dataset_size=dataset_size(self.source_loader),
            steps_per_epoch=self.n_batches,
            max_epochs=max(0, max_epochs),
            max_steps=self.budget or max(0, trainer.max_steps),
            config_json=json.dumps(config),
            model_summary=f"{type(module).__name__} ({n_params:,} parameters)",
            device=str(module.device),
            data_fingerprint=data_fingerprint(self.source_loader),
            resumed_step=self.step if self._restore_kind == "resume" else 0,
            protocol_version=PROTOCOL_VERSION,
            framework="lightning",
        )
        self.conn = connect(env, hello)
        welcome = self.conn.welcome
        assert welcome is not None
        self.flush_s = welcome.flush_interval_s
        self.hb_s = welcome.heartbeat_interval_s
        # A replay (role=health) reports only its verdict: its steps are not the run's.
        send = self.conn.send_bulk if not self.replay_steps else _drop
        self.rec = Recorder(send, self.run_id, module.device, self.flush_s)
        self.rec.hand_off_at_backward = True  # on_before_backward calls rec.before_backward()
        self.conn.start_heartbeat(self.hb_s, lambda: self.step, watch=True)

    def _restore(
        self, trainer: pl.Trainer, module: pl.LightningModule, state: dict[str, Any]
    ) -> None:
        opt = trainer.optimizers[0]
        rank = int(self.spec.get("adapters_rank", 0) or 0)
        script_lrs = recipe.start_lrs(opt)
        if self._restore_kind == "resume" and rank > 0 and state.get("adapters"):
            self._restore_adapters(module, opt, state, rank)
        else:
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        if self._restore_kind == "fork":
            restarted = recipe.apply_fork_recipe(  # as in the Trainer
                opt,
                [cfg.scheduler for cfg in trainer.lr_scheduler_configs],
                self.spec,
                script_lrs,
                int(state["counters"]["step"]),
            )
            if restarted:
                self._log(restarted, "warning")
            if rank > 0:
                names = mm.add_adapters(module, rank, skip_small=True)
                if not names:
                    raise OnTheFlyError("--adapters: the model has no nn.Linear layers to adapt")
                # The user's optimizer object stays (Lightning and the lr schedulers hold it);
                # its groups, with their lr/wd multiplied, now hold the adapters.
                how = recipe.train_adapters(opt, module)
                self.adapters = True
                self._log(
                    f"fork trains rank-{rank} adapters on {len(names)} linear layer(s); {how}"
                )
            self._log(
                f"fork started from {self._restore_path} (parent step {state['counters']['step']})"
            )
            return
        lit = state.get("lightning") or {}
        scheds = lit.get("lr_schedulers")
        if scheds is None and state.get("scheduler") is not None:
            scheds = [state["scheduler"]]
        for cfg, sd in zip(trainer.lr_scheduler_configs, scheds or [], strict=False):
            cfg.scheduler.load_state_dict(sd)
        if state.get("scaler"):
            trainer.precision_plugin.load_state_dict(state["scaler"])
        loops = lit.get("loops")
        if loops is not None:
            trainer.fit_loop.load_state_dict(loops["fit_loop"])
        else:
            self._log(
                f"{self._restore_path} has no Lightning loop state (not written by attach_lightning); "
                "Lightning's epoch counters start from 0",
                "warning",
            )
        self._log(
            f"resumed from {self._restore_path} at step {self.step} (epoch {self.epoch + 1}, "
            f"{self.batch} batch(es) into it)"
        )

    def _restore_adapters(
        self,
        module: pl.LightningModule,
        opt: torch.optim.Optimizer,
        state: dict[str, Any],
        rank: int,
    ) -> None:
        """Resume a fork that trains adapters (a race variant promoted to its next rung): the
        frozen base weights from the parent checkpoint, buffers from this one, then the
        adapters and the optimizer state (which has the adapters' parameter group)."""
        parent = ckpt.load(
            os.path.join(self.env.session_dir, str(self.spec["checkpoint"])),  # type: ignore[union-attr]
            map_location="cpu",
            expected_sha256=None,
        )
        mm.restore_adapters(module, rank, parent["model"], state)
        recipe.train_adapters(opt, module)  # the groups as the fork's start made them
        opt.load_state_dict(state["optimizer"])
        self.adapters = True

    def on_train_start(self) -> None:
        if not self.active:
            return
        if self.replay_steps:
            self._t_prev = self._t_epoch = time.perf_counter()
            return
        self._check_early_stop_setup()
        if self._restore_kind == "fork":
            # The slice loss before any fork step (the parent's weights), so the fork's gain
            # is measured like with like: slice:self at its end vs here (not for a fork on
            # all the data, such as the matched-compute baseline).
            ld, src, subset = self._slice_loader(), self.source_loader, self.subset
            whole = subset is None or src is None or subset.size >= dataset_size(src)
            if ld is not None and not whole:
                start = self.evaluate(ld, "slice:self")
                if self.early is not None and self.early.metric == "slice":
                    self.early.start(self.step, float(start["loss"]))
        self._early_stop_start()
        self._status(pb.WORKER_STATE_RUNNING, "training")
        self._poll()
        self._t_prev = self._t_epoch = time.perf_counter()

    # -- per batch -------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any) -> None:
        if not self.active:
            return
        self._t_data = time.perf_counter()
        if not self.issued:
            raise OnTheFlyError(
                "internal: Lightning delivered a train batch that OnTheFly's sampler did not issue; "
                "is the train dataloader being replaced after fit started?"
            )
        ids = self.issued.popleft()
        x, y = split_batch(batch)
        n = batch_len(x)
        if n and n != len(ids):
            raise OnTheFlyError(
                f"the train batch has {n} samples but its sampler issued {len(ids)} ids; a collate_fn or "
                "on_before_batch_transfer that changes the batch size is not supported"
            )
        self._ids, self._inputs, self._target, self._n = ids, x, y, n or len(ids)
        self._per = None
        self._cls = None
        self._gnorm = math.nan
        self._phase = "train"

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: per-sample loss from the output the training step itself produced."""
        phase = self._phase
        if phase not in ("train", "val") or (phase == "train" and self._per is not None):
            return  # not a step we record, or a second forward in the same step
        per = self._per_sample(output)
        if phase == "val":
            self._accumulate_val(output, per)
            self._phase = "val-done"
        else:
            self._per = per
            self._cls = Recorder.classification(prediction_of(output), self._target)

    def _per_sample(self, output: Any) -> torch.Tensor:
        out = prediction_of(output)
        try:
            with torch.no_grad():
                _, per = self.loss(out.detach(), self._target, self._n)
        except OnTheFlyError:
            raise
        except Exception as e:
            raise OnTheFlyError(
                f"loss_fn could not be applied to the output of {type(self.module).__name__}.forward "
                f"(shape {tuple(out.shape)}) and the batch target: {type(e).__name__}: {e}. OnTheFly "
                "computes loss_fn(self(x), y) with reduction='none'; pass the loss that training_step "
                "applies to self(x)"
            ) from e
        return per

    def on_before_backward(self) -> None:
        self._fallback_forward()
        if self.rec is not None:
            self.rec.before_backward()  # a due flush is packed while backward runs

    def _fallback_forward(self) -> None:
        """No forward hook fired in this training step: fall back to one eval-mode forward.

        Eval mode and a preserved RNG keep this extra forward from changing training
        (no dropout draw, no BatchNorm statistics update); the weights are still the ones
        the step's own forward used.
        """
        if self._phase != "train" or self._per is not None:
            return
        module = self.module
        if not self._warned_fallback:
            self._warned_fallback = True
            self._log(
                f"{type(module).__name__}.training_step does not call self(...), so per-sample losses "
                "come from one extra eval-mode forward per step; call self(x) in training_step to "
                "record them from the training forward at no extra cost",
                "warning",
            )
        was = module.training
        self._phase = None
        try:
            with torch.no_grad(), preserved_rng():
                module.eval()
                out = module(self._inputs)
        finally:
            module.train(was)
            self._phase = "train"
        self._per = self._per_sample(out)
        self._cls = Recorder.classification(prediction_of(out), self._target)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The total gradient norm the step uses: after AMP unscaling, before clipping."""
        if self.active:
            self._gnorm = self._grad_norm(optimizer)

    @staticmethod
    def _grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | float:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return math.nan
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def on_train_batch_end(self, outputs: Any) -> None:
        if not self.active or self._phase is None:
            return
        assert self.rec is not None and self.conn is not None and self._ids is not None
        trainer = self.trainer
        self._phase = None
        per = self._per
        if (
            per is None
        ):  # the step was skipped before any forward (training_step returned None early)
            per = torch.full((len(self._ids),), math.nan)
        loss: torch.Tensor
        raw = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(raw, torch.Tensor):
            loss = raw.detach() * trainer.accumulate_grad_batches
        else:
            loss = per.float().mean()
        if not isinstance(self._gnorm, torch.Tensor):
            # No optimizer step on this batch (gradient accumulation): report the norm of the
            # gradient accumulated so far rather than NaN, which reads as a numerical problem.
            self._gnorm = self._grad_norm(trainer.optimizers[0])
        self.step += 1
        self.sample_steps += self._n
        b = self.batch
        self.batch += 1
        t_end = time.perf_counter()
        self.step_ms.append((t_end - self._t_prev) * 1000.0)
        self.data_ms.append((self._t_data - self._t_prev) * 1000.0)
        self.rec.record(
            self.step,
            self.epoch,
            b,
            self._ids,
            per,
            loss,
            float(trainer.optimizers[0].param_groups[0]["lr"]),
            self._gnorm,
            (t_end - self._t_prev) * 1000.0,
            (self._t_data - self._t_prev) * 1000.0,
            self._extras(trainer),
            cls=self._cls,
        )
        self._t_prev = t_end
        self._per = self._inputs = self._target = self._cls = None
        if self.replay_steps:
            self.replayed += 1
            if self.replayed >= self.replay_steps:
                self._request_stop("")
            return
        every = self.opts.checkpoint_every_n_steps
        if every and self.step % every == 0:
            self._checkpoint("cadence")
        if self.budget and self.step >= self.budget:
            self._request_stop("")
        elif self.rung_stop and self.step >= self.rung_stop:
            # A raced variant stops at its rung to be compared with the others (variants.py).
            self._request_stop(
                f"race rung at step {self.rung_stop}: waiting for the other variants"
            )
        elif self.early is not None and self.early.due(self.step) and not self.stopping:
            self._early_stop_check()
        if self.conn.commands:
            self.rec.flush()
            self._poll()
            self._t_prev = time.perf_counter()

    @staticmethod
    def _extras(trainer: pl.Trainer) -> dict[str, float]:
        """Every scalar the module logged with `self.log`, as one host copy."""
        keys: list[str] = []
        vals: list[torch.Tensor] = []
        plain: dict[str, float] = {}
        for k, v in trainer.callback_metrics.items():
            if isinstance(v, torch.Tensor):
                if v.numel() == 1:
                    keys.append(str(k))
                    vals.append(v.detach().reshape(()).float())
            elif isinstance(v, (int, float)):
                plain[str(k)] = float(v)
        if vals:
            dev = vals[0].device  # one device-to-host copy for all of them
            plain.update(
                zip(keys, torch.stack([t.to(dev) for t in vals]).cpu().tolist(), strict=True)
            )
        return plain

    # -- epochs and validation ---------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        if not self.active:
            return
        assert self.rec is not None and self.conn is not None
        if self.stopping and self.batch < self.n_batches:
            return  # a stop mid-epoch: the epoch did not end (the final checkpoint says where we are)
        if self.replay_steps:
            self.epoch, self.batch = self.epoch + 1, 0
            return
        conn, run_id, epoch, step = self.conn, self.run_id, self.epoch, self.step
        seconds = time.perf_counter() - self._t_epoch
        # Sent by the recorder's thread after the epoch's last losses, in the same sample
        # feed (no wait here, and no stream message to wake anyone).
        self.rec.end_epoch(
            lambda mean: conn.send_bulk(
                epoch_end=pb.EpochEnd(
                    run_id=run_id, epoch=epoch, step=step, train_loss=mean, seconds=seconds
                )
            )
        )
        self.epoch += 1
        self.batch = 0
        self._t_epoch = time.perf_counter()
        if self.epoch_ckpt.due(epoch):
            self._checkpoint("epoch")

    def on_validation_batch_start(self, batch: Any) -> None:
        if not self.active or self.trainer.sanity_checking:
            return
        try:
            x, y = split_batch(batch)
        except OnTheFlyError:
            return  # a val batch without (inputs, target): the module's own val metrics still flow
        self._target, self._n = y, batch_len(x)
        self._phase = "val"
        self._per = None
        if self.opts.val_slices:
            if self._slice_sums is None:
                self._slice_sums = sl.SliceSums(self.opts.val_slices)
            self._val_masks = self._slice_sums.masks(x, y, self._n)

    def on_validation_batch_end(self) -> None:
        activity.tick()
        if self._phase in ("val", "val-done"):
            self._phase = None
            self._target = None
        self._val_masks = {}  # a batch whose validation_step never called self(...) counts nowhere

    def _accumulate_val(self, output: Any, per: torch.Tensor) -> None:
        self._val_sum += float(per.float().sum())
        self._val_count += int(per.numel())
        out, y = prediction_of(output), self._target
        hit: torch.Tensor | None = None
        if (
            self._val_classif
            and out.dim() == 2
            and isinstance(y, torch.Tensor)
            and y.dim() == 1
            and not y.is_floating_point()
        ):
            hit = out.argmax(dim=1) == y
            self._val_correct += int(hit.sum())
        else:
            self._val_classif = False
        if self._slice_sums is not None:
            self._slice_sums.add(self._val_masks, per, hit)
            self._val_masks = {}

    def on_validation_epoch_end(self) -> None:
        if not self.active or self.trainer.sanity_checking:
            return
        assert self.conn is not None
        count, total, correct = self._val_count, self._val_sum, self._val_correct
        classif = self._val_classif
        sums, self._slice_sums, self._val_masks = self._slice_sums, None, {}
        self._val_sum, self._val_count, self._val_correct, self._val_classif = 0.0, 0, 0, True
        slices = self.opts.val_slices
        if count:
            loss = total / count
            acc = correct / count if classif else math.nan
            if slices:
                assert sums is not None
                self._report_slices(sums.results(classif))
        else:
            if slices and self._slices_without_hook():
                return
            logged = self.trainer.callback_metrics.get("val_loss")
            if not isinstance(logged, torch.Tensor):
                return
            loss, acc = float(logged), math.nan
        report_eval(self.conn, self.run_id, "val", self.step, self.epoch, (loss, acc, count))

    def _report_slices(self, predicates: dict[str, sl.Result]) -> None:
        """Report `val_slice:<name>` for every slice (before the overall `val`, as the
        Trainer does): predicate slices from Lightning's own validation batches, position
        slices from a small pass over those positions of the val loader."""
        assert self.conn is not None and self.opts.val_slices
        slices = self.opts.val_slices
        self._write_train_selections()
        results = dict(predicates)
        if any(not callable(v) for v in slices.values()):
            # Positions are in the set Lightning just validated, else in attach's val_loader.
            vals = self.trainer.val_dataloaders
            loader = vals if isinstance(vals, DataLoader) else self.val_loader
            if loader is None:
                raise OnTheFlyError(
                    "attach_lightning(val_slices=...) names validation-set positions, which needs "
                    "one val DataLoader: pass trainer.fit(model, train, val_loader) or "
                    "attach_lightning(val_loader=...)"
                )
            module = self.module
            with self._unrecorded():
                results.update(
                    sl.evaluate_positions(
                        module,
                        loader,
                        self.loss,
                        module.device,
                        slices,
                        forward=self._prediction,
                        context=self.trainer.precision_plugin.forward_context,
                    )
                )
        for name in slices:
            report_eval(
                self.conn, self.run_id, f"val_slice:{name}", self.step, self.epoch, results[name]
            )

    def _slices_without_hook(self) -> bool:
        """Lightning validated but no forward hook saw a validation output (validation_step
        does not call self(...)): evaluate `val` and the slices in one extra pass over the
        val loader. False when there is no single val loader to do that with."""
        loader = self._val_loader()
        if not self._warned_slices:
            self._warned_slices = True
            self._log(
                f"{type(self.module).__name__}.validation_step does not call self(...), so "
                + (
                    "val_slices come from one extra pass over the val loader per validation; "
                    "call self(x) in validation_step to take them from Lightning's own pass"
                    if loader is not None
                    else "val_slices cannot be evaluated (no single val DataLoader for an extra "
                    "pass): call self(x) in validation_step or pass attach_lightning(val_loader=...)"
                ),
                "warning",
            )
        if loader is None:
            return False
        self.evaluate(loader, "val")
        return True

    def _write_train_selections(self) -> None:
        """Once per process (the main run only): the training positions of each predicate
        slice, `slices/<name>.train.npy`, which automode forks a specialist on."""
        if self._slices_written or self.env is None or self.env.role != "train":
            return
        self._slices_written = True
        assert self.opts.val_slices is not None and self.source_loader is not None
        sizes = sl.write_train_selections(
            self.source_loader, self.opts.val_slices, self.env.session_dir
        )
        if sizes:
            self._log(
                "val slices in the training set: "
                + ", ".join(f"{k} {n} samples" for k, n in sizes.items())
            )

    # -- commands --------------------------------------------------------------------------
    def _request_stop(self, reason: str) -> None:
        """Stop at this batch boundary, even if the trainer's min_epochs/min_steps are not met."""
        tr = self.trainer
        self.stopping = True
        if reason:
            self.stop_reason = reason
        tr.fit_loop.min_epochs = 0
        tr.fit_loop.epoch_loop.min_steps = None
        tr.should_stop = True

    # CommandLoop hooks
    def _health(self, cmd: Command) -> None:
        """The live health checks (numerics, gradients, activations, data, throughput) on the
        module, as for Trainer runs: read-only on the weights, the RNG and the data order.
        (Determinism is the supervisor's: two side-process replays, lightning_health.py.)"""
        assert self.conn is not None
        if self.source_loader is None or self.order is None:
            self.conn.ack(cmd.command_id, False, "the run has no train loader yet")
            return
        plugin = self.trainer.precision_plugin
        with self._unrecorded():  # the checks' forward passes are not training samples
            self._health_on(
                cmd,
                self.source_loader,
                self.module,
                loss=self.loss,
                optimizer=self.trainer.optimizers[0],
                device=self.module.device,
                autocast=plugin.forward_context,
                scaler=getattr(plugin, "scaler", None),
                order=self.order,
                epoch=self.epoch,
                seed=self.seed,
                data_wait_ms=list(self.data_ms),
                step_ms=list(self.step_ms),
                side_copy=self._side_copy,
            )

    def _side_copy(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Independent copies of the live module and optimizer for side work (the
        throughput check's timed steps): a fresh model (model_factory or a copy without
        the trainer and OnTheFly's hooks) with the live weights, and an optimizer of the
        same type over it with the live optimizer's groups and state."""
        live, opt = self.module, self.trainer.optimizers[0]
        m = self.att.fresh_model().to(live.device)
        m.load_state_dict(live.state_dict())
        twin = dict(zip((id(p) for p in live.parameters()), m.parameters(), strict=True))
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [twin[id(p)] for p in g["params"]],
            }
            for g in opt.param_groups
        ]
        copy_opt = recipe.optimizer_like(opt, groups)
        copy_opt.load_state_dict(opt.state_dict())
        return m, copy_opt

    def _embed_source(self) -> tuple[nn.Module, DataLoader, torch.device | str] | None:
        """The live module and the user's train loader: sample ids are positions in its
        dataset, as for the per-sample losses."""
        if self.source_loader is None:
            return None
        return self.module, self.source_loader, self.module.device

    def _embed(self, cmd: Command) -> None:
        with self._unrecorded():  # OnTheFly's own forward passes are not training samples
            super()._embed(cmd)

    def _eval_loader(self, split: str) -> DataLoader | None:
        return self.test_loader if split == "test" else self._val_loader()

    def _run_eval(self, loader: DataLoader, split: str) -> dict[str, Any]:
        return self.evaluate(loader, split)

    def _param_groups(self) -> list[dict[str, Any]]:
        return self.trainer.optimizers[0].param_groups

    def _set_grad_clip(self, value: float) -> None:
        self.trainer.gradient_clip_val = value or None

    def _val_loader(self) -> DataLoader | None:
        if self.val_loader is not None:
            return self.val_loader
        vals = self.trainer.val_dataloaders
        return vals if isinstance(vals, DataLoader) else None

    # -- evaluation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _unrecorded(self) -> Iterator[None]:
        """OnTheFly's own evaluation passes: the forward hook must not record them."""
        phase, self._phase = self._phase, None
        try:
            yield
        finally:
            self._phase = phase

    def _prediction(self, x: Any) -> torch.Tensor:
        return prediction_of(self.module(x))

    def evaluate(self, loader: DataLoader, split: str) -> dict[str, Any]:
        """Loss (and accuracy for classification) of the live module on `loader`, RNG untouched."""
        assert self.conn is not None
        self._evaluated[split] = self.step
        module = self.module
        slices = self.opts.val_slices if split == "val" else None
        if slices:
            self._write_train_selections()
        ctx = self.trainer.precision_plugin.forward_context
        per: dict[str, sl.Result] = {}
        with self._unrecorded():
            if slices:
                result, per = sl.evaluate_with_slices(
                    module,
                    loader,
                    self.loss,
                    module.device,
                    slices,
                    context=ctx,
                    forward=self._prediction,
                )
            else:
                result = evaluate_model(
                    module, loader, self.loss, module.device, forward=self._prediction, context=ctx
                )
        for name, res in per.items():  # before the overall loss, as in the Trainer
            report_eval(self.conn, self.run_id, f"val_slice:{name}", self.step, self.epoch, res)
        return report_eval(self.conn, self.run_id, split, self.step, self.epoch, result)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The native checkpoint, plus what Lightning needs to continue its own loop."""
        import lightning

        trainer, module = self.trainer, self.module
        scheds = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        scaler = trainer.precision_plugin.state_dict()
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "framework": "lightning",
            "run_id": self.run_id,
            "role": self.env.role if self.env else "train",
            # Adapters folded in: the plain module's keys; the factors are kept beside them.
            "model": mm.folded_state_dict(module) if self.adapters else module.state_dict(),
            "adapters": mm.saved_adapters(module) if self.adapters else None,
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": scheds[0] if scheds else None,
            "scaler": scaler or None,
            "rng": ckpt.capture_rng(),
            "cursor": {"epoch": self.epoch, "batch": self.batch, "seed": self.seed},
            "counters": {"step": self.step, "sample_steps": self.sample_steps},
            "config": json.loads(json.dumps(self._config_dict())),
            "spec": self.spec,
            "lightning": {
                "version": lightning.__version__,
                "loops": {"fit_loop": trainer.fit_loop.state_dict()},
                "lr_schedulers": scheds,
                "global_step": int(trainer.global_step),
                "current_epoch": int(trainer.current_epoch),
            },
        }

    def _config_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "framework": "lightning",
            "project": self.opts.project,
            "run_name": self.opts.run_name,
            "do_test_after": self.opts.do_test_after,
            "seed": self.seed,
            "checkpoint_every_n_steps": self.opts.checkpoint_every_n_steps,
            "checkpoint_min_interval_s": self.opts.checkpoint_min_interval_s,
        }
        if self.opts.val_slices is not None:
            out["val_slices"] = describe_val_slices(self.opts.val_slices)
        return out

    def _checkpoint(self, reason: str, wait: bool = False) -> str:
        assert self.conn is not None and self.env is not None
        self.epoch_ckpt.checkpointed()
        state = self.state_dict()
        rel = os.path.join("checkpoints", self.run_id, f"step-{self.step:08d}.pt")
        path = os.path.join(self.env.session_dir, rel)
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "reason": reason,
            "rel": rel,
        }
        conn, run_id = self.conn, self.run_id
        step, epoch, batch = self.step, self.epoch, self.batch

        rec = self.rec
        # This step's losses too: a resume from this checkpoint starts after them.
        handed = rec.hand_off() if rec is not None else 0

        def done(saved: ckpt.SavedCheckpoint | None, err: BaseException | None) -> None:
            if rec is not None:
                rec.wait_sent(handed)  # after the metrics and losses recorded before it
            if saved is not None:
                conn.send(
                    checkpoint=pb.CheckpointSaved(
                        run_id=run_id,
                        path=rel,
                        sha256=saved.sha256,
                        step=step,
                        epoch=epoch,
                        batch=batch,
                        reason=reason,
                        bytes=saved.nbytes,
                    )
                )
            else:
                conn.send(log=pb.LogLine(level="error", text=f"checkpoint {rel} failed: {err}"))

        self.writer.submit_live(state, path, meta, done)
        if wait:
            self.writer.wait()
            if self.writer.error is not None:
                err, self.writer.error = self.writer.error, None
                raise OnTheFlyError(f"could not write checkpoint {rel}: {err}") from err
        self.last_checkpoint = rel
        return rel

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Test if asked, report (forks), write the final checkpoint and say RunFinished."""
        if not self.active or self.replay_steps:
            return  # a replay reports from the fit wrapper (lightning_health.report_replay)
        assert self.conn is not None and self.rec is not None
        self._phase = None
        self.rec.flush()
        # The trained weights are safe before any evaluation (a failing test set loses
        # nothing; `onthefly resume` then runs only the test pass).
        self._checkpoint("stop" if self.stop_reason else "final", wait=True)
        if self.run_test_on_stop and self.test_loader is not None:
            loader = self.test_loader
            self._test_after_training(lambda: self.evaluate(loader, "test"), self.last_checkpoint)
        if self.env is not None and self.env.role == "fork":
            self._fork_reports()
        stopped = bool(self.stop_reason)
        self.status = "stopped" if stopped else "completed"
        self.conn.send(
            finished=pb.RunFinished(
                run_id=self.run_id,
                status=pb.RUN_STATUS_STOPPED if stopped else pb.RUN_STATUS_COMPLETED,
                step=self.step,
                epoch=self.epoch,
                final_checkpoint=self.last_checkpoint,
                summary_json=json.dumps(
                    {
                        "sample_steps": self.sample_steps,
                        "global_step": int(self.trainer.global_step),
                        **({"early_stop": self.early_stopped} if self.early_stopped else {}),
                    }
                ),
            )
        )
        self.finished = True

    def _slice_loader(self) -> DataLoader | None:
        """The fork's own slice: the train data restricted to its selection, in order."""
        if self.subset is None or self.source_loader is None:
            return None
        bs = self.order.batch_size if self.order else None
        return selection_loader(self.source_loader, self.subset, bs)

    def _fork_reports(self) -> None:
        """A fork reports its loss on its own slice (train data restricted to it) and on val
        (not twice at one step: an early-stop check may have just measured it)."""
        ld = self._slice_loader()
        if ld is None:
            return
        if self._evaluated.get("slice:self") != self.step:
            self.evaluate(ld, "slice:self")
        val = self._val_loader()
        if val is not None and self._evaluated.get("val") != self.step:
            self.evaluate(val, "val")

    def _check_early_stop_setup(self) -> None:
        """Say how the fork stops early, or refuse a setup where it cannot (as the Trainer)."""
        es = self.early
        if es is None:
            return
        if es.metric == "val" and self._val_loader() is None:
            raise OnTheFlyError(
                "--early-stop-metric val: the fork has no val dataloader (attach_lightning("
                "val_loader=...) or trainer.fit(..., val_dataloaders=...)); use the default "
                "(slice) or give it one"
            )
        when = (
            f"once the race sends it on to the full budget (now training to rung step "
            f"{self.rung_stop})"
            if self.rung_stop
            else f"from step {self.step}"
        )
        self._log(
            f"early stopping on the {es.metric} loss every {es.every} steps, patience "
            f"{es.patience}, min delta {es.min_delta:g}, {when}"
        )

    def _early_stop_start(self) -> None:
        """The metric where early stopping starts is its first best (as in the Trainer):
        the slice loss just reported before the first step, else measured here, unreported."""
        es = self.early
        if es is None or self.rung_stop or es.best is not None:
            return
        loader = self._slice_loader() if es.metric == "slice" else self._val_loader()
        if loader is None:
            return
        module = self.module
        with self._unrecorded():
            loss, _, _ = evaluate_model(
                module,
                loader,
                self.loss,
                module.device,
                forward=self._prediction,
                context=self.trainer.precision_plugin.forward_context,
            )
        es.start(self.step, loss)

    def _early_stop_check(self) -> None:
        """Evaluate the early-stop metric on its cadence and stop the fork (completed) when
        it has run out of patience; not while a raced variant trains to a rung."""
        es = self.early
        if es is None or self.rung_stop:
            return
        assert self.rec is not None
        self.rec.flush()  # the step's metrics before its evaluation
        loader = self._slice_loader() if es.metric == "slice" else self._val_loader()
        if loader is None:
            return
        value = float(self.evaluate(loader, es.split)["loss"])
        if es.update(self.step, value):
            self.early_stopped = es.summary()
            self._log(es.describe())
            self._request_stop("")

    def stopped_by_sigterm(self, exc: BaseException) -> bool:
        """Lightning's own SIGTERM handler raises SIGTERMException at the next batch; after
        ours (graceful_signals) has asked for the stop, that is the stop, not a failure."""
        return bool(self.interrupted) and type(exc).__name__ == "SIGTERMException"

    def on_exception(self, exc: BaseException) -> None:
        if self.conn is None or self.finished:
            return
        if self.stopped_by_sigterm(exc):
            # `python train.py` got SIGTERM: a stopped run with its checkpoint, not a failure.
            with contextlib.suppress(Exception):
                self.finish()
                return
        if self.rec is not None:
            with contextlib.suppress(Exception):
                self.rec.flush()
        self.conn.send_error(exc)
        self.finished = True

    def teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._source is not None:
            self._source.dataloader = self._source_orig
            self._source = None

    # -- the merge role --------------------------------------------------------------------
    def serve_merge(self, fit_args: dict[str, Any]) -> None:
        """role=merge: this process is the merge worker; the model is only a template.

        The merge worker builds a fresh model per checkpoint it loads, through
        `fresh_model()`: the `model_factory` when one was given, else a deep copy (with a
        message naming the fix when the module cannot be copied).
        """
        from onthefly_worker.merge_role import MergeWorker

        env = self.env
        assert env is not None
        train, val = self._merge_loaders(fit_args)
        worker = MergeWorker(
            TrainerConfig(project=self.opts.project, run_name=self.opts.run_name),
            env,
            self.att.model,
            # The merge worker builds its own optimizers per job; Lightning creates the
            # user's only inside fit, so there is none to hand over.
            cast(Any, None),
            self.loss.user,
            train,
            val,
            self.test_loader,
        )
        att = self.att

        def fresh(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
            m = att.fresh_model().to(worker.device)
            if state is not None:
                m.load_state_dict(state)
            m.eval()
            return m

        worker.fresh = fresh  # type: ignore[method-assign]
        worker.serve()
        self.status = "completed"

    def _merge_loaders(self, fit_args: dict[str, Any]) -> tuple[DataLoader, DataLoader | None]:
        """The train and val loaders for the merge worker, which does not run Lightning's fit:
        attach_lightning's, else the ones given to fit, else the datamodule's (set up as fit
        would: prepare_data, setup("fit")), else the module's own dataloader hooks."""
        import lightning.pytorch as pl

        train, val = self.user_train_loader, self.val_loader
        given = fit_args.get("train_dataloaders")
        dm = fit_args.get("datamodule")
        if isinstance(given, pl.LightningDataModule):
            dm, given = given, None
        if train is None and isinstance(given, DataLoader):
            train = given
        if val is None and isinstance(fit_args.get("val_dataloaders"), DataLoader):
            val = fit_args["val_dataloaders"]
        sources: list[Any] = [dm] if isinstance(dm, pl.LightningDataModule) else []
        sources.append(self.att.model)
        for src in sources:
            if train is not None and val is not None:
                break
            if isinstance(src, pl.LightningDataModule):
                src.prepare_data()
                src.setup("fit")
            if train is None:
                with contextlib.suppress(Exception):  # not defined: Lightning raises
                    got = src.train_dataloader()
                    train = got if isinstance(got, DataLoader) else None
            if val is None:
                with contextlib.suppress(Exception):
                    got = src.val_dataloader()
                    val = got if isinstance(got, DataLoader) else None
        if train is None:
            raise OnTheFlyError(
                "the merge worker needs the train data as one DataLoader: pass "
                "attach_lightning(train_loader=...), trainer.fit(model, train_loader), a "
                "datamodule whose train_dataloader() returns one, or define train_dataloader()"
            )
        return train, val

    def close(self) -> None:
        self.teardown()
        self.writer.wait()
        if self.conn is not None:
            self.conn.close()


def train_for_steps(trainer: pl.Trainer, max_steps: int) -> None:
    """Let Lightning's fit loop run until `max_steps` (-1: until OnTheFly stops it) whatever
    the trainer's own limits: no periodic validation or sanity check, no epoch limit, no
    minimum that outlasts the steps (forks' budgets, determinism replays)."""
    trainer.limit_val_batches = 0
    trainer.num_sanity_val_steps = 0
    trainer.fit_loop.max_epochs = -1
    trainer.fit_loop.epoch_loop.max_steps = max_steps
    trainer.fit_loop.min_epochs = 0
    trainer.fit_loop.epoch_loop.min_steps = None


def _drop(**_: Any) -> None:
    """The recorder's sink in a replay: nothing it records is sent."""


# -- the Lightning callback (a class made when Lightning is first needed) ----------------------
_CALLBACK_TYPE: type | None = None


def _callback_type() -> type:
    """The Callback subclass, built on first use so that importing OnTheFly never imports Lightning."""
    global _CALLBACK_TYPE
    if _CALLBACK_TYPE is not None:
        return _CALLBACK_TYPE
    from lightning.pytorch.callbacks import Callback

    class OnTheFlyCallback(Callback):
        """Forwards the Lightning hooks OnTheFly needs to the run's state machine."""

        def __init__(self, run: _LightningRun) -> None:
            self.run = run

        @property
        def state_key(self) -> str:
            return "OnTheFlyCallback"

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.run.on_fit_start(trainer, pl_module)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.run.on_train_start()

        def on_train_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            self.run.on_train_batch_start(batch)

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            self.run.on_before_backward()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.run.on_before_optimizer_step(optimizer)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.run.on_train_batch_end(outputs)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.run.on_train_epoch_end()

        def on_validation_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            self.run.on_validation_batch_start(batch)

        def on_validation_batch_end(
            self,
            trainer: Any,
            pl_module: Any,
            outputs: Any,
            batch: Any,
            batch_idx: int,
            dataloader_idx: int = 0,
        ) -> None:
            self.run.on_validation_batch_end()

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.run.on_validation_epoch_end()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.run.finish()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.run.on_exception(exception)

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.run.teardown()

    _CALLBACK_TYPE = OnTheFlyCallback
    return OnTheFlyCallback


# -- the public entry point --------------------------------------------------------------------
def attach_lightning(
    trainer: Any,
    model: Any,
    project: str = "default",
    run_name: str = "main",
    train_loader: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    test_loader: DataLoader | None = None,
    loss_fn: Any = None,
    do_test_after: bool = False,
    model_factory: Any = None,
    *,
    seed: int | None = None,
    checkpoint_every_n_steps: int = 0,
    checkpoint_min_interval_s: float = 2.0,
    val_slices: dict[str, Any] | None = None,
) -> LightningAttachment:
    """Put a Lightning trainer under OnTheFly; keep calling `trainer.fit(model, ...)` as before.

    `loss_fn` is the loss `training_step` applies to `self(x)` (e.g. `model.loss`): OnTheFly
    re-applies it with `reduction='none'` to the same output for per-sample losses.
    `train_loader`/`val_loader`/`test_loader` are the loaders the dashboard can use (test
    on demand, `do_test_after`); the train data itself is whatever Lightning's fit uses.
    `model_factory` builds a fresh model when one is needed beside the live one: a
    callable, a `(callable, args, kwargs)` tuple, or `{"factory", "args", "kwargs"}`.
    `val_slices` (as for `Trainer`): {name: predicate `fn(inputs, targets) -> bools` or
    validation-set positions}, each reported as `val_slice:<name>` whenever Lightning
    validates (and in on-demand validation and fork reports).
    """
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise OnTheFlyError(
            "attach_lightning needs Lightning 2.x: pip install 'lightning>=2.0' (or use onthefly.Trainer)"
        ) from e
    if not isinstance(trainer, pl.Trainer):
        raise OnTheFlyError(
            f"attach_lightning(trainer=...) must be a lightning.pytorch.Trainer, got {type(trainer).__name__} "
            "(pytorch_lightning 1.x trainers are not supported)"
        )
    if not isinstance(model, pl.LightningModule):
        raise OnTheFlyError(
            f"attach_lightning(model=...) must be a lightning.pytorch.LightningModule, got {type(model).__name__}"
        )
    if not model.automatic_optimization:
        raise OnTheFlyError(
            "attach_lightning supports automatic optimization (one optimizer stepped by Lightning); "
            f"{type(model).__name__} sets automatic_optimization=False, which is not supported yet"
        )
    if loss_fn is None:
        raise OnTheFlyError(
            "attach_lightning(loss_fn=...) is required: the loss training_step applies to self(x), e.g. "
            "model.loss or nn.CrossEntropyLoss(); OnTheFly records it for every sample"
        )
    for name, ld in (
        ("train_loader", train_loader),
        ("val_loader", val_loader),
        ("test_loader", test_loader),
    ):
        if ld is not None and not isinstance(ld, DataLoader):
            raise OnTheFlyError(
                f"attach_lightning({name}=...) must be a torch DataLoader or None, got {type(ld).__name__}"
            )
    if trainer.num_devices != 1 or trainer.num_nodes != 1:
        raise OnTheFlyError(
            f"attach_lightning runs on one device; this trainer has devices={trainer.num_devices}, "
            f"num_nodes={trainer.num_nodes} (use Trainer(devices=1))"
        )
    if getattr(trainer.fit, "_onthefly", False):
        raise OnTheFlyError("attach_lightning was already called on this trainer")
    opts = LightningOptions(
        project=project,
        run_name=run_name,
        do_test_after=bool(do_test_after),
        seed=seed,
        checkpoint_every_n_steps=checkpoint_every_n_steps,
        checkpoint_min_interval_s=checkpoint_min_interval_s,
        val_slices=val_slices,
    )
    att = LightningAttachment(opts, model, normalize_model_factory(model_factory))
    run = _LightningRun(att, trainer, loss_fn, train_loader, val_loader, test_loader)
    att._run = run
    cast(Any, trainer).callbacks.append(_callback_type()(run))
    original_fit = trainer.fit
    used = False

    def fit(*args: Any, **kwargs: Any) -> Any:
        nonlocal used
        if used:
            raise OnTheFlyError(
                "attach_lightning instruments one trainer.fit() per process (one run); "
                "call attach_lightning on a new Trainer for another run"
            )
        used = True
        mark_fit_reached()
        env0 = wenv.WorkerEnv.from_environ()
        if env0 is not None and env0.standby:  # a warm spare: wait here to become a fork
            from onthefly_worker.standby import wait_for_role

            wait_for_role(env0, framework="lightning")
        run.prepare()
        assert run.env is not None
        if run.env.role == "merge":
            bound = inspect.signature(original_fit).bind_partial(*args, **kwargs).arguments
            try:
                run.serve_merge(bound)
            finally:
                run.close()
            raise SystemExit(0)
        if run._restore_kind and kwargs.get("ckpt_path"):
            kwargs["ckpt_path"] = None  # OnTheFly's checkpoint decides where this worker starts
        if run.env.role == "health":
            from onthefly_worker.lightning_health import replay_and_report

            raise SystemExit(replay_and_report(run, lambda: original_fit(*args, **kwargs)))
        selfhosted = bool(os.environ.get("ONTHEFLY_SELFHOSTED")) and run.env.role == "train"
        try:
            # Lightning's own Ctrl+C handling marks the run failed and exits: `python
            # train.py` stops at a step boundary with a checkpoint instead (`onthefly run`'s
            # supervisor does that itself).
            with run.graceful_signals(selfhosted):
                out = original_fit(*args, **kwargs)
            run.finish()  # no-op unless Lightning skipped training (e.g. max_epochs already met)
        except BaseException as e:  # noqa: BLE001 - SIGTERMException is a SystemExit
            if not run.stopped_by_sigterm(e):  # else finished as stopped (on_exception)
                raise
            out = None
        finally:
            run.close()
        att.result = {
            "status": run.status,
            "step": run.step,
            "epoch": run.epoch,
            "checkpoint": run.last_checkpoint,
        }
        run.end_as_interrupted(run.step, run.last_checkpoint)
        if run.env is not None and run.env.role != "train":
            # A fork's job ends with its role; the rest of the script is the generalist's.
            raise SystemExit(0 if run.status == "completed" else 1)
        return out

    fit._onthefly = True  # type: ignore[attr-defined]
    cast(Any, trainer).fit = fit
    return att


__all__ = [
    "LightningAttachment",
    "LightningOptions",
    "ModelFactory",
    "attach_lightning",
    "normalize_model_factory",
    "prediction_of",
]
