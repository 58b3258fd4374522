"""Slice export: the right rows and columns in CSV / JSON / Parquet, read back by pandas
and pyarrow, with the slice definition alongside; refusals leave files untouched."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.selection import select
from onthefly_supervisor.slices import COLUMNS, export_slice, load_run_samples
from onthefly_supervisor.store import RunRow, Store

N = 60


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """main: 3 epochs with labels/pred/margin; fork-1 ("hard-tail"): 2 epochs, losses only;
    fork-2: no samples yet."""
    sdir = tmp_path / "sess"
    st = Store(str(sdir))
    for rid, name in (("main", "main"), ("fork-1", "hard-tail"), ("fork-2", "fresh")):
        st.add_run(RunRow(rid, name, "train", RunStatus.RUNNING, [], time.time(), dataset_size=N))
    st.close()
    rng = np.random.default_rng(1)
    d = sdir / "samples" / "main"
    d.mkdir(parents=True)
    for e in range(3):
        loss = rng.gamma(2.0, 0.5, N).astype(np.float32)
        loss[rng.random(N) < 0.25] = np.nan
        loss[11] = np.nan  # never seen
        if e == 2:
            loss[5] = np.inf  # a numerics problem must survive the export where it can
        np.save(d / f"epoch-{e:04d}.npy", loss)
    labels = rng.integers(0, 4, N).astype(np.int64)
    labels[::7] = -1
    pred = rng.integers(0, 4, N).astype(np.int64)
    pred[::5] = -1
    margin = rng.normal(size=N).astype(np.float32)
    margin[::6] = np.nan
    np.save(d / "labels.npy", labels)
    np.save(d / "pred-0002.npy", pred)
    np.save(d / "margin-0002.npy", margin)
    # An older epoch: the margin of samples whose latest loss is from epoch 1.
    np.save(d / "margin-0001.npy", np.zeros(N, np.float32))
    f = sdir / "samples" / "fork-1"
    f.mkdir(parents=True)
    for e in range(2):
        np.save(f / f"epoch-{e:04d}.npy", rng.random(N).astype(np.float32))
    return sdir


def arrays(sdir: Path, run: str = "main") -> dict[str, np.ndarray]:
    d = sdir / "samples" / run
    epochs = np.stack([np.load(p) for p in sorted(d.glob("epoch-*.npy"))]).astype(np.float64)
    finite = np.isfinite(epochs)
    with np.errstate(invalid="ignore"):
        mean = np.where(finite, epochs, 0.0).sum(0) / finite.sum(0)
    # Each sample's most recent loss: from the latest epoch that saw it (NaN = not seen).
    recent = np.full(epochs.shape[1], np.nan, np.float32)
    epoch = np.full(epochs.shape[1], -1)
    for e in reversed(range(epochs.shape[0])):
        take = (epoch < 0) & ~np.isnan(epochs[e])
        recent[take], epoch[take] = epochs[e][take], e
    return {
        "loss": recent,
        "epoch": epoch,
        "loss_mean": mean,
        "epochs_seen": finite.sum(0),
    }


def seen(sdir: Path) -> np.ndarray:
    return np.flatnonzero(np.isfinite(arrays(sdir)["loss"]))


def check_rows(df: pd.DataFrame, sdir: Path, ids: np.ndarray) -> None:
    """Every column of every row against the arrays on disk."""
    a = arrays(sdir)
    d = sdir / "samples" / "main"
    labels, pred = np.load(d / "labels.npy"), np.load(d / "pred-0002.npy")
    margins = {2: np.load(d / "margin-0002.npy"), 1: np.load(d / "margin-0001.npy")}
    assert list(df.columns) == list(COLUMNS)
    assert df["sample_id"].tolist() == ids.tolist()
    for i, sid in enumerate(ids):
        row = df.iloc[i]
        loss = a["loss"][sid]
        if np.isnan(loss):
            assert pd.isna(row["loss"])
        elif np.isfinite(loss):
            assert np.float32(row["loss"]) == loss  # bit-exact after the text round trip
        assert row["epochs_seen"] == a["epochs_seen"][sid]
        if a["epochs_seen"][sid]:
            assert row["loss_mean"] == pytest.approx(a["loss_mean"][sid], rel=1e-12)
        else:
            assert pd.isna(row["loss_mean"])
        e = a["epoch"][sid]
        assert row["epoch"] == e  # the epoch the loss, prediction and margin come from
        p = pred[sid] if e == 2 else -1  # predictions were recorded in epoch 2 only
        for col, v in (("label", labels[sid]), ("prediction", p)):
            assert pd.isna(row[col]) if v < 0 else row[col] == v
        m = margins[e][sid] if e in margins else np.nan
        assert pd.isna(row["margin"]) if np.isnan(m) else row["margin"] == m


def test_csv_all_reads_back_with_pandas(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    res = export_slice(session, "main", "all", "csv", out)
    df = pd.read_csv(out)
    ids = seen(session)
    assert ids.size > 0 and 5 not in ids  # the Inf loss counts as unseen for selection
    assert res.rows == len(df) == ids.size
    assert res.spec == "all" and res.path == str(out)
    check_rows(df, session, ids)
    meta = json.loads((tmp_path / "all.csv.slice.json").read_text())
    assert meta["spec"] == "all" and meta["description"] == res.description
    assert meta["run"] == "main" and meta["epoch"] == 2 and meta["rows"] == res.rows
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)  # plain CSV, no comment
    # An exported CSV is a valid indices:FILE for the next fork.
    again = select("indices:all.csv", arrays(session)["loss"], base_dir=tmp_path)
    assert again.indices.tolist() == ids.tolist()


def test_json_quantile_top_half(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "top.json"
    res = export_slice(session, "main", "quantile:0.5:1.0", "json", out)
    doc = json.loads(out.read_text())
    want = select("quantile:0.5:1.0", arrays(session)["loss"])
    assert doc["slice"]["spec"] == res.spec == "quantile:0.5:1"
    assert doc["slice"]["description"] == want.description == res.description
    df = pd.DataFrame(doc["rows"])
    assert res.rows == len(df) == want.indices.size
    check_rows(df, session, want.indices)


def test_parquet_indices_file_with_unseen_and_inf(session: Path, tmp_path: Path) -> None:
    unseen = 11  # NaN in every epoch
    ids = [5, unseen, 0, 59, 0]  # 5 has an Inf loss; duplicates are dropped
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    out = tmp_path / "pick.parquet"
    res = export_slice(session, "main", "indices:ids.txt", "parquet", out, base_dir=tmp_path)
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"onthefly.slice"])
    assert meta["spec"] == res.spec == "indices:ids.txt"
    assert "2 of them have no loss yet" in meta["description"]  # NaN and Inf
    df = table.to_pandas()
    want = np.unique(ids)
    assert res.rows == len(df) == want.size
    check_rows(df, session, want)
    assert str(table.schema.field("loss").type) == "float"
    assert str(table.schema.field("label").type) == "int64"
    row5 = df[df["sample_id"] == 5].iloc[0]
    assert math.isinf(row5["loss"])
    assert pd.isna(df[df["sample_id"] == unseen].iloc[0]["loss"])


def test_inf_in_csv_and_json(session: Path, tmp_path: Path) -> None:
    (tmp_path / "five.txt").write_text("5\n")
    export_slice(session, "main", "indices:five.txt", "csv", tmp_path / "f.csv", base_dir=tmp_path)
    export_slice(
        session, "main", "indices:five.txt", "json", tmp_path / "f.json", base_dir=tmp_path
    )
    assert math.isinf(pd.read_csv(tmp_path / "f.csv")["loss"][0])
    assert (
        json.loads((tmp_path / "f.json").read_text())["rows"][0]["loss"] is None
    )  # no Inf in JSON


def test_kmeans_uses_history_and_margin(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    res = export_slice(session, "main", "kmeans:2", "json", out)
    doc = json.loads(out.read_text())
    assert doc["slice"]["spec"] == "kmeans:2" and len(doc["slice"]["clusters"]) == 2
    assert doc["slice"]["selected_cluster"] == 1  # the hardest by default
    assert res.rows == doc["slice"]["clusters"][1]["size"] == len(doc["rows"])


def test_run_by_name_without_optional_arrays(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "fork.csv"
    res = export_slice(session, "hard-tail", "all", "csv", out)
    df = pd.read_csv(out)
    assert res.rows == len(df) == N
    assert df[["label", "prediction", "margin"]].isna().all().all()
    assert (df["epochs_seen"] == 2).all() and (df["epoch"] == 1).all()
    data = load_run_samples(str(session), "fork-1")
    assert data.labels is None and data.pred is None and data.margin is None


def test_refusals(session: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown run 'nope'; known runs: main, fork-1 \(hard-tail\)"
    ):
        export_slice(session, "nope", "all", "csv", tmp_path / "x.csv")
    with pytest.raises(
        ValueError, match="unknown slice format 'xlsx'; use one of csv, parquet, json"
    ):
        export_slice(session, "main", "all", "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(ValueError, match="bad selection spec"):
        export_slice(session, "main", "quantile:0.9", "csv", tmp_path / "x.csv")
    with pytest.raises(ValueError, match="run 'fork-2' has no per-sample losses yet"):
        export_slice(session, "fresh", "all", "csv", tmp_path / "x.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sess"]  # nothing written


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_overwrite_needs_force(session: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"s.{fmt}"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists; overwrite it with --force"):
        export_slice(session, "main", "all", fmt, out)
    assert out.read_bytes() == b"precious"
    res = export_slice(session, "main", "all", fmt, out, force=True)
    assert res.rows == seen(session).size
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left


def test_csv_sidecar_is_not_overwritten_silently(session: Path, tmp_path: Path) -> None:
    side = tmp_path / "s.csv.slice.json"
    side.write_text("{}")
    with pytest.raises(FileExistsError, match=r"s\.csv\.slice\.json already exists"):
        export_slice(session, "main", "all", "csv", tmp_path / "s.csv")
    assert side.read_text() == "{}" and not (tmp_path / "s.csv").exists()


def test_growing_arrays_are_padded_as_unseen(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    st = Store(str(sdir))
    st.add_run(RunRow("main", "main", "train", RunStatus.RUNNING, [], 0.0))
    st.close()
    d = sdir / "samples" / "main"
    d.mkdir(parents=True)
    np.save(d / "epoch-0000.npy", np.arange(10, dtype=np.float32))
    np.save(d / "epoch-0001.npy", np.arange(4, dtype=np.float32) + 100)  # still filling
    data = load_run_samples(str(sdir), "main")
    assert data.loss.size == 10 and np.isnan(data.loss[4:]).all()
    assert data.epochs_seen.tolist() == [2] * 4 + [1] * 6
    assert data.loss_mean[:4].tolist() == [50.0, 51.0, 52.0, 53.0]


def test_kmeans_uses_the_newest_saved_embedding(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    export_slice(session, "main", "kmeans:2", "json", out)
    doc = json.loads(out.read_text())["slice"]
    assert "no embedding" in doc["description"] and doc["extra"]["embedding_dims"] == 0
    d = session / "samples" / "main"
    rng = np.random.default_rng(3)
    np.save(d / "embed-step-00000004.npy", np.zeros((N, 3), np.float32))  # older: not used
    emb = rng.normal(size=(N - 5, 5)).astype(np.float32)  # a shorter one: padded as missing
    np.save(d / "embed-step-00000020.npy", emb)
    export_slice(session, "main", "kmeans:2", "json", out, force=True)
    doc = json.loads(out.read_text())["slice"]
    assert "embedding: 5 dims from samples/main/embed-step-00000020.npy" in doc["description"]
    assert "8 standardized residual feature(s)" in doc["description"]  # loss, mean, margin, 5
    assert doc["extra"]["embedding_dims"] == 5
    # Other specs never look at it; the per-sample columns are unchanged.
    res = export_slice(session, "main", "all", "csv", tmp_path / "a.csv")
    assert "embedding" not in res.description


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_every_export_format_is_a_valid_indices_file(
    session: Path, tmp_path: Path, fmt: str
) -> None:
    """README: an exported slice is a valid indices:FILE. JSON used to fail with "line 1:
    '{"slice":' is not an integer id" and Parquet with a utf-8 decode error."""
    from onthefly_supervisor.slices import read_slice_definition

    out = tmp_path / f"top.{fmt}"
    res = export_slice(session, "main", "quantile:0.5:1.0", fmt, out)
    again = select(f"indices:top.{fmt}", arrays(session)["loss"], base_dir=tmp_path)
    want = select("quantile:0.5:1.0", arrays(session)["loss"])
    assert again.indices.tolist() == want.indices.tolist() and res.rows == want.indices.size
    definition = read_slice_definition(str(out), fmt)
    assert definition["spec"] == res.spec and definition["description"] == res.description


def test_export_slice_clusters_with_the_embedding_it_is_given(
    session: Path, tmp_path: Path
) -> None:
    """A live supervisor passes its fork's embedding source (MethodOps.embedding), so
    export-slice picks what a fork picks; it used to read only the newest saved file."""
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(N, 4)).astype(np.float32)
    asked: list[tuple[str, int]] = []

    def source(run_id: str, n: int) -> tuple[np.ndarray | None, str]:
        asked.append((run_id, n))
        return emb, "embedding: 4 dims from the fork's source"

    res = export_slice(session, "main", "kmeans:2", "json", tmp_path / "k.json", embedding=source)
    assert asked == [("main", N)]
    assert "embedding: 4 dims from the fork's source" in res.description
    from onthefly_supervisor.slices import select_in_session

    *_, fork_like = select_in_session(
        session, "main", "kmeans:2", embedding=lambda r, n: (emb, "x"), recent=True
    )
    doc = json.loads((tmp_path / "k.json").read_text())
    assert [r["sample_id"] for r in doc["rows"]] == fork_like.indices.tolist()


def test_offline_embedding_note_says_what_kmeans_used(session: Path) -> None:
    from onthefly_supervisor.slices import offline_embedding_note

    note = offline_embedding_note(str(session), "main")
    assert "without an embedding (none saved in samples/main/)" in note
    d = session / "samples" / "main"
    np.save(d / "embed-step-00000020.npy", np.zeros((N, 2), np.float32))
    assert offline_embedding_note(str(session), "main").endswith(
        "the newest saved embedding, samples/main/embed-step-00000020.npy (step 20)"
    )
    st = Store(str(session))
    st.add_checkpoint("main", "checkpoints/main/step-00000050.pt", "", 50, 2, 0, "epoch", 1)
    st.close()
    note = offline_embedding_note(str(session), "main")
    assert "(step 20; main's latest checkpoint is step 50)" in note
    assert "a fork (or this command while the session is live" in note
