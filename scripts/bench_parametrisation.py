"""Which per-star coordinate couples least to the cluster age? (the model's parametrisation)

For a simulated M67-like cluster (log age 9.6, [Fe/H] 0, 850 pc, A_V 0.1, no binaries or
field, widths 0), every star is placed at its true position and the log density is
evaluated along the population log age with the per-star coordinates held fixed. The
curvature gives the *conditional* posterior sd of log age: the smaller it is compared
with the marginal sd (~0.005-0.01 dex), the more the sampler must move every star
together with the age, i.e. the worse the geometry for NUTS.

Coordinates compared: the pseudo-mass s = m(EEP) + eps * EEP for eps from 0 (initial
mass) to 1 (effectively EEP).

    python scripts/bench_parametrisation.py [--n-stars 100] [--seed 1]

Writes ``benchmarks/results/parametrisation.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clusterhbm.fit import initial_positions, prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.model import ModelConfig, Priors, make_logdensity_fn
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/parametrisation.json")
    a = p.parse_args(argv)
    sim = simulate_cluster(ClusterParams(), n_stars=a.n_stars, seed=a.seed)
    grid = load_grid()
    fd = prepare_data(sim.catalogue)
    eep_true = np.asarray(sim.truth["eep"])
    truth = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
    rows = []
    print(f"{'scheme':7s} {'eps':>8s} {'cond sd(log_age)':>17s} "
          f"{'dlogp(+-0.003)':>16s} {'dlogp(+-0.01)':>15s}")
    for cubic in (False, True):
        for eps in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 1e-1, 1.0):
            cfg = ModelConfig(band_idx=band_indices(fd.bands), fit_widths=(False,) * 4,
                              pseudo_mass_eps=eps, cubic=cubic)
            ld = make_logdensity_fn(fd.data, grid, cfg, Priors())
            pos = jax.tree.map(lambda x: x[0], initial_positions(
                jax.random.key(0), truth, eep_true, cfg, 1, grid=grid, jitter=0.0))

            def f(age, ld=ld, pos=pos):
                return ld({"pop": dict(pos["pop"], log_age=age), "star": pos["star"]})

            a0 = jnp.asarray(9.601)
            h = float(jax.hessian(f)(a0))
            v0 = float(f(jnp.asarray(9.6)))
            d = {dd: float(f(jnp.asarray(9.6 + dd))) - v0 for dd in (-0.01, -0.003, 0.003,
                                                                     0.01)}
            sd = 1.0 / np.sqrt(max(-h, 1e-12))
            rows.append({"cubic": cubic, "eps": eps, "cond_sd_log_age": sd,
                         "dlogp": {str(k): v for k, v in d.items()}})
            print(f"{'cubic' if cubic else 'linear':7s} {eps:8.0e} {sd:17.2e} "
                  f"{d[-0.003]:7.0f} {d[0.003]:7.0f} {d[-0.01]:7.0f} {d[0.01]:7.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n_stars": a.n_stars, "seed": a.seed, "rows": rows,
                               "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                               "command": "python scripts/bench_parametrisation.py"},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
