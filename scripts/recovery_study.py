"""Recovery study: mocks with known truth, fitted with the hierarchical model.

Cases (issue 4): (a) log age 8.0 at 150 pc, A_V 0.1; (b) log age 9.0 at 800 pc, A_V 0.3;
(c) log age 9.6, [Fe/H] 0, 850 pc, A_V 0.1 (M67-like); (d) log age 10.0, [Fe/H] -1.0 at
3000 pc, A_V 0.2; each with zero widths and with non-zero widths. Reports z-scores of every
population parameter, R-hat, ESS, divergences and wall time, and writes JSON records.

    python scripts/recovery_study.py [--n-stars 500] [--chains 4] [--warmup 1000]
        [--samples 1000] [--cases a,b,c,d] [--widths both|zero|nonzero] [--seeds 1]
        [--cubic] [--metric dense|diag] [--max-doublings 10] [--batch] [--marginal]
        [--selection] [--sim-floor MAG] [--fit-floor MAG] [--width-coord log|signed]

``--marginal`` fits the marginal model (:mod:`clusterhbm.marginal`: every star's mass
integrated out; with widths, per-star offsets for them).

The fit's systematic floor (``Priors.mag_floor``, 0.01 mag) is noise the mocks lack unless
``--sim-floor`` adds it: with ``--sim-floor 0`` the fit's variance for a mmag-error star is
many times the mock's real scatter and its intervals are too wide. Coverage checks set the
two floors equal (``--sim-floor 0.01``).

``--batch`` fits all mocks of one width setting in one compiled program
(:func:`clusterhbm.parallel.fit_many`, vmapped over clusters: each NUTS step waits for the
longest tree of the batch, but compiles once and keeps both cores busy); otherwise each
mock is fitted by :func:`clusterhbm.fit.fit_cluster` in turn. The JSON is rewritten after
every fit, so an interrupted study keeps what it finished.

Slow: hours on a 2-core CPU at the defaults. ``--seeds 20`` gives a coverage check
(fraction of truths inside the 68% and 95% intervals).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from clusterhbm.fit import fit_cluster
from clusterhbm.marginal import MarginalOptions
from clusterhbm.model import Priors
from clusterhbm.parallel import fit_many
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, ObservingModel, simulate_cluster

CASES = {
    "a": {"log_age": 8.0, "feh": 0.0, "distance_pc": 150.0, "av_mag": 0.1},
    "b": {"log_age": 9.0, "feh": 0.0, "distance_pc": 800.0, "av_mag": 0.3},
    "c": {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1},
    "d": {"log_age": 10.0, "feh": -1.0, "distance_pc": 3000.0, "av_mag": 0.2},
}
WIDTHS = {"sigma_log_age": 0.02, "sigma_feh": 0.03, "sigma_distance_pc": 5.0,
          "sigma_av_mag": 0.03}


def truth_of(case, wide):
    truth = dict(CASES[case])
    if wide:
        truth.update(WIDTHS)
        truth["sigma_distance_pc"] = 0.01 * truth["distance_pc"]
    return truth


def mock_catalogue(case, wide, seed, n_stars, *, cubic=False, sim_floor=0.0):
    """The study's mock for (case, widths, seed): seed 1000 + seed, G <= 19, single
    stars; ``sim_floor``: ObservingModel.mag_systematic_mag. (Also used by
    parallax_only_check.py, so both see the same stars.)"""
    return simulate_cluster(ClusterParams(**truth_of(case, wide)), n_stars=n_stars,
                            seed=1000 + seed, cubic=cubic,
                            observing=ObservingModel(mag_systematic_mag=sim_floor)).catalogue


def row_of(res, case, wide, seed, n_stars, truth, wall, chains, samples):
    s = res.summary()
    steps = np.asarray(res.sampler["num_integration_steps"])
    row = {"case": case, "widths": wide, "seed": seed, "n_stars": n_stars,
           "wall_s": wall, "divergent_frac": res.num_divergent / (chains * samples),
           "steps_per_draw": float(steps.mean()), "params": {}}
    tm = {k: float(v) for k, v in res.timings.items() if np.isscalar(v)}
    row["timings"] = tm
    if tm.get("sampling_s"):
        # leapfrog steps = gradient evaluations; all chains together (vmapped)
        row["gradients_per_s"] = float(steps.sum()) / tm["sampling_s"]
    for k, v in truth.items():
        if k not in s:
            continue
        draws = np.asarray(res.population[k]).ravel()
        q = np.percentile(draws, [2.5, 16, 84, 97.5])
        row["params"][k] = {
            "truth": v, "mean": s[k]["mean"], "sd": s[k]["sd"],
            "z": (s[k]["mean"] - v) / s[k]["sd"], "rhat": s[k]["rhat"],
            "ess_bulk": s[k]["ess_bulk"], "ess_tail": s[k]["ess_tail"],
            "in68": bool(q[1] <= v <= q[2]), "in95": bool(q[0] <= v <= q[3])}
    if tm.get("sampling_s") and row["params"]:
        ess = min(v["ess_bulk"] for v in row["params"].values())
        row["sampling_s_per_ess"] = tm["sampling_s"] / ess
    zs = " ".join(f"{k}:{v['z']:+.1f}" for k, v in row["params"].items())
    print(f"case {case} widths={wide} seed={seed}: {zs} | max R-hat "
          f"{max(v['rhat'] for v in row['params'].values()):.3f} | min ESS "
          f"{min(v['ess_bulk'] for v in row['params'].values()):.0f} | "
          f"div {row['divergent_frac']:.2%} | {row['steps_per_draw']:.0f} steps/draw | "
          f"{wall:.0f} s", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--widths", default="both", choices=("both", "zero", "nonzero"))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0,
                   help="mock seeds are 1000 + first_seed, ... (default 0: every case of a "
                        "run shares seed 1000's noise draws)")
    p.add_argument("--cubic", action="store_true", help="C1 cubic interpolation")
    p.add_argument("--metric", choices=("dense", "diag"), default=None,
                   help="adapted mass matrix (default: the fitter's choice)")
    p.add_argument("--max-doublings", type=int, default=10)
    p.add_argument("--n-starts", type=int, default=5)
    p.add_argument("--batch", action="store_true",
                   help="fit all mocks of a width setting together with fit_many")
    p.add_argument("--marginal", action="store_true",
                   help="the marginal model (mass integrated out)")
    p.add_argument("--width-coord", choices=("log", "signed"), default=None,
                   help="with --marginal: the sampler's coordinate for the widths, ln sigma "
                        "or a signed sigma (MarginalOptions.signed_widths; default: the "
                        "fitter's)")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar (stderr)")
    p.add_argument("--selection", action="store_true",
                   help="fit the selection function (the mocks are cut at G = 19: without "
                        "it the fit ignores that the detected mass range moves with "
                        "distance, age and A_V)")
    p.add_argument("--sim-floor", type=float, default=0.0, metavar="MAG",
                   help="unreported scatter added to the mocks' G, BP, RP (ObservingModel."
                        "mag_systematic_mag; default 0: the mocks scatter by their reported "
                        "errors only)")
    p.add_argument("--fit-floor", type=float, default=None, metavar="MAG",
                   help="the fit's systematic floor (Priors.mag_floor; default: the "
                        "Priors default, 0.01). Coverage is calibrated when the two floors "
                        "are equal")
    p.add_argument("--out", default="benchmarks/results/recovery_study.json")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the coverage of an existing results file and exit")
    a = p.parse_args(argv)
    if a.report:
        report_coverage(json.loads(Path(a.report).read_text())["rows"])
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps({"script": "scripts/recovery_study.py", "rows": rows,
                                   "versions": versions(), "args": vars(a),
                                   "loadavg": os.getloadavg()}, indent=1))

    dense = None if a.metric is None else a.metric == "dense"
    priors = None if a.fit_floor is None else Priors(mag_floor=a.fit_floor)
    mopts = (None if a.width_coord is None
             else MarginalOptions(signed_widths=a.width_coord == "signed"))
    wopts = {"both": (False, True), "zero": (False,), "nonzero": (True,)}[a.widths]
    for wide in wopts:
        seeds = range(a.first_seed, a.first_seed + a.seeds)
        jobs = [(case, seed) for case in a.cases.split(",") for seed in seeds]
        truths = [truth_of(case, wide) for case, _ in jobs]
        # the mock uses the fit's interpolation scheme (see simulate_cluster's ``cubic``)
        cats = [mock_catalogue(case, wide, seed, a.n_stars, cubic=a.cubic,
                               sim_floor=a.sim_floor) for case, seed in jobs]
        if a.batch:
            t0 = time.perf_counter()
            fits = fit_many(cats, num_chains=a.chains, num_warmup=a.warmup,
                            num_samples=a.samples, seed=0, fit_widths=wide, cubic=a.cubic,
                            n_starts=a.n_starts, dense_mass_matrix=dense,
                            max_num_doublings=a.max_doublings, truths=truths,
                            priors=priors, progress=True)
            wall = time.perf_counter() - t0
            for (case, seed), t, res in zip(jobs, truths, fits):
                rows.append(row_of(res, case, wide, seed, a.n_stars, t, wall, a.chains,
                                   a.samples))
            save()
            continue
        for (case, seed), t, cat in zip(jobs, truths, cats):
            t0 = time.perf_counter()
            res = fit_cluster(cat, num_chains=a.chains, num_warmup=a.warmup,
                              num_samples=a.samples, seed=seed, fit_widths=wide,
                              cubic=a.cubic, n_starts=a.n_starts,
                              dense_mass_matrix=dense, max_num_doublings=a.max_doublings,
                              truth=t, marginal=a.marginal, progress=a.progress,
                              selection=a.selection, priors=priors,
                              marginal_options=mopts)
            rows.append(row_of(res, case, wide, seed, a.n_stars, t,
                               time.perf_counter() - t0, a.chains, a.samples))
            save()
    if a.seeds > 1:
        report_coverage(rows)
    print(f"wrote {out}")


def report_coverage(rows):
    """Fraction of the truths inside the 68 % and 95 % intervals, per population mean."""
    print(f"{len(rows)} fits; max R-hat {max(max(v['rhat'] for v in r['params'].values()) for r in rows):.3f}")
    for k in ("log_age", "feh", "distance_pc", "av_mag"):
        sel = [r["params"][k] for r in rows if k in r["params"]]
        c68 = np.mean([v["in68"] for v in sel])
        c95 = np.mean([v["in95"] for v in sel])
        zs = np.array([v["z"] for v in sel])
        out95 = [f"seed {r['seed']} (z {r['params'][k]['z']:+.1f})" for r in rows
                 if k in r["params"] and not r["params"][k]["in95"]]
        print(f"coverage {k}: 68% interval {c68:.2f}, 95% interval {c95:.2f} "
              f"(n = {len(sel)}; z mean {zs.mean():+.2f}, sd {zs.std(ddof=1):.2f}); "
              f"outside the 95% interval: {', '.join(out95) or 'none'}")


if __name__ == "__main__":
    main()
