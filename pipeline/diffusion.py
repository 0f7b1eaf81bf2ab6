"""The diffusion objective and samplers, in the notation of Stable Audio (v-objective) and k-diffusion (samplers).

The network never sees noise levels other than through ``t``: it is a ``model_fn(x_t, t) -> v`` with

    x_t = alpha_t x0 + sigma_t noise,   alpha_t = cos(pi t / 2),   sigma_t = sin(pi t / 2),   t in [0, 1]
    v   = alpha_t noise - sigma_t x0  = d x_t / d phi   (phi = pi t / 2: v is the velocity of x_t along the angle)

so that x0 = alpha_t x_t - sigma_t v and noise = sigma_t x_t + alpha_t v. (This is the sign of Salimans & Ho 2022
and stable-audio-tools; v points from the data towards the noise.)

Samplers work in the variance-exploding view used by k-diffusion: x = x_t / alpha_t = x0 + s noise with
s = sigma_t / alpha_t = tan(pi t / 2) ("sigma" below; ``t = 2 atan(s) / pi``). ``VDenoiser`` turns the v-model into
a denoiser D(x, s) ≈ E[x0 | x]; each sampler is a small pure function of (denoiser, x, sigmas), and
``sample`` strings noise, schedule and sampler together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, C, T), t (B,)) -> v (B, C, T)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, C, T), sigma (B,)) -> x0 estimate


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () → broadcastable against x (B, ...)."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The v-objective


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) for diffusion time t in [0, 1]."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Variance-exploding noise level s = sigma_t / alpha_t ∈ [0, ∞) → diffusion time t = 2 atan(s) / pi ∈ [0, 1)."""
    return torch.atan(sigma) * (2 / math.pi)


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Diffusion time t ∈ [0, 1) → variance-exploding noise level s = tan(pi t / 2)."""
    return torch.tan(t * math.pi / 2)


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = alpha_t noise - sigma_t x0; x0, noise (B, C, T), t (B,)."""
    alpha, sigma = alpha_sigma(t)
    return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t noise; x0, noise (B, C, T), t (B,)."""
    alpha, sigma = alpha_sigma(t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def sample_t(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Training times t ~ U[0, 1) (B,), the schedule of Stable Audio."""
    return torch.rand(batch, generator=generator, device=device)


def v_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the model's v and v_target = alpha_t noise - sigma_t x0.

    Args:
        model_fn: (x_t, t) -> v, e.g. a ``functools.partial`` of a conditioned model.
        x0: clean latents (B, C, T).
        t: diffusion times in [0, 1] (B,).
        noise: standard normal, same shape as x0.
        mask: optional validity mask broadcastable to x0, e.g. (B, T) or (B, 1, T) (True/1 = real frame); the mean
            is taken over the valid elements only (padded frames of short files do not count).
    Returns:
        scalar loss.
    """
    v = model_fn(add_noise(x0, noise, t), t)  # (B, C, T)
    err = (v.float() - v_target(x0, noise, t).float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    if m.ndim == 2 and err.ndim == 3:
        m = m[:, None, :]  # (B, 1, T)
    m = m.expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class VDenoiser:
    """Wrap a v-model into a denoiser over the variance-exploding noise level s: D(x, s) ≈ E[x0 | x = x0 + s n].

    With x_t = alpha x = x / sqrt(1 + s^2) as the model input and t = 2 atan(s) / pi:
        D(x, s) = alpha x_t - sigma v = x / (1 + s^2) - s / sqrt(1 + s^2) · v.
    """

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) at noise level sigma (B,) → x0 estimate (B, C, T)."""
        s = _bcast(sigma, x)
        c_in = 1 / torch.sqrt(1 + s**2)  # alpha_t
        v = self.model_fn(x * c_in, sigma_to_t(sigma))
        return x * c_in**2 - v * (s * c_in)


def cfg_model_fn(cond: ModelFn, uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond); scale 1 is exactly ``cond``."""
    if scale == 1.0:
        return cond

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u = uncond(x, t)
        return v_u + scale * (cond(x, t) - v_u)

    return guided


def cfg_batched_model_fn(paired: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance as one forward: ``paired`` maps x_t, t stacked twice ((2B, C, T), (2B,)) to
    [v_cond; v_uncond] (2B, C, T); v = v_uncond + scale (v_cond - v_uncond), as :func:`cfg_model_fn` gives with two
    calls. One call of twice the batch keeps a GPU busier and, on the CPU too, costs less than two."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0])
        v_c, v_u = paired(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return guided


# ---------------------------------------------------------------------------------------------------------------------
# Noise schedules: steps + 1 decreasing noise levels, the last one 0


def sigmas_loglinear(
    steps: int, sigma_min: float, sigma_max: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Noise levels evenly spaced in log s from sigma_max to sigma_min, then 0 (steps + 1,)."""
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64))
    return torch.cat([s, s.new_zeros(1)]).to(device=device, dtype=torch.float32)


def sigmas_karras(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Karras et al. 2022: evenly spaced in s^(1/rho) from sigma_max to sigma_min, then 0 (steps + 1,)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)]).to(device=device, dtype=torch.float32)


SCHEDULES = {"loglinear": sigmas_loglinear, "karras": sigmas_karras}


# ---------------------------------------------------------------------------------------------------------------------
# Samplers: (denoiser, x at sigmas[0], sigmas) -> x at sigmas[-1] = 0


def randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn where ``generator`` lives (the CPU for a seeded :func:`sample`):
    a seed then gives the same noise on every device, and a GPU run can be checked against a CPU one."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def _at(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).expand(x.shape[0])  # (B,)


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE dx/ds = (x - D(x, s)) / s."""
    for i in range(len(sigmas) - 1):
        d = (x - denoiser(x, _at(sigmas[i], x))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in lambda = -log s, data prediction.

    A step of size h = lambda_next - lambda solves the ODE exactly for a constant D:
    x_next = (s_next / s) x + (1 - s_next / s) D; the multistep version replaces D by a linear extrapolation
    of the last two denoised estimates to the middle of the step.
    """
    prev_denoised, prev_h = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _at(s, x))
        if s_next == 0:
            x = denoised
            break
        h = torch.log(s / s_next)
        d_hat = denoised
        if prev_denoised is not None:
            r = prev_h / h
            d_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev_denoised
        x = (s_next / s) * x + (1 - s_next / s) * d_hat
        prev_denoised, prev_h = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep data prediction with stochasticity eta (0 = ODE).

    Over a step h = lambda_next - lambda (lambda = -log s), with h_eta = (1 + eta) h, the linear part is solved
    exactly, x ← e^{-h_eta} x + (1 - e^{-h_eta}) D, and the change of D along lambda is corrected with its first and
    second finite differences over the last three steps (weights phi_2, phi_3 of the exponential integrator). Fresh
    Gaussian noise of variance s_next^2 (1 - e^{-2 eta h}) is drawn from ``generator``, so a seed fixes the sample.
    """
    d_prev: list[torch.Tensor] = []  # last two denoised estimates, newest first
    h_prev: list[torch.Tensor] = []  # their step sizes, newest first
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _at(s, x))
        if s_next == 0:
            x = denoised
            break
        h = torch.log(s / s_next)
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if len(h_prev) == 2:
            r0, r1 = h_prev[0] / h, h_prev[1] / h
            d1_0 = (denoised - d_prev[0]) / r0  # ≈ h D' between the last two points
            d1_1 = (d_prev[0] - d_prev[1]) / r1  # ≈ h D' one step earlier
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # h D' extrapolated to the current point
            d2 = (d1_0 - d1_1) / (r0 + r1)  # ≈ h^2 D'' / 2
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(h_prev) == 1:
            x = x + phi_2 * (denoised - d_prev[0]) / (h_prev[0] / h)
        if eta > 0:
            z = randn(x.shape, generator, x.device, x.dtype)
            x = x + z * s_next * torch.sqrt(-torch.expm1(-2 * eta * h)) * s_noise
        d_prev, h_prev = [denoised, *d_prev][:2], [h, *h_prev][:2]
    return x


# The sampler registry: the config schema, `longplay generate` and the bundle read their names here; the first is the
# default (Stable Audio's).
SAMPLERS = {"dpmpp-3m-sde": sample_dpmpp_3m_sde, "dpmpp-2m": sample_dpmpp_2m, "euler": sample_euler}


def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    steps: int = 100,
    sampler: str = "dpmpp-3m-sde",
    sigma_min: float = 0.03,
    sigma_max: float = 500.0,
    schedule: str = "loglinear",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw x0 ~ p(x0) with a v-model: x = sigma_max · N(0, I), then ``steps`` sampler steps down to s = 0.

    Args:
        model_fn: (x_t (B, C, T), t (B,)) -> v; wrap conditioning and guidance into it (``cfg_model_fn``).
        shape: (B, C, T) of the latents to draw.
        steps: denoiser evaluations (the last step jumps from sigma_min to 0).
        sampler: "dpmpp-3m-sde" (default, Stable Audio), "dpmpp-2m" or "euler".
        sigma_min, sigma_max: variance-exploding noise levels s = tan(pi t / 2) at the ends of the schedule
            (stable-audio-tools' defaults: 0.03 and 500).
        schedule: "loglinear" (evenly spaced in log s, stable-audio-tools' rho=1 polyexponential) or "karras".
        seed: makes the initial noise and the SDE noise reproducible (ignored when ``generator`` is given).
        generator: a torch.Generator (on any device: noise is drawn there and moved); None and no seed = the global
            RNG. A ``seed`` makes a CPU generator, so a seed gives the same starting noise on every device.
    Returns:
        latents x0 (B, C, T).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need steps >= 1 and 0 < sigma_min < sigma_max, got {steps}, {sigma_min}, {sigma_max}")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    sigmas = SCHEDULES[schedule](steps, sigma_min, sigma_max, device=device)
    x = randn(shape, generator, device, dtype) * sigmas[0]
    return SAMPLERS[sampler](VDenoiser(model_fn), x, sigmas, generator=generator)
