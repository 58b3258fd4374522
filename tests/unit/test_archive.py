"""Portable sessions: export -> import round trips, every refusal, check_session, prune.

Sessions are built directly with the Store, numpy and torch.save (no supervisor process),
the way the supervisor and workers lay them out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from onthefly_supervisor import archive
from onthefly_supervisor.archive import (
    CheckpointRow,
    check_session,
    export_session,
    import_session,
    plan_prune,
    prune_checkpoints,
)
from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.store import RunRow, Store, point_latest, sessions_root
from onthefly_worker import checkpoint as ckpt

SID = "20260101-120000-abcd"
N = 64

# main's checkpoints: (step, reason). 20 is a fork's parent, 50 gets pinned.
MAIN_CKPTS = [
    (10, "cadence"),
    (20, "cadence"),
    (30, "request"),
    (40, "pause"),
    (50, "cadence"),
    (60, "epoch"),
    (70, "cadence"),
    (80, "cadence"),
    (90, "cadence"),
]


def ck_rel(run: str, step: int) -> str:
    return f"checkpoints/{run}/step-{step:08d}.pt"


def write_checkpoint(st: Store, sdir: Path, run: str, step: int, reason: str) -> None:
    rel = ck_rel(run, step)
    state = {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "run_id": run,
        "model": {"w": torch.full((8, 8), float(step)), "b": torch.arange(8.0)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "rng": ckpt.capture_rng(),
        "cursor": {"epoch": step // 30, "batch": step % 30, "seed": 0},
        "counters": {"step": step, "sample_steps": step * 4},
    }
    sha, nbytes = ckpt.write_atomic(state, str(sdir / rel))
    st.add_checkpoint(run, rel, sha, step, step // 30, step % 30, reason, nbytes)


def make_session(project: Path, sid: str = SID) -> Path:
    """A finished-looking session: main + a fork from main's step-20 checkpoint."""
    sdir = Path(sessions_root(str(project))) / sid
    st = Store(str(sdir))
    try:
        st.set_meta("script", "train.py")
        st.add_run(
            RunRow("main", "main", "train", RunStatus.RUNNING, [], time.time(), dataset_size=N)
        )
        st.add_run(
            RunRow(
                "fork-1",
                "hard-tail",
                "fork",
                RunStatus.RUNNING,
                ["main"],
                time.time(),
                dataset_size=N,
                spec={
                    "checkpoint": ck_rel("main", 20),
                    "select": "quantile:0.85:1",
                    "indices_file": "forks/fork-1/indices.npy",
                },
            )
        )
        for step, reason in MAIN_CKPTS:
            write_checkpoint(st, sdir, "main", step, reason)
        st.pin_checkpoint(ck_rel("main", 50))
        write_checkpoint(st, sdir, "fork-1", 25, "cadence")
        st.add_metrics("main", [{"step": 1, "epoch": 0, "time": 1.0, "loss": 0.5}])
        st.add_event("log", "main", {"text": "hello"}, 1.0)
    finally:
        st.close()
    rng = np.random.default_rng(0)
    for run in ("main", "fork-1"):
        d = sdir / "samples" / run
        d.mkdir(parents=True)
        for e in range(3):
            loss = rng.random(N).astype(np.float32)
            loss[rng.random(N) < 0.2] = np.nan
            np.save(d / f"epoch-{e:04d}.npy", loss)
        if run == "main":
            np.save(d / "margin-0002.npy", rng.normal(size=N).astype(np.float32))
            np.save(d / "pred-0002.npy", rng.integers(0, 3, N).astype(np.int64))
            np.save(d / "labels.npy", rng.integers(-1, 3, N).astype(np.int64))
    fork = sdir / "forks" / "fork-1"  # the fork's selection: part of the session
    fork.mkdir(parents=True)
    np.save(fork / "indices.npy", np.arange(5, dtype=np.int64))
    (fork / "clusters.json").write_text(json.dumps({"clusters": []}))
    (sdir / "health" / "x").mkdir(parents=True)  # a health check in flight: not exported
    (sdir / "health" / "x" / "spec.json").write_text("{}")
    logs = sdir / "logs"
    logs.mkdir()
    (logs / "main-0.log").write_text("step 1\nstep 2\n")
    (logs / "main-0.error.json").write_text(json.dumps({"message": "boom"}))
    (logs / "main-0.fit").write_text("")  # a per-process marker: not exported
    (sdir / "connection.json").write_text(json.dumps({"port": 1, "token": "secret"}))
    point_latest(str(sdir))
    return sdir


def sessions_left(project: Path) -> list[str]:
    root = Path(sessions_root(str(project)))
    return sorted(os.listdir(root)) if root.exists() else []


def exported_files(sdir: Path) -> list[str]:
    out = []
    for p in sorted(sdir.rglob("*")):
        rel = p.relative_to(sdir).as_posix()
        top = rel.split("/")[0]
        is_log = top == "logs" and rel.endswith((".log", ".json"))
        if p.is_file() and (top in ("samples", "checkpoints", "forks") or is_log):
            out.append(rel)
    return out


# --------------------------------------------------------------------- crafted archives


def write_archive(
    path: Path,
    files: dict[str, bytes],
    manifest: dict[str, Any] | None = None,
    unlisted: dict[str, bytes] | None = None,
    extra: list[tarfile.TarInfo] | None = None,
    skip_listed: tuple[str, ...] = (),
) -> Path:
    """A tar with `files` listed in a correct manifest (overridable), plus `unlisted`
    members missing from it, raw `extra` members, and listed names left out."""
    doc: dict[str, Any] = {
        "format": archive.FORMAT,
        "format_version": archive.FORMAT_VERSION,
        "session_id": SID,
        "created": 0.0,
        "members": [
            {"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
            for n, b in files.items()
        ],
    }
    doc.update(manifest or {})
    with tarfile.open(path, "w") as tar:
        for name, data in {**files, **(unlisted or {})}.items():
            if name in skip_listed:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
        m = json.dumps(doc).encode()
        info = tarfile.TarInfo(archive.MANIFEST)
        info.size = len(m)
        tar.addfile(info, io.BytesIO(m))
    return path


def minimal_files(tmp_path: Path) -> dict[str, bytes]:
    """session.db of a tiny real session, as bytes."""
    sdir = tmp_path / "mini" / SID
    Store(str(sdir)).close()
    out = tmp_path / "mini.tar"
    export_session(sdir, out)
    with tarfile.open(out) as tar:
        f = tar.extractfile(archive.DB_NAME)
        assert f is not None
        return {archive.DB_NAME: f.read()}


class Evil:
    """A pickle payload: unpickling it calls open(marker, 'w'), creating the marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_round_trip_is_byte_equal_and_checks_ok(tmp_path: Path, suffix: str) -> None:
    src = make_session(tmp_path / "a")
    assert check_session(src) == []
    out = tmp_path / f"session{suffix}"
    res = export_session(src, out)

    assert res.path == str(out)
    assert res.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert res.bytes == out.stat().st_size
    files = exported_files(src)
    assert res.files == len(files) + 2  # + session.db + manifest.json
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[-1] == archive.MANIFEST  # last: a truncated archive has no manifest
    assert "connection.json" not in names and "logs/main-0.fit" not in names
    assert sorted(n for n in names if n not in (archive.DB_NAME, archive.MANIFEST)) == files

    proj = tmp_path / "b"
    imp = import_session(out, proj)
    dst = Path(imp.session_dir)
    assert imp.session_id == SID and dst == Path(sessions_root(str(proj))) / SID
    assert imp.files == len(files) + 1
    assert check_session(dst) == []
    assert exported_files(dst) == files
    for rel in files:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert not (dst / "connection.json").exists()
    assert os.path.realpath(Path(sessions_root(str(proj))) / "latest") == str(dst)
    assert sessions_left(proj) == [SID, "latest"]  # no staging folder left

    a, b = Store(str(src), readonly=True), Store(str(dst), readonly=True)
    try:
        # Its runs were live at export: the copy says they stopped (see the test below).
        def same(r: RunRow) -> dict[str, Any]:
            return {k: v for k, v in r.to_dict().items() if k not in ("status", "error", "ended")}

        assert [same(r) for r in a.runs()] == [same(r) for r in b.runs()]
        assert a.checkpoints() == b.checkpoints()
        assert a.get_meta("script") == b.get_meta("script") == "train.py"
        assert b.last_seq() == a.last_seq() + 2  # one run_status event per settled run
        latest = b.latest_checkpoint("main")
    finally:
        a.close()
        b.close()
    assert latest is not None
    state = ckpt.load(str(dst / latest["path"]), expected_sha256=latest["sha256"])
    assert torch.equal(state["model"]["w"], torch.full((8, 8), 90.0))


def test_import_twice_gets_a_new_id_and_latest_follows(tmp_path: Path) -> None:
    src = make_session(tmp_path / "a")
    out = tmp_path / "s.tar"
    export_session(src, out)
    # Into the same project: the id is taken by the source itself.
    first = import_session(out, tmp_path / "a")
    second = import_session(out, tmp_path / "a")
    assert first.session_id == f"{SID}-imported-1"
    assert second.session_id == f"{SID}-imported-2"
    root = Path(sessions_root(str(tmp_path / "a")))
    assert os.path.realpath(root / "latest") == second.session_dir
    assert check_session(second.session_dir) == []
    assert sessions_left(tmp_path / "a") == sorted(
        [SID, first.session_id, second.session_id, "latest"]
    )


def test_export_of_a_live_wal_session_sees_committed_rows(tmp_path: Path) -> None:
    src = make_session(tmp_path / "a")
    st = Store(str(src))  # kept open: recent commits live only in session.db-wal
    try:
        st.add_event("log", "main", {"text": "after"}, 2.0)
        st.update_run("main", step=1234)
        assert (src / "session.db-wal").stat().st_size > 0
        (src / "checkpoints" / "main" / "step-00000100.pt.tmp-1-2").write_bytes(b"partial")
        out = tmp_path / "live.tar"
        export_session(src, out)
    finally:
        st.close()
    imp = import_session(out, tmp_path / "b")
    b = Store(imp.session_dir, readonly=True)
    try:
        main = b.run("main")
        assert main is not None and main.step == 1234
        logs = [e["payload"] for e in b.events_after(0) if e["kind"] == "log"]
        assert logs[-1] == json.dumps({"text": "after"})
    finally:
        b.close()
    assert not list(Path(imp.session_dir).rglob("*.tmp-*"))  # in-flight writes skipped


def test_runs_live_at_export_are_stopped_in_the_imported_copy(tmp_path: Path) -> None:
    # An export taken while main trains and a fork and a race variant run beside it.
    src = make_session(tmp_path / "a")
    st = Store(str(src))
    try:
        st.add_run(RunRow("main-2", "m", "main", RunStatus.RUNNING, [], time.time()))
        write_checkpoint(st, src, "main-2", 7, "cadence")
        st.add_run(RunRow("main-3", "m", "main", RunStatus.PAUSED, [], time.time()))
        spec = {"race": {"id": "race-1", "variant": 0, "rungs": [5, 10]}}
        st.add_run(
            RunRow("fork-2", "v0", "fork", RunStatus.PENDING, ["main"], time.time(), spec=spec)
        )
        st.add_run(RunRow("fork-3", "done", "fork", RunStatus.COMPLETED, ["main"], time.time()))
        st.upsert_worker(
            {"worker_id": "main-0", "run_id": "main", "role": "train", "state": "running"}
        )
    finally:
        st.close()
    out = tmp_path / "live.tar"
    export_session(src, out)
    imp = import_session(out, tmp_path / "b")
    b = Store(imp.session_dir, readonly=True)
    try:
        runs = {r.run_id: r for r in b.runs()}
        assert {k: r.status for k, r in runs.items()} == {
            "main": RunStatus.STOPPED,
            "fork-1": RunStatus.STOPPED,
            "main-2": RunStatus.STOPPED,
            "main-3": RunStatus.STOPPED,
            "fork-2": RunStatus.STOPPED,
            "fork-3": RunStatus.COMPLETED,  # finished before the export: unchanged
        }
        assert runs["main-2"].error == (
            "was running when exported (running); `onthefly resume` continues it from its "
            "checkpoint at step 7"
        )
        assert runs["main-3"].error == (
            "was running when exported (paused); `onthefly resume` continues it from the beginning"
        )
        # A run `onthefly resume` does not continue says only where its checkpoint is.
        assert runs["fork-1"].error == (
            "was running when exported (running); its checkpoint at step 25 remains"
        )
        assert runs["main"].error.endswith("its checkpoint at step 90 remains")  # kind train
        assert runs["fork-2"].error == (
            "was running when exported (pending); `onthefly resume` continues its race from "
            "the parent checkpoint"
        )
        assert runs["fork-3"].error == ""
        assert all(runs[r].ended for r in ("main", "fork-1", "main-2", "main-3", "fork-2"))
        events = [
            (e["run_id"], json.loads(e["payload"])["status"])
            for e in b.events_after(0)
            if e["kind"] == "run_status"
        ]
        settled = ("main", "fork-1", "main-2", "main-3", "fork-2")
        assert events == [(r, "stopped") for r in settled]
        worker = b.workers()[0]
        assert (worker["state"], worker["error"]) == ("stopped", "was running when exported")
    finally:
        b.close()
    assert check_session(imp.session_dir) == []
    # The source session is not touched.
    a = Store(str(src), readonly=True)
    try:
        assert a.run("main").status is RunStatus.RUNNING  # type: ignore[union-attr]
    finally:
        a.close()


def test_export_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    src = make_session(tmp_path / "a")
    out = tmp_path / "s.tar.gz"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists; overwrite it with --force"):
        export_session(src, out)
    assert out.read_bytes() == b"precious"
    res = export_session(src, out, force=True)
    assert res.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"must end in \.tar, \.tar\.gz or \.tgz"):
        export_session(src, tmp_path / "s.zip")
    with pytest.raises(FileNotFoundError, match="not an OnTheFly session"):
        export_session(tmp_path, tmp_path / "x.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.tar.gz"]  # no temp files


# ----------------------------------------------------------------------------- refusals


def refuse(archive_path: Path, project: Path, match: str) -> None:
    before = sessions_left(project)
    with pytest.raises(ValueError, match=match):
        import_session(archive_path, project)
    assert sessions_left(project) == before, "import left something behind"


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_archive_is_refused(tmp_path: Path, suffix: str) -> None:
    src = make_session(tmp_path / "a")
    out = tmp_path / f"s{suffix}"
    export_session(src, out)
    data = out.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    refuse(cut, tmp_path / "b", "archive is truncated or corrupt")
    assert not (tmp_path / "b" / ".onthefly").exists()


def test_archive_cut_at_a_member_boundary_is_refused(tmp_path: Path) -> None:
    src = make_session(tmp_path / "a")
    out = tmp_path / "s.tar"
    export_session(src, out)
    with tarfile.open(out) as tar:
        offset = tar.getmember(archive.MANIFEST).offset  # everything before the manifest
    cut = tmp_path / "cut.tar"
    cut.write_bytes(out.read_bytes()[:offset])
    refuse(cut, tmp_path / "b", r"truncated or corrupt: .*: no manifest\.json")


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    refuse(junk, tmp_path / "b", "archive is truncated or corrupt")
    with pytest.raises(FileNotFoundError, match="no archive"):
        import_session(tmp_path / "missing.tar", tmp_path / "b")


def test_flipped_byte_in_a_member_is_named(tmp_path: Path) -> None:
    src = make_session(tmp_path / "a")
    out = tmp_path / "s.tar"
    export_session(src, out)
    victim = ck_rel("main", 60)
    with tarfile.open(out) as tar:
        at = tar.getmember(victim).offset_data + 100
    data = bytearray(out.read_bytes())
    data[at] ^= 0x01
    out.write_bytes(bytes(data))
    refuse(out, tmp_path / "b", rf"member '{victim}' is corrupt or was tampered with: sha256")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    files = minimal_files(tmp_path)
    a = write_archive(tmp_path / "new.tar", files, manifest={"format_version": 2})
    refuse(a, tmp_path / "b", r"written by a newer OnTheFly \(format 2\); upgrade to import it")
    b = write_archive(tmp_path / "other.tar", files, manifest={"format": "something-else"})
    refuse(b, tmp_path / "b", "not an OnTheFly session archive")


def test_manifest_and_members_must_match(tmp_path: Path) -> None:
    files = minimal_files(tmp_path)
    extra = write_archive(tmp_path / "x.tar", files, unlisted={"logs/sneaky.log": b"hi"})
    refuse(extra, tmp_path / "b", r"'logs/sneaky.log' is in the archive but not listed")
    files2 = {**files, "samples/main/epoch-0000.npy": b"\x00" * 16}
    missing = write_archive(
        tmp_path / "m.tar", files2, skip_listed=("samples/main/epoch-0000.npy",)
    )
    refuse(missing, tmp_path / "b", r"'samples/main/epoch-0000.npy' is listed in manifest\.json")
    no_manifest = tmp_path / "nm.tar"
    with tarfile.open(no_manifest, "w") as tar:
        info = tarfile.TarInfo(archive.DB_NAME)
        info.size = len(files[archive.DB_NAME])
        tar.addfile(info, io.BytesIO(files[archive.DB_NAME]))
    refuse(no_manifest, tmp_path / "b", "no manifest.json")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil", r"unsafe member '\.\./evil'"),
        ("samples/../../evil", r"unsafe member 'samples/\.\./\.\./evil'"),
        ("/tmp/onthefly-abs-evil", "unsafe member '/tmp/onthefly-abs-evil': absolute path"),
        ("connection.json", "unexpected member 'connection.json'"),
        ("train.py", "unexpected member 'train.py'"),
    ],
)
def test_unsafe_and_unexpected_paths_are_refused(tmp_path: Path, name: str, match: str) -> None:
    files = {**minimal_files(tmp_path), name: b"owned"}
    a = write_archive(tmp_path / "evil.tar", files)
    refuse(a, tmp_path / "proj", match)
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/onthefly-abs-evil").exists()


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (tarfile.SYMTYPE, "symlink"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
def test_link_device_and_fifo_members_are_refused(tmp_path: Path, kind: bytes, match: str) -> None:
    info = tarfile.TarInfo("samples/main/epoch-0000.npy")
    info.type = kind
    info.linkname = "/etc/passwd"
    a = write_archive(tmp_path / "link.tar", minimal_files(tmp_path), extra=[info])
    refuse(a, tmp_path / "proj", rf"unsafe member 'samples/main/epoch-0000\.npy': {match}")


@pytest.mark.parametrize("style", ["torch-zip", "raw-pickle"])
def test_pickle_payload_checkpoint_is_refused_and_never_run(tmp_path: Path, style: str) -> None:
    # Prove the payload is live: an ordinary unpickle creates its marker.
    proof = tmp_path / "proof-marker"
    pickle.loads(pickle.dumps(Evil(str(proof))))
    assert proof.exists()

    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    if style == "torch-zip":
        torch.save({"format": ckpt.FORMAT, "model": Evil(str(marker))}, buf)
    else:
        pickle.dump(Evil(str(marker)), buf)
    name = ck_rel("main", 10)
    files = {**minimal_files(tmp_path), name: buf.getvalue()}
    proj = tmp_path / "proj"
    make_session(proj, "20250101-000000-0000")  # an existing session must stay untouched
    latest_before = os.path.realpath(Path(sessions_root(str(proj))) / "latest")
    a = write_archive(tmp_path / "evil.tar", files)
    refuse(a, proj, rf"checkpoint '{name}' cannot be loaded with torch\.load\(weights_only=True\)")
    assert not marker.exists(), "the archive's pickle was executed"
    assert os.path.realpath(Path(sessions_root(str(proj))) / "latest") == latest_before


def test_refusal_in_an_empty_project_removes_the_folders_it_made(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(Evil(str(tmp_path / "MARKER")), buf)
    files = {**minimal_files(tmp_path), ck_rel("main", 10): buf.getvalue()}
    a = write_archive(tmp_path / "evil.tar", files)
    with pytest.raises(ValueError, match="weights_only"):
        import_session(a, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / ".onthefly").exists()
    assert not (tmp_path / "MARKER").exists()


# ------------------------------------------------------------------------ check_session


def test_check_session_reports_each_problem(tmp_path: Path) -> None:
    sdir = make_session(tmp_path)
    # corrupt checkpoint
    p = sdir / ck_rel("main", 30)
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF
    p.write_bytes(bytes(data))
    # missing checkpoint
    (sdir / ck_rel("main", 70)).unlink()
    # wrong dtype, wrong length, unreadable
    np.save(sdir / "samples/main/pred-0002.npy", np.zeros(N, dtype=np.float32))
    np.save(sdir / "samples/fork-1/epoch-0001.npy", np.zeros(N + 1, dtype=np.float32))
    (sdir / "samples/fork-1/epoch-0002.npy").write_bytes(b"not numpy")
    # stray temp: old one reported, fresh one (a write in flight) not
    old = sdir / "checkpoints/main/step-00000100.pt.tmp-1-2"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 600, time.time() - 600))
    (sdir / "samples/main/epoch-0003.npy.tmp.npy").write_bytes(b"x")
    # a fork whose selection is gone (an archive from before forks/ was exported)
    (sdir / "forks/fork-1/indices.npy").unlink()

    problems = check_session(sdir)
    text = "\n".join(problems)
    assert f"checkpoint {ck_rel('main', 30)} is corrupt: sha256" in text
    assert f"checkpoint {ck_rel('main', 70)} is recorded but missing" in text
    assert "samples/main/pred-0002.npy is float32[64], expected 1-D int64" in text
    assert "samples/fork-1/epoch-0001.npy has 65 entries" in text
    assert "samples/fork-1/epoch-0002.npy cannot be read" in text
    assert "stray temp file checkpoints/main/step-00000100.pt.tmp-1-2" in text
    assert "epoch-0003.npy.tmp.npy" not in text
    assert "run fork-1: its selection forks/fork-1/indices.npy is missing" in text
    assert len(problems) == 7, problems


def test_check_session_allows_growing_arrays_of_unknown_size(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    st = Store(str(sdir))
    st.add_run(RunRow("main", "main", "train", RunStatus.RUNNING, [], 0.0))  # size -1
    st.close()
    d = sdir / "samples" / "main"
    d.mkdir(parents=True)
    np.save(d / "epoch-0000.npy", np.zeros(10, np.float32))
    np.save(d / "epoch-0001.npy", np.zeros(4, np.float32))  # the current epoch, still growing
    assert check_session(sdir) == []
    np.save(d / "epoch-0001.npy", np.zeros(12, np.float32))
    assert check_session(sdir) == [
        "samples/main/epoch-0001.npy has 12 entries, more than the finished epochs' 10"
    ]
    assert check_session(tmp_path / "nothing") == [f"{tmp_path / 'nothing'} has no session.db"]


# -------------------------------------------------------------------------------- prune


def test_prune_keeps_pinned_referenced_and_latest(tmp_path: Path) -> None:
    sdir = make_session(tmp_path)
    removed = prune_checkpoints(sdir, keep_last=3)
    # kept: 20 (the fork's parent), 40 (last pause), 50 (pinned), 60 (last epoch), 90 (latest)
    assert removed == [ck_rel("main", s) for s in (10, 30, 70, 80)]
    for s, _ in MAIN_CKPTS:
        assert (sdir / ck_rel("main", s)).exists() == (s not in (10, 30, 70, 80))
    st = Store(str(sdir), readonly=True)
    try:
        assert [c["step"] for c in st.checkpoints("main")] == [20, 40, 50, 60, 90]
        assert [c["step"] for c in st.checkpoints("fork-1")] == [25]
    finally:
        st.close()
    assert check_session(sdir) == []  # no row without file, no tombstones left
    assert prune_checkpoints(sdir, keep_last=3) == []  # idempotent


def test_prune_fills_the_budget_with_requested_before_cadence(tmp_path: Path) -> None:
    sdir = make_session(tmp_path)
    # 5 protected + a budget of 3: the user's "request" first, then the newest cadence.
    removed = prune_checkpoints(sdir, keep_last=8)
    assert removed == [ck_rel("main", 10)]
    with pytest.raises(ValueError, match="keep_last must be an integer >= 0"):
        prune_checkpoints(sdir, keep_last=-1)


def test_prune_respects_plans_and_absolute_references(tmp_path: Path) -> None:
    sdir = make_session(tmp_path)
    st = Store(str(sdir))
    try:
        st.put_plan("p1", "proposed", {"action": "fork", "checkpoint": ck_rel("main", 70)})
        st.update_run("fork-1", spec_json=json.dumps({"parents": [str(sdir / ck_rel("main", 80))]}))
    finally:
        st.close()
    removed = prune_checkpoints(sdir, keep_last=0)
    # 20 lost its protection (fork-1's spec changed); 70 and 80 are now referenced.
    assert removed == [ck_rel("main", s) for s in (10, 20, 30)]


def test_plan_prune_is_pure() -> None:
    rows = [CheckpointRow(f"c/{i}.pt", "r", i, float(i), "cadence", False) for i in range(6)]
    assert [c.step for c in plan_prune(rows, set(), keep_last=2)] == [0, 1, 2, 3]
    assert [c.step for c in plan_prune(rows, {"c/1.pt"}, keep_last=2)] == [0, 2, 3, 4]
    assert plan_prune(rows, set(), keep_last=10) == []
    assert [c.step for c in plan_prune(rows, set(), keep_last=0)] == [0, 1, 2, 3, 4]


def test_a_session_recording_paths_outside_itself_or_pickled_arrays_is_refused(
    tmp_path: Path,
) -> None:
    # What `sessions check` flags is refused at import, before the session is in place.
    src = tmp_path / "src" / SID
    st = Store(str(src))
    st.add_run(RunRow("main", "main", "main", RunStatus.STOPPED, [], time.time()))
    with st.tx() as db:
        db.execute(
            "INSERT INTO checkpoints (path, run_id, step, epoch, batch, reason, sha256, bytes, t)"
            " VALUES ('../../../../evil.pt', 'main', 5, 0, 5, 'stop', 'x', 1, 0)"
        )
    st.close()
    out = tmp_path / "outside.tar"
    export_session(src, out)
    proj = tmp_path / "proj"
    refuse(out, proj, "recorded with a path outside the session")

    src2 = tmp_path / "src2" / SID
    Store(str(src2)).close()
    (src2 / "samples" / "main").mkdir(parents=True)
    np.save(src2 / "samples" / "main" / "epoch-0000.npy", np.array([{"a": 1}], dtype=object))
    out2 = tmp_path / "pickled.tar"
    export_session(src2, out2)
    refuse(out2, proj, "the archive's session is not sound: .*epoch-0000")
