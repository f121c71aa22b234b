"""Export one TinyDiT denoiser evaluation to ONNX, with a sidecar that lets a runtime sample without torch.

    python scripts/export_dit_onnx.py --checkpoint checkpoints/tinydit_final.safetensors --verify --test

The graph is `(x (B,C,H,W) float32, t (B,) float32 network time, y (B,) int64) -> prediction (B,C,H,W)` with a
dynamic batch axis (guidance = one batch of 2N); `onnx_sample` (numpy + onnxruntime) samples with it and the sidecar."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.registry import IntegerOpsRegistry
from tqdm import tqdm

from scripts.lib.checkpoints import dit_to_unit, load_dit
from scripts.lib.cli import UserError, cpu_threads_option, option, run_main
from scripts.lib.onnx_export import (
    DEFAULT_OPSET, PARITY_BATCH_SIZES, PARITY_TOLERANCE, export_with_dynamic_batch, make_ort_session, max_abs_diff,
    sidecar_path, size_text, verify_export, write_sidecar,
)  # fmt: skip
from scripts.lib.sampling import class_grid_labels, guidance_scale, resolve_sampler, save_grid

INPUT_NAMES, OUTPUT_NAME = ("x", "t", "y"), "prediction"
SAMPLING_TOLERANCE = 1e-3
SETTINGS = ("steps", "cfg_scale", "sampler")  # the sidecar's "sampling" defaults a caller may override


@dataclass
class ExportDiTConfig:
    checkpoint: str = option("checkpoints/tinydit_final.safetensors", "DiT weights file to export")
    output: str = option("checkpoints/tinydit.onnx", "ONNX file to write (the JSON sidecar goes beside it)")
    verify: bool = option(
        False, f"onnx.checker, onnxruntime vs PyTorch on batches {PARITY_BATCH_SIZES} (fail above {PARITY_TOLERANCE:g})"
    )
    test: bool = option(
        False, f"ONNX Runtime + sidecar alone vs PyTorch sampling, same noise (fail above {SAMPLING_TOLERANCE:g}); grid"
    )
    quantize: bool = option(False, "also write an int8 dynamically quantised copy; report size and drift")
    opset: int = option(DEFAULT_OPSET, "ONNX opset: 23 has a fused Attention op; 20 suits older runtimes")
    steps: int = option(20, "default sampler steps written to the sidecar (and used by --test)")
    cfg_scale: float | None = option(None, "default guidance scale for the sidecar; default: the training config's")
    sampler: str | None = option(None, "default sampler for the sidecar; default: the objective's default")
    test_per_class: int = option(2, "--test: images per class in the comparison (one grid row per class)")
    seed: int = option(0, "seed of the random parity inputs and the --test noise")
    cpu_threads: int = cpu_threads_option()


def onnx_sample(session, sidecar: dict, noise: np.ndarray, labels: np.ndarray, *, rng=None, progress=None, **settings):
    """Images in the DiT's pixel range ([-1, 1]) from `noise` (N,C,H,W) float32 for class ids `labels` (N,), by an
    onnxruntime session and the sidecar alone. `settings` override the sidecar's "sampling" defaults; `rng` (numpy
    Generator) feeds the stochastic samplers; `progress` names a progress bar over the steps (None: no bar)."""
    objective, null_class = sidecar["objective"], sidecar["null_class"]
    steps, cfg_scale, sampler = ({**sidecar["sampling"], **settings}[key] for key in SETTINGS)
    if sampler not in objective["samplers"]:
        raise ValueError(f"sampler {sampler!r} is not one of {objective['samplers']}")
    y = labels.astype(np.int64)

    def guided(x: np.ndarray, t_model: float) -> np.ndarray:
        """uncond + cfg_scale * (cond - uncond), both halves as one batch of 2N (scale 1: the conditional alone)."""
        n, halves = len(x), 1 if cfg_scale == 1.0 else 2
        feed = {"x": np.concatenate([x] * halves), "t": np.full(n * halves, t_model, np.float32)}
        feed["y"] = np.concatenate([y, np.full(n, null_class, np.int64)])[: n * halves]
        out = session.run(None, feed)[0]
        return out if halves == 1 else out[n:] + np.float32(cfg_scale) * (out[:n] - out[n:])

    def flow_step(x: np.ndarray, t: float, t_next: float) -> np.ndarray:
        dt, scale = t_next - t, objective["time_scale"]
        velocity = guided(x, t * scale)
        if sampler == "heun":  # averaged with the velocity at the Euler point
            velocity = (velocity + guided(x + dt * velocity, t_next * scale)) / 2
        return x + dt * velocity

    eta = 1.0 if sampler == "ddpm" else objective.get("eta", 0.0)  # ancestral DDPM is DDIM with eta = 1
    random = rng or np.random.default_rng()

    def ddim_step(x: np.ndarray, t: int, t_prev: int | None) -> np.ndarray:
        alphas_cumprod = objective["alphas_cumprod"]
        alpha_bar, alpha_bar_prev = alphas_cumprod[t], 1.0 if t_prev is None else alphas_cumprod[t_prev]
        eps = guided(x, float(t))
        # Python-float coefficients keep x in float32 (a numpy float64 scalar would promote it).
        x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        return x + sigma * random.standard_normal(x.shape, dtype=np.float32) if sigma > 0 else x

    if objective["prediction"] == "velocity":
        times = np.linspace(objective["time_start"], objective["time_end"], steps + 1, dtype=np.float32).tolist()
        step, pairs = flow_step, list(zip(times[:-1], times[1:], strict=True))
    else:
        total = objective["num_timesteps"]
        times = np.round(np.linspace(total - 1, 0, min(steps, total))).astype(np.int64).tolist()
        step, pairs = ddim_step, list(zip(times, [*times[1:], None], strict=True))
    x = noise.astype(np.float32)
    for t, t_next in tqdm(pairs, desc=progress, unit="step", disable=progress is None, leave=False):
        x = step(x, t, t_next)
    return x.astype(np.float32)


def dit_sidecar(model, objective, metadata: dict[str, Any], sampler: str, cfg: ExportDiTConfig) -> dict[str, Any]:
    """Everything a runtime needs besides the graph to drive guided sampling."""
    images = ["batch", model.in_channels, model.image_size, model.image_size]
    return {
        "format": "tiny-cats-onnx-dit", "kind": "dit", "onnx": Path(cfg.output).name,
        "inputs": {
            "x": {"shape": images, "dtype": "float32", "meaning": "noisy image x_t"},
            "t": {"shape": ["batch"], "dtype": "float32", "meaning": "network time = objective time * time_scale"},
            "y": {"shape": ["batch"], "dtype": "int64", "meaning": "class id; null_class = unconditional"},
        },
        "outputs": {OUTPUT_NAME: {"shape": images, "dtype": "float32", "meaning": objective.sidecar()["prediction"]}},
        "model": metadata["model"], "image_size": model.image_size, "in_channels": model.in_channels,
        "num_classes": model.num_classes, "class_names": metadata["class_names"], "null_class": model.null_class,
        "pixel_range": metadata.get("pixel_range", [-1.0, 1.0]), "to_unit": "clip((x + 1) / 2, 0, 1)",
        "objective": objective.sidecar(),
        "sampling": {
            "sampler": sampler, "steps": cfg.steps, "cfg_scale": guidance_scale(cfg.cfg_scale, metadata),
            "guidance": "pred = uncond + cfg_scale * (cond - uncond), as one batch of 2N: x twice, y then "
            "null_class; cfg_scale 1 = the conditional prediction alone",
        },
        "training_step": metadata.get("step"), "weights": metadata.get("weights"),
    }  # fmt: skip


def random_inputs(model, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn((batch_size, model.in_channels, model.image_size, model.image_size), generator=generator),
        "t": torch.rand(batch_size, generator=generator) * 1000,
        "y": torch.randint(0, model.num_classes + 1, (batch_size,), generator=generator),
    }


def compare_sampling(model, objective, path: Path, cfg: ExportDiTConfig) -> dict[str, Any]:
    """Guided sampling through ONNX Runtime (the sidecar file only) vs Objective.sample, from the same noise."""
    sidecar = json.loads(sidecar_path(path).read_text())
    settings = {key: sidecar["sampling"][key] for key in SETTINGS}
    labels = class_grid_labels(list(range(model.num_classes)), cfg.test_per_class, "cpu")
    noise = random_inputs(model, len(labels), torch.Generator().manual_seed(cfg.seed))["x"]
    # Not sampling.sample_images: it draws its own noise and returns clamped images; parity needs the raw output.
    total = min(settings["steps"], sidecar["objective"].get("num_timesteps", settings["steps"]))
    with tqdm(total=total, desc="PyTorch sampling", unit="step", leave=False) as bar:
        expected = objective.sample(model, noise, labels, **settings, on_step=bar.update)
    session = make_ort_session(path, cfg.cpu_threads)
    actual = onnx_sample(session, sidecar, noise.numpy(), labels.numpy(), progress="ONNX Runtime sampling")
    diff = max_abs_diff(actual, expected.numpy())
    shown = "{sampler}, {steps} steps, cfg {cfg_scale:g}".format(**settings)
    print(f"  sampling ({shown}, {len(labels)} images): max |onnx - torch| = {diff:.3g} (pixel range [-1, 1])")
    if not diff <= SAMPLING_TOLERANCE:
        raise UserError(
            f"ONNX sampling differs from PyTorch by {diff:.3g} > {SAMPLING_TOLERANCE:g}: sidecar/sampler mismatch"
        )
    grid = save_grid(dit_to_unit(torch.from_numpy(actual)), path.with_name(f"{path.stem}_onnx_grid.png"),
                     per_row=cfg.test_per_class, what="the ONNX sample grid")  # fmt: skip
    print(f"  wrote {grid}")
    return {"sampling_max_abs_diff": diff, "onnx_grid": str(grid)}


def quantize_and_compare(model, path: Path, cfg: ExportDiTConfig) -> dict[str, Any]:
    """Int8 dynamic quantisation (weights int8, activations quantised on the fly) to `<name>.int8.onnx`; its size
    and its drift from the fp32 graph are reported, not judged: int8 is lossy."""
    quantized = path.with_name(f"{path.stem}.int8.onnx")
    # The quantiser's shape inference rejects some shape hints the dynamo exporter stores: quantise without them.
    graph = onnx.load(str(path))
    del graph.graph.value_info[:]
    # The quantiser takes every op named Attention for its own com.microsoft Attention and writes a QAttention that
    # cannot load; the standard Attention op has no weights to quantise anyway.
    op_types = [op for op in IntegerOpsRegistry if op != "Attention"]
    quantize_dynamic(graph, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    inputs = random_inputs(model, 4, torch.Generator().manual_seed(cfg.seed))
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    int8, fp32 = (make_ort_session(p, cfg.cpu_threads).run(None, feed)[0] for p in (quantized, path))
    drift = max_abs_diff(int8, fp32)
    print(f"  int8: {quantized} {size_text(quantized)} (fp32 {size_text(path)}); max |int8 - fp32| = {drift:.3g}")
    return {
        "int8": str(quantized), "int8_max_abs_diff": drift,
        "fp32_bytes": path.stat().st_size, "int8_bytes": quantized.stat().st_size,
    }  # fmt: skip


def main(cfg: ExportDiTConfig) -> dict[str, Any]:
    model, objective, metadata = load_dit(cfg.checkpoint)  # refuses a missing file: never exports random weights
    sampler = resolve_sampler(objective, cfg.sampler)
    if cfg.test and (sampler == "ddpm" or getattr(objective, "eta", 0.0) > 0):
        raise UserError("--test compares deterministic samplers: export with --sampler ddim (eta 0) or a flow sampler")
    output = Path(cfg.output)
    size, classes, step = model.image_size, model.num_classes, metadata.get("step")
    print(f"exporting TinyDiT {metadata['model']} ({size} px, {classes} classes, step {step}) -> {output}")
    example = random_inputs(model, 2, torch.Generator().manual_seed(cfg.seed))
    export_with_dynamic_batch(model, tuple(example.values()), INPUT_NAMES, OUTPUT_NAME, output, cfg.opset)
    summary = write_sidecar(output, dit_sidecar(model, objective, metadata, sampler, cfg))
    if cfg.verify:
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = [random_inputs(model, n, generator) for n in PARITY_BATCH_SIZES]
        summary["max_abs_diff"] = verify_export("denoiser", model, output, batches, cfg.cpu_threads)[1]
    if cfg.test:
        summary.update(compare_sampling(model, objective, output, cfg))
    if cfg.quantize:
        summary.update(quantize_and_compare(model, output, cfg))
    return summary


if __name__ == "__main__":
    run_main(main, ExportDiTConfig, "Export the TinyDiT denoiser to ONNX with a sampling sidecar; check parity.")
