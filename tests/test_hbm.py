"""Inference routes of HBM practice (clusterhbm.hbm, .routes, .schechter) against exact
answers: a conjugate Gaussian hierarchy solved on a grid, the Schechter normalisation by
quadrature, and the cluster model's own density for the re-weighting and Gibbs
parametrisations."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from scipy import integrate, special

from clusterhbm import hbm, routes
from clusterhbm import schechter as sch
from clusterhbm.diagnostics import ess_bulk
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.model import (
    ModelConfig,
    Priors,
    StarData,
    log_density,
    log_density_star,
    pop_to_unconstrained,
    population_values,
    star_observables,
    star_values,
)
from clusterhbm.sampling import run_nuts

# Sampler lengths are multiples of ``chunk_size`` so that each run compiles one warm-up and
# one sampling chunk (a shorter last chunk would compile a third time).

# --------------------------------------------------------------------------------------
# a conjugate Gaussian hierarchy: theta_i ~ N(mu, tau^2), y_i ~ N(theta_i, s_i^2),
# mu ~ N(0, 5^2), tau ~ HalfNormal(2); phi = (mu, log tau)

N_IND, MU_TRUE, TAU_TRUE = 30, 1.0, 1.0
CHAINS = 4


@pytest.fixture(scope="module")
def gauss():
    rng = np.random.default_rng(1)
    s = rng.uniform(0.3, 0.9, N_IND)
    y = rng.normal(rng.normal(MU_TRUE, TAU_TRUE, N_IND), s)
    # exact posterior on a fine (mu, tau) grid
    mu_g = np.linspace(-2.0, 4.0, 601)
    tau_g = np.linspace(1e-3, 4.0, 800)
    m, t = np.meshgrid(mu_g, tau_g, indexing="ij")
    v = s ** 2 + t[..., None] ** 2
    lp = (-0.5 * (m / 5) ** 2 - 0.5 * (t / 2) ** 2
          + np.sum(-0.5 * (y - m[..., None]) ** 2 / v - 0.5 * np.log(v), axis=-1))
    p = np.exp(lp - lp.max())
    p /= p.sum()
    exact = {}
    for name, x in (("mu", m), ("tau", t)):
        mean = np.sum(p * x)
        exact[name] = (mean, np.sqrt(np.sum(p * x ** 2) - mean ** 2))
    # E[theta_i | y] = E over (mu, tau) of the precision-weighted mean
    w_y, w_m = 1 / s ** 2, 1 / t[..., None] ** 2
    cond = (y * w_y + m[..., None] * w_m) / (w_y + w_m)
    exact["theta"] = np.sum(p[..., None] * cond, axis=(0, 1))
    return {"y": y, "s": s, "exact": exact}


def _log_prior(phi):
    tau = jnp.exp(phi["log_tau"])
    return norm.logpdf(phi["mu"], 0.0, 5.0) - 0.5 * (tau / 2) ** 2 + phi["log_tau"]


def _log_pop(theta, phi):
    return norm.logpdf(theta, phi["mu"], jnp.exp(phi["log_tau"]))


def _physical(phi):
    return {"mu": phi["mu"], "tau": jnp.exp(phi["log_tau"])}


def _init_phi():
    return {"mu": jnp.linspace(-0.5, 0.5, CHAINS), "log_tau": jnp.linspace(-0.5, 0.3, CHAINS)}


def _interim_samples(gauss, k, seed):
    """Exact per-individual posterior draws under the interim prior N(0, 10^2)."""
    s, y = gauss["s"], gauss["y"]
    var = 1 / (1 / s ** 2 + 1 / 100)
    mean = var * y / s ** 2
    rng = np.random.default_rng(seed)
    theta = mean[:, None] + np.sqrt(var)[:, None] * rng.normal(size=(s.size, k))
    return jnp.asarray(theta, jnp.float32), norm.logpdf(theta, 0.0, 10.0)


def _assert_matches_exact(samples, exact, *, k_sigma=4.0, extra_sd_frac=0.0):
    """|mean - exact mean| < k * MCSE (sd / sqrt(ESS)) (+ an allowance in exact sds);
    the posterior sd within 15 % of the exact one."""
    for name in ("mu", "tau"):
        x = np.asarray(samples[name])
        mean_ex, sd_ex = exact[name]
        mcse = sd_ex / np.sqrt(float(ess_bulk(x)))
        tol = k_sigma * mcse + extra_sd_frac * sd_ex
        assert abs(x.mean() - mean_ex) < tol, (name, x.mean(), mean_ex, mcse)
        assert abs(x.std() / sd_ex - 1) < 0.15, (name, x.std(), sd_ex)


def test_reweighted_likelihood_equals_exact_marginal(gauss):
    """With many samples the Monte Carlo population likelihood is the exact marginal
    sum_i log N(y_i | mu, s_i^2 + tau^2) up to a phi-independent constant."""
    theta, lp0 = _interim_samples(gauss, 20000, seed=3)
    phis = [{"mu": 0.5, "log_tau": np.log(1.2)}, {"mu": 1.2, "log_tau": np.log(0.6)},
            {"mu": 0.9, "log_tau": np.log(0.9)}]
    mc = np.array([float(hbm.reweighted_log_likelihood(
        jax.tree.map(jnp.float32, p), theta, lp0, _log_pop)) for p in phis])
    s, y = gauss["s"], gauss["y"]
    exact = np.array([np.sum(norm.logpdf(y, p["mu"], np.sqrt(s ** 2 + np.exp(p["log_tau"]) ** 2)))
                      for p in phis])
    np.testing.assert_allclose(mc - mc[0], exact - exact[0], atol=0.05)


def test_effective_sample_size_limits():
    lw = jnp.array([[0.0] * 8, [0.0] + [-jnp.inf] * 7, [-jnp.inf] * 8,
                    [np.log(3.0), 0.0, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf,
                     -jnp.inf]])
    np.testing.assert_allclose(hbm.effective_sample_size(lw), [8.0, 1.0, 0.0, 16 / 10],
                               rtol=1e-5)


def test_reweighting_recovers_exact_posterior(gauss):
    theta, lp0 = _interim_samples(gauss, 200, seed=4)
    res = hbm.reweighted_population_nuts(
        jax.random.key(0), theta, lp0, _log_pop, _log_prior, _init_phi(),
        num_warmup=200, num_samples=400, chunk_size=200, transform_fn=_physical,
        num_reweight_draws=200)
    # the importance-sampling estimate adds a small error of its own: allow 0.1 sd
    _assert_matches_exact(res.samples, gauss["exact"], extra_sd_frac=0.1)
    assert res.n_eff.shape == (res.draw_index.size, N_IND)
    # well-measured individuals: many effective samples for the typical individual and
    # draw (a few individuals drop below 10 at the small-tau tail draws)
    assert np.median(res.n_eff_median) > 50
    assert np.median(res.n_eff_min) > 10
    # shrunk per-individual posteriors: E[theta_i | y] from the exact grid
    shrunk_mean = res.shrunk.mean(axis=0)
    err = shrunk_mean - gauss["exact"]["theta"]
    assert np.sqrt(np.mean(err ** 2)) < 0.05, err
    # shrinkage is real: the shrunk means are much closer to the exact ones than y is
    assert np.sqrt(np.mean(err ** 2)) < 0.3 * np.sqrt(
        np.mean((gauss["y"] - gauss["exact"]["theta"]) ** 2))


def test_joint_nuts_recovers_exact_posterior(gauss):
    y, s = jnp.asarray(gauss["y"], jnp.float32), jnp.asarray(gauss["s"], jnp.float32)

    def logdensity(p):
        tau = jnp.exp(p["log_tau"])
        theta = p["mu"] + tau * p["z"]
        return _log_prior(p) + jnp.sum(norm.logpdf(p["z"])) + jnp.sum(norm.logpdf(y, theta, s))

    out = run_nuts(jax.random.key(1), logdensity, {**_init_phi(), "z": jnp.zeros((CHAINS, N_IND))},
                   num_warmup=200, num_samples=400, chunk_size=200, transform_fn=_physical)
    _assert_matches_exact(out.samples, gauss["exact"])


def test_gibbs_recovers_exact_posterior(gauss):
    y, s = jnp.asarray(gauss["y"], jnp.float32), jnp.asarray(gauss["s"], jnp.float32)

    def log_individual(theta, phi, d):
        return _log_pop(theta, phi) + norm.logpdf(d[0], theta, d[1])

    out = hbm.run_gibbs(
        jax.random.key(2), log_individual, _log_prior, (y, s),
        jnp.tile(y, (CHAINS, 1)), _init_phi(), num_warmup=300, num_samples=2000,
        chunk_size=1150,
        population_log_density=lambda th, phi, d: _log_pop(th, phi),
        transform_fn=_physical, transform_individual=lambda th, phi: {"theta": th})
    _assert_matches_exact(out.samples, gauss["exact"])
    theta_mean = out.individual_samples["theta"].mean(axis=(0, 1))
    assert np.sqrt(np.mean((theta_mean - gauss["exact"]["theta"]) ** 2)) < 0.03
    # adaptation reached sensible acceptance rates for both blocks (HMC target 0.8)
    assert 0.6 < out.info["acceptance_population"].mean() < 0.98
    assert 0.6 < out.info["acceptance_individual"].mean() < 0.98
    assert out.samples["mu"].shape == (CHAINS, 2000)
    assert out.individual_samples["theta"].shape == (CHAINS, 2000, N_IND)


def test_neff_warning_fires_for_narrow_population(gauss, caplog):
    """tau = 0.01 against individual posteriors of sd ~0.6: a few effective samples."""
    theta, lp0 = _interim_samples(gauss, 400, seed=5)
    narrow = {"mu": jnp.full((3,), 1.0), "log_tau": jnp.log(jnp.full((3,), 0.01))}
    broad = {"mu": jnp.full((3,), 1.0), "log_tau": jnp.zeros(3)}
    ne_narrow, _ = hbm.reweight_individuals(jax.random.key(0), narrow, theta, lp0, _log_pop)
    ne_broad, _ = hbm.reweight_individuals(jax.random.key(0), broad, theta, lp0, _log_pop)
    assert np.median(ne_narrow) < 10 < np.median(ne_broad)
    with caplog.at_level(logging.WARNING, logger="clusterhbm.hbm"):
        hbm.check_neff(ne_broad, threshold=10)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="clusterhbm.hbm"):
        out = hbm.check_neff(ne_narrow, threshold=10)
    assert out["n_below"] > N_IND // 2
    assert any("re-weighting is unreliable" in r.message for r in caplog.records)


def test_bad_inputs_are_clear_errors():
    theta = jnp.zeros((3, 5))
    with pytest.raises(ValueError, match=r"log_p0: expected shape \(N individuals, K"):
        hbm.reweighted_population_nuts(jax.random.key(0), theta, jnp.zeros(5), _log_pop,
                                       _log_prior, _init_phi())
    with pytest.raises(ValueError, match="every leaf must start with"):
        hbm.reweighted_population_nuts(jax.random.key(0), theta, jnp.zeros((3, 4)),
                                       _log_pop, _log_prior, _init_phi())
    with pytest.raises(ValueError, match="unknown kernel 'slice'.*expected one of"):
        hbm.run_gibbs(jax.random.key(0), lambda t, p, d: 0.0, _log_prior, None,
                      jnp.zeros((CHAINS, 3)), _init_phi(), individual_kernel="slice")


# --------------------------------------------------------------------------------------
# Schechter mass function

SCHECHTER_CASES = [(-1.4, 10.8, 9.0), (-0.5, 10.5, 8.0), (-2.2, 11.0, 7.0),
                   (0.3, 10.0, 10.5), (-1.0, 10.7, 9.5)]


@pytest.mark.parametrize("alpha,log_mstar,log_mass_min", SCHECHTER_CASES)
def test_schechter_density_is_normalised(alpha, log_mstar, log_mass_min):
    def dens(m):
        return np.exp(float(sch.schechter_log_density(m, alpha, log_mstar, log_mass_min)))

    total, _ = integrate.quad(dens, log_mass_min, log_mstar + 4, limit=200)
    assert abs(total - 1) < 1e-4, total
    assert float(sch.schechter_log_density(log_mass_min - 0.01, alpha, log_mstar,
                                           log_mass_min)) == -np.inf
    if alpha > -1:  # closed form: Z = Gamma(alpha + 1, x_c) / ln 10
        z = special.gammaincc(alpha + 1, 10 ** (log_mass_min - log_mstar)) \
            * special.gamma(alpha + 1) / np.log(10)
        assert abs(float(sch.log_schechter_norm(alpha, log_mstar, log_mass_min))
                   - np.log(z)) < 1e-5
    g = jax.grad(lambda p: sch.schechter_log_density(10.0, p[0], p[1], p[2]))(
        jnp.array([alpha, log_mstar, min(log_mass_min, 9.9)]))
    assert np.all(np.isfinite(np.asarray(g)))


def test_schechter_parameters_recovered_from_mock():
    truth = sch.MassFunctionParams(alpha=-1.3, log_mstar0=10.8, log_mstar1=-0.3)
    s = sch.simulate_galaxies(truth, n_galaxies=250, seed=2, log_mass_min=9.0)
    assert s.log_mass_true.min() >= 9.0
    eta0 = jnp.log(jnp.expm1(jnp.clip(jnp.asarray(s.log_mass_obs) - 9.0, 0.05, None)))
    init = {"alpha": jnp.array([-1.0, -1.6]), "log_mstar0": jnp.array([10.5, 11.0]),
            "log_mstar1": jnp.zeros(2), "eta": jnp.tile(eta0, (2, 1))}
    out = run_nuts(jax.random.key(3), lambda p: sch.joint_log_density(p, s), init,
                   num_warmup=200, num_samples=100, chunk_size=100,
                   transform_fn=lambda p: {k: p[k] for k in truth._fields})
    for k in truth._fields:
        x = out.samples[k]
        z = (x.mean() - getattr(truth, k)) / x.std()
        assert abs(z) < 3, (k, x.mean(), x.std())
        assert x.std() < 0.4, (k, x.std())   # the data constrain it (prior sd >= 1)


# --------------------------------------------------------------------------------------
# cluster routes: the re-weighting and Gibbs densities against the model's own

GAIA = band_indices(("G", "BP", "RP"))
_POP = {"log_age": 9.613, "feh": 0.05, "distance_pc": 860.0, "av_mag": 0.12,
        "sigma_log_age": 0.02, "sigma_feh": 0.03, "sigma_distance_pc": 9.0,
        "sigma_av_mag": 0.04}


@pytest.fixture(scope="module")
def toy_cluster():
    """Three stars with widths fitted; their data are the model's own prediction plus
    ~1 sigma offsets (so that float32 round-off in the physical values does not meet a
    large chi^2 gradient)."""
    grid = load_grid()
    config = ModelConfig(band_idx=GAIA, pooled=True, fit_widths=(True,) * 4)
    priors = Priors(unpooled_distance_pc=850.0, unpooled_sigma_distance_pc=425.0)
    star = {"s": jnp.asarray([2.02, 1.7, 2.2]), "z_age": jnp.asarray([0.3, -0.5, 0.1]),
            "z_feh": jnp.asarray([-0.2, 0.1, 0.4]), "z_dist": jnp.asarray([0.7, -1.1, 0.2]),
            "z_av": jnp.asarray([0.4, -0.3, 1.0])}
    start = {"pop": pop_to_unconstrained(_POP, config), "star": star}
    popv = population_values(start["pop"], config, priors)

    def predict(st):
        eep, age, feh, dist, av, _ = star_values(st, popv, config, grid)
        return star_observables(grid, config, eep, age, feh, dist, av)

    obs = jax.jit(jax.vmap(predict))(star)
    offset = jnp.asarray([0.004, -0.003, 0.005])
    data = StarData(mag=obs.mags + offset, mag_err=jnp.full((3, 3), 0.005),
                    parallax_mas=obs.parallax_mas + 0.02,
                    parallax_err_mas=jnp.full(3, 0.04))
    return routes.ClusterProblem(data=data, grid=grid, config=config, priors=priors,
                                 guess=dict(_POP), start=start, eep0=np.zeros(3), truth=None)


def _per_star(fn, star, pop, data):
    return jax.vmap(fn, in_axes=(0, None, 0))(star, pop, data)


def _dav_dz(star, popv, config, grid):
    """d A_V / d z_av of each star from the model's own quantile map (autodiff)."""
    def av_of(z, st):
        return star_values({**st, "z_av": z}, popv, config, grid)[4]

    return jax.vmap(lambda z, st: jax.grad(av_of)(z, st))(star["z_av"], star)


def test_gibbs_noncentred_conditionals_sum_to_model_density(toy_cluster):
    p = toy_cluster
    log_ind, log_prior, pop_ld, _, star0, pop0 = routes.gibbs_parts(p, "noncentred")
    assert pop_ld is None

    @jax.jit
    def both():
        total = log_prior(pop0) + jnp.sum(_per_star(log_ind, star0, pop0, tuple(p.data)))
        return total, log_density(p.start, p.data, p.grid, p.config, p.priors)

    total, ref = both()
    assert np.isfinite(float(ref))
    np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)


def test_centred_parametrisation_is_the_model_under_a_change_of_variables(toy_cluster):
    """log p_centred(s, a, f, d, raw) = log p_model(s, z) + log |dz / d(a, f, d, raw)|
    (and the normalising constants the model leaves out)."""
    p = toy_cluster
    log_ind, log_prior, pop_ld, _, star_c, pop0 = routes.gibbs_parts(p, "centred")
    data = tuple(p.data)
    # a second population point: the population update's density may drop only
    # phi-independent terms
    pop2 = dict(pop0, log_age=pop0["log_age"] + 0.01, ln_sigma_feh=pop0["ln_sigma_feh"] + 0.1)

    def full(pop):
        return jnp.sum(_per_star(log_ind, star_c, pop, data))

    def part(pop):
        return jnp.sum(_per_star(pop_ld, star_c, pop, data))

    @jax.jit
    def compute():
        total = log_prior(pop0) + full(pop0)
        ref = log_density(p.start, p.data, p.grid, p.config, p.priors)
        popv = population_values(p.start["pop"], p.config, p.priors)
        dav_dz = _dav_dz(p.start["star"], popv, p.config, p.grid)
        dav_draw = jax.nn.sigmoid(star_c["av_raw"] / 0.1)
        jac = jnp.sum(-2 * jnp.log(2 * jnp.pi) - jnp.log(popv["sigma_log_age"])
                      - jnp.log(popv["sigma_feh"]) - jnp.log(popv["sigma_distance_pc"])
                      - jnp.log(dav_dz) + jnp.log(dav_draw))
        return total, ref + jac, full(pop2) - full(pop0), part(pop2) - part(pop0)

    total, expected, d_full, d_part = (float(x) for x in compute())
    np.testing.assert_allclose(total, expected, rtol=2e-5)
    np.testing.assert_allclose(d_full, d_part, rtol=1e-3)


def test_reweighting_ratio_is_the_model_ratio(toy_cluster):
    """p(theta|phi) / p0(theta) from the routes' physical densities equals the ratio of
    the pooled and unpooled model densities at the same physical star (with their
    Jacobians): the IMF factor really cancels."""
    p = toy_cluster
    pr = p.priors
    un = p.config._replace(pooled=False)
    data = tuple(p.data)

    def ld(star, pv, cfg):
        return jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
            star, pv, data, p.grid, cfg, pr)

    def log_jac(pv, star, cfg):  # log p(physical) - log_density_star
        return (-2 * jnp.log(2 * jnp.pi) - jnp.log(pv["sigma_log_age"])
                - jnp.log(pv["sigma_feh"]) - jnp.log(pv["sigma_distance_pc"])
                - jnp.log(_dav_dz(star, pv, cfg, p.grid)))

    @jax.jit
    def compute():
        popv = population_values(p.start["pop"], p.config, pr)
        _, age, feh, dist, av, ok = jax.vmap(
            lambda st: star_values(st, popv, p.config, p.grid))(p.start["star"])
        popu = population_values({}, un, pr)
        star_u = {"s": p.start["star"]["s"],
                  "z_age": (age - pr.unpooled_log_age) / pr.unpooled_sigma_log_age,
                  "z_feh": (feh - pr.unpooled_feh) / pr.unpooled_sigma_feh,
                  "z_dist": (dist - pr.unpooled_distance_pc) / pr.unpooled_sigma_distance_pc,
                  "z_av": routes._z_from_truncnorm(av, pr.unpooled_av_mag,
                                                   pr.unpooled_sigma_av_mag)}
        _, age_u, _, _, av_u, _ = jax.vmap(
            lambda st: star_values(st, popu, un, p.grid))(star_u)
        model_ratio = (ld(p.start["star"], popv, p.config)
                       + log_jac(popv, p.start["star"], p.config)
                       - ld(star_u, popu, un) - log_jac(popu, star_u, un))
        theta = {"log_age": age, "feh": feh, "distance_pc": dist, "av_mag": av}
        route_ratio = (jax.vmap(routes.population_log_density, in_axes=(0, None))(theta, popv)
                       - routes.interim_log_prior(theta, pr))
        return ok, (age, age_u), (av, av_u), route_ratio, model_ratio

    ok, ages, avs, route_ratio, model_ratio = compute()
    assert bool(np.all(ok))
    # the unpooled star really sits at the same physical values
    np.testing.assert_allclose(*ages, atol=1e-5)
    np.testing.assert_allclose(*avs, atol=1e-4)
    np.testing.assert_allclose(np.asarray(route_ratio), np.asarray(model_ratio), atol=1e-3)


def test_neff_collapses_as_the_population_narrows(toy_cluster):
    """A delta-function population cannot be reached by re-weighting."""
    rng = np.random.default_rng(0)
    k = 2000
    theta = {"log_age": rng.normal(9.6, 0.3, (3, k)), "feh": rng.normal(0.0, 0.2, (3, k)),
             "distance_pc": rng.normal(860, 30, (3, k)),
             "av_mag": np.abs(rng.normal(0.1, 0.1, (3, k)))}
    lp0 = np.asarray(routes.interim_log_prior(theta, toy_cluster.priors))
    un = routes.UnpooledSamples(theta=theta, log_p0=lp0, priors=toy_cluster.priors, stars={},
                                timings={}, rhat_max=1.0)
    out = routes.neff_versus_width(un, _POP, [3.0, 1.0, 0.1, 0.01])
    assert np.all(np.diff(out["median"]) < 0)
    assert out["median"][0] > 50
    assert np.max(out["n_eff"][-1]) < 3   # 1 % of the widths: every star has < 3 samples


# --------------------------------------------------------------------------------------
# slow: Gibbs against joint NUTS on a small cluster mock


@pytest.mark.slow
def test_cluster_gibbs_agrees_with_joint_nuts():
    from clusterhbm.simulate import ClusterParams, simulate_cluster

    grid = load_grid()
    sim = simulate_cluster(ClusterParams(log_age=9.6), n_stars=30, seed=3, grid=grid)
    prob = routes.prepare_problem(sim.catalogue, fit_widths=False, grid=grid)
    joint = routes.fit_joint(prob, jax.random.key(0), num_chains=2, num_warmup=300,
                             num_samples=300)
    gibbs = routes.fit_gibbs(prob, jax.random.key(1), num_chains=2, num_warmup=300,
                             num_samples=1000, store_stars=False)
    for k in ("log_age", "feh", "distance_pc", "av_mag"):
        a, b = joint.population[k], gibbs.population[k]
        d = (a.mean() - b.mean()) / np.hypot(a.std(), b.std())
        assert abs(d) < 2.0, (k, a.mean(), b.mean(), a.std(), b.std())
        assert 0.5 < b.std() / a.std() < 2.0, (k, a.std(), b.std())
