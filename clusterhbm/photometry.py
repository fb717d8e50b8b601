"""Photometry: stellar properties -> absolute and apparent magnitudes and parallax.

Bolometric corrections are interpolated in (Teff, log g, [Fe/H], A_V) from the MIST
tables, so extinction depends on the star's spectrum (R_V = 3.1), not on a fixed
coefficient per band. ``M_band = M_bol - BC_band``, ``M_bol = 4.74 - 2.5 log10(L/Lsun)``
(the MIST convention), ``m = M + 5 log10(distance_pc) - 5``, ``parallax_mas = 1000 /
distance_pc``.

One star per call; ``vmap`` for many. ``band_idx`` (from :func:`clusterhbm.grid.band_indices`)
and ``cubic`` are static.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .grid import BCGrid, ModelGrid
from .interp import hermite_weights, linear_weights, locate_irregular, locate_regular, stencil
from .isochrone import StarProperties, interp_eep, interp_mass

__all__ = [
    "MBOL_SUN",
    "BCSlice",
    "Observables",
    "bc_slice",
    "bolometric_correction",
    "bolometric_correction_slice",
    "observables_from_eep",
    "observables_from_mass",
    "photometry",
]

#: Solar bolometric magnitude adopted by MIST.
MBOL_SUN = 4.74


class Observables(NamedTuple):
    """Predicted observables of one star.

    mags : (n_band,) apparent magnitudes [mag], bands as requested
    parallax_mas : parallax [mas]
    props : :class:`~clusterhbm.isochrone.StarProperties` (initial/current mass, log Teff,
        log g, log L, phase, EEP)
    valid : bool; False outside the isochrone grid or the BC table, or A_V < 0, or
        distance <= 0
    """

    mags: jax.Array
    parallax_mas: jax.Array
    props: StarProperties
    valid: jax.Array


def _bc_axis(x, nodes, cubic, regular=False):
    n = nodes.shape[0]
    if regular:
        i, t, inside = locate_regular(x, nodes[0], (nodes[-1] - nodes[0]) / (n - 1), n)
    else:
        i, t, inside = locate_irregular(x, nodes)
    idx, outer = stencil(i, n, cubic)
    if not cubic:
        return idx, linear_weights(t), inside
    xs = nodes[jnp.clip(i - 1 + jnp.arange(4), 0, n - 1)]
    return idx, hermite_weights(t, xs, outer[0], outer[1]), inside


def bolometric_correction(bc: BCGrid, teff_k, logg, feh, av_mag, band_idx, *,
                          cubic: bool = False):
    """Interpolated bolometric corrections ``BC = M_bol - M_band`` for the given bands.

    Parameters
    ----------
    bc : BCGrid
    teff_k, logg, feh, av_mag : float scalars
        Effective temperature [K], log10 g [cgs], [Fe/H] [dex], V-band extinction [mag].
    band_idx : tuple of int, static
    cubic : bool, static
        Tensor-product C1 cubic Hermite in all four axes (4^4 nodes) if True, else
        quadrilinear (2^4 nodes).

    Returns
    -------
    bc_mag : (n_band,) float
    inside : bool, whether the point lies inside the table
    """
    i_f, w_f, in_f = _bc_axis(feh, bc.feh, cubic, regular=True)
    i_t, w_t, in_t = _bc_axis(teff_k, bc.teff, cubic)
    i_g, w_g, in_g = _bc_axis(logg, bc.logg, cubic)
    i_a, w_a, in_a = _bc_axis(av_mag, bc.av, cubic)
    b = jnp.asarray(band_idx)
    vals = bc.data[i_f[:, None, None, None, None], i_t[None, :, None, None, None],
                   i_g[None, None, :, None, None], i_a[None, None, None, :, None],
                   b[None, None, None, None, :]]
    out = jnp.einsum("a,b,c,d,abcdn->n", w_f, w_t, w_g, w_a, vals)
    return out, in_f & in_t & in_g & in_a


class BCSlice(NamedTuple):
    """The bolometric-correction table at one ([Fe/H], A_V), for the requested bands.

    When every star shares [Fe/H] and A_V (their widths fixed at zero), the interpolation
    in those two axes is the same for every star: :func:`bc_slice` does it once per
    density evaluation, and :func:`bolometric_correction_slice` is a 2-D look-up in
    (Teff, log g) per star (4^2 instead of 4^4 nodes in the cubic scheme). The tensor-product
    scheme is linear in the tabulated values, so the result equals
    :func:`bolometric_correction`'s to float rounding.

    teff, logg : the table's axes
    data : (n_teff, n_logg, n_band) BC at ([Fe/H], A_V)
    inside : bool, ([Fe/H], A_V) inside the table
    """

    teff: jax.Array
    logg: jax.Array
    data: jax.Array
    inside: jax.Array


def bc_slice(bc: BCGrid, feh, av_mag, band_idx, *, cubic: bool = False) -> BCSlice:
    """The (Teff, log g) slice of the BC table at ``feh`` [dex], ``av_mag`` [mag]."""
    i_f, w_f, in_f = _bc_axis(feh, bc.feh, cubic, regular=True)
    i_a, w_a, in_a = _bc_axis(av_mag, bc.av, cubic)
    b = jnp.asarray(band_idx)
    vals = bc.data[i_f[:, None], :, :, i_a[None, :]]  # (k, k, n_teff, n_logg, n_all_band)
    data = jnp.einsum("a,d,adtgn->tgn", w_f, w_a, vals[..., b])
    return BCSlice(bc.teff, bc.logg, data, in_f & in_a)


def bolometric_correction_slice(s: BCSlice, teff_k, logg, *, cubic: bool = False):
    """:func:`bolometric_correction` on a :class:`BCSlice` (same returns)."""
    i_t, w_t, in_t = _bc_axis(teff_k, s.teff, cubic)
    i_g, w_g, in_g = _bc_axis(logg, s.logg, cubic)
    vals = s.data[i_t[:, None], i_g[None, :]]  # (k, k, n_band)
    return jnp.einsum("b,c,bcn->n", w_t, w_g, vals), s.inside & in_t & in_g


def photometry(bc: BCGrid, props: StarProperties, feh, distance_pc, av_mag, band_idx, *,
               cubic: bool = False, bcs: BCSlice | None = None) -> Observables:
    """Apparent magnitudes and parallax of a star with known properties.

    ``bcs``: the BC table already sliced at this ``feh`` and ``av_mag`` (:func:`bc_slice`,
    for ``band_idx``), if the caller has one; the result is the same.
    """
    teff = 10.0 ** jnp.clip(props.log_teff, 3.0, 7.0)  # finite even for invalid points
    if bcs is None:
        bcv, inside = bolometric_correction(bc, teff, props.logg, feh, av_mag, band_idx,
                                            cubic=cubic)
    else:
        bcv, inside = bolometric_correction_slice(bcs, teff, props.logg, cubic=cubic)
    mbol = MBOL_SUN - 2.5 * props.logl
    pos = distance_pc > 0
    safe_d = jnp.where(pos, distance_pc, 1.0)
    dm = 5.0 * jnp.log10(safe_d) - 5.0
    mags = mbol - bcv + dm
    valid = props.valid & inside & pos & (av_mag >= 0)
    return Observables(mags=mags, parallax_mas=1000.0 / safe_d, props=props, valid=valid)


def observables_from_eep(grid: ModelGrid, eep, log_age, feh, distance_pc, av_mag, band_idx,
                         *, cubic: bool = False) -> Observables:
    """Forward model of one star parametrised by EEP (the sampler's coordinate)."""
    props = interp_eep(grid.iso, eep, log_age, feh, cubic=cubic)
    return photometry(grid.bc, props, feh, distance_pc, av_mag, band_idx, cubic=cubic)


def observables_from_mass(grid: ModelGrid, mass_msun, log_age, feh, distance_pc, av_mag,
                          band_idx, *, cubic: bool = False) -> Observables:
    """Forward model of one star parametrised by initial mass [Msun]."""
    props = interp_mass(grid.iso, mass_msun, log_age, feh, cubic=cubic)
    return photometry(grid.bc, props, feh, distance_pc, av_mag, band_idx, cubic=cubic)
