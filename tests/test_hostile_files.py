"""Hostile or damaged files are refused cheaply, with one line that says what is wrong.

Weights files: each crafted file carries tiny tensors and metadata that differs from what a trainer writes in
one value; the commands are run through their real command line (`run_main`), where anything but a UserError
would surface as a traceback. Nothing may be built first: `nn.Module.__init__` is made to fail while a refused
file is loaded. Images: a tiny PNG that unpacks to gigabytes is refused before it is decoded, and file names
cannot split or forge a log line.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import dit_test_metadata, one_error_line, trained_dit
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from scripts import export_dit_onnx, export_onnx, predict, sample, verify_checkpoint
from scripts.lib import checkpoints
from scripts.lib.checkpoints import load_weights, save_weights
from scripts.lib.cli import UserError
from scripts.lib.checkpoints import (
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MAX_TIMESTEPS,
    build_classifier_from_metadata,
    build_dit_from_metadata,
    build_objective_from_metadata,
    classifier_metadata,
    load_classifier,
    load_dit,
    validate_metadata,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DELETE = object()  # a change that removes the field
TINY_STATE = {"weight": torch.zeros(2)}


def dit_base(**changes: Any) -> dict[str, Any]:
    return _changed(dit_test_metadata(), changes)


def ddpm_base(**changes: Any) -> dict[str, Any]:
    metadata = dit_test_metadata(objective="ddpm")
    metadata["objective_options"] = {"schedule": "cosine", "num_timesteps": 1000, "eta": 0.5}
    return _changed(metadata, changes)


def classifier_base(**changes: Any) -> dict[str, Any]:
    metadata = classifier_metadata(
        {"data_dir": "data/cats", "seed": 0, "val_split": 0.1},
        backbone="mobilenet_v3_small",
        image_size=32,
        class_names=["black", "white"],
        metrics={"val_acc": 0.5, "val_loss": 0.7},
        epoch=3,
    )
    return _changed(metadata, changes)


def _changed(metadata: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is DELETE:
            del metadata[key]
        else:
            metadata[key] = value
    return metadata


# (case id, metadata, the field the one error line must name)
DIT_CASES = [
    ("classes-1e9", dit_base(num_classes=10**9), "num_classes"),
    ("classes-negative", dit_base(num_classes=-5), "num_classes"),
    ("classes-float", dit_base(num_classes=3.0), "num_classes"),
    ("classes-contradict", dit_base(num_classes=2), "class_names"),
    ("names-not-list", dit_base(class_names=5), "class_names"),
    ("names-empty", dit_base(class_names=[], num_classes=0), "num_classes"),
    ("names-duplicate", dit_base(class_names=["a", "b", "a"]), "class_names"),
    ("names-newline", dit_base(class_names=["a", "b\nINFO forged", "c"]), "class_names"),
    ("names-path", dit_base(class_names=["a", "../../x", "c"]), "class_names"),
    ("names-blank", dit_base(class_names=["a", "", "c"]), "class_names"),
    ("names-number", dit_base(class_names=["a", 7, "c"]), "class_names"),
    ("size-0", dit_base(image_size=0), "image_size"),
    ("size-negative", dit_base(image_size=-5), "image_size"),
    ("size-string", dit_base(image_size="32"), "image_size"),
    ("size-float", dit_base(image_size=32.0), "image_size"),
    ("size-bool", dit_base(image_size=True), "image_size"),
    ("size-400000", dit_base(image_size=400000), "image_size"),
    ("size-above-bound", dit_base(image_size=MAX_IMAGE_SIZE + 4), "image_size"),
    ("size-not-patch-multiple", dit_base(image_size=18), "image_size"),
    ("model-list", dit_base(model=["T/4"]), "model"),
    ("model-unknown", dit_base(model="X/4"), "model"),
    ("channels-0", dit_base(in_channels=0), "in_channels"),
    ("channels-1000", dit_base(in_channels=1000), "in_channels"),
    ("objective-evil", dit_base(objective="evil"), "objective"),
    ("options-not-dict", dit_base(objective_options="fast"), "objective_options"),
    ("options-unknown-key", dit_base(objective_options={"steps": 3}), "objective_options.steps"),
    ("flow-time-sampling", dit_base(objective_options={"time_sampling": "evil"}), "objective_options.time_sampling"),
    ("ddpm-timesteps-1e9", ddpm_base(objective_options={"num_timesteps": 10**9}), "objective_options.num_timesteps"),
    (
        "ddpm-timesteps-bound",
        ddpm_base(objective_options={"num_timesteps": MAX_TIMESTEPS + 1}),
        "objective_options.num_timesteps",
    ),
    ("ddpm-timesteps-1", ddpm_base(objective_options={"num_timesteps": 1}), "objective_options.num_timesteps"),
    ("ddpm-eta-2", ddpm_base(objective_options={"eta": 2.0}), "objective_options.eta"),
    ("ddpm-eta-nan", ddpm_base(objective_options={"eta": math.nan}), "objective_options.eta"),
    ("ddpm-schedule", ddpm_base(objective_options={"schedule": "evil"}), "objective_options.schedule"),
    ("step-negative", dit_base(step=-1), "step"),
    ("step-float", dit_base(step=1.5), "step"),
    ("weights-unknown", dit_base(weights="best"), "weights"),
    ("pixel-range", dit_base(pixel_range=[0, 255]), "pixel_range"),
    ("config-not-dict", dit_base(config="x"), "config"),
    ("config-cfg-scale", dit_base(config={"cfg_scale": "huge"}), "config.cfg_scale"),
    ("config-cfg-scale-inf", dit_base(config={"cfg_scale": math.inf}), "config.cfg_scale"),
    ("missing-model", dit_base(model=DELETE), "model (missing)"),
    ("kind-evil", dit_base(kind="evil"), "kind"),
    ("config-contradicts-size", dit_base(config={"image_size": 64}), "config.image_size"),
    ("config-contradicts-model", dit_base(config={"model": "S/4"}), "config.model"),
]

CLASSIFIER_CASES = [
    ("backbone-code", classifier_base(backbone="__import__('os')"), "backbone"),
    ("backbone-list", classifier_base(backbone=["resnet18"]), "backbone"),
    ("one-class", classifier_base(num_classes=1, class_names=["cat"]), "num_classes"),
    ("names-empty", classifier_base(class_names=[]), "class_names"),
    ("classes-1e9", classifier_base(num_classes=10**9), "num_classes"),
    ("classes-contradict", classifier_base(class_names=["a", "b", "c", "d"]), "class_names"),
    ("size-below-16", classifier_base(image_size=8), "image_size"),
    ("size-huge", classifier_base(image_size=100000), "image_size"),
    ("size-string", classifier_base(image_size="32"), "image_size"),
    ("std-0", classifier_base(normalization={"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}), "normalization.std"),
    ("std-2-values", classifier_base(normalization={"mean": [0.5] * 3, "std": [0.2, 0.2]}), "normalization.std"),
    (
        "mean-inf",
        classifier_base(normalization={"mean": [0.5, math.inf, 0.5], "std": [0.2] * 3}),
        "normalization.mean",
    ),
    ("mean-string", classifier_base(normalization={"mean": "imagenet", "std": [0.2] * 3}), "normalization.mean"),
    ("normalization-missing", classifier_base(normalization=DELETE), "normalization (missing)"),
    ("metrics-string", classifier_base(metrics="great"), "metrics"),
    ("metrics-value", classifier_base(metrics={"val_acc": "100%"}), "metrics"),
    ("epoch-negative", classifier_base(epoch=-1), "epoch"),
    ("config-data-dir", classifier_base(config={"data_dir": 5}), "config.data_dir"),
    ("config-val-split", classifier_base(config={"val_split": 2}), "config.val_split"),
    ("config-seed", classifier_base(config={"seed": "zero"}), "config.seed"),
    ("config-contradicts-size", classifier_base(config={"image_size": 512}), "config.image_size"),
]


def craft(path: Path, metadata: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> Path:
    return save_weights(path, state if state is not None else TINY_STATE, metadata)


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if a network is constructed or (outside verify's own load check) a tensor file is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or tensors were read before the metadata was validated")

    monkeypatch.setattr(nn.Module, "__init__", refuse)
    return refuse


def dit_commands(path: Path, tmp_path: Path):
    return {
        "verify": (
            verify_checkpoint.main,
            verify_checkpoint.VerifyConfig,
            ["--checkpoint", str(path), "--device", "cpu"],
        ),
        "sample": (
            sample.main,
            sample.SampleConfig,
            ["--checkpoint", str(path), "--device", "cpu", "--out", str(tmp_path / "grid.png")],
        ),
        "export_dit_onnx": (
            export_dit_onnx.main,
            export_dit_onnx.ExportDiTConfig,
            ["--checkpoint", str(path), "--output", str(tmp_path / "dit.onnx")],
        ),
    }


def classifier_commands(path: Path, tmp_path: Path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (200, 100, 50)).save(image)
    return {
        "verify": (
            verify_checkpoint.main,
            verify_checkpoint.VerifyConfig,
            ["--checkpoint", str(path), "--device", "cpu"],
        ),
        "predict": (predict.main, predict.PredictConfig, [str(image), "--checkpoint", str(path), "--device", "cpu"]),
        "export_onnx": (
            export_onnx.main,
            export_onnx.ExportClassifierConfig,
            ["--checkpoint", str(path), "--output", str(tmp_path / "cls.onnx")],
        ),
    }


def _refuse_reading(*args, **kwargs):
    raise AssertionError("tensors were read before the metadata was validated")


def expected_words(field: str) -> str:
    """What the error line says about `field` (the temp folder's name may hold any other word)."""
    return {
        "kind": "unknown checkpoint kind 'evil'",
        "model (missing)": "metadata lacks model",
        "normalization (missing)": "metadata lacks normalization",
    }.get(field, f"metadata {field} = ")


def _refused_everywhere(commands, field: str, capsys, monkeypatch) -> None:
    for name, (main, config_cls, argv) in commands.items():
        if name != "verify":  # verify reads the tensors as its first ("load") check; the others must not
            monkeypatch.setattr(checkpoints, "load_file", _refuse_reading)
        line = one_error_line(main, config_cls, argv, capsys)
        assert expected_words(field) in line, (name, line)
        assert not list(Path(argv[argv.index("--checkpoint") + 1]).parent.glob("*.onnx")), name


@pytest.mark.parametrize("metadata, field", [case[1:] for case in DIT_CASES], ids=[case[0] for case in DIT_CASES])
def test_bad_dit_metadata_is_refused_by_every_command(tmp_path, capsys, monkeypatch, nothing_is_built, metadata, field):
    path = craft(tmp_path / "hostile.safetensors", metadata)
    _refused_everywhere(dit_commands(path, tmp_path), field, capsys, monkeypatch)


@pytest.mark.parametrize(
    "metadata, field", [case[1:] for case in CLASSIFIER_CASES], ids=[case[0] for case in CLASSIFIER_CASES]
)
def test_bad_classifier_metadata_is_refused_by_every_command(
    tmp_path, capsys, monkeypatch, nothing_is_built, metadata, field
):
    path = craft(tmp_path / "hostile.safetensors", metadata)
    _refused_everywhere(classifier_commands(path, tmp_path), field, capsys, monkeypatch)


def test_verify_reports_bad_metadata_as_its_failed_metadata_check(tmp_path):
    path = craft(tmp_path / "hostile.safetensors", dit_base(num_classes=10**9))
    report = verify_checkpoint.verify(verify_checkpoint.VerifyConfig(checkpoint=str(path), device="cpu"))
    assert [(check.name, check.passed) for check in report.checks] == [("load", True), ("metadata", False)]
    detail = report.checks[1].detail
    assert "num_classes = 1000000000" in detail and "\n" not in detail


def test_the_crafted_files_fail_only_for_their_bad_value(tmp_path):
    """The same tiny files with the trainer's own metadata pass the metadata check (and fail later, on keys)."""
    for metadata in (dit_base(), ddpm_base(), classifier_base()):
        path = craft(tmp_path / f"{metadata['kind']}.safetensors", metadata)
        report = verify_checkpoint.verify(verify_checkpoint.VerifyConfig(checkpoint=str(path), device="cpu"))
        passed = {check.name: check.passed for check in report.checks}
        assert passed["metadata"] and not passed["keys"]


def test_a_real_size_file_claiming_1e9_classes_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """The issue's 7.5 MB file: every load path refuses it without building a model or reading a tensor."""
    path = craft(tmp_path / "big.safetensors", dit_base(num_classes=10**9), trained_dit().state_dict())
    assert path.stat().st_size > 7 * 2**20
    monkeypatch.setattr(nn.Module, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(checkpoints, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    metadata = dit_base(num_classes=10**9)
    for load in (
        lambda: load_dit(path),
        lambda: build_dit_from_metadata(metadata),
        lambda: build_objective_from_metadata(metadata),
    ):
        with pytest.raises(UserError, match="metadata num_classes = 1000000000 is not an integer from 1 to"):
            load()
    with pytest.raises(UserError, match="metadata num_classes"):
        build_classifier_from_metadata(classifier_base(num_classes=10**9))
    with pytest.raises(UserError, match="metadata num_classes"):
        load_classifier(craft(tmp_path / "cls.safetensors", classifier_base(num_classes=10**9)))


def test_verify_of_a_huge_claim_stays_small_in_a_real_process(tmp_path):
    """Peak memory of the whole command, measured by the kernel: today's main tried to allocate 512 GB here."""
    path = craft(tmp_path / "big.safetensors", dit_base(num_classes=10**9), trained_dit().state_dict())
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['verify_checkpoint.py', '--checkpoint', {str(path)!r}, '--device', 'cpu']\n"
        "try:\n    runpy.run_path('scripts/verify_checkpoint.py', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('exit', done.code, 'peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"},
    )
    words = result.stdout.split()
    assert words[-4:-2] == ["exit", "2"], result.stderr[-2000:]
    assert int(words[-1]) < 1_500_000  # KiB; importing torch alone takes ~400 MB
    assert "metadata num_classes = 1000000000" in result.stderr


def test_sample_refuses_a_contradictory_file_before_resolving_classes(tmp_path, capsys):
    path = craft(tmp_path / "liar.safetensors", dit_base(num_classes=2, class_names=["a", "b", "c", "ghost"]))
    argv = ["--checkpoint", str(path), "--class", "ghost", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    line = one_error_line(sample.main, sample.SampleConfig, argv, capsys)
    assert "metadata class_names" in line and "num_classes says 2" in line
    assert not (tmp_path / "g.png").exists()


def test_long_or_control_character_values_are_cut_and_escaped_in_the_message(tmp_path):
    path = craft(tmp_path / "x.safetensors", dit_base(model="A" * 100_000 + "\n\x1b[31mforged"))
    with pytest.raises(UserError) as refused:
        load_dit(path)
    message = str(refused.value)
    assert len(message) < 400 and "\n" not in message and "\x1b" not in message and "metadata model" in message


def test_what_the_trainers_write_passes(tmp_path):
    validate_metadata(dit_base())
    validate_metadata(ddpm_base())
    validate_metadata(dit_base(num_classes=1, class_names=["only"]))  # a one-class DiT is fine
    validate_metadata(dit_base(image_size=MAX_IMAGE_SIZE))
    validate_metadata(classifier_base())
    validate_metadata(classifier_base(num_classes=MAX_CLASSES, class_names=[f"c{i}" for i in range(MAX_CLASSES)]))


def test_kind_mismatch_names_both_kinds(tmp_path):
    with pytest.raises(UserError, match="this is a 'dit' checkpoint, not a 'classifier' one"):
        load_classifier(craft(tmp_path / "dit.safetensors", dit_base()))


def _raw_header_file(path: Path, **header: str) -> Path:
    save_file(TINY_STATE, str(path), metadata={"format": json.dumps("tiny-cats"), **header})
    return path


@pytest.mark.parametrize(
    "value",
    ["[" * 100_000 + "]" * 100_000, "1" * 5000, "{not json"],
    ids=["nested-100k-deep", "int-5000-digits", "broken-json"],
)
def test_undecodable_headers_end_in_one_line(tmp_path, value):
    path = _raw_header_file(tmp_path / "deep.safetensors", kind=json.dumps("dit"), model=value)
    with pytest.raises(UserError, match="corrupt metadata") as refused:
        load_weights(path)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400


def test_a_pt_sidecar_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TINY_STATE, path)
    (tmp_path / "model.pt.json").write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="no tiny-cats metadata"):
        load_weights(path)


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------
BOMB_SIDE = 13000  # the issue's file: 16-bit grey, 169 MP, under PIL's own bomb limit


def grey16_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 16-bit greyscale PNG, written row by row: a few hundred KB that decode to 2 bytes/pixel."""
    compressor = zlib.compressobj(1)
    row = bytes(1 + 2 * width)  # filter type 0, then the samples
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return grey16_png(tmp_path_factory.mktemp("bomb") / "bomb.png", BOMB_SIDE, BOMB_SIDE)


def peak_growth_kib(code: str, *args: str) -> tuple[int, str]:
    """Run `code` (which defines `run()`) in a fresh interpreter; (growth of its peak RSS during run(), output)."""
    wrapper = (
        code + "\nimport resource\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nrun()\n"
        "print('peak_growth_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *output, last = result.stdout.strip().splitlines()
    return int(last.split()[1]), "\n".join(output)


PREDICT_ONE_IMAGE = """
import sys
from scripts import predict
from scripts.lib.cli import run_main
from scripts.lib.checkpoints import load_classifier
load_classifier(sys.argv[1])  # the model's own memory is not what is measured

def run():
    try:
        run_main(predict.main, predict.PredictConfig, "", [sys.argv[2], "--checkpoint", sys.argv[1], "--device", "cpu"])
    except SystemExit as exited:
        print("exit", exited.code)
"""


def test_predict_refuses_a_small_png_that_unpacks_to_gigabytes_before_decoding_it(bomb, tmp_path):
    from builders import save_classifier

    assert bomb.stat().st_size < 2 * 2**20  # 1.5 MB on disk, 338 MB as pixels, 2.9 GB in predict before
    checkpoint = save_classifier(tmp_path / "cats.safetensors")
    growth, output = peak_growth_kib(PREDICT_ONE_IMAGE, str(checkpoint), str(bomb))
    assert "exit 2" in output
    assert growth < 64 * 1024, f"peak grew by {growth / 1024:.0f} MiB"


def test_the_cache_build_skips_the_bomb_with_the_counted_warning(bomb, tmp_path):
    from scripts.lib.data import load_or_build_cache

    for name in ("black", "white"):
        (tmp_path / "cats" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 10, 10)).save(tmp_path / "cats" / name / "ok.png")
    (tmp_path / "cats" / "white" / "huge.png").symlink_to(bomb)
    warnings: list[str] = []
    cache = load_or_build_cache(tmp_path / "cats", 16, warn=warnings.append, show_progress=False)
    assert len(cache) == 2 and len(warnings) == 1
    assert "skipped 1 unreadable image file(s) of 3" in warnings[0]
    assert f"white/huge.png: {BOMB_SIDE} x {BOMB_SIDE} pixels is more than the 67 megapixels" in warnings[0]


LOAD_ONE_IMAGE = """
import sys
from scripts.lib.data import load_rgb

def run():
    print(load_rgb(sys.argv[1], 64).mean())
"""


def test_a_16_bit_image_costs_at_most_6_bytes_a_pixel_to_decode(tmp_path):
    """Decoded 2 bytes + one 4-byte copy to resize it; everything else happens on the small result (was 12)."""
    side = 4000
    growth, output = peak_growth_kib(LOAD_ONE_IMAGE, str(grey16_png(tmp_path / "deep.png", side, side)))
    assert float(output) == 0.0
    assert growth * 1024 / side**2 < 7.0, f"{growth * 1024 / side**2:.1f} bytes per pixel"


def test_a_large_jpeg_is_decoded_reduced_where_another_format_is_refused(tmp_path, monkeypatch):
    from scripts.lib import data

    monkeypatch.setattr(data, "MAX_DECODE_PIXELS", 100 * 100)  # 200 x 200 is "too large" now
    Image.new("RGB", (200, 200), (200, 30, 30)).save(tmp_path / "big.jpg", quality=95)
    Image.new("RGB", (200, 200), (200, 30, 30)).save(tmp_path / "big.png")
    assert data.load_rgb(tmp_path / "big.jpg", 16).shape == (16, 16, 3)  # draft decodes it at 1/8 scale
    with pytest.raises(data.UnreadableImage, match="200 x 200 pixels is more than"):
        data.load_rgb(tmp_path / "big.png", 16)


def test_file_names_cannot_split_or_forge_a_log_line(tmp_path):
    import logging

    from scripts.lib.data import load_or_build_cache

    forged = "x\n2026-01-01 00:00:00 INFO training finished \x1b[2J\u202e.png"
    for name in ("black", "white"):
        (tmp_path / "cats" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 10, 10)).save(tmp_path / "cats" / name / "ok.png")
    (tmp_path / "cats" / "black" / forged).write_bytes(b"not an image")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(handler.format(record))
    logger = logging.getLogger("test_hostile_files")
    logger.addHandler(handler)
    try:
        load_or_build_cache(tmp_path / "cats", 16, warn=logger.warning, show_progress=False)
    finally:
        logger.removeHandler(handler)
    (line,) = records
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert "black/x\\n2026-01-01 00:00:00 INFO training finished \\x1b[2J\\u202e.png: " in line


@pytest.mark.parametrize("folder", ["tabby\nINFO forged", "tabby\x1b[31m", "tab\\by"])
def test_a_class_folder_name_the_loaders_would_refuse_is_refused_by_the_scan(tmp_path, folder):
    from scripts.lib.data import scan_image_folder

    (tmp_path / "cats" / folder).mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "cats" / folder / "a.png")
    with pytest.raises(UserError, match="rename the folder") as refused:
        scan_image_folder(tmp_path / "cats")
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


def test_a_pt_file_with_a_bad_sidecar_is_refused_before_its_pickle_is_opened(
    tmp_path, capsys, monkeypatch, nothing_is_built
):
    path = craft(tmp_path / "cats.pt", classifier_base(normalization={"mean": [0.5] * 3, "std": [0.0] * 3}))
    monkeypatch.setattr(checkpoints.torch, "load", _refuse_reading)
    commands = classifier_commands(path, tmp_path)
    for name in ("predict", "export_onnx"):
        main, config_cls, argv = commands[name]
        assert expected_words("normalization.std") in one_error_line(main, config_cls, argv, capsys)
