"""Writes that run out of room: one clear line, and nothing half-written under an output's name.

A full disk is played by the kernel's file-size limit (RLIMIT_FSIZE) in a child process: a write
past it fails with EFBIG ("File too large"), the way a full disk fails with ENOSPC, and both take
the same path through stages.errors.run_stage.
"""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


OVERWRITE = """
import sys
from pathlib import Path
from stages.errors import run_stage
from stages.files import write_text_atomic
run_stage(lambda argv: write_text_atomic(Path(sys.argv[1]), "new " * 5000))
"""


def test_a_write_past_the_room_left_keeps_the_old_file_and_says_so_in_one_line(tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    output.write_text('{"accuracy": 0.97}\n')
    result = subprocess.run([sys.executable, "-c", OVERWRITE, str(output)], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=file_size_limit(4096), timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no room left (File too large); free some space")
    assert output.read_text() == '{"accuracy": 0.97}\n'  # the old, complete file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left behind


def test_a_stage_that_runs_out_of_room_ends_in_one_line_without_a_half_written_output(tmp_path: Path) -> None:
    """The real fetch stage (scikit-learn's digits, offline): its record cannot be written."""
    out, provenance = tmp_path / "raw" / "digits", tmp_path / "raw" / "digits.provenance.json"
    command = [sys.executable, "-m", "stages.fetch", "--dataset", "digits", "--out", str(out), "--provenance", str(provenance)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, preexec_fn=file_size_limit(300), timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no room left (File too large); free some space (or raise the quota) and run again. Outputs are written "
        "under a temporary name and renamed only when complete: nothing half-written was left under an output's name"
    ]
    assert not provenance.exists()
    assert not [p.name for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no temporaries
    # With room, the same command completes and the record is whole.
    subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, timeout=600)
    assert json.loads(provenance.read_text())["source"]["kind"] == "sklearn"


def test_other_os_errors_keep_their_traceback_and_user_errors_stay_one_line(capsys: pytest.CaptureFixture) -> None:
    def broken(argv: list[str] | None) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/out")

    with pytest.raises(PermissionError):  # a bug or a setup problem: the traceback is the report
        run_stage(broken)

    def wrapped(argv: list[str] | None) -> None:
        raise OSError("arrow: IOError: No space left on device; while writing manifest.parquet")

    with pytest.raises(SystemExit):
        run_stage(wrapped)
    assert "error: no room left (No space left on device)" in capsys.readouterr().err

    def mistake(argv: list[str] | None) -> None:
        raise UserError("params.yaml: training.epochs: expected int")

    with pytest.raises(SystemExit):
        run_stage(mistake)
    assert capsys.readouterr().err == "error: params.yaml: training.epochs: expected int\n"


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "record.json", {"epochs": 3})
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "record.json") as temporary:
            temporary.write_text('{"epo')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads((tmp_path / "record.json").read_text()) == {"epochs": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_ctrl_c_is_one_line_saying_how_to_go_on(capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during a stage printed a KeyboardInterrupt traceback (from deep inside Keras or a
    download), although what the stage finished is kept and a rerun goes on from it."""

    def interrupted(argv: list[str] | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_stage(interrupted)
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted; run the stage again to go on") and err.count("\n") == 1
