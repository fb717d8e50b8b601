"""Build the compact MIST grid that ships inside clusterhbm.

Inputs (build-time only, never runtime dependencies of clusterhbm):

* ``lachesis_grids/grids/mist_v2.5_vvcrit0.4.h5`` from the PyPI package ``lachesis-grids``
  (sparse HDF5: [Fe/H] x log age x EEP x columns);
* ``lachesis/Datafiles/BC_tables/bc_tables.h5`` from the PyPI package ``astrolachesis``
  (MIST bolometric-correction tables, group ``UBVRIplus``).

Either install both with ``pip install --no-deps lachesis-grids astrolachesis`` (then the
files are found automatically), or pass the downloaded wheels (``pip download --no-deps
lachesis-grids==0.0.9 astrolachesis==1.0.9``) with ``--grids-wheel``/``--bc-wheel``; the
files are then read straight out of the zip archives.

Usage::

    python isochrones/build_grid.py --grids-wheel lachesis_grids-0.0.9-py3-none-any.whl \
        --bc-wheel astrolachesis-1.0.9-py3-none-any.whl -o clusterhbm/data/mist_gaia_2mass.h5

The output layout is documented in ``isochrones/README.md`` and read by
``clusterhbm.grid.load_grid``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np

# What cluster work needs (see isochrones/README.md for why).
FEH_RANGE = (-2.0, 0.5)
LOG_AGE_RANGE = (6.0, 10.3)
EEP_RANGE = (1, 707)  # pre-main sequence through the end of core-helium burning (TACHeB)
ISO_COLUMNS = ("initial_mass", "star_mass", "log_Teff", "log_g", "log_L", "phase")
# band name in clusterhbm -> column name in the MIST UBVRIplus table
BANDS = {
    "G": "Gaia_G_EDR3",
    "BP": "Gaia_BP_EDR3",
    "RP": "Gaia_RP_EDR3",
    "G_DR2": "Gaia_G_DR2Rev",
    "BP_DR2": "Gaia_BP_DR2Rev",
    "RP_DR2": "Gaia_RP_DR2Rev",
    "J": "2MASS_J",
    "H": "2MASS_H",
    "Ks": "2MASS_Ks",
}
MIST_MEMBER = "lachesis_grids/grids/mist_v2.5_vvcrit0.4.h5"
BC_MEMBER = "lachesis/Datafiles/BC_tables/bc_tables.h5"
FORMAT_VERSION = 1


def _open_input(member: str, wheel: str | None, package: str) -> tuple[h5py.File, str, str]:
    """Open an input HDF5 from a wheel or an installed package; return (file, origin, sha256)."""
    if wheel:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(member)
        origin = f"{Path(wheel).name}:{member}"
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(
                f"cannot find the package {package!r}: install it with "
                f"'pip install --no-deps {package.replace('_', '-')}' or pass its wheel"
            )
        root = Path(next(iter(spec.submodule_search_locations))).parent
        raw = (root / member).read_bytes()
        origin = str(root / member)
    sha = hashlib.sha256(raw).hexdigest()
    return h5py.File(io.BytesIO(raw), "r"), origin, sha


def _dense_from_sparse(f: h5py.File) -> np.ndarray:
    """Rebuild the NaN-padded dense array of lachesis' ``sparse_v1`` layout.

    Layout (documented in astrolachesis ``lachesis/grid/base.py``): ``values`` holds the
    finite EEP rows of each ([Fe/H], age) slice back to back; slice ``i`` starts at EEP
    index ``offsets[i]`` and has ``lengths[i]`` rows.
    """
    shape = tuple(int(s) for s in f.attrs["shape"])
    values = f["values"][:]
    offsets = f["offsets"][:]
    lengths = f["lengths"][:]
    n_slices = len(offsets)
    flat = np.full((n_slices, shape[-2], shape[-1]), np.nan, dtype=values.dtype)
    pos = 0
    for i in range(n_slices):
        n = int(lengths[i])
        flat[i, offsets[i] : offsets[i] + n] = values[pos : pos + n]
        pos += n
    if pos != len(values):
        raise RuntimeError(f"sparse layout inconsistent: used {pos} of {len(values)} rows")
    return flat.reshape(shape)


def build_isochrones(f: h5py.File) -> dict:
    if f.attrs.get("storage") != "sparse_v1":
        raise RuntimeError(f"unexpected storage {f.attrs.get('storage')!r}")
    cols = [str(c) for c in f.attrs["columns"]]
    feh = f["feh_values"][:]
    age = f["age_values"][:]
    eep = f["eep_values"][:]
    dense = _dense_from_sparse(f)
    ifeh = np.flatnonzero((feh >= FEH_RANGE[0] - 1e-9) & (feh <= FEH_RANGE[1] + 1e-9))
    iage = np.flatnonzero((age >= LOG_AGE_RANGE[0] - 1e-9) & (age <= LOG_AGE_RANGE[1] + 1e-9))
    ieep = np.flatnonzero((eep >= EEP_RANGE[0]) & (eep <= EEP_RANGE[1]))
    icol = [cols.index(c) for c in ISO_COLUMNS]
    data = dense[np.ix_(ifeh, iage, ieep, icol)].astype(np.float32)
    # A row counts only when every kept column is finite.
    ok = np.all(np.isfinite(data), axis=-1)
    data[~ok] = np.nan
    # Each isochrone must be one contiguous EEP block with strictly increasing initial mass.
    # The lachesis regrid leaves interior holes (1-33 EEPs, all on the low-mass main
    # sequence, EEP ~150-350) where the neighbouring rows are smooth: fill them linearly in
    # EEP (phase: the preceding row's code) and count them.
    n_fixed = 0
    n_filled = 0
    for a in range(data.shape[0]):
        for b in range(data.shape[1]):
            idx = np.flatnonzero(ok[a, b])
            if idx.size == 0:
                raise RuntimeError(f"empty isochrone at feh={feh[ifeh[a]]}, log_age={age[iage[b]]}")
            if np.any(np.diff(idx) != 1):
                full = np.arange(idx[0], idx[-1] + 1)
                holes = np.setdiff1d(full, idx)
                for c in range(data.shape[-1]):
                    if ISO_COLUMNS[c] == "phase":
                        prev = idx[np.searchsorted(idx, holes) - 1]
                        data[a, b, holes, c] = data[a, b, prev, c]
                    else:
                        data[a, b, holes, c] = np.interp(holes, idx, data[a, b, idx, c])
                n_filled += holes.size
                ok[a, b, holes] = True
                idx = full
            m = data[a, b, idx, 0].astype(np.float64)
            dm = np.diff(m)
            if np.any(dm <= 0):
                # float32 ties late in evolution: nudge by one ulp so mass -> EEP inverts.
                for k in np.flatnonzero(dm <= 0):
                    m[k + 1] = np.nextafter(np.float32(m[k]), np.float32(np.inf))
                    n_fixed += 1
                data[a, b, idx, 0] = m.astype(np.float32)
    return {
        "feh": feh[ifeh],
        "log_age": age[iage],
        "eep": eep[ieep],
        "data": data,
        "columns": ISO_COLUMNS,
        "n_mass_ties_fixed": n_fixed,
        "n_rows_filled": n_filled,
    }


def build_bc(f: h5py.File) -> dict:
    g = f["UBVRIplus"]
    names = [b.decode() if isinstance(b, bytes) else str(b) for b in g["band_names"][:]]
    feh_all = g["feh_values"][:]
    raw = g["data"][:]  # (n_feh, n_rows, 5 + n_band): Teff, logg, [Fe/H], A_V, R_V, bands
    keep = np.flatnonzero((feh_all >= FEH_RANGE[0] - 1e-9) & (feh_all <= FEH_RANGE[1] + 1e-9))
    teff = np.unique(raw[0, :, 0])
    logg = np.unique(raw[0, :, 1])
    av = np.unique(raw[0, :, 3])
    if not np.allclose(raw[:, :, 4], 3.1):
        raise RuntimeError("expected R_V = 3.1 throughout")
    band_cols = [5 + names.index(BANDS[b]) for b in BANDS]
    out = np.full((len(keep), len(teff), len(logg), len(av), len(BANDS)), np.nan, np.float32)
    for j, k in enumerate(keep):
        rows = raw[k]
        it = np.searchsorted(teff, rows[:, 0])
        ig = np.searchsorted(logg, rows[:, 1])
        ia = np.searchsorted(av, rows[:, 3])
        out[j, it, ig, ia] = rows[:, band_cols]
    if not np.all(np.isfinite(out)):
        raise RuntimeError("BC table has holes after regridding")
    return {
        "feh": feh_all[keep],
        "teff": teff.astype(np.float64),
        "logg": logg.astype(np.float64),
        "av": np.round(av.astype(np.float64), 6),
        "data": out,
        "bands": tuple(BANDS),
        "mist_names": tuple(BANDS.values()),
    }


def write_grid(path: Path, iso: dict, bc: dict, provenance: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    comp = {"compression": "gzip", "compression_opts": 9, "shuffle": True}
    with h5py.File(path, "w", track_order=True) as h:
        h.attrs["format_version"] = FORMAT_VERSION
        h.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        gi = h.create_group("isochrones")
        gi.create_dataset("feh", data=iso["feh"])
        gi.create_dataset("log_age", data=iso["log_age"])
        gi.create_dataset("eep", data=iso["eep"])
        # Chunk per isochrone so a reader can fetch a few isochrones cheaply.
        chunks = (1, 1) + iso["data"].shape[2:]
        gi.create_dataset("data", data=iso["data"], chunks=chunks, **comp)
        gi.attrs["columns"] = list(iso["columns"])
        gi.attrs["units"] = json.dumps(
            {"initial_mass": "Msun", "star_mass": "Msun", "log_Teff": "log10 K",
             "log_g": "log10 cm s^-2", "log_L": "log10 Lsun", "phase": "MIST phase code"}
        )
        gb = h.create_group("bc")
        for k in ("feh", "teff", "logg", "av"):
            gb.create_dataset(k, data=bc[k])
        gb.create_dataset("data", data=bc["data"], chunks=(1,) + bc["data"].shape[1:], **comp)
        gb.attrs["bands"] = list(bc["bands"])
        gb.attrs["mist_names"] = list(bc["mist_names"])
        gb.attrs["r_v"] = 3.1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids-wheel", help="lachesis-grids wheel (else the installed package)")
    p.add_argument("--bc-wheel", help="astrolachesis wheel (else the installed package)")
    p.add_argument("-o", "--output", default="clusterhbm/data/mist_gaia_2mass.h5")
    a = p.parse_args(argv)

    fi, iso_origin, iso_sha = _open_input(MIST_MEMBER, a.grids_wheel, "lachesis_grids")
    fb, bc_origin, bc_sha = _open_input(BC_MEMBER, a.bc_wheel, "lachesis")
    iso = build_isochrones(fi)
    bc = build_bc(fb)
    provenance = {
        "isochrones": {"source": iso_origin, "sha256": iso_sha,
                       "grid_name": str(fi.attrs.get("grid_name", "MIST"))},
        "bc_tables": {"source": bc_origin, "sha256": bc_sha, "group": "UBVRIplus"},
        "feh_range": FEH_RANGE, "log_age_range": LOG_AGE_RANGE, "eep_range": EEP_RANGE,
        "n_mass_ties_fixed": iso["n_mass_ties_fixed"],
        "n_interior_rows_filled": iso["n_rows_filled"],
        "builder": "isochrones/build_grid.py",
    }
    out = Path(a.output)
    write_grid(out, iso, bc, provenance)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) sha256 {sha}")
    print(f"isochrones: {iso['data'].shape} (feh x log_age x eep x col), "
          f"finite rows {np.isfinite(iso['data'][..., 0]).mean():.1%}, "
          f"mass ties fixed {iso['n_mass_ties_fixed']}, interior rows filled {iso['n_rows_filled']}")
    print(f"bc: {bc['data'].shape} (feh x teff x logg x av x band)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
