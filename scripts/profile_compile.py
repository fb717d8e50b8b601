"""Compilations and seconds per phase of a fit (full model, 1 chain, 40 + 20 steps).

    python scripts/profile_compile.py 50 full      # N stars; "full" = binaries, field,
                                                   # selection, fitted mass-function slope

The numbers in docs/performance.md § Compile time come from this script (the "before"
column from the same script at commit da860f3).
"""
import logging
import sys
import time

import jax

jax.config.update("jax_log_compiles", True)

class H(logging.Handler):
    def __init__(self):
        super().__init__(); self.n = 0; self.s = 0.0; self.big = []
    def emit(self, rec):
        m = rec.getMessage()
        if m.startswith("Finished XLA compilation"):
            t = float(m.split(" in ")[-1].split()[0]); self.n += 1; self.s += t
            if t > 1: self.big.append((m[:80], t))
h = H()
for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler", "jax"):
    lg = logging.getLogger(name); lg.addHandler(h); lg.setLevel(logging.DEBUG); lg.propagate = False

last = [time.perf_counter(), 0, 0.0]
def phase(name):
    t = time.perf_counter()
    print(f"{name:28s} wall {t-last[0]:7.1f} s  compiles {h.n-last[1]:5d}  compile_s {h.s-last[2]:7.1f}", flush=True)
    last[:] = [t, h.n, h.s]

import numpy as np

from clusterhbm.grid import band_indices, load_grid

grid = load_grid(); phase("load_grid")
from clusterhbm.simulate import ClusterParams, simulate_cluster

n = int(sys.argv[1]); full = sys.argv[2] == "full"
sim = simulate_cluster(ClusterParams(log_age=9.6), n_stars=n, seed=1, grid=grid); phase("simulate")
from clusterhbm import fit as F
from clusterhbm.fit import star_log_densities
from clusterhbm.model import ModelConfig, Priors, make_logdensity_fn

fd = F.prepare_data(sim.catalogue); phase("prepare_data")
cfg = ModelConfig(band_idx=band_indices(fd.bands), pooled=True, binaries=full, field=full, selection=full, fit_mf_slope=full)
pr = Priors()
guess, eep0 = F.initial_guess(fd.data, grid, cfg.band_idx); phase("initial_guess")
guess.update(f_bin=0.3, f_field=0.1, mf_slope=pr.mf_slope_mean, field_parallax_mas=1.0, field_parallax_sd_mas=1.0)
pos1 = jax.tree.map(lambda x: x[0], F.initial_positions(jax.random.key(0), guess, eep0, cfg, 1, grid=grid, jitter=0.0)); phase("initial_positions")
ld = make_logdensity_fn(fd.data, grid, cfg, pr)
pos1, _ = F._optimise(ld, pos1, num_steps=10); phase("optimise(10)")
np.asarray(star_log_densities(pos1, fd.data, grid, cfg, pr)); phase("star_log_densities")
imm0 = F.curvature_inverse_metric(ld, pos1); phase("curvature")
from clusterhbm.sampling import run_nuts

inits = jax.tree.map(lambda x: x[None], pos1)
out = run_nuts(jax.random.key(1), ld, inits, num_warmup=40, num_samples=20, chunk_size=100, max_num_doublings=5,
               transform_fn=lambda p: F.derived_quantities(p, grid, cfg, pr, fd.data), initial_inverse_mass_matrix=imm0,
               diagonal_mass_matrix=False); phase("run_nuts")
print(out.timings)
for m, t in h.big: print(f"   {t:6.1f} {m}")
from clusterhbm.results import FitResult

res = FitResult.from_sampler(out, source_id=fd.source_id, settings={}, timings={}, truth=None); phase("from_sampler")
res.summary(); phase("summary")
