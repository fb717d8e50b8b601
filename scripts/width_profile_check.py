"""The likelihood of one population width, first-order offsets against quadrature.

The marginal model integrates each star's offsets from the population means out in closed
form, after moving its track to first order in the offsets (``clusterhbm.marginal``,
"Widths"). This script checks that approximation where it matters, on the width's
likelihood profile: for a recovery-study mock with only one width non-zero (the others
zero), it evaluates, over a scan of that width with every other population parameter at
the truth,

- ``first_order``: the sum of the stars' terms of the widths model (``fit_widths`` on for
  that width only),
- ``first_order_slide``: the same with ``MarginalOptions(project_widths=False)`` (the
  fixed-EEP Jacobian whole, its slide along the track kept: the model before
  2026-12-07), and
- ``quadrature``: the sum over stars of the log of a Gauss-Hermite average, over the
  star's offset, of the zero-width model's term at the moved population value (exact in
  the offset up to the quadrature: the track, its IMF weights and the valid EEP range
  move with it).

No selection term and no binaries (the comparison is of the offsets' integral, which both
sides share the rest of). A peak of the first-order profile away from the quadrature's
would bias the fitted width::

    python scripts/width_profile_check.py --case a --width log_age [--n-stars 500]

Prints both profiles (relative to their maxima) and the maximum-likelihood width of each
(parabola through the best three scan points), and writes
``benchmarks/results/width_profile_<case>_<width>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_study import CASES, WIDTHS

from clusterhbm.fit import prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.marginal import MarginalOptions, log_density_marginal
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, ObservingModel, simulate_cluster

NAMES = ("log_age", "feh", "distance_pc", "av_mag")


def peak(x, y):
    """Maximum of the parabola through the best scan point and its neighbours."""
    return peak_and_sd(x, y)[0]


def peak_and_sd(x, y):
    """(maximum, sd) of the parabola through the best scan point and its neighbours (sd:
    from its curvature, as for a Gaussian likelihood; nan if it is not concave)."""
    k = int(np.clip(np.argmax(y), 1, len(y) - 2))
    c = np.polyfit(x[k - 1:k + 2], y[k - 1:k + 2], 2)
    if c[0] >= 0:
        return float(x[np.argmax(y)]), float("nan")
    return float(-c[1] / (2 * c[0])), float(np.sqrt(-1.0 / (2 * c[0])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="a", choices=sorted(CASES))
    p.add_argument("--width", default="log_age", choices=NAMES)
    p.add_argument("--sigma", type=float, default=None,
                   help="the mock's width (default: the recovery study's)")
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="mock seed 1000 + seed")
    p.add_argument("--sim-floor", type=float, default=0.01)
    p.add_argument("--nodes", type=int, default=16, help="Gauss-Hermite nodes")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    truth = dict(CASES[a.case])
    sigma = a.sigma
    if sigma is None:
        sigma = (0.01 * truth["distance_pc"] if a.width == "distance_pc"
                 else WIDTHS["sigma_" + a.width])
    grid = load_grid()
    sim = simulate_cluster(ClusterParams(**truth, **{"sigma_" + a.width: sigma}),
                           n_stars=a.n_stars, seed=1000 + a.seed, grid=grid,
                           observing=ObservingModel(mag_systematic_mag=a.sim_floor))
    data = prepare_data(sim.catalogue, member_prob_column=None).data
    gaia = band_indices(("G", "BP", "RP"))
    cfg0 = ModelConfig(band_idx=gaia, fit_widths=(False,) * 4)
    cfgw = cfg0._replace(fit_widths=tuple(n == a.width for n in NAMES))
    pri = Priors(mag_floor=max(a.sim_floor, 1e-4))
    opts = MarginalOptions()
    slide = opts._replace(project_widths=False)

    f0 = jax.jit(lambda q: log_density_marginal(q, data, grid, cfg0, pri, opts,
                                                per_star=True))
    fw = jax.jit(lambda q: log_density_marginal(q, data, grid, cfgw, pri, opts,
                                                per_star=True))
    fs = jax.jit(lambda q: log_density_marginal(q, data, grid, cfgw, pri, slide,
                                                per_star=True))
    x, w = np.polynomial.hermite_e.hermegauss(a.nodes)
    w = w / w.sum()
    scan = sigma * np.array([0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 1.75,
                             2.0])
    t0 = time.perf_counter()
    # the zero-width terms at every offset node used by any scan width
    first, first_s, quad = [], [], []
    for s in scan:
        q = pop_to_unconstrained({**truth, "sigma_" + a.width: s}, cfgw)
        first.append(float(np.sum(np.asarray(fw(q)))))
        first_s.append(float(np.sum(np.asarray(fs(q)))))
        terms = np.stack([np.asarray(f0(pop_to_unconstrained(
            {**truth, a.width: truth[a.width] + s * xi}, cfg0))) for xi in x])
        mx = terms.max(axis=0)
        per = mx + np.log(np.sum(w[:, None] * np.exp(terms - mx), axis=0))
        quad.append(float(np.sum(per)))
        print(f"sigma {s:.5g}: first-order {first[-1]:.3f} (with the slide {first_s[-1]:.3f}),"
              f" quadrature {quad[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    first, first_s, quad = np.array(first), np.array(first_s), np.array(quad)
    res = {"script": "scripts/width_profile_check.py", "args": vars(a), "sigma_true": sigma,
           "scan": scan.tolist(), "first_order": (first - first.max()).tolist(),
           "first_order_slide": (first_s - first_s.max()).tolist(),
           "quadrature": (quad - quad.max()).tolist(),
           "offset_first_minus_quadrature": (first - quad).tolist(),
           "peak_first_order": peak(scan, first), "peak_first_order_slide": peak(scan, first_s),
           "peak_quadrature": peak(scan, quad), "sd_quadrature": peak_and_sd(scan, quad)[1],
           "versions": versions()}
    print(f"maximum-likelihood width: first-order {res['peak_first_order']:.4g}, with the "
          f"slide {res['peak_first_order_slide']:.4g}, quadrature "
          f"{res['peak_quadrature']:.4g} (mock {sigma:g}; the quadrature profile's sd "
          f"{res['sd_quadrature']:.2g}: misses of {(res['peak_first_order'] - res['peak_quadrature']) / res['sd_quadrature']:+.1f} "
          f"and {(res['peak_first_order_slide'] - res['peak_quadrature']) / res['sd_quadrature']:+.1f} sd)")
    print("     sigma  first-order  with slide  quadrature")
    for row in zip(scan, res["first_order"], res["first_order_slide"], res["quadrature"]):
        print("  {:8.4g}  {:11.3f}  {:10.3f}  {:10.3f}".format(*row))
    out = Path(a.out or f"benchmarks/results/width_profile_{a.case}_{a.width}.json")
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
