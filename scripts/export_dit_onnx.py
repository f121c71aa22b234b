"""Export one TinyDiT denoiser evaluation to ONNX, with a sidecar that lets a runtime sample without torch.

    python scripts/export_dit_onnx.py --checkpoint checkpoints/tinydit_final.safetensors --verify --test

The graph is `(x (B,C,H,W) float32, t (B,) float32 network time, y (B,) int64) -> prediction (B,C,H,W)`
with a dynamic batch axis, so classifier-free guidance runs as one batch of 2N. The sidecar
(`tinydit.json`) holds the image size, channels, class names, null class, the objective's schedule and
time grid (`Objective.sidecar()`), pixel range, and the default sampler, steps and guidance scale.

`--verify` compares ONNX Runtime with PyTorch on random inputs at several batch sizes (fails above 1e-4).
`--test` runs a full guided sampling loop with `onnx_sample` — numpy + onnxruntime, reading nothing but the
sidecar — against `Objective.sample` from the same noise (fails above 1e-3 in pixel units) and writes the
ONNX sample grid. `--quantize` writes an int8 (dynamic quantisation) copy and reports its size and drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from scripts.lib.cli import UserError, option, run_main
from scripts.lib.checkpoints import dit_to_unit, load_dit
from scripts.lib.onnx_export import (
    DEFAULT_OPSET,
    PARITY_BATCH_SIZES,
    PARITY_TOLERANCE,
    check_export,
    export_with_dynamic_batch,
    file_size,
    format_size,
    make_ort_session,
    max_abs_diff,
    quantize_int8,
    read_sidecar,
    write_sidecar,
)
from scripts.lib.sampling import class_grid_labels, guidance_scale, save_grid

INPUT_NAMES = ("x", "t", "y")
OUTPUT_NAME = "prediction"
SIDECAR_FORMAT = "tiny-cats-onnx-dit"
SAMPLING_TOLERANCE = 1e-3


@dataclass
class ExportDiTConfig:
    checkpoint: str = option("checkpoints/tinydit_final.safetensors", "DiT weights file to export")
    output: str = option("checkpoints/tinydit.onnx", "ONNX file to write (the JSON sidecar goes beside it)")
    verify: bool = option(
        False,
        "onnx.checker + ONNX Runtime vs PyTorch on random inputs at batch sizes "
        f"{', '.join(map(str, PARITY_BATCH_SIZES))} (fail above {PARITY_TOLERANCE:g})",
    )
    test: bool = option(
        False,
        "sample with ONNX Runtime + the sidecar only and compare with the PyTorch sampler "
        f"from the same noise (fail above {SAMPLING_TOLERANCE:g}); writes the ONNX grid",
    )
    quantize: bool = option(False, "also write an int8 dynamically quantised copy; report size and drift")
    opset: int = option(DEFAULT_OPSET, "ONNX opset: 23 has a fused Attention op; 20 suits older runtimes")
    steps: int = option(20, "default sampler steps written to the sidecar (and used by --test)")
    cfg_scale: float | None = option(None, "default guidance scale for the sidecar; default: the training config's")
    sampler: str | None = option(None, "default sampler for the sidecar; default: the objective's default")
    test_per_class: int = option(2, "--test: images per class in the comparison (one grid row per class)")
    seed: int = option(0, "seed of the random parity inputs and the --test noise")


# ---------------------------------------------------------------------------------------------------------
# The torch-free runtime: everything below reads only the sidecar and runs only onnxruntime + numpy
# ---------------------------------------------------------------------------------------------------------
def guided_onnx(
    session: ort.InferenceSession, x: np.ndarray, t_model: float, y: np.ndarray, cfg_scale: float, null_class: int
) -> np.ndarray:
    """uncond + cfg_scale * (cond - uncond), both halves as one batch of 2N (scale 1: one plain evaluation)."""
    n = len(x)
    if cfg_scale == 1.0:
        return session.run(None, {"x": x, "t": np.full(n, t_model, np.float32), "y": y})[0]
    both = session.run(
        None,
        {
            "x": np.concatenate([x, x]),
            "t": np.full(2 * n, t_model, np.float32),
            "y": np.concatenate([y, np.full(n, null_class, np.int64)]),
        },
    )[0]
    cond, uncond = both[:n], both[n:]
    return uncond + np.float32(cfg_scale) * (cond - uncond)


def _flow_sample(session, objective: dict[str, Any], x, y, steps, cfg_scale, sampler, null_class):
    """Euler / Heun integration of the velocity from time_start (noise) to time_end (data)."""
    times = np.linspace(objective["time_start"], objective["time_end"], steps + 1, dtype=np.float32).tolist()
    scale = objective["time_scale"]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        dt = t_next - t
        velocity = guided_onnx(session, x, t * scale, y, cfg_scale, null_class)
        if sampler == "heun":
            x_euler = x + dt * velocity
            velocity = (velocity + guided_onnx(session, x_euler, t_next * scale, y, cfg_scale, null_class)) / 2
        x = x + dt * velocity
    return x


def _ddim_sample(session, objective: dict[str, Any], x, y, steps, cfg_scale, sampler, null_class, rng):
    """DDIM over round(linspace(T-1, 0, steps)); the "ddpm" sampler is DDIM with eta = 1."""
    alphas_cumprod = objective["alphas_cumprod"]
    total = objective["num_timesteps"]
    times = np.round(np.linspace(total - 1, 0, min(steps, total))).astype(np.int64).tolist()
    eta = 1.0 if sampler == "ddpm" else objective["eta"]
    for i, t in enumerate(times):
        alpha_bar = alphas_cumprod[t]
        alpha_bar_prev = alphas_cumprod[times[i + 1]] if i + 1 < len(times) else 1.0
        eps = guided_onnx(session, x, float(t), y, cfg_scale, null_class)
        # Python-float coefficients keep x in float32 (a numpy float64 scalar would promote it).
        x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def onnx_sample(
    session: ort.InferenceSession,
    sidecar: dict[str, Any],
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int | None = None,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Images in the DiT's pixel range ([-1, 1]) from `noise` (N,C,H,W) float32 for class ids `labels` (N,).

    Unset options come from the sidecar's "sampling" defaults; `rng` feeds the stochastic samplers.
    """
    defaults = sidecar["sampling"]
    objective = sidecar["objective"]
    steps, sampler = steps or defaults["steps"], sampler or defaults["sampler"]
    cfg_scale = defaults["cfg_scale"] if cfg_scale is None else cfg_scale
    if sampler not in objective["samplers"]:
        raise ValueError(f"sampler {sampler!r} is not one of {objective['samplers']}")
    x, y = noise.astype(np.float32), labels.astype(np.int64)
    null_class = sidecar["null_class"]
    if objective["prediction"] == "velocity":
        x = _flow_sample(session, objective, x, y, steps, cfg_scale, sampler, null_class)
    else:
        x = _ddim_sample(
            session, objective, x, y, steps, cfg_scale, sampler, null_class, rng or np.random.default_rng()
        )
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Export, sidecar and the checks
# ---------------------------------------------------------------------------------------------------------
def dit_sidecar(model, objective, metadata: dict[str, Any], cfg: ExportDiTConfig, onnx_name: str) -> dict[str, Any]:
    """Everything a runtime needs besides the graph to drive guided sampling."""
    c, size = model.in_channels, model.image_size
    sampler = cfg.sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise UserError(
            f"--sampler {sampler!r} is not a sampler of the {objective.name} objective — choose one of "
            f"{', '.join(objective.samplers)}"
        )
    return {
        "format": SIDECAR_FORMAT,
        "kind": "dit",
        "onnx": onnx_name,
        "inputs": {
            "x": {"shape": ["batch", c, size, size], "dtype": "float32", "meaning": "noisy image x_t"},
            "t": {
                "shape": ["batch"],
                "dtype": "float32",
                "meaning": "network time = objective time * objective.time_scale",
            },
            "y": {"shape": ["batch"], "dtype": "int64", "meaning": "class id; null_class = unconditional"},
        },
        "outputs": {
            OUTPUT_NAME: {
                "shape": ["batch", c, size, size],
                "dtype": "float32",
                "meaning": f"the objective's prediction ({objective.sidecar()['prediction']})",
            }
        },
        "model": metadata["model"],
        "image_size": size,
        "in_channels": c,
        "num_classes": model.num_classes,
        "class_names": metadata["class_names"],
        "null_class": model.null_class,
        "pixel_range": metadata.get("pixel_range", [-1.0, 1.0]),
        "to_unit": "clip((x + 1) / 2, 0, 1)",
        "objective": objective.sidecar(),
        "sampling": {
            "sampler": sampler,
            "steps": cfg.steps,
            "cfg_scale": guidance_scale(cfg.cfg_scale, metadata),
            "guidance": "pred = uncond + cfg_scale * (cond - uncond), as one batch of 2N: x twice, "
            "y then null_class; cfg_scale 1 = the conditional prediction alone",
        },
        "training_step": metadata.get("step"),
        "weights": metadata.get("weights"),
    }


def random_inputs(model, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    size = (batch_size, model.in_channels, model.image_size, model.image_size)
    return {
        "x": torch.randn(size, generator=generator),
        "t": torch.rand(batch_size, generator=generator) * 1000,
        "y": torch.randint(0, model.num_classes + 1, (batch_size,), generator=generator),
    }


def verify_export(model, path: Path, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    batches = [random_inputs(model, n, generator) for n in PARITY_BATCH_SIZES]
    return check_export("denoiser", model, path, batches)[1]


def compare_sampling(model, objective, path: Path, cfg: ExportDiTConfig) -> dict[str, Any]:
    """Guided sampling through ONNX Runtime (sidecar only) vs Objective.sample, from the same noise."""
    sidecar = read_sidecar(path)
    defaults = sidecar["sampling"]
    if defaults["sampler"] == "ddpm" or sidecar["objective"].get("eta", 0.0) > 0:
        raise UserError(
            "--test compares deterministic samplers; the ancestral/eta>0 samplers draw their own noise "
            "— export with --sampler ddim (eta 0) or a flow sampler to test"
        )
    labels = class_grid_labels(list(range(model.num_classes)), cfg.test_per_class, "cpu")
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((len(labels), model.in_channels, model.image_size, model.image_size), generator=generator)
    expected = objective.sample(
        model, noise, labels, steps=defaults["steps"], cfg_scale=defaults["cfg_scale"], sampler=defaults["sampler"]
    ).numpy()
    actual = onnx_sample(make_ort_session(path), sidecar, noise.numpy(), labels.numpy())
    diff = max_abs_diff(actual, expected)
    print(
        f"  sampling ({defaults['sampler']}, {defaults['steps']} steps, cfg {defaults['cfg_scale']:g}, "
        f"{len(labels)} images): max |onnx - torch| = {diff:.3g} (pixel range [-1, 1])"
    )
    if not diff <= SAMPLING_TOLERANCE:
        raise UserError(
            f"ONNX sampling differs from PyTorch by {diff:.3g} > {SAMPLING_TOLERANCE:g} — the sidecar "
            "or the runtime sampler does not match the objective"
        )
    grid = save_grid(
        dit_to_unit(torch.from_numpy(actual)), path.with_name(f"{path.stem}_onnx_grid.png"), per_row=cfg.test_per_class
    )
    print(f"  wrote {grid}")
    return {"sampling_max_abs_diff": diff, "onnx_grid": str(grid)}


def quantize_and_compare(model, path: Path, seed: int) -> dict[str, Any]:
    """Int8 copy; its size and its drift from the fp32 graph (reported, not judged: int8 is lossy)."""
    quantized = quantize_int8(path)
    inputs = random_inputs(model, 4, torch.Generator().manual_seed(seed))
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    drift = max_abs_diff(make_ort_session(quantized).run(None, feed)[0], make_ort_session(path).run(None, feed)[0])
    sizes = {"fp32_bytes": file_size(path), "int8_bytes": file_size(quantized)}
    print(
        f"  int8: {quantized} {format_size(sizes['int8_bytes'])} (fp32 {format_size(sizes['fp32_bytes'])}); "
        f"max |int8 - fp32| = {drift:.3g} on random inputs"
    )
    return {"int8": str(quantized), "int8_max_abs_diff": drift, **sizes}


def main(cfg: ExportDiTConfig) -> dict[str, Any]:
    """Export (then optionally verify / test / quantize); returns the paths and the measured differences."""
    model, objective, metadata = load_dit(cfg.checkpoint)  # UserError if missing: never export random weights
    output = Path(cfg.output)
    print(
        f"exporting TinyDiT {metadata['model']} ({model.image_size} px, {model.num_classes} classes, step "
        f"{metadata.get('step')}) -> {output}"
    )
    example = random_inputs(model, 2, torch.Generator().manual_seed(cfg.seed))
    export_with_dynamic_batch(model, tuple(example.values()), INPUT_NAMES, OUTPUT_NAME, output, cfg.opset)
    sidecar = write_sidecar(output, dit_sidecar(model, objective, metadata, cfg, output.name))
    print(f"  wrote {output} ({format_size(file_size(output))}) and {sidecar}")
    summary: dict[str, Any] = {"onnx": str(output), "sidecar": str(sidecar)}
    if cfg.verify:
        summary["max_abs_diff"] = verify_export(model, output, cfg.seed)
    if cfg.test:
        summary.update(compare_sampling(model, objective, output, cfg))
    if cfg.quantize:
        summary.update(quantize_and_compare(model, output, cfg.seed))
    return summary


if __name__ == "__main__":
    run_main(main, ExportDiTConfig, "Export the TinyDiT denoiser to ONNX with a sampling sidecar; check parity.")
