"""The checkpointed state of a training run, and the rules for loading one into a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.ema import EMA
from scripts.lib.cli import UserError


@dataclass
class TrainingState:
    """What a checkpoint holds and restores: the weights and optimizer moments, and, where a trainer has them,
    its EMA weights and fp16 loss scale. A trainer adds its own JSON-able record (step, epoch...) when saving."""

    model: nn.Module  # the plain module (no DDP / compile wrapper)
    optimizer: Any  # the (prepared) optimizer
    ema: EMA | None = None
    scaler: Any = None  # Accelerate's fp16 gradient scaler, if any

    def state_dict(self, **record: Any) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **record}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore from a checkpoint's state; one UserError if it does not fit (missing parts, wrong shapes)."""
        try:
            self.model.load_state_dict(state["model"])
            load_optimizer_state(self.optimizer, state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"{folder} does not hold a training state this run can load ({reason}) — use the "
                "same flags and data as the run that saved it, or a new --run-name"
            ) from error


def load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """Restore an optimizer from a checkpoint, each moment tensor in its parameter's memory layout.

    Checkpoints store tensors contiguous, so a channels-last parameter's Adam moments come back in NCHW order;
    the fused AdamW kernel walks parameter, gradient and moments as flat memory and then silently pairs wrong
    elements (measured: a resumed classifier diverged from the uninterrupted run at its first step).
    """
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            moments = inner.state.get(param, {})
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param).copy_(value)


def check_same_setup(folder: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint into a model it was not trained as (one line listing the differences)."""
    differences = [
        f"{key} {saved.get(key, '(not recorded)')} -> {value}"
        for key, value in wanted.items()
        if saved.get(key) != value
    ]
    if differences:
        raise UserError(
            f"{folder} was trained with a different setup ({'; '.join(differences)}) — use the same "
            "flags and data to continue it, or a new --run-name to start another run"
        )
