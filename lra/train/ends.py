"""How a run ends before train.steps: the `RunEnded` exceptions, raised where that is noticed
and turned into the row's Status once (in `fit`), and `Stop`, the signals that request one."""

from __future__ import annotations

import signal
import threading
from typing import ClassVar

from lra.results import Status


class RunEnded(Exception):
    """A run that ends before train.steps, raised where that is noticed; `fit` turns it into the
    row's Status, once."""

    status: ClassVar[Status]


class Diverged(RunEnded):
    """The training loss became NaN or inf: the run ends without a checkpoint of that state."""

    status = Status.DIVERGED


class TimedOut(RunEnded):
    """train.max_time_s passed, or SIGUSR1 (a sweep's point_timeout_s) arrived: a checkpoint,
    then test accuracy of the best parameters so far."""

    status = Status.TIMEOUT


class Interrupted(RunEnded):
    """SIGINT/SIGTERM: a checkpoint and no test evaluation. Raised at the step's boundary, and by
    `evaluate`, which checks `stop` once per batch."""

    status = Status.INTERRUPTED



class Stop:
    """Requests to stop a run, set by signals; the loop polls `requested` once per step.

    SIGINT/SIGTERM: `requested = Interrupted` (checkpoint, no test evaluation; `signum` says
    which). SIGUSR1, which a sweep's supervisor sends at `point_timeout_s`: `requested =
    TimedOut`, ending the run as `train.max_time_s` does (checkpoint, then test accuracy of the
    best parameters so far). Used as a context manager it installs the handlers (main thread
    only) and restores the previous ones on exit. A second SIGINT (Ctrl-C twice) raises
    KeyboardInterrupt; a repeated SIGTERM is the same request again and is ignored: one kill -9
    of a multi-threaded sweep delivers a point's PR_SET_PDEATHSIG SIGTERM once per parent thread
    that exits.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None      # the interrupting signal (SIGINT/SIGTERM)
        self.requested: type[RunEnded] | None = None   # None | Interrupted | TimedOut
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.requested = self.requested or TimedOut
        elif self.signum is None:
            self.signum, self.requested = signum, Interrupted
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

