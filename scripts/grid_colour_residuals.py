"""The bundled MIST grid's main-sequence colour against real clusters at literature parameters.

Is M67's colour residual (docs/performance.md, "Real data: M67") the grid's or M67's? This
script puts every named cluster in ``../shared/data/clusters`` with Gaia Collaboration
(2018, HRD paper, Table 2) parameters on the same footing: members' absolute magnitude
(per-star parallax for clusters nearer than ~250 pc, else the table's distance modulus),
minus the MIST isochrone at the table's log age, [Fe/H] and E(B-V) (A_V = 3.1 E(B-V)), in the
catalogue's own Gaia passbands (DR2 or DR3). Per bin of absolute G it reports the 25th
percentile (the single-star edge; unresolved binaries lie red of it) and the median of
BP-RP(observed) - BP-RP(MIST at the same absolute G), and MIST's Teff there.

If the residual is a function of absolute magnitude (Teff) shared by clusters of different
age and [Fe/H], it is the grid's colour systematic, not a cluster's parameters.

    python scripts/grid_colour_residuals.py [--json benchmarks/results/grid_colour_residuals.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import numpy as np
from astropy.table import Table

from clusterhbm.grid import load_grid
from clusterhbm.prediction import predict
from clusterhbm.results import versions

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"
# Gaia Collaboration 2018 (A&A 616, A10), Table 2: distance modulus, log age, [Fe/H], E(B-V)
GC18 = {
    "hyades": (3.389, 8.90, 0.13, 0.001),
    "coma_ber": (4.669, 8.81, 0.00, 0.000),
    "pleiades": (5.667, 8.04, -0.01, 0.045),
    "praesepe": (6.350, 8.85, 0.16, 0.027),
    "blanco1": (6.876, 8.06, 0.03, 0.010),
    "alpha_per": (6.214, 7.85, 0.14, 0.090),
    "m67": (9.726, 9.54, 0.03, 0.037),
}
MIN_STARS = 5


def ms_curve(log_age, feh, av_mag, bands, grid):
    """MIST main sequence at 10 pc: (G, BP-RP, Teff), faint end to the turnoff."""
    eep = np.linspace(1.0, 707.0, 4000)
    r = predict(eep=eep, log_age=log_age, feh=feh, distance_pc=10.0, av_mag=av_mag,
                bands=bands, grid=grid)
    ok = r["valid"]
    g, c, t = r[bands[0]][ok], r[bands[1]][ok] - r[bands[2]][ok], r["teff_k"][ok]
    bg = r[bands[1]][ok] - g
    # main sequence: from the faint end to the bluest point brighter than M_G = 6
    k = int(np.argmin(np.where(g < 6.0, c, np.inf)))
    keep = np.arange(len(g)) <= k
    # pre-main-sequence hooks of the youngest clusters: keep G monotonic
    g, c, t, bg = g[keep], c[keep], t[keep], bg[keep]
    mono = np.minimum.accumulate(g) == g
    return g[mono], c[mono], t[mono], bg[mono]


def residuals(name, grid, edges, plx_snr=10.0):
    dm, log_age, feh, ebv = GC18[name]
    t = Table.read(SHARED / name / f"{name}_gaia.ecsv")
    rel = str(t.meta.get("gaia_release", "DR3")).upper()
    bands = ("G_DR2", "BP_DR2", "RP_DR2") if rel == "DR2" else ("G", "BP", "RP")
    mem = np.asarray(t["member"], bool)
    g = np.asarray(t["phot_g_mean_mag"], float)
    c = np.asarray(t["phot_bp_mean_mag"], float) - np.asarray(t["phot_rp_mean_mag"], float)
    plx = np.asarray(t["parallax"], float)
    plx_e = np.asarray(t["parallax_error"], float)
    per_star = dm < 7.0
    if per_star:
        good = mem & np.isfinite(plx) & (plx > 0) & (plx / plx_e > plx_snr)
        g_abs = g + 5 * np.log10(np.where(plx > 0, plx, np.nan) / 100.0)
    else:
        good = mem
        g_abs = g - dm
    good &= np.isfinite(g_abs) & np.isfinite(c)
    av = 3.1 * ebv
    mg, mc, mt, mbg = ms_curve(log_age, feh, av, bands, grid)
    order = np.argsort(mg)
    model = np.interp(g_abs, mg[order], mc[order], left=np.nan, right=np.nan)
    res = c - model
    # the split of the colour residual between the bands, G held as the anchor
    bp_g = np.asarray(t["phot_bp_mean_mag"], float) - g
    res_bp = bp_g - np.interp(g_abs, mg[order], mbg[order], left=np.nan, right=np.nan)
    res_rp = res - res_bp  # (G - RP) residual: BP-RP = (BP-G) + (G-RP)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        m = good & (g_abs >= lo) & (g_abs < hi) & np.isfinite(res)
        mid = 0.5 * (lo + hi)
        teff = float(np.interp(mid, mg[order], mt[order], left=np.nan, right=np.nan))
        enough = m.sum() >= MIN_STARS
        # the bluer half in BP-RP: mostly single stars (binaries lie red)
        blue = m & (res <= np.median(res[m])) if enough else m
        rows.append({"mg_lo": float(lo), "mg_hi": float(hi), "n": int(m.sum()),
                     "teff_k": teff,
                     "p25": float(np.percentile(res[m], 25)) if enough else None,
                     "median": float(np.median(res[m])) if enough else None,
                     "blue_half_bp_rp": float(np.median(res[blue])) if enough else None,
                     "blue_half_bp_g": float(np.median(res_bp[blue])) if enough else None,
                     "blue_half_g_rp": float(np.median(res_rp[blue])) if enough else None})
    return {"cluster": name, "gaia_release": rel, "bands": list(bands),
            "gc18": {"dm": dm, "log_age": log_age, "feh": feh, "ebv": ebv, "av_mag": av},
            "distance": "per-star parallax" if per_star else "cluster distance modulus",
            "n_used": int(good.sum()), "bins": rows}


def correction_table(calib, min_clusters=4, mg_min=2.5):
    """Per bin of absolute G with >= ``min_clusters`` calibrators: MIST's Teff there and
    the median over the clusters of the blue-half (BP-G) and (G-RP) residuals, as the
    offsets to add to MIST's BP and RP magnitudes (G the anchor). Bins brighter than
    ``mg_min`` (A stars: few per cluster, rotation, chemical peculiarity) are left out."""
    knots = []
    for j, b0 in enumerate(calib[0]["bins"]):
        vals = [(o["bins"][j]["teff_k"], o["bins"][j]["blue_half_bp_g"],
                 o["bins"][j]["blue_half_g_rp"], o["bins"][j]["n"]) for o in calib
                if o["bins"][j]["blue_half_bp_g"] is not None]
        if len(vals) < min_clusters or b0["mg_lo"] < mg_min:
            continue
        t, bp, rp, n = (np.array(v, float) for v in zip(*vals))
        knots.append({"mg_lo": b0["mg_lo"], "mg_hi": b0["mg_hi"],
                      "teff_k": float(np.median(t)), "d_bp_mag": float(np.median(bp)),
                      "d_rp_mag": float(-np.median(rp)), "n_clusters": len(vals),
                      "n_stars": int(n.sum()),
                      "spread_bp_rp": float(np.std(bp + rp))})
    knots.sort(key=lambda k: k["teff_k"])
    return {"name": "gaia-ms", "calibrators": [o["cluster"] for o in calib],
            "statistic": "median over clusters of the median residual of each bin's bluer "
                         "half in BP-RP, at Gaia Collaboration (2018) Table 2 parameters",
            "knots": knots}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clusters", default=",".join(GC18))
    p.add_argument("--json", default="benchmarks/results/grid_colour_residuals.json")
    p.add_argument("--calibrators", default="hyades,coma_ber,pleiades,praesepe,blanco1,"
                   "alpha_per", help="clusters the correction is built from (not M67)")
    p.add_argument("--min-clusters", type=int, default=4,
                   help="a bin enters the correction when this many calibrators have it")
    p.add_argument("--colour-correction", default=None,
                   help="residuals of the corrected grid (e.g. gaia-ms): the check")
    p.add_argument("--write-correction", default=None,
                   help="write the correction table (e.g. clusterhbm/data/"
                   "colour_correction_ms.json)")
    a = p.parse_args(argv)
    grid = load_grid(colour_correction=a.colour_correction)
    edges = np.arange(1.0, 10.51, 0.5)
    out = [residuals(n, grid, edges) for n in a.clusters.split(",")]
    head = "M_G bin    " + " ".join(f"{o['cluster'][:9]:>9}" for o in out) + "  MIST Teff"
    print("25th percentile of BP-RP(obs) - BP-RP(MIST), members, per bin of absolute G")
    print(head)
    for j, (lo, hi) in enumerate(itertools.pairwise(edges)):
        cells = []
        for o in out:
            v = o["bins"][j]["p25"]
            cells.append(f"{v:+9.3f}" if v is not None else " " * 9)
        teffs = [o["bins"][j]["teff_k"] for o in out if np.isfinite(o["bins"][j]["teff_k"])]
        tt = f"{np.median(teffs):7.0f} K" if teffs else ""
        print(f"{lo:4.1f}-{hi:4.1f}  " + " ".join(cells) + "  " + tt)
    print("stars used: " + ", ".join(f"{o['cluster']} {o['n_used']}" for o in out))
    calib = [o for o in out if o["cluster"] in a.calibrators.split(",")]
    corr = correction_table(calib, min_clusters=a.min_clusters)
    held = [o for o in out if o not in calib]
    print(f"\ncorrection from {', '.join(o['cluster'] for o in calib)} (median of the "
          "blue-half medians; added to MIST's BP and RP magnitudes, G unchanged):")
    print("  Teff [K]   dBP     dRP   d(BP-RP) " + " ".join(
        f"{o['cluster'][:9]:>9}" for o in held) + "  (held out: blue-half BP-RP residual)")
    for k in corr["knots"]:
        cells = []
        for o in held:
            b = next(b for b in o["bins"] if b["mg_lo"] == k["mg_lo"])
            v = b["blue_half_bp_rp"]
            cells.append(f"{v:+9.3f}" if v is not None else " " * 9)
        print(f"  {k['teff_k']:6.0f}  {k['d_bp_mag']:+.3f}  {k['d_rp_mag']:+.3f}  "
              f"{k['d_bp_mag'] - k['d_rp_mag']:+.3f}   " + " ".join(cells))
    if a.write_correction:
        wpath = pathlib.Path(a.write_correction)
        corr.update({"script": "scripts/grid_colour_residuals.py",
                     "versions": versions()})
        wpath.write_text(json.dumps(corr, indent=1))
        print(f"wrote {wpath}")
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"script": "scripts/grid_colour_residuals.py",
                                "clusters": out, "versions": versions()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
