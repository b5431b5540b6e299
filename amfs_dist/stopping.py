"""Stop signals: Ctrl-C (INT), Slurm's USR1 before the time limit, TERM from Slurm, Kubernetes
and `ray job stop`. Each ends whatever an amfs command is doing within seconds.

The command line runs every command inside `raising`: a stop signal raises StopRequested (a
KeyboardInterrupt, so every `except KeyboardInterrupt` cleanup runs for TERM and USR1 as it does
for Ctrl-C) wherever the main thread is: in a validation, the final test, `amfs eval`, a wait for
Ray or storage. Code that must finish what it does first (a training step) installs its own
handlers for that stretch. ray.init puts Ray's native handler on TERM, which aborts the process:
`reinstall` puts ours back afterwards.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# Slurm (USR1 before the time limit, TERM on preemption), Kubernetes and `ray job stop` (TERM)
# and Ctrl-C (INT) all mean: stop, keep what is finished, say how to continue
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

_installed = False
_received: int | None = None  # the signal raise_on_stop last turned into StopRequested


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived; exit_code is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def raise_on_stop(signum, frame):
    global _received
    _received = signum
    raise StopRequested(signum)


def as_stop(e: BaseException) -> StopRequested | None:
    """The StopRequested that `e` is or stands for: Ray's waits (ray.get, ray.wait) turn the
    exception a signal handler raises into a plain KeyboardInterrupt."""
    if isinstance(e, StopRequested):
        return e
    if isinstance(e, KeyboardInterrupt) and _received is not None:
        return StopRequested(_received)
    return None


@contextmanager
def raising():
    """Within the block, every stop signal raises StopRequested in the main thread (elsewhere
    handlers cannot be set: nothing changes); the previous handlers come back after it."""
    global _installed, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, raise_on_stop) for s in STOP_SIGNALS}
    _installed, _received = True, None
    try:
        yield
    finally:
        _installed = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def reinstall() -> None:
    """After ray.init: our handlers again, inside a `raising` block."""
    if _installed and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, raise_on_stop)
