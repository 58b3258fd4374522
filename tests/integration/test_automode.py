"""Automode end to end: detectors on live streams -> plan cards -> actions -> report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PY, ROOT, SCRIPTS, cli, cli_json, start

SMALL = SCRIPTS / "train_small.py"
SEQ = SCRIPTS / "train_seq.py"


def _automode(
    project: Path, script: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            PY,
            "-m",
            "onthefly_supervisor",
            "run",
            "--automode",
            "--headless",
            "--port",
            "0",
            str(script),
            *args,
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _report(project: Path) -> dict:  # type: ignore[type-arg]
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    return json.loads((sdir / "report.json").read_text())


def test_nan_batch_is_rolled_back_and_skipped_and_the_run_finishes(tmp_path: Path) -> None:
    # Sample 77 reads as NaN (once: a storage glitch). Its batch makes the loss NaN and,
    # through BatchNorm, poisons the running statistics even though the update is skipped;
    # the planner rolls back to the checkpoint before it and skips that batch.
    r = _automode(
        tmp_path,
        SMALL,
        "--nan-sample",
        "77",
        "--nan-once-file",
        str(tmp_path / "glitch"),
        "--epochs",
        "3",
        "--step-sleep",
        "0.04",
        "--fork-step-sleep",
        "0",  # what automode does after the rollback is not this test's subject
        "--checkpoint-every",
        "5",
        "--test",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _report(tmp_path)
    stab = [p for p in rep["plans"] if p["action"] == "stabilize" and p["reason"] == "nonfinite"]
    assert stab, [(p["action"], p["reason"]) for p in rep["plans"]]
    assert stab[0]["status"] == "done"
    rb = stab[0]["diagnostics"]["outcome"]["rollback"]
    bad_step = stab[0]["training_recipe"]["offending_steps"][0]
    assert f"non-finite loss at step {bad_step} " in r.stdout
    assert rb["to_step"] < bad_step and rb["to_step"] % 5 == 0  # the last good checkpoint
    assert rb["skipped"][0]["step"] == bad_step and rb["skipped"][0]["epoch"] == 0
    main = next(x for x in rep["runs"] if x["run_id"] == "main")
    assert main["status"] == "completed"
    # The batch is recorded as skipped, and it was not trained: one step fewer than 3 epochs.
    skipped = main["spec"]["skipped_batches"]
    assert [(b["epoch"], b["batch"], b["step"]) for b in skipped] == [
        (0, rb["skipped"][0]["batch"], bad_step)
    ]
    assert main["step"] == 3 * 16 - 1
    assert main["test_loss"] is not None, "clean BatchNorm statistics after the rollback"
    sdir = (tmp_path / ".onthefly" / "sessions" / "latest").resolve()
    epoch0 = np.load(sdir / "samples" / "main" / "epoch-0000.npy")
    unseen = np.flatnonzero(~np.isfinite(epoch0))
    assert 77 in unseen and unseen.size == 32, "exactly the skipped batch is unseen in epoch 0"
    assert "rollback to checkpoints/main/" in r.stdout and "skipping 1 batch(es)" in r.stdout
    assert "plan plan-" in r.stdout  # cards are printed as they happen
    assert {"baseline_test_loss", "best_test_loss"} <= set(rep["comparison"])
    assert r.stdout.count("report: ") == 1, r.stdout  # once, not again by the planner
    # The text lineage shows the rollback and the skipped batch, as `runs --json` has them.
    runs_text = cli("runs", cwd=tmp_path)
    assert runs_text.returncode == 0, runs_text.stderr
    main_line = next(x for x in runs_text.stdout.splitlines() if "└─ main " in x)
    assert f"rolled back 1x (step {rb['from_step']} -> {rb['to_step']}" in main_line, main_line
    assert f"skipped batches 0:{rb['skipped'][0]['batch']} (step {bad_step})" in main_line
    # The session has ended: `plans` reads its cards from the store.
    plans = cli("plans", cwd=tmp_path)
    assert plans.returncode == 0, plans.stderr
    assert stab[0]["plan_id"] in plans.stdout and "need a live one" in plans.stdout


def test_plateau_explore_races_variants_to_a_winner(tmp_path: Path) -> None:
    # lr=0: the loss cannot move, the textbook plateau. The planner looks about once a
    # second (~30 steps here); batches of 128 keep the batch-loss noise low (~3%) so the
    # plateau test fires on most looks. 40 epochs (640 steps, ~25 s) leave the race room to
    # end before main does: automode proposes no explore whose winner would come too late
    # (a fork start-up per rung and its steps, at the measured paces).
    r = _automode(
        tmp_path,
        SMALL,
        "--lr",
        "0",
        "--epochs",
        "40",
        "--n",
        "2048",
        "--batch-size",
        "128",
        "--step-sleep",
        "0.03",
        "--fork-step-sleep",
        "0",  # main's pace sets the race's room; its variants and baseline need not crawl
        "--val",
        "--test",
        "--slices",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _report(tmp_path)
    explore = [p for p in rep["plans"] if p["action"] == "explore"]
    assert explore, [(p["action"], p["reason"], p["status"]) for p in rep["plans"]]
    card = explore[0]
    assert card["reason"] == "loss_plateau" and card["status"] == "done", card
    out = card["diagnostics"]["outcome"]
    race = out["race"]
    assert race["status"] == "done" and race["metric"] == "val"
    # ASHA by default; with 3 variants and eta 3 the first promotion waits for all three.
    assert race["mode"] == "asha" and race["finished"]["0"].keys() == set(race["runs"])
    runs = {x["run_id"]: x for x in rep["runs"]}
    variants = [x for x in runs.values() if x["name"].startswith(card["plan_id"])]
    assert sorted(x["run_id"] for x in variants) == sorted(race["runs"])
    assert len(variants) == len(card["training_recipe"]["variants"]) >= 2
    winner = runs[race["winner"]]
    # Sent on to the full budget, the winner trains it or stops early (explore cards
    # early-stop on the val loss: patience 3, an evaluation every budget/10 steps; at lr 0
    # only moving statistics can still change it).
    es = winner["spec"].get("early_stopped")
    assert winner["status"] == "completed", winner
    if es is None:
        assert winner["step"] == race["rungs"][-1]
    else:
        assert es["metric"] == "val" and es["evals"] >= 3 and es["patience"] == 3
        assert winner["step"] == es["step"] < race["rungs"][-1]
    for x in variants:
        if x["run_id"] != race["winner"]:
            assert x["status"] == "stopped" and "lost the race at rung 1" in x["error"], x
            assert x["step"] == race["rungs"][0]  # compared at equal steps
    assert race["history"][0]["promoted"] == [race["winner"]]
    # Every arm is equally stuck at lr 0: the tie goes to the x1 arm, the lr stays.
    assert race["recipes"][race["winner"]]["lr_mul"] == 1.0
    assert out["summary"].startswith(race["race_id"]) and "winner" in out["summary"]
    # The card says which multipliers it races (all three unless the children cap trimmed it).
    raced = "/".join(f"x{v['lr_mul']:g}" for v in card["training_recipe"]["variants"])
    assert card["diagnostics"]["variants"].startswith("races lr x1/"), card["diagnostics"]
    assert len(raced.split("/")) == 3 or "children cap" in card["diagnostics"]["variants"]
    # Per-slice validation losses are reported and the slices are marked in the training set.
    splits = {e["split"] for e in rep["evals"] if e["run_id"] == "main"}
    assert {"val", "val_slice:label0", "val_slice:label1"} <= splits
    sdir = (tmp_path / ".onthefly" / "sessions" / "latest").resolve()
    assert (sdir / "slices" / "label1.train.npy").exists()


def test_fork_variants_race_ends_with_one_winner_and_stopped_losers(tmp_path: Path) -> None:
    live = start(tmp_path, SMALL, "--epochs", "2", "--n", "256", "--val", extra=("--keep-alive",))
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=120)
        bad = cli("fork", "--select", "all", "--variants", "0", cwd=tmp_path)
        assert bad.returncode != 0 and "--variants 0: must be >= 1" in bad.stderr
        small = cli(
            "fork", "--select", "all", "--variants", "8", "--budget-steps", "4", cwd=tmp_path
        )
        assert small.returncode != 0 and "too small to race 8 variants" in small.stderr
        r = cli(
            "fork",
            "--select",
            "quantile:0.5:1.0",
            "--variants",
            "4",
            "--budget-steps",
            "24",
            "--race-mode",
            "sync",
            "--wait",
            "--json",
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        race = json.loads(r.stdout[r.stdout.index("{") :])["race"]
        assert race["status"] == "done" and race["rungs"] == [6, 12, 24]
        assert race["mode"] == "sync"  # every rung decided at once: the counts are exact
        assert [len(h["ranked"]) for h in race["history"]] == [4, 2]
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=tmp_path)["runs"]}
        variants = [runs[v] for v in race["runs"]]
        assert all(v["parents"] == ["main"] and v["kind"] == "fork" for v in variants)
        winner = runs[race["winner"]]
        assert winner["status"] == "completed" and winner["step"] == 24
        losers = [v for v in variants if v["run_id"] != race["winner"]]
        assert len(losers) == 3 and all(v["status"] == "stopped" for v in losers)
        assert sorted(v["step"] for v in losers) == [6, 6, 12]  # stopped at their rung
        assert all("lost the race at rung" in v["error"] for v in losers)
        for v in losers:  # --wait names every loser, with its last rung and score
            assert f"{v['run_id']} stopped: lost the race at rung " in r.stdout + r.stderr, r.stderr
        # The lr multipliers were spread over one decade around 1.
        muls = sorted(m["lr_mul"] for m in race["recipes"].values())
        assert muls[0] == pytest.approx(10**-0.5) and muls[-1] == pytest.approx(10**0.5)
    finally:
        live.proc.send_signal(signal.SIGINT)
        live.finish(60)


def test_hard_regime_gets_fork_and_gate_and_the_report_shows_it(tmp_path: Path) -> None:
    r = _automode(tmp_path, SEQ, "--epochs", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _report(tmp_path)
    actions = {(p["action"], p["status"]) for p in rep["plans"]}
    assert ("fork", "done") in actions, actions
    assert ("gate", "done") in actions, actions
    kinds = {x["kind"] for x in rep["runs"]}
    assert {"main", "fork", "moe"} <= kinds
    # A fork's header line gives its selection's size, not the whole dataset's.
    fork = next(x for x in rep["runs"] if x["kind"] == "fork")
    assert f"{fork['run_id']}: " in r.stdout
    header = next(x for x in r.stdout.splitlines() if f"] {fork['run_id']}: " in x)
    assert f" {fork['spec']['samples']} of {fork['dataset_size']} samples (" in header, header
    c = rep["comparison"]
    assert c["baseline_is_matched_compute"] is True
    base = next(x for x in rep["runs"] if x["run_id"] == c["baseline_run"])
    extra = sum(
        x["sample_steps"] for x in rep["runs"] if x["run_id"] not in ("main", c["baseline_run"])
    )
    moe = next(x for x in rep["runs"] if x["kind"] == "moe")
    assert moe["sample_steps"] > 0, "gate training is counted as compute"
    assert abs(base["sample_steps"] - extra) <= 0.01 * extra, (
        "baseline gets the same extra compute (to a batch)"
    )
    assert c["baseline_test_loss"] is not None and c["best_test_loss"] is not None
    html = (tmp_path / ".onthefly" / "sessions" / "latest" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Plan timeline" in html and "moe-1" in html
    _open_in_chromium((tmp_path / ".onthefly" / "sessions" / "latest" / "report.html").resolve())
    out = tmp_path / "again"
    r2 = cli("report", "-o", str(out), cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert (
        json.loads((out / "report.json").read_text())["comparison"]["baseline_run"]
        == c["baseline_run"]
    )


def _open_in_chromium(page: Path) -> None:
    node = shutil.which("node")
    pw = ROOT / "vscode-extension" / "node_modules" / "playwright-core"
    if not (node and pw.exists() and Path("/usr/bin/chromium").exists()):
        # `make test` installs all three, so under CI a missing piece is a failure.
        assert not os.environ.get("CI"), "node, playwright-core or /usr/bin/chromium is missing"
        pytest.skip(
            "headless Chromium check needs node, playwright-core (make ext-deps) and Debian chromium"
        )
    js = f"""
const {{ chromium }} = require({json.dumps(str(pw))});
(async () => {{
  const b = await chromium.launch({{ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] }});
  const p = await b.newPage();
  const errors = [];
  p.on('pageerror', e => errors.push(String(e)));
  p.on('console', m => {{ if (m.type() === 'error') errors.push(m.text()); }});
  await p.goto('file://{page}');
  const imgs = await p.$$eval('img', xs => xs.map(i => [i.alt, i.naturalWidth]));
  console.log(JSON.stringify({{ errors, imgs }}));
  await b.close();
}})();
"""
    res = subprocess.run([node, "-e", js], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert len(out["imgs"]) >= 3 and all(w > 0 for _, w in out["imgs"]), out["imgs"]


def test_manual_mode_cards_wait_for_approval(tmp_path: Path) -> None:
    # A NaN loss at step 30: a stabilize card for the live run (approved while it trains).
    live = start(
        tmp_path, SMALL, "--epochs", "60", "--step-sleep", "0.02", "--nan-at-step", "30",
        extra=("--keep-alive",),
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        plans: list[dict] = []  # type: ignore[type-arg]
        while time.time() < deadline:
            plans = cli_json("plans", cwd=tmp_path).get("plans", [])
            if plans:
                break
            time.sleep(0.5)
        assert plans, "the planner proposed nothing"
        card = plans[0]
        assert card["status"] == "proposed"  # automode off: it waits
        time.sleep(2)
        again = json.loads(cli("plans", "--json", cwd=tmp_path).stdout)["plans"][0]
        assert again["status"] == "proposed"
        bad = cli("edit", card["plan_id"], "nonsense=1", cwd=tmp_path)
        assert bad.returncode != 0 and "cannot edit nonsense" in bad.stderr
        if card["action"] == "fork":
            ok = cli("edit", card["plan_id"], "budget_steps=25", cwd=tmp_path)
            assert ok.returncode == 0, ok.stderr
        r = cli("approve", card["plan_id"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 120
        status = ""
        while time.time() < deadline:
            cur = {p["plan_id"]: p for p in cli_json("plans", cwd=tmp_path)["plans"]}
            status = cur[card["plan_id"]]["status"]
            if status in ("done", "failed"):
                break
            time.sleep(0.5)
        assert status == "done", cur[card["plan_id"]]
        r = cli("approve", card["plan_id"], cwd=tmp_path)
        assert r.returncode != 0 and "not proposed" in r.stderr
        r = cli("reject", "plan-9999", cwd=tmp_path)
        assert r.returncode != 0 and "no plan" in r.stderr
    finally:
        live.proc.send_signal(signal.SIGINT)
        live.finish(60)


def test_a_race_goes_on_after_the_supervisor_is_killed_and_resumed(tmp_path: Path) -> None:
    live = start(
        tmp_path, SMALL, "--epochs", "2", "--n", "256", "--step-sleep", "0.02",
        extra=("--keep-alive",),
    )  # fmt: skip
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=120)
        r = cli(
            "fork", "--select", "all", "--variants", "2", "--budget-steps", "400",
            "--json", cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        reply = json.loads(r.stdout[r.stdout.index("{") :])
        race_id = reply["payload"]["race"]

        def variants_started(s: dict) -> bool:  # type: ignore[type-arg]
            steps = [x["step"] for x in s["runs"] if x["run_id"].startswith("fork-")]
            return len(steps) == 2 and min(steps) >= 10  # rung 1 is at step 200

        live.wait_for(variants_started, timeout=120, every=0.1)
    finally:
        live.proc.kill()  # SIGKILL: the variants' workers die with it, mid-rung
        live.proc.wait(10)
    sdir = (tmp_path / ".onthefly" / "sessions" / "latest").resolve()
    r = cli("resume", "--headless", "--port", "0", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{race_id} resumes (asha): restarting fork-1 from " in r.stdout, r.stdout
    import sqlite3

    db = sqlite3.connect(sdir / "session.db")
    race = json.loads(
        db.execute("SELECT value FROM meta WHERE key = ?", (f"race:{race_id}",)).fetchone()[0]
    )
    runs = {row[0]: row[1:] for row in db.execute("SELECT run_id, status, step FROM runs")}
    db.close()
    assert race["status"] == "done", race
    assert runs[race["winner"]] == ("completed", 400)
    loser = next(x for x in race["runs"] if x != race["winner"])
    assert runs[loser] == ("stopped", race["rungs"][0])


def test_a_single_fork_left_by_a_killed_supervisor_is_marked_stopped_on_resume(
    tmp_path: Path,
) -> None:
    """`onthefly resume` continues the training run, not a single fork that was running:
    the fork is marked stopped saying how to start it again (not left 'running' forever,
    nor told that resume continues it)."""
    # ~15 s of training: the fork starts (a second process on 2 busy cores) well before it ends.
    live = start(tmp_path, SMALL, "--epochs", "12", "--n", "256", "--step-sleep", "0.15")
    try:
        live.wait_for(lambda s: live.main_run(s)["step"] >= 3, timeout=120)
        r = cli("fork", "--select", "all", "--budget-steps", "400", cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

        def fork_trains(s: dict) -> bool:  # type: ignore[type-arg]
            return any(x["run_id"] == "fork-1" and x["step"] >= 1 for x in s["runs"])

        live.wait_for(fork_trains, timeout=120, every=0.1)
        assert live.main_run(live.status())["status"] == "running"
    finally:
        live.proc.kill()  # SIGKILL: it marks nothing; its workers die with it
        live.proc.wait(10)
    r = cli("resume", "--headless", "--port", "0", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = {x["run_id"]: x for x in cli_json("runs", cwd=tmp_path)["runs"]}
    assert runs["main"]["status"] == "completed", runs["main"]
    assert runs["fork-1"]["status"] == "stopped", runs["fork-1"]
    assert runs["fork-1"]["error"] == (
        "left unfinished by the previous supervisor; `onthefly resume` does not continue a "
        "single fork run: `onthefly fork` starts it again"
    ), runs["fork-1"]
