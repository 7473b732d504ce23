"""Ctrl-C and SIGTERM end every command with one line and exit code 130 or 143, not a traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.bench.data import prepared_standin
from src.errors import (INTERRUPTED_EXIT, STDOUT_FAILURES, TERMINATED_EXIT, Terminated, command_main, command_parser,
                        out_of_memory)
from tests.conftest import REPO

# Every command but training, which saves a checkpoint first (tests/training).
COMMANDS = ["src.data.prepare", "src.data.standin", "src.evaluation.evaluate", "src.evaluation.curves",
            "src.inference.predict", "src.inference.gallery", "src.inference.export", "src.bench.train_speed",
            "src.bench.gallery_study"]


@pytest.mark.parametrize("module", [*COMMANDS, "src.training.train"])
def test_a_python_without_the_packages_says_which_python_to_use(module):
    """`python -m ...` with the system Python instead of .venv's (-S: no site-packages) ended in a
    traceback, `ModuleNotFoundError: No module named 'torch'` (or 'PIL', 'yaml', ...)."""
    result = subprocess.run([sys.executable, "-S", "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {sys.executable} lacks the project's packages (numpy, PIL, ")
    assert result.stderr.endswith("run the command with .venv/bin/python, or `source .venv/bin/activate` first "
                                  "(`bash scripts/setup.sh` creates .venv)\n")


@pytest.mark.parametrize("stop, code, line", [
    (KeyboardInterrupt, INTERRUPTED_EXIT, "error: stopped by Ctrl-C (SIGINT)"),
    (Terminated, TERMINATED_EXIT, "error: stopped by SIGTERM")])
@pytest.mark.parametrize("module", COMMANDS)
def test_ctrl_c_and_sigterm_give_one_line_and_their_exit_codes(module, stop, code, line, monkeypatch, capsys):
    def interrupted(*_args, **_kwargs):
        raise stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    assert importlib.import_module(module).main([]) == code
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("shortage, line", [(MemoryError("x.png: out of memory while decoding"),
                                              "error: x.png: out of memory while decoding"),
                                             (MemoryError(), "error: out of memory")])
@pytest.mark.parametrize("module", COMMANDS)
def test_running_out_of_memory_gives_one_line_and_exit_code_2(module, shortage, line, monkeypatch, capsys):
    """A MemoryError (an image too large for this machine to decode, since it is no longer taken for a
    bad image) ended every command with a traceback."""
    def out_of_memory(*_args, **_kwargs):
        raise shortage

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", out_of_memory)
    assert importlib.import_module(module).main([]) == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("stop, code, line", [
    (KeyboardInterrupt, INTERRUPTED_EXIT, "error: stopped by Ctrl-C (SIGINT)"),
    (Terminated, TERMINATED_EXIT, "error: stopped by SIGTERM")])
def test_a_command_run_by_another_leaves_the_stop_to_it(stop, code, line, monkeypatch, tmp_path, capsys):
    """The benchmarks make their data with standin's main: a stop there printed its line, returned its
    code, and the benchmark then failed with `could not make the stand-in data` and exit code 1."""
    def interrupted(*_args, **_kwargs):
        raise stop

    @command_main
    def benchmark() -> int:
        prepared_standin(tmp_path, 4, 10, 16)
        return 0

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    assert benchmark() == code
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("module", [*COMMANDS, "src.training.train"])
def test_option_errors_are_one_line_too(module, capsys):
    """argparse printed its usage block (3-5 lines) before the error; --help still shows it. main()
    returns the status, as for any other error: argparse's SystemExit ended a Python caller's program
    (`gallery.main([...])`, which docs/INFERENCE.md gives for use from Python)."""
    assert importlib.import_module(module).main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(f" (see python -m {module} --help)\n") and err.count("\n") == 1


@pytest.mark.parametrize("module", [*COMMANDS, "src.training.train"])
def test_help_returns_0_to_a_python_caller(module, capsys):
    assert importlib.import_module(module).main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module}")


@pytest.mark.parametrize("argv", [["src.inference.export", "--checkpoint", "m.pt", "--out", ""],
                                  ["src.evaluation.evaluate", "--checkpoint", "m.pt", "--out", ""],
                                  ["src.data.prepare", "--raw-dir", "", "--out-dir", "prepared"],
                                  ["src.training.train", "--config", "c.yaml", "--resume", ""],
                                  ["src.training.train", "--config", ""]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(argv, capsys):
    """`--out "$OUT"` with OUT unset wrote an export or a report into the current folder."""
    module, *options = argv
    assert importlib.import_module(module).main(options) == 2
    assert "an empty path (it would mean the current folder)" in capsys.readouterr().err


@pytest.mark.parametrize("group, signum, code, line", [
    (True, signal.SIGINT, INTERRUPTED_EXIT, "error: stopped by Ctrl-C (SIGINT)"),  # Ctrl-C in a terminal
    (False, signal.SIGTERM, TERMINATED_EXIT, "error: stopped by SIGTERM"),  # `kill PID`; it ended silently
])
def test_a_signal_stops_a_command_and_its_workers_quietly(tmp_path, group, signum, code, line):
    """Ctrl-C signals the whole process group, as from a terminal: the command, its fork server and
    the worker processes drawing stand-in images; `kill` the command alone."""
    out = tmp_path / "raw"
    process = subprocess.Popen([sys.executable, "-m", "src.data.standin", "--out", str(out), "--individuals", "40",
                                "--images", "40", "--size", "256", "--workers", "2"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(out.rglob("*.png")):  # the workers are drawing
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        (os.killpg if group else os.kill)(process.pid, signum)
        _, err = process.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while _group_alive(process.pid):  # the fork server and the workers end with the command
            assert time.monotonic() < deadline, "processes of the command's group still running"
            time.sleep(0.1)
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    assert (process.returncode, err) == (code, line + "\n")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads which libraries a process has loaded")
def test_ctrl_c_while_a_command_imports_torch_gives_one_line(tmp_path):
    """In a command's first seconds Python is still importing torch, before `main` can catch anything."""
    process = subprocess.Popen([sys.executable, "-m", "src.training.train", "--config", str(tmp_path / "none.yaml")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():  # torch's import is under way
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # Python ends an unhandled KeyboardInterrupt by SIGINT (130 in a shell); `main` returns 130 itself.
    assert process.returncode in (-signal.SIGINT, INTERRUPTED_EXIT)
    assert err == "error: stopped by Ctrl-C (SIGINT)\n"


def test_a_commands_help_describes_it_by_the_docstrings_whole_first_paragraph():
    # The gallery study's summary runs over two lines; its first line alone ended mid-sentence.
    parser = command_parser("src.x", "Measure nearest-neighbour against prototype\nmatching, and more.\n\n"
                                            "    python -m src.x --out o\n")
    assert parser.description == "Measure nearest-neighbour against prototype matching, and more."


class _ShortOfMemory(torch.utils.data.Dataset):
    def __init__(self, shortage: MemoryError):
        self.shortage = shortage

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise self.shortage


@pytest.mark.parametrize("shortage, line", [(MemoryError("x.png: out of memory while decoding"),
                                              "error: x.png: out of memory while decoding"),
                                             (MemoryError(), "error: out of memory")])
def test_running_out_of_memory_in_a_dataloader_worker_names_the_shortage(shortage, line):
    """A bare MemoryError in a worker (Python's own, from an allocation) came out as `error: MemoryError`."""
    with pytest.raises(MemoryError) as raised:
        next(iter(torch.utils.data.DataLoader(_ShortOfMemory(shortage), num_workers=1)))
    assert out_of_memory(raised.value) == line


@pytest.mark.parametrize("code, lines", [(0, ["error: cannot write the results to stdout (No space left on device)"]),
                                         (2, ["error: bad input"])])
def test_a_stdout_failure_is_said_once_and_only_where_no_error_was(code, lines, capsys):
    """A command that failed with its own line (exit 2) on a full stdout said a second `error:` line."""
    @command_main
    def command() -> int:
        STDOUT_FAILURES.append("cannot write the results to stdout (No space left on device)")  # as print_stdout
        if code:
            print("error: bad input", file=sys.stderr)
        return code

    assert command() == 2
    assert capsys.readouterr().err.splitlines() == lines
