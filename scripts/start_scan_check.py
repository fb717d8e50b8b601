"""The isochrone scan's starting guess (clusterhbm.fit.initial_guess) for the recovery
study's mocks and for real clusters in ../shared: the numbers quoted for the start fix
(docs/performance.md, "A wrong start").

    python scripts/start_scan_check.py [--cases a,b,c,d] [--seeds 0,1] [--sim-floor 0.01]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_study import mock_catalogue, truth_of

from clusterhbm.fit import _distance_guess, band_indices, initial_guess, prepare_data
from clusterhbm.grid import load_grid

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--sim-floor", type=float, default=0.01)
    p.add_argument("--clusters", default="m67,pleiades,hyades,ngc188")
    a = p.parse_args(argv)
    grid = load_grid()

    def show(label, cat, truth=None, **kw):
        fd = prepare_data(cat, member_prob_column=None, **kw)
        g, _ = initial_guess(fd.data, grid, band_indices(fd.bands), verbose=False)
        d = _distance_guess(fd.data)
        print(f"{label}: guess log age {g['log_age']:.2f}, [Fe/H] {g['feh']:+.2f}, "
              f"{g['distance_pc']:.0f} pc, A_V {g['av_mag']:.2f} (parallax distance "
              f"{'none' if d is None else f'{d:.0f} pc'})"
              + ("" if truth is None else f"; truth {truth}"), flush=True)

    for case in a.cases.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            cat = mock_catalogue(case, False, seed, a.n_stars, sim_floor=a.sim_floor)
            show(f"case {case} seed {1000 + seed}", cat, truth_of(case, False), g_lim=19.0)
    from astropy.table import Table

    for name in a.clusters.split(","):
        path = SHARED / name / f"{name}_gaia.ecsv"
        if path.exists():
            show(name, Table.read(path))
        else:
            print(f"{name}: {path} not found")


if __name__ == "__main__":
    main()
