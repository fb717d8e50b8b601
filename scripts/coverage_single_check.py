"""Mock 9 of scripts/coverage_study.py (seed 2009) fitted alone with fit_cluster at the
settings of coverage run 2, to separate a batch-path defect from too-short settings."""
import time

import numpy as np

from clusterhbm.fit import fit_cluster
from clusterhbm.grid import load_grid
from clusterhbm.simulate import ClusterParams, simulate_cluster

grid = load_grid()
truth = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
for seed in (2009,):
    cat = simulate_cluster(ClusterParams(**truth), n_stars=100, seed=seed, grid=grid).catalogue
    t0 = time.perf_counter()
    f = fit_cluster(cat, grid=grid, num_chains=2, num_warmup=600, num_samples=400, seed=0,
                    max_num_doublings=8, dense_mass_matrix=False, chunk_size=200)
    s = f.summary()
    print(seed, f"{time.perf_counter()-t0:.0f} s", " ".join(
        f"{k} {s[k]['mean']:.4f}±{s[k]['sd']:.4f} z{(s[k]['mean']-v)/s[k]['sd']:+.1f} R{s[k]['rhat']:.3f} E{s[k]['ess_bulk']:.0f}"
        for k, v in truth.items()), "steps/draw", float(np.mean(f.sampler["num_integration_steps"])))
