"""Which M67 stars pull [Fe/H] where: per-star log likelihoods at two fits' posteriors.

    python scripts/fit_m67.py --cubic --marginal --chains 4 --warmup 500 --samples 500 \
        -o /tmp/m67_free.h5
    python scripts/fit_m67.py --cubic --marginal --chains 2 --warmup 300 --samples 300 \
        --priors docs/priors_m67_spectroscopic.toml -o /tmp/m67_feh.h5 \
        --json benchmarks/results/m67_fit_feh.json
    python scripts/m67_feh_compare.py /tmp/m67_free.h5 /tmp/m67_feh.h5

Both results files must come from the marginal model on the same catalogue and G limit.
At each fit's posterior median population, every star's marginal log likelihood (mass and
q integrated out over every segment, not the fit's fixed subset) is evaluated; their
difference (B - A), summed over CMD regions, says which stars prefer which answer. A star
enters its region by its observed G and BP-RP (regions below). Writes
``benchmarks/results/m67_feh_compare.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import jax
import numpy as np

from clusterhbm.catalogue import read_catalogue
from clusterhbm.fit import prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.marginal import MarginalOptions, log_density_marginal
from clusterhbm.model import ModelConfig, Priors, log_prior_population, pop_to_unconstrained
from clusterhbm.plots import isochrone_curve
from clusterhbm.results import load_results

DEFAULT = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"
           / "m67" / "m67_gaia.ecsv")
POP_KEYS = ("log_age", "feh", "distance_pc", "av_mag", "f_bin", "f_field", "mf_slope",
            "field_parallax_mas", "field_parallax_sd_mas")


def regions(g, c):
    """CMD regions of M67 (observed G, BP-RP): names and boolean masks."""
    c = np.where(np.isfinite(c), c, 99.0)
    giants = (g < 13.0) & (c > 0.95)
    bss = (g < 12.8) & (c < 0.75) & ~giants
    turnoff = (g >= 12.8) & (g < 13.8) & ~giants
    return {
        "giants and clump (G < 13, BP-RP > 0.95)": giants,
        "blue stragglers / bright blue (G < 12.8, BP-RP < 0.75)": bss,
        "subgiants (G < 12.8, other)": (g < 12.8) & ~giants & ~bss,
        "turnoff (12.8 <= G < 13.8)": turnoff,
        "upper main sequence (13.8 <= G < 15.5)": (g >= 13.8) & (g < 15.5),
        "middle main sequence (15.5 <= G < 17)": (g >= 15.5) & (g < 17.0),
        "lower main sequence (17 <= G <= 18)": g >= 17.0,
    }


def ms_colour_residuals(med, g, bp_rp, member, p_binary, grid, edges):
    """Per G bin on the main sequence: observed BP-RP minus the median isochrone's, median
    over members the fit calls single (p_binary < 0.3) and 25th percentile over all
    members (the single-star edge; binaries lie red of it)."""
    c, gm, _ = isochrone_curve(log_age=med["log_age"], feh=med["feh"],
                               distance_pc=med["distance_pc"], av_mag=med["av_mag"],
                               grid=grid)
    # the main sequence: from the faint end up to the bluest point (the turnoff)
    k = int(np.argmin(np.where(gm > 12.0, c, np.inf)))
    ms_g, ms_c = gm[:k + 1], c[:k + 1]
    order = np.argsort(ms_g)
    model = np.interp(g, ms_g[order], ms_c[order], left=np.nan, right=np.nan)
    res = bp_rp - model
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = member & (g >= lo) & (g < hi) & np.isfinite(res)
        single = m & (p_binary < 0.3)
        out.append({"g_lo": float(lo), "g_hi": float(hi), "n_members": int(m.sum()),
                    "median_single": float(np.median(res[single])) if single.sum() >= 5
                    else None,
                    "p25_members": float(np.percentile(res[m], 25)) if m.sum() >= 5
                    else None})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fit_a", help="results file A (e.g. the free fit)")
    p.add_argument("fit_b", help="results file B (e.g. the [Fe/H]-prior fit)")
    p.add_argument("--catalogue", default=str(DEFAULT))
    p.add_argument("--json", default="benchmarks/results/m67_feh_compare.json")
    a = p.parse_args(argv)
    fits = [load_results(a.fit_a), load_results(a.fit_b)]
    s0 = fits[0].settings
    for f in fits:
        if not f.settings.get("marginal"):
            raise SystemExit("both fits must use the marginal model")
        if f.settings.get("g_lim") != s0.get("g_lim"):
            raise SystemExit("the fits have different G limits")
    grid = load_grid()
    cat = read_catalogue(a.catalogue)
    fd = prepare_data(cat, g_lim=s0["g_lim"], g_bright=None,
                      member_prob_column="member_prob" if s0["field"] else None)
    if list(fd.source_id) != list(fits[0].source_id):
        raise SystemExit("the catalogue's stars differ from the fit's")
    config = ModelConfig(band_idx=band_indices(fd.bands), pooled=True,
                         fit_widths=(False,) * 4, cubic=s0["cubic"], imf=s0["imf"],
                         binaries=s0["binaries"], field=s0["field"],
                         selection=s0["selection"], fit_mf_slope=s0["fit_mf_slope"])
    opts = MarginalOptions(**{**s0["marginal_options"], "n_blocks": None})
    per_star = jax.jit(lambda pop, priors: log_density_marginal(
        pop, fd.data, grid, config, priors, opts, per_star=True))
    rows, lls, medians = [], [], []
    for f in fits:
        priors = Priors(**f.settings["priors"])
        med = {k: float(np.median(f.population[k])) for k in POP_KEYS if k in f.population}
        pop = pop_to_unconstrained(med, config)
        ll = np.asarray(per_star(pop, priors), float)
        lp_free = float(log_prior_population(pop, config, Priors(**s0["priors"]), grid))
        lls.append(ll)
        medians.append(med)
        rows.append({"median": med, "sum_log_likelihood": float(ll.sum()),
                     "log_prior_under_A": lp_free,
                     "rhat_max": max(v["rhat"] for v in f.summary().values()
                                     if np.isfinite(v.get("rhat", np.nan)))})
    d = lls[1] - lls[0]
    g = np.asarray(fd.data.mag)[:, 0]
    bp_rp = np.asarray(fd.data.mag)[:, 1] - np.asarray(fd.data.mag)[:, 2]
    out = {"fits": [a.fit_a, a.fit_b], "at": rows, "n_stars": int(d.size),
           "total_delta_log_likelihood": float(d.sum()), "regions": {}}
    print(f"A: {a.fit_a}: " + ", ".join(f"{k} {v:.4g}" for k, v in medians[0].items()))
    print(f"B: {a.fit_b}: " + ", ".join(f"{k} {v:.4g}" for k, v in medians[1].items()))
    print(f"sum log L(B) - sum log L(A) = {d.sum():+.1f} over {d.size} stars")
    for name, m in regions(g, bp_rp).items():
        out["regions"][name] = {"n": int(m.sum()), "delta_log_likelihood": float(d[m].sum()),
                                "per_star": float(d[m].mean()) if m.any() else None}
        print(f"  {name:55s} n={int(m.sum()):4d}  delta {d[m].sum():+8.1f}")
    lit = dict(zip(np.asarray(cat["source_id"]), np.asarray(cat["member"], bool)))
    member = np.array([lit[x] for x in fd.source_id])
    edges = np.arange(13.5, 18.01, 0.5)
    print("main-sequence BP-RP residual (observed - isochrone), literature members:")
    print(f"  {'G bin':12s}" + "".join(f"  {'A single':>9s} {'A p25':>7s}  {'B single':>9s} "
                                       f"{'B p25':>7s}" for _ in [0]))
    res_ab = []
    for f, med in zip(fits, medians):
        pb = f.stars["p_binary"].mean(axis=(0, 1)) if "p_binary" in f.stars \
            else np.zeros(len(g))
        res_ab.append(ms_colour_residuals(med, g, bp_rp, member, pb, grid, edges))
    for ra, rb in zip(*res_ab):
        def fmt(x):
            return f"{x:+.3f}" if x is not None else "   -  "
        print(f"  {ra['g_lo']:5.1f}-{ra['g_hi']:4.1f}  {fmt(ra['median_single']):>9s} "
              f"{fmt(ra['p25_members']):>7s}  {fmt(rb['median_single']):>9s} "
              f"{fmt(rb['p25_members']):>7s}   n={ra['n_members']}")
    out["ms_colour_residuals"] = {"A": res_ab[0], "B": res_ab[1]}
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
