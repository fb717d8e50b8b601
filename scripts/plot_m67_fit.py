"""CMD of an M67 fit: posterior isochrones over the stars, coloured by membership and
binary probability (issue 5's figure), from a results file of ``scripts/fit_m67.py``.

    python scripts/plot_m67_fit.py /tmp/m67_free.h5 -o docs/figures/m67_cmd_marginal
    python scripts/plot_m67_fit.py /tmp/m67_free.h5 /tmp/m67_feh.h5 \
        -o docs/figures/m67_cmd_marginal

With a second results file its median isochrone is drawn too (dashed), e.g. the fit with
the spectroscopic [Fe/H] prior.
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import numpy as np

from clusterhbm.catalogue import read_catalogue
from clusterhbm.plots import plot_cmd, posterior_isochrones, save_figure
from clusterhbm.results import load_results

DEFAULT = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"
           / "m67" / "m67_gaia.ecsv")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fit")
    p.add_argument("second", nargs="?", default=None)
    p.add_argument("--catalogue", default=str(DEFAULT))
    p.add_argument("-o", "--output", default="m67_cmd")
    a = p.parse_args(argv)
    fit = load_results(a.fit)
    cat = read_catalogue(a.catalogue)
    rows = {s: i for i, s in enumerate(np.asarray(cat["source_id"]))}
    sub = cat[np.array([rows[s] for s in fit.source_id])]
    p_mem = fit.stars["p_member"].mean(axis=(0, 1))
    p_bin = fit.stars["p_binary"].mean(axis=(0, 1))
    isos = posterior_isochrones(fit, n_draws=20)
    title = "M67, Gaia DR3, marginal model"
    if (fit.settings or {}).get("colour_correction"):
        title += ", colour-corrected MIST"
    if a.second:
        other = posterior_isochrones(load_results(a.second), n_draws=1)[-1]
        other.update(color="tab:blue", ls="--", label="with [Fe/H] prior")
        isos.append(other)
    fig = plot_cmd(sub, member_prob=p_mem, binary_prob=p_bin, isochrones=isos, title=title)
    for path in save_figure(fig, a.output, formats=("png",)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
