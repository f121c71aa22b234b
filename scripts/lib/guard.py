"""The non-finite guard: no NaN/inf loss, gradient or weight ever reaches a checkpoint.

On the device, every step: a step whose loss or gradient norm is not finite is not applied (the fused AdamW
kernel skips it through its `found_inf` input, as it does for a gradient scaler), and whether the weights are
still finite after the step is recorded. Nothing of this waits for the GPU; the record is read at log and
save boundaries, where the trainer stops with advice before anything is written. A checkpoint is also checked
tensor by tensor right before it is saved, so the last good checkpoint really is good.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


# What went non-finite first, as FirstBadStep records it.
PROBLEMS = {1: "loss", 2: "gradient norm", 3: "weights (after the update)"}


def apply_update_only_if_finite(optimizer, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Make the coming `optimizer.step()` a no-op unless loss and gradient norm are finite.

    Returns a device int: 0 fine, 1 the loss, 2 the gradient norm was not finite (see PROBLEMS).

    `optimizer` may be Accelerate's wrapper; the flag goes to the torch optimizer inside it. An optimizer that
    cannot skip on the device (not fused, or driven by a gradient scaler that sets the flag itself) is left as
    it is: the weights check after the step still catches what it lets through.
    """
    loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner.defaults.get("fused") and getattr(optimizer, "scaler", None) is None:
        inner.found_inf = (~(loss_ok & grad_ok)).float()
    return torch.where(loss_ok, torch.where(grad_ok, 0, 2), 1)


def verdict_after_update(verdict: torch.Tensor, weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """The step's verdict, with 3 (PROBLEMS) when it was fine so far but left the weights non-finite."""
    return torch.where((verdict == 0) & ~all_finite(weights), 3, verdict)


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One device bool: every element of every tensor is finite (one multi-tensor norm pass, no sync).

    A norm overflows to inf for values near the float range's end too: such weights count as broken.
    """
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(floats)).float()).all()


class FirstBadStep:
    """The first step whose loss, gradient or updated weights were not finite, and which, kept on the device."""

    def __init__(self, device: torch.device):
        self._step = torch.full((), -1, dtype=torch.int64, device=device)
        self._problem = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step: int, verdict: torch.Tensor) -> None:
        first = (self._step < 0) & (verdict != 0)
        self._step = torch.where(first, step, self._step)
        self._problem = torch.where(first, verdict, self._problem)

    def first(self) -> tuple[int, str] | None:
        """(step, what went non-finite), or None when all were fine (waits for the device: boundaries only)."""
        step, problem = torch.stack([self._step, self._problem]).tolist()
        return None if step < 0 else (step, PROBLEMS[problem])


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf (for the check before a save)."""
    names = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]
