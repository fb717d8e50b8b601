"""Throughput of the full forward model on the CPU (or whatever JAX's default device is).

Measures stars per second of the whole per-star forward model -- isochrone interpolation,
bolometric corrections with extinction, distance modulus: apparent G, BP, RP and parallax --
via :func:`clusterhbm.photometry.observables_from_eep` and
:func:`clusterhbm.photometry.observables_from_mass`, ``vmap``-ed over N stars and ``jit``-ed,
for

* scheme: linear and cubic interpolation;
* param: the EEP and the initial-mass parametrisation;
* mode: ``value`` (the observables) and ``grad``: value and gradient of the per-star scalar
  ``G + BP + RP`` (apparent magnitudes, summed) with respect to all five per-star inputs
  (EEP or initial mass, log age, [Fe/H], distance, A_V), computed as
  ``jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))`` -- one reverse-mode pass per
  star, i.e. one "star-gradient" per star;
* N = 10^3, 10^4, 10^5 stars (``--quick``: 10^3, 10^4).

Inputs: an M67-like cluster (log10 age 9.6, [Fe/H] 0, 850 pc, A_V 0.1) with per-star
jitter (sigma 0.03 dex in log age, 0.05 dex in [Fe/H], 10 pc, 0.01 mag; so the bracketing
grid cell differs between stars) and EEP uniform over 230..600 (main sequence, turnoff,
subgiant and red-giant branch); for the mass parametrisation each star's initial mass is the
one at its EEP on its own interpolated isochrone (so every star is valid in both).

Timing: compile time (trace + lower + XLA compile, ahead of time) is reported separately;
the compiled call is timed with ``block_until_ready`` after one warm-up call, median of
``--repeats`` (default 5; ``--quick``: 2) calls. Float32 by default; ``--x64`` switches
``jax_enable_x64`` on (in this script only) and runs in float64.

The value-only throughput is also compared with a literature figure for the ``isochrones``
package's MIST interpolation (~9e4 stars/s per CPU core, value only, linear, no gradient);
that number was not measured here.

Writes ``benchmarks/results/bench_forward_<dtype>[_quick].json`` (device, versions, CPU
count, dtype, command line, all rows) and prints a table.

Rerun (from the repository root)::

    python scripts/bench_forward.py            # float32, N up to 1e5 (a few minutes)
    python scripts/bench_forward.py --x64      # float64
    python scripts/bench_forward.py --quick    # N up to 1e4, 2 repeats
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

#: Literature reference: ``isochrones`` (Morton) MIST interpolation, value only, per core.
ISOCHRONES_REF_STARS_PER_S = 9e4

BANDS = ("G", "BP", "RP")
CLUSTER = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
JITTER = {"log_age": 0.03, "feh": 0.05, "distance_pc": 10.0, "av_mag": 0.01}
EEP_RANGE = (230.0, 600.0)


def make_stars(rng_seed: int, n: int, dtype):
    """Random M67-like stars: (eep, mass_msun, log_age, feh, distance_pc, av_mag) arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clusterhbm.grid import load_grid
    from clusterhbm.isochrone import interp_eep

    rng = np.random.default_rng(rng_seed)
    eep = rng.uniform(*EEP_RANGE, n)
    cols = {k: CLUSTER[k] + JITTER[k] * rng.standard_normal(n) for k in CLUSTER}
    grid = load_grid(dtype=dtype)
    props = jax.jit(jax.vmap(lambda e, a, f: interp_eep(grid.iso, e, a, f)))(
        jnp.asarray(eep, dtype), jnp.asarray(cols["log_age"], dtype),
        jnp.asarray(cols["feh"], dtype))
    if not bool(np.all(np.asarray(props.valid))):
        raise RuntimeError("some benchmark stars fall outside the grid; reduce the jitter")
    mass = np.asarray(props.initial_mass, dtype=np.float64)
    out = dict(eep=eep, mass_msun=mass, **cols)
    return {k: jnp.asarray(v, dtype) for k, v in out.items()}


def build_fn(grid, band_idx, *, cubic: bool, param: str, mode: str):
    """The vmapped (not yet jitted) function of the per-star input arrays."""
    import jax
    import jax.numpy as jnp

    from clusterhbm.photometry import observables_from_eep, observables_from_mass

    fwd = observables_from_eep if param == "eep" else observables_from_mass

    if mode == "value":
        def one(x, log_age, feh, distance_pc, av_mag):
            obs = fwd(grid, x, log_age, feh, distance_pc, av_mag, band_idx, cubic=cubic)
            return obs.mags, obs.parallax_mas, obs.valid

        return jax.vmap(one)

    def summed(x, log_age, feh, distance_pc, av_mag):
        obs = fwd(grid, x, log_age, feh, distance_pc, av_mag, band_idx, cubic=cubic)
        return jnp.sum(obs.mags)

    return jax.vmap(jax.value_and_grad(summed, argnums=(0, 1, 2, 3, 4)))


def time_config(grid, band_idx, stars, *, cubic, param, mode, repeats):
    import jax
    import numpy as np

    x = stars["eep"] if param == "eep" else stars["mass_msun"]
    args = (x, stars["log_age"], stars["feh"], stars["distance_pc"], stars["av_mag"])
    fn = build_fn(grid, band_idx, cubic=cubic, param=param, mode=mode)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))  # warm-up
    if mode == "value":
        n_valid = int(np.sum(np.asarray(out[2])))
        finite = bool(np.all(np.isfinite(np.asarray(out[0]))))
    else:
        n_valid = None
        finite = bool(np.all(np.isfinite(np.asarray(out[0])))) and all(
            bool(np.all(np.isfinite(np.asarray(g)))) for g in out[1])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, times, n_valid, finite


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--x64", action="store_true", help="float64 (enables jax_enable_x64)")
    p.add_argument("--quick", action="store_true", help="N up to 1e4 and 2 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="numbers of stars (default 1000 10000 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jaxlib
    import numpy as np

    from clusterhbm.grid import band_indices, load_grid

    dtype = jnp.float64 if args.x64 else jnp.float32
    sizes = args.sizes or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    grid = load_grid(dtype=dtype)
    band_idx = band_indices(BANDS)
    dev = jax.devices()[0]
    n_cpu = os.cpu_count()
    load_before = os.getloadavg()
    print(f"device: {dev.platform} / {dev.device_kind}; CPUs: {n_cpu}; dtype: "
          f"{jnp.dtype(dtype).name}; jax {jax.__version__}; repeats {repeats}; load average "
          f"{load_before[0]:.2f}")
    print("grad = jax.vmap(jax.value_and_grad(G+BP+RP, argnums=all 5 per-star inputs))")

    rows = []
    header = (f"{'scheme':6} {'param':5} {'mode':5} {'N':>7} {'compile_s':>9} "
              f"{'stars/s':>11} {'star-grads/s':>12} {'us/star':>9} {'valid':>7}")
    print(header)
    print("-" * len(header))
    for n in sizes:
        stars = make_stars(args.seed, n, dtype)
        for cubic in (False, True):
            for param in ("eep", "mass"):
                for mode in ("value", "grad"):
                    compile_s, times, n_valid, finite = time_config(
                        grid, band_idx, stars, cubic=cubic, param=param, mode=mode,
                        repeats=repeats)
                    med = statistics.median(times)
                    row = {
                        "scheme": "cubic" if cubic else "linear", "param": param,
                        "mode": mode, "n": n,
                        "compile_s": compile_s, "times_s": times, "median_s": med,
                        "stars_per_s": n / med,
                        "star_gradients_per_s": (n / med if mode == "grad" else None),
                        "us_per_star": 1e6 * med / n, "n_valid": n_valid, "all_finite": finite,
                    }
                    rows.append(row)
                    sg = f"{row['star_gradients_per_s']:12.3e}" if mode == "grad" else (
                        f"{'-':>12}")
                    valid = f"{n_valid}/{n}" if n_valid is not None else "-"
                    print(f"{row['scheme']:6} {param:5} {mode:5} {n:7d} {compile_s:9.2f} "
                          f"{row['stars_per_s']:11.3e} {sg} {row['us_per_star']:9.3f} "
                          f"{valid:>7}" + ("" if finite else "  NON-FINITE"), flush=True)

    print()
    print(f"Reference (literature, not measured here): isochrones package MIST interpolation "
          f"~{ISOCHRONES_REF_STARS_PER_S:.0e} stars/s per core, value only.")
    print(f"Ratio = this run's value-only stars/s at the largest N / 9e4; 'per core' divides "
          f"by the {n_cpu} CPUs of this machine (XLA may use more than one).")
    n_max = max(sizes)
    comparison = []
    for r in rows:
        if r["mode"] == "value" and r["n"] == n_max:
            ratio = r["stars_per_s"] / ISOCHRONES_REF_STARS_PER_S
            per_core = ratio / n_cpu
            comparison.append({"scheme": r["scheme"], "param": r["param"], "n": n_max,
                                   "ratio_total": ratio, "ratio_per_core": per_core})
            print(f"  {r['scheme']:6} {r['param']:5} N={n_max}: {ratio:6.2f}x (machine), "
                  f"{per_core:6.2f}x (per core) vs isochrones/MIST literature 9e4 stars/s/core")

    record = {
        "script": "scripts/bench_forward.py",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                   "n_devices": len(jax.devices())},
        "host": {"cpu_count": n_cpu, "machine": platform.machine(),
                 "processor": platform.processor(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "numpy": np.__version__},
        "dtype": jnp.dtype(dtype).name,
        "bands": list(BANDS),
        "grad_definition": "jax.vmap(jax.value_and_grad(lambda *x: sum(G, BP, RP apparent "
                           "mags), argnums=(0,1,2,3,4))): gradient w.r.t. EEP or initial "
                           "mass, log age, [Fe/H], distance_pc, av_mag",
        "inputs": {"cluster": CLUSTER, "jitter_sigma": JITTER, "eep_uniform": EEP_RANGE,
                   "seed": args.seed},
        "timing": {"repeats": repeats, "statistic": "median", "warmup_calls": 1,
                   "compile": "jax.jit(f).lower(*args).compile() wall time"},
        "reference": {"label": "isochrones package MIST interpolation (literature, value "
                               "only)",
                      "stars_per_s_per_core": ISOCHRONES_REF_STARS_PER_S,
                      "comparison": comparison},
        "rows": rows,
    }
    out = args.out or Path("benchmarks/results") / (
        f"bench_forward_{jnp.dtype(dtype).name}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
