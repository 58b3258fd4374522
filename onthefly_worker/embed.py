"""Penultimate-layer embeddings of the training samples, on demand (never per step).

kmeans selections cluster residual features: the loss, the margin and, where the model
has one, the penultimate-layer representation. That representation is taken to be the
input of the model's last `nn.Linear` (in `model.modules()` order), which is what the
classifier / regression head sees. When the supervisor asks (a fork or a slice export
with a kmeans spec), the worker runs the model once over the whole training set in
dataset order, in eval mode and under no_grad, captures that input with a forward hook,
flattens it per sample and projects it to at most `max_dims` dimensions with a fixed,
seeded Gaussian random projection (Johnson-Lindenstrauss: distances are kept up to a
small distortion, which is all k-means needs). The array (n_samples, d) float32, row i =
sample id i, lands atomically in `<session>/samples/<run>/embed-step-NNNNNNNN.npy`.

Training is not disturbed: the model's train/eval mode is restored, every RNG state
(python, numpy, torch CPU and CUDA) is saved and restored, eval mode leaves BatchNorm's
running statistics alone, gradients are not computed, and the data is read by a fresh
sequential loader (num_workers=0) so the training loader's iterator and workers are
untouched.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from onthefly_worker.data import batch_len, split_batch, to_device
from onthefly_worker.evaluation import preserved_rng

MAX_DIMS = 16
"""Default width of the embedding: enough for k-means to see the representation's main
directions, small enough that loss and margin are not drowned out among the features."""

PROJECTION_SEED = 0x0E3BED
"""Seed of the random projection: fixed, so every embedding of a run uses the same one."""


@dataclass
class EmbedResult:
    """What `embed_dataset` produced: `array` is None exactly when `reason` says why."""

    array: np.ndarray | None
    reason: str = ""
    layer: str = ""
    """The name (in named_modules) of the nn.Linear whose input is the embedding."""
    raw_dims: int = 0
    """Width of the flattened representation before projection."""


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's last nn.Linear in `modules()` order, with its name; None if it has none."""
    found: tuple[str, nn.Linear] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    return found


def projection(raw_dims: int, max_dims: int, seed: int = PROJECTION_SEED) -> torch.Tensor | None:
    """(raw_dims, max_dims) Gaussian projection scaled by 1/sqrt(max_dims); None = keep as is.

    Drawn from a private generator, so the global torch RNG is not touched.
    """
    if raw_dims <= max_dims:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(raw_dims, max_dims, generator=g) / float(np.sqrt(max_dims))


def embed_dataset(
    model: nn.Module,
    train_loader: DataLoader,
    device: torch.device | str,
    max_dims: int = MAX_DIMS,
) -> EmbedResult:
    """The penultimate-layer embedding of every sample of `train_loader.dataset`, in order."""
    if max_dims < 1:
        raise ValueError(f"max_dims {max_dims}: must be >= 1")
    found = last_linear(model)
    if found is None:
        return EmbedResult(None, "the model has no nn.Linear layer to take the input of")
    name, head = found
    ds = train_loader.dataset
    if isinstance(ds, IterableDataset):
        return EmbedResult(None, "the training set is an IterableDataset (no sample ids)")
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        return EmbedResult(None, "the training set has no length")
    loader = DataLoader(
        ds,
        batch_size=int(train_loader.batch_size or 1),
        shuffle=False,
        num_workers=0,
        collate_fn=train_loader.collate_fn,
    )
    dev = torch.device(device)
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            captured.append(inputs[0])

    label = name or type(head).__name__
    was_training = model.training
    handle = head.register_forward_pre_hook(hook)
    out: np.ndarray | None = None
    proj: torch.Tensor | None = None
    raw_dims = 0
    row = 0
    try:
        model.eval()
        with preserved_rng(), torch.no_grad():
            for batch in loader:
                x, _ = split_batch(batch)
                b = batch_len(x)
                captured.clear()
                model(to_device(x, dev))
                if not captured:
                    return EmbedResult(
                        None, f"the last nn.Linear ({label}) was not called in forward", label
                    )
                rep = captured[-1]  # a head applied more than once: its last use
                if rep.dim() == 0 or rep.shape[0] != b:
                    return EmbedResult(
                        None,
                        f"the input of the last nn.Linear ({label}) has shape "
                        f"{list(rep.shape)}, not one row per sample of a batch of {b}",
                        label,
                    )
                flat = rep.reshape(b, -1).float()
                if out is None:
                    raw_dims = int(flat.shape[1])
                    proj = projection(raw_dims, max_dims)
                    if proj is not None:
                        proj = proj.to(flat.device)
                    out = np.empty((n, min(raw_dims, max_dims)), dtype=np.float32)
                elif flat.shape[1] != raw_dims:
                    return EmbedResult(
                        None,
                        f"the input of the last nn.Linear ({label}) changes width between "
                        f"batches ({raw_dims} then {int(flat.shape[1])})",
                        label,
                    )
                if proj is not None:
                    flat = flat @ proj
                if row + b > n:
                    return EmbedResult(None, f"the loader yielded more than {n} samples", label)
                out[row : row + b] = flat.cpu().numpy()
                row += b
    finally:
        handle.remove()
        model.train(was_training)
    if out is None or row != n:
        return EmbedResult(None, f"the loader yielded {row} of {n} samples", label)
    return EmbedResult(out, "", label, raw_dims)


def embed_path(run_id: str, step: int) -> str:
    """The session-relative path of a run's embedding at `step`."""
    return os.path.join("samples", run_id, f"embed-step-{step:08d}.npy")


def write_atomic(array: np.ndarray, path: str) -> None:
    """np.save via a temp file + fsync + rename: a reader never sees a partial array."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _drop_older(rdir: str, keep: str) -> None:
    """Keep only the newest embedding of a run: each is n_samples x d floats, and a
    selection only ever reads the newest."""
    for fn in os.listdir(rdir):
        if fn != keep and fn.startswith("embed-step-") and fn.endswith(".npy"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(rdir, fn))


def embed_to_session(
    model: nn.Module,
    train_loader: DataLoader,
    device: torch.device | str,
    session_dir: str,
    run_id: str,
    step: int,
    max_dims: int = MAX_DIMS,
) -> tuple[bool, str, dict[str, Any]]:
    """Embed and write; (ok, message, ack payload) for the supervisor's Embed command."""
    res = embed_dataset(model, train_loader, device, max_dims)
    if res.array is None:
        return False, f"no embedding: {res.reason}", {"reason": res.reason}
    rel = embed_path(run_id, step)
    path = os.path.join(session_dir, rel)
    write_atomic(res.array, path)
    _drop_older(os.path.dirname(path), os.path.basename(path))
    d = int(res.array.shape[1])
    return (
        True,
        f"embedded {res.array.shape[0]} samples: input of {res.layer} "
        f"({res.raw_dims} dims) -> {d} dims",
        {"path": rel, "dims": d, "layer": res.layer, "raw_dims": res.raw_dims, "step": step},
    )
