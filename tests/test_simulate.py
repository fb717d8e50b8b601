"""The simulator: IMF, fractions, widths, error model, limits, keys, I/O, bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from clusterhbm.imf import imf_cdf, log_imf, sample_imf
from clusterhbm.simulate import (
    ClusterParams,
    ObservingModel,
    read_simulation,
    simulate_cluster,
    write_simulation,
)


@pytest.fixture(scope="module")
def mock():
    return simulate_cluster(ClusterParams(f_bin=0.3, f_field=0.1), n_stars=1500, seed=0)


@pytest.mark.parametrize("kind", ["kroupa", "chabrier", "powerlaw"])
def test_imf_samples_follow_cdf(kind):
    m = np.asarray(sample_imf(jax.random.key(1), 20000, kind=kind, m_min=0.1, m_max=10.0,
                              alpha=2.0))
    assert m.min() >= 0.1 and m.max() <= 10.0
    res = stats.kstest(m, lambda x: np.asarray(imf_cdf(x, kind=kind, m_min=0.1, m_max=10.0,
                                                         alpha=2.0)))
    assert res.pvalue > 1e-3, res


def test_imf_analytic_values():
    # Salpeter-like power law: exact normalisation
    a, lo, hi = 2.35, 0.5, 5.0
    m = np.array([0.7, 1.0, 3.0])
    exact = m ** -a * (1 - a) / (hi ** (1 - a) - lo ** (1 - a))
    np.testing.assert_allclose(np.exp(log_imf(m, kind="powerlaw", m_min=lo, m_max=hi,
                                              alpha=a)), exact, rtol=1e-4)
    # Kroupa: slope 2.3 above 0.5 Msun, 1.3 below, continuous
    lp = np.asarray(log_imf(np.array([0.2, 0.4, 0.499999, 0.500001, 1.0, 2.0]), kind="kroupa"))
    np.testing.assert_allclose(lp[1] - lp[0], -1.3 * np.log(2.0), rtol=1e-4)
    np.testing.assert_allclose(lp[5] - lp[4], -2.3 * np.log(2.0), rtol=1e-4)
    assert abs(lp[3] - lp[2]) < 1e-4
    assert np.isneginf(float(log_imf(0.05, kind="kroupa")))


def test_fractions_match_request(mock):
    t = mock.truth
    n = len(t)
    f_field = np.mean(t["is_field"])
    assert abs(f_field - 0.1) < 3 * np.sqrt(0.1 * 0.9 / n)
    members = ~np.asarray(t["is_field"])
    f_bin = np.mean(np.asarray(t["is_binary"])[members])
    assert abs(f_bin - 0.3) < 3 * np.sqrt(0.3 * 0.7 / members.sum())
    assert not np.any(np.asarray(t["is_binary"])[~members])
    q = np.asarray(t["q"])[np.asarray(t["is_binary"])]
    assert q.min() >= 0.1 and q.max() <= 1.0


def test_binaries_are_brighter_than_their_primary(mock):
    from clusterhbm import predict

    t = mock.truth
    b = np.asarray(t["is_binary"])
    single = predict(mass_msun=np.asarray(t["mass_msun"])[b], log_age=9.6, feh=0.0,
                     distance_pc=850.0, av_mag=0.1)
    dg = np.asarray(t["G_true"])[b] - single["G"]
    assert np.all(dg <= 1e-4)
    assert dg.min() > -0.76  # equal-mass twins: at most 2.5 log10(2)
    assert np.median(dg) < -0.02


def test_zero_widths_give_identical_parameters(mock):
    t = mock.truth[~np.asarray(mock.truth["is_field"])]
    for k, v in (("log_age", 9.6), ("feh", 0.0), ("distance_pc", 850.0), ("av_mag", 0.1)):
        np.testing.assert_allclose(np.asarray(t[k]), v, rtol=1e-6)


def test_nonzero_widths_are_drawn():
    p = ClusterParams(sigma_log_age=0.05, sigma_feh=0.05, sigma_distance_pc=20.0,
                      sigma_av_mag=0.05, av_mag=0.05)
    t = simulate_cluster(p, n_stars=800, seed=3).truth
    assert abs(np.std(t["log_age"]) - 0.05) < 0.01
    assert abs(np.std(t["distance_pc"]) - 20.0) < 3.0
    assert np.all(np.asarray(t["av_mag"]) >= 0)  # truncated at zero


def test_error_model_reproduces_real_errors(mock):
    """The mock's median errors follow the calibrated relation (the relation itself is
    checked against the real Gaia data in tests/test_errors.py)."""
    from clusterhbm.errors import median_mag_error, median_parallax_error_mas

    c = mock.catalogue
    g = np.asarray(c["phot_g_mean_mag"])
    for lo in (12.0, 15.0, 17.0):
        sel = (g > lo) & (g < lo + 1)
        med = np.median(np.asarray(c["phot_bp_mean_mag_error"])[sel])
        ref = float(median_mag_error("BP", lo + 0.5))
        assert abs(med / ref - 1) < 0.2
        medp = np.median(np.asarray(c["parallax_error"])[sel])
        assert abs(medp / float(median_parallax_error_mas(lo + 0.5)) - 1) < 0.2


def test_magnitude_limits_are_exact():
    obs = ObservingModel(g_lim=17.5, g_bright=11.0)
    sim = simulate_cluster(ClusterParams(f_field=0.1), n_stars=400, seed=5, observing=obs)
    g = np.asarray(sim.catalogue["phot_g_mean_mag"])
    assert g.max() <= 17.5 and g.min() >= 11.0
    assert g.max() > 17.3  # the limit is reached, not undershot


def test_parallax_zero_point_offset():
    obs = ObservingModel(parallax_zp_mas=-0.5)
    sim = simulate_cluster(ClusterParams(), n_stars=300, seed=2, observing=obs)
    resid = np.asarray(sim.catalogue["parallax"]) - np.asarray(sim.truth["parallax_true"])
    assert abs(np.mean(resid) + 0.5) < 0.05


def test_unreported_systematic_scatter():
    """mag_systematic_mag widens the scatter about the truth, not the reported errors."""
    sims = [simulate_cluster(ClusterParams(), n_stars=400, seed=3,
                             observing=ObservingModel(mag_systematic_mag=s))
            for s in (0.0, 0.05)]
    for band, col in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
        errs = [np.asarray(s.catalogue[f"phot_{col}_mean_mag_error"]) for s in sims]
        # the reported errors are the catalogue's, not widened (the star sets differ a
        # little: noise moves stars across the G limit)
        assert abs(np.median(errs[1]) / np.median(errs[0]) - 1) < 0.05
        pulls = [(np.asarray(s.catalogue[f"phot_{col}_mean_mag"])
                  - np.asarray(s.truth[f"{band}_true"])) for s in sims]
        z0 = pulls[0] / errs[0]
        z1 = pulls[1] / np.hypot(errs[1], 0.05)
        assert abs(np.std(z0) - 1) < 0.1 and abs(np.std(z1) - 1) < 0.1
        assert np.std(pulls[1] / errs[1]) > 3  # most stars' errors are << 0.05 mag
    with pytest.raises(ValueError, match="mag_systematic_mag"):
        simulate_cluster(ClusterParams(), n_stars=10, seed=0,
                         observing=ObservingModel(mag_systematic_mag=-0.01))


def test_same_key_same_cluster_different_key_different():
    a = simulate_cluster(ClusterParams(f_field=0.1), n_stars=200, seed=11)
    b = simulate_cluster(ClusterParams(f_field=0.1), n_stars=200, rng_key=jax.random.key(11))
    c = simulate_cluster(ClusterParams(f_field=0.1), n_stars=200, seed=12)
    np.testing.assert_array_equal(a.catalogue["phot_g_mean_mag"], b.catalogue["phot_g_mean_mag"])
    assert not np.array_equal(a.catalogue["phot_g_mean_mag"], c.catalogue["phot_g_mean_mag"])


@pytest.mark.parametrize("suffix", [".ecsv", ".h5"])
def test_write_read_roundtrip(mock, tmp_path, suffix):
    path = write_simulation(mock, tmp_path / f"mock{suffix}")
    back = read_simulation(path)
    for k in mock.catalogue.colnames:
        np.testing.assert_array_equal(back.catalogue[k], mock.catalogue[k])
    for k in mock.truth.colnames:
        np.testing.assert_array_equal(back.truth[k], mock.truth[k])
    assert back.params == mock.params
    assert back.catalogue.meta["gaia_release"] == "DR3"


def test_old_cluster_has_all_phases(mock):
    ph = np.asarray(mock.truth["phase"])[~np.asarray(mock.truth["is_field"])]
    assert np.sum(ph == 0) > 500  # main sequence
    assert np.sum(ph == 2) > 5  # subgiants and red giants
    assert np.sum(ph == 3) >= 1  # core-helium burning (red clump)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": ClusterParams(sigma_feh=-0.1)}, r"sigma_feh must be >= 0"),
        ({"params": ClusterParams(f_bin=1.2)}, r"f_bin must be in \[0, 1\]"),
        ({"params": ClusterParams(f_field=-0.1)}, r"f_field must be in \[0, 1\]"),
        ({"params": ClusterParams(log_age=10.5)}, r"outside the grid \[6.0, 10.3"),
        ({"params": ClusterParams(feh=-3.0)}, r"outside the grid \[-2.0, 0.5\]"),
        ({"imf": "salpeter"}, r"unknown IMF 'salpeter'; choose one of"),
        ({"m_min": 2.0, "m_max": 1.0}, r"0 < m_min < m_max"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_cluster(n_stars=10, seed=0, **kwargs)
