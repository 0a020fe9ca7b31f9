"""Weibull maths against Monte-Carlo estimates and known identities."""

import math

import numpy as np
import pytest
import torch

from napari_ruac.model.weibull import (
    binary_entropy,
    binary_entropy_from_logit,
    kl_weibull_gamma,
    probit_probability,
    weibull_moments,
    weibull_sample,
)

PARAMS = [(0.5, 1.0), (1.0, 2.0), (2.0, 5.0), (0.3, 15.0)]


@pytest.mark.parametrize("lam,kappa", PARAMS)
def test_mean_and_variance_match_monte_carlo(lam, kappa):
    g = torch.Generator().manual_seed(0)
    lam_t = torch.full((400_000,), lam, dtype=torch.float64)
    kappa_t = torch.full_like(lam_t, kappa)
    w = weibull_sample(lam_t, kappa_t, generator=g)
    mean, var = weibull_moments(torch.tensor(lam, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64))
    assert (w > 0).all()
    assert w.mean().item() == pytest.approx(mean.item(), rel=0.01)
    assert w.var().item() == pytest.approx(var.item(), rel=0.03)


def test_moments_are_exact_for_exponential():
    # kappa = 1 is the exponential distribution: mean lam, variance lam^2
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    mean, var = weibull_moments(lam, torch.ones_like(lam))
    assert torch.allclose(mean, lam)
    assert torch.allclose(var, lam**2)


@pytest.mark.parametrize("lam,kappa", PARAMS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 3.0), (2.0, 1.0)])
def test_kl_matches_monte_carlo(lam, kappa, alpha, beta):
    # KL(q||p) = E_q[log q(w) - log p(w)] with q Weibull(lam, kappa), p Gamma(alpha, rate beta)
    g = torch.Generator().manual_seed(1)
    lam_t = torch.full((400_000,), lam, dtype=torch.float64)
    w = weibull_sample(lam_t, torch.full_like(lam_t, kappa), generator=g)
    log_q = math.log(kappa / lam) + (kappa - 1) * torch.log(w / lam) - (w / lam) ** kappa
    log_p = alpha * math.log(beta) - math.lgamma(alpha) + (alpha - 1) * torch.log(w) - beta * w
    mc = (log_q - log_p).mean().item()
    closed = kl_weibull_gamma(torch.tensor(lam, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64), alpha, beta)
    assert closed.item() == pytest.approx(mc, abs=0.02 + 0.01 * abs(mc))


def test_kl_is_zero_where_weibull_equals_prior():
    # Weibull(1/beta, 1) is the exponential with rate beta = Gamma(1, beta)
    kl = kl_weibull_gamma(torch.tensor(1 / 3.0), torch.tensor(1.0), 1.0, 3.0)
    assert abs(kl.item()) < 1e-6


def test_gradients_are_finite_at_extremes():
    lam = torch.tensor([1e-4, 1.0, 50.0], requires_grad=True)
    kappa = torch.tensor([1.0, 4.0, 20.0], requires_grad=True)
    w = weibull_sample(lam, kappa, generator=torch.Generator().manual_seed(0))
    mean, var = weibull_moments(lam, kappa)
    loss = w.sum() + mean.sum() + var.sum() + kl_weibull_gamma(lam, kappa).sum()
    loss.backward()
    assert torch.isfinite(lam.grad).all() and torch.isfinite(kappa.grad).all()
    assert (lam.grad != 0).all()


def test_probit_matches_gaussian_expectation_of_sigmoid():
    g = torch.Generator().manual_seed(2)
    for mu, var in [(0.0, 4.0), (2.0, 1.0), (-3.0, 9.0), (5.0, 0.01)]:
        x = mu + math.sqrt(var) * torch.randn(400_000, generator=g, dtype=torch.float64)
        mc = torch.sigmoid(x).mean().item()
        approx = probit_probability(torch.tensor(mu), torch.tensor(var)).item()
        assert approx == pytest.approx(mc, abs=0.02)
    # more variance pulls the probability towards 1/2
    p = probit_probability(torch.tensor([3.0, 3.0]), torch.tensor([0.0, 30.0]))
    assert 0.5 < p[1] < p[0]


def test_binary_entropy_range_and_logit_form_agree():
    p = torch.tensor([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0])
    h = binary_entropy(p)
    assert h[0] == 0 and h[-1] == 0 and h[3] == pytest.approx(1.0)
    assert torch.all((h >= 0) & (h <= 1))
    logits = torch.linspace(-30, 30, 121, dtype=torch.float64)
    np.testing.assert_allclose(
        binary_entropy_from_logit(logits).numpy(), binary_entropy(torch.sigmoid(logits)).numpy(), atol=1e-6
    )
