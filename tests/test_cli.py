"""The ``imram`` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from imram.cli import main


def test_demo_runs_and_is_exact(capsys):
    assert main(["demo", "--images", "2", "--model", "scan_t2i"]) == 0
    out = capsys.readouterr().out
    assert "scan_t2i: scored 2 images x 10 captions" in out
    diff = float(out.split("max |batched - reference| on 6 pairs = ")[1].split()[0])
    assert diff <= 1e-5
    assert "chance level" in out and "rsum" in out


def test_module_form_and_user_error_exit_code():
    run = [sys.executable, "-m", "imram", "demo", "--model", "nope", "--images", "1"]
    result = subprocess.run(run, capture_output=True, text=True)
    assert result.returncode == 2
    assert "imram demo: error: unknown model 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
