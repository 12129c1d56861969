"""SIGTERM and SIGINT end a command within seconds, whatever library code is running.

Python runs signal handlers in the main thread between bytecodes: while the main thread sits in one long C call
(an FFmpeg read, an ONNX Runtime or TVM run, a blocking wait) a signal is only noted. Here the signals are blocked
in the command's threads and a watchdog thread waits for them: it hands each one to the main thread
(``interrupt_main``, so the command's own handler runs — the compile's staging folder is removed as usual), and if
the command has not ended ``GRACE`` seconds later, it reports and exits with 128 + the signal itself. Threads the
command starts (ONNX Runtime's, torch's) inherit the blocked mask; spawned workers unblock it (``unblock``).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

SIGNALS = {signal.SIGTERM, signal.SIGINT}
STOP = signal.SIGUSR2  # wakes the watchdog when the command ends
GRACE = 5.0


def block() -> None:
    """At process start, before libraries start threads: every later thread inherits the blocked mask, so the
    signals wait for the watchdog instead of landing in a thread whose Python handler never runs."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS | {STOP})


def unblock() -> None:
    """In a child process started from a watched command: take signals again (its mask was inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS | {STOP})


@contextlib.contextmanager
def watched(on_timeout: Callable[[int], None]) -> Iterator[None]:
    """Run the body with SIGTERM/SIGINT routed through a watchdog; ``on_timeout(signum)`` reports, just before the
    process exits with 128 + signum, a command that did not end within ``GRACE`` seconds of the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS | {STOP})

    def watch() -> None:
        while True:
            signum = signal.sigwait(SIGNALS | {STOP})
            if signum == STOP or done.is_set():
                return
            _thread.interrupt_main(signum)
            if not done.wait(GRACE):
                on_timeout(signum)
                os._exit(128 + signum)

    dog = threading.Thread(target=watch, name="qvlc-watchdog", daemon=True)
    dog.start()
    try:
        yield
    finally:
        done.set()
        signal.pthread_kill(dog.ident, STOP)
        dog.join(timeout=1.0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
