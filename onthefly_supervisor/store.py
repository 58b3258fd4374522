"""The session store: SQLite (WAL) for runs, lineage, metrics, events, checkpoints, evals
and plans; dense per-sample loss arrays as .npy files; checkpoints as files.

Layout (project-local, like lightning_logs/):

    .onthefly/sessions/<session-id>/
        session.db                      SQLite in WAL mode
        samples/<run>/epoch-NNNN.npy    float32[dataset_size], NaN = not seen that epoch
        checkpoints/<run>/step-NNNNNNNN.pt
        logs/                           worker stdout/stderr, error files
        connection.json                 host, port, token (0600) while a supervisor is live
    .onthefly/sessions/latest -> <session-id>
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onthefly_supervisor.lifecycle import RunStatus, check_run_transition

SCHEMA_VERSION = 1
SESSIONS_DIR = os.path.join(".onthefly", "sessions")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    parents TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, ended REAL,
    step INTEGER NOT NULL DEFAULT 0, epoch INTEGER NOT NULL DEFAULT 0,
    last_loss REAL, val_loss REAL, test_loss REAL, sample_steps INTEGER NOT NULL DEFAULT 0,
    dataset_size INTEGER NOT NULL DEFAULT -1, config_json TEXT NOT NULL DEFAULT '{}',
    spec_json TEXT NOT NULL DEFAULT '{}', last_checkpoint TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', fingerprint TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS edges (parent TEXT NOT NULL, child TEXT NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (parent, child));
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL, t REAL NOT NULL,
    loss REAL, lr REAL, grad_norm REAL, samples_per_s REAL, step_time_ms REAL,
    data_time_ms REAL, memory_mb REAL, extra TEXT, batch INTEGER
);
CREATE INDEX IF NOT EXISTS metrics_run_step ON metrics (run_id, step);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL,
    run_id TEXT NOT NULL DEFAULT '', payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    batch INTEGER NOT NULL, reason TEXT NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    t REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL, split TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    loss REAL, accuracy REAL, samples INTEGER NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', t REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, role TEXT NOT NULL, state TEXT NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0, attempt INTEGER NOT NULL DEFAULT 0, gpu TEXT NOT NULL DEFAULT '',
    exit_code INTEGER, exit_signal TEXT NOT NULL DEFAULT '', started REAL NOT NULL, ended REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, card TEXT NOT NULL
);
"""

_METRIC_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "samples_per_s",
    "step_time_ms",
    "data_time_ms",
    "memory_mb",
)


def new_session_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def sessions_root(project_dir: str = ".") -> str:
    return os.path.abspath(os.path.join(project_dir, SESSIONS_DIR))


def resolve_session(name: str | None, project_dir: str = ".") -> str:
    """Session folder for an id, 'latest', or a path; FileNotFoundError with a clear message."""
    root = sessions_root(project_dir)
    if name and os.path.isdir(name) and os.path.exists(os.path.join(name, "session.db")):
        return os.path.abspath(name)
    key = name or "latest"
    if "/" in key or key.startswith("."):
        raise FileNotFoundError(f"no session {key!r}")
    path = os.path.join(root, key)
    if not os.path.exists(os.path.join(path, "session.db")):
        if key == "latest":
            raise FileNotFoundError(
                f"no OnTheFly session in {root} (run `onthefly run SCRIPT` first)"
            )
        raise FileNotFoundError(f"no session {key!r} in {root} (see `onthefly sessions ls`)")
    return os.path.realpath(path)


def point_latest(session_dir: str) -> None:
    root = os.path.dirname(session_dir)
    link = os.path.join(root, "latest")
    tmp = os.path.join(root, f".latest-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.basename(session_dir), tmp)
    os.replace(tmp, link)


@dataclass
class RunRow:
    run_id: str
    name: str
    kind: str
    status: RunStatus
    parents: list[str]
    created: float
    ended: float | None = None
    step: int = 0
    epoch: int = 0
    last_loss: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None
    sample_steps: int = 0
    dataset_size: int = -1
    config: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: str = ""
    error: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["status"] = self.status.value
        return d


class Store:
    """Thread-safe access to one session's SQLite file (one connection, one lock)."""

    def __init__(self, session_dir: str, readonly: bool = False) -> None:
        self.dir = session_dir
        self.readonly = readonly
        path = os.path.join(session_dir, "session.db")
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            os.makedirs(session_dir, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(metrics)")}
            if "batch" not in cols:  # sessions written before the batch column existed
                self._db.execute("ALTER TABLE metrics ADD COLUMN batch INTEGER")
            self._db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- meta --------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    # -- runs --------------------------------------------------------------------------------
    def add_run(self, run: RunRow) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO runs(run_id, name, kind, status, parents, created, config_json, spec_json, dataset_size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    run.name,
                    run.kind,
                    run.status.value,
                    json.dumps(run.parents),
                    run.created,
                    json.dumps(run.config),
                    json.dumps(run.spec),
                    run.dataset_size,
                ),
            )
            for p in run.parents:
                db.execute(
                    "INSERT OR IGNORE INTO edges(parent, child, kind) VALUES (?, ?, ?)",
                    (p, run.run_id, run.kind),
                )

    def _row_to_run(self, r: sqlite3.Row) -> RunRow:
        return RunRow(
            run_id=r["run_id"],
            name=r["name"],
            kind=r["kind"],
            status=RunStatus(r["status"]),
            parents=json.loads(r["parents"]),
            created=r["created"],
            ended=r["ended"],
            step=r["step"],
            epoch=r["epoch"],
            last_loss=r["last_loss"],
            val_loss=r["val_loss"],
            test_loss=r["test_loss"],
            sample_steps=r["sample_steps"],
            dataset_size=r["dataset_size"],
            config=json.loads(r["config_json"]),
            spec=json.loads(r["spec_json"]),
            last_checkpoint=r["last_checkpoint"],
            error=r["error"],
            fingerprint=r["fingerprint"],
        )

    def runs(self) -> list[RunRow]:
        return [
            self._row_to_run(r) for r in self.query("SELECT * FROM runs ORDER BY created, run_id")
        ]

    def run(self, run_id: str) -> RunRow | None:
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return self._row_to_run(rows[0]) if rows else None

    def find_run(self, ref: str) -> RunRow | None:
        """A run by id, else by unique name."""
        ref = ref or "main"
        r = self.run(ref)
        if r is not None:
            return r
        rows = self.query("SELECT * FROM runs WHERE name = ? ORDER BY created DESC", (ref,))
        return self._row_to_run(rows[0]) if rows else None

    def set_run_status(self, run_id: str, status: RunStatus, error: str | None = None) -> RunStatus:
        """The one place a run's status changes; returns the old status."""
        with self.tx() as db:
            rows = list(db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)))
            if not rows:
                raise KeyError(run_id)
            old = RunStatus(rows[0]["status"])
            check_run_transition(old, status)
            ended = time.time() if status.terminal else None
            db.execute(
                "UPDATE runs SET status = ?, ended = ? WHERE run_id = ?",
                (status.value, ended, run_id),
            )
            if error is not None:
                db.execute("UPDATE runs SET error = ? WHERE run_id = ?", (error, run_id))
            return old

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {
            "step",
            "epoch",
            "last_loss",
            "val_loss",
            "test_loss",
            "sample_steps",
            "dataset_size",
            "config_json",
            "last_checkpoint",
            "error",
            "fingerprint",
            "name",
            "spec_json",
        }
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown run fields {bad}")
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*fields.values(), run_id))

    def edges(self) -> list[tuple[str, str, str]]:
        return [(r["parent"], r["child"], r["kind"]) for r in self.query("SELECT * FROM edges")]

    # -- metrics -----------------------------------------------------------------------------
    def add_metrics(
        self, run_id: str, points: list[dict[str, Any]], sample_steps: int | None = None
    ) -> None:
        """Insert step metrics and move the run's step/epoch/loss (and compute) forward, in one
        transaction: the supervisor's per-flush database work stays one commit."""
        rows = [
            (
                run_id,
                p["step"],
                p["epoch"],
                p["time"],
                *(p.get(k) for k in _METRIC_KEYS),
                json.dumps(p["extra"]) if p.get("extra") else None,
                p.get("batch"),
            )
            for p in points
        ]
        last = points[-1]
        with self.tx() as db:
            db.executemany(
                "INSERT INTO metrics(run_id, step, epoch, t, loss, lr, grad_norm, samples_per_s,"
                " step_time_ms, data_time_ms, memory_mb, extra, batch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(
                "UPDATE runs SET step = ?, epoch = ?, last_loss = ?, sample_steps = COALESCE(?, sample_steps) WHERE run_id = ?",
                (last["step"], last["epoch"], last.get("loss"), sample_steps, run_id),
            )

    def metric_series(
        self, run_id: str, key: str, from_step: int = 0, to_step: int = 0, last: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a metric; `last` > 0 keeps only the newest points (cheap)."""
        rows: list[Any]
        if key in _METRIC_KEYS:
            sql = f"SELECT step, {key} FROM metrics WHERE run_id = ? AND step >= ?"
            args: tuple[Any, ...] = (run_id, from_step)
            if to_step:
                sql += " AND step <= ?"
                args += (to_step,)
            if last > 0:
                rows = self.query(sql + " ORDER BY step DESC LIMIT ?", (*args, last))[::-1]
            else:
                rows = self.query(sql + " ORDER BY step", args)
        elif key.endswith("_loss") or key.endswith("_accuracy"):
            split, _, what = key.rpartition("_")
            col = "loss" if what == "loss" else "accuracy"
            sql = f"SELECT step, {col} FROM evals WHERE run_id = ? AND split = ? AND step >= ?"
            args = (run_id, split, from_step)
            if to_step:
                sql += " AND step <= ?"
                args += (to_step,)
            rows = self.query(sql + " ORDER BY step", args)
        else:
            rows = []
            for r in self.query(
                "SELECT step, extra FROM metrics WHERE run_id = ? AND extra IS NOT NULL AND step >= ? ORDER BY step",
                (run_id, from_step),
            ):
                v = json.loads(r["extra"]).get(key)
                if v is not None and (not to_step or r["step"] <= to_step):
                    rows.append((r["step"], v))
            if not rows:
                raise KeyError(key)
        steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vals = np.fromiter(
            (np.nan if r[1] is None else r[1] for r in rows), dtype=np.float64, count=len(rows)
        )
        return steps, vals

    # -- evals / checkpoints / workers ------------------------------------------------------
    def add_eval(
        self,
        run_id: str,
        split: str,
        step: int,
        epoch: int,
        loss: float,
        accuracy: float,
        samples: int,
        metrics: dict[str, float],
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    split,
                    step,
                    epoch,
                    _fin(loss),
                    _fin(accuracy),
                    samples,
                    json.dumps(metrics),
                    time.time(),
                ),
            )
            if split in ("val", "test"):
                db.execute(
                    f"UPDATE runs SET {split}_loss = ? WHERE run_id = ?", (_fin(loss), run_id)
                )

    def evals(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM evals", tuple[str, ...]()
        if run_id:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        return [dict(r) for r in self.query(sql + " ORDER BY t", args)]

    def add_checkpoint(
        self,
        run_id: str,
        path: str,
        sha256: str,
        step: int,
        epoch: int,
        batch: int,
        reason: str,
        nbytes: int,
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE((SELECT pinned FROM checkpoints WHERE path = ?), 0))",
                (path, run_id, step, epoch, batch, reason, sha256, nbytes, time.time(), path),
            )
            db.execute("UPDATE runs SET last_checkpoint = ? WHERE run_id = ?", (path, run_id))

    def checkpoints(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM checkpoints", tuple[str, ...]()
        if run_id:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        return [dict(r) for r in self.query(sql + " ORDER BY step, t", args)]

    def latest_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step DESC, t DESC LIMIT 1",
            (run_id,),
        )
        return dict(rows[0]) if rows else None

    def discard_after(self, run_id: str, step: int) -> list[str]:
        """Forget a run's abandoned timeline after a rollback to `step`: its metrics, evals
        and checkpoints past that step (returns the checkpoint paths, for the caller to delete)."""
        with self.tx() as db:
            paths = [
                r["path"]
                for r in db.execute(
                    "SELECT path FROM checkpoints WHERE run_id = ? AND step > ?", (run_id, step)
                )
            ]
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, step))
            db.execute("DELETE FROM evals WHERE run_id = ? AND step > ?", (run_id, step))
            db.execute("DELETE FROM checkpoints WHERE run_id = ? AND step > ?", (run_id, step))
            # The run's summary columns describe the timeline that is left.
            db.execute(
                "UPDATE runs SET"
                " val_loss = (SELECT loss FROM evals WHERE run_id = ?1 AND split = 'val' ORDER BY t DESC LIMIT 1),"
                " test_loss = (SELECT loss FROM evals WHERE run_id = ?1 AND split = 'test' ORDER BY t DESC LIMIT 1),"
                " last_checkpoint = COALESCE((SELECT path FROM checkpoints WHERE run_id = ?1 ORDER BY step DESC, t DESC LIMIT 1), ''),"
                " step = ?2"
                " WHERE run_id = ?1",
                (run_id, step),
            )
        return paths

    def pin_checkpoint(self, path: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE checkpoints SET pinned = 1 WHERE path = ?", (path,))

    def upsert_worker(self, w: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    w["worker_id"],
                    w["run_id"],
                    w["role"],
                    w["state"],
                    w.get("pid", 0),
                    w.get("attempt", 0),
                    w.get("gpu", ""),
                    w.get("exit_code"),
                    w.get("exit_signal", ""),
                    w.get("started", time.time()),
                    w.get("ended"),
                    w.get("error", ""),
                ),
            )

    def workers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM workers ORDER BY started")]

    # -- events ------------------------------------------------------------------------------
    def add_event(self, kind: str, run_id: str, payload: dict[str, Any], t: float) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO events(t, kind, run_id, payload) VALUES (?, ?, ?, ?)",
                (t, kind, run_id, json.dumps(payload, allow_nan=False, default=str)),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def events_after(self, seq: int, limit: int = 1000) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))

    def last_epochs(self) -> dict[str, dict[str, Any]]:
        """{run_id: the payload of its last epoch_end event} (epoch, step, train_loss: the
        mean of that epoch's finite per-sample losses, nonfinite_steps)."""
        rows = self.query(
            "SELECT run_id, payload FROM events WHERE seq IN "
            "(SELECT MAX(seq) FROM events WHERE kind = 'epoch_end' GROUP BY run_id)"
        )
        return {r["run_id"]: json.loads(r["payload"]) for r in rows}

    def last_seq(self) -> int:
        rows = self.query("SELECT MAX(seq) AS m FROM events")
        return int(rows[0]["m"] or 0)

    # -- plans -------------------------------------------------------------------------------
    def put_plan(self, plan_id: str, status: str, card: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO plans VALUES (?, COALESCE((SELECT created FROM plans WHERE plan_id = ?), ?), ?, ?)",
                (plan_id, plan_id, time.time(), status, json.dumps(card)),
            )

    def plans(self) -> list[dict[str, Any]]:
        out = []
        for r in self.query("SELECT * FROM plans ORDER BY created"):
            card = json.loads(r["card"])
            card["status"] = r["status"]
            out.append(card)
        return out

    def integrity_check(self) -> list[str]:
        problems = [r[0] for r in self.query("PRAGMA integrity_check") if r[0] != "ok"]
        for c in self.checkpoints():
            p = os.path.join(self.dir, c["path"])
            if not os.path.exists(p):
                problems.append(f"checkpoint {c['path']} is recorded but missing")
        return problems


def _fin(x: float | None) -> float | None:
    if x is None:
        return None
    return float(x) if np.isfinite(x) else None


class SampleArrays:
    """Dense per-run arrays, one numpy scatter per message.

    kinds: "loss" (float32, NaN = unseen; `epoch-NNNN.npy`), "margin" (float32, NaN;
    `margin-NNNN.npy`), "pred" (int64, -1; `pred-NNNN.npy`) per epoch, and "labels"
    (int64, -1; `labels.npy`) once per run.
    """

    _FILL: dict[str, tuple[Any, Any]] = {
        "loss": (np.float32, np.nan),
        "margin": (np.float32, np.nan),
        "pred": (np.int64, -1),
        "labels": (np.int64, -1),
    }

    def __init__(self, session_dir: str) -> None:
        self.dir = os.path.join(session_dir, "samples")
        self._arrays: dict[tuple[str, int, str], np.ndarray] = {}
        self._dirty: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()
        # Held for a whole persist (copy + write): two persists at once (an epoch end and a
        # fork's selection) could otherwise share a temp file, or write an older copy of an
        # array after a newer one.
        self._persist_lock = threading.Lock()
        self.ingested = 0

    def path(self, run_id: str, epoch: int, kind: str = "loss") -> str:
        if kind == "labels":
            return os.path.join(self.dir, run_id, "labels.npy")
        prefix = "epoch" if kind == "loss" else kind
        return os.path.join(self.dir, run_id, f"{prefix}-{epoch:04d}.npy")

    def _array(self, run_id: str, epoch: int, size: int, kind: str) -> np.ndarray:
        key = (run_id, epoch if kind != "labels" else -1, kind)
        arr = self._arrays.get(key)
        if arr is None:
            p = self.path(run_id, epoch, kind)
            dtype, fill = self._FILL[kind]
            if os.path.exists(p):
                arr = np.load(p).astype(dtype, copy=True)
            else:
                arr = np.full(size, fill, dtype=dtype)
            self._arrays[key] = arr
        if arr.size < size:  # unknown dataset size (IterableDataset): grow
            dtype, fill = self._FILL[kind]
            grown = np.full(size, fill, dtype=dtype)
            grown[: arr.size] = arr
            arr = self._arrays[key] = grown
        return arr

    def ingest(
        self,
        run_id: str,
        epoch: int,
        size: int,
        ids: np.ndarray,
        losses: np.ndarray,
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        if ids.shape != losses.shape:
            raise ValueError(f"ids ({ids.size}) and losses ({losses.size}) differ in length")
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise ValueError(f"sample id {lo} is negative")
        if size > 0 and hi >= size:
            raise ValueError(f"sample id {hi} is outside the training dataset (size {size})")
        n = size if size > 0 else hi + 1
        with self._lock:
            arr = self._array(run_id, epoch, n, "loss")
            arr[ids] = losses
            self._dirty.add((run_id, epoch, "loss"))
            for kind, values in (extras or {}).items():
                if values.shape != ids.shape:
                    raise ValueError(
                        f"{kind} ({values.size}) and ids ({ids.size}) differ in length"
                    )
                a = self._array(run_id, epoch, n, kind)
                if kind == "labels" and np.array_equal(a[ids], values):
                    continue  # the same labels every epoch: not rewritten each time
                a[ids] = values
                self._dirty.add((run_id, epoch if kind != "labels" else -1, kind))
            self.ingested += int(ids.size)

    def drop_epochs_after(self, run_id: str, epoch: int) -> None:
        """Forget a run's per-sample arrays of epochs after `epoch` (in memory and on disk):
        a rollback to a checkpoint in `epoch` abandons them."""
        with self._lock:
            later = [e for e in self.epochs(run_id) if e > epoch]
            for key in [k for k in self._arrays if k[0] == run_id and k[1] > epoch]:
                del self._arrays[key]
                self._dirty.discard(key)
            for e in later:
                for kind in self._FILL:
                    if kind != "labels":  # one array for the whole run, not per epoch
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path(run_id, e, kind))

    def get(self, run_id: str, epoch: int, kind: str = "loss") -> np.ndarray | None:
        key = (run_id, epoch if kind != "labels" else -1, kind)
        with self._lock:
            arr = self._arrays.get(key)
            if arr is not None:
                return arr.copy()
        p = self.path(run_id, epoch, kind)
        return np.load(p) if os.path.exists(p) else None

    def epochs(self, run_id: str) -> list[int]:
        found = {e for (r, e, k) in self._arrays if r == run_id and k == "loss"}
        d = os.path.join(self.dir, run_id)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.startswith("epoch-") and name.endswith(".npy") and ".tmp" not in name:
                    with contextlib.suppress(ValueError):
                        found.add(int(name[6:-4]))
        return sorted(found)

    def persist(
        self, only: tuple[str, int] | None = None, run: str | None = None, before: int | None = None
    ) -> None:
        """Write dirty arrays atomically (temp + rename); cheap to call often. `only`: one
        run's epoch (and its labels); `run`: every dirty array of that run (with `before`:
        of its epochs before that one, and its labels)."""
        with self._persist_lock:
            with self._lock:
                if run is not None:
                    keys = sorted(
                        k for k in self._dirty if k[0] == run and (before is None or k[1] < before)
                    )
                elif only is not None:
                    keys = [
                        k
                        for k in self._dirty
                        if (k[0], k[1]) == only or (k[0] == only[0] and k[2] == "labels")
                    ]
                else:
                    keys = sorted(self._dirty)
                items = [(k, self._arrays[k].copy()) for k in keys]
                for k in keys:
                    self._dirty.discard(k)
            for (run_id, epoch, kind), arr in items:
                p = self.path(run_id, epoch, kind)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                tmp = f"{p}.tmp-{os.getpid()}.npy"
                try:
                    np.save(tmp, arr)
                    os.replace(tmp, p)
                except BaseException:
                    with self._lock:  # not on disk: the next persist tries again
                        if (run_id, epoch, kind) in self._arrays:
                            self._dirty.add((run_id, epoch, kind))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise

    def evict(self, run_id: str, before_epoch: int) -> None:
        """Drop finished epochs from memory once persisted (bounded supervisor memory)."""
        self.persist(run=run_id, before=before_epoch)
        with self._lock:
            for key in [k for k in self._arrays if k[0] == run_id and 0 <= k[1] < before_epoch]:
                if key not in self._dirty:
                    del self._arrays[key]
