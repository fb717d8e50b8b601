"""Numerical kernels for interpolation on tabulated grids (pure JAX, no physics).

Every function works on one point (scalars in, small fixed-size arrays out) and is
meant to be ``vmap``-ed. Two schemes share one stencil layout:

* linear: 2 nodes per axis, weights ``(1 - t, t)``;
* cubic: 4 nodes per axis, a C1 cubic Hermite spline whose node tangents are centred
  finite differences (Catmull-Rom on a uniform axis; its non-uniform generalisation on an
  irregular one). Where an outer node is unavailable (past the table's edge, or flagged
  invalid by the caller) the tangent falls back to the one-sided difference of the two
  inner nodes, so the interpolant stays finite, exact at nodes, and C1 inside the region
  where all four nodes exist.

Locating a point on an axis is arithmetic on a regular axis and a comparison count on an
irregular one; indices are always clipped so gathers never go out of bounds, and the
``inside`` flags tell the caller when the point was outside the axis (the value is then an
extrapolation, finite, for the caller to mask).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
    "hermite_weights",
    "linear_weights",
    "locate_irregular",
    "locate_regular",
    "steffen_unit",
    "stencil",
]


def locate_regular(x, x0, dx, n: int):
    """Cell of ``x`` on the regular axis ``x0 + dx * arange(n)``.

    Returns
    -------
    i : int array, ()
        Lower node of the cell, clipped to ``[0, n - 2]``.
    t : float array, ()
        Fractional position in the cell (outside [0, 1] when ``x`` is off the axis).
    inside : bool array, ()
        ``x0 <= x <= x0 + (n - 1) dx``.
    """
    u = (x - x0) / dx
    i = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 2)
    t = u - i
    inside = (u >= 0.0) & (u <= n - 1)
    return i, t, inside


def locate_irregular(x, nodes):
    """Cell of ``x`` on the strictly increasing axis ``nodes`` (shape (n,)).

    Same returns as :func:`locate_regular`. Uses a comparison count (no data-dependent
    branching), which is cheap for the short axes of the bolometric-correction table.
    """
    n = nodes.shape[0]
    i = jnp.clip(jnp.sum(x >= nodes[1:-1]).astype(jnp.int32), 0, n - 2)
    t = (x - nodes[i]) / (nodes[i + 1] - nodes[i])
    inside = (x >= nodes[0]) & (x <= nodes[-1])
    return i, t, inside


def stencil(i, n: int, cubic: bool):
    """Node indices of the stencil of cell ``i`` on an axis of ``n`` nodes.

    Returns ``(idx, outer_exists)``: ``idx`` has shape (4,) for cubic (``i-1 .. i+2``,
    clipped) or (2,) for linear; ``outer_exists`` (shape (2,), cubic only, else None) says
    whether ``i-1`` and ``i+2`` lie on the axis.
    """
    if not cubic:
        return jnp.stack([i, i + 1]), None
    idx = jnp.stack([i - 1, i, i + 1, i + 2])
    outer = jnp.stack([i >= 1, i + 2 <= n - 1])
    return jnp.clip(idx, 0, n - 1), outer


def linear_weights(t):
    """Weights of the 2-node stencil, shape (2,)."""
    return jnp.stack([1.0 - t, t])


def hermite_weights(t, xs, left_ok, right_ok):
    """Weights of the 4-node C1 cubic Hermite stencil.

    Parameters
    ----------
    t : float array, ()
        Fractional position in the cell ``[xs[1], xs[2]]``.
    xs : float array, (4,)
        Node coordinates ``x[i-1], x[i], x[i+1], x[i+2]`` (outer ones may be clipped
        duplicates when ``left_ok``/``right_ok`` is False).
    left_ok, right_ok : bool arrays, ()
        Whether the outer nodes may be used for the tangents.

    Returns
    -------
    w : float array, (4,)
        ``f(x) = w @ f(xs)``; the tangent at ``x[i]`` is ``(f[i+1] - f[i-1]) / (x[i+1] -
        x[i-1])`` when ``left_ok`` else ``(f[i+1] - f[i]) / (x[i+1] - x[i])``, and likewise
        at ``x[i+1]``.
    """
    t2 = t * t
    t3 = t2 * t
    h00 = 2.0 * t3 - 3.0 * t2 + 1.0
    h10 = t3 - 2.0 * t2 + t
    h01 = -2.0 * t3 + 3.0 * t2
    h11 = t3 - t2
    h = xs[2] - xs[1]
    # Both denominators are >= h > 0 even for clipped (duplicated) outer nodes.
    a = h * h10 / (xs[2] - xs[0])
    b = h * h11 / (xs[3] - xs[1])
    w_m1 = jnp.where(left_ok, -a, 0.0)
    w_p2 = jnp.where(right_ok, b, 0.0)
    w_0 = h00 + jnp.where(left_ok, 0.0, -h10) + jnp.where(right_ok, -b, -h11)
    w_1 = h01 + jnp.where(left_ok, a, h10) + jnp.where(right_ok, 0.0, h11)
    return jnp.stack([w_m1, w_0, w_1, w_p2])


def steffen_unit(y, t, left_ok, right_ok):
    """Steffen's (1990) monotone C1 cubic on a unit-spaced 4-node stencil.

    Parameters
    ----------
    y : float array, (..., 4)
        Values at nodes ``i-1, i, i+1, i+2`` (leading axes are batch axes).
    t : float array, ()
        Fractional position in ``[i, i+1]``.
    left_ok, right_ok : bool arrays broadcastable to ``y.shape[:-1]``
        Whether the outer nodes exist; if not, the tangent is the inner secant.

    Returns
    -------
    float array, ``y.shape[:-1]``
        The interpolant; monotone between monotone data and never overshooting a local
        extremum (unlike Catmull-Rom), which keeps initial mass monotone in EEP.
    """
    s0 = y[..., 2] - y[..., 1]
    sm = jnp.where(left_ok, y[..., 1] - y[..., 0], s0)
    sp = jnp.where(right_ok, y[..., 3] - y[..., 2], s0)

    def tangent(a, b):
        p = 0.5 * (a + b)
        return (jnp.sign(a) + jnp.sign(b)) * jnp.minimum(
            jnp.minimum(jnp.abs(a), jnp.abs(b)), 0.5 * jnp.abs(p))

    m0 = tangent(sm, s0)
    m1 = tangent(s0, sp)
    t2 = t * t
    t3 = t2 * t
    return ((2.0 * t3 - 3.0 * t2 + 1.0) * y[..., 1] + (t3 - 2.0 * t2 + t) * m0
            + (-2.0 * t3 + 3.0 * t2) * y[..., 2] + (t3 - t2) * m1)
