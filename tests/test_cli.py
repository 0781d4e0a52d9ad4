"""The ``imram`` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_index_and_search_report_bad_input_in_one_line(tmp_path, capsys):
    build = ["index", "build", "--checkpoint", str(tmp_path / "nothing"), "--data", str(tmp_path)]
    assert main([*build, "--split", "test", "--out", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"imram index: error: {tmp_path / 'nothing'}: checkpoint not found"
    assert main(["search", "--index", str(tmp_path / "none"), "--text", "a dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no index here" in err
    with pytest.raises(SystemExit) as usage:  # argparse: exactly one of --text and --image
        main(["search", "--index", str(tmp_path / "none")])
    assert usage.value.code == 2
