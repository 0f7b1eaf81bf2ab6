"""The v-objective, the denoiser wrapper, guidance, schedules and samplers (pipeline.diffusion)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from pipeline import diffusion as D

MU, S = 1.5, 0.5  # data x0 ~ N(MU, S^2), elementwise


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small elementwise work: one thread avoids oversubscribing the 2 cores the suite shares with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_v_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal v-predictor for x0 ~ N(MU, S^2): E[v | x_t] = alpha E[noise | x_t] - sigma E[x0 | x_t].

    x_t = alpha x0 + sigma noise is Gaussian with mean alpha MU and variance alpha^2 S^2 + sigma^2, so both
    conditional means are linear regressions on x_t.
    """
    alpha, sigma = (a[:, None, None] for a in D.alpha_sigma(t))
    var = alpha**2 * S**2 + sigma**2
    resid = x_t - alpha * MU
    e_noise = sigma / var * resid
    e_x0 = MU + alpha * S**2 / var * resid
    return alpha * e_noise - sigma * e_x0


def test_v_parameterisation_identities() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g), torch.rand(3, generator=g)
    x_t, v = D.add_noise(x0, noise, t), D.v_target(x0, noise, t)
    alpha, sigma = (a[:, None, None] for a in D.alpha_sigma(t))
    torch.testing.assert_close(alpha * x_t - sigma * v, x0)  # x0 recovered
    torch.testing.assert_close(sigma * x_t + alpha * v, noise)  # noise recovered
    torch.testing.assert_close(D.sigma_to_t(D.t_to_sigma(t)), t)


def test_v_denoiser_is_exact_for_an_oracle() -> None:
    """A model that returns the true v makes D(x, s) return the true x0 at every noise level."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    sigma = torch.tensor([0.05, 0.7, 3.0, 200.0])
    t = D.sigma_to_t(sigma)

    def oracle(x_t: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        torch.testing.assert_close(x_t, D.add_noise(x0, noise, t_in))  # the model sees alpha * (x0 + s noise)
        return D.v_target(x0, noise, t_in)

    x = x0 + sigma[:, None, None] * noise  # variance-exploding view
    torch.testing.assert_close(D.VDenoiser(oracle)(x, sigma), x0, rtol=1e-4, atol=1e-4)
    assert torch.allclose(t, D.sigma_to_t(sigma))


def test_v_loss_is_zero_for_oracle_and_respects_mask() -> None:
    g = torch.Generator().manual_seed(2)
    x0, noise, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g), torch.rand(2, generator=g)
    assert D.v_loss(lambda x, tt: D.v_target(x0, noise, tt), x0, t, noise).item() < 1e-12
    # a model that is wrong only on the padded frames has zero masked loss
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False

    def wrong_on_padding(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        v = D.v_target(x0, noise, tt).clone()
        v[..., 4:] += 10.0
        return v

    assert D.v_loss(wrong_on_padding, x0, t, noise, mask=mask).item() < 1e-12
    assert D.v_loss(wrong_on_padding, x0, t, noise).item() == pytest.approx(100.0 * 2 / 6, rel=1e-5)


@pytest.mark.parametrize("schedule", ["loglinear", "karras"])
def test_schedules_decrease_to_zero(schedule: str) -> None:
    s = D.SCHEDULES[schedule](10, 0.03, 500.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(500.0, rel=1e-5) and s[-2].item() == pytest.approx(0.03, rel=1e-5)
    assert bool((s[1:] < s[:-1]).all())
    if schedule == "loglinear":
        ratios = s[1:-1] / s[:-2]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 250), ("dpmpp-2m", 50), ("dpmpp-3m-sde", 100)])
def test_sampler_recovers_gaussian_data(sampler: str, steps: int) -> None:
    """With the analytic v-model for N(MU, S^2) data, sampled mean and variance must be MU and S^2."""
    x = D.sample(gaussian_v_model, (4096, 4, 4), steps=steps, sampler=sampler, sigma_min=0.01, sigma_max=500.0, seed=0)
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.var().item() == pytest.approx(S**2, rel=0.05)


def test_sde_sampler_forgets_a_wrong_start() -> None:
    """The SDE's fresh noise pulls a badly initialised chain back to the data distribution (unlike an ODE)."""
    sigmas = D.sigmas_loglinear(100, 0.01, 50.0)
    g = torch.Generator().manual_seed(3)
    x_init = torch.full((4096, 4, 4), 40.0)  # every chain starts at the same wrong point
    x = D.sample_dpmpp_3m_sde(D.VDenoiser(gaussian_v_model), x_init, sigmas, g)
    assert x.mean().item() == pytest.approx(MU, abs=0.05)
    assert x.var().item() == pytest.approx(S**2, rel=0.1)


@pytest.mark.parametrize("sampler", sorted(D.SAMPLERS))
def test_seed_makes_sampling_reproducible(sampler: str) -> None:
    def run(seed: int) -> torch.Tensor:
        return D.sample(gaussian_v_model, (2, 3, 8), steps=8, sampler=sampler, seed=seed)

    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert not torch.equal(run(7), run(8))


def test_sde_noise_comes_from_the_generator() -> None:
    """Same initial x, same generator seed → same SDE path; another seed → another path."""
    sigmas = D.sigmas_loglinear(6, 0.1, 10.0)
    x = torch.ones(2, 3, 4)
    den = D.VDenoiser(gaussian_v_model)
    a = D.sample_dpmpp_3m_sde(den, x, sigmas, torch.Generator().manual_seed(1))
    b = D.sample_dpmpp_3m_sde(den, x, sigmas, torch.Generator().manual_seed(1))
    c = D.sample_dpmpp_3m_sde(den, x, sigmas, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_scale_one_is_conditional_and_scale_extrapolates() -> None:
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 3, 5, generator=g), torch.rand(2, generator=g)

    def cond(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return x_t * 2.0 + tt[:, None, None]

    def uncond(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return x_t - 1.0

    assert torch.equal(D.cfg_model_fn(cond, uncond, 1.0)(x, t), cond(x, t))
    torch.testing.assert_close(D.cfg_model_fn(cond, uncond, 0.0)(x, t), uncond(x, t))
    expected = uncond(x, t) + 6.0 * (cond(x, t) - uncond(x, t))
    torch.testing.assert_close(D.cfg_model_fn(cond, uncond, 6.0)(x, t), expected)


def test_sample_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sampler"):
        D.sample(gaussian_v_model, (1, 1, 4), steps=2, sampler="heun")
    with pytest.raises(ValueError, match="schedule"):
        D.sample(gaussian_v_model, (1, 1, 4), steps=2, schedule="cosine")
    with pytest.raises(ValueError, match="sigma_min"):
        D.sample(gaussian_v_model, (1, 1, 4), steps=2, sigma_min=1.0, sigma_max=0.5)


def test_alpha_sigma_trig() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    alpha, sigma = D.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.tensor([1.0, math.sqrt(0.5), 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))
