# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The Pleiades: young, nearby, parallax-dominated
#
# At ~135 pc the Pleiades' Gaia parallaxes (~7.4 mas, errors 0.02-0.1 mas) measure each
# star's distance to better than 1%, so here the hierarchy learns the cluster's *depth*
# (the distance width, a few pc) rather than borrowing a distance for every star. The age
# (~100-130 Myr) comes from the upper main sequence and the low-mass stars still
# contracting onto it. This notebook fetches the DR3 catalogue (offline from a seeded
# cache when needed), fits binaries + field + selection with the distance and A_V widths
# free, and draws the figures. `CLUSTERHBM_QUICK=1` runs a tiny version (CI).

# %%
import os
import pathlib

import numpy as np
from astropy.table import Table

from clusterhbm import gaia
from clusterhbm.fit import fit_cluster
from clusterhbm.plots import (
    plot_cmd,
    plot_corner,
    plot_parallax,
    posterior_isochrones,
    save_figure,
)

QUICK = os.environ.get("CLUSTERHBM_QUICK") == "1"
OFFLINE = QUICK or os.environ.get("CLUSTERHBM_OFFLINE") == "1"
OUT = pathlib.Path(os.environ.get("CLUSTERHBM_NOTEBOOK_OUT", "notebook_output")) / "pleiades"
OUT.mkdir(parents=True, exist_ok=True)
HERE = pathlib.Path(__file__).resolve().parent if "__file__" in globals() else pathlib.Path.cwd()
SHARED = pathlib.Path(os.environ.get("CLUSTERHBM_SHARED", HERE.parents[1] / "shared"))
SHARED_PLEIADES = SHARED / "data" / "clusters" / "pleiades" / "pleiades_gaia.ecsv"

# %%
try:
    cat = gaia.fetch("Pleiades", offline=OFFLINE)
except gaia.GaiaQueryError:
    gaia.seed_cache("Pleiades", Table.read(SHARED_PLEIADES))
    cat = gaia.fetch("Pleiades", offline=True)
print(f"{len(cat)} stars after cuts; {int(np.sum(cat['member_prob'] > 0.5))} astrometric "
      f"members; median parallax {np.median(cat['parallax']):.3f} mas")

# %% [markdown]
# ## Fit
#
# G <= 15 (~0.5 Msun at 135 pc): fainter, MIST's colours of pre-main-sequence M dwarfs
# are not reliable at the 0.05 mag level. Widths: distance and A_V fitted (the cluster is
# ~10 pc deep at 135 pc and sits behind patchy dust); age and [Fe/H] widths fixed at 0.

# %%
settings = ({"num_chains": 1, "num_warmup": 40, "num_samples": 20, "max_num_doublings": 5,
                 "optimise_steps": 0, "g_lim": 9.0} if QUICK else
            {"num_chains": 4, "num_warmup": 1000, "num_samples": 1000, "g_lim": 15.0})
fit = fit_cluster(cat, seed=0, fit_widths=(False, False, True, True), binaries=True,
                  field=True, selection=True, **settings)
print(fit.summary_text())
fit.to_hdf5(OUT / "pleiades_fit.h5")

# %% [markdown]
# ## Figures: CMD with posterior isochrones, parallax vs G, corner

# %%
rows = {s: i for i, s in enumerate(np.asarray(cat["source_id"]))}
sub = cat[np.array([rows[s] for s in fit.source_id])]
p_mem = fit.stars["p_member"].mean(axis=(0, 1))
p_bin = fit.stars["p_binary"].mean(axis=(0, 1))
save_figure(plot_cmd(sub, member_prob=p_mem, binary_prob=p_bin,
                     isochrones=posterior_isochrones(fit, n_draws=20),
                     title="Pleiades, Gaia DR3"), OUT / "pleiades_cmd")
save_figure(plot_parallax(sub, fit), OUT / "pleiades_parallax")
save_figure(plot_corner(fit), OUT / "pleiades_corner")

# %% [markdown]
# ## The cluster's depth
#
# The per-star distances (posterior medians) of likely members, and the fitted distance
# width: each star's distance is set by its own parallax, and the width is the spread of
# those distances beyond their errors.

# %%
d = np.median(fit.stars["distance_pc"].reshape(-1, len(fit.source_id)), axis=0)
mem = p_mem > 0.5
s = fit.summary()
print(f"members {mem.sum()}: per-star distance median {np.median(d[mem]):.1f} pc, "
      f"robust sd {1.4826 * np.median(np.abs(d[mem] - np.median(d[mem]))):.1f} pc; "
      f"fitted width {s['sigma_distance_pc']['mean']:.1f} +- "
      f"{s['sigma_distance_pc']['sd']:.1f} pc")
