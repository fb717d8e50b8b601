"""The galaxy stellar mass function: the textbook hierarchical model, in JAX.

Each galaxy i has a true stellar mass log M_i [log10 Msun] drawn from a Schechter
function above a completeness limit log M_c, and a noisy estimate of it (e.g. from SED
fitting); the population parameters are the low-mass slope ``alpha`` and the
characteristic mass ``log M*``, optionally evolving with redshift as
``log M*(z) = log_mstar0 + log_mstar1 * z`` (Leja, Speagle, Johnson et al. 2020, ApJ 893,
111, do this with a continuity model; here one Schechter component suffices).

Density of the true mass, per dex, normalised above the limit (and below an optional
upper limit)::

    p(log M | alpha, log M*) = 10^((alpha + 1) u) exp(-10^u) / Z,   u = log M - log M*
    Z = integral_{log M_c}^{log M_max} 10^((alpha + 1) u) exp(-10^u) dlog M
      = Gamma(alpha + 1, 10^(log M_c - log M*)) / ln 10     (for log M_max -> infinity)

``Z`` is computed by 32-point Gauss-Legendre quadrature in log M: relative error < 2e-6
against adaptive quadrature for -2.4 <= alpha <= 0.5 and limits 0.1-5.5 dex below log M*
(about float32 rounding; ~1e-10 in the usual range), differentiable in every argument and valid
for any ``alpha``. The closed form through the upper incomplete gamma function needs
``alpha > -1`` in SciPy and is used only to test it. Without an upper limit the quadrature
stops at log M* + 2, where the integrand is below e^-100.

Observation model (:func:`simulate_galaxies`): log M_obs,i = log M_i + Normal(0, err_i),
and the sample holds every galaxy whose *true* mass is above the limit (selection on
the true mass keeps the likelihood simple; a selection on the observed mass would add a
selection term).

Two inference routes (both in ``notebooks/mass_function.py``): joint NUTS over
(phi, {log M_i}) with :func:`joint_log_density`, and importance re-weighting of
per-galaxy samples drawn under a broad uniform interim prior
(:func:`interim_samples`, :func:`population_log_density` with
:func:`clusterhbm.hbm.reweighted_population_nuts`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GalaxySample",
    "MassFunctionParams",
    "interim_samples",
    "joint_log_density",
    "joint_position_to_masses",
    "log_mstar_at",
    "log_prior",
    "log_schechter_norm",
    "population_log_density",
    "schechter_log_density",
    "simulate_galaxies",
]

_LN10 = float(np.log(10.0))
_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)
#: integrand below exp(-10^2) beyond log M* + 2
_UPPER_DEX = 2.0


class MassFunctionParams(NamedTuple):
    """Population parameters of the mass function (truth of a mock, or a point).

    alpha : low-mass slope (per dex: dN/dlogM ∝ 10^((alpha+1) u) at u << 0)
    log_mstar0 : log10 M*/Msun at z = 0; log_mstar1 : d log M* / dz
    """

    alpha: float = -1.4
    log_mstar0: float = 10.8
    log_mstar1: float = 0.0


class GalaxySample(NamedTuple):
    """A mock (or real) sample: per galaxy (N,) arrays and the limit.

    redshift; log_mass_true [log10 Msun] (NaN for real data); log_mass_obs and
    log_mass_err [dex]; log_mass_min : the completeness limit [log10 Msun] (scalar or
    (N,)); params : the truth (or None)
    """

    redshift: np.ndarray
    log_mass_true: np.ndarray
    log_mass_obs: np.ndarray
    log_mass_err: np.ndarray
    log_mass_min: float
    params: MassFunctionParams | None


def log_mstar_at(params, redshift):
    """log M*(z) = log_mstar0 + log_mstar1 * z [log10 Msun]."""
    return params["log_mstar0"] + params["log_mstar1"] * redshift


def _log_integrand(log_mass, alpha, log_mstar):
    u = log_mass - log_mstar
    return _LN10 * (alpha + 1.0) * u - jnp.exp(_LN10 * u)


def log_schechter_norm(alpha, log_mstar, log_mass_min, log_mass_max=None):
    """log Z, the Schechter function's integral per dex between the limits.

    Parameters
    ----------
    alpha : slope; log_mstar : log10 M* [Msun]; log_mass_min : lower limit [log10 Msun];
    log_mass_max : optional upper limit (default log M* + 2, i.e. infinity in practice).
    All broadcast together; differentiable in each.
    """
    hi = jnp.asarray(log_mstar + _UPPER_DEX if log_mass_max is None else log_mass_max)
    lo = jnp.asarray(log_mass_min)
    half = 0.5 * (hi - lo)
    x = jnp.asarray(_GL_X, jnp.result_type(float))
    w = jnp.asarray(_GL_W, jnp.result_type(float))
    nodes = (0.5 * (hi + lo))[..., None] + half[..., None] * x
    f = _log_integrand(nodes, jnp.asarray(alpha)[..., None], jnp.asarray(log_mstar)[..., None])
    m = jnp.max(f, axis=-1, keepdims=True)
    return jnp.log(jnp.sum(w * jnp.exp(f - m), axis=-1)) + m[..., 0] + jnp.log(half)


def schechter_log_density(log_mass, alpha, log_mstar, log_mass_min, log_mass_max=None):
    """Normalised log p(log M | alpha, log M*) per dex; -inf outside the limits."""
    lp = _log_integrand(log_mass, alpha, log_mstar) - log_schechter_norm(
        alpha, log_mstar, log_mass_min, log_mass_max)
    ok = log_mass >= log_mass_min
    if log_mass_max is not None:
        ok &= log_mass <= log_mass_max
    return jnp.where(ok, lp, -jnp.inf)


def population_log_density(log_mass, params: dict, galaxy: dict):
    """log p(log M_i | phi) for one galaxy.

    ``galaxy = {"redshift", "log_mass_min"}`` are the galaxy's known covariates (pass them
    as ``covariates`` to :func:`clusterhbm.hbm.reweighted_population_nuts`: the
    normalisation is then computed once per galaxy, not once per sample).
    """
    return schechter_log_density(log_mass, params["alpha"],
                                 log_mstar_at(params, galaxy["redshift"]),
                                 galaxy["log_mass_min"])


def log_prior(params: dict, *, evolving: bool = True):
    """Weakly informative hyperprior: alpha ~ U(-2.5, 0.5), log_mstar0 ~ U(9, 12.5),
    log_mstar1 ~ Normal(0, 1) (only when ``evolving``)."""
    a, m0 = params["alpha"], params["log_mstar0"]
    ok = (a > -2.5) & (a < 0.5) & (m0 > 9.0) & (m0 < 12.5)
    lp = jnp.zeros_like(a)
    if evolving:
        lp = lp - 0.5 * params["log_mstar1"] ** 2
    return jnp.where(ok, lp, -jnp.inf)


def joint_position_to_masses(eta, log_mass_min):
    """log M_i = log M_c + softplus(eta_i) (unconstrained -> above the limit) and the log
    Jacobian d log M / d eta."""
    return log_mass_min + jax.nn.softplus(eta), jax.nn.log_sigmoid(eta)


def joint_log_density(position: dict, sample: GalaxySample, *, evolving: bool = True):
    """Joint log density of (phi, {log M_i}) given the observed masses.

    ``position = {"alpha", "log_mstar0", ["log_mstar1"], "eta": (N,)}`` with the masses
    written as :func:`joint_position_to_masses` (Jacobian included).
    """
    params = dict(position)
    if not evolving:
        params["log_mstar1"] = jnp.zeros_like(position["alpha"])
    z = jnp.asarray(sample.redshift)
    lm, jac = joint_position_to_masses(position["eta"], sample.log_mass_min)
    lp_pop = schechter_log_density(lm, params["alpha"], log_mstar_at(params, z),
                                   sample.log_mass_min)
    r = (jnp.asarray(sample.log_mass_obs) - lm) / jnp.asarray(sample.log_mass_err)
    ll = -0.5 * r ** 2
    total = log_prior(params, evolving=evolving) + jnp.sum(lp_pop + jac + ll)
    return jnp.where(jnp.isnan(total), -jnp.inf, total)


def _sample_truncated_schechter(rng, alpha, log_mstar, log_mass_min, n_grid=4096):
    """Inverse-CDF draws (NumPy), one per element of the broadcast arrays."""
    log_mstar = np.atleast_1d(np.asarray(log_mstar, float))
    lo = np.broadcast_to(np.asarray(log_mass_min, float), log_mstar.shape)
    out = np.empty(log_mstar.shape)
    u = rng.uniform(size=log_mstar.shape)
    for i, (ms, l0) in enumerate(zip(log_mstar, lo)):
        grid = np.linspace(l0, ms + _UPPER_DEX, n_grid)
        f = np.exp(_LN10 * (alpha + 1) * (grid - ms) - 10 ** (grid - ms))
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(grid))])
        out[i] = np.interp(u[i] * cdf[-1], cdf, grid)
    return out


def simulate_galaxies(params: MassFunctionParams | None = None, *, n_galaxies: int = 1000,
                      seed: int = 0, log_mass_min: float = 9.0,
                      redshift_range: tuple = (0.2, 2.0),
                      log_mass_err_range: tuple = (0.1, 0.3)) -> GalaxySample:
    """A mock: true masses from the Schechter function above ``log_mass_min``, redshifts
    uniform in ``redshift_range``, errors uniform in ``log_mass_err_range`` [dex].

    Raises
    ------
    ValueError
        if the limit is not below log M*(z) + 2 for every redshift, or ranges are empty.
    """
    p = MassFunctionParams() if params is None else MassFunctionParams(*params)
    if n_galaxies < 1:
        raise ValueError(f"n_galaxies must be >= 1, got {n_galaxies}")
    z_lo, z_hi = redshift_range
    e_lo, e_hi = log_mass_err_range
    if not (0 <= z_lo <= z_hi) or not (0 < e_lo <= e_hi):
        raise ValueError(f"need 0 <= redshift_range[0] <= [1] and 0 < err_range[0] <= [1]; "
                         f"got {redshift_range}, {log_mass_err_range}")
    rng = np.random.default_rng(seed)
    z = rng.uniform(z_lo, z_hi, n_galaxies)
    ms = p.log_mstar0 + p.log_mstar1 * z
    if np.any(log_mass_min >= ms + _UPPER_DEX - 0.5):
        raise ValueError(f"log_mass_min = {log_mass_min} is too close to or above log M*(z) "
                         f"(min {ms.min():.2f}): no galaxies above the limit")
    true = _sample_truncated_schechter(rng, p.alpha, ms, log_mass_min)
    err = rng.uniform(e_lo, e_hi, n_galaxies)
    obs = true + err * rng.normal(size=n_galaxies)
    return GalaxySample(redshift=z, log_mass_true=true, log_mass_obs=obs, log_mass_err=err,
                        log_mass_min=float(log_mass_min), params=p)


def interim_samples(sample: GalaxySample, *, n_samples: int = 500, seed: int = 0,
                    interim_range: tuple = (7.0, 13.0)):
    """Per-galaxy posterior samples under a uniform interim prior on log M.

    The posterior of one galaxy's log M given its estimate under p0 = U(interim_range) is a
    Normal(log_mass_obs, err) truncated to the range; it is drawn exactly (in practice
    these samples come from each galaxy's own SED fit).

    Returns
    -------
    log_mass : (N, K) samples [log10 Msun]
    log_p0 : (N, K) interim log prior (constant, -log(width))
    covariates : dict of (N,) ``redshift`` and ``log_mass_min``, for
        :func:`population_log_density`
    """
    from scipy.stats import truncnorm

    lo, hi = interim_range
    obs = np.asarray(sample.log_mass_obs)[:, None]
    err = np.asarray(sample.log_mass_err)[:, None]
    rng = np.random.default_rng(seed)
    a, b = (lo - obs) / err, (hi - obs) / err
    lm = truncnorm.rvs(a, b, loc=obs, scale=err, size=(obs.shape[0], n_samples),
                       random_state=rng)
    log_p0 = np.full(lm.shape, -np.log(hi - lo))
    n = lm.shape[0]
    cov = {"redshift": np.asarray(sample.redshift, float),
           "log_mass_min": np.broadcast_to(np.asarray(sample.log_mass_min, float), (n,)).copy()}
    return lm, log_p0, cov
