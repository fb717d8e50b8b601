"""The warm-up's metric regularisation (sampling.regularised_metric) and its effect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.adaptation.mass_matrix import welford_algorithm

from clusterhbm.sampling import SHRINKAGE_COUNT, regularised_metric, run_nuts


def _welford(x, diagonal):
    init, update, _ = welford_algorithm(diagonal)
    st = init(x.shape[1])
    for row in x:
        st = update(st, jnp.asarray(row))
    return st


@pytest.mark.parametrize("diagonal", [True, False])
def test_regularised_metric_is_stans_rule_towards_the_target(diagonal):
    rng = np.random.default_rng(0)
    scales = np.array([1e-4, 1e-2, 1.0])
    x = rng.normal(size=(30, 3)) * scales
    target = scales ** 2 * np.array([2.0, 0.5, 1.0])
    tgt = target if diagonal else np.diag(target)
    got = np.asarray(regularised_metric(_welford(x, diagonal), jnp.asarray(tgt),
                                        diagonal=diagonal))
    n = len(x)
    w = n / (n + SHRINKAGE_COUNT)
    cov = np.cov(x, rowvar=False)
    if diagonal:
        want = w * np.diag(cov) + (1 - w) * target
    else:
        want = w * cov + (1 - w) * np.diag(np.maximum(np.diag(cov), target))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # never the 1e-3 identity of Stan's default, which swamps a 1e-8 variance
    first = got[0] if diagonal else got[0, 0]
    assert first < 1e-7
    if not diagonal:  # a full target (the Laplace covariance) keeps its structure
        full = np.asarray(regularised_metric(_welford(x, False), jnp.asarray(tgt),
                                             diagonal=False, prior_count=10.0,
                                             raise_diagonal=False))
        np.testing.assert_allclose(full, 30 / 40 * cov + 10 / 40 * tgt, rtol=1e-4)


@pytest.mark.parametrize("diagonal", [True, False])
def test_badly_scaled_gaussian_keeps_a_large_step_size(diagonal):
    """Variances from 1e-8 to 1: with the metric shrunk towards the starting (true)
    variances the adapted step size stays of order one (shrinking towards 1e-3 I, as
    Stan does, gave ~0.01 here) and the draws have the right variances."""
    sd = np.logspace(-4, 0, 12)

    def logdensity(x):
        return -0.5 * jnp.sum((x["x"] / sd) ** 2)

    init = {"x": jnp.asarray(np.tile(sd * 0.1, (2, 1)))}
    out = run_nuts(jax.random.key(0), logdensity, init, num_warmup=300, num_samples=300,
                   initial_inverse_mass_matrix=sd ** 2, diagonal_mass_matrix=diagonal,
                   chunk_size=100)
    assert np.all(out.step_size > 0.3), out.step_size
    draws = np.asarray(out.samples["position"]["x"]).reshape(-1, 12)
    ratio = draws.std(axis=0) / sd
    assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio


def test_factor_covariance_is_exact_for_conditionally_independent_coordinates():
    """Stars independent given the population: the factor form reproduces such a
    covariance exactly, and from fewer draws than dimensions it is full rank."""
    from clusterhbm.sampling import factor_covariance

    rng = np.random.default_rng(1)
    n_pop, n_star = 3, 40
    a = rng.normal(size=(n_pop, n_pop))
    c_pp = a @ a.T + np.eye(n_pop)
    b = rng.normal(size=(n_star, n_pop)) * 0.1
    resid = rng.uniform(1e-4, 1e-2, n_star)
    cov = np.block([[c_pp, c_pp @ b.T], [b @ c_pp, b @ c_pp @ b.T + np.diag(resid)]])
    got = np.asarray(factor_covariance(jnp.asarray(cov), n_pop, jnp.full(n_star, 1e-9)))
    np.testing.assert_allclose(got, cov, rtol=1e-4, atol=1e-6 * np.abs(cov).max())  # f32
    # 20 draws in 43 dimensions: the sample covariance is singular, the factor form not
    draws = rng.multivariate_normal(np.zeros(n_pop + n_star), cov, size=20)
    sample = np.cov(draws, rowvar=False)
    assert np.linalg.matrix_rank(sample) < n_pop + n_star
    est = np.asarray(factor_covariance(jnp.asarray(sample), n_pop, jnp.full(n_star, 1e-6)))
    assert np.all(np.linalg.eigvalsh(est) > 0)


def test_spiked_covariance_finds_the_coupling_from_fewer_draws_than_dimensions():
    """One strong correlation direction (like a cluster's age-star coupling) among 200
    coordinates of very different scales, 40 draws: the estimate is positive definite,
    its leading direction is the true one, and elsewhere each coordinate keeps its own
    variance (a convex shrinkage of the singular sample covariance leaves the null space
    at 5/(n+5) of it)."""
    from clusterhbm.sampling import spiked_covariance

    rng = np.random.default_rng(2)
    d, n = 200, 40
    scale = np.logspace(-4, -1, d)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    corr = np.eye(d) * 0.05 + 0.95 * np.outer(np.sign(u), np.sign(u)) / 1.0
    corr = 0.5 * (corr + corr.T)
    np.fill_diagonal(corr, 1.0)
    cov = corr * np.outer(scale, scale)
    draws = rng.multivariate_normal(np.zeros(d), cov, size=n)
    sample = np.cov(draws, rowvar=False)
    est = np.asarray(spiked_covariance(jnp.asarray(sample), jnp.asarray(float(n))))
    assert np.all(np.linalg.eigvalsh(0.5 * (est + est.T)) > 0)
    s = np.sqrt(np.diag(est))
    lam, vec = np.linalg.eigh(est / np.outer(s, s))
    true_dir = np.sign(u) / np.sqrt(d)
    assert abs(vec[:, -1] @ true_dir) > 0.95
    assert lam[-1] > 0.5 * d * 0.95  # the spike's size, roughly
    # a direction orthogonal to the spike keeps about unit correlation-scale variance
    v = rng.normal(size=d)
    v -= (v @ true_dir) * true_dir
    v /= np.linalg.norm(v)
    assert 0.5 < v @ (est / np.outer(s, s)) @ v < 2.0
