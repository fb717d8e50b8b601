"""Isochrone interpolation: (EEP or initial mass, log age, [Fe/H]) -> stellar properties.

One star per call; ``vmap`` for many. Two input coordinates:

* :func:`interp_eep` interpolates at fixed EEP across the bracketing isochrones (as the
  ``isochrones`` package does). EEP is monotone along every isochrone and resolves every
  phase, including core-helium burning, where initial mass changes by less than the
  float32 resolution of the tables; it is the sampler's per-star coordinate.
* :func:`eep_from_mass` inverts initial mass -> EEP on the interpolated isochrone at the
  star's (log age, [Fe/H]) (a bisection over EEP nodes, then a linear step; in the cubic
  scheme the cell is re-found on the cubic node values, then a bisection on the cubic
  interpolant in the cell and one Newton step follow), so :func:`interp_mass` holds
  initial mass fixed across the bracketing isochrones, as minimint does, and its valid
  region ends smoothly at the interpolated end of the isochrone rather than at the
  bracketing node's.

Validity: a point is valid when (log age, [Fe/H]) lie on the axes and its EEP lies in
the EEP range ``[lo, hi]`` (:func:`eep_range`). ``lo`` is the bracketing isochrones'
first real rows interpolated with the values' bilinear (log age, [Fe/H]) weights, a
fractional EEP, continuous in (log age, [Fe/H]) and at a grid node that isochrone's own.
(The corners' common first row, max(first), jumped by up to 6 EEPs at a node: the
track's low-mass end, ~0.1 Msun, jumped by a few per cent in mass and up to 0.8 mag, and
the marginal log density of a 100-star mock at 150 pc by 39 at [Fe/H] = 0 and by 2441 at
-0.25; ``scripts/node_continuity.py``.) Between ``lo`` and the last corner's first row, a
corner whose isochrone has no row there enters with its edge row (the grid pads each
isochrone with copies of its edge rows, :func:`clusterhbm.grid.load_grid`): at most 6
EEPs, all at ~0.1 Msun. ``hi`` stays the corners' common last row, min(last): the last
rows differ only below log age 6.5, by up to 320 EEPs (the massive tracks end in
different phases), and padding over those would invent a track; so the bright end still
jumps at those nodes (few stars, < 3 Myr). Invalid points return finite (extrapolated)
values with ``valid = False``: the likelihood turns them into -inf.
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
from .interp import linear_weights, locate_regular, steffen_unit, stencil

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


def _cubic_at_nodes(grid: IsochroneGrid, nodes, log_age, feh, cols):
    """Steffen's cubic across log age, then [Fe/H], at the EEP node indices ``nodes``
    (shape (m,)); ``log_age`` and ``feh`` already clamped to the axes. Returns (m, ncol).

    An outer isochrone of the 4 x 4 stencil enters a node's tangent only where its row is
    real (else the tangent is the inner secant). This is the first half of the cubic
    scheme, shared by :func:`isochrone_table` (all nodes), :func:`interp_eep` (the 4 nodes
    of the EEP stencil) and :func:`eep_from_mass` (a window of nodes), so the three agree
    to float rounding."""
    ifeh, wfeh, _, out_feh, _ = _axis(feh, grid.feh, True)
    iage, wage, _, out_age, _ = _axis(log_age, grid.log_age, True)
    cols = jnp.asarray(cols)
    block = grid.data[ifeh[:, None, None, None], iage[None, :, None, None],
                      nodes[None, None, :, None], cols[None, None, None, :]]  # (4,4,m,nc)
    first = grid.first[ifeh[:, None], iage[None, :]]  # (4, 4)
    last = grid.last[ifeh[:, None], iage[None, :]]
    real = (nodes >= first[..., None]) & (nodes <= last[..., None])  # (4, 4, m)
    ok_a = real & jnp.concatenate([out_age[:1], jnp.ones(2, bool), out_age[1:]]
                                  )[None, :, None]
    v = steffen_unit(jnp.moveaxis(block, 1, -1), wage[0], ok_a[:, 0, :, None],
                     ok_a[:, 3, :, None])  # (4, m, nc)
    ok_f = (real[:, 1] & real[:, 2]) & jnp.concatenate(
        [out_feh[:1], jnp.ones(2, bool), out_feh[1:]])[:, None]  # (4, m)
    return steffen_unit(jnp.moveaxis(v, 0, -1), wfeh[0], ok_f[0, :, None],
                        ok_f[3, :, None])  # (m, nc)


def interp_eep(grid: IsochroneGrid, eep, log_age, feh, *, cubic: bool = False,
               columns=_SMOOTH_COLS) -> StarProperties:
    """Interpolate the isochrone grid at fixed (EEP, log age, [Fe/H]).

    Parameters
    ----------
    grid : IsochroneGrid
    eep, log_age, feh : float scalars
        EEP (fractional), log10(age/yr), [Fe/H] in dex.
    cubic : bool, static
        False: trilinear. True: C1 cubic: Steffen's monotone cubic across log age, then
        [Fe/H], at the 4 EEP nodes of the stencil (one-sided tangents where a neighbour
        row is not real), then along EEP (Catmull-Rom would overshoot at the turnoff hook
        and make initial mass non-monotone in EEP). The same order as
        :func:`isochrone_table`, so the per-star and shared-table paths agree everywhere.

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
    _, _, _, lo, hi, _ = _bracket(grid, log_age, feh)
    if cubic:
        n = grid.eep.shape[0]
        i, t, _ = locate_regular(eep, grid.eep[0], (grid.eep[-1] - grid.eep[0]) / (n - 1), n)
        nodes = jnp.clip(i - 1 + jnp.arange(4), 0, n - 1)
        y = _cubic_at_nodes(grid, nodes, log_age, feh, columns)  # (4, ncol)
        v = steffen_unit(y.T, t, i - 1 >= lo, i + 2 <= hi)  # (ncol,)
        valid = (eep >= grid.eep[0] + lo) & (eep <= grid.eep[0] + hi)
    else:
        ifeh, wfeh, _, _, _ = _axis(feh, grid.feh, False)
        iage, wage, _, _, _ = _axis(log_age, grid.log_age, False)
        ieep, weep, _, _, _ = _axis(eep, grid.eep, False)
        cols = jnp.asarray(columns)
        vals = grid.data[ifeh[:, None, None, None], iage[None, :, None, None],
                         ieep[None, None, :, None], cols[None, None, None, :]]  # (2,2,2,nc)
        w = wfeh[:, None, None] * wage[None, :, None] * weep[None, None, :]
        v = jnp.einsum("abe,abec->c", w, vals)
        valid = (eep >= grid.eep[0] + lo) & (eep <= grid.eep[0] + hi)
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
    """Bilinear (feh, age) bracket: indices (2,), (2,), weights (2, 2), and the EEP range
    ``lo, hi`` as (fractional) row indices: the corners' first real rows with the same
    weights, and their common last row (see the module docstring)."""
    ifeh, wfeh, in_feh, _, _ = _axis(feh, grid.feh, False)
    iage, wage, in_age, _, _ = _axis(log_age, grid.log_age, False)
    w = wfeh[:, None] * wage[None, :]
    lo = jnp.sum(w * grid.first[ifeh[:, None], iage[None, :]])
    hi = jnp.min(grid.last[ifeh[:, None], iage[None, :]]).astype(lo.dtype)
    return ifeh, iage, w, lo, hi, in_feh & in_age


def _node_range(lo, hi, n):
    """The integer node range ``[floor(lo), ceil(hi)]`` around a fractional EEP range."""
    lo_i = jnp.clip(jnp.floor(lo), 0, n - 2).astype(jnp.int32)
    hi_i = jnp.clip(jnp.ceil(hi), lo_i + 1, n - 1).astype(jnp.int32)
    return lo_i, hi_i


def eep_range(grid: IsochroneGrid, log_age, feh):
    """EEP interval ``(eep_min, eep_max)`` where :func:`interp_eep` is valid (fractional,
    continuous in (log age, [Fe/H]))."""
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
    ifeh, iage, w, lo_f, hi_f, _ = _bracket(grid, log_age, feh)
    lo, hi = _node_range(lo_f, hi_f, grid.eep.shape[0])

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
    valid = inside & (mass_msun >= mbar(lo)) & (mass_msun <= mbar(hi)) & (hi_f > lo_f)
    if cubic:
        # As table_eep_from_mass, on the cubic node values (Steffen across age and
        # [Fe/H], computed only at the nodes visited): a bisection over nodes finds the
        # cell, a bisection inside it with Steffen's cubic along EEP (monotone between
        # monotone nodes; no gradient) finds the root, and one Newton step (value change
        # ~0) carries the implicit-function gradient d(eep)/d(mass, age, feh).
        la_c, fe_c = jax.lax.stop_gradient((log_age, feh))
        mass_c = jax.lax.stop_gradient(mass_msun)

        def node_pseudo_mass(jj, la, fe):
            nodes = jnp.atleast_1d(jj)
            m = _cubic_at_nodes(grid, nodes, la, fe, (COL_INITIAL_MASS,))[:, 0]
            return m + eps * (grid.eep[0] + nodes)

        def bisect_c(_, ab):
            a, b = ab
            mid = (a + b + 1) // 2
            go = node_pseudo_mass(mid, la_c, fe_c)[0] <= mass_c
            return jnp.where(go, mid, a), jnp.where(go, b, mid - 1)

        c, _ = jax.lax.fori_loop(0, n_iter, bisect_c, (lo, hi - 1))
        n = grid.eep.shape[0]
        both = jnp.concatenate([jnp.clip(c - 1 + jnp.arange(4), 0, n - 1),
                                jnp.stack([lo, hi])])
        mk = _cubic_at_nodes(grid, both, log_age, feh, (COL_INITIAL_MASS,))[:, 0]
        m_lo = mk[4] + eps * (grid.eep[0] + lo)
        m_hi = mk[5] + eps * (grid.eep[0] + hi)
        y = mk[:4]  # initial mass at nodes c-1 .. c+2
        left_ok, right_ok = c - 1 >= lo_f, c + 2 <= hi_f

        def mcub(u, y=y):  # as the table's: Steffen on mass, plus the linear eps term
            return steffen_unit(y, u, left_ok, right_ok) + eps * (grid.eep[0] + c + u)

        y_c = jax.lax.stop_gradient(y)

        def halve(_, ab):
            a, b = ab
            mid = 0.5 * (a + b)
            go = mcub(mid, y_c) <= mass_c
            return jnp.where(go, mid, a), jnp.where(go, b, mid)

        a, b = jax.lax.fori_loop(0, 24, halve, (jnp.zeros_like(t), jnp.ones_like(t)))
        u0 = jax.lax.stop_gradient(0.5 * (a + b))
        r, dr = jax.jvp(lambda u: mcub(u) - mass_msun, (u0,), (jnp.ones_like(u0),))
        safe = dr > 1e-12
        eep = grid.eep[0] + c + u0 - jnp.where(safe, r / jnp.where(safe, dr, 1.0), 0.0)
        valid = inside & (mass_msun >= m_lo) & (mass_msun <= m_hi) & (hi_f > lo_f)
    # the fractional range: masses between the nodes' and the range's end are invalid
    valid = valid & (eep >= grid.eep[0] + lo_f) & (eep <= grid.eep[0] + hi_f)
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
    [Fe/H] at every EEP node, and the per-star look-ups apply it along EEP: the same steps
    in the same order as :func:`interp_eep` and :func:`eep_from_mass` with ``cubic=True``,
    so the two paths agree to float rounding everywhere; C1 in all three coordinates at
    the grid nodes. It costs per star about what the linear scheme does, against ~5x for
    :func:`interp_eep` with ``cubic=True`` (``scripts/profile_interp.py``).

    values : (n_eep, 5) initial mass, current mass, log Teff, log g, log L at every node
    phase : (n_eep,) phase code at the nearest (age, [Fe/H]) node
    lo, hi : float, the EEP range as fractional row indices (:func:`eep_range`)
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
        values = _cubic_at_nodes(grid, jnp.arange(grid.eep.shape[0]), log_age, feh,
                                 _SMOOTH_COLS)  # (n_eep, 5)
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
    valid = table.inside & in_eep & (e >= table.eep0 + table.lo) & (e <= table.eep0 + table.hi)
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
    lo, hi = _node_range(table.lo, table.hi, n)

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
    valid = table.inside & (mass_msun >= mbar(lo)) & (mass_msun <= mbar(hi)) & (
        table.hi > table.lo)
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
    valid = valid & (eep >= table.eep0 + table.lo) & (eep <= table.eep0 + table.hi)
    return eep, valid


def table_eep_range(table: IsochroneTable):
    """``(eep_min, eep_max)`` of a table (as :func:`eep_range`)."""
    return table.eep0 + table.lo, table.eep0 + table.hi
