"""Noise, losses and samplers for TinyDiT: the network knows nothing about noise, this module does.

Two objectives behind one interface (`Objective`):

- `FlowMatching` ("flow"): rectified flow / flow matching with the linear interpolant
  x_t = (1 - t) x0 + t noise and velocity target v = noise - x0 (Liu et al. 2022, "Flow Straight and
  Fast"; Lipman et al. 2022, "Flow Matching for Generative Modeling"; SiT, Ma et al. 2024), t drawn
  logit-normal (Esser et al. 2024, SD3) or uniform; Euler and Heun samplers integrate t from 1 to 0.
- `DDPM` ("ddpm"): epsilon prediction (Ho et al. 2020) with the linear beta schedule of DDPM or the
  cosine schedule of iDDPM (Nichol & Dhariwal 2021); samplers DDIM (Song et al. 2021, `eta`) and
  ancestral DDPM over an evenly spaced subset of the timesteps.

Classifier-free guidance (Ho & Salimans 2022): `drop_labels` for training, `guided_prediction` for
sampling with the conditional and unconditional halves in one batched forward.

Randomness is only ever drawn from a caller's `torch.Generator`: the trainer draws t and noise for
the global batch (`draw_training_noise`) and slices its rank's share, so 1 and N processes train
identically, and `training_loss` is deterministic given its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("flow", "ddpm")


def drop_labels(y: torch.Tensor, drop_mask: torch.Tensor, null_class: int) -> torch.Tensor:
    """Label dropout for classifier-free guidance: where drop_mask is True the label becomes the null class."""
    return torch.where(drop_mask, torch.full_like(y, null_class), y)


def guided_prediction(
    model: nn.Module, x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor, cfg_scale: float, null_class: int
) -> torch.Tensor:
    """uncond + cfg_scale * (cond - uncond), both halves in one batched forward.

    Scale 1 is the conditional prediction (one plain forward), scale 0 the unconditional one.
    """
    if cfg_scale == 1.0:
        return model(x, t_model, y)
    both = model(torch.cat([x, x]), torch.cat([t_model, t_model]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in `like`'s dtype, to broadcast a per-sample scalar over an image batch."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class Objective:
    """What the trainer, sampler and ONNX export need from a diffusion objective. A subclass defines

    - `draw_times(n, generator)`: n training times t, drawn on the generator's device;
    - `add_noise(x0, t, noise)`: the network input x_t; `training_target(x0, noise)`: what the network predicts;
    - `model_time(t)`: the timestep the network is fed (0..1000 scale); `time_grid(steps)`: the times a sampler
      visits, from noise towards data;
    - `sidecar()`: a JSON description that lets a torch-free program re-run the samplers; `options()`: the
      constructor arguments (`build_objective(self.name, **self.options())` rebuilds it);
    - `_sample(model, x, y, steps, cfg_scale, sampler, generator, on_step)`: one of its `samplers`.
    """

    name: str
    samplers: tuple[str, ...]
    default_sampler: str

    def draw_training_noise(self, shape, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample time t (B,), then noise of `shape`, for a global batch: drawn on the generator's device (so the
        stream does not depend on where training runs), moved to `device`."""
        t = self.draw_times(shape[0], generator)
        return t.to(device), torch.randn(shape, generator=generator, device=generator.device).to(device)

    def training_loss(
        self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Mean-squared error between the network output and the target (computed in fp32)."""
        prediction = model(self.add_noise(x0, t, noise), self.model_time(t), y)
        return F.mse_loss(prediction.float(), self.training_target(x0, noise).float())

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, steps: int, cfg_scale: float,
               sampler: str | None = None, generator: torch.Generator | None = None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
        """Generate x0 from `noise` (B, C, H, W) for labels y (B,) with classifier-free guidance.

        `generator` feeds the stochastic samplers (ancestral DDPM, DDIM with eta > 0). `on_step()` runs after
        every sampler step (progress bars; it may raise to stop sampling early).
        """
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise ValueError(
                f"unknown sampler {sampler!r} for objective {self.name!r}; choose one of {', '.join(self.samplers)}"
            )
        if steps < 1:
            raise ValueError(f"sampling needs at least 1 step, got {steps}")
        return self._sample(model, noise, y, steps, cfg_scale, sampler, generator, on_step or (lambda: None))


class FlowMatching(Objective):
    """Linear-interpolant flow matching: x_t = (1 - t) x0 + t noise, target v = noise - x0, t in [0, 1]."""

    name = "flow"
    samplers = ("euler", "heun")
    default_sampler = "euler"
    time_scale = 1000.0  # network time = t * 1000, so DiT's timestep embedding sees its usual range
    time_samplings = ("logit-normal", "uniform")

    def __init__(self, time_sampling: str = "logit-normal"):
        if time_sampling not in self.time_samplings:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {', '.join(self.time_samplings)}")
        self.time_sampling = time_sampling

    def options(self):
        return {"time_sampling": self.time_sampling}

    def draw_times(self, n, generator):
        if self.time_sampling == "logit-normal":
            # sigmoid(N(0, 1)) puts more weight on the middle times, where the velocity is hardest (SD3).
            return torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
        return torch.rand(n, generator=generator, device=generator.device)

    def add_noise(self, x0, t, noise):
        t = _per_sample(t, x0)
        return (1 - t) * x0 + t * noise

    def training_target(self, x0, noise):
        return noise - x0

    def model_time(self, t):
        return t * self.time_scale

    def time_grid(self, steps):
        return torch.linspace(1.0, 0.0, steps + 1)

    def sidecar(self):
        """Keys: objective, prediction ("velocity": model output v ~ noise - x0), time_scale (network
        time = t * time_scale), time_grid (numpy.linspace(time_start, time_end, steps + 1)), samplers.
        Euler: x += (t_next - t) * v(x, t). Heun: v1 = v(x, t); x' = x + dt * v1;
        x += dt * (v1 + v(x', t_next)) / 2. Guidance: v = v_null + s * (v_cond - v_null)."""
        return {
            "objective": self.name,
            "prediction": "velocity",
            "interpolant": "x_t = (1 - t) * x0 + t * noise",
            "time_scale": self.time_scale,
            "time_start": 1.0,
            "time_end": 0.0,
            "time_grid": "linspace(time_start, time_end, steps + 1)",
            "samplers": list(self.samplers),
            "default_sampler": self.default_sampler,
        }

    def _velocity(self, model, x, t, y, cfg_scale):
        t_model = torch.full((x.shape[0],), t * self.time_scale, device=x.device, dtype=x.dtype)
        return guided_prediction(model, x, t_model, y, cfg_scale, model.null_class)

    def _sample(self, model, x, y, steps, cfg_scale, sampler, generator, on_step):
        times = self.time_grid(steps).tolist()
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            dt = t_next - t
            velocity = self._velocity(model, x, t, y, cfg_scale)
            if sampler == "heun":
                x_euler = x + dt * velocity
                velocity = (velocity + self._velocity(model, x_euler, t_next, y, cfg_scale)) / 2
            x = x + dt * velocity
            on_step()
        return x


def linear_alphas_cumprod(num_timesteps: int) -> torch.Tensor:
    """DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02, scaled to keep the same end points for T != 1000."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def cosine_alphas_cumprod(num_timesteps: int, offset: float = 0.008) -> torch.Tensor:
    """iDDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos²((t/T + s)/(1 + s) · π/2), betas capped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class DDPM(Objective):
    """Discrete-time diffusion, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, epsilon target, t in {0..T-1}."""

    name = "ddpm"
    samplers = ("ddim", "ddpm")
    default_sampler = "ddim"
    schedules = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod}

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000, eta: float = 0.0):
        """`eta` is DDIM's noise level for the "ddim" sampler (0 = deterministic); "ddpm" always uses 1."""
        if schedule not in self.schedules:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(self.schedules)}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.eta = eta
        self.alphas_cumprod = self.schedules[schedule](num_timesteps)  # float64, (T,)

    def options(self):
        return {"schedule": self.schedule, "num_timesteps": self.num_timesteps, "eta": self.eta}

    def draw_times(self, n, generator):
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=generator.device)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.alphas_cumprod.to(t.device)[t], like)

    def add_noise(self, x0, t, noise):
        alpha_bar = self._alpha_bar(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def training_target(self, x0, noise):
        return noise

    def model_time(self, t):
        return t.float()

    def time_grid(self, steps):
        """`steps` timesteps evenly spaced over [T-1, 0] (both ends included), descending, int64."""
        steps = min(steps, self.num_timesteps)
        return torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()

    def sidecar(self):
        """Keys: objective, prediction ("epsilon"), alphas_cumprod (T floats), num_timesteps, time_grid
        (round(numpy.linspace(T - 1, 0, min(steps, T)))), network time = the integer timestep, eta, samplers.
        Step t -> previous grid time p (abar_p = 1 after the last): x0 = (x - sqrt(1-abar_t) eps) / sqrt(abar_t);
        sigma = eta * sqrt((1-abar_p)/(1-abar_t)) * sqrt(1 - abar_t/abar_p);
        x = sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma²) eps + sigma z. "ddim" uses `eta`, "ddpm" eta = 1."""
        return {
            "objective": self.name,
            "prediction": "epsilon",
            "schedule": self.schedule,
            "num_timesteps": self.num_timesteps,
            "alphas_cumprod": self.alphas_cumprod.tolist(),
            "time_scale": 1.0,
            "time_grid": "round(linspace(num_timesteps - 1, 0, min(steps, num_timesteps)))",
            "eta": self.eta,
            "samplers": list(self.samplers),
            "default_sampler": self.default_sampler,
        }

    def _sample(self, model, x, y, steps, cfg_scale, sampler, generator, on_step):
        # Ancestral DDPM on a respaced subset is DDIM with eta = 1 (Song et al. 2021, eq. 16).
        eta = 1.0 if sampler == "ddpm" else self.eta
        times = self.time_grid(steps).tolist()
        for i, t in enumerate(times):
            alpha_bar = self.alphas_cumprod[t].item()
            alpha_bar_prev = self.alphas_cumprod[times[i + 1]].item() if i + 1 < len(times) else 1.0
            t_model = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
            eps = guided_prediction(model, x, t_model, y, cfg_scale, model.null_class)
            x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
            sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
            x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                device = generator.device if generator is not None else x.device  # a CPU generator may feed a GPU
                x = x + sigma * torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
            on_step()
        return x


def build_objective(name: str, **options: Any) -> Objective:
    """ "flow" -> FlowMatching(**options), "ddpm" -> DDPM(**options)."""
    if name == "flow":
        return FlowMatching(**options)
    if name == "ddpm":
        return DDPM(**options)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
