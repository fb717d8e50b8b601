"""The bundled grid and the forward model: nodes, an independent implementation, the Sun,
gradients, validity, bad input."""

from __future__ import annotations

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from scipy.interpolate import RegularGridInterpolator

import clusterhbm
from clusterhbm.grid import (
    BAND_NAMES,
    GRID_SHA256,
    band_indices,
    default_grid_path,
    grid_checksum,
    load_grid,
)
from clusterhbm.isochrone import eep_from_mass, interp_eep
from clusterhbm.photometry import (
    MBOL_SUN,
    bolometric_correction,
    observables_from_eep,
    observables_from_mass,
)

GAIA = band_indices(("G", "BP", "RP"))


@pytest.fixture(scope="module")
def grid():
    return load_grid()


@pytest.fixture(scope="module")
def raw():
    """The shipped file read with h5py alone (NaN outside each isochrone)."""
    with h5py.File(default_grid_path(), "r") as h:
        return {k: h[k][:] for k in ("isochrones/feh", "isochrones/log_age", "isochrones/eep",
                                     "isochrones/data", "bc/feh", "bc/teff", "bc/logg",
                                     "bc/av", "bc/data")}


def test_checksum_matches_shipped_file():
    assert grid_checksum() == GRID_SHA256


def test_grid_shapes_and_axes(grid):
    iso, bc = grid.iso, grid.bc
    assert iso.data.shape == (11, 87, 707, 6)
    np.testing.assert_allclose(iso.feh, np.arange(-2.0, 0.51, 0.25), atol=1e-6)
    np.testing.assert_allclose(iso.log_age, np.arange(6.0, 10.301, 0.05), atol=1e-5)
    assert bc.data.shape[-1] == len(BAND_NAMES)
    assert np.all(np.isfinite(iso.data)) and np.all(np.isfinite(bc.data))


def test_exact_at_isochrone_nodes(grid, raw):
    rng = np.random.default_rng(1)
    data = raw["isochrones/data"]
    fi, ai, ei = np.nonzero(np.isfinite(data[..., 0]))
    pick = rng.choice(len(fi), 300, replace=False)
    for cubic in (False, True):
        f = jax.jit(jax.vmap(lambda e, a, z, c=cubic: interp_eep(grid.iso, e, a, z, cubic=c)))
        p = f(raw["isochrones/eep"][ei[pick]], raw["isochrones/log_age"][ai[pick]],
              raw["isochrones/feh"][fi[pick]])
        want = data[fi[pick], ai[pick], ei[pick]]
        np.testing.assert_allclose(p.initial_mass, want[:, 0], rtol=1e-5)
        np.testing.assert_allclose(p.log_teff, want[:, 2], atol=2e-6)
        np.testing.assert_allclose(p.logg, want[:, 3], atol=1e-5)
        np.testing.assert_allclose(p.logl, want[:, 4], atol=1e-5)
        np.testing.assert_array_equal(p.phase, want[:, 5])


def test_exact_at_bc_nodes(grid, raw):
    rng = np.random.default_rng(2)
    shape = raw["bc/data"].shape
    idx = [rng.integers(0, n, 200) for n in shape[:4]]
    for cubic in (False, True):
        f = jax.jit(jax.vmap(lambda t, g, z, a, c=cubic: bolometric_correction(
            grid.bc, t, g, z, a, tuple(range(9)), cubic=c)[0]))
        got = f(raw["bc/teff"][idx[1]], raw["bc/logg"][idx[2]], raw["bc/feh"][idx[0]],
                raw["bc/av"][idx[3]])
        np.testing.assert_allclose(got, raw["bc/data"][tuple(idx)], atol=2e-5)


def _scipy_model(raw):
    iso = RegularGridInterpolator(
        (raw["isochrones/feh"], raw["isochrones/log_age"], raw["isochrones/eep"]),
        raw["isochrones/data"].astype(np.float64), bounds_error=False, fill_value=np.nan)
    bc = RegularGridInterpolator(
        (raw["bc/feh"], raw["bc/teff"], raw["bc/logg"], raw["bc/av"]),
        raw["bc/data"].astype(np.float64), bounds_error=True)

    def model(mass, log_age, feh, dist, av):
        eeps = raw["isochrones/eep"]
        curve = iso(np.column_stack([np.full_like(eeps, feh), np.full_like(eeps, log_age),
                                     eeps]))
        ok = np.isfinite(curve[:, 0])
        eep = np.interp(mass, curve[ok, 0], eeps[ok])
        row = iso([[feh, log_age, eep]])[0]
        teff = 10 ** row[2]
        bcs = bc([[feh, teff, row[3], av]])[0][:3]
        mags = MBOL_SUN - 2.5 * row[4] - bcs + 5 * np.log10(dist) - 5
        return eep, row, mags

    return model


def test_agrees_with_scipy_between_nodes(grid, raw):
    """Linear scheme vs an independent scipy implementation (mass -> EEP -> photometry)."""
    ref = _scipy_model(raw)
    rng = np.random.default_rng(3)
    n = 60
    ages = rng.uniform(6.6, 10.2, n)
    fehs = rng.uniform(-1.9, 0.4, n)
    f = jax.jit(jax.vmap(lambda m, a, z, d, av: observables_from_mass(
        grid, m, a, z, d, av, GAIA)))
    masses = []
    for a, z in zip(ages, fehs):
        # a mass on the main sequence or up the giant branch of this isochrone
        eeps = raw["isochrones/eep"]
        iso_ok = RegularGridInterpolator(
            (raw["isochrones/feh"], raw["isochrones/log_age"], eeps),
            raw["isochrones/data"][..., 0].astype(float), bounds_error=False,
            fill_value=np.nan)(np.column_stack([np.full_like(eeps, z), np.full_like(eeps, a),
                                                eeps]))
        good = iso_ok[np.isfinite(iso_ok)]
        masses.append(rng.uniform(good[0], good[-1] - 1e-3 * (good[-1] - good[0])))
    masses = np.array(masses)
    dist = rng.uniform(50, 5000, n)
    av = rng.uniform(0, 1.5, n)
    got = f(masses, ages, fehs, dist, av)
    assert np.all(got.valid)
    for k in range(n):
        _, row, mags = ref(masses[k], ages[k], fehs[k], dist[k], av[k])
        assert abs(float(got.props.log_teff[k]) - row[2]) < 1e-4, k
        np.testing.assert_allclose(np.asarray(got.mags[k]), mags, atol=1e-3)


def test_sun(grid):
    o = observables_from_mass(grid, 1.0, np.log10(4.57e9), 0.0, 10.0, 0.0, GAIA)
    assert bool(o.valid)
    assert abs(10 ** float(o.props.log_teff) - 5772) < 100
    assert abs(float(o.props.logl)) < 0.05
    assert abs(float(o.mags[0]) - 4.67) < 0.1
    assert 0.7 < float(o.mags[1] - o.mags[2]) < 0.9  # solar BP-RP ~ 0.82


def test_m67_turnoff_star_via_predict():
    r = clusterhbm.predict(mass_msun=1.2, log_age=9.6, feh=0.0, distance_pc=850.0, av_mag=0.1)
    assert r["valid"]
    np.testing.assert_allclose(r["parallax_mas"], 1000 / 850, rtol=1e-6)
    # turnoff of M67 at (m-M)_0 = 9.65, A_V = 0.1: G ~ 13, BP-RP ~ 0.7
    assert 12.5 < r["G"] < 13.8
    assert 0.55 < r["BP"] - r["RP"] < 0.85
    assert r["phase"] == 0


def test_extinction_dims_and_reddens(grid):
    lo = observables_from_eep(grid, 380.0, 9.6, 0.0, 1000.0, 0.0, GAIA)
    hi = observables_from_eep(grid, 380.0, 9.6, 0.0, 1000.0, 1.0, GAIA)
    dg = float(hi.mags[0] - lo.mags[0])
    ebr = float((hi.mags[1] - hi.mags[2]) - (lo.mags[1] - lo.mags[2]))
    assert 0.75 < dg < 0.95  # A_G / A_V ~ 0.83 for a solar-type star
    assert 0.35 < ebr < 0.5  # E(BP-RP) / A_V ~ 0.42


def test_mass_roundtrip_and_cubic_close_to_linear(grid):
    m = jnp.linspace(0.15, 1.3, 50)
    for cubic in (False, True):
        for age, feh in ((9.6, 0.0), (9.63, 0.1), (8.02, -0.3), (10.12, -1.6)):
            f = jax.jit(jax.vmap(lambda mm, a=age, z=feh, c=cubic: interp_eep(
                grid.iso, eep_from_mass(grid.iso, mm, a, z, cubic=c)[0], a, z,
                cubic=c).initial_mass))
            mm = m[m < (0.8 if age > 10 else 1.25)]
            np.testing.assert_allclose(f(mm), mm, rtol=1e-5)
    lin = clusterhbm.predict(mass_msun=m, log_age=9.63, feh=0.1)
    cub = clusterhbm.predict(mass_msun=m, log_age=9.63, feh=0.1, cubic=True)
    assert np.nanmax(np.abs(lin["G"] - cub["G"])) < 0.05


def test_out_of_grid_is_invalid_finite_and_has_finite_gradient(grid):
    def g_mag(x, cubic):
        o = observables_from_mass(grid, x[0], x[1], x[2], x[3], x[4], GAIA, cubic=cubic)
        return o.mags[0], o.valid

    cases = [
        [1.0, 10.4, 0.0, 100.0, 0.1],  # too old
        [1.0, 9.6, 0.8, 100.0, 0.1],  # too metal-rich
        [1.0, 9.6, -2.5, 100.0, 0.1],  # too metal-poor
        [3.0, 9.6, 0.0, 100.0, 0.1],  # dead at this age
        [0.05, 9.6, 0.0, 100.0, 0.1],  # below the grid's lowest mass
        [1.0, 9.6, 0.0, 100.0, -0.1],  # negative extinction
        [1.0, 9.6, 0.0, -5.0, 0.1],  # negative distance
    ]
    for cubic in (False, True):
        f = jax.jit(jax.vmap(lambda y, c=cubic: g_mag(y, c)))
        df = jax.jit(jax.vmap(jax.grad(lambda y, c=cubic: g_mag(y, c)[0])))
        vals, valids = f(jnp.asarray(cases))
        grads = df(jnp.asarray(cases))
        for c, val, valid, grad in zip(cases, vals, valids, grads):
            assert not bool(valid), c
            assert np.isfinite(float(val)), c
            assert np.all(np.isfinite(grad)), (c, grad)
    r = clusterhbm.predict(mass_msun=[3.0, 1.0], log_age=9.6)
    assert not r["valid"][0] and np.isnan(r["G"][0]) and r["valid"][1]


@pytest.mark.parametrize("cubic", [False, True])
def test_gradients_match_finite_differences(cubic):
    with x64():
        grid = load_grid(dtype=jnp.float64)

        def fn(x):
            o = observables_from_eep(grid, x[0], x[1], x[2], x[3], x[4], GAIA, cubic=cubic)
            return o.mags

        # away from nodes: main sequence, subgiant, giant, pre-MS of a young cluster
        points = [[330.3, 9.613, 0.07, 850.0, 0.13], [470.6, 9.58, -0.41, 1200.0, 0.33],
                  [540.2, 9.97, -1.13, 3000.0, 0.23], [150.4, 7.02, 0.11, 150.0, 0.07]]
        jfwd, jrev_fn, fn = jax.jit(jax.jacfwd(fn)), jax.jit(jax.jacrev(fn)), jax.jit(fn)
        for p in points:
            x = jnp.asarray(p)
            jac = jfwd(x)
            jrev = jrev_fn(x)
            np.testing.assert_allclose(jac, jrev, rtol=1e-9, atol=1e-12)
            h = jnp.asarray([1e-4, 1e-6, 1e-6, 1e-3, 1e-6])
            fd = jnp.stack([(fn(x + h[i] * jnp.eye(5)[i]) - fn(x - h[i] * jnp.eye(5)[i]))
                            / (2 * h[i]) for i in range(5)], axis=1)
            np.testing.assert_allclose(jac, fd, rtol=1e-4, atol=1e-6)
            assert bool(observables_from_eep(grid, *p, GAIA).valid)


def test_mass_gradient_matches_finite_differences():
    with x64():
        grid = load_grid(dtype=jnp.float64)

        def fn(x):
            return observables_from_mass(grid, x[0], x[1], x[2], 850.0, 0.1, GAIA).mags

        x = jnp.asarray([0.8731, 9.617, 0.033])
        jac = jax.jacfwd(fn)(x)
        h = 1e-6
        fd = jnp.stack([(fn(x + h * jnp.eye(3)[i]) - fn(x - h * jnp.eye(3)[i])) / (2 * h)
                        for i in range(3)], axis=1)
        np.testing.assert_allclose(jac, fd, rtol=1e-4, atol=1e-6)


def test_cubic_is_c1_across_cell_faces():
    """The cubic interpolant's derivative is continuous across an EEP and an age face."""
    with x64():
        grid = load_grid(dtype=jnp.float64)

        def g_of(x):
            return observables_from_eep(grid, x[0], x[1], 0.0, 850.0, 0.1, GAIA,
                                        cubic=True).mags[0]

        dg = jax.jit(jax.grad(g_of))
        # (EEP node 380 with age off-node, along EEP) and (age node 9.6, along age)
        for face, axis in (([380.0, 9.612], 0), ([377.31, 9.6], 1)):
            x = jnp.asarray(face)
            e = jnp.eye(2)[axis] * 1e-7
            np.testing.assert_allclose(dg(x - e)[axis], dg(x + e)[axis], rtol=1e-4)
        # ...whereas the linear scheme has a jump there
        def g_lin(x):
            return observables_from_eep(grid, x[0], x[1], 0.0, 850.0, 0.1, GAIA).mags[0]

        dl = jax.jit(jax.grad(g_lin))
        x = jnp.asarray([380.0, 9.612])
        e = jnp.eye(2)[0] * 1e-7
        assert abs(float(dl(x - e)[0] - dl(x + e)[0])) > 1e-4 * abs(float(dl(x + e)[0]))


def test_jit_vmap_many_stars(grid):
    n = 100_000
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    eep = jax.random.uniform(k1, (n,), minval=260.0, maxval=440.0)
    dist = jax.random.uniform(k2, (n,), minval=100.0, maxval=2000.0)
    f = jax.jit(jax.vmap(
        lambda e, d: observables_from_eep(grid, e, 9.6, 0.0, d, 0.1, GAIA).mags))
    mags = f(eep, dist)
    assert mags.shape == (n, 3) and bool(jnp.all(jnp.isfinite(mags)))
    grads = jax.jit(jax.vmap(jax.grad(
        lambda e, d: observables_from_eep(grid, e, 9.6, 0.0, d, 0.1, GAIA).mags[0],
        argnums=(0, 1))))(eep, dist)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_bad_input():
    with pytest.raises(ValueError, match="available bands: G, BP, RP"):
        clusterhbm.predict(mass_msun=1.0, log_age=9.6, bands=("G", "V"))
    with pytest.raises(ValueError, match="do not broadcast"):
        clusterhbm.predict(mass_msun=[1.0, 1.1, 1.2], log_age=[9.6, 9.7])
    with pytest.raises(ValueError, match="exactly one"):
        clusterhbm.predict(log_age=9.6)
    with pytest.raises(ValueError, match="exactly one"):
        clusterhbm.predict(mass_msun=1.0, eep=300.0, log_age=9.6)


def test_missing_and_corrupt_grid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_grid(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(default_grid_path().read_bytes()[:100_000])
    with pytest.raises(ValueError, match="corrupt"):
        load_grid(bad)


# ------------------------------------------------- the shared isochrone table (fast path)


def _table_props(table, eeps, cubic):
    from clusterhbm.isochrone import table_interp

    p = jax.vmap(lambda e: table_interp(table, e, cubic=cubic))(jnp.asarray(eeps))
    return np.stack([np.asarray(p.initial_mass), np.asarray(p.log_teff),
                     np.asarray(p.logg), np.asarray(p.logl)])


@pytest.mark.parametrize("cubic", [False, True])
def test_isochrone_table_equals_direct_interpolation(cubic):
    """The shared-table path equals the per-star path (interp_eep/eep_from_mass) in both
    schemes, at and between grid nodes of (log age, [Fe/H]), for any EEP: the cubic
    scheme does the same Steffen steps in the same order either way."""
    from clusterhbm.isochrone import isochrone_table, table_eep_from_mass

    with x64():
        g = load_grid()
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, g)
        points = [(9.6, 0.0), (8.0, -0.5), (10.0, -1.0), (9.637, 0.13), (8.212, -0.71),
                  (7.03, 0.4), (9.97, -1.9)]
        for a, f in points:
            t = isochrone_table(g.iso, a, f, cubic=cubic)
            eeps = np.linspace(float(t.lo) + 1.3, float(t.hi) - 0.7, 40)
            direct = jax.vmap(lambda e, a=a, f=f: interp_eep(g.iso, e, a, f, cubic=cubic))(
                jnp.asarray(eeps))
            want = np.stack([np.asarray(direct.initial_mass), np.asarray(direct.log_teff),
                             np.asarray(direct.logg), np.asarray(direct.logl)])
            np.testing.assert_allclose(_table_props(t, eeps, cubic), want, atol=1e-10)
            pm = want[0] + 3e-3 * eeps
            e_tab = jax.vmap(lambda m, t=t: table_eep_from_mass(t, m, eps=3e-3,
                                                                cubic=cubic)[0])(
                jnp.asarray(pm))
            e_dir = jax.vmap(lambda m, a=a, f=f: eep_from_mass(g.iso, m, a, f, eps=3e-3,
                                                               cubic=cubic)[0])(
                jnp.asarray(pm))
            np.testing.assert_allclose(np.asarray(e_tab), eeps, atol=1e-8)
            np.testing.assert_allclose(np.asarray(e_tab), np.asarray(e_dir), atol=1e-8)


def test_cubic_table_is_c1_across_an_age_node_and_linear_is_not():
    """The kink the cubic table removes: d log Teff / d log age at fixed EEP jumps by ~4% at
    an age node in the linear table and is continuous in the cubic one; the inverse's
    gradient matches finite differences."""
    from clusterhbm.isochrone import isochrone_table, table_eep_from_mass, table_interp

    with x64():
        g = load_grid()
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, g)
        jumps = {}
        for cubic in (False, True):
            def teff(a, cubic=cubic):
                return table_interp(isochrone_table(g.iso, a, 0.0, cubic=cubic), 300.3,
                                    cubic=cubic).log_teff

            d = jax.grad(teff)
            lo, hi = float(d(9.6 - 1e-9)), float(d(9.6 + 1e-9))
            jumps[cubic] = abs(hi - lo) / abs(lo)
        assert jumps[False] > 0.01
        assert jumps[True] < 1e-5

        def eep_at(a):
            t = isochrone_table(g.iso, a, 0.0, cubic=True)
            return table_eep_from_mass(t, 1.1, eps=3e-3, cubic=True)[0]

        fd = (eep_at(9.62 + 1e-6) - eep_at(9.62 - 1e-6)) / 2e-6
        assert float(jax.grad(eep_at)(9.62)) == pytest.approx(float(fd), rel=1e-5)


@pytest.mark.parametrize("cubic", [False, True])
def test_bc_slice_equals_direct_interpolation(cubic):
    """The shared-[Fe/H]/A_V fast path: BC from the (Teff, log g) slice equals the 4-D
    interpolation (values, inside flags and gradients in all four inputs) between nodes
    and off the table."""
    from clusterhbm.photometry import bc_slice, bolometric_correction_slice

    with x64():
        g = load_grid()
        bc = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), g.bc)
        rng = np.random.default_rng(3)
        n = 60
        teff = rng.uniform(3000.0, 9000.0, n)
        logg = rng.uniform(1.0, 5.2, n)
        teff[:2] = [2000.0, 5777.0]  # off the table's Teff axis; a node-free point
        for feh, av in [(0.0, 0.1), (-0.73, 0.37), (0.31, 1.9), (-5.0, 0.2)]:
            def direct(f, a, t, lg):
                return bolometric_correction(bc, t, lg, f, a, GAIA, cubic=cubic)

            def sliced(f, a, t, lg):
                return bolometric_correction_slice(bc_slice(bc, f, a, GAIA, cubic=cubic),
                                                   t, lg, cubic=cubic)

            for fn_a, fn_b in [(direct, sliced)]:
                va, ia = jax.vmap(fn_a, in_axes=(None, None, 0, 0))(feh, av, teff, logg)
                vb, ib = jax.vmap(fn_b, in_axes=(None, None, 0, 0))(feh, av, teff, logg)
                np.testing.assert_allclose(np.asarray(vb), np.asarray(va), atol=1e-11)
                np.testing.assert_array_equal(np.asarray(ib), np.asarray(ia))
            assert bool(ia[2]) == (feh > -4.5)
            assert not bool(ia[0])

            def total(fn):
                return lambda f, a, t, lg: jnp.sum(jax.vmap(
                    lambda tt, gg: fn(f, a, tt, gg)[0] * jnp.arange(1.0, 4.0))(t, lg))

            ga = jax.grad(total(direct), argnums=(0, 1, 2, 3))(feh, av, teff, logg)
            gb = jax.grad(total(sliced), argnums=(0, 1, 2, 3))(feh, av, teff, logg)
            for x, y in zip(ga, gb):
                np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-9)


def test_edge_metallicity_extension_predicts_hidden_rows():
    """The [Fe/H] = +0.5 isochrones lack the lower main sequence; the loader extends them
    from +0.25 and 0.0. Hide the first 20 real rows of every +0.5 isochrone at log age >= 8,
    extend, and compare with the hidden truth."""
    from clusterhbm.grid import _extend_edge_metallicity, _read_file

    raw = _read_file(default_grid_path())
    data = raw["iso_data"].astype(np.float64)
    ok = np.isfinite(data[..., 0])
    hidden = data.copy()
    cases = []
    for k in np.flatnonzero(raw["iso_log_age"] >= 8.0):
        e0 = int(np.argmax(ok[-1, k]))
        hidden[-1, k, e0:e0 + 20] = np.nan
        cases.append((k, e0))
    ext, n_added = _extend_edge_metallicity(hidden, np.asarray(raw["iso_feh"], float))
    assert n_added >= 20 * len(cases)
    err = np.array([np.abs(ext[-1, k, e0:e0 + 20, :5] - data[-1, k, e0:e0 + 20, :5])
                    for k, e0 in cases])  # (n_age, 20, 5)
    med = np.median(err, axis=(0, 1))
    p95 = np.percentile(err, 95, axis=(0, 1))
    # initial mass [Msun], current mass, log Teff, log g, log L
    assert med[0] < 0.01 and med[2] < 0.003 and med[4] < 0.02, med
    assert p95[0] < 0.05 and p95[2] < 0.015 and p95[4] < 0.1, p95
    # real rows are untouched, and the extension increases in mass along EEP
    ext_all, _ = _extend_edge_metallicity(data, np.asarray(raw["iso_feh"], float))
    np.testing.assert_array_equal(ext_all[ok], data[ok])
    ok_ext = np.isfinite(ext_all[..., 0])
    for k in range(data.shape[1]):
        m = ext_all[-1, k, ok_ext[-1, k], 0]
        e0 = int(np.argmax(ok[-1, k]))
        n_new = int(ok_ext[-1, k].sum() - ok[-1, k].sum())
        assert np.all(np.diff(m[:n_new + 1]) > 0), k
        assert n_new == 0 or e0 > 0


def test_no_validity_wall_at_feh_node(grid):
    """The first valid EEP of the interpolated isochrone moves by a few rows, not ~60, as
    [Fe/H] crosses the +0.25 node (the +0.5 isochrones' lower main sequence is extended)."""
    from clusterhbm.isochrone import isochrone_table

    for log_age in (8.5, 9.55, 10.0):
        below = isochrone_table(grid.iso, log_age, 0.2499)
        above = isochrone_table(grid.iso, log_age, 0.2501)
        assert int(above.lo) - int(below.lo) <= 4, (log_age, int(below.lo), int(above.lo))
        # a 0.3 Msun dwarf is on the grid at [Fe/H] +0.4
        props = clusterhbm.isochrone.interp_mass(grid.iso, 0.3, log_age, 0.4)
        assert bool(props.valid) and np.isfinite(float(props.log_teff))


def test_eep_range_is_continuous_across_grid_nodes(grid):
    """The valid EEP range's low end is the bracketing isochrones' first rows
    interpolated with the values' weights, so it moves continuously as (log age, [Fe/H])
    cross grid nodes and equals the node isochrone's own first row there (the corners'
    common first row, max(first), jumped by up to 6 EEPs at a node and differed from the
    node's own). The high end (common last row) too at log age >= 6.5,
    where every isochrone ends at the grid's last EEP. eep_from_mass is valid just above
    the low end's mass and not just below."""
    from clusterhbm.isochrone import eep_range, interp_eep

    iso = grid.iso
    la, fe = np.asarray(iso.log_age), np.asarray(iso.feh)
    first, last = np.asarray(iso.first), np.asarray(iso.last)
    e0 = float(iso.eep[0])
    f = jax.jit(jax.vmap(lambda a, z: jnp.stack(eep_range(iso, a, z))))
    h = 1e-4
    worst = 0.0
    for axis in ("age", "feh"):
        ia = np.arange(1, la.size - 1) if axis == "age" else np.arange(0, la.size, 4)
        jf = np.arange(0, fe.size, 2) if axis == "age" else np.arange(1, fe.size - 1)
        A, Z = np.meshgrid(la[ia], fe[jf], indexing="ij")
        da, dz = (h, 0.0) if axis == "age" else (0.0, h)
        a, z = A.ravel(), Z.ravel()
        v = [np.asarray(f(a + k * da, z + k * dz)) for k in (-2, -1, 0, 1, 2)]
        own = np.stack([first[np.ix_(jf, ia)].T.ravel(), last[np.ix_(jf, ia)].T.ravel()], -1)
        np.testing.assert_allclose(v[2][:, 0], e0 + own[:, 0], atol=1e-3)
        old_enough = a >= 6.55  # and its younger neighbour >= 6.5
        np.testing.assert_allclose(v[2][old_enough, 1], e0 + own[old_enough, 1])
        # bilinear: linear on each side of the node, so a jump at the node is what the
        # step onto the node adds to the neighbouring step's change
        jump_dn = np.where(old_enough[:, None], (v[2] - v[1]) - (v[1] - v[0]), 0.0)
        jump_up = np.where(old_enough[:, None], (v[3] - v[2]) - (v[4] - v[3]), 0.0)
        jump_dn[:, 0] = ((v[2] - v[1]) - (v[1] - v[0]))[:, 0]
        jump_up[:, 0] = ((v[3] - v[2]) - (v[4] - v[3]))[:, 0]
        worst = max(worst, np.max(np.abs(jump_dn)), np.max(np.abs(jump_up)))
    print("largest jump of the EEP range at a node:", worst)
    assert worst < 0.02, worst
    # eep_from_mass at the low end: valid above the range's lowest mass, not below
    a, z = 8.0 + 0.3 * (la[1] - la[0]), -0.1
    lo, _ = eep_range(iso, a, z)
    m_lo = float(interp_eep(iso, lo, a, z).initial_mass)
    assert bool(interp_eep(iso, lo, a, z).valid)
    assert not bool(interp_eep(iso, lo - 0.01, a, z).valid)
    e_up, ok_up = clusterhbm.isochrone.eep_from_mass(iso, m_lo * 1.001, a, z)
    _, ok_dn = clusterhbm.isochrone.eep_from_mass(iso, m_lo * 0.999, a, z)
    assert bool(ok_up) and not bool(ok_dn) and float(e_up) >= float(lo)
