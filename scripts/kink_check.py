"""Why the linear scheme needs long NUTS trajectories: step size, steps per draw and
gradient evaluations per effective sample, linear against C1 cubic interpolation.

The linear scheme's log density has kinks (and, through dm/dEEP in the mass prior, small
jumps) at every grid node: along each star's EEP and across log age and [Fe/H]. The NUTS
step size adapts to them. This script fits one mock with :func:`clusterhbm.fit.fit_cluster`
under both schemes (same data, same settings) and reports per scheme the adapted step
size, mean leapfrog steps per draw, bulk ESS of the four population means, gradient
evaluations per effective sample of log age, the per-gradient cost and the wall time:

    python scripts/kink_check.py --seed 2009 --warmup 500 --samples 500 \\
        --out benchmarks/results/kink_check.json

(seed 2009 is coverage mock 9 of ``scripts/coverage_study.py``: M67-like, 100 stars,
truth log age 9.6, [Fe/H] 0, A_V 0.1, all three on grid nodes.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from clusterhbm.fit import (
    fit_cluster,
    initial_guess,
    initial_positions,
    make_logdensity_fn,
    prepare_data,
)
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.model import ModelConfig, Priors
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster

TRUTH = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}


def grad_cost_ms(cat, grid, cubic, reps=30):
    """Milliseconds per log density + gradient evaluation (compiled, one chain)."""
    fd = prepare_data(cat)
    bi = band_indices(fd.bands)
    config = ModelConfig(band_idx=bi, fit_widths=(False,) * 4, cubic=cubic)
    ld = make_logdensity_fn(fd.data, grid, config, Priors())
    g, e = initial_guess(fd.data, grid, bi, verbose=False)
    p = jax.tree.map(lambda x: x[0], initial_positions(jax.random.key(0), g, e, config, 1,
                                                       grid=grid, jitter=0.0))
    f = jax.jit(jax.value_and_grad(ld))
    jax.block_until_ready(f(p))
    t = time.perf_counter()
    for _ in range(reps):
        r = f(p)
    jax.block_until_ready(r)
    return 1e3 * (time.perf_counter() - t) / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2009)
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--chains", type=int, default=1)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--metric", choices=("diag", "dense"), default="dense")
    p.add_argument("--max-doublings", type=int, default=10)
    p.add_argument("--schemes", nargs="+", choices=("linear", "cubic"),
                   default=["linear", "cubic"])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    grid = load_grid()
    cat = simulate_cluster(ClusterParams(**TRUTH), n_stars=a.n_stars, seed=a.seed,
                           grid=grid).catalogue
    rows = []
    for scheme in a.schemes:
        cubic = scheme == "cubic"
        t0 = time.perf_counter()
        f = fit_cluster(cat, grid=grid, num_chains=a.chains, num_warmup=a.warmup,
                        num_samples=a.samples, seed=0, cubic=cubic, fit_widths=False,
                        max_num_doublings=a.max_doublings,
                        dense_mass_matrix=a.metric == "dense", chunk_size=250)
        wall = time.perf_counter() - t0
        s = f.summary()
        steps = np.asarray(f.sampler["num_integration_steps"])
        ess_age = s["log_age"]["ess_bulk"]
        row = {"scheme": scheme, "wall_s": wall, "timings": f.timings,
               "step_size": np.asarray(f.sampler["step_size"]).tolist(),
               "steps_per_draw": float(steps.mean()),
               "depth_cap_fraction": float(np.mean(steps >= 2 ** a.max_doublings - 1)),
               "grad_ms": grad_cost_ms(cat, grid, cubic),
               "params": {k: {"mean": s[k]["mean"], "sd": s[k]["sd"],
                              "z": (s[k]["mean"] - v) / s[k]["sd"], "rhat": s[k]["rhat"],
                              "ess_bulk": s[k]["ess_bulk"]} for k, v in TRUTH.items()}}
        row["grads_per_ess_log_age"] = float(steps.sum() / max(ess_age, 1e-9))
        row["ms_per_ess_log_age"] = row["grads_per_ess_log_age"] * row["grad_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"script": "scripts/kink_check.py", "argv": vars(a), "truth": TRUTH,
                       "versions": versions(), "loadavg": list(os.getloadavg()),
                       "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
