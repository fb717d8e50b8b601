"""Isochrone interpolation: (EEP or initial mass, log age, [Fe/H]) -> stellar properties.

One star per call; ``vmap`` for many. Two input coordinates:

* :func:`interp_eep` interpolates at fixed EEP across the bracketing isochrones (as the
  ``isochrones`` package does). EEP is monotone along every isochrone and resolves every
  phase, including core-helium burning, where initial mass changes by less than the
  float32 resolution of the tables; it is the sampler's per-star coordinate.
* :func:`eep_from_mass` inverts initial mass -> EEP on the interpolated isochrone at the
  star's (log age, [Fe/H]) (a bisection over EEP nodes, then a linear step; in the cubic
  scheme a bisection on the cubic interpolant and one Newton step follow), so :func:`interp_mass` holds
  initial mass fixed across the bracketing isochrones, as minimint does, and its valid
  region ends smoothly at the interpolated end of the isochrone rather than at the
  bracketing node's.

Validity: a point is valid when (log age, [Fe/H]) lie on the axes and every EEP row the
stencil's inner cell needs is a real row of its isochrone. Invalid points return finite
(extrapolated) values with ``valid = False``: the likelihood turns them into -inf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .grid import (
    COL_INITIAL_MASS,
    COL_LOG_TEFF,
    COL_LOGG,
    COL_LOGL,
    COL_PHASE,
    COL_STAR_MASS,
    IsochroneGrid,
)
from .interp import hermite_weights, linear_weights, locate_regular, steffen_unit, stencil

__all__ = ["IsochroneTable", "StarProperties", "eep_from_mass", "eep_range", "interp_eep",
           "interp_mass", "isochrone_table", "table_eep_from_mass", "table_eep_range",
           "table_interp"]

_SMOOTH_COLS = (COL_INITIAL_MASS, COL_STAR_MASS, COL_LOG_TEFF, COL_LOGG, COL_LOGL)


class StarProperties(NamedTuple):
    """Interpolated properties of one star (all float scalars unless noted).

    initial_mass, star_mass : Msun
    log_teff : log10 K
    logg : log10 cm s^-2
    logl : log10 Lsun
    phase : MIST phase code of the nearest node (-1 PMS, 0 MS, 2 RGB, 3 CHeB, ...)
    eep : the EEP coordinate used
    valid : bool, False outside the grid
    """

    initial_mass: jax.Array
    star_mass: jax.Array
    log_teff: jax.Array
    logg: jax.Array
    logl: jax.Array
    phase: jax.Array
    eep: jax.Array
    valid: jax.Array


def _axis(x, nodes, cubic):
    """Regular-axis stencil: (idx, weights, inside, outer_exists)."""
    n = nodes.shape[0]
    dx = (nodes[-1] - nodes[0]) / (n - 1)  # full span: exact to float rounding of the ends
    i, t, inside = locate_regular(x, nodes[0], dx, n)
    idx, outer = stencil(i, n, cubic)
    if not cubic:
        return idx, linear_weights(t), inside, None, t
    return idx, (t, nodes[0] + dx * (i - 1 + jnp.arange(4))), inside, outer, t


def _hermite(wspec, left_ok, right_ok):
    t, xs = wspec
    return hermite_weights(t, xs, left_ok, right_ok)


def interp_eep(grid: IsochroneGrid, eep, log_age, feh, *, cubic: bool = False,
               columns=_SMOOTH_COLS) -> StarProperties:
    """Interpolate the isochrone grid at fixed (EEP, log age, [Fe/H]).

    Parameters
    ----------
    grid : IsochroneGrid
    eep, log_age, feh : float scalars
        EEP (fractional), log10(age/yr), [Fe/H] in dex.
    cubic : bool, static
        False: trilinear. True: C1 cubic: Steffen's monotone cubic along EEP, then cubic
        Hermite (Catmull-Rom) across log age and [Fe/H], with one-sided tangents where a
        neighbour row is not real.

    Returns
    -------
    StarProperties
    """
    # Points off an axis are invalid; evaluate at the clamped point so that values and
    # gradients stay finite (no wild extrapolation).
    in_feh = (feh >= grid.feh[0]) & (feh <= grid.feh[-1])
    in_age = (log_age >= grid.log_age[0]) & (log_age <= grid.log_age[-1])
    in_eep = (eep >= grid.eep[0]) & (eep <= grid.eep[-1])
    feh = jnp.clip(feh, grid.feh[0], grid.feh[-1])
    log_age = jnp.clip(log_age, grid.log_age[0], grid.log_age[-1])
    eep = jnp.clip(eep, grid.eep[0], grid.eep[-1])
    ifeh, wfeh, _, out_feh, _ = _axis(feh, grid.feh, cubic)
    iage, wage, _, out_age, _ = _axis(log_age, grid.log_age, cubic)
    ieep, weep, _, out_eep, _ = _axis(eep, grid.eep, cubic)
    cols = jnp.asarray(columns)
    vals = grid.data[ifeh[:, None, None, None], iage[None, :, None, None],
                     ieep[None, None, :, None], cols[None, None, None, :]]  # (k,k,k,ncol)
    first = grid.first[ifeh[:, None], iage[None, :]]  # (k, k)
    last = grid.last[ifeh[:, None], iage[None, :]]
    real = (ieep[None, None, :] >= first[..., None]) & (ieep[None, None, :] <= last[..., None])
    if cubic:
        real = real & jnp.concatenate([out_eep[:1], jnp.ones(2, bool), out_eep[1:]])
        # Along EEP: Steffen's monotone cubic (Catmull-Rom overshoots at the turnoff hook
        # and would make initial mass non-monotone in EEP).
        t_eep = weep[0]
        v = steffen_unit(jnp.moveaxis(vals, 2, -1), t_eep, real[..., 0, None],
                         real[..., 3, None])  # (k, k, ncol)
        ok_iso = real[..., 1] & real[..., 2]
        ok_iso_a = ok_iso & jnp.concatenate([out_age[:1], jnp.ones(2, bool), out_age[1:]])
        v = steffen_unit(jnp.moveaxis(v, 1, -1), wage[0], ok_iso_a[:, 0, None],
                         ok_iso_a[:, 3, None])  # (k, ncol)
        ok_feh = ok_iso[:, 1] & ok_iso[:, 2]
        ok_feh_f = ok_feh & jnp.concatenate([out_feh[:1], jnp.ones(2, bool), out_feh[1:]])
        v = steffen_unit(v.T, wfeh[0], ok_feh_f[0], ok_feh_f[3])  # (ncol,)
        valid = ok_feh[1] & ok_feh[2]
    else:
        w = wfeh[:, None, None] * wage[None, :, None] * weep[None, None, :]
        v = jnp.einsum("abe,abec->c", w, vals)
        valid = jnp.all(real)
    valid = valid & in_feh & in_age & in_eep
    # Phase: the code at the nearest node (a label, not interpolated).
    def near(x, nodes):
        n = nodes.shape[0]
        return jnp.clip(jnp.round((x - nodes[0]) * (n - 1) / (nodes[-1] - nodes[0])), 0,
                        n - 1).astype(
            jnp.int32
        )

    phase = grid.data[near(feh, grid.feh), near(log_age, grid.log_age), near(eep, grid.eep),
                      COL_PHASE]
    out = dict(zip(columns, [v[j] for j in range(len(columns))]))
    nan = jnp.zeros_like(v[0])
    return StarProperties(
        initial_mass=out.get(COL_INITIAL_MASS, nan),
        star_mass=out.get(COL_STAR_MASS, nan),
        log_teff=out.get(COL_LOG_TEFF, nan),
        logg=out.get(COL_LOGG, nan),
        logl=out.get(COL_LOGL, nan),
        phase=phase,
        eep=jnp.asarray(eep, v.dtype),
        valid=valid,
    )


def _bracket(grid: IsochroneGrid, log_age, feh):
    """Bilinear (feh, age) bracket: indices (2,), (2,), weights (2, 2), common EEP range."""
    ifeh, wfeh, in_feh, _, _ = _axis(feh, grid.feh, False)
    iage, wage, in_age, _, _ = _axis(log_age, grid.log_age, False)
    w = wfeh[:, None] * wage[None, :]
    lo = jnp.max(grid.first[ifeh[:, None], iage[None, :]])
    hi = jnp.min(grid.last[ifeh[:, None], iage[None, :]])
    return ifeh, iage, w, lo, hi, in_feh & in_age


def eep_range(grid: IsochroneGrid, log_age, feh):
    """EEP interval ``(eep_min, eep_max)`` where :func:`interp_eep` (linear) is valid."""
    _, _, _, lo, hi, _ = _bracket(grid, log_age, feh)
    return grid.eep[0] + lo, grid.eep[0] + hi


def eep_from_mass(grid: IsochroneGrid, mass_msun, log_age, feh, *, cubic: bool = False,
                  eps: float = 0.0):
    """EEP at which the interpolated isochrone at (log age, [Fe/H]) has ``mass_msun``.

    With ``eps > 0`` the inverted quantity is the pseudo-mass ``m(EEP) + eps * EEP``
    (strictly increasing even where initial mass is flat; see :mod:`clusterhbm.model`).

    Returns ``(eep, valid)``; ``valid`` is False when the mass is outside the isochrone's
    range (below its lowest mass or past its last EEP) or (log age, [Fe/H]) is off-grid.
    The derivative with respect to mass, age and [Fe/H] is that of the inverse function.
    """
    ifeh, iage, w, lo, hi, inside = _bracket(grid, log_age, feh)
    # Off the (age, feh) axes the result is invalid anyway: invert on the clamped point so
    # that values and gradients stay finite.
    log_age = jnp.clip(log_age, grid.log_age[0], grid.log_age[-1])
    feh = jnp.clip(feh, grid.feh[0], grid.feh[-1])
    ifeh, iage, w, lo, hi, _ = _bracket(grid, log_age, feh)

    def mbar(j):
        m = grid.data[ifeh[:, None], iage[None, :], j, COL_INITIAL_MASS]
        return jnp.sum(w * m) + eps * (grid.eep[0] + j)

    # Largest j in [lo, hi - 1] with mbar(j) <= mass: bisection over <= 2^10 nodes.
    n_iter = int(grid.eep.shape[0] - 1).bit_length()
    def bisect(_, ab):
        a, b = ab
        mid = (a + b + 1) // 2
        go = mbar(mid) <= mass_msun
        return jnp.where(go, mid, a), jnp.where(go, b, mid - 1)

    j, _ = jax.lax.fori_loop(0, n_iter, bisect, (lo, hi - 1))
    m0, m1 = mbar(j), mbar(j + 1)
    rising = m1 > m0
    t = (mass_msun - m0) / jnp.where(rising, m1 - m0, 1.0)
    eep = grid.eep[0] + j + jnp.clip(t, 0.0, 1.0)
    valid = inside & (mass_msun >= mbar(lo)) & (mass_msun <= mbar(hi)) & (hi > lo)
    if cubic:
        # Root of the cubic interpolant near the linear one: bisection in a 5-EEP window
        # (the cubic can differ from the linear inverse by more than one cell near the
        # turnoff hook), then one Newton step whose value change is ~0 but whose gradient
        # is the implicit-function derivative d(eep)/d(mass, age, feh).
        def mcub(e):
            return interp_eep(grid, e, log_age, feh, cubic=True,
                              columns=(COL_INITIAL_MASS,)).initial_mass + eps * e

        e_lo = grid.eep[0] + lo
        e_hi = grid.eep[0] + hi
        a = jnp.maximum(grid.eep[0] + j - 2.0, e_lo)
        b = jnp.minimum(grid.eep[0] + j + 3.0, e_hi)
        a = jnp.where(mcub(a) <= mass_msun, a, e_lo)
        b = jnp.where(mcub(b) >= mass_msun, b, e_hi)
        a, b = jax.lax.stop_gradient((a, b))
        mass_c = jax.lax.stop_gradient(mass_msun)
        def bisect(_, ab):
            a, b = ab
            mid = 0.5 * (a + b)
            go = mcub(mid) <= mass_c
            return jnp.where(go, mid, a), jnp.where(go, b, mid)

        a, b = jax.lax.fori_loop(0, 24, bisect, (a, b))
        e0 = 0.5 * (a + b)
        r, dr = jax.jvp(lambda e: mcub(e) - mass_msun, (e0,), (jnp.ones_like(e0),))
        safe = dr > 1e-12
        eep = e0 - jnp.where(safe, r / jnp.where(safe, dr, 1.0), 0.0)
    return eep, valid


def interp_mass(grid: IsochroneGrid, mass_msun, log_age, feh, *,
                cubic: bool = False) -> StarProperties:
    """Interpolate at fixed (initial mass, log age, [Fe/H]); see :func:`eep_from_mass`."""
    eep, ok = eep_from_mass(grid, mass_msun, log_age, feh, cubic=cubic)
    props = interp_eep(grid, eep, log_age, feh, cubic=cubic)
    return props._replace(valid=props.valid & ok)


class IsochroneTable(NamedTuple):
    """One interpolated isochrone on the grid's EEP nodes (the shared-isochrone fast path).

    When every star shares one (log age, [Fe/H]) (the age and [Fe/H] widths are zero), the
    bilinear (log age, [Fe/H]) step of the trilinear scheme is the same for every star:
    :func:`isochrone_table` does it once, and :func:`table_interp` and
    :func:`table_eep_from_mass` are 1-D look-ups per star. The results equal
    :func:`interp_eep` and :func:`eep_from_mass` (linear scheme) to float rounding.

    The cubic table (``cubic=True``) applies Steffen's monotone cubic across log age and
    [Fe/H] at every EEP node, and the per-star look-ups apply it along EEP. Steffen's
    limiter is not linear, so this order (age and [Fe/H] first) differs slightly from
    :func:`interp_eep`'s (EEP first) between nodes. It is equal at grid nodes of (log age,
    [Fe/H]), and C1 in all three coordinates. It costs per star about what the linear
    scheme does, against ~15x for :func:`interp_eep` with ``cubic=True``
    (``scripts/kink_check.py``).

    values : (n_eep, 5) initial mass, current mass, log Teff, log g, log L at every node
    phase : (n_eep,) phase code at the nearest (age, [Fe/H]) node
    lo, hi : int, first and last node real on all four bracketing isochrones
    inside : bool, (log age, [Fe/H]) on the grid's axes
    eep0 : the first EEP (1)
    """

    values: jax.Array
    phase: jax.Array
    lo: jax.Array
    hi: jax.Array
    inside: jax.Array
    eep0: jax.Array


def isochrone_table(grid: IsochroneGrid, log_age, feh, *, cubic: bool = False
                    ) -> IsochroneTable:
    """The whole isochrone at (log age, [Fe/H]) on the EEP nodes: bilinear (linear scheme)
    or, with ``cubic``, Steffen's C1 cubic across log age and [Fe/H] (see
    :class:`IsochroneTable`)."""
    in_feh = (feh >= grid.feh[0]) & (feh <= grid.feh[-1])
    in_age = (log_age >= grid.log_age[0]) & (log_age <= grid.log_age[-1])
    log_age = jnp.clip(log_age, grid.log_age[0], grid.log_age[-1])
    feh = jnp.clip(feh, grid.feh[0], grid.feh[-1])
    ifeh, iage, w, lo, hi, _ = _bracket(grid, log_age, feh)
    cols = jnp.asarray(_SMOOTH_COLS)
    if cubic:
        ifeh, wfeh, _, out_feh, _ = _axis(feh, grid.feh, True)
        iage, wage, _, out_age, _ = _axis(log_age, grid.log_age, True)
        block = grid.data[ifeh[:, None], iage[None, :]][..., cols]  # (4, 4, n_eep, 5)
        j = jnp.arange(grid.eep.shape[0])
        first = grid.first[ifeh[:, None], iage[None, :]]  # (4, 4)
        last = grid.last[ifeh[:, None], iage[None, :]]
        real = (j >= first[..., None]) & (j <= last[..., None])  # (4, 4, n_eep)
        # across age (as interp_eep: an outer isochrone is used where its row is real)
        ok_a = real & jnp.concatenate([out_age[:1], jnp.ones(2, bool), out_age[1:]]
                                      )[None, :, None]
        v = steffen_unit(jnp.moveaxis(block, 1, -1), wage[0], ok_a[:, 0, :, None],
                         ok_a[:, 3, :, None])  # (4, n_eep, 5)
        ok_f = (real[:, 1] & real[:, 2]) & jnp.concatenate(
            [out_feh[:1], jnp.ones(2, bool), out_feh[1:]])[:, None]  # (4, n_eep)
        values = steffen_unit(jnp.moveaxis(v, 0, -1), wfeh[0], ok_f[0, :, None],
                              ok_f[3, :, None])  # (n_eep, 5)
    else:
        block = grid.data[ifeh[:, None], iage[None, :]][..., cols]  # (2, 2, n_eep, 5)
        values = jnp.einsum("ab,abec->ec", w, block)

    def near(x, nodes):
        n = nodes.shape[0]
        return jnp.clip(jnp.round((x - nodes[0]) * (n - 1) / (nodes[-1] - nodes[0])), 0,
                        n - 1).astype(jnp.int32)

    phase = grid.data[near(feh, grid.feh), near(log_age, grid.log_age), :, COL_PHASE]
    return IsochroneTable(values, phase, lo, hi, in_feh & in_age,
                          jnp.asarray(grid.eep[0], values.dtype))


def _table_cubic(table: IsochroneTable, i, t, col=None):
    """Steffen's cubic along EEP in cell ``i`` of the table (all columns, or one)."""
    n = table.values.shape[0]
    idx = jnp.clip(i - 1 + jnp.arange(4), 0, n - 1)
    y = table.values[idx] if col is None else table.values[idx, col]  # (4, 5) | (4,)
    y = y.T if col is None else y
    return steffen_unit(y, t, i - 1 >= table.lo, i + 2 <= table.hi)


def table_interp(table: IsochroneTable, eep, *, cubic: bool = False) -> StarProperties:
    """:func:`interp_eep` on a precomputed :class:`IsochroneTable` (linear or cubic along
    EEP, as the table was built)."""
    n = table.values.shape[0]
    e_max = table.eep0 + n - 1
    in_eep = (eep >= table.eep0) & (eep <= e_max)
    e = jnp.clip(eep, table.eep0, e_max)
    i, t, _ = locate_regular(e, table.eep0, (e_max - table.eep0) / (n - 1), n)
    if cubic:
        v = _table_cubic(table, i, t)
    else:
        v0 = table.values[i]
        v1 = table.values[i + 1]
        v = v0 + t * (v1 - v0)
    valid = table.inside & in_eep & (i >= table.lo) & (i + 1 <= table.hi)
    phase = table.phase[jnp.clip(jnp.round(e - table.eep0).astype(jnp.int32), 0, n - 1)]
    return StarProperties(initial_mass=v[0], star_mass=v[1], log_teff=v[2], logg=v[3],
                          logl=v[4], phase=phase, eep=jnp.asarray(eep, v.dtype), valid=valid)


def table_eep_from_mass(table: IsochroneTable, mass_msun, *, eps: float = 0.0,
                        cubic: bool = False):
    """:func:`eep_from_mass` on a precomputed :class:`IsochroneTable`.

    Cubic: the node bisection of the linear scheme finds the cell; Steffen's cubic is
    monotone there when the node values are, so a bisection in the cell (24 halvings,
    no gradient) and one Newton step (value change ~0, the implicit-function gradient)
    invert it."""
    n = table.values.shape[0]
    lo, hi = table.lo, table.hi

    def mbar(j):
        return table.values[j, 0] + eps * (table.eep0 + j)

    n_iter = int(n - 1).bit_length()

    def bisect(_, ab):
        a, b = ab
        mid = (a + b + 1) // 2
        go = mbar(mid) <= mass_msun
        return jnp.where(go, mid, a), jnp.where(go, b, mid - 1)

    j, _ = jax.lax.fori_loop(0, n_iter, bisect, (lo, hi - 1))
    m0, m1 = mbar(j), mbar(j + 1)
    rising = m1 > m0
    t = (mass_msun - m0) / jnp.where(rising, m1 - m0, 1.0)
    eep = table.eep0 + j + jnp.clip(t, 0.0, 1.0)
    valid = table.inside & (mass_msun >= mbar(lo)) & (mass_msun <= mbar(hi)) & (hi > lo)
    if cubic:
        def mcub(u):
            return _table_cubic(table, j, u, col=0) + eps * (table.eep0 + j + u)

        mass_c = jax.lax.stop_gradient(mass_msun)

        def halve(_, ab):
            a, b = ab
            mid = 0.5 * (a + b)
            go = mcub(mid) <= mass_c
            return jnp.where(go, mid, a), jnp.where(go, b, mid)

        a, b = jax.lax.fori_loop(0, 24, halve, (jnp.zeros_like(t), jnp.ones_like(t)))
        u0 = jax.lax.stop_gradient(0.5 * (a + b))
        r, dr = jax.jvp(lambda u: mcub(u) - mass_msun, (u0,), (jnp.ones_like(u0),))
        safe = dr > 1e-12
        eep = table.eep0 + j + u0 - jnp.where(safe, r / jnp.where(safe, dr, 1.0), 0.0)
    return eep, valid


def table_eep_range(table: IsochroneTable):
    """``(eep_min, eep_max)`` of a table (as :func:`eep_range`)."""
    return table.eep0 + table.lo, table.eep0 + table.hi
