"""Faults of the training loop itself that must never pass silently: poisoned weights from
an unmeasured step, a second fit() in one script, a plateau scheduler stepped per step."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import SCRIPTS, cli

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
    assert "applied after step 4" in out and "onthefly rollback" in out, out
    assert "main completed" not in out


def test_a_second_fit_is_a_clear_error_and_a_nonzero_exit(project: Path) -> None:
    code, out = _run(project, "--epochs", "1", "--second-fit")
    assert code == 1, out
    assert "Trainer.fit() was already called in this script (run main)" in out, out
    assert "the script failed after main completed" in out, out
    assert "already attached" not in out  # the old, internal symptom


def test_reduce_lr_on_plateau_stepped_per_step_uses_the_step_loss(project: Path) -> None:
    code, out = _run(project, "--epochs", "2", "--plateau-per-step", "--lr", "0.5")
    assert code == 0, out
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    ck = max((sdir / "checkpoints" / "main").glob("step-*.pt"))
    sched = torch.load(ck, weights_only=True)["scheduler"]
    assert sched["last_epoch"] == 32, "stepped once per step (2 epochs x 16 steps)"
