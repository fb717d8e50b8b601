"""The hierarchical log density: a hand computation, gradients, -inf, compile counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from scipy import stats

from clusterhbm.grid import band_indices, load_grid
from clusterhbm.imf import imf_cdf, log_imf
from clusterhbm.isochrone import eep_from_mass, eep_range, interp_eep
from clusterhbm.model import (
    ModelConfig,
    Priors,
    StarData,
    log_density,
    make_logdensity_fn,
    pop_to_unconstrained,
)
from clusterhbm.photometry import observables_from_eep

GAIA = band_indices(("G", "BP", "RP"))


def _toy(dtype):
    data = StarData(
        mag=jnp.asarray([[14.1, 14.5, 13.55], [16.2, np.nan, 15.4]], dtype),
        mag_err=jnp.asarray([[0.003, 0.004, 0.004], [0.004, np.nan, 0.006]], dtype),
        parallax_mas=jnp.asarray([1.20, np.nan], dtype),
        parallax_err_mas=jnp.asarray([0.03, np.nan], dtype),
    )
    pop = {"log_age": 9.613, "feh": 0.05, "distance_pc": 860.0, "av_mag": 0.12,
           "sigma_log_age": 0.02, "sigma_feh": 0.03, "sigma_distance_pc": 9.0,
           "sigma_av_mag": 0.04}
    star = {"s": jnp.asarray([1.0 + 3e-3 * 340, 0.8 + 3e-3 * 300], dtype),
            "z_age": jnp.asarray([0.3, -0.5], dtype), "z_feh": jnp.asarray([-0.2, 0.1], dtype),
            "z_dist": jnp.asarray([0.7, -1.1], dtype), "z_av": jnp.asarray([0.4, -0.3], dtype)}
    return data, pop, star


def _hand_log_density(data, pop, star, priors, grid):
    """The same density written out star by star with NumPy/SciPy."""
    iso = grid.iso
    total = 0.0
    # population prior: flat log age, Normal feh, flat ln d, softplus A_V Jacobian,
    # HalfNormal widths with log-Jacobians
    total += -0.5 * ((pop["feh"] - priors.feh_mean) / priors.feh_sd) ** 2
    raw = np.log(np.expm1(pop["av_mag"] / 0.1))  # raw / 0.1
    total += np.log(1 / (1 + np.exp(-raw)))
    for name, scale in (("sigma_log_age", priors.sigma_log_age_scale),
                        ("sigma_feh", priors.sigma_feh_scale),
                        ("sigma_distance_pc", priors.sigma_distance_frac_scale
                         * pop["distance_pc"]),
                        ("sigma_av_mag", priors.sigma_av_scale)):
        total += stats.halfnorm(scale=scale).logpdf(pop[name]) + np.log(pop[name])
    for i in range(2):
        z = {k: float(star[k][i]) for k in ("z_age", "z_feh", "z_dist", "z_av")}
        age = pop["log_age"] + pop["sigma_log_age"] * z["z_age"]
        feh = pop["feh"] + pop["sigma_feh"] * z["z_feh"]
        dist = pop["distance_pc"] + pop["sigma_distance_pc"] * z["z_dist"]
        a, b = -pop["av_mag"] / pop["sigma_av_mag"], np.inf
        av = stats.truncnorm(a, b, loc=pop["av_mag"], scale=pop["sigma_av_mag"]).ppf(
            stats.norm.cdf(z["z_av"]))
        eep, ok = eep_from_mass(iso, float(star["s"][i]), age, feh, eps=3e-3)
        assert bool(ok)
        eep = float(eep)
        obs = observables_from_eep(grid, eep, age, feh, dist, av, GAIA)
        m = float(obs.props.initial_mass)
        h = 1e-3
        dm = (float(interp_eep(iso, eep + h, age, feh).initial_mass)
              - float(interp_eep(iso, eep - h, age, feh).initial_mass)) / (2 * h)
        _, e_hi = eep_range(iso, age, feh)
        m_hi = float(interp_eep(iso, e_hi, age, feh).initial_mass)
        lp = (float(log_imf(m)) + np.log(dm / (dm + 3e-3))
              - np.log(float(imf_cdf(m_hi))))
        lp += sum(stats.norm.logpdf(v) + 0.5 * np.log(2 * np.pi) for v in z.values())
        mag = np.asarray(data.mag[i])
        err = np.asarray(data.mag_err[i])
        for k in range(3):
            if np.isfinite(mag[k]):
                lp += stats.norm.logpdf(mag[k], float(obs.mags[k]),
                                        np.sqrt(err[k] ** 2 + priors.mag_floor ** 2))
        if np.isfinite(float(data.parallax_mas[i])):
            lp += stats.norm.logpdf(float(data.parallax_mas[i]), 1000 / dist,
                                    float(data.parallax_err_mas[i]))
        total += lp
    return total


def test_log_density_matches_hand_computation():
    with x64():
        grid = load_grid(dtype=jnp.float64)
        data, pop, star = _toy(jnp.float64)
        cfg = ModelConfig(band_idx=GAIA)
        priors = Priors()
        position = {"pop": pop_to_unconstrained(pop, cfg), "star": star}
        got = float(log_density(position, data, grid, cfg, priors))
        want = _hand_log_density(data, pop, star, priors, grid)
        assert np.isfinite(got)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_gradient_matches_finite_differences():
    with x64():
        grid = load_grid(dtype=jnp.float64)
        data, pop, star = _toy(jnp.float64)
        cfg = ModelConfig(band_idx=GAIA)
        position = {"pop": pop_to_unconstrained(pop, cfg), "star": star}
        from jax.flatten_util import ravel_pytree

        x0, unravel = ravel_pytree(position)
        f = jax.jit(lambda x: make_logdensity_fn(data, grid, cfg)(unravel(x)))
        g = np.asarray(jax.grad(f)(x0))
        assert np.all(np.isfinite(g))
        h = 1e-6
        for i in range(x0.shape[0]):
            e = jnp.zeros_like(x0).at[i].set(h)
            fd = (float(f(x0 + e)) - float(f(x0 - e))) / (2 * h)
            np.testing.assert_allclose(g[i], fd, rtol=2e-4, atol=2e-3)


def test_outside_grid_is_minus_inf_with_finite_gradient():
    grid = load_grid()
    data, pop, star = _toy(jnp.float32)
    cfg = ModelConfig(band_idx=GAIA)
    ld = make_logdensity_fn(data, grid, cfg)
    cases = [dict(pop, log_age=10.5), dict(pop, feh=0.9), dict(pop, distance_pc=-10.0)]
    for p in cases:
        pos = {"pop": pop_to_unconstrained(p, cfg), "star": star}
        if p["distance_pc"] < 0:
            pos["pop"]["ln_distance_pc"] = jnp.asarray(np.log(5.0))  # below the prior range
        v = ld(pos)
        assert np.isneginf(float(v)), p
        g = jax.grad(ld)(pos)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    # a star whose pseudo-mass is beyond its isochrone (a dead star)
    pos = {"pop": pop_to_unconstrained(pop, cfg), "star": dict(star, s=star["s"].at[0].set(5.0))}
    assert np.isneginf(float(ld(pos)))
    assert not np.any(np.isnan(jax.tree.leaves(jax.grad(ld)(pos))[0]))


def test_missing_bands_are_skipped_not_fatal():
    grid = load_grid()
    data, pop, star = _toy(jnp.float32)
    cfg = ModelConfig(band_idx=GAIA)
    pos = {"pop": pop_to_unconstrained(pop, cfg), "star": star}
    v = float(make_logdensity_fn(data, grid, cfg)(pos))
    assert np.isfinite(v)
    # removing star 2's remaining bands changes the value by exactly their terms
    data2 = data._replace(mag=data.mag.at[1, 0].set(jnp.nan))
    v2 = float(make_logdensity_fn(data2, grid, cfg)(pos))
    assert np.isfinite(v2) and v2 != v


def test_unpooled_uses_same_code_path_without_population():
    grid = load_grid()
    data, _, star = _toy(jnp.float32)
    cfg = ModelConfig(band_idx=GAIA, pooled=False)
    # the unpooled broad prior: distance 1000 +- 1000 pc, so z_dist = -1.1 is d < 0
    star = dict(star, z_dist=jnp.asarray([0.1, -0.2]))
    v = make_logdensity_fn(data, grid, cfg)(pos := {"pop": {}, "star": star})
    assert np.isfinite(float(v))
    bad = dict(star, z_dist=jnp.asarray([0.1, -1.1]))
    assert np.isneginf(float(make_logdensity_fn(data, grid, cfg)({"pop": {}, "star": bad})))
    assert set(pos["star"]) == {"s", "z_age", "z_feh", "z_dist", "z_av"}


def test_density_traced_a_bounded_number_of_times():
    """Warm-up and sampling in several chunks compile the density a fixed number of times."""
    from clusterhbm.sampling import run_nuts

    grid = load_grid()
    data, pop, star = _toy(jnp.float32)
    cfg = ModelConfig(band_idx=GAIA, fit_widths=(False,) * 4)
    base = make_logdensity_fn(data, grid, cfg)
    count = {"n": 0}

    def counted(p):
        count["n"] += 1
        return base(p)

    pos = {"pop": pop_to_unconstrained(pop, cfg), "star": {"s": star["s"]}}
    inits = jax.tree.map(lambda x: jnp.stack([x, x]), pos)
    out = run_nuts(jax.random.key(0), counted, inits, num_warmup=30, num_samples=30,
                   chunk_size=10, max_num_doublings=4)
    assert out.info["is_divergent"].shape == (2, 30)
    # init and one chunk program shared by warm-up and sampling (the NUTS kernel traces
    # the density a few times); not once per chunk or per phase
    assert count["n"] <= 5, count["n"]


def _toy_hessian():
    """The 2-star toy's position, log density and full Hessian (jax.hessian), float64;
    call inside ``x64()``."""
    from jax.flatten_util import ravel_pytree

    grid = load_grid(dtype=jnp.float64)
    data, pop, star = _toy(jnp.float64)
    cfg = ModelConfig(band_idx=GAIA)
    position = {"pop": pop_to_unconstrained(pop, cfg), "star": star}
    ld = make_logdensity_fn(data, grid, cfg)
    x0, unravel = ravel_pytree(position)
    full = np.asarray(jax.jit(jax.hessian(lambda x: ld(unravel(x))))(x0))
    return position, ld, full


def test_curvature_diagonal_equals_hessian_diagonal():
    """The HVP-per-coordinate-kind diagonal equals the diagonal of the full Hessian."""
    from clusterhbm.fit import curvature_diagonal, curvature_inverse_metric

    with x64():
        position, ld, full = _toy_hessian()
        full = np.diag(full)
        got = np.asarray(jax.jit(lambda p: curvature_diagonal(ld, p))(position))
        np.testing.assert_allclose(got, full, rtol=1e-8, atol=1e-8)
        var = np.asarray(curvature_inverse_metric(ld, position, min_var=1e-12, max_var=1e6))
        want = -1.0 / np.where(full < 0, full, -1.0)
        want = np.where(full < 0, want, np.median(want[full < 0]))  # the fallback
        np.testing.assert_allclose(var, np.clip(want, 1e-12, 1e6), rtol=1e-8)


def test_arrow_hessian_equals_the_full_hessian():
    """P + K Hessian-vector products give every non-zero block of the Hessian."""
    from clusterhbm.fit import curvature_arrow

    with x64():
        position, ld, full = _toy_hessian()
        h_pp, h_ps, h_ss = (np.asarray(x) for x in
                            jax.jit(lambda p: curvature_arrow(ld, p))(position))
        n_p, (_, k, n) = h_pp.shape[0], h_ps.shape
        # rebuild the full matrix from the arrow (ravel order: pop, then kind-major stars)
        rebuilt = np.zeros_like(full)
        rebuilt[:n_p, :n_p] = h_pp
        rebuilt[:n_p, n_p:] = h_ps.reshape(n_p, k * n)
        rebuilt[n_p:, :n_p] = h_ps.reshape(n_p, k * n).T
        for i in range(n):
            idx = n_p + np.arange(k) * n + i
            rebuilt[np.ix_(idx, idx)] = h_ss[i]
        np.testing.assert_allclose(rebuilt, full, rtol=1e-7, atol=1e-7 * np.abs(full).max())


def test_laplace_inverse_metric_is_the_inverse_of_the_arrow_matrix():
    """The Schur-complement covariance equals a dense inverse of the assembled matrix; a
    star whose block is not positive definite is decoupled with its fallback variances."""
    from clusterhbm.fit import laplace_inverse_metric

    with x64():
        rng = np.random.default_rng(3)
        n_p, k, n = 4, 2, 6
        scale = np.concatenate([np.full(n_p, 1e-2), np.full(k * n, 1e-4)])
        m = rng.normal(size=(n_p + k * n, n_p + k * n))
        prec = m @ m.T + (n_p + k * n) * np.eye(n_p + k * n)
        for i in range(n):  # zero the star-star cross terms: the arrow shape
            for j in range(n):
                if i != j:
                    prec[np.ix_(n_p + np.arange(k) * n + i, n_p + np.arange(k) * n + j)] = 0
        prec = prec / np.outer(scale, scale)
        h = -prec
        h_pp = h[:n_p, :n_p]
        h_ps = h[:n_p, n_p:].reshape(n_p, k, n)
        h_ss = np.stack([h[np.ix_(n_p + np.arange(k) * n + i, n_p + np.arange(k) * n + i)]
                         for i in range(n)])
        fb = np.full((k, n), 1e-8)
        cov, ok = laplace_inverse_metric(jnp.asarray(h_pp), jnp.asarray(h_ps),
                                         jnp.asarray(h_ss), jnp.asarray(fb))
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(cov), np.linalg.inv(prec), rtol=1e-8,
                                   atol=1e-12 * np.abs(np.linalg.inv(prec)).max())
        # star 2's own block made indefinite: it is decoupled and gets the fallback
        h_ss_bad = h_ss.copy()
        h_ss_bad[2] = -h_ss_bad[2]
        cov2, ok2 = laplace_inverse_metric(jnp.asarray(h_pp), jnp.asarray(h_ps),
                                           jnp.asarray(h_ss_bad), jnp.asarray(fb))
        idx = n_p + np.arange(k) * n + 2
        c2 = np.asarray(cov2)
        np.testing.assert_allclose(c2[np.ix_(idx, idx)], np.diag(fb[:, 2]), rtol=1e-8)
        assert np.all(c2[:n_p, idx] == 0)
        assert bool(ok2) and np.all(np.linalg.eigvalsh(c2) > 0)


def test_checkpoint_resume_gives_identical_draws(tmp_path, monkeypatch):
    """A run interrupted after its first sampling chunk resumes to the same draws."""
    from clusterhbm import sampling

    grid = load_grid()
    data, pop, star = _toy(jnp.float32)
    cfg = ModelConfig(band_idx=GAIA, fit_widths=(False,) * 4)
    ld = make_logdensity_fn(data, grid, cfg)
    pos = {"pop": pop_to_unconstrained(pop, cfg), "star": {"s": star["s"]}}
    inits = jax.tree.map(lambda x: jnp.stack([x, x]), pos)
    kw = {"num_warmup": 20, "num_samples": 20, "chunk_size": 10, "max_num_doublings": 4}
    full = sampling.run_nuts(jax.random.key(3), ld, inits, **kw)
    ck = tmp_path / "run.npz"

    class Interrupt(Exception):
        pass

    real = sampling._progress

    def breaking(enabled, total, initial):
        bar = real(False, total, initial)
        calls = {"n": 0}

        def update(n):
            calls["n"] += 1
            if calls["n"] == 3:  # after 2 warm-up chunks and 1 sampling chunk
                raise Interrupt

        bar.update = update
        return bar

    monkeypatch.setattr(sampling, "_progress", breaking)
    with pytest.raises(Interrupt):
        sampling.run_nuts(jax.random.key(3), ld, inits, checkpoint=ck, **kw)
    monkeypatch.setattr(sampling, "_progress", real)
    assert tuple(np.load(ck)["done"]) == (20, 10)
    resumed = sampling.run_nuts(jax.random.key(3), ld, inits, checkpoint=ck, **kw)
    np.testing.assert_array_equal(resumed.samples["position"]["star"]["s"],
                                  full.samples["position"]["star"]["s"])


@pytest.mark.parametrize("bad", [{"fit_widths": (True, True)}, {"num_chains": 0}])
def test_fit_bad_options(bad):
    from clusterhbm.fit import fit_cluster
    from clusterhbm.simulate import simulate_cluster

    cat = simulate_cluster(n_stars=20, seed=0).catalogue
    with pytest.raises(ValueError):
        fit_cluster(cat, num_warmup=5, num_samples=5, **bad)


def test_shared_bc_slice_gives_the_same_density(monkeypatch):
    """With the [Fe/H] and A_V widths fixed, the BC table is sliced once per evaluation;
    the density and its gradient (binaries and the selection normaliser included) equal
    those of the per-star 4-D interpolation. (The cubic slice is checked against the 4-D
    cubic interpolation in test_forward; a cubic model here costs ~40 s of compilation.)"""
    cubic = False
    import clusterhbm.model as model_mod

    with x64():
        grid = load_grid(dtype=jnp.float64)
        data, pop, star = _toy(jnp.float64)
        cfg = ModelConfig(band_idx=GAIA, fit_widths=(True, False, True, False),
                          binaries=True, selection=True, cubic=cubic)
        priors = Priors(g_lim=16.0)
        pop = dict(pop, f_bin=0.3)
        st = {"s": star["s"], "z_age": star["z_age"], "z_dist": star["z_dist"],
              "q_raw": jnp.asarray([0.3, -1.2])}
        position = {"pop": pop_to_unconstrained(pop, cfg), "star": st}
        assert model_mod.shared_bc(cfg) and not model_mod.shared_isochrone(cfg)

        def value_grad():
            f = jax.jit(jax.value_and_grad(
                lambda p: log_density(p, data, grid, cfg, priors)))
            v, g = f(position)
            return float(v), jax.tree.leaves(g)

        v_slice, g_slice = value_grad()
        monkeypatch.setattr(model_mod, "shared_bc", lambda config: False)
        v_direct, g_direct = value_grad()
        assert np.isfinite(v_slice)
        np.testing.assert_allclose(v_slice, v_direct, rtol=0, atol=1e-9)
        for a, b in zip(g_slice, g_direct):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9)
