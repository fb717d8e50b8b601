"""Where a cubic gradient's time goes: the parts of the forward model, linear vs cubic,
each with its gradient, vmapped over 1000 stars (M67-like age and [Fe/H]).

    python scripts/profile_interp.py

Rows: ``inverse`` (pseudo-mass -> EEP), ``interp`` (EEP -> log Teff), ``bc`` (bolometric
corrections in 3 bands), per star-path (``interp_eep``/``eep_from_mass``, used when every
star has its own isochrone) and on the shared table (``isochrone_table`` + 1-D look-ups,
used when the age and [Fe/H] widths are fixed). Milliseconds per call.

Then the whole model (``--whole``): log density + gradient of an M67-like mock at N = 100
and 1000, widths fixed or fitted, with and without the shared BC slice (``bc_slice``, used
when the [Fe/H] and A_V widths are fixed), linear and cubic. Writes
``benchmarks/results/profile_interp.json``.

    python scripts/profile_interp.py [--whole] [--parts]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from clusterhbm.grid import load_grid
from clusterhbm.isochrone import (
    eep_from_mass,
    interp_eep,
    isochrone_table,
    table_eep_from_mass,
    table_interp,
)
from clusterhbm.photometry import bolometric_correction


def timed(f, *args, reps=20):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        r = f(*args)
    jax.block_until_ready(r)
    return 1e3 * (time.perf_counter() - t) / reps


def row(g, cubic, n, log_age, feh):
    """One printed row: the five timings of one scheme."""
    m = jnp.linspace(0.6, 1.2, n)
    e = jnp.linspace(250.0, 400.0, n)
    te = jnp.linspace(4500.0, 6500.0, n)
    def inv(m, a):
        return jnp.sum(jax.vmap(lambda x: eep_from_mass(g.iso, x, a, feh, cubic=cubic,
                                                        eps=3e-3)[0])(m))

    def fwd(e, a):
        return jnp.sum(jax.vmap(lambda x: interp_eep(g.iso, x, a, feh,
                                                     cubic=cubic).log_teff)(e))

    def tinv(m, a):
        t = isochrone_table(g.iso, a, feh, cubic=cubic)
        return jnp.sum(jax.vmap(lambda x: table_eep_from_mass(t, x, eps=3e-3,
                                                              cubic=cubic)[0])(m))

    def tfwd(e, a):
        t = isochrone_table(g.iso, a, feh, cubic=cubic)
        return jnp.sum(jax.vmap(lambda x: table_interp(t, x, cubic=cubic).log_teff)(e))

    def bc(t):
        return jnp.sum(jax.vmap(lambda x: bolometric_correction(
            g.bc, x, 4.4, feh, 0.1, (0, 1, 2), cubic=cubic)[0])(t))

    grad2 = (0, 1)
    print(f"{'cubic ' if cubic else 'linear'}  per star: inverse "
          f"{timed(jax.grad(inv, grad2), m, log_age):.2f}  interp "
          f"{timed(jax.grad(fwd, grad2), e, log_age):.2f}  | table: inverse "
          f"{timed(jax.grad(tinv, grad2), m, log_age):.2f}  interp "
          f"{timed(jax.grad(tfwd, grad2), e, log_age):.2f}  | bc "
          f"{timed(jax.grad(bc), te):.2f}  (ms per {n} stars, with gradients)",
          flush=True)


def whole_model_ms(g, cat, cubic, fit_widths, use_slice, reps=20):
    """Milliseconds per log density + gradient of the textbook model (one chain)."""
    import clusterhbm.model as model_mod
    from clusterhbm.fit import initial_guess, initial_positions, prepare_data
    from clusterhbm.grid import band_indices

    fd = prepare_data(cat)
    bi = band_indices(fd.bands)
    config = model_mod.ModelConfig(band_idx=bi, fit_widths=(fit_widths,) * 4, cubic=cubic)
    guess, e = initial_guess(fd.data, g, bi, verbose=False)
    p = jax.tree.map(lambda x: x[0], initial_positions(jax.random.key(0), guess, e, config,
                                                       1, grid=g, jitter=0.0))
    orig = model_mod.shared_bc
    if not use_slice:
        model_mod.shared_bc = lambda config: False
    try:
        ld = model_mod.make_logdensity_fn(fd.data, g, config, model_mod.Priors())
        return timed(jax.value_and_grad(ld), p, reps=reps)
    finally:
        model_mod.shared_bc = orig


def main(argv=None, n=1000, log_age=9.62, feh=0.0):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", action="store_true", help="only the per-part rows")
    ap.add_argument("--whole", action="store_true", help="only the whole-model rows")
    a = ap.parse_args(argv)
    g = load_grid()
    if not a.whole:
        for cubic in (False, True):
            row(g, cubic, n, log_age, feh)
    if a.parts:
        return
    from clusterhbm.simulate import ClusterParams, simulate_cluster

    rows = []
    for n_stars in (100, 1000):
        cat = simulate_cluster(ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0,
                                             av_mag=0.1), n_stars=n_stars, seed=2009,
                               grid=g).catalogue
        for cubic in (False, True):
            for widths in (False, True):
                for sl in ((True, False) if not widths else (False,)):
                    ms = whole_model_ms(g, cat, cubic, widths, sl)
                    rows.append({"n_stars": n_stars, "cubic": cubic, "fit_widths": widths,
                                 "bc_slice": sl, "grad_ms": ms})
                    print(f"whole model N={n_stars:5d} {'cubic ' if cubic else 'linear'} "
                          f"widths {'fitted' if widths else 'fixed '} "
                          f"{'BC slice' if sl else 'per-star BC'}: {ms:.2f} ms", flush=True)
    out = Path(__file__).resolve().parents[1] / "benchmarks/results/profile_interp.json"
    out.write_text(json.dumps({"script": "scripts/profile_interp.py", "rows": rows,
                               "loadavg": os.getloadavg(), "device": jax.default_backend()},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
