"""Ctrl-C during a build: recorded as well as raised, so that no library can swallow it into a published bundle.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Where that is a callback whose
exceptions Python only prints ("Exception ignored in ...": at-fork hooks, __del__, weakref callbacks), the
interrupt is lost and the build goes on. Measured in CI: a Ctrl-C that arrived while subprocess.Popen forked the
verification process landed in filelock's at-fork hook, was printed as a traceback, and the build published and
exited 0. So the signal is also recorded, and the build checks the record where stopping is cheap: while it waits
for a verification process, and before it publishes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_received = threading.Event()


@contextlib.contextmanager
def interrupts_recorded() -> Iterator[None]:
    """While inside: SIGINT is recorded and raised as KeyboardInterrupt, and a KeyboardInterrupt that Python could
    not raise (an unraisable one) is recorded silently instead of printed as a traceback."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set signal handlers
        yield
        return
    _received.clear()

    def on_sigint(signum, frame):
        _received.set()
        raise KeyboardInterrupt

    def on_unraisable(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _received.set()
        else:
            previous_hook(unraisable)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, on_unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook
        _received.clear()  # raised by now, or the build is over: no later command of this process inherits it


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """While inside: SIGINT is only recorded, for raise_if_interrupted() to raise once the block is over.

    For the moment a process forks: an interrupt raised inside an at-fork hook leaves the hook's own bookkeeping
    half done, and the hook that runs next fails on it with a traceback of its own (filelock 4.3's
    _resume_parent_after_fork, seen in the Ctrl-C tests), which no unraisable hook can tell from a real bug.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: _received.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt that a SIGINT received inside interrupts_recorded() should have raised."""
    if _received.is_set():
        raise KeyboardInterrupt
