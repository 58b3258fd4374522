"""Fork specialists as processes, gate them, merge them, export the MoE: end to end."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PY, SCRIPTS, cli, cli_json, start

SEQ = SCRIPTS / "train_seq.py"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    project = tmp_path_factory.mktemp("method")
    live = start(project, SEQ, extra=("--keep-alive",))
    live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=120)
    yield live
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGINT)
        live.finish(60)


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_fork_quantile_runs_as_its_own_process(session) -> None:
    out = _ok(
        cli(
            "fork",
            "--select",
            "quantile:0.8:1.0",
            "--budget-steps",
            "30",
            "--wait",
            cwd=session.cwd,
            timeout=180,
        )
    )
    assert "fork-1 completed" in out
    runs = {r["run_id"]: r for r in cli_json("runs", cwd=session.cwd)["runs"]}
    fork = runs["fork-1"]
    assert fork["parents"] == ["main"] and fork["kind"] == "fork"
    assert fork["step"] == 30
    assert fork["sample_steps"] == 5 * 180  # 30 steps = 5 passes over the 180 selected samples
    spec = fork["spec"]
    idx = np.load(session.session_dir / spec["indices_file"])
    assert idx.size == spec["samples"] == 180  # top 20% of 900
    # Only selected samples were trained on: the fork's per-sample array is NaN elsewhere.
    arr = np.load(session.session_dir / "samples" / "fork-1" / "epoch-0000.npy")
    seen = np.flatnonzero(np.isfinite(arr))
    assert set(seen.tolist()) <= set(idx.tolist())
    evals = {e["split"] for e in fork["evals"]}
    assert {"slice:self", "val"} <= evals
    # Its slice loss is reported before its first step (the parent's weights) and at the
    # end, measured the same way: the gain is like for like.
    own = [(e["step"], e["loss"]) for e in fork["evals"] if e["split"] == "slice:self"]
    assert [s for s, _ in own] == [0, 30] and all(v is not None for _, v in own)
    st = session.wait_for(
        lambda s: any(w["run_id"] == "fork-1" and w["state"] == "succeeded" for w in s["workers"])
    )
    w = next(w for w in st["workers"] if w["run_id"] == "fork-1")
    main_pid = next(x for x in st["workers"] if x["run_id"] == "main")["pid"]
    assert w["role"] == "fork" and w["pid"] != main_pid


def test_fork_kmeans_with_adapters_then_adapter_fuse(session) -> None:
    out = _ok(
        cli(
            "fork",
            "--select",
            "kmeans:auto",
            "--budget-steps",
            "20",
            "--adapters",
            "4",
            "--wait",
            cwd=session.cwd,
            timeout=180,
        )
    )
    assert "completed" in out, out
    run_id = out.split(":")[0]
    out = _ok(cli("merge", "--method", "adapter_fuse", run_id, cwd=session.cwd, timeout=180))
    assert "completed" in out, out


@pytest.mark.parametrize("method", ["swa", "fisher_soup", "distill"])
def test_merge_methods_make_new_runs(session, method: str) -> None:
    if "fork-1" not in {r["run_id"] for r in cli_json("runs", cwd=session.cwd)["runs"]}:
        _ok(
            cli(
                "fork",
                "--select",
                "quantile:0.8:1.0",
                "--budget-steps",
                "30",
                "--wait",
                cwd=session.cwd,
                timeout=180,
            )
        )
    out = _ok(cli("merge", "--method", method, "main", "fork-1", cwd=session.cwd, timeout=300))
    assert "completed" in out, out
    run_id = out.split(":")[0]
    runs = {r["run_id"]: r for r in cli_json("runs", cwd=session.cwd)["runs"]}
    r = runs[run_id]
    assert r["kind"] == "merge" and r["parents"] == ["main", "fork-1"]
    assert r["val_loss"] is not None and r["test_loss"] is not None
    assert runs["main"]["status"] == "completed"  # the parent stays the catch-all


def test_compare_fills_the_slice_matrix_that_runs_shows(session) -> None:
    if "fork-1" not in {r["run_id"] for r in cli_json("runs", cwd=session.cwd)["runs"]}:
        _ok(
            cli(
                "fork", "--select", "quantile:0.8:1.0", "--budget-steps", "30", "--wait",
                cwd=session.cwd, timeout=180,
            )
        )  # fmt: skip
    before = _ok(cli("runs", cwd=session.cwd))
    assert "`onthefly compare` adds each run's loss on every other run's slice" in before
    doc = cli_json("runs", cwd=session.cwd)
    fork = next(r for r in doc["runs"] if r["run_id"] == "fork-1")
    assert fork["slice_loss"] is not None and f"own slice {fork['slice_loss']:.4g}" in before
    # Explicit slices: other tests of this module's session may have made more forks.
    out = _ok(
        cli("compare", "main", "fork-1", "--slices", "val", "fork-1", cwd=session.cwd, timeout=300)
    )
    assert out.splitlines()[0].split() == ["run", "val", "fork-1"], out
    assert [line.split()[0] for line in out.splitlines()[1:3]] == ["main", "fork-1"]
    after = _ok(cli("runs", cwd=session.cwd))
    assert "loss of each run on each slice (`onthefly compare`," in after
    assert out.splitlines()[0] in after  # the same matrix, from the store
    cmp = cli_json("runs", cwd=session.cwd)["comparison"]
    assert cmp["runs"] == ["main", "fork-1"] and cmp["slices"] == ["val", "fork-1"]
    assert len(cmp["losses"]) == 4 and all(v is not None for v in cmp["losses"])
    # The fork-1 row on its own slice is the slice loss the fork reported itself.
    own = cmp["losses"][3]
    assert abs(own - fork["slice_loss"]) < 1e-3 * max(1.0, abs(own)), (own, fork["slice_loss"])


def test_gate_and_moe_export_round_trip(session, tmp_path: Path) -> None:
    if "fork-1" not in {r["run_id"] for r in cli_json("runs", cwd=session.cwd)["runs"]}:
        _ok(
            cli(
                "fork",
                "--select",
                "quantile:0.8:1.0",
                "--budget-steps",
                "30",
                "--wait",
                cwd=session.cwd,
                timeout=180,
            )
        )
    # --json with the default wait: stdout is one JSON document (progress goes to stderr).
    g = cli("gate", "main", "fork-1", "--json", cwd=session.cwd, timeout=300)
    assert g.returncode == 0, g.stdout + g.stderr
    done = json.loads(g.stdout)
    assert done["ok"] and done["run"]["status"] == "completed", done
    moe_id = done["run_id"]
    path = tmp_path / "moe.pt"
    _ok(cli("export-model", "--run", moe_id, "-o", str(path), cwd=session.cwd, timeout=300))
    r = cli("export-model", "--run", moe_id, "-o", str(path), cwd=session.cwd, timeout=300)
    assert r.returncode != 0 and "exists" in r.stderr
    r = cli("export-model", "--run", moe_id, "-o", str(tmp_path), "--force", cwd=session.cwd)
    assert r.returncode != 0 and f"{tmp_path} is a folder; -o names the file" in r.stderr, r.stderr
    # A fresh process, no supervisor: load the file and run it.
    code = (
        "import torch, json, sys\nfrom onthefly import load_model\n"
        f"m = load_model({str(path)!r})\n"
        "g = torch.Generator().manual_seed(11)\nx = torch.randn(16, 8, generator=g)\n"
        "print(json.dumps(m(x).tolist()))\n"
    )
    got = torch.tensor(
        json.loads(
            subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
        )
    )
    # Rebuild the same MoE by hand from the run checkpoints and compare.
    from torch import nn

    from onthefly_worker.moe import MoE, SwitchGate

    sdir = session.session_dir
    moe_state = torch.load(next((sdir / "checkpoints" / moe_id).glob("*.pt")), weights_only=True)
    spec = moe_state["spec"]["moe"]
    experts = []
    for ck in spec["expert_checkpoints"]:
        e = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
        )
        e.load_state_dict(torch.load(sdir / ck, weights_only=True)["model"])
        experts.append(e.eval())
    gate = SwitchGate(**spec["gate_config"])
    moe = MoE(experts, gate, gate_input=spec["gate_input"])
    moe.gate.load_state_dict(moe_state["model"])
    moe.eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        want = moe(torch.randn(16, 8, generator=g))
    torch.testing.assert_close(got, want)


def test_bad_method_requests_get_clear_errors(session) -> None:
    cases = [
        (("fork", "--select", "quantile:0.9:0.2"), "quantile"),
        (("fork", "--select", "bogus"), "bogus"),
        (("fork", "--run", "nope", "--select", "all"), "no run 'nope'"),
        (("fork", "--select", "all", "--budget-steps", "0"), "--budget-steps 0"),
        (("fork", "--select", "all", "--lr-mul", "0"), "--lr-mul 0: must be a finite number > 0"),
        (("fork", "--select", " "), "--select is empty"),
        (("sessions", "gc", "--keep", "-1"), "--keep -1: must be >= 0"),
        (("report", "-o", __file__), "that is a file; give a folder"),
        (("fork", "--select", "indices:/does/not/exist.npy"), "exist"),
        (("merge", "--method", "swa", "main"), "at least 2"),
        (("merge", "--method", "adapter_fuse", "main"), "not trained with adapters"),
        (("gate", "main"), "at least 2"),
    ]
    for args, expect in cases:
        r = cli(*args, cwd=session.cwd, timeout=60)
        assert r.returncode != 0, args
        assert expect in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert session.proc.poll() is None, "bad requests never take the supervisor down"


def test_kmeans_fork_clusters_on_the_parents_embedding(tmp_path: Path) -> None:
    """A live parent is asked for its penultimate-layer embedding (one inference pass, in the
    session folder); once it has stopped, the newest saved one is used."""
    small = SCRIPTS / "train_small.py"
    live = start(
        tmp_path, small, "--epochs", "500", "--n", "256", "--step-sleep", "0.01",
        extra=("--keep-alive",),
    )  # fmt: skip
    try:
        live.wait_for(lambda s: live.main_run(s)["epoch"] >= 1, timeout=120)
        out = _ok(
            cli("fork", "--select", "kmeans:auto", "--budget-steps", "4", cwd=tmp_path, timeout=180)
        )
        assert "embedding: 16 dims from samples/main/embed-step-" in out, out
        runs = {r["run_id"]: r for r in cli_json("runs", cwd=tmp_path)["runs"]}
        spec = runs["fork-1"]["spec"]
        assert "embedding: 16 dims" in spec["description"]
        assert spec["selection_extra"]["embedding_dims"] == 16
        # Loss, its mean over epochs, margin (2 classes) + 16 embedding dims: the same
        # features export-slice and `onthefly clusters` use.
        assert "19 standardized residual feature(s)" in spec["description"]
        assert "the 16 embedding column(s) weigh as much as the 3 residual" in spec["description"]
        # The fork's clusters are stored and browsable; selected = the one it trained on.
        doc = cli_json("clusters", "--run", "fork-1", cwd=tmp_path)
        assert doc["fork"] == "fork-1" and doc["spec"] == "kmeans:auto"
        sizes = [c["size"] for c in doc["clusters"]]
        assert sum(sizes) == 256 and doc["selected_cluster"] == len(sizes) - 1
        assert doc["clusters"][-1]["size"] == spec["samples"]
        means = [c["mean_loss"] for c in doc["clusters"]]
        assert means == sorted(means)
        # Any run's clusters, computed now without forking (here: 2, the cheaper one picked).
        r = cli("clusters", "--select", "kmeans:2:cluster=0", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "cluster     size   mean loss  label mix" in r.stdout and "*     0 " in r.stdout
        bad = cli("clusters", "--run", "main", cwd=tmp_path)
        assert bad.returncode != 0 and "was not forked on a kmeans selection" in bad.stderr
        files = list((live.session_dir / "samples" / "main").glob("embed-step-*.npy"))
        assert len(files) == 1
        arr = np.load(files[0])
        assert arr.shape == (256, 16) and arr.dtype == np.float32 and np.isfinite(arr).all()

        _ok(cli("stop", cwd=tmp_path, timeout=60))
        live.wait_for(lambda s: live.main_run(s)["status"] != "running", timeout=60)
        # The run has ended: the merge worker embeds its final checkpoint (the embedding
        # saved while it was live is older), and the next kmeans selection reuses that file.
        final = live.main_run(live.status())["step"]
        for _ in range(2):
            out = _ok(
                cli(
                    "fork", "--select", "kmeans:2", "--budget-steps", "4", cwd=tmp_path, timeout=240
                )
            )
            assert f"embedding: 16 dims from samples/main/embed-step-{final:08d}.npy" in out, out
        files = list((live.session_dir / "samples" / "main").glob("embed-step-*.npy"))
        assert [f.name for f in files] == [f"embed-step-{final:08d}.npy"]  # the older one dropped
        merge_logs = list((live.session_dir / "logs").glob("merger-*.log"))
        assert merge_logs, "the merge worker made it"
        # The preview clusters exactly as the fork did (one selection path, one seed).
        preview = cli_json("clusters", "--select", "kmeans:2", cwd=tmp_path)
        stored = cli_json("clusters", "--run", "fork-3", cwd=tmp_path)
        assert [(c["size"], c["mean_loss"]) for c in preview["clusters"]] == [
            (c["size"], c["mean_loss"]) for c in stored["clusters"]
        ]
        assert preview["selected_cluster"] == stored["selected_cluster"] == 1
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


def test_fork_recipe_adapters_adamw_schedule_and_early_stopping(tmp_path: Path) -> None:
    """The recipe on a script with AdamW (two groups) and a per-step StepLR: an adapter fork
    trains with the groups' own lr/wd (multipliers applied) and follows the schedule exactly
    as a full-weight fork; early stopping ends a fork (and a race's winner) as completed."""
    live = start(tmp_path, SCRIPTS / "train_recipe.py", extra=("--keep-alive",))
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=90)
        recipe = ("--select", "quantile:0.7:1.0", "--budget-steps", "12", "--lr-mul", "0.5")
        recipe += ("--wd-mul", "3", "--wait")
        out = _ok(cli("fork", *recipe, "--adapters", "4", cwd=tmp_path, timeout=120))
        assert "fork-1 completed" in out, out
        out = _ok(cli("fork", *recipe, cwd=tmp_path, timeout=120))
        assert "fork-2 completed" in out, out
        db = sqlite3.connect(live.session_dir / "session.db")
        logs = [json.loads(r[0])["text"] for r in db.execute("SELECT payload FROM events WHERE kind = 'log' AND run_id = 'fork-1'")]  # fmt: skip
        lrs = {
            r: [
                v
                for (v,) in db.execute(
                    "SELECT lr FROM metrics WHERE run_id = ? ORDER BY step", (r,)
                )
            ]  # fmt: skip
            for r in ("main", "fork-1", "fork-2")
        }
        assert any(
            "rank-4 adapters on 2 linear layer(s); each adapter uses the optimizer group of the "
            "layer it adapts (groups 0, 1)" in t
            for t in logs
        ), logs
        # Group 0's lr: the parent's at its end (4e-3 halved every 5 of its 40 steps) x0.5,
        # then halved every 5 fork steps by the script's StepLR, in both forks alike.
        assert lrs["fork-1"] == lrs["fork-2"] and len(lrs["fork-1"]) == 12
        start_lr = 4e-3 * 0.5**8 * 0.5
        want = [start_lr * 0.5 ** ((s + 1) // 5) for s in range(12)]
        assert lrs["fork-1"] == pytest.approx(want, rel=1e-5)
        runs = {r["run_id"]: r for r in cli_json("runs", cwd=tmp_path)["runs"]}
        groups = []
        for r in ("fork-1", "fork-2"):
            state = torch.load(live.session_dir / runs[r]["last_checkpoint"], weights_only=True)
            groups.append([(g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]])  # fmt: skip
        assert groups[0] == groups[1]
        assert [wd for _, wd in groups[0]] == pytest.approx([0.03, 0.3])  # wd x3 per group
        assert [lr for lr, _ in groups[0]] == pytest.approx([4e-3 / 2**11, 2e-3 / 2**11])

        # Early stopping: an improvement must exceed 10, so the 2nd evaluation (every 4
        # steps) after the step-0 slice loss stops the fork at step 8 of its 60.
        out = _ok(
            cli(
                "fork", "--select", "quantile:0.7:1.0", "--budget-steps", "60",
                "--early-stop-patience", "2", "--early-stop-every", "4",
                "--early-stop-min-delta", "10", "--wait", cwd=tmp_path, timeout=120,
            )
        )  # fmt: skip
        assert "early stop on the slice loss every 4 steps, patience 2, min delta 10" in out
        assert "fork-3 completed" in out and "stopped early at step 8" in out, out
        fork = {r["run_id"]: r for r in cli_json("runs", cwd=tmp_path)["runs"]}["fork-3"]
        assert fork["status"] == "completed" and fork["step"] == 8
        assert fork["sample_steps"] == 8 * 30  # only the steps that ran
        es = fork["early_stopped"]
        own = [(e["step"], e["loss"]) for e in fork["evals"] if e["split"] == "slice:self"]
        assert [s for s, _ in own] == [0, 4, 8]  # not twice at the stop
        assert (es["step"], es["best_step"], es["evals"], es["metric"]) == (8, 0, 2, "slice")
        assert es["best"] == pytest.approx(own[0][1]) and es["last"] == pytest.approx(own[2][1])
        assert fork["last_checkpoint"].endswith("step-00000008.pt")
        assert "stopped early at step 8 (slice loss best" in _ok(cli("runs", cwd=tmp_path))
        kinds = [r[0] for r in db.execute("SELECT kind FROM events WHERE run_id = 'fork-3'")]
        assert "early_stop" in kinds and kinds.index("early_stop") < kinds.index("finished")

        # A race of adapter variants: rungs compare at equal steps, and the variant sent on
        # to the full budget stops early (patience 1: at its first evaluation, step 12).
        r = cli(
            "fork", "--select", "quantile:0.7:1.0", "--budget-steps", "16", "--variants", "2",
            "--adapters", "4", "--race-mode", "sync", "--early-stop-patience", "1",
            "--early-stop-every", "4", "--early-stop-min-delta", "10", "--wait", "--json",
            cwd=tmp_path, timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        race = json.loads(r.stdout[r.stdout.index("{") :])["race"]
        assert race["status"] == "done" and race["rungs"] == [8, 16]
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=tmp_path)["runs"]}
        winner = runs[race["winner"]]
        assert winner["status"] == "completed" and winner["step"] == 12
        assert winner["early_stopped"]["step"] == 12
        for v in race["runs"]:  # every variant reports its slice loss before its first step
            steps = [e["step"] for e in runs[v]["evals"] if e["split"] == "slice:self"]
            assert steps[0] == 0 and 8 in steps, (v, steps)
        db.close()
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


# -- a BatchNorm regression (tests/integration/scripts/train_small.py --regression) ----------
SMALL = SCRIPTS / "train_small.py"


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory):
    """A finished BatchNorm regression (256 samples, batch size 32) under a live supervisor."""
    project = tmp_path_factory.mktemp("regression")
    live = start(
        project, SMALL, "--regression", "--val", "--test", "--epochs", "2", "--n", "256",
        extra=("--keep-alive",),
    )  # fmt: skip
    live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=120)
    yield live
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGINT)
        live.finish(60)


def _run_ids(cwd: Path) -> list[str]:
    return [r["run_id"] for r in cli_json("runs", cwd=cwd)["runs"]]


def _specialist(cwd: Path) -> str:
    """A completed fork of main on its loss tail (made now unless an earlier test did)."""
    for r in cli_json("runs", cwd=cwd)["runs"]:
        if r["kind"] == "fork" and r["status"] == "completed" and r["spec"]["samples"] >= 50:
            return str(r["run_id"])
    d = json.loads(_ok(cli("fork", "--select", "quantile:0.8:1.0", "--budget-steps", "3",
                           "--wait", "--json", cwd=cwd, timeout=120)))  # fmt: skip
    assert d["ok"], d
    return str(d["run_id"])


def test_clusters_export_slice_and_fork_pick_the_same_kmeans_samples(regression) -> None:
    """All three embed the run the same way (here: an ended run, by the merge worker). The
    preview and the export used to cluster without it (none was saved yet) and so picked
    other samples than the fork."""
    cwd = regression.cwd
    preview = cli_json("clusters", "--select", "kmeans:2", cwd=cwd)
    assert "embedding: 16 dims from samples/main/embed-step-" in preview["description"]
    out = cwd / "k.json"
    _ok(cli("export-slice", "--select", "kmeans:2", "--format", "json", "-o", str(out), cwd=cwd))
    exported = [r["sample_id"] for r in json.loads(out.read_text())["rows"]]
    fork = json.loads(
        _ok(cli("fork", "--select", "kmeans:2", "--budget-steps", "2", "--json", cwd=cwd))
    )
    spec = {r["run_id"]: r for r in cli_json("runs", cwd=cwd)["runs"]}[fork["run_id"]]["spec"]
    forked = np.load(regression.session_dir / spec["indices_file"]).tolist()
    assert exported == forked and len(forked) == preview["clusters"][-1]["size"]
    assert preview["description"] == json.loads(out.read_text())["slice"]["description"]


def test_tiny_selections_are_refused_up_front(regression) -> None:
    cwd = regression.cwd
    (cwd / "one.txt").write_text("7\n")
    before = _run_ids(cwd)
    for args in (
        ("--select", "quantile:0.996:1.0"),  # 1 of 256
        ("--select", "indices:one.txt"),
        ("--select", "kmeans:100"),
        ("--select", "quantile:0.996:1.0", "--variants", "2"),
    ):
        r = cli("fork", *args, cwd=cwd)
        assert r.returncode != 0, args
        assert "has 1 sample; a fork needs at least 2" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for eta in ("0", "1", "9"):
        r = cli("fork", "--select", "all", "--variants", "3", "--race-eta", eta, cwd=cwd)
        assert r.returncode != 0 and f"--race-eta {eta}: must be an integer in 2..8" in r.stderr
    assert _run_ids(cwd) == before
    # 5 samples, under one batch of 32: accepted, said so, and the BatchNorm model trains.
    out = _ok(cli("fork", "--select", "quantile:0.98:1.0", "--budget-steps", "3", "--wait",
                  cwd=cwd, timeout=120))  # fmt: skip
    assert "5 samples, fewer than one batch of the parent's loader (~32)" in out, out
    assert " completed" in out, out


def test_distill_and_swa_of_a_batchnorm_regression(regression) -> None:
    cwd = regression.cwd
    fork = _specialist(cwd)
    d = json.loads(_ok(cli("merge", "--method", "distill", "main", fork, "--json", cwd=cwd,
                           timeout=120)))  # fmt: skip
    assert d["ok"] and d["run"]["status"] == "completed", d  # was "distill needs a classifier"
    s = json.loads(_ok(cli("merge", "--method", "swa", "main", fork, "--json", cwd=cwd)))
    # The BatchNorm recalibration's forwards over the 256 samples, at 1/3 of a step each.
    assert s["ok"] and s["run"]["sample_steps"] == 86, s


def test_merging_an_moe_or_exporting_a_custom_class_says_so_in_one_line(regression) -> None:
    cwd = regression.cwd
    fork = _specialist(cwd)
    moe = json.loads(_ok(cli("gate", "main", fork, "--json", cwd=cwd, timeout=120)))
    before = _run_ids(cwd)
    for method in ("swa", "fisher_soup"):
        r = cli("merge", "--method", method, "main", moe["run_id"], cwd=cwd)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{moe['run_id']} is an MoE (a gate over main, {fork})" in r.stderr
    assert _run_ids(cwd) == before  # no failed run left behind
    r = cli("export-model", "--run", "main", "-o", str(cwd / "m.pt"), cwd=cwd, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "class __main__.Net" in r.stderr and "--factory package.module:callable" in r.stderr
    assert "AdaptiveMaxPool2d" not in r.stderr  # the supported classes are not listed
