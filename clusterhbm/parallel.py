"""Several devices and many clusters: chains split over devices, clusters fitted in batches.

Two ways to use more hardware, both built on JAX's own sharding (``jax.sharding.Mesh``,
``NamedSharding``, ``PartitionSpec`` and :func:`jax.shard_map`):

* **Chains over devices.** :func:`chain_sharding` returns a ``NamedSharding`` that splits
  the chain axis over a 1-D mesh of devices; pass it to
  :func:`clusterhbm.sampling.run_nuts` as ``sharding=``. Each device runs its own chains
  (vmapped) and nothing is communicated inside a trajectory. The draws equal those of the
  single-device run with the same key up to floating-point rounding (the per-chain keys
  are drawn before they are split; XLA may round differently at a different batch width,
  which in float32 can occasionally flip a NUTS accept or U-turn decision and so change a
  chain's path; in float64 the runs agree to ~1e-10, see ``tests/test_parallel.py``).
* **Many clusters in one program.** :func:`fit_many` pads every cluster to a common
  number of stars, vmaps NUTS over clusters (and over chains inside each cluster) with the
  masked log density :func:`masked_log_density` (a padded star contributes a standard
  normal in each of its coordinates and nothing else, so it does not touch the cluster's
  posterior), and optionally splits the clusters over devices. One compilation serves the
  whole batch, so a census of clusters costs one compile instead of one per cluster.

Several hosts
-------------
The same code runs on a multi-host mesh (e.g. several GPU nodes). Start one Python process
per host and, before anything else touches JAX, call::

    import jax
    jax.distributed.initialize(coordinator_address="host0:1234",
                               num_processes=N_HOSTS, process_id=RANK)
    # (on SLURM or Cloud TPU the arguments are discovered automatically:
    #  jax.distributed.initialize())

``jax.devices()`` then lists every device of every host, and
``chain_sharding(n_chains)`` / ``fit_many(..., devices=jax.devices())`` build a mesh over
all of them. Every process must run the same program with the same arguments (same key,
same catalogues); each host computes its own chains or clusters and the draws are
gathered to the host arrays returned (``np.asarray`` of a global array needs it to be
fully addressable: on several hosts, gather with
``jax.experimental.multihost_utils.process_allgather`` first, or have each process keep
``array.addressable_shards``). Nothing here has been run on more than one host yet.

Everything under the sampler is a pure function of arrays (jit, vmap and grad freely);
only :func:`fit_many` and the host loop of :func:`run_nuts_batch` have side effects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
from blackjax.adaptation.step_size import dual_averaging_adaptation
from blackjax.adaptation.window_adaptation import build_schedule
from blackjax.mcmc import nuts
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .model import (
    ModelConfig,
    Priors,
    StarData,
    log_density_star,
    log_prior_population,
    population_values,
)
from .sampling import (
    SamplerOutput,
    _chunk_length,
    _kernel,
    _make_adapt_fn,
    _progress,
    _step_record,
    _strong,
    _to_sampling,
    initial_warmup_state,
)

__all__ = [
    "CHAIN_AXIS",
    "CLUSTER_AXIS",
    "BatchOutput",
    "batch_curvature_metric",
    "chain_sharding",
    "device_mesh",
    "fit_many",
    "make_masked_logdensity_fn",
    "masked_log_density",
    "pad_star_data",
    "pad_star_positions",
    "run_nuts_batch",
]

log = logging.getLogger(__name__)

#: mesh axis name for chains
CHAIN_AXIS = "chain"
#: mesh axis name for clusters (batch mode)
CLUSTER_AXIS = "cluster"


# --------------------------------------------------------------------------- meshes


def device_mesh(devices: Sequence | None = None, axis_name: str = CHAIN_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("device_mesh needs at least one device")
    return Mesh(np.array(devices), (axis_name,))


def chain_sharding(n_chains: int, devices: Sequence | None = None,
                   axis_name: str = CHAIN_AXIS) -> NamedSharding:
    """A sharding that splits a leading chain axis of ``n_chains`` over ``devices``.

    Parameters
    ----------
    n_chains : number of chains; must be a multiple of the number of devices
    devices : devices of the mesh (default: all of ``jax.devices()``, which on several
        hosts after ``jax.distributed.initialize`` are all devices of all hosts)
    axis_name : name of the mesh axis

    Returns
    -------
    NamedSharding with ``PartitionSpec(axis_name)``, for
    :func:`clusterhbm.sampling.run_nuts` ``(sharding=...)``.

    Raises
    ------
    ValueError
        when the chains do not divide evenly over the devices.
    """
    mesh = device_mesh(devices, axis_name)
    n_dev = mesh.devices.size
    if int(n_chains) < 1 or int(n_chains) % n_dev:
        raise ValueError(f"{n_chains} chains cannot be split evenly over {n_dev} devices; "
                         f"use a positive multiple of {n_dev} chains")
    return NamedSharding(mesh, PartitionSpec(axis_name))


# --------------------------------------------------------------------------- padding


def pad_star_data(data: StarData, n_stars: int) -> tuple[StarData, jax.Array]:
    """Pad every per-star field of ``data`` to ``n_stars`` rows.

    Padded rows repeat star 0's data (so that evaluating them gives finite numbers; the
    mask removes them from the density). Fields that are None stay None.

    Returns
    -------
    (padded StarData, mask (n_stars,) bool: True for real stars)
    """
    n = int(data.mag.shape[0])
    if n < 1:
        raise ValueError("a cluster needs at least one star")
    if n_stars < n:
        raise ValueError(f"cannot pad {n} stars to fewer ({n_stars})")
    pad = n_stars - n

    def one(x):
        if x is None:
            return None
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)

    padded = StarData(*[one(x) for x in data])
    mask = jnp.arange(n_stars) < n
    return padded, mask


def pad_star_positions(star: dict, n_stars: int, fill: float = 0.0) -> dict:
    """Pad every per-star coordinate (leading axis N) to ``n_stars`` with ``fill``."""
    out = {}
    for k, x in star.items():
        x = jnp.asarray(x)
        pad = n_stars - x.shape[0]
        if pad < 0:
            raise ValueError(f"cannot pad {x.shape[0]} stars to fewer ({n_stars})")
        out[k] = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return out


# --------------------------------------------------------------------------- masked model


def masked_log_density(position: dict, data: StarData, mask, grid, config: ModelConfig,
                       priors: Priors):
    """The log density of a padded cluster: real stars as in the model, padded ones N(0, 1).

        log p = log p(phi) + sum_i [ mask_i  log p(theta_i, D_i | phi)
                                    + (1 - mask_i) (-1/2) sum_k theta_ik^2 ]

    A padded star is evaluated at star 0's coordinates (gradient stopped) with star 0's
    data (:func:`pad_star_data`), so its model terms are finite; they are then replaced
    by the standard-normal term of its own coordinates. Padded stars therefore add a
    density that does not depend on the population parameters: the value equals
    :func:`clusterhbm.model.log_density` of the unpadded cluster plus
    ``-1/2 sum(padded coordinates^2)``, and the gradient with respect to the population
    and to real stars is unchanged.

    Parameters
    ----------
    position : ``{"pop": {...}, "star": {k: (N_pad,)}}`` (the model's layout)
    data : StarData padded to N_pad rows; mask : (N_pad,) bool, True for real stars
    """
    pop, star = position["pop"], position["star"]
    popv = population_values(pop, config, priors)
    lp = log_prior_population(pop, config, priors, grid)
    if getattr(config, "selection", False):  # as clusterhbm.model.log_density does
        from .model import log_p_detect

        popv["log_p_detect"] = log_p_detect(popv, grid, config, priors)
    safe = {k: jax.lax.stop_gradient(v[0]) for k, v in star.items()}
    star_eval = {k: jnp.where(mask, v, safe[k]) for k, v in star.items()}
    per_star = jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
        star_eval, popv, tuple(data), grid, config, priors)
    z2 = sum(v ** 2 for v in star.values())
    return lp + jnp.sum(jnp.where(mask, per_star, -0.5 * z2))


def make_masked_logdensity_fn(grid, config: ModelConfig, priors: Priors | None = None):
    """``logdensity_fn(position, (data, mask))`` of one padded cluster, for vmapping."""
    priors = Priors() if priors is None else priors

    def logdensity_fn(position, cluster):
        data, mask = cluster
        return masked_log_density(position, data, mask, grid, config, priors)

    return logdensity_fn


# --------------------------------------------------------------------------- batch NUTS


class BatchOutput(NamedTuple):
    """What :func:`run_nuts_batch` returns (host arrays; leading axes cluster, chain).

    samples : dict of name -> (K, C, S, ...) from ``transform_fn``
    info : dict of NUTS statistics, each (K, C, S)
    step_size : (K, C); inverse_mass_matrix : (K, C, D) or (K, C, D, D)
    timings : seconds (``warmup_s``, ``sampling_s``, first chunks incl. compilation)
    final_positions : (K, C, D) flat positions
    """

    samples: dict
    info: dict
    step_size: np.ndarray
    inverse_mass_matrix: np.ndarray
    timings: dict
    final_positions: np.ndarray


def run_nuts_batch(rng_key, logdensity_fn: Callable, cluster_args, init_positions, *,
                   num_warmup: int = 1000, num_samples: int = 1000,
                   transform_fn: Callable | None = None, chunk_size: int = 100,
                   max_num_doublings: int = 10, target_accept: float = 0.8,
                   diagonal_mass_matrix: bool = True, initial_step_size: float = 0.1,
                   initial_inverse_mass_matrix=None,
                   sharding: NamedSharding | None = None,
                   progress: bool = False) -> BatchOutput:
    """NUTS with window adaptation on K problems x C chains in one compiled program.

    The same algorithm as :func:`clusterhbm.sampling.run_nuts` (each chain adapts its own
    step size and mass matrix), vmapped over chains and then over problems. Warm-up and
    sampling share one compiled chunk function (the adaptation is switched off by a
    flag), and the chunk length divides both phases where it can
    (:func:`clusterhbm.sampling.run_nuts`), so a run compiles the NUTS kernel once.

    Parameters
    ----------
    rng_key : JAX key
    logdensity_fn : callable(position, args) -> scalar, where ``args`` is one problem's
        slice of ``cluster_args``
    cluster_args : pytree whose leaves have a leading problem axis (K, ...)
    init_positions : pytree whose leaves have leading axes (K, C, ...)
    transform_fn : callable(position, args) -> dict stored per draw (default: position)
    initial_inverse_mass_matrix : optional diagonal (K, D) or (K, C, D) to start warm-up
        from (default the identity), e.g. from :func:`batch_curvature_metric`
    sharding : optional ``NamedSharding`` whose leading partitioned axis splits the K
        problems over devices (K must be a multiple of the number of devices), e.g.
        ``NamedSharding(device_mesh(axis_name=CLUSTER_AXIS), PartitionSpec(CLUSTER_AXIS))``
    num_warmup, num_samples, chunk_size, max_num_doublings, target_accept,
    diagonal_mass_matrix, initial_step_size, progress : as in ``run_nuts``

    Returns
    -------
    BatchOutput
    """
    first = jax.tree.map(lambda x: x[0, 0], init_positions)
    _, unravel = ravel_pytree(first)
    flat0 = jax.vmap(jax.vmap(lambda p: ravel_pytree(p)[0]))(init_positions)
    n_prob, n_chains, _ = flat0.shape
    n_args = {int(x.shape[0]) for x in jax.tree.leaves(cluster_args)}
    if n_args != {n_prob}:
        raise ValueError(f"cluster_args have leading sizes {sorted(n_args)}, positions "
                         f"{n_prob}")
    axis = None
    if sharding is not None:
        axis = sharding.spec[0]
        n_dev = int(np.prod([sharding.mesh.shape[a] for a in
                             (axis if isinstance(axis, tuple) else (axis,))]))
        if n_prob % n_dev:
            raise ValueError(f"{n_prob} problems cannot be split evenly over {n_dev} "
                             f"devices; use a multiple of {n_dev} (pad with copies)")
    transform = transform_fn if transform_fn is not None else (
        lambda p, a: {"position": p})
    kernel = _kernel()
    da_init, _, _ = dual_averaging_adaptation(target_accept)
    mm_init, _, _ = mass_matrix_adaptation(diagonal_mass_matrix)
    adapt = _make_adapt_fn(target_accept=target_accept, diagonal=diagonal_mass_matrix)

    if initial_inverse_mass_matrix is None:
        imm0 = jnp.ones_like(flat0)
    else:
        imm0 = jnp.asarray(initial_inverse_mass_matrix, flat0.dtype)
        if imm0.ndim == 2:
            imm0 = jnp.broadcast_to(imm0[:, None, :], flat0.shape)
        if imm0.shape != flat0.shape:
            raise ValueError(f"initial_inverse_mass_matrix has shape {imm0.shape}, expected "
                             f"(K, D) or (K, C, D) = {flat0.shape}")

    def init_all(flat, args, imm):
        def per_problem(x, a, m):
            def ld(y):
                return logdensity_fn(unravel(y), a)

            def one(xi, mi):
                return _strong((nuts.init(xi, ld), initial_warmup_state(
                    xi, initial_step_size, mi, diagonal=diagonal_mass_matrix,
                    da_init=da_init, mm_init=mm_init)))

            return jax.vmap(one)(x, m)

        return jax.vmap(per_problem)(flat, args, imm)

    def chunk_local(states, warms, keys, args, stages, ends, adapting):
        """Warm-up (``adapting``) or sampling steps: one compiled program for both phases.

        The NUTS kernel is called once per step with the chain's current step size and
        metric; during warm-up these are then adapted, during sampling they stay fixed.
        """
        def per_problem(st, wa, ks, a):
            def ld(y):
                return logdensity_fn(unravel(y), a)

            def one(s0, w0, kk):
                def body(carry, inp):
                    s, w = carry
                    k, stage, end = inp
                    s, info = kernel(k, s, ld, w.step_size, w.inverse_mass_matrix,
                                     max_num_doublings=max_num_doublings)
                    w_new = adapt(w, info.acceptance_rate, s.position, stage, end)
                    w = jax.tree.map(lambda x, y: jnp.where(adapting, x, y), w_new, w)
                    return (s, w), (transform(unravel(s.position), a), _step_record(info, s))

                carry, out = jax.lax.scan(body, (s0, w0), (kk, stages, ends))
                return _strong(carry), out

            return jax.vmap(one)(st, wa, ks)

        return jax.vmap(per_problem)(states, warms, keys, args)

    if sharding is None:
        chunk = jax.jit(chunk_local)

        def place(tree):
            return tree
    else:
        by, rep = PartitionSpec(axis), PartitionSpec()
        # problems are independent: no collectives, so the VMA check is not needed
        chunk = jax.jit(jax.shard_map(chunk_local, mesh=sharding.mesh,
                                      in_specs=(by,) * 4 + (rep,) * 3, out_specs=by,
                                      check_vma=False))
        placement = NamedSharding(sharding.mesh, by)

        def place(tree):
            return jax.device_put(tree, placement)

    k_warm, k_samp = jax.random.split(rng_key)
    schedule = np.asarray(build_schedule(num_warmup)) if num_warmup > 0 else np.zeros((0, 2))
    step_len = _chunk_length(chunk_size, num_warmup, num_samples)
    args = place(cluster_args)
    states, warms = place(jax.jit(init_all)(flat0, cluster_args, imm0))
    wkeys = place(jax.random.split(k_warm, (n_prob, n_chains, max(num_warmup, 1))))
    bar = _progress(progress, num_warmup + num_samples, 0)
    t0 = time.perf_counter()
    first_warm = first_samp = None
    done = 0
    yes, no = jnp.asarray(True), jnp.asarray(False)
    while done < num_warmup:
        n = min(step_len, num_warmup - done)
        tc = time.perf_counter()
        (states, warms), _ = chunk(states, warms, wkeys[:, :, done:done + n], args,
                                   jnp.asarray(schedule[done:done + n, 0], jnp.int32),
                                   jnp.asarray(schedule[done:done + n, 1], bool), yes)
        jax.block_until_ready(states)
        first_warm = first_warm or time.perf_counter() - tc
        done += n
        bar.update(n)
    t_warm = time.perf_counter() - t0
    if num_warmup > 0:  # else: the initial step size and the unit metric
        warms = place(jax.jit(jax.vmap(jax.vmap(lambda w: _strong(_to_sampling(w)))))(warms))
    skeys = place(jax.random.split(k_samp, (n_prob, n_chains, max(num_samples, 1))))
    t1 = time.perf_counter()
    collected, done = [], 0
    zeros_i = np.zeros(max(step_len, 1), np.int32)
    while done < num_samples:
        n = min(step_len, num_samples - done)
        tc = time.perf_counter()
        (states, warms), (vals, recs) = chunk(
            states, warms, skeys[:, :, done:done + n], args, jnp.asarray(zeros_i[:n]),
            jnp.asarray(zeros_i[:n], bool), no)
        jax.block_until_ready(states)
        first_samp = first_samp or time.perf_counter() - tc
        collected.append(jax.tree.map(np.asarray, (vals, recs)))
        done += n
        bar.update(n)
    bar.close()
    t_samp = time.perf_counter() - t1
    if collected:
        vals, recs = jax.tree.map(lambda *xs: np.concatenate(xs, axis=2), *collected)
    else:
        vals, recs = {}, {}
    timings = {"warmup_s": t_warm, "sampling_s": t_samp,
               "first_warmup_chunk_s": first_warm or 0.0,
               "first_sampling_chunk_s": first_samp or 0.0}
    return BatchOutput(samples=vals, info=recs, step_size=np.asarray(warms.step_size),
                       inverse_mass_matrix=np.asarray(warms.inverse_mass_matrix),
                       timings=timings, final_positions=np.asarray(states.position))


# --------------------------------------------------------------------------- fit_many


def batch_curvature_metric(logdensity_fn: Callable, positions, cluster_args):
    """Starting diagonal metrics (K, D) of K problems, from each one's curvature.

    :func:`clusterhbm.fit.curvature_inverse_metric` vmapped over problems: one compiled
    program for the whole batch. ``logdensity_fn(position, args)``; ``positions`` and
    ``cluster_args`` have a leading problem axis.
    """
    from .fit import curvature_diagonal, metric_from_curvature

    def one(pos, args):
        return curvature_diagonal(lambda p: logdensity_fn(p, args), pos)

    return metric_from_curvature(jax.jit(jax.vmap(one))(positions, cluster_args))



def _optimise_batch(logdensity_fn, positions, cluster_args, *, num_steps: int,
                    learning_rate: float = 0.02):
    """:func:`clusterhbm.fit.adam_best` on every problem at once (vmapped, one program)."""
    from .fit import adam_best

    def run_one(position, args):
        return adam_best(lambda p: logdensity_fn(p, args), position, num_steps=num_steps,
                         learning_rate=learning_rate)

    return jax.jit(jax.vmap(run_one))(positions, cluster_args)


def fit_many(catalogues: Sequence, *, num_chains: int = 4, num_warmup: int = 1000,
             num_samples: int = 1000, seed: int = 0, fit_widths=False, cubic: bool = False,
             fit_parallax_zp: bool = False, imf: str = "kroupa",
             priors: Priors | None = None, grid=None, pad_to: int | None = None,
             inits: Sequence[dict | None] | None = None,
             truths: Sequence[dict | None] | None = None, optimise_steps: int = 300,
             n_starts: int = 5,
             dense_mass_matrix: bool | None = None, chunk_size: int = 100,
             max_num_doublings: int = 10, target_accept: float = 0.8,
             use_parallax: bool = True, pseudo_mass_eps: float = 3e-3,
             devices: Sequence | None = None, progress: bool = False) -> list:
    """Fit K clusters in one compiled program (pooled model, one config for all).

    Each catalogue is prepared and initialised as in :func:`clusterhbm.fit.fit_cluster`
    (initial guess per cluster; Adam on the start for all clusters at once), padded to a
    common number of stars (``pad_to``, default the largest cluster), and sampled by
    :func:`run_nuts_batch` with :func:`masked_log_density`.

    Parameters
    ----------
    catalogues : sequence of astropy Tables (one Gaia release for all: same bands)
    num_chains, num_warmup, num_samples, seed : sampler sizes and randomness
    fit_widths, cubic, fit_parallax_zp, imf, priors, pseudo_mass_eps : model options (as
        in ``fit_cluster``); the mixture options (binaries, field, selection) are not
        offered in batch mode
    pad_to : stars per padded cluster (>= the largest cluster); fixing it across calls
        (e.g. a power of two) reuses the compiled program
    inits, truths : optional per-cluster starting values and true values
    optimise_steps : Adam steps on the start (0: none)
    n_starts : starts per cluster (:func:`clusterhbm.fit.start_candidates`); all clusters'
        starts are optimised in one vmapped program and each keeps its best
    dense_mass_matrix : default dense when the padded dimension is <= 4000
    devices : if given and more than one, the clusters are split over these devices (K
        must be a multiple of their number)
    progress : tqdm bar

    Returns
    -------
    list of :class:`clusterhbm.results.FitResult`, one per catalogue, in order; star
    arrays hold the real stars only. ``timings`` are those of the whole batch.
    """
    from .fit import (
        derived_quantities,
        initial_guess,
        initial_positions,
        prepare_data,
        start_candidates,
        width_flags,
    )
    from .grid import band_indices, load_grid
    from .results import FitResult

    t_start = time.perf_counter()
    catalogues = list(catalogues)
    n_clusters = len(catalogues)
    if n_clusters < 1:
        raise ValueError("fit_many needs at least one catalogue")
    for name, v in (("num_chains", num_chains), ("num_samples", num_samples)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    inits = list(inits) if inits is not None else [None] * n_clusters
    truths = list(truths) if truths is not None else [None] * n_clusters
    if len(inits) != n_clusters or len(truths) != n_clusters:
        raise ValueError(f"inits and truths need one entry per catalogue ({n_clusters})")
    grid = load_grid() if grid is None else grid
    priors = Priors() if priors is None else priors
    fit_widths = width_flags(fit_widths)

    fds = [prepare_data(c, use_parallax=use_parallax) for c in catalogues]
    bands = {fd.bands for fd in fds}
    if len(bands) != 1:
        raise ValueError(f"all catalogues must share one photometric system; got {bands}")
    band_idx = band_indices(fds[0].bands)
    sizes = [int(fd.data.mag.shape[0]) for fd in fds]
    n_pad = max(sizes) if pad_to is None else int(pad_to)
    if n_pad < max(sizes):
        raise ValueError(f"pad_to={n_pad} is smaller than the largest cluster ({max(sizes)})")
    config = ModelConfig(band_idx=band_idx, pooled=True, fit_widths=fit_widths, cubic=cubic,
                         fit_parallax_zp=fit_parallax_zp, imf=imf,
                         pseudo_mass_eps=pseudo_mass_eps)
    n_dim = n_pad * (1 + sum(fit_widths)) + 8 + int(fit_parallax_zp)
    if dense_mass_matrix is None:
        dense_mass_matrix = n_dim <= 4000
    key = jax.random.key(seed)
    k_init, k_jit, k_run = jax.random.split(key, 3)

    # per-cluster guess (the initial-guess scan compiles once per distinct cluster size)
    # (the initial-guess scan compiles once per distinct cluster size); every cluster gets
    # the same number of candidate starts (repeated when its neighbours coincide)
    n_starts = max(int(n_starts), 1) if optimise_steps else 1
    cands, datas, masks = [], [], []
    for k, fd in enumerate(fds):
        guess, eep0 = initial_guess(fd.data, grid, band_idx, init=inits[k])
        c = start_candidates(fd.data, grid, band_idx, guess, eep0, init=inits[k],
                             n_starts=n_starts)
        cands.append((c + [c[0]] * n_starts)[:n_starts])
        data, mask = pad_star_data(StarData(*fd.data), n_pad)
        datas.append(data)
        masks.append(mask)

    def stack(trees):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    cluster_args = (stack(datas), jnp.stack(masks))
    # problems = clusters x starts, cluster-major
    flat = [(k, g, e) for k in range(n_clusters) for g, e in cands[k]]
    eeps = [np.concatenate([e, np.full(n_pad - e.size, e[0])]) for _, _, e in flat]
    rep = np.repeat(np.arange(n_clusters), n_starts)
    start_args = jax.tree.map(lambda x: x[rep], cluster_args)
    # starting positions of all problems in one compiled call; padded stars start at 0
    dt = jnp.zeros(()).dtype
    values = {k: jnp.asarray([float(g[k]) for _, g, _ in flat], dt)
              for k in ("log_age", "feh", "distance_pc", "av_mag")}

    def start(vals, eep, mask, g):
        pos = initial_positions(k_init, vals, eep, config, 1, grid=g, jitter=0.0)
        pos = jax.tree.map(lambda x: x[0], pos)
        return {"pop": pos["pop"],
                "star": {kk: jnp.where(mask, v, 0.0) for kk, v in pos["star"].items()}}

    positions = jax.jit(jax.vmap(start, in_axes=(0, 0, 0, None)))(
        values, jnp.asarray(np.stack(eeps), dt), start_args[1], grid)
    ld = make_masked_logdensity_fn(grid, config, priors)
    best = np.zeros(n_clusters, int)
    if optimise_steps:
        positions, loss = _optimise_batch(ld, positions, start_args,
                                          num_steps=optimise_steps)
        loss = np.asarray(loss).reshape(n_clusters, n_starts)
        best = np.argmin(np.where(np.isfinite(loss), loss, np.inf), axis=1)
        log.info("optimised starts: -log density %s (best of %d per cluster)",
                 np.round(loss[np.arange(n_clusters), best], 1), n_starts)
        n_local = int(np.sum(best > 0))
        if n_starts > 1:
            log.info("%d of %d clusters were best started off the scan's age", n_local,
                     n_clusters)
    pick = np.arange(n_clusters) * n_starts + best
    positions = jax.tree.map(lambda x: x[pick], positions)
    guesses = [cands[k][int(best[k])][0] for k in range(n_clusters)]
    jit_scale = 1e-3
    ckeys = jax.random.split(k_jit, num_chains)
    inits_kc = jax.vmap(lambda kk: jax.tree.map(
        lambda x: x + jit_scale * jax.random.normal(kk, x.shape, x.dtype), positions),
        out_axes=1)(ckeys)

    sharding = None
    if devices is not None and len(devices) > 1:
        mesh = device_mesh(devices, CLUSTER_AXIS)
        sharding = NamedSharding(mesh, PartitionSpec(CLUSTER_AXIS))

    def transform(p, args):
        return derived_quantities(p, grid, config, priors)

    imm0 = batch_curvature_metric(ld, positions, cluster_args)
    t_init = time.perf_counter() - t_start
    out = run_nuts_batch(k_run, ld, cluster_args, inits_kc, num_warmup=num_warmup,
                         initial_inverse_mass_matrix=imm0,
                         num_samples=num_samples, transform_fn=transform,
                         chunk_size=chunk_size, max_num_doublings=max_num_doublings,
                         target_accept=target_accept,
                         diagonal_mass_matrix=not dense_mass_matrix, sharding=sharding,
                         progress=progress)
    wall = time.perf_counter() - t_start
    timings = dict(out.timings, init_s=t_init, wall_s=wall, n_clusters=n_clusters)
    results = []
    for k, fd in enumerate(fds):
        n = sizes[k]
        samples = {"pop": {name: v[k] for name, v in out.samples["pop"].items()},
                   "star": {name: v[k][..., :n] for name, v in out.samples["star"].items()}}
        sub = SamplerOutput(samples=samples, info={n_: v[k] for n_, v in out.info.items()},
                            step_size=out.step_size[k],
                            inverse_mass_matrix=out.inverse_mass_matrix[k],
                            timings=timings, final_positions=out.final_positions[k])
        settings = {
            "num_chains": num_chains, "num_warmup": num_warmup, "num_samples": num_samples,
            "seed": seed, "pooled": True, "fit_widths": list(fit_widths), "cubic": cubic,
            "fit_parallax_zp": fit_parallax_zp, "imf": imf, "bands": list(fd.bands),
            "gaia_release": fd.release, "max_num_doublings": max_num_doublings,
            "target_accept": target_accept, "use_parallax": use_parallax,
            "dense_mass_matrix": dense_mass_matrix, "pseudo_mass_eps": pseudo_mass_eps,
            "priors": {kk: float(v) for kk, v in priors._asdict().items()},
            "initial_guess": guesses[k],
            "batch": {"n_clusters": n_clusters, "index": k, "pad_to": n_pad,
                      "n_stars": n, "sharded_over_devices": 0 if sharding is None
                      else int(sharding.mesh.devices.size)},
        }
        results.append(FitResult.from_sampler(sub, source_id=fd.source_id, settings=settings,
                                              timings=timings, truth=truths[k]))
    return results
