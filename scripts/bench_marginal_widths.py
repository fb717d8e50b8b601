"""Gradient cost of the marginal model with widths (the stars' offsets integrated out).

    python scripts/bench_marginal_widths.py [--n-stars 60] [--binaries]

A case-(a) mock (log age 8.0, 150 pc, A_V 0.1, widths 0.02 / 0.03 / 1.5 pc / 0.03) with
single stars; the fixed 192-segment sets of the zero-width model; linear interpolation;
the model without binaries unless ``--binaries`` (then 24 q bins: 25 tracks). Prints, for
no widths, the distance width, the age width, age + [Fe/H] + A_V and all four, the compile
time and the mean wall time of one value (and of one value-and-gradient), 5 repeats.
"""

from __future__ import annotations

import argparse
import time

import jax

from clusterhbm.fit import prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.marginal import MarginalOptions, log_density_marginal, select_segments
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained
from clusterhbm.simulate import ClusterParams, simulate_cluster

POP = {"log_age": 8.0, "feh": 0.0, "distance_pc": 150.0, "av_mag": 0.1}
WIDTHS = {"sigma_log_age": 0.02, "sigma_feh": 0.03, "sigma_distance_pc": 1.5,
          "sigma_av_mag": 0.03}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=60)
    p.add_argument("--binaries", action="store_true")
    a = p.parse_args(argv)
    grid = load_grid()
    sim = simulate_cluster(ClusterParams(**POP, **WIDTHS), n_stars=a.n_stars, seed=1000,
                           grid=grid)
    fd = prepare_data(sim.catalogue, member_prob_column=None)
    cfg0 = ModelConfig(band_idx=band_indices(("G", "BP", "RP")), fit_widths=(False,) * 4,
                       binaries=a.binaries)
    pri, opts = Priors(), MarginalOptions()
    p0 = pop_to_unconstrained(POP, cfg0)
    sel = select_segments(jax.tree.map(lambda x: x[None], p0), fd.data, grid, cfg0, pri,
                          opts, n_segments=192)
    for fw in [(False,) * 4, (False, False, True, False), (True, False, False, False),
               (True, True, False, True), (True,) * 4]:
        cfg = cfg0._replace(fit_widths=fw)
        pos = pop_to_unconstrained({**POP, **WIDTHS}, cfg)
        def dens(q, cfg=cfg):
            return log_density_marginal(q, fd.data, grid, cfg, pri, opts, sel=sel)

        out = {}
        for what, f in (("value", jax.jit(dens)),
                        ("value+gradient", jax.jit(jax.value_and_grad(dens)))):
            t = time.perf_counter()
            jax.block_until_ready(f(pos))
            tc = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(f(pos))
            out[what] = (tc, (time.perf_counter() - t) / 5 * 1e3)
        print(f"fit_widths={fw}: compile {out['value+gradient'][0]:.1f} s, value "
              f"{out['value'][1]:.1f} ms, value+gradient {out['value+gradient'][1]:.1f} ms "
              f"({a.n_stars} stars, binaries {a.binaries})", flush=True)


if __name__ == "__main__":
    main()
