"""How the warm-up's metric regularisation changes NUTS on a cluster (docs/performance.md).

The 100-star M67-like mock of the CI recovery test's size (linear mock, seed 1), fitted
cubic with 2 chains x (500 warm-up + 400 draws), widths fixed, under one of:

* ``stan``: each window's estimate shrunk towards 1e-3 I with Stan's weight 5/(n+5)
  (BlackJAX's ``mass_matrix_adaptation``, what clusterhbm did before);
* ``default``: shrunk towards the curvature's diagonal (raised to the window's own
  variances), weight 5/(n+5) (:func:`clusterhbm.sampling.regularised_metric`);
* ``count-d``: the same with the weight of D draws instead of 5;
* ``laplace-fixed``: the Laplace covariance (the inverse of the whole, arrow-shaped
  Hessian at the optimum) as the metric throughout;
* ``diag``: the default rule with a diagonal metric;
* ``factor``: the default rule with each window's covariance in the population-factor
  form (:func:`clusterhbm.sampling.factor_covariance`);
* ``spiked``: the default rule with windows of fewer draws than dimensions estimated as
  diagonal plus spikes (:func:`clusterhbm.sampling.spiked_covariance`).

    python scripts/metric_check.py --variant default
    python scripts/metric_check.py --variant stan

Prints the summary table, steps per draw and wall time; appends a JSON record to
``benchmarks/results/metric_check.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import clusterhbm.fit as fit_mod
from clusterhbm import sampling
from clusterhbm.simulate import ClusterParams, simulate_cluster

ROOT = Path(__file__).resolve().parents[1]
TRUTH = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="default",
                   choices=("stan", "default", "count-d", "laplace-fixed", "diag",
                            "factor", "spiked"))
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/metric_check.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kw = {}
    if a.variant == "stan":
        orig = sampling.regularised_metric

        def stan(state, target, *, diagonal, **_):
            eye = jnp.full(target.shape[-1], 1e-3, target.dtype)
            return orig(state, eye if diagonal else jnp.diag(eye), diagonal=diagonal,
                        prior_count=5.0, raise_diagonal=False)

        sampling.regularised_metric = stan
    elif a.variant == "count-d":  # D = one pseudo-mass per star + 4 population means
        fit_mod.run_nuts = functools.partial(sampling.run_nuts,
                                             metric_prior_count=float(a.n_stars + 4))
    elif a.variant == "laplace-fixed":
        fit_mod.run_nuts = functools.partial(sampling.run_nuts, metric_prior_count=1e9)
        kw["start_metric"] = "laplace"
    elif a.variant == "diag":
        kw["dense_mass_matrix"] = False
    elif a.variant == "spiked":
        fit_mod.run_nuts = functools.partial(sampling.run_nuts, spiked_metric=True)
    elif a.variant == "factor":  # 4 population coordinates (widths fixed)
        fit_mod.run_nuts = functools.partial(sampling.run_nuts, metric_pop_dims=4)
    sim = simulate_cluster(ClusterParams(**TRUTH), n_stars=a.n_stars, seed=1)
    t0 = time.perf_counter()
    res = fit_mod.fit_cluster(sim.catalogue, num_chains=a.chains, num_warmup=a.warmup,
                              num_samples=a.samples, seed=0, fit_widths=False, truth=TRUTH,
                              cubic=True, **kw)
    wall = time.perf_counter() - t0
    print(res.summary_text())
    s = res.summary()
    steps = float(np.asarray(res.sampler["num_integration_steps"]).mean())
    rec = {"variant": a.variant, "args": vars(a), "n_stars": a.n_stars, "wall_s": wall,
           "steps_per_draw": steps, "divergent": int(res.num_divergent),
           "loadavg": os.getloadavg(),
           "params": {k: {m: s[k][m] for m in ("mean", "sd", "rhat", "ess_bulk", "ess_tail")}
                      for k in TRUTH}}
    print(json.dumps(rec, indent=1))
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + [rec], indent=1))


if __name__ == "__main__":
    main()
