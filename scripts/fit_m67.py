"""M67 end to end: the real Gaia DR3 catalogue, as it comes, with the full model.

    python scripts/fit_m67.py --chains 2 --warmup 300 --samples 300 -o /tmp/m67_fit.h5
    python scripts/fit_m67.py --cubic --widths distance_pc --chains 4 --warmup 1000 \
        --samples 1000
    python scripts/fit_m67.py --cubic --marginal --chains 4 --warmup 500 --samples 500
    python scripts/fit_m67.py --cubic --marginal --chains 4 --warmup 500 --samples 500 \
        --priors docs/priors_m67_spectroscopic.toml --json benchmarks/results/m67_fit_feh.json

Binaries, the field/outlier mixture, the selection function (G limit = the catalogue's
faintest star) and the mass-function slope are on; the literature ``member`` column is used
only to evaluate the fitted membership probabilities. Writes the summary (with the
membership/binary evaluation and the wall time) to ``benchmarks/results/m67_fit.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

import numpy as np

from clusterhbm.catalogue import read_catalogue
from clusterhbm.fit import fit_cluster, priors_from_toml
from clusterhbm.marginal import MarginalOptions

DEFAULT = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"
           / "m67" / "m67_gaia.ecsv")


def evaluate_membership(res, cat):
    """Completeness/contamination of p_member > 0.5 against the literature members."""
    sid = np.asarray(cat["source_id"])
    lit = dict(zip(sid, np.asarray(cat["member"], bool)))
    pm = res.stars["p_member"].mean(axis=(0, 1)) if "p_member" in res.stars else None
    if pm is None:
        return {}
    is_lit = np.array([lit[s] for s in res.source_id])
    sel = pm > 0.5
    out = {"n_fit": len(pm), "n_literature_members": int(is_lit.sum()),
           "n_p_member_gt_0.5": int(sel.sum()),
           "completeness": float((sel & is_lit).sum() / max(is_lit.sum(), 1)),
           "contamination": float((sel & ~is_lit).sum() / max(sel.sum(), 1)),
           "expected_members": float(pm.sum())}
    if "p_binary" in res.stars:
        pb = res.stars["p_binary"].mean(axis=(0, 1))
        out["n_p_binary_gt_0.5_among_members"] = int(((pb > 0.5) & sel).sum())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("catalogue", nargs="?", default=str(DEFAULT))
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--widths", default="",
                   help="widths to fit: a comma list of log_age, feh, distance_pc, av_mag, or "
                        "'all' (default none). With the log_age and [Fe/H] widths fixed every "
                        "star shares one isochrone table, with the [Fe/H] and A_V widths "
                        "fixed one BC slice: much cheaper per gradient, cubic especially")
    p.add_argument("--no-mf-slope", action="store_true")
    p.add_argument("--g-lim", type=float, default=18.0,
                   help="faint G limit (default 18: below ~0.6 Msun MIST's Gaia colours "
                        "drift from the observed M-dwarf sequence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cubic", action="store_true",
                   help="C1 cubic interpolation (see docs/performance.md: the linear scheme's "
                        "kinks at grid nodes cap the NUTS step size)")
    p.add_argument("--marginal", action="store_true",
                   help="integrate every star's mass and q out (clusterhbm.marginal): the "
                        "mixture model mixes only this way; needs no widths")
    p.add_argument("--n-q", type=int, default=24, help="mass-ratio bins (--marginal)")
    p.add_argument("--n-segments", type=int, default=192,
                   help="fixed segments per star (--marginal)")
    p.add_argument("--priors", default=None,
                   help="TOML file of hyperpriors (e.g. docs/priors_m67_spectroscopic.toml: "
                        "the spectroscopic [Fe/H])")
    p.add_argument("--colour-correction", default=None,
                   help="empirical BP/RP correction of the grid (e.g. gaia-ms)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--chunk-size", type=int, default=50)
    p.add_argument("-o", "--output", default="/tmp/m67_fit.h5")
    p.add_argument("--json", default="benchmarks/results/m67_fit.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = ("log_age", "feh", "distance_pc", "av_mag")
    chosen = names if a.widths == "all" else tuple(w for w in a.widths.split(",") if w)
    bad = [w for w in chosen if w not in names]
    if bad:
        p.error(f"--widths: unknown {bad}; expected some of {names} or 'all'")
    fit_widths = tuple(n in chosen for n in names)
    cat = read_catalogue(a.catalogue)
    t0 = time.perf_counter()
    res = fit_cluster(cat, num_chains=a.chains, num_warmup=a.warmup, num_samples=a.samples,
                      seed=a.seed, fit_widths=fit_widths, binaries=True, field=True,
                      selection=True, g_lim=a.g_lim, fit_mf_slope=not a.no_mf_slope,
                      cubic=a.cubic, progress=True,
                      priors=priors_from_toml(a.priors) if a.priors else None,
                      checkpoint=a.checkpoint, chunk_size=a.chunk_size, marginal=a.marginal,
                      marginal_options=MarginalOptions(n_q=a.n_q, n_segments=a.n_segments),
                      colour_correction=a.colour_correction)
    wall = time.perf_counter() - t0
    print(res.summary_text())
    res.to_hdf5(a.output)
    record = {"catalogue": str(a.catalogue), "settings": {k: v for k, v in vars(a).items()},
              "summary": res.summary_json(), "membership": evaluate_membership(res, cat),
              "wall_s": wall, "versions": res.meta}
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(json.dumps(record["membership"], indent=1))


if __name__ == "__main__":
    main()
