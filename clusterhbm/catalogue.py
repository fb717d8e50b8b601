"""The catalogue type shared by the simulator, the Gaia module and the model.

A catalogue is an :class:`astropy.table.Table` whose columns carry Gaia archive names
(``gaiadr3.gaia_source``) plus a few derived columns, and whose ``meta`` says which
Gaia release the photometry belongs to (``meta["gaia_release"]`` in ``{"DR2", "EDR3",
"DR3"}``; EDR3 and DR3 share passbands).

Columns (units in brackets)
---------------------------
Required
    ``source_id`` (int64), ``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag``
    [mag]. Missing BP or RP is NaN.
Errors (derived when absent)
    ``phot_g_mean_mag_error``, ``phot_bp_mean_mag_error``, ``phot_rp_mean_mag_error`` [mag].
    When absent they are computed from ``phot_*_mean_flux_over_error`` as
    ``2.5 / ln(10) / flux_over_error`` (first order in the flux error). These are not
    archive columns: the archive gives only fluxes and flux-over-error.
Astrometry (optional; a catalogue without parallax fits on photometric distance)
    ``parallax``, ``parallax_error`` [mas]; ``ra``, ``dec`` [deg]; ``pmra``, ``pmdec`` and
    their ``*_error`` [mas/yr]; ``parallax_zpt`` [mas], the zero point *already subtracted*
    from ``parallax`` when the column exists (Lindegren et al. 2021).
2MASS (optional)
    ``j_m``, ``h_m``, ``ks_m`` and ``j_msigcom``, ``h_msigcom``, ``ks_msigcom`` [mag]
    (the archive names of ``gaiadr3.tmass_psc_xsc_best_neighbour`` joined to ``tmass_psc``).
Membership (optional)
    ``member_prob`` in [0, 1] (a first-pass membership, e.g. from :mod:`clusterhbm.gaia`),
    ``member`` (bool, literature membership, used only for evaluation).

Everything here is I/O and validation: no JAX.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from astropy.table import Table

__all__ = [
    "GAIA_RELEASES",
    "PHOT_COLUMNS",
    "REQUIRED_COLUMNS",
    "add_magnitude_errors",
    "photometric_system",
    "read_catalogue",
    "validate_catalogue",
    "write_catalogue",
]

log = logging.getLogger(__name__)

#: Gaia band -> (magnitude column, error column, flux-over-error column)
PHOT_COLUMNS = {
    "G": ("phot_g_mean_mag", "phot_g_mean_mag_error", "phot_g_mean_flux_over_error"),
    "BP": ("phot_bp_mean_mag", "phot_bp_mean_mag_error", "phot_bp_mean_flux_over_error"),
    "RP": ("phot_rp_mean_mag", "phot_rp_mean_mag_error", "phot_rp_mean_flux_over_error"),
}
#: 2MASS band -> (magnitude column, error column)
TMASS_COLUMNS = {"J": ("j_m", "j_msigcom"), "H": ("h_m", "h_msigcom"), "Ks": ("ks_m", "ks_msigcom")}
REQUIRED_COLUMNS = ("source_id", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")
GAIA_RELEASES = ("DR2", "EDR3", "DR3")

#: Fractional-flux error -> magnitude error
_MAG_PER_FLUX = 2.5 / math.log(10.0)


def photometric_system(release: str) -> str:
    """Map a Gaia release to the passband set of the bundled grid: ``"DR2"`` or ``"EDR3"``."""
    rel = str(release).upper().strip()
    if rel not in GAIA_RELEASES:
        raise ValueError(f"gaia_release must be one of {GAIA_RELEASES}, got {release!r}")
    return "DR2" if rel == "DR2" else "EDR3"


def add_magnitude_errors(table: Table) -> Table:
    """Add ``phot_*_mean_mag_error`` from ``phot_*_mean_flux_over_error`` where absent.

    Returns the same table (modified in place). Raises ``ValueError`` naming the band when
    neither an error column nor a flux-over-error column exists.
    """
    for band, (mag, err, foe) in PHOT_COLUMNS.items():
        if err in table.colnames:
            continue
        if foe not in table.colnames:
            raise ValueError(
                f"catalogue has neither {err!r} nor {foe!r}: cannot assign {band} errors"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            fo = np.asarray(table[foe], dtype=float)
            e = np.where(fo > 0, _MAG_PER_FLUX / fo, np.nan)
        table[err] = e
        table[err].unit = "mag"
        log.info("derived %s from %s", err, foe)
    return table


def validate_catalogue(table: Table) -> Table:
    """Check that ``table`` is a usable catalogue; fill derived columns; return it.

    Raises
    ------
    ValueError
        naming the missing columns, a non-numeric column, or a bad ``gaia_release``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(
            f"catalogue is missing required column(s) {missing}; expected Gaia archive names "
            f"{list(REQUIRED_COLUMNS)} (found {table.colnames[:12]}...)"
        )
    for c in REQUIRED_COLUMNS[1:] + ("parallax", "parallax_error"):
        if c in table.colnames and not np.issubdtype(np.asarray(table[c]).dtype, np.number):
            raise ValueError(f"column {c!r} must be numeric, got dtype {table[c].dtype}")
    if ("parallax" in table.colnames) != ("parallax_error" in table.colnames):
        raise ValueError("columns 'parallax' and 'parallax_error' must come together")
    release = table.meta.get("gaia_release", "DR3")
    table.meta["gaia_release"] = str(release).upper()
    photometric_system(table.meta["gaia_release"])
    add_magnitude_errors(table)
    g = np.asarray(table["phot_g_mean_mag"], dtype=float)
    bad = np.flatnonzero(~np.isfinite(g))
    if bad.size:
        log.warning("%d star(s) have no G magnitude (rows %s...)", bad.size, bad[:5].tolist())
    return table


def read_catalogue(path: str | Path, *, gaia_release: str | None = None) -> Table:
    """Read a catalogue from ECSV, CSV, FITS, VOTable or HDF5 (clusterhbm's own layout).

    ``gaia_release`` overrides the file's metadata (default ``"DR3"`` when neither says).
    Masked values become NaN.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"catalogue file not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        table = Table.read(path, path="catalogue")
    elif suffix in (".csv",):
        table = Table.read(path, format="ascii.csv")
    elif suffix in (".vot", ".xml", ".votable"):
        table = Table.read(path, format="votable")
    else:
        table = Table.read(path)
    table = _unmask(table)
    if gaia_release is not None:
        table.meta["gaia_release"] = gaia_release
    return validate_catalogue(table)


def write_catalogue(table: Table, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``table`` (with its metadata) to ECSV (``.ecsv``) or HDF5 (``.h5``/``.hdf5``)."""
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        table.write(path, path="catalogue", serialize_meta=True, overwrite=overwrite)
    else:
        table.write(path, format="ascii.ecsv", overwrite=overwrite)
    return path


def _unmask(table: Table) -> Table:
    """Turn masked float columns into NaN-filled plain columns."""
    out = Table(table, masked=False, copy=False)
    for name in table.colnames:
        col = table[name]
        if hasattr(col, "mask") and np.any(col.mask):
            if np.issubdtype(col.dtype, np.floating):
                out[name] = np.asarray(col.filled(np.nan))
            elif np.issubdtype(col.dtype, np.integer) and name != "source_id":
                out[name] = np.asarray(col.astype(float).filled(np.nan))
    return out
