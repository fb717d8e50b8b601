"""Gaia DR3-like observational errors as functions of G magnitude.

The median errors of the G, BP and RP magnitudes [mag] and of the parallax [mas] at a given
G magnitude [mag], and log-normal draws of per-star errors around them, calibrated on
real Gaia DR3 open-cluster data by ``scripts/calibrate_gaia_errors.py``, which writes the
coefficients to ``clusterhbm/data/gaia_error_model.json`` (read here once, lazily).

Form (per error kind ``k``; ``G`` in mag; ``sigma`` in mag, or mas for the parallax)::

    log10 sigma_k(G) = sum_j c_kj (clip(G, g_bright, g_faint) - g_ref)**j
                       + faint_slope * max(G - g_faint, 0)
                       + bright_slope * clip(g_rise - G, 0, g_rise - g_lo)

non-decreasing in G for ``G >= g_rise`` (at most 13 mag), constant below ``g_lo`` and
growing at most like 10^(0.5 G) beyond the data (``G > g_faint``, about 20 mag). Per-star
errors are drawn as ``ln(error) ~ Normal(ln sigma_k(G), scatter_ln_k)``.

The relation is the median over the calibration clusters' stars at each G. BP and RP
errors also depend on colour (at fixed G, redder stars have larger BP errors); the median
follows the colours of cluster main sequences and giants. Magnitude errors are
``2.5 / ln(10) / phot_*_mean_flux_over_error`` (see :mod:`clusterhbm.catalogue`).

All functions are pure and written with :mod:`jax.numpy`: they can be jitted, vmapped
and differentiated. Band names are static (Python strings); ``g_mag``, ``rng_key`` and the
:class:`ErrorModel` arrays are traced. Example::

    key = jax.random.key(0)
    errs = jax.jit(draw_errors, static_argnames=("bands", "scatter"))(key, g_mag)
    errs["BP"], errs["parallax"]  # mag, mas
"""

from __future__ import annotations

import functools
import json
import logging
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BANDS",
    "ERROR_KINDS",
    "ErrorModel",
    "draw_errors",
    "load_error_model",
    "median_mag_error",
    "median_parallax_error_mas",
]

log = logging.getLogger(__name__)

#: Photometric bands with a magnitude error model.
BANDS = ("G", "BP", "RP")
#: Row order of the :class:`ErrorModel` arrays: the bands, then the parallax.
ERROR_KINDS = BANDS + ("parallax",)
_UNITS = {"G": "mag", "BP": "mag", "RP": "mag", "parallax": "mas"}
_RESOURCE = ("data", "gaia_error_model.json")


class ErrorModel(NamedTuple):
    """Coefficients of the error model, one row per entry of :data:`ERROR_KINDS`.

    A NamedTuple of arrays (a JAX pytree): it can be passed through ``jax.jit``. Rows are
    ``("G", "BP", "RP", "parallax")``; ``K = 4`` and ``D`` is the highest polynomial degree.

    Attributes
    ----------
    coeffs : array, shape (K, D + 1)
        Coefficients of log10 sigma in ascending powers of ``G - g_ref`` (zero-padded);
        sigma in mag (bands) or mas (parallax).
    g_ref : array, shape (K,)
        Origin of the polynomial [mag].
    g_lo : array, shape (K,)
        Brightest calibrated G [mag]; sigma is constant for brighter stars.
    g_bright : array, shape (K,)
        Bright end of the polynomial part (plateau) [mag].
    g_rise : array, shape (K,)
        ``min(g_bright, 13)`` [mag]: sigma is non-decreasing in G for G >= ``g_rise``.
    g_faint : array, shape (K,)
        Faintest calibrated G [mag]; log-linear extrapolation beyond it.
    bright_slope : array, shape (K,)
        Rise of log10 sigma towards brighter G below ``g_rise`` [dex/mag], >= 0.
    faint_slope : array, shape (K,)
        Slope of log10 sigma beyond ``g_faint`` [dex/mag], in [0.2, 0.5].
    scatter_ln : array, shape (K,)
        Standard deviation of ln(error) about the median at fixed G [dimensionless].
    """

    coeffs: jax.Array
    g_ref: jax.Array
    g_lo: jax.Array
    g_bright: jax.Array
    g_rise: jax.Array
    g_faint: jax.Array
    bright_slope: jax.Array
    faint_slope: jax.Array
    scatter_ln: jax.Array


def load_error_model(path: str | Path | None = None) -> ErrorModel:
    """Load the calibrated error model (cached; the bundled file is read only once).

    Parameters
    ----------
    path : str or Path, optional
        A JSON file in the layout written by ``scripts/calibrate_gaia_errors.py``.
        Default: the bundled ``clusterhbm/data/gaia_error_model.json``.

    Returns
    -------
    ErrorModel
        Read-only float64 NumPy arrays (JAX converts them to its default float type).

    Raises
    ------
    ValueError
        If the file lacks an error kind or a coefficient.
    """
    return _load(None if path is None else str(Path(path).resolve()))


@functools.lru_cache(maxsize=8)
def _load(path: str | None) -> ErrorModel:
    if path is None:
        text = resources.files("clusterhbm").joinpath(*_RESOURCE).read_text()
        source = "clusterhbm/" + "/".join(_RESOURCE)
    else:
        text = Path(path).read_text()
        source = path
    models = json.loads(text).get("models", {})
    missing = [k for k in ERROR_KINDS if k not in models]
    if missing:
        raise ValueError(
            f"error model {source} lacks {missing}; expected entries for {ERROR_KINDS}"
        )
    scalars = ("g_ref", "g_lo", "g_bright", "g_rise", "g_faint",
               "bright_slope_dex_per_mag", "faint_slope_dex_per_mag", "scatter_ln")
    for kind in ERROR_KINDS:
        absent = [key for key in ("coeffs_log10",) + scalars if key not in models[kind]]
        if absent:
            raise ValueError(f"error model {source}: entry {kind!r} lacks {absent}")
        if models[kind].get("unit", _UNITS[kind]) != _UNITS[kind]:
            raise ValueError(
                f"error model {source}: {kind!r} must be in {_UNITS[kind]}, "
                f"got {models[kind]['unit']!r}"
            )
    n_coef = max(len(models[k]["coeffs_log10"]) for k in ERROR_KINDS)
    coeffs = np.zeros((len(ERROR_KINDS), n_coef))
    for i, kind in enumerate(ERROR_KINDS):
        c = models[kind]["coeffs_log10"]
        coeffs[i, : len(c)] = c
    fields = [coeffs] + [
        np.array([float(models[k][key]) for k in ERROR_KINDS]) for key in scalars
    ]
    for arr in fields:
        arr.setflags(write=False)
    log.debug("loaded Gaia error model from %s", source)
    return ErrorModel(*fields)


def _kind_index(band: str) -> int:
    """Row of ``band`` in :class:`ErrorModel`; ValueError for anything but G, BP, RP."""
    if not isinstance(band, str) or band not in BANDS:
        raise ValueError(f"unknown band {band!r}; allowed bands are {BANDS}")
    return BANDS.index(band)


def _as_float(g_mag) -> jax.Array:
    g = jnp.asarray(g_mag)
    return g.astype(jnp.promote_types(g.dtype, jnp.float32))


def _log10_median(model: ErrorModel, row: int, g: jax.Array) -> jax.Array:
    """log10 of the median error of row ``row`` at G magnitudes ``g`` (any shape)."""
    dt = g.dtype
    coeffs = jnp.asarray(model.coeffs[row], dtype=dt)

    def par(field):
        return jnp.asarray(field[row], dtype=dt)

    g_lo, g_bright, g_rise, g_faint = (par(f) for f in
                                       (model.g_lo, model.g_bright, model.g_rise, model.g_faint))
    x = jnp.clip(g, g_bright, g_faint) - par(model.g_ref)
    poly = jnp.zeros_like(x)
    for j in range(coeffs.shape[0] - 1, -1, -1):  # Horner; the degree is static
        poly = poly * x + coeffs[j]
    faint = par(model.faint_slope) * jnp.maximum(g - g_faint, 0.0)
    bright = par(model.bright_slope) * jnp.clip(g_rise - g, 0.0, jnp.maximum(g_rise - g_lo, 0.0))
    return poly + faint + bright


def median_mag_error(band: str, g_mag, *, model: ErrorModel | None = None) -> jax.Array:
    """Median Gaia DR3 magnitude error in ``band`` at G magnitude ``g_mag``.

    Parameters
    ----------
    band : {"G", "BP", "RP"}
        The band whose error is wanted (static under ``jit``).
    g_mag : array_like, any shape
        Gaia G magnitude [mag] (also for BP and RP errors). NaN gives NaN.
    model : ErrorModel, optional
        Coefficients; default :func:`load_error_model` ().

    Returns
    -------
    jax.Array, shape of ``g_mag``
        Median error [mag], positive.

    Raises
    ------
    ValueError
        If ``band`` is not one of :data:`BANDS`.
    """
    row = _kind_index(band)
    model = load_error_model() if model is None else model
    return 10.0 ** _log10_median(model, row, _as_float(g_mag))


def median_parallax_error_mas(g_mag, *, model: ErrorModel | None = None) -> jax.Array:
    """Median Gaia DR3 parallax error at G magnitude ``g_mag``.

    Parameters
    ----------
    g_mag : array_like, any shape
        Gaia G magnitude [mag]. NaN gives NaN.
    model : ErrorModel, optional
        Coefficients; default :func:`load_error_model` ().

    Returns
    -------
    jax.Array, shape of ``g_mag``
        Median parallax error [mas], positive.
    """
    model = load_error_model() if model is None else model
    return 10.0 ** _log10_median(model, ERROR_KINDS.index("parallax"), _as_float(g_mag))


def draw_errors(
    rng_key: jax.Array,
    g_mag,
    *,
    bands: tuple[str, ...] = BANDS,
    scatter: bool = True,
    model: ErrorModel | None = None,
) -> dict[str, jax.Array]:
    """Draw per-star Gaia-like errors: log-normal about the median error at each G.

    ``ln(error) = ln(median(G)) + scatter_ln * N(0, 1)``, independently per star and per
    error kind. The random stream of each kind is ``jax.random.fold_in(rng_key, row)``
    with ``row`` its index in :data:`ERROR_KINDS`, so a band's draws do not depend on which
    other bands are requested.

    Parameters
    ----------
    rng_key : jax.Array
        A JAX PRNG key.
    g_mag : array_like, any shape
        Gaia G magnitude [mag] of each star.
    bands : tuple of str, optional
        Bands among :data:`BANDS` (static under ``jit``); default all three. A single
        string is taken as one band.
    scatter : bool, optional
        If False return the median errors (no randomness; static under ``jit``).
    model : ErrorModel, optional
        Coefficients; default :func:`load_error_model` ().

    Returns
    -------
    dict of str to jax.Array
        One entry per band [mag] and ``"parallax"`` [mas], each of the shape of ``g_mag``.

    Raises
    ------
    ValueError
        If a band is not one of :data:`BANDS`.
    """
    if isinstance(bands, str):
        bands = (bands,)
    rows = {band: _kind_index(band) for band in bands}
    rows["parallax"] = ERROR_KINDS.index("parallax")
    model = load_error_model() if model is None else model
    g = _as_float(g_mag)
    out = {}
    for name, row in rows.items():
        ln_sigma = jnp.log(10.0) * _log10_median(model, row, g)
        if scatter:
            z = jax.random.normal(jax.random.fold_in(rng_key, row), g.shape, dtype=g.dtype)
            ln_sigma = ln_sigma + jnp.asarray(model.scatter_ln[row], dtype=g.dtype) * z
        out[name] = jnp.exp(ln_sigma)
    return out
