"""Ctrl-C ends every command with one line and exit code 130, not a traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

from src.errors import INTERRUPTED_EXIT
from tests.conftest import REPO

# Every command but training, which saves a checkpoint first (tests/training).
COMMANDS = ["src.data.prepare", "src.data.standin", "src.evaluation.evaluate", "src.evaluation.curves",
            "src.inference.predict", "src.inference.gallery", "src.inference.export", "src.bench.train_speed",
            "src.bench.gallery_study"]


@pytest.mark.parametrize("module", COMMANDS)
def test_ctrl_c_gives_one_line_and_exit_code_130(module, monkeypatch, capsys):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    assert importlib.import_module(module).main([]) == INTERRUPTED_EXIT
    assert capsys.readouterr().err == "error: stopped by Ctrl-C (SIGINT)\n"


def test_ctrl_c_in_a_terminal_stops_a_command_and_its_workers_quietly(tmp_path):
    """The whole process group gets SIGINT, as from a terminal: the command, its fork server and the
    worker processes drawing stand-in images."""
    out = tmp_path / "raw"
    process = subprocess.Popen([sys.executable, "-m", "src.data.standin", "--out", str(out), "--individuals", "40",
                                "--images", "40", "--size", "256", "--workers", "2"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(out.rglob("*.png")):  # the workers are drawing
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (process.returncode, err) == (INTERRUPTED_EXIT, "error: stopped by Ctrl-C (SIGINT)\n")
