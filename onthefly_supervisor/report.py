"""The session report: report.json (numbers) + report.html (the same, with real plots).

Built from the store alone, so it works on a live or a finished session:
loss curves per run, per-sample loss histograms per epoch, the lineage graph, the plan
timeline, health verdicts, and the matched-compute comparison against the monolithic
baseline (the generalist trained on for the compute the specialists used).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from typing import Any

import numpy as np

from onthefly_supervisor.store import SampleArrays, Store


def _fig_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def build(
    session_dir: str, baseline_run: str = "", blocked: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    st = Store(session_dir, readonly=True)
    try:
        runs = [r.to_dict() for r in st.runs()]
        for r in runs:
            r.pop("config", None)
        evals = st.evals()
        plans = st.plans()
        edges = st.edges()
        health = [
            json.loads(r["payload"])
            for r in st.query("SELECT payload FROM events WHERE kind = 'health' ORDER BY seq")
        ]
        meta = {k: st.get_meta(k) for k in ("script", "argv", "seed", "project", "created")}
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for r in runs:
            steps, vals = st.metric_series(r["run_id"], "loss")
            if steps.size:
                k = max(1, steps.size // 2000)
                curves[r["run_id"]] = (steps[::k].tolist(), vals[::k].tolist())
    finally:
        st.close()
    arrays = SampleArrays(session_dir)
    hist: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        for e in arrays.epochs(r["run_id"]):
            a = arrays.get(r["run_id"], e)
            if a is None:
                continue
            seen = a[np.isfinite(a)]
            if not seen.size:
                continue
            counts, edges_ = np.histogram(seen, bins=40)
            q = np.quantile(seen, [0.5, 0.9, 0.99])
            hist.setdefault(r["run_id"], []).append(
                {
                    "epoch": e,
                    "counts": counts.tolist(),
                    "edges": edges_.tolist(),
                    "p50": float(q[0]),
                    "p90": float(q[1]),
                    "p99": float(q[2]),
                    "seen": int(seen.size),
                }
            )
    by_id = {r["run_id"]: r for r in runs}
    # A merge that lost to the run it merged into (automode's verdict on its card) is shown
    # as rejected and is no candidate for the best run.
    for p in plans:
        out = (p.get("diagnostics") or {}).get("outcome") or {}
        if out.get("verdict") == "rejected":
            for rid in out.get("runs") or ():
                if rid in by_id:
                    by_id[rid]["rejected"] = str(out.get("summary") or "rejected")
    candidates = [
        r
        for r in runs
        if r["run_id"] != baseline_run
        and r["status"] == "completed"
        and r["test_loss"] is not None
        and not r.get("rejected")
    ]
    # The best run is chosen on its val loss (choosing on test would make its test loss
    # optimistic); only when no candidate has one, on test, and the report says so.
    on_val = [r for r in candidates if _num(r.get("val_loss")) is not None]
    chosen_on = "val" if on_val else "test"
    best = (
        min(on_val, key=lambda r: r["val_loss"])
        if on_val
        else (min(candidates, key=lambda r: r["test_loss"]) if candidates else None)
    )
    base = by_id.get(baseline_run) if baseline_run else None
    main = by_id.get("main")
    comparison: dict[str, Any] = {
        "baseline_run": baseline_run or None,
        "baseline_test_loss": _num(base["test_loss"])
        if base
        else (_num(main["test_loss"]) if main and not baseline_run else None),
        "baseline_is_matched_compute": bool(base),
        "best_run": best["run_id"] if best else None,
        "best_chosen_on": chosen_on if best else None,
        "best_test_loss": _num(best["test_loss"]) if best else None,
        "compute_sample_steps": {r["run_id"]: r["sample_steps"] for r in runs},
    }
    if comparison["baseline_test_loss"] and comparison["best_test_loss"] is not None:
        comparison["best_over_baseline"] = (
            comparison["best_test_loss"] / comparison["baseline_test_loss"]
        )
    return {
        "format": "onthefly-report",
        "version": 1,
        "session_id": os.path.basename(os.path.realpath(session_dir)),
        "generated": time.time(),
        "meta": meta,
        "runs": runs,
        "lineage": [{"parent": p, "child": c, "kind": k} for p, c, k in edges],
        "evals": evals,
        "plans": plans,
        "blocked": blocked or [],
        "health": health,
        "histograms": hist,
        "curves": {k: {"steps": v[0], "loss": v[1]} for k, v in curves.items()},
        "comparison": comparison,
    }


def render_html(rep: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs: list[tuple[str, str]] = []
    if rep["curves"]:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for run_id, c in rep["curves"].items():
            ax.plot(c["steps"], c["loss"], label=run_id, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("Loss curves per run")
        imgs.append(("Loss curves", _fig_png(fig)))
    main_h: list[dict[str, Any]] = rep["histograms"].get("main") or next(
        iter(rep["histograms"].values()), []
    )
    if main_h:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for h in main_h:
            e = np.asarray(h["edges"])
            ax.stairs(h["counts"], e, label=f"epoch {h['epoch']} (p90 {h['p90']:.3g})")
        ax.set_xlabel("per-sample training loss")
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)
        ax.set_title("Per-sample loss per epoch (main)")
        imgs.append(("Per-sample loss histograms", _fig_png(fig)))
    if rep["runs"]:
        depth: dict[str, int] = {}
        parents = {r["run_id"]: r["parents"] for r in rep["runs"]}

        def d(run: str, seen: frozenset[str] = frozenset()) -> int:
            if run in depth:
                return depth[run]
            ps = [p for p in parents.get(run, []) if p not in seen]
            depth[run] = 0 if not ps else 1 + max(d(p, seen | {run}) for p in ps)
            return depth[run]

        for r in rep["runs"]:
            d(r["run_id"])
        cols: dict[int, list[str]] = {}
        for r in rep["runs"]:
            cols.setdefault(depth[r["run_id"]], []).append(r["run_id"])
        pos = {run: (dep, -i) for dep, runs in cols.items() for i, run in enumerate(runs)}
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.5 * max(len(v) for v in cols.values()))))
        for e in rep["lineage"]:
            if e["parent"] in pos and e["child"] in pos:
                (x0, y0), (x1, y1) = pos[e["parent"]], pos[e["child"]]
                ax.annotate(
                    "",
                    xy=(x1, y1),
                    xytext=(x0, y0),
                    arrowprops={"arrowstyle": "->", "color": "#888"},
                )
        colors = {
            "completed": "#2a9d8f",
            "failed": "#e76f51",
            "running": "#e9c46a",
            "stopped": "#999",
            "pending": "#ccc",
            "paused": "#8ab",
        }
        status = {r["run_id"]: r["status"] for r in rep["runs"]}
        kinds = {r["run_id"]: r["kind"] for r in rep["runs"]}
        for run, (x, y) in pos.items():
            ax.text(
                x,
                y,
                f"{run}\n{kinds[run]}",
                ha="center",
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round", "fc": colors.get(status[run], "#ccc")},
            )
        ax.set_xlim(-0.6, max(cols) + 0.6)
        ax.set_ylim(min(y for _, y in pos.values()) - 0.6, 0.6)
        ax.axis("off")
        ax.set_title("Lineage")
        imgs.append(("Lineage graph", _fig_png(fig)))

    def esc(x: Any) -> str:
        return html.escape("—" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x)))

    c = rep["comparison"]
    rows = "".join(
        f"<tr><td>{esc(r['run_id'])}</td><td>{esc(r['kind'])}</td><td>{esc(r['status'] + (' · rejected' if r.get('rejected') else ''))}</td><td>{esc(', '.join(r['parents']))}</td>"
        f"<td>{esc(r['val_loss'])}</td><td>{esc(r['test_loss'])}</td><td>{esc(r['sample_steps'])}</td><td>{esc(r.get('rejected') or r['error'])}</td></tr>"
        for r in rep["runs"]
    )
    plans = "".join(
        f"<tr><td>{esc(p.get('plan_id'))}</td><td>{esc(p.get('created_step'))}</td><td>{esc(p.get('action'))}</td><td>{esc(p.get('reason'))}</td>"
        f"<td>{esc(p.get('selection'))}</td><td>{esc(p.get('status'))}</td><td>{esc((p.get('diagnostics') or {}).get('summary'))}</td>"
        f"<td>{esc(json.dumps((p.get('diagnostics') or {}).get('outcome'), default=str))}</td></tr>"
        for p in rep["plans"]
    )
    health = "".join(
        f"<tr><td>{esc(v.get('check'))}</td><td>{esc(v.get('verdict'))}</td><td>{esc(v.get('hint'))}</td></tr>"
        for h in rep["health"]
        for v in (h.get("verdicts") or [])
    )
    figs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
        for t, b in imgs
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>OnTheFly report {esc(rep["session_id"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ddd;padding:3px 6px}}img{{max-width:100%}}</style></head>
<body><h1>OnTheFly session {esc(rep["session_id"])}</h1>
<p>script {esc(rep["meta"].get("script"))} {esc(" ".join(rep["meta"].get("argv") or []))} · seed {esc(rep["meta"].get("seed"))}</p>
<h2>Matched-compute comparison</h2>
<table id="comparison"><tr><th>baseline</th><th>baseline test loss</th><th>best run (lowest {esc(c.get("best_chosen_on") or "val")} loss; the baseline is the yardstick, not a candidate)</th><th>best test loss</th><th>best / baseline</th></tr>
<tr><td>{esc(c.get("baseline_run") or "main (no matched-compute baseline in this session: `onthefly run --automode` trains one)")}</td><td>{esc(c.get("baseline_test_loss"))}</td><td>{esc(c.get("best_run"))}</td><td>{esc(c.get("best_test_loss"))}</td><td>{esc(c.get("best_over_baseline"))}</td></tr></table>
<h2>Runs</h2><table id="runs"><tr><th>run</th><th>kind</th><th>status</th><th>parents</th><th>val loss</th><th>test loss</th><th>sample-steps</th><th>error</th></tr>{rows}</table>
{figs}
<h2>Plan timeline</h2><table id="plans"><tr><th>plan</th><th>step</th><th>action</th><th>reason</th><th>selection</th><th>status</th><th>why</th><th>outcome</th></tr>{plans}</table>
<h2>Health checks</h2><table id="health"><tr><th>check</th><th>verdict</th><th>hint</th></tr>{health or "<tr><td colspan=3>none run</td></tr>"}</table>
</body></html>"""


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: they become null (a diverged loss is still reported)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_report(
    session_dir: str,
    out_dir: str,
    baseline_run: str = "",
    blocked: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    rep = _finite(build(session_dir, baseline_run, blocked))
    os.makedirs(out_dir, exist_ok=True)
    jp = os.path.join(out_dir, "report.json")
    hp = os.path.join(out_dir, "report.html")
    for path, text in (
        (jp, json.dumps(rep, indent=1, default=str, allow_nan=False)),
        (hp, render_html(rep)),
    ):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return {"json": jp, "html": hp}
