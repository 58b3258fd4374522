"""The terminal view: a live rich display on a terminal, plain log lines otherwise.

It follows the event bus like any other client, so what it shows is exactly what the
dashboard and the CLI see.
"""

from __future__ import annotations

import collections
import math
import re
import sys
import threading
import time
from typing import Any

from onthefly_supervisor.events import Event
from onthefly_supervisor.pool import location
from onthefly_supervisor.supervisor import Supervisor


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def plan_status(card: dict[str, Any]) -> str:
    """A plan card's status as shown: 'done · rejected' for a merge that ran but lost to its
    target (the outcome's verdict), else the status."""
    status = str(card.get("status", ""))
    verdict = ((card.get("diagnostics") or {}).get("outcome") or {}).get("verdict")
    return f"{status} · {verdict}" if verdict else status


def _nonfinite_note(p: dict[str, Any]) -> str:
    """' (11 non-finite steps left out)' after an epoch's train loss, when it had any."""
    n = int(p.get("nonfinite_steps") or 0)
    return f" ({n} non-finite step{'s' if n != 1 else ''} left out)" if n else ""


def _epoch_of(epoch: Any, of: int) -> str:
    """An epoch as a person counts it, like `python train.py` prints it: 1-based, "2/10"
    when the run ends after a known count of epochs (not a fork or a max_steps run, which
    end on steps; the store keeps 0-based numbers: epoch-0001.npy)."""
    if not isinstance(epoch, int):
        return str(epoch)
    return f"{epoch + 1}/{of}" if of > 0 else str(epoch + 1)


class RunView:
    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.sps: float | None = None
        self.p50: float | None = None
        self.p90: float | None = None
        self.p99: float | None = None
        self.steps_per_epoch = 0
        self.max_epochs = 0
        self.max_steps = 0
        self.status = "pending"
        self.t0 = time.time()
        self.step0 = 0
        # (time of a step, samples trained since the previous entry): the wall-clock rate
        # over the last ~10 s, pauses, epoch ends and evaluations included.
        self.rate_window: collections.deque[tuple[float, float]] = collections.deque()

    def add_rate(self, times: list[Any], sps: list[Any], step_ms: list[Any]) -> None:
        """Each step's samples are its samples/s times its step time."""
        n = 0.0
        for r, ms in zip(sps, step_ms, strict=False):
            ok = isinstance(r, (int, float)) and isinstance(ms, (int, float))
            if ok and math.isfinite(r) and math.isfinite(ms):
                n += r * ms / 1000.0
        if not times or not isinstance(times[-1], (int, float)):
            return
        w = self.rate_window
        w.append((float(times[-1]), n))
        while len(w) > 2 and w[-1][0] - w[1][0] > 10.0:
            w.popleft()
        span = w[-1][0] - w[0][0]
        if len(w) >= 2 and span > 0:
            self.sps = sum(k for _, k in list(w)[1:]) / span
        elif self.sps is None:
            # The first batch of steps: their own median rate until the window spans two.
            rates = sorted(
                float(r) for r in sps if isinstance(r, (int, float)) and math.isfinite(r) and r > 0
            )
            if rates:
                self.sps = rates[len(rates) // 2]

    @property
    def total_steps(self) -> int:
        if self.max_steps:
            return self.max_steps
        return self.steps_per_epoch * self.max_epochs if self.steps_per_epoch > 0 else 0

    def eta(self) -> str:
        total = self.total_steps
        done = self.step - self.step0
        if not total or done <= 0:
            return "—"
        rate = done / max(1e-6, time.time() - self.t0)
        left = (total - self.step) / rate if rate > 0 else math.inf
        if not math.isfinite(left):
            return "—"
        m, s = divmod(int(left), 60)
        return f"{m}:{s:02d}"


class TerminalView:
    def __init__(self, sup: Supervisor, rich_mode: bool | None = None, from_seq: int = 0) -> None:
        self.sup = sup
        self.from_seq = from_seq
        self.rich = sys.stdout.isatty() if rich_mode is None else rich_mode
        self.runs: dict[str, RunView] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_plain = 0.0
        self._errors: list[str] = []  # worker root causes printed so far
        self._notes: set[str] = set()  # notes printed so far, their numbers left out
        self._console: Any = None
        self._live: Any = None
        self.sup.output_hooks.append(self.on_output)

    def start(self) -> None:
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live(
                self._render(), console=self._console, refresh_per_second=4, transient=False
            )
            self._live.start()
        self._thread = threading.Thread(target=self._follow, name="onthefly-tui", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def print(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def on_output(self, wid: str, line: str) -> None:
        prefix = "" if wid.startswith("main-") else f"[{wid}] "
        self.print(prefix + line)

    def _follow(self) -> None:
        for ev in self.sup.bus.follow(
            self.from_seq, alive=lambda: not self._stop.is_set(), poll_s=0.25
        ):
            try:
                self._on_event(ev)
            except Exception as e:  # the view must never take the supervisor down
                self.print(f"[onthefly] view error: {e}")
            if self._live is not None:
                self._live.update(self._render())

    def _run(self, run_id: str) -> RunView:
        return self.runs.setdefault(run_id, RunView())

    def _samples(self, run_id: str, dataset_size: Any) -> str:
        """What a run trains on: the dataset's size, or for a fork its selection's size (the
        worker reports the whole dataset, whose ids the selection indexes)."""
        try:
            run = self.sup.store.run(run_id)
        except Exception:  # noqa: BLE001 - the header goes on without the selection
            run = None
        spec = run.spec if run is not None else {}
        if isinstance(spec.get("samples"), int):
            sel = spec.get("selection")
            return f"{spec['samples']} of {dataset_size} samples" + (f" ({sel})" if sel else "")
        return f"{dataset_size} samples"

    def _said(self, text: str) -> bool:
        """Whether `text` repeats a worker error already printed (the same root cause comes
        back as the worker's failure and the run's status)."""
        return any(m and m in text for m in self._errors)

    def _noted(self, text: str) -> bool:
        """Whether a note like `text` (the same words, other numbers) was printed already;
        remembers it otherwise."""
        shape = re.sub(r"\d+(\.\d+)?", "#", text)
        if shape in self._notes:
            return True
        self._notes.add(shape)
        return False

    def _on_event(self, ev: Event) -> None:
        p = ev.payload
        rv = self._run(ev.run_id) if ev.run_id else None
        k = ev.kind
        if k == "attached" and rv is not None:
            rv.steps_per_epoch = int(p.get("steps_per_epoch") or 0)
            rv.max_epochs = int(p.get("max_epochs") or 0)
            rv.max_steps = int(p.get("max_steps") or 0)
            rv.t0 = time.time()
            self.print(
                f"[onthefly] {ev.run_id}: {p.get('model')} on {p.get('device')} · {self._samples(ev.run_id, p.get('dataset_size'))} · {rv.steps_per_epoch} steps/epoch"
            )
        elif k == "metrics" and rv is not None:
            steps = p.get("step") or []
            if steps:
                if rv.step == 0:
                    rv.step0 = steps[0] - 1
                    rv.t0 = time.time()
                rv.step = steps[-1]
                rv.epoch = (p.get("epoch") or [0])[-1]
                rv.loss = (p.get("loss") or [None])[-1]
                rv.add_rate(
                    p.get("time") or [], p.get("samples_per_s") or [], p.get("step_time_ms") or []
                )
                if not self.rich and time.time() - self._last_plain > 5.0:
                    self._last_plain = time.time()
                    self.print(
                        f"[onthefly] {ev.run_id} step {rv.step} epoch {rv.epoch + 1} loss {_fmt(rv.loss)} · {_fmt(rv.sps, 3)} samples/s"
                    )
        elif k == "samples" and rv is not None:
            rv.p50, rv.p90, rv.p99 = p.get("p50"), p.get("p90"), p.get("p99")
        elif k == "eval" and rv is not None:
            if p.get("split") == "val":
                rv.val_loss = p.get("loss")
            acc = p.get("accuracy")
            self.print(
                f"[onthefly] {ev.run_id} {p.get('split')} loss {_fmt(p.get('loss'))}"
                + (f" · accuracy {_fmt(acc)}" if acc is not None else "")
                + f" (step {p.get('step')})"
            )
        elif k == "epoch_end" and rv is not None:
            self.print(
                f"[onthefly] {ev.run_id} epoch {_epoch_of(p.get('epoch'), 0 if rv.max_steps else rv.max_epochs)} done · train loss {_fmt(p.get('train_loss'))}{_nonfinite_note(p)} · p50/p90/p99 {_fmt(rv.p50)}/{_fmt(rv.p90)}/{_fmt(rv.p99)}"
            )
        elif k == "early_stop":
            best = p.get("best")
            shown = (
                f"best {best:.4g} at step {p.get('best_step')}"
                if isinstance(best, float)
                else "no finite value"
            )
            self.print(
                f"[onthefly] {ev.run_id} stopped early at step {p.get('step')}: {p.get('metric')} "
                f"loss did not improve in {p.get('patience')} evaluations ({shown})"
            )
        elif k == "run_status" and rv is not None:
            if rv.status == "paused" and p.get("status") == "running":
                # The rate and the ETA start again from the resume: a window spanning the
                # pause read as a few samples/s.
                rv.rate_window.clear()
                rv.sps = None
                rv.t0, rv.step0 = time.time(), rv.step
            rv.status = str(p.get("status"))
            if p.get("status") == "failed" and self._session_ends_on(ev.run_id):
                pass  # its last line says "main run failed: <cause>"
            elif p.get("status") in ("paused", "completed", "failed", "stopped"):
                err = str(p.get("error") or "")
                extra = f": {err}" if err and not self._said(err) else ""
                self.print(f"[onthefly] {ev.run_id} {p.get('status')}{extra}")
        elif k == "log":
            lvl = p.get("level", "info")
            text = str(p.get("text", ""))
            if lvl == "debug":
                pass  # housekeeping (pruning...): in the store's events, not on the terminal
            elif (
                lvl == "error"
                and text.startswith(("the script exited with code ", "the script failed after "))
                and self._session_ends_on(ev.run_id)
            ):
                pass  # its last line says the same
            elif lvl == "error" and re.match(r"worker \S+ failed: ", text) and self._said(text):
                pass  # "worker X failed: <root cause>": printed with its traceback already
            elif lvl == "note" and self._noted(text):
                pass  # every fork of a script would say the same (in the store's events)
            elif (
                lvl in ("warning", "error", "note")  # a note: said once, on purpose
                or ev.run_id == ""
                or "resum" in text
                or "paused" in text
            ):
                self.print(
                    f"[onthefly] {lvl}: {text}"
                    if lvl in ("warning", "error")
                    else f"[onthefly] {ev.run_id}: {text}"
                    if lvl == "note"
                    else f"[onthefly] {text}"
                )
        elif k == "error":
            where = location(p.get("filename"), p.get("lineno"))
            self._errors.append(str(p.get("message") or ""))
            self.print(f"[onthefly] error in {p.get('worker_id')}: {p.get('message')}{where}")
        elif k == "checkpoint" and p.get("reason") in ("pause", "stop", "final", "request"):
            self.print(f"[onthefly] {ev.run_id} checkpoint {p.get('path')} ({p.get('reason')})")
        elif k == "plan":
            self.print(
                f"[onthefly] plan {p.get('plan_id')}: {p.get('action')} ({p.get('reason')}) → {plan_status(p)}"
            )

    def _session_ends_on(self, run_id: str) -> bool:
        """Whether this event of `run_id` ends the session, whose last line (printed by
        `onthefly run`) then gives its cause: the main run's, with nothing keeping it open."""
        return run_id == "main" and not (self.sup.cfg.keep_alive or self.sup.bus.dashboards)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        sup = self.sup
        parts.append(
            Text(
                f"OnTheFly · session {sup.session_id} · tcp://127.0.0.1:{sup.port} · {sup.cfg.script}",
                style="bold",
            )
        )
        for run_id, rv in self.runs.items():
            total = rv.total_steps or max(rv.step, 1)
            bar = ProgressBar(total=total, completed=min(rv.step, total), width=40)
            line = Table.grid(padding=(0, 1))
            line.add_row(
                Text(f"{run_id:>10}"),
                bar,
                Text(
                    f"{rv.step}/{rv.total_steps or '?'} · epoch {rv.epoch + 1} · ETA {rv.eta()} · {rv.status}"
                ),
            )
            parts.append(line)
            parts.append(
                Text(
                    f"{'':>10} loss {_fmt(rv.loss)} · val {_fmt(rv.val_loss)} · {_fmt(rv.sps, 3)} samples/s · "
                    f"per-sample p50/p90/p99 {_fmt(rv.p50)}/{_fmt(rv.p90)}/{_fmt(rv.p99)}"
                )
            )
        table = Table(title=None, show_edge=False, header_style="bold")
        for col in ("worker", "run", "role", "state", "pid", "gpu", "step"):
            table.add_column(col)
        with sup.lock:
            workers = list(sup.workers.values())
        for w in workers[-8:]:
            table.add_row(
                w.spec.worker_id,
                w.spec.run_id,
                w.spec.role.value,
                # A training thread without progress for a heartbeat or more: for how long.
                w.state.value + (f" · stalled {w.stalled_s:.0f} s" if w.stalled_s >= 2 else ""),
                str(w.pid),
                w.spec.gpu or "cpu",
                str(w.step),
            )
        parts.append(table)
        return Group(*parts)
