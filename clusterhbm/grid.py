"""The bundled MIST grid: loading it into arrays, and what each array holds.

The file ``clusterhbm/data/mist_gaia_2mass.h5`` is built by ``isochrones/build_grid.py``
(provenance, licence and the rebuild command are in ``isochrones/README.md``). It holds

* MIST isochrones on a regular ([Fe/H], log age, EEP) grid: [Fe/H] -2.0..+0.5 (step 0.25),
  log10(age/yr) 6.0..10.3 (step 0.05), EEP 1..707 (pre-main sequence to the end of core
  helium burning), with initial mass, current mass, log Teff, log g, log L and the MIST
  phase code;
* MIST bolometric corrections (R_V = 3.1) on ([Fe/H], Teff, log g, A_V) for Gaia EDR3
  G/BP/RP (used for DR3 too), Gaia DR2 (revised passbands) G/BP/RP and 2MASS J/H/Ks.

Nothing is read at import time; :func:`load_grid` reads the file once and caches it. On
loading, the lower main sequence of the [Fe/H] = +0.5 isochrones, missing from the source
grid below ~0.5 Msun, is extended from +0.25 and 0.0 (:func:`_extend_edge_metallicity`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BAND_NAMES",
    "GRID_SHA256",
    "ISO_COLUMNS",
    "BCGrid",
    "IsochroneGrid",
    "ModelGrid",
    "band_indices",
    "default_grid_path",
    "grid_checksum",
    "load_grid",
]

log = logging.getLogger(__name__)

#: Columns of ``IsochroneGrid.data`` (last axis), in order.
ISO_COLUMNS = ("initial_mass", "star_mass", "log_teff", "logg", "logl", "phase")
COL_INITIAL_MASS, COL_STAR_MASS, COL_LOG_TEFF, COL_LOGG, COL_LOGL, COL_PHASE = range(6)
#: Bands of ``BCGrid.data`` (last axis), in order. EDR3 passbands serve DR3.
BAND_NAMES = ("G", "BP", "RP", "G_DR2", "BP_DR2", "RP_DR2", "J", "H", "Ks")
#: SHA-256 of the shipped grid file; ``tests/test_grid.py`` checks it.
GRID_SHA256 = "3126184cec7d87486b76b52b3083471f41611ca1d4ff67135ed7eea24fd87054"
_GRID_FILE = "mist_gaia_2mass.h5"


class IsochroneGrid(NamedTuple):
    """MIST isochrones on a regular ([Fe/H], log age, EEP) grid.

    Attributes
    ----------
    feh : (n_feh,) float, dex; regular.
    log_age : (n_age,) float, log10(age / yr); regular.
    eep : (n_eep,) float, equivalent evolutionary point; regular, step 1.
    data : (n_feh, n_age, n_eep, 6) float
        Columns :data:`ISO_COLUMNS`: initial mass [Msun], current mass [Msun],
        log10 Teff [K], log10 g [cgs], log10 L [Lsun], MIST phase code. Rows outside an
        isochrone's EEP range hold copies of its nearest valid row (so gathers are finite);
        ``first``/``last`` say which rows are real.
    first, last : (n_feh, n_age) int32
        Index (into ``eep``) of the first and last real row of each isochrone.
    """

    feh: jax.Array
    log_age: jax.Array
    eep: jax.Array
    data: jax.Array
    first: jax.Array
    last: jax.Array


class BCGrid(NamedTuple):
    """MIST bolometric corrections, R_V = 3.1.

    Attributes
    ----------
    feh : (n_feh,) float, dex; regular.
    teff : (n_teff,) float, K; irregular (2500 K .. 1e6 K).
    logg : (n_logg,) float, log10 g [cgs]; irregular (-4 .. 9.5).
    av : (n_av,) float, mag; irregular (0 .. 6).
    data : (n_feh, n_teff, n_logg, n_av, n_band) float
        BC_band = M_bol - M_band, extinction included; bands :data:`BAND_NAMES`.
    """

    feh: jax.Array
    teff: jax.Array
    logg: jax.Array
    av: jax.Array
    data: jax.Array


class ModelGrid(NamedTuple):
    """Everything the forward model reads: isochrones and bolometric corrections."""

    iso: IsochroneGrid
    bc: BCGrid


def default_grid_path() -> Path:
    """Path of the grid file shipped inside the installed package."""
    return Path(str(resources.files("clusterhbm") / "data" / _GRID_FILE))


def grid_checksum(path: str | Path | None = None) -> str:
    """SHA-256 hex digest of a grid file (default: the shipped one)."""
    path = Path(path) if path is not None else default_grid_path()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def band_indices(bands) -> tuple[int, ...]:
    """Validate band names and return their indices into ``BCGrid.data``'s last axis."""
    if isinstance(bands, str):
        bands = (bands,)
    out = []
    for b in bands:
        if b not in BAND_NAMES:
            raise ValueError(f"unknown band {b!r}; available bands: {', '.join(BAND_NAMES)}")
        out.append(BAND_NAMES.index(b))
    if not out:
        raise ValueError(f"no bands given; available bands: {', '.join(BAND_NAMES)}")
    return tuple(out)


def _read_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(
            f"MIST grid file not found at {path}; reinstall clusterhbm or rebuild it with "
            f"isochrones/build_grid.py"
        )
    try:
        with h5py.File(path, "r") as h:
            iso = h["isochrones"]
            bc = h["bc"]
            out = {
                "iso_feh": iso["feh"][:],
                "iso_log_age": iso["log_age"][:],
                "iso_eep": iso["eep"][:],
                "iso_data": iso["data"][:],
                "iso_columns": [str(c) for c in iso.attrs["columns"]],
                "bc_feh": bc["feh"][:],
                "bc_teff": bc["teff"][:],
                "bc_logg": bc["logg"][:],
                "bc_av": bc["av"][:],
                "bc_data": bc["data"][:],
                "bands": tuple(str(b) for b in bc.attrs["bands"]),
                "provenance": json.loads(h.attrs.get("provenance", "{}")),
            }
    except (OSError, KeyError) as exc:  # h5py raises OSError for truncated/corrupt files
        raise ValueError(f"MIST grid file {path} is corrupt or not a clusterhbm grid: {exc}")
    if out["bands"] != BAND_NAMES:
        raise ValueError(f"grid file {path} has bands {out['bands']}, expected {BAND_NAMES}")
    if out["iso_data"].shape[-1] != len(ISO_COLUMNS):
        raise ValueError(f"grid file {path} has isochrone columns {out['iso_columns']}")
    return out


def _pad_isochrones(data: np.ndarray):
    """Return (padded data, first, last): rows outside each isochrone copy its edge rows."""
    ok = np.isfinite(data[..., COL_INITIAL_MASS])
    n_eep = data.shape[2]
    idx = np.arange(n_eep)
    first = np.where(ok.any(-1), np.argmax(ok, axis=-1), 0).astype(np.int32)
    last = (n_eep - 1 - np.argmax(ok[..., ::-1], axis=-1)).astype(np.int32)
    src = np.clip(idx[None, None, :], first[..., None], last[..., None])
    padded = np.take_along_axis(data, src[..., None], axis=2)
    if not np.all(np.isfinite(padded)):
        raise ValueError("grid isochrones contain non-finite values inside their EEP range")
    return padded, first, last


def _extend_rows(data, j, j1, j2, k, rows, e0, scale):
    """Values for ``rows`` (below the first real row ``e0``) of isochrone (j, k), from the
    inner [Fe/H] neighbours j1, j2: masses scaled from j1's by the ratio at ``e0``
    (increasing along EEP by construction); log Teff, log g, log L extrapolated linearly in
    [Fe/H] at fixed EEP, shifted by the constant offset that meets row ``e0`` exactly."""
    out = np.empty((rows.size, data.shape[-1]))
    ratio = data[j, k, e0, COL_INITIAL_MASS] / data[j1, k, e0, COL_INITIAL_MASS]
    for c in (COL_INITIAL_MASS, COL_STAR_MASS):
        out[:, c] = data[j1, k, rows, c] * ratio
    for c in (COL_LOG_TEFF, COL_LOGG, COL_LOGL):
        ex = data[j1, k, :, c] + (data[j1, k, :, c] - data[j2, k, :, c]) * scale
        out[:, c] = ex[rows] + (data[j, k, e0, c] - ex[e0])
    out[:, COL_PHASE] = data[j1, k, rows, COL_PHASE]
    return out


def _extend_edge_metallicity(data: np.ndarray, feh: np.ndarray):
    """Extend the lower main sequence of the first and last [Fe/H] isochrones.

    The source grid's [Fe/H] = +0.5 isochrones start at ~0.5 Msun (EEP 185-333, against
    0-255 at +0.25: the low-mass tracks are missing). Interpolation between +0.25 and
    +0.5 needs a row on both isochrones, so without this the track's first valid EEP jumps
    by 35-82 rows as [Fe/H] crosses +0.25, and the log density of a cluster with stars
    below 0.5 Msun drops by hundreds there: a wall inside the grid.

    Each missing row below an edge isochrone's first real row, where its two inner
    neighbours in [Fe/H] are real, is filled by :func:`_extend_rows`. Checked by hiding the
    first 20 real rows of the +0.5 isochrones (log age >= 8) and predicting them
    (``tests/test_forward.py::test_edge_metallicity_extension_predicts_hidden_rows``):
    |error| median / 95th percentile 0.005 / 0.019 Msun in initial mass, 0.0014 / 0.005 dex
    in log Teff, 0.012 / 0.045 dex in log L. The extended rows are an approximation to
    MIST, not MIST; they matter only for stars below ~0.5 Msun at [Fe/H] > +0.25. Returns
    (data, number of rows added).
    """
    data = data.copy()
    ok = np.isfinite(data[..., COL_INITIAL_MASS])
    n_feh = data.shape[0]
    added = 0
    if n_feh < 3:
        return data, added
    for j, j1, j2 in ((n_feh - 1, n_feh - 2, n_feh - 3), (0, 1, 2)):
        scale = (feh[j] - feh[j1]) / (feh[j1] - feh[j2])
        for k in range(data.shape[1]):
            if not ok[j, k].any():
                continue
            e0 = int(np.argmax(ok[j, k]))
            both = ok[j1, k, :e0 + 1] & ok[j2, k, :e0 + 1]
            if e0 == 0 or not both[e0]:
                continue
            # the contiguous run of rows just below e0 where both neighbours are real
            n_run = int(np.argmin(both[:e0][::-1])) if not both[:e0].all() else e0
            if n_run == 0:
                continue
            rows = np.arange(e0 - n_run, e0)
            data[j, k, rows] = _extend_rows(data, j, j1, j2, k, rows, e0, scale)
            added += rows.size
    return data, added


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, dtype_name: str) -> ModelGrid:
    raw = _read_file(Path(path))
    dtype = jnp.dtype(dtype_name)
    extended, n_added = _extend_edge_metallicity(raw["iso_data"].astype(np.float64),
                                                 np.asarray(raw["iso_feh"], np.float64))
    if n_added:
        log.info("grid: %d lower-main-sequence rows of the edge [Fe/H] isochrones extended "
                 "by extrapolation in [Fe/H] (see grid._extend_edge_metallicity)", n_added)
    data, first, last = _pad_isochrones(extended)

    def arr(x):
        return jnp.asarray(np.asarray(x, dtype=np.float64), dtype=dtype)

    iso = IsochroneGrid(
        feh=arr(raw["iso_feh"]),
        log_age=arr(raw["iso_log_age"]),
        eep=arr(raw["iso_eep"]),
        data=arr(data),
        first=jnp.asarray(first),
        last=jnp.asarray(last),
    )
    bc = BCGrid(
        feh=arr(raw["bc_feh"]),
        teff=arr(raw["bc_teff"]),
        logg=arr(raw["bc_logg"]),
        av=arr(raw["bc_av"]),
        data=arr(raw["bc_data"]),
    )
    log.debug("loaded grid %s: iso %s, bc %s", path, iso.data.shape, bc.data.shape)
    return ModelGrid(iso=iso, bc=bc)


COLOUR_CORRECTIONS = {"gaia-ms": "colour_correction_gaia_ms.json"}
_CORRECTED_BANDS = ("BP", "RP", "BP_DR2", "RP_DR2")


def colour_correction_table(name_or_path: str | Path) -> dict:
    """An empirical colour correction: a bundled name (:data:`COLOUR_CORRECTIONS`) or a JSON
    file with ``knots`` (each ``teff_k``, ``d_bp_mag``, ``d_rp_mag``), as written by
    ``scripts/grid_colour_residuals.py --write-correction``."""
    if str(name_or_path) in COLOUR_CORRECTIONS:
        path = Path(str(resources.files("clusterhbm") / "data"
                        / COLOUR_CORRECTIONS[str(name_or_path)]))
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ValueError(f"colour correction {str(name_or_path)!r}: not a bundled name "
                             f"({', '.join(COLOUR_CORRECTIONS)}) and no such file")
    table = json.loads(path.read_text())
    knots = table.get("knots")
    if not knots or not all({"teff_k", "d_bp_mag", "d_rp_mag"} <= set(k) for k in knots):
        raise ValueError(f"colour correction {path}: expected 'knots', each with teff_k, "
                         "d_bp_mag and d_rp_mag")
    table["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return table


def colour_offsets(table: dict, teff_k, logg, *, taper_k: float = 500.0,
                   logg_full: float = 4.0, logg_zero: float = 3.5):
    """The correction's (BP, RP) magnitude offsets at (Teff, log g), numpy arrays.

    Piecewise linear in Teff between the knots; held at the coolest knot's value below it;
    tapered linearly to zero over ``taper_k`` above the hottest. Calibrated on main-sequence
    stars, so weighted by log g: in full at ``logg >= logg_full``, zero at
    ``logg <= logg_zero`` (giants and most subgiants uncorrected), linear between.
    """
    knots = sorted(table["knots"], key=lambda k: k["teff_k"])
    t = np.array([k["teff_k"] for k in knots], float)
    teff_k = np.asarray(teff_k, float)
    w_t = np.clip(1.0 - (teff_k - t[-1]) / taper_k, 0.0, 1.0)
    w_g = np.clip((np.asarray(logg, float) - logg_zero) / (logg_full - logg_zero), 0.0, 1.0)
    out = []
    for key in ("d_bp_mag", "d_rp_mag"):
        d = np.interp(teff_k, t, np.array([k[key] for k in knots], float))
        out.append(d * w_t * w_g)
    return out[0], out[1]


def apply_colour_correction(grid: ModelGrid, correction: str | Path | dict) -> ModelGrid:
    """A copy of ``grid`` whose Gaia BP and RP magnitudes (EDR3/DR3 and DR2 passbands) carry
    an empirical, Teff- and log g-dependent offset (:func:`colour_offsets`); G, 2MASS and
    the isochrones are unchanged.

    The bundled ``"gaia-ms"`` correction is MIST's main-sequence BP-RP against six nearby
    clusters at Gaia Collaboration (2018) parameters (Hyades, Coma Ber, Pleiades, Praesepe,
    Blanco 1, alpha Per; not M67): MIST is too blue by ~0.02 mag at 6000-6800 K, 0.05 at
    4900 K, 0.15 at 4200 K and 0.25 at 3600 K, in DR2 and DR3 photometry alike
    (``python scripts/grid_colour_residuals.py``, docs/performance.md). Applied at the BC
    table's nodes, so it interpolates (and differentiates) like the table itself.
    """
    table = correction if isinstance(correction, dict) else colour_correction_table(correction)
    bc = grid.bc
    teff = np.asarray(bc.teff, float)[:, None]
    logg = np.asarray(bc.logg, float)[None, :]
    d_bp, d_rp = colour_offsets(table, teff, logg)  # (n_teff, n_logg)
    data = np.array(bc.data, dtype=np.float64)  # (n_feh, n_teff, n_logg, n_av, n_band)
    for band in _CORRECTED_BANDS:
        j = BAND_NAMES.index(band)
        d = d_bp if band.startswith("BP") else d_rp
        # M_band = M_bol - BC: a magnitude offset d is -d in BC
        data[..., j] -= d[None, :, :, None]
    return ModelGrid(iso=grid.iso, bc=bc._replace(data=jnp.asarray(data, bc.data.dtype)))


def load_grid(path: str | Path | None = None, *, dtype=None,
              colour_correction: str | Path | None = None) -> ModelGrid:
    """Load the MIST grid (default: the one shipped with the package).

    Parameters
    ----------
    path : path-like, optional
        A grid file written by ``isochrones/build_grid.py``.
    dtype : optional
        ``jnp.float32`` or ``jnp.float64``; default: JAX's default float type
        (float64 only when ``jax_enable_x64`` is on). clusterhbm never switches x64 on.
    colour_correction : optional
        ``"gaia-ms"`` (or a JSON file): an empirical correction of MIST's Gaia BP and RP
        magnitudes (:func:`apply_colour_correction`). Default: none, MIST as it is.

    Raises
    ------
    FileNotFoundError
        when the file is missing.
    ValueError
        when the file is corrupt or of another layout, or float64 is asked for while
        ``jax_enable_x64`` is off.
    """
    path = Path(path) if path is not None else default_grid_path()
    if dtype is None:
        dtype = jnp.zeros(()).dtype
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "float64 grid requested but jax_enable_x64 is off; call "
            "jax.config.update('jax_enable_x64', True) first"
        )
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if colour_correction is None:
        return _load_cached(str(path.resolve()), dtype.name)
    table = colour_correction_table(colour_correction)
    # cached like the grid itself: the same object for the same correction, so programs
    # compiled against it are reused
    return _load_corrected(str(path.resolve()), dtype.name, str(colour_correction),
                           table["sha256"])


@functools.lru_cache(maxsize=4)
def _load_corrected(path: str, dtype_name: str, correction: str, sha256: str) -> ModelGrid:
    return apply_colour_correction(_load_cached(path, dtype_name),
                                   colour_correction_table(correction))
