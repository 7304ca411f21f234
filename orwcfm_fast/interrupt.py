"""Stop a training loop cleanly on SIGINT / SIGTERM: :class:`StopRequests`.

Cluster schedulers send SIGTERM before they kill a job (preemption, time limits); users press
Ctrl-C. Either way the run should finish the step it is in, save a checkpoint and exit, rather
than die mid-update. :class:`StopRequests` installs handlers that only record the signal; the
loop polls :attr:`StopRequests.signum` at step boundaries. The first signal also restores the
previous handlers, so a second Ctrl-C interrupts at once (the atomic checkpoint write keeps the
last complete checkpoint loadable even then).
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequests", "TrainingInterrupted"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint.

    A ``SystemExit``: left uncaught, the process exits with status ``128 + signum`` (the shell's
    convention for death by that signal) and no traceback.

    Attributes:
        signum: the signal number.
        checkpoint: path of the checkpoint written before stopping (``None`` if none was written).
    """

    def __init__(self, signum: int, checkpoint=None):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        where = f"; checkpoint saved to {self.checkpoint}" if self.checkpoint is not None else ""
        return f"training stopped on {name}{where}"


class StopRequests:
    """Context manager recording SIGINT/SIGTERM instead of acting on them.

    Args:
        enabled: install the handlers (only possible in the main thread; elsewhere this is a no-op).

    Attributes:
        signum: ``None`` until a signal arrives, then its number.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def may_stop(self) -> bool:
        """True if a stop was requested or still can be (the handlers are installed)."""
        return self.signum is not None or bool(self._previous)

    def _handler(self, signum, frame):
        self.signum = signum
        self._restore()  # a second signal acts as it would without us

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
