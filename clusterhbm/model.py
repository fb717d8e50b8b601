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
from .isochrone import (
    eep_from_mass,
    eep_range,
    interp_eep,
    isochrone_table,
    table_eep_from_mass,
    table_eep_range,
    table_interp,
)
from .photometry import Observables, bc_slice, photometry

__all__ = [
    "POP_PARAMS",
    "WIDTH_PARAMS",
    "ModelConfig",
    "Priors",
    "StarData",
    "StarTerms",
    "log_density",
    "log_p_detect",
    "make_logdensity_fn",
    "member_probabilities",
    "population_state",
    "population_values",
    "shared_bc",
    "shared_isochrone",
    "star_observables",
    "star_terms",
    "star_values",
    "width_from_position",
    "width_key",
    "width_to_position",
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
    binaries : unresolved binaries: a latent mass ratio q per star, the single/binary choice
        marginalised per star, the binary fraction ``f_bin`` fitted
    field : a field/outlier mixture component, the field fraction ``f_field`` fitted
    selection : the magnitude limits ``Priors.g_lim``/``g_bright`` normalise the member
        density (the completeness term)
    fit_mf_slope : the mass function is a power law dN/dm ∝ m^-mf_slope over
        ``[m_min, m_max]`` with the slope fitted (overrides ``imf``)
    signed_widths : the fitted widths' coordinate: ``False``, ``ln sigma`` (position keys
        ``ln_sigma_*``); ``True``, a signed width ``s`` with ``sigma = |s|`` (keys
        ``signed_sigma_*``; the marginal model only, whose density depends on each width
        through its square, so is even and smooth in ``s``: no exponential tail towards
        ``sigma = 0`` as in ``ln sigma``; see :func:`width_key`)
    """

    band_idx: tuple = (0, 1, 2)
    pooled: bool = True
    fit_widths: tuple = (True, True, True, True)
    cubic: bool = False
    fit_parallax_zp: bool = False
    imf: str = "kroupa"
    pseudo_mass_eps: float = 3e-3
    binaries: bool = False
    field: bool = False
    selection: bool = False
    fit_mf_slope: bool = False
    signed_widths: bool = False


def width_key(name: str, config: ModelConfig) -> str:
    """The position key of width ``name`` (one of :data:`WIDTH_PARAMS`) under ``config``."""
    return ("signed_" if config.signed_widths else "ln_") + name


def width_from_position(x, config: ModelConfig):
    """The width from its position coordinate (``|s|`` or ``exp(ln sigma)``)."""
    return jnp.abs(x) if config.signed_widths else jnp.exp(x)


def width_to_position(sigma, config: ModelConfig):
    """Inverse of :func:`width_from_position` (the positive branch for a signed width)."""
    sigma = jnp.asarray(sigma, float)
    return sigma if config.signed_widths else jnp.log(sigma)


class Priors(NamedTuple):
    """Hyperpriors and fixed numbers (all traced: changing them does not recompile).

    Units as in the names. ``*_scale`` are HalfNormal scales of the widths;
    ``sigma_distance_frac_scale`` scales the distance width relative to the distance.
    ``unpooled_*`` are the broad fixed population values of the unpooled model.

    Mixture and selection (used when switched on in :class:`ModelConfig`): ``q_min`` is the
    lower end of the uniform mass-ratio prior; ``f_bin`` ~ Beta(f_bin_a, f_bin_b) and
    ``f_field`` ~ Beta(f_field_a, f_field_b); ``g_lim``/``g_bright`` are the faint and bright
    G limits of the catalogue, ``selection_width_mag`` the softness of the cut;
    ``mf_slope`` ~ Normal(mf_slope_mean, mf_slope_sd); the field parallax distribution is
    Normal(field_parallax_mas, field_parallax_sd_mas) with a Normal(field_parallax_mean_mas,
    field_parallax_mean_sd_mas) prior on its mean and a HalfNormal(field_parallax_sd_scale_mas)
    prior on its sd.
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
    q_min: float = 0.1
    f_bin_a: float = 1.0
    f_bin_b: float = 1.0
    f_field_a: float = 1.0
    f_field_b: float = 1.0
    g_lim: float = 21.0
    g_bright: float = -5.0
    selection_width_mag: float = 0.05
    mf_slope_mean: float = 2.35
    mf_slope_sd: float = 1.0
    field_parallax_mean_mas: float = 1.0
    field_parallax_mean_sd_mas: float = 5.0
    field_parallax_sd_scale_mas: float = 3.0


class StarData(NamedTuple):
    """Observations of N stars in B bands (NaN entries are masked, not used).

    mag, mag_err : (N, B) apparent magnitude and its error [mag]
    parallax_mas, parallax_err_mas : (N,)
    log_field_mag : (N,) log density of each star's photometry under the field component
        (see :func:`clusterhbm.field.field_photometry_log_density`; used with
        ``ModelConfig.field``)
    log_member_odds : (N,) prior log odds of membership from astrometry (0: neutral; see
        :func:`clusterhbm.field.member_log_odds`)
    """

    mag: jax.Array
    mag_err: jax.Array
    parallax_mas: jax.Array
    parallax_err_mas: jax.Array
    log_field_mag: jax.Array | None = None
    log_member_odds: jax.Array | None = None


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
            out[name] = (width_from_position(pop[width_key(name, config)], config) if on
                         else jnp.zeros_like(pop["feh"]))
    out["parallax_zp_mas"] = (pop["parallax_zp_mas"] if config.fit_parallax_zp
                              else jnp.asarray(priors.parallax_zp_mas, out["feh"].dtype))
    if config.binaries:
        out["f_bin"] = jax.nn.sigmoid(pop["logit_f_bin"])
    if config.field:
        out["f_field"] = jax.nn.sigmoid(pop["logit_f_field"])
        out["field_parallax_mas"] = pop["field_parallax_mas"]
        out["field_parallax_sd_mas"] = jnp.exp(pop["ln_field_parallax_sd_mas"])
    if config.fit_mf_slope:
        out["mf_slope"] = pop["mf_slope"]
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
            if not on:
                continue
            x = pop[width_key(name, config)]
            if config.signed_widths:
                # half of the HalfNormal density at |s| on each side (no Jacobian)
                lp += _log_halfnormal(x, scale) - jnp.log(2.0)
            else:
                lp += _log_halfnormal(jnp.exp(x), scale) + x
        lp = jnp.where(ok, lp, -jnp.inf)
    if config.fit_parallax_zp:
        lp += -0.5 * ((pop["parallax_zp_mas"] - priors.parallax_zp_mas)
                      / priors.parallax_zp_sd_mas) ** 2
    # fractions: Beta(a, b) on f = sigmoid(x), Jacobian f (1 - f) included
    if config.binaries:
        x = pop["logit_f_bin"]
        lp += priors.f_bin_a * jax.nn.log_sigmoid(x) + priors.f_bin_b * jax.nn.log_sigmoid(-x)
    if config.field:
        x = pop["logit_f_field"]
        lp += (priors.f_field_a * jax.nn.log_sigmoid(x)
               + priors.f_field_b * jax.nn.log_sigmoid(-x))
        lp += -0.5 * ((pop["field_parallax_mas"] - priors.field_parallax_mean_mas)
                      / priors.field_parallax_mean_sd_mas) ** 2
        ls = pop["ln_field_parallax_sd_mas"]
        lp += _log_halfnormal(jnp.exp(ls), priors.field_parallax_sd_scale_mas) + ls
    if config.fit_mf_slope:
        lp += -0.5 * ((pop["mf_slope"] - priors.mf_slope_mean) / priors.mf_slope_sd) ** 2
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
    table = popv.get("iso_table")
    if table is not None:
        eep, ok = table_eep_from_mass(table, star["s"], eps=config.pseudo_mass_eps,
                                      cubic=config.cubic)
    else:
        eep, ok = eep_from_mass(grid.iso, star["s"], log_age, feh, cubic=config.cubic,
                                eps=config.pseudo_mass_eps)
    return eep, log_age, feh, dist, av, ok


def shared_isochrone(config: ModelConfig) -> bool:
    """Whether every star shares one isochrone (age and [Fe/H] widths zero): then it is
    interpolated once per evaluation (:class:`~clusterhbm.isochrone.IsochroneTable`) and
    each star needs only 1-D look-ups. The density is the same either way (to float
    rounding), in both schemes."""
    return config.pooled and not any(config.fit_widths[:2])


def shared_bc(config: ModelConfig) -> bool:
    """Whether every star shares [Fe/H] and A_V (their widths zero): then the BC table is
    sliced at them once per evaluation (:class:`~clusterhbm.photometry.BCSlice`) and each
    star needs a 2-D look-up in (Teff, log g). The density is the same either way (to
    float rounding), in both schemes."""
    return config.pooled and not config.fit_widths[1] and not config.fit_widths[3]


def star_observables(grid: ModelGrid, config: ModelConfig, eep, log_age, feh, dist,
                     av, table=None, bcs=None) -> Observables:
    """The forward model of one star at its (EEP, age, [Fe/H], distance, A_V).

    ``table``: the shared isochrone (see :func:`shared_isochrone`), if any; ``bcs``: the
    shared BC slice (see :func:`shared_bc`), if any.
    """
    if table is not None:
        props = table_interp(table, eep, cubic=config.cubic)
    else:
        props = interp_eep(grid.iso, eep, log_age, feh, cubic=config.cubic)
    return photometry(grid.bc, props, feh, dist, av, config.band_idx, cubic=config.cubic,
                      bcs=bcs)


def _imf_kwargs(config, priors, popv):
    """Keyword arguments of the mass prior (the fitted slope when ``fit_mf_slope``)."""
    if config.fit_mf_slope:
        return {"kind": "powerlaw", "m_min": priors.m_min, "m_max": priors.m_max,
                "alpha": popv["mf_slope"]}
    return {"kind": config.imf, "m_min": priors.m_min, "m_max": priors.m_max,
            "alpha": priors.imf_alpha}


def _log_mass_prior(grid, config, priors, popv, eep, log_age, feh):
    """log IMF(m) + log(m' / (m' + eps)) - log Z(age, feh), and the mass (m' = dm/dEEP)."""

    table = popv.get("iso_table")

    def mass_of(e):
        if table is not None:
            return table_interp(table, e, cubic=config.cubic).initial_mass
        return interp_eep(grid.iso, e, log_age, feh, cubic=config.cubic,
                          columns=(COL_INITIAL_MASS,)).initial_mass

    m, dm = jax.jvp(mass_of, (eep,), (jnp.ones_like(eep),))
    kw = _imf_kwargs(config, priors, popv)
    dm = jnp.maximum(dm, 0.0)
    eps = config.pseudo_mass_eps
    lp = log_imf(m, **kw) + jnp.log(jnp.maximum(dm, 1e-12) / (dm + eps))
    # Z: IMF mass of the stars alive in the grid at this (age, feh)
    _, e_hi = (table_eep_range(table) if table is not None
               else eep_range(grid.iso, log_age, feh))
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


def _add_mags(m1, m2, lit2):
    """Magnitudes of an unresolved pair (the secondary adds no light where not ``lit2``)."""
    f2 = jnp.where(lit2, 10.0 ** (-0.4 * (m2 - m1)), 0.0)
    return m1 - 2.5 * jnp.log10(1.0 + f2)


def _log_normal_parallax(plx, plx_err, mean, sd):
    ok = jnp.isfinite(plx) & jnp.isfinite(plx_err) & (plx_err > 0)
    var = jnp.where(ok, plx_err, 1.0) ** 2 + sd ** 2
    r = jnp.where(ok, plx, 0.0) - mean
    return jnp.where(ok, -0.5 * (r * r / var + jnp.log(var) + _LOG_2PI), 0.0)


class StarTerms(NamedTuple):
    """The pieces of one star's log density (see :func:`star_terms`).

    log_prior : log p(theta_i | phi) (mass prior, z's, q)
    ll_single, ll_binary : log likelihood as a single star / as an unresolved binary
    ll_member : log of the member likelihood (binaries marginalised), divided by the
        detection probability when ``selection``
    ll_field : log likelihood under the field component (0 without ``field``)
    log_w_member, log_w_field : log prior weights of the two components
    valid : theta_i inside the grid
    q : mass ratio (0 without ``binaries``)
    """

    log_prior: jax.Array
    ll_single: jax.Array
    ll_binary: jax.Array
    ll_member: jax.Array
    ll_field: jax.Array
    log_w_member: jax.Array
    log_w_field: jax.Array
    valid: jax.Array
    q: jax.Array


def field_terms(popv: dict, data_i, config: ModelConfig, zero):
    """(ll_field, log_w_member, log_w_field) of one star: its field likelihood (photometry
    ``data_i[4]``, parallax) and the two components' log prior weights (the population's
    field fraction times the star's astrometric odds ``data_i[5]``, if any); without
    ``field``, (0, 0, -inf). ``zero``: a zero of the result's shape and dtype."""
    if not config.field:
        return zero, zero, jnp.full_like(zero, -jnp.inf)
    plx, plx_err = data_i[2], data_i[3]
    ll_f = data_i[4] + _log_normal_parallax(plx, plx_err, popv["field_parallax_mas"],
                                            popv["field_parallax_sd_mas"])
    odds = jnp.log1p(-popv["f_field"]) - jnp.log(popv["f_field"])
    if len(data_i) > 5 and data_i[5] is not None:
        odds = odds + data_i[5]
    return ll_f, jax.nn.log_sigmoid(odds), jax.nn.log_sigmoid(-odds)


def star_terms(star: dict, popv: dict, data_i, grid: ModelGrid, config: ModelConfig,
               priors: Priors) -> StarTerms:
    """The log-density pieces of one star (pure; vmap over stars)."""
    eep, log_age, feh, dist, av, ok = star_values(star, popv, config, grid)
    table, bcs = popv.get("iso_table"), popv.get("bc_slice")
    obs = star_observables(grid, config, eep, log_age, feh, dist, av, table, bcs)
    lp_mass, m1 = _log_mass_prior(grid, config, priors, popv, eep, log_age, feh)
    lz = sum(-0.5 * star[k] ** 2 for k in ("z_age", "z_feh", "z_dist", "z_av") if k in star)
    mag, mag_err, plx, plx_err = data_i[:4]
    zp = popv["parallax_zp_mas"]
    ll_s = log_likelihood_star(obs, mag, mag_err, plx, plx_err, zp, priors.mag_floor)
    zero = jnp.zeros_like(ll_s)
    log_prior = lp_mass + lz
    ll_b, q = zero, zero
    ll_m = ll_s
    if config.binaries:
        x = star["q_raw"]
        q = priors.q_min + (1.0 - priors.q_min) * jax.nn.sigmoid(x)
        log_prior += jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x)  # uniform q
        if table is not None:
            eep2, ok2 = table_eep_from_mass(table, q * m1, cubic=config.cubic)
        else:
            eep2, ok2 = eep_from_mass(grid.iso, q * m1, log_age, feh, cubic=config.cubic)
        obs2 = star_observables(grid, config, eep2, log_age, feh, dist, av, table, bcs)
        lit2 = ok2 & obs2.valid
        obs_b = obs._replace(mags=_add_mags(obs.mags, obs2.mags, lit2))
        ll_b = log_likelihood_star(obs_b, mag, mag_err, plx, plx_err, zp, priors.mag_floor)
        f = popv["f_bin"]
        ll_m = jnp.logaddexp(jnp.log1p(-f) + ll_s, jnp.log(f) + ll_b)
    if config.selection:
        ll_m = ll_m - popv["log_p_detect"]
    ll_f, lw_m, lw_f = field_terms(popv, data_i, config, zero)
    valid = obs.valid & ok & jnp.isfinite(log_prior)
    return StarTerms(log_prior, ll_s, ll_b, ll_m, ll_f, lw_m, lw_f, valid, q)


def log_density_star(star: dict, popv: dict, data_i, grid: ModelGrid, config: ModelConfig,
                     priors: Priors):
    """log p(theta_i | phi) + log p(D_i | theta_i) for one star (non-centred z's included).

    With the field component, p(D_i | theta_i) is the mixture
    w_member L_member(theta_i) + w_field L_field (theta_i's prior is proper, so integrating
    theta_i out leaves the usual mixture of marginal likelihoods).
    """
    t = star_terms(star, popv, data_i, grid, config, priors)
    ll = t.ll_member
    if config.field:
        # where the member term is -inf (e.g. a star far off the isochrone in float32) the
        # field term carries the star; logaddexp is safe for one -inf argument
        ll = jnp.logaddexp(t.log_w_member + t.ll_member, t.log_w_field + t.ll_field)
    total = t.log_prior + ll
    return jnp.where(t.valid & jnp.isfinite(total), total, -jnp.inf)


def member_probabilities(t: StarTerms, config: ModelConfig, popv: dict):
    """Per-draw (p_member, p_binary | member) of one star from its :class:`StarTerms`."""
    p_mem = jnp.ones_like(t.ll_single)
    if config.field:
        a = t.log_w_member + t.ll_member
        p_mem = jnp.exp(a - jnp.logaddexp(a, t.log_w_field + t.ll_field))
    p_bin = jnp.zeros_like(t.ll_single)
    if config.binaries:
        f = popv["f_bin"]
        a = jnp.log(f) + t.ll_binary
        p_bin = jnp.exp(a - jnp.logaddexp(a, jnp.log1p(-f) + t.ll_single))
    return p_mem, p_bin


def _mean_ndtr(x0, x1):
    """The mean of Phi(x) for x running linearly from x0 to x1, exactly: with
    psi(x) = x Phi(x) + phi(x) (psi' = Phi) it is (psi(x1) - psi(x0)) / (x1 - x0). psi is
    split as max(x, 0) plus a bounded remainder, so that float32 keeps the remainder's
    precision however far the segment is from the cut."""

    def rest(x):  # psi(x) - max(x, 0), in (0, 0.4]
        pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327
        return jnp.where(x > 0, pdf - x * ndtr(-x), pdf + x * ndtr(x))

    dx = x1 - x0
    small = jnp.abs(dx) < 1e-3
    safe = jnp.where(small, 1.0, dx)
    exact = (jnp.maximum(x1, 0.0) - jnp.maximum(x0, 0.0) + rest(x1) - rest(x0)) / safe
    return jnp.where(small, ndtr(0.5 * (x0 + x1)), exact)


def segment_selection(g, g_lim, g_bright, width):
    """(..., K - 1) mean of the soft selection S(G) = Phi((g_lim - G) / w)
    Phi((G - g_bright) / w) along the chords between consecutive node magnitudes ``g``
    (..., K), in closed form (G linear along each chord). The product is taken as
    Phi(a) + Phi(b) - 1, exact to (1 - Phi(a)) (1 - Phi(b)), i.e. whenever the limits are
    many widths apart."""
    a = _mean_ndtr((g_lim - g[..., :-1]) / width, (g_lim - g[..., 1:]) / width)
    b = _mean_ndtr((g[..., :-1] - g_bright) / width, (g[..., 1:] - g_bright) / width)
    return jnp.clip(a + b - 1.0, 0.0, 1.0)


def log_p_detect(popv: dict, grid: ModelGrid, config: ModelConfig, priors: Priors,
                 n_q: int = 8):
    """log P(detected | member, phi): the completeness term of the member density.

    P = integral IMF(m) S(G(m)) dm / integral IMF(m) dm over the masses alive at the
    population's mean (log age, [Fe/H]), distance and A_V (the denominator in closed form,
    from m_min to the last node's mass, like the mass prior's Z), with
    S(G) = Phi((g_lim - G) / w) Phi((G - g_bright) / w), summed over the chords between
    the isochrone's EEP nodes (exact node masses, no inversion): each chord carries the
    IMF mass of its trapezoid and the mean of S along it in closed form
    (:func:`segment_selection`, G linear along the chord, as the marginal model's tracks
    are). A trapezoid of S itself at the nodes, used before, was wrong by up to 0.3 % with
    nodes ~0.05 mag apart against w = 0.05 mag, and the error oscillated with phi: times
    the N stars of the member term (-N log P) it moved a 500-star fit by 2.7 nats, 4 sd in
    log age (``scripts/likelihood_check.py``). With binaries, the binary term averages S
    over ``n_q`` mid-point mass ratios, the secondary's G interpolated in mass along the
    same nodes. Widths are neglected here (the normaliser is evaluated at
    the population means), a good approximation when the widths are small against the
    distance from the limit. The isochrone and the bolometric corrections use the model's
    scheme (``config.cubic``), so in the cubic scheme P is C1 in (log age, [Fe/H], A_V)
    like the rest of the density; the shared isochrone table and BC slice are reused when
    the population state has them.
    """
    la, fe, av = popv["log_age"], popv["feh"], popv["av_mag"]
    table = popv.get("iso_table")
    if table is None:
        table = isochrone_table(grid.iso, la, fe, cubic=config.cubic)
    bcs = popv.get("bc_slice")
    if bcs is None:
        bcs = bc_slice(grid.bc, fe, av, config.band_idx, cubic=config.cubic)
    lo, hi = table_eep_range(table)
    eeps = jnp.clip(grid.iso.eep, lo, hi)  # the range's ends as nodes (continuous in phi)
    props = jax.vmap(lambda e: table_interp(table, e, cubic=config.cubic))(eeps)
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, fe, popv["distance_pc"], av,
                                         config.band_idx, cubic=config.cubic,
                                         bcs=bcs))(props)
    g = obs.mags[:, 0]
    inside = (eeps >= lo) & (eeps <= hi) & obs.valid
    m = jnp.where(inside, props.initial_mass, 0.0)
    kw = _imf_kwargs(config, priors, popv)
    f_imf = jnp.where(inside, jnp.exp(log_imf(jnp.maximum(m, priors.m_min), **kw)), 0.0)
    w = priors.selection_width_mag

    def sel(gg):  # (..., K) node G -> (..., K - 1) mean S along each chord
        return segment_selection(gg, priors.g_lim, priors.g_bright, w)

    s_single = sel(jnp.where(inside, g, 99.0))
    if config.binaries:
        qs = priors.q_min + (1.0 - priors.q_min) * (jnp.arange(n_q) + 0.5) / n_q
        m_sorted = jnp.where(inside, m, jnp.where(eeps < lo, -1.0, 1e3))
        g2 = jnp.interp(qs[:, None] * m[None, :], m_sorted, jnp.where(inside, g, 99.0),
                        left=99.0, right=99.0)
        lit = (qs[:, None] * m[None, :]) >= jnp.min(jnp.where(inside, m, 1e3))
        gb = _add_mags(g[None, :], g2, lit)
        s_bin = jnp.mean(sel(jnp.where(inside[None, :], gb, 99.0)), axis=0)
        f = popv["f_bin"]
        s_tot = (1.0 - f) * s_single + f * s_bin
    else:
        s_tot = s_single
    dm = jnp.where(inside[1:] & inside[:-1], m[1:] - m[:-1], 0.0)
    num = jnp.sum(0.5 * (f_imf[1:] + f_imf[:-1]) * s_tot * dm)
    # the denominator is the IMF mass alive, m_min .. the last node's mass, in closed form
    # (as the mass prior's Z): a trapezoid over the inside nodes jumped by ~4% where the
    # first inside node changes, at every grid age (the stars there are undetected)
    m_hi = jnp.clip(jnp.max(jnp.where(inside, m, 0.0)), priors.m_min * 1.0001, priors.m_max)
    den = imf_cdf(m_hi, **kw)
    return jnp.log(jnp.maximum(num, 1e-30)) - jnp.log(jnp.maximum(den, 1e-30))


def population_state(pop: dict, config: ModelConfig, priors: Priors, grid: ModelGrid):
    """:func:`population_values` plus what every star shares (the detection probability)."""
    popv = population_values(pop, config, priors)
    if shared_isochrone(config):
        popv["iso_table"] = isochrone_table(grid.iso, popv["log_age"], popv["feh"],
                                            cubic=config.cubic)
    if shared_bc(config):
        popv["bc_slice"] = bc_slice(grid.bc, popv["feh"], popv["av_mag"], config.band_idx,
                                    cubic=config.cubic)
    if config.selection:
        if not config.pooled:
            raise ValueError("the selection function needs the pooled model")
        popv["log_p_detect"] = log_p_detect(popv, grid, config, priors)
    return popv


def log_density(position: dict, data: StarData, grid: ModelGrid, config: ModelConfig,
                priors: Priors):
    """The joint log density (up to a constant) at an unconstrained ``position``.

    ``position = {"pop": {...}, "star": {"s": (N,), "z_age": (N,), ...}}``; see
    :func:`clusterhbm.fit.initial_position` for the keys present under each config.
    """
    popv = population_state(position["pop"], config, priors, grid)
    lp = log_prior_population(position["pop"], config, priors, grid)
    per_star = jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
        position["star"], popv, tuple(data), grid, config, priors)
    return lp + jnp.sum(per_star)


def make_logdensity_fn(data: StarData, grid: ModelGrid, config: ModelConfig,
                       priors: Priors | None = None):
    """``logdensity_fn(position)`` for BlackJAX, closing over data, grid and priors."""
    priors = Priors() if priors is None else priors
    if config.field and data.log_field_mag is None:
        raise ValueError("ModelConfig(field=True) needs StarData.log_field_mag (see "
                         "clusterhbm.field.field_photometry_log_density)")
    if config.signed_widths and config.pooled and any(config.fit_widths):
        # here each star's offset is sigma * z: (s, z) and (-s, -z) are two modes
        raise ValueError("ModelConfig(signed_widths=True) is for the marginal model "
                         "(clusterhbm.marginal); the per-star latent model samples ln sigma")

    def logdensity_fn(position):
        return log_density(position, data, grid, config, priors)

    return logdensity_fn


def pop_position_keys(config: ModelConfig) -> tuple:
    """Keys of ``position["pop"]`` for a config."""
    keys = []
    if config.pooled:
        keys += ["log_age", "feh", "ln_distance_pc", "av_raw"]
        keys += [width_key(n, config) for n, on in zip(WIDTH_PARAMS, config.fit_widths) if on]
    if config.fit_parallax_zp:
        keys.append("parallax_zp_mas")
    if config.binaries:
        keys.append("logit_f_bin")
    if config.field:
        keys += ["logit_f_field", "field_parallax_mas", "ln_field_parallax_sd_mas"]
    if config.fit_mf_slope:
        keys.append("mf_slope")
    return tuple(keys)


def star_position_keys(config: ModelConfig) -> tuple:
    """Keys of ``position["star"]`` for a config."""
    fw = config.fit_widths if config.pooled else (True, True, True, True)
    keys = ("s",) + tuple(k for k, on in zip(("z_age", "z_feh", "z_dist", "z_av"), fw) if on)
    return keys + (("q_raw",) if config.binaries else ())


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
                out[width_key(n, config)] = width_to_position(values[n], config)
    if config.fit_parallax_zp:
        out["parallax_zp_mas"] = jnp.asarray(values.get("parallax_zp_mas", 0.0), float)

    def logit(p):
        p = jnp.asarray(p, float)
        return jnp.log(p) - jnp.log1p(-p)

    if config.binaries:
        out["logit_f_bin"] = logit(values.get("f_bin", 0.3))
    if config.field:
        out["logit_f_field"] = logit(values.get("f_field", 0.1))
        out["field_parallax_mas"] = jnp.asarray(values.get("field_parallax_mas", 1.0), float)
        out["ln_field_parallax_sd_mas"] = jnp.log(jnp.asarray(
            values.get("field_parallax_sd_mas", 1.0), float))
    if config.fit_mf_slope:
        out["mf_slope"] = jnp.asarray(values.get("mf_slope", 2.35), float)
    return out
