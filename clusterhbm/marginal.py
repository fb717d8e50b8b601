"""The cluster model with every star's mass and mass ratio integrated out (no per-star latents).

Why
---
With a latent mass (pseudo-mass s) and mass ratio q per star, the real-cluster mixture
(unresolved binaries, field stars) does not mix under NUTS: a star's conditional posterior
in s is ~1e-4 Msun wide as a single member, a different narrow peak as a binary, and the
whole broad IMF as a field star, so every change of class is a jump between scales that
differ by orders of magnitude (``scripts/mixture_mixing_check.py``: step size ~1e-3,
98-100% tree-depth hits, R-hat ~2). Here the stars' mass and q are integrated out for
every population state, exactly enough that the sampler sees a smooth density of the
population parameters phi alone:

    p(phi | D) ∝ p(phi) prod_i [ w_i ((1 - f_bin) L_i^single + f_bin L_i^binary) / P_det
                                 + (1 - w_i) L_i^field ]

    L_i^single = ∫ IMF(m) N(D_i | mags(m), V_i) dm,
    L_i^binary = ∫∫ IMF(m) U(q) N(D_i | mags(m, q), V_i) dm dq.

The isochrone is shared by all stars (the age and [Fe/H] widths are zero; the distance
and A_V widths too, see below), so the track of model magnitudes against initial mass is
computed once per evaluation on the grid's EEP nodes (optionally ``refine`` times finer).

Mass: exact along a piecewise-linear track
------------------------------------------
Between two nodes the track is a straight segment in magnitude space, mu(t) = mu_k +
t (mu_{k+1} - mu_k), t in [0, 1], carrying the IMF weight w_k = IMF(m_k+1/2) (m_{k+1} -
m_k) / Z (Z: the IMF mass alive on the isochrone), spread uniformly in t. The Gaussian
likelihood along the segment integrates in closed form,

    ∫_0^1 exp(-chi2(t) / 2) dt = sqrt(2 pi / A) [Phi(sqrt(A) (1 - t*)) - Phi(-sqrt(A) t*)]
    exp(-chi2(t*) / 2),     chi2(t) = A (t - t*)^2 + chi2(t*),

with A = Delta' P Delta, t* = Delta' P r_0 / A. No mass grid has to resolve a bright
star's 10-mmag likelihood: the result is exact for the piecewise-linear track however far
apart the nodes are (the nodes are ~0.05 mag apart on the main sequence). In the cubic
scheme the chord between nodes differs from the cubic arc; ``refine=2`` halves the chords
(``scripts/marginal_check.py`` measures the difference).

Mass ratio: J bins, each smoothed across its width
--------------------------------------------------
q ~ U(q_min, 1) is cut into ``n_q`` bins equally spaced in the main-sequence brightening
log10(1 + q^4.5) (:func:`q_bins`: narrow near q = 1, where the binary track moves fast),
each weighted by its width in q; the binary track of bin j is the pair at
the bin's middle ratio (fluxes added band by band, the secondary interpolated in mass on
the same isochrone). Binary tracks of neighbouring bins are 0.75 / n_q mag apart on the main sequence (with
equal q bins it would be ~0.25 mag near q = 1 for n_q = 12), more than a bright star's
error, so a plain sum over bins would be a comb.
Each bin's track is therefore smeared along the bin: the vector c between the binary
tracks at the bin's two edges enters as a rank-one covariance c c' / 12 (a uniform
distribution across the bin, matched in variance). That keeps the q-integral smooth and
its total weight exact; it blurs the binary likelihood within a bin by its own width
(documented approximation, measured against brute force in the tests).

What is and is not in this model
--------------------------------
Population parameters as in :mod:`clusterhbm.model` (log age, [Fe/H], distance, A_V,
parallax zero-point, f_bin, f_field and the field parallax distribution, the mass-function
slope), the same priors (:class:`clusterhbm.model.Priors`), the same field photometry,
selection normaliser and likelihood floor. Per-star results are Rao-Blackwellised: at
every draw each star's membership and binary probabilities, and its mass, Teff and log g
drawn from its conditional given the draw's phi (as a member).

Widths: the per-star offsets integrated out too
-----------------------------------------------
With widths fitted (``ModelConfig.fit_widths``), star i's (log age, [Fe/H], distance,
A_V) are the population's plus offsets delta_i ~ Normal(0, diag(sigma^2)). They move the
star's track (and its parallax) to first order,

    mu_i(EEP) = mu(EEP) + J(EEP) delta_i,

with J the track's Jacobian at fixed EEP in log age, [Fe/H] and A_V (a secant, once
per evaluation with the track: :func:`track_and_jacobian`; EEPs align the phases, so the
track moves smoothly at fixed EEP; the second-order error is measured in
``tests/test_marginal.py``), for log age and [Fe/H] with its part along the track
removed (:func:`_segment_jacobian`: at fixed EEP the nodes also slide along the track,
which with the IMF weights held at the mean's would blur the star density along it),
and for distance 5 / (d ln 10) in every band and -1000 / d^2 in parallax. Linear and
Gaussian, the offsets integrate out exactly: the star's covariance gains the low-rank
term U U', U = J diag(sigma) (per segment, J at its middle), beside the binary bins' smearing vector, and with a distance width the parallax
joins the bands as one more coordinate of the Gaussian (it correlates with the
magnitudes through d_i). :func:`segment_log_integral` takes the low-rank term (Woodbury).
NUTS still sees the population and the widths only, a dozen smooth coordinates: no
per-star latent, no funnel. Approximations, all small for small widths: A_V,i is Normal
(not truncated at 0), the IMF weights along the track and the detection probability are
the population means', J is constant across a segment. Each star's own offsets are
drawn from their Gaussian conditional at every draw (``log_age``, ``feh``,
``distance_pc``, ``av_mag`` per star: the shrunk estimates).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr, ndtri

from .grid import ModelGrid
from .imf import imf_cdf, log_imf
from .isochrone import isochrone_table, table_eep_from_mass, table_eep_range, table_interp
from .model import (
    WIDTH_PARAMS,
    ModelConfig,
    Priors,
    StarData,
    _add_mags,
    _imf_kwargs,
    _log_normal_parallax,
    field_terms,
    log_prior_population,
    population_state,
    width_from_position,
    width_key,
)
from .photometry import bc_slice, photometry

__all__ = [
    "Blocks",
    "MarginalOptions",
    "Track",
    "blocks",
    "log_density_marginal",
    "make_marginal_logdensity_fn",
    "marginal_state",
    "q_bins",
    "segment_log_integral",
    "select_segments",
    "star_conditionals",
    "star_log_likelihoods",
    "track",
    "track_and_jacobian",
]

_LOG_2PI = 1.8378770664093453
_BIG_MAG = 99.0


class Track(NamedTuple):
    """The shared model track(s) of one population state.

    mags : (T, K, B) apparent magnitudes at K nodes of T tracks: track 0 single stars,
        tracks 1..n_q binaries at the middle of each q bin
    smear : (T, K, B) the rank-one smearing vector of each binary bin (0 for singles)
    log_w : (K - 1,) log prior weight of each segment (IMF mass in it / Z; -inf: invalid)
    log_wq : (n_q,) log prior weight of each q bin
    mass, log_teff, logg, eep : (K,) node values of the primary
    """

    mags: jax.Array
    smear: jax.Array
    log_w: jax.Array
    log_wq: jax.Array
    mass: jax.Array
    log_teff: jax.Array
    logg: jax.Array
    eep: jax.Array


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0 (x clamped just below 0)."""
    x = jnp.minimum(x, -1e-12)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _log_ndtr_diff(u0, u1):
    """log(Phi(u1) - Phi(u0)) for u1 >= u0, accurate in both tails."""
    upper = u0 > 0.0
    a = jnp.where(upper, -u1, u0)
    b = jnp.where(upper, -u0, u1)
    lb = log_ndtr(b)
    return lb + _log1mexp(log_ndtr(a) - lb)


def small_cholesky(m):
    """Cholesky factor of a batch of small SPD matrices (..., k, k), k static and small,
    written out element by element: the per-segment matrices of the widths are 2 x 2 to
    6 x 6, where LAPACK's batched call is slow (and, on the 2-core CPU, was seen to
    deadlock XLA's thread pool)."""
    k = m.shape[-1]
    cols = [[None] * k for _ in range(k)]
    for j in range(k):
        d = m[..., j, j] - sum(cols[j][p] ** 2 for p in range(j))
        ljj = jnp.sqrt(jnp.maximum(d, 1e-30))
        cols[j][j] = ljj
        for i in range(j + 1, k):
            v = m[..., i, j] - sum(cols[i][p] * cols[j][p] for p in range(j))
            cols[i][j] = v / ljj
    zero = jnp.zeros_like(m[..., 0, 0])
    return jnp.stack([jnp.stack([cols[i][j] if j <= i else zero for j in range(k)], -1)
                      for i in range(k)], -2)


def small_lower_solve(chol, v):
    """L^-1 v for a batch of small lower-triangular L (..., k, k), v (..., k)."""
    k = chol.shape[-1]
    out = []
    for i in range(k):
        r = v[..., i] - sum(chol[..., i, p] * out[p] for p in range(i))
        out.append(r / chol[..., i, i])
    return jnp.stack(out, -1)


def small_upper_solve(chol, v):
    """L'^-1 v for a batch of small lower-triangular L (..., k, k), v (..., k)."""
    k = chol.shape[-1]
    out = [None] * k
    for i in reversed(range(k)):
        r = v[..., i] - sum(chol[..., p, i] * out[p] for p in range(i + 1, k))
        out[i] = r / chol[..., i, i]
    return jnp.stack(out, -1)


def _segment_finish(a, b, c, logdet_extra, a_min):
    """(log integral, t*, A, u0, u1, short) of a segment from its quadratic form
    chi2(t) = A t^2 - 2 b t + c and the extra log determinant."""
    a = jnp.maximum(a, a_min)
    t_star = b / a
    chi2_min = jnp.maximum(c - b * t_star, 0.0)
    sa = jnp.sqrt(a)
    u0, u1 = -sa * t_star, sa * (1.0 - t_star)
    # a segment far shorter than the star's error (late phases, where nodes nearly
    # coincide): Phi(u1) - Phi(u0) = sqrt(A) phi(u_mid) to O(A); the exact branch gets
    # harmless arguments there (its second derivatives overflow to NaN otherwise)
    short = sa < 1e-3
    exact = _log_ndtr_diff(jnp.where(short, -0.5, u0), jnp.where(short, 0.5, u1))
    mid = 0.5 * (u0 + u1)
    approx = jnp.log(sa) - 0.5 * mid * mid - 0.5 * _LOG_2PI
    log_int = (-0.5 * chi2_min + 0.5 * (_LOG_2PI - jnp.log(a))
               + jnp.where(short, approx, exact))
    return log_int - 0.5 * logdet_extra, t_star, a, u0, u1, short


def _lowrank_forward(r0, delta, prec, lowrank):
    """The Woodbury pieces of one batch of segments, element by element on (...)-shaped
    arrays (with the k x k matrices as trailing axes XLA's CPU code was 6x slower at
    k = 4 than at k = 3, ``scripts/bench_marginal_widths.py``): P U (B' lists of k),
    the Cholesky factor L of H = I + U' P U (lists), the whitened L^-1 U' P x of r0 and
    delta, and the quadratic form's A, b, c and log |H|."""
    nb, k = lowrank.shape[-2], lowrank.shape[-1]
    pb = [prec[..., i] for i in range(nb)]
    pu = [[pb[i] * lowrank[..., i, m] for m in range(k)] for i in range(nb)]
    chol = [[None] * k for _ in range(k)]
    for j in range(k):
        for i in range(j, k):
            v = sum(lowrank[..., b, i] * pu[b][j] for b in range(nb)) + (i == j)
            v = v - sum(chol[i][q] * chol[j][q] for q in range(j))
            if i == j:
                chol[j][j] = jnp.sqrt(jnp.maximum(v, 1e-30))
            else:
                chol[i][j] = v / chol[j][j]

    def white(x):
        out = []
        for i in range(k):
            v = sum(pu[b][i] * x[..., b] for b in range(nb))
            v = v - sum(chol[i][q] * out[q] for q in range(i))
            out.append(v / chol[i][i])
        return out

    wr, wd = white(r0), white(delta)

    def dot(x, y, wx, wy):
        return jnp.sum(x * prec * y, axis=-1) - sum(p * q for p, q in zip(wx, wy))

    logdet = 2.0 * sum(jnp.log(chol[i][i]) for i in range(k))
    return (pu, chol, wr, wd, dot(delta, delta, wd, wd), dot(delta, r0, wd, wr),
            dot(r0, r0, wr, wr), logdet)


def _truncated_moments(t_star, a, u0, u1, short):
    """E[t] and E[t^2] of t ~ N(t*, 1/A) truncated to [0, 1] (uniform for a short
    segment), finite for every input."""
    lz = _log_ndtr_diff(jnp.where(short, -0.5, u0), jnp.where(short, 0.5, u1))
    c0 = jnp.clip(u0, -1e4, 1e4)
    c1 = jnp.clip(u1, -1e4, 1e4)
    e0 = jnp.exp(jnp.minimum(-0.5 * c0 * c0 - 0.5 * _LOG_2PI - lz, 30.0))
    e1 = jnp.exp(jnp.minimum(-0.5 * c1 * c1 - 0.5 * _LOG_2PI - lz, 30.0))
    mz = e0 - e1  # E[z], z standard normal truncated to [u0, u1]
    ez2 = 1.0 + c0 * e0 - c1 * e1  # E[z^2]
    sa = jnp.sqrt(a)
    m1 = t_star + mz / sa
    m2 = t_star * t_star + 2.0 * t_star * mz / sa + ez2 / a
    m1 = jnp.where(short | ~jnp.isfinite(m1), 0.5, jnp.clip(m1, 0.0, 1.0))
    m2 = jnp.where(short | ~jnp.isfinite(m2), 1.0 / 3.0, jnp.clip(m2, m1 * m1, m1))
    return m1, m2


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lowrank_log_integral(r0, delta, prec, lowrank, a_min):
    *_, a, b, c, logdet = _lowrank_forward(r0, delta, prec, lowrank)
    return _segment_finish(a, b, c, logdet, a_min)[0]


def _lowrank_log_integral_fwd(r0, delta, prec, lowrank, a_min):
    return (_lowrank_log_integral(r0, delta, prec, lowrank, a_min),
            (r0, delta, prec, lowrank))


def _lowrank_log_integral_bwd(a_min, res, g):
    """The gradient in closed form (XLA's reverse pass of the element-by-element forward
    cost ~12x the forward: 2/3 of a 500-star fit's gradient). With W = V^-1 =
    P - P U H^-1 U' P, e(t) = r0 - t delta and t's truncated-normal posterior on the
    segment (moments m1, m2): d/dr0 = -E[W e], d/d delta = E[t W e], d/dU = 2 (dL/dV) U
    with dL/dV = -(W - E[W e e' W]) / 2, and d/dp_b = -(dL/dV)_bb / p_b^2 - 1 / (2 p_b)
    (the log integral leaves out the diagonal's normalisation; 0 for a missing band,
    p_b = 0). The forward is recomputed (nothing stored but the inputs)."""
    r0, delta, prec, lowrank = res
    nb, k = lowrank.shape[-2], lowrank.shape[-1]
    pu, chol, wr, wd, a, b, c, logdet = _lowrank_forward(r0, delta, prec, lowrank)
    _, t_star, a, u0, u1, short = _segment_finish(a, b, c, logdet, a_min)
    m1, m2 = _truncated_moments(t_star, a, u0, u1, short)
    # L^-1 (lower), H^-1 = L^-T L^-1, v = H^-1 U' P x = L^-T (whitened x)
    linv = [[None] * k for _ in range(k)]
    for j in range(k):
        linv[j][j] = 1.0 / chol[j][j]
        for i in range(j + 1, k):
            linv[i][j] = -sum(chol[i][q] * linv[q][j] for q in range(j, i)) / chol[i][i]
    hinv = [[sum(linv[q][i] * linv[q][j] for q in range(max(i, j), k)) for j in range(k)]
            for i in range(k)]

    def up(w):  # L^-T w
        return [sum(linv[q][i] * w[q] for q in range(i, k)) for i in range(k)]

    vr, vd = up(wr), up(wd)
    ar = [prec[..., i] * r0[..., i] - sum(pu[i][m] * vr[m] for m in range(k))
          for i in range(nb)]  # W r0
    bd = [prec[..., i] * delta[..., i] - sum(pu[i][m] * vd[m] for m in range(k))
          for i in range(nb)]  # W delta
    d_r0 = jnp.stack([-(ar[i] - m1 * bd[i]) for i in range(nb)], -1)
    d_delta = jnp.stack([m1 * ar[i] - m2 * bd[i] for i in range(nb)], -1)
    d_u = jnp.stack([jnp.stack([
        -sum(pu[i][q] * hinv[q][m] for q in range(k))  # -(W U)_im = -(P U H^-1)_im
        + ar[i] * vr[m] - m1 * (ar[i] * vd[m] + bd[i] * vr[m]) + m2 * bd[i] * vd[m]
        for m in range(k)], -1) for i in range(nb)], -2)
    d_p = []
    for i in range(nb):
        w_ii = prec[..., i] - sum(pu[i][p] * hinv[p][q] * pu[i][q] for p in range(k)
                                  for q in range(k))
        ewe = ar[i] * ar[i] - 2.0 * m1 * ar[i] * bd[i] + m2 * bd[i] * bd[i]
        p_ok = prec[..., i] > 0.0
        p_safe = jnp.where(p_ok, prec[..., i], 1.0)
        # (the diagonal's own normalisation, 1/2 log p_b, is the caller's: not here)
        d_p.append(jnp.where(p_ok, 0.5 * (w_ii - ewe) / (p_safe * p_safe) - 0.5 / p_safe,
                             0.0))
    d_p = jnp.stack(d_p, -1)
    gb = g[..., None]
    return gb * d_r0, gb * d_delta, gb * d_p, g[..., None, None] * d_u


_lowrank_log_integral.defvjp(_lowrank_log_integral_fwd, _lowrank_log_integral_bwd)


def segment_log_integral(r0, delta, prec, smear=None, a_min: float = 1e-8, lowrank=None):
    """log ∫_0^1 N(r0 - t delta; 0, V) dt for one segment (bands on the last axis).

    r0 : data minus the segment's first node; delta : the segment's vector; prec : the
    diagonal precision 1/V (0 for a missing band); smear : optional vector c with
    V -> V + c c' (Sherman-Morrison); lowrank : optional (..., B, k) matrix U with
    V -> V + U U' (Woodbury; instead of ``smear``; the log integral's gradient is written
    out, :func:`_lowrank_log_integral_bwd`). Returns (log integral, t*, A); t* and A
    carry no gradient with ``lowrank``.
    """
    if lowrank is not None:
        shape = jnp.broadcast_shapes(r0.shape, delta.shape, prec.shape, lowrank.shape[:-1])
        r0, delta, prec = (jnp.broadcast_to(x, shape) for x in (r0, delta, prec))
        lowrank = jnp.broadcast_to(lowrank, shape + lowrank.shape[-1:])
        log_int = _lowrank_log_integral(r0, delta, prec, lowrank, a_min)
        _, _, _, _, a, b, c, logdet = _lowrank_forward(*jax.lax.stop_gradient(
            (r0, delta, prec, lowrank)))
        _, t_star, a, _, _, _ = _segment_finish(a, b, c, logdet, a_min)
        return log_int, t_star, a
    if smear is None:
        def dot(x, y):
            return jnp.sum(x * prec * y, axis=-1)
        logdet_extra = 0.0
    else:
        pc = prec * smear
        den = 1.0 + jnp.sum(smear * pc, axis=-1)

        def dot(x, y):
            return (jnp.sum(x * prec * y, axis=-1)
                    - jnp.sum(x * pc, axis=-1) * jnp.sum(y * pc, axis=-1) / den)
        logdet_extra = jnp.log(den)
    log_int, t_star, a, _, _, _ = _segment_finish(dot(delta, delta), dot(delta, r0),
                                                  dot(r0, r0), logdet_extra, a_min)
    return log_int, t_star, a


#: main-sequence flux ratio ~ q^_Q_POWER (L ~ m^4.5): the bins are equal in the brightening
_Q_POWER = 4.5


def q_bins(q_min: float, n_q: int):
    """Edges and middles of ``n_q`` mass-ratio bins on [q_min, 1], equally spaced in the
    main-sequence brightening log10(1 + q^4.5) (narrow where the binary track moves fast,
    near q = 1; wide where the secondary adds little light)."""
    def g(q):
        return jnp.log10(1.0 + q ** _Q_POWER)

    gs = g(q_min) + (g(1.0) - g(q_min)) * jnp.arange(n_q + 1) / n_q
    edges = (10.0 ** gs - 1.0) ** (1.0 / _Q_POWER)
    edges = edges.at[0].set(q_min).at[-1].set(1.0)
    return edges, 0.5 * (edges[1:] + edges[:-1])


def track(popv: dict, grid: ModelGrid, config: ModelConfig, priors: Priors, *,
          n_q: int = 24, refine: int = 1) -> Track:
    """The population's single and binary tracks on the (refined) EEP nodes."""
    table = popv["iso_table"]
    bcs = popv.get("bc_slice")
    n = table.values.shape[0]
    # the nodes clipped to the (fractional) EEP range: the first and last segments end at
    # the range's ends, so the track's ends move continuously with (log age, [Fe/H]);
    # the segments outside have length 0 (masked)
    lo, hi = table_eep_range(table)
    # ... and to the IMF's lower limit, so the first segment starts at m_min (the grid's
    # lowest masses are ~0.1 Msun, m_min's default) rather than a segment switching on or
    # off as its middle crosses m_min (the mask below stays for zero-length segments)
    e_min, ok_min = table_eep_from_mass(table, jnp.asarray(priors.m_min, table.values.dtype),
                                        cubic=config.cubic)
    lo = jnp.where(ok_min, jnp.maximum(lo, e_min), lo)
    eeps = jnp.clip(
        table.eep0 + jnp.arange((n - 1) * refine + 1, dtype=table.values.dtype) / refine,
        lo, hi)
    props = jax.vmap(lambda e: table_interp(table, e, cubic=config.cubic))(eeps)
    obs = jax.vmap(lambda pr: photometry(grid.bc, pr, popv["feh"], popv["distance_pc"],
                                         popv["av_mag"], config.band_idx,
                                         cubic=config.cubic, bcs=bcs))(props)
    inside = (eeps >= lo) & (eeps <= hi) & obs.valid & jnp.all(jnp.isfinite(obs.mags), -1)
    mags1 = jnp.where(inside[:, None], obs.mags, _BIG_MAG)
    m = props.initial_mass
    kw = _imf_kwargs(config, priors, popv)
    m_mid = 0.5 * (m[1:] + m[:-1])
    dm = jnp.maximum(m[1:] - m[:-1], 0.0)
    seg_ok = inside[1:] & inside[:-1] & (m_mid >= priors.m_min) & (eeps[1:] > eeps[:-1])
    m_hi = jnp.clip(jnp.max(jnp.where(inside, m, 0.0)), priors.m_min * 1.0001, priors.m_max)
    log_z = jnp.log(jnp.maximum(imf_cdf(m_hi, **kw), 1e-12))
    lw = log_imf(jnp.clip(m_mid, priors.m_min, priors.m_max), **kw) + jnp.log(
        jnp.maximum(dm, 1e-12)) - log_z
    log_w = jnp.where(seg_ok, lw, -jnp.inf)
    mags_t = mags1[None]
    smear = jnp.zeros_like(mags_t)
    log_wq = jnp.zeros((0,), m.dtype)
    if config.binaries:
        edges, mids = q_bins(priors.q_min, n_q)
        m_sorted = jnp.where(inside, m, jnp.where(eeps < lo, -1.0, 1e3))
        m_low = jnp.min(jnp.where(inside, m, 1e3))

        def pair(q):  # (K, B) magnitudes of primaries at every node with ratio q
            m2 = q * m
            lit = m2 >= m_low
            mags2 = jax.vmap(lambda col: jnp.interp(m2, m_sorted, col), in_axes=1,
                             out_axes=1)(mags1)
            return _add_mags(mags1, mags2, lit[:, None])

        mid_t = jax.vmap(pair)(mids)
        edge_t = jax.vmap(pair)(edges)
        c = (edge_t[1:] - edge_t[:-1]) / jnp.sqrt(12.0)
        c = jnp.where(inside[None, :, None], c, 0.0)
        mags_t = jnp.concatenate([mags_t, jnp.where(inside[None, :, None], mid_t,
                                                    _BIG_MAG)], 0)
        smear = jnp.concatenate([smear, c], 0)
        log_wq = jnp.log((edges[1:] - edges[:-1]) / (1.0 - priors.q_min)).astype(m.dtype)
    return Track(mags_t, smear, log_w, log_wq, m, props.log_teff, props.logg, eeps)


def marginal_state(pop: dict, config: ModelConfig, priors: Priors, grid: ModelGrid):
    """The population state at the means (shared isochrone table and BC slice, detection
    probability) plus the fitted widths."""
    popv = population_state(pop, config._replace(fit_widths=(False,) * 4), priors, grid)
    for name, on in zip(WIDTH_PARAMS, config.fit_widths):
        if on:
            popv[name] = width_from_position(pop[width_key(name, config)], config)
    return popv


#: the widths that move the track through its Jacobian (distance: analytically)
_LINEAR = ("log_age", "feh", None, "av_mag")


def _linear_names(config: ModelConfig) -> tuple:
    return tuple(n for n, on in zip(_LINEAR, config.fit_widths) if on and n)


#: the secant's smallest half-step in log age [dex], [Fe/H] [dex] and A_V [mag]
#: (:func:`track_and_jacobian`)
SECANT_H0 = {"log_age": 0.01, "feh": 0.02, "av_mag": 0.02}


def _axis_range(grid: ModelGrid, name: str):
    if name == "log_age":
        return grid.iso.log_age[0], grid.iso.log_age[-1]
    if name == "feh":
        return (jnp.maximum(grid.iso.feh[0], grid.bc.feh[0]),
                jnp.minimum(grid.iso.feh[-1], grid.bc.feh[-1]))
    return grid.bc.av[0], grid.bc.av[-1]


def track_and_jacobian(popv: dict, grid: ModelGrid, config: ModelConfig, priors: Priors,
                       *, n_q: int = 24, refine: int = 1):
    """The track at the population means and, when age, [Fe/H] or A_V widths are fitted,
    its slope d mags / d (those parameters) at fixed EEP, shape (W, T, K, B) (else None).

    The slope is a central secant over x +- h, h = sqrt(sigma^2 + h0^2) (``SECANT_H0``),
    not the tangent: the grids are interpolated linearly (in log age and [Fe/H] between
    isochrones, in Teff, log g, [Fe/H] and A_V in the BC tables), so the tangent jumps
    wherever a node crosses a grid line, and the density with it (seen as a 0.5 jump in
    log density along log age for 60 stars; NUTS then needs hundreds of steps). The secant
    of a continuous function is continuous, and at h ~ sigma it is the slope averaged
    over the offsets' spread (statistical linearisation). Near a grid edge the pair of
    points slides inside the grid (one-sided then); a node valid at x but not at one of
    the points takes the one-sided difference, at neither 0.
    """
    names = _linear_names(config)
    if not names:
        return track(popv, grid, config, priors, n_q=n_q, refine=refine), None

    def at(x):
        pv = dict(popv)
        pv.update(x)
        pv["iso_table"] = isochrone_table(grid.iso, pv["log_age"], pv["feh"],
                                          cubic=config.cubic)
        pv["bc_slice"] = bc_slice(grid.bc, pv["feh"], pv["av_mag"], config.band_idx,
                                  cubic=config.cubic)
        return track(pv, grid, config, priors, n_q=n_q, refine=refine).mags

    tr = track(popv, grid, config, priors, n_q=n_q, refine=refine)
    ok0 = tr.mags < _BIG_MAG
    jac = []
    for k in names:
        x = jnp.asarray(popv[k])
        h = jnp.sqrt(jnp.square(popv["sigma_" + k]) + SECANT_H0[k] ** 2)
        lo, hi = _axis_range(grid, k)
        h = jnp.minimum(h, 0.5 * (hi - lo))
        x_lo = jnp.clip(x - h, lo, hi - 2.0 * h)
        x_hi = x_lo + 2.0 * h
        m_lo, m_hi = at({k: x_lo}), at({k: x_hi})
        ok_lo, ok_hi = m_lo < _BIG_MAG, m_hi < _BIG_MAG
        both = (m_hi - m_lo) / (x_hi - x_lo)
        up = (m_hi - tr.mags) / jnp.maximum(x_hi - x, 1e-6)
        down = (tr.mags - m_lo) / jnp.maximum(x - x_lo, 1e-6)
        j = jnp.where(ok_lo & ok_hi, both,
                      jnp.where(ok_hi & (x_hi - x > 0.25 * h), up,
                                jnp.where(ok_lo & (x - x_lo > 0.25 * h), down, 0.0)))
        jac.append(jnp.where(ok0, j, 0.0))
    return tr, jnp.stack(jac)


class Widths(NamedTuple):
    """What the widths add to every star's Gaussian (see the module docstring).

    jac : (W, T, K - 1, B) the track Jacobian in the linear widths' parameters at each
        segment's middle, for log age and [Fe/H] with its part along the track removed
        (:func:`_segment_jacobian`), or None
    sig : (W,) their widths
    dist_mag, dist_plx : with a distance width, its column of U in the bands (same in
        each) and in parallax (sigma_d 5 / (d ln 10) and -sigma_d 1000 / d^2), else None
    u_all : (T (K - 1), B', k) U of every segment of every track (:func:`_width_lowrank`),
        built once per evaluation and gathered by the stars: built per star (N x S small
        gathers and concatenations) its reverse pass cost ~10x the forward (all four
        widths, 60 stars x 192 segments, no binaries: 90 -> 16 ms per value and gradient,
        ``scripts/bench_marginal_widths.py``)
    """

    jac: jax.Array | None
    sig: jax.Array | None
    dist_mag: jax.Array | None
    dist_plx: jax.Array | None
    u_all: jax.Array


def _segment_jacobian(jac, mags, along):
    """(W, T, K - 1, B): the node Jacobian ``jac`` (W, T, K, B) at each segment's middle;
    for the parameters flagged in ``along``, at every node its component along the track
    removed first (the track's direction there: the difference of its neighbours, one-sided
    at an end of the valid range).

    Why: the Jacobian at fixed EEP moves a node partly along the track (at fixed EEP the
    mass changes with age and [Fe/H]; on the pre-main sequence the EEPs slide fast) while
    the segments' IMF weights stay the mean's, so the slide acts as a spurious blur of the
    star density along the track. The track's displacement normal to itself does not
    depend on how its points are labelled (EEP or mass); a slide along a straight track
    is invisible. Measured on the log-age width's likelihood profile (500-star mocks of
    the recovery study with only that width, 0.02, the rest at the truth;
    ``scripts/width_profile_check.py``), maximum at: case a (100 Myr) 0.0137 with the
    slide, 0.0194 without, 0.0185 by Gauss-Hermite quadrature over each star's exact
    offset; b 0.0084, 0.0081, 0.0110; c 0.0204, 0.0209, 0.0179; d 0.0264, 0.0224,
    0.0230. Euclidean in the bands: the part removed is along the track's direction, which
    a straight track cannot tell from no move in any metric.
    """
    jm = 0.5 * (jac[:, :, :-1] + jac[:, :, 1:])
    if not any(along):
        return jm
    good = jnp.all(mags < _BIG_MAG, -1)  # (T, K)
    fwd = jnp.where((good[:, 1:] & good[:, :-1])[..., None], mags[:, 1:] - mags[:, :-1], 0.0)
    zero = jnp.zeros_like(fwd[:, :1])
    d = jnp.concatenate([fwd, zero], 1) + jnp.concatenate([zero, fwd], 1)  # (T, K, B)
    dd = jnp.sum(d * d, -1)
    ok = dd > 1e-12
    coef = jnp.where(ok, jnp.sum(d[None] * jac, -1) / jnp.where(ok, dd, 1.0), 0.0)
    flag = jnp.asarray(along)[:, None, None, None]
    jn = jnp.where(flag, jac - coef[..., None] * d[None], jac)
    return 0.5 * (jn[:, :, :-1] + jn[:, :, 1:])


def width_terms(popv: dict, config: ModelConfig, jac, tr: Track,
                project: bool = True) -> Widths | None:
    """:class:`Widths` of a population state and its track ``tr`` (None without
    widths; ``project``: remove the age and [Fe/H] Jacobians' part along the track,
    :func:`_segment_jacobian`, as :class:`MarginalOptions` ``project_widths``)."""
    if not any(config.fit_widths):
        return None
    names = _linear_names(config)
    sig = jnp.stack([popv["sigma_" + k] for k in names]) if names else None
    dm = dp = None
    if config.fit_widths[2]:
        d, sd = popv["distance_pc"], popv["sigma_distance_pc"]
        dm = sd * 5.0 / (d * jnp.log(10.0))
        dp = -sd * 1000.0 / (d * d)
    t, k, _ = tr.mags.shape
    if jac is not None:
        jac = _segment_jacobian(jac, tr.mags, tuple(n in ("log_age", "feh") for n in names)
                                if project else (False,) * len(names))
    flat = jnp.arange(t * (k - 1), dtype=jnp.int32)
    j, seg = flat // (k - 1), flat % (k - 1)
    wid = Widths(jac, sig, dm, dp, None)
    return wid._replace(u_all=_width_lowrank(wid, j, seg, tr.smear[j, seg],
                                             with_smear=t > 1))


def _width_lowrank(wid: Widths, j, seg, smear, with_smear: bool = True):
    """The low-rank factor U (S, B', k) of the selected segments: the bin's smearing
    vector ``smear`` (S, B) (left out with ``with_smear=False``: without binaries it is
    0, and a zero column costs a sixth of the integral at k = 5), the linear widths' J
    sigma at the segment's middle, the distance column; B' = B + 1 (parallax last) with
    a distance width."""
    cols = [smear[..., None]] if with_smear else []
    if wid.jac is not None:
        jm = wid.jac[:, j, seg]  # (W, S, B)
        cols.append(jnp.moveaxis(jm, 0, -1) * wid.sig)
    u = jnp.concatenate(cols, -1) if cols else jnp.zeros(smear.shape + (0,), smear.dtype)
    if wid.dist_mag is None:
        return u
    u = jnp.concatenate([u, jnp.zeros(u.shape[:-2] + (1, u.shape[-1]), u.dtype)], -2)
    dcol = jnp.concatenate([jnp.broadcast_to(wid.dist_mag, u.shape[:-2] + (u.shape[-2] - 1,)),
                            jnp.broadcast_to(wid.dist_plx, u.shape[:-2] + (1,))], -1)
    return jnp.concatenate([u, dcol[..., None]], -1)


def _star_precision(mag, mag_err, floor):
    """(observed mask, precision 1/(err^2 + floor^2) (0 if missing), data (0 if missing),
    the Gaussian's log normalisation) of one star's bands."""
    ok = jnp.isfinite(mag) & jnp.isfinite(mag_err)
    prec = jnp.where(ok, 1.0 / (jnp.where(ok, mag_err, 1.0) ** 2 + floor ** 2), 0.0)
    y = jnp.where(ok, mag, 0.0)
    norm = -0.5 * jnp.sum(jnp.where(ok, _LOG_2PI - jnp.log(jnp.where(ok, prec, 1.0)), 0.0))
    return ok, prec, y, norm


def _star_segments(tr: Track, mag, mag_err, floor):
    """Per-segment log integrals (T, K-1) of one star over every segment, with t* and A."""
    ok, prec, y, norm = _star_precision(mag, mag_err, floor)
    mu0 = tr.mags[:, :-1]
    delta = jnp.where(ok, tr.mags[:, 1:] - mu0, 0.0)
    r0 = jnp.where(ok, y - mu0, 0.0)
    li, t_star, a = segment_log_integral(r0, delta, prec, tr.smear[:, :-1])
    terms = li + norm + tr.log_w[None, :]
    return terms, t_star, a


class Blocks(NamedTuple):
    """Blocks of ``size`` consecutive segments of every track, by their chords (first to
    last node) and smearing vector, for choosing per star the blocks that carry its
    likelihood."""

    start: jax.Array  # (T, C, B)
    end: jax.Array  # (T, C, B)
    smear: jax.Array  # (T, C, B)
    any_valid: jax.Array  # (T, C)
    size: int


def blocks(tr: Track, size: int) -> Blocks:
    """The chords of blocks of ``size`` segments (the last block padded with its end)."""
    t, k, _ = tr.mags.shape
    c = -(-(k - 1) // size)
    pad = c * size + 1 - k
    mags = jnp.pad(tr.mags, ((0, 0), (0, pad), (0, 0)), mode="edge")
    w = jnp.pad(tr.log_w, (0, pad), constant_values=-jnp.inf)
    first = jnp.arange(c) * size
    idx = first[:, None] + jnp.arange(size)[None, :]
    valid = jnp.any(jnp.isfinite(w[idx]), axis=1)
    smear = jnp.pad(tr.smear, ((0, 0), (0, pad), (0, 0)), mode="edge")
    return Blocks(mags[:, first], mags[:, first + size], smear[:, first + size // 2],
                  jnp.broadcast_to(valid, (t, c)), size)


def _star_segments_pruned(tr: Track, bl: Blocks, mag, mag_err, floor, n_blocks: int):
    """Log integrals of one star over the segments of its ``n_blocks`` nearest blocks.

    A block's score is the star's chi^2 to the nearest point of the block's chord (the
    smeared precision of its bin); the blocks with the smallest scores are evaluated
    exactly, segment by segment, the rest are neglected (``scripts/marginal_check.py``
    measures what that costs). Returns (terms, t*, A, track index, first node) with terms
    of shape (n_blocks, size).
    """
    ok, prec, y, norm = _star_precision(mag, mag_err, floor)
    r0 = jax.lax.stop_gradient(jnp.where(ok, y - bl.start, 0.0))
    dl = jax.lax.stop_gradient(jnp.where(ok, bl.end - bl.start, 0.0))
    sm = jax.lax.stop_gradient(bl.smear)
    pc = prec * sm
    den = 1.0 + jnp.sum(sm * pc, axis=-1)

    def dot(x, z):
        return jnp.sum(x * prec * z, axis=-1) - jnp.sum(x * pc, -1) * jnp.sum(z * pc, -1) / den

    tt = jnp.clip(dot(dl, r0) / jnp.maximum(dot(dl, dl), 1e-12), 0.0, 1.0)
    res = r0 - tt[..., None] * dl
    bound = jnp.where(bl.any_valid, dot(res, res), jnp.inf)
    n_c = bound.shape[1]
    _, flat = jax.lax.top_k(-jax.lax.stop_gradient(bound).reshape(-1), n_blocks)
    j, cb = flat // n_c, flat % n_c
    size = bl.size
    k_total = tr.mags.shape[1]
    node = cb[:, None] * size + jnp.arange(size + 1)[None, :]  # (n_blocks, size + 1)
    node_c = jnp.clip(node, 0, k_total - 1)
    mg = tr.mags[j[:, None], node_c]  # (n_blocks, size + 1, B)
    sm = tr.smear[j[:, None], node_c[:, :-1]]
    seg = node[:, :-1]
    lw = jnp.where(seg < k_total - 1, tr.log_w[jnp.clip(seg, 0, k_total - 2)], -jnp.inf)
    mu0 = mg[:, :-1]
    delta = jnp.where(ok, mg[:, 1:] - mu0, 0.0)
    r0 = jnp.where(ok, y - mu0, 0.0)
    li, t_star, a = segment_log_integral(r0, delta, prec, sm)
    return li + norm + lw, t_star, a, j, seg


class MarginalOptions(NamedTuple):
    """Numerical settings of the marginal model (static: each changes the compiled graph).

    n_q : mass-ratio bins (:func:`q_bins`)
    refine : track nodes per grid EEP interval (1: the grid's nodes)
    block : segments per block of the per-star pruning
    n_blocks : blocks evaluated exactly per star when no fixed set is given (None: every
        segment, no pruning); used while optimising the start
    n_segments : size of the fixed per-star set of segments the sampler uses
        (:func:`select_segments`)
    n_select_draws, select_scale : the fixed set is chosen over the optimum and this many
        draws from its Laplace approximation with sds times ``select_scale``
    project_widths : the age and [Fe/H] offsets move the track normal to itself only
        (``False``: the fixed-EEP Jacobian whole, the model before 2026-12-07; see
        ``_segment_jacobian``)
    signed_widths : the sampler's coordinate for the fitted widths (the fit sets
        :class:`~clusterhbm.model.ModelConfig` ``signed_widths`` from it): ``True``
        (default), a signed width s with sigma = |s|; ``False``, ln sigma. This model has
        no per-star offsets to make a funnel, and in ln sigma a width whose posterior
        reaches zero has a long exponential tail: on a 200-star case-(b) mock the widths'
        bulk ESS per draw was 2.4-3.9x ln sigma's (docs/performance.md). Callers of
        the density functions directly set ``ModelConfig.signed_widths`` themselves
        (this field is read only by :func:`clusterhbm.fit.fit_cluster`)
    """

    n_q: int = 24
    refine: int = 1
    block: int = 8
    n_blocks: int | None = 16
    n_segments: int = 192
    n_select_draws: int = 24
    select_scale: float = 2.0
    project_widths: bool = True
    signed_widths: bool = True


def _with_parallax(ok, prec, y, plx_obs, plx_err):
    """A star's band mask, precision and data with its parallax appended as one more
    coordinate (a distance width couples it to the magnitudes); missing or non-positive
    errors: precision 0, as :func:`clusterhbm.model._log_normal_parallax` skips them."""
    p_ok = jnp.isfinite(plx_obs) & jnp.isfinite(plx_err) & (plx_err > 0)
    p_prec = jnp.where(p_ok, 1.0 / jnp.where(p_ok, plx_err, 1.0) ** 2, 0.0)
    return (jnp.concatenate([ok, p_ok[None]]), jnp.concatenate([prec, p_prec[None]]),
            jnp.concatenate([y, jnp.where(p_ok, plx_obs, 0.0)[None]]))


def _star_segments_selected(tr: Track, sel_i, mag, mag_err, floor, wid: Widths | None = None,
                            plx=None):
    """Log integrals of one star over a fixed set of segments (flat indices into the
    (T, K - 1) segments, from :func:`select_segments`); with widths (``wid``) the
    offsets are integrated out too, and with a distance width the parallax (``plx``:
    observed, error, model) is a coordinate of the Gaussian."""
    k1 = tr.mags.shape[1] - 1
    j, seg = sel_i // k1, sel_i % k1
    ok, prec, y, norm = _star_precision(mag, mag_err, floor)
    lw = tr.log_w[seg]
    mu0 = tr.mags[j, seg]
    mu1 = tr.mags[j, seg + 1]
    sm = tr.smear[j, seg]
    if wid is not None and wid.dist_mag is not None:
        p_obs, p_err, p_mod = plx
        ok, prec, y = _with_parallax(ok, prec, y, p_obs, p_err)
        norm = norm - 0.5 * jnp.where(ok[-1], _LOG_2PI - jnp.log(jnp.where(ok[-1], prec[-1],
                                                                            1.0)), 0.0)
        pm = jnp.broadcast_to(p_mod, mu0.shape[:-1] + (1,))
        mu0 = jnp.concatenate([mu0, pm], -1)
        mu1 = jnp.concatenate([mu1, pm], -1)
    # invalid segments (weight -inf; the track's padding magnitudes): harmless inputs, so
    # that no derivative of their (discarded) integral is NaN
    use = (jnp.isfinite(lw)[:, None] & ok[None, :])
    delta = jnp.where(use, mu1 - mu0, jnp.where(ok, 0.1, 0.0))
    r0 = jnp.where(use, y - mu0, 0.0)
    if wid is None:
        sm = jnp.where(use, sm, 0.0)
        li, t_star, a = segment_log_integral(r0, delta, prec, sm)
    else:
        u = wid.u_all[sel_i]
        u = jnp.where(use[..., None], u, 0.0)
        li, t_star, a = segment_log_integral(r0, delta, prec, lowrank=u)
    return jnp.where(jnp.isfinite(lw), li + norm + lw, -jnp.inf), j, seg, t_star, a


#: the default :class:`MarginalOptions`
DEFAULT_OPTIONS = MarginalOptions()


def _star_items(tr: Track, data_i, priors: Priors, opts: MarginalOptions, sel_i=None,
                wid: Widths | None = None, plx_model=None):
    """(terms, track index, segment index, t*, A) of one star, flat over the segments
    evaluated (``sel_i``: a fixed set; else the nearest blocks, or every segment; with
    widths every segment unless a set is given); terms = log segment integral + log IMF
    weight (not yet the class and q weights; with a distance width, the parallax
    term)."""
    mag, mag_err = data_i[0], data_i[1]
    if wid is not None and sel_i is None:
        sel_i = jnp.arange(tr.mags.shape[0] * (tr.mags.shape[1] - 1), dtype=jnp.int32)
    if sel_i is not None:
        return _star_segments_selected(tr, sel_i, mag, mag_err, priors.mag_floor, wid,
                                       (data_i[2], data_i[3], plx_model))
    if opts.n_blocks is None:
        terms, t_star, a = _star_segments(tr, mag, mag_err, priors.mag_floor)
        t, k1 = terms.shape
        j = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k1))
        seg = jnp.broadcast_to(jnp.arange(k1)[None, :], (t, k1))
        return terms.reshape(-1), j.reshape(-1), seg.reshape(-1), t_star.reshape(-1), \
            a.reshape(-1)
    bl = blocks(tr, opts.block)
    n_blocks = min(opts.n_blocks, bl.any_valid.size)
    terms, t_star, a, j, seg = _star_segments_pruned(tr, bl, mag, mag_err, priors.mag_floor,
                                                     n_blocks)
    j = jnp.broadcast_to(j[:, None], seg.shape)
    return terms.reshape(-1), j.reshape(-1), seg.reshape(-1), t_star.reshape(-1), \
        a.reshape(-1)


def _logsumexp(x):
    """logsumexp that is -inf with a zero (not NaN) gradient when every entry is -inf."""
    m = jnp.max(x)
    ok = jnp.isfinite(m)
    return jnp.where(ok, jax.nn.logsumexp(jnp.where(ok, x, 0.0)), -jnp.inf)


def _weighted_items(terms, j, tr: Track, popv: dict, config: ModelConfig):
    """Item log weights with the class prior: log(1 - f_bin) on singles, log f_bin +
    log w_q on binaries (no binaries: singles only)."""
    single = j == 0
    if not config.binaries:
        return jnp.where(single, terms, -jnp.inf)
    f = popv["f_bin"]
    wq = tr.log_wq[jnp.clip(j - 1, 0, tr.log_wq.shape[0] - 1)]
    return jnp.where(single, jnp.log1p(-f) + terms, jnp.log(f) + wq + terms)


def _plx_model(popv):
    return 1000.0 / popv["distance_pc"] + popv["parallax_zp_mas"]


def _likelihoods(items, tr: Track, popv: dict, data_i, config: ModelConfig):
    """(ll_single, ll_binary, ll_field, log_w_member, log_w_field) from a star's items."""
    terms, j = items[0], items[1]
    if config.fit_widths[2]:  # the parallax is in the items' Gaussians
        ll_plx = jnp.zeros(())
    else:
        ll_plx = _log_normal_parallax(data_i[2], data_i[3], _plx_model(popv), 0.0)
    ll_s = _logsumexp(jnp.where(j == 0, terms, -jnp.inf)) + ll_plx
    ll_b = jnp.full_like(ll_s, -jnp.inf)
    if config.binaries:
        wq = tr.log_wq[jnp.clip(j - 1, 0, tr.log_wq.shape[0] - 1)]
        ll_b = _logsumexp(jnp.where(j > 0, terms + wq, -jnp.inf)) + ll_plx
    return (ll_s, ll_b) + field_terms(popv, data_i, config, jnp.zeros_like(ll_s))


def star_log_likelihoods(tr: Track, popv: dict, data_i, config: ModelConfig,
                         priors: Priors, opts: MarginalOptions = DEFAULT_OPTIONS,
                         sel_i=None, wid: Widths | None = None):
    """(ll_single, ll_binary, ll_field, log_w_member, log_w_field) of one star: mass and q
    (and with widths, ``wid``, the star's offsets) integrated out; the member parallax
    term is included in both member likelihoods."""
    return _likelihoods(_star_items(tr, data_i, priors, opts, sel_i, wid, _plx_model(popv)),
                        tr, popv, data_i, config)


def _member_ll(ll_s, ll_b, popv, config):
    if config.binaries:
        f = popv["f_bin"]
        ll = jnp.logaddexp(jnp.log1p(-f) + ll_s, jnp.log(f) + ll_b)
    else:
        ll = ll_s
    if config.selection:
        ll = ll - popv["log_p_detect"]
    return ll


def check_config(config: ModelConfig):
    """The marginal model needs the pooled configuration."""
    if not config.pooled:
        raise ValueError("the marginal model is pooled only (use the latent model, "
                         "clusterhbm.model, for the unpooled fit)")
    if len(tuple(config.fit_widths)) != 4:
        raise ValueError(f"fit_widths must be 4 flags (age, [Fe/H], distance, A_V), got "
                         f"{config.fit_widths}")


def log_density_marginal(pop: dict, data: StarData, grid: ModelGrid, config: ModelConfig,
                         priors: Priors, opts: MarginalOptions = DEFAULT_OPTIONS,
                         per_star: bool = False, sel=None):
    """log p(phi | D) up to a constant, every star's mass (and q) integrated out
    (``per_star``: the (N,) star terms instead of the total; ``sel``: (N, S) segments per
    star from :func:`select_segments`, else chosen per evaluation, see
    :class:`MarginalOptions`)."""
    lp = log_prior_population(pop, config, priors, grid)
    # outside the grid (prior -inf) evaluate at the clipped point, so that the gradient of
    # the -inf result is finite (zero), never NaN
    iso = grid.iso
    safe = dict(pop)
    safe["log_age"] = jnp.clip(pop["log_age"], iso.log_age[0], iso.log_age[-1])
    safe["feh"] = jnp.clip(pop["feh"], iso.feh[0], iso.feh[-1])
    safe["ln_distance_pc"] = jnp.clip(pop["ln_distance_pc"], jnp.log(priors.distance_pc_min),
                                      jnp.log(priors.distance_pc_max))
    safe["av_raw"] = jnp.clip(pop["av_raw"], -5.0, priors.av_max)
    for name, on in zip(WIDTH_PARAMS, config.fit_widths):
        if on:
            key = width_key(name, config)
            lo, hi = (-150.0, 150.0) if config.signed_widths else (-30.0, 5.0)
            safe[key] = jnp.clip(pop[key], lo, hi)
    popv = marginal_state(safe, config, priors, grid)
    tr, jac = track_and_jacobian(popv, grid, config, priors, n_q=opts.n_q,
                                 refine=opts.refine)
    wid = width_terms(popv, config, jac, tr, opts.project_widths)

    def one(data_i, sel_i):
        ll_s, ll_b, ll_f, lw_m, lw_f = star_log_likelihoods(tr, popv, data_i, config, priors,
                                                            opts, sel_i, wid)
        ll_m = _member_ll(ll_s, ll_b, popv, config)
        if config.field:
            return jnp.logaddexp(lw_m + ll_m, lw_f + ll_f)
        return ll_m

    if wid is not None and sel is None:
        # every segment of every star: one star at a time (memory)
        stars = jax.lax.map(lambda x: one(x, None), tuple(data), batch_size=8)
    else:
        stars = jax.vmap(one)(tuple(data), sel)
    if per_star:
        return stars
    ok = jnp.isfinite(lp) & popv["iso_table"].inside & jnp.any(jnp.isfinite(tr.log_w))
    total = jnp.where(ok, lp, 0.0) + jnp.sum(stars)
    return jnp.where(ok & jnp.isfinite(total), total, -jnp.inf)


def make_marginal_logdensity_fn(data: StarData, grid: ModelGrid, config: ModelConfig,
                                priors: Priors | None = None,
                                opts: MarginalOptions = DEFAULT_OPTIONS, sel=None):
    """``logdensity_fn(position)`` with ``position = {"pop": {...}}`` for BlackJAX
    (``sel``: fixed segments per star, :func:`select_segments`)."""
    priors = Priors() if priors is None else priors
    check_config(config)
    if config.field and data.log_field_mag is None:
        raise ValueError("ModelConfig(field=True) needs StarData.log_field_mag (see "
                         "clusterhbm.field.field_photometry_log_density)")

    def logdensity_fn(position):
        return log_density_marginal(position["pop"], data, grid, config, priors, opts,
                                    sel=sel)

    return logdensity_fn


def _uniform_from_bits(x, n, k: int = 2):
    """n x k pseudo-random uniforms seeded by the bits of a float array (deterministic per
    draw: the transform of a draw has no key of its own)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    key = jax.random.fold_in(jax.random.key(0), jnp.sum(bits))
    return jax.random.uniform(key, (n, k))


def _offset_draw(tr: Track, wid: Widths, popv: dict, data_i, priors: Priors,
                 config: ModelConfig, j, k, t, u):
    """One star's (log age, [Fe/H], distance, A_V) drawn from the Gaussian conditional of
    its offsets given its data at the drawn point of the track (segment k of track j,
    position t). In whitened offsets w = delta / sigma (prior N(0, I)) the data are
    r = U w + noise with U from :func:`_width_lowrank` (its first column, the bin's
    smearing, a nuisance kept in the Gaussian); ``u``: uniforms for the draw."""
    ok, prec, y, _ = _star_precision(data_i[0], data_i[1], priors.mag_floor)
    mu = tr.mags[j, k] + t * (tr.mags[j, k + 1] - tr.mags[j, k])
    if wid.dist_mag is not None:
        ok, prec, y = _with_parallax(ok, prec, y, data_i[2], data_i[3])
        mu = jnp.concatenate([mu, _plx_model(popv)[None]])
    full = _width_lowrank(wid, j[None], k[None], tr.smear[j, k][None])[0]  # (B', 1 + W)
    full = jnp.where(ok[:, None], full, 0.0)
    r = jnp.where(ok, y - mu, 0.0)
    h = jnp.eye(full.shape[-1], dtype=mu.dtype) + full.T @ (prec[:, None] * full)
    chol = small_cholesky(h)  # h = L L': the posterior precision of w
    mean = small_upper_solve(chol, small_lower_solve(chol, full.T @ (prec * r)))
    zz = ndtri(jnp.clip(u[: full.shape[-1]], 1e-6, 1.0 - 1e-6))
    w = (mean + small_upper_solve(chol, zz))[1:]
    names = _linear_names(config) + (("distance_pc",) if wid.dist_mag is not None else ())
    out = {n: popv[n] for n in ("log_age", "feh", "distance_pc", "av_mag")}
    for i, n in enumerate(names):
        out[n] = popv[n] + popv["sigma_" + n] * w[i]
    return out


#: uniforms per star in :func:`star_conditionals`: 2 for the segment and the position in
#: it, 1 + 4 for the offsets' Gaussian draw (the smearing nuisance and four widths)
_N_UNIFORM = 7


def star_conditionals(pop: dict, data: StarData, grid: ModelGrid, config: ModelConfig,
                      priors: Priors, opts: MarginalOptions = DEFAULT_OPTIONS, sel=None):
    """Per-draw results (pure; the sampler's transform): ``{"pop": ..., "star": ...}``.

    ``pop``: the physical population values (and ``n_members``, ``p_detect``); ``star``:
    per star ``p_member``, ``p_binary`` (given membership), and the primary's
    ``mass_msun``, ``teff_k``, ``logg``, ``eep`` drawn from its conditional given phi as a
    member
    (a segment by its posterior weight, the position in it from the truncated Gaussian).
    """
    popv = marginal_state(pop, config, priors, grid)
    tr, jac = track_and_jacobian(popv, grid, config, priors, n_q=opts.n_q,
                                 refine=opts.refine)
    wid = width_terms(popv, config, jac, tr, opts.project_widths)
    n = data.mag.shape[0]
    u = _uniform_from_bits(jnp.stack([jnp.asarray(pop[k], jnp.float32)
                                      for k in sorted(pop)]), n, _N_UNIFORM)

    def one(data_i, u_i, sel_i):
        items = _star_items(tr, data_i, priors, opts, sel_i, wid, _plx_model(popv))
        terms, j, seg, t_star, a = items
        w = _weighted_items(terms, j, tr, popv, config)
        ll_s, ll_b, ll_f, lw_m, lw_f = _likelihoods(items, tr, popv, data_i, config)
        if config.binaries:
            f = popv["f_bin"]
            a_b = jnp.log(f) + ll_b
            p_bin = jnp.exp(a_b - jnp.logaddexp(a_b, jnp.log1p(-f) + ll_s))
        else:
            p_bin = jnp.zeros_like(ll_s)
        ll_m = _member_ll(ll_s, ll_b, popv, config)
        if config.field:
            am = lw_m + ll_m
            p_mem = jnp.exp(am - jnp.logaddexp(am, lw_f + ll_f))
        else:
            p_mem = jnp.ones_like(ll_s)
        cdf = jnp.cumsum(jax.nn.softmax(w))
        idx = jnp.clip(jnp.searchsorted(cdf, u_i[0] * cdf[-1]), 0, w.shape[0] - 1)
        k = seg[idx]
        ts, aa = t_star[idx], a[idx]
        sd = 1.0 / jnp.sqrt(aa)
        lo_p, hi_p = ndtr((0.0 - ts) / sd), ndtr((1.0 - ts) / sd)
        uu = jnp.clip(lo_p + u_i[1] * (hi_p - lo_p), 1e-7, 1.0 - 1e-7)
        t = jnp.clip(ts + sd * ndtri(uu), 0.0, 1.0)
        t = jnp.where(hi_p - lo_p > 1e-6, t, u_i[1])

        def at(col):
            return col[k] + t * (col[k + 1] - col[k])

        res = {"p_member": p_mem, "p_binary": p_bin, "mass_msun": at(tr.mass),
               "teff_k": 10.0 ** at(tr.log_teff), "logg": at(tr.logg), "eep": at(tr.eep)}
        if wid is not None:
            res.update(_offset_draw(tr, wid, popv, data_i, priors, config, j[idx], k, t,
                                    u_i[2:]))
        return res

    stars = jax.vmap(one)(tuple(data), u, sel)
    if not config.field:
        stars.pop("p_member")
    if not config.binaries:
        stars.pop("p_binary")
    out = {k: popv[k] for k in ("log_age", "feh", "distance_pc", "av_mag")}
    for name, on in zip(WIDTH_PARAMS, config.fit_widths):
        if on:
            out[name] = popv[name]
    if config.fit_parallax_zp:
        out["parallax_zp_mas"] = popv["parallax_zp_mas"]
    for k in ("f_bin", "f_field", "mf_slope", "field_parallax_mas", "field_parallax_sd_mas"):
        if k in popv:
            out[k] = popv[k]
    if config.field:
        out["n_members"] = jnp.sum(stars["p_member"])
    if config.selection:
        out["p_detect"] = jnp.exp(popv["log_p_detect"])
    return {"pop": out, "star": stars}


def select_segments(pops, data: StarData, grid: ModelGrid, config: ModelConfig,
                    priors: Priors, opts: MarginalOptions = DEFAULT_OPTIONS,
                    n_segments: int = 192, batch: int = 64, n_candidate_blocks: int = 64):
    """Per star, the ``n_segments`` segments (flat indices into the (T, K - 1) segments of
    the tracks) that carry most of its member likelihood at any of the population
    states ``pops`` (a pytree of unconstrained population positions with a leading axis).

    At every state each star's ``n_candidate_blocks`` nearest blocks (by chord distance,
    as :class:`MarginalOptions` ``n_blocks``) are evaluated exactly; every segment is
    ranked by its largest weighted term over the states. A fit picks states around its
    optimum, so the fixed set holds each star's likelihood wherever the chains go, and
    the density the sampler sees is smooth (a set chosen anew at every evaluation jumps
    when it changes). Returns (N, S) int32.
    """
    n_tracks = 1 + (opts.n_q if config.binaries else 0)
    k1 = (grid.iso.eep.shape[0] - 1) * opts.refine
    static = {"config": config, "priors": priors, "opts": opts,
              "n_candidate_blocks": n_candidate_blocks}
    n = data.mag.shape[0]
    n_states = jax.tree.leaves(pops)[0].shape[0]
    out = []
    for i0 in range(0, n, batch):
        part = jax.tree.map(lambda x, i0=i0: x[i0:i0 + batch], tuple(data))
        m = part[0].shape[0]
        if m < batch:  # pad: one compiled shape
            part = jax.tree.map(lambda x, m=m: jnp.concatenate(
                [x, jnp.repeat(x[-1:], batch - m, 0)]), part)
        best = None
        for k in range(n_states):  # one state at a time: one compiled program per fit
            pop = jax.tree.map(lambda x, k=k: x[k], pops)
            b = _segment_scores(part, pop, grid, **static)
            best = b if best is None else jnp.maximum(best, b)
        out.append(_top_segments(best, n_segments=n_segments, n_tracks=n_tracks,
                                 k1=k1)[:m])
    return jnp.concatenate(out, axis=0)


@functools.partial(jax.jit, static_argnames=("config", "priors", "opts", "n_candidate_blocks"))
def _segment_scores(data_b, pop, grid, *, config, priors, opts, n_candidate_blocks):
    """(batch, T (K - 1)): every segment's largest weighted member term at the state
    ``pop`` for each star of the batch (-inf: not among its candidate blocks)."""
    n_tracks = 1 + (opts.n_q if config.binaries else 0)
    cand = opts._replace(n_blocks=n_candidate_blocks)
    popv = marginal_state(pop, config, priors, grid)
    tr = track(popv, grid, config, priors, n_q=opts.n_q, refine=opts.refine)
    n_all = n_tracks * (tr.mags.shape[1] - 1)

    def one(data_i):
        terms, j, seg, _, _ = _star_items(tr, data_i, priors, cand)
        w = _weighted_items(terms, j, tr, popv, config)
        idx = j * (tr.mags.shape[1] - 1) + seg
        if n_tracks > 1:
            # the single track's own nearest blocks: for a star far above the isochrone
            # (a blue straggler) every nearest block is a binary one
            tr1 = tr._replace(mags=tr.mags[:1], smear=tr.smear[:1])
            t1, j1, s1, _, _ = _star_items(tr1, data_i, priors, cand._replace(
                n_blocks=max(n_candidate_blocks // 4, 1)))
            w1 = _weighted_items(t1, j1, tr, popv, config)
            idx = jnp.concatenate([idx, s1])
            w = jnp.concatenate([w, w1])
        return jnp.full((n_all,), -jnp.inf, w.dtype).at[idx].max(w)

    return jax.vmap(one)(data_b)


@functools.partial(jax.jit, static_argnames=("n_segments", "n_tracks", "k1"))
def _top_segments(best, *, n_segments, n_tracks, k1):
    """Per star (rows of ``best``), the ``n_segments`` best segments; with binaries the
    single track keeps a quarter of them, so that the many near-identical low-q binary
    segments cannot crowd out a single star's."""
    n_all = n_tracks * k1
    if n_tracks == 1:
        return jax.lax.top_k(best, min(n_segments, n_all))[1].astype(jnp.int32)
    n1 = min(max(n_segments // 4, 1), k1)
    i1 = jax.lax.top_k(best[:, :k1], n1)[1]
    i2 = jax.lax.top_k(best[:, k1:], min(n_segments - n1, n_all - k1))[1] + k1
    return jnp.concatenate([i1, i2], -1).astype(jnp.int32)
