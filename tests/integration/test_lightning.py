"""attach_lightning end to end: a real Lightning 2.x script under a real supervisor.

The script below is written into each test's project folder (scripts live with their
test here because a file named like a package would shadow it). It has knobs to run
slowly, with lr=0 and no dropout (so every recorded loss can be recomputed), with a
module that cannot be deep-copied (so only `model_factory` can rebuild it), and with
each `model_factory` form.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.lightning import normalize_model_factory, prediction_of
from tests.conftest import EXAMPLES, PY, cli, cli_json, interrupt_plain_python, start

LIT = """
import argparse
import threading
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import attach_lightning

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--n", type=int, default=600)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--dropout", type=float, default=0.1)
p.add_argument("--step-sleep", type=float, default=0.0)
p.add_argument("--uncopyable", action="store_true")
p.add_argument("--factory", choices=["none", "callable", "tuple", "dict"], default="none")
p.add_argument("--slices", action="store_true")
p.add_argument("--noise", action="store_true", help="time-seeded noise: not reproducible")
p.add_argument("--adamw", action="store_true", help="AdamW and a per-step StepLR (halves every 4)")
args = p.parse_args()


class Lit(L.LightningModule):
    def __init__(self, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3))
        self.loss = nn.CrossEntropyLoss()
        if args.uncopyable:
            self.lock = threading.Lock()  # deepcopy/pickle fail: only a factory can rebuild it

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        if args.step_sleep:
            time.sleep(args.step_sleep)
        x, y = batch
        logits = self(x)
        if args.noise:  # seeded from the clock, so no checkpoint can reproduce it
            g = torch.Generator().manual_seed(time.time_ns() % 2**31)
            logits = logits + 0.01 * torch.randn(logits.shape, generator=g)
        loss = self.loss(logits, y)
        self.log("train_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", self.loss(self(x), y))

    def configure_optimizers(self):
        if args.adamw:
            opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return torch.optim.SGD(self.parameters(), lr=args.lr, momentum=0.9)


def build(hidden=32, dropout=0.0):
    return Lit(hidden, dropout)


g = torch.Generator().manual_seed(5)
x = torch.randn(args.n + 200, 16, generator=g)
y = x[:, :3].argmax(1)
train = DataLoader(TensorDataset(x[: args.n], y[: args.n]), batch_size=32, shuffle=True)
val = DataLoader(TensorDataset(x[args.n :], y[args.n :]), batch_size=100)
factory = {
    "none": None,
    "callable": lambda: build(32, args.dropout),
    "tuple": (build, (32,), {"dropout": args.dropout}),
    "dict": {"factory": build, "args": (32, args.dropout)},
}[args.factory]
model = build(32, args.dropout)
trainer = L.Trainer(
    max_epochs=args.epochs, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
)
attach_lightning(
    trainer=trainer, model=model, project="tests", run_name="lit", train_loader=train,
    val_loader=val, test_loader=val, loss_fn=model.loss, do_test_after=True, model_factory=factory,
    val_slices={"cls0": lambda x, y: y == 0, "first50": range(50)} if args.slices else None,
)
trainer.fit(model, train, val)
"""


def _script(project: Path) -> Path:
    path = project / "lit_train.py"
    path.write_text(LIT)
    return path


def _latest(project: Path) -> Path:
    return (project / ".onthefly" / "sessions" / "latest").resolve()


def _run(project: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "onthefly_supervisor", "run", "--headless", "--port", "0", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _data(n: int = 600, val: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + 200, 16, generator=g)
    x = x[n:] if val else x[:n]
    return x, x[:, :3].argmax(1)


# -- unit: model_factory forms and outputs ---------------------------------------------------
class _Net(nn.Module):
    def __init__(self, width: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(3, width, bias=bias)


def _build(width: int = 4, bias: bool = True) -> nn.Module:
    return _Net(width, bias)


@pytest.mark.parametrize(
    "spec,width,bias",
    [
        (_build, 4, True),
        (_Net, 4, True),
        (lambda: _Net(7), 7, True),
        ((_build,), 4, True),
        ((_build, (5,)), 5, True),
        ((_Net, (6,), {"bias": False}), 6, False),
        ((_Net, None, {"width": 2}), 2, True),
        ({"factory": _build}, 4, True),
        ({"factory": _Net, "args": [3], "kwargs": {"bias": False}}, 3, False),
        ({"factory": _build, "kwargs": {"width": 9}}, 9, True),
    ],
)
def test_model_factory_forms_become_zero_arg_closures(spec: Any, width: int, bias: bool) -> None:
    build = normalize_model_factory(spec)
    assert build is not None
    a, b = build(), build()
    assert isinstance(a, _Net) and a is not b, "every call builds a fresh model"
    assert a.lin.out_features == width and (a.lin.bias is not None) == bias


@pytest.mark.parametrize(
    "spec,message",
    [
        (42, "must be a callable, a (callable, args, kwargs) tuple"),
        ((), "tuple must be (callable, args, kwargs)"),
        ((_build, (), {}, "extra"), "tuple must be (callable, args, kwargs)"),
        (("not callable", ()), "factory must be callable"),
        ((_build, "4"), "args must be a tuple or list"),
        ((_build, (), [("width", 4)]), "kwargs must be a dict"),
        ({"args": ()}, "needs a 'factory' key"),
        ({"factory": _build, "kwarg": {}}, "unknown key(s) kwarg"),
    ],
)
def test_model_factory_bad_forms_say_what_is_accepted(spec: Any, message: str) -> None:
    with pytest.raises(OnTheFlyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize_model_factory(spec)


def test_model_factory_none_and_wrong_return_type() -> None:
    assert normalize_model_factory(None) is None
    build = normalize_model_factory(lambda: "a model")
    assert build is not None
    with pytest.raises(OnTheFlyError, match="returned str, not a torch.nn.Module"):
        build()


def test_prediction_of_common_output_shapes() -> None:
    t = torch.zeros(2, 3)
    assert prediction_of(t) is t
    assert prediction_of((t, "aux")) is t
    assert prediction_of({"logits": t, "hidden": 1}) is t
    with pytest.raises(OnTheFlyError, match="applies loss_fn to a tensor"):
        prediction_of({"hidden": 1})


def test_unsupported_setups_fail_at_attach_time() -> None:
    import lightning as L

    from onthefly_worker.lightning import attach_lightning

    class Manual(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.lin = nn.Linear(2, 2)

    class Locked(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.lock = __import__("threading").Lock()

    kw: dict[str, Any] = {"logger": False, "enable_progress_bar": False}
    with pytest.raises(OnTheFlyError, match="automatic_optimization=False"):
        attach_lightning(trainer=L.Trainer(**kw), model=Manual(), loss_fn=nn.MSELoss())
    with pytest.raises(OnTheFlyError, match=r"runs on one device.*devices=2"):
        attach_lightning(
            trainer=L.Trainer(accelerator="cpu", devices=2, **kw),
            model=Locked(),
            loss_fn=nn.MSELoss(),
        )
    with pytest.raises(OnTheFlyError, match="loss_fn=...\\) is required"):
        attach_lightning(trainer=L.Trainer(**kw), model=Locked())
    with pytest.raises(OnTheFlyError, match="must be a lightning.pytorch.LightningModule"):
        attach_lightning(trainer=L.Trainer(**kw), model=nn.Linear(2, 2), loss_fn=nn.MSELoss())
    # A module that cannot be copied: fresh_model() names the escape hatch.
    att = attach_lightning(trainer=L.Trainer(**kw), model=Locked(), loss_fn=nn.MSELoss())
    with pytest.raises(OnTheFlyError, match="pass attach_lightning\\(model_factory=...\\)"):
        att.fresh_model()
    att2 = attach_lightning(
        trainer=L.Trainer(**kw), model=Locked(), loss_fn=nn.MSELoss(), model_factory=Locked
    )
    assert isinstance(att2.fresh_model(), Locked)


def test_onthefly_imports_and_explains_without_lightning() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None  # as if Lightning were not installed\n"
        "import onthefly\n"
        "assert 'lightning.pytorch' not in sys.modules\n"
        "try:\n"
        "    onthefly.attach_lightning(trainer=None, model=None)\n"
        "except onthefly.OnTheFlyError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused: attach_lightning needs Lightning 2.x" in r.stdout


# -- end to end ----------------------------------------------------------------------------------
def test_metrics_and_exact_per_sample_losses(project: Path) -> None:
    # lr=0 and no dropout: the weights never change, so each recorded loss (and each
    # validation slice's loss) must equal a fresh forward pass with the final weights.
    r = _run(
        project, str(_script(project)), "--epochs", "2", "--lr", "0", "--dropout", "0", "--slices"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    main = cli_json("runs", cwd=project)["runs"][0]
    assert main["status"] == "completed" and main["name"] == "lit"
    assert main["step"] == 2 * 19 and main["sample_steps"] == 2 * 600  # ceil(600 / 32) = 19
    assert main["last_loss"] is not None and np.isfinite(main["last_loss"])
    splits = [e["split"] for e in main["evals"]]
    assert splits.count("val") == 2 and "test" in splits  # every epoch + do_test_after
    sdir = _latest(project)
    db = sqlite3.connect(sdir / "session.db")
    try:
        rows = db.execute(
            "select step, loss, lr, grad_norm, extra from metrics order by step"
        ).fetchall()
    finally:
        db.close()
    assert [s for s, *_ in rows] == list(range(1, 39))
    assert all(np.isfinite(loss) and lr == 0.0 and np.isfinite(gn) for _, loss, lr, gn, _ in rows)
    assert "train_acc" in json.loads(rows[-1][4]), "values logged with self.log stream as extras"

    ck = sorted((sdir / "checkpoints" / "main").glob("step-*.pt"))[-1]
    state = torch.load(ck, weights_only=True)  # native format, loadable without running code
    assert state["framework"] == "lightning" and state["cursor"] == {
        "epoch": 2,
        "batch": 0,
        "seed": 0,
    }
    assert "fit_loop" in state["lightning"]["loops"] and state["lightning"]["global_step"] == 38
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 3))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state["model"].items()})
    x, y = _data()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(net(x), y, reduction="none").numpy()
    for epoch in (0, 1):
        got = np.load(sdir / "samples" / "main" / f"epoch-{epoch:04d}.npy")
        assert got.shape == (600,) and np.isfinite(got).all(), "every sample once per epoch"
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # attach_lightning(val_slices=...): each Lightning validation reports every slice as
    # val_slice:<name> at the step of its `val` (the predicate from Lightning's own val
    # batches, the positions from their own pass), as Trainer(val_slices=...) does.
    xv, yv = _data(val=True)
    with torch.no_grad():
        out = net(xv)
        each = nn.functional.cross_entropy(out, yv, reduction="none")
    cls0 = yv == 0
    by_split: dict[str, list[dict[str, Any]]] = {}
    for e in main["evals"]:
        by_split.setdefault(e["split"], []).append(e)
    assert [e["step"] for e in by_split["val"]] == [19, 38]
    for name, rows_ in (
        ("cls0", by_split["val_slice:cls0"]),
        ("first50", by_split["val_slice:first50"]),
    ):
        assert [e["step"] for e in rows_] == [19, 38], name
    for e in by_split["val_slice:cls0"]:
        assert e["samples"] == int(cls0.sum())
        assert e["loss"] == pytest.approx(float(each[cls0].mean()), rel=1e-5)
        assert e["accuracy"] == pytest.approx(float((out.argmax(1) == yv)[cls0].float().mean()))
    for e in by_split["val_slice:first50"]:
        assert e["samples"] == 50
        assert e["loss"] == pytest.approx(float(each[:50].mean()), rel=1e-5)
    for e in by_split["val"]:
        assert e["loss"] == pytest.approx(float(each.mean()), rel=1e-5)
    # The predicate marked the training set once, for automode's forks; positions do not.
    _, yt = _data()
    marked = np.load(sdir / "slices" / "cls0.train.npy")
    assert marked.tolist() == torch.nonzero(yt == 0).flatten().tolist()
    assert not (sdir / "slices" / "first50.train.npy").exists()


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().split(") ", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def test_pause_test_resume_from_cli_then_completes(project: Path) -> None:
    live = start(project, _script(project), "--epochs", "4", "--step-sleep", "0.03")
    try:
        live.wait_for(lambda s: live.main_run(s)["step"] >= 5, timeout=60)
        r = cli("pause", cwd=project)
        assert r.returncode == 0 and "paused at step" in r.stdout, r.stdout + r.stderr
        st = live.wait_for(lambda s: live.main_run(s)["status"] == "paused")
        worker = next(w for w in st["workers"] if w["run_id"] == "main")
        assert worker["state"] == "paused"
        assert list((live.session_dir / "checkpoints" / "main").glob("step-*.pt"))
        step = live.main_run(st)["step"]
        cpu0 = _cpu_ticks(worker["pid"])
        time.sleep(1.5)
        assert live.main_run(live.status())["step"] == step, "no steps while paused"
        assert _cpu_ticks(worker["pid"]) - cpu0 < 30, "a paused worker must not spin the CPU"
        r = cli("test", cwd=project)  # commands are served while paused
        assert r.returncode == 0 and "test loss" in r.stdout, r.stdout + r.stderr
        r = cli("resume", cwd=project)
        assert r.returncode == 0, r.stderr
        code, out = live.finish(timeout=120)
        assert code == 0, out
        main = cli_json("runs", cwd=project)["runs"][0]
        assert main["status"] == "completed" and main["step"] == 4 * 19
        for e in range(4):
            arr = np.load(live.session_dir / "samples" / "main" / f"epoch-{e:04d}.npy")
            assert np.isfinite(arr).all(), f"epoch {e} is complete across the pause"
    finally:
        if live.proc.poll() is None:
            live.proc.kill()


def test_readme_lightning_script_as_plain_python(project: Path) -> None:
    # The README's minimal Lightning script (examples/lightning.py, verbatim), run as
    # `python lightning.py` under its own name: onthefly_pathfix lets a script named like a
    # package import that package (Python puts the script's folder first on sys.path).
    script = project / "lightning.py"
    shutil.copy(EXAMPLES / "lightning.py", script)
    r = subprocess.run([PY, str(script)], cwd=project, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[onthefly] session" in r.stdout
    sdir = _latest(project)
    deadline = time.time() + 15
    while (sdir / "connection.json").exists() and time.time() < deadline:
        time.sleep(0.1)  # the self-hosted supervisor follows its owner out
    assert not (sdir / "connection.json").exists()
    main = cli_json("runs", cwd=project)["runs"][0]
    assert main["status"] == "completed" and main["name"] == "lightning-baseline"
    assert main["sample_steps"] == 3 * 3072 and main["step"] == 3 * 24
    assert len(list((sdir / "samples" / "main").glob("epoch-*.npy"))) == 3


def _merge_completes(project: Path, *args: str) -> None:
    """`onthefly merge ARGS` makes merge-1, completed and evaluated on val."""
    r = cli("merge", *args, cwd=project, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    merged = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}["merge-1"]
    assert merged["status"] == "completed" and merged["val_loss"] is not None


def test_fork_then_merge_with_model_factory(project: Path) -> None:
    # The module holds a lock, so it cannot be deep-copied: the merge worker can only
    # rebuild it through the model_factory.
    live = start(
        project,
        _script(project),
        "--epochs",
        "2",
        "--uncopyable",
        "--factory",
        "dict",
        extra=("--keep-alive",),
    )
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=90)
        r = cli(
            "fork",
            "--select",
            "quantile:0.8:1.0",
            "--budget-steps",
            "12",
            "--wait",
            cwd=project,
            timeout=150,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fork-1 completed" in r.stdout
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
        fork = runs["fork-1"]
        assert fork["status"] == "completed" and fork["parents"] == ["main"]
        assert fork["step"] == 12
        assert {"slice:self", "val"} <= {e["split"] for e in fork["evals"]}
        idx = np.load(live.session_dir / fork["spec"]["indices_file"])
        arr = np.load(live.session_dir / "samples" / "fork-1" / "epoch-0000.npy")
        assert set(np.flatnonzero(np.isfinite(arr)).tolist()) <= set(idx.tolist())
        state = torch.load(live.session_dir / fork["last_checkpoint"], weights_only=True)
        assert state["role"] == "fork" and state["counters"]["step"] == 12

        _merge_completes(project, "--method", "swa", "main", "fork-1")
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


def test_kmeans_fork_of_a_lightning_run_clusters_on_its_embedding(project: Path) -> None:
    live = start(
        project, _script(project), "--epochs", "400", "--step-sleep", "0.005",
        extra=("--keep-alive",),
    )  # fmt: skip
    try:
        live.wait_for(lambda s: live.main_run(s)["epoch"] >= 1, timeout=120)
        r = cli("fork", "--select", "kmeans:auto", "--budget-steps", "4", cwd=project, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        # The last nn.Linear of Lit.net takes 32 features: projected to 16 dims.
        assert "embedding: 16 dims from samples/main/embed-step-" in r.stdout, r.stdout
        files = list((live.session_dir / "samples" / "main").glob("embed-step-*.npy"))
        assert len(files) == 1
        arr = np.load(files[0])
        assert arr.shape == (600, 16) and np.isfinite(arr).all()
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
        assert runs["main"]["status"] == "running"  # the generalist trains on
        assert (
            "the 16 embedding column(s) weigh as much as" in runs["fork-1"]["spec"]["description"]
        )
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


def test_adapter_race_of_a_lightning_run_then_adapter_fuse(project: Path) -> None:
    live = start(project, _script(project), "--epochs", "2", extra=("--keep-alive",))
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=90)
        # Two adapter variants raced (sync: the winner resumes from its rung checkpoint, so
        # the adapters are restored from a checkpoint too), then folded back.
        r = cli(
            "fork", "--select", "quantile:0.5:1.0", "--budget-steps", "12", "--adapters", "4",
            "--variants", "2", "--race-mode", "sync", "--wait", "--json",
            cwd=project, timeout=240,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        race = json.loads(r.stdout[r.stdout.index("{") :])["race"]
        assert race["status"] == "done" and race["rungs"] == [6, 12]
        runs = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}
        winner = runs[race["winner"]]
        assert winner["status"] == "completed" and winner["step"] == 12
        import sqlite3

        db = sqlite3.connect(live.session_dir / "session.db")
        logs = [r[0] for r in db.execute("SELECT payload FROM events WHERE kind = 'log'")]
        db.close()
        assert any("fork trains rank-4 adapters on 1 linear layer(s)" in x for x in logs)
        parent = torch.load(live.session_dir / runs["main"]["last_checkpoint"], weights_only=True)
        state = torch.load(live.session_dir / winner["last_checkpoint"], weights_only=True)
        assert state["model"].keys() == parent["model"].keys()  # adapters folded in
        assert set(state["adapters"]) == {"net.0.weight"}  # the 3-class head is too small
        # Only the adapted layer moved; every frozen weight is the parent's, bit for bit.
        for k, v in state["model"].items():
            if k == "net.0.weight":
                assert not torch.equal(v, parent["model"][k])
            else:
                assert torch.equal(v, parent["model"][k]), k
        _merge_completes(project, "--method", "adapter_fuse", race["winner"])
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


def test_adapter_fork_with_adamw_and_early_stopping_of_a_lightning_run(project: Path) -> None:
    """The Lightning fork recipe: adapters with AdamW (whose constructor rejects a key of its
    own defaults) keep the wd multiplier and follow the module's StepLR; early stopping
    ends the fork as completed, with its record."""
    live = start(project, _script(project), "--epochs", "1", "--adamw", extra=("--keep-alive",))
    try:
        live.wait_for(lambda s: live.main_run(s)["status"] == "completed", timeout=90)
        r = cli(
            "fork", "--select", "quantile:0.5:1.0", "--budget-steps", "40", "--adapters", "4",
            "--wd-mul", "3", "--early-stop-patience", "2", "--early-stop-every", "5",
            "--early-stop-min-delta", "10", "--wait", cwd=project, timeout=150,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fork-1 completed" in r.stdout and "stopped early at step 10" in r.stdout
        fork = {x["run_id"]: x for x in cli_json("runs", cwd=project)["runs"]}["fork-1"]
        assert fork["status"] == "completed" and fork["step"] == 10
        es = fork["early_stopped"]
        assert (es["step"], es["best_step"], es["evals"]) == (10, 0, 2)
        own = [e["step"] for e in fork["evals"] if e["split"] == "slice:self"]
        assert own == [0, 5, 10]
        state = torch.load(live.session_dir / fork["last_checkpoint"], weights_only=True)
        assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [
            pytest.approx(0.3)
        ]
        db = sqlite3.connect(live.session_dir / "session.db")
        lrs = [v for (v,) in db.execute("SELECT lr FROM metrics WHERE run_id = 'fork-1' ORDER BY step")]  # fmt: skip
        db.close()
        # The parent's lr at its end (19 steps: 0.01 halved 4 times), then the StepLR's halving
        # every 4 fork steps (recorded after the step's scheduler step).
        assert lrs == pytest.approx([0.01 / 16 * 0.5 ** ((s + 1) // 4) for s in range(10)])
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


def test_health_checks_of_a_live_lightning_run(project: Path) -> None:
    live = start(
        project, _script(project), "--epochs", "400", "--step-sleep", "0.01",
        extra=("--keep-alive",),
    )  # fmt: skip
    try:
        before = live.wait_for(lambda s: live.main_run(s)["step"] >= 25, timeout=120)
        r = cli("health", "--json", cwd=project, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        got = {v["check"]: v for v in json.loads(r.stdout)["verdicts"]}
        assert set(got) == {
            "numerics", "gradients", "activations", "data", "throughput", "determinism",
        }  # fmt: skip
        for name in ("numerics", "gradients", "activations", "data", "throughput"):
            assert got[name]["verdict"] in ("ok", "warn"), got[name]
        assert got["data"]["numbers"]["dataset_len"] == 600
        assert got["data"]["numbers"]["coverage_per_epoch"][0] == 1.0
        phases = {p["phase"] for p in got["throughput"]["numbers"]["phases"]}
        assert {"data", "forward", "backward", "optimizer"} <= phases
        assert got["gradients"]["numbers"]["parameters"] == 4
        # Determinism: two side processes, each the script resumed by Lightning's fit loop.
        det = got["determinism"]
        assert det["verdict"] == "ok", det["hint"]
        n = det["numbers"]
        assert n["mode"] == "side-process" and n["identical"] and n["steps"] == 5, n
        assert "Lightning's own fit loop" in n["isolation"], n
        assert n["tensors"] >= 4 + 4 + 1, n  # 4 weights, their momentum buffers, the RNG
        assert not (live.session_dir / "health").exists(), "the replays' folder is removed"
        after = live.status()
        assert live.main_run(after)["status"] == "running"
        assert live.main_run(after)["step"] > live.main_run(before)["step"]
    finally:
        if live.proc.poll() is None:
            live.proc.send_signal(signal.SIGINT)
            live.finish(60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_plain_python_lightning_stops_on_a_signal_with_a_checkpoint(
    project: Path, sig: signal.Signals
) -> None:
    """`python lit_train.py` + SIGTERM/Ctrl+C: a stopped run with a checkpoint at the step,
    as under `onthefly run` (Lightning alone marks it failed: its SIGTERM handler raises,
    and its Ctrl+C handling exits 1)."""
    args = ("--epochs", "200", "--step-sleep", "0.01")
    interrupt_plain_python(project, _script(project), args, sig, timeout=90)
    assert not cli_json("runs", cwd=project)["runs"][0]["error"]
