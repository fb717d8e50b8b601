"""The empirical BP/RP colour correction of the grid (clusterhbm.grid.apply_colour_correction)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import SHARED

from clusterhbm.grid import (
    BAND_NAMES,
    apply_colour_correction,
    colour_correction_table,
    colour_offsets,
    load_grid,
)
from clusterhbm.prediction import predict

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = SHARED / "data" / "clusters"


def _script():
    spec = importlib.util.spec_from_file_location(
        "grid_colour_residuals", ROOT / "scripts" / "grid_colour_residuals.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_offsets_are_exact_at_table_nodes_and_leave_other_bands_alone():
    grid = load_grid()
    table = colour_correction_table("gaia-ms")
    corr = apply_colour_correction(grid, table)
    teff = np.asarray(grid.bc.teff)
    logg = np.asarray(grid.bc.logg)
    d0 = np.asarray(grid.bc.data)
    d1 = np.asarray(corr.bc.data)
    # a dwarf node inside the calibrated range: BC moves by exactly minus the offset
    it = int(np.argmin(np.abs(teff - 4500.0)))
    ig = int(np.argmin(np.abs(logg - 4.5)))
    d_bp, d_rp = colour_offsets(table, teff[it], logg[ig])
    knots = sorted(table["knots"], key=lambda k: k["teff_k"])
    expect_bp = np.interp(teff[it], [k["teff_k"] for k in knots],
                          [k["d_bp_mag"] for k in knots])
    assert float(d_bp) == pytest.approx(expect_bp, abs=1e-12)
    assert 0.03 < float(d_bp) < 0.07 and -0.05 < float(d_rp) < -0.01
    for band, d in (("BP", d_bp), ("RP", d_rp), ("BP_DR2", d_bp), ("RP_DR2", d_rp)):
        j = BAND_NAMES.index(band)
        np.testing.assert_allclose(d1[:, it, ig, :, j], d0[:, it, ig, :, j] - d, atol=2e-6)
    # G (the anchor) and 2MASS untouched everywhere
    for band in ("G", "G_DR2", "J", "H", "Ks"):
        j = BAND_NAMES.index(band)
        np.testing.assert_array_equal(d1[..., j], d0[..., j])
    # giants (log g <= 3.5) and hot stars (> hottest knot + 500 K) untouched
    t_hot = max(k["teff_k"] for k in knots) + 500.0
    for band in ("BP", "RP"):
        j = BAND_NAMES.index(band)
        np.testing.assert_array_equal(d1[:, :, logg <= 3.5, :, j], d0[:, :, logg <= 3.5, :, j])
        np.testing.assert_array_equal(d1[:, teff >= t_hot, :, :, j],
                                      d0[:, teff >= t_hot, :, :, j])
    # the cached grid itself is not modified; the corrected grid is cached too
    assert np.array_equal(np.asarray(load_grid().bc.data), d0)
    again = load_grid(colour_correction="gaia-ms")
    assert again is load_grid(colour_correction="gaia-ms")
    np.testing.assert_array_equal(np.asarray(again.bc.data), d1)


def test_corrected_isochrone_is_redder_on_the_main_sequence_only():
    g0 = load_grid()
    g1 = load_grid(colour_correction="gaia-ms")
    mass = np.array([0.6, 0.8, 1.0])
    r0 = predict(mass_msun=mass, log_age=9.6, feh=0.0, grid=g0)
    r1 = predict(mass_msun=mass, log_age=9.6, feh=0.0, grid=g1)
    shift = (r1["BP"] - r1["RP"]) - (r0["BP"] - r0["RP"])
    np.testing.assert_array_equal(r1["G"], r0["G"])
    # MIST is bluest against the clusters for the coolest dwarfs
    assert shift[0] > 0.12 and 0.02 < shift[2] < 0.05 and shift[0] > shift[1] > shift[2]
    giant = {"eep": 605, "log_age": 9.6, "feh": 0.0}
    assert float(predict(grid=g1, **giant)["BP"]) == float(predict(grid=g0, **giant)["BP"])


def test_unknown_correction_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a bundled name"):
        load_grid(colour_correction="no-such-correction")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"knots": [{"teff_k": 4000.0}]}))
    with pytest.raises(ValueError, match="d_bp_mag"):
        load_grid(colour_correction=bad)


@pytest.mark.skipif(not CLUSTERS.exists(), reason="../shared cluster data not found")
def test_bundled_correction_is_what_the_script_builds_and_fixes_held_out_m67():
    mod = _script()
    grid = load_grid()
    edges = np.arange(1.0, 10.51, 0.5)
    table = colour_correction_table("gaia-ms")
    calib = [mod.residuals(n, grid, edges) for n in table["calibrators"]]
    assert "m67" not in table["calibrators"]
    rebuilt = mod.correction_table(calib)
    assert len(rebuilt["knots"]) == len(table["knots"])
    for a, b in zip(rebuilt["knots"], table["knots"]):
        assert a["teff_k"] == pytest.approx(b["teff_k"], abs=0.5)
        assert a["d_bp_mag"] == pytest.approx(b["d_bp_mag"], abs=1e-4)
        assert a["d_rp_mag"] == pytest.approx(b["d_rp_mag"], abs=1e-4)
    # M67 is held out: its main-sequence colour residual at the Gaia Collaboration (2018)
    # parameters, before and after the correction
    before = {b["mg_lo"]: b["p25"] for b in mod.residuals("m67", grid, edges)["bins"]}
    after = {b["mg_lo"]: b["p25"] for b in mod.residuals(
        "m67", load_grid(colour_correction="gaia-ms"), edges)["bins"]}
    upper = [3.0, 3.5, 4.0, 4.5, 5.0, 5.5]  # G ~ 12.7-15.7: turnoff to ~0.9 Msun
    assert min(before[m] for m in upper) > 0.019
    assert max(abs(after[m]) for m in upper) < 0.016
    for m in (6.5, 7.0, 7.5):  # K dwarfs, G ~ 16.2-17.7: most of the error removed
        assert before[m] > 0.1 and after[m] < 0.5 * before[m]


def test_posterior_isochrones_use_the_fits_corrected_grid():
    from types import SimpleNamespace

    from clusterhbm.plots import isochrone_curve, posterior_isochrones

    table = colour_correction_table("gaia-ms")
    pop = {"log_age": np.full((1, 3), 9.6), "feh": np.zeros((1, 3)),
           "distance_pc": np.full((1, 3), 850.0), "av_mag": np.full((1, 3), 0.1)}
    cc = {"name": "gaia-ms", "source": "gaia-ms", "sha256": table["sha256"]}
    res = SimpleNamespace(population=pop, settings={"colour_correction": cc})
    spec = posterior_isochrones(res, n_draws=1)[-1]
    kw = {k: spec[k] for k in ("log_age", "feh", "distance_pc", "av_mag")}
    c1, g1, _ = isochrone_curve(grid=spec["grid"], **kw)
    c0, g0, _ = isochrone_curve(**kw)
    np.testing.assert_array_equal(g1, g0)
    assert np.max(c1 - c0) > 0.1  # the K dwarfs
    # no correction: no grid in the spec (the default grid)
    plain = SimpleNamespace(population=pop, settings={})
    assert "grid" not in posterior_isochrones(plain, n_draws=1)[-1]
    res.settings["colour_correction"] = dict(cc, sha256="0" * 64)
    with pytest.raises(ValueError, match="checksum"):
        posterior_isochrones(res, n_draws=1)
