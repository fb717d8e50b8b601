"""Coverage of the population posteriors over many mocks, fitted in one compiled program.

K mocks of one cluster (same truth, different random stars and noise: seeds 2000..2000+K-1)
are fitted together with :func:`clusterhbm.parallel.fit_many` (padded, vmapped over
clusters: one compilation for all of them). For each population mean it reports the
fraction of mocks whose truth lies inside the central 68% and 95% posterior intervals, the
simulation-based-calibration rank of the truth among the draws (uniform if the posteriors
are calibrated; a chi-square statistic over 5 bins), the z-scores, R-hat and ESS.

    python scripts/coverage_study.py                          # 20 M67-like mocks, 100 stars
    python scripts/coverage_study.py --n-mocks 40 --n-stars 200 --case b

With 20 mocks the binomial standard error of a coverage fraction is ~0.10 at 68% and
~0.05 at 95%, so this detects gross miscalibration only. Writes
``benchmarks/results/coverage_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from clusterhbm.grid import load_grid
from clusterhbm.parallel import fit_many
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_study import CASES

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("log_age", "feh", "distance_pc", "av_mag")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="c", choices=sorted(CASES))
    p.add_argument("--n-mocks", type=int, default=20)
    p.add_argument("--n-stars", type=int, default=100)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--max-doublings", type=int, default=7,
                   help="NUTS tree depth cap (vmapped chains wait for the longest tree)")
    p.add_argument("--metric", choices=("dense", "diag"), default="diag",
                   help="adapted mass matrix (a dense one needs a longer warm-up)")
    p.add_argument("--cubic", action="store_true",
                   help="C1 cubic interpolation (the linear scheme's kinks at grid nodes cap "
                        "the step size: docs/performance.md)")
    p.add_argument("--n-starts", type=int, default=5, help="optimiser starts per mock")
    p.add_argument("--group", type=int, default=None,
                   help="mocks per compiled batch (default all): vmapped chains wait for the "
                        "longest tree of their batch, so small groups waste less; the padded "
                        "size is fixed, so every group reuses one compiled program")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    grid = load_grid()
    truth = dict(CASES[a.case])
    # the mocks use the fit's interpolation scheme (see simulate_cluster's ``cubic``)
    cats = [simulate_cluster(ClusterParams(**truth), n_stars=a.n_stars, seed=2000 + k,
                             grid=grid, cubic=a.cubic).catalogue for k in range(a.n_mocks)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    group = a.group or a.n_mocks
    pad_to = max(len(c) for c in cats)
    rows, timings = [], []
    out = Path(a.out or ROOT / f"benchmarks/results/coverage_{a.case}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for g0 in range(0, a.n_mocks, group):
        fits = fit_many(cats[g0:g0 + group], num_chains=a.chains, num_warmup=a.warmup,
                        num_samples=a.samples, seed=g0, grid=grid, chunk_size=a.chunk,
                        progress=True, max_num_doublings=a.max_doublings,
                        dense_mass_matrix=a.metric == "dense", cubic=a.cubic,
                        n_starts=a.n_starts, truths=[truth] * len(cats[g0:g0 + group]),
                        pad_to=pad_to)
        timings.append(fits[0].timings)
        for k, f in enumerate(fits, start=g0):
            rows.append(mock_row(f, k, truth))
        wall = time.perf_counter() - t0
        write(out, a, truth, wall, timings, load0, rows)
    print(f"{a.n_mocks} mocks x {a.n_stars} stars (case {a.case}), {a.chains} chains x "
          f"{a.samples} draws: wall {wall:.0f} s")
    print(f"wrote {out}")


def mock_row(f, k, truth):
    """Per-mock record: z-score, rank, interval membership, R-hat and ESS per mean."""
    s = f.summary()
    steps = np.asarray(f.sampler["num_integration_steps"])
    row = {"mock": k, "seed": 2000 + k, "n_stars": len(f.source_id),
           "divergent": int(f.num_divergent), "steps_per_draw": float(steps.mean()),
           "params": {}}
    for name in PARAMS:
        d = np.asarray(f.population[name]).ravel()
        q = np.percentile(d, [2.5, 16, 84, 97.5])
        v = truth[name]
        row["params"][name] = {
            "truth": v, "mean": s[name]["mean"], "sd": s[name]["sd"],
            "z": (s[name]["mean"] - v) / s[name]["sd"], "rhat": s[name]["rhat"],
            "ess_bulk": s[name]["ess_bulk"], "rank": float(np.mean(d < v)),
            "in68": bool(q[1] <= v <= q[2]), "in95": bool(q[0] <= v <= q[3])}
    return row


def write(out, a, truth, wall, timings, load0, rows):
    """The JSON record and the printed table over the mocks finished so far."""
    summary = {}
    for name in PARAMS:
        ranks = np.array([r["params"][name]["rank"] for r in rows])
        counts = np.histogram(ranks, bins=5, range=(0, 1))[0]
        expect = len(ranks) / 5
        summary[name] = {
            "coverage68": float(np.mean([r["params"][name]["in68"] for r in rows])),
            "coverage95": float(np.mean([r["params"][name]["in95"] for r in rows])),
            "rank_counts_5_bins": counts.tolist(),
            "rank_chi2_4dof": float(np.sum((counts - expect) ** 2 / expect)),
            "mean_z": float(np.mean([r["params"][name]["z"] for r in rows])),
            "sd_z": float(np.std([r["params"][name]["z"] for r in rows])),
            "max_rhat": float(max(r["params"][name]["rhat"] for r in rows)),
            "min_ess_bulk": float(min(r["params"][name]["ess_bulk"] for r in rows))}
    record = {"script": "scripts/coverage_study.py", "argv": vars(a), "versions": versions(),
              "truth": truth, "wall_s": wall, "timings": timings, "n_done": len(rows),
              "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "divergent_total": int(sum(r["divergent"] for r in rows)),
              "summary": summary, "rows": rows}
    out.write_text(json.dumps(record, indent=1, default=float))
    print(f"{len(rows)} mocks done, {wall:.0f} s, divergent {record['divergent_total']}")
    print(f"{'param':12s} {'in68':>5s} {'in95':>5s} {'mean z':>7s} {'sd z':>5s} "
          f"{'rank chi2':>9s} {'max R-hat':>9s} {'min ESS':>7s}")
    for name, v in summary.items():
        print(f"{name:12s} {v['coverage68']:5.2f} {v['coverage95']:5.2f} {v['mean_z']:+7.2f} "
              f"{v['sd_z']:5.2f} {v['rank_chi2_4dof']:9.2f} {v['max_rhat']:9.3f} "
              f"{v['min_ess_bulk']:7.0f}")


if __name__ == "__main__":
    main()
