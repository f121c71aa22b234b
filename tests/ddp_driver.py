"""Run a trainer's unchanged `main(cfg)` on every process of a distributed launch, then dump what each rank holds.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/ddp_driver.py DUMP dit <train_dit flags>
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_driver.py DUMP classifier <train.py flags>
    python tests/ddp_driver.py DUMP dit <flags>                              # the 1-process reference

The trainers save files from the main process only, so a test could never see whether rank 1 ended with the
same weights. This driver (test code, no hook in the trainers) records the objects `main` builds, and after
`main` returns every rank writes DUMP/rank<R>.safetensors (model parameters and buffers, the DiT's EMA weights
prefixed "ema.") and DUMP/rank<R>.json (the local loss of every forward pass it ran).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from scripts import train, train_dit
from scripts.lib.cli import parse_config

recorded: dict[str, Any] = {"local_losses": []}


class RecordingTrainer(train_dit.TrainingState):
    """The DiT trainer's bundle of raw model + EMA, kept for the dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        recorded["model"], recorded["ema"] = self.model, self.ema


def recording_objective(name: str, **options: Any):
    """The DiT objective, with every local (this rank's) training loss written down."""
    objective = train_dit_build_objective(name, **options)
    compute_loss = objective.training_loss

    def training_loss(*args: Any, **kwargs: Any):
        loss = compute_loss(*args, **kwargs)
        recorded["local_losses"].append(loss.item())
        return loss

    objective.training_loss = training_loss
    return objective


def recording_build_model(cfg: train.TrainConfig, num_classes: int):
    recorded["model"] = classifier_build_model(cfg, num_classes)
    return recorded["model"]


train_dit_build_objective = train_dit.build_objective
classifier_build_model = train.build_model


def run(trainer: str, argv: list[str]) -> None:
    if trainer == "dit":
        train_dit.TrainingState = RecordingTrainer
        train_dit.build_objective = recording_objective
        train_dit.main(parse_config(train_dit.TrainDiTConfig, argv, "ddp driver"))
    elif trainer == "classifier":
        train.build_model = recording_build_model
        train.main(parse_config(train.TrainConfig, argv, "ddp driver"))
    else:
        raise SystemExit(f"unknown trainer {trainer!r}: use dit or classifier")


def dump(folder: Path, rank: int) -> None:
    tensors = {name: value.detach().cpu().contiguous() for name, value in recorded["model"].state_dict().items()}
    if "ema" in recorded:
        tensors.update(
            {
                f"ema.{name}": value.detach().cpu().contiguous()
                for name, value in recorded["ema"].model.state_dict().items()
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"rank{rank}.safetensors"))
    (folder / f"rank{rank}.json").write_text(json.dumps({"local_losses": recorded["local_losses"]}))


if __name__ == "__main__":
    dump_dir, trainer_name, *trainer_argv = sys.argv[1:]
    run(trainer_name, trainer_argv)
    dump(Path(dump_dir), int(os.environ.get("RANK", "0")))  # set by both accelerate launch and torchrun
