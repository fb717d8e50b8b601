"""Gaia data for named clusters: query, quality cuts, membership and an on-disk cache.

The data flow, one function per arrow::

    name --resolve_cluster--> ClusterInfo --build_query--> ADQL text
         --(network or cache)--> raw Gaia table --prepare--> magnitude errors, parallax
         zero point, quality cuts --membership_probability--> ``member_prob`` column
         = a catalogue (:mod:`clusterhbm.catalogue`)

:func:`fetch` chains them; :func:`add_fetch_arguments` and :func:`run_fetch` are the
``clusterhbm fetch`` command. Everything except :func:`fetch`, :func:`run_fetch` and the
cache helpers is pure: no network, no files.

Units
-----
Angles on the sky [deg]; proper motions [mas/yr]; parallaxes and the parallax zero point
[mas]; magnitudes and their errors [mag]. Column names are the Gaia archive names
(``gaiadr3.gaia_source``), see :mod:`clusterhbm.catalogue`.

Named clusters
--------------
``clusterhbm/data/open_clusters.ecsv`` lists well-known open clusters with the centre,
mean proper motion and mean parallax of Cantat-Gaudin et al. (2020), a half-member radius
and aliases. Names match ignoring case, spaces, punctuation, leading zeros and the SIMBAD
``Cl`` prefix (``"m 67"``, ``"NGC2682"``, ``"Cl NGC 2682"`` all give M67). A name not in
the table is resolved online with SIMBAD (astroquery), then Sesame, and a warning says so.

Quality cuts (defaults)
-----------------------
``ruwe < 1.4``
    Renormalised unit weight error (Lindegren et al. 2021, A&A 649, A2): larger values
    flag poorly fitting (often binary) astrometric solutions. Stars without RUWE fail.
``parallax / parallax_error > 5``
    Parallax signal-to-noise, computed with the zero-point-corrected parallax. A cut on the
    observed parallax selects on the parallax itself and biases distant faint stars high:
    lower it (or pass ``None``) for distant clusters. Stars without parallax fail.
``|C*| < 3 sigma_C*(G)``
    Corrected BP/RP flux excess factor C* and its scatter sigma_C*(G) (Riello et al. 2021,
    A&A 649, A3, Eq. 6, Table 2 and Eq. 18): removes blended BP/RP photometry. Stars
    without BP or RP are not tested and kept.

Each cut reports how many stars it removed (applied in this order) in
``meta["quality_cuts"]`` and in the log.

Magnitude errors
----------------
``phot_*_mean_mag_error = sqrt((2.5 / ln 10 / flux_over_error)**2 + floor**2)``. The
default floor is the Gaia EDR3 photometric zero-point uncertainty per band (Riello et al.
2021): 2.8 mmag (G), 2.8 mmag (BP), 3.8 mmag (RP); pass ``mag_error_floor`` to change it.

Parallax zero point
-------------------
Lindegren et al. (2021, A&A 649, A4) recipe via the ``gaiadr3-zeropoint`` package for
5- and 6-parameter (E)DR3 solutions with 6 < G < 21, 1.1 < nu_eff < 1.9 (5p) or
1.24 < pseudocolour < 1.72 (6p). ``parallax_zpt`` holds it; ``parallax`` has it
subtracted; ``parallax_uncorrected`` keeps the archive value. Outside the validity range,
for 2-parameter solutions and for DR2, ``parallax_zpt`` is NaN and the parallax is left
as it came (counted in the log and in ``meta["zero_point"]``).

Membership
----------
A two-component Gaussian mixture in (pmra, pmdec, parallax), fitted by expectation
maximisation with each star's measurement covariance convolved into both components
("extreme deconvolution", Bovy, Hogg & Roweis 2011, AOAS 5, 1657): a narrow cluster
component and a broad field component. ``member_prob`` is the posterior probability of
the cluster component. Downstream fits can use it as a prior weight or cut at 0.5.

Cache
-----
Raw query results are cached as ECSV (query text, date, Gaia release, package version,
row count and a data checksum in the header) in ``cache_dir``, else ``$CLUSTERHBM_CACHE``,
else ``~/.cache/clusterhbm`` (created on first write, never at import). A second
:func:`fetch` with the same query reads the cache without network; ``refresh=True``
queries again; a truncated or corrupt file is detected, reported and re-fetched.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import logging
import math
import os
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np
from astropy.table import Table

from .catalogue import PHOT_COLUMNS, TMASS_COLUMNS, validate_catalogue, write_catalogue

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_ROW_LIMIT",
    "GAIA_COLUMNS",
    "MAG_ERROR_FLOOR",
    "CacheError",
    "ClusterInfo",
    "GaiaQueryError",
    "MembershipFit",
    "UnknownClusterError",
    "add_fetch_arguments",
    "build_query",
    "cache_path",
    "default_cache_dir",
    "fetch",
    "known_clusters",
    "magnitude_error",
    "membership_probability",
    "parallax_zero_point",
    "prepare",
    "quality_cuts",
    "read_cache",
    "resolve_cluster",
    "run_fetch",
    "seed_cache",
    "write_cache",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache directory.
CACHE_ENV_VAR = "CLUSTERHBM_CACHE"
#: Default ``TOP`` of the ADQL query [rows].
DEFAULT_ROW_LIMIT = 200_000
#: The archive truncates synchronous jobs at this many rows: larger limits go asynchronous.
SYNC_ROW_LIMIT = 2_000
#: Gaia archive columns the model needs (``gaiadr3.gaia_source`` names).
GAIA_COLUMNS = (
    "source_id",
    "ra",
    "dec",
    "parallax",
    "parallax_error",
    "pmra",
    "pmra_error",
    "pmdec",
    "pmdec_error",
    "parallax_pmra_corr",
    "parallax_pmdec_corr",
    "pmra_pmdec_corr",
    "phot_g_mean_mag",
    "phot_bp_mean_mag",
    "phot_rp_mean_mag",
    "phot_g_mean_flux_over_error",
    "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error",
    "ruwe",
    "phot_bp_rp_excess_factor",
    "nu_eff_used_in_astrometry",
    "pseudocolour",
    "ecl_lat",
    "astrometric_params_solved",
)
#: 2MASS columns of ``gaiadr1.tmass_original_valid`` added by ``with_2mass``.
TMASS_QUERY_COLUMNS = (*(c for pair in TMASS_COLUMNS.values() for c in pair), "ph_qual")
#: Release -> (source table, 2MASS best-neighbour table).
GAIA_TABLES = {
    "DR3": ("gaiadr3.gaia_source", "gaiadr3.tmass_psc_xsc_best_neighbour"),
    "EDR3": ("gaiaedr3.gaia_source", "gaiaedr3.tmass_psc_xsc_best_neighbour"),
}
TMASS_TABLE = "gaiadr1.tmass_original_valid"
#: Default magnitude-error floor per band [mag]: EDR3 zero-point uncertainties (Riello+2021).
MAG_ERROR_FLOOR = {"G": 0.0027553202, "BP": 0.0027901700, "RP": 0.0037793818}
#: Default quality cuts (see the module docstring).
RUWE_MAX = 1.4
MIN_PARALLAX_OVER_ERROR = 5.0
EXCESS_NSIGMA = 3.0
#: Query radius for clusters resolved online without a size [deg].
ONLINE_DEFAULT_RADIUS_DEG = 0.5
#: EM iterations of each start before the best starts continue (membership).
_SHORT_EM = 60
#: Cache-file layout version (bump when the layout changes).
CACHE_FORMAT_VERSION = 1

_MAG_PER_FLUX = 2.5 / math.log(10.0)
_ASTROMETRY = ("pmra", "pmdec", "parallax")
_CORRELATIONS = {
    (0, 1): "pmra_pmdec_corr", (0, 2): "parallax_pmra_corr", (1, 2): "parallax_pmdec_corr",
}


class UnknownClusterError(ValueError):
    """A cluster name that is neither in the bundled table nor resolvable online."""


class GaiaQueryError(RuntimeError):
    """The Gaia archive (or the name resolver) could not be reached or refused the query."""


class CacheError(RuntimeError):
    """A cache file is missing, truncated, corrupt or belongs to another query."""


class ClusterInfo(NamedTuple):
    """Where a cluster is and how it moves.

    Attributes
    ----------
    name : str
        Display name (e.g. ``"M67"``).
    ra_deg, dec_deg : float
        Centre (ICRS) [deg].
    pmra_masyr, pmdec_masyr : float
        Mean proper motion [mas/yr] (``pmra`` includes cos dec); NaN when unknown.
    parallax_mas : float
        Mean parallax [mas]; NaN when unknown.
    r50_deg : float
        Radius containing half the members [deg]; NaN when unknown.
    radius_deg : float
        Default query cone radius [deg].
    aliases : tuple of str
        Other designations.
    reference : str
        Catalogue the values come from.
    source : str
        ``"table"`` (bundled table), ``"simbad"`` or ``"sesame"`` (resolved online).
    """

    name: str
    ra_deg: float
    dec_deg: float
    pmra_masyr: float
    pmdec_masyr: float
    parallax_mas: float
    r50_deg: float
    radius_deg: float
    aliases: tuple[str, ...] = ()
    reference: str = ""
    source: str = "table"


class MembershipFit(NamedTuple):
    """Result of :func:`membership_probability`.

    Attributes
    ----------
    prob : ndarray, shape (n,)
        Posterior probability of the cluster component per star, in [0, 1]. Stars with
        some astrometry missing use the marginal over the dimensions they have; stars
        with none get the cluster fraction.
    cluster_mean, field_mean : ndarray, shape (3,)
        Component means (pmra [mas/yr], pmdec [mas/yr], parallax [mas]).
    cluster_cov, field_cov : ndarray, shape (3, 3)
        Intrinsic (error-deconvolved) component covariances [same units squared].
    cluster_fraction : float
        Mixture weight of the cluster component.
    log_likelihood : float
        Total log likelihood of the stars with full astrometry at the optimum.
    num_iter : int
        EM iterations run.
    converged : bool
        Whether the relative log-likelihood change fell below ``tol``.
    num_used : int
        Stars with full astrometry used in the fit.
    """

    prob: np.ndarray
    cluster_mean: np.ndarray
    cluster_cov: np.ndarray
    field_mean: np.ndarray
    field_cov: np.ndarray
    cluster_fraction: float
    log_likelihood: float
    num_iter: int
    converged: bool
    num_used: int


# --------------------------------------------------------------------------------------
# Named clusters
# --------------------------------------------------------------------------------------

_GREEK = {unicodedata.lookup(f"GREEK SMALL LETTER {name.upper()}"): name
          for name in ("alpha", "beta", "gamma", "delta", "zeta", "eta", "theta", "omicron")}
_WORD_SYNONYMS = {
    "messier": "m", "mel": "melotte", "cr": "collinder", "col": "collinder",
    "rup": "ruprecht", "per": "persei", "scl": "sculptoris", "vel": "velorum",
    "car": "carinae", "ber": "berenices", "com": "coma",
}
_LEADING_PREFIXES = {"cl", "cl*"}
_TRAILING_WORDS = {"cluster", "open", "oc"}


def _normalize_name(name: str) -> str:
    """Matching key: lower case, no spaces/punctuation/leading zeros/``Cl`` prefix."""
    s = unicodedata.normalize("NFKC", str(name)).strip().lower()
    for greek, latin in _GREEK.items():
        s = s.replace(greek, f" {latin} ")
    s = re.sub(r"[^a-z0-9*+]+", " ", s)
    words = s.split()
    while words and words[0] in _LEADING_PREFIXES:
        words = words[1:]
    while len(words) > 1 and words[-1] in _TRAILING_WORDS:
        words = words[:-1]
    words = [_WORD_SYNONYMS.get(w, w) for w in words]
    joined = "".join(words).replace("*", "")
    return re.sub(r"(?<![0-9])0+(?=[0-9])", "", joined)


@lru_cache(maxsize=1)
def _cluster_table() -> Table:
    ref = resources.files("clusterhbm").joinpath("data", "open_clusters.ecsv")
    with resources.as_file(ref) as path:
        return Table.read(path, format="ascii.ecsv")


@lru_cache(maxsize=1)
def _name_index() -> dict[str, int]:
    index: dict[str, int] = {}
    for i, row in enumerate(_cluster_table()):
        for alias in [row["name"], *str(row["aliases"]).split(";")]:
            key = _normalize_name(alias)
            if key and key in index and index[key] != i:
                raise RuntimeError(f"alias {alias!r} of the bundled cluster table is ambiguous")
            if key:
                index[key] = i
    return index


def known_clusters() -> Table:
    """The bundled table of named open clusters (a copy; see the module docstring)."""
    return _cluster_table().copy()


def _info_from_row(i: int) -> ClusterInfo:
    row = _cluster_table()[i]
    return ClusterInfo(
        name=str(row["name"]),
        ra_deg=float(row["ra"]),
        dec_deg=float(row["dec"]),
        pmra_masyr=float(row["pmra"]),
        pmdec_masyr=float(row["pmdec"]),
        parallax_mas=float(row["parallax"]),
        r50_deg=float(row["r50"]),
        radius_deg=float(row["radius"]),
        aliases=tuple(a.strip() for a in str(row["aliases"]).split(";") if a.strip()),
        reference=str(row["reference"]),
        source="table",
    )


def _close_matches(name: str, num: int = 5) -> list[str]:
    key = _normalize_name(name)
    index = _name_index()
    keys = difflib.get_close_matches(key, list(index), n=3 * num, cutoff=0.6)
    table = _cluster_table()
    out: list[str] = []
    for k in keys:
        display = str(table[index[k]]["name"])
        if display not in out:
            out.append(display)
    return out[:num]


def _unknown_message(name: str) -> str:
    close = _close_matches(name)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown cluster {name!r}: expected one of the {len(_cluster_table())} named clusters "
        f"of the bundled table (clusterhbm.gaia.known_clusters()) or a name SIMBAD knows{hint}"
    )


def resolve_cluster(name: str, *, online: bool = True) -> ClusterInfo:
    """Find a cluster by name in the bundled table, else (``online``) with SIMBAD/Sesame.

    Parameters
    ----------
    name : str
        Any alias (``"M67"``, ``"NGC 2682"``, ``"Cl Melotte 22"``, ``"alpha Per"``...).
    online : bool, optional
        Query SIMBAD, then Sesame, for a name not in the table (logged as a warning).

    Returns
    -------
    ClusterInfo

    Raises
    ------
    UnknownClusterError
        The name is not in the table (and not found online), with close matches.
    GaiaQueryError
        ``online`` and the resolver could not be reached.
    """
    if not isinstance(name, str) or not _normalize_name(name):
        raise UnknownClusterError(f"cluster name must be a non-empty string, got {name!r}")
    i = _name_index().get(_normalize_name(name))
    if i is not None:
        return _info_from_row(i)
    if not online:
        raise UnknownClusterError(_unknown_message(name))
    try:
        info = _resolve_online(name)
    except LookupError as exc:
        raise UnknownClusterError(f"{_unknown_message(name)} ({exc})") from exc
    except Exception as exc:  # network boundary: anything the resolvers raise
        raise GaiaQueryError(
            f"{name!r} is not in the bundled cluster table and the online name resolver "
            f"failed ({type(exc).__name__}: {_one_line(str(exc))})"
        ) from exc
    log.warning(
        "%r is not in the bundled cluster table; resolved online with %s as %r at "
        "(ra, dec) = (%.4f, %.4f) deg, query radius %.2f deg",
        name, info.source.upper(), info.name, info.ra_deg, info.dec_deg, info.radius_deg,
    )
    return info


def _masked_float(row: Any, col: str) -> float:
    if col not in row.colnames:
        return math.nan
    value = row[col]
    if np.ma.is_masked(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _resolve_online(name: str) -> ClusterInfo:
    """Resolve ``name`` with SIMBAD (centre, proper motion, parallax, size), else Sesame.

    Raises ``LookupError`` when neither knows the name; network errors propagate.
    """
    from astroquery.simbad import Simbad

    simbad = Simbad()
    simbad.add_votable_fields("pmra", "pmdec", "plx_value", "dim")
    result = simbad.query_object(name)
    if result is not None and len(result) > 0:
        row = result[0]
        major_arcmin = _masked_float(row, "galdim_majaxis")
        r50 = major_arcmin / 2.0 / 60.0 if np.isfinite(major_arcmin) else math.nan
        radius = (float(np.clip(3.0 * r50, 0.1, 10.0)) if np.isfinite(r50)
                  else ONLINE_DEFAULT_RADIUS_DEG)
        main_id = " ".join(str(row["main_id"]).split()) if "main_id" in row.colnames else name
        return ClusterInfo(
            name=main_id or name,
            ra_deg=_masked_float(row, "ra"),
            dec_deg=_masked_float(row, "dec"),
            pmra_masyr=_masked_float(row, "pmra"),
            pmdec_masyr=_masked_float(row, "pmdec"),
            parallax_mas=_masked_float(row, "plx_value"),
            r50_deg=r50,
            radius_deg=radius,
            aliases=(name,),
            reference="SIMBAD (resolved online)",
            source="simbad",
        )
    from astropy.coordinates import SkyCoord
    from astropy.coordinates.name_resolve import NameResolveError

    try:
        coord = SkyCoord.from_name(name)
    except NameResolveError as exc:
        raise LookupError(f"neither SIMBAD nor Sesame knows {name!r}") from exc
    return ClusterInfo(
        name=name, ra_deg=float(coord.icrs.ra.deg), dec_deg=float(coord.icrs.dec.deg),
        pmra_masyr=math.nan, pmdec_masyr=math.nan, parallax_mas=math.nan, r50_deg=math.nan,
        radius_deg=ONLINE_DEFAULT_RADIUS_DEG, aliases=(name,),
        reference="Sesame (resolved online)", source="sesame",
    )


# --------------------------------------------------------------------------------------
# Query text
# --------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Short exact-enough decimal for ADQL (6 decimals, trailing zeros dropped)."""
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _check_release(release: str) -> str:
    rel = str(release).upper().strip()
    if rel not in GAIA_TABLES:
        raise ValueError(
            f"release must be one of {tuple(GAIA_TABLES)} (the query needs RUWE, nu_eff and "
            f"pseudocolour, absent from DR2), got {release!r}"
        )
    return rel


def _check_query_options(radius_deg: float, gmax: float | None, row_limit: int) -> None:
    if not (np.isfinite(radius_deg) and 0.0 < radius_deg <= 30.0):
        raise ValueError(f"radius_deg must be in (0, 30] deg, got {radius_deg!r}")
    if gmax is not None and not (np.isfinite(gmax) and 3.0 <= gmax <= 23.0):
        raise ValueError(f"gmax must be None or a G magnitude in [3, 23], got {gmax!r}")
    if isinstance(row_limit, bool) or not isinstance(row_limit, (int, np.integer)) or row_limit < 1:
        raise ValueError(f"row_limit must be a positive integer, got {row_limit!r}")


def build_query(
    name_or_info: str | ClusterInfo,
    *,
    radius_deg: float | None = None,
    gmax: float | None = None,
    with_2mass: bool = False,
    row_limit: int = DEFAULT_ROW_LIMIT,
    release: str = "DR3",
) -> str:
    """ADQL text for a cone around a cluster; builds offline, touches no network.

    Parameters
    ----------
    name_or_info : str or ClusterInfo
        A name of the bundled table (looked up offline) or a resolved :class:`ClusterInfo`.
    radius_deg : float, optional
        Cone radius [deg]; default the cluster's ``radius_deg``.
    gmax : float, optional
        Keep ``phot_g_mean_mag < gmax`` [mag]; default no magnitude limit.
    with_2mass : bool, optional
        Left-join the 2MASS best neighbour (``j_m``, ``h_m``, ``ks_m`` and ``*_msigcom``).
    row_limit : int, optional
        ``SELECT TOP row_limit``; rows are ordered by G so a truncated answer keeps the
        brightest stars.
    release : {"DR3", "EDR3"}, optional
        Gaia release (source tables).

    Returns
    -------
    str
        The ADQL query.

    Raises
    ------
    UnknownClusterError
        ``name_or_info`` is a name not in the bundled table (resolve it first with
        :func:`resolve_cluster`, which may go online).
    ValueError
        An option is out of range.
    """
    info = (name_or_info if isinstance(name_or_info, ClusterInfo)
            else resolve_cluster(name_or_info, online=False))
    radius = float(info.radius_deg if radius_deg is None else radius_deg)
    _check_query_options(radius, gmax, row_limit)
    if not (np.isfinite(info.ra_deg) and np.isfinite(info.dec_deg) and -90 <= info.dec_deg <= 90):
        raise ValueError(
            f"cluster centre must be finite (ra, dec) in deg, got ({info.ra_deg}, {info.dec_deg})")
    source_table, tmass_xmatch = GAIA_TABLES[_check_release(release)]
    columns = [f"g.{c}" for c in GAIA_COLUMNS]
    joins = ""
    if with_2mass:
        columns += [f"tm.{c}" for c in TMASS_QUERY_COLUMNS]
        # one best neighbour per Gaia source; its original_ext_source_id is the 2MASS
        # PSC designation (Gaia archive documentation, cross-match tables)
        joins = (
            f"LEFT OUTER JOIN {tmass_xmatch} AS xm ON xm.source_id = g.source_id\n"
            f"LEFT OUTER JOIN {TMASS_TABLE} AS tm ON tm.designation = xm.original_ext_source_id\n"
        )
    cone = f"CIRCLE('ICRS', {_fmt(info.ra_deg)}, {_fmt(info.dec_deg)}, {_fmt(radius)})"
    where = [f"1 = CONTAINS(POINT('ICRS', g.ra, g.dec), {cone})"]
    if gmax is not None:
        where.append(f"g.phot_g_mean_mag < {_fmt(gmax)}")
    return (
        f"SELECT TOP {int(row_limit)}\n    "
        + ",\n    ".join(columns)
        + f"\nFROM {source_table} AS g\n"
        + joins
        + "WHERE "
        + "\n  AND ".join(where)
        + "\nORDER BY g.phot_g_mean_mag ASC"
    )


# --------------------------------------------------------------------------------------
# Network boundary (tests monkeypatch _launch_query)
# --------------------------------------------------------------------------------------


def _launch_query(adql: str, *, async_job: bool) -> Table:
    """Run ``adql`` on the Gaia archive with astroquery; the only Gaia network call."""
    from astroquery.gaia import Gaia

    job = Gaia.launch_job_async(adql) if async_job else Gaia.launch_job(adql)
    return job.get_results()


class _Progress:
    """Elapsed-time indicator on a stream while a blocking call runs (off by default)."""

    _FRAMES = "|/-\\"

    def __init__(self, label: str, *, enabled: bool, stream: Any = None, interval: float = 0.25):
        self.label = label
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.interval):
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"\r{self.label} {self._FRAMES[i % 4]} {elapsed:5.0f} s")
            self.stream.flush()
            i += 1

    def __enter__(self) -> Self:
        self._t0 = time.monotonic()
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"\r{self.label} done in {elapsed:.1f} s\n")
            self.stream.flush()


def _run_query(adql: str, *, async_job: bool, progress: bool) -> Table:
    label = "querying the Gaia archive" + (" (asynchronous job)" if async_job else "")
    log.info("%s:\n%s", label, adql)
    try:
        with _Progress(label, enabled=progress):
            result = _launch_query(adql, async_job=async_job)
    except Exception as exc:  # network boundary: requests, astroquery, pyvo, socket...
        raise GaiaQueryError(
            f"Gaia archive query failed ({type(exc).__name__}: {_one_line(str(exc))}); "
            "check the network connection or use a cached result"
        ) from exc
    if not isinstance(result, Table):
        raise GaiaQueryError(f"Gaia archive returned {type(result).__name__}, expected a Table")
    return result


def _one_line(text: str, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _plain(table: Table) -> Table:
    """Copy with lower-case names, masked floats as NaN, masked strings as ''."""
    out = Table(meta=dict(table.meta))
    for name in table.colnames:
        col = table[name]
        data = col
        if hasattr(col, "mask") and np.any(col.mask):
            kind = col.dtype.kind
            if kind == "f":
                data = np.asarray(col.filled(np.nan))
            elif kind in "iu" and name.lower() == "source_id":
                raise ValueError("source_id has missing values")
            elif kind in "iu":
                data = np.asarray(col.astype(float).filled(np.nan))
            elif kind in "USO":
                data = np.asarray(col.filled(""))
        else:
            data = np.asarray(col)
        if data.dtype.kind == "S":
            data = np.char.decode(data, "utf-8", errors="replace")
        elif data.dtype.kind == "O":  # VOTable strings may come as objects
            data = np.array(["" if v is None or np.ma.is_masked(v) else
                             (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                             for v in data.tolist()], dtype=str)
        out[name.lower()] = data
        unit = getattr(col, "unit", None)
        if unit is not None:
            out[name.lower()].unit = unit
    return out


# --------------------------------------------------------------------------------------
# Preparation: magnitude errors, parallax zero point, quality cuts
# --------------------------------------------------------------------------------------


def magnitude_error(flux_over_error: Any, *, floor: float = 0.0) -> np.ndarray:
    """Magnitude error from flux-over-error, with a floor added in quadrature.

    Parameters
    ----------
    flux_over_error : array_like, shape (n,)
        ``phot_*_mean_flux_over_error`` (dimensionless).
    floor : float, optional
        Systematic floor [mag], added in quadrature.

    Returns
    -------
    ndarray, shape (n,)
        ``sqrt((2.5 / ln 10 / flux_over_error)**2 + floor**2)`` [mag]; NaN where the
        flux-over-error is missing or not positive.
    """
    if not (np.isfinite(floor) and floor >= 0.0):
        raise ValueError(f"floor must be a finite magnitude >= 0, got {floor!r}")
    foe = np.asarray(flux_over_error, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(foe > 0, _MAG_PER_FLUX / foe, np.nan)
    return np.hypot(stat, floor)


def _zero_point_module() -> Any:
    try:
        from zero_point import zpt
    except ImportError as exc:
        raise ImportError(
            "the Lindegren et al. (2021) parallax zero point needs the package "
            "'gaiadr3-zeropoint' (pip install gaiadr3-zeropoint); or pass zero_point=False"
        ) from exc
    if getattr(zpt, "g_5", None) is None:
        zpt.load_tables()
    return zpt


def parallax_zero_point(
    phot_g_mean_mag: Any,
    nu_eff_used_in_astrometry: Any,
    pseudocolour: Any,
    ecl_lat: Any,
    astrometric_params_solved: Any,
) -> np.ndarray:
    """Lindegren et al. (2021) parallax zero point for Gaia (E)DR3 sources.

    A wrapper of ``zero_point.zpt.get_zpt`` (package ``gaiadr3-zeropoint``) that takes
    arrays with missing values and never raises on a star outside the recipe.

    Parameters
    ----------
    phot_g_mean_mag : array_like, shape (n,)
        G [mag].
    nu_eff_used_in_astrometry : array_like, shape (n,)
        Effective wavenumber of 5-parameter solutions [1/um]; NaN otherwise.
    pseudocolour : array_like, shape (n,)
        Pseudocolour of 6-parameter solutions [1/um]; NaN otherwise.
    ecl_lat : array_like, shape (n,)
        Ecliptic latitude [deg].
    astrometric_params_solved : array_like, shape (n,)
        31 (5p), 95 (6p) or 3 (2p).

    Returns
    -------
    ndarray, shape (n,)
        Zero point [mas], to be *subtracted* from the parallax. NaN for 2-parameter
        solutions, missing inputs, and outside 6 < G < 21, 1.1 < nu_eff < 1.9 (5p),
        1.24 < pseudocolour < 1.72 (6p).
    """
    arrays = [np.atleast_1d(np.asarray(a, dtype=float)) for a in (
        phot_g_mean_mag, nu_eff_used_in_astrometry, pseudocolour, ecl_lat,
        astrometric_params_solved)]
    try:
        g, nu, pc, beta, sol = np.broadcast_arrays(*arrays)
    except ValueError as exc:
        raise ValueError(
            f"zero-point inputs must have one shape, got {[a.shape for a in arrays]}") from exc
    zpt = np.full(g.shape, np.nan)
    is5, is6 = sol == 31, sol == 95
    valid = np.isfinite(g) & np.isfinite(beta) & (
        (is5 & np.isfinite(nu)) | (is6 & np.isfinite(pc)))
    if np.any(valid):
        module = _zero_point_module()
        with np.errstate(invalid="ignore"):
            zpt[valid] = module.get_zpt(
                g[valid], nu[valid], pc[valid], beta[valid], sol[valid], _warnings=False)
    return zpt


def _column(table: Table, name: str) -> np.ndarray:
    col = table[name]
    if hasattr(col, "filled") and col.dtype.kind in "fiu":
        col = col.astype(float).filled(np.nan)
    return np.asarray(col, dtype=float)


def _corrected_excess(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """C* and sigma_C*(G) of Riello et al. (2021, Eq. 6, Table 2, Eq. 18)."""
    c = _column(table, "phot_bp_rp_excess_factor")
    x = _column(table, "phot_bp_mean_mag") - _column(table, "phot_rp_mean_mag")
    g = _column(table, "phot_g_mean_mag")
    f = np.where(
        x < 0.5,
        1.154360 + 0.033772 * x + 0.032277 * x**2,
        np.where(x < 4.0,
                 1.162004 + 0.011464 * x + 0.049255 * x**2 - 0.005879 * x**3,
                 1.057572 + 0.140537 * x),
    )
    sigma = 0.0059898 + 8.817481e-12 * g**7.618399
    return c - f, sigma


def quality_cuts(
    table: Table,
    *,
    ruwe_max: float | None = RUWE_MAX,
    min_parallax_over_error: float | None = MIN_PARALLAX_OVER_ERROR,
    excess_nsigma: float | None = EXCESS_NSIGMA,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Which stars pass the documented quality cuts, and what each cut removed.

    Parameters
    ----------
    table : Table
        Gaia columns (``ruwe``, ``parallax``, ``parallax_error``,
        ``phot_bp_rp_excess_factor``, G/BP/RP magnitudes).
    ruwe_max, min_parallax_over_error, excess_nsigma : float or None, optional
        Thresholds (module docstring); ``None`` disables a cut. A cut whose column is
        absent is skipped with a log message.

    Returns
    -------
    keep : ndarray of bool, shape (n,)
    report : list of dict
        Per cut, in order: ``cut`` (text), ``n_removed`` (among stars that passed the
        earlier cuts), ``n_not_tested`` (kept because the inputs are missing).
    """
    n = len(table)
    keep = np.ones(n, dtype=bool)
    report: list[dict[str, Any]] = []

    def apply(label: str, passed: np.ndarray, not_tested: np.ndarray | None = None) -> None:
        nonlocal keep
        removed = int(np.count_nonzero(keep & ~passed))
        keep = keep & passed
        entry = {"cut": label, "n_removed": removed,
                 "n_not_tested": int(np.count_nonzero(not_tested)) if not_tested is not None else 0}
        report.append(entry)
        log.info("quality cut %s removed %d star(s)", label, removed)

    if ruwe_max is not None:
        if "ruwe" in table.colnames:
            ruwe = _column(table, "ruwe")
            with np.errstate(invalid="ignore"):
                apply(f"ruwe < {ruwe_max:g}", ruwe < ruwe_max)
        else:
            log.info("no 'ruwe' column: RUWE cut skipped")
    if min_parallax_over_error is not None:
        if {"parallax", "parallax_error"} <= set(table.colnames):
            with np.errstate(invalid="ignore", divide="ignore"):
                snr = _column(table, "parallax") / _column(table, "parallax_error")
                apply(f"parallax_over_error > {min_parallax_over_error:g}",
                      snr > min_parallax_over_error)
        else:
            log.info("no parallax columns: parallax S/N cut skipped")
    if excess_nsigma is not None:
        needed = {"phot_bp_rp_excess_factor", "phot_bp_mean_mag", "phot_rp_mean_mag",
                  "phot_g_mean_mag"}
        if needed <= set(table.colnames):
            cstar, sigma = _corrected_excess(table)
            untested = ~np.isfinite(cstar)
            with np.errstate(invalid="ignore"):
                passed = untested | (np.abs(cstar) < excess_nsigma * sigma)
            apply(f"|C*| < {excess_nsigma:g} sigma_C*(G)", passed, untested)
        else:
            log.info("no BP/RP excess columns: excess cut skipped")
    return keep, report


def _floors(mag_error_floor: float | Mapping[str, float] | None) -> dict[str, float]:
    if mag_error_floor is None:
        return dict(MAG_ERROR_FLOOR)
    if isinstance(mag_error_floor, Mapping):
        unknown = set(mag_error_floor) - set(PHOT_COLUMNS)
        if unknown:
            raise ValueError(
                f"mag_error_floor keys must be among {tuple(PHOT_COLUMNS)}, got {sorted(unknown)}")
        return {b: float(mag_error_floor.get(b, MAG_ERROR_FLOOR[b])) for b in PHOT_COLUMNS}
    return {b: float(mag_error_floor) for b in PHOT_COLUMNS}


def prepare(
    table: Table,
    *,
    release: str = "DR3",
    zero_point: bool = True,
    apply_cuts: bool = True,
    ruwe_max: float | None = RUWE_MAX,
    min_parallax_over_error: float | None = MIN_PARALLAX_OVER_ERROR,
    excess_nsigma: float | None = EXCESS_NSIGMA,
    mag_error_floor: float | Mapping[str, float] | None = None,
) -> Table:
    """Magnitude errors, parallax zero point and quality cuts on a raw Gaia table.

    Parameters
    ----------
    table : Table
        Gaia archive columns (e.g. the answer to :func:`build_query`). Not modified.
    release : {"DR2", "EDR3", "DR3"}, optional
        The zero point applies to EDR3/DR3 only.
    zero_point : bool, optional
        Apply the Lindegren et al. (2021) zero point (needs ``gaiadr3-zeropoint``).
    apply_cuts : bool, optional
        Remove stars failing :func:`quality_cuts` (thresholds as there).
    ruwe_max, min_parallax_over_error, excess_nsigma : float or None, optional
        Cut thresholds; ``None`` disables one.
    mag_error_floor : float or dict or None, optional
        Magnitude-error floor [mag], one value or per band ``{"G", "BP", "RP"}``;
        default :data:`MAG_ERROR_FLOOR`.

    Returns
    -------
    Table
        A new table with ``phot_*_mean_mag_error`` [mag]; ``parallax`` corrected,
        ``parallax_uncorrected`` and ``parallax_zpt`` [mas]; rows failing the cuts
        removed; ``meta["zero_point"]``, ``meta["quality_cuts"]``,
        ``meta["mag_error_floor"]`` and ``meta["gaia_release"]`` set.
    """
    rel = str(release).upper().strip()
    if rel not in ("DR2", "EDR3", "DR3"):
        raise ValueError(f"release must be one of ('DR2', 'EDR3', 'DR3'), got {release!r}")
    out = _plain(table)
    out.meta["gaia_release"] = rel
    floors = _floors(mag_error_floor)
    for band, (_mag, err, foe) in PHOT_COLUMNS.items():
        if foe in out.colnames:
            out[err] = magnitude_error(_column(out, foe), floor=floors[band])
            out[err].unit = "mag"
    out.meta["mag_error_floor"] = floors

    if zero_point and {"parallax", "parallax_error"} <= set(out.colnames):
        n = len(out)
        needed = ("phot_g_mean_mag", "nu_eff_used_in_astrometry", "pseudocolour", "ecl_lat",
                  "astrometric_params_solved")
        missing = [c for c in needed if c not in out.colnames]
        if rel == "DR2":
            zpt = np.full(n, np.nan)
            reason = "DR2: the Lindegren et al. (2021) recipe is for (E)DR3; not applied"
        elif missing:
            zpt = np.full(n, np.nan)
            reason = f"columns {missing} absent; not applied"
        else:
            zpt = parallax_zero_point(*(_column(out, c) for c in needed))
            reason = "Lindegren et al. (2021) via gaiadr3-zeropoint"
        plx = _column(out, "parallax")
        ok = np.isfinite(zpt)
        out["parallax_uncorrected"] = plx
        out["parallax_zpt"] = zpt
        out["parallax"] = np.where(ok, plx - np.where(ok, zpt, 0.0), plx)
        for c in ("parallax", "parallax_uncorrected", "parallax_zpt"):
            out[c].unit = "mas"
        n_ok = int(np.count_nonzero(ok))
        out.meta["zero_point"] = {"method": reason, "n_corrected": n_ok,
                                  "n_not_corrected": n - n_ok}
        if n - n_ok:
            log.info("parallax zero point: %d star(s) corrected, %d left uncorrected "
                     "(2-parameter solutions or outside the recipe's range) [%s]",
                     n_ok, n - n_ok, reason)
        else:
            log.info("parallax zero point applied to all %d star(s)", n)

    if apply_cuts:
        keep, report = quality_cuts(out, ruwe_max=ruwe_max,
                                    min_parallax_over_error=min_parallax_over_error,
                                    excess_nsigma=excess_nsigma)
        meta = out.meta
        out = out[keep]
        out.meta = meta
        out.meta["quality_cuts"] = report
        out.meta["n_before_cuts"] = len(keep)
        out.meta["n_after_cuts"] = int(np.count_nonzero(keep))
    else:
        out.meta["quality_cuts"] = []
    return out


# --------------------------------------------------------------------------------------
# Membership: two-component extreme deconvolution in (pmra, pmdec, parallax)
# --------------------------------------------------------------------------------------


def _astrometry(table: Table, *, use_correlations: bool) -> tuple[np.ndarray, np.ndarray]:
    """Data (n, 3) and measurement covariances (n, 3, 3); NaN where missing."""
    missing = [c for c in _ASTROMETRY + tuple(f"{c}_error" for c in _ASTROMETRY)
               if c not in table.colnames]
    if missing:
        raise ValueError(
            f"membership needs columns {list(_ASTROMETRY)} and their '_error' columns; "
            f"missing {missing}")
    x = np.column_stack([_column(table, c) for c in _ASTROMETRY])
    e = np.column_stack([_column(table, f"{c}_error") for c in _ASTROMETRY])
    cov = np.zeros((len(table), 3, 3))
    idx = np.arange(3)
    cov[:, idx, idx] = e**2
    if use_correlations:
        for (i, j), name in _CORRELATIONS.items():
            if name in table.colnames:
                rho = np.nan_to_num(_column(table, name), nan=0.0)
                cov[:, i, j] = cov[:, j, i] = rho * e[:, i] * e[:, j]
    return x, cov


def _robust_scale(x: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=0)
    scale = 1.4826 * np.median(np.abs(x - med), axis=0)
    fallback = np.std(x, axis=0)
    return np.where(scale > 0, scale, np.where(fallback > 0, fallback, 1.0))


def _density_mode(x: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Densest point of ``x`` (standardised by ``scale``): a data-driven cluster seed."""
    z = x / scale
    cand = z[rng.choice(len(z), size=min(len(z), 2000), replace=False)]
    ref = z[rng.choice(len(z), size=min(len(z), 20000), replace=False)]
    best, best_count = cand[0], -1
    for chunk in np.array_split(cand, max(1, len(cand) // 200)):
        d2 = ((chunk[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
        counts = (d2 < 0.1**2 * 3).sum(1)
        k = int(np.argmax(counts))
        if counts[k] > best_count:
            best, best_count = chunk[k], int(counts[k])
    near = ((z - best) ** 2).sum(1) < 0.2**2 * 3
    return (z[near].mean(0) if np.count_nonzero(near) >= 3 else best) * scale


def _mean_shift(x: np.ndarray, start: np.ndarray, scale: np.ndarray, *, bandwidth: float = 0.25,
                num_iter: int = 50) -> np.ndarray:
    """Gaussian-kernel mean shift from ``start`` to the nearest density peak of ``x``."""
    z, s = x / scale, start / scale
    for _ in range(num_iter):
        k = np.exp(-0.5 * ((z - s) ** 2).sum(1) / bandwidth**2)
        if k.sum() <= 1e-12:
            break
        new = (k[:, None] * z).sum(0) / k.sum()
        if np.abs(new - s).max() < 1e-4:
            s = new
            break
        s = new
    return s * scale


def _seed(init: ClusterInfo | Sequence[float] | None) -> np.ndarray:
    if init is None:
        return np.full(3, np.nan)
    if isinstance(init, ClusterInfo):
        return np.array([init.pmra_masyr, init.pmdec_masyr, init.parallax_mas], dtype=float)
    arr = np.asarray(init, dtype=float)
    if arr.shape != (3,):
        raise ValueError(
            f"init must be a ClusterInfo or (pmra, pmdec, parallax), got shape {arr.shape}")
    return arr


def _inv3(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and determinant of symmetric 3x3 matrices (..., 3, 3), by cofactors."""
    a00, a01, a02 = a[..., 0, 0], a[..., 0, 1], a[..., 0, 2]
    a11, a12, a22 = a[..., 1, 1], a[..., 1, 2], a[..., 2, 2]
    c00, c01, c02 = a11 * a22 - a12 * a12, a02 * a12 - a01 * a22, a01 * a12 - a02 * a11
    c11, c12, c22 = a00 * a22 - a02 * a02, a01 * a02 - a00 * a12, a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    inv = np.stack([np.stack([c00, c01, c02], -1), np.stack([c01, c11, c12], -1),
                    np.stack([c02, c12, c22], -1)], -2) / det[..., None, None]
    return inv, det


def _log_gauss(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """log N(x | mean, cov) for per-star covariances; x (n, d), cov (n, d, d)."""
    d = x.shape[1]
    chol = np.linalg.cholesky(cov)
    r = x - mean
    sol = np.linalg.solve(chol, r[..., None])[..., 0]
    maha = (sol**2).sum(-1)
    logdet = 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return -0.5 * (maha + logdet + d * math.log(2.0 * math.pi))


def _em(
    x: np.ndarray, cov: np.ndarray, mu: np.ndarray, t: np.ndarray, w: np.ndarray, *,
    max_iter: int, tol: float, jitter: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int, bool]:
    """Extreme-deconvolution EM for 2 components in 3-D; returns (mu, T, w, logL, it, ok)."""
    n, d = x.shape
    const = d * math.log(2.0 * math.pi)
    ll, ll_old, converged, it = -np.inf, -np.inf, False, 0
    for it in range(1, max_iter + 1):
        v_inv, v_det = _inv3(t[:, None] + cov[None])  # (2, n, 3, 3), (2, n)
        r = x[None] - mu[:, None]  # (2, n, 3)
        v_inv_r = (v_inv @ r[..., None])[..., 0]
        logp = np.log(w)[:, None] - 0.5 * ((r * v_inv_r).sum(-1) + np.log(v_det) + const)
        lse = np.logaddexp(logp[0], logp[1])
        q = np.exp(logp - lse)
        ll = float(lse.sum())
        if abs(ll - ll_old) < tol * n:
            converged = True
            break
        # M step (Bovy et al. 2011, Eqs. 15-18): b = mu + T V^-1 r, B = T - T V^-1 T
        qs = q.sum(1)
        if np.any(qs < 1e-8 * n):
            break
        b = mu[:, None] + v_inv_r @ t  # T symmetric
        w = qs / n
        mu = (q[..., None] * b).sum(1) / qs[:, None]
        dev = b - mu[:, None]
        scatter = np.einsum("kn,kni,knj->kij", q, dev, dev)
        q_v_inv = np.einsum("kn,knij->kij", q, v_inv)
        sum_big_b = qs[:, None, None] * t - t @ q_v_inv @ t
        t = (scatter + sum_big_b) / qs[:, None, None]
        t = 0.5 * (t + np.swapaxes(t, 1, 2)) + jitter
        ll_old = ll
    return mu, t, w, ll, it, converged


def membership_probability(
    table: Table,
    *,
    init: ClusterInfo | Sequence[float] | None = None,
    max_iter: int = 3000,
    tol: float = 1e-6,
    use_correlations: bool = True,
    seed: int = 0,
) -> MembershipFit:
    """Fit a cluster + field mixture in (pmra, pmdec, parallax); per-star membership.

    The model for star i with measurement covariance C_i is
    ``f N(x_i | mu_c, T_c + C_i) + (1 - f) N(x_i | mu_f, T_f + C_i)``; (f, mu, T) are
    fitted by expectation maximisation (extreme deconvolution, Bovy et al. 2011). EM has
    local optima (e.g. a handful of bright stars as a tiny "cluster"), so it starts from
    ``init`` and from the densest point of the data (each moved to its nearby density peak
    by a mean shift), with a narrow and a locally estimated cluster, plus a
    cluster-dominated start; after a short run the two best continue to convergence and
    the highest likelihood wins among solutions whose cluster holds at least
    max(10, 1 %) of the stars. The component with the smaller intrinsic volume
    (det T) is the cluster; the field is the broad one.

    Parameters
    ----------
    table : Table
        Columns ``pmra``, ``pmdec`` [mas/yr], ``parallax`` [mas], their ``*_error``
        and, if present (``use_correlations``), ``pmra_pmdec_corr``,
        ``parallax_pmra_corr``, ``parallax_pmdec_corr``.
    init : ClusterInfo or (pmra, pmdec, parallax) or None, optional
        Approximate cluster mean (an extra start); NaN entries fall back to the data mode.
    max_iter : int, optional
        Maximum EM iterations.
    tol : float, optional
        Stop when the log likelihood per star changes by less than ``tol`` (the default
        gives probabilities to about 0.01).
    use_correlations : bool, optional
        Use the archive correlation coefficients in C_i.
    seed : int, optional
        Seed of the subsampling used to find the data mode (results are deterministic).

    Returns
    -------
    MembershipFit

    Raises
    ------
    ValueError
        Missing columns, or fewer than 10 stars with full astrometry.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    x_all, c_all = _astrometry(table, use_correlations=use_correlations)
    diag_all = np.diagonal(c_all, axis1=1, axis2=2)
    full = np.all(np.isfinite(x_all), 1) & np.all(np.isfinite(diag_all), 1)
    n_full = int(np.count_nonzero(full))
    if n_full < 10:
        raise ValueError(
            "membership needs at least 10 stars with finite pmra, pmdec, parallax and errors, "
            f"got {n_full} of {len(table)}")
    x, cov = x_all[full], c_all[full]
    n = x.shape[0]
    scale = _robust_scale(x)
    jitter = np.diag((1e-6 * scale) ** 2)
    # Several starts, the best valid optimum wins (EM finds local optima, e.g. a few bright
    # stars as a tiny "cluster"): from the given seed and from the densest point (each
    # moved to its nearby density peak), a narrow and a locally estimated cluster; and a
    # cluster-dominated start (a proper-motion pre-selected sample is mostly members).
    mode = _density_mode(x, scale, np.random.default_rng(seed))
    seeds = [_mean_shift(x, mode, scale)]
    given = _seed(init)
    if np.any(np.isfinite(given)):
        from_init = _mean_shift(x, np.where(np.isfinite(given), given, mode), scale)
        if np.abs((from_init - seeds[0]) / scale).max() > 0.05:
            seeds.insert(0, from_init)
    field0 = np.cov(x.T) + np.diag((0.1 * scale) ** 2)
    median = np.median(x, axis=0)
    starts = []
    for mu_c in seeds:
        kern = np.exp(-0.5 * (((x - mu_c) / scale) ** 2).sum(1) / 0.25**2)
        local = (kern[:, None, None] * np.einsum("ni,nj->nij", x - mu_c, x - mu_c)).sum(0)
        local = local / max(kern.sum(), 1e-12) + np.diag((0.02 * scale) ** 2)
        starts += [(mu_c, np.diag((0.1 * scale) ** 2), 0.5), (mu_c, local, 0.8)]
    starts.append((median, np.diag((0.5 * scale) ** 2), 0.9))
    min_members = max(10.0, 0.01 * n)

    def ranked(fit: tuple) -> tuple[tuple, tuple[bool, float]]:
        mu, t, w = fit[:3]
        if np.linalg.det(t[0]) > np.linalg.det(t[1]):  # the narrower component is the cluster
            fit = (mu[::-1], t[::-1], w[::-1], *fit[3:])
        valid = bool(fit[2][0] * n >= min_members)
        log.debug("membership start: cluster weight %.3f, log L %.3f after %d iterations, "
                  "valid %s", fit[2][0], fit[3], fit[4], valid)
        return fit, (valid, fit[3])

    # short runs from every start, then the two best continue to convergence
    short = [ranked(_em(x, cov, np.array([mu_c, median]), np.array([t_c0, field0]),
                        np.array([w_c0, 1.0 - w_c0]), max_iter=min(max_iter, _SHORT_EM),
                        tol=tol, jitter=jitter))
             for mu_c, t_c0, w_c0 in starts]
    short.sort(key=lambda item: item[1], reverse=True)
    finals = []
    for fit, _ in short[:2]:
        mu, t, w, _ll, done, ok = fit
        if not ok and done < max_iter:
            more = _em(x, cov, mu, t, w, max_iter=max_iter - done, tol=tol, jitter=jitter)
            fit = (*more[:4], done + more[4], more[5])
        finals.append(ranked(fit))
    (mu, t, w, ll, it, converged), (valid, _) = max(finals, key=lambda item: item[1])
    if not valid:
        log.warning("membership: the cluster component holds fewer than %d stars", min_members)
    if not converged:
        log.warning("membership EM did not converge in %d iterations", it)

    prob = np.full(len(table), float(w[0]))
    finite = np.isfinite(x_all) & np.isfinite(diag_all)
    patterns = {tuple(row) for row in finite[np.any(finite, 1)]}
    for pattern in patterns:
        dims = np.flatnonzero(pattern)
        rows = np.flatnonzero(np.all(finite == np.array(pattern), 1))
        xs = x_all[np.ix_(rows, dims)]
        cs = c_all[np.ix_(rows, dims, dims)]
        lp = [np.log(w[k]) + _log_gauss(xs, mu[k][dims], t[k][np.ix_(dims, dims)] + cs)
              for k in range(2)]
        prob[rows] = np.exp(lp[0] - np.logaddexp(lp[0], lp[1]))
    ll_final = ll
    log.info(
        "membership: cluster fraction %.3f, mean (pmra, pmdec, parallax) = (%.3f, %.3f, %.4f), "
        "%d iterations", w[0], *mu[0], it)
    return MembershipFit(
        prob=prob, cluster_mean=mu[0], cluster_cov=t[0], field_mean=mu[1], field_cov=t[1],
        cluster_fraction=float(w[0]), log_likelihood=ll_final, num_iter=it,
        converged=converged, num_used=n_full,
    )


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return importlib.metadata.version("clusterhbm")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def default_cache_dir() -> Path:
    """``$CLUSTERHBM_CACHE`` if set, else ``~/.cache/clusterhbm`` (not created here)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/clusterhbm").expanduser()


def cache_path(
    adql: str, *, cluster: str, release: str = "DR3", cache_dir: str | Path | None = None
) -> Path:
    """Cache file of a query: ``<cache_dir>/<cluster>_<release>_<hash of query>.ecsv``."""
    digest = hashlib.sha256(f"{release.upper()}\n{adql}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9]+", "", _normalize_name(cluster)) or "cluster"
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{slug}_{release.lower()}_{digest}.ecsv"


def _checksum(table: Table) -> str:
    h = hashlib.sha256()
    for name in table.colnames:
        arr = np.asarray(table[name])
        h.update(name.encode())
        if arr.dtype.kind == "f":
            nan = np.isnan(arr)
            h.update(nan.tobytes())
            h.update(np.where(nan, 0, arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        elif arr.dtype.kind in "iub":
            h.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        else:
            h.update("\x1f".join(map(str, arr.tolist())).encode())
    return h.hexdigest()


def write_cache(
    table: Table, path: str | Path, *, adql: str, cluster: str, release: str = "DR3",
    query_date: str | None = None,
) -> Path:
    """Write a raw query result as a self-describing ECSV cache file (atomically).

    The header records the query text, query date (UTC, ISO 8601), Gaia release,
    clusterhbm version, row count and a data checksum, which :func:`read_cache` checks.
    Returns the path. Use it to pre-seed a cache for offline work.
    """
    path = Path(path)
    out = _plain(table)
    out.meta = {
        "clusterhbm_cache_format": CACHE_FORMAT_VERSION,
        "cluster": cluster,
        "query": adql,
        "query_date": query_date or datetime.now(UTC).isoformat(timespec="seconds"),
        "gaia_release": release.upper(),
        "clusterhbm_version": _package_version(),
        "n_rows": len(out),
        "checksum_sha256": _checksum(out),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        out.write(tmp, format="ascii.ecsv", overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def seed_cache(
    name: str, table: Table, *, cache_dir: str | Path | None = None, radius_deg: float | None = None,
    gmax: float | None = None, with_2mass: bool = False, row_limit: int = DEFAULT_ROW_LIMIT,
    release: str = "DR3", query_date: str | None = None,
) -> Path:
    """Pre-seed the cache with ``table`` as the answer to the query :func:`fetch` would send.

    For offline work, tests and CI: afterwards ``fetch(name, offline=True, ...)`` with the
    same query options serves ``table`` (quality cuts and membership are applied then, as
    for a real answer). A ``member`` label column, if present, is kept for evaluation.
    Returns the cache file's path.
    """
    adql = build_query(name, radius_deg=radius_deg, gmax=gmax, with_2mass=with_2mass,
                       row_limit=row_limit, release=release)
    path = cache_path(adql, cluster=name, release=release, cache_dir=cache_dir)
    response = table.copy()
    response.meta = {}
    return write_cache(response, path, adql=adql, cluster=name, release=release,
                       query_date=query_date)


def read_cache(path: str | Path, *, adql: str | None = None) -> Table:
    """Read and verify a cache file written by :func:`write_cache`.

    Raises
    ------
    CacheError
        Missing, unreadable, truncated or altered file (row count or checksum differ), or
        a file written for another query than ``adql``.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no cache file at {path}")
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # any parse failure means a damaged file
        raise CacheError(f"cannot parse {path.name}: {_one_line(str(exc), 120)}") from exc
    meta = table.meta
    expected = ("clusterhbm_cache_format", "query", "gaia_release", "n_rows", "checksum_sha256")
    missing = [k for k in expected if k not in meta]
    if missing:
        raise CacheError(f"{path.name} lacks header key(s) {missing}")
    if meta["clusterhbm_cache_format"] != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path.name} has cache format {meta['clusterhbm_cache_format']!r}, "
                         f"expected {CACHE_FORMAT_VERSION}")
    if adql is not None and meta["query"] != adql:
        raise CacheError(f"{path.name} was written for another query")
    if len(table) != int(meta["n_rows"]):
        raise CacheError(f"{path.name} has {len(table)} rows, header says {meta['n_rows']} "
                         "(truncated?)")
    if _checksum(_plain(table)) != meta["checksum_sha256"]:
        raise CacheError(f"{path.name} checksum mismatch (file altered or damaged)")
    return table


# --------------------------------------------------------------------------------------
# The shell: fetch
# --------------------------------------------------------------------------------------


def fetch(
    name: str | ClusterInfo,
    *,
    radius_deg: float | None = None,
    gmax: float | None = None,
    with_2mass: bool = False,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    row_limit: int = DEFAULT_ROW_LIMIT,
    release: str = "DR3",
    apply_cuts: bool = True,
    ruwe_max: float | None = RUWE_MAX,
    min_parallax_over_error: float | None = MIN_PARALLAX_OVER_ERROR,
    excess_nsigma: float | None = EXCESS_NSIGMA,
    mag_error_floor: float | Mapping[str, float] | None = None,
    offline: bool = False,
    progress: bool = False,
) -> Table:
    """Member catalogue of a named cluster from Gaia (cached on disk).

    Resolve the name, build the ADQL (:func:`build_query`), read the cache or query the
    archive (asynchronous job above :data:`SYNC_ROW_LIMIT` rows), :func:`prepare` and
    :func:`membership_probability`.

    Parameters
    ----------
    name : str or ClusterInfo
        Cluster name (bundled table, else SIMBAD unless ``offline``) or resolved info.
    radius_deg, gmax, with_2mass, row_limit, release
        As in :func:`build_query`.
    cache_dir : str or Path, optional
        Cache directory; default :func:`default_cache_dir`.
    refresh : bool, optional
        Query even if a valid cache file exists.
    apply_cuts, ruwe_max, min_parallax_over_error, excess_nsigma, mag_error_floor
        As in :func:`prepare`.
    offline : bool, optional
        Never touch the network: serve from the cache or raise :class:`GaiaQueryError`.
    progress : bool, optional
        Show an elapsed-time indicator on stderr while the query runs.

    Returns
    -------
    Table
        A catalogue (:func:`clusterhbm.catalogue.validate_catalogue`) with
        ``member_prob``, ``parallax_zpt``, ``parallax_uncorrected`` and
        ``phot_*_mean_mag_error``; ``meta`` holds ``cluster``, ``cluster_info``,
        ``query``, ``query_date``, ``gaia_release``, ``clusterhbm_version``,
        ``row_limit``, ``n_rows_query``, ``row_limit_hit``, ``from_cache``,
        ``cache_file``, ``quality_cuts``, ``zero_point``, ``membership`` and
        ``n_members`` (``member_prob > 0.5``).

    Raises
    ------
    UnknownClusterError, ValueError
        Unknown name or bad option.
    GaiaQueryError
        Network failure (or ``offline`` without a usable cache).
    """
    rel = _check_release(release)
    info = name if isinstance(name, ClusterInfo) else resolve_cluster(name, online=not offline)
    adql = build_query(info, radius_deg=radius_deg, gmax=gmax, with_2mass=with_2mass,
                       row_limit=row_limit, release=rel)
    path = cache_path(adql, cluster=info.name, release=rel, cache_dir=cache_dir)
    raw: Table | None = None
    cache_problem = ""
    if not refresh and path.exists():
        try:
            raw = read_cache(path, adql=adql)
            log.info("read %d rows from cache %s", len(raw), path)
        except CacheError as exc:
            cache_problem = str(exc)
            log.warning("cache file %s is unusable (%s); %s", path, exc,
                        "offline, cannot re-fetch" if offline else "re-fetching")
    from_cache = raw is not None
    if raw is None:
        if offline:
            why = f"the cache file is unusable ({cache_problem})" if cache_problem else (
                f"no cache file {path}")
            raise GaiaQueryError(f"offline and {why}; run once with network to fill the cache")
        try:
            answer = _run_query(adql, async_job=row_limit > SYNC_ROW_LIMIT, progress=progress)
        except GaiaQueryError as exc:
            if cache_problem:
                raise GaiaQueryError(
                    f"{exc}; the cache file {path} is unusable ({cache_problem})") from exc
            raise
        raw = _plain(answer)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            write_cache(raw, path, adql=adql, cluster=info.name, release=rel, query_date=stamp)
            log.info("cached %d rows in %s", len(raw), path)
        except OSError as exc:
            log.warning("could not write the cache file %s (%s)", path, exc)
        raw.meta = {"query_date": stamp, "clusterhbm_version": _package_version()}

    query_date = str(raw.meta.get("query_date", ""))
    version_written = str(raw.meta.get("clusterhbm_version", ""))
    raw.meta = {}
    n_rows = len(raw)
    limit_hit = n_rows >= row_limit
    if limit_hit:
        log.warning(
            "the query returned %d rows = row_limit: the answer is probably truncated to the "
            "brightest stars; raise row_limit, or lower radius_deg or gmax", n_rows)
    cat = prepare(raw, release=rel, apply_cuts=apply_cuts, ruwe_max=ruwe_max,
                  min_parallax_over_error=min_parallax_over_error,
                  excess_nsigma=excess_nsigma, mag_error_floor=mag_error_floor)
    membership: dict[str, Any]
    if len(cat) >= 10 and "pmra" in cat.colnames:
        fit = membership_probability(cat, init=info)
        cat["member_prob"] = fit.prob
        membership = {
            "method": "2-component extreme deconvolution in (pmra, pmdec, parallax)",
            "cluster_mean": [float(v) for v in fit.cluster_mean],
            "cluster_dispersion": [float(v) for v in np.sqrt(np.diag(fit.cluster_cov))],
            "field_mean": [float(v) for v in fit.field_mean],
            "field_dispersion": [float(v) for v in np.sqrt(np.diag(fit.field_cov))],
            "cluster_fraction": fit.cluster_fraction,
            "num_iter": fit.num_iter,
            "converged": fit.converged,
        }
    else:
        log.warning("only %d star(s) after cuts: membership not fitted (member_prob = NaN)",
                    len(cat))
        cat["member_prob"] = np.full(len(cat), np.nan)
        membership = {"method": "not fitted (too few stars)"}
    n_members = int(np.count_nonzero(np.nan_to_num(np.asarray(cat["member_prob"])) > 0.5))
    cat.meta.update({
        "cluster": info.name,
        "cluster_info": {**info._asdict(), "aliases": list(info.aliases)},
        "query": adql,
        "query_date": query_date,
        "gaia_release": rel,
        "clusterhbm_version": _package_version(),
        "clusterhbm_version_cached": version_written,
        "row_limit": int(row_limit),
        "n_rows_query": n_rows,
        "row_limit_hit": bool(limit_hit),
        "from_cache": bool(from_cache),
        "cache_file": str(path),
        "membership": membership,
        "n_members": n_members,
    })
    log.info("%s: %d rows, %d after cuts, %d members (p > 0.5)", info.name, n_rows, len(cat),
             n_members)
    return validate_catalogue(cat)


# --------------------------------------------------------------------------------------
# CLI pieces (wired as `clusterhbm fetch` by clusterhbm.cli)
# --------------------------------------------------------------------------------------


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``clusterhbm fetch`` arguments to ``parser``."""
    parser.add_argument("name", help="cluster name, e.g. M67, 'NGC 2682', Pleiades")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="output catalogue (.ecsv or .h5); default ./<name>_gaia.ecsv")
    parser.add_argument("--radius-deg", type=float, default=None,
                        help="cone radius [deg]; default the cluster's radius from the table")
    parser.add_argument("--gmax", type=float, default=None,
                        help="faint limit in G [mag]; default none")
    parser.add_argument("--with-2mass", action="store_true",
                        help="add 2MASS J, H, Ks from the Gaia best-neighbour table")
    parser.add_argument("--row-limit", type=int, default=DEFAULT_ROW_LIMIT,
                        help=f"maximum rows (ADQL TOP), default {DEFAULT_ROW_LIMIT}")
    parser.add_argument("--release", choices=tuple(GAIA_TABLES), default="DR3")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory; default ${CACHE_ENV_VAR} or ~/.cache/clusterhbm")
    parser.add_argument("--refresh", action="store_true", help="ignore the cache and query again")
    parser.add_argument("--offline", action="store_true",
                        help="never use the network: serve from the cache or fail")
    parser.add_argument("--no-cuts", action="store_true", help="keep stars failing quality cuts")
    parser.add_argument("--ruwe-max", type=float, default=RUWE_MAX)
    parser.add_argument("--min-parallax-over-error", type=float, default=MIN_PARALLAX_OVER_ERROR)
    parser.add_argument("--excess-nsigma", type=float, default=EXCESS_NSIGMA)
    parser.add_argument("--no-progress", action="store_true", help="no progress indicator")


def _default_output(name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "", _normalize_name(name)) or "cluster"
    return Path(f"{slug}_gaia.ecsv")


def run_fetch(args: argparse.Namespace) -> int:
    """Run ``clusterhbm fetch``: print what was done; 0 on success.

    Returns 2 on a network or cache failure and 1 on an unknown name or bad option, after
    one line on stderr (no traceback).
    """
    out = sys.stdout
    try:
        cat = fetch(
            args.name,
            radius_deg=args.radius_deg,
            gmax=args.gmax,
            with_2mass=args.with_2mass,
            cache_dir=args.cache_dir,
            refresh=args.refresh,
            row_limit=args.row_limit,
            release=args.release,
            apply_cuts=not args.no_cuts,
            ruwe_max=args.ruwe_max,
            min_parallax_over_error=args.min_parallax_over_error,
            excess_nsigma=args.excess_nsigma,
            offline=args.offline,
            progress=not args.no_progress,
        )
        path = args.output if args.output is not None else _default_output(cat.meta["cluster"])
        write_catalogue(cat, path)
    except (GaiaQueryError, CacheError) as exc:
        print(f"clusterhbm fetch: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (UnknownClusterError, ValueError) as exc:
        print(f"clusterhbm fetch: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"clusterhbm fetch: error: cannot write the catalogue ({_one_line(str(exc))})",
              file=sys.stderr)
        return 2
    meta = cat.meta
    info = meta["cluster_info"]
    print(f"{meta['cluster']}: centre (ra, dec) = ({info['ra_deg']:.4f}, {info['dec_deg']:.4f}) "
          f"deg [{info['reference']}]", file=out)
    source = (f"cache {meta['cache_file']}" if meta["from_cache"]
              else f"Gaia {meta['gaia_release']} archive (cached in {meta['cache_file']})")
    print(f"rows returned: {meta['n_rows_query']} from {source}", file=out)
    if meta["row_limit_hit"]:
        print(f"warning: row limit {meta['row_limit']} reached, the answer is probably truncated "
              "(raise --row-limit or lower --radius-deg/--gmax)", file=out)
    zp = meta.get("zero_point")
    if zp:
        print(f"parallax zero point: {zp['n_corrected']} corrected, {zp['n_not_corrected']} "
              "left uncorrected", file=out)
    for cut in meta.get("quality_cuts", []):
        print(f"cut {cut['cut']}: removed {cut['n_removed']}", file=out)
    print(f"stars kept: {len(cat)}", file=out)
    mem = meta["membership"]
    if "cluster_mean" in mem:
        pmra, pmdec, plx = mem["cluster_mean"]
        print(f"members (p > 0.5): {meta['n_members']}; cluster pm = ({pmra:.3f}, {pmdec:.3f}) "
              f"mas/yr, parallax = {plx:.4f} mas", file=out)
    else:
        print("members: not fitted (too few stars)", file=out)
    print(f"wrote {path}", file=out)
    return 0
