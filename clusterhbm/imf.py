"""Initial mass functions: log densities (the model's mass prior) and sampling.

All densities are per unit mass, dN/dm, in Msun^-1, normalised over ``[m_min, m_max]`` by
quadrature on a fixed log-mass grid, so they stay differentiable in their parameters
(the mass-function slope can be a fitted population parameter).

* ``"kroupa"``: Kroupa (2001), dN/dm ∝ m^-0.3 (m < 0.08), m^-1.3 (0.08-0.5), m^-2.3 (> 0.5),
  continuous;
* ``"chabrier"``: Chabrier (2003) single-star IMF, log-normal in log10 m below 1 Msun
  (m_c = 0.079, sigma = 0.69), dN/dm ∝ m^-2.3 above, continuous;
* ``"powerlaw"``: dN/dm ∝ m^-alpha (Salpeter: alpha = 2.35).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "IMF_KINDS",
    "check_imf",
    "imf_cdf",
    "log_imf",
    "log_imf_unnormalised",
    "sample_imf",
]

IMF_KINDS = ("kroupa", "chabrier", "powerlaw")
_LN10 = 2.302585092994046
_N_QUAD = 2048


def check_imf(kind: str, m_min: float, m_max: float) -> None:
    """Raise ``ValueError`` for an unknown IMF or bad mass limits."""
    if kind not in IMF_KINDS:
        raise ValueError(f"unknown IMF {kind!r}; choose one of {IMF_KINDS}")
    if not (0 < m_min < m_max):
        raise ValueError(f"need 0 < m_min < m_max, got m_min={m_min}, m_max={m_max}")


def log_imf_unnormalised(mass_msun, *, kind: str = "kroupa", alpha=2.35):
    """log dN/dm up to a constant (mass in Msun; ``alpha`` used by ``"powerlaw"``)."""
    m = jnp.maximum(mass_msun, 1e-6)
    lm = jnp.log(m)
    if kind == "kroupa":
        # continuous broken power law with breaks at 0.08 and 0.5 Msun
        l1, l2 = jnp.log(0.08), jnp.log(0.5)
        return jnp.where(
            m < 0.08, -0.3 * lm + (-1.3 + 0.3) * l1,
            jnp.where(m < 0.5, -1.3 * lm, -2.3 * lm + (-1.3 + 2.3) * l2))
    if kind == "chabrier":
        lg = lm / _LN10
        mc, sig = jnp.log10(0.079), 0.69
        low = -0.5 * ((lg - mc) / sig) ** 2 - lm  # xi(log m) / m
        c = -0.5 * ((0.0 - mc) / sig) ** 2  # value at m = 1 (lm = 0)
        return jnp.where(m <= 1.0, low, c - 2.3 * lm)
    if kind == "powerlaw":
        return -alpha * lm
    raise ValueError(f"unknown IMF {kind!r}; choose one of {IMF_KINDS}")


def _quad_grid(m_min, m_max):
    lm = jnp.linspace(jnp.log(m_min), jnp.log(m_max), _N_QUAD)
    return lm, jnp.exp(lm)


def _log_norm(kind, m_min, m_max, alpha):
    lm, m = _quad_grid(m_min, m_max)
    f = log_imf_unnormalised(m, kind=kind, alpha=alpha) + lm  # dN/dln m
    dl = lm[1] - lm[0]
    w = jnp.full(_N_QUAD, dl).at[0].set(0.5 * dl).at[-1].set(0.5 * dl)
    return jax.scipy.special.logsumexp(f, b=w)


def _cdf_table(kind, m_min, m_max, alpha):
    """(log m nodes, CDF at the nodes) by the trapezoid rule in log m."""
    lm, m = _quad_grid(m_min, m_max)
    f = jnp.exp(log_imf_unnormalised(m, kind=kind, alpha=alpha) + lm)
    dl = lm[1] - lm[0]
    c = jnp.concatenate([jnp.zeros(1), jnp.cumsum(0.5 * (f[1:] + f[:-1]) * dl)])
    return lm, c / c[-1]


def log_imf(mass_msun, *, kind: str = "kroupa", m_min=0.1, m_max=10.0, alpha=2.35):
    """Normalised log dN/dm over ``[m_min, m_max]``; -inf outside."""
    lp = log_imf_unnormalised(mass_msun, kind=kind, alpha=alpha) - _log_norm(
        kind, m_min, m_max, alpha)
    inside = (mass_msun >= m_min) & (mass_msun <= m_max)
    return jnp.where(inside, lp, -jnp.inf)


def imf_cdf(mass_msun, *, kind: str = "kroupa", m_min=0.1, m_max=10.0, alpha=2.35):
    """Cumulative distribution of the truncated IMF (by quadrature)."""
    lm, c = _cdf_table(kind, m_min, m_max, alpha)
    return jnp.interp(jnp.log(jnp.clip(mass_msun, m_min, m_max)), lm, c)


def sample_imf(rng_key, n: int, *, kind: str = "kroupa", m_min=0.1, m_max=10.0,
               alpha=2.35):
    """Draw ``n`` initial masses [Msun] from the truncated IMF (inverse CDF on a fine grid)."""
    lm, c = _cdf_table(kind, m_min, m_max, alpha)
    u = jax.random.uniform(rng_key, (n,))
    return jnp.exp(jnp.interp(u, c, lm))
