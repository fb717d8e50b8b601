"""Where a cubic gradient's time goes: the parts of the forward model, linear vs cubic,
each with its gradient, vmapped over 1000 stars (M67-like age and [Fe/H]).

    python scripts/profile_interp.py

Rows: ``inverse`` (pseudo-mass -> EEP), ``interp`` (EEP -> log Teff), ``bc`` (bolometric
corrections in 3 bands), per star-path (``interp_eep``/``eep_from_mass``, used when every
star has its own isochrone) and on the shared table (``isochrone_table`` + 1-D look-ups,
used when the age and [Fe/H] widths are fixed). Milliseconds per call.
"""

from __future__ import annotations

import time

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


def main(n=1000, log_age=9.62, feh=0.0):
    g = load_grid()
    for cubic in (False, True):
        row(g, cubic, n, log_age, feh)


if __name__ == "__main__":
    main()
