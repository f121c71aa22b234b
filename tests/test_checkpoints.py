"""Checkpoint files: safe loading, metadata, atomic complete-marked training state, pruning."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from scripts.lib import checkpoints
from scripts.lib.checkpoints import (
    COMPLETE_MARKER,
    find_resume_state,
    flatten_state,
    list_complete_states,
    load_training_state,
    prune_states,
    save_training_state,
    unflatten_state,
)
from scripts.lib.checkpoints import load_weights, metadata_sidecar, save_weights
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
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}],
        },
        "rng": torch.get_rng_state(),
        "step": 12,
        "name": "run",
    }
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
    with pytest.raises(UserError, match="not a usable"):
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


def test_a_step_folder_with_a_non_ascii_digit_name_is_ignored_not_a_crash(tmp_path):
    save_training_state(tmp_path, 3, {"step": 3})
    (tmp_path / "step_²").mkdir()  # str.isdigit() says yes, int() says no
    assert [step for step, _ in list_complete_states(tmp_path)] == [3]


# ---------------------------------------------------------------------------------------------------------
# Damaged and hand-made state folders: one line each, never a KeyError or RecursionError
# ---------------------------------------------------------------------------------------------------------
def _saved(tmp_path):
    return save_training_state(tmp_path / "state", 5, {"model": {"w": torch.ones(3)}, "step": 5})


def _set_structure(folder, structure, step=5):
    (folder / "state.json").write_text(json.dumps({"step": step, "state": structure}))
    return folder


def _nested_lists(depth):
    structure = 1
    for _ in range(depth):
        structure = [structure]
    return structure


def _renamed(folder, name):
    return folder.rename(folder.with_name(name))


def _replaced(name, content):
    """A saved state whose file `name` now holds `content` (None: the file is deleted)."""

    def make(tmp_path):
        folder = _saved(tmp_path)
        if content is None:
            (folder / name).unlink()
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
        return folder

    return make


def _hand_made(tmp_path, marker_text):
    folder = tmp_path / "state" / "step_0000005"
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text(marker_text)
    return folder


DAMAGE = {
    "no-folder": (lambda tmp: tmp / "state" / "step_0000009", "no such folder"),
    "a-file": (lambda tmp: _saved(tmp) / "state.json", "a file, not a folder"),
    "no-marker": (_replaced(COMPLETE_MARKER, None), "no COMPLETE marker"),
    "hand-made-empty-marker": (lambda tmp: _hand_made(tmp, ""), "no COMPLETE marker naming its step"),
    "hand-made-unicode-digit-marker": (lambda tmp: _hand_made(tmp, "\u00b2"), "no COMPLETE marker naming its step"),
    "hand-made-marker-only": (lambda tmp: _hand_made(tmp, "5\n"), "FileNotFoundError"),
    "json-garbage": (_replaced("state.json", "{"), "JSONDecodeError"),
    "json-100k-deep": (
        _replaced("state.json", '{"step": 5, "state": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "RecursionError",
    ),
    "structure-too-deep": (lambda tmp: _set_structure(_saved(tmp), _nested_lists(200)), "nested deeper than"),
    "unknown-tag": (lambda tmp: _set_structure(_saved(tmp), {"__evil__": 1}), "unknown entry"),
    "two-tags": (
        lambda tmp: _set_structure(_saved(tmp), {"__tensor__": "state.model.w", "__tuple__": []}),
        "unknown entry",
    ),
    "absent-tensor": (
        lambda tmp: _set_structure(_saved(tmp), {"__tensor__": "state.ghost"}),
        "unknown entry {'__tensor__': 'state.ghost'}",
    ),
    "malformed-dict": (lambda tmp: _set_structure(_saved(tmp), {"__dict__": [[1, 2, 3]]}), "unknown entry"),
    "dict-key-list": (lambda tmp: _set_structure(_saved(tmp), {"__dict__": [[[1], 2]]}), "unknown entry"),
    "not-a-dict": (lambda tmp: _set_structure(_saved(tmp), [1, 2]), "does not hold the state of step 5"),
    "step-not-int": (
        lambda tmp: _set_structure(_saved(tmp), {"__dict__": []}, step="5"),
        "does not hold the state of step 5",
    ),
    "step-vs-marker": (_replaced(COMPLETE_MARKER, "6\n"), "does not hold the state of step 6, the step its marker"),
    "step-vs-name": (lambda tmp: _renamed(_saved(tmp), "step_0000007"), "does not hold the state of step 5"),
    "tensors-missing": (_replaced("state.safetensors", None), "state.safetensors"),
    "tensors-truncated": (
        _replaced("state.safetensors", b"\x10\x00\x00"),
        "SafetensorError",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_anything_but_a_state_this_kit_wrote_is_refused_with_one_line(tmp_path, damage):
    make, reason = damage
    folder = make(tmp_path)
    with pytest.raises(UserError) as refused:
        load_training_state(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder} is not a usable training-state checkpoint: ")
    assert reason in message and "\n" not in message and len(message) < 700


def test_a_renamed_copy_of_a_state_still_loads(tmp_path):
    """Only a name that is a step name must agree: `--resume backups/best` of a copied folder works."""
    folder = _renamed(_saved(tmp_path), "best")
    step, state = load_training_state(folder)
    assert step == 5 and torch.equal(state["model"]["w"], torch.ones(3))


def test_a_hand_marked_folder_is_not_counted_as_complete(tmp_path):
    save_training_state(tmp_path, 3, {"step": 3})
    _hand_made(tmp_path.parent / tmp_path.name, "")  # tmp_path/state/step_0000005 with an empty marker
    (tmp_path / "step_0000004").mkdir()
    (tmp_path / "step_0000004" / COMPLETE_MARKER).write_text("")
    assert [step for step, _ in list_complete_states(tmp_path)] == [3]


def test_flatten_refuses_keys_that_json_would_not_bring_back():
    with pytest.raises(TypeError, match="key"):
        flatten_state({"pairs": {(1, 2): torch.zeros(1)}})


# ---------------------------------------------------------------------------------------------------------
# Pruning: leftovers of a kill mid-delete are removed at the next save, nothing else
# ---------------------------------------------------------------------------------------------------------
def test_an_unmarked_old_state_left_by_a_kill_mid_delete_is_removed_at_the_next_prune(tmp_path):
    for step in (1, 2, 3):
        save_training_state(tmp_path, step, {"step": step})
    (tmp_path / "step_0000001" / COMPLETE_MARKER).unlink()  # killed between the marker's removal and the rmtree
    (tmp_path / "notes").mkdir()
    (tmp_path / "step_old_runs").mkdir()
    (tmp_path / "step_0000002.bak").mkdir()
    save_training_state(tmp_path, 4, {"step": 4})
    prune_states(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes",
        "step_0000002",
        "step_0000002.bak",
        "step_0000003",
        "step_0000004",
        "step_old_runs",
    ]


def test_prune_never_touches_a_state_being_written_now(tmp_path):
    for step in (1, 2):
        save_training_state(tmp_path, step, {"step": step})
    writing = tmp_path / "step_0000003"  # renamed into place, marker not written yet
    writing.mkdir()
    (writing / "state.safetensors").write_bytes(b"in progress")
    prune_states(tmp_path, keep=1)
    assert writing.is_dir() and [step for step, _ in list_complete_states(tmp_path)] == [2]


# ---------------------------------------------------------------------------------------------------------
# A full disk or a read-only folder during a save: one line, no temp files, the previous checkpoint intact
# ---------------------------------------------------------------------------------------------------------
def _fills_the_disk(tensors, path, *args, **kwargs):
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_fills_the_disk(tensors, path, *args, **kwargs):
    Path(path).write_bytes(b"partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_fills_the_disk(obj, path, *args, **kwargs):
    Path(path).write_bytes(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("writer", [_fills_the_disk, _safetensors_fills_the_disk], ids=["oserror", "safetensors"])
def test_weights_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    path = save_weights(tmp_path / "model.safetensors", _weights(), {"kind": "old"})
    monkeypatch.setattr(checkpoints, "save_file", writer)
    with pytest.raises(UserError) as refused:
        save_weights(path, _weights(), {"kind": "new"})
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message
    assert "free disk space" in message and "nothing saved before was changed" in message
    assert load_weights(path)[1]["kind"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_pt_weights_save_on_a_full_disk_keeps_the_previous_file_and_sidecar(tmp_path, monkeypatch):
    path = save_weights(tmp_path / "model.pt", _weights(), {"kind": "old"})
    monkeypatch.setattr(checkpoints.torch, "save", _torch_fills_the_disk)
    with pytest.raises(UserError, match="could not write the weights to .*model.pt .*the write failed"):
        save_weights(path, _weights(), {"kind": "new"})
    assert load_weights(path)[1]["kind"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


def test_state_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_training_state(tmp_path, 1, {"w": torch.ones(2)})
    monkeypatch.setattr(checkpoints, "save_file", _safetensors_fills_the_disk)
    with pytest.raises(UserError, match="could not write the training state of step 2 .*No space left on device"):
        save_training_state(tmp_path, 2, {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]
    assert load_training_state(tmp_path / "step_0000001")[0] == 1


def test_a_marker_that_cannot_be_written_leaves_no_half_finished_state(tmp_path, monkeypatch):
    save_training_state(tmp_path, 1, {"w": torch.ones(2)})
    real_write = checkpoints.write_atomic

    def marker_fails(path, content):
        if path.name == COMPLETE_MARKER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, content)

    monkeypatch.setattr(checkpoints, "write_atomic", marker_fails)
    with pytest.raises(UserError, match="No space left on device"):
        save_training_state(tmp_path, 2, {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder writes to fail in with EACCES: by its permissions, or (root ignores them) by the writer."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return

    def denied(tensors, path, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(checkpoints, "save_file", denied)
    yield folder


def test_a_read_only_folder_says_to_make_it_writable(read_only_folder):
    with pytest.raises(UserError, match=f"make {read_only_folder} writable") as refused:
        save_weights(read_only_folder / "model.safetensors", _weights(), {"kind": "x"})
    with pytest.raises(UserError, match=f"make {read_only_folder / 'state'} writable|make {read_only_folder} writ"):
        save_training_state(read_only_folder / "state", 1, {"w": torch.ones(1)})
    assert "\n" not in str(refused.value) and list(read_only_folder.iterdir()) in ([], [read_only_folder / "state"])


def test_resume_from_a_folder_that_is_not_a_state_says_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    save_training_state(run / "state", 4, {"step": 4})
    assert find_resume_state(str(run / "state" / "step_0000004"), run / "state") == run / "state" / "step_0000004"
    with pytest.raises(UserError, match=r"run is not a usable training-state checkpoint: no COMPLETE marker"):
        load_training_state(run)  # the run folder, not one of its states
