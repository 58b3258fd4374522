"""The command line's contract on bad input and for scripts: one clear line and a non-zero
exit (no traceback) for options out of range and output paths the system refuses; `--json`
documents that parse the same way whichever argument order; `--version`."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from onthefly_supervisor import cli
from onthefly_supervisor.archive import _load_reason, export_session
from onthefly_supervisor.lifecycle import RunStatus
from onthefly_supervisor.store import RunRow, Store
from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError


def _project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: RunStatus = RunStatus.COMPLETED
) -> str:
    root = tmp_path / ".onthefly" / "sessions"
    sid = "20250101-000000-abcd"
    st = Store(str(root / sid))
    try:
        st.add_run(RunRow("main", "main", "main", status, [], 1.0))
    finally:
        st.close()
    (root / "latest").symlink_to(sid)
    monkeypatch.chdir(tmp_path)
    return sid


def test_sessions_check_json_in_either_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = _project(tmp_path, monkeypatch)
    for argv in (["check", sid, "--json"], ["check", "--json", sid], ["--json", "check", sid]):
        code = cli.main(["sessions", *argv])
        doc = json.loads(capsys.readouterr().out)
        assert doc["session_id"] == sid and doc["ok"] is (code == 0), (argv, doc)
        assert isinstance(doc["problems"], list)


def test_a_seed_out_of_range_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    assert cli.main(["run", "--headless", "--port", "0", "--seed", "-5", str(script)]) == 1
    err = capsys.readouterr().err
    assert "--seed -5: must be an integer in 0..4294967295" in err and "Traceback" not in err
    assert not (tmp_path / ".onthefly").exists()
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(OnTheFlyError, match="Trainer\\(seed="):
            TrainerConfig.from_kwargs({"seed": bad})
    assert TrainerConfig.from_kwargs({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_output_paths_the_system_refuses_get_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(tmp_path, monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, says in (
        (["export-session", "-o", str(tmp_path / "no" / "such" / "x.tar")], "does not exist"),
        (["export-session", "-o", str(afile / "x.tar")], "does not exist"),
        (["report", "-o", str(afile / "r")], "Not a directory"),
    ):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "no").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_session(tmp_path / ".onthefly" / "sessions" / "latest", tmp_path / "n" / "a.tar")


def test_a_refused_pickle_says_what_was_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    torch.save({"w": Payload()}, tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(pickle.dumps(Payload()))
    for name in ("a.pt", "b.pt"):
        with pytest.raises(Exception) as e:
            torch.load(tmp_path / name, weights_only=True)
        text = _load_reason(e.value)
        assert text.startswith("UnpicklingError: ") and "file an issue" not in text, text
        assert "weights_only` set to `False`" not in text and len(text) < 200, text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("onthefly ")


def test_the_session_seed_comes_from_seed_or_onthefly_seed(tmp_path: Path) -> None:
    assert cli.session_seed(None) == 0
    assert cli.session_seed("7") == 7 and cli.session_seed(" none ") is None
    with pytest.raises(cli.CliError, match="give an integer or 'none'"):
        cli.session_seed("x")
    from onthefly_supervisor.supervisor import Supervisor, SupervisorConfig
    from tests.unit.test_supervisor_units import FakeLauncher

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    cfg = SupervisorConfig(script=str(script), project_dir=str(tmp_path), port=0, seed=None)
    sup = Supervisor(cfg, launcher=FakeLauncher())
    sup.start()
    try:
        # Workers are told 'none' (no seeding), as `python train.py` under ONTHEFLY_SEED=none.
        assert sup.store.get_meta("seed") == "none"
    finally:
        sup.shutdown()


def test_a_session_whose_script_ended_before_fit_has_nothing_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = _project(tmp_path, monkeypatch, RunStatus.RUNNING)
    st = Store(str(tmp_path / ".onthefly" / "sessions" / sid))
    try:
        st.set_run_status(
            "main",
            RunStatus.STOPPED,
            "train.py exited before Trainer.fit() (exit code 0): nothing to train",
        )
    finally:
        st.close()
    assert cli.main(["resume", "--headless", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert f"session {sid} has nothing to resume: train.py exited before" in err, err
    assert "`onthefly run SCRIPT [ARGS...]` starts it again" in err and err.count("\n") == 1


def test_a_closed_pipe_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`onthefly sessions ls | head`: the reader went away; exit 0, nothing on stderr (a
    BrokenPipeError is an OSError, which other paths report as an error)."""
    _project(tmp_path, monkeypatch)

    def closed(_a: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_sessions", closed)  # bound when main() builds its parser
    assert cli.main(["sessions", "ls"]) == 0
    assert capsys.readouterr().err == ""


def test_edit_help_lists_the_keys_a_plan_card_takes() -> None:
    from onthefly_supervisor.autopilot import EDITABLE
    from onthefly_supervisor.cli import PLAN_EDIT_KEYS

    assert set(PLAN_EDIT_KEYS) == EDITABLE
