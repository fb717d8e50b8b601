"""Tests of clusterhbm.gaia: ADQL text, name resolution, preparation, membership, cache, CLI.

No network: the archive call ``clusterhbm.gaia._launch_query`` is replaced by canned
responses built from the real Gaia DR3 files in ``../shared/data/clusters/`` (read in
place, never copied into the repository). Live tests are marked ``remote_data``.

How to serve ``clusterhbm fetch`` offline from a pre-seeded cache: see
``test_cli_served_from_preseeded_cache`` (``write_cache`` + ``cache_path``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from clusterhbm import gaia
from clusterhbm.catalogue import validate_catalogue

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "clusters"
M67_FILE = SHARED / "m67" / "m67_gaia.ecsv"
PLEIADES_FILE = SHARED / "pleiades" / "pleiades_gaia.ecsv"


def _read_shared(path: Path) -> Table:
    if not path.is_file():
        pytest.skip(f"shared test data not available: {path}")
    return Table.read(path, format="ascii.ecsv")


@pytest.fixture(scope="module")
def m67_file() -> Table:
    return _read_shared(M67_FILE)


@pytest.fixture(scope="module")
def pleiades_file() -> Table:
    return _read_shared(PLEIADES_FILE)


@pytest.fixture
def m67_response(m67_file: Table) -> Table:
    """What the archive would answer for M67: the DR3 rows, without the label column."""
    response = m67_file.copy()
    response.remove_column("member")
    response.meta = {}
    return response


class FakeArchive:
    """Stands in for ``_launch_query``; records calls, returns a table or raises."""

    def __init__(self, response: Table | None = None, error: Exception | None = None):
        self.response = response
        self.error = error
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, adql: str, *, async_job: bool) -> Table:
        self.calls.append((adql, async_job))
        if self.error is not None:
            raise self.error
        return self.response.copy()


@pytest.fixture
def archive(monkeypatch: pytest.MonkeyPatch, m67_response: Table) -> FakeArchive:
    fake = FakeArchive(m67_response)
    monkeypatch.setattr(gaia, "_launch_query", fake)
    return fake


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> FakeArchive:
    fake = FakeArchive(error=ConnectionError("[Errno -2] Name or service not known"))
    monkeypatch.setattr(gaia, "_launch_query", fake)

    def offline_resolver(name: str) -> gaia.ClusterInfo:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(gaia, "_resolve_online", offline_resolver)
    return fake


# ------------------------------------------------------------------ named clusters


def test_bundled_table_has_required_content() -> None:
    table = gaia.known_clusters()
    assert len(table) >= 30
    for col in ("name", "aliases", "ra", "dec", "pmra", "pmdec", "parallax", "r50", "radius",
                "reference"):
        assert col in table.colnames
        assert table[col].description, f"column {col} lacks a description"
    for col in ("ra", "dec", "pmra", "pmdec", "parallax", "r50", "radius"):
        assert np.all(np.isfinite(np.asarray(table[col], dtype=float)))
    assert np.all((table["ra"] >= 0) & (table["ra"] < 360))
    assert np.all(np.abs(table["dec"]) <= 90)
    assert np.all((table["radius"] > 0) & (table["radius"] <= 10))
    assert all("Cantat-Gaudin" in str(r) or "Hunt" in str(r) for r in table["reference"])
    assert "approximate" in table.meta
    names = {str(n) for n in table["name"]}
    for needed in ("M67", "Pleiades", "Hyades", "Praesepe", "NGC 188", "NGC 6791", "NGC 752",
                   "NGC 2516", "IC 2602", "alpha Persei", "NGC 6819", "NGC 7789",
                   "Ruprecht 147", "Blanco 1"):
        assert needed in names
    assert len(gaia._name_index()) > len(table)  # aliases are indexed, without clashes


@pytest.mark.parametrize(
    "alias",
    ["M67", "m 67", "Messier 67", "NGC 2682", "ngc2682", "NGC_2682", "Cl NGC 2682",
     "  ngc-2682 ", "Melotte 94", "Mel 94", "M067"],
)
def test_resolve_aliases_of_m67(alias: str) -> None:
    info = gaia.resolve_cluster(alias, online=False)
    assert info.name == "M67"
    assert info.source == "table"
    assert info.ra_deg == pytest.approx(132.846)
    assert info.dec_deg == pytest.approx(11.814)
    assert info.pmra_masyr == pytest.approx(-10.986)
    assert info.parallax_mas == pytest.approx(1.135)
    assert "Cantat-Gaudin" in info.reference


@pytest.mark.parametrize(
    "alias, name",
    [("Melotte 22", "Pleiades"), ("M45", "Pleiades"), ("alpha Per", "alpha Persei"),
     ("\N{GREEK SMALL LETTER ALPHA} Persei", "alpha Persei"), ("Cl Melotte 20", "alpha Persei"),
     ("NGC 0752", "NGC 752"),
     ("Coma Ber", "Coma Berenices"), ("Melotte 25", "Hyades"), ("rup 147", "Ruprecht 147"),
     ("beehive cluster", "Praesepe")],
)
def test_resolve_other_aliases(alias: str, name: str) -> None:
    assert gaia.resolve_cluster(alias, online=False).name == name


def test_unknown_name_offline_gives_close_matches() -> None:
    with pytest.raises(gaia.UnknownClusterError, match="Pleiades"):
        gaia.resolve_cluster("Pleiadess", online=False)
    with pytest.raises(gaia.UnknownClusterError, match="expected one of"):
        gaia.resolve_cluster("Zorglub 99", online=False)
    with pytest.raises(gaia.UnknownClusterError, match="non-empty"):
        gaia.resolve_cluster("  ", online=False)


def test_unknown_name_online_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> gaia.ClusterInfo:
        raise LookupError(f"neither SIMBAD nor Sesame knows {name!r}")

    monkeypatch.setattr(gaia, "_resolve_online", not_found)
    with pytest.raises(gaia.UnknownClusterError, match="did you mean 'M67'"):
        gaia.resolve_cluster("M67x")


def test_name_not_in_table_resolved_online_and_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class FakeSimbad:
        def add_votable_fields(self, *fields: str) -> None:
            assert {"pmra", "pmdec", "plx_value", "dim"} <= set(fields)

        def query_object(self, name: str) -> Table:
            return Table({"main_id": ["NGC  6940"], "ra": [308.626], "dec": [28.278],
                          "pmra": [-1.96], "pmdec": [-9.44], "plx_value": [0.93],
                          "galdim_majaxis": [25.0]})

    import astroquery.simbad

    monkeypatch.setattr(astroquery.simbad, "Simbad", FakeSimbad)
    with caplog.at_level(logging.WARNING, logger="clusterhbm.gaia"):
        info = gaia.resolve_cluster("NGC 6940")
    assert info.source == "simbad"
    assert info.name == "NGC 6940"
    assert info.ra_deg == pytest.approx(308.626)
    assert info.parallax_mas == pytest.approx(0.93)
    assert info.radius_deg == pytest.approx(3 * 25.0 / 2 / 60)
    assert "not in the bundled cluster table; resolved online with SIMBAD" in caplog.text
    # and it can be queried
    assert "CIRCLE('ICRS', 308.626, 28.278, 0.625)" in gaia.build_query(info)


def test_resolver_network_failure_is_a_query_error(no_network: FakeArchive) -> None:
    with pytest.raises(gaia.GaiaQueryError, match="online name resolver failed"):
        gaia.resolve_cluster("NGC 6940")


# ------------------------------------------------------------------ ADQL text


def test_build_query_m67_cone_columns_limit(no_network: FakeArchive) -> None:
    adql = gaia.build_query("M67", row_limit=12345)
    assert adql.startswith("SELECT TOP 12345\n")
    assert "FROM gaiadr3.gaia_source AS g" in adql
    assert "1 = CONTAINS(POINT('ICRS', g.ra, g.dec), CIRCLE('ICRS', 132.846, 11.814, 0.9))" in adql
    for col in gaia.GAIA_COLUMNS:
        assert f"g.{col}" in adql
    for col in ("source_id", "parallax_error", "pmra_error", "pmdec_error", "ruwe",
                "phot_bp_rp_excess_factor", "nu_eff_used_in_astrometry", "pseudocolour",
                "ecl_lat", "astrometric_params_solved", "phot_g_mean_flux_over_error",
                "phot_bp_mean_flux_over_error", "phot_rp_mean_flux_over_error"):
        assert f"g.{col}," in adql or f"g.{col}\n" in adql
    assert "phot_g_mean_mag <" not in adql
    assert "tmass" not in adql
    assert adql.rstrip().endswith("ORDER BY g.phot_g_mean_mag ASC")
    assert no_network.calls == []  # built offline


def test_build_query_options() -> None:
    adql = gaia.build_query("NGC 2682", radius_deg=0.35, gmax=18, with_2mass=True,
                            row_limit=5000)
    assert "CIRCLE('ICRS', 132.846, 11.814, 0.35))" in adql
    assert "AND g.phot_g_mean_mag < 18" in adql
    assert "LEFT OUTER JOIN gaiadr3.tmass_psc_xsc_best_neighbour AS xm" in adql
    assert "LEFT OUTER JOIN gaiadr1.tmass_original_valid AS tm" in adql
    for col in ("j_m", "j_msigcom", "h_m", "h_msigcom", "ks_m", "ks_msigcom"):
        assert f"tm.{col}" in adql
    assert gaia.build_query("M67", release="EDR3").count("gaiaedr3.gaia_source") == 1
    assert gaia.build_query("M67") == gaia.build_query(gaia.resolve_cluster("M67"))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"radius_deg": 0.0}, "radius_deg"), ({"radius_deg": 45.0}, "radius_deg"),
     ({"gmax": 40.0}, "gmax"), ({"row_limit": 0}, "row_limit"), ({"row_limit": 2.5}, "row_limit"),
     ({"release": "DR2"}, "release")],
)
def test_build_query_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gaia.build_query("M67", **kwargs)


def test_build_query_unknown_name_is_clear() -> None:
    with pytest.raises(gaia.UnknownClusterError, match=r"unknown cluster 'Pleiadess'.*Pleiades"):
        gaia.build_query("Pleiadess")


# ------------------------------------------------------------------ zero point

# Reference values computed once with gaiadr3-zeropoint 0.1.0 on the M67 DR3 rows, by
#   from zero_point import zpt; zpt.load_tables()
#   zpt.get_zpt(G, nu_eff, pseudocolour, ecl_lat, astrometric_params_solved, _warnings=False)
# with one-element arrays of the listed star's archive values.
ZPT_REFERENCE = {  # source_id: zero point [mas]
    597743311687984768: -0.022654,  # 5p, G = 18.52
    597810107020313344: -0.024057,  # 5p, G = 18.47
    597830722862488064: -0.029538,  # 5p, G = 17.89
    597795023093832320: -0.023587,  # 6p, G = 18.89
    598616706172696320: -0.019941,  # 6p, G = 18.94
}
ZPT_INPUTS = ("phot_g_mean_mag", "nu_eff_used_in_astrometry", "pseudocolour", "ecl_lat",
              "astrometric_params_solved")


def _zpt_inputs(table: Table) -> list[np.ndarray]:
    return [gaia._column(table, c) for c in ZPT_INPUTS]


def test_zero_point_reference_values(m67_file: Table) -> None:
    ids = np.asarray(m67_file["source_id"])
    rows = [int(np.flatnonzero(ids == sid)[0]) for sid in ZPT_REFERENCE]
    zpt = gaia.parallax_zero_point(*(x[rows] for x in _zpt_inputs(m67_file)))
    np.testing.assert_allclose(zpt, list(ZPT_REFERENCE.values()), atol=1.5e-6)


def test_zero_point_matches_package_directly(m67_file: Table) -> None:
    from zero_point import zpt as package

    package.load_tables()
    g, nu, pc, beta, sol = _zpt_inputs(m67_file)
    ours = gaia.parallax_zero_point(g, nu, pc, beta, sol)
    ok = np.isfinite(ours)
    assert ok.sum() > 1400
    direct = package.get_zpt(g[ok], nu[ok], pc[ok], beta[ok], sol[ok], _warnings=False)
    np.testing.assert_array_equal(ours[ok], direct)
    assert np.all((ours[ok] > -0.1) & (ours[ok] < 0.05))


def test_zero_point_outside_validity_is_nan() -> None:
    g = np.array([5.5, 21.5, 15.0, 15.0, 15.0, 15.0, 15.0])
    nu = np.array([1.5, 1.5, np.nan, 2.0, 1.5, np.nan, 1.5])
    pc = np.array([np.nan, np.nan, np.nan, np.nan, np.nan, 1.5, np.nan])
    beta = np.full(7, 10.0)
    sol = np.array([31, 31, 3, 31, 31, 95, 95])
    zpt = gaia.parallax_zero_point(g, nu, pc, beta, sol)
    assert np.all(np.isnan(zpt[:4]))  # G < 6, G > 21, 2-parameter, nu_eff > 1.9
    assert np.all(np.isfinite(zpt[4:6]))  # valid 5p and 6p
    assert np.isnan(zpt[6])  # 6p without pseudocolour


def test_prepare_applies_and_records_zero_point(m67_file: Table) -> None:
    table = m67_file[:200].copy()
    table["phot_g_mean_mag"][0] = 21.5  # outside the recipe: left uncorrected
    out = gaia.prepare(table, apply_cuts=False)
    zpt = np.asarray(out["parallax_zpt"])
    plx0 = np.asarray(out["parallax_uncorrected"])
    assert np.isnan(zpt[0]) and out["parallax"][0] == plx0[0]
    ok = np.isfinite(zpt)
    np.testing.assert_allclose(np.asarray(out["parallax"])[ok], plx0[ok] - zpt[ok])
    np.testing.assert_array_equal(plx0, gaia._column(table, "parallax"))
    meta = out.meta["zero_point"]
    assert meta["n_corrected"] + meta["n_not_corrected"] == 200
    assert meta["n_not_corrected"] == int(np.count_nonzero(~ok)) >= 1
    assert str(out["parallax_zpt"].unit) == "mas"
    dr2 = gaia.prepare(table, release="DR2", apply_cuts=False)
    assert np.all(np.isnan(dr2["parallax_zpt"]))
    np.testing.assert_array_equal(dr2["parallax"], dr2["parallax_uncorrected"])


# ------------------------------------------------------------------ preparation


def test_magnitude_errors_with_floor(m67_file: Table) -> None:
    out = gaia.prepare(m67_file, apply_cuts=False)
    foe = gaia._column(m67_file, "phot_g_mean_flux_over_error")
    expected = np.sqrt((2.5 / np.log(10) / foe) ** 2 + gaia.MAG_ERROR_FLOOR["G"] ** 2)
    np.testing.assert_allclose(out["phot_g_mean_mag_error"], expected, rtol=1e-12)
    rp_err = np.asarray(out["phot_rp_mean_mag_error"])
    assert np.all(rp_err[np.isfinite(rp_err)] >= gaia.MAG_ERROR_FLOOR["RP"])
    flat = gaia.prepare(m67_file, apply_cuts=False, mag_error_floor=0.01)
    assert np.all(np.asarray(flat["phot_bp_mean_mag_error"])[np.isfinite(
        flat["phot_bp_mean_mag_error"])] >= 0.01)
    bad = gaia.magnitude_error([0.0, -1.0, np.nan, 1000.0], floor=0.0)
    assert np.all(np.isnan(bad[:3])) and bad[3] == pytest.approx(2.5 / np.log(10) / 1000.0)
    with pytest.raises(ValueError, match="mag_error_floor keys"):
        gaia.prepare(m67_file, mag_error_floor={"V": 0.01})
    with pytest.raises(ValueError, match="floor"):
        gaia.magnitude_error([10.0], floor=-1.0)


def test_quality_cuts_report_counts(m67_file: Table) -> None:
    out = gaia.prepare(m67_file)
    report = out.meta["quality_cuts"]
    assert [c["cut"] for c in report] == [
        "ruwe < 1.4", "parallax_over_error > 5", "|C*| < 3 sigma_C*(G)"]
    assert sum(c["n_removed"] for c in report) == len(m67_file) - len(out)
    assert report[0]["n_removed"] == int(np.count_nonzero(gaia._column(m67_file, "ruwe") >= 1.4))
    assert report[2]["n_not_tested"] == 1  # one star without BP
    assert np.all(np.asarray(out["ruwe"]) < 1.4)
    assert np.all(np.asarray(out["parallax"]) / np.asarray(out["parallax_error"]) > 5)
    assert out.meta["n_before_cuts"] == len(m67_file)
    assert out.meta["n_after_cuts"] == len(out)
    loose = gaia.prepare(m67_file, ruwe_max=None, min_parallax_over_error=None,
                         excess_nsigma=None)
    assert len(loose) == len(m67_file) and loose.meta["quality_cuts"] == []
    assert len(m67_file) == 1494  # the input is not modified


# ------------------------------------------------------------------ membership


def _scores(prob: np.ndarray, member: np.ndarray) -> tuple[float, float]:
    sel = prob > 0.5
    completeness = np.count_nonzero(sel & member) / np.count_nonzero(member)
    contamination = np.count_nonzero(sel & ~member) / max(np.count_nonzero(sel), 1)
    return completeness, contamination


def test_membership_recovers_synthetic_truth() -> None:
    rng = np.random.default_rng(42)
    n_c, n_f = 300, 2000
    truth_mean = np.array([-3.0, 5.0, 1.2])
    x_c = truth_mean + rng.normal(size=(n_c, 3)) * [0.15, 0.15, 0.02]
    x_f = np.array([0.0, 0.0, 0.6]) + rng.normal(size=(n_f, 3)) * [4.0, 4.0, 0.5]
    err = rng.uniform(0.02, 0.3, size=(n_c + n_f, 3))
    x = np.vstack([x_c, x_f]) + rng.normal(size=(n_c + n_f, 3)) * err
    table = Table({"pmra": x[:, 0], "pmdec": x[:, 1], "parallax": x[:, 2],
                   "pmra_error": err[:, 0], "pmdec_error": err[:, 1],
                   "parallax_error": err[:, 2]})
    member = np.arange(n_c + n_f) < n_c
    for init in (None, truth_mean + 0.3):
        fit = gaia.membership_probability(table, init=init)
        assert fit.converged
        np.testing.assert_allclose(fit.cluster_mean, truth_mean, atol=0.05)
        np.testing.assert_allclose(np.sqrt(np.diag(fit.cluster_cov)), [0.15, 0.15, 0.02],
                                   rtol=0.3, atol=0.01)
        assert fit.cluster_fraction == pytest.approx(n_c / (n_c + n_f), abs=0.02)
        completeness, contamination = _scores(fit.prob, member)
        assert completeness > 0.97 and contamination < 0.05
        assert np.all((fit.prob >= 0) & (fit.prob <= 1))
    # partial astrometry: marginal over the available dimensions; none: the prior
    table["parallax"][0] = np.nan
    table["pmra"][1] = table["pmdec"][1] = table["parallax"][1] = np.nan
    fit = gaia.membership_probability(table)
    assert fit.prob[0] > 0.5
    assert fit.prob[1] == pytest.approx(fit.cluster_fraction)
    assert fit.num_used == n_c + n_f - 2


def test_membership_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="missing"):
        gaia.membership_probability(Table({"pmra": [1.0]}))
    table = Table({c: np.ones(5) for c in ("pmra", "pmdec", "parallax", "pmra_error",
                                           "pmdec_error", "parallax_error")})
    with pytest.raises(ValueError, match="at least 10 stars"):
        gaia.membership_probability(table)
    with pytest.raises(ValueError, match="init"):
        gaia.membership_probability(Table({c: np.ones(20) for c in table.colnames}),
                                    init=(1.0, 2.0))


def _report(label: str, completeness: float, contamination: float, capsys) -> None:
    with capsys.disabled():
        print(f"\n[membership] {label}: completeness {completeness:.3f}, "
              f"contamination {contamination:.3f} (p > 0.5)")


def test_membership_m67_published_members(m67_file: Table, capsys) -> None:
    """M67 DR3 proper-motion box: 1494 stars, 1213 Gaia Collaboration (2018) members.

    Measured (this code): all stars, no cuts: completeness 0.990, contamination 0.172.
    The labels exist only within ~1 deg of the centre (GC18 searched no further) and were
    matched by DR2 source_id, so the "non-members" include unlabelled outer stars and
    members whose source_id changed; within 1 deg contamination is 0.117. With the default
    quality cuts: completeness 0.996 (of surviving members), contamination 0.157.
    """
    info = gaia.resolve_cluster("M67")
    member = np.asarray(m67_file["member"])
    raw = gaia.prepare(m67_file, apply_cuts=False)
    fit = gaia.membership_probability(raw, init=info)
    completeness, contamination = _scores(fit.prob, member)
    _report("M67, all 1494 stars", completeness, contamination, capsys)
    assert completeness >= 0.95
    assert contamination <= 0.20

    ra, dec = np.asarray(m67_file["ra"]), np.asarray(m67_file["dec"])
    r = np.hypot((ra - info.ra_deg) * np.cos(np.radians(info.dec_deg)), dec - info.dec_deg)
    inner = r < 1.0
    completeness, contamination = _scores(fit.prob[inner], member[inner])
    _report("M67, within 1 deg (labelled footprint)", completeness, contamination, capsys)
    assert completeness >= 0.95
    assert contamination <= 0.15

    cut = gaia.prepare(m67_file)
    fit = gaia.membership_probability(cut, init=info)
    completeness, contamination = _scores(fit.prob, np.asarray(cut["member"]))
    _report("M67, after default quality cuts", completeness, contamination, capsys)
    assert completeness >= 0.95
    assert contamination <= 0.19
    np.testing.assert_allclose(fit.cluster_mean, [-10.96, -2.92, 1.19], atol=0.03)


def test_membership_pleiades_published_members(pleiades_file: Table, capsys) -> None:
    """Pleiades DR3 (2 deg box, +-5 mas/yr box): 1110 stars, 859 GC18 members.

    Measured: no cuts 0.993 / 0.173; default cuts 0.999 / 0.089.
    """
    info = gaia.resolve_cluster("Pleiades")
    raw = gaia.prepare(pleiades_file, apply_cuts=False)
    fit = gaia.membership_probability(raw, init=info)
    completeness, contamination = _scores(fit.prob, np.asarray(raw["member"]))
    _report("Pleiades, all 1110 stars", completeness, contamination, capsys)
    assert completeness >= 0.95
    assert contamination <= 0.20
    cut = gaia.prepare(pleiades_file)
    fit = gaia.membership_probability(cut, init=info)
    completeness, contamination = _scores(fit.prob, np.asarray(cut["member"]))
    _report("Pleiades, after default quality cuts", completeness, contamination, capsys)
    assert completeness >= 0.97
    assert contamination <= 0.12
    np.testing.assert_allclose(fit.cluster_mean[:2], [19.9, -45.4], atol=0.15)


# ------------------------------------------------------------------ fetch, cache


def test_fetch_offline_pipeline_m67(archive: FakeArchive, tmp_path: Path, m67_file: Table) -> None:
    cat = gaia.fetch("M67", cache_dir=tmp_path)
    assert len(archive.calls) == 1
    adql, async_job = archive.calls[0]
    assert adql == gaia.build_query("M67") and async_job  # 200000 rows > sync cap
    assert validate_catalogue(cat) is cat
    for col in ("member_prob", "parallax_zpt", "parallax_uncorrected", "phot_g_mean_mag_error",
                "phot_bp_mean_mag_error", "phot_rp_mean_mag_error"):
        assert col in cat.colnames
    prob = np.asarray(cat["member_prob"])
    assert np.all((prob >= 0) & (prob <= 1))
    meta = cat.meta
    assert meta["cluster"] == "M67" and meta["gaia_release"] == "DR3"
    assert meta["query"] == adql
    assert meta["query_date"].endswith("+00:00")
    assert meta["clusterhbm_version"]
    assert meta["n_rows_query"] == 1494 and not meta["row_limit_hit"]
    assert not meta["from_cache"]
    assert sum(c["n_removed"] for c in meta["quality_cuts"]) == 1494 - len(cat)
    assert meta["n_members"] == int(np.count_nonzero(prob > 0.5)) > 1000
    # published members recovered through the full response -> catalogue path
    labels = dict(zip(np.asarray(m67_file["source_id"]).tolist(),
                      np.asarray(m67_file["member"]).tolist(), strict=True))
    member = np.array([labels[s] for s in np.asarray(cat["source_id"]).tolist()])
    completeness, contamination = _scores(prob, member)
    assert completeness >= 0.95 and contamination <= 0.19
    # written catalogues round-trip through the catalogue module
    from clusterhbm.catalogue import read_catalogue, write_catalogue

    back = read_catalogue(write_catalogue(cat, tmp_path / "m67.ecsv"))
    np.testing.assert_array_equal(back["member_prob"], cat["member_prob"])


def test_fetch_second_call_reads_cache_without_network(
    archive: FakeArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gaia.fetch("M67", cache_dir=tmp_path, gmax=19)
    files = list(tmp_path.glob("*.ecsv"))
    assert len(files) == 1 and files[0].name.startswith("m67_dr3_")
    header = Table.read(files[0], format="ascii.ecsv").meta
    for key in ("query", "query_date", "gaia_release", "clusterhbm_version", "n_rows",
                "checksum_sha256"):
        assert key in header
    monkeypatch.setattr(gaia, "_launch_query", FakeArchive(error=OSError("network is down")))
    second = gaia.fetch("NGC 2682", cache_dir=tmp_path, gmax=19)
    assert second.meta["from_cache"]
    assert second.meta["query_date"] == first.meta["query_date"]
    np.testing.assert_array_equal(second["member_prob"], first["member_prob"])
    np.testing.assert_array_equal(second["source_id"], first["source_id"])
    with pytest.raises(gaia.GaiaQueryError, match="network is down"):
        gaia.fetch("M67", cache_dir=tmp_path, gmax=19, refresh=True)  # refresh queries
    assert len(archive.calls) == 1


def test_refresh_forces_new_query(archive: FakeArchive, tmp_path: Path) -> None:
    gaia.fetch("M67", cache_dir=tmp_path)
    cat = gaia.fetch("M67", cache_dir=tmp_path, refresh=True)
    assert len(archive.calls) == 2 and not cat.meta["from_cache"]


def test_cache_dir_from_environment(
    archive: FakeArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gaia.CACHE_ENV_VAR, str(tmp_path / "envcache"))
    assert gaia.default_cache_dir() == tmp_path / "envcache"
    gaia.fetch("M67")
    assert len(list((tmp_path / "envcache").glob("m67_*.ecsv"))) == 1
    monkeypatch.delenv(gaia.CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gaia.default_cache_dir() == tmp_path / "home" / ".cache" / "clusterhbm"


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != gaia.CACHE_ENV_VAR}
    env["HOME"] = str(tmp_path)
    code = ("import sys, clusterhbm.gaia; "
            "assert not any(m.startswith(('astroquery', 'zero_point')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert not (tmp_path / ".cache").exists()


def _cache_file(tmp_path: Path) -> Path:
    (path,) = tmp_path.glob("*.ecsv")
    return path


def test_truncated_cache_is_detected_and_refetched(
    archive: FakeArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gaia.fetch("M67", cache_dir=tmp_path)
    path = _cache_file(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-300]))  # a partial file: valid ECSV, fewer rows
    with pytest.raises(gaia.CacheError, match="rows, header says 1494"):
        gaia.read_cache(path)
    with caplog.at_level(logging.WARNING, logger="clusterhbm.gaia"):
        cat = gaia.fetch("M67", cache_dir=tmp_path)
    assert "unusable" in caplog.text and "re-fetching" in caplog.text
    assert len(archive.calls) == 2 and not cat.meta["from_cache"]
    assert len(gaia.read_cache(path)) == 1494  # repaired


@pytest.mark.parametrize("damage", ["garbage", "edited value", "other query", "empty"])
def test_corrupt_cache_is_reported(
    archive: FakeArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    gaia.fetch("M67", cache_dir=tmp_path)
    path = _cache_file(tmp_path)
    text = path.read_text()
    if damage == "garbage":
        path.write_bytes(b"\x00\xff not an ECSV file \x89PNG")
        match = "cannot parse"
    elif damage == "edited value":
        last = text.rstrip("\n").rsplit("\n", 1)
        fields = last[1].split(" ")
        fields[1] = f"{float(fields[1]) + 1e-3!r}"  # shift one RA
        path.write_text(last[0] + "\n" + " ".join(fields) + "\n")
        match = "checksum"
    elif damage == "other query":
        header, body = text.split("\n# schema", 1)
        assert header.count("132.846") == 1
        path.write_text(header.replace("132.846", "132.847") + "\n# schema" + body)
        match = "another query"
    else:
        path.write_text("")
        match = "cannot parse"
    adql = gaia.build_query("M67")
    with pytest.raises(gaia.CacheError, match=match):
        gaia.read_cache(path, adql=adql)
    monkeypatch.setattr(gaia, "_launch_query", FakeArchive(error=TimeoutError("timed out")))
    with pytest.raises(gaia.GaiaQueryError, match="unusable"):
        gaia.fetch("M67", cache_dir=tmp_path)
    with pytest.raises(gaia.GaiaQueryError, match="offline and the cache file is unusable"):
        gaia.fetch("M67", cache_dir=tmp_path, offline=True)


def test_cache_round_trip_is_exact(m67_response: Table, tmp_path: Path) -> None:
    adql = gaia.build_query("M67")
    path = gaia.cache_path(adql, cluster="M67", cache_dir=tmp_path / "new")
    assert path.parent == tmp_path / "new" and not path.parent.exists()  # created on write
    gaia.write_cache(m67_response, path, adql=adql, cluster="M67")
    back = gaia.read_cache(path, adql=adql)
    plain = gaia._plain(m67_response)
    assert back.colnames == plain.colnames
    for name in plain.colnames:
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(plain[name]))
    assert back.meta["n_rows"] == 1494 and back.meta["gaia_release"] == "DR3"
    assert back.meta["query"] == adql
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    other = gaia.cache_path(gaia.build_query("M67", gmax=18), cluster="M67", cache_dir=tmp_path)
    assert other != path


def test_row_limit_warning(
    monkeypatch: pytest.MonkeyPatch, m67_response: Table, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeArchive(m67_response[:500])
    monkeypatch.setattr(gaia, "_launch_query", fake)
    with caplog.at_level(logging.WARNING, logger="clusterhbm.gaia"):
        cat = gaia.fetch("M67", cache_dir=tmp_path, row_limit=500)
    assert "500 rows = row_limit" in caplog.text
    assert cat.meta["row_limit_hit"] and cat.meta["n_rows_query"] == 500
    assert "SELECT TOP 500\n" in fake.calls[0][0]
    assert fake.calls[0][1] is False  # small limits run synchronously
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clusterhbm.gaia"):
        gaia.fetch("M67", cache_dir=tmp_path, row_limit=500)  # from cache: still warned
    assert "row_limit" in caplog.text and len(fake.calls) == 1
    gaia.fetch("M67", cache_dir=tmp_path, row_limit=501)
    assert fake.calls[-1][1] is False and len(fake.calls) == 2


def test_network_error_is_clear(no_network: FakeArchive, tmp_path: Path) -> None:
    with pytest.raises(gaia.GaiaQueryError, match=r"Gaia archive query failed.*ConnectionError"):
        gaia.fetch("M67", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.ecsv"))
    with pytest.raises(gaia.GaiaQueryError, match="offline and no cache file"):
        gaia.fetch("M67", cache_dir=tmp_path, offline=True)


def test_fetch_with_2mass_columns(monkeypatch: pytest.MonkeyPatch, m67_response: Table,
                                  tmp_path: Path) -> None:
    response = m67_response.copy()
    rng = np.random.default_rng(1)
    for band, err in (("j_m", "j_msigcom"), ("h_m", "h_msigcom"), ("ks_m", "ks_msigcom")):
        mag = np.ma.masked_array(np.asarray(response["phot_rp_mean_mag"]) - 1.0,
                                 mask=rng.random(len(response)) < 0.1)
        response[band] = mag
        response[err] = np.ma.masked_array(np.full(len(response), 0.03), mask=mag.mask)
    response["ph_qual"] = np.ma.masked_array(["AAA"] * len(response),
                                             mask=np.asarray(response["j_m"].mask))
    fake = FakeArchive(response)
    monkeypatch.setattr(gaia, "_launch_query", fake)
    cat = gaia.fetch("M67", cache_dir=tmp_path, with_2mass=True)
    assert "tm.ks_m" in fake.calls[0][0]
    assert {"j_m", "h_m", "ks_m", "j_msigcom", "h_msigcom", "ks_msigcom"} <= set(cat.colnames)
    assert np.isnan(np.asarray(cat["j_m"])).any() and np.isfinite(np.asarray(cat["j_m"])).any()
    again = gaia.fetch("M67", cache_dir=tmp_path, with_2mass=True)
    assert again.meta["from_cache"] and len(fake.calls) == 1


# ------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clusterhbm fetch")
    gaia.add_fetch_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments() -> None:
    args = _parse(["M67", "-o", "out.h5", "--radius-deg", "0.5", "--gmax", "18",
                   "--with-2mass", "--refresh"])
    assert args.name == "M67" and args.output == Path("out.h5")
    assert args.radius_deg == 0.5 and args.gmax == 18.0
    assert args.with_2mass and args.refresh and not args.offline
    defaults = _parse(["Pleiades"])
    assert defaults.row_limit == gaia.DEFAULT_ROW_LIMIT and defaults.release == "DR3"
    assert defaults.radius_deg is None and defaults.gmax is None and defaults.output is None


def test_cli_fetch_prints_what_it_did(archive: FakeArchive, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m67.ecsv"
    code = gaia.run_fetch(_parse(["M67", "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                                  "--gmax", "19", "--no-progress"]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows returned: " in printed and "Gaia DR3 archive" in printed
    assert re.search(r"cut ruwe < 1.4: removed \d+\n", printed)
    assert "members (p > 0.5): " in printed
    assert f"wrote {out}" in printed
    cat = validate_catalogue(Table.read(out))
    assert "member_prob" in cat.colnames and cat.meta["cluster"] == "M67"


def test_cli_served_from_preseeded_cache(
    no_network: FakeArchive, m67_response: Table, tmp_path: Path, capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How to run ``clusterhbm fetch M67`` without network: pre-seed the cache."""
    cache_dir = tmp_path / "cache"
    adql = gaia.build_query("M67")  # the query `clusterhbm fetch M67` would send
    gaia.write_cache(m67_response, gaia.cache_path(adql, cluster="M67", cache_dir=cache_dir),
                     adql=adql, cluster="M67", query_date="2024-01-01T00:00:00+00:00")
    monkeypatch.setenv(gaia.CACHE_ENV_VAR, str(cache_dir))
    monkeypatch.chdir(tmp_path)
    assert gaia.run_fetch(_parse(["M67"])) == 0  # default output ./m67_gaia.ecsv
    printed = capsys.readouterr().out
    assert "from cache" in printed
    assert no_network.calls == []
    cat = Table.read(tmp_path / "m67_gaia.ecsv")
    assert cat.meta["query_date"] == "2024-01-01T00:00:00+00:00"
    assert int(np.count_nonzero(np.asarray(cat["member_prob"]) > 0.5)) > 1000
    assert gaia.run_fetch(_parse(["M67", "--offline", "-o", "x.ecsv"])) == 0


def test_cli_network_error_one_line_exit_2(no_network: FakeArchive, tmp_path: Path,
                                           capsys) -> None:
    code = gaia.run_fetch(_parse(["M67", "--cache-dir", str(tmp_path), "-o",
                                  str(tmp_path / "x.ecsv")]))
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("clusterhbm fetch: error: Gaia archive query failed")
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "x.ecsv").exists()


def test_cli_unknown_cluster_exit_1(no_network: FakeArchive, capsys) -> None:
    assert gaia.run_fetch(_parse(["Pleiadess", "--offline"])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'Pleiades'" in err
    assert gaia.run_fetch(_parse(["NGC 6940"])) == 2  # online resolver unreachable
    assert "online name resolver failed" in capsys.readouterr().err


def test_cli_bad_option_exit_1(no_network: FakeArchive, capsys) -> None:
    assert gaia.run_fetch(_parse(["M67", "--radius-deg", "-1"])) == 1
    assert "radius_deg must be in (0, 30]" in capsys.readouterr().err


# ------------------------------------------------------------------ live (network)


@pytest.mark.remote_data
def test_live_fetch_m67(tmp_path: Path) -> None:
    cat = gaia.fetch("M67", radius_deg=0.15, gmax=15, cache_dir=tmp_path, row_limit=1500)
    assert 20 < len(cat) < 1500
    assert cat.meta["n_members"] > 10
    assert gaia.fetch("M67", radius_deg=0.15, gmax=15, cache_dir=tmp_path,
                      row_limit=1500).meta["from_cache"]


@pytest.mark.remote_data
def test_live_simbad_resolution() -> None:
    info = gaia.resolve_cluster("NGC 6940")
    assert info.source in ("simbad", "sesame")
    assert info.ra_deg == pytest.approx(308.6, abs=0.3)
