"""Compare the three inference routes (joint NUTS, importance re-weighting, Gibbs) on a
simulated M67-like cluster (or on real members of a cluster) and write a JSON record.

    python scripts/compare_routes.py                       # moderate settings
    python scripts/compare_routes.py --quick               # a smoke run
    python scripts/compare_routes.py --cluster ../shared/data/clusters/m67/m67_gaia.ecsv \
        --n-stars 40                                       # 40 M67 members, 10.5 <= G <= 15.5
    python scripts/compare_routes.py --parametrisation-study   # + centred vs non-centred
                                                           #   Gibbs with every width fitted

Output: ``benchmarks/results/compare_routes.json`` (``--out``): versions, settings, machine
load, and per route the wall time, ESS per second, posterior means/sds, R-hat, and the
offset from the joint run in combined sds; for re-weighting the effective number of
samples per star, and n_eff as the population widths shrink towards zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from clusterhbm import routes
from clusterhbm.grid import load_grid
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster

ROOT = Path(__file__).resolve().parents[1]


def _route_record(r: routes.RouteResult, truth: dict) -> dict:
    s = r.summary()
    eps = r.ess_per_second()
    rec = {"timings": {k: float(v) for k, v in r.timings.items()},
           "parameters": {k: {"mean": v["mean"], "sd": v["sd"], "rhat": v["rhat"],
                              "ess_bulk": v["ess_bulk"], "ess_tail": v["ess_tail"],
                              "ess_per_s_wall": eps[k],
                              "z_truth": (v["mean"] - truth[k]) / v["sd"] if k in truth
                              else None}
                          for k, v in s.items()}}
    extra = {}
    for k, v in r.extra.items():
        if k == "n_eff":
            continue
        extra[k] = np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
    rec["extra"] = extra
    return rec


def _cluster_subset(path, n_stars, g_range):
    """``n_stars`` members of a real cluster, spread evenly in G over ``g_range``."""
    from astropy.table import Table

    cat = Table.read(path)
    g = np.asarray(cat["phot_g_mean_mag"], float)
    if "member" in cat.colnames:
        mem = np.asarray(cat["member"], bool)
    else:
        mem = np.asarray(cat["member_prob"], float) > 0.5
    idx = np.flatnonzero(mem & (g >= g_range[0]) & (g <= g_range[1]))
    idx = idx[np.argsort(g[idx])]
    if idx.size < n_stars:
        raise ValueError(f"{path}: only {idx.size} members with {g_range[0]} <= G <= "
                         f"{g_range[1]}, asked for {n_stars}")
    pick = idx[np.unique(np.round(np.linspace(0, idx.size - 1, n_stars)).astype(int))]
    return cat[pick]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=60)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--gibbs-samples", type=int, default=1500)
    p.add_argument("--unpooled-samples", type=int, default=500,
                   help="draws per chain of the unpooled fit (K = chains x this)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--cluster", default=None,
                   help="a Gaia catalogue (e.g. ../shared/data/clusters/m67/m67_gaia.ecsv) "
                        "instead of the mock: --n-stars literature members (column "
                        "'member', else member_prob > 0.5) spread evenly in G over "
                        "--g-range")
    p.add_argument("--g-range", type=float, nargs=2, default=(10.5, 15.5))
    p.add_argument("--parametrisation-study", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/compare_routes[_<cluster>].json")
    a = p.parse_args(argv)
    if a.quick:
        a.n_stars, a.chains, a.warmup, a.samples = 20, 2, 150, 150
        a.gibbs_samples, a.unpooled_samples = 400, 300
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    grid = load_grid()
    truth_params = ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0, av_mag=0.1)
    if a.cluster:
        catalogue = _cluster_subset(a.cluster, a.n_stars, a.g_range)
        truth = {}
    else:
        sim = simulate_cluster(truth_params, n_stars=a.n_stars, seed=a.seed, grid=grid)
        catalogue, truth = sim.catalogue, sim.params._asdict()
    key = jax.random.key(a.seed)
    record = {"script": "scripts/compare_routes.py", "argv": vars(a), "versions": versions(),
              "mock": None if a.cluster else {"params": truth, "n_stars": a.n_stars,
                                              "seed": a.seed},
              "cluster": a.cluster and {"path": a.cluster, "n_stars": a.n_stars,
                                        "g_range": list(a.g_range)},
              "machine": {"cpu_count": os.cpu_count(), "loadavg_start": load0}}
    t0 = time.perf_counter()
    prob = routes.prepare_problem(catalogue, fit_widths=False, grid=grid, truth=truth)
    record["prepare_s"] = time.perf_counter() - t0

    joint = routes.fit_joint(prob, jax.random.fold_in(key, 1), num_chains=a.chains,
                             num_warmup=a.warmup, num_samples=a.samples)
    gibbs = routes.fit_gibbs(prob, jax.random.fold_in(key, 2), num_chains=a.chains,
                             num_warmup=a.warmup, num_samples=a.gibbs_samples,
                             store_stars=False)
    unpooled = routes.fit_unpooled(prob, jax.random.fold_in(key, 3), num_chains=a.chains,
                                   num_warmup=a.warmup, num_samples=a.unpooled_samples)
    rw = routes.fit_reweighted(prob, unpooled, jax.random.fold_in(key, 4),
                               num_chains=a.chains, num_warmup=a.warmup,
                               num_samples=a.samples)
    results = [joint, gibbs, rw]
    record["routes"] = {r.route: _route_record(r, truth) for r in results}
    record["comparison"] = routes.compare_routes(results, truth=truth or None)
    record["unpooled"] = {"K": int(unpooled.log_p0.shape[1]), "rhat_max": unpooled.rhat_max,
                          "timings": {k: float(v) for k, v in unpooled.timings.items()}}
    centre = truth or {k: float(np.mean(joint.population[k]))
                       for k in ("log_age", "feh", "distance_pc", "av_mag")}
    popv = {**{k: centre[k] for k in ("log_age", "feh", "distance_pc", "av_mag")},
            "sigma_log_age": 0.05, "sigma_feh": 0.05,
            "sigma_distance_pc": 0.02 * centre["distance_pc"],
            "sigma_av_mag": 0.05}
    nw = routes.neff_versus_width(unpooled, popv, [1.0, 0.3, 0.1, 0.03, 0.01])
    record["neff_versus_width"] = {
        "widths_at_factor_1": {k: v for k, v in popv.items() if k.startswith("sigma")},
        "factor": nw["factor"].tolist(), "median_over_stars": nw["median"].tolist(),
        "min_over_stars": nw["min"].tolist()}
    record["reweight_neff_at_posterior"] = {
        "median_over_stars_of_median": float(np.median(rw.extra["n_eff_median"])),
        "min_over_stars_of_min": float(np.min(rw.extra["n_eff_min"])),
        "stars_below_10": int(np.sum(rw.extra["n_eff_min"] < 10))}

    if a.parametrisation_study:
        prob_w = routes.prepare_problem(catalogue, fit_widths=True, grid=grid, truth=truth)
        study = {}
        for name, fn in (
                ("joint", lambda: routes.fit_joint(
                    prob_w, jax.random.fold_in(key, 11), num_chains=a.chains,
                    num_warmup=a.warmup, num_samples=a.samples)),
                ("gibbs-noncentred", lambda: routes.fit_gibbs(
                    prob_w, jax.random.fold_in(key, 12), num_chains=a.chains,
                    num_warmup=a.warmup, num_samples=a.gibbs_samples, store_stars=False)),
                ("gibbs-centred", lambda: routes.fit_gibbs(
                    prob_w, jax.random.fold_in(key, 13), parametrisation="centred",
                    num_chains=a.chains, num_warmup=a.warmup, num_samples=a.gibbs_samples,
                    store_stars=False))):
            r = fn()
            study[name] = _route_record(r, truth)
        record["parametrisation_study_all_widths"] = study

    record["machine"]["loadavg_end"] = os.getloadavg()
    record["total_s"] = time.perf_counter() - t_all
    tag = f"_{Path(a.cluster).stem.split('_')[0]}" if a.cluster else ""
    out = Path(a.out or ROOT / f"benchmarks/results/compare_routes{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=float))
    for row in record["comparison"]:
        print(f"{row['route']:9s} {row['parameter']:12s} mean {row['mean']:10.4f} "
              f"sd {row['sd']:8.4f} R-hat {row['rhat']:5.3f} ESS {row['ess_bulk']:7.1f} "
              f"ESS/s {row['ess_per_s']:7.3f} off {row.get('offset_vs_ref_sd', 0):6.2f}")
    print(f"wrote {out} ({record['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
