"""A running CPU training takes over a freed core or gives one back: on ``SIGUSR1`` it adds one torch intra-op
thread, on ``SIGUSR2`` it drops one.

``tools/quickstart.py`` trains two models side by side at one thread each (a second thread per run on a
2-core machine oversubscribes it). When one finishes, its core would idle for the rest of the other run; the
quickstart then sends ``SIGUSR1`` to the run still going, which this handler turns into one more thread (never
more than the CPUs this process may use). A run that trains alone on both cores until the second one starts is
sent ``SIGUSR2`` then (never fewer than one thread). A thread count change alters the floating-point
reduction order, so a run that switched is not bit-identical to one that did not: the quickstart's figures are a
demonstration.
"""
from __future__ import annotations

import atexit
import os
import signal
from typing import Optional

import torch

__all__ = ["THREAD_SIGNAL", "GIVE_BACK_SIGNAL", "usable_cpus", "take_another_thread", "give_back_thread",
           "install_thread_signal"]

# POSIX only (Windows has neither: there the quickstart keeps one thread per run)
THREAD_SIGNAL: Optional[int] = getattr(signal, "SIGUSR1", None)
GIVE_BACK_SIGNAL: Optional[int] = getattr(signal, "SIGUSR2", None)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def take_another_thread(signum: Optional[int] = None, frame: object = None) -> int:
    """One more torch intra-op thread, up to :func:`usable_cpus`; returns the thread count now. Signal-safe:
    Python runs it in the main thread between two bytecodes, never inside a running torch op, and it logs
    nothing (a logging lock held by the interrupted code would deadlock)."""
    n = torch.get_num_threads()
    if n < usable_cpus():
        torch.set_num_threads(n + 1)
    return torch.get_num_threads()


def give_back_thread(signum: Optional[int] = None, frame: object = None) -> int:
    """One torch intra-op thread fewer, never below one; returns the thread count now (signal-safe, as above)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(n - 1)
    return torch.get_num_threads()


def install_thread_signal() -> bool:
    """Make ``SIGUSR1`` call :func:`take_another_thread` and ``SIGUSR2`` :func:`give_back_thread` (their default
    action would end the process). False where the platform has no such signals or when not called from the main
    thread."""
    if THREAD_SIGNAL is None or GIVE_BACK_SIGNAL is None:
        return False
    try:
        signal.signal(THREAD_SIGNAL, take_another_thread)
        signal.signal(GIVE_BACK_SIGNAL, give_back_thread)
    except ValueError:  # not the main thread
        return False
    # a signal sent while the finished process shuts down must not kill it: Python's finalisation resets
    # handlers to the default action (end the process), but leaves ignored signals ignored
    atexit.register(_ignore_thread_signals)
    return True


def _ignore_thread_signals() -> None:
    for sig in (THREAD_SIGNAL, GIVE_BACK_SIGNAL):
        signal.signal(sig, signal.SIG_IGN)
