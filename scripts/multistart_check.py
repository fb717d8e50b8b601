"""Local modes of the start: optimise one mock from the isochrone scan's guess and from its
neighbours in log age (:func:`clusterhbm.fit.start_candidates`), then (optionally) fit it.

Coverage mock 2009 of ``scripts/coverage_study.py`` (M67-like, 100 stars) is the case that
showed the problem: from the scan's guess (log age 9.55) Adam stops at log age 9.485 with a
log density ~100 below the optimum near the truth (9.6), and NUTS chains started there did
not leave it in 1000 iterations (R-hat 2.3).

    python scripts/multistart_check.py --seeds 2009 2000 --fit --fit-starts 1 5 \
        --out benchmarks/results/multistart_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from clusterhbm.fit import (
    best_of_starts,
    fit_cluster,
    initial_guess,
    make_logdensity_fn,
    prepare_data,
    start_candidates,
)
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.model import ModelConfig, Priors
from clusterhbm.simulate import ClusterParams, simulate_cluster

TRUTH = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[2009])
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--fit", action="store_true", help="also fit with NUTS (2 chains; the "
                   "defaults are coverage run 2's: 600 + 400, diagonal metric, depth <= 8)")
    p.add_argument("--fit-starts", type=int, nargs="+", default=[5],
                   help="n_starts values to fit with (1: the scan's guess only)")
    p.add_argument("--metric", choices=("diag", "dense"), default="diag")
    p.add_argument("--max-doublings", type=int, default=8)
    p.add_argument("--warmup", type=int, default=600)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--out", default=None, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    grid = load_grid()
    rows = []
    for seed in a.seeds:
        cat = simulate_cluster(ClusterParams(**TRUTH), n_stars=a.n_stars, seed=seed,
                               grid=grid).catalogue
        fd = prepare_data(cat)
        bi = band_indices(fd.bands)
        config = ModelConfig(band_idx=bi, fit_widths=(False,) * 4)
        ld = make_logdensity_fn(fd.data, grid, config, Priors())
        t0 = time.perf_counter()
        guess, eep0 = initial_guess(fd.data, grid, bi)
        t_guess = time.perf_counter() - t0
        cands = start_candidates(fd.data, grid, bi, guess, eep0)
        t_cands = time.perf_counter() - t0 - t_guess
        t0 = time.perf_counter()
        _, k, loss = best_of_starts(ld, cands, config, grid, jax.random.key(0),
                                      num_steps=a.steps)
        row = {"seed": seed, "start_log_age": [c[0]["log_age"] for c in cands],
               "neg_log_density": [float(x) for x in loss], "best": k,
               "optimise_s": time.perf_counter() - t0,
               "guess_s": t_guess, "candidates_s": t_cands}  # the first seed compiles
        print(json.dumps(row))
        if a.fit:
            for n_starts in a.fit_starts:
                t0 = time.perf_counter()
                f = fit_cluster(cat, grid=grid, num_chains=2, num_warmup=a.warmup,
                                num_samples=a.samples, seed=0,
                                max_num_doublings=a.max_doublings,
                                dense_mass_matrix=a.metric == "dense", chunk_size=200,
                                n_starts=n_starts)
                s = f.summary()
                res = {k2: {"mean": s[k2]["mean"], "sd": s[k2]["sd"],
                            "z": (s[k2]["mean"] - v) / s[k2]["sd"], "rhat": s[k2]["rhat"],
                            "ess_bulk": s[k2]["ess_bulk"]} for k2, v in TRUTH.items()}
                fit_row = {"seed": seed, "n_starts": n_starts, "metric": a.metric,
                           "max_doublings": a.max_doublings, "warmup": a.warmup,
                           "samples": a.samples,
                           "wall_s": time.perf_counter() - t0,
                           "steps_per_draw": float(np.mean(f.sampler["num_integration_steps"])),
                           "params": res}
                print(json.dumps(fit_row))
                rows.append(fit_row)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"argv": vars(a), "truth": TRUTH, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
