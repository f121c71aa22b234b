"""When a run stops early: a signal (preemption, Ctrl-C) or the wall-clock budget of --time-limit.

Both end the same way: the trainer saves a complete checkpoint at the current step and exits with a status that
says why (scripts.lib.cli: 128 + signal number, or 75 for the time limit), so a launcher knows to resume. On
several processes every rank must stop at the same step, so each rank's wish is all-reduced; the reduced value
is read one step late, which keeps the GPU queue full instead of waiting for it every step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from scripts.lib.cli import EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT

TIME_LIMIT = "time limit"
# Headroom kept below --time-limit besides the estimated save: log lines, the final grid, process exit.
TIME_LIMIT_MARGIN_S = 30.0


# A second Ctrl-C this soon after the first is the same keypress relayed again (torchrun's and accelerate's
# elastic agent forwards the terminal's SIGINT to workers that got it already), not a request to skip the save.
REPEATED_SIGINT_S = 2.0


class StopRequest:
    """Set by SIGTERM (preemption) or SIGINT (Ctrl-C); the trainer saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_sigint = 0.0

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            if time.monotonic() - self._first_sigint > REPEATED_SIGINT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
            return
        if signum == signal.SIGINT:
            self._first_sigint = time.monotonic()
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TimeBudget:
    """--time-limit: stop (after saving) when the next scheduled save would no longer fit in the budget.

    Time per step is amortised over this attempt (grids and saves included), and a save is assumed to take as
    long as the last one did.
    """

    def __init__(self, limit_s: float | None, start_step: int):
        self.limit_s = limit_s
        self.started = time.monotonic()
        self.start_step = start_step
        self.last_save_s = 0.0

    def saved(self, seconds: float) -> None:
        self.last_save_s = seconds

    def exhausted(self, step: int, next_save: int) -> bool:
        if self.limit_s is None or step <= self.start_step:
            return False
        elapsed = time.monotonic() - self.started
        per_step = elapsed / (step - self.start_step)
        needed = (next_save - step) * per_step + self.last_save_s + TIME_LIMIT_MARGIN_S
        return elapsed + needed > self.limit_s


class StopAgreement:
    """Every rank's stop wish (signal, time limit) combined so that all ranks stop after the same step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.several = accelerator.num_processes > 1
        self._pending: torch.Tensor | None = None
        # Filled in place each step: creating a device tensor from a Python number would wait for the GPU.
        self._wish = torch.zeros(2, device=accelerator.device)

    def reason(self, signum: int | None, over_time: bool) -> str | None:
        """The agreed reason to stop after this step (a signal name or TIME_LIMIT), or None to go on."""
        if not self.several:
            return _reason(signum, over_time)
        agreed = self._pending
        self._wish[0].fill_(float(signum or 0))
        self._wish[1].fill_(float(over_time))
        self._pending = self._wish.clone()
        # The largest signal number wins where ranks caught different ones, so all name the same reason.
        torch.distributed.all_reduce(self._pending, op=torch.distributed.ReduceOp.MAX)
        if agreed is None:
            return None
        signum_max, over_time_max = agreed.tolist()  # last step's value: its work is done, this one's is queued
        return _reason(int(signum_max) or None, over_time_max > 0)


def _reason(signum: int | None, over_time: bool) -> str | None:
    if signum:
        return signal.Signals(signum).name
    return TIME_LIMIT if over_time else None


def exit_status(reason: str) -> int:
    """The process exit status that tells a launcher why the run stopped (see scripts.lib.cli)."""
    if reason == TIME_LIMIT:
        return EXIT_TIME_LIMIT
    return EXIT_SIGNAL_BASE + signal.Signals[reason].value
