"""Between two log lines: the loss summed on the device and the wall time, turned into the logged figures."""

from __future__ import annotations

import math
import time

import torch

from scripts.lib.runtime import synchronize


def next_boundary(step: int, interval: int, last: int) -> int:
    """The first step after `step` that is a multiple of `interval`, or `last` if that comes first."""
    return min((step // interval + 1) * interval, last)


class MetricsWindow:
    """Loss and time of the steps since the last log line.

    The loss stays on the device until the window closes, so logging costs one GPU wait per log line, not one
    per step. The first step of an attempt (allocations, kernel selection) is timed apart and left out of img/s
    unless it is all the window holds.
    """

    def __init__(self, device: torch.device, start_step: int):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()
        self.first_step_s: float | None = None
        self.seconds_per_step = math.nan  # of the last closed window
        self.last_loss = math.nan

    def add(self, loss: torch.Tensor, first_of_attempt: bool = False) -> None:
        self.loss_sum += loss
        self.steps += 1
        if first_of_attempt:
            synchronize(self.device)  # once per attempt: the warm-up's real end
            self.first_step_s = time.perf_counter() - self.started
            self.started = time.perf_counter()

    def close(self, accelerator, images_per_step: int) -> dict[str, float]:
        """{"loss" (mean over the window and all processes), "img_per_s", "seconds_per_step"}; starts a new window."""
        loss = accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps  # waits for the device
        seconds, timed = time.perf_counter() - self.started, self.steps
        if self.first_step_s is not None:
            timed -= 1
            if timed == 0:  # only the warm-up step in this window: report it rather than nothing
                seconds, timed = self.first_step_s, 1
        self.seconds_per_step = seconds / timed
        self.last_loss = loss
        figures = {
            "loss": loss,
            "img_per_s": images_per_step / self.seconds_per_step,
            "seconds_per_step": self.seconds_per_step,
        }
        if self.device.type == "cuda":
            figures["memory_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.first_step_s, self.started = 0, None, time.perf_counter()
        return figures
