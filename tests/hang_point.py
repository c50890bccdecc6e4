"""A plain lra.sweep.executor job that blocks for good: a stand-in for a hung XLA call. A module of
its own, so a worker imports it in well under a second (test_sweep imports JAX)."""

from __future__ import annotations

import signal
import threading

from lra.sweep.executor import redeliver


def hang(disposition: str) -> None:
    """Set SIGUSR1's disposition (SIG_DFL: the timeout ends it; SIG_IGN: it hangs on), take the
    executor's held-back signals, then block."""
    signal.signal(signal.SIGUSR1, getattr(signal, disposition))
    redeliver()
    threading.Event().wait()
