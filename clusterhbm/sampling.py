"""BlackJAX NUTS with Stan-style window adaptation, in chunks, over many chains.

The kernels are pure: one chain, then ``vmap`` over chains. A thin host loop runs warm-up
and sampling in chunks of ``chunk_size`` steps, so long runs report progress and can be
checkpointed and resumed. Warm-up and sampling share one compiled program (a flag switches
the adaptation off), and the chunk length is chosen to divide both phases where it can, so
a run traces and compiles its NUTS step once: on a CPU that is most of a short fit.

Warm-up follows Stan (and ``blackjax.window_adaptation``): a fast window adapting the step
size by dual averaging, then doubling slow windows that also estimate a diagonal (or
dense) inverse mass matrix with Welford's algorithm, then a final fast window. It is built
from BlackJAX's stable primitives (``dual_averaging_adaptation``,
``mass_matrix_adaptation``, ``build_schedule``) so that it can run in chunks. Each chain
adapts its own step size and mass matrix.

With ``sharding`` (see :func:`clusterhbm.parallel.chain_sharding`) the chain axis of the
run state is split over the devices of a mesh with :func:`jax.shard_map`: each device runs
its own chains (vmapped) and no device waits for another inside a NUTS trajectory. The
draws equal those of the single-device run with the same key up to floating-point
rounding (the per-chain keys are drawn before they are split over the devices; XLA may
round differently at another batch width, see :mod:`clusterhbm.parallel`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
from blackjax.adaptation.step_size import dual_averaging_adaptation
from blackjax.adaptation.window_adaptation import build_schedule
from blackjax.mcmc import nuts
from jax.flatten_util import ravel_pytree

__all__ = ["SamplerOutput", "WarmupState", "run_nuts"]

log = logging.getLogger(__name__)


class WarmupState(NamedTuple):
    """Adaptation state of one chain.

    ``metric_target`` ((D,) for a diagonal metric, (D, D) for a dense one) is what a
    window's metric estimate is shrunk towards (see :func:`regularised_metric`): the
    starting metric (e.g. from the curvature) in the first window, then the previous
    window's estimate.
    """

    da_state: tuple
    mm_state: tuple
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    metric_target: jax.Array


class SamplerOutput(NamedTuple):
    """What :func:`run_nuts` returns (host NumPy arrays; leading axes chain, draw).

    samples : dict of name -> (C, S, ...) from ``transform_fn``
    info : dict with ``is_divergent``, ``num_integration_steps``,
        ``num_trajectory_expansions``, ``acceptance_rate``, ``energy``, ``logdensity``
    step_size : (C,); inverse_mass_matrix : (C, D) or (C, D, D)
    timings : dict of seconds (``warmup_s``, ``sampling_s``, ``compile_s`` estimates)
    final_positions : (C, D) flat positions
    """

    samples: dict
    info: dict
    step_size: np.ndarray
    inverse_mass_matrix: np.ndarray
    timings: dict
    final_positions: np.ndarray


def _kernel():
    return nuts.build_kernel()


#: Stan's pseudo-count: a window's metric estimate is cov * n/(n+5) + target * 5/(n+5)
SHRINKAGE_COUNT = 5.0


def factor_covariance(cov, n_pop: int, floor):
    """The covariance of a model whose last D - P coordinates are conditionally
    independent given the first P (a cluster: stars given the population).

    From a (D, D) sample covariance only Cov(pop) (P x P) and Cov(star, pop) (D - P x P)
    are used, which a window of a few tens of draws estimates well even when D is in the
    hundreds: star i regressed on the population, s_i = b_i . pop + e_i, gives
    Cov(s_i, s_j) = b_i Cov(pop) b_j + delta_ij Var(e_i). The result is full rank and
    positive definite (residual variances floored at ``floor``, (D - P,)), where the raw
    sample covariance of n < D draws is singular: its null space, where a shrunk estimate
    has only the shrinkage target's small weight, made NUTS's trajectories 2-6x too long
    in a 500-star fit. Within-star correlations (e.g. pseudo-mass and mass ratio) are not
    kept.
    """
    c_pp = cov[:n_pop, :n_pop]
    c_sp = cov[n_pop:, :n_pop]
    c_pp_inv = jnp.linalg.pinv(c_pp)
    b = c_sp @ c_pp_inv  # (D - P, P)
    resid = jnp.diag(cov)[n_pop:] - jnp.sum(b * c_sp, axis=1)
    resid = jnp.maximum(resid, floor)
    c_ss = b @ c_sp.T + jnp.diag(resid)
    return jnp.block([[c_pp, c_sp.T], [c_sp, 0.5 * (c_ss + c_ss.T)]])


def spiked_covariance(cov, n):
    """A covariance from ``n`` draws in D dimensions, for n below or near D: its
    diagonal plus the correlation eigen-directions that stand above the noise.

    The sample correlation matrix of n draws of D uncorrelated coordinates has
    eigenvalues spread over the Marchenko-Pastur bulk [(1 - sqrt(g))^2, (1 + sqrt(g))^2],
    g = D / n (and n - 1 non-zero ones when n < D). A true correlation eigenvalue l > 1 +
    sqrt(g) shows as a "spike" above the bulk at lam = l (1 + g / (l - 1)); this inverts
    that relation for every eigenvalue above the bulk edge, and sets the rest of the
    spectrum to 1: each coordinate keeps its own variance in every direction the draws do
    not resolve, instead of the small weight a convex shrinkage leaves there. A cluster's
    age-star coupling is such a spike (correlations ~0.99). (D, D) -> (D, D).
    """
    d = jnp.maximum(jnp.diag(cov), 1e-300)
    sd = jnp.sqrt(d)
    corr = cov / jnp.outer(sd, sd)
    lam, vec = jnp.linalg.eigh(0.5 * (corr + corr.T))
    g = cov.shape[0] / jnp.maximum(n, 1.0)
    edge = (1.0 + jnp.sqrt(g)) ** 2
    b = lam + 1.0 - g
    ell = 0.5 * (b + jnp.sqrt(jnp.maximum(b * b - 4.0 * lam, 0.0)))
    ell = jnp.where(lam > edge, jnp.maximum(ell, 1.0), 1.0)
    est = (vec * (ell - 1.0)) @ vec.T + jnp.eye(cov.shape[0], dtype=cov.dtype)
    return est * jnp.outer(sd, sd)


def regularised_metric(welford_state, target, *, diagonal: bool,
                       prior_count: float = SHRINKAGE_COUNT, raise_diagonal: bool = True,
                       n_pop: int = 0, spiked: bool = False):
    """A window's inverse metric: its sample covariance shrunk towards ``target``.

    Stan (and BlackJAX's ``mass_matrix_adaptation``) shrink towards ``1e-3 * I``, which
    assumes the coordinates are of order one. Here they are not: a bright star's
    pseudo-mass has a posterior variance of ~1e-8 and a cluster's distance ~1e-5, so
    ``1e-3 * 5/(n+5)`` added to them makes the metric 10^2-10^4 times too wide in those
    directions and NUTS's step size collapses (measured: 0.28 -> 0.014 after the first
    slow window on a 500-star mock). Shrinking towards the starting metric (the
    curvature's diagonal) is Stan's rule in the coordinates that this metric
    standardises, where unit variances are the right prior guess; later windows shrink
    towards the previous window's variances.

    ``target`` : (D,) variances (diagonal metric) or (D, D) (dense; e.g. the Laplace
    covariance of :func:`clusterhbm.fit.laplace_metric`), worth ``prior_count`` draws
    (Stan: 5). ``n_pop`` > 0 (dense): the first ``n_pop`` coordinates are the population,
    the others conditionally independent given it, and the sample covariance is replaced
    by :func:`factor_covariance` before shrinking. ``spiked`` (dense): a window of fewer
    draws than dimensions is replaced by :func:`spiked_covariance`. Returns (D,) or (D, D).
    """
    _, m2, count = welford_state  # Welford's running mean, M2 and count
    n = jnp.asarray(count, m2.dtype)
    cov = m2 / jnp.maximum(n - 1.0, 1.0)
    if n_pop and not diagonal:
        floor = 1e-3 * jnp.diag(target)[n_pop:]
        cov = factor_covariance(cov, n_pop, floor)
    if spiked and not diagonal:  # only where the window holds fewer draws than dimensions
        cov = jnp.where(n < cov.shape[0], spiked_covariance(cov, n), cov)
    w_data = n / (n + prior_count)
    w_prior = prior_count / (n + prior_count)
    if diagonal:
        return w_data * cov + w_prior * target
    # dense: a window holds fewer draws than there are dimensions, so the sample
    # covariance is singular; the target's diagonal is raised to each coordinate's own
    # sample variance where that is larger (a curvature start has the population's
    # conditional variances, hundreds of times below its marginal ones)
    if not raise_diagonal:  # a full target (the Laplace covariance): keep its structure
        return w_data * cov + w_prior * target
    dg = jnp.diag(target)
    t = target + jnp.diag(jnp.maximum(jnp.diag(cov), dg) - dg)
    return w_data * cov + w_prior * t


def _make_init_fn(logdensity_flat, *, diagonal):
    """A chain's NUTS state and warm-up state at a flat position, from a diagonal metric."""
    da_init, _, _ = dual_averaging_adaptation(0.8)  # the target enters only the updates
    mm_init, _, _ = mass_matrix_adaptation(diagonal)

    def init(x, initial_step_size, imm0):
        state = nuts.init(x, logdensity_flat)
        return state, initial_warmup_state(x, initial_step_size, imm0, diagonal=diagonal,
                                           da_init=da_init, mm_init=mm_init)

    return init


def initial_warmup_state(x, initial_step_size, imm0, *, diagonal, da_init, mm_init):
    """A chain's :class:`WarmupState` at flat position ``x`` from ``imm0``: (D,) variances,
    or (D, D) for a dense metric."""
    imm0 = jnp.asarray(imm0, x.dtype)
    imm = imm0 if (diagonal or imm0.ndim == 2) else jnp.diag(imm0)
    mm = mm_init(x.shape[0])._replace(inverse_mass_matrix=imm)
    return WarmupState(da_init(initial_step_size), mm,
                       jnp.asarray(initial_step_size, x.dtype), imm, imm)


def _make_adapt_fn(*, target_accept, diagonal, prior_count=SHRINKAGE_COUNT,
                   raise_diagonal=True, n_pop=0, spiked=False):
    """One warm-up update of a chain's step size and metric after a NUTS step.

    Dual averaging of the step size at every step; Welford's estimate of the metric in the
    slow windows (``stage == 1``); at a window's end the metric is replaced by the
    estimate and dual averaging restarts from the averaged step size (Stan's schedule).
    """
    da_init, da_update, da_final = dual_averaging_adaptation(target_accept)
    _, mm_update, mm_final = mass_matrix_adaptation(diagonal)

    def adapt(warm, acceptance_rate, position, stage, window_end):
        da = da_update(warm.da_state, acceptance_rate)
        mm = jax.lax.cond(stage == 1, lambda m: mm_update(m, position), lambda m: m,
                          warm.mm_state)
        warm = warm._replace(da_state=da, mm_state=mm, step_size=jnp.exp(da.log_step_size))

        def end_window(w):
            imm = regularised_metric(w.mm_state.wc_state, w.metric_target,
                                     diagonal=diagonal, prior_count=prior_count,
                                     raise_diagonal=raise_diagonal, n_pop=n_pop,
                                     spiked=spiked)
            m = mm_final(w.mm_state)._replace(inverse_mass_matrix=imm)  # resets Welford
            d = da_init(da_final(w.da_state))
            # diagonal: the next window shrinks towards this one's variances, so a poor
            # starting variance fades geometrically; dense: the target stays the
            # starting one (a full estimate as target, with its diagonal raised, would
            # lose its correlations)
            return w._replace(da_state=d, mm_state=m, step_size=jnp.exp(d.log_step_size),
                              inverse_mass_matrix=imm,
                              metric_target=imm if diagonal else w.metric_target)

        return jax.lax.cond(window_end, end_window, lambda w: w, warm)

    return adapt


def _step_record(info, state) -> dict:
    """What is kept of one NUTS step: its statistics and the new log density."""
    return {"is_divergent": info.is_divergent,
            "num_integration_steps": info.num_integration_steps,
            "num_trajectory_expansions": info.num_trajectory_expansions,
            "acceptance_rate": info.acceptance_rate, "energy": info.energy,
            "logdensity": state.logdensity}


def _strong(tree):
    """Every leaf without JAX's weak type, so that a chunk's output state has exactly the
    types of its input state and the next chunk reuses the compiled program."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def _to_sampling(warm: WarmupState) -> WarmupState:
    """A chain's sampling settings: the dual-averaging mean step size, the last metric."""
    return warm._replace(step_size=jnp.exp(warm.da_state.log_step_size_avg))


def _chunk_length(chunk_size: int, num_warmup: int, num_samples: int) -> int:
    """Steps per compiled chunk: a divisor of both phases' lengths when one is close to
    ``chunk_size``, so that every chunk has one length and the program compiles once."""
    chunk_size = max(int(chunk_size), 1)
    g = math.gcd(int(num_warmup), int(num_samples))
    if g == 0:
        return chunk_size
    best = max(d for d in range(1, min(g, chunk_size) + 1) if g % d == 0)
    return best if 4 * best >= min(chunk_size, max(num_warmup, num_samples)) else chunk_size


def run_nuts(rng_key, logdensity_fn: Callable, init_positions, *, num_warmup: int = 1000,
             num_samples: int = 1000, transform_fn: Callable | None = None,
             chunk_size: int = 100, max_num_doublings: int = 10,
             target_accept: float = 0.8, diagonal_mass_matrix: bool = True,
             initial_step_size: float = 0.1, initial_inverse_mass_matrix=None,
             metric_prior_count: float = SHRINKAGE_COUNT, metric_pop_dims: int = 0,
             spiked_metric: bool = False, progress: bool = False,
             checkpoint: str | Path | None = None,
             sharding: jax.sharding.NamedSharding | None = None) -> SamplerOutput:
    """Warm up and sample several NUTS chains (vmapped) in chunks.

    Parameters
    ----------
    rng_key : JAX key
    logdensity_fn : callable(position pytree) -> scalar
    init_positions : pytree whose leaves have a leading chain axis (C, ...)
    num_warmup, num_samples : steps per chain
    transform_fn : callable(position pytree) -> dict of arrays stored per draw
        (default: the position itself, flattened)
    chunk_size : steps per compiled scan (progress and checkpoint granularity)
    checkpoint : path; if given, the run state is saved after every chunk and a run with
        the same path resumes from it
    initial_inverse_mass_matrix : (D,) or (C, D) diagonal to start warm-up from (default
        the identity); a good one saves the first window from maximal trees when the
        coordinates' scales differ by orders of magnitude. With a dense metric it may be
        a full (D, D) or (C, D, D) matrix (e.g. :func:`clusterhbm.fit.laplace_metric`)
    metric_prior_count : how many draws the starting metric is worth when a window's
        estimate is shrunk towards it (:func:`regularised_metric`; default 5, Stan's).
        Measured on the 100-star CI mock (dense, 2 x 400 draws): bulk ESS 301-818 with 5,
        109-270 with the weight of D draws (``scripts/metric_check.py --variant count-d``)
    metric_pop_dims : with a dense metric, the number of leading flat coordinates that
        are population parameters, the rest conditionally independent given them: each
        window's covariance is then estimated in that factor form
        (:func:`factor_covariance`), full rank from a few tens of draws. Not the
        default: on the 100-star CI mock it shortened warm-up trajectories (39-55
        instead of 60-99 steps per draw) but gave log age a bulk ESS of 14 of 800 draws
        (the full estimate: 301), ``scripts/metric_check.py --variant factor``
    spiked_metric : with a dense metric, a window of fewer draws than dimensions is
        estimated as its diagonal plus the correlation directions above the noise
        (:func:`spiked_covariance`); for clusters of hundreds of stars, whose early
        windows are rank-deficient (``scripts/metric_check.py --variant spiked``)
    progress : show a tqdm bar
    sharding : optional ``NamedSharding`` over a mesh whose first partitioned axis splits
        the chains over devices (:func:`clusterhbm.parallel.chain_sharding`); the number
        of chains must be a multiple of that axis' size. None: JAX's default device.

    Returns
    -------
    SamplerOutput
    """
    first = jax.tree.map(lambda x: x[0], init_positions)
    _, unravel = ravel_pytree(first)
    flat0 = jax.vmap(lambda p: ravel_pytree(p)[0])(init_positions)
    n_chains, dim = flat0.shape
    chain_axis = _chain_axis(sharding, n_chains)

    def logdensity_flat(x):
        return logdensity_fn(unravel(x))

    transform = transform_fn if transform_fn is not None else (lambda p: {"position": p})

    def transform_flat(x):
        return transform(unravel(x))

    w_init = _make_init_fn(logdensity_flat, diagonal=diagonal_mass_matrix)
    full_start = (initial_inverse_mass_matrix is not None and not diagonal_mass_matrix
                  and np.ndim(initial_inverse_mass_matrix) >= 2
                  and np.shape(initial_inverse_mass_matrix)[-2:] == (dim, dim))
    adapt = _make_adapt_fn(target_accept=target_accept, diagonal=diagonal_mass_matrix,
                           prior_count=metric_prior_count, raise_diagonal=not full_start,
                           n_pop=int(metric_pop_dims), spiked=spiked_metric)
    kernel = _kernel()

    def chunk_local(states, warms, keys, stages, ends, adapting):
        """``len(keys)`` NUTS steps per chain: warm-up (``adapting``) or sampling.

        Both phases share this one compiled program (tracing and compiling a NUTS step
        of the model is most of a short run's cost): the kernel is called with the
        chain's current step size and metric, which warm-up then adapts and sampling
        keeps fixed.
        """
        def one(state, warm, ks):
            def body(carry, inp):
                s, w = carry
                k, stage, end = inp
                s, info = kernel(k, s, logdensity_flat, w.step_size, w.inverse_mass_matrix,
                                 max_num_doublings=max_num_doublings)
                w_new = adapt(w, info.acceptance_rate, s.position, stage, end)
                w = jax.tree.map(lambda a, b: jnp.where(adapting, a, b), w_new, w)
                return (s, w), (transform_flat(s.position), _step_record(info, s))

            carry, out = jax.lax.scan(body, (state, warm), (ks, stages, ends))
            return _strong(carry), out

        return jax.vmap(one)(states, warms, keys)

    if sharding is None:
        chunk = jax.jit(chunk_local)
    else:
        # check_vma=False: every device's chains are independent (no collectives), and the
        # warm-up's lax.cond on the replicated schedule mixes replicated and per-chain values
        by_chain, shared = jax.sharding.PartitionSpec(chain_axis), jax.sharding.PartitionSpec()
        chunk = jax.jit(jax.shard_map(
            chunk_local, mesh=sharding.mesh, in_specs=(by_chain,) * 3 + (shared,) * 3,
            out_specs=by_chain, check_vma=False))

    def place(tree):
        """Split the chain axis of every leaf over the mesh (no-op without sharding)."""
        if sharding is None:
            return tree
        return jax.device_put(tree, jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(chain_axis)))

    k_warm, k_samp = jax.random.split(rng_key)
    schedule = np.asarray(build_schedule(num_warmup)) if num_warmup > 0 else np.zeros((0, 2))
    step_len = _chunk_length(chunk_size, num_warmup, num_samples)
    ck = _Checkpoint(checkpoint, n_chains, dim)
    if initial_inverse_mass_matrix is None:
        imm0 = jnp.ones_like(flat0)
    elif full_start:
        imm0 = jnp.broadcast_to(jnp.asarray(initial_inverse_mass_matrix, flat0.dtype),
                                (n_chains, dim, dim))
    else:
        imm0 = jnp.broadcast_to(jnp.asarray(initial_inverse_mass_matrix, flat0.dtype),
                                flat0.shape)
    states, warms = jax.jit(jax.vmap(lambda x, m: _strong(w_init(x, initial_step_size, m))))(
        flat0, imm0)
    done_warm, done_samp, collected = 0, 0, []
    resumed = ck.load(states, warms)
    if resumed is not None:
        states, warms, done_warm, done_samp, collected = resumed
        log.info("resumed from %s at warm-up %d, draw %d", checkpoint, done_warm, done_samp)
    states, warms = place((states, warms))
    bar = _progress(progress, num_warmup + num_samples, done_warm + done_samp)
    t0 = time.perf_counter()
    wkeys = place(jax.random.split(k_warm, (n_chains, max(num_warmup, 1))))
    yes, no = jnp.asarray(True), jnp.asarray(False)
    first_chunk_s = None
    while done_warm < num_warmup:
        n = min(step_len, num_warmup - done_warm)
        sl = slice(done_warm, done_warm + n)
        tc = time.perf_counter()
        (states, warms), (_, wrecs) = chunk(
            states, warms, wkeys[:, sl], jnp.asarray(schedule[sl, 0], jnp.int32),
            jnp.asarray(schedule[sl, 1], bool), yes)
        jax.block_until_ready(states)
        first_chunk_s = first_chunk_s or time.perf_counter() - tc
        done_warm += n
        log.info("warm-up %d/%d: step size %.3g, %.0f leapfrog steps per draw, %d divergent, "
                 "%.0f s", done_warm, num_warmup, float(jnp.mean(warms.step_size)),
                 float(np.mean(wrecs["num_integration_steps"])),
                 int(np.sum(wrecs["is_divergent"])), time.perf_counter() - t0)
        ck.save(states, warms, done_warm, 0, [])
        bar.update(n)
        bar.set_postfix_str(f"warm-up, step size {float(jnp.mean(warms.step_size)):.3g}")
    t_warm = time.perf_counter() - t0
    if done_samp == 0 and num_warmup > 0:
        # sampling uses the dual-averaging mean step size and the last metric
        warms = place(jax.jit(jax.vmap(lambda w: _strong(_to_sampling(w))))(warms))
    skeys = place(jax.random.split(k_samp, (n_chains, max(num_samples, 1))))
    zeros = np.zeros(max(step_len, 1), np.int32)
    if collected and not isinstance(collected[0], tuple):  # resumed: rebuild the tree
        shapes = jax.eval_shape(chunk, states, warms, skeys[:, :1], jnp.asarray(zeros[:1]),
                                jnp.asarray(zeros[:1], bool), no)
        collected = [jax.tree.unflatten(jax.tree.structure(shapes[1]), collected[0])]
    t1 = time.perf_counter()
    first_samp_s = None
    while done_samp < num_samples:
        n = min(step_len, num_samples - done_samp)
        tc = time.perf_counter()
        (states, warms), (vals, recs) = chunk(
            states, warms, skeys[:, done_samp:done_samp + n], jnp.asarray(zeros[:n]),
            jnp.asarray(zeros[:n], bool), no)
        jax.block_until_ready(states)
        first_samp_s = first_samp_s or time.perf_counter() - tc
        collected.append(tuple(jax.tree.map(np.asarray, (vals, recs))))
        done_samp += n
        log.info("sampling %d/%d: %.0f leapfrog steps per draw, %d divergent, %.0f s",
                 done_samp, num_samples, float(np.mean(recs["num_integration_steps"])),
                 int(np.sum(recs["is_divergent"])), time.perf_counter() - t1)
        ck.save(states, warms, done_warm, done_samp, collected)
        bar.update(n)
        ndiv = sum(int(np.sum(c[1]["is_divergent"])) for c in collected)
        bar.set_postfix_str(f"sampling, {ndiv} divergent")
    bar.close()
    t_samp = time.perf_counter() - t1
    if collected:
        vals = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[c[0] for c in collected])
        recs = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[c[1] for c in collected])
    else:
        vals, recs = {}, {}
    timings = {"warmup_s": t_warm, "sampling_s": t_samp,
               "first_warmup_chunk_s": first_chunk_s or 0.0,
               "first_sampling_chunk_s": first_samp_s or 0.0}
    return SamplerOutput(samples=vals, info=recs, step_size=np.asarray(warms.step_size),
                         inverse_mass_matrix=np.asarray(warms.inverse_mass_matrix),
                         timings=timings,
                         final_positions=np.asarray(states.position))


def _chain_axis(sharding, n_chains: int):
    """The mesh axis name(s) that split the chains; validates the chain count."""
    if sharding is None:
        return None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding (see "
                        f"clusterhbm.parallel.chain_sharding), got {type(sharding).__name__}")
    spec = tuple(sharding.spec)
    if not spec or spec[0] is None:
        raise ValueError(f"sharding {sharding} does not partition the leading (chain) axis")
    axis = spec[0]
    names = axis if isinstance(axis, tuple) else (axis,)
    n_dev = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if n_chains % n_dev:
        raise ValueError(f"{n_chains} chains cannot be split evenly over {n_dev} devices; "
                         f"use a multiple of {n_dev} chains")
    return axis


def _progress(enabled, total, initial):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    class _Null:
        def update(self, n):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


class _Checkpoint:
    """Run state on disk (NumPy .npz): states, warm-up state, progress, draws so far."""

    def __init__(self, path, n_chains, dim):
        self.path = Path(path) if path else None
        self.shape = (n_chains, dim)

    def save(self, states, warms, done_warm, done_samp, collected):
        if self.path is None:
            return
        leaves = jax.tree.leaves((states, warms))
        arrays = {f"s{i}": np.asarray(x) for i, x in enumerate(leaves)}
        if collected:
            vals = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1),
                                *[c for c in collected])
            for i, x in enumerate(jax.tree.leaves(vals)):
                arrays[f"c{i}"] = x
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, done=np.array([done_warm, done_samp]),
                 shape=np.array(self.shape), **arrays)
        tmp.replace(self.path)

    def load(self, states, warms):
        if self.path is None or not self.path.exists():
            return None
        try:
            z = np.load(self.path, allow_pickle=False)
            if tuple(z["shape"]) != self.shape:
                raise ValueError(f"checkpoint {self.path} is for chains x dims "
                                 f"{tuple(z['shape'])}, this run has {self.shape}")
            leaves, treedef = jax.tree.flatten((states, warms))
            new = [jnp.asarray(z[f"s{i}"]) for i in range(len(leaves))]
            states, warms = jax.tree.unflatten(treedef, new)
            done_warm, done_samp = (int(v) for v in z["done"])
            collected = []
            if done_samp:  # the warm-up state then holds the sampling step size and metric
                ckeys = sorted((k for k in z.files if k.startswith("c")),
                               key=lambda k: int(k[1:]))
                collected = [[z[k] for k in ckeys]]  # leaves; tree rebuilt by caller
            return states, warms, done_warm, done_samp, collected
        except (OSError, KeyError) as exc:
            raise ValueError(f"checkpoint {self.path} is unreadable: {exc}") from exc
