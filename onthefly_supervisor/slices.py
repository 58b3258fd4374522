"""Slice export: the samples a SPEC selects from a run, as CSV, Parquet or JSON.

One row per selected sample id, from the latest epoch that saw that sample (mid-epoch,
this epoch's samples come from it, the rest from the one before; the same basis a fork
or `onthefly clusters` ranks and clusters, so a spec picks the same samples in all three):

    sample_id    the id (the dataset index the worker reported)
    loss         its most recent loss
    loss_mean    mean over the epochs in which the sample had a finite loss
    epochs_seen  how many epochs that was
    label        the true class (classification), empty where unknown
    prediction   the predicted class in that epoch, empty where unknown
    margin       true-class logit minus the best other logit in that epoch, empty where unknown
    epoch        the epoch the loss, prediction and margin come from

The slice definition (session, run, canonical spec, description, epoch, row count) goes
with the data so a file on its own says what it is: a `<out>.slice.json` sidecar for
CSV (which stays a plain, pandas-readable table), schema metadata for Parquet, and a
top-level `slice` key for JSON (`{"slice": {...}, "rows": [...]}`). Each of the three is a
valid `indices:FILE` for a fork (its sample_id column is read).

Everything is written to a temp file and renamed, so an output path holds either a
complete export or whatever it held before. Supervisor-side: numpy only, plus pyarrow
(lazily) for Parquet.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from onthefly_supervisor.selection import Selection, SelectionSpec, parse_spec, select
from onthefly_supervisor.store import Store

FORMATS = ("csv", "parquet", "json")
COLUMNS = (
    "sample_id",
    "loss",
    "loss_mean",
    "epochs_seen",
    "label",
    "prediction",
    "margin",
    "epoch",
)
SLICE_FORMAT_VERSION = 1
"""Version of the slice definition record; bump when its keys change meaning."""

_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.npy$")
_EMBED_FILE = re.compile(r"^embed-step-(\d+)\.npy$")


def _numbered(folder: str, pattern: re.Pattern[str]) -> list[int]:
    """The numbers of the files in `folder` whose names match `pattern`, sorted."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


@dataclass(frozen=True)
class SliceResult:
    """What export_slice wrote."""

    path: str
    """Absolute path of the data file."""
    rows: int
    """Selected samples written."""
    spec: str
    """The canonical spec that selected them."""
    description: str
    """The selection's human-readable account (as on the dashboard)."""


@dataclass
class RunSamples:
    """A run's per-sample record, all arrays indexed by sample id and of one length."""

    run_id: str
    epoch: int
    """The latest epoch with a loss array."""
    loss: np.ndarray
    """float32, latest epoch; NaN = not seen."""
    loss_mean: np.ndarray
    """float64, mean over epochs with a finite loss; NaN where none."""
    epochs_seen: np.ndarray
    """int64, epochs with a finite loss."""
    labels: np.ndarray | None
    """int64, -1 = unknown; None when the run records no labels."""
    pred: np.ndarray | None
    """int64, latest epoch, -1 = unknown; None when not recorded."""
    margin: np.ndarray | None
    """float32, latest epoch, NaN = unknown; None when not recorded."""
    loss_recent: np.ndarray
    """float32, each sample's most recent loss (the latest epoch that saw it): what
    selections rank and cluster, so a selection mid-epoch still covers every seen sample."""
    epoch_recent: np.ndarray
    """int64, the epoch `loss_recent` comes from; -1 = never seen."""
    margin_recent: np.ndarray | None
    """float32, the margin from that same epoch; None when no margins are recorded."""
    pred_recent: np.ndarray | None
    """int64, the prediction from that same epoch, -1 = unknown; None when not recorded."""


def load_run_samples(session_dir: str, run_id: str) -> RunSamples:
    """Read a run's sample arrays from the session folder (missing optional ones = None).

    The arrays of a run with an unknown dataset size grow while an epoch runs, so they
    may differ in length; shorter ones are padded with "unknown" up to the longest
    rather than refused -- a sample beyond an array's end has simply not been seen there.
    """
    rdir = os.path.join(session_dir, "samples", run_id)
    epochs = _numbered(rdir, _EPOCH_FILE)
    if not epochs:
        raise ValueError(
            f"run {run_id!r} has no per-sample losses yet (no samples/{run_id}/epoch-*.npy)"
        )

    def load(name: str, dtype: type) -> np.ndarray | None:
        path = os.path.join(rdir, name)
        if not os.path.exists(path):
            return None
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1:
            raise ValueError(f"samples/{run_id}/{name} is not 1-D (shape {arr.shape})")
        return np.asarray(arr, dtype=dtype)

    latest = epochs[-1]
    per_epoch: list[np.ndarray] = []
    for e in epochs:
        arr = load(f"epoch-{e:04d}.npy", np.float32)
        assert arr is not None  # listed just above
        per_epoch.append(arr)
    labels = load("labels.npy", np.int64)
    pred = load(f"pred-{latest:04d}.npy", np.int64)
    margin = load(f"margin-{latest:04d}.npy", np.float32)
    n = max(a.size for a in [*per_epoch, *(x for x in (labels, pred, margin) if x is not None)])

    # Sum and count per sample instead of stacking epochs: memory stays O(samples).
    total = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    for arr in per_epoch:
        ok = np.isfinite(arr)
        total[: arr.size] += np.where(ok, arr, 0.0)
        count[: arr.size] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    recent = np.full(n, np.nan, dtype=np.float32)
    recent_epoch = np.full(n, -1, dtype=np.int64)
    # margin / pred of each sample's most recent epoch: (latest epoch's array, dtype, unknown)
    extras: dict[str, tuple[np.ndarray | None, type, float]] = {
        "margin": (margin, np.float32, np.nan),
        "pred": (pred, np.int64, -1),
    }
    recent_extra: dict[str, np.ndarray] = {}
    for e, arr in zip(reversed(epochs), reversed(per_epoch), strict=True):
        # NaN = not seen in that epoch; a non-finite loss it did see stays (not an older one).
        fill = (recent_epoch[: arr.size] < 0) & ~np.isnan(arr)
        if not fill.any():
            continue
        recent[: arr.size][fill] = arr[fill]
        recent_epoch[: arr.size][fill] = e
        for kind, (newest, dtype, unknown) in extras.items():
            x = newest if e == latest else load(f"{kind}-{e:04d}.npy", dtype)
            if x is None:
                continue
            out = recent_extra.setdefault(kind, np.full(n, unknown, dtype=dtype))
            k = min(x.size, arr.size)
            out[:k][fill[:k]] = x[:k][fill[:k]]
    return RunSamples(
        run_id=run_id,
        epoch=latest,
        loss=_pad(per_epoch[-1], n, np.nan),
        loss_mean=mean,
        epochs_seen=count,
        labels=None if labels is None else _pad(labels, n, -1),
        pred=None if pred is None else _pad(pred, n, -1),
        margin=None if margin is None else _pad(margin, n, np.nan),
        loss_recent=recent,
        epoch_recent=recent_epoch,
        margin_recent=recent_extra.get("margin"),
        pred_recent=recent_extra.get("pred"),
    )


def newest_embedding(session_dir: str, run_id: str) -> tuple[str, int] | None:
    """(session-relative path, step) of a run's newest samples/<run>/embed-step-*.npy.

    Workers write these on demand (onthefly_worker/embed.py): the penultimate-layer
    embedding of every training sample, rows indexed by sample id. None when there is none.
    """
    steps = _numbered(os.path.join(session_dir, "samples", run_id), _EMBED_FILE)
    if not steps:
        return None
    return os.path.join("samples", run_id, f"embed-step-{steps[-1]:08d}.npy"), steps[-1]


def load_embedding(session_dir: str, rel: str, n: int) -> np.ndarray:
    """An embedding file as float32 (n, d): rows beyond the file are NaN (imputed by select),
    rows beyond `n` (samples without a loss array entry) are dropped. ValueError when the
    file is not a finite 2-D float array inside the session folder."""
    sdir = os.path.realpath(session_dir)
    path = os.path.realpath(os.path.join(sdir, rel))
    if os.path.commonpath([sdir, path]) != sdir:
        raise ValueError(f"embedding {rel!r} lies outside the session folder")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or arr.shape[1] < 1:
        raise ValueError(f"{rel} is {arr.dtype}{list(arr.shape)}, expected a 2-D float array")
    if arr.shape[0] == n:
        return np.asarray(arr, dtype=np.float32)
    out = np.full((n, arr.shape[1]), np.nan, dtype=np.float32)
    m = min(n, arr.shape[0])
    out[:m] = arr[:m]
    return out


def embedding_features(
    session_dir: str, run_id: str, n: int, fresh: str = "", why: str = ""
) -> tuple[np.ndarray | None, str]:
    """A run's embedding as (n, d) kmeans features, and a note for the selection's
    description ("embedding: ..." or "no embedding (why)").

    `fresh` is a just-written embedding's session-relative path; without it the newest
    saved one is used, and `why` says why there was no fresh one.
    """
    rel = fresh
    if not rel:
        found = newest_embedding(session_dir, run_id)
        if found is None:
            reason = (
                f"{why}; none saved" if why else "the run has no samples/<run>/embed-step-*.npy"
            )
            return None, f"no embedding ({reason})"
        rel = found[0]
    try:
        arr = load_embedding(session_dir, rel, n)
    except (OSError, ValueError) as e:
        return None, f"no embedding ({rel} cannot be read: {e})"
    note = f"embedding: {arr.shape[1]} dims from {rel}"
    return arr, note + (f" (the newest saved: {why})" if why and not fresh else "")


def offline_embedding_note(session_dir: str, run: str) -> str:
    """What a kmeans selection of `run` (id or name) made without a live supervisor clusters
    on, for the CLI to say: with no supervisor nobody can embed the run now, so the newest
    saved embedding is used (and whether it is older than the run's latest checkpoint), or
    none at all."""
    store = Store(os.path.realpath(session_dir), readonly=True)
    try:
        row = store.find_run(run)
        run_id = row.run_id if row is not None else run
        ck = store.latest_checkpoint(run_id)
    finally:
        store.close()
    latest = int(ck["step"]) if ck is not None else None
    found = newest_embedding(session_dir, run_id)
    fork_way = (
        "a fork (or this command while the session is live, e.g. under `onthefly serve`) "
        "embeds the run's latest weights first, so it may pick other samples"
    )
    if found is None:
        return (
            f"no live supervisor: kmeans clustered {run_id} without an embedding (none saved "
            f"in samples/{run_id}/); {fork_way}"
        )
    rel, step = found
    if latest is not None and latest > step:
        return (
            f"no live supervisor: kmeans used the newest saved embedding, {rel} (step {step}; "
            f"{run_id}'s latest checkpoint is step {latest}); {fork_way}"
        )
    return f"no live supervisor: kmeans used the newest saved embedding, {rel} (step {step})"


def _pad(arr: np.ndarray, n: int, fill: float) -> np.ndarray:
    if arr.size == n:
        return arr
    out = np.full(n, fill, dtype=arr.dtype)
    out[: arr.size] = arr
    return out


def select_in_session(
    session_dir: str | os.PathLike[str],
    run: str,
    spec: str | SelectionSpec,
    base_dir: str | os.PathLike[str] | None = None,
    embedding: Callable[[str, int], tuple[np.ndarray | None, str]] | None = None,
    recent: bool = False,
) -> tuple[str, str, str, RunSamples, Selection]:
    """Apply a SPEC to a run of a session on disk: the one selection path of forks,
    export-slice and `onthefly clusters`, so the same spec picks the same samples (and
    numbers the same clusters) in all three. Returns (session dir, run id, run name, the
    run's samples, the selection). Samples are ranked by their loss in the latest epoch,
    or with `recent` (forks, and `onthefly clusters` which previews them) by their most
    recent loss, so a fork made mid-epoch also covers the samples this epoch has not
    reached yet (once an epoch is complete the two agree). kmeans
    clusters on [loss, mean loss over epochs, margin] plus the embedding block, which
    `embedding(run_id, n)` supplies (default: the newest saved one), with the session's
    seed. ValueError for an unknown run or a bad or empty spec; FileNotFoundError when it
    is not a session."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    sdir = os.path.realpath(os.fspath(session_dir))
    if not os.path.isfile(os.path.join(sdir, "session.db")):
        raise FileNotFoundError(f"{sdir} is not an OnTheFly session (no session.db)")
    store = Store(sdir, readonly=True)
    try:
        row = store.find_run(run)
        if row is None:
            known = ", ".join(
                r.run_id if r.name == r.run_id else f"{r.run_id} ({r.name})" for r in store.runs()
            )
            raise ValueError(f"unknown run {run!r}; known runs: {known or '(none)'}")
        run_id, run_name = row.run_id, row.name
        seed = selection_seed(store.get_meta("seed", 0))
    finally:
        store.close()
    if row.kind in ("merge", "moe") and not os.path.isdir(os.path.join(sdir, "samples", run_id)):
        raise ValueError(
            f"run {run_id} is a{'n MoE' if row.kind == 'moe' else ' merge'} of "
            f"{', '.join(row.parents)}: it never trained, so it has no per-sample training "
            "losses; select on one of the runs it was made from"
        )

    data = load_run_samples(sdir, run_id)
    loss, margin = data.loss, data.margin
    if recent:
        loss, margin = data.loss_recent, data.margin_recent
    features = None
    emb = None
    embed_note = ""
    embed_dims = 0
    if parsed.kind == "kmeans":
        # select() already uses the loss as the first feature column; these complete
        # the residual features [loss, loss_mean, margin] (+ the embedding block).
        cols = [data.loss_mean] + ([margin] if margin is not None else [])
        features = np.stack(cols, axis=1)
        if embedding is not None:
            emb, embed_note = embedding(run_id, loss.shape[0])
        else:
            emb, embed_note = embedding_features(sdir, run_id, loss.shape[0])
        if emb is not None:
            embed_dims = int(emb.shape[1])
    sel: Selection = select(
        parsed,
        loss,
        features=features,
        seed=seed,
        base_dir=base_dir,
        labels=data.labels,
        embedding=emb,
    )
    if embed_note:
        sel.description += f"; {embed_note}"
        sel.extra["embedding_dims"] = float(embed_dims)
    return sdir, run_id, run_name, data, sel


def slice_definition(
    sdir: str, run_id: str, run_name: str, epoch: int, sel: Selection
) -> dict[str, Any]:
    """What a slice is: the spec and its description, the run and epoch, and (kmeans) every
    cluster with its size, mean loss and label mix and which one was selected."""
    definition: dict[str, Any] = {
        "format_version": SLICE_FORMAT_VERSION,
        "session_id": os.path.basename(sdir),
        "run": run_id,
        "run_name": run_name,
        "spec": sel.spec,
        "description": sel.description,
        "epoch": epoch,
        "rows": int(sel.indices.size),
        "columns": list(COLUMNS),
        "created": time.time(),
        "n_seen": sel.n_seen,
        "extra": sel.extra,
    }
    if sel.clusters is not None:
        definition["selected_cluster"] = sel.selected_cluster
        definition["clusters"] = [
            {"id": c.id, "size": c.size, "mean_loss": c.mean_loss, "label_mix": c.label_mix}
            for c in sel.clusters
        ]
    return definition


def selection_seed(session_seed: object) -> int:
    """The seed of a selection's k-means: the session's, or 0 for a session run unseeded
    (ONTHEFLY_SEED=none), so the same spec still picks the same samples."""
    text = str(session_seed if session_seed is not None else 0)
    return int(text) if text.isdigit() else 0


def export_slice(
    session_dir: str | os.PathLike[str],
    run: str,
    spec: str,
    fmt: str,
    out_path: str | os.PathLike[str],
    force: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    embedding: Callable[[str, int], tuple[np.ndarray | None, str]] | None = None,
) -> SliceResult:
    """Select samples of `run` (id or name) with `spec` and write them as `fmt`.

    Raises ValueError for an unknown format, an unknown run (naming the known ones), a bad
    or empty spec; FileExistsError when `out_path` (or, for CSV, its sidecar) exists and
    not `force`. `base_dir` resolves a relative `indices:FILE` (default: the current
    directory). kmeans clusters on the loss plus the loss history (loss_mean), when
    recorded the margin, and the run's penultimate-layer embedding from `embedding(run_id,
    n)`: a live supervisor passes the fork's own source (MethodOps.embedding), so the same
    spec picks the same samples; without one, the newest saved samples/<run>/embed-step-*.npy
    (or none; `offline_embedding_note` says which).
    """
    fmt_l = str(fmt).lower()
    if fmt_l not in FORMATS:
        raise ValueError(f"unknown slice format {fmt!r}; use one of {', '.join(FORMATS)}")
    parsed = parse_spec(spec)
    out = os.path.abspath(os.fspath(out_path))
    sidecar = out + ".slice.json"
    targets = [out, sidecar] if fmt_l == "csv" else [out]
    if os.path.isdir(out):
        raise IsADirectoryError(f"{out} is a directory; give the slice's file name")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"folder {os.path.dirname(out)} does not exist")
    if not force:
        for t in targets:
            if os.path.lexists(t):
                raise FileExistsError(
                    f"{t} already exists; overwrite it with --force (force=True from Python)"
                )

    # The same selection as a fork or `onthefly clusters` with this spec: each sample's most
    # recent loss, so mid-epoch every seen sample counts, not only this epoch's.
    sdir, run_id, run_name, data, sel = select_in_session(
        session_dir, run, parsed, base_dir, embedding=embedding, recent=True
    )
    ids = sel.indices
    definition = slice_definition(sdir, run_id, run_name, data.epoch, sel)
    columns = _columns(data, ids)

    if fmt_l == "csv":
        # The sidecar lands first: a CSV on disk then always has its definition beside it.
        _atomic_write(sidecar, lambda f: _write_text(f, json.dumps(definition, indent=2) + "\n"))
        _atomic_write(out, lambda f: _write_csv(f, columns))
    elif fmt_l == "json":
        _atomic_write(out, lambda f: _write_json(f, definition, columns))
    else:
        _atomic_write(out, lambda f: _write_parquet(f, definition, columns))
    return SliceResult(path=out, rows=int(ids.size), spec=sel.spec, description=sel.description)


def read_slice_definition(path: str, fmt: str) -> dict[str, Any]:
    """The slice definition `export_slice` stored with a file it wrote: the CSV's sidecar,
    the JSON's "slice" key (read from the head of the file, not its rows), Parquet's schema
    metadata. ValueError when the file has none."""
    fmt_l = str(fmt).lower()
    try:
        if fmt_l == "csv":
            with open(path + ".slice.json", encoding="utf-8") as f:
                found = json.load(f)
        elif fmt_l == "json":
            with open(path, encoding="utf-8") as f:
                head = f.readline()  # {"slice": {...}, "rows": [   (one line, see _write_json)
            prefix = '{"slice": '
            if not head.startswith(prefix):
                raise ValueError("no leading slice definition")
            found, _ = json.JSONDecoder().raw_decode(head, len(prefix))
        elif fmt_l == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            found = json.loads(meta[b"onthefly.slice"])
        else:
            raise ValueError(f"unknown slice format {fmt!r}; use one of {', '.join(FORMATS)}")
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: no slice definition found ({e})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path}: the slice definition is not a JSON object")
    return found


@dataclass
class _Columns:
    """The selected rows, column by column; masks mark unknown values."""

    sample_id: np.ndarray
    loss: np.ndarray
    loss_mean: np.ndarray
    epochs_seen: np.ndarray
    label: np.ndarray
    label_known: np.ndarray
    prediction: np.ndarray
    prediction_known: np.ndarray
    margin: np.ndarray
    epoch: np.ndarray
    """int64 per row: the epoch its loss, prediction and margin come from."""

    def __len__(self) -> int:
        return int(self.sample_id.size)


def _columns(data: RunSamples, ids: np.ndarray) -> _Columns:
    n = ids.size

    def ints(arr: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if arr is None:
            return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        vals = arr[ids]
        return vals, vals >= 0

    # Each sample's values from the latest epoch that saw it (the loss the selection ranked).
    label, label_known = ints(data.labels)
    pred, pred_known = ints(data.pred_recent)
    margins = data.margin_recent
    margin = margins[ids] if margins is not None else np.full(n, np.nan, np.float32)
    return _Columns(
        sample_id=ids.astype(np.int64),
        loss=data.loss_recent[ids],
        loss_mean=data.loss_mean[ids],
        epochs_seen=data.epochs_seen[ids],
        label=label,
        label_known=label_known,
        prediction=pred,
        prediction_known=pred_known,
        margin=margin,
        epoch=data.epoch_recent[ids],
    )


def _rows(c: _Columns, missing: Any, nonfinite: Callable[[float], Any]) -> Iterator[list[Any]]:
    """Rows as Python values: `missing` for unknowns, `nonfinite(x)` for an Inf loss."""

    def floats(arr: np.ndarray) -> list[Any]:
        # tolist() gives float64 values that repr() writes exactly, so a float32 loss
        # read back and cast to float32 is bit-identical.
        return [
            x if math.isfinite(x) else (missing if math.isnan(x) else nonfinite(x))
            for x in arr.tolist()
        ]

    loss, loss_mean, margin = floats(c.loss), floats(c.loss_mean), floats(c.margin)
    label = [
        v if k else missing for v, k in zip(c.label.tolist(), c.label_known.tolist(), strict=True)
    ]
    pred = [
        v if k else missing
        for v, k in zip(c.prediction.tolist(), c.prediction_known.tolist(), strict=True)
    ]
    epochs = c.epoch.tolist()
    for i, sid in enumerate(c.sample_id.tolist()):
        yield [
            sid,
            loss[i],
            loss_mean[i],
            int(c.epochs_seen[i]),
            label[i],
            pred[i],
            margin[i],
            epochs[i],
        ]


def _write_text(f: IO[bytes], text: str) -> None:
    f.write(text.encode())


def _write_csv(f: IO[bytes], c: _Columns) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(_rows(c, "", lambda x: "inf" if x > 0 else "-inf"))
    text.flush()
    text.detach()


def _write_json(f: IO[bytes], definition: dict[str, Any], c: _Columns) -> None:
    # Streamed row by row: a million-row slice never exists as one Python list of dicts.
    # JSON has no Inf, so a non-finite loss is null there (CSV and Parquet keep it).
    f.write(b'{"slice": ' + json.dumps(definition).encode() + b', "rows": [')
    for i, row in enumerate(_rows(c, None, lambda _x: None)):
        rec = json.dumps(dict(zip(COLUMNS, row, strict=True)), allow_nan=False)
        f.write((",\n" if i else "\n").encode() + rec.encode())
    f.write(b"\n]}\n")


def _write_parquet(f: IO[bytes], definition: dict[str, Any], c: _Columns) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the explorer extra
        raise ValueError("Parquet export needs pyarrow: pip install 'onthefly[explorer]'") from e
    table = pa.table(
        {
            "sample_id": pa.array(c.sample_id, pa.int64()),
            "loss": pa.array(c.loss, pa.float32(), mask=np.isnan(c.loss)),
            "loss_mean": pa.array(c.loss_mean, pa.float64(), mask=np.isnan(c.loss_mean)),
            "epochs_seen": pa.array(c.epochs_seen, pa.int64()),
            "label": pa.array(c.label, pa.int64(), mask=~c.label_known),
            "prediction": pa.array(c.prediction, pa.int64(), mask=~c.prediction_known),
            "margin": pa.array(c.margin, pa.float32(), mask=np.isnan(c.margin)),
            "epoch": pa.array(c.epoch, pa.int64()),
        }
    )
    table = table.replace_schema_metadata({"onthefly.slice": json.dumps(definition)})
    pq.write_table(table, f)


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:
            # Name the file the user asked for, not our temp file beside it.
            raise OSError(e.errno, e.strerror, path) from None
        raise
