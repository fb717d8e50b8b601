"""The marginal model: every star's mass and mass ratio integrated out (clusterhbm.marginal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64

from clusterhbm.fit import fit_cluster, prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.imf import imf_cdf, log_imf
from clusterhbm.isochrone import table_eep_range, table_interp
from clusterhbm.marginal import (
    MarginalOptions,
    check_config,
    log_density_marginal,
    make_marginal_logdensity_fn,
    q_bins,
    segment_log_integral,
    select_segments,
    star_log_likelihoods,
    track,
)
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained, population_state
from clusterhbm.photometry import photometry
from clusterhbm.simulate import ClusterParams, simulate_cluster

GAIA = band_indices(("G", "BP", "RP"))
POP = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
ERR = np.array([0.001, 0.003, 0.002])


@pytest.fixture(scope="module")
def grid():
    return load_grid()


def _config(**kw):
    return ModelConfig(band_idx=GAIA, fit_widths=(False,) * 4, **kw)


def test_segment_integral_matches_quadrature():
    """The closed form against a fine trapezoid over t, with and without the rank-one
    smearing covariance, for segments the star lies on, beside, and beyond the end of."""
    rng = np.random.default_rng(1)
    for case in range(6):
        v = rng.uniform(0.005, 0.03, 3) ** 2
        delta = rng.normal(0, 0.05, 3)
        t0 = [0.4, -0.3, 1.5, 0.9, 0.0, 3.0][case]
        r0 = t0 * delta + rng.normal(0, 0.01, 3)
        smear = rng.normal(0, 0.02, 3) if case % 2 else None
        cov = np.diag(v) + (0 if smear is None else np.outer(smear, smear))
        icov = np.linalg.inv(cov)
        t = np.linspace(0, 1, 200001)
        res = r0[None] - t[:, None] * delta[None]
        chi2 = np.einsum("ti,ij,tj->t", res, icov, res)
        ref = np.log(np.trapezoid(np.exp(-0.5 * chi2), t)) - 0.5 * np.log(
            np.linalg.det(cov) / np.prod(v))
        with x64():
            got, _, _ = segment_log_integral(jnp.asarray(r0), jnp.asarray(delta),
                                             jnp.asarray(1.0 / v),
                                             None if smear is None else jnp.asarray(smear))
        np.testing.assert_allclose(float(got), ref, atol=1e-6, rtol=1e-9)


def test_segment_integral_far_tail_is_finite():
    """Far from a segment the integral is tiny but finite, with a finite gradient."""
    def f(x):
        return segment_log_integral(jnp.array([x, x, x]), jnp.array([0.05, 0.06, 0.04]),
                                    jnp.full(3, 1e4))[0]

    v, g = jax.value_and_grad(f)(5.0)
    assert np.isfinite(float(v)) and float(v) < -1e5
    assert np.isfinite(float(g))


def test_q_bins_cover_the_prior_and_narrow_towards_one():
    edges, _ = q_bins(0.1, 12)
    e = np.asarray(edges)
    assert e[0] == pytest.approx(0.1) and e[-1] == pytest.approx(1.0)
    w = np.diff(e)
    assert np.all(w > 0) and w[-1] < w[0] / 3
    g = np.log10(1 + e ** 4.5)
    np.testing.assert_allclose(np.diff(g), np.diff(g)[0], rtol=1e-4)


@pytest.fixture(scope="module")
def fine_isochrone(grid):
    """Population state, its track, and the isochrone on 200001 EEPs (brute force)."""
    cfg = _config(binaries=True)
    pri = Priors()
    pop = pop_to_unconstrained(POP, cfg)
    popv = population_state(pop, cfg, pri, grid)
    table = popv["iso_table"]
    lo, hi = table_eep_range(table)
    fine = jnp.linspace(lo, hi, 200001)
    props = jax.vmap(lambda e: table_interp(table, e))(fine)
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, popv["feh"], popv["distance_pc"],
                                         popv["av_mag"], GAIA, bcs=popv["bc_slice"]))(props)
    m = np.asarray(props.initial_mass, float)
    mags = np.asarray(obs.mags, float)
    kw = {"kind": "kroupa", "m_min": pri.m_min, "m_max": pri.m_max, "alpha": pri.imf_alpha}
    limf = np.asarray(log_imf(jnp.asarray(m), **kw), float)
    log_z = float(np.log(imf_cdf(jnp.asarray(m.max()), **kw)))
    return cfg, pri, popv, np.asarray(fine), m, mags, limf, log_z


def _brute_single(y, m, mags, limf, log_z):
    v = ERR ** 2 + 0.01 ** 2
    ll = -0.5 * np.sum((y - mags) ** 2 / v + np.log(2 * np.pi * v), axis=1) + limf
    mid = 0.5 * (ll[1:] + ll[:-1])
    mx = mid.max()
    return mx + np.log(np.sum(np.exp(mid - mx) * np.diff(m))) - log_z


def _brute_binary(y, m, mags, limf, log_z, q_min=0.1, nq=3000, sub=4):
    v = ERR ** 2 + 0.01 ** 2
    qs = q_min + (1 - q_min) * (np.arange(nq) + 0.5) / nq
    mm, mg, li = m[::sub], mags[::sub], limf[::sub]
    tot = []
    for q in qs:
        m2 = q * mm
        g2 = np.stack([np.interp(m2, m, mags[:, b]) for b in range(3)], 1)
        f2 = np.where((m2 >= m.min())[:, None], 10 ** (-0.4 * (g2 - mg)), 0)
        ll = -0.5 * np.sum((y - (mg - 2.5 * np.log10(1 + f2))) ** 2 / v
                           + np.log(2 * np.pi * v), axis=1) + li
        mid = 0.5 * (ll[1:] + ll[:-1])
        mx = mid.max()
        tot.append(mx + np.log(np.sum(np.exp(mid - mx) * np.diff(mm))))
    tot = np.array(tot)
    mx = tot.max()
    return mx + np.log(np.mean(np.exp(tot - mx))) - log_z


def _data_i(y):
    return (jnp.asarray(y, jnp.float32), jnp.asarray(ERR, jnp.float32), jnp.nan, jnp.nan)


@pytest.mark.parametrize("eep", [300.0, 400.5, 450.3, 470.0, 520.7, 640.0])
def test_single_star_likelihood_matches_brute_force(grid, fine_isochrone, eep):
    """Main sequence, turnoff, subgiant, giant and core-helium-burning stars: the exact
    segment integral over the 707-node track against a 200001-point mass integral."""
    cfg, pri, popv, fine, m, mags, limf, log_z = fine_isochrone
    tr = track(popv, grid, cfg, pri, n_q=12)
    i = int(np.argmin(np.abs(fine - eep)))
    y = mags[i] + np.array([0.003, -0.004, 0.002])
    ll_s, *_ = star_log_likelihoods(tr, popv, _data_i(y), cfg, pri,
                                    MarginalOptions(n_blocks=None))
    assert float(ll_s) == pytest.approx(_brute_single(y, m, mags, limf, log_z), abs=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("eep,q", [(300.0, 0.5), (300.0, 0.9), (420.0, 0.6)])
def test_binary_likelihood_matches_brute_force(grid, fine_isochrone, eep, q):
    """The binary likelihood (24 smeared q bins) against a 3000 x 50000-point integral
    over q and the primary's mass (measured: within 0.05 in log)."""
    cfg, pri, popv, fine, m, mags, limf, log_z = fine_isochrone
    tr = track(popv, grid, cfg, pri, n_q=24)
    i = int(np.argmin(np.abs(fine - eep)))
    g2 = np.array([np.interp(q * m[i], m, mags[:, b]) for b in range(3)])
    y = mags[i] - 2.5 * np.log10(1 + 10 ** (-0.4 * (g2 - mags[i]))) + np.array(
        [0.003, -0.004, 0.002])
    _, ll_b, *_ = star_log_likelihoods(tr, popv, _data_i(y), cfg, pri,
                                       MarginalOptions(n_blocks=None))
    assert float(ll_b) == pytest.approx(_brute_binary(y, m, mags, limf, log_z), abs=0.08)


@pytest.fixture(scope="module")
def mixture_mock(grid):
    sim = simulate_cluster(ClusterParams(**POP, f_bin=0.3, f_field=0.2), n_stars=60,
                           seed=5, grid=grid)
    return sim, prepare_data(sim.catalogue, member_prob_column=None)


def test_fixed_segments_equal_every_segment_near_the_reference(grid, mixture_mock):
    """The sampler's density (a fixed set of segments per star) equals the
    every-segment density at and near the states it was chosen at; its gradient is finite
    and matches finite differences; outside the grid it is -inf with a finite gradient."""
    _, fd = mixture_mock
    # cubic: the linear scheme's kinks (BC nodes crossed by the track) spoil finite
    # differences
    cfg = _config(binaries=True, field=True, selection=True, cubic=True)
    pri = Priors(g_lim=19.0)
    opts = MarginalOptions(n_q=12)
    base = pop_to_unconstrained({**POP, "f_bin": 0.3, "f_field": 0.2,
                                 "field_parallax_mas": 0.5, "field_parallax_sd_mas": 0.3},
                                cfg)
    states = [base, {**base, "log_age": base["log_age"] + 0.02},
              {**base, "log_age": base["log_age"] - 0.02}]
    sel = select_segments(jax.tree.map(lambda *x: jnp.stack(x), *states), fd.data, grid,
                          cfg, pri, opts, n_segments=128)
    assert sel.shape == (60, 128)
    for pop in (base, {**base, "log_age": base["log_age"] + 0.01}):
        a = log_density_marginal(pop, fd.data, grid, cfg, pri, opts, per_star=True, sel=sel)
        b = log_density_marginal(pop, fd.data, grid, cfg, pri, opts._replace(n_blocks=None),
                                 per_star=True)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.02)
    f = jax.jit(make_marginal_logdensity_fn(fd.data, grid, cfg, pri, opts, sel=sel))
    # (off the grid's age node 9.6, where the linear scheme has a kink)
    at = {**base, "log_age": base["log_age"] + 0.012}
    g = jax.grad(f)({"pop": at})["pop"]
    assert all(np.isfinite(float(v)) for v in g.values())
    # (a subgiant alone fixes log age to ~0.002 dex: small steps)
    for k, h in (("log_age", 2e-4), ("ln_distance_pc", 2e-4), ("logit_f_bin", 0.02)):
        up = float(f({"pop": {**at, k: at[k] + h}}))
        dn = float(f({"pop": {**at, k: at[k] - h}}))
        assert float(g[k]) == pytest.approx((up - dn) / (2 * h), rel=0.05, abs=1.0)
    out = {**base, "log_age": jnp.asarray(11.0)}
    v, g = jax.value_and_grad(f)({"pop": out})
    assert float(v) == -np.inf
    assert all(np.isfinite(float(x)) for x in g["pop"].values())


def test_photometric_distance_without_parallaxes(grid):
    """A catalogue without parallax columns fits on photometry alone (issue 5, item 6):
    every star's term is finite, and along distance (the rest at the truth) the marginal
    log density peaks at the true distance and falls off on both sides."""
    sim = simulate_cluster(ClusterParams(**POP), n_stars=60, seed=11, grid=grid)
    cat = sim.catalogue.copy()
    cat.remove_columns(["parallax", "parallax_error"])
    fd = prepare_data(cat, member_prob_column=None)
    assert np.all(np.isnan(np.asarray(fd.data.parallax_mas)))
    cfg = _config(cubic=False)
    pri = Priors()
    opts = MarginalOptions(n_blocks=None)
    f = jax.jit(lambda pop: log_density_marginal(pop, fd.data, grid, cfg, pri, opts,
                                                 per_star=True))
    factors = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)
    totals = []
    for fac in factors:
        per = np.asarray(f(pop_to_unconstrained({**POP, "distance_pc": 850.0 * fac}, cfg)))
        assert np.all(np.isfinite(per))
        totals.append(per.sum())
    best = int(np.argmax(totals))
    assert factors[best] in (0.98, 1.0, 1.02), dict(zip(factors, np.round(totals, 1)))
    assert totals[0] < totals[best] - 50 and totals[-1] < totals[best] - 50


def test_marginal_config_rejects_widths():
    with pytest.raises(ValueError, match="fits no widths"):
        check_config(ModelConfig(band_idx=GAIA, fit_widths=(False, False, True, False)))
    with pytest.raises(ValueError, match="pooled"):
        check_config(ModelConfig(band_idx=GAIA, pooled=False, fit_widths=(False,) * 4))


def test_marginal_mixture_fit_recovers_fractions(grid, mixture_mock):
    """The CI version of the mixture study: a 60-star mock with 30% binaries and 20%
    field stars, the full model (binaries, field, selection) fitted with mass and q
    integrated out. The chains mix (R-hat < 1.05, no divergences), the fractions move
    from their flat priors to within 3 sd of the truth, members get higher membership
    probabilities than field stars, and three odd stars are handled: a member without BP
    and RP (kept a member), one with a negative parallax (fitted), and a white-dwarf-like
    star with a member's parallax far from the isochrone (the outlier component)."""
    sim, _ = mixture_mock
    cat = sim.catalogue.copy()
    single = np.flatnonzero(~np.asarray(sim.truth["is_field"])
                            & ~np.asarray(sim.truth["is_binary"])
                            & (np.asarray(cat["phot_g_mean_mag"]) > 15))
    a, b, c = single[:3]
    for col in ("phot_bp_mean_mag", "phot_rp_mean_mag", "phot_bp_mean_mag_error",
                "phot_rp_mean_mag_error", "phot_bp_mean_flux_over_error",
                "phot_rp_mean_flux_over_error"):
        cat[col][a] = np.nan
    cat["parallax"][b], cat["parallax_error"][b] = -0.3, 0.6
    cat["phot_g_mean_mag"][c], cat["phot_bp_mean_mag"][c] = 17.5, 17.3
    cat["phot_rp_mean_mag"][c] = 17.7
    res = fit_cluster(cat, num_chains=2, num_warmup=200, num_samples=200, seed=0,
                      fit_widths=False, cubic=False, binaries=True, field=True,
                      selection=True, g_lim=19.0, grid=grid, marginal=True,
                      marginal_options=MarginalOptions(n_q=12, n_segments=128),
                      optimise_steps=200, max_num_doublings=8, chunk_size=100,
                      member_prob_column=None)
    s = res.summary()
    assert max(v["rhat"] for v in s.values()) < 1.05, s
    assert res.num_divergent == 0
    is_field = np.asarray(sim.truth["is_field"]).copy()
    is_field[c] = True  # now an outlier
    truth_field = float(np.mean(is_field))
    members = ~is_field
    truth_bin = float(np.mean(np.asarray(sim.truth["is_binary"])[members]))
    for k, t in (("f_field", truth_field), ("f_bin", truth_bin)):
        assert abs(s[k]["mean"] - t) < 3 * s[k]["sd"] + 0.02, (k, s[k], t)
    for k in ("log_age", "feh", "distance_pc", "av_mag"):
        assert abs(s[k]["mean"] - POP[k]) < 3 * s[k]["sd"] + 1e-3, (k, s[k])
    pm = res.stars["p_member"].mean(axis=(0, 1))
    assert np.all(np.isfinite(pm)) and np.all(np.isfinite(res.stars["mass_msun"]))
    assert pm[members].mean() > pm[~members].mean() + 0.3
    assert pm[a] > 0.5 and pm[c] < 0.2, (pm[a], pm[b], pm[c])
    assert res.settings["marginal_pruning"]["max_total"] < 0.5
