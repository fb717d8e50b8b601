"""The hierarchical model of a cluster: a pure log density over an unconstrained pytree.

    p(phi, {theta_i} | D) ∝ p(phi) prod_i p(theta_i | phi) p(D_i | theta_i)

Per star i: theta_i = (s_i, log_age_i, feh_i, distance_i, A_V,i), written non-centred,

    log_age_i = log_age + sigma_log_age * z_age,i           (Normal)
    feh_i     = feh + sigma_feh * z_feh,i                   (Normal)
    d_i       = distance_pc + sigma_distance_pc * z_dist,i   (Normal, pc)
    A_V,i     = TruncNormal_{>=0}(av_mag, sigma_av_mag) via its inverse CDF at Phi(z_av,i)

with z ~ Normal(0, 1), so widths near zero create no funnel.

The per-star position coordinate is a pseudo-mass s = m(EEP) + eps * EEP (eps = 3e-3 Msun
per EEP), inverted to EEP on the star's interpolated isochrone. Why (measured with
``scripts/bench_parametrisation.py``): with the per-star coordinate held fixed, the
conditional sd of the cluster's log age is 8.7e-5 dex for initial mass (eps = 0),
1.3e-4 for EEP (eps -> large) and 3.3e-4 for eps = 3e-3, against a marginal sd of
~0.005-0.01 dex. The smaller that ratio, the more every star must move with the age, and
the smaller NUTS's steps. Mass is the right coordinate on the lower main sequence (a star
barely moves when the age changes), EEP past the turnoff; eps = 3e-3 blends the two. Plain
mass also fails in core-helium burning, where initial mass is flat to float32 precision
(the red clump is unresolved in mass); s is strictly increasing in EEP. The remaining,
nearly linear, age-star coupling is absorbed by a dense mass matrix. The mass prior is the
IMF carried to s:

    p(s_i | age_i, feh_i) = IMF(m_i) m' / (m' + eps) / Z(age_i, feh_i),  m' = dm/dEEP,
    Z = integral of the IMF between m_min and the mass at the isochrone's last EEP

(Z makes p a normalised density over the stars alive in the grid; without it older ages
are penalised by the fraction of stars that have died.)

Population priors (weakly informative, overridable via :class:`Priors`):
log_age uniform over the grid; feh ~ Normal(0, 0.5); ln distance uniform on
[ln 10, ln 30000]; av_mag uniform on [0, 6] (sampled as 0.1 softplus(raw / 0.1)); each width
~ HalfNormal(scale) sampled as its log.

Likelihood: Gaussian in each band with variance err^2 + floor^2 (floor 0.01 mag by
default) and Gaussian in parallax, predicted 1000/d_i + parallax_zp (zp fixed at
``Priors.parallax_zp_mas`` or fitted with a Normal prior). NaN bands or parallaxes are
skipped per star. Positions outside the grid give -inf, never NaN.

Unpooled mode (``ModelConfig(pooled=False)``) runs the same code with the population
parameters replaced by fixed broad values, so every star is fitted independently; the
posterior widths of the two runs measure shrinkage.

Everything here is a pure function of arrays and NamedTuples: jit, vmap and grad freely.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from .grid import COL_INITIAL_MASS, ModelGrid
from .imf import imf_cdf, log_imf
from .isochrone import eep_from_mass, eep_range, interp_eep
from .photometry import Observables, photometry

__all__ = [
    "POP_PARAMS",
    "WIDTH_PARAMS",
    "ModelConfig",
    "Priors",
    "StarData",
    "log_density",
    "make_logdensity_fn",
    "population_values",
    "star_observables",
    "star_values",
]

#: population means, in summary order
POP_PARAMS = ("log_age", "feh", "distance_pc", "av_mag")
#: their widths
WIDTH_PARAMS = ("sigma_log_age", "sigma_feh", "sigma_distance_pc", "sigma_av_mag")
_LOG_2PI = 1.8378770664093453


class ModelConfig(NamedTuple):
    """Static switches: each changes the compiled graph.

    band_idx : indices of the photometric bands (see :func:`clusterhbm.grid.band_indices`)
    pooled : hierarchical (True) or every star independent under broad priors (False)
    fit_widths : per population parameter (age, feh, distance, A_V), whether its width is
        fitted (True) or fixed at zero (False: the star shares the cluster value)
    cubic : C1 cubic interpolation instead of linear
    fit_parallax_zp : fit a global parallax zero-point offset
    imf : "kroupa", "chabrier" or "powerlaw"
    pseudo_mass_eps : eps of the per-star pseudo-mass coordinate [Msun per EEP] (3e-3)
    """

    band_idx: tuple = (0, 1, 2)
    pooled: bool = True
    fit_widths: tuple = (True, True, True, True)
    cubic: bool = False
    fit_parallax_zp: bool = False
    imf: str = "kroupa"
    pseudo_mass_eps: float = 3e-3


class Priors(NamedTuple):
    """Hyperpriors and fixed numbers (all traced: changing them does not recompile).

    Units as in the names. ``*_scale`` are HalfNormal scales of the widths;
    ``sigma_distance_frac_scale`` scales the distance width relative to the distance.
    ``unpooled_*`` are the broad fixed population values of the unpooled model.
    """

    feh_mean: float = 0.0
    feh_sd: float = 0.5
    distance_pc_min: float = 10.0
    distance_pc_max: float = 30000.0
    av_max: float = 6.0
    sigma_log_age_scale: float = 0.05
    sigma_feh_scale: float = 0.05
    sigma_distance_frac_scale: float = 0.02
    sigma_av_scale: float = 0.05
    mag_floor: float = 0.01
    parallax_zp_mas: float = 0.0
    parallax_zp_sd_mas: float = 0.02
    m_min: float = 0.1
    m_max: float = 20.0
    imf_alpha: float = 2.35
    unpooled_log_age: float = 9.0
    unpooled_sigma_log_age: float = 1.0
    unpooled_feh: float = 0.0
    unpooled_sigma_feh: float = 0.5
    unpooled_distance_pc: float = 1000.0
    unpooled_sigma_distance_pc: float = 1000.0
    unpooled_av_mag: float = 0.3
    unpooled_sigma_av_mag: float = 1.0


class StarData(NamedTuple):
    """Observations of N stars in B bands (NaN entries are masked, not used).

    mag, mag_err : (N, B) apparent magnitude and its error [mag]
    parallax_mas, parallax_err_mas : (N,)
    """

    mag: jax.Array
    mag_err: jax.Array
    parallax_mas: jax.Array
    parallax_err_mas: jax.Array


#: A_V = s * softplus(raw / s): linear above ~s, smooth at 0 (s = 0.1 mag)
_AV_SCALE = 0.1


def _softplus_inv(y):
    return jnp.log(jnp.expm1(y))


def population_values(pop: dict, config: ModelConfig, priors: Priors):
    """Population parameters in physical units from the unconstrained position.

    Returns a dict with :data:`POP_PARAMS`, :data:`WIDTH_PARAMS` and ``parallax_zp_mas``.
    """
    if not config.pooled:
        out = {
            "log_age": priors.unpooled_log_age, "feh": priors.unpooled_feh,
            "distance_pc": priors.unpooled_distance_pc, "av_mag": priors.unpooled_av_mag,
            "sigma_log_age": priors.unpooled_sigma_log_age,
            "sigma_feh": priors.unpooled_sigma_feh,
            "sigma_distance_pc": priors.unpooled_sigma_distance_pc,
            "sigma_av_mag": priors.unpooled_sigma_av_mag,
        }
        out = {k: jnp.asarray(v, jnp.result_type(float)) for k, v in out.items()}
    else:
        out = {
            "log_age": pop["log_age"],
            "feh": pop["feh"],
            "distance_pc": jnp.exp(pop["ln_distance_pc"]),
            "av_mag": _AV_SCALE * jax.nn.softplus(pop["av_raw"] / _AV_SCALE),
        }
        for name, on in zip(WIDTH_PARAMS, config.fit_widths):
            out[name] = jnp.exp(pop["ln_" + name]) if on else jnp.zeros_like(pop["feh"])
    out["parallax_zp_mas"] = (pop["parallax_zp_mas"] if config.fit_parallax_zp
                              else jnp.asarray(priors.parallax_zp_mas, out["feh"].dtype))
    return out


def _log_halfnormal(x, scale):
    return jnp.log(2.0) - 0.5 * _LOG_2PI - jnp.log(scale) - 0.5 * (x / scale) ** 2


def log_prior_population(pop: dict, config: ModelConfig, priors: Priors, grid: ModelGrid):
    """log p(phi) in the unconstrained coordinates (Jacobians included)."""
    lp = jnp.zeros(())
    if config.pooled:
        iso = grid.iso
        ok = (pop["log_age"] >= iso.log_age[0]) & (pop["log_age"] <= iso.log_age[-1])
        ok &= (pop["ln_distance_pc"] >= jnp.log(priors.distance_pc_min))
        ok &= (pop["ln_distance_pc"] <= jnp.log(priors.distance_pc_max))
        av = _AV_SCALE * jax.nn.softplus(pop["av_raw"] / _AV_SCALE)
        ok &= av <= priors.av_max
        lp += jax.nn.log_sigmoid(pop["av_raw"] / _AV_SCALE)  # d av / d raw
        lp += -0.5 * ((pop["feh"] - priors.feh_mean) / priors.feh_sd) ** 2
        d = jnp.exp(pop["ln_distance_pc"])
        scales = (priors.sigma_log_age_scale, priors.sigma_feh_scale,
                  priors.sigma_distance_frac_scale * d, priors.sigma_av_scale)
        for name, on, scale in zip(WIDTH_PARAMS, config.fit_widths, scales):
            if on:
                ls = pop["ln_" + name]
                lp += _log_halfnormal(jnp.exp(ls), scale) + ls
        lp = jnp.where(ok, lp, -jnp.inf)
    if config.fit_parallax_zp:
        lp += -0.5 * ((pop["parallax_zp_mas"] - priors.parallax_zp_mas)
                      / priors.parallax_zp_sd_mas) ** 2
    return lp


def _truncnorm_from_z(z, mu, sigma):
    """A_V = TruncNormal_{>=0}(mu, sigma) at quantile Phi(z) (non-centred, exact)."""
    s = jnp.maximum(sigma, 1e-8)
    p0 = ndtr(-mu / s)
    u = p0 + ndtr(z) * (1.0 - p0)
    u = jnp.clip(u, 1e-7, 1.0 - 1e-7)
    return jnp.maximum(mu + s * ndtri(u), 0.0)


def star_values(star: dict, popv: dict, config: ModelConfig, grid: ModelGrid):
    """Per-star (eep, log_age, feh, distance_pc, av_mag, ok) for one star.

    ``ok`` is False when the pseudo-mass lies outside the star's isochrone.
    """
    fw = config.fit_widths if config.pooled else (True, True, True, True)

    def spread(name, zname, on):
        return popv[name] + (popv["sigma_" + name] * star[zname] if on else 0.0)

    log_age = spread("log_age", "z_age", fw[0])
    feh = spread("feh", "z_feh", fw[1])
    dist = spread("distance_pc", "z_dist", fw[2])
    if fw[3]:
        av = _truncnorm_from_z(star["z_av"], popv["av_mag"], popv["sigma_av_mag"])
    else:
        av = popv["av_mag"]
    eep, ok = eep_from_mass(grid.iso, star["s"], log_age, feh, cubic=config.cubic,
                            eps=config.pseudo_mass_eps)
    return eep, log_age, feh, dist, av, ok


def star_observables(grid: ModelGrid, config: ModelConfig, eep, log_age, feh, dist,
                     av) -> Observables:
    """The forward model of one star at its (EEP, age, [Fe/H], distance, A_V)."""
    props = interp_eep(grid.iso, eep, log_age, feh, cubic=config.cubic)
    return photometry(grid.bc, props, feh, dist, av, config.band_idx, cubic=config.cubic)


def _log_mass_prior(grid, config, priors, eep, log_age, feh):
    """log IMF(m) + log(m' / (m' + eps)) - log Z(age, feh), and the mass (m' = dm/dEEP)."""

    def mass_of(e):
        return interp_eep(grid.iso, e, log_age, feh, cubic=config.cubic,
                          columns=(COL_INITIAL_MASS,)).initial_mass

    m, dm = jax.jvp(mass_of, (eep,), (jnp.ones_like(eep),))
    kw = {"kind": config.imf, "m_min": priors.m_min, "m_max": priors.m_max,
          "alpha": priors.imf_alpha}
    dm = jnp.maximum(dm, 0.0)
    eps = config.pseudo_mass_eps
    lp = log_imf(m, **kw) + jnp.log(jnp.maximum(dm, 1e-12) / (dm + eps))
    # Z: IMF mass of the stars alive in the grid at this (age, feh)
    _, e_hi = eep_range(grid.iso, log_age, feh)
    m_hi = jnp.clip(mass_of(e_hi), priors.m_min * 1.0001, priors.m_max)
    z = imf_cdf(m_hi, **kw)
    return lp - jnp.log(jnp.maximum(z, 1e-12)), m


def log_likelihood_star(obs: Observables, mag, mag_err, plx, plx_err, zp, floor):
    """Gaussian log likelihood of one star's photometry and parallax (NaN = missing)."""
    ok_m = jnp.isfinite(mag) & jnp.isfinite(mag_err)
    var = jnp.where(ok_m, mag_err, 1.0) ** 2 + floor ** 2
    r = jnp.where(ok_m, mag, 0.0) - obs.mags
    ll = jnp.sum(jnp.where(ok_m, -0.5 * (r * r / var + jnp.log(var) + _LOG_2PI), 0.0))
    ok_p = jnp.isfinite(plx) & jnp.isfinite(plx_err) & (plx_err > 0)
    pv = jnp.where(ok_p, plx_err, 1.0) ** 2
    rp = jnp.where(ok_p, plx, 0.0) - (obs.parallax_mas + zp)
    ll += jnp.where(ok_p, -0.5 * (rp * rp / pv + jnp.log(pv) + _LOG_2PI), 0.0)
    return ll


def log_density_star(star: dict, popv: dict, data_i, grid: ModelGrid, config: ModelConfig,
                     priors: Priors):
    """log p(theta_i | phi) + log p(D_i | theta_i) for one star (non-centred z's included)."""
    eep, log_age, feh, dist, av, ok = star_values(star, popv, config, grid)
    obs = star_observables(grid, config, eep, log_age, feh, dist, av)
    lp_mass, _ = _log_mass_prior(grid, config, priors, eep, log_age, feh)
    lz = sum(-0.5 * star[k] ** 2 for k in ("z_age", "z_feh", "z_dist", "z_av") if k in star)
    mag, mag_err, plx, plx_err = data_i
    ll = log_likelihood_star(obs, mag, mag_err, plx, plx_err, popv["parallax_zp_mas"],
                             priors.mag_floor)
    total = lp_mass + lz + ll
    return jnp.where(obs.valid & ok & jnp.isfinite(total), total, -jnp.inf)


def log_density(position: dict, data: StarData, grid: ModelGrid, config: ModelConfig,
                priors: Priors):
    """The joint log density (up to a constant) at an unconstrained ``position``.

    ``position = {"pop": {...}, "star": {"s": (N,), "z_age": (N,), ...}}``; see
    :func:`clusterhbm.fit.initial_position` for the keys present under each config.
    """
    popv = population_values(position["pop"], config, priors)
    lp = log_prior_population(position["pop"], config, priors, grid)
    per_star = jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
        position["star"], popv, tuple(data), grid, config, priors)
    return lp + jnp.sum(per_star)


def make_logdensity_fn(data: StarData, grid: ModelGrid, config: ModelConfig,
                       priors: Priors | None = None):
    """``logdensity_fn(position)`` for BlackJAX, closing over data, grid and priors."""
    priors = Priors() if priors is None else priors

    def logdensity_fn(position):
        return log_density(position, data, grid, config, priors)

    return logdensity_fn


def pop_position_keys(config: ModelConfig) -> tuple:
    """Keys of ``position["pop"]`` for a config."""
    keys = []
    if config.pooled:
        keys += ["log_age", "feh", "ln_distance_pc", "av_raw"]
        keys += ["ln_" + n for n, on in zip(WIDTH_PARAMS, config.fit_widths) if on]
    if config.fit_parallax_zp:
        keys.append("parallax_zp_mas")
    return tuple(keys)


def star_position_keys(config: ModelConfig) -> tuple:
    """Keys of ``position["star"]`` for a config."""
    fw = config.fit_widths if config.pooled else (True, True, True, True)
    return ("s",) + tuple(k for k, on in zip(("z_age", "z_feh", "z_dist", "z_av"), fw) if on)


def pop_to_unconstrained(values: dict, config: ModelConfig) -> dict:
    """Inverse of :func:`population_values` for initialisation (physical -> position)."""
    out = {}
    if config.pooled:
        out["log_age"] = jnp.asarray(values["log_age"], float)
        out["feh"] = jnp.asarray(values["feh"], float)
        out["ln_distance_pc"] = jnp.log(jnp.asarray(values["distance_pc"], float))
        av = jnp.maximum(jnp.asarray(values["av_mag"], float), 0.02)
        out["av_raw"] = _AV_SCALE * _softplus_inv(av / _AV_SCALE)
        for n, on in zip(WIDTH_PARAMS, config.fit_widths):
            if on:
                out["ln_" + n] = jnp.log(jnp.asarray(values[n], float))
    if config.fit_parallax_zp:
        out["parallax_zp_mas"] = jnp.asarray(values.get("parallax_zp_mas", 0.0), float)
    return out
