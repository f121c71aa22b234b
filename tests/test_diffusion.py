"""Diffusion objectives against closed forms, samplers against an analytically optimal model, CFG, overfitting."""

import math

import pytest
import torch
from torch import nn

from models.diffusion import (
    DDPM,
    OBJECTIVES,
    FlowMatching,
    build_objective,
    drop_labels,
    guided_prediction,
)
from models.tiny_dit import TinyDiT

CLASS_MEANS = (-0.6, 0.8)
DATA_STD = 0.3


class OptimalGaussianModel(nn.Module):
    """The exact minimiser of the training loss when class-y data is N(CLASS_MEANS[y], DATA_STD²) per pixel.

    x_t = a x0 + b noise is Gaussian too, so E[target | x_t] is linear in x_t:
    flow (a = 1 - t, b = t, target noise - x0): -mu + (b - a s²) / (a² s² + b²) (x_t - a mu);
    ddpm (a = sqrt(abar), b = sqrt(1 - abar), target noise): b / (a² s² + b²) (x_t - a mu).
    """

    def __init__(self, objective):
        super().__init__()
        self.objective = objective
        self.null_class = len(CLASS_MEANS)

    def forward(self, x, t_model, y):
        mu = torch.tensor(CLASS_MEANS, dtype=x.dtype)[y].view(-1, 1, 1, 1)
        s2 = DATA_STD**2
        if isinstance(self.objective, FlowMatching):
            t = (t_model / self.objective.time_scale).to(torch.float64).view(-1, 1, 1, 1)
            a, b = 1 - t, t
            return -mu + (b - a * s2) / (a * a * s2 + b * b) * (x - a * mu)
        alpha_bar = self.objective.alphas_cumprod[t_model.round().long()].view(-1, 1, 1, 1)
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return b / (a * a * s2 + b * b) * (x - a * mu)


def sample_classes(objective, steps, sampler, seed=0, per_class=2000):
    """Samples for both classes, float64 so only the sampler's own error shows."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(2 * per_class, 1, 2, 2, generator=generator, dtype=torch.float64)
    y = torch.tensor([0] * per_class + [1] * per_class)
    model = OptimalGaussianModel(objective)
    samples = objective.sample(model, noise, y, steps=steps, cfg_scale=1.0, sampler=sampler, generator=generator)
    return noise, samples.view(2, per_class, -1)


# --- schedules and forward processes ------------------------------------------------------------


def test_linear_schedule_matches_ddpm():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(DDPM("linear").alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_cosine_schedule_matches_iddpm_closed_form():
    alphas_cumprod = DDPM("cosine").alphas_cumprod

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    # Away from the clipped last betas, abar_t = f(t + 1) / f(0).
    for t in (0, 10, 250, 500, 900):
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    assert betas.max().item() == pytest.approx(0.999)


def test_ddpm_forward_process_moments_by_monte_carlo():
    objective = DDPM("linear")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 1.5)
    for step in (50, 400, 900):
        t, noise = objective.draw_training_noise(x0.shape, generator, "cpu")
        t = torch.full_like(t, step)
        x_t = objective.add_noise(x0, t, noise)
        alpha_bar = objective.alphas_cumprod[step].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 1.5, abs=0.02)
        assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=0.03)


def test_flow_interpolant_and_velocity_are_exact():
    objective = FlowMatching()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = objective.add_noise(x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(objective.training_target(x0, noise), noise - x0)
    torch.testing.assert_close(objective.model_time(t), t * 1000)


def test_training_time_distributions():
    generator = torch.Generator().manual_seed(0)
    t_uniform, noise = FlowMatching("uniform").draw_training_noise((50000, 1, 2, 2), generator, "cpu")
    assert noise.shape == (50000, 1, 2, 2)
    assert t_uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t_uniform.var().item() == pytest.approx(1 / 12, rel=0.03)
    t_logit, _ = FlowMatching("logit-normal").draw_training_noise((50000, 1), generator, "cpu")
    logits = torch.log(t_logit / (1 - t_logit))
    assert (logits.mean().item(), logits.std().item()) == pytest.approx((0.0, 1.0), abs=0.02)
    t_ddpm, _ = DDPM().draw_training_noise((50000, 1), generator, "cpu")
    assert t_ddpm.dtype == torch.int64 and t_ddpm.min() == 0 and t_ddpm.max() == 999


@pytest.mark.parametrize("name", OBJECTIVES)
def test_same_seed_same_draws_and_samples(name):
    objective = build_objective(name)

    def draw_and_sample(seed):
        generator = torch.Generator().manual_seed(seed)
        t, noise = objective.draw_training_noise((4, 1, 2, 2), generator, "cpu")
        sampler = objective.samplers[-1]  # the stochastic one for ddpm
        model = OptimalGaussianModel(objective)
        return t, objective.sample(
            model, noise, torch.tensor([0, 1, 0, 1]), steps=5, cfg_scale=1.0, sampler=sampler, generator=generator
        )

    t1, x1 = draw_and_sample(3)
    t2, x2 = draw_and_sample(3)
    t3, x3 = draw_and_sample(4)
    assert torch.equal(t1, t2) and torch.equal(x1, x2)
    assert not torch.equal(x1, x3)


# --- samplers with the analytically optimal model --------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "sampler", "steps"),
    [
        (FlowMatching(), "euler", 50),
        (FlowMatching(), "heun", 10),
        # DDIM/DDPM under-resolve the low-noise end with few steps (std 0.27 at 50 steps, converging to 0.3).
        (DDPM("linear"), "ddim", 200),
        (DDPM("cosine"), "ddim", 200),
        (DDPM("linear"), "ddpm", 1000),
        (DDPM("cosine", eta=0.5), "ddim", 500),
    ],
)
def test_samplers_reproduce_the_data_distribution(objective, sampler, steps):
    _, samples = sample_classes(objective, steps, sampler)
    for cls, mean in enumerate(CLASS_MEANS):
        assert samples[cls].mean().item() == pytest.approx(mean, abs=0.02)
        assert samples[cls].std().item() == pytest.approx(DATA_STD, rel=0.05)


def test_heun_beats_euler_at_equal_steps():
    # For Gaussian data the exact probability-flow ODE maps noise n to mu + std * n (the monotone map).
    objective = FlowMatching()
    errors = {}
    for sampler in ("euler", "heun"):
        noise, samples = sample_classes(objective, 4, sampler, per_class=50)
        exact = torch.stack([mean + DATA_STD * noise.view(2, 50, -1)[cls] for cls, mean in enumerate(CLASS_MEANS)])
        errors[sampler] = (samples - exact).abs().max().item()
    assert errors["heun"] < errors["euler"] / 5


def test_sampler_validation():
    objective = FlowMatching()
    model = OptimalGaussianModel(objective)
    with pytest.raises(ValueError, match="unknown sampler"):
        objective.sample(model, torch.randn(1, 1, 2, 2), torch.tensor([0]), steps=2, cfg_scale=1, sampler="ddim")
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("edm")


def test_ddpm_time_grid_is_evenly_spaced_and_covers_both_ends():
    assert DDPM().time_grid(4).tolist() == [999, 666, 333, 0]
    assert DDPM(num_timesteps=10).time_grid(50).tolist() == list(range(9, -1, -1))


# --- classifier-free guidance --------------------------------------------------------------------


class LabelShiftModel(nn.Module):
    """Output = x + 10 * y, counting its forward calls and batch sizes."""

    null_class = 5

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, t_model, y):
        self.batch_sizes.append(x.shape[0])
        return x + 10.0 * y.to(x.dtype).view(-1, 1, 1, 1)


def test_guidance_scales():
    model = LabelShiftModel()
    x, t, y = torch.randn(3, 1, 2, 2), torch.full((3,), 500.0), torch.tensor([0, 1, 2])
    cond, uncond = x + 10.0 * y.view(-1, 1, 1, 1), x + 50.0
    torch.testing.assert_close(guided_prediction(model, x, t, y, 1.0, model.null_class), cond)
    torch.testing.assert_close(guided_prediction(model, x, t, y, 0.0, model.null_class), uncond)
    torch.testing.assert_close(guided_prediction(model, x, t, y, 3.0, model.null_class), uncond + 3 * (cond - uncond))
    assert model.batch_sizes == [3, 6, 6]  # scale 1 skips the unconditional half; others batch both


@pytest.mark.parametrize("name", OBJECTIVES)
def test_sampling_uses_one_batched_forward_per_step(name):
    model = LabelShiftModel()
    objective = build_objective(name)
    objective.sample(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), steps=3, cfg_scale=4.0)
    assert model.batch_sizes == [4, 4, 4]


def test_drop_labels():
    y = torch.tensor([0, 1, 2, 3])
    assert drop_labels(y, torch.tensor([True, False, True, False]), 7).tolist() == [7, 1, 7, 3]


# --- sidecar and training -----------------------------------------------------------------------


def test_sidecars_are_json_and_describe_the_schedule():
    import json

    ddpm = json.loads(json.dumps(DDPM("cosine").sidecar()))
    assert ddpm["objective"] == "ddpm" and ddpm["prediction"] == "epsilon"
    assert ddpm["alphas_cumprod"] == DDPM("cosine").alphas_cumprod.tolist()
    flow = json.loads(json.dumps(FlowMatching().sidecar()))
    assert (flow["objective"], flow["time_scale"], flow["time_start"], flow["time_end"]) == ("flow", 1000.0, 1.0, 0.0)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    objective = build_objective(name)
    model = TinyDiT(image_size=8, num_classes=2, width=64, depth=2, heads=2, patch=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    t, noise = objective.draw_training_noise(x0.shape, generator, "cpu")  # fixed: pure memorisation
    losses = []
    for _ in range(60):
        loss = objective.training_loss(model, x0, y, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize(
    "name, options",
    [("flow", {"time_sampling": "uniform"}), ("ddpm", {"schedule": "cosine", "num_timesteps": 500, "eta": 0.5})],
)
def test_options_rebuild_the_same_objective(name, options):
    objective = build_objective(name, **options)
    assert objective.options() == options
    assert build_objective(name, **objective.options()).sidecar() == objective.sidecar()
