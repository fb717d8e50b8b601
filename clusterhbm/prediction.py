"""``predict``: the forward model for users and scripts (a thin shell over the pure core)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .grid import ModelGrid, band_indices, load_grid
from .photometry import observables_from_eep, observables_from_mass

__all__ = ["predict"]


@functools.lru_cache(maxsize=32)
def _compiled(band_idx: tuple[int, ...], cubic: bool, by_eep: bool):
    fn = observables_from_eep if by_eep else observables_from_mass

    def one(grid, x, log_age, feh, distance_pc, av_mag):
        return fn(grid, x, log_age, feh, distance_pc, av_mag, band_idx, cubic=cubic)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0)))


def predict(*, mass_msun=None, eep=None, log_age, feh=0.0, distance_pc=10.0, av_mag=0.0,
            bands=("G", "BP", "RP"), cubic: bool = False, grid: ModelGrid | None = None):
    """Predict apparent magnitudes, parallax and stellar properties.

    Give exactly one of ``mass_msun`` (initial mass) or ``eep``. Inputs are scalars or
    arrays that broadcast together.

    Parameters
    ----------
    mass_msun : float or array, optional
        Initial mass [Msun].
    eep : float or array, optional
        MIST equivalent evolutionary point (1..707 in the bundled grid).
    log_age : float or array
        log10(age / yr).
    feh : float or array
        [Fe/H] [dex].
    distance_pc : float or array
        Distance [pc] (default 10 pc: absolute magnitudes).
    av_mag : float or array
        V-band extinction A_V [mag], R_V = 3.1.
    bands : sequence of str
        Any of :data:`clusterhbm.grid.BAND_NAMES` (``"G"``, ``"BP"``, ``"RP"`` are Gaia
        EDR3/DR3; ``"G_DR2"``...; ``"J"``, ``"H"``, ``"Ks"``).
    cubic : bool
        C1 cubic interpolation instead of linear.
    grid : ModelGrid, optional
        Default: the bundled grid.

    Returns
    -------
    dict
        One apparent-magnitude array per band (keys are the band names), plus
        ``parallax_mas``, ``teff_k``, ``logg``, ``logl``, ``initial_mass``, ``star_mass``,
        ``phase``, ``eep`` and ``valid`` (bool). Invalid entries (outside the grid) are NaN
        in every float output.

    Raises
    ------
    ValueError
        for an unknown band, both or neither of ``mass_msun``/``eep``, or inputs whose
        shapes do not broadcast.
    """
    if (mass_msun is None) == (eep is None):
        raise ValueError("give exactly one of mass_msun= or eep=")
    band_idx = band_indices(bands)
    names = ("mass_msun" if eep is None else "eep", "log_age", "feh", "distance_pc",
             "av_mag")
    arrays = [np.asarray(mass_msun if eep is None else eep, dtype=float),
              np.asarray(log_age, dtype=float), np.asarray(feh, dtype=float),
              np.asarray(distance_pc, dtype=float), np.asarray(av_mag, dtype=float)]
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        got = ", ".join(f"{n}{a.shape}" for n, a in zip(names, arrays))
        raise ValueError(f"input shapes do not broadcast: {got}") from None
    flat = [jnp.asarray(np.broadcast_to(a, shape).ravel()) for a in arrays]
    grid = load_grid() if grid is None else grid
    obs = _compiled(band_idx, bool(cubic), eep is not None)(grid, *flat)
    valid = np.asarray(obs.valid).reshape(shape)

    def out(x):
        x = np.asarray(x, dtype=float).reshape(shape)
        return np.where(valid, x, np.nan)

    mags = np.asarray(obs.mags)
    res = {b: out(mags[:, k]) for k, b in enumerate(bands if not isinstance(bands, str)
                                                    else (bands,))}
    p = obs.props
    res.update(
        parallax_mas=out(obs.parallax_mas),
        teff_k=out(10.0 ** np.asarray(p.log_teff, dtype=float)),
        logg=out(p.logg),
        logl=out(p.logl),
        initial_mass=out(p.initial_mass),
        star_mass=out(p.star_mass),
        phase=out(p.phase),
        eep=out(p.eep),
        valid=valid,
    )
    return res
