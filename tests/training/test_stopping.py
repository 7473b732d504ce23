"""The signal handling of a training run (`StopRequest`); whole runs stopped by a signal are in
test_train.py and test_resume.py."""
import signal
from pathlib import Path

import pytest

from src.training.stopping import StopRequest


def test_a_signal_the_caller_ignores_stays_ignored_during_training(monkeypatch):
    """A shell starts background jobs with SIGINT ignored: the Ctrl-C typed at that shell must not
    stop them. SIGTERM (a scheduler's stop) is still taken, and both are given back afterwards."""
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL)
    installed = {}

    def set_handler(sig, handler):
        installed[sig] = handler
        return signal.SIG_DFL  # what was there before

    monkeypatch.setattr(signal, "signal", set_handler)
    stop = StopRequest()
    stop.install(second_signal_exits=True)
    assert list(installed) == [signal.SIGTERM] and installed[signal.SIGTERM] == stop._handle
    installed.clear()
    stop.uninstall()
    assert installed == {signal.SIGTERM: signal.SIG_DFL}


def test_a_second_signal_ends_the_run_at_once_saying_so(capsys):
    stop = StopRequest()
    stop.second_signal_exits = True
    stop._handle(signal.SIGTERM, None)  # the first: a stop at the next step
    with pytest.raises(SystemExit) as exited:
        stop._handle(signal.SIGTERM, None)
    assert exited.value.code == 143
    assert capsys.readouterr().err.startswith("error: stopped at once by a second SIGTERM, without saving this epoch")


def test_exit_codes_follow_the_signal():
    for name, code in (("SIGINT", 130), ("SIGTERM", 143)):
        stop = StopRequest()
        stop.signal_name = name
        stopped = stop.stopped("after epoch 1", Path("x_last.pt"))
        assert stopped.exit_code == code and stopped.resumable and name in str(stopped)


def test_a_signal_keeps_its_exit_code_when_the_output_is_lost_after_it():
    """SIGTERM, then stdout closed: the stop is still the signal's (143), not SIGPIPE's (141)."""
    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop.request("SIGPIPE", "stdout could not be written")
    assert stop.stopped("after epoch 1", Path("x_last.pt")).exit_code == 143
