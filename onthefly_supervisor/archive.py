"""Portable sessions: export one checksummed archive, import it safely, check and prune.

An export is a single tar (plain, or gzip by suffix) holding

    session.db                  a consistent copy (SQLite backup API, so a live WAL
                                database exports a snapshot, not a torn file)
    samples/**                  per-sample arrays as they are on disk
    checkpoints/**              checkpoint files
    forks/**, slices/**,        each fork's selection (spec, indices, clusters), the
    rollbacks/**                planner's slice selections, rollback records
    logs/*.json, logs/*.log     worker error files and logs
    manifest.json               format, version, session id, and every member's size and
                                sha256 -- written *last*, so a truncated archive is missing
                                its manifest and can never pass as complete

`connection.json` (port and token of a live supervisor) is never exported.

Import treats the archive as hostile input. Before anything is written it reads the
whole archive once and checks that it is a readable tar, that the manifest is there and
of a version we understand, that every member is a regular file with a plain relative
path under the expected folders (no absolute paths, `..`, links, devices or fifos), that
members and manifest list the same files, and that every size and sha256 matches. Only
then are the files extracted into a hidden staging folder inside `.onthefly/sessions/`
(hashed again on the way, in case the archive changed in between), every `.pt` is
loaded with `torch.load(weights_only=True)` -- the unpickler that refuses to build
arbitrary objects, so a malicious pickle is rejected, never run -- and the database
passes `PRAGMA integrity_check`. Runs that were live when the session was exported (an
export of a running session) are marked `stopped` with the reason "was running when
exported" (`settle_live_runs`): no process trains them in the copy. The staging folder
is renamed into place in one step; on any failure it is removed and nothing is left
behind. Checksums prove integrity, not authorship: an archive rewritten with a matching
manifest is accepted, which is why the weights_only load, not the checksum, is the
safety line against code in checkpoints.

torch is imported lazily and only to verify checkpoints on import: the supervisor stays
torch-free at start-up, and there is no safe way to validate a torch pickle without
torch's own weights_only unpickler.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tarfile
import time
import urllib.parse
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from onthefly_supervisor.store import point_latest, sessions_root

FORMAT = "onthefly-session"
FORMAT_VERSION = 1
"""Bump when the archive layout changes; import refuses archives from a newer version."""

MANIFEST = "manifest.json"
DB_NAME = "session.db"
_TREES = ("samples", "checkpoints", "forks", "slices", "rollbacks")
"""Folders exported recursively: per-sample arrays, checkpoints, each fork's selection
(spec, indices, k-means clusters), the planner's slice selections, rollback records."""
_LOG_SUFFIXES = (".json", ".log")
"""Only error files and logs from logs/: fit markers and sockets are per-process state."""

_MAX_MANIFEST_BYTES = 64 << 20
"""A manifest is a few hundred bytes per member; anything bigger is not ours."""

_CHUNK = 1 << 20
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TEMP_NAME = re.compile(r"\.tmp(?:[-.]|$)")
"""Temp files of the store's atomic writers: `x.pt.tmp-PID-TID`, `epoch-0001.npy.tmp.npy`."""

STRAY_TEMP_AGE_S = 60.0
"""A temp file older than this is left over from an interrupted write, not one in flight."""

_SAMPLE_KINDS: dict[str, np.dtype[Any]] = {
    "epoch": np.dtype(np.float32),
    "margin": np.dtype(np.float32),
    "pred": np.dtype(np.int64),
}
"""samples/<run>/<kind>-NNNN.npy and the dtype each must have (labels.npy is int64)."""
_SAMPLE_FILE = re.compile(r"^(epoch|margin|pred)-(\d+)\.npy$")

KEEP_REASONS = ("pause", "stop", "final", "epoch")
"""Checkpoint reasons whose latest instance per run prune always keeps: the state a
paused, stopped or finished run resumes from, and the last epoch boundary."""


@dataclass(frozen=True)
class ExportResult:
    """What export_session wrote."""

    path: str
    """Absolute path of the archive."""
    sha256: str
    """sha256 of the archive file itself (hex), to publish next to it."""
    files: int
    """Members in the archive, the manifest included."""
    bytes: int
    """Size of the archive file."""


@dataclass(frozen=True)
class ImportResult:
    """Where import_session put the session."""

    session_dir: str
    """Absolute path of the imported session folder."""
    session_id: str
    """Its id: the archive's id, or `<id>-imported-N` when that id was taken."""
    files: int
    """Files restored (the manifest is not kept)."""


@dataclass(frozen=True)
class Member:
    """One archived file as the manifest records it."""

    name: str
    size: int
    sha256: str


# -------------------------------------------------------------------------------- export


def export_session(
    session_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], force: bool = False
) -> ExportResult:
    """Write the session to one tar archive (`.tar`, `.tar.gz` or `.tgz`) with a manifest.

    Safe on a live session: the database is copied with SQLite's backup API inside one
    read transaction, arrays and checkpoints are replaced atomically by their writers, and
    a growing log is archived up to the size it had when it was opened. The archive is
    written to a temp file next to `out_path`, fsynced and renamed, so `out_path` is
    either the complete archive or untouched. An existing `out_path` is refused unless
    `force`.
    """
    sdir = os.path.realpath(os.fspath(session_dir))
    db_path = os.path.join(sdir, DB_NAME)
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"{sdir} is not an OnTheFly session (no {DB_NAME})")
    out = os.path.abspath(os.fspath(out_path))
    compress = _is_gzip_name(out)
    if os.path.isdir(out):
        raise IsADirectoryError(f"{out} is a directory; give the archive's file name")
    if os.path.lexists(out) and not force:
        raise FileExistsError(
            f"{out} already exists; overwrite it with --force (force=True from Python)"
        )
    out_dir = os.path.dirname(out)
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"folder {out_dir} does not exist")
    session_id = os.path.basename(sdir)

    tmp = _temp_name(out)
    db_copy = tmp + ".db"
    try:
        _backup_db(db_path, db_copy)
        # Listed after the database copy: every checkpoint row in the copy then has its
        # file in the list (files are recorded only after they are renamed into place).
        files = list(_collect(sdir))
        members: list[Member] = []
        with open(tmp, "wb") as raw:
            sink = _HashingSink(raw)
            # gzip level 6 (gzip's default): checkpoints barely compress, and level 9
            # would triple the time for a percent or two.
            gz = gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6) if compress else None
            with tarfile.TarFile(
                fileobj=gz if gz is not None else sink,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.PAX_FORMAT,
                copybufsize=_CHUNK,
            ) as tar:
                members.append(_add_file(tar, DB_NAME, db_copy))
                for arcname, path in files:
                    members.append(_add_file(tar, arcname, path))
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "session_id": session_id,
                    "created": time.time(),
                    "members": [
                        {"name": m.name, "size": m.size, "sha256": m.sha256} for m in members
                    ],
                }
                _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
            if gz is not None:
                gz.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        _fsync_dir(out_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        for p in (db_copy, db_copy + "-wal", db_copy + "-shm", db_copy + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return ExportResult(
        path=out, sha256=sink.sha.hexdigest(), files=len(members) + 1, bytes=os.path.getsize(out)
    )


def _is_gzip_name(path: str) -> bool:
    name = path.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return True
    if name.endswith(".tar"):
        return False
    raise ValueError(f"{path}: a session archive must end in .tar, .tar.gz or .tgz")


def _temp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _backup_db(src_path: str, dst_path: str) -> None:
    # backup() with the default pages=-1 copies every page in one step under one read
    # transaction: a consistent snapshot even while the supervisor commits to the WAL.
    src = sqlite3.connect(src_path, timeout=30)
    try:
        try:
            dst = sqlite3.connect(dst_path)
            dst.execute("PRAGMA user_version")  # opens the file: fails here when unwritable
        except sqlite3.Error as e:
            raise OSError(f"cannot write into {os.path.dirname(dst_path)}: {e}") from None
        try:
            src.backup(dst)
            # One self-contained file: a rollback-journal database needs no -wal/-shm
            # beside it. The store turns WAL back on when it opens the imported copy.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def _is_temp(name: str) -> bool:
    return bool(_TEMP_NAME.search(name))


def _collect(sdir: str) -> Iterator[tuple[str, str]]:
    """(archive name, path) of every file to export, in a stable order."""
    for top in _TREES:
        base = os.path.join(sdir, top)
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for d in dirnames:
                if os.path.islink(os.path.join(dirpath, d)):
                    raise ValueError(
                        f"{os.path.join(dirpath, d)} is a symlink; a session exports regular "
                        "files only (copy the target in place of the link)"
                    )
            for fn in sorted(filenames):
                if _is_temp(fn):
                    continue  # an atomic write in flight or an interrupted one
                path = os.path.join(dirpath, fn)
                if os.path.islink(path) or not os.path.isfile(path):
                    raise ValueError(
                        f"{path} is not a regular file; a session exports regular files only"
                    )
                yield os.path.relpath(path, sdir).replace(os.sep, "/"), path
    logs = os.path.join(sdir, "logs")
    if os.path.isdir(logs):
        for fn in sorted(os.listdir(logs)):
            path = os.path.join(logs, fn)
            if fn.endswith(_LOG_SUFFIXES) and not _is_temp(fn) and os.path.isfile(path):
                if os.path.islink(path):
                    continue  # never follow a link out of the session
                yield f"logs/{fn}", path


class _HashingSink:
    """The archive's output file, hashed on the way so the archive is read only once."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self._pos = 0

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self.sha.update(mv)
        self._f.write(mv)
        self._pos += mv.nbytes
        return mv.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()


class _HashingSource:
    """A file being archived, hashed as tarfile copies it (one read per file)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.sha.update(b)
        return b


def _add_file(tar: tarfile.TarFile, arcname: str, path: str) -> Member:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        info = tarfile.TarInfo(arcname)
        # The size at open: a log still being appended to is archived up to here, and
        # tarfile copies exactly this many bytes, so hash and content agree.
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644
        src = _HashingSource(f)
        tar.addfile(info, src)
    return Member(arcname, info.size, src.sha.hexdigest())


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------- import


def import_session(
    archive_path: str | os.PathLike[str], project_dir: str | os.PathLike[str] = "."
) -> ImportResult:
    """Verify an exported archive, then restore it under `<project>/.onthefly/sessions/`.

    Raises ValueError naming the problem (truncated/corrupt archive, newer format, unsafe
    or unexpected member, manifest mismatch, checksum mismatch, a checkpoint that is not
    weights_only-loadable) and leaves nothing behind. A session whose id exists already
    is imported as `<id>-imported-N`. `latest` then points at the imported session.
    Nothing from the archive is ever executed.
    """
    src = os.path.abspath(os.fspath(archive_path))
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no archive {src}")
    session_id, members = _verify_archive(src)

    root = sessions_root(os.fspath(project_dir))
    created = _makedirs_tracked(root)
    staging = ""
    try:
        need = sum(m.size for m in members.values())
        free = shutil.disk_usage(root).free
        if need > free:
            raise OSError(
                errno.ENOSPC,
                f"importing {src} needs {need / 2**20:.1f} MiB but {root} has "
                f"{free / 2**20:.1f} MiB free",
            )
        # Hidden (dot) name: `sessions ls|gc` skip it, and it is on the same file system
        # as its final place, so the last step is one atomic rename.
        staging = os.path.join(root, f".import-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(staging, 0o700)
        _extract(src, staging, members)
        _verify_staged(staging, members)
        settle_live_runs(os.path.join(staging, DB_NAME))
        final = _rename_unique(staging, root, session_id)
        staging = ""
        _fsync_dir(root)
    except BaseException:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty: never another session's folder
        raise
    try:
        point_latest(final)
    except OSError as e:
        raise RuntimeError(
            f"imported the session into {final}, but could not point "
            f"{os.path.join(root, 'latest')} at it: {e}"
        ) from e
    return ImportResult(final, os.path.basename(final), len(members))


def _makedirs_tracked(path: str) -> list[str]:
    """os.makedirs that returns the folders it created, outermost first, for cleanup."""
    missing: list[str] = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created: list[str] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
            created.append(d)
        except FileExistsError:
            pass
    return created


def _corrupt(src: str, why: object) -> ValueError:
    return ValueError(f"archive is truncated or corrupt: {src}: {why}")


# tarfile and gzip report damage as several unrelated exception types.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _open_stream(src: str) -> tarfile.TarFile:
    # Stream mode ("r|*") reads strictly forward: one pass over a gzip archive, and no
    # seeking to offsets a crafted header might point anywhere.
    try:
        return tarfile.open(src, mode="r|*")
    except _READ_ERRORS as e:
        raise _corrupt(src, e) from e


def _iter_members(src: str, tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """Every file member with its checked name; directories are skipped, anything else
    that is not a regular file is refused."""
    try:
        for m in tar:
            name = _check_member(src, m)
            if m.isdir():
                continue
            yield m, name
    except _READ_ERRORS as e:
        raise _corrupt(src, e) from e


def _check_member(src: str, m: tarfile.TarInfo) -> str:
    name = m.name

    def unsafe(why: str) -> ValueError:
        return ValueError(f"archive {src}: unsafe member {name!r}: {why}")

    if not name or "\x00" in name or "\\" in name:
        raise unsafe("not a plain relative path")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise unsafe("absolute path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise unsafe("path with '..', '.' or an empty part")
    if not (m.isdir() or m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        kind = (
            "symlink"
            if m.issym()
            else "hard link"
            if m.islnk()
            else "device"
            if m.isdev() and not m.isfifo()
            else "fifo"
            if m.isfifo()
            else f"type {m.type!r}"
        )
        raise unsafe(f"{kind} (a session archive holds regular files only)")
    top = name.split("/", 1)[0]
    allowed = name in (MANIFEST, DB_NAME) or (top in (*_TREES, "logs") and "/" in name)
    if m.isdir():
        allowed = name in (*_TREES, "logs") or top in (*_TREES, "logs")
    if not allowed:
        raise ValueError(
            f"archive {src}: unexpected member {name!r}: a session archive holds only "
            f"{MANIFEST}, {DB_NAME}, logs/ and " + ", ".join(f"{t}/" for t in _TREES)
        )
    return name


def _copy_member(src: str, f: IO[bytes], out: IO[bytes] | None = None) -> tuple[str, int]:
    """sha256 and length of a member's data, copied to `out` when given. Read errors mean
    a damaged archive; write errors (a full disk) propagate as they are."""
    h = hashlib.sha256()
    n = 0
    while True:
        try:
            chunk = f.read(_CHUNK)
        except _READ_ERRORS as e:
            raise _corrupt(src, e) from e
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if out is not None:
            out.write(chunk)
    return h.hexdigest(), n


def _verify_archive(src: str) -> tuple[str, dict[str, Member]]:
    """Phase one of import: read the archive once, write nothing; return (id, members)."""
    found: dict[str, Member] = {}
    manifest_bytes: bytes | None = None
    with _open_stream(src) as tar:
        for m, name in _iter_members(src, tar):
            if name in found or (name == MANIFEST and manifest_bytes is not None):
                raise ValueError(
                    f"archive {src} holds {name!r} twice; refusing an ambiguous archive"
                )
            if name == MANIFEST and m.size > _MAX_MANIFEST_BYTES:
                raise ValueError(f"archive {src}: {MANIFEST} is {m.size} bytes, too big to be ours")
            try:
                f = tar.extractfile(m)
                assert f is not None  # regular files always have data
                if name == MANIFEST:
                    manifest_bytes = f.read()
                    continue
            except _READ_ERRORS as e:
                raise _corrupt(src, e) from e
            digest, n = _copy_member(src, f)
            if n != m.size:
                raise _corrupt(src, f"member {name!r} ends after {n} of {m.size} bytes")
            found[name] = Member(name, m.size, digest)
    if manifest_bytes is None:
        raise _corrupt(src, f"no {MANIFEST} (it is the last member of a session archive)")
    session_id, listed = _parse_manifest(src, manifest_bytes)

    missing = sorted(listed.keys() - found.keys())
    if missing:
        raise ValueError(
            f"archive {src}: member {missing[0]!r} is listed in {MANIFEST} but missing from "
            f"the archive ({len(missing)} missing in all)"
        )
    unlisted = sorted(found.keys() - listed.keys())
    if unlisted:
        raise ValueError(
            f"archive {src}: member {unlisted[0]!r} is in the archive but not listed in "
            f"{MANIFEST} ({len(unlisted)} unlisted in all)"
        )
    for name in sorted(listed):
        want, got = listed[name], found[name]
        if want.size != got.size:
            raise ValueError(
                f"archive {src}: member {name!r} has {got.size} bytes but {MANIFEST} says "
                f"{want.size}; it was truncated or tampered with"
            )
        if want.sha256 != got.sha256:
            raise ValueError(
                f"archive {src}: member {name!r} is corrupt or was tampered with: sha256 "
                f"{got.sha256[:12]}… does not match the manifest's {want.sha256[:12]}…"
            )
    return session_id, listed


def _parse_manifest(src: str, data: bytes) -> tuple[str, dict[str, Member]]:
    def bad(why: str) -> ValueError:
        return ValueError(f"archive {src}: {MANIFEST} is invalid: {why}")

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"archive {src} is not an OnTheFly session archive "
            f"(format {doc.get('format')!r}, expected {FORMAT!r})"
        )
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"archive {src} was written by a newer OnTheFly (format {version}); "
            "upgrade to import it"
        )
    session_id = doc.get("session_id")
    if (
        not isinstance(session_id, str)
        or not _SESSION_ID.match(session_id)
        or session_id == "latest"
    ):
        raise bad(f"session_id {session_id!r} is not a valid session id")
    entries = doc.get("members")
    if not isinstance(entries, list):
        raise bad("members must be a list")
    listed: dict[str, Member] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise bad(f"member entry {entry!r} is not an object")
        name, size, sha = entry.get("name"), entry.get("size"), entry.get("sha256")
        if not isinstance(name, str) or name == MANIFEST:
            raise bad(f"member name {name!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"member {name!r} has size {size!r}")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise bad(f"member {name!r} has sha256 {sha!r}")
        if name in listed:
            raise bad(f"member {name!r} is listed twice")
        listed[name] = Member(name, size, sha)
    if DB_NAME not in listed:
        raise bad(f"it lists no {DB_NAME}")
    return session_id, listed


def _extract(src: str, staging: str, members: dict[str, Member]) -> None:
    """Phase two: write the verified members into the staging folder, hashing again so an
    archive replaced between the two passes cannot slip through."""
    written: set[str] = set()
    with _open_stream(src) as tar:
        for m, name in _iter_members(src, tar):
            if name == MANIFEST:
                continue
            want = members.get(name)
            if want is None or name in written:
                raise ValueError(f"archive {src} changed while it was being imported ({name!r})")
            dest = os.path.join(staging, *name.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            # O_EXCL|O_NOFOLLOW: the staging folder is ours and fresh; never write through
            # anything that appeared in it.
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as out:
                try:
                    f = tar.extractfile(m)
                except _READ_ERRORS as e:
                    raise _corrupt(src, e) from e
                assert f is not None
                digest, n = _copy_member(src, f, out)
                out.flush()
                os.fsync(out.fileno())
            if (n, digest) != (want.size, want.sha256):
                raise ValueError(f"archive {src} changed while it was being imported ({name!r})")
            written.add(name)
    missing = members.keys() - written
    if missing:
        raise ValueError(
            f"archive {src} changed while it was being imported ({sorted(missing)[0]!r} missing)"
        )


def _verify_staged(staging: str, members: dict[str, Member]) -> None:
    for name in sorted(members):
        if name.endswith(".pt"):
            _check_weights_only(os.path.join(staging, *name.split("/")), name)
    problems = _db_integrity(os.path.join(staging, DB_NAME))
    if problems:
        raise ValueError(f"{DB_NAME} in the archive is damaged: {'; '.join(problems[:5])}")
    # What `sessions check` would flag, refused before the session is in place: a
    # checkpoint recorded with a path outside the session, a per-sample array that is not
    # a plain float array (an object array is a pickle), fork files that do not match.
    # (A checkpoint the export left out is not a problem: its run resumes from an earlier one.)
    flagged = [p for p in check_session(staging) if not p.endswith("is recorded but missing")]
    if flagged:
        raise ValueError(f"the archive's session is not sound: {'; '.join(flagged[:5])}")


LIVE_AT_EXPORT = "was running when exported"
"""Start of the reason an imported run that was live at export time ends with."""


def settle_live_runs(db_path: str) -> list[str]:
    """Runs (and workers) that were live when the session was exported: in the imported copy
    no process trains them, so they become `stopped`, with a reason that says what was live
    and how far it can go on. The generalist and race variants are what `onthefly resume`
    continues (from their latest checkpoint, or the beginning / the parent's checkpoint);
    other runs (forks, merges) are not continued, and the reason names their last checkpoint.
    Each change is also a `run_status` event, as the supervisor would have written it.
    Returns the run ids it stopped."""
    conn = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            return []
        live = ("pending", "running", "paused")
        rows = list(
            conn.execute(
                "SELECT run_id, kind, status, spec_json FROM runs WHERE status IN (?, ?, ?)"
                " ORDER BY created",
                live,
            )
        )
        if not rows:
            return []
        ended = None
        if "events" in tables:  # the export's last event: when it was live for the last time
            ended = conn.execute("SELECT MAX(t) FROM events").fetchone()[0]
        with conn:
            for run_id, kind, status, spec_json in rows:
                ck = None
                if "checkpoints" in tables:
                    ck = conn.execute(
                        "SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step DESC, t DESC"
                        " LIMIT 1",
                        (run_id,),
                    ).fetchone()
                spec = _loads(spec_json)
                race = isinstance(spec, dict) and isinstance(spec.get("race"), dict)
                at = f"its checkpoint at step {ck[0]}" if ck else ""
                if kind == "main":
                    how = f"`onthefly resume` continues it from {at or 'the beginning'}"
                elif race:
                    how = (
                        f"`onthefly resume` continues its race from {at or 'the parent checkpoint'}"
                    )
                else:
                    how = f"{at} remains" if at else "it had no checkpoint yet"
                why = f"{LIVE_AT_EXPORT} ({status}); {how}"
                conn.execute(
                    "UPDATE runs SET status = 'stopped', error = ?, ended = COALESCE(ended, ?)"
                    " WHERE run_id = ?",
                    (why, ended, run_id),
                )
                if "events" in tables:
                    conn.execute(
                        "INSERT INTO events(t, kind, run_id, payload) VALUES (?, 'run_status', ?, ?)",
                        (
                            time.time(),
                            run_id,
                            json.dumps({"status": "stopped", "previous": status, "error": why}),
                        ),
                    )
            if "workers" in tables:
                conn.execute(
                    "UPDATE workers SET state = 'stopped', ended = COALESCE(ended, ?),"
                    " error = CASE WHEN error = '' THEN ? ELSE error END"
                    " WHERE state NOT IN ('succeeded', 'failed', 'stopped')",
                    (ended, LIVE_AT_EXPORT),
                )
    except sqlite3.Error as e:
        raise ValueError(f"{DB_NAME} in the archive could not be updated: {e}") from e
    finally:
        conn.close()
    return [r[0] for r in rows]


def _check_weights_only(path: str, name: str) -> None:
    """Load with torch's weights_only unpickler, which only rebuilds tensors and plain
    containers: a pickle that would import or call anything is refused, not run."""
    import torch  # lazily: only import verification needs it

    try:
        # mmap: tensors are mapped, not read, so checking a large checkpoint is cheap.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes etc.: the verdict is what counts
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - any failure means "not safely loadable"
        raise ValueError(
            f"refusing to import: checkpoint {name!r} cannot be loaded with "
            f"torch.load(weights_only=True): {_load_reason(e)}"
        ) from e


def _load_reason(e: BaseException) -> str:
    """The line of torch's error that says what was refused, without its advice to retry
    with weights_only=False (exactly what must not be done with an imported file)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    reason = ""
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            # "...file an issue...: WeightsUnpickler error: <reason>", the reason on this line
            # or the next
            reason = ln.split("WeightsUnpickler error", 1)[1].lstrip(": ")
            if not reason and i + 1 < len(lines):
                reason = lines[i + 1]
            break
    if not reason:
        advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
        reason = next((ln for ln in lines if not ln.startswith(advice)), lines[0] if lines else "")
    reason = reason.split(". Please use", 1)[0]
    return f"{type(e).__name__}: {reason[:300]}"


def _db_integrity(path: str) -> list[str]:
    conn = sqlite3.connect(_ro_uri(path), uri=True)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
    except sqlite3.Error as e:
        return [str(e)]
    finally:
        conn.close()


def _rename_unique(staging: str, root: str, session_id: str) -> str:
    n = 0
    name = session_id
    while True:
        target = os.path.join(root, name)
        if not os.path.lexists(target):
            try:
                os.rename(staging, target)
                return target
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        n += 1
        name = f"{session_id}-imported-{n}"


# -------------------------------------------------------------------------------- check


def check_session(session_dir: str | os.PathLike[str]) -> list[str]:
    """Problems with a session on disk; an empty list means it is sound.

    Checks SQLite's integrity, that every recorded checkpoint exists and matches its
    recorded sha256, that every per-sample array loads with its dtype and agrees in
    length with the run's other arrays, and that no temp file from an interrupted write
    has been lying around for more than a minute.
    """
    sdir = os.path.realpath(os.fspath(session_dir))
    db = os.path.join(sdir, DB_NAME)
    if not os.path.isfile(db):
        return [f"{sdir} has no {DB_NAME}"]
    problems: list[str] = []
    try:
        conn = _connect(db)
        try:
            problems += [
                f"{DB_NAME}: {r[0]}" for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"
            ]
            ckpts = list(conn.execute("SELECT path, sha256 FROM checkpoints ORDER BY path"))
            runs = {r[0]: int(r[1]) for r in conn.execute("SELECT run_id, dataset_size FROM runs")}
            specs = list(conn.execute("SELECT run_id, spec_json FROM runs ORDER BY run_id"))
        finally:
            conn.close()
    except sqlite3.Error as e:
        return [*problems, f"{DB_NAME} cannot be read: {e}"]

    for rel, sha in ckpts:
        path = _inside(sdir, rel)
        if path is None:
            problems.append(f"checkpoint {rel!r} is recorded with a path outside the session")
        elif not os.path.isfile(path):
            problems.append(f"checkpoint {rel} is recorded but missing")
        else:
            actual = sha256_file(path)
            if actual != sha:
                problems.append(
                    f"checkpoint {rel} is corrupt: sha256 {actual[:12]}… != recorded {sha[:12]}…"
                )
    problems += _check_samples(sdir, runs)
    problems += _check_fork_files(sdir, specs)
    problems += _stray_temps(sdir)
    return problems


def _check_fork_files(sdir: str, specs: list[tuple[str, str]]) -> list[str]:
    """The selection files a run's spec names (a fork's indices) must be there: a fork
    cannot be resumed, replayed or browsed (`onthefly clusters`) without them."""
    problems: list[str] = []
    for run_id, spec_json in specs:
        try:
            spec = json.loads(spec_json or "{}")
        except ValueError:
            problems.append(f"run {run_id}: its spec is not valid JSON")
            continue
        rel = spec.get("indices_file") if isinstance(spec, dict) else None
        if not rel:
            continue
        path = _inside(sdir, str(rel))
        if path is None:
            problems.append(f"run {run_id}: indices file {rel!r} is outside the session")
        elif not os.path.isfile(path):
            problems.append(f"run {run_id}: its selection {rel} is missing")
    return problems


def _connect(db: str) -> sqlite3.Connection:
    # Read-only when possible; a WAL database whose -shm is missing needs a writable
    # connection to be read at all, and reading is all we do with it.
    try:
        conn = sqlite3.connect(_ro_uri(db), uri=True, timeout=30)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
        return conn
    except sqlite3.Error:
        return sqlite3.connect(db, timeout=30)


def _ro_uri(path: str) -> str:
    # Percent-encoded: a project folder may contain '?' or '#', which end a URI's path.
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"


def _inside(sdir: str, rel: str) -> str | None:
    path = os.path.realpath(os.path.join(sdir, rel))
    return path if path.startswith(sdir + os.sep) else None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_samples(sdir: str, runs: dict[str, int]) -> list[str]:
    problems: list[str] = []
    base = os.path.join(sdir, "samples")
    if not os.path.isdir(base):
        return problems
    for run_id in sorted(os.listdir(base)):
        rdir = os.path.join(base, run_id)
        if not os.path.isdir(rdir):
            continue
        if run_id not in runs:
            problems.append(f"samples/{run_id}/ belongs to no run in {DB_NAME}")
        lengths: dict[str, tuple[int, int]] = {}  # file -> (length, epoch; -1 for labels)
        for fn in sorted(os.listdir(rdir)):
            if _is_temp(fn):
                continue
            m = _SAMPLE_FILE.match(fn)
            if m:
                want, epoch = _SAMPLE_KINDS[m.group(1)], int(m.group(2))
            elif fn == "labels.npy":
                want, epoch = np.dtype(np.int64), -1
            else:
                continue
            rel = f"samples/{run_id}/{fn}"
            try:
                arr = np.load(os.path.join(rdir, fn), mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001 - any load failure is the problem to report
                problems.append(f"{rel} cannot be read: {e}")
                continue
            if arr.dtype != want or arr.ndim != 1:
                problems.append(f"{rel} is {arr.dtype}{list(arr.shape)}, expected 1-D {want}")
                continue
            lengths[fn] = (int(arr.shape[0]), epoch)
        problems += _check_lengths(run_id, runs.get(run_id, -1), lengths)
    return problems


def _check_lengths(run_id: str, size: int, lengths: dict[str, tuple[int, int]]) -> list[str]:
    """Every array of a run covers the same sample ids. With an unknown dataset size
    (iterable data) the arrays grow as ids arrive, so the latest epoch's arrays and the
    labels may be shorter than the finished epochs' -- never longer."""
    if not lengths:
        return []
    if size > 0:
        return [
            f"samples/{run_id}/{fn} has {n} entries but the run's dataset has {size} samples"
            for fn, (n, _) in sorted(lengths.items())
            if n != size
        ]
    latest = max(e for _, e in lengths.values())
    finished = {fn: n for fn, (n, e) in lengths.items() if 0 <= e < latest}
    full = max(n for n, _ in lengths.values())
    problems = []
    if len(set(finished.values())) > 1:
        problems.append(
            f"samples/{run_id}/: finished epochs' arrays differ in length "
            f"({', '.join(f'{fn}={n}' for fn, n in sorted(finished.items()))})"
        )
    elif finished:
        full = next(iter(finished.values()))
        for fn, (n, _) in sorted(lengths.items()):
            if n > full:
                problems.append(
                    f"samples/{run_id}/{fn} has {n} entries, more than the finished epochs' {full}"
                )
    return problems


def _stray_temps(sdir: str) -> list[str]:
    now = time.time()
    out = []
    for dirpath, _, filenames in os.walk(sdir):
        for fn in filenames:
            if not _is_temp(fn):
                continue
            path = os.path.join(dirpath, fn)
            with contextlib.suppress(FileNotFoundError):
                age = now - os.lstat(path).st_mtime
                if age > STRAY_TEMP_AGE_S:
                    out.append(
                        f"stray temp file {os.path.relpath(path, sdir)} ({age:.0f} s old) left by "
                        "an interrupted write; it is safe to delete"
                    )
    return sorted(out)


# -------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class CheckpointRow:
    """The fields of a `checkpoints` row that the keep policy looks at."""

    path: str
    run_id: str
    step: int
    t: float
    reason: str
    pinned: bool


def plan_prune(
    checkpoints: Iterable[CheckpointRow], referenced: set[str], keep_last: int
) -> list[CheckpointRow]:
    """Which checkpoints to delete (pure; `prune_checkpoints` applies it).

    Per run, these are always kept: pinned ones, any path in `referenced` (a fork's
    parent checkpoint, a run's last_checkpoint, a pending plan's checkpoint), the latest
    one, and the latest of each reason in KEEP_REASONS. If fewer than `keep_last` are
    kept that way, the rest of the budget goes to the newest others, non-cadence first
    (a checkpoint someone asked for outlives an automatic one). Everything else goes.
    """
    by_run: dict[str, list[CheckpointRow]] = {}
    for c in checkpoints:
        by_run.setdefault(c.run_id, []).append(c)
    victims: list[CheckpointRow] = []
    for rows in by_run.values():
        rows.sort(key=lambda c: (c.step, c.t))
        keep = {c.path for c in rows if c.pinned or os.path.normpath(c.path) in referenced}
        keep.add(rows[-1].path)
        for reason in KEEP_REASONS:
            last = [c for c in rows if c.reason == reason]
            if last:
                keep.add(last[-1].path)
        others = sorted(
            (c for c in rows if c.path not in keep),
            key=lambda c: (c.reason == "cadence", -c.step, -c.t),
        )
        budget = max(0, keep_last - len(keep))
        victims += others[budget:]
    return sorted(victims, key=lambda c: (c.run_id, c.step, c.t))


def prune_checkpoints(session_dir: str | os.PathLike[str], keep_last: int = 3) -> list[str]:
    """Delete checkpoints no run, fork, plan or pin refers to, beyond `keep_last` per run.

    Returns the removed paths (relative to the session, as recorded). The decision and
    the row deletions happen in one short write transaction (BEGIN IMMEDIATE), so a fork
    recorded concurrently either is seen or waits for us; files are first renamed to
    temp names and only unlinked after the commit, so a failed commit puts them back and
    a row never outlives its file or vice versa.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an integer >= 0, got {keep_last!r}")
    sdir = os.path.realpath(os.fspath(session_dir))
    db = os.path.join(sdir, DB_NAME)
    if not os.path.isfile(db):
        raise FileNotFoundError(f"{sdir} is not an OnTheFly session (no {DB_NAME})")
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    moved: list[tuple[str, str]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = [
                CheckpointRow(r[0], r[1], int(r[2]), float(r[3]), r[4], bool(r[5]))
                for r in conn.execute(
                    "SELECT path, run_id, step, t, reason, pinned FROM checkpoints"
                )
            ]
            referenced: set[str] = set()
            for spec_json, last in conn.execute("SELECT spec_json, last_checkpoint FROM runs"):
                referenced |= _strings(_loads(spec_json))
                if last:
                    referenced.add(last)
            for (card,) in conn.execute("SELECT card FROM plans"):
                referenced |= _strings(_loads(card))
            refs = {_rel_to(sdir, s) for s in referenced}
            victims = plan_prune(rows, refs, keep_last)
            for v in victims:
                path = _inside(sdir, v.path)
                if path is not None and os.path.lexists(path):
                    tomb = f"{path}.tmp-prune-{os.getpid()}"
                    os.rename(path, tomb)
                    moved.append((path, tomb))
                conn.execute("DELETE FROM checkpoints WHERE path = ?", (v.path,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            for path, tomb in reversed(moved):
                os.rename(tomb, path)
            raise
    finally:
        conn.close()
    for _, tomb in moved:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tomb)
    return [v.path for v in victims]


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text or "null")
    except ValueError:
        return None


def _strings(obj: Any) -> set[str]:
    """Every string anywhere in a JSON value: references hide at any depth (a fork's
    `checkpoint`, a merge's list of parent checkpoints, a plan card's selection)."""
    out: set[str] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if x.endswith(".pt"):
                out.add(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out


def _rel_to(sdir: str, path: str) -> str:
    """A reference as a normalized session-relative path (absolute ones inside the
    session are made relative, so either spelling protects the file)."""
    if os.path.isabs(path):
        real = os.path.realpath(path)
        if real.startswith(sdir + os.sep):
            path = os.path.relpath(real, sdir)
    return os.path.normpath(path)
