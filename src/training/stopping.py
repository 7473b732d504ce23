"""How a training run stops early: the exception that carries its message and exit code, and the
signal handling that turns Ctrl-C (SIGINT) and SIGTERM into a stop at a step boundary, with a save.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from src.training import distributed as dist_utils

if TYPE_CHECKING:  # train.py imports this module
    from src.training.train import Runtime


class TrainingStopped(Exception):
    """Raised to end a run early with a message and an exit code (after saving what can be saved).
    `resumable`: the run's last checkpoint continues it (`run(config, resume="auto")`)."""

    def __init__(self, message: str, exit_code: int, resumable: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.resumable = resumable


class StopRequest:
    """Once installed, SIGINT/SIGTERM set a flag; the loop stops at the next step boundary and
    saves. In a single process a second signal ends it at once (a user pressing Ctrl-C twice means
    it); under torchrun a second one is ignored (`install`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self.reason = ""  # said with the signal's name when it did not come as a signal
        self._previous: dict = {}
        self.second_signal_exits = True

    def install(self, second_signal_exits: bool) -> None:
        """Python delivers signals to the main thread only: called from another thread this
        installs nothing, and stopping that run is its caller's business.

        `second_signal_exits`: true in a single process (Ctrl-C twice ends it). Under torchrun a
        repeated signal is the same stop delivered twice (a scheduler signals every process of the
        job, and torchrun forwards its own), and torchrun's --shutdown-timeout is the hard stop."""
        self.second_signal_exits = second_signal_exits
        if threading.current_thread() is threading.main_thread():
            # A signal the caller ignores stays ignored: a shell starts background jobs (`cmd &`,
            # nohup) with SIGINT ignored, and a Ctrl-C meant for the shell must not stop them.
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}

    def uninstall(self) -> None:
        """Give back the caller's handlers: `run()` called from a notebook or a script must not
        leave Ctrl-C setting a flag that nothing reads any more."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            if self.second_signal_exits:
                sys.stderr.write(f"error: stopped at once by a second {signal.Signals(signum).name}, without "
                                 "saving this epoch; the checkpoints written before are kept (--resume auto "
                                 "continues from the last)\n")
                raise SystemExit(128 + signum)
            return
        self.signal_name = signal.Signals(signum).name

    def request(self, signal_name: str, reason: str) -> None:
        """Stop as a signal would: SIGPIPE when the run's own output could not be written."""
        if self.signal_name is None:
            self.signal_name, self.reason = signal_name, f" ({reason})"

    def stopped(self, where: str, saved: Path, note: str = "") -> TrainingStopped:
        """The error that ends a run stopped by the signal: exit 128 + its number (130 for SIGINT,
        143 for SIGTERM, 141 for SIGPIPE), as a shell reports a process the signal ended."""
        return TrainingStopped(f"stopped by {self.signal_name}{self.reason} {where}; saved {saved}{note}",
                               exit_code=128 + signal.Signals[self.signal_name].value, resumable=True)

    def requested(self, step: int, runtime: Runtime) -> bool:
        """Single process: checked every step. Under torchrun the ranks agree every 10 steps, so all
        of them stop at the same step (a signal may reach them at slightly different times)."""
        if runtime.dist.enabled and (step + 1) % 10:
            return False
        return self.agreed(runtime)

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any rank has a stop request; every rank then takes the signal's name (a signal
        sent to one process stops them all, with the same message and exit code)."""
        code = signal.Signals[self.signal_name].value if self.signal_name else 0
        code = int(dist_utils.max_over_ranks([code], runtime.dist, runtime.device)[0])
        if code and signal.Signals(code).name != self.signal_name:  # another rank's signal wins
            self.signal_name, self.reason = signal.Signals(code).name, ""
        return bool(code)
