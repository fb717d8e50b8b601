"""Accuracy and speed of the marginal model (clusterhbm.marginal), the numbers in the docs.

    python scripts/marginal_check.py            # writes benchmarks/results/marginal_check.json
    python scripts/marginal_check.py --quick    # smaller sizes

1. Mass integral: the segment formula over the 707-node track against a 200001-EEP brute
   force, for single stars on the main sequence, at the turnoff, subgiant, giant and
   core-helium-burning phases; binaries (n_q = 12, 24, 48 smeared bins) against a
   3000-q x 50000-mass brute force.
2. The sampler's fixed segments per star against every segment, on an M67-like mock with
   30% binaries and 10% field stars, at the states they were chosen at and between them.
3. Time per log density + gradient (one chain, jit) for N = 100, 300, 1000 with the fixed
   segments, and with every segment.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clusterhbm.fit import prepare_data
from clusterhbm.grid import load_grid
from clusterhbm.imf import imf_cdf, log_imf
from clusterhbm.isochrone import table_eep_range, table_interp
from clusterhbm.marginal import (
    MarginalOptions,
    log_density_marginal,
    make_marginal_logdensity_fn,
    select_segments,
    star_log_likelihoods,
    track,
)
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained, population_state
from clusterhbm.photometry import photometry
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster

ROOT = Path(__file__).resolve().parents[1]
POP = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
ERR = np.array([0.001, 0.003, 0.002])
OFFSET = np.array([0.003, -0.004, 0.002])


def brute_force_checks(grid):
    cfg = ModelConfig(band_idx=(0, 1, 2), fit_widths=(False,) * 4, binaries=True)
    pri = Priors()
    popv = population_state(pop_to_unconstrained(POP, cfg), cfg, pri, grid)
    table = popv["iso_table"]
    lo, hi = table_eep_range(table)
    fine = np.asarray(jnp.linspace(lo, hi, 200001))
    props = jax.vmap(lambda e: table_interp(table, e))(jnp.asarray(fine))
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, popv["feh"], popv["distance_pc"],
                                         popv["av_mag"], (0, 1, 2), bcs=popv["bc_slice"]))(
        props)
    m = np.asarray(props.initial_mass, float)
    mags = np.asarray(obs.mags, float)
    kw = {"kind": "kroupa", "m_min": pri.m_min, "m_max": pri.m_max, "alpha": pri.imf_alpha}
    limf = np.asarray(log_imf(jnp.asarray(m), **kw), float)
    log_z = float(np.log(imf_cdf(jnp.asarray(m.max()), **kw)))
    v = ERR ** 2 + 0.01 ** 2

    def integrate(ll, mm):
        mid = 0.5 * (ll[1:] + ll[:-1])
        mx = mid.max()
        return mx + np.log(np.sum(np.exp(mid - mx) * np.diff(mm)))

    def brute_single(y):
        ll = -0.5 * np.sum((y - mags) ** 2 / v + np.log(2 * np.pi * v), axis=1) + limf
        return integrate(ll, m) - log_z

    def brute_binary(y, nq=3000, sub=4):
        qs = pri.q_min + (1 - pri.q_min) * (np.arange(nq) + 0.5) / nq
        mm, mg, li = m[::sub], mags[::sub], limf[::sub]
        tot = []
        for q in qs:
            g2 = np.stack([np.interp(q * mm, m, mags[:, b]) for b in range(3)], 1)
            f2 = np.where((q * mm >= m.min())[:, None], 10 ** (-0.4 * (g2 - mg)), 0)
            ll = -0.5 * np.sum((y - (mg - 2.5 * np.log10(1 + f2))) ** 2 / v
                               + np.log(2 * np.pi * v), axis=1) + li
            tot.append(integrate(ll, mm))
        tot = np.array(tot)
        mx = tot.max()
        return mx + np.log(np.mean(np.exp(tot - mx))) - log_z

    def data_i(y):
        return (jnp.asarray(y, jnp.float32), jnp.asarray(ERR, jnp.float32), jnp.nan,
                jnp.nan)

    every = MarginalOptions(n_blocks=None)
    out = {"single": [], "binary": []}
    tr = track(popv, grid, cfg, pri, n_q=12)
    for eep in (300.0, 400.5, 450.3, 470.0, 520.7, 640.0):
        i = int(np.argmin(np.abs(fine - eep)))
        y = mags[i] + OFFSET
        got = float(star_log_likelihoods(tr, popv, data_i(y), cfg, pri, every)[0])
        ref = brute_single(y)
        out["single"].append({"eep": eep, "mass_msun": float(m[i]), "marginal": got,
                              "brute": ref, "diff": got - ref})
        print(f"single EEP {eep}: {got:.4f} vs brute {ref:.4f}", flush=True)
    trs = {nq: track(popv, grid, cfg, pri, n_q=nq) for nq in (12, 24, 48)}
    for eep, q in ((300.0, 0.5), (300.0, 0.9), (380.0, 0.8), (420.0, 0.6)):
        i = int(np.argmin(np.abs(fine - eep)))
        g2 = np.array([np.interp(q * m[i], m, mags[:, b]) for b in range(3)])
        y = mags[i] - 2.5 * np.log10(1 + 10 ** (-0.4 * (g2 - mags[i]))) + OFFSET
        ref = brute_binary(y)
        row = {"eep": eep, "q": q, "brute": ref}
        for nq, t in trs.items():
            row[f"n_q_{nq}"] = float(star_log_likelihoods(t, popv, data_i(y), cfg, pri,
                                                          every)[1]) - ref
        out["binary"].append(row)
        print(f"binary EEP {eep} q {q}: diffs {row}", flush=True)
    return out


def mock(grid, n):
    sim = simulate_cluster(ClusterParams(**POP, f_bin=0.3, f_field=0.1), n_stars=n, seed=1,
                           grid=grid, cubic=True)
    return prepare_data(sim.catalogue, member_prob_column=None)


def pruning_and_speed(grid, sizes):
    cfg = ModelConfig(band_idx=(0, 1, 2), fit_widths=(False,) * 4, binaries=True, field=True,
                      selection=True, fit_mf_slope=True, cubic=True)
    pri = Priors(g_lim=19.0)
    opts = MarginalOptions()
    base = pop_to_unconstrained({**POP, "f_bin": 0.3, "f_field": 0.1}, cfg)
    steps = {"log_age": 0.02, "feh": 0.02, "ln_distance_pc": 0.005, "av_raw": 0.02}
    states = [base] + [{**base, k: base[k] + f * h} for k, h in steps.items()
                       for f in (-1.0, -0.5, 0.5, 1.0)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    rows = []
    for n in sizes:
        fd = mock(grid, n)
        t0 = time.perf_counter()
        sel = select_segments(stacked, fd.data, grid, cfg, pri, opts,
                              n_segments=opts.n_segments)
        sel.block_until_ready()
        t_sel = time.perf_counter() - t0
        row = {"n_stars": n, "select_s": t_sel, "n_segments": opts.n_segments}
        full = jax.jit(lambda p, d=fd: log_density_marginal(
            p, d.data, grid, cfg, pri, opts._replace(n_blocks=None), per_star=True))
        fixed = jax.jit(lambda p, d=fd, s=sel: log_density_marginal(
            p, d.data, grid, cfg, pri, opts, per_star=True, sel=s))
        miss = {}
        for k, h in (("at_reference", 0.0), ("log_age_+0.01", 0.01),
                     ("ln_distance_+0.0025", 0.0025), ("feh_+0.01", 0.01)):
            key = {"at_reference": None, "log_age_+0.01": "log_age",
                   "ln_distance_+0.0025": "ln_distance_pc", "feh_+0.01": "feh"}[k]
            p = base if key is None else {**base, key: base[key] + h}
            d = np.asarray(fixed(p) - full(p))
            miss[k] = {"max_abs_per_star": float(np.abs(d).max()), "total": float(d.sum())}
        row["fixed_minus_every_segment"] = miss
        for label, fn in (("fixed", make_marginal_logdensity_fn(fd.data, grid, cfg, pri, opts,
                                                                sel=sel)),
                          ("every_segment", make_marginal_logdensity_fn(
                              fd.data, grid, cfg, pri, opts._replace(n_blocks=None)))):
            if label == "every_segment" and n > 300:
                continue
            vg = jax.jit(jax.value_and_grad(fn))
            jax.block_until_ready(vg({"pop": base}))
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(vg({"pop": base}))
            row[f"grad_s_{label}"] = (time.perf_counter() - t0) / reps
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/marginal_check.json"))
    a = p.parse_args(argv)
    grid = load_grid()
    load0 = os.getloadavg()
    record = {"script": "scripts/marginal_check.py", "versions": versions(),
              "loadavg_start": load0}
    record["brute_force"] = brute_force_checks(grid)
    record["pruning_and_speed"] = pruning_and_speed(grid, (100, 300) if a.quick
                                                    else (100, 300, 1000))
    record["loadavg_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
