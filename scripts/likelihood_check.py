"""Is a recovery miss in the data or in the model's numerics? The marginal model's
likelihood against a brute-force one at the truth and at the fit's posterior mean.

    python scripts/likelihood_check.py --case b --seed 1 --sim-floor 0.01 \
        --results benchmarks/results/recovery_marginal_zero_b500_seed1001_floor.json

For the recovery study's mock (``recovery_study.mock_catalogue``: single stars, G <= 19,
zero widths) it evaluates, along the straight line from the truth (t = 0) to the fit's
posterior mean (t = 1) of (log age, [Fe/H], distance, A_V):

- the marginal model's total star term (:func:`clusterhbm.marginal.log_density_marginal`,
  ``per_star``; every star's mass integrated along chords between EEP nodes, minus
  N log P_det) at its default options, with every segment, and with ``refine`` 2 and 4;
- a brute force of the same quantity: each star's single-star likelihood integrated over
  200001 EEPs of the model's own isochrone (the simulator's forward model, no chords),
  the parallax term, and log P_det by the same fine grid, both with the model's soft cut
  (``Priors.selection_width_mag``).

If the brute force also prefers t = 1 by about z^2 / 2 nats, the data prefer the fitted
point and the miss is in the mock (noise, or a simulator-model mismatch the brute force
shares); if only the marginal model does, its numerics cause it. Writes
``benchmarks/results/likelihood_check_<case><seed>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_study import mock_catalogue, truth_of

from clusterhbm.fit import band_indices, prepare_data
from clusterhbm.grid import load_grid
from clusterhbm.imf import imf_cdf, log_imf
from clusterhbm.isochrone import table_eep_range, table_interp
from clusterhbm.marginal import MarginalOptions, log_density_marginal
from clusterhbm.model import (
    ModelConfig,
    Priors,
    pop_to_unconstrained,
    population_state,
)
from clusterhbm.photometry import photometry
from clusterhbm.results import versions

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("log_age", "feh", "distance_pc", "av_mag")


def fine_track(popv, grid, cfg, n_fine):
    table = popv["iso_table"]
    lo, hi = table_eep_range(table)
    fine = jnp.linspace(lo, hi, n_fine)
    props = jax.vmap(lambda e: table_interp(table, e, cubic=cfg.cubic))(fine)
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, popv["feh"], popv["distance_pc"],
                                         popv["av_mag"], cfg.band_idx, cubic=cfg.cubic,
                                         bcs=popv["bc_slice"]))(props)
    return (np.asarray(props.initial_mass, float), np.asarray(obs.mags, float),
            np.asarray(obs.valid, bool))


def brute_terms(point, data, grid, cfg, pri, n_fine=200001):
    """(total single-star log likelihood incl. parallax, N, log P_det) at a physical
    point, P_det with the model's soft cut."""
    popv = population_state(pop_to_unconstrained(point, cfg), cfg, pri, grid)
    m, mags, valid = fine_track(popv, grid, cfg, n_fine)
    m, mags = m[valid], mags[valid]
    kw = {"kind": "kroupa", "m_min": pri.m_min, "m_max": pri.m_max, "alpha": pri.imf_alpha}
    limf = np.asarray(log_imf(jnp.asarray(m), **kw), float)
    log_z = float(np.log(imf_cdf(jnp.asarray(m.max()), **kw)))
    dm = np.diff(m)
    y = np.asarray(data.mag, float)
    e = np.asarray(data.mag_err, float)
    v = e ** 2 + pri.mag_floor ** 2
    tot = 0.0
    for i in range(y.shape[0]):
        ok = np.isfinite(y[i])
        ll = -0.5 * np.sum(((y[i, ok] - mags[:, ok]) ** 2 / v[i, ok])
                           + np.log(2 * np.pi * v[i, ok]), axis=1) + limf
        mid = 0.5 * (ll[1:] + ll[:-1])
        mx = mid.max()
        tot += mx + np.log(np.sum(np.exp(mid - mx) * dm)) - log_z
    plx = np.asarray(data.parallax_mas, float)
    pe = np.asarray(data.parallax_err_mas, float)
    okp = np.isfinite(plx)
    mod = 1000.0 / point["distance_pc"]
    tot += float(np.sum(-0.5 * ((plx[okp] - mod) / pe[okp]) ** 2
                        - np.log(np.sqrt(2 * np.pi) * pe[okp])))
    g = mags[:, 0]
    f = np.exp(limf)

    def log_p(s):
        mid = 0.5 * (f[1:] * s[1:] + f[:-1] * s[:-1])
        return float(np.log(np.sum(mid * dm)) - log_z)

    soft = np.asarray(ndtr((pri.g_lim - g) / pri.selection_width_mag), float)
    return tot, y.shape[0], log_p(soft)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="b")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--sim-floor", type=float, default=0.01)
    p.add_argument("--results", required=True, help="recovery_study JSON with the fit")
    p.add_argument("--ts", default="0,0.5,1")
    p.add_argument("--n-fine", type=int, default=200001)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = json.loads(Path(a.results).read_text())["rows"]
    row = next(r for r in rows if r["case"] == a.case and r["seed"] == a.seed
               and not r["widths"])
    truth = {k: truth_of(a.case, False)[k] for k in NAMES}
    post = {k: row["params"][k]["mean"] for k in NAMES}
    sd = {k: row["params"][k]["sd"] for k in NAMES}
    cat = mock_catalogue(a.case, False, a.seed, a.n_stars, sim_floor=a.sim_floor)
    g_lim = float(np.ceil(np.nanmax(np.asarray(cat["phot_g_mean_mag"], float)) * 10.0
                      + 1e-9) / 10.0)
    pri = Priors()._replace(g_lim=g_lim, g_bright=-5.0)
    fd = prepare_data(cat, g_lim=g_lim, g_bright=None, member_prob_column=None)
    cfg = ModelConfig(band_idx=band_indices(fd.bands), pooled=True,
                      fit_widths=(False,) * 4, selection=True)
    grid = load_grid()
    opts = {"default": MarginalOptions(), "every_segment": MarginalOptions(n_blocks=None),
            "refine2": MarginalOptions(n_blocks=None, refine=2),
            "refine4": MarginalOptions(n_blocks=None, refine=4)}
    fns = {k: jax.jit(lambda pop, o=o: jnp.sum(log_density_marginal(
        pop, fd.data, grid, cfg, pri, o, per_star=True))) for k, o in opts.items()}
    out = {"script": "scripts/likelihood_check.py", "args": vars(a), "truth": truth,
           "posterior_mean": post, "posterior_sd": sd, "n_stars": int(fd.data.mag.shape[0]),
           "g_lim": g_lim, "versions": versions(), "points": []}
    for t in (float(s) for s in a.ts.split(",")):
        point = {k: truth[k] + t * (post[k] - truth[k]) for k in NAMES}
        rec = {"t": t, "point": point}
        pop = pop_to_unconstrained(point, cfg)
        for k, fn in fns.items():
            rec["marginal_" + k] = float(fn(pop))
        ll, n, lp_soft = brute_terms(point, fd.data, grid, cfg, pri, a.n_fine)
        rec["brute_star_terms"] = ll
        rec["brute_log_p_detect"] = lp_soft
        rec["brute_total"] = ll - n * lp_soft
        out["points"].append(rec)
        print(json.dumps(rec), flush=True)
    base = out["points"][0]
    keys = [k for k in base if k.startswith("marginal_")] + ["brute_total",
                                                             "brute_star_terms"]
    print("gain over the truth (nats), by t:")
    for rec in out["points"]:
        print(f"  t={rec['t']:.2f}: " + "  ".join(f"{k}={rec[k] - base[k]:+.2f}"
                                                   for k in keys))
    z = {k: (post[k] - truth[k]) / sd[k] for k in NAMES}
    print("fit z:", {k: round(v, 2) for k, v in z.items()})
    path = Path(a.out or ROOT / f"benchmarks/results/likelihood_check_{a.case}{a.seed}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
