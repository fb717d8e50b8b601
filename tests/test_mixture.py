"""Binaries, the field mixture, the selection function and the fitted mass-function slope."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from scipy.special import ndtr as ndtr_np

from clusterhbm.field import field_photometry_log_density, member_log_odds
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.imf import imf_cdf, log_imf, sample_imf
from clusterhbm.isochrone import eep_from_mass, table_eep_range, table_interp
from clusterhbm.model import (
    ModelConfig,
    Priors,
    StarData,
    log_density,
    log_density_star,
    log_likelihood_star,
    log_p_detect,
    member_probabilities,
    pop_to_unconstrained,
    population_state,
    segment_selection,
    star_terms,
)
from clusterhbm.photometry import observables_from_eep, observables_from_mass, photometry

GAIA = band_indices(("G", "BP", "RP"))
POP = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}


@pytest.fixture(scope="module")
def grid():
    return load_grid()


def _config(**kw):
    return ModelConfig(band_idx=GAIA, fit_widths=(False,) * 4, **kw)


def _star_on_isochrone(grid, m1, q=None, *, dist=850.0):
    """Noise-free data of a single star (or an unresolved pair) of primary mass m1."""
    o1 = observables_from_mass(grid, m1, POP["log_age"], POP["feh"], dist, POP["av_mag"],
                               GAIA)
    mags = np.asarray(o1.mags)
    if q is not None:
        o2 = observables_from_mass(grid, q * m1, POP["log_age"], POP["feh"], dist,
                                   POP["av_mag"], GAIA)
        mags = -2.5 * np.log10(10 ** (-0.4 * mags) + 10 ** (-0.4 * np.asarray(o2.mags)))
    return mags, float(o1.props.eep)


def _data(rows, plx=1.1765, field_logpdf=None):
    mag = jnp.asarray(np.array(rows))
    n = mag.shape[0]
    return StarData(mag=mag, mag_err=jnp.full(mag.shape, 0.005),
                    parallax_mas=jnp.full(n, plx), parallax_err_mas=jnp.full(n, 0.03),
                    log_field_mag=None if field_logpdf is None else jnp.asarray(field_logpdf),
                    log_member_odds=None)


def _position(config, star_s, q_raw=None, extra=None):
    values = dict(POP, **(extra or {}))
    pop = pop_to_unconstrained(values, config)
    star = {"s": jnp.asarray(star_s)}
    if config.binaries:
        star["q_raw"] = jnp.asarray(q_raw)
    return {"pop": pop, "star": star}


def test_binary_likelihood_is_the_marginal_of_single_and_pair(grid):
    """log density with binaries = prior + log((1-f) L_single + f L_pair), by hand."""
    with x64():
        config = _config(binaries=True)
        priors = Priors()
        mags, eep1 = _star_on_isochrone(grid, 0.9, q=0.8)
        data = _data([mags])
        m1 = 0.9
        s = m1 + 3e-3 * eep1
        x = np.log((0.8 - 0.1) / 0.9) - np.log1p(-(0.8 - 0.1) / 0.9)  # q = 0.8
        pos = _position(config, [s], [x], {"f_bin": 0.3})
        popv = population_state(pos["pop"], config, priors, grid)
        star = jax.tree.map(lambda v: v[0], pos["star"])
        data_i = tuple(jax.tree.map(lambda v: v[0], d) if d is not None else None
                       for d in data)
        t = star_terms(star, popv, data_i, grid, config, priors)
        assert float(t.q) == pytest.approx(0.8, abs=1e-12)
        # by hand: the single star and the pair (secondary from an independent inversion)
        eep, _ = eep_from_mass(grid.iso, s, POP["log_age"], POP["feh"], eps=3e-3)
        o1 = observables_from_eep(grid, eep, POP["log_age"], POP["feh"], 850.0, 0.1, GAIA)
        o2 = observables_from_mass(grid, 0.8 * float(o1.props.initial_mass), POP["log_age"],
                                   POP["feh"], 850.0, 0.1, GAIA)
        pair = -2.5 * np.log10(10 ** (-0.4 * np.asarray(o1.mags))
                               + 10 ** (-0.4 * np.asarray(o2.mags)))
        args = (data.mag[0], data.mag_err[0], data.parallax_mas[0], data.parallax_err_mas[0],
                0.0, priors.mag_floor)
        ll_s = float(log_likelihood_star(o1, *args))
        ll_b = float(log_likelihood_star(o1._replace(mags=jnp.asarray(pair)), *args))
        # (the model's A_V and distance go through their unconstrained coordinates and
        # back: ~1e-7 mag, against residuals of ~0.5 mag / 0.011 mag)
        assert float(t.ll_single) == pytest.approx(ll_s, rel=1e-4)
        assert float(t.ll_binary) == pytest.approx(ll_b, rel=1e-4, abs=0.05)
        assert ll_b > ll_s + 50  # the data are the pair
        expect = np.logaddexp(np.log(0.7) + float(t.ll_single), np.log(0.3) + float(t.ll_binary))
        assert float(t.ll_member) == pytest.approx(expect, abs=1e-9)
        _, p_bin = member_probabilities(t, config, popv)
        assert float(p_bin) > 0.999
        # q's uniform prior in the unconstrained coordinate: log sigmoid(x) + log sigmoid(-x)
        cfg0 = _config()
        t0 = star_terms({"s": star["s"]}, population_state(
            _position(cfg0, [s])["pop"], cfg0, priors, grid), data_i, grid, cfg0, priors)
        lq = -np.log1p(np.exp(-x)) - np.log1p(np.exp(x))
        assert float(t.log_prior - t0.log_prior) == pytest.approx(lq, abs=1e-10)


def test_field_mixture_separates_outliers_from_members(grid):
    """A star on the isochrone is a member; a blue straggler and a foreground star are not."""
    config = _config(field=True)
    priors = Priors(field_parallax_mean_mas=1.0)
    on, eep1 = _star_on_isochrone(grid, 1.0)
    bss = on.copy()
    bss[:] = on - 1.5  # 1.5 mag above the turnoff region, same colour
    bss[1] -= 0.3  # and bluer
    rows = [on, bss, on]
    lfm, _ = field_photometry_log_density(np.array(rows * 10), np.full((30, 3), 0.005))
    data = StarData(mag=jnp.asarray(np.array(rows)), mag_err=jnp.full((3, 3), 0.005),
                    parallax_mas=jnp.asarray([1.1765, 1.1765, 3.0]),
                    parallax_err_mas=jnp.full(3, 0.03), log_field_mag=jnp.asarray(lfm[:3]))
    s = 1.0 + 3e-3 * eep1
    pos = _position(config, [s, s, s], extra={"f_field": 0.2, "field_parallax_mas": 1.0,
                                                "field_parallax_sd_mas": 1.0})
    popv = population_state(pos["pop"], config, priors, grid)
    t = jax.vmap(star_terms, in_axes=(0, None, 0, None, None, None))(
        pos["star"], popv, tuple(data), grid, config, priors)
    p_mem, _ = member_probabilities(t, config, popv)
    p_mem = np.asarray(p_mem)
    assert p_mem[0] > 0.99
    assert p_mem[1] < 1e-3  # blue straggler: no isochrone point fits
    assert p_mem[2] < 1e-3  # photometric twin at twice the cluster's parallax
    # the log density stays finite for the outliers, with finite gradients
    lp, g = jax.value_and_grad(lambda p: log_density(p, data, grid, config, priors))(pos)
    assert np.isfinite(float(lp))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    # a membership prior shifts the odds by exactly its log odds
    odds = jnp.asarray([0.0, 2.0, -1.0])
    t2 = jax.vmap(star_terms, in_axes=(0, None, 0, None, None, None))(
        pos["star"], popv, tuple(data._replace(log_member_odds=odds)), grid, config, priors)
    base = np.asarray(t.log_w_member - t.log_w_field)
    np.testing.assert_allclose(np.asarray(t2.log_w_member - t2.log_w_field), base + odds,
                               atol=1e-5)
    assert base[0] == pytest.approx(np.log(0.8 / 0.2), abs=1e-5)


def test_field_photometric_density_is_normalised():
    """Integrated over RP at fixed (G, BP), the density is 1 / (range_G * range_colour)."""
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 2.5, 400)
    g = rng.uniform(12, 19, 400)
    rp = g - (0.1 + 0.4 * c) + 0.01 * rng.normal(size=400)
    bp = rp + c
    mag = np.column_stack([g, bp, rp])
    err = np.full(mag.shape, 0.01)
    lp, info = field_photometry_log_density(mag, err)
    (g_lo, g_hi), (c_lo, c_hi) = info["g_range"], info["colour_range"]
    # integrate over RP (with BP - RP = c fixed => move BP along) at one star's (G, c)
    g0, c0 = 15.0, 1.5
    rps = np.linspace(g0 - 3, g0 + 3, 20001)
    rows = np.column_stack([np.full_like(rps, g0), rps + c0, rps])
    # evaluate with the fitted locus: append the rows to the fitting sample's info
    coef = info["locus"][2]["coef"]
    s = info["locus"][2]["scatter"]
    var = s ** 2 + 2 * 0.01 ** 2
    r = (rows[:, 2] - rows[:, 0]) - np.polyval(coef, c0)
    dens = np.exp(-0.5 * r ** 2 / var) / np.sqrt(2 * np.pi * var) / (g_hi - g_lo) / (
        c_hi - c_lo)
    assert np.trapezoid(dens, rps) == pytest.approx(1 / ((g_hi - g_lo) * (c_hi - c_lo)),
                                                    rel=1e-6)
    # and the function's own value for a catalogue star equals that formula
    i = 7
    r_i = (mag[i, 2] - mag[i, 0]) - np.polyval(coef, mag[i, 1] - mag[i, 2])
    expect = (-0.5 * r_i ** 2 / var - 0.5 * np.log(2 * np.pi * var) - np.log(g_hi - g_lo)
              - np.log(c_hi - c_lo))
    assert lp[i] == pytest.approx(expect, abs=1e-10)
    assert s == pytest.approx(0.01, rel=0.2)  # locus scatter recovered
    # missing BP: only the uniform G term
    mag2 = mag.copy()
    mag2[3, 1] = np.nan
    lp2, _ = field_photometry_log_density(mag2, err)
    assert lp2[3] == pytest.approx(-np.log(g_hi - g_lo), abs=1e-12)


def test_member_log_odds_rejects_bad_probabilities():
    np.testing.assert_allclose(member_log_odds([0.5, np.nan, 0.9]),
                               [0.0, 0.0, np.log(9.0)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        member_log_odds([1.2])


@pytest.mark.parametrize("binaries", [False, True])
def test_detection_probability_matches_monte_carlo(grid, binaries):
    """The quadrature completeness term against a Monte Carlo of the simulator's physics."""
    priors = Priors(g_lim=17.0, g_bright=9.0, selection_width_mag=0.02)
    config = _config(selection=True, binaries=binaries)
    pop = pop_to_unconstrained(dict(POP, f_bin=0.5), config)
    popv = population_state(pop, config, priors, grid)
    p_quad = float(jnp.exp(popv["log_p_detect"]))
    n = 40000
    key1, key2 = jax.random.split(jax.random.key(1))
    m = sample_imf(key1, n, kind="kroupa", m_min=0.1, m_max=20.0)

    def g_of(mass):
        return jax.vmap(lambda x: observables_from_mass(
            grid, x, POP["log_age"], POP["feh"], POP["distance_pc"], POP["av_mag"], GAIA))(
            mass)

    o1 = g_of(m)
    alive = np.asarray(o1.valid)
    g = np.asarray(o1.mags[:, 0])
    if binaries:
        q = np.asarray(jax.random.uniform(key2, (n,), minval=0.1, maxval=1.0))
        o2 = g_of(jnp.asarray(q) * m)
        lit = np.asarray(o2.valid)
        g2 = np.where(lit, np.asarray(o2.mags[:, 0]), 99.0)
        gb = -2.5 * np.log10(10 ** (-0.4 * g) + np.where(lit, 10 ** (-0.4 * g2), 0.0))
        half = np.arange(n) < n // 2  # f_bin = 0.5
        g = np.where(half, g, gb)
    det = alive & (g < 17.0) & (g > 9.0)
    p_mc = det.sum() / alive.sum()
    se = np.sqrt(p_mc * (1 - p_mc) / alive.sum())
    assert abs(p_quad - p_mc) < 4 * se + 0.01, (p_quad, p_mc, se)
    # differentiable in the population parameters (distance moves stars across the limit)
    f = jax.grad(lambda ld: log_p_detect(dict(popv, distance_pc=jnp.exp(ld)), grid, config,
                                         priors))
    d = float(f(jnp.log(850.0)))
    assert np.isfinite(d) and d < 0  # farther -> fewer stars detected
    h = 1e-3
    fd = (float(log_p_detect(dict(popv, distance_pc=850.0 * np.exp(h)), grid, config, priors))
          - float(log_p_detect(dict(popv, distance_pc=850.0 * np.exp(-h)), grid, config,
                               priors))) / (2 * h)
    assert d == pytest.approx(fd, rel=0.05)


def test_segment_selection_is_the_exact_mean_along_each_chord():
    """The closed-form mean of the soft cut along a chord, against a dense average, near the
    limit, across it, far from it (float32) and for a chord of zero length."""
    g_lim, g_bright, w = 19.0, 9.0, 0.05
    pairs = [(18.95, 19.02), (19.1, 18.9), (18.0, 18.0), (12.0, 12.3), (19.001, 19.0013),
             (25.0, 26.0), (9.02, 8.97), (18.99, 19.2)]
    g = jnp.asarray(np.array(pairs, np.float32))
    got = np.asarray(segment_selection(g, g_lim, g_bright, w))
    t = np.linspace(0.0, 1.0, 200001)
    for (g0, g1), v in zip(np.asarray(g, float), got):  # the float32 ends, exactly
        gg = g0 + t * (g1 - g0)
        s = ndtr_np((g_lim - gg) / w) * ndtr_np((gg - g_bright) / w)
        assert v == pytest.approx(np.trapezoid(s, t), abs=1e-5), (g0, g1)
    grad = jax.grad(lambda x: jnp.sum(segment_selection(x, g_lim, g_bright, w)))(g)
    assert np.all(np.isfinite(np.asarray(grad)))


def _fine_isochrone(grid, popv, kw, n: int = 20001):
    """Initial mass, G and IMF density at ``n`` EEPs of a population state's own
    isochrone (the valid points): the reference integrals of P_det."""
    table = popv["iso_table"]
    lo, hi = table_eep_range(table)
    props = jax.vmap(lambda e: table_interp(table, e))(jnp.linspace(lo, hi, n))
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, popv["feh"], popv["distance_pc"],
                                         popv["av_mag"], GAIA, bcs=popv["bc_slice"]))(props)
    ok = np.asarray(obs.valid)
    m = np.asarray(props.initial_mass, float)[ok]
    g = np.asarray(obs.mags[:, 0], float)[ok]
    return m, g, np.exp(np.asarray(log_imf(jnp.asarray(m), **kw), float))


def test_detection_probability_matches_a_fine_eep_integral_and_is_smooth(grid):
    """log P_det against the integral over 20001 EEPs of the model's own isochrone (soft
    cut), along the line between a 500-star mock's truth and the fit that missed it by
    4 sd (case b, seed 1001): the node trapezoid of S used before was off by up to
    2.7e-3 and its error changed by 2.7e-3 along this line (2.7 nats at N = 500)."""
    priors = Priors(g_lim=19.0, g_bright=-5.0)
    config = _config(selection=True)
    a = {"log_age": 9.0, "feh": 0.0, "distance_pc": 800.0, "av_mag": 0.3}
    b = {"log_age": 9.00686, "feh": 0.01327, "distance_pc": 800.50, "av_mag": 0.27840}
    kw = {"kind": "kroupa", "m_min": priors.m_min, "m_max": priors.m_max,
          "alpha": priors.imf_alpha}
    errs = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        point = {k: a[k] + t * (b[k] - a[k]) for k in a}
        popv = population_state(pop_to_unconstrained(point, config), config, priors, grid)
        m, g, f = _fine_isochrone(grid, popv, kw)
        s = ndtr_np((priors.g_lim - g) / priors.selection_width_mag)
        ref = np.log(np.trapezoid(f * s, m)) - np.log(float(imf_cdf(jnp.asarray(m.max()),
                                                                      **kw)))
        errs.append(float(popv["log_p_detect"]) - ref)
    errs = np.array(errs)
    assert np.max(np.abs(errs)) < 6e-4, errs
    assert np.ptp(errs) < 2.5e-4, errs  # x 500 stars: < 0.13 nats along the line


def test_binary_detection_probability_matches_a_fine_q_and_eep_integral(grid):
    """The binary branch of log P_det (the chord means of S averaged over 8 mid-point
    mass ratios) against 20001 EEPs x 200 mass ratios of the model's own isochrone (the
    secondary's G interpolated in mass, fluxes added), f_bin 0.5, for an M67-like cluster
    cut at G = 16 (the cut crosses the upper main sequence, where a binary's brightening
    decides its detection), along 0.04 dex of log age. Measured: errors -2.8e-4 to
    -1.6e-4 varying by 1.2e-4, as much as with 64 ratios (singles alone vary by
    ~1e-4: the 8-ratio mean is not what limits P_det)."""
    priors = Priors(g_lim=16.0)
    config = _config(selection=True, binaries=True)
    kw = {"kind": "kroupa", "m_min": priors.m_min, "m_max": priors.m_max,
          "alpha": priors.imf_alpha}
    w = priors.selection_width_mag
    qs = priors.q_min + (1.0 - priors.q_min) * (np.arange(200) + 0.5) / 200
    errs = []
    for la in (9.58, 9.6, 9.62):
        point = {"log_age": la, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1,
                 "f_bin": 0.5}
        popv = population_state(pop_to_unconstrained(point, config), config, priors, grid)
        m, g, f = _fine_isochrone(grid, popv, kw)
        s_bin = np.zeros_like(m)
        for q in qs:
            lit = q * m >= m.min()
            g2 = np.interp(q * m, m, g)
            flux = 10 ** (-0.4 * g) + np.where(lit, 10 ** (-0.4 * g2), 0.0)
            s_bin += ndtr_np((priors.g_lim + 2.5 * np.log10(flux)) / w)
        s_tot = 0.5 * ndtr_np((priors.g_lim - g) / w) + 0.5 * s_bin / qs.size
        ref = np.log(np.trapezoid(f * s_tot, m)) - np.log(float(imf_cdf(
            jnp.asarray(m.max()), **kw)))
        errs.append(float(popv["log_p_detect"]) - ref)
    errs = np.array(errs)
    assert np.max(np.abs(errs)) < 5e-4, errs
    assert np.ptp(errs) < 2.5e-4, errs


def test_full_model_gradients_are_finite_and_match_finite_differences(grid):
    with x64():
        config = _config(binaries=True, field=True, selection=True, fit_mf_slope=True)
        priors = Priors(g_lim=18.0)
        rows, eeps = [], []
        for m, q in ((0.8, None), (1.0, 0.9), (1.2, None)):
            mags, e = _star_on_isochrone(grid, m, q)
            rows.append(mags + 0.01)
            eeps.append(m + 3e-3 * e)
        lfm = np.full(3, -np.log(10.0 * 3.0))
        data = _data(rows, field_logpdf=lfm)
        # log age off a grid node: linear interpolation across age has a kink at every
        # node, where finite differences average the two one-sided derivatives
        pos = _position(config, eeps, [0.0, 1.0, -1.0],
                        {"f_bin": 0.3, "f_field": 0.1, "mf_slope": 2.0, "log_age": 9.613,
                         "field_parallax_mas": 1.0, "field_parallax_sd_mas": 1.0})

        vg = jax.jit(jax.value_and_grad(lambda p: log_density(p, data, grid, config, priors)))

        def f(p):  # one compiled function for values and gradients (compiling is the cost)
            return vg(p)[0]

        lp, g = vg(pos)
        assert np.isfinite(float(lp))
        h = 1e-5
        for key in ("log_age", "ln_distance_pc", "logit_f_bin", "logit_f_field", "mf_slope"):
            up = jax.tree.map(lambda x: x, pos)
            dn = jax.tree.map(lambda x: x, pos)
            up["pop"][key] = pos["pop"][key] + h
            dn["pop"][key] = pos["pop"][key] - h
            fd = (float(f(up)) - float(f(dn))) / (2 * h)
            assert float(g["pop"][key]) == pytest.approx(fd, rel=2e-3, abs=2e-3), key
        # outside the grid: -inf with finite gradients, never NaN
        bad = jax.tree.map(lambda x: x, pos)
        bad["star"]["s"] = pos["star"]["s"].at[0].set(50.0)
        lpb, gb = vg(bad)
        assert float(lpb) == -np.inf
        assert all(np.all(~np.isnan(np.asarray(x))) for x in jax.tree.leaves(gb))
        star0 = jax.tree.map(lambda v: v[0], bad["star"])
        data0 = tuple(None if d is None else d[0] for d in data)
        popv = population_state(pos["pop"], config, priors, grid)
        assert float(log_density_star(star0, popv, data0, grid, config, priors)) == -np.inf


def test_shared_isochrone_fast_path_equals_general_path(grid):
    """With zero age/[Fe/H] widths the isochrone is interpolated once; same density."""
    from clusterhbm.model import log_prior_population, population_values, shared_isochrone

    with x64():
        config = ModelConfig(band_idx=GAIA, fit_widths=(False, False, True, True),
                             binaries=True)
        assert shared_isochrone(config)
        priors = Priors()
        rows, ss = [], []
        for m, q in ((0.7, None), (1.0, 0.9), (1.25, None), (1.3, None)):
            mags, e = _star_on_isochrone(grid, m, q)
            rows.append(mags + 0.01)
            ss.append(m + 3e-3 * e)
        data = _data(rows)
        values = dict(POP, log_age=9.613, feh=0.07, f_bin=0.3, sigma_distance_pc=5.0,
                      sigma_av_mag=0.02)
        pop = pop_to_unconstrained(values, config)
        n = len(ss)
        star = {"s": jnp.asarray(ss), "z_dist": jnp.linspace(-1, 1, n),
                "z_av": jnp.linspace(0.5, -0.5, n), "q_raw": jnp.linspace(-1, 1, n)}
        pos = {"pop": pop, "star": star}

        def general(p):
            popv = population_values(p["pop"], config, priors)  # no table
            per = jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
                p["star"], popv, tuple(data), grid, config, priors)
            return log_prior_population(p["pop"], config, priors, grid) + jnp.sum(per)

        def fast(p):
            return log_density(p, data, grid, config, priors)

        general = jax.jit(general)
        fast = jax.jit(fast)
        v1, g1 = jax.jit(jax.value_and_grad(general))(pos)
        v2, g2 = jax.jit(jax.value_and_grad(fast))(pos)
        assert np.isfinite(float(v1))
        # (the grid tables are float32: the two paths round in a different order)
        assert float(v2) == pytest.approx(float(v1), rel=2e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-2)
        # and -inf at the same places: a pseudo-mass past the isochrone's end
        bad = {"pop": pop, "star": dict(star, s=star["s"].at[2].set(10.0))}
        assert float(general(bad)) == float(fast(bad)) == -np.inf

