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


def test_ctrl_c_is_one_line_saying_how_to_go_on(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """Ctrl-C during a stage printed a KeyboardInterrupt traceback (from deep inside Keras or a
    download), although what the stage finished is kept and a rerun goes on from it. The
    interrupt goes on up (Python then ends the process by SIGINT), its traceback left out."""

    def interrupted(argv: list[str] | None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # run_stage quietens it
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_stage(interrupted)
    sys.excepthook(stopped.type, stopped.value, stopped.tb)  # prints nothing
    err = capsys.readouterr().err
    assert err.startswith("interrupted; run the stage again to go on") and err.count("\n") == 1


INTERRUPTIBLE = """
import time
from stages.errors import run_stage
run_stage(lambda argv: (print("ready", flush=True), time.sleep(60)))  # ready once inside run_stage
"""


def test_ctrl_c_in_a_script_stops_the_script_too(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group: the shell running a script and the
    stage. A shell goes on to the script's next command unless the stage died of SIGINT (bash's
    wait-and-cooperative-exit; Python ends an uncaught KeyboardInterrupt so for this reason). With
    Ctrl-C turned into a plain exit status 130, `python -m stages.train ...; python -m stages.evaluate ...`
    went on to evaluate, and the script ended with status 0."""
    import os
    import signal

    script = f"{sys.executable} -c '{INTERRUPTIBLE}'; echo went-on"
    shell = subprocess.Popen(["bash", "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True,
                             # as a terminal's shell has it (a job started with & in a script ignores SIGINT)
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert shell.stdout.readline().strip() == "ready"
    os.killpg(shell.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, err = shell.communicate(timeout=60)
    assert "went-on" not in out, "the script went on after Ctrl-C"
    assert shell.returncode == -signal.SIGINT
    assert err.startswith("interrupted; run the stage again to go on") and "Traceback" not in err
