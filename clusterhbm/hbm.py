"""Generic hierarchical-Bayes routes for any population density written in JAX.

A hierarchical model has population parameters ``phi`` and one latent ``theta_i`` per
individual (star, galaxy, ...)::

    p(phi, {theta_i} | {D_i}) ∝ p(phi) prod_i p(theta_i | phi) p(D_i | theta_i)

Besides sampling everything jointly with NUTS (:func:`clusterhbm.sampling.run_nuts`),
practice knows two other routes, both implemented here for any pure JAX density:

Importance re-weighting ("pseudo-importance sampling")
    Hogg, Myers & Bovy (2010, ApJ 725, 2166); Foreman-Mackey, Hogg & Morton (2014, ApJ 795,
    64). Each individual is first analysed alone under an *interim* prior ``p0(theta)``,
    giving samples ``theta_ik ~ p(theta | D_i, p0)`` (k = 1..K). Then

        p(D_i | phi) / p(D_i | p0) ≈ (1/K) sum_k p(theta_ik | phi) / p0(theta_ik)

    so the population likelihood is ``sum_i logsumexp_k(log p(theta_ik|phi) -
    log p0(theta_ik)) - N log K`` (:func:`reweighted_log_likelihood`) and ``phi`` is
    sampled with NUTS on that cheap function (:func:`reweighted_population_nuts`). It
    works only while each individual's weights are spread over many samples: the
    effective number of samples per individual ``n_eff_i = (sum_k w_ik)^2 / sum_k w_ik^2``
    is reported at the posterior draws of ``phi`` and a warning is logged when it falls
    below a threshold. When the population is much narrower than the individual
    posteriors (the limit: a delta-function population) the estimate is dominated by one
    or two samples and the route fails. Re-sampling each individual's samples with the
    weights at each ``phi`` draw gives the *shrunk* per-individual posteriors.

Gibbs / Metropolis-within-Gibbs
    Alternates ``theta_i ~ K_i(. | phi, D_i)`` for all i (independent given phi, so one
    vmapped BlackJAX kernel) and ``phi ~ K_phi(. | {theta_i})`` (a BlackJAX kernel on the
    population), see :func:`run_gibbs`. Each block is preconditioned by a diagonal scale
    and tuned by dual averaging (step size) and Welford (scale) in Stan's warm-up
    windows. Gibbs mixes slowly when phi and the theta_i are strongly coupled: the
    autocorrelation time of phi grows like (marginal sd / conditional sd given the
    theta_i)^2, so the choice of per-individual coordinates (centred or non-centred)
    decides whether it works.

Everything inside the samplers is pure (explicit ``rng_key``, ``lax.scan`` over steps,
``vmap`` over chains and individuals); the functions that validate input, log warnings
and return NumPy arrays are thin shells around them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.step_size import dual_averaging_adaptation
from blackjax.adaptation.window_adaptation import build_schedule
from blackjax.mcmc import hmc, mala, nuts, random_walk
from jax.flatten_util import ravel_pytree

from .sampling import SamplerOutput, run_nuts

__all__ = [
    "KERNELS",
    "GibbsOutput",
    "ReweightResult",
    "check_neff",
    "effective_sample_size",
    "log_importance_weights",
    "make_reweighted_logdensity",
    "reweight_individuals",
    "reweighted_log_likelihood",
    "reweighted_population_nuts",
    "run_gibbs",
]

log = logging.getLogger(__name__)

#: BlackJAX kernels usable for either Gibbs block, with their default target acceptance
KERNELS = {"hmc": 0.8, "nuts": 0.8, "mala": 0.574, "rmh": 0.3}


# --------------------------------------------------------------------------------------
# importance re-weighting: pure core


def _apply(log_pop_density, phi, theta, covariates):
    """log p(theta_ik | phi) for all (i, k): vmap over individuals, then over samples.

    The covariates of individual i are not batched over its K samples, so whatever
    ``log_pop_density`` computes from (phi, covariates) alone is computed once per i.
    """
    if covariates is None:
        return jax.vmap(jax.vmap(lambda t: log_pop_density(t, phi)))(theta)

    def one(th_i, c_i):
        return jax.vmap(lambda t: log_pop_density(t, phi, c_i))(th_i)

    return jax.vmap(one)(theta, covariates)


def log_importance_weights(phi, theta, log_p0, log_pop_density: Callable, covariates=None):
    """log w_ik = log p(theta_ik | phi) - log p0(theta_ik), shape (N, K).

    Parameters
    ----------
    phi : pytree
        Population parameters (any pytree ``log_pop_density`` accepts).
    theta : pytree whose leaves have leading shape (N, K)
        K samples of each of N individuals, drawn under the interim prior.
    log_p0 : array (N, K)
        Interim log prior density of each sample (in the coordinates of ``theta``).
    log_pop_density : callable(theta_one, phi) -> scalar
        Population log density of one individual's ``theta`` (same coordinates); called
        as ``log_pop_density(theta_one, phi, covariates_i)`` when ``covariates`` is given.
    covariates : optional pytree with leading axis N
        Known per-individual quantities the population density depends on (e.g. a
        galaxy's redshift or completeness limit).

    Returns
    -------
    array (N, K); -inf where the population density is zero.
    """
    lp = _apply(log_pop_density, phi, theta, covariates)
    lw = lp - log_p0
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


def _logsumexp(lw, axis):
    m = jnp.max(lw, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(lw - m), axis=axis, keepdims=True)
    return jnp.squeeze(jnp.log(s) + m, axis=axis)


def effective_sample_size(log_w, axis: int = -1):
    """Kish's effective number of samples ``(sum w)^2 / sum w^2`` from log weights.

    Returns 0 where every weight is zero (all log weights -inf).
    """
    a = _logsumexp(log_w, axis)
    b = _logsumexp(2.0 * log_w, axis)
    return jnp.where(jnp.isfinite(a), jnp.exp(2.0 * a - b), 0.0)


def reweighted_log_likelihood(phi, theta, log_p0, log_pop_density: Callable,
                              covariates=None):
    """Monte Carlo population log likelihood (up to a phi-independent constant).

    ``sum_i logsumexp_k(log p(theta_ik | phi) - log p0(theta_ik)) - N log K``; see
    :func:`log_importance_weights` for the arguments.
    """
    lw = log_importance_weights(phi, theta, log_p0, log_pop_density, covariates)
    n, k = lw.shape
    return jnp.sum(_logsumexp(lw, 1)) - n * jnp.log(float(k))


def make_reweighted_logdensity(theta, log_p0, log_pop_density: Callable,
                               log_prior: Callable, covariates=None):
    """``logdensity_fn(phi) = log_prior(phi) + reweighted_log_likelihood(phi, ...)``."""

    def logdensity_fn(phi):
        lp = log_prior(phi)
        ll = reweighted_log_likelihood(phi, theta, log_p0, log_pop_density, covariates)
        out = lp + ll
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    return logdensity_fn


def reweight_individuals(rng_key, phi_draws, theta, log_p0, log_pop_density: Callable,
                         covariates=None, *, batch_size: int = 16):
    """Per phi draw: n_eff of every individual and one re-sampled theta per individual.

    Parameters
    ----------
    rng_key : JAX key
    phi_draws : pytree with leading axis D (draws of phi)
    theta, log_p0, log_pop_density, covariates : as :func:`log_importance_weights`
    batch_size : phi draws evaluated at once (memory ~ batch_size * N * K)

    Returns
    -------
    n_eff : array (D, N)
        Effective number of samples of each individual at each draw.
    index : int array (D, N)
        The re-sampled index k of each individual (drawn with probability w_ik / sum_k w_ik;
        an individual with all weights zero gets index 0 and n_eff 0).
    """
    d = jax.tree.leaves(phi_draws)[0].shape[0]
    keys = jax.random.split(rng_key, d)

    def one(args):
        key, phi = args
        lw = log_importance_weights(phi, theta, log_p0, log_pop_density, covariates)
        ne = effective_sample_size(lw, axis=1)
        idx = jax.random.categorical(key, jnp.where(jnp.isfinite(lw), lw, -1e30), axis=1)
        return ne, jnp.where(ne > 0, idx, 0)

    return jax.lax.map(one, (keys, phi_draws), batch_size=batch_size)


# --------------------------------------------------------------------------------------
# importance re-weighting: shell


class ReweightResult(NamedTuple):
    """What :func:`reweighted_population_nuts` returns (host NumPy arrays).

    samples : dict name -> (C, S, ...) draws of ``transform_fn(phi)``
    phi : pytree of (C, S, ...) raw phi draws
    sampler : the :class:`~clusterhbm.sampling.SamplerOutput` of the NUTS run
    n_eff : (D, N) effective samples per individual at D thinned posterior draws
    n_eff_median, n_eff_min : (N,) median and minimum over those draws
    shrunk : pytree of (D, N, ...) per-individual draws re-sampled with the weights
        (the shrunk per-individual posteriors)
    draw_index : (D,) flat (chain * S + draw) index of the D thinned draws
    timings : dict of seconds (``nuts_s``, ``reweight_s``, ``wall_s``)
    """

    samples: dict
    phi: dict
    sampler: SamplerOutput
    n_eff: np.ndarray
    n_eff_median: np.ndarray
    n_eff_min: np.ndarray
    shrunk: dict
    draw_index: np.ndarray
    timings: dict


def _check_individual_samples(theta, log_p0):
    leaves = jax.tree.leaves(theta)
    if not leaves:
        raise ValueError("theta: expected a pytree of arrays shaped (N, K, ...), got no arrays")
    lp0 = np.asarray(log_p0)
    if lp0.ndim != 2:
        raise ValueError(f"log_p0: expected shape (N individuals, K samples), got {lp0.shape}")
    for x in leaves:
        if tuple(np.shape(x)[:2]) != lp0.shape:
            raise ValueError(f"theta: every leaf must start with (N, K) = {lp0.shape} like "
                             f"log_p0, got a leaf of shape {np.shape(x)}")
    if lp0.shape[1] < 2:
        raise ValueError(f"need at least 2 samples per individual, got K = {lp0.shape[1]}")
    if not np.all(np.isfinite(lp0)):
        n_bad = int(np.sum(~np.isfinite(lp0)))
        raise ValueError(f"log_p0 has {n_bad} non-finite values: every sample must have a "
                         "positive interim prior density (it was drawn from it)")


def check_neff(n_eff, *, threshold: float = 10.0, names=None, what: str = "individual"):
    """Summarise n_eff (D, N) and log a warning when the minimum falls below ``threshold``.

    Returns a dict with per-individual ``median`` and ``min`` (N,) and the number of
    individuals whose minimum over draws is below the threshold (``n_below``).
    """
    ne = np.asarray(n_eff, float)
    if ne.ndim != 2:
        raise ValueError(f"n_eff: expected shape (draws, individuals), got {ne.shape}")
    med, mn = np.median(ne, axis=0), np.min(ne, axis=0)
    below = np.flatnonzero(mn < threshold)
    if below.size:
        worst = int(np.argmin(mn))
        label = names[worst] if names is not None else worst
        log.warning(
            "importance re-weighting is unreliable: %d of %d %ss have fewer than %.0f "
            "effective samples at some posterior draw (worst: %s %s, min n_eff %.2f, median "
            "%.2f). The population is much narrower than the interim prior there: draw more "
            "samples per %s or use joint HMC / Gibbs.", below.size, ne.shape[1], what,
            threshold, what, label, mn[worst], med[worst], what)
    return {"median": med, "min": mn, "n_below": int(below.size), "threshold": threshold}


def reweighted_population_nuts(rng_key, theta, log_p0, log_pop_density: Callable,
                               log_prior: Callable, init_positions, *, num_warmup: int = 500,
                               num_samples: int = 500, transform_fn: Callable | None = None,
                               num_reweight_draws: int = 400, neff_threshold: float = 10.0,
                               covariates=None, **nuts_kwargs) -> ReweightResult:
    """Population inference by importance re-weighting of per-individual samples.

    Parameters
    ----------
    rng_key : JAX key
    theta : pytree of (N, K, ...) per-individual samples drawn under the interim prior
    log_p0 : (N, K) interim log prior of those samples (same coordinates as ``theta``)
    log_pop_density : callable(theta_one, phi[, covariates_i]) -> scalar, the population
        log density
    log_prior : callable(phi) -> scalar, the hyperprior (in phi's coordinates, Jacobian
        included)
    init_positions : pytree of phi with a leading chain axis (C, ...)
    num_warmup, num_samples : NUTS steps per chain
    transform_fn : callable(phi) -> dict of derived quantities stored per draw
    num_reweight_draws : D, how many (evenly thinned) posterior draws are used for n_eff
        and the shrunk per-individual posteriors
    neff_threshold : warn when any individual's min n_eff over draws is below this
    covariates : optional per-individual known quantities (leading axis N), passed to
        ``log_pop_density`` as its third argument
    **nuts_kwargs : passed to :func:`clusterhbm.sampling.run_nuts`

    Returns
    -------
    ReweightResult
    """
    _check_individual_samples(theta, log_p0)
    t0 = time.perf_counter()
    theta = jax.tree.map(jnp.asarray, theta)
    log_p0 = jnp.asarray(log_p0)
    covariates = None if covariates is None else jax.tree.map(jnp.asarray, covariates)
    logdensity_fn = make_reweighted_logdensity(theta, log_p0, log_pop_density, log_prior,
                                               covariates)
    user = transform_fn or (lambda p: {})

    def transform(p):
        return {"__phi__": p, **user(p)}

    k_nuts, k_rw = jax.random.split(rng_key)
    out = run_nuts(k_nuts, logdensity_fn, init_positions, num_warmup=num_warmup,
                   num_samples=num_samples, transform_fn=transform, **nuts_kwargs)
    t1 = time.perf_counter()
    phi = out.samples.pop("__phi__")
    c, s = jax.tree.leaves(phi)[0].shape[:2]
    n_draws = c * s
    d = max(1, min(int(num_reweight_draws), n_draws))
    idx = np.unique(np.linspace(0, n_draws - 1, d).round().astype(int))
    flat = jax.tree.map(lambda x: jnp.asarray(x.reshape((n_draws,) + x.shape[2:])[idx]), phi)
    n_eff, index = jax.jit(reweight_individuals, static_argnums=(4,))(
        k_rw, flat, theta, log_p0, log_pop_density, covariates)
    n_eff, index = np.asarray(n_eff), np.asarray(index)
    n_ind = index.shape[1]
    shrunk = jax.tree.map(lambda x: np.asarray(x)[np.arange(n_ind)[None, :], index], theta)
    summary = check_neff(n_eff, threshold=neff_threshold)
    t2 = time.perf_counter()
    return ReweightResult(samples=out.samples, phi=phi, sampler=out, n_eff=n_eff,
                          n_eff_median=summary["median"], n_eff_min=summary["min"],
                          shrunk=shrunk, draw_index=idx,
                          timings={"nuts_s": t1 - t0, "reweight_s": t2 - t1,
                                   "wall_s": t2 - t0, **out.timings})


# --------------------------------------------------------------------------------------
# Gibbs: pure core


class BlockAdaptation(NamedTuple):
    """Warm-up state of one Gibbs block (one individual, or the population).

    da_state : dual-averaging state of log step size; step_size : current step size;
    scale : (d,) diagonal preconditioner (the block is sampled in ``x / scale``);
    wf_mean, wf_m2, wf_n : Welford accumulators of the window's variance.
    """

    da_state: tuple
    step_size: jax.Array
    scale: jax.Array
    wf_mean: jax.Array
    wf_m2: jax.Array
    wf_n: jax.Array


def _kernel_step(name: str, *, num_integration_steps: int, max_num_doublings: int):
    """``step(key, u, logdensity_fn, step_size) -> (u_new, acceptance, is_divergent)``."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: expected one of {sorted(KERNELS)}")
    if name == "hmc":
        kern = hmc.build_kernel()

        def step(key, u, ld, eps):
            st = hmc.init(u, ld)
            new, info = kern(key, st, ld, eps, jnp.ones_like(u),
                             num_integration_steps=num_integration_steps)
            return new.position, info.acceptance_rate, info.is_divergent
    elif name == "nuts":
        kern = nuts.build_kernel()

        def step(key, u, ld, eps):
            st = nuts.init(u, ld)
            new, info = kern(key, st, ld, eps, jnp.ones_like(u),
                             max_num_doublings=max_num_doublings)
            return new.position, info.acceptance_rate, info.is_divergent
    elif name == "mala":
        kern = mala.build_kernel()

        def step(key, u, ld, eps):
            new, info = kern(key, mala.init(u, ld), ld, eps)
            return new.position, info.acceptance_rate, jnp.zeros((), bool)
    else:
        kern = random_walk.build_additive_step()

        def step(key, u, ld, eps):
            new, info = kern(key, random_walk.init(u, ld), ld,
                             random_walk.normal(eps * jnp.ones_like(u)))
            return new.position, info.acceptance_rate, jnp.zeros((), bool)

    def safe(key, u, ld, eps):
        u_new, acc, div = step(key, u, ld, eps)
        ok = jnp.all(jnp.isfinite(u_new))
        return (jnp.where(ok, u_new, u), jnp.where(jnp.isfinite(acc) & ok, acc, 0.0),
                div | ~ok)

    return safe


def _adapt_init(x, step_size, scale, da_init):
    z = jnp.zeros_like(x)
    return BlockAdaptation(da_init(step_size), jnp.asarray(step_size, x.dtype),
                           jnp.broadcast_to(jnp.asarray(scale, x.dtype), x.shape), z, z,
                           jnp.zeros((), x.dtype))


def _adapt_update(ad: BlockAdaptation, x, acc, stage, window_end, da_update, da_init,
                  da_final):
    da = da_update(ad.da_state, acc)
    step = jnp.exp(da.log_step_size)
    # Welford on the physical coordinates during slow windows
    n = ad.wf_n + jnp.where(stage == 1, 1.0, 0.0)
    delta = x - ad.wf_mean
    mean = jnp.where(stage == 1, ad.wf_mean + delta / jnp.maximum(n, 1.0), ad.wf_mean)
    m2 = jnp.where(stage == 1, ad.wf_m2 + delta * (x - mean), ad.wf_m2)
    # at a window end: new scale, shrunk towards the previous one with 5 pseudo-draws
    # (scale-free, unlike Stan's shrinkage towards 1e-3)
    var = m2 / jnp.maximum(n - 1.0, 1.0)
    new_var = (n * var + 5.0 * ad.scale ** 2) / (n + 5.0)
    good = (n >= 3) & jnp.all(jnp.isfinite(new_var)) & jnp.all(new_var > 0)
    scale = jnp.where(window_end & good, jnp.sqrt(new_var), ad.scale)
    final_step = da_final(da)
    da = jax.tree.map(lambda a, b: jnp.where(window_end, a, b), da_init(final_step), da)
    step = jnp.where(window_end, final_step, step)
    zero = jnp.zeros_like(mean)
    mean = jnp.where(window_end, zero, mean)
    m2 = jnp.where(window_end, zero, m2)
    n = jnp.where(window_end, 0.0, n)
    return BlockAdaptation(da, step, scale, mean, m2, n)


class GibbsOutput(NamedTuple):
    """What :func:`run_gibbs` returns (host NumPy arrays; leading axes chain, draw).

    samples : dict name -> (C, S, ...) from ``transform_fn(phi)``
    individual_samples : dict name -> (C, S, N, ...) from ``transform_individual`` (or {})
    info : dict with ``acceptance_individual`` (C, S) (mean over individuals),
        ``acceptance_population`` (C, S), ``is_divergent_population`` (C, S),
        ``is_divergent_individual`` (C, S) (count over individuals)
    step_size_individual : (C, N); step_size_population : (C,)
    scale_individual : (C, N, d); scale_population : (C, D) (adapted preconditioners)
    timings : dict of seconds (``compile_s``, ``warmup_s``, ``sampling_s``, ``wall_s``)
    final_phi, final_theta : the last state (pytrees with a leading chain axis)
    """

    samples: dict
    individual_samples: dict
    info: dict
    step_size_individual: np.ndarray
    step_size_population: np.ndarray
    scale_individual: np.ndarray
    scale_population: np.ndarray
    timings: dict
    final_phi: dict
    final_theta: dict


def run_gibbs(rng_key, log_individual: Callable, log_prior: Callable, data, init_theta,
              init_phi, *, num_warmup: int = 500, num_samples: int = 500,
              individual_kernel: str = "hmc", population_kernel: str = "hmc",
              individual_integration_steps: int = 5,
              population_integration_steps: int = 10, max_num_doublings: int = 6,
              individual_updates: int = 1, population_updates: int = 1,
              target_accept_individual: float | None = None,
              target_accept_population: float | None = None,
              initial_step_size: float = 0.1, initial_scale_individual=1.0,
              initial_scale_population=1.0, population_log_density: Callable | None = None,
              chunk_size: int = 250,
              transform_fn: Callable | None = None,
              transform_individual: Callable | None = None) -> GibbsOutput:
    """Metropolis-within-Gibbs with vmapped per-individual BlackJAX kernels.

    One sweep: ``individual_updates`` steps of ``theta_i | phi, D_i`` for every i at once
    (``vmap``), then ``population_updates`` steps of ``phi | {theta_i}, D``. The joint
    density is ``log_prior(phi) + sum_i log_individual(theta_i, phi, data_i)``, so the
    parametrisation (centred: ``log_individual`` = log p(theta_i|phi) + log p(D_i|theta_i);
    non-centred: the likelihood depends on phi too) is the caller's choice.

    Warm-up follows Stan's windows (:func:`blackjax.adaptation.window_adaptation.
    build_schedule`): every block (each individual, and the population) has its own step
    size (dual averaging to the target acceptance) and diagonal scale (variance of the
    block's draws in the slow windows). After warm-up they are frozen, so the sampling
    phase is a valid MCMC.

    Parameters
    ----------
    rng_key : JAX key
    log_individual : callable(theta_i, phi, data_i) -> scalar
    log_prior : callable(phi) -> scalar (hyperprior, Jacobians included)
    data : pytree whose leaves have a leading axis N (per-individual data), or None
    init_theta : pytree with leading axes (C, N, ...) (chains, individuals)
    init_phi : pytree with a leading chain axis (C, ...)
    num_warmup, num_samples : sweeps per chain
    individual_kernel, population_kernel : one of :data:`KERNELS` ("hmc", "nuts", "mala",
        "rmh")
    individual_integration_steps, population_integration_steps : HMC leapfrog steps
    max_num_doublings : NUTS tree depth limit
    individual_updates, population_updates : kernel steps per block per sweep
    target_accept_individual, target_accept_population : default per kernel
        (:data:`KERNELS`)
    initial_step_size : starting step size (in preconditioned units) of every block
    initial_scale_individual, initial_scale_population : starting diagonal scales
        (scalar, or arrays broadcastable to one block's flat vector)
    population_log_density : optional callable(theta_i, phi, data_i) used in the
        population update instead of ``log_individual``; it may drop terms that do not
        depend on phi (e.g. a centred likelihood) to make the update cheaper.
    transform_fn : callable(phi) -> dict stored per draw (default: phi itself)
    transform_individual : callable(theta_i, phi) -> dict stored per draw and individual
        (default: nothing stored)
    chunk_size : sweeps per compiled ``lax.scan`` call (one compilation serves warm-up and
        sampling; the last chunk is padded with skipped sweeps)

    Returns
    -------
    GibbsOutput
    """
    for name, v in (("num_samples", num_samples), ("individual_updates", individual_updates),
                    ("population_updates", population_updates)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if int(num_warmup) < 0:
        raise ValueError(f"num_warmup must be >= 0, got {num_warmup}")
    t_start = time.perf_counter()
    step_i = _kernel_step(individual_kernel, num_integration_steps=individual_integration_steps,
                          max_num_doublings=max_num_doublings)
    step_p = _kernel_step(population_kernel, num_integration_steps=population_integration_steps,
                          max_num_doublings=max_num_doublings)
    ta_i = KERNELS[individual_kernel] if target_accept_individual is None \
        else target_accept_individual
    ta_p = KERNELS[population_kernel] if target_accept_population is None \
        else target_accept_population
    da_i = dual_averaging_adaptation(ta_i)
    da_p = dual_averaging_adaptation(ta_p)

    # flatten: one individual and the population
    theta00 = jax.tree.map(lambda x: x[0, 0], init_theta)
    phi0 = jax.tree.map(lambda x: x[0], init_phi)
    _, unravel_t = ravel_pytree(theta00)
    _, unravel_p = ravel_pytree(phi0)
    xt = jax.vmap(jax.vmap(lambda t: ravel_pytree(t)[0]))(init_theta)   # (C, N, d)
    xp = jax.vmap(lambda p: ravel_pytree(p)[0])(init_phi)                # (C, D)
    if xt.ndim != 3 or xp.ndim != 2 or xt.shape[0] != xp.shape[0]:
        raise ValueError(f"init_theta must have leading axes (chains, individuals) and "
                         f"init_phi a leading chain axis; got flat shapes {xt.shape} and "
                         f"{xp.shape}")
    n_chains, n_ind, _ = xt.shape
    if data is not None:
        for leaf in jax.tree.leaves(data):
            if np.shape(leaf)[0] != n_ind:
                raise ValueError(f"data: every leaf needs a leading axis of N = {n_ind} "
                                 f"individuals, got shape {np.shape(leaf)}")
    pop_ld = population_log_density or log_individual
    transform = transform_fn or (lambda p: {"phi": p})

    def cond_individual(x, phi, data_i):
        return log_individual(unravel_t(x), phi, data_i)

    def cond_population(xp_, xt_):
        phi = unravel_p(xp_)
        per = jax.vmap(lambda x, d: pop_ld(unravel_t(x), phi, d))(xt_, data)
        return log_prior(phi) + jnp.sum(per)

    def update_individuals(key, xt_, phi, ad_t: BlockAdaptation):
        keys = jax.random.split(key, (n_ind, individual_updates))

        def one(ks, x, ad, data_i):
            def ld(u):
                return cond_individual(u * ad.scale, phi, data_i)

            def body(carry, k):
                u, acc_sum, div = carry
                u, acc, d = step_i(k, u, ld, ad.step_size)
                return (u, acc_sum + acc, div | d), None

            (u, acc, div), _ = jax.lax.scan(
                body, (x / ad.scale, jnp.zeros((), x.dtype), jnp.zeros((), bool)), ks)
            return u * ad.scale, acc / individual_updates, div

        return jax.vmap(one)(keys, xt_, ad_t, data)

    def update_population(key, xp_, xt_, ad_p: BlockAdaptation):
        def ld(u):
            return cond_population(u * ad_p.scale, xt_)

        def body(carry, k):
            u, acc_sum, div = carry
            u, acc, d = step_p(k, u, ld, ad_p.step_size)
            return (u, acc_sum + acc, div | d), None

        ks = jax.random.split(key, population_updates)
        (u, acc, div), _ = jax.lax.scan(
            body, (xp_ / ad_p.scale, jnp.zeros((), xp_.dtype), jnp.zeros((), bool)), ks)
        return u * ad_p.scale, acc / population_updates, div

    def sweep(key, xt_, xp_, ad_t, ad_p):
        k1, k2 = jax.random.split(key)
        xt_, acc_t, div_t = update_individuals(k1, xt_, unravel_p(xp_), ad_t)
        xp_, acc_p, div_p = update_population(k2, xp_, xt_, ad_p)
        return xt_, xp_, acc_t, div_t, acc_p, div_p

    def record(xt_, xp_, acc_t, div_t, acc_p, div_p):
        phi = unravel_p(xp_)
        rec = {"acceptance_individual": jnp.mean(acc_t),
               "is_divergent_individual": jnp.sum(div_t),
               "acceptance_population": acc_p, "is_divergent_population": div_p}
        ind = ({} if transform_individual is None else
               jax.vmap(lambda x: transform_individual(unravel_t(x), phi))(xt_))
        return transform(phi), ind, rec

    out_shape = jax.eval_shape(record, xt[0], xp[0], jnp.zeros(n_ind, xp.dtype),
                               jnp.zeros(n_ind, bool), jnp.zeros((), xp.dtype),
                               jnp.zeros((), bool))

    def chunk_chain(keys, xt_, xp_, ad_t, ad_p, stages, ends, adapt, freezes, active):
        """``len(stages)`` sweeps of one chain; steps with ``active`` False do nothing
        (padding of the last chunk), steps with ``adapt`` True update the warm-up state."""

        def body(carry, inp):
            k, stage, end, ad_on, freeze, on = inp

            def run(carry):
                xt_, xp_, ad_t, ad_p = carry
                xt_, xp_, acc_t, div_t, acc_p, div_p = sweep(k, xt_, xp_, ad_t, ad_p)

                def adapt_fn(ads):
                    a_t, a_p = ads
                    a_t = jax.vmap(lambda a, x, c: _adapt_update(
                        a, x, c, stage, end, da_i[1], da_i[0], da_i[2]))(a_t, xt_, acc_t)
                    a_p = _adapt_update(a_p, xp_, acc_p, stage, end, da_p[1], da_p[0],
                                        da_p[2])
                    # last warm-up sweep: freeze the step sizes at their dual-averaging
                    # averages (Stan's choice)
                    a_t = a_t._replace(step_size=jnp.where(
                        freeze, jax.vmap(da_i[2])(a_t.da_state), a_t.step_size))
                    a_p = a_p._replace(step_size=jnp.where(
                        freeze, da_p[2](a_p.da_state), a_p.step_size))
                    return a_t, a_p

                ad_t, ad_p = jax.lax.cond(ad_on, adapt_fn, lambda a: a, (ad_t, ad_p))
                return (xt_, xp_, ad_t, ad_p), record(xt_, xp_, acc_t, div_t, acc_p, div_p)

            def skip(carry):
                return carry, jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype),
                                           out_shape)

            return jax.lax.cond(on, run, skip, carry)

        return jax.lax.scan(body, (xt_, xp_, ad_t, ad_p),
                            (keys, stages, ends, adapt, freezes, active))

    ad_t = jax.vmap(jax.vmap(lambda x: _adapt_init(
        x, initial_step_size, initial_scale_individual, da_i[0])))(xt)
    ad_p = jax.vmap(lambda x: _adapt_init(x, initial_step_size, initial_scale_population,
                                          da_p[0]))(xp)
    sched = np.asarray(build_schedule(num_warmup)) if num_warmup > 0 else np.zeros((0, 2))
    n_total = num_warmup + num_samples
    chunk = max(1, min(int(chunk_size), n_total))
    n_chunks = -(-n_total // chunk)
    n_pad = n_chunks * chunk
    stages = np.zeros(n_pad, np.int32)
    stages[:num_warmup] = sched[:, 0]
    ends = np.zeros(n_pad, bool)
    ends[:num_warmup] = sched[:, 1]
    adapt = np.arange(n_pad) < num_warmup
    freezes = np.arange(n_pad) == num_warmup - 1
    active = np.arange(n_pad) < n_total
    keys = jax.random.split(rng_key, (n_chains, n_pad))
    chunk_fn = jax.jit(jax.vmap(chunk_chain, in_axes=(0, 0, 0, 0, 0, None, None, None, None, None)))

    def args(i):
        sl = slice(i * chunk, (i + 1) * chunk)
        return (keys[:, sl], xt, xp, ad_t, ad_p, jnp.asarray(stages[sl]),
                jnp.asarray(ends[sl]), jnp.asarray(adapt[sl]), jnp.asarray(freezes[sl]),
                jnp.asarray(active[sl]))

    tc = time.perf_counter()
    compiled = chunk_fn.lower(*args(0)).compile()
    compile_s = time.perf_counter() - tc
    warm_s = samp_s = 0.0
    kept = []
    for i in range(n_chunks):
        t0 = time.perf_counter()
        (xt, xp, ad_t, ad_p), out = compiled(*args(i))
        jax.block_until_ready(xp)
        lo, hi = i * chunk, min((i + 1) * chunk, n_total)
        n_warm_here = max(0, min(hi, num_warmup) - lo)
        dt = time.perf_counter() - t0
        warm_s += dt * n_warm_here / chunk
        samp_s += dt * (chunk - n_warm_here) / chunk
        if i * chunk + chunk > num_warmup:  # this chunk holds sampling sweeps
            sl = slice(max(0, num_warmup - lo), hi - lo)
            kept.append(jax.tree.map(lambda v, sl=sl: np.asarray(v)[:, sl], out))
    vals, ind, rec = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *kept)
    final_theta = jax.vmap(jax.vmap(unravel_t))(xt)
    final_phi = jax.vmap(unravel_p)(xp)
    timings = {"compile_s": compile_s, "warmup_s": warm_s, "sampling_s": samp_s,
               "wall_s": time.perf_counter() - t_start}
    return GibbsOutput(samples=vals, individual_samples=ind, info=rec,
                       step_size_individual=np.asarray(ad_t.step_size),
                       step_size_population=np.asarray(ad_p.step_size),
                       scale_individual=np.asarray(ad_t.scale),
                       scale_population=np.asarray(ad_p.scale), timings=timings,
                       final_phi=jax.tree.map(np.asarray, final_phi),
                       final_theta=jax.tree.map(np.asarray, final_theta))
