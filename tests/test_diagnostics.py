"""Tests for clusterhbm.diagnostics: agreement with ArviZ, known answers, validation."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from clusterhbm import diagnostics as diag

RTOL = 1e-6


def _ar1(rng, n_chains, n_draws, rho, n_params=1, loc=0.0):
    """Stationary AR(1) chains with unit innovations, shape (n_chains, n_draws, n_params)."""
    x = np.empty((n_chains, n_draws, n_params))
    x[:, 0] = rng.normal(size=(n_chains, n_params)) / np.sqrt(1.0 - rho**2)
    eps = rng.normal(size=(n_chains, n_draws, n_params))
    for t in range(1, n_draws):
        x[:, t] = rho * x[:, t - 1] + eps[:, t]
    return x + loc


def _cases():
    """Named arrays of shape (n_chains, n_draws, n_params) for the ArviZ comparison."""
    rng = np.random.default_rng(20240601)
    stuck = rng.normal(size=(4, 500, 2))
    stuck[2] += 3.0  # one chain stuck at a different mean
    wide = rng.normal(size=(4, 300, 1))
    wide[1] *= 4.0  # one chain with a different scale: caught by the folded R-hat
    return {
        "iid_4x1000": rng.normal(size=(4, 1000, 3)),
        "iid_odd_3x101": rng.normal(size=(3, 101, 2)),
        "ar1_0.9": _ar1(rng, 4, 1000, 0.9, 2),
        "ar1_0.99": _ar1(rng, 2, 800, 0.99, 1),
        "antithetic_ar1": _ar1(rng, 4, 400, -0.6, 1),
        "random_walk": np.cumsum(rng.normal(size=(4, 300, 1)), axis=1),
        "stuck_chain": stuck,
        "scale_chain": wide,
        "cauchy": rng.standard_cauchy(size=(4, 200, 2)),
        "ties": rng.integers(0, 3, size=(2, 60, 2)).astype(float),
        "tiny_4_draws": rng.normal(size=(2, 4, 2)),
        "tiny_9_draws": rng.normal(size=(3, 9, 1)),
        "one_chain": _ar1(rng, 1, 500, 0.5, 2),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def az():
    arviz = pytest.importorskip("arviz")
    logging.getLogger("arviz").setLevel(logging.ERROR)
    return arviz


def _arviz_per_param(az, fn, x, **kwargs):
    """Apply an ArviZ diagnostic to each parameter of x (chain, draw, param)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([float(fn(x[:, :, k], **kwargs)) for k in range(x.shape[2])])


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_rhat_matches_arviz(az, name):
    x = CASES[name]
    if x.shape[0] < 2:
        pytest.skip("arviz.rhat returns NaN for a single chain")
    expected = _arviz_per_param(az, az.rhat, x, method="rank")
    np.testing.assert_allclose(diag.split_rhat(x), expected, rtol=RTOL)


@pytest.mark.parametrize("method", ["bulk", "tail"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ess_matches_arviz(az, name, method):
    x = CASES[name]
    fn = diag.ess_bulk if method == "bulk" else diag.ess_tail
    expected = _arviz_per_param(az, az.ess, x, method=method)
    np.testing.assert_allclose(fn(x), expected, rtol=RTOL)


def test_matches_arviz_dataset_with_event_dims(az):
    x = np.random.default_rng(3).normal(size=(4, 200, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset(x)
        rhat = az.rhat(ds, method="rank")["x"].values
        bulk = az.ess(ds, method="bulk")["x"].values
        tail = az.ess(ds, method="tail")["x"].values
    assert diag.split_rhat(x).shape == (2, 3)
    np.testing.assert_allclose(diag.split_rhat(x), rhat, rtol=RTOL)
    np.testing.assert_allclose(diag.ess_bulk(x), bulk, rtol=RTOL)
    np.testing.assert_allclose(diag.ess_tail(x), tail, rtol=RTOL)


def test_ebfmi_matches_arviz(az):
    rng = np.random.default_rng(4)
    energy = np.concatenate(
        [rng.normal(size=(2, 500)), np.cumsum(rng.normal(size=(2, 500)), axis=1)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = az.bfmi(energy)
    result = diag.ebfmi(energy)
    assert result.shape == (4,)
    np.testing.assert_allclose(result, expected, rtol=RTOL)
    assert np.all(result[:2] > 1.5) and np.all(result[2:] < 0.3)


def test_accepts_lists_and_returns_float_for_scalar_event():
    x = np.random.default_rng(5).normal(size=(2, 50)).tolist()
    for fn in (diag.split_rhat, diag.ess_bulk, diag.ess_tail):
        assert isinstance(fn(x), float)


def test_stuck_chain_has_large_rhat():
    rhat = diag.split_rhat(CASES["stuck_chain"])
    assert np.all(rhat > 1.1)
    assert diag.split_rhat(CASES["scale_chain"]) > 1.05  # tail (folded) R-hat catches it


def test_iid_rhat_near_one_and_single_chain_split():
    rng = np.random.default_rng(6)
    assert abs(diag.split_rhat(rng.normal(size=(4, 1000))) - 1.0) < 0.01
    one = rng.normal(size=(1, 1000))
    assert abs(diag.split_rhat(one) - 1.0) < 0.01
    one[0, 500:] += 2.0  # the two halves disagree
    assert diag.split_rhat(one) > 1.1


def test_iid_ess_close_to_n():
    x = np.random.default_rng(7).normal(size=(4, 1000, 5))
    n = 4 * 1000
    for fn in (diag.ess_bulk, diag.ess_tail):
        np.testing.assert_allclose(fn(x), n, rtol=0.15)


def test_ar1_ess_matches_theory():
    rho = 0.9
    x = _ar1(np.random.default_rng(8), 4, 5000, rho, 3)
    expected = x.shape[0] * x.shape[1] * (1 - rho) / (1 + rho)
    np.testing.assert_allclose(diag.ess_bulk(x), expected, rtol=0.25)


def test_nan_and_constant_parameters():
    x = np.random.default_rng(9).normal(size=(2, 40, 3))
    x[0, 5, 0] = np.nan
    x[:, :, 1] = 2.5
    for fn in (diag.split_rhat, diag.ess_bulk, diag.ess_tail):
        values = fn(x)
        assert np.isnan(values[0]) and np.isfinite(values[2])
    assert np.isnan(diag.split_rhat(x)[1])
    assert diag.ess_bulk(x)[1] == 80


@pytest.mark.parametrize("fn", [diag.split_rhat, diag.ess_bulk, diag.ess_tail])
def test_bad_input_raises(fn):
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(100,\)"):
        fn(np.zeros(100))
    with pytest.raises(ValueError, match="at least 4 draws per chain, got 3"):
        fn(np.zeros((2, 3)))


def test_ebfmi_bad_input_raises():
    with pytest.raises(ValueError, match=r"shape \(n_chains, n_draws\), got shape \(10,\)"):
        diag.ebfmi(np.zeros(10))
    with pytest.raises(ValueError, match="at least 4 draws per chain, got 2"):
        diag.ebfmi(np.zeros((3, 2)))


def test_ess_tail_bad_probs_raises():
    with pytest.raises(ValueError, match="two probabilities in"):
        diag.ess_tail(np.zeros((2, 10)), probs=(0.05, 1.5))


# ----------------------------------------------------------------------------- summary


def _samples():
    rng = np.random.default_rng(10)
    return {
        "log_age": 9.0 + 0.1 * rng.normal(size=(4, 500)),
        "mass_msun": rng.gamma(2.0, size=(4, 500, 3)),
        "cov": rng.normal(size=(4, 500, 2, 2)),
    }


def test_summarize_keys_and_values():
    samples = _samples()
    summary = diag.summarize(samples)
    expected_names = ["log_age", "mass_msun[0]", "mass_msun[1]", "mass_msun[2]"]
    expected_names += ["cov[0,0]", "cov[0,1]", "cov[1,0]", "cov[1,1]"]
    assert list(summary) == expected_names
    keys = ["mean", "sd", "q05", "q50", "q95", "rhat", "ess_bulk", "ess_tail"]
    for row in summary.values():
        assert list(row) == keys
        assert all(isinstance(v, float) for v in row.values())

    flat = samples["log_age"].reshape(-1)
    row = summary["log_age"]
    assert row["mean"] == pytest.approx(flat.mean(), rel=1e-12)
    assert row["sd"] == pytest.approx(flat.std(ddof=1), rel=1e-12)
    for key, q in zip(("q05", "q50", "q95"), np.quantile(flat, [0.05, 0.5, 0.95])):
        assert row[key] == pytest.approx(q, rel=1e-12)
    assert row["rhat"] == pytest.approx(diag.split_rhat(samples["log_age"]), rel=1e-12)

    mass = samples["mass_msun"][:, :, 1].reshape(-1)
    assert summary["mass_msun[1]"]["q95"] == pytest.approx(np.quantile(mass, 0.95), rel=1e-12)
    assert summary["mass_msun[1]"]["ess_tail"] == pytest.approx(
        diag.ess_tail(samples["mass_msun"])[1], rel=1e-12
    )
    cov = samples["cov"][:, :, 1, 0].reshape(-1)
    assert summary["cov[1,0]"]["mean"] == pytest.approx(cov.mean(), rel=1e-12)


def test_summarize_custom_probs_and_validation():
    summary = diag.summarize({"a": np.zeros((2, 10)) + np.arange(10)}, probs=(0.025, 0.975))
    assert [k for k in summary["a"] if k.startswith("q")] == ["q2.5", "q97.5"]
    with pytest.raises(ValueError, match=r"probs in \[0, 1\]"):
        diag.summarize({"a": np.zeros((2, 10))}, probs=(0.5, 2.0))
    with pytest.raises(ValueError, match="'a'.*at least 2 dimensions"):
        diag.summarize({"a": np.zeros(10)})


# ---------------------------------------------------------------------------- warnings


def _row(rhat=1.0, ess_bulk=1000.0, ess_tail=1000.0, mean=0.0):
    return {"mean": mean, "sd": 1.0, "rhat": rhat, "ess_bulk": ess_bulk, "ess_tail": ess_tail}


def test_no_warnings_when_all_good():
    summary = {"a": _row(rhat=1.01, ess_bulk=400.0, ess_tail=400.0)}  # exactly at thresholds
    assert (
        diag.diagnostic_warnings(summary, num_divergent=0, num_samples_total=4000, ebfmi=[0.3, 1.0])
        == []
    )


def test_each_threshold_gives_one_warning():
    common = {"num_samples_total": 4000, "num_divergent": 0}
    cases = [
        ({"a": _row(rhat=1.0101)}, {}, ["a", "R-hat", "1.010"]),
        ({"b": _row(ess_bulk=399.0)}, {}, ["b", "bulk ESS", "399"]),
        ({"c": _row(ess_tail=12.0)}, {}, ["c", "tail ESS", "12"]),
        ({"d": _row()}, {"num_divergent": 7}, ["7 of 4000", "divergent"]),
        ({"d": _row()}, {"max_treedepth_hits": 3}, ["3 of 4000", "tree depth"]),
        ({"d": _row()}, {"ebfmi": [0.9, 0.25]}, ["chain 1", "E-BFMI", "0.250"]),
        ({"e": _row(mean=float("nan"))}, {}, ["e", "not finite"]),
    ]
    for summary, kwargs, fragments in cases:
        result = diag.diagnostic_warnings(summary, **{**common, **kwargs})
        assert len(result) == 1, (summary, kwargs, result)
        for fragment in fragments:
            assert fragment in result[0], (fragment, result[0])


def test_custom_thresholds_and_many_warnings():
    summary = {"a": _row(rhat=1.03, ess_bulk=150.0), "b": _row(rhat=1.2, ess_tail=50.0)}
    result = diag.diagnostic_warnings(
        summary, num_divergent=0, num_samples_total=1000, rhat_max=1.05, ess_min=100
    )
    assert result == ["b: R-hat = 1.200 > 1.05", "b: tail ESS = 50 < 100"]


def test_warnings_validation():
    with pytest.raises(ValueError, match="num_samples_total > 0, got 0"):
        diag.diagnostic_warnings({}, num_divergent=0, num_samples_total=0)
    with pytest.raises(ValueError, match="num_divergent <= num_samples_total"):
        diag.diagnostic_warnings({}, num_divergent=11, num_samples_total=10)
    with pytest.raises(ValueError, match="max_treedepth_hits >= 0, got -1"):
        diag.diagnostic_warnings({}, num_divergent=0, num_samples_total=10, max_treedepth_hits=-1)


def test_warnings_from_real_summary():
    summary = diag.summarize({"stuck": CASES["stuck_chain"][:, :, 0]})
    result = diag.diagnostic_warnings(summary, num_divergent=0, num_samples_total=2000)
    assert any(w.startswith("stuck: R-hat = ") for w in result)


# ------------------------------------------------------------------------------- table


def test_format_summary_table():
    summary = diag.summarize(_samples())
    table = diag.format_summary_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == [
        "parameter",
        "mean",
        "sd",
        "5%",
        "50%",
        "95%",
        "R-hat",
        "ESS",
        "bulk",
        "ESS",
        "tail",
    ]
    assert len(lines) == 2 + len(summary)
    assert len({len(line) for line in lines[1:]}) == 1  # aligned rule and rows
    assert lines[2].startswith("log_age ")
    assert f"{summary['log_age']['rhat']:.3f}" in lines[2]
    assert f"{summary['log_age']['ess_bulk']:.0f}" in lines[2]
    assert "truth" not in table


def test_format_summary_table_with_truth():
    summary = diag.summarize(_samples())
    truth = {"log_age": 9.0, "mass_msun": np.array([1.0, 2.0, 3.0])}
    lines = diag.format_summary_table(summary, truth=truth).splitlines()
    assert lines[0].split()[-1] == "truth"
    mean_cell = lines[2].split()[1]  # truth uses the site's decimals (from its sd)
    decimals = len(mean_cell.partition(".")[2])
    assert lines[2].split()[-1] == f"{9.0:.{decimals}f}"
    assert lines[4].split()[-1] == "2.00"  # mass_msun[1], median sd ~ 1.4 -> 2 decimals
    mass_rows = [line.split() for line in lines[3:6]]
    assert len({len(r[1].partition(".")[2]) for r in mass_rows}) == 1  # same decimals
    assert len(lines[-1].split()) == 9  # cov[1,1] has no truth: blank cell
