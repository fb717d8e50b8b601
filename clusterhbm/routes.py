"""Three inference routes for a star cluster, built on :mod:`clusterhbm.hbm`.

joint
    NUTS on the whole hierarchical model (population and every star), as
    :func:`clusterhbm.fit.fit_cluster` does: :func:`fit_joint`.
reweight
    Fit every star independently under the broad interim prior of the unpooled model
    (:func:`fit_unpooled`), then infer the population by importance re-weighting of those
    samples (:func:`fit_reweighted`).
gibbs
    Metropolis-within-Gibbs: every star given the population (vmapped HMC), then the
    population given the stars (NUTS): :func:`fit_gibbs`.

Re-weighting in physical coordinates
------------------------------------
A star's latent values are theta_i = (s_i, log_age_i, feh_i, distance_i, A_V,i) with
s the pseudo-mass of :mod:`clusterhbm.model`. Its population density (pooled model,
centred form) and its interim prior (unpooled model) are

    p(theta_i | phi) = p_IMF(s_i | log_age_i, feh_i) N(log_age_i | phi) N(feh_i | phi)
                       N(distance_i | phi) TruncN(A_V,i | phi)
    p0(theta_i)      = p_IMF(s_i | log_age_i, feh_i) N(log_age_i | 9.0, 1.0) N(feh_i | 0, 0.5)
                       N(distance_i | d0, 0.5 d0) TruncN(A_V,i | 0.3, 1.0)

(the ``Priors.unpooled_*`` values; d0 is the starting distance). The mass prior, IMF
carried to s and normalised over the stars alive at the star's own (age, [Fe/H]), is the
same factor in both, so it cancels from the weights: only (log_age_i, feh_i, distance_i,
A_V,i) of each sample are needed, and both densities are written in those coordinates
(:func:`population_log_density`, :func:`interim_log_prior`). The interim prior is
truncated to the grid in log age and [Fe/H]; that constant factor does not depend on phi.

Re-weighting needs every population width to be fitted (a zero width is a delta
function: no sample of a star ever has exactly the cluster's age). When the true width is
zero the fitted width is driven towards zero and the weights of each star collapse onto
its one or two samples nearest the cluster value: :func:`neff_versus_width` shows that
limit, and :func:`fit_reweighted` reports n_eff and warns. Measured on a 30-star
M67-like mock (zero true widths, K = 600 samples per star; ``scripts/compare_routes.py``):
with the means at the truth and widths of 0.05 dex in age and [Fe/H], 17 pc and 0.05 mag,
the median star keeps n_eff = 2.2 (worst 1.0), and 1.0 at 0.3x those widths. The
re-weighted posterior then sits where the estimator still works: spurious widths
(sigma_log_age 0.13 +- 0.04 dex) and shifted means ([Fe/H] -0.20 against -0.02 from joint
NUTS, 3.8 combined sd; A_V 0.33 against 0.10 mag), with every star below n_eff = 10 at
some posterior draw.

Gibbs parametrisations
----------------------
``"noncentred"`` (default) uses the model's own coordinates (per star s and the z's); a
population move at fixed s and z moves every star with phi, exact but coupled (with s
held fixed the conditional sd of log age is ~30x smaller than its marginal sd, see
``docs/performance.md``), so log age has a long autocorrelation per sweep; sweeps are
cheap, though. ``"centred"`` uses the physical per-star values (s, log_age_i, feh_i,
distance_i, A_V,i); the population update then only sees Normal densities (cheap, no
forward model) but needs every width fitted, and it sticks when the widths approach zero
(the centred funnel). Measured on a 30-star M67-like mock with zero true widths and all
four widths fitted (``scripts/compare_routes.py --parametrisation-study``, 2 chains, 1000
sweeps): centred Gibbs froze the population (distance sd 0.19 pc against 4.6 pc from
joint NUTS, [Fe/H] 0.10 dex off the joint mean), non-centred Gibbs agreed with joint NUTS
on the means within 0.4 combined sd. Hence non-centred is the default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr, ndtri

from .diagnostics import ess_bulk, ess_tail, split_rhat, summarize
from .fit import (
    _optimise,
    curvature_inverse_metric,
    derived_quantities,
    initial_guess,
    initial_positions,
    prepare_data,
    width_flags,
)
from .grid import ModelGrid, band_indices, load_grid
from .hbm import (
    effective_sample_size,
    log_importance_weights,
    reweighted_population_nuts,
    run_gibbs,
)
from .model import (
    POP_PARAMS,
    WIDTH_PARAMS,
    ModelConfig,
    Priors,
    StarData,
    log_density_star,
    log_prior_population,
    make_logdensity_fn,
    pop_to_unconstrained,
    population_values,
    star_values,
)
from .sampling import run_nuts

try:  # population values plus what all stars share (selection term), when the model has it
    from .model import population_state
except ImportError:  # pragma: no cover - older model.py
    def population_state(pop, config, priors, grid):
        return population_values(pop, config, priors)

__all__ = [
    "ROUTES",
    "ClusterProblem",
    "GibbsParts",
    "RouteResult",
    "UnpooledSamples",
    "compare_routes",
    "fit_gibbs",
    "fit_joint",
    "fit_reweighted",
    "fit_unpooled",
    "gibbs_parts",
    "interim_log_prior",
    "neff_versus_width",
    "population_log_density",
    "prepare_problem",
]

log = logging.getLogger(__name__)

ROUTES = ("joint", "reweight", "gibbs")
#: per-star physical coordinates used by the re-weighting route
STAR_PHYS = ("log_age", "feh", "distance_pc", "av_mag")
_LOG_2PI = 1.8378770664093453
_ALL_WIDTHS = (True, True, True, True)


class ClusterProblem(NamedTuple):
    """A cluster catalogue made ready for every route.

    data : StarData; grid : ModelGrid; config : ModelConfig of the pooled model;
    priors : Priors (``unpooled_distance_pc`` set from the starting distance, as
    :func:`clusterhbm.fit.fit_cluster` does); guess : starting population values
    (physical units); start : an optimised position ``{"pop", "star"}`` of the pooled
    model (widths held at their starting values); eep0 : (N,) starting EEPs;
    truth : optional true population values.
    """

    data: StarData
    grid: ModelGrid
    config: ModelConfig
    priors: Priors
    guess: dict
    start: dict
    eep0: np.ndarray
    truth: dict | None


class RouteResult(NamedTuple):
    """The outcome of one route (host NumPy arrays).

    route : "joint", "reweight", "gibbs" (or "gibbs-centred")
    population : name -> (C, S) draws of the population in physical units
    stars : name -> (C, S, N) per-star draws in physical units (or (1, D, N) for the
        re-weighted route's shrunk stars)
    timings : dict of seconds; ``wall_s`` is the route's whole cost (for re-weighting it
        includes the unpooled fit)
    extra : route-specific numbers (acceptance, step sizes, n_eff, ...)
    """

    route: str
    population: dict
    stars: dict
    timings: dict
    extra: dict

    def summary(self) -> dict:
        """:func:`clusterhbm.diagnostics.summarize` of the population draws."""
        return summarize(self.population)

    def ess_per_second(self, *, which: str = "wall_s") -> dict:
        """min(bulk, tail) ESS per second of ``timings[which]`` for each parameter."""
        t = float(self.timings[which])
        out = {}
        for k, v in self.population.items():
            e = min(float(ess_bulk(v)), float(ess_tail(v)))
            out[k] = e / t if t > 0 else float("nan")
        return out


class UnpooledSamples(NamedTuple):
    """Per-star samples of the unpooled (independent-star) fit, for re-weighting.

    theta : dict of (N, K) per-star log_age, feh, distance_pc, av_mag
    log_p0 : (N, K) interim log prior of those samples (:func:`interim_log_prior`)
    priors : the Priors whose ``unpooled_*`` values define the interim prior
    stars : name -> (C, S, N) the same draws with chain and draw axes (and ``eep``)
    timings : dict of seconds; rhat_max : worst per-star split R-hat over the 4 values
    """

    theta: dict
    log_p0: np.ndarray
    priors: Priors
    stars: dict
    timings: dict
    rhat_max: float


# --------------------------------------------------------------------------------------
# problem set-up


def prepare_problem(catalogue, *, fit_widths=False, grid: ModelGrid | None = None,
                    priors: Priors | None = None, init: dict | None = None,
                    seed: int = 0, optimise_steps: int = 300, truth: dict | None = None,
                    width_init: dict | None = None) -> ClusterProblem:
    """Validate a catalogue, find a starting point and build the pooled model's config.

    Parameters
    ----------
    catalogue : astropy Table (see :mod:`clusterhbm.catalogue`)
    fit_widths : bool or 4 bools (age, [Fe/H], distance, A_V)
    grid, priors, init : as :func:`clusterhbm.fit.fit_cluster`
    seed : for the starting jitter
    optimise_steps : Adam steps on the pooled log density from the isochrone-scan start
    truth : optional true population values, kept for tables
    width_init : starting widths (physical units) for the widths that are fitted
    """
    grid = load_grid() if grid is None else grid
    priors = Priors() if priors is None else priors
    fit_widths = width_flags(fit_widths)
    fd = prepare_data(catalogue)
    config = ModelConfig(band_idx=band_indices(fd.bands), pooled=True, fit_widths=fit_widths)
    guess, eep0 = initial_guess(fd.data, grid, config.band_idx, init=init)
    priors = priors._replace(unpooled_distance_pc=guess["distance_pc"],
                             unpooled_sigma_distance_pc=0.5 * guess["distance_pc"])
    pos = jax.tree.map(lambda x: x[0], initial_positions(
        jax.random.key(seed), guess, eep0, config, 1, grid=grid, jitter=0.0,
        width_init=width_init))
    if optimise_steps:
        pos, _ = _optimise(make_logdensity_fn(fd.data, grid, config, priors), pos,
                           num_steps=optimise_steps)
    return ClusterProblem(data=fd.data, grid=grid, config=config, priors=priors,
                          guess=guess, start=pos, eep0=np.asarray(eep0), truth=truth)


def _jitter(key, pos, n_chains, scale=1e-3):
    """``n_chains`` copies of ``pos`` with independent Normal(0, scale) jitter."""
    leaves, treedef = jax.tree.flatten(pos)
    keys = jax.random.split(key, (len(leaves), n_chains))
    new = [x + scale * jax.vmap(lambda k, x=x: jax.random.normal(k, jnp.shape(x)))(ks)
           for x, ks in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, new)


def _pop_physical(pop, config, priors):
    popv = population_values(pop, config, priors)
    out = {k: popv[k] for k in POP_PARAMS}
    for k, on in zip(WIDTH_PARAMS, config.fit_widths):
        if on:
            out[k] = popv[k]
    return out


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# --------------------------------------------------------------------------------------
# joint


def fit_joint(problem: ClusterProblem, rng_key, *, num_chains: int = 4,
              num_warmup: int = 500, num_samples: int = 500,
              dense_mass_matrix: bool = True, **nuts_kwargs) -> RouteResult:
    """NUTS on the full hierarchical model (population and stars together)."""
    t0 = time.perf_counter()
    p = problem
    logdensity_fn = make_logdensity_fn(p.data, p.grid, p.config, p.priors)
    inits = _jitter(rng_key, p.start, num_chains)

    def transform(pos):
        d = derived_quantities(pos, p.grid, p.config, p.priors)
        return {"pop": _pop_physical(pos["pop"], p.config, p.priors), "star": d["star"]}

    # warm-up starts from the curvature at the start, as in fit_cluster
    nuts_kwargs.setdefault("initial_inverse_mass_matrix",
                           curvature_inverse_metric(logdensity_fn, p.start))
    out = run_nuts(jax.random.fold_in(rng_key, 1), logdensity_fn, inits,
                   num_warmup=num_warmup, num_samples=num_samples, transform_fn=transform,
                   diagonal_mass_matrix=not dense_mass_matrix, **nuts_kwargs)
    wall = time.perf_counter() - t0
    stars = _np(out.samples["star"])
    extra = {"num_divergent": int(np.sum(out.info["is_divergent"])),
             "steps_per_draw": float(np.mean(out.info["num_integration_steps"])),
             "step_size": np.asarray(out.step_size).tolist()}
    return RouteResult("joint", _np(out.samples["pop"]), stars,
                       dict(out.timings, wall_s=wall), extra)


# --------------------------------------------------------------------------------------
# re-weighting


def _log_normal(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - jnp.log(sd) - 0.5 * _LOG_2PI


def _log_truncnorm0(x, mu, sd):
    """log density of Normal(mu, sd) truncated to x >= 0."""
    return jnp.where(x >= 0, _log_normal(x, mu, sd) - log_ndtr(mu / sd), -jnp.inf)


def interim_log_prior(theta: dict, priors: Priors):
    """log p0 of per-star (log_age, feh, distance_pc, av_mag) under the unpooled priors.

    The IMF factor common to p0 and the population density is left out (it cancels).
    Any shape: the four arrays broadcast together.
    """
    return (_log_normal(theta["log_age"], priors.unpooled_log_age,
                        priors.unpooled_sigma_log_age)
            + _log_normal(theta["feh"], priors.unpooled_feh, priors.unpooled_sigma_feh)
            + _log_normal(theta["distance_pc"], priors.unpooled_distance_pc,
                          priors.unpooled_sigma_distance_pc)
            + _log_truncnorm0(theta["av_mag"], priors.unpooled_av_mag,
                              priors.unpooled_sigma_av_mag))


def population_log_density(theta: dict, popv: dict):
    """log p(theta_i | phi) of one star's (log_age, feh, distance_pc, av_mag) given the
    population values ``popv`` (physical units, from
    :func:`clusterhbm.model.population_values`), without the IMF factor (it cancels
    against :func:`interim_log_prior`)."""
    return (_log_normal(theta["log_age"], popv["log_age"], popv["sigma_log_age"])
            + _log_normal(theta["feh"], popv["feh"], popv["sigma_feh"])
            + _log_normal(theta["distance_pc"], popv["distance_pc"],
                          popv["sigma_distance_pc"])
            + _log_truncnorm0(theta["av_mag"], popv["av_mag"], popv["sigma_av_mag"]))


def _z_from_truncnorm(av, mu, sigma):
    """Inverse of the model's A_V = TruncNormal(mu, sigma) quantile map (for starts)."""
    p0 = ndtr(-mu / sigma)
    u = (ndtr((av - mu) / sigma) - p0) / (1.0 - p0)
    return ndtri(jnp.clip(u, 1e-6, 1 - 1e-6))


def fit_unpooled(problem: ClusterProblem, rng_key, *, num_chains: int = 4,
                 num_warmup: int = 500, num_samples: int = 1000, method: str = "per_star",
                 kernel: str = "nuts", max_num_doublings: int = 8,
                 dense_mass_matrix: bool = True,
                 optimise_steps: int = 200, **kwargs) -> UnpooledSamples:
    """Fit every star independently under the unpooled model's broad priors.

    All ``num_chains * num_samples`` draws are kept (K per star), unlike
    :class:`clusterhbm.results.FitResult`, which thins stars to <= 250 draws.

    Parameters
    ----------
    method : "per_star" (default) runs one NUTS chain per star and chain, vmapped over
        stars, each star with its own step size and diagonal scale (through
        :func:`clusterhbm.hbm.run_gibbs` with an empty population); "joint" runs the
        unpooled model as one NUTS problem over all stars (one step size for all: the
        worst-conditioned star sets it).
    kernel : the per-star kernel of ``method="per_star"`` (see :data:`clusterhbm.hbm.KERNELS`;
        "hmc" compiles faster than "nuts" but mixes worse on banana-shaped stars)
    max_num_doublings : NUTS tree depth limit
    dense_mass_matrix : for ``method="joint"``
    optimise_steps : Adam steps from the pooled start before sampling
    **kwargs : passed to :func:`clusterhbm.hbm.run_gibbs` or
        :func:`clusterhbm.sampling.run_nuts`
    """
    t0 = time.perf_counter()
    p = problem
    _check_plain(p.config, "the unpooled fit for re-weighting")
    if method not in ("per_star", "joint"):
        raise ValueError(f"method must be 'per_star' or 'joint', got {method!r}")
    config = p.config._replace(pooled=False, fit_widths=_ALL_WIDTHS)
    pr = p.priors
    logdensity_fn = make_logdensity_fn(p.data, p.grid, config, pr)
    # start every star at the pooled start's physical values, written as unpooled z's
    popv = population_values(p.start["pop"], p.config, pr)
    _, age, feh, dist, av, _ = jax.vmap(
        lambda st: star_values(st, popv, p.config, p.grid))(p.start["star"])
    n = age.shape[0]
    star = {"s": p.start["star"]["s"],
            "z_age": (age - pr.unpooled_log_age) / pr.unpooled_sigma_log_age,
            "z_feh": (feh - pr.unpooled_feh) / pr.unpooled_sigma_feh,
            "z_dist": (dist - pr.unpooled_distance_pc) / pr.unpooled_sigma_distance_pc,
            "z_av": _z_from_truncnorm(jnp.maximum(av, 0.02), pr.unpooled_av_mag,
                                      pr.unpooled_sigma_av_mag)}
    pos = {"pop": {}, "star": star}
    if optimise_steps:
        pos, _ = _optimise(logdensity_fn, pos, num_steps=optimise_steps)
    inits = _jitter(rng_key, pos, num_chains)
    popu = population_values({}, config, pr)

    def star_phys(st):
        eep, a_, f_, d_, v_, _ = star_values(st, popu, config, p.grid)
        return {"eep": eep, "log_age": a_, "feh": f_, "distance_pc": d_, "av_mag": v_}

    if method == "joint":
        out = run_nuts(jax.random.fold_in(rng_key, 1), logdensity_fn, inits,
                       num_warmup=num_warmup, num_samples=num_samples,
                       transform_fn=lambda q: jax.vmap(star_phys)(q["star"]),
                       diagonal_mass_matrix=not dense_mass_matrix,
                       max_num_doublings=max_num_doublings, **kwargs)
        stars, timings = _np(out.samples), dict(out.timings)
    else:
        def log_star(st, _phi, data_i):
            return log_density_star(st, popu, data_i, p.grid, config, pr)

        dummy = {"unused": jnp.zeros(num_chains)}
        # initial scales: the star's coordinates differ by orders of magnitude
        scale0 = {"s": 0.01, "z_age": 0.3, "z_feh": 0.3, "z_dist": 0.05, "z_av": 0.3}
        scale0 = jax.flatten_util.ravel_pytree(
            {k: jnp.asarray(v) for k, v in scale0.items() if k in star})[0]
        out = run_gibbs(
            jax.random.fold_in(rng_key, 1), log_star,
            lambda phi: -0.5 * phi["unused"] ** 2, tuple(p.data), inits["star"], dummy,
            num_warmup=num_warmup, num_samples=num_samples, individual_kernel=kernel,
            population_kernel="rmh", max_num_doublings=max_num_doublings,
            population_log_density=lambda *args: 0.0, initial_scale_individual=scale0,
            transform_fn=lambda phi: {}, transform_individual=lambda st, _: star_phys(st),
            **kwargs)
        stars, timings = out.individual_samples, dict(out.timings)
    stars = {k: np.asarray(v) for k, v in stars.items()}      # (C, S, N)
    theta = {k: np.moveaxis(stars[k], -1, 0).reshape(n, -1) for k in STAR_PHYS}  # (N, K)
    log_p0 = np.asarray(interim_log_prior(theta, pr))
    rhat = max(float(np.nanmax(split_rhat(stars[k]))) for k in STAR_PHYS)
    wall = time.perf_counter() - t0
    return UnpooledSamples(theta=theta, log_p0=log_p0, priors=pr, stars=stars,
                           timings=dict(timings, wall_s=wall), rhat_max=rhat)


def fit_reweighted(problem: ClusterProblem, unpooled: UnpooledSamples, rng_key, *,
                   num_chains: int = 4, num_warmup: int = 500, num_samples: int = 500,
                   width_init: dict | None = None, neff_threshold: float = 10.0,
                   num_reweight_draws: int = 400, **nuts_kwargs) -> RouteResult:
    """Population by importance re-weighting of the unpooled per-star samples.

    All four widths are fitted whatever ``problem.config.fit_widths`` says (a zero width
    cannot be reached by re-weighting). ``timings["wall_s"]`` includes the unpooled fit.
    """
    p = problem
    _check_plain(p.config, "importance re-weighting")
    config = p.config._replace(fit_widths=_ALL_WIDTHS)
    pr = p.priors
    d0 = p.guess["distance_pc"]
    widths = {"sigma_log_age": 0.05, "sigma_feh": 0.05, "sigma_distance_pc": 0.01 * d0,
              "sigma_av_mag": 0.05}
    widths.update(width_init or {})
    popv0 = population_values(p.start["pop"], p.config, pr)
    start = pop_to_unconstrained({**{k: popv0[k] for k in POP_PARAMS}, **widths}, config)
    inits = _jitter(rng_key, start, num_chains, scale=1e-2)

    def log_pop(theta, pop):
        return population_log_density(theta, population_values(pop, config, pr))

    def log_prior(pop):
        return log_prior_population(pop, config, pr, p.grid)

    theta = {k: jnp.asarray(v) for k, v in unpooled.theta.items()}
    res = reweighted_population_nuts(
        jax.random.fold_in(rng_key, 1), theta, jnp.asarray(unpooled.log_p0), log_pop,
        log_prior, inits, num_warmup=num_warmup, num_samples=num_samples,
        transform_fn=lambda pop: _pop_physical(pop, config, pr),
        neff_threshold=neff_threshold, num_reweight_draws=num_reweight_draws, **nuts_kwargs)
    stars = {k: v[None] for k, v in res.shrunk.items()}          # (1, D, N)
    timings = dict(res.timings, unpooled_s=unpooled.timings["wall_s"],
                   wall_s=res.timings["wall_s"] + unpooled.timings["wall_s"],
                   population_s=res.timings["wall_s"])
    extra = {"n_eff_median": res.n_eff_median, "n_eff_min": res.n_eff_min,
             "n_eff": res.n_eff, "num_divergent": int(np.sum(res.sampler.info["is_divergent"])),
             "K": int(unpooled.log_p0.shape[1]), "unpooled_rhat_max": unpooled.rhat_max}
    return RouteResult("reweight", _np(res.samples), stars, timings, extra)


def neff_versus_width(unpooled: UnpooledSamples, popv: dict, widths) -> dict:
    """n_eff per star when the population widths are scaled towards zero.

    Parameters
    ----------
    unpooled : the per-star samples
    popv : population values (physical units) with the four means and four widths
    widths : sequence of factors f; each width is set to f * popv's width

    Returns
    -------
    dict with ``factor`` (F,), ``median`` and ``min`` (F,) over stars of n_eff, and
    ``n_eff`` (F, N).
    """
    theta = {k: jnp.asarray(v) for k, v in unpooled.theta.items()}
    lp0 = jnp.asarray(unpooled.log_p0)
    rows = []
    for f in widths:
        pv = {k: jnp.asarray(v, lp0.dtype) for k, v in popv.items()}
        for w in WIDTH_PARAMS:
            pv[w] = pv[w] * f
        lw = log_importance_weights(pv, theta, lp0, population_log_density)
        rows.append(np.asarray(effective_sample_size(lw, axis=1)))
    ne = np.array(rows)
    return {"factor": np.asarray(widths, float), "median": np.median(ne, axis=1),
            "min": ne.min(axis=1), "n_eff": ne}


# --------------------------------------------------------------------------------------
# Gibbs


def _gibbs_noncentred(p: ClusterProblem):
    config, pr, grid = p.config, p.priors, p.grid

    def log_individual(star, pop, data_i):
        return log_density_star(star, population_state(pop, config, pr, grid), data_i, grid,
                                config, pr)

    def log_prior(pop):
        return log_prior_population(pop, config, pr, grid)

    def star_phys(star, pop):
        popv = population_values(pop, config, pr)
        eep, age, feh, dist, av, _ = star_values(star, popv, config, grid)
        return {"eep": eep, "log_age": age, "feh": feh, "distance_pc": dist, "av_mag": av}

    return log_individual, log_prior, None, star_phys, p.start["star"], p.start["pop"]


_AV_SCALE = 0.1


_EXTENSIONS = ("binaries", "field", "selection", "fit_mf_slope")


def _check_plain(config: ModelConfig, what: str):
    on = [k for k in _EXTENSIONS if getattr(config, k, False)]
    if on:
        raise ValueError(f"{what} is written for the plain model; switch off {on} in "
                         "ModelConfig (or use the joint or non-centred Gibbs route)")


def _gibbs_centred(p: ClusterProblem):
    _check_plain(p.config, "the centred Gibbs parametrisation")
    if not all(p.config.fit_widths):
        raise ValueError("the centred Gibbs parametrisation needs every width fitted "
                         f"(fit_widths all True), got {p.config.fit_widths}; use "
                         "parametrisation='noncentred'")
    config, pr, grid = p.config, p.priors, p.grid
    shared = config._replace(fit_widths=(False,) * 4)  # star uses its own values as "pop"

    def phys(star):
        av = _AV_SCALE * jax.nn.softplus(star["av_raw"] / _AV_SCALE)
        return {"log_age": star["log_age"], "feh": star["feh"],
                "distance_pc": star["distance_pc"], "av_mag": av}

    def log_pop(star, pop, data_i):
        popv = population_values(pop, config, pr)
        jac = jax.nn.log_sigmoid(star["av_raw"] / _AV_SCALE)   # d A_V / d raw
        return population_log_density(phys(star), popv) + jac

    def log_individual(star, pop, data_i):
        popv = population_values(pop, config, pr)
        own = {**popv, **phys(star)}
        ll = log_density_star({"s": star["s"]}, own, data_i, grid, shared, pr)
        return ll + log_pop(star, pop, data_i)

    def log_prior(pop):
        return log_prior_population(pop, config, pr, grid)

    def star_phys(star, pop):
        v = phys(star)
        eep, *_ = star_values({"s": star["s"]}, v, shared, grid)
        return {"eep": eep, **v}

    popv = population_values(p.start["pop"], config, pr)
    _, age, feh, dist, av, _ = jax.vmap(lambda st: star_values(st, popv, config, grid))(
        p.start["star"])
    av = jnp.maximum(av, 0.02)
    star0 = {"s": p.start["star"]["s"], "log_age": age, "feh": feh, "distance_pc": dist,
             "av_raw": _AV_SCALE * jnp.log(jnp.expm1(av / _AV_SCALE))}
    return log_individual, log_prior, log_pop, star_phys, star0, p.start["pop"]


class GibbsParts(NamedTuple):
    """The densities and starting point of one Gibbs parametrisation of a cluster.

    log_individual(star, pop, data_i), log_prior(pop), population_log_density (the
    phi-dependent part used in the population update, or None for all of it),
    star_physical(star, pop) -> per-star physical values, init_star (N, ...),
    init_pop : the problem's start in these coordinates.
    """

    log_individual: Callable
    log_prior: Callable
    population_log_density: Callable | None
    star_physical: Callable
    init_star: dict
    init_pop: dict


def gibbs_parts(problem: ClusterProblem, parametrisation: str = "noncentred") -> GibbsParts:
    """Densities for :func:`clusterhbm.hbm.run_gibbs` in the chosen parametrisation.

    "noncentred": the model's coordinates; ``log_prior + sum_i log_individual`` is
    :func:`clusterhbm.model.log_density` exactly. "centred": per-star
    (s, log_age, feh, distance_pc, av_raw) with A_V = 0.1 softplus(av_raw / 0.1); the same
    model under a change of variables (needs every width fitted).
    """
    if parametrisation == "noncentred":
        return GibbsParts(*_gibbs_noncentred(problem))
    if parametrisation == "centred":
        return GibbsParts(*_gibbs_centred(problem))
    raise ValueError(f"parametrisation must be 'noncentred' or 'centred', got "
                     f"{parametrisation!r}")


def fit_gibbs(problem: ClusterProblem, rng_key, *, parametrisation: str = "noncentred",
              num_chains: int = 4, num_warmup: int = 500, num_samples: int = 1000,
              individual_kernel: str = "hmc", population_kernel: str = "nuts",
              individual_integration_steps: int = 5, population_integration_steps: int = 10,
              max_num_doublings: int = 6, population_updates: int = 1,
              store_stars: bool = True, **gibbs_kwargs) -> RouteResult:
    """Metropolis-within-Gibbs for the cluster (see the module docstring).

    Parameters
    ----------
    problem : ClusterProblem
    rng_key : JAX key
    parametrisation : "noncentred" (the model's coordinates; any fit_widths) or
        "centred" (physical per-star values; needs every width fitted)
    num_chains, num_warmup, num_samples : sweeps per chain
    individual_kernel, population_kernel, ... : see :func:`clusterhbm.hbm.run_gibbs`
    store_stars : keep the per-star physical values of every draw
    """
    p = problem
    log_individual, log_prior, pop_ld, star_phys, star0, pop0 = gibbs_parts(p, parametrisation)
    t0 = time.perf_counter()
    k_init, k_run = jax.random.split(rng_key)
    init_theta = _jitter(k_init, star0, num_chains)
    init_phi = _jitter(jax.random.fold_in(k_init, 1), pop0, num_chains)
    data = tuple(p.data)
    out = run_gibbs(
        k_run, log_individual, log_prior, data, init_theta, init_phi,
        num_warmup=num_warmup, num_samples=num_samples, individual_kernel=individual_kernel,
        population_kernel=population_kernel,
        individual_integration_steps=individual_integration_steps,
        population_integration_steps=population_integration_steps,
        max_num_doublings=max_num_doublings, population_updates=population_updates,
        population_log_density=pop_ld,
        transform_fn=lambda pop: _pop_physical(pop, p.config, p.priors),
        transform_individual=star_phys if store_stars else None, **gibbs_kwargs)
    wall = time.perf_counter() - t0
    stars = {k: np.asarray(v) for k, v in out.individual_samples.items()}  # (C, S, N)
    extra = {"acceptance_individual": float(np.mean(out.info["acceptance_individual"])),
             "acceptance_population": float(np.mean(out.info["acceptance_population"])),
             "num_divergent_population": int(np.sum(out.info["is_divergent_population"])),
             "step_size_population": out.step_size_population.tolist(),
             "median_step_size_individual": float(np.median(out.step_size_individual)),
             "parametrisation": parametrisation}
    name = "gibbs" if parametrisation == "noncentred" else "gibbs-centred"
    return RouteResult(name, out.samples, stars, dict(out.timings, wall_s=wall), extra)


# --------------------------------------------------------------------------------------
# comparison


def compare_routes(results, *, reference: str = "joint", truth: dict | None = None) -> list:
    """One row per route and parameter: mean, sd, R-hat, ESS, ESS/s, offset from the
    reference route in combined sds ``(m - m_ref) / sqrt(sd^2 + sd_ref^2)``.

    Parameters
    ----------
    results : sequence of RouteResult
    reference : the route name others are compared with
    truth : optional true values (adds ``z_truth = (mean - truth) / sd``)
    """
    by = {r.route: r for r in results}
    ref = by.get(reference)
    rows = []
    for r in results:
        s = r.summary()
        eps = r.ess_per_second()
        for k, st in s.items():
            row = {"route": r.route, "parameter": k, "mean": st["mean"], "sd": st["sd"],
                   "rhat": st["rhat"], "ess_bulk": st["ess_bulk"], "ess_tail": st["ess_tail"],
                   "ess_per_s": eps[k], "wall_s": float(r.timings["wall_s"])}
            if ref is not None and k in ref.population:
                rs = ref.summary()[k]
                row["offset_vs_ref_sd"] = (st["mean"] - rs["mean"]) / np.hypot(st["sd"],
                                                                                 rs["sd"])
            if truth is not None and k in truth:
                row["z_truth"] = (st["mean"] - truth[k]) / st["sd"]
            rows.append(row)
    return rows
