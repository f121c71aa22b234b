"""Checkpoint files: safe loading, metadata, atomic complete-marked training state, pruning."""

from __future__ import annotations

import json

import pytest
import torch

from scripts.lib.checkpoints import (COMPLETE_MARKER, flatten_state, list_complete_states,
                                 load_training_state, load_weights, metadata_sidecar, prune_states,
                                 save_training_state, save_weights, unflatten_state)
from scripts.lib.cli import UserError


def _weights():
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.arange(4.0)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_with_metadata(tmp_path, suffix):
    weights = _weights()
    path = save_weights(tmp_path / f"model{suffix}", weights, {"kind": "dit", "step": 7, "names": ["a", "b"]})
    state_dict, metadata = load_weights(path)
    assert torch.equal(state_dict["layer.weight"], weights["layer.weight"])
    assert torch.equal(state_dict["layer.bias"], torch.arange(4.0))
    assert metadata["kind"] == "dit" and metadata["step"] == 7 and metadata["names"] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp"))


def test_pt_is_a_plain_state_dict(tmp_path):
    path = save_weights(tmp_path / "model.pt", _weights(), {"kind": "classifier"})
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"layer.weight", "layer.bias"}


def test_missing_file_message(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_truncated_safetensors_is_refused(tmp_path):
    path = save_weights(tmp_path / "model.safetensors", _weights(), {"kind": "dit"})
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_weights(path)


def test_foreign_safetensors_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file(_weights(), str(path))
    with pytest.raises(UserError, match="no tiny-cats metadata"):
        load_weights(path)


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"whatever")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_weights(path)


def test_pt_without_sidecar_is_refused(tmp_path):
    path = save_weights(tmp_path / "model.pt", _weights(), {"kind": "dit"})
    metadata_sidecar(path).unlink()
    with pytest.raises(UserError, match="metadata file"):
        load_weights(path)


class _CreatesFileWhenUnpickled:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _CreatesFileWhenUnpickled(target)}, path)
    metadata_sidecar(path).write_text(json.dumps({"format": "tiny-cats", "kind": "dit"}))
    with pytest.raises(UserError, match="refused"):
        load_weights(path)
    assert not target.exists()


def test_nested_state_round_trip_keeps_int_keys_tuples_and_scalars():
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}]},
             "rng": torch.get_rng_state(), "step": 12, "name": "run"}
    tensors, structure = flatten_state(state)
    restored = unflatten_state(tensors, json.loads(json.dumps(structure)))
    assert list(restored["optimizer"]["state"]) == [0]
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(restored["rng"], state["rng"])
    assert restored["step"] == 12 and restored["name"] == "run"


def test_training_state_is_complete_only_after_marker(tmp_path):
    folder = save_training_state(tmp_path, 10, {"model": {"w": torch.ones(3)}, "step": 10})
    assert (folder / COMPLETE_MARKER).is_file()
    step, state = load_training_state(folder)
    assert step == 10 and torch.equal(state["model"]["w"], torch.ones(3))
    (folder / COMPLETE_MARKER).unlink()
    assert list_complete_states(tmp_path) == []
    with pytest.raises(UserError, match="not a complete"):
        load_training_state(folder)


def test_partial_and_foreign_folders_are_ignored(tmp_path):
    save_training_state(tmp_path, 5, {"step": 5})
    (tmp_path / "step_0000009").mkdir()  # killed mid-write: no marker
    (tmp_path / ".tmp-step_0000010-123").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "step_abc").mkdir()
    assert [step for step, _ in list_complete_states(tmp_path)] == [5]


def test_saving_over_a_partial_leftover_replaces_it(tmp_path):
    leftover = tmp_path / "step_0000009"
    leftover.mkdir()
    (leftover / "garbage").write_text("x")
    save_training_state(tmp_path, 9, {"step": 9})
    assert not (leftover / "garbage").exists() and (leftover / COMPLETE_MARKER).exists()


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_training_state(tmp_path, step, {"step": step})
    prune_states(tmp_path, keep=2)
    assert [step for step, _ in list_complete_states(tmp_path)] == [3, 4]
    prune_states(tmp_path, keep=0)
    assert [step for step, _ in list_complete_states(tmp_path)] == [4]
