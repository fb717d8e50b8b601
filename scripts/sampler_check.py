"""One quick fit of a simulated cluster: recovery, R-hat/ESS, leapfrog steps per draw.

The numbers quoted in the issue notes for the sampler (steps per draw, step size, recovery
of the 100-star M67-like mock with a dense or diagonal metric, linear or cubic) come from
this script:

    python scripts/sampler_check.py --n-stars 100 --warmup 500 --samples 500 --chains 2
    python scripts/sampler_check.py --log-age 9.63 ...        # an age between grid nodes
    python scripts/sampler_check.py --mass-matrix diag ...    # the diagonal metric
    python scripts/sampler_check.py --eps 1.0 --mass-matrix diag   # ~EEP coordinate
"""

from __future__ import annotations

import argparse
import json

from clusterhbm.fit import fit_cluster
from clusterhbm.simulate import ClusterParams, simulate_cluster


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--log-age", type=float, default=9.6)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--mass-matrix", choices=("auto", "dense", "diag"), default="auto")
    p.add_argument("--cubic", action="store_true")
    p.add_argument("--eps", type=float, default=3e-3,
                   help="per-star coordinate m + eps*EEP (1.0 behaves like EEP)")
    p.add_argument("--widths", action="store_true", help="fit the widths too")
    p.add_argument("--sim-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sim = simulate_cluster(ClusterParams(log_age=a.log_age), n_stars=a.n_stars,
                           seed=a.sim_seed)
    res = fit_cluster(sim.catalogue, num_chains=a.chains, num_warmup=a.warmup,
                      num_samples=a.samples, seed=a.seed, fit_widths=a.widths,
                      cubic=a.cubic, truth=sim.params._asdict(), pseudo_mass_eps=a.eps,
                      dense_mass_matrix={"auto": None, "dense": True, "diag": False}[
                          a.mass_matrix])
    print(res.summary_text())
    print(json.dumps({"timings": res.timings,
                      "steps_per_draw": float(res.sampler["num_integration_steps"].mean()),
                      "step_size": res.sampler["step_size"].tolist()}, indent=1))


if __name__ == "__main__":
    main()
