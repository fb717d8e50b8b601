"""Tests for clusterhbm.errors: the Gaia DR3 error model against real cluster data."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterhbm.errors import (
    BANDS,
    ERROR_KINDS,
    ErrorModel,
    draw_errors,
    load_error_model,
    median_mag_error,
    median_parallax_error_mas,
)

DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clusters"
ERROR_COLUMNS = {
    "G": "phot_g_mean_mag_error",
    "BP": "phot_bp_mean_mag_error",
    "RP": "phot_rp_mean_mag_error",
    "parallax": "parallax_error",
}
TOLERANCE = 0.20  # relative, on the binned median
MIN_STARS = 15  # a 0.5-mag bin with fewer stars has a median too noisy to test bin by bin


def _median_error(kind, g):
    if kind == "parallax":
        return np.asarray(median_parallax_error_mas(g))
    return np.asarray(median_mag_error(kind, g))


def _read(rel):
    path = DATA_DIR / rel
    if not path.exists():
        pytest.skip(f"shared cluster data not found at {path}")
    from clusterhbm.catalogue import read_catalogue

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_catalogue(path)


@pytest.fixture(scope="module")
def m67():
    return _read("m67/m67_gaia.ecsv")


def _finite(table, kind):
    g = np.asarray(table["phot_g_mean_mag"], dtype=float)
    e = np.asarray(table[ERROR_COLUMNS[kind]], dtype=float)
    ok = np.isfinite(g) & np.isfinite(e) & (e > 0)
    return g[ok], e[ok]


def _binned_deviations(g, e, kind, lo, hi):
    """(bin start, model/median - 1) for 0.5-mag bins in [lo, hi) with >= MIN_STARS stars."""
    model = _median_error(kind, g)
    edges = np.arange(lo, hi + 1e-9, 0.5)
    idx = np.digitize(g, edges) - 1
    out = []
    for i in range(len(edges) - 1):
        sel = idx == i
        if sel.sum() >= MIN_STARS:
            out.append((edges[i], np.median(model[sel]) / np.median(e[sel]) - 1.0))
    return out


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_reproduces_m67_median_in_half_mag_bins(m67, kind):
    g, e = _finite(m67, kind)
    devs = _binned_deviations(g, e, kind, 8.0, 19.0)
    assert len(devs) >= 12, f"too few populated bins for {kind}: {devs}"
    bad = [(b, round(d, 3)) for b, d in devs if abs(d) > TOLERANCE]
    assert not bad, f"{kind}: bins (start G, model/median - 1) beyond {TOLERANCE}: {bad}"


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_reproduces_m67_sparse_bright_end(m67, kind):
    # M67 has only ~36 stars at 8 < G < 12 (fewer than MIN_STARS per 0.5-mag bin): one bin
    g, e = _finite(m67, kind)
    sel = (g > 8.0) & (g < 12.0)
    assert sel.sum() >= 30
    dev = np.median(_median_error(kind, g[sel])) / np.median(e[sel]) - 1.0
    assert abs(dev) < TOLERANCE, f"{kind}: bright-end model/median - 1 = {dev:.3f}"


@pytest.mark.parametrize(
    "rel", ["pleiades/pleiades_gaia.ecsv", "ruprecht147/ruprecht147_gaia.ecsv"]
)
def test_parallax_error_matches_other_dr3_clusters(rel):
    g, e = _finite(_read(rel), "parallax")
    devs = _binned_deviations(g, e, "parallax", 12.0, 19.0)
    assert len(devs) >= 5
    bad = [(b, round(d, 3)) for b, d in devs if abs(d) > TOLERANCE]
    assert not bad, f"{rel}: parallax bins beyond {TOLERANCE}: {bad}"


# --------------------------------------------------------------------------- shape of the model

G_GRID = np.linspace(5.0, 21.0, 1601)


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_errors_positive_finite_and_monotone_faintwards(kind):
    sigma = _median_error(kind, G_GRID)
    assert sigma.shape == G_GRID.shape
    assert np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    faint = sigma[G_GRID > 13.0]
    assert np.all(np.diff(faint) >= -1e-6 * faint[:-1]), f"{kind} decreases somewhere at G > 13"
    # no blow-up: below 2 mag (bands) / 5 mas (parallax) at G = 21, > 1e-5 everywhere
    assert sigma.max() < (5.0 if kind == "parallax" else 2.0)
    assert sigma.min() > 1e-5


def test_typical_values_are_gaia_like():
    # Gaia DR3 documentation: G ~ 0.3 mmag at G < 13 and ~1 mmag at G = 17;
    # parallax ~0.02 mas at G < 13, ~0.07-0.1 at G = 17, ~0.5 at G = 20
    assert 1e-4 < float(median_mag_error("G", 12.0)) < 5e-4
    assert 4e-4 < float(median_mag_error("G", 17.0)) < 2e-3
    assert 0.01 < float(median_parallax_error_mas(12.0)) < 0.04
    assert 0.05 < float(median_parallax_error_mas(17.0)) < 0.15
    assert 0.3 < float(median_parallax_error_mas(20.0)) < 1.0
    # BP errors exceed RP errors for the (red) faint stars
    assert float(median_mag_error("BP", 18.0)) > float(median_mag_error("RP", 18.0))


def test_scalar_and_array_inputs_and_nan():
    s = median_mag_error("RP", 15.0)
    assert s.shape == ()
    out = median_mag_error("RP", jnp.array([[15.0, np.nan]]))
    assert out.shape == (1, 2)
    assert np.isclose(float(out[0, 0]), float(s)) and np.isnan(float(out[0, 1]))


def test_gradient_finite():
    for kind in BANDS:
        grad = jax.grad(lambda g, k=kind: median_mag_error(k, g))(17.3)
        assert np.isfinite(float(grad)) and float(grad) > 0
    grad = jax.grad(median_parallax_error_mas)(17.3)
    assert np.isfinite(float(grad)) and float(grad) > 0


# --------------------------------------------------------------------------- model object


def test_model_loads_once_and_matches_json():
    assert load_error_model() is load_error_model()
    model = load_error_model()
    assert isinstance(model, ErrorModel)
    assert model.coeffs.shape[0] == len(ERROR_KINDS)
    for field in model:
        assert np.all(np.isfinite(field))
    meta = json.loads(
        resources.files("clusterhbm").joinpath("data", "gaia_error_model.json").read_text()
    )["meta"]
    assert meta["gaia_release"] == "DR3"
    assert meta["script"] == "scripts/calibrate_gaia_errors.py"
    assert "m67/m67_gaia.ecsv" in meta["input_files"]


def test_model_argument_and_jit():
    # a flat model: log10 sigma = -2 everywhere, parallax 0.1 mas
    k = len(ERROR_KINDS)
    coeffs = np.zeros((k, 2))
    coeffs[:, 0] = [-2.0, -2.0, -2.0, -1.0]
    flat = ErrorModel(
        coeffs=coeffs, g_ref=np.full(k, 15.0), g_lo=np.full(k, 8.0),
        g_bright=np.full(k, 12.0), g_rise=np.full(k, 12.0), g_faint=np.full(k, 19.0),
        bright_slope=np.zeros(k), faint_slope=np.full(k, 0.4), scatter_ln=np.full(k, 0.1),
    )
    g = jnp.array([10.0, 15.0, 20.0])
    np.testing.assert_allclose(median_mag_error("BP", g, model=flat), [0.01, 0.01, 0.01 * 10**0.4],
                               rtol=1e-5)
    jitted = jax.jit(median_parallax_error_mas)
    np.testing.assert_allclose(jitted(g, model=flat), [0.1, 0.1, 0.1 * 10**0.4], rtol=1e-5)
    # the default model passes through jit as an argument too
    model = load_error_model()
    np.testing.assert_allclose(jitted(g, model=model), median_parallax_error_mas(g), rtol=1e-6)


# --------------------------------------------------------------------------- sampler

DRAW = jax.jit(draw_errors, static_argnames=("bands", "scatter"))


def test_draw_same_key_identical_different_keys_differ():
    g = jnp.linspace(10.0, 20.0, 200)
    a = DRAW(jax.random.key(1), g)
    b = DRAW(jax.random.key(1), g)
    c = DRAW(jax.random.key(2), g)
    assert set(a) == set(BANDS) | {"parallax"}
    for name in a:
        assert a[name].shape == g.shape
        assert np.all(np.asarray(a[name]) > 0)
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.allclose(a[name], c[name])


def test_draw_band_subset_and_no_scatter():
    g = jnp.linspace(10.0, 20.0, 200)
    key = jax.random.key(1)
    full = DRAW(key, g)  # compiled above for this shape
    only_bp = draw_errors(key, g, bands=("BP",))  # eager
    assert set(only_bp) == {"BP", "parallax"}
    # each kind has its own stream: the BP draws do not depend on the other bands asked for
    np.testing.assert_allclose(only_bp["BP"], full["BP"], rtol=1e-5)
    np.testing.assert_allclose(only_bp["parallax"], full["parallax"], rtol=1e-5)
    med = draw_errors(key, g, bands="G", scatter=False)
    assert set(med) == {"G", "parallax"}
    np.testing.assert_allclose(med["G"], median_mag_error("G", g), rtol=1e-6)
    np.testing.assert_allclose(med["parallax"], median_parallax_error_mas(g), rtol=1e-6)


def test_drawn_log_scatter_matches_stored_spread():
    g = jnp.asarray(np.random.default_rng(0).uniform(8.0, 19.0, 40_000))
    draws = DRAW(jax.random.key(4), g)
    model = load_error_model()
    for row, kind in enumerate(ERROR_KINDS):
        resid = np.log(np.asarray(draws[kind])) - np.log(_median_error(kind, g))
        expected = float(model.scatter_ln[row])
        assert abs(np.std(resid) / expected - 1.0) < 0.10, kind
        assert abs(np.median(resid)) < 0.05 * expected  # log-normal about the median


def test_unknown_band_raises():
    with pytest.raises(ValueError, match="allowed bands"):
        median_mag_error("V", 15.0)
    with pytest.raises(ValueError, match="allowed bands"):
        median_mag_error("parallax", 15.0)
    with pytest.raises(ValueError, match="'Z'"):
        draw_errors(jax.random.key(0), 15.0, bands=("G", "Z"))


def test_no_work_at_import():
    # importing reads no file and switches no JAX config: the JSON is loaded on first use
    code = (
        "import jax, clusterhbm.errors as e; "
        "assert e._load.cache_info().currsize == 0; "
        "assert not jax.config.jax_enable_x64"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
