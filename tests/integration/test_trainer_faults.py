"""Faults of the training loop itself that must never pass silently: poisoned weights from
an unmeasured step, a second fit() in one script, a plateau scheduler stepped per step, a
library error's live line naming the user's script, and a script that exits before fit()
(`--help`, an argparse error) keeping its own exit code."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import SCRIPTS, cli, cli_json

SMALL = SCRIPTS / "train_small.py"


def _run(project: Path, *flags: str) -> tuple[int, str]:
    r = cli("run", "--headless", "--port", "0", str(SMALL), *flags, cwd=project, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_nan_gradients_on_an_unmeasured_step_fail_the_run_naming_the_steps(
    project: Path,
) -> None:
    """The gradient norm is measured every 4 steps here; step 5's NaN gradients are applied
    unseen and poison the weights. The run must fail at once, saying where, instead of
    skipping NaN losses until its patience runs out (or 'completing' with NaN weights)."""
    code, out = _run(project, "--nan-grad-at-step", "5", "--grad-norm-every", "4")
    assert code != 0, out
    assert "the weights are non-finite at step 6" in out, out
    assert "applied after step 4" in out and "Trainer(grad_norm_every=1)" in out, out
    # No checkpoint precedes it (the first is at an epoch's end): none is offered, and no
    # rollback (which needs the live run this failure ends).
    assert "no checkpoint of this run precedes step 5" in out and "rollback" not in out, out
    assert "main completed" not in out


def test_a_second_fit_is_a_clear_error_and_a_nonzero_exit(project: Path) -> None:
    code, out = _run(project, "--epochs", "1", "--second-fit")
    assert code == 1, out
    assert "Trainer.fit() was already called in this script (run main)" in out, out
    assert out.count("the script failed after ") == 1, out  # once: the last line
    assert "the script failed after its run completed: " in out.rstrip().splitlines()[-1], out
    assert "main run failed: the main run failed" not in out, out
    assert "already attached" not in out  # the old, internal symptom


def test_sys_exit_after_fit_is_the_exit_code_of_onthefly_run(project: Path) -> None:
    """As `python train.py` would: the run completed, the script then exited 3."""
    code, out = _run(project, "--epochs", "1", "--exit-after-fit", "3")
    assert code == 3, out
    assert "main completed" in out, out
    assert out.rstrip().splitlines()[-1] == (
        "[onthefly] the script exited with code 3 after its run completed"
    ), out
    assert out.count("the script exited with code 3") == 1, out


def test_reduce_lr_on_plateau_stepped_per_step_uses_the_step_loss(project: Path) -> None:
    code, out = _run(project, "--epochs", "2", "--plateau-per-step", "--lr", "0.5")
    assert code == 0, out
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    ck = max((sdir / "checkpoints" / "main").glob("step-*.pt"))
    sched = torch.load(ck, weights_only=True)["scheduler"]
    assert sched["last_epoch"] == 32, "stepped once per step (2 epochs x 16 steps)"


SCALAR_LOSS = """import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
model = nn.Linear(8, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def loss_fn(out, y):  # scaled by the batch's own spread: no per-sample value
    return F.cross_entropy(out, y, label_smoothing=0.1) / (1 + y.float().std())


Trainer(max_epochs=1).fit(model, opt, loss_fn, DataLoader(TensorDataset(x, y), batch_size=16))
"""


SCALAR_ONLY = """import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer

torch.manual_seed(0)
x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
model = nn.Linear(8, 3)


def loss_fn(out, y):  # a plain function returning the batch's scalar
    return F.cross_entropy(out, y, label_smoothing=0.1)


loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen: per-sample losses are checkable
Trainer(max_epochs=1).fit(model, opt, loss_fn, loader)
with torch.no_grad():
    np.save("expected.npy", F.cross_entropy(model(x), y, label_smoothing=0.1, reduction="none"))
"""


def test_a_loss_function_returning_only_a_scalar_records_each_samples_own_loss(
    project: Path,
) -> None:
    """No reduction= to ask for: each sample's loss is the function on that sample alone,
    said once in the log, and the stored epoch array holds exactly those values."""
    import numpy as np

    script = project / "scalar_only.py"
    script.write_text(SCALAR_ONLY)
    r = cli("run", "--headless", "--port", "0", str(script), cwd=project, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert out.count("returns one scalar for the batch") == 1, out
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    got = np.load(sdir / "samples" / "main" / "epoch-0000.npy")
    np.testing.assert_allclose(got, np.load(project / "expected.npy"), rtol=1e-5, atol=1e-6)


def test_a_library_error_names_the_users_script_in_every_line(project: Path) -> None:
    """The loss check raises inside fit() (onthefly_worker/losses.py): the live error line
    and the final one both name the script's fit() call, never a library file."""
    script = project / "scalar.py"
    script.write_text(SCALAR_LOSS)
    r = cli("run", "--headless", "--port", "0", str(script), cwd=project, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    lines = [ln for ln in out.splitlines() if "depends on the batch" in ln and ln.startswith("[")]
    assert [ln.split(": ", 1)[0] for ln in lines] == [
        "[onthefly] error in main-0",
        "[onthefly] main run failed",
    ], out
    for ln in lines:
        assert ln.endswith(f"({script}:17)"), ln


def test_a_script_that_exits_before_fit_keeps_its_exit_code(project: Path) -> None:
    code, out = _run(project, "--help")
    assert code == 0, out
    assert "usage: train_small.py" in out and "error" not in out, out
    assert out.count("exited before Trainer.fit() (exit code 0): nothing to train") == 1, out
    [main] = [r for r in cli_json("runs", cwd=project)["runs"] if r["run_id"] == "main"]
    assert main["status"] == "stopped", main

    code, out = _run(project, "--no-such-flag")
    assert code == 2, out
    assert "error: unrecognized arguments: --no-such-flag" in out, out  # the script's stderr
    why = "train_small.py exited with code 2 before Trainer.fit(): nothing was trained"
    assert "worker main-0 failed" not in out and out.count(why) == 1, out  # once: the last line


EMPTY_VAL = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from onthefly import Trainer
x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
m = nn.Linear(4, 2)
Trainer(project="e", max_epochs=2, val_every_n_epochs=1).fit(
    m, torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss(),
    DataLoader(TensorDataset(x, y), batch_size=16),
    DataLoader(TensorDataset(x[:0], y[:0]), batch_size=16),
)
"""


def test_an_empty_val_loader_is_said_to_be_empty_not_non_finite(tmp_path: Path) -> None:
    script = tmp_path / "ev.py"
    script.write_text(EMPTY_VAL)
    r = cli("run", "--headless", "--port", "0", str(script), cwd=tmp_path, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "the val loader yielded no samples (step 4): there is no val loss to report" in out
    assert "non-finite" not in out, out
