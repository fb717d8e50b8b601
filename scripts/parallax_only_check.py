"""Distance from the mocks' parallaxes alone: what the recovery study's distance z-scores
should be compared with.

    python scripts/parallax_only_check.py [--cases a,b,c,d] [--n-stars 500] [--seeds 1]
        [--first-seed 0] [--sim-floor 0] [--cubic] [--widths]
        [--results benchmarks/results/recovery_marginal_zero_abd500.json]

The mocks are recovery_study's own (its ``mock_catalogue``; pass the same ``--first-seed``,
``--sim-floor`` and ``--cubic``). ``recovery_study.py`` simulates every case from the same
seed (1000 + seed), so the cases
share their standard-normal noise draws: a parallax fluctuation of one seed shows up in
every case. For each mock this prints the inverse-variance weighted mean parallax as a
distance with its sd and z against the truth, and the mean and variance of the
normalised parallax residuals; with ``--results`` also the fit's distance minus the
parallax-only one, in units of the fit's sd.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_study import mock_catalogue, truth_of


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--sim-floor", type=float, default=0.0)
    p.add_argument("--cubic", action="store_true")
    p.add_argument("--widths", action="store_true", help="the non-zero-width mocks")
    p.add_argument("--results", nargs="*", default=[],
                   help="recovery_study JSON files to compare with")
    a = p.parse_args(argv)
    fits = {}
    for f in a.results:
        for r in json.loads(Path(f).read_text())["rows"]:
            fits[(r["case"], r["seed"], r["n_stars"], r["widths"])] = r["params"]
    for case in a.cases.split(","):
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            t = truth_of(case, a.widths)
            cat = mock_catalogue(case, a.widths, seed, a.n_stars, cubic=a.cubic,
                                 sim_floor=a.sim_floor)
            plx = np.asarray(cat["parallax"], float)
            err = np.asarray(cat["parallax_error"], float)
            true_plx = 1000.0 / t["distance_pc"]
            z = (plx - true_plx) / err  # per star (exact for zero distance width)
            w = 1.0 / err**2
            m = np.sum(w * plx) / np.sum(w)
            d, sd = 1000.0 / m, 1000.0 / np.sqrt(np.sum(w)) / m**2
            line = (f"case {case} seed {seed} N {a.n_stars}: parallax-only distance "
                    f"{d:.3f} +- {sd:.3f} pc (truth {t['distance_pc']:g}, z "
                    f"{(d - t['distance_pc']) / sd:+.2f}); residuals/err mean "
                    f"{z.mean():+.3f} (sd of the mean {1 / np.sqrt(z.size):.3f}), variance "
                    f"{z.var():.3f}")
            fit = fits.get((case, seed, a.n_stars, a.widths))
            if fit and "distance_pc" in fit:
                f = fit["distance_pc"]
                line += (f"; fit {f['mean']:.3f} +- {f['sd']:.3f} (z {f['z']:+.2f}), fit - "
                         f"parallax-only {(f['mean'] - d) / f['sd']:+.2f} fit sd")
            print(line, flush=True)


if __name__ == "__main__":
    main()
