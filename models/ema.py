"""Exponential moving average of model weights, the weights DiT samples with.

DiT (Peebles & Xie 2023) keeps an EMA with decay 0.9999; the optional warm-up
decay = min(decay, (1 + n) / (10 + n)) (as in TensorFlow's ExponentialMovingAverage with num_updates,
and timm/ema-pytorch) lets short runs use mostly recent weights instead of the random init.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen eval-mode copy of a model whose floating-point weights trail the model's."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied.

        `model` must be the unwrapped module (no DDP / torch.compile wrapper), with the same architecture.
        """
        ema_params = list(self.model.parameters())
        params = list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError(
                f"EMA holds {len(ema_params)} parameters but the model has {len(params)}; "
                "pass the unwrapped model of the same architecture"
            )
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "warmup": self.warmup,
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; tensors are copied into the existing ones, so CPU state can load into a GPU EMA."""
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state["warmup"])
        self.model.load_state_dict(state["model"])
