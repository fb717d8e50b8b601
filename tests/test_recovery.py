"""Recovery of a simulated cluster's known truth (the CI-sized version of the study in
scripts/recovery_study.py) and the shrinkage the hierarchy buys."""

from __future__ import annotations

import numpy as np
import pytest

from clusterhbm.fit import fit_cluster
from clusterhbm.results import load_results
from clusterhbm.simulate import ClusterParams, simulate_cluster

TRUTH = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}


@pytest.fixture(scope="module")
def mock():
    # the mock uses the fit's interpolation scheme (simulate_cluster's ``cubic``)
    return simulate_cluster(ClusterParams(**TRUTH), n_stars=100, seed=1, cubic=True)


@pytest.fixture(scope="module")
def fit(mock):
    # cubic: the linear scheme's kinks at grid nodes cap NUTS's step size
    # (docs/performance.md); 2 x (500 + 400) draws gave R-hat ~1.00 and ESS 300-800, so
    # 2 x (300 + 250) kept ESS > 100 with room, but on the 2026-12-07 CPU its log age
    # R-hat was 1.059 (the same before and after that day's changes: the chains' floating
    # point differs by machine); 2 x (400 + 300) passes (CI time +30 s)
    return fit_cluster(mock.catalogue, num_chains=2, num_warmup=400, num_samples=300,
                       seed=0, fit_widths=False, truth=TRUTH, cubic=True)


def test_recovers_population_means_within_3_sd(fit):
    s = fit.summary()
    for k, v in TRUTH.items():
        z = (s[k]["mean"] - v) / s[k]["sd"]
        assert abs(z) < 3, (k, s[k]["mean"], s[k]["sd"], z)
        assert s[k]["rhat"] < 1.05, (k, s[k]["rhat"])  # issue 4's bound at CI length
        # the metric shrunk towards the curvature (sampling.regularised_metric), not
        # towards 1e-3 I: bulk ESS 44-104 of 800 draws before, 301-818 after
        assert s[k]["ess_bulk"] > 100, (k, s[k]["ess_bulk"])
    assert fit.num_divergent <= 0.01 * fit.num_chains * fit.num_draws


def test_results_roundtrip_and_json(fit, tmp_path):
    path = fit.to_hdf5(tmp_path / "fit.h5")
    back = load_results(path)
    for k in fit.population:
        np.testing.assert_array_equal(back.population[k], fit.population[k])
    for k in fit.stars:
        np.testing.assert_array_equal(back.stars[k], fit.stars[k])
    js = back.summary_json()
    assert set(js["parameters"]) >= set(TRUTH)
    for v in js["parameters"].values():
        assert set(v) >= {"mean", "sd", "q05", "q50", "q95", "rhat", "ess_bulk", "ess_tail"}
    assert js["n_stars"] == 100 and js["chains"] == 2 and js["draws"] == 300
    assert back.meta["grid_sha256"] == fit.meta["grid_sha256"]


def test_per_star_masses_track_truth(fit, mock):
    m = np.median(fit.stars["mass_msun"].reshape(-1, 100), axis=0)
    true = np.asarray(mock.truth["mass_msun"])
    assert np.median(np.abs(m / true - 1)) < 0.02


def test_corrupt_results_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="corrupt|not a clusterhbm"):
        load_results(bad)


def test_multistart_escapes_a_local_mode():
    """Coverage mock 2009: Adam from the isochrone scan's guess stops at log age ~9.49, ~100
    below the best log density; the best of the age-neighbour starts is at the truth."""
    import jax

    from clusterhbm.fit import (
        best_of_starts,
        initial_guess,
        make_logdensity_fn,
        prepare_data,
        start_candidates,
    )
    from clusterhbm.grid import band_indices, load_grid
    from clusterhbm.model import ModelConfig, Priors

    grid = load_grid()
    cat = simulate_cluster(ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0, av_mag=0.1),
                           n_stars=100, seed=2009, grid=grid).catalogue
    fd = prepare_data(cat)
    bi = band_indices(fd.bands)
    config = ModelConfig(band_idx=bi, fit_widths=(False,) * 4)
    ld = make_logdensity_fn(fd.data, grid, config, Priors())
    guess, eep0 = initial_guess(fd.data, grid, bi)
    cands = start_candidates(fd.data, grid, bi, guess, eep0, n_starts=5)
    ages = [c[0]["log_age"] for c in cands]
    assert len(cands) == 5 and len(set(np.round(ages, 3))) == 5
    assert start_candidates(fd.data, grid, bi, guess, eep0, init={"log_age": 9.6}) \
        [0][0] is not None  # a user-fixed age: one start
    assert len(start_candidates(fd.data, grid, bi, guess, eep0, init={"log_age": 9.6})) == 1
    pos, k, loss = best_of_starts(ld, cands, config, grid, jax.random.key(0), num_steps=300)
    assert loss[k] == np.min(loss)
    assert abs(float(pos["pop"]["log_age"]) - 9.6) < 0.03
    assert loss[0] - loss[k] > 20.0  # the scan's own start was a worse mode
