"""The marginal likelihood of a cluster's log age, with every star's mass integrated out.

For a mock with zero widths, the population posterior of log age (other population
parameters held at the truth) is

    log p(age | D) = sum_i log  integral  p(D_i | EEP, age) IMF(m(EEP)) m'(EEP) dEEP / Z(age)

This script evaluates it by quadrature on a fine EEP grid, for a scan of log ages, with the
linear and the cubic interpolation schemes, so that features of the interpolation (a dip or
kink at every grid age node) can be seen and measured independently of any sampler:

    python scripts/age_profile.py --log-age 9.6 --n-stars 300 --scheme linear cubic

It prints the profile relative to its maximum and writes
``benchmarks/results/age_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from clusterhbm.fit import prepare_data
from clusterhbm.grid import COL_INITIAL_MASS, load_grid
from clusterhbm.imf import imf_cdf, log_imf
from clusterhbm.isochrone import eep_range, interp_eep
from clusterhbm.model import ModelConfig, Priors, log_likelihood_star, star_observables
from clusterhbm.simulate import ClusterParams, simulate_cluster


def star_marginals(grid, data, log_age, feh, dist, av, cubic, eeps):
    """(N,) log of the per-star marginal likelihood at one log age."""
    config = ModelConfig(cubic=cubic)
    priors = Priors()
    kw = {"kind": "kroupa", "m_min": priors.m_min, "m_max": priors.m_max}
    de = eeps[1] - eeps[0]

    def mass_of(e):
        return interp_eep(grid.iso, e, log_age, feh, cubic=cubic,
                          columns=(COL_INITIAL_MASS,)).initial_mass

    def at_eep(e):
        m, dm = jax.jvp(mass_of, (e,), (jnp.ones_like(e),))
        obs = star_observables(grid, config, e, log_age, feh, dist, av)
        lp = log_imf(m, **kw) + jnp.log(jnp.maximum(dm, 1e-30))
        ok = obs.valid & (m >= priors.m_min) & (dm > 0)
        return obs, jnp.where(ok, lp, -jnp.inf)

    obs, lp = jax.vmap(at_eep)(eeps)  # over the EEP grid
    _, e_hi = eep_range(grid.iso, log_age, feh)
    z = imf_cdf(jnp.clip(mass_of(e_hi), priors.m_min * 1.0001, priors.m_max), **kw)

    def one_star(mag, err, plx, plx_err):
        ll = jax.vmap(lambda o: log_likelihood_star(o, mag, err, plx, plx_err, 0.0,
                                                    priors.mag_floor))(obs)
        return jax.scipy.special.logsumexp(ll + lp) + jnp.log(de)

    return jax.vmap(one_star)(*data) - jnp.log(z)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-age", type=float, default=9.6)
    p.add_argument("--n-stars", type=int, default=300)
    p.add_argument("--half-range", type=float, default=0.06)
    p.add_argument("--step", type=float, default=0.0025)
    p.add_argument("--eep-step", type=float, default=0.05)
    p.add_argument("--scheme", nargs="+", default=["linear", "cubic"])
    p.add_argument("--sim-seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/age_profile.json")
    a = p.parse_args(argv)
    grid = load_grid()
    truth = ClusterParams(log_age=a.log_age)
    sim = simulate_cluster(truth, n_stars=a.n_stars, seed=a.sim_seed)
    data = tuple(prepare_data(sim.catalogue).data)
    eeps = jnp.arange(1.0, 707.0, a.eep_step)
    ages = np.round(np.arange(a.log_age - a.half_range, a.log_age + a.half_range + 1e-9,
                              a.step), 5)
    out = {"truth_log_age": a.log_age, "n_stars": a.n_stars, "log_age": ages.tolist(),
           "node_spacing": float(grid.iso.log_age[1] - grid.iso.log_age[0])}
    for scheme in a.scheme:
        f = jax.jit(lambda age, c=(scheme == "cubic"): jnp.sum(star_marginals(
            grid, data, age, truth.feh, truth.distance_pc, truth.av_mag, c, eeps)))
        prof = np.array([float(f(age)) for age in ages])
        out[scheme] = (prof - np.nanmax(prof)).tolist()
        print(f"\n{scheme}: log age, Delta log L (nodes marked *)")
        for age, v in zip(ages, prof - np.nanmax(prof)):
            node = abs((age - 6.0) / out["node_spacing"] - round((age - 6.0)
                                                                 / out["node_spacing"])) < 1e-6
            print(f"  {age:7.4f} {v:9.2f} {'*' if node else ''}")
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
