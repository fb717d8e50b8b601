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
# # Pooling and shrinkage on a mock with known truth
#
# A hierarchical model does two things at once:
#
# * **pooling**: the cluster's parameters phi (age, [Fe/H], distance, A_V and their
#   spreads, the binary and field fractions) are learned from *all* stars together; bright
#   stars pin the distance through their parallaxes, turnoff and subgiant stars the age,
#   every star the metallicity and extinction;
# * **shrinkage**: each star's own posterior improves, because its prior is the fitted
#   population instead of a broad guess. A faint main-sequence star's mass is poorly
#   constrained on its own (its parallax is noisy, so its luminosity is too); inside the
#   cluster it inherits the cluster's precise distance, age and [Fe/H].
#
# We simulate an M67-like cluster with unresolved binaries and field stars, fit it with
# the full model, then fit every star alone (pooling off), and compare both with the truth.
# `CLUSTERHBM_QUICK=1` runs a tiny version (CI): its numbers are not results.

# %%
import os
import pathlib

import numpy as np

from clusterhbm.fit import fit_cluster
from clusterhbm.plots import plot_cmd, plot_shrinkage, plot_truth, save_figure
from clusterhbm.simulate import ClusterParams, simulate_cluster

QUICK = os.environ.get("CLUSTERHBM_QUICK") == "1"
OUT = pathlib.Path(os.environ.get("CLUSTERHBM_NOTEBOOK_OUT", "notebook_output")) / "mock"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The mock
#
# log age 9.6, [Fe/H] 0, 850 pc, A_V 0.1 (M67-like), 30% unresolved binaries (q uniform in
# [0.1, 1]), 10% field stars, Gaia DR3-like errors, G <= 19.

# %%
truth = ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0, av_mag=0.1, f_bin=0.3,
                      f_field=0.1)
n_stars = 60 if QUICK else 400
sim = simulate_cluster(truth, n_stars=n_stars, seed=42)
cat, t = sim.catalogue, sim.truth
print(f"{len(cat)} stars: {int(t['is_binary'].sum())} binaries, "
      f"{int(t['is_field'].sum())} field")
save_figure(plot_cmd(cat, truth=t, title="mock: truth"), OUT / "mock_cmd_truth")

# %% [markdown]
# ## Pooled fit (the hierarchical model)

# %%
settings = ({"num_chains": 1, "num_warmup": 40, "num_samples": 20, "max_num_doublings": 5,
                 "optimise_steps": 0} if QUICK else
            {"num_chains": 4, "num_warmup": 1000, "num_samples": 1000})
pooled = fit_cluster(cat, seed=0, fit_widths=False, binaries=True, field=True,
                     selection=True, g_lim=19.0, truth=truth._asdict(), **settings)
print(pooled.summary_text())
save_figure(plot_truth(pooled, star_truth=np.asarray(t["mass_msun"])), OUT / "mock_truth")

# %% [markdown]
# ### Who is a member, who is a binary?
#
# Each star's posterior membership probability (the field component's complement) and its
# probability of being an unresolved binary, against the truth.

# %%
p_mem = pooled.stars["p_member"].mean(axis=(0, 1))
p_bin = pooled.stars["p_binary"].mean(axis=(0, 1))
is_field = np.asarray(t["is_field"], bool)
is_bin = np.asarray(t["is_binary"], bool)
print(f"field stars with p_member < 0.5: {np.sum(is_field & (p_mem < 0.5))} of "
      f"{is_field.sum()}; members with p_member > 0.5: {np.sum(~is_field & (p_mem > 0.5))} "
      f"of {np.sum(~is_field)}")
q_true = np.asarray(t["q"])
bright_pairs = is_bin & (q_true > 0.6)
print(f"binaries with q > 0.6 and p_binary > 0.5: {np.sum(bright_pairs & (p_bin > 0.5))} of "
      f"{bright_pairs.sum()}; single members with p_binary > 0.5: "
      f"{np.sum(~is_bin & ~is_field & (p_bin > 0.5))}")
save_figure(plot_cmd(cat, member_prob=p_mem, binary_prob=p_bin, title="mock: fitted"),
            OUT / "mock_cmd_fit")

# %% [markdown]
# ## Unpooled fit: every star alone
#
# The same code path with `pooled=False`: each star gets its own age, [Fe/H], distance and
# A_V under broad fixed priors.

# %%
unpooled = fit_cluster(cat, seed=1, pooled=False, binaries=True, field=True, **settings)
save_figure(plot_shrinkage(pooled, unpooled, truth=np.asarray(t["mass_msun"]),
                           g_mag=np.asarray(cat["phot_g_mean_mag"])), OUT / "mock_shrinkage")


def width68(res, q="mass_msun"):
    d = res.stars[q].reshape(-1, res.stars[q].shape[-1])
    lo, hi = np.percentile(d, [16, 84], axis=0)
    return hi - lo


ratio = width68(pooled) / np.maximum(width68(unpooled), 1e-9)
members = ~is_field
print(f"median (pooled / unpooled) width of the 68% mass interval, members: "
      f"{np.median(ratio[members]):.2f}")
err_p = np.abs(np.median(pooled.stars["mass_msun"].reshape(-1, len(cat)), axis=0)
               - t["mass_msun"])
err_u = np.abs(np.median(unpooled.stars["mass_msun"].reshape(-1, len(cat)), axis=0)
               - t["mass_msun"])
single = members & ~is_bin
print(f"median |mass error| of single members: pooled {np.median(err_p[single]):.3f} Msun, "
      f"unpooled {np.median(err_u[single]):.3f} Msun")
