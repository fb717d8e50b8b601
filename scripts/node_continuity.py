"""Jumps of the marginal log density where (log age, [Fe/H]) cross grid nodes.

A mock cluster (default: 100 stars, log age 8.0, [Fe/H] 0, 150 pc, A_V 0.1: Pleiades-like,
its M dwarfs reach the grid's 0.1 Msun end) is evaluated with the zero-width marginal model
(segments chosen at the truth) at x - 3h, x - h, x + h, x + 3h around each node x (h = 1e-4).
The density is smooth on each side at that scale, so

    jump = (f(x + h) - f(x - h)) - 0.5 * ((f(x - h) - f(x - 3h)) + (f(x + 3h) - f(x + h)))

is the step at the node (a kink adds only O(h) to it). Also printed: the valid EEP range
(:func:`clusterhbm.isochrone.eep_range`) on either side of the node.

    python scripts/node_continuity.py [--n-stars 100] [--seed 1000]

Run against an older checkout (``PYTHONPATH=<checkout> python scripts/node_continuity.py``)
to compare: with the corners' common EEP range (before 2026-12-03) the jumps at
[Fe/H] = -0.25 and 0 were 2441 and 39; with the interpolated range < 0.1 (float32 noise on
slopes of ~1e5 per dex).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from clusterhbm.fit import prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.isochrone import eep_range
from clusterhbm.marginal import MarginalOptions, log_density_marginal, select_segments
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained
from clusterhbm.simulate import ClusterParams, simulate_cluster


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-stars", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--log-age", type=float, default=8.0)
    ap.add_argument("--distance-pc", type=float, default=150.0)
    a = ap.parse_args(argv)
    grid = load_grid()
    truth = {"log_age": a.log_age, "feh": 0.0, "distance_pc": a.distance_pc, "av_mag": 0.1}
    sim = simulate_cluster(ClusterParams(**truth), n_stars=a.n_stars, seed=a.seed, grid=grid)
    fd = prepare_data(sim.catalogue, member_prob_column=None)
    cfg = ModelConfig(band_idx=band_indices(("G", "BP", "RP")), fit_widths=(False,) * 4)
    pri, opts = Priors(), MarginalOptions()
    p0 = pop_to_unconstrained(truth, cfg)
    sel = select_segments(jax.tree.map(lambda x: x[None], p0), fd.data, grid, cfg, pri, opts,
                          n_segments=192)
    f = jax.jit(lambda q: log_density_marginal(q, fd.data, grid, cfg, pri, opts, sel=sel))
    h = 1e-4
    dl = float(grid.iso.log_age[1] - grid.iso.log_age[0])
    for name, nodes in (("feh", [-0.25, 0.0, 0.25]),
                        ("log_age", [a.log_age + k * dl for k in (-1, 0, 1, 2)])):
        for x in nodes:
            v = []
            for xx in (x - 3 * h, x - h, x + h, x + 3 * h):
                q = dict(p0)
                q[name] = jnp.asarray(xx, p0["feh"].dtype)
                v.append(float(f(q)))
            jump = (v[2] - v[1]) - 0.5 * ((v[1] - v[0]) + (v[3] - v[2]))
            pt = {"log_age": a.log_age, "feh": 0.0}
            lo = dict(pt, **{name: x - h})
            hi = dict(pt, **{name: x + h})
            r1 = np.asarray(eep_range(grid.iso, lo["log_age"], lo["feh"]))
            r2 = np.asarray(eep_range(grid.iso, hi["log_age"], hi["feh"]))
            print(f"{name} = {x:+.3f}: jump {jump:+9.3f}   EEP range {r1.round(3)} -> "
                  f"{r2.round(3)}")


if __name__ == "__main__":
    main()
