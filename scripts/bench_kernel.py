"""Throughput of the model kernel: log density + gradient of the real hierarchical model.

Measures, on JAX's default backend (or ``--device cpu|gpu``):

* ``jax.vmap(jax.value_and_grad(logdensity_fn))`` over C chains of the full log density
  (:func:`clusterhbm.model.make_logdensity_fn`, pooled, linear interpolation, G/BP/RP +
  parallax) on a simulated M67-like catalogue (log age 9.6, [Fe/H] 0, 850 pc, A_V 0.1, no
  binaries or field stars), with the widths fitted (5 coordinates per star) and not
  (1 coordinate per star), for N in {1e2, 1e3, 1e4, 1e5} stars x C in {1, 8, 64, 512}
  chains. Reported: log-density-gradient evaluations per second (C / t) and
  star-gradients per second (C N / t). Combinations with C N above ``--max-work``
  (default 2e6 on a CPU, 6.4e7 on a GPU) are skipped and listed as skipped.
* an analytic count of the bytes one star-gradient reads from the grid tables
  (:func:`bytes_per_star_gradient`; documented there) and the resulting achieved GB/s,
  against the device's copy bandwidth measured with a large ``x + 1`` (read + write);
  also XLA's scratch allocation per star-gradient (``compiled.memory_analysis()``: the
  reverse pass's residuals and intermediates, each written and read at least once), and
  the GB/s counting it twice;
* a profile of one star-gradient split into its pieces (``--profile``, default on): the
  pseudo-mass -> EEP bisection, the isochrone interpolation, the mass prior (dm/dEEP by a
  JVP, the isochrone's end, the IMF and its CDF), the bolometric-correction table, and the
  rest (A_V's truncated normal, likelihood); each is timed alone as
  ``vmap(value_and_grad)`` over N stars.

Positions: the true per-star values of the mock (pseudo-mass ``m + 3e-3 EEP``, z = 0),
widths 0.01 dex / 0.005 d / 0.01 mag, each chain jittered by 1e-3 so chains differ.

Timing: ahead-of-time compile time separately; then one warm-up call and at least
``--repeats`` calls (and at least 0.3 s); the headline rate uses the best call (the
machine may be shared with other jobs and contention only adds time; the median is
recorded too). float32 by default; ``--dtype float64``
enables ``jax_enable_x64``; ``--dtype both`` runs float64 in a subprocess.

Writes ``benchmarks/results/bench_kernel_<platform>_<dtype>[_<tag>].json``: one record per
measurement, each with the device, n_stars, n_chains, dtype, star_gradients_per_s, the
jax/jaxlib/blackjax versions and the load average.

Rerun (from the repository root)::

    python scripts/bench_kernel.py --dtype both          # CPU: ~10 minutes on 2 cores
    python scripts/bench_kernel.py --quick                # N <= 1e3, C <= 8
    python scripts/bench_kernel.py --device gpu --dtype both   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = (100, 1000, 10_000, 100_000)
CHAINS = (1, 8, 64, 512)
CLUSTER = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
BANDS = ("G", "BP", "RP")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


# --------------------------------------------------------------------------- set-up


def select_device(device: str | None, x64: bool) -> None:
    """Pick the backend and precision; must run before JAX is first used."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif device == "gpu":
        os.environ["JAX_PLATFORMS"] = "cuda"
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)


def environment() -> dict:
    """Device, versions and load average, for every JSON record."""
    import blackjax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return {
        "device": str(dev), "platform": dev.platform, "device_kind": dev.device_kind,
        "n_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "blackjax": blackjax.__version__, "loadavg": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **source_state(),
    }


def source_state() -> dict:
    """Git commit and the hash of model.py (the model may change between commits)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "clusterhbm/model.py"],
                               cwd=root, capture_output=True, text=True,
                               check=False).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    model = root / "clusterhbm" / "model.py"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12] if model.exists() else ""
    return {"git_head": head, "model_py_modified": bool(dirty), "model_py_sha256": digest}


def mock_problem(n_stars: int, *, fit_widths: bool, seed: int = 1, sim=None):
    """A simulated M67-like cluster and the model at its true per-star values.

    Returns
    -------
    dict with ``data`` (StarData), ``grid``, ``config``, ``priors``, ``position`` (one
    position pytree at the truth), ``logdensity_fn`` and ``sim`` (the SimulatedCluster,
    reusable for a smaller N: the first ``n_stars`` rows are used).
    """
    import jax.numpy as jnp
    import numpy as np

    from clusterhbm.fit import prepare_data
    from clusterhbm.grid import band_indices, load_grid
    from clusterhbm.model import (
        ModelConfig,
        Priors,
        StarData,
        make_logdensity_fn,
        pop_to_unconstrained,
        star_position_keys,
    )
    from clusterhbm.simulate import ClusterParams, simulate_cluster

    grid = load_grid()
    if sim is None or len(sim.catalogue) < n_stars:
        sim = simulate_cluster(ClusterParams(**CLUSTER), n_stars=n_stars, seed=seed, grid=grid)
    fd = prepare_data(sim.catalogue[:n_stars])
    if fd.data.mag.shape[0] != n_stars:
        raise RuntimeError(f"prepare_data kept {fd.data.mag.shape[0]} of {n_stars} stars")
    data = StarData(*fd.data)
    widths = (fit_widths,) * 4
    config = ModelConfig(band_idx=band_indices(BANDS), pooled=True, fit_widths=widths)
    priors = Priors()
    truth = sim.truth[fd.rows]
    dt = jnp.zeros(()).dtype
    pop_vals = dict(CLUSTER, sigma_log_age=0.01, sigma_feh=0.01,
                    sigma_distance_pc=0.005 * CLUSTER["distance_pc"], sigma_av_mag=0.01)
    pop = {k: jnp.asarray(v, dt) for k, v in pop_to_unconstrained(pop_vals, config).items()}
    s = np.asarray(truth["mass_msun"], float) + config.pseudo_mass_eps * np.asarray(
        truth["eep"], float)
    star = {"s": jnp.asarray(s, dt)}
    for k in star_position_keys(config)[1:]:
        star[k] = jnp.zeros(n_stars, dt)
    position = {"pop": pop, "star": star}
    return {"data": data, "grid": grid, "config": config, "priors": priors,
            "position": position, "sim": sim,
            "logdensity_fn": make_logdensity_fn(data, grid, config, priors)}


def chain_positions(position, n_chains: int, *, seed: int = 0, jitter: float = 1e-3):
    """``n_chains`` copies of ``position`` (leading chain axis), each jittered."""
    import jax

    leaves, treedef = jax.tree.flatten(position)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x[None] + jitter * jax.random.normal(k, (n_chains,) + x.shape, x.dtype)
           for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def time_compiled(compiled, args, *, repeats: int, min_total_s: float = 0.3):
    """Median wall time of ``compiled(*args)`` after one warm-up call."""
    import jax

    jax.block_until_ready(compiled(*args))
    times = []
    t_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_all < min_total_s:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times), times


def copy_bandwidth_gb_s(n_mbytes: int, repeats: int = 5) -> float:
    """Device memory bandwidth from ``y = x + 1`` on an array of ``n_mbytes`` (read+write)."""
    import jax
    import jax.numpy as jnp

    n = n_mbytes * (1 << 20) // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0).lower(x).compile()
    _, times = time_compiled(f, (x,), repeats=repeats)
    return 2 * n * 4 / min(times) / 1e9


# --------------------------------------------------------------------------- byte count


def bytes_per_star_gradient(grid, config, dtype_bytes: int) -> dict:
    """Analytic count of the table bytes one star-gradient reads (linear scheme).

    Counted as elements gathered x element size (``dtype_bytes`` for float tables, 4 for
    the int32 ``first``/``last`` tables), forward pass only; the reverse pass reuses the
    gathered values (residuals), so this is the *unique table traffic*, a lower bound. It
    ignores cache-line granularity (a 4-byte gather costs a 32-byte GPU sector or 64-byte
    CPU line unless its neighbours are used too; the stencil's EEP pair x columns is
    contiguous, so each of the 4 (feh, age) corners is one ~48-byte run). Pieces:

    * ``bisection`` (:func:`clusterhbm.isochrone.eep_from_mass`): the bilinear (feh, age)
      bracket twice (first/last: 2 x 2 x 2 int32 each), ``bit_length(n_eep - 1)`` (= 10)
      bisection steps x 4 initial-mass corners, plus mbar at j, j + 1, lo and hi (4 x 4);
    * ``isochrone`` (:func:`clusterhbm.isochrone.interp_eep`, 5 columns): 2 x 2 x 2 nodes
      x 5 columns, first/last at the 4 corners, the phase code at the nearest node;
    * ``mass_prior``: the initial-mass column again at the star's EEP (JVP for dm/dEEP:
      8 nodes, first/last, phase) and at the isochrone's last EEP (same again), the
      bracket of :func:`clusterhbm.isochrone.eep_range` (first/last), the IMF CDF table
      (``jnp.interp``: binary search over 2048 nodes, ~12 reads + 2);
    * ``bc``: 2^4 nodes x 3 bands of the BC table, plus the comparison-count axis search
      (it reads every node of the irregular Teff, log g and A_V axes: ~cache-resident);
    * ``star_io``: the star's data (3 mags, 3 errors, parallax and its error), its
      coordinates (read) and their gradient (written).
    """
    b, i4 = dtype_bytes, 4
    n_eep = int(grid.iso.eep.shape[0])
    n_bisect = int(n_eep - 1).bit_length()
    n_cols = 5
    n_band = len(config.band_idx)
    n_star_coords = 1 + sum(config.fit_widths)
    corners = 4
    first_last = 2 * corners * i4
    pieces = {
        "bisection": 2 * first_last + (n_bisect + 4) * corners * b,
        "isochrone": 8 * n_cols * b + first_last + b,
        "mass_prior": 2 * (8 * b + first_last + b) + first_last + 14 * b,
        "bc": 16 * n_band * b,
        "bc_axis_search": (int(grid.bc.teff.shape[0]) + int(grid.bc.logg.shape[0])
                           + int(grid.bc.av.shape[0]) + 6) * b,
        "star_io": (2 * n_band + 2) * b + 2 * n_star_coords * b,
    }
    pieces["total_excluding_axis_search"] = sum(
        v for k, v in pieces.items() if k != "bc_axis_search")
    return pieces


# --------------------------------------------------------------------------- kernels


def kernel_fn(logdensity_fn):
    """vmap over chains of value_and_grad of the log density."""
    import jax

    return jax.vmap(jax.value_and_grad(logdensity_fn))


def measure_kernel(prob, n_chains: int, *, repeats: int):
    import jax
    import numpy as np

    pos = chain_positions(prob["position"], n_chains)
    fn = kernel_fn(prob["logdensity_fn"])
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(pos).compile()
    compile_s = time.perf_counter() - t0
    val, grad = compiled(pos)
    val = np.asarray(val)
    gflat = np.concatenate([np.asarray(g).reshape(n_chains, -1)
                            for g in jax.tree.leaves(grad)], axis=1)
    check = {"chains_value_neg_inf": int(np.sum(np.isneginf(val))),
             "chains_value_nan": int(np.sum(np.isnan(val))),
             "chains_gradient_nonfinite": int(np.sum(~np.all(np.isfinite(gflat), axis=1)))}
    check["all_finite"] = not any(check.values())
    # scratch memory XLA allocates (AD residuals and intermediates): each byte is written
    # and read at least once per evaluation
    try:
        mem = compiled.memory_analysis()
        check["temp_bytes"] = int(mem.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        check["temp_bytes"] = None
    _, times = time_compiled(compiled, (pos,), repeats=repeats)
    return compile_s, min(times), times, check


def profile_pieces(prob, *, repeats: int) -> dict:
    """Time each piece of one star-gradient alone, vmapped over the N stars.

    Each piece is ``vmap(value_and_grad(piece))`` with respect to its float inputs,
    evaluated at the stars' true values.
    """
    import jax
    import jax.numpy as jnp

    from clusterhbm import model as m
    from clusterhbm.isochrone import eep_from_mass, interp_eep
    from clusterhbm.photometry import bolometric_correction

    grid, config, priors = prob["grid"], prob["config"], prob["priors"]
    pos, data = prob["position"], prob["data"]
    popv = m.population_values(pos["pop"], config, priors)
    sv = jax.jit(jax.vmap(lambda st: m.star_values(st, popv, config, grid)))(pos["star"])
    eep, log_age, feh, dist, av, _ = sv
    props = jax.jit(jax.vmap(lambda e, a, f: interp_eep(grid.iso, e, a, f)))(
        eep, log_age, feh)
    teff = 10.0 ** props.log_teff
    eps = config.pseudo_mass_eps

    def bisection(s, a, f):
        return eep_from_mass(grid.iso, s, a, f, eps=eps)[0]

    def isochrone(e, a, f):
        p = interp_eep(grid.iso, e, a, f)
        return p.initial_mass + p.star_mass + p.log_teff + p.logg + p.logl

    # private helper whose signature changed once (popv added): call either form
    takes_popv = "popv" in inspect.signature(m._log_mass_prior).parameters

    def mass_prior(e, a, f):
        if takes_popv:
            return m._log_mass_prior(grid, config, priors, popv, e, a, f)[0]
        return m._log_mass_prior(grid, config, priors, e, a, f)[0]

    def bc(t, g, f, v):
        return jnp.sum(bolometric_correction(grid.bc, t, g, f, v, config.band_idx)[0])

    zp = popv["parallax_zp_mas"]

    def rest(z, mu, sig, mags, d, mag, mag_err, plx, plx_err):
        a_v = m._truncnorm_from_z(z, mu, sig)
        obs = m.Observables(mags=mags + a_v, parallax_mas=1000.0 / d, props=None,
                            valid=True)
        return m.log_likelihood_star(obs, mag, mag_err, plx, plx_err, zp,
                                     priors.mag_floor) - 0.5 * z * z

    def full(star, d_i):
        return m.log_density_star(star, popv, d_i, grid, config, priors)

    n = eep.shape[0]
    z_av = pos["star"].get("z_av", jnp.zeros(n, eep.dtype))
    mags0 = jnp.stack([props.logl] * len(config.band_idx), -1)
    pieces = {
        "bisection": (bisection, (pos["star"]["s"], log_age, feh), (0, 1, 2)),
        "isochrone": (isochrone, (eep, log_age, feh), (0, 1, 2)),
        "mass_prior": (mass_prior, (eep, log_age, feh), (0, 1, 2)),
        "bc": (bc, (teff, props.logg, feh, av), (0, 1, 2, 3)),
        "rest": (rest, (z_av, jnp.full(n, popv["av_mag"]), jnp.full(n, popv["sigma_av_mag"]),
                        mags0, dist, data.mag, data.mag_err, data.parallax_mas,
                        data.parallax_err_mas), (0, 1, 2, 3, 4)),
        "full_star": (full, (pos["star"], tuple(data)), (0,)),
    }
    calls = {}
    for name, (f, args, argnums) in pieces.items():
        vg = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=argnums)))
        calls[name] = (vg.lower(*args).compile(), args)
    # prototype (not in the model): one shared isochrone per evaluation, when the stars
    # share the population's age and [Fe/H] (widths off)
    proto = shared_isochrone_prototype(grid, eps)
    vg = jax.jit(jax.value_and_grad(proto, argnums=(0, 1, 2)))
    p_args = (pos["star"]["s"], jnp.asarray(popv["log_age"]), jnp.asarray(popv["feh"]))
    calls["proto_shared_isochrone"] = (vg.lower(*p_args).compile(), p_args)
    # interleaved rounds, best of each: the machine may be shared, and contention only
    # ever adds time
    best = {k: float("inf") for k in calls}
    for c, a in calls.values():
        jax.block_until_ready(c(*a))
    for _ in range(max(repeats, 5)):
        for k, (c, a) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*a))
            best[k] = min(best[k], time.perf_counter() - t0)
    out = {k: {"best_s": v, "ns_per_star": 1e9 * v / n} for k, v in best.items()}
    parts = ("bisection", "isochrone", "mass_prior", "bc", "rest")
    total = sum(out[k]["best_s"] for k in parts)
    for k in parts:
        out[k]["share_of_sum"] = out[k]["best_s"] / total
    out["sum_of_pieces_s"] = total
    out["n_stars"] = int(n)
    return out


def shared_isochrone_prototype(grid, eps: float):
    """What bisection + isochrone + dm/dEEP cost when all stars share one (age, [Fe/H]).

    Returns ``f(s (N,), log_age, feh) -> scalar``: the 4 bracketing isochrones are
    blended once into a (n_eep, 5) table, then per star a binary search
    (``jnp.searchsorted``) of its pseudo-mass on that 1-D table, a linear interpolation
    of the 5 columns and dm/dEEP from the same cell (no JVP). Not the model (no IMF
    terms, no validity masks): a measurement of what the suggested restructuring would
    save, timed as one ``value_and_grad`` over all N stars.
    """
    import jax
    import jax.numpy as jnp

    from clusterhbm.isochrone import _bracket

    iso = grid.iso

    def f(s, log_age, feh):
        ifeh, iage, w, lo, hi, _ = _bracket(iso, log_age, feh)
        rows = iso.data[ifeh[:, None], iage[None, :], :, :5]  # (2, 2, n_eep, 5)
        table = jnp.einsum("ab,abec->ec", w, rows)
        mbar = table[:, 0] + eps * iso.eep

        def star(si):
            j = jnp.clip(jnp.searchsorted(mbar, si, side="right") - 1, lo, hi - 1)
            u = (si - mbar[j]) / (mbar[j + 1] - mbar[j])
            row = table[j] + u * (table[j + 1] - table[j])
            dm = table[j + 1, 0] - table[j, 0]
            return jnp.sum(row) + jnp.log(dm / (dm + eps))

        return jnp.sum(jax.vmap(star)(s))

    return f


# --------------------------------------------------------------------------- main


def run(args) -> Path:
    import jax
    import jax.numpy as jnp

    dtype = jnp.zeros(()).dtype
    env = environment()
    on_gpu = env["platform"] == "gpu"
    max_work = args.max_work or (6.4e7 if on_gpu else 2e6)
    sizes = args.sizes or ((100, 1000) if args.quick else SIZES)
    chains = args.chains or ((1, 8) if args.quick else CHAINS)
    copy_mb = args.copy_mb or (2048 if on_gpu else 256)
    print(f"device {env['device']} ({env['platform']}, {env['device_kind']}); dtype "
          f"{dtype.name}; jax {env['jax']}; blackjax {env['blackjax']}; load average "
          f"{env['loadavg'][0]:.2f}; cap C*N <= {max_work:.3g}", flush=True)
    bw = copy_bandwidth_gb_s(copy_mb)
    print(f"copy bandwidth (x + 1 on {copy_mb} MiB, read + write): {bw:.1f} GB/s", flush=True)
    records, skipped = [], []
    sim = None
    header = (f"{'widths':6} {'N':>7} {'C':>4} {'compile_s':>9} {'ms/eval':>9} "
              f"{'evals/s':>10} {'star-grads/s':>12} {'GB/s':>7} {'%copy':>6} "
              f"{'tmpB/sg':>8} {'GB/s+tmp':>7}")
    print(header)
    print("-" * len(header))
    prob_for_profile = None
    for n in sorted(sizes, reverse=True):  # simulate the largest once, slice the rest
        for fit_widths in (False, True):
            prob = mock_problem(n, fit_widths=fit_widths, sim=sim)
            sim = prob["sim"]
            nbytes = bytes_per_star_gradient(prob["grid"], prob["config"], dtype.itemsize)
            b_star = nbytes["total_excluding_axis_search"]
            if fit_widths and n == args.profile_n:
                prob_for_profile = prob
            for c in chains:
                if c * n > max_work:
                    skipped.append({"n_stars": n, "n_chains": c, "fit_widths": fit_widths,
                                    "reason": f"C*N = {c * n:.3g} > cap {max_work:.3g}"})
                    continue
                try:
                    compile_s, med, times, check = measure_kernel(prob, c,
                                                                  repeats=args.repeats)
                except (jax.errors.JaxRuntimeError, MemoryError) as exc:  # e.g. out of memory
                    skipped.append({"n_stars": n, "n_chains": c, "fit_widths": fit_widths,
                                    "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    print(f"{fit_widths!s:6} {n:7d} {c:4d}  failed: {type(exc).__name__}")
                    continue
                sgs = c * n / med
                gbs = sgs * b_star / 1e9
                temp = check.pop("temp_bytes")
                temp_star = temp / (c * n) if temp is not None else None
                gbs_temp = (sgs * (b_star + 2 * temp_star) / 1e9 if temp is not None
                            else None)
                rec = dict(env, loadavg=list(os.getloadavg()), n_stars=n, n_chains=c,
                           dtype=dtype.name, fit_widths=fit_widths,
                           n_dim=n * (5 if fit_widths else 1) + (8 if fit_widths else 4),
                           compile_s=compile_s, best_s=med,
                           median_s=statistics.median(times), times_s=times,
                           evals_per_s=c / med, star_gradients_per_s=sgs,
                           bytes_per_star_gradient=b_star, achieved_gb_s=gbs,
                           copy_bandwidth_gb_s=bw, fraction_of_copy_bandwidth=gbs / bw,
                           temp_bytes=temp, temp_bytes_per_star_gradient=temp_star,
                           achieved_gb_s_incl_temps=gbs_temp, **check)
                records.append(rec)
                tb = f"{temp_star:8.0f}" if temp_star is not None else f"{'-':>8}"
                gt = f"{gbs_temp:7.2f}" if gbs_temp is not None else f"{'-':>7}"
                print(f"{fit_widths!s:6} {n:7d} {c:4d} {compile_s:9.2f} {1e3 * med:9.3f} "
                      f"{c / med:10.3e} {sgs:12.3e} {gbs:7.2f} {100 * gbs / bw:5.1f}% {tb} "
                      f"{gt}"
                      + ("" if check["all_finite"] else
                         f"  non-finite: {check['chains_value_neg_inf']} -inf, "
                         f"{check['chains_value_nan']} NaN values, "
                         f"{check['chains_gradient_nonfinite']} bad gradients"), flush=True)
    for s in skipped:
        print(f"skipped: widths {s['fit_widths']}, N {s['n_stars']}, C {s['n_chains']}: "
              f"{s['reason']}")
    profile = None
    if args.profile and prob_for_profile is not None:
        profile = profile_pieces(prob_for_profile, repeats=args.repeats)
        n_p = profile["n_stars"]
        print(f"\nprofile: one star-gradient split into pieces, each vmap(value_and_grad) "
              f"over N = {n_p} stars (widths fitted)")
        for k, v in profile.items():
            if isinstance(v, dict):
                share = (f"{100 * v['share_of_sum']:5.1f}% of sum" if "share_of_sum" in v
                         else "")
                print(f"  {k:11} {v['ns_per_star']:9.1f} ns/star  {share}")
        print(f"  sum of pieces {1e9 * profile['sum_of_pieces_s'] / n_p:.1f} ns/star")
        print("  (proto_shared_isochrone: a prototype replacing bisection + isochrone + "
              "dm/dEEP when all stars share one age and [Fe/H]; not the model)")
    nbytes = bytes_per_star_gradient(prob["grid"], prob["config"], dtype.itemsize)
    print(f"\nbytes per star-gradient (widths fitted, {dtype.name}): {nbytes}")
    out = {
        "script": "scripts/bench_kernel.py",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "environment": env, "loadavg_end": list(os.getloadavg()), "dtype": dtype.name,
        "copy_bandwidth_gb_s": bw, "copy_mbytes": copy_mb, "max_work": max_work,
        "bytes_per_star_gradient": nbytes,
        "kernel": "jax.jit(jax.vmap(jax.value_and_grad(make_logdensity_fn(...)))) over "
                  "chains; pooled, linear, G/BP/RP + parallax",
        "records": records, "skipped": skipped, "profile": profile,
    }
    tag = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    path = args.out or RESULTS / f"bench_kernel_{env['platform']}_{dtype.name}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="backend (default: JAX's default)")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--chains", type=int, nargs="+", default=None)
    p.add_argument("--max-work", type=float, default=None,
                   help="skip C*N above this (default 2e6 CPU, 6.4e7 GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copy-mb", type=int, default=None)
    p.add_argument("--profile-n", type=int, default=10_000,
                   help="N of the per-piece profile (must be one of --sizes)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--quick", action="store_true", help="N <= 1e3, C <= 8")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick and args.profile_n not in (args.sizes or (100, 1000)):
        args.profile_n = 1000
    if args.dtype == "both":
        rest, skip = [], False
        for a in (argv if argv is not None else sys.argv[1:]):
            if skip:
                skip = False
            elif a == "--dtype":
                skip = True
            elif not a.startswith("--dtype="):
                rest.append(a)
        for dt in ("float32", "float64"):
            subprocess.run([sys.executable, __file__, *rest, "--dtype", dt], check=True)
        return
    select_device(args.device, args.dtype == "float64")
    run(args)


if __name__ == "__main__":
    main()
