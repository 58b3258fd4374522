"""Selection SPEC parsing and selection over per-sample losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onthefly_supervisor.selection import GRAMMAR, SelectionSpec, parse_spec, select

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", SelectionSpec(kind="all")),
        (" ALL ", SelectionSpec(kind="all")),
        ("quantile:0.85:1.0", SelectionSpec(kind="quantile", lo=0.85, hi=1.0)),
        ("quantile:0:.5", SelectionSpec(kind="quantile", lo=0.0, hi=0.5)),
        ("kmeans:auto", SelectionSpec(kind="kmeans", k="auto")),
        ("kmeans:auto:cluster=2", SelectionSpec(kind="kmeans", k="auto", cluster=2)),
        ("kmeans:4", SelectionSpec(kind="kmeans", k=4)),
        ("kmeans:4:cluster=0", SelectionSpec(kind="kmeans", k=4, cluster=0)),
        ("indices:hard.npy", SelectionSpec(kind="indices", path="hard.npy")),
        ("indices:C:\\data\\ids.txt", SelectionSpec(kind="indices", path="C:\\data\\ids.txt")),
    ],
)
def test_parse_valid(text: str, expected: SelectionSpec) -> None:
    assert parse_spec(text) == expected


def test_canonical_string_round_trips() -> None:
    for text in ["all", "quantile:0.85:1", "kmeans:auto:cluster=1", "kmeans:3", "indices:a/b.csv"]:
        assert str(parse_spec(text)) == text
        assert parse_spec(str(parse_spec(text))) == parse_spec(text)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("everything", "unknown kind 'everything'"),
        ("all:now", "'all' takes no arguments"),
        ("quantile:0.9", "LO and HI"),
        ("quantile:0.9:0.5", "LO=0.9 HI=0.5"),
        ("quantile:0.5:0.5", "LO=0.5 HI=0.5"),
        ("quantile:-0.1:0.5", "LO=-0.1 HI=0.5"),
        ("quantile:0.1:1.5", "LO=0.1 HI=1.5"),
        ("quantile:a:b", "'a'"),
        ("quantile:nan:1", "'nan'"),
        ("kmeans", "kmeans needs K or auto"),
        ("kmeans:1", "K must be an integer >= 2"),
        ("kmeans:x", "'x'"),
        ("kmeans:auto:k=3", "expected cluster=J"),
        ("kmeans:3:cluster=-1", "cluster must be an integer"),
        ("kmeans:3:cluster=3", "cluster=3 does not exist"),
        ("kmeans:auto:cluster=1:x", "too many parts"),
        ("indices:", "indices needs a file"),
    ],
)
def test_parse_invalid_names_the_part_and_grammar(text: str, names: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_spec(text)
    msg = str(info.value)
    assert names in msg
    assert GRAMMAR in msg
    assert "\n" not in msg


def test_spec_dataclass_validates_directly() -> None:
    with pytest.raises(ValueError, match="0<=LO<HI<=1"):
        SelectionSpec(kind="quantile", lo=0.7, hi=0.2)
    with pytest.raises(ValueError, match="indices needs a file"):
        SelectionSpec(kind="indices")


# --------------------------------------------------------------------------- all / quantile


def test_all_skips_unseen_and_non_finite() -> None:
    losses = np.array([0.1, np.nan, 0.3, np.inf, 0.5], dtype=np.float32)
    sel = select("all", losses)
    assert sel.indices.dtype == np.int64
    assert sel.indices.tolist() == [0, 2, 4]
    assert "1 non-finite" in sel.description
    assert sel.n_seen == 3


def test_quantile_by_rank_partitions_and_orders() -> None:
    rng = np.random.default_rng(0)
    losses = rng.random(1000).astype(np.float32)
    losses[::10] = np.nan  # 100 unseen
    top = select("quantile:0.85:1.0", losses)
    bottom = select("quantile:0:0.85", losses)
    assert top.indices.size == round(0.15 * 900)
    assert np.all(np.diff(top.indices) > 0)
    assert set(top.indices).isdisjoint(bottom.indices)
    assert top.indices.size + bottom.indices.size == 900
    assert np.nanmin(losses[top.indices]) >= np.nanmax(losses[bottom.indices])
    assert not np.isnan(losses[top.indices]).any()


def test_quantile_ties_and_bounds() -> None:
    losses = np.ones(10, dtype=np.float32)
    sel = select("quantile:0.5:1", losses)
    assert sel.indices.tolist() == [5, 6, 7, 8, 9]  # ties broken by sample id
    assert select("quantile:0:1", losses).indices.size == 10


def test_quantile_empty_slice_raises() -> None:
    losses = np.arange(10, dtype=np.float32)
    with pytest.raises(ValueError, match="the selection quantile:0.99:1 is empty"):
        select("quantile:0.99:1.0", losses)


def test_nothing_seen_raises() -> None:
    losses = np.full(5, np.nan, dtype=np.float32)
    for spec in ["all", "quantile:0:1", "kmeans:auto"]:
        with pytest.raises(ValueError, match="is empty"):
            select(spec, losses)


def test_losses_must_be_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        select("all", np.zeros((3, 2), dtype=np.float32))


# --------------------------------------------------------------------------- kmeans


def _regimes(n_per: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    regime = np.repeat(np.arange(3), n_per)
    losses = (regime * 2.0 + rng.normal(0, 0.1, regime.size)).astype(np.float32)
    margin = (-regime + rng.normal(0, 0.1, regime.size)).astype(np.float32)
    return losses, margin, regime


def test_kmeans_auto_finds_planted_regimes_and_picks_the_hardest() -> None:
    losses, margin, regime = _regimes()
    sel = select("kmeans:auto", losses, margin, seed=0, labels=regime, threads=1)
    assert sel.clusters is not None and len(sel.clusters) == 3
    assert sel.selected_cluster == 2
    assert sel.indices.tolist() == np.flatnonzero(regime == 2).tolist()
    means = [c.mean_loss for c in sel.clusters]
    assert means == sorted(means)
    assert sel.clusters[0].label_mix == {0: 300}
    assert "silhouette" in sel.description
    assert "silhouette_k3" in sel.extra


def test_kmeans_fixed_k_and_cluster_choice() -> None:
    losses, margin, regime = _regimes()
    sel = select("kmeans:3:cluster=0", losses, margin, threads=1)
    assert sel.indices.tolist() == np.flatnonzero(regime == 0).tolist()
    again = select("kmeans:3:cluster=0", losses, margin, threads=1)
    assert np.array_equal(sel.indices, again.indices)  # deterministic for a seed


def test_kmeans_cluster_out_of_range_after_auto() -> None:
    losses, _, _ = _regimes()
    with pytest.raises(ValueError, match="names cluster 7"):
        select("kmeans:auto:cluster=7", losses, threads=1)


def test_kmeans_on_three_samples() -> None:
    # Too few to split into clusters of the documented minimum: one cluster, said so (it
    # used to split off the single 5.0 sample as the "hardest regime").
    losses = np.array([0.1, 0.2, 5.0], dtype=np.float32)
    sel = select("kmeans:auto", losses, threads=1)
    assert sel.indices.tolist() == [0, 1, 2]
    assert sel.clusters is not None and len(sel.clusters) == 1
    assert "too few seen samples (3) to split" in sel.description
    with pytest.raises(ValueError, match="needs at least 4 distinct seen samples"):
        select("kmeans:4", losses, threads=1)


def test_kmeans_auto_never_keeps_a_cluster_under_the_documented_minimum() -> None:
    """README: kmeans:auto never keeps a cluster under 10 samples or 2 % of the samples."""
    from onthefly_supervisor.selection import min_cluster_size

    assert [min_cluster_size(n) for n in (4, 100, 500, 501, 10_000)] == [10, 10, 10, 11, 200]
    # The new-user trial: 4 samples gave k=3 with clusters of 1-2 samples.
    four = np.array([0.1, 0.15, 3.0, 9.0], dtype=np.float32)
    sel = select("kmeans:auto", four, np.array([1.0, 0.9, -2.0, -5.0]), threads=1)
    assert [c.size for c in sel.clusters or []] == [4]
    rng = np.random.default_rng(3)
    for n in (15, 19, 20, 25, 40, 60, 150, 700):
        # Three well-separated regimes, one of them tiny: a split that isolates it wins
        # the silhouette unless the minimum holds.
        tiny = max(1, n // 12)
        losses = np.concatenate(
            [rng.normal(0.2, 0.02, n - 2 * tiny - n // 3), rng.normal(1.0, 0.02, n // 3 + tiny)]
            + [rng.normal(8.0, 0.02, tiny)]
        ).astype(np.float32)
        got = select("kmeans:auto", losses, seed=0, threads=1)
        sizes = [c.size for c in got.clusters or []]
        assert sum(sizes) == n
        if n < 2 * min_cluster_size(n):
            assert sizes == [n], (n, sizes)
        else:
            assert min(sizes) >= min_cluster_size(n), (n, sizes)


def test_a_fork_needs_at_least_two_samples_and_says_when_it_is_under_a_batch() -> None:
    from onthefly_supervisor.selection import MIN_FORK_SAMPLES, check_fork_size

    assert MIN_FORK_SAMPLES == 2
    losses = np.linspace(0, 1, 1000, dtype=np.float32)
    one = select("quantile:0.999:1.0", losses)
    assert one.indices.size == 1
    with pytest.raises(ValueError, match=r"quantile:0.999:1 has 1 sample; a fork needs at least 2"):
        check_fork_size(one, batch_size=64)
    regimes, _, _ = _regimes(40)
    regimes[:1] = 50.0  # one outlier: kmeans:K keeps it as its own cluster when asked
    lone = select("kmeans:4", regimes, threads=1)
    assert lone.indices.size == 1
    with pytest.raises(ValueError, match=r"kmeans:4 \(cluster 3 of 4\) has 1 sample"):
        check_fork_size(lone)
    five = select("quantile:0.995:1.0", losses)
    assert check_fork_size(five, batch_size=64) == (
        "5 samples, fewer than one batch of the parent's loader (~64): every step trains on all 5"
    )
    assert check_fork_size(five, batch_size=None) == check_fork_size(five, batch_size=4) == ""
    # kmeans:auto finding no structure selects everything: refused, saying what to use.
    flat = select("kmeans:auto", np.full(300, 0.5, dtype=np.float32), threads=1)
    assert flat.clusters is not None and len(flat.clusters) == 1
    with pytest.raises(ValueError, match=r"kmeans:auto found one cluster, every one of the 300"):
        check_fork_size(flat)


def test_kmeans_degrades_to_one_cluster_with_too_few_samples() -> None:
    losses = np.array([np.nan, 0.3, 0.3, np.nan], dtype=np.float32)
    sel = select("kmeans:auto", losses, threads=1)
    assert sel.indices.tolist() == [1, 2]
    assert "too few distinct seen samples" in sel.description
    assert sel.clusters is not None and len(sel.clusters) == 1


def test_kmeans_ignores_unseen_and_imputes_missing_features() -> None:
    losses, margin, regime = _regimes(100)
    losses[:5] = np.nan
    feats = np.stack([margin, margin], axis=1)
    feats[10:20, 1] = np.nan
    sel = select("kmeans:3", losses, feats, threads=1)
    assert sel.n_seen == losses.size - 5
    assert set(sel.indices.tolist()) == set(np.flatnonzero(regime == 2).tolist())
    assert "10 missing feature value(s) imputed" in sel.description


def test_kmeans_embedding_block_does_not_outvote_the_residual_features() -> None:
    # 16 columns of noise as the "embedding": standardized one by one they would carry 16 of
    # 18 votes and blur the planted regimes (the hard cluster then mixes regimes 1 and 2).
    losses, margin, regime = _regimes()
    emb = np.random.default_rng(1).normal(size=(losses.size, 16)).astype(np.float32)
    flat = select("kmeans:auto", losses, np.concatenate([margin[:, None], emb], 1), threads=1)
    assert set(regime[flat.indices].tolist()) != {2}
    sel = select("kmeans:auto", losses, margin, threads=1, embedding=emb)
    assert sel.indices.tolist() == np.flatnonzero(regime == 2).tolist()
    assert "the 16 embedding column(s) weigh as much as the 2 residual column(s)" in sel.description
    # An all-NaN embedding column is dropped and the block reweighted over what is left.
    emb[:, 3] = np.nan
    sel = select("kmeans:auto", losses, margin, threads=1, embedding=emb)
    assert "the 15 embedding column(s)" in sel.description
    with pytest.raises(ValueError, match="embedding must have shape"):
        select("kmeans:auto", losses, margin, threads=1, embedding=emb[:10])


def test_kmeans_feature_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="features must have shape"):
        select("kmeans:auto", np.zeros(10, dtype=np.float32), np.zeros((9, 2)), threads=1)


def test_kmeans_large_input_uses_subsample_and_predict() -> None:
    rng = np.random.default_rng(1)
    regime = rng.integers(0, 2, 30_000)
    losses = (regime * 3.0 + rng.normal(0, 0.2, regime.size)).astype(np.float32)
    sel = select("kmeans:2", losses, seed=1, threads=1)
    assert np.array_equal(sel.indices, np.flatnonzero(regime == 1))


# --------------------------------------------------------------------------- indices


def test_indices_npy_text_and_csv(tmp_path: Path) -> None:
    losses = np.linspace(0, 1, 20, dtype=np.float32)
    np.save(tmp_path / "ids.npy", np.array([5, 3, 3], dtype=np.int32))
    (tmp_path / "ids.txt").write_text("7\n1\n\n")
    (tmp_path / "ids.csv").write_text("4, 2,9\n")
    (tmp_path / "slice.csv").write_text("sample_id,loss\n11,0.5\n12,0.7\n")
    assert select("indices:ids.npy", losses, base_dir=tmp_path).indices.tolist() == [3, 5]
    assert select("indices:ids.txt", losses, base_dir=tmp_path).indices.tolist() == [1, 7]
    assert select("indices:ids.csv", losses, base_dir=tmp_path).indices.tolist() == [2, 4, 9]
    assert select("indices:slice.csv", losses, base_dir=tmp_path).indices.tolist() == [11, 12]
    absolute = select(f"indices:{tmp_path / 'ids.txt'}", losses)
    assert absolute.indices.tolist() == [1, 7]
    assert "duplicate" in select("indices:ids.npy", losses, base_dir=tmp_path).description


def test_indices_out_of_range_names_first_bad_id(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("1\n25\n-3\n")
    with pytest.raises(ValueError, match=r"sample id 25 is out of range \[0, 20\)"):
        select("indices:ids.txt", np.zeros(20, dtype=np.float32), base_dir=tmp_path)


def test_indices_missing_empty_and_garbage(tmp_path: Path) -> None:
    losses = np.zeros(5, dtype=np.float32)
    with pytest.raises(ValueError, match="does not exist"):
        select("indices:nope.txt", losses, base_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        select("indices:empty.txt", losses, base_dir=tmp_path)
    (tmp_path / "bad.txt").write_text("1\n2.5\n")
    with pytest.raises(ValueError, match="line 2: '2.5' is not an integer id"):
        select("indices:bad.txt", losses, base_dir=tmp_path)
    np.save(tmp_path / "f.npy", np.array([0.5]))
    with pytest.raises(ValueError, match="integer sample ids"):
        select("indices:f.npy", losses, base_dir=tmp_path)
    (tmp_path / "fake.npy").write_text("1\n2\n")  # text named .npy: said so, not "pickled"
    with pytest.raises(ValueError, match="is not a .npy file"):
        select("indices:fake.npy", losses, base_dir=tmp_path)
    np.save(tmp_path / "grid.npy", np.arange(4).reshape(2, 2))
    with pytest.raises(ValueError, match=r"2-D array of shape \(2, 2\); give a 1-D array"):
        select("indices:grid.npy", losses, base_dir=tmp_path)
    np.save(tmp_path / "col.npy", np.arange(3).reshape(3, 1))  # one column: the ids
    assert select("indices:col.npy", losses, base_dir=tmp_path).indices.tolist() == [0, 1, 2]
    # One line of ids is data, not a header: parsed, or its bad token named.
    (tmp_path / "row.txt").write_text("3 1\n")
    assert select("indices:row.txt", losses, base_dir=tmp_path).indices.tolist() == [1, 3]
    (tmp_path / "row.csv").write_text("1,2,abc\n")
    with pytest.raises(ValueError, match="line 1: 'abc' is not an integer id"):
        select("indices:row.csv", losses, base_dir=tmp_path)


def test_indices_a_first_line_with_a_number_is_data_not_a_header(tmp_path: Path) -> None:
    # "1.5" used to be taken as a CSV header, so the file silently selected only [2].
    losses = np.zeros(5, dtype=np.float32)
    (tmp_path / "f.txt").write_text("1.5\n2\n")
    with pytest.raises(ValueError, match="line 1: '1.5' is not an integer id"):
        select("indices:f.txt", losses, base_dir=tmp_path)
    (tmp_path / "n.txt").write_text("# ids\nnan\n2\n")
    with pytest.raises(ValueError, match="line 2: 'nan' is not an integer id"):
        select("indices:n.txt", losses, base_dir=tmp_path)
    # A real header still names its id column, and a bad cell is named by line and value.
    (tmp_path / "h.csv").write_text("loss,id\n0.5,3\n0.7,1.5\n")
    with pytest.raises(ValueError, match=r"line 3: column 'id' is '1.5', not an integer id"):
        select("indices:h.csv", losses, base_dir=tmp_path)
    (tmp_path / "h2.csv").write_text("loss,id\n0.5,3\n0.7,4\n")
    assert select("indices:h2.csv", losses, base_dir=tmp_path).indices.tolist() == [3, 4]


def test_indices_json_and_unreadable_files(tmp_path: Path) -> None:
    losses = np.zeros(10, dtype=np.float32)
    (tmp_path / "l.json").write_text("[4, 2]")
    assert select("indices:l.json", losses, base_dir=tmp_path).indices.tolist() == [2, 4]
    (tmp_path / "o.json").write_text('{"ids": [1, 3]}')
    assert select("indices:o.json", losses, base_dir=tmp_path).indices.tolist() == [1, 3]
    (tmp_path / "bad.json").write_text('{"rows": [{"sample_id": 1}, {"sample_id": 2.5}]}')
    with pytest.raises(ValueError, match=r"bad.json.*row 1 sample_id: 2.5 is not an integer"):
        select("indices:bad.json", losses, base_dir=tmp_path)
    (tmp_path / "x.bin").write_bytes(b"\x89\xff\x00garbage")
    with pytest.raises(ValueError, match=r"x.bin.*not text.*supported: \.npy.*JSON.*Parquet"):
        select("indices:x.bin", losses, base_dir=tmp_path)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake.parquet.*not a readable Parquet file"):
        select("indices:fake.parquet", losses, base_dir=tmp_path)


def test_indices_may_name_unseen_samples(tmp_path: Path) -> None:
    losses = np.array([np.nan, 1.0, np.nan], dtype=np.float32)
    (tmp_path / "ids.txt").write_text("0,1")
    sel = select("indices:ids.txt", losses, base_dir=tmp_path)
    assert sel.indices.tolist() == [0, 1]
    assert "1 of them have no loss yet" in sel.description


def _regimes_with_outliers() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    losses = np.concatenate(
        [rng.normal(0.2, 0.03, 300), rng.normal(1.0, 0.05, 200), [9.0, 9.5, 10.0]]
    ).astype(np.float32)
    margin = np.concatenate([rng.normal(2, 0.2, 300), rng.normal(-0.5, 0.2, 200), [-8, -8, -8]])
    return losses, margin


def test_kmeans_auto_does_not_pick_a_cluster_of_a_few_outliers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onthefly_supervisor.selection as selmod

    losses, margin = _regimes_with_outliers()
    sel = select("kmeans:auto", losses, margin, seed=0, threads=1)
    assert min(c.size for c in sel.clusters) >= 10
    assert sel.indices.size >= 200  # the hard regime (with the outliers), not 3 samples
    assert "not chosen: a cluster smaller than" in sel.description
    # Without the guard the outliers become their own "hardest regime".
    monkeypatch.setattr(selmod, "MIN_CLUSTER_FRAC", 0.0)
    monkeypatch.setattr(selmod, "MIN_CLUSTER_ABS", 0)
    unguarded = select("kmeans:auto", losses, margin, seed=0, threads=1)
    assert unguarded.indices.size == 3


def test_explicit_k_may_form_a_tiny_cluster() -> None:
    losses, margin = _regimes_with_outliers()
    sel = select("kmeans:3", losses, margin, seed=0, threads=1)
    assert sorted(c.size for c in sel.clusters)[0] == 3
