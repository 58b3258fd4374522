"""Every script in examples/ runs under `onthefly run` and leaves a complete main run.

Each example is copied into the test's project folder first and run under its own name:
`examples/lightning.py` (the README's script, verbatim) is named like the `lightning`
package, which works because onthefly_pathfix lets a script named like a package import
that package. The flags shrink each example to a few seconds; the verbatim README scripts
take none.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EXAMPLES, PY, cli_json

SHRINK: dict[str, list[str]] = {
    "digits_cnn.py": ["--epochs", "1"],
    "regimes.py": ["--fast"],
    "model_factory.py": ["--epochs", "2"],
    "amp_scheduler.py": ["--epochs", "1"],
    "instability.py": ["--epochs", "1"],
}
NAN_SAMPLES = {"instability.py": 3 * 64}  # 3 NaN steps of 64 samples, skipped and recorded as NaN
ALL = sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_every_example_is_covered() -> None:
    assert {"digits_cnn.py", "regimes.py", "model_factory.py", "amp_scheduler.py"} <= set(ALL)
    assert {"instability.py", "lightning.py", "minimal.py", "quickstart.py"} <= set(ALL)
    assert set(SHRINK) <= set(ALL)


@pytest.mark.parametrize("example", ALL)
def test_example_runs_under_onthefly_run(project: Path, example: str) -> None:
    script = project / example
    shutil.copy(EXAMPLES / example, script)
    r = subprocess.run(
        [PY, "-m", "onthefly_supervisor", "run", "--headless", "--port", "0", str(script)]
        + SHRINK.get(example, []),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[onthefly] done" in r.stdout
    runs = cli_json("runs", cwd=project)["runs"]
    main = next(x for x in runs if x["run_id"] == "main")
    assert main["status"] == "completed" and main["step"] > 0
    sdir = (project / ".onthefly" / "sessions" / "latest").resolve()
    arrays = sorted((sdir / "samples" / "main").glob("epoch-*.npy"))
    assert arrays, "per-sample loss arrays were written"
    size = main["dataset_size"]
    nan = 0
    for a in arrays:
        losses = np.load(a)
        assert losses.dtype == np.float32 and losses.shape == (size,)
        nan += int(np.isnan(losses).sum())
    assert nan == NAN_SAMPLES.get(example, 0), "every training sample is recorded once per epoch"
    if example == "regimes.py":
        assert "[regimes] completed" in r.stdout
