"""Fitting a cluster: catalogue -> data arrays -> initial positions -> NUTS -> results.

This is the shell around the pure model (:mod:`clusterhbm.model`) and sampler
(:mod:`clusterhbm.sampling`): it validates input, logs what it drops, finds a starting
point near the data, and packages the draws in a :class:`~clusterhbm.results.FitResult`.

Initialisation: (1) the distance from the median parallax of stars with parallax S/N > 3
(or a scan in distance modulus when there are none); (2) a scan of isochrones in log age
and A_V, then in [Fe/H], scoring each by the sum over stars of the clipped chi^2 to the
nearest isochrone point in (G, BP-RP); each star starts at its nearest point's EEP;
(3) a few hundred Adam steps on the log density with the widths held small; (4) chains
start from that point with small jitter.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .catalogue import photometric_system, validate_catalogue
from .field import field_photometry_log_density, member_log_odds
from .grid import (
    ModelGrid,
    apply_colour_correction,
    band_indices,
    colour_correction_table,
    load_grid,
)
from .model import (
    WIDTH_PARAMS,
    ModelConfig,
    Priors,
    StarData,
    make_logdensity_fn,
    pop_position_keys,
    pop_to_unconstrained,
    star_observables,
    star_position_keys,
    star_values,
)
from .photometry import observables_from_eep
from .sampling import run_nuts

__all__ = [
    "FitData",
    "bands_for_release",
    "best_of_starts",
    "fit_cluster",
    "initial_guess",
    "initial_positions",
    "optimise_starts",
    "prepare_data",
    "priors_from_toml",
    "start_candidates",
]

log = logging.getLogger(__name__)

_MAG_COLS = {"G": "phot_g_mean_mag", "BP": "phot_bp_mean_mag", "RP": "phot_rp_mean_mag"}


def bands_for_release(release: str) -> tuple[str, str, str]:
    """Model band names for a Gaia release: EDR3 passbands for (E)DR3, revised DR2 for DR2."""
    return ("G_DR2", "BP_DR2", "RP_DR2") if photometric_system(release) == "DR2" \
        else ("G", "BP", "RP")


class FitData(NamedTuple):
    """Data prepared for the model, plus what was kept."""

    data: StarData
    bands: tuple
    source_id: np.ndarray
    rows: np.ndarray  # catalogue rows used
    release: str
    field_info: dict | None = None


def prepare_data(catalogue, *, use_parallax: bool = True, dtype=None,
                 g_lim: float | None = None, g_bright: float | None = None,
                 member_prob_column: str | None = "member_prob") -> FitData:
    """Arrays for the model from a catalogue (see :mod:`clusterhbm.catalogue`).

    Stars without a finite G magnitude and error are dropped (counted in the log);
    missing BP/RP or parallax are kept as NaN (the likelihood skips them). Stars outside
    ``[g_bright, g_lim]`` are dropped (counted) so that the catalogue matches the selection
    function. ``member_prob_column`` (if present) becomes the prior membership log odds of
    the field mixture; the photometric field density is computed here too
    (:mod:`clusterhbm.field`).
    """
    cat = validate_catalogue(catalogue)
    if g_lim is not None or g_bright is not None:
        gg = np.asarray(cat["phot_g_mean_mag"], float)
        cut = np.isfinite(gg) & ((gg > (np.inf if g_lim is None else g_lim))
                                 | (gg < (-np.inf if g_bright is None else g_bright)))
        if cut.any():
            log.warning("dropped %d of %d stars outside the G limits [%s, %s]",
                        int(cut.sum()), len(cat), g_bright, g_lim)
            cat = cat[~cut]
    release = cat.meta.get("gaia_release", "DR3")
    names = bands_for_release(release)
    mag = np.column_stack([np.asarray(cat[_MAG_COLS[b]], float) for b in ("G", "BP", "RP")])
    err = np.column_stack([np.asarray(cat[_MAG_COLS[b] + "_error"], float)
                           for b in ("G", "BP", "RP")])
    keep = np.isfinite(mag[:, 0]) & np.isfinite(err[:, 0]) & (err[:, 0] > 0)
    n_drop = int(np.sum(~keep))
    if n_drop:
        log.warning("dropped %d of %d stars without a usable G magnitude/error", n_drop,
                    len(cat))
    bad_err = np.isfinite(mag) & ~(np.isfinite(err) & (err > 0))
    if np.any(bad_err[keep]):
        log.warning("%d band measurements without a usable error are treated as missing",
                    int(np.sum(bad_err[keep])))
    mag = np.where(bad_err, np.nan, mag)
    if use_parallax and "parallax" in cat.colnames:
        plx = np.asarray(cat["parallax"], float)
        plx_err = np.asarray(cat["parallax_error"], float)
    else:
        plx = np.full(len(cat), np.nan)
        plx_err = np.full(len(cat), np.nan)
    n_plx = int(np.sum(np.isfinite(plx[keep]) & np.isfinite(plx_err[keep])))
    log.info("%d stars: %d with parallaxes, %d missing BP, %d missing RP", int(keep.sum()),
             n_plx, int(np.sum(~np.isfinite(mag[keep, 1]))),
             int(np.sum(~np.isfinite(mag[keep, 2]))))
    dt = dtype or jnp.zeros(()).dtype
    lfm, finfo = field_photometry_log_density(mag[keep], err[keep])
    odds = None
    if member_prob_column and member_prob_column in cat.colnames:
        odds = jnp.asarray(member_log_odds(np.asarray(cat[member_prob_column], float)[keep]),
                           dt)
        log.info("membership prior from column %r", member_prob_column)
    elif member_prob_column and member_prob_column != "member_prob":
        raise ValueError(f"membership prior column {member_prob_column!r} not in the "
                         f"catalogue (columns: {cat.colnames[:20]}...)")
    data = StarData(mag=jnp.asarray(mag[keep], dt), mag_err=jnp.asarray(err[keep], dt),
                    parallax_mas=jnp.asarray(plx[keep], dt),
                    parallax_err_mas=jnp.asarray(plx_err[keep], dt),
                    log_field_mag=jnp.asarray(lfm, dt), log_member_odds=odds)
    return FitData(data=data, bands=names, source_id=np.asarray(cat["source_id"])[keep],
                   rows=np.flatnonzero(keep), release=release, field_info=dict(finfo))


def priors_from_toml(path) -> Priors:
    """:class:`~clusterhbm.model.Priors` with the fields of a TOML file's ``[priors]`` table.

    Unknown keys and non-numeric values are errors that name the key; the defaults (and
    their units) are documented on :class:`~clusterhbm.model.Priors`.
    """
    import tomllib
    from pathlib import Path

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"priors file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"priors file {path} is not valid TOML: {e}") from None
    table = doc.get("priors", doc)
    fields = Priors._fields
    bad = [k for k in table if k not in fields]
    if bad:
        raise ValueError(f"priors file {path}: unknown field(s) {bad}; allowed: "
                         f"{list(fields)}")
    values = {}
    for k, v in table.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"priors file {path}: {k} must be a number, got {v!r}")  # noqa: TRY004
        values[k] = float(v)
    return Priors()._replace(**values)


def _distance_guess(data: StarData):
    """1000 / the inverse-variance weighted median parallax of every star with one (robust
    to field stars), or None without >= 3 parallaxes or when their weighted mean is not
    3 sigma above zero. (A median over the stars with parallax / error > 3, used before,
    kept only the upward-scattered faint stars of a distant cluster: 2716 pc for a
    3000-pc mock whose weighted mean parallax was 1.3 sigma from the truth.)"""
    plx = np.asarray(data.parallax_mas, float)
    err = np.asarray(data.parallax_err_mas, float)
    ok = np.isfinite(plx) & np.isfinite(err) & (err > 0)
    if ok.sum() < 3:
        return None
    p, w = plx[ok], 1.0 / err[ok] ** 2
    if np.sum(w * p) / np.sqrt(np.sum(w)) < 3.0:
        return None
    order = np.argsort(p)
    cw = np.cumsum(w[order])
    med = float(p[order][np.searchsorted(cw, 0.5 * cw[-1])])
    return 1000.0 / med if med > 0 else None


def _isochrone_scores(grid, band_idx, data, params, eeps, weight):
    """Weighted sum over stars of the clipped chi^2 to the nearest isochrone point, per
    param set.

    params : (P, 4) array of (log_age, feh, distance_pc, av_mag); weight : (N,)
    Returns (scores (P,), nearest EEP per star (P, N)).
    """
    g = data.mag[:, 0]
    c = data.mag[:, 1] - data.mag[:, 2]
    sg = jnp.sqrt(data.mag_err[:, 0] ** 2 + 0.03 ** 2)
    sc = jnp.sqrt(jnp.nan_to_num(data.mag_err[:, 1], nan=1.0) ** 2
                  + jnp.nan_to_num(data.mag_err[:, 2], nan=1.0) ** 2 + 0.03 ** 2)
    has_c = jnp.isfinite(c)
    c = jnp.nan_to_num(c)

    def one(p):
        o = jax.vmap(lambda e: observables_from_eep(grid, e, p[0], p[1], p[2], p[3],
                                                    band_idx))(eeps)
        ig, ic = o.mags[:, 0], o.mags[:, 1] - o.mags[:, 2]
        big = jnp.where(o.valid, 0.0, 1e6)
        chi = ((g[:, None] - ig[None]) / sg[:, None]) ** 2 + jnp.where(
            has_c[:, None], ((c[:, None] - ic[None]) / sc[:, None]) ** 2, 0.0) + big[None]
        j = jnp.argmin(chi, axis=1)
        best = jnp.min(chi, axis=1)
        return jnp.sum(weight * jnp.minimum(best, 25.0)), eeps[j]

    return jax.lax.map(one, params, batch_size=8)


# one compiled scan per (band set, shapes), shared by every call of initial_guess (a jit of
# a fresh lambda per call recompiled it each time: ~5 s per call, 5 calls per multi-start fit)
_isochrone_scores_jit = jax.jit(_isochrone_scores, static_argnums=(1,))


def initial_guess(data: StarData, grid: ModelGrid, band_idx, *, init: dict | None = None,
                  verbose: bool = True):
    """A starting point: population values (physical units) and one EEP per star."""
    init = dict(init or {})
    d0 = init.get("distance_pc") or _distance_guess(data)
    e = np.asarray(grid.iso.eep)
    eeps = jnp.asarray(np.arange(e[0], e[-1] + 1, 2.0), e.dtype)
    # Score on the brightest 8 mag (turnoff, subgiants, giants and the upper main
    # sequence carry the age): faint M dwarfs, where model colours are least reliable,
    # would otherwise prefer a pre-main sequence (a young age) in real clusters.
    g = np.asarray(data.mag[:, 0])
    # (a weight, not a subset: the compiled scan then has one shape per catalogue size)
    bright = g <= np.nanmin(g) + 8.0
    weight = np.ones(g.shape, np.float32)
    if bright.sum() >= 20 and not bright.all():
        weight = bright.astype(np.float32)
    weight = jnp.asarray(weight)

    def scan(p):
        return _isochrone_scores_jit(grid, tuple(band_idx), data, p, eeps, weight)

    # a coarse [Fe/H] set already in the first pass: at 0 alone, a 10-Gyr [Fe/H] = -1
    # mock at 3000 pc scanned to log age 8.6 and every optimiser start stayed in that
    # basin (log age 9.49 at the end, 1074 nats below the truth)
    lo_fe, hi_fe = float(grid.iso.feh[0]), float(grid.iso.feh[-1])
    fehs = [init["feh"]] if "feh" in init else [
        f for f in (-2.0, -1.0, -0.5, 0.0, 0.25) if lo_fe <= f <= hi_fe]
    ages = [init["log_age"]] if "log_age" in init else list(np.arange(6.6, 10.21, 0.1))
    # A_V starts >= 0.05: at 0 the sampler would start on the boundary of its prior
    avs = [init["av_mag"]] if "av_mag" in init else list(np.arange(0.05, 1.51, 0.1))
    dists = [d0] if d0 else list(10 ** (np.arange(5.0, 15.01, 0.5) / 5 + 1))
    grid1 = np.array([(a, f, d, v) for a in ages for f in fehs for d in dists for v in avs])
    s, _ = scan(jnp.asarray(grid1))
    best = grid1[int(np.argmin(np.asarray(s)))]
    # refine: [Fe/H] nodes and the neighbourhood in age, A_V (and distance)
    a0, _, dd, v0 = best
    ages2 = ages if "log_age" in init else list(np.clip(a0 + np.arange(-0.15, 0.151, 0.05),
                                                        6.0, 10.3))
    fehs2 = fehs if "feh" in init else list(np.asarray(grid.iso.feh)[2:])
    avs2 = avs if "av_mag" in init else list(np.clip(v0 + np.arange(-0.1, 0.11, 0.05), 0.05,
                                                     6))
    dists2 = [dd] if d0 else list(dd * np.array([0.85, 0.92, 1.0, 1.08, 1.17]))
    grid2 = np.array([(a, f, d, v) for a in ages2 for f in fehs2 for d in dists2
                      for v in avs2])
    s2, eep2 = scan(jnp.asarray(grid2))
    k = int(np.argmin(np.asarray(s2)))
    a, f, d, v = (float(x) for x in grid2[k])
    out = {"log_age": a, "feh": f, "distance_pc": d, "av_mag": v}
    out.update({k2: v2 for k2, v2 in init.items() if k2 in out})
    (log.info if verbose else log.debug)(
        "initial guess: log_age %.2f, [Fe/H] %.2f, distance %.0f pc, A_V %.2f", a, f, d, v)
    return out, np.asarray(eep2[k])  # every star's nearest EEP on the chosen isochrone


#: log-age offsets (dex) from the isochrone-scan guess at which the optimiser also starts
START_AGE_OFFSETS = (-0.1, -0.05, 0.05, 0.1)


def start_candidates(data: StarData, grid: ModelGrid, band_idx, guess: dict, eep0, *,
                     init: dict | None = None, n_starts: int = 5):
    """Up to ``n_starts`` population starts: the scan's ``guess`` and its neighbours in age.

    The optimiser can stop in a local mode whose log density is ~100 below the best one,
    with the population age ~0.1 dex off and A_V compensating (measured on coverage mock
    2009 of ``scripts/coverage_study.py``, see ``scripts/multistart_check.py``); NUTS
    chains started there stay there. Each neighbour re-scans [Fe/H], distance and A_V and
    re-assigns every star's EEP on the isochrone of that age, so the starts differ in the
    stars' branches (turnoff hook, subgiant branch) as well as in the population.

    Returns a list of ``(pop_values, eep)``; the first is ``(guess, eep0)``. A user-fixed
    ``init["log_age"]`` gives that start only.
    """
    init = dict(init or {})
    cands = [(dict(guess), np.asarray(eep0))]
    if "log_age" in init or n_starts <= 1:
        return cands
    lo, hi = float(grid.iso.log_age[0]), float(grid.iso.log_age[-1])
    seen = {round(float(guess["log_age"]), 3)}
    for off in START_AGE_OFFSETS:
        if len(cands) >= n_starts:
            break
        a = float(np.clip(guess["log_age"] + off, lo, hi))
        if round(a, 3) in seen:
            continue
        seen.add(round(a, 3))
        g, e = initial_guess(data, grid, band_idx, init={**init, "log_age": a},
                             verbose=False)
        cands.append(({**guess, **g}, np.asarray(e)))
    return cands


def optimise_starts(logdensity_fn, positions, *, num_steps: int = 300,
                    learning_rate: float = 0.02):
    """:func:`adam_best` from S starts at once (leading axis S, one compiled program).

    Returns the S optimised positions and their -log densities (numpy, (S,)).
    """
    best, loss = jax.jit(jax.vmap(lambda p: adam_best(
        logdensity_fn, p, num_steps=num_steps, learning_rate=learning_rate)))(positions)
    return best, np.asarray(loss)


def best_of_starts(logdensity_fn, cands, config: ModelConfig, grid: ModelGrid, rng_key, *,
                   num_steps: int = 300):
    """Optimise from every candidate start; return (position, index, losses).

    With ``num_steps == 0`` the first candidate's position is returned unoptimised.
    """
    pos = [jax.tree.map(lambda x: x[0], initial_positions(rng_key, g, e, config, 1,
                                                          grid=grid, jitter=0.0))
           for g, e in cands]
    if not num_steps:
        return pos[0], 0, None
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *pos)
    best, loss = optimise_starts(logdensity_fn, stacked, num_steps=num_steps)
    k = int(np.argmin(np.where(np.isfinite(loss), loss, np.inf)))
    if len(cands) > 1:
        # (the unpooled model has no population age: its starts differ in the stars')
        ages = ([round(float(np.asarray(best["pop"]["log_age"][i])), 3)
                 for i in range(len(cands))] if "log_age" in best["pop"] else "(unpooled)")
        log.info("optimised from %d starts: -log density %s at log_age %s; best: start %d",
                 len(cands), np.round(loss, 1), ages, k)
        if np.sum(loss - loss[k] > 10.0) > 0:
            log.info("%d of %d starts ended >10 below the best log density (local modes)",
                     int(np.sum(loss - loss[k] > 10.0)), len(cands))
    return jax.tree.map(lambda x: x[k], best), k, loss


def start_widths(distance_pc) -> dict:
    """The widths both models start from: 0.01 dex in log age and [Fe/H], 0.5 % of the
    distance, 0.01 mag in A_V."""
    return {"sigma_log_age": 0.01, "sigma_feh": 0.01, "sigma_distance_pc": 0.005 * distance_pc,
            "sigma_av_mag": 0.01}


def initial_positions(rng_key, pop_values: dict, eep, config: ModelConfig, n_chains: int, *,
                      grid: ModelGrid, width_init: dict | None = None,
                      jitter: float = 0.01):
    """Chain starting positions (pytree with a leading chain axis).

    ``eep`` (N,) are the stars' starting EEPs on the population's isochrone; they are
    turned into the pseudo-mass coordinate of :mod:`clusterhbm.model`.
    """
    from .isochrone import interp_eep

    m0 = jax.jit(jax.vmap(lambda e, iso, a, f: interp_eep(iso, e, a, f, cubic=config.cubic)
                          .initial_mass, in_axes=(0, None, None, None)))(
        jnp.asarray(eep), grid.iso, pop_values["log_age"], pop_values["feh"])
    pseudo_mass = m0 + config.pseudo_mass_eps * jnp.asarray(eep)
    widths = start_widths(pop_values["distance_pc"])
    widths.update(width_init or {})
    pop = pop_to_unconstrained({**pop_values, **widths}, config)
    n = eep.shape[0]
    star = {"s": jnp.asarray(pseudo_mass, jnp.zeros(()).dtype)}
    for k in star_position_keys(config)[1:]:
        star[k] = jnp.zeros(n)
    base = {"pop": pop, "star": star}
    keys = jax.random.split(rng_key, n_chains)

    def jit_one(key):
        leaves, treedef = jax.tree.flatten(base)
        ks = jax.random.split(key, len(leaves))
        new = [x + jitter * jax.random.normal(k, jnp.shape(x))
               for x, k in zip(leaves, ks)]
        return jax.tree.unflatten(treedef, new)

    return jax.jit(jax.vmap(jit_one))(keys)


def adam_best(logdensity_fn, position, *, num_steps: int = 300,
              learning_rate: float = 0.02):
    """Adam on -log density from ``position``, widths held fixed (they would collapse at
    the mode); returns the best position seen and its -log density. Pure and traceable
    (jit it, or vmap it over problems as :func:`clusterhbm.parallel.fit_many` does)."""
    import optax

    frozen = {k for k in position["pop"] if k.startswith(("ln_sigma", "signed_sigma"))}
    free = {"pop": {k: v for k, v in position["pop"].items() if k not in frozen},
            "star": position["star"]}
    fixed = {k: v for k, v in position["pop"].items() if k in frozen}

    def loss(fr):
        lp = logdensity_fn({"pop": {**fr["pop"], **fixed}, "star": fr["star"]})
        return -jnp.where(jnp.isfinite(lp), lp, -1e30)

    opt = optax.adam(learning_rate)

    def body(carry, _):
        fr, st, best, best_l = carry
        val, g = jax.value_and_grad(loss)(fr)
        g = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), g)
        upd, st = opt.update(g, st, fr)
        better = val < best_l
        best = jax.tree.map(lambda x, y: jnp.where(better, x, y), fr, best)
        best_l = jnp.where(better, val, best_l)
        return (optax.apply_updates(fr, upd), st, best, best_l), None

    init = (free, opt.init(free), free, loss(free))
    (_, _, best, best_l), _ = jax.lax.scan(body, init, None, length=num_steps)
    return {"pop": {**best["pop"], **fixed}, "star": best["star"]}, best_l


def _optimise(logdensity_fn, position, *, num_steps: int = 300, learning_rate: float = 0.02):
    """:func:`adam_best`, compiled; the loss as a Python float."""
    best, best_l = jax.jit(lambda p: adam_best(logdensity_fn, p, num_steps=num_steps,
                                               learning_rate=learning_rate))(position)
    return best, float(best_l)


def width_flags(fit_widths) -> tuple:
    """``fit_widths`` (one bool, or 4 for age, [Fe/H], distance, A_V) as a tuple of 4."""
    if isinstance(fit_widths, bool):
        fit_widths = (fit_widths,) * 4
    fit_widths = tuple(bool(x) for x in fit_widths)
    if len(fit_widths) != 4:
        raise ValueError(f"fit_widths needs 4 flags (age, feh, distance, A_V), got {fit_widths}")
    return fit_widths


def curvature_diagonal(logdensity_fn, position):
    """The diagonal of the Hessian of ``logdensity_fn`` at ``position``, flattened (D,).

    Stars interact only through the population, so the Hessian has no star-star cross
    terms and its diagonal costs one Hessian-vector product per population coordinate
    plus one per *kind* of star coordinate (all stars at once): the diagonal of
    :func:`curvature_arrow`. Pure and jittable (and vmappable over clusters, see
    :func:`clusterhbm.parallel.fit_many`); in ``ravel_pytree`` order.
    """
    return _arrow_diagonal(*curvature_arrow(logdensity_fn, position))


def _arrow_diagonal(h_pp, h_ps, h_ss):
    """The flat (ravel-order) diagonal of an arrow-shaped Hessian: population, then each
    star key's N values."""
    del h_ps
    return jnp.concatenate([jnp.diag(h_pp), jnp.swapaxes(
        jnp.diagonal(h_ss, axis1=-2, axis2=-1), 0, 1).reshape(-1)])


def metric_from_curvature(diag, *, min_var: float = 1e-10, max_var: float = 1e2):
    """Variances 1 / (-H_ii) clipped to ``[min_var, max_var]``.

    Where the curvature is not negative (a flat or convex direction: a star started at a
    kink or an inflexion of its isochrone) or not finite, the variance is the median of
    the others (1 if there are none). A guess too small only slows that coordinate until
    the first metric window; one too large (1 was used before, against typical variances
    of 1e-8-1e-4) caps the step size of every coordinate: on a 500-star mock with one such
    star the first 100 warm-up steps had not finished after 8 min, against 108 s with
    this fallback (both on a shared 2-core machine).
    """
    ok = jnp.isfinite(diag) & (diag < 0)
    var = -1.0 / jnp.where(ok, diag, -1.0)
    fallback = jnp.nanmedian(jnp.where(ok, var, jnp.nan))
    fallback = jnp.where(jnp.any(ok), fallback, 1.0)
    return jnp.clip(jnp.where(ok, var, fallback), min_var, max_var)


def curvature_arrow(logdensity_fn, position):
    """The whole Hessian of a cluster's log density at ``position``, in arrow form.

    Stars interact only through the population, so the Hessian has a dense
    population-population block, population-star cross terms and, per star, a small block
    over that star's K coordinates, and nothing else. The same P + K Hessian-vector
    products as :func:`curvature_diagonal` give all of it: the product along population
    coordinate j is column j (every star's cross term with j), the product along all
    stars' coordinate k at once gives, star by star, column k of each star's own block.

    Returns
    -------
    h_pp : (P, P); h_ps : (P, K, N); h_ss : (N, K, K), population keys and star keys in
    sorted order (the order of ``jax.flatten_util.ravel_pytree``).
    """
    def safe(p):
        lp = logdensity_fn(p)
        return jnp.where(jnp.isfinite(lp), lp, 0.0)

    grad = jax.grad(safe)
    pop_keys, star_keys = sorted(position["pop"]), sorted(position["star"])
    for k in pop_keys:
        if jnp.ndim(position["pop"][k]) != 0:
            raise ValueError(f"population coordinate {k!r} is not a scalar")
    n_dir = len(pop_keys) + len(star_keys)
    tangents = {"pop": {k: jnp.zeros((n_dir,), jnp.result_type(position["pop"][k]))
                        .at[j].set(1.0) for j, k in enumerate(pop_keys)},
                "star": {k: jnp.zeros((n_dir,) + jnp.shape(position["star"][k]),
                                      jnp.result_type(position["star"][k]))
                         .at[len(pop_keys) + i].set(1.0) for i, k in enumerate(star_keys)}}
    hv = jax.vmap(lambda t: jax.jvp(grad, (position,), (t,))[1])(tangents)
    n_p = len(pop_keys)
    n_s = jnp.shape(position["star"][star_keys[0]])[0]
    dt = jnp.result_type(*jax.tree.leaves(position))
    h_pp = (jnp.stack([hv["pop"][k][:n_p] for k in pop_keys], axis=1) if n_p  # (P, P)
            else jnp.zeros((0, 0), dt))  # the unpooled model has no population
    h_ps = jnp.stack([hv["star"][k][:n_p] for k in star_keys], axis=1)  # (P, K, N)
    h_ps = h_ps.reshape(n_p, len(star_keys), n_s)
    h_ss = jnp.stack([jnp.stack([hv["star"][k][n_p + i] for i in range(len(star_keys))],
                                axis=-1) for k in star_keys], axis=-2)  # (N, K, K)
    return 0.5 * (h_pp + h_pp.T), h_ps, 0.5 * (h_ss + jnp.swapaxes(h_ss, -1, -2))


def laplace_inverse_metric(h_pp, h_ps, h_ss, fallback_var, *, min_var: float = 1e-10):
    """The dense covariance (-H)^-1 of an arrow-shaped Hessian, by the Schur complement.

    With A = -h_pp, B = -h_ps and D_i = -h_ss[i]: S = A - sum_i B_i D_i^-1 B_i^T is the
    population's precision, Cov(pop) = S^-1, Cov(pop, star i) = -S^-1 B_i D_i^-1 and
    Cov(star i, star j) = delta_ij D_i^-1 + D_i^-1 B_i^T S^-1 B_j D_j^-1: O(N P^2) work
    and a (D, D) result in ``ravel_pytree`` order (population, then each star key's N
    values). A star whose block is not positive definite (started at a kink or
    inflexion) is decoupled: its block becomes diag(1 / ``fallback_var``) over its
    coordinates, shape (K, N), and its cross terms zero.

    Returns
    -------
    (cov, ok) : (D, D) and a bool, False when S is not positive definite (then use a
    diagonal metric instead).
    """
    a = -h_pp
    d = -h_ss  # (N, K, K)
    n, k, _ = d.shape
    eig = jnp.linalg.eigvalsh(d)  # (N, K)
    good = jnp.all(eig > 0, axis=-1) & jnp.all(jnp.isfinite(d), axis=(-1, -2))
    eye = jnp.eye(k, dtype=d.dtype)
    d_fb = eye[None] / jnp.maximum(fallback_var.T[:, :, None], min_var)  # (N, K, K)
    d = jnp.where(good[:, None, None], d, d_fb)
    b = jnp.where(good[None, None, :], -h_ps, 0.0)  # (P, K, N)
    d_inv = jnp.linalg.inv(d)  # (N, K, K)
    w = jnp.einsum("pkn,nkl->pln", b, d_inv)  # B_i D_i^-1, (P, K, N)
    s = a - jnp.einsum("pkn,qkn->pq", w, b)
    s = 0.5 * (s + s.T)
    ok = jnp.all(jnp.linalg.eigvalsh(s) > 0) & jnp.all(jnp.isfinite(s))
    s_inv = jnp.linalg.inv(s)
    p = a.shape[0]
    w_flat = w.reshape(p, k * n)  # kind-major: star key 0's N values, then key 1's ...
    cov_pp = s_inv
    cov_ps = -s_inv @ w_flat
    block = jnp.zeros((k * n, k * n), d.dtype)
    idx = jnp.arange(n)
    for a_k in range(k):
        for b_k in range(k):
            block = block.at[a_k * n + idx, b_k * n + idx].set(d_inv[:, a_k, b_k])
    cov_ss = block + w_flat.T @ s_inv @ w_flat
    cov = jnp.block([[cov_pp, cov_ps], [cov_ps.T, cov_ss]])
    cov = 0.5 * (cov + cov.T)
    return cov, ok & jnp.all(jnp.isfinite(cov))


def laplace_metric(logdensity_fn, position, *, min_var: float = 1e-10):
    """The dense Laplace inverse metric at ``position`` (see :func:`curvature_arrow`,
    :func:`laplace_inverse_metric`), or None when the population's Schur complement is not
    positive definite there; one jitted program."""
    def run(pos):
        h_pp, h_ps, h_ss = curvature_arrow(logdensity_fn, pos)
        var = metric_from_curvature(_arrow_diagonal(h_pp, h_ps, h_ss), min_var=min_var)
        k, n = h_ps.shape[1], h_ps.shape[2]
        return laplace_inverse_metric(h_pp, h_ps, h_ss,
                                      var[h_pp.shape[0]:].reshape(k, n), min_var=min_var)

    cov, ok = jax.jit(run)(position)
    return cov if bool(ok) else None


def curvature_inverse_metric(logdensity_fn, position, *, min_var: float = 1e-10,
                             max_var: float = 1e2):
    """A diagonal inverse metric (D,) from the curvature of the log density at ``position``.

    See :func:`curvature_diagonal` (the Hessian diagonal from a handful of Hessian-vector
    products) and :func:`metric_from_curvature`. Flattened in the order of
    ``jax.flatten_util.ravel_pytree(position)``, as :func:`~clusterhbm.sampling.run_nuts`
    uses.
    """
    diag = jax.jit(lambda p: curvature_diagonal(logdensity_fn, p))(position)
    return metric_from_curvature(diag, min_var=min_var, max_var=max_var)


def derived_quantities(position, grid: ModelGrid, config: ModelConfig, priors: Priors,
                       data: StarData | None = None):
    """Per-draw values stored in the results: population (physical) and per star.

    With ``data`` and a mixture model, each star's membership probability (``p_member``)
    and binary probability given membership (``p_binary``) are included (Rao-Blackwellised:
    the component responsibilities at this draw), and the population gets ``n_members``,
    the expected number of members in the catalogue.
    """
    from .model import member_probabilities, population_state, star_terms

    popv = population_state(position["pop"], config, priors, grid)

    def per_star(star, data_i):
        eep, log_age, feh, dist, av, _ = star_values(star, popv, config, grid)
        obs = star_observables(grid, config, eep, log_age, feh, dist, av,
                               popv.get("iso_table"), popv.get("bc_slice"))
        p = obs.props
        out = {"eep": eep, "log_age": log_age, "feh": feh, "distance_pc": dist,
               "av_mag": av, "mass_msun": p.initial_mass, "teff_k": 10.0 ** p.log_teff,
               "logg": p.logg}
        if data_i is not None and (config.binaries or config.field):
            t = star_terms(star, popv, data_i, grid, config, priors)
            p_mem, p_bin = member_probabilities(t, config, popv)
            if config.field:
                out["p_member"] = p_mem
            if config.binaries:
                out["p_binary"] = p_bin
                out["q"] = t.q
        return out

    stars = jax.vmap(per_star)(position["star"], None if data is None else tuple(data))
    pop = {k: v for k, v in popv.items()
           if config.pooled and (k in ("log_age", "feh", "distance_pc", "av_mag")
                                 or (k in WIDTH_PARAMS and config.fit_widths[
                                     WIDTH_PARAMS.index(k)]))}
    if config.fit_parallax_zp:
        pop["parallax_zp_mas"] = popv["parallax_zp_mas"]
    for k in ("f_bin", "f_field", "mf_slope", "field_parallax_mas", "field_parallax_sd_mas"):
        if k in popv:
            pop[k] = popv[k]
    if "p_member" in stars:
        pop["n_members"] = jnp.sum(stars["p_member"])
    if config.selection and config.pooled:
        pop["p_detect"] = jnp.exp(popv["log_p_detect"])
    return {"pop": pop, "star": stars}


def fit_cluster(catalogue, *, num_chains: int = 4, num_warmup: int = 1000,
                num_samples: int = 1000, seed: int = 0, rng_key=None, pooled: bool = True,
                fit_widths=(True, True, True, True), cubic: bool = False,
                fit_parallax_zp: bool = False, imf: str = "kroupa",
                priors: Priors | None = None, init: dict | None = None,
                grid: ModelGrid | None = None, progress: bool = False, checkpoint=None,
                chunk_size: int = 100, max_num_doublings: int = 10,
                target_accept: float = 0.8, use_parallax: bool = True,
                dense_mass_matrix: bool | None = None, pseudo_mass_eps: float = 3e-3,
                truth: dict | None = None, optimise_steps: int = 300, n_starts: int = 5,
                binaries: bool = False, field: bool = False, selection: bool = False,
                g_lim: float | None = None, g_bright: float | None = None,
                fit_mf_slope: bool = False, member_prob_column: str | None = "member_prob",
                start_metric: str = "curvature", marginal: bool = False,
                marginal_options=None, colour_correction=None):
    """Fit the hierarchical model to a catalogue with BlackJAX NUTS.

    Parameters
    ----------
    catalogue : astropy Table (see :mod:`clusterhbm.catalogue`)
    num_chains, num_warmup, num_samples : sampler sizes
    seed / rng_key : randomness (``rng_key`` wins)
    pooled : False fits every star independently under broad priors (for shrinkage)
    fit_widths : bool or 4 bools (age, [Fe/H], distance, A_V)
    cubic, fit_parallax_zp, imf, priors : model options (see :class:`ModelConfig`,
        :class:`Priors`)
    init : optional dict of starting population values (physical units)
    progress : tqdm progress bar; checkpoint : path for chunked checkpoint/resume
    dense_mass_matrix : adapt a dense metric (default: when the dimension is <= 4000)
    pseudo_mass_eps : eps of the per-star coordinate m + eps * EEP (large: EEP-like)
    truth : optional dict of true population values (stored with the results)
    optimise_steps, n_starts : Adam steps from each of ``n_starts`` starts (the isochrone
        scan's guess and its neighbours in log age, :func:`start_candidates`); every chain
        starts, jittered, from the best optimum
    binaries : unresolved binaries (latent mass ratio per star, fitted ``f_bin``)
    field : field/outlier mixture component (fitted ``f_field``; per-star ``p_member``)
    selection : the member density is normalised by the detection probability within
        ``[g_bright, g_lim]`` (defaults: the catalogue's faintest G rounded up to 0.1 mag,
        and no bright limit); stars outside the limits are dropped (counted)
    fit_mf_slope : fit the power-law slope ``mf_slope`` of the mass function
    member_prob_column : catalogue column of prior membership probabilities used by the
        field mixture (ignored when absent)
    start_metric : "curvature" (default: the Hessian's diagonal at the optimum) or
        "laplace" (with a dense metric: the whole, arrow-shaped Hessian's inverse,
        :func:`laplace_metric`). Measured on the 100-star CI mock (2 x 400 draws): the
        Laplace covariance kept as the metric throughout gave bulk ESS 67-268 (the
        adapted curvature start 301-818), with 15-18 divergences per 100 warm-up steps:
        the posterior is not Gaussian enough for the curvature at one point
    marginal : sample the population only, every star's mass (and mass ratio) integrated
        out along the shared isochrone (:mod:`clusterhbm.marginal`); fitted widths are
        the Gaussian spread of the stars' offsets, integrated out too (to first order in
        them). The mixture model (binaries, field) mixes only this way; per-star masses,
        Teff, log g, membership and binary probabilities are drawn from each star's
        conditional at every draw
    marginal_options : :class:`clusterhbm.marginal.MarginalOptions` (q bins, pruning)
    colour_correction : ``"gaia-ms"`` or a JSON file: an empirical correction of the grid's
        Gaia BP and RP magnitudes (:func:`clusterhbm.grid.apply_colour_correction`; MIST's
        main sequence is too blue in BP-RP by 0.02-0.25 mag from 6800 to 3600 K), applied
        to ``grid``; recorded in the results' settings. Default: none

    Returns
    -------
    clusterhbm.results.FitResult
    """
    from .results import FitResult

    t_start = time.perf_counter()
    cc_info = None
    if colour_correction is not None:
        cc_table = (colour_correction if isinstance(colour_correction, dict)
                    else colour_correction_table(colour_correction))
        if grid is None and not isinstance(colour_correction, dict):
            grid = load_grid(colour_correction=colour_correction)  # cached
        else:
            grid = apply_colour_correction(load_grid() if grid is None else grid, cc_table)
        cc_info = {"name": cc_table.get("name", str(colour_correction)),
                   "source": None if isinstance(colour_correction, dict)
                   else str(colour_correction),
                   "sha256": cc_table.get("sha256"),
                   "calibrators": cc_table.get("calibrators")}
        log.info("colour correction %s applied to the grid's BP and RP (calibrated on %s)",
                 cc_info["name"], ", ".join(cc_info["calibrators"] or ["?"]))
    grid = load_grid() if grid is None else grid
    priors = Priors() if priors is None else priors
    fit_widths = width_flags(fit_widths)
    for name, v in (("num_chains", num_chains), ("num_samples", num_samples)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if start_metric not in ("curvature", "laplace"):
        raise ValueError(f"start_metric must be 'curvature' or 'laplace', got {start_metric!r}")
    if selection:
        if not pooled:
            raise ValueError("selection=True needs the pooled model")
        if g_lim is None:
            gcol = np.asarray(validate_catalogue(catalogue)["phot_g_mean_mag"], float)
            g_lim = float(np.ceil(np.nanmax(gcol) * 10.0 + 1e-9) / 10.0)
            log.info("selection: faint limit G = %.2f (the catalogue's faintest star)", g_lim)
        priors = priors._replace(g_lim=float(g_lim),
                                 g_bright=-5.0 if g_bright is None else float(g_bright))
    fd = prepare_data(catalogue, use_parallax=use_parallax,
                      g_lim=g_lim if selection else None,
                      g_bright=g_bright if selection else None,
                      member_prob_column=member_prob_column if field else None)
    if field:
        plx = np.asarray(fd.data.parallax_mas)
        ok = np.isfinite(plx)
        if ok.sum() >= 3:
            med = float(np.median(plx[ok]))
            priors = priors._replace(field_parallax_mean_mas=med)
    per_star_dim = (1 + sum(fit_widths) if pooled else 5) + int(binaries)
    n_dim = fd.data.mag.shape[0] * per_star_dim + 12
    if dense_mass_matrix is None:
        # the age-star coupling is nearly linear: a dense metric absorbs it (model.py)
        dense_mass_matrix = n_dim <= 4000
    band_idx = band_indices(fd.bands)
    config = ModelConfig(band_idx=band_idx, pooled=pooled, fit_widths=fit_widths,
                         cubic=cubic, fit_parallax_zp=fit_parallax_zp, imf=imf,
                         pseudo_mass_eps=pseudo_mass_eps, binaries=binaries, field=field,
                         selection=selection, fit_mf_slope=fit_mf_slope)
    key = jax.random.key(seed) if rng_key is None else rng_key
    k_init, k_run = jax.random.split(key)
    guess, eep0 = initial_guess(fd.data, grid, band_idx, init=init)
    guess.update({k: float(v) for k, v in (init or {}).items()
                  if k in ("f_bin", "f_field", "mf_slope", "field_parallax_mas",
                           "field_parallax_sd_mas")})
    if field:
        plx = np.asarray(fd.data.parallax_mas)
        ok = np.isfinite(plx)
        guess.setdefault("field_parallax_mas", priors.field_parallax_mean_mas)
        guess.setdefault("field_parallax_sd_mas", float(max(np.std(plx[ok]), 0.2))
                         if ok.sum() >= 3 else 1.0)
        guess.setdefault("f_field", 0.1)
    if binaries:
        guess.setdefault("f_bin", 0.3)
    if fit_mf_slope:
        guess.setdefault("mf_slope", priors.mf_slope_mean)
    if not pooled:
        priors = priors._replace(unpooled_distance_pc=guess["distance_pc"],
                                 unpooled_sigma_distance_pc=0.5 * guess["distance_pc"])
    if marginal:
        res = _fit_marginal(fd, grid, config, priors, guess, eep0, init=init,
                             opts=marginal_options, num_chains=num_chains,
                             num_warmup=num_warmup, num_samples=num_samples, seed=seed,
                             k_init=k_init, k_run=k_run, n_starts=n_starts,
                             optimise_steps=optimise_steps, chunk_size=chunk_size,
                             max_num_doublings=max_num_doublings,
                             target_accept=target_accept, progress=progress,
                             checkpoint=checkpoint, truth=truth, t_start=t_start,
                             n_catalogue=len(catalogue), use_parallax=use_parallax)
        res.settings["colour_correction"] = cc_info
        return res
    logdensity_fn = make_logdensity_fn(fd.data, grid, config, priors)
    # several starts -> optimise each -> the best, jittered, for all chains
    cands = start_candidates(fd.data, grid, band_idx, guess, eep0, init=init,
                             n_starts=n_starts if optimise_steps else 1)
    pos1, k_best, losses = best_of_starts(logdensity_fn, cands, config, grid, k_init,
                                          num_steps=optimise_steps)
    guess = cands[k_best][0]
    if losses is not None:
        log.info("optimised start: -log density %.1f", float(losses[k_best]))
    per_star = np.asarray(star_log_densities(pos1, fd.data, grid, config, priors))
    n_bad = int(np.sum(~np.isfinite(per_star)))
    if n_bad:
        log.warning("%d of %d stars start outside the grid (log density -inf)", n_bad,
                    per_star.size)
    imm0 = None
    if dense_mass_matrix and start_metric == "laplace":
        # the whole Hessian (arrow-shaped: stars couple only through the population) gives
        # the dense Laplace covariance, age-star coupling included, from the first step
        imm0 = laplace_metric(logdensity_fn, pos1)
        if imm0 is None:
            log.warning("the Laplace covariance at the start is not positive definite; "
                        "warm-up starts from the curvature's diagonal")
        else:
            v = np.diag(np.asarray(imm0))
            log.info("starting metric: the Laplace covariance at the optimum (variances "
                     "%.1e .. %.1e)", v.min(), v.max())
    if imm0 is None:
        imm0 = curvature_inverse_metric(logdensity_fn, pos1)
        log.info("starting metric from the curvature: variances %.1e .. %.1e",
                 float(imm0.min()), float(imm0.max()))
    keys = jax.random.split(k_init, num_chains)
    jit_scale = 1e-3
    inits = jax.vmap(lambda k: jax.tree.map(
        lambda x: x + jit_scale * jax.random.normal(k, jnp.shape(x)), pos1))(keys)
    t_init = time.perf_counter() - t_start

    def transform(p):
        return derived_quantities(p, grid, config, priors, fd.data)

    out = run_nuts(k_run, logdensity_fn, inits, num_warmup=num_warmup,
                           num_samples=num_samples, transform_fn=transform,
                           chunk_size=chunk_size, max_num_doublings=max_num_doublings,
                           target_accept=target_accept, progress=progress,
                           checkpoint=checkpoint, initial_inverse_mass_matrix=imm0,
                           diagonal_mass_matrix=not dense_mass_matrix)
    wall = time.perf_counter() - t_start
    settings = {
        "num_chains": num_chains, "num_warmup": num_warmup, "num_samples": num_samples,
        "seed": seed, "pooled": pooled, "fit_widths": list(fit_widths), "cubic": cubic,
        "fit_parallax_zp": fit_parallax_zp, "imf": imf, "bands": list(fd.bands),
        "gaia_release": fd.release, "max_num_doublings": max_num_doublings,
        "target_accept": target_accept, "use_parallax": use_parallax,
        "dense_mass_matrix": dense_mass_matrix, "pseudo_mass_eps": pseudo_mass_eps,
        "priors": {k: float(v) for k, v in priors._asdict().items()},
        "initial_guess": guess,
        "optimised_starts": {"n": len(cands), "best": k_best,
                             "neg_log_density": None if losses is None
                             else [float(x) for x in losses]},
        "pop_position_keys": list(pop_position_keys(config)),
        "binaries": binaries, "field": field, "selection": selection,
        "fit_mf_slope": fit_mf_slope, "g_lim": priors.g_lim if selection else None,
        "g_bright": priors.g_bright if selection else None,
        "field_photometry": fd.field_info if field else None,
        "n_catalogue": len(catalogue), "colour_correction": cc_info,
    }
    timings = dict(out.timings, init_s=t_init, wall_s=wall)
    return FitResult.from_sampler(out, source_id=fd.source_id, settings=settings,
                                  timings=timings, truth=truth)


def newton_best(logdensity_fn, position, *, max_iter: int = 30, tol: float = 1e-3,
                vg=None, hess=None):
    """Damped Newton (Levenberg-Marquardt) on -log density over a small, smooth position
    (the marginal model's ~10 population parameters): the exact Hessian (D
    Hessian-vector products) each step, (H + lam diag|H|) delta = -g, lam shrunk after a
    step that improves and grown after one that does not. Returns the best position;
    logs the gradient norm there. ``vg``, ``hess``: the loss's compiled value-and-gradient
    and Hessian in the ``ravel_pytree`` coordinates, if the caller has them (one compile
    for several calls)."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(position)

    def loss(x):
        v = logdensity_fn(unravel(x))
        return -jnp.where(jnp.isfinite(v), v, -1e30)

    vg = jax.jit(jax.value_and_grad(loss)) if vg is None else vg
    hess = jax.jit(jax.hessian(loss)) if hess is None else hess
    x = flat
    f, g = vg(x)
    f, g = float(f), np.asarray(g, float)
    l0 = f
    lam = 1e-3
    it = 0
    for it in range(max_iter):
        h = np.asarray(hess(x), float)
        if not np.all(np.isfinite(h)):
            break
        h = 0.5 * (h + h.T)
        d = np.abs(np.diag(h)) + 1e-12
        improved = False
        for _ in range(12):
            try:
                step = np.linalg.solve(h + lam * np.diag(d), -g)
            except np.linalg.LinAlgError:
                lam *= 4.0
                continue
            x_new = x + jnp.asarray(step, x.dtype)
            f_new, g_new = vg(x_new)
            f_new = float(f_new)
            if np.isfinite(f_new) and f_new < f:
                x, f, g = x_new, f_new, np.asarray(g_new, float)
                lam = max(lam / 3.0, 1e-6)
                improved = True
                break
            lam *= 4.0
        # Newton decrement (abs: the Hessian of the last step need not be definite)
        if not improved or float(np.sqrt(abs(g @ np.linalg.solve(h + 1e-6 * np.diag(d), g)))
                                 if np.all(np.isfinite(g)) else np.inf) < tol:
            break
    log.info("Newton: -log density %.2f -> %.2f in %d steps, |gradient| %.3g", l0, f,
             it + 1, float(np.linalg.norm(g)))
    return unravel(x)


def population_inverse_metric(logdensity_fn, position, *, min_var: float = 1e-10,
                              neg_hess=None):
    """Dense inverse metric for a population-only position: the inverse of -Hessian at
    ``position`` (flat, in ``ravel_pytree`` order), or its diagonal's inverse where it is
    not positive definite, or None. ``neg_hess``: the compiled Hessian of -log density
    in those coordinates, if the caller has it."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(position)
    if neg_hess is None:
        h = np.asarray(jax.jit(jax.hessian(lambda x: logdensity_fn(unravel(x))))(flat), float)
    else:
        h = -np.asarray(neg_hess(flat), float)
    if not np.all(np.isfinite(h)):
        return None
    neg = -0.5 * (h + h.T)
    try:
        np.linalg.cholesky(neg)
        cov = np.linalg.inv(neg)
    except np.linalg.LinAlgError:
        d = np.diag(neg)
        var = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), np.nan)
        var = np.where(np.isfinite(var), var, np.nanmedian(var) if np.any(np.isfinite(var))
                       else 1.0)
        cov = np.diag(var)
    cov = 0.5 * (cov + cov.T)
    cov[np.diag_indices_from(cov)] = np.maximum(np.diag(cov), min_var)
    return jnp.asarray(cov, flat.dtype)


def _with_widths(pos0, imm0, config, guess):
    """The zero-width start ``pos0`` (inverse metric ``imm0``, ``ravel_pytree`` order)
    extended by the widths of ``config`` at :func:`start_widths` (uncorrelated; variance 1
    in ln sigma, or the start width squared in a signed width)."""
    from .model import WIDTH_PARAMS, width_key, width_to_position

    start = start_widths(float(guess["distance_pc"]))
    pop, var = dict(pos0["pop"]), {}
    for name, on in zip(WIDTH_PARAMS, config.fit_widths):
        if on:
            key = width_key(name, config)
            pop[key] = width_to_position(start[name], config).astype(jnp.zeros(()).dtype)
            var[key] = start[name] ** 2 if config.signed_widths else 1.0
    keys0, keys = sorted(pos0["pop"]), sorted(pop)
    m = np.diag([var.get(k, 1.0) for k in keys])
    if imm0 is not None:
        idx = np.array([keys.index(k) for k in keys0])
        m[np.ix_(idx, idx)] = np.asarray(imm0, float)
    return {"pop": pop, "star": {}}, jnp.asarray(m, jnp.zeros(()).dtype)


def fd_hessian(vg, x, scale, rel_step: float = 1e-2):
    """Hessian of a loss at the flat position ``x`` by central differences of its compiled
    value-and-gradient ``vg`` (2 D gradients), the step in coordinate i ``rel_step *
    scale[i]``; symmetrised. For densities whose gradient has no forward mode (the
    marginal model with widths: its segment integral has a hand-written reverse rule)."""
    x = jnp.asarray(x)
    h = rel_step * np.asarray(scale, float)
    rows = []
    for i in range(x.shape[0]):
        e = np.zeros(x.shape[0])
        e[i] = h[i]
        e = jnp.asarray(e, x.dtype)
        rows.append((np.asarray(vg(x + e)[1], float) - np.asarray(vg(x - e)[1], float))
                    / (2.0 * h[i]))
    hm = np.array(rows)
    return 0.5 * (hm + hm.T)


def _marginal_loss(x, *, sel, data, grid, keys, config, priors, opts):
    """-log density of the marginal model at the flat position ``x`` (``ravel_pytree``
    order of ``{"pop": ...}``: sorted ``keys``) with fixed segments ``sel``; -inf -> 1e30."""
    from .marginal import log_density_marginal

    pop = {k: x[i] for i, k in enumerate(keys)}
    v = log_density_marginal(pop, data, grid, config, priors, opts, sel=sel)
    return -jnp.where(jnp.isfinite(v), v, -1e30)


# compiled once per model configuration, not once per set of segments
_MARGINAL_STATIC = ("keys", "config", "priors", "opts")
_marginal_vg = jax.jit(jax.value_and_grad(_marginal_loss), static_argnames=_MARGINAL_STATIC)
_marginal_hess = jax.jit(jax.hessian(_marginal_loss), static_argnames=_MARGINAL_STATIC)


def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _laplace_states(pos, imm, opts, seed):
    """The population ``pos["pop"]`` and ``opts.n_select_draws`` draws from its Laplace
    approximation (covariance ``imm``, ``ravel_pytree`` order) with the sds times
    ``opts.select_scale``: the states around which the fixed segments are chosen."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(pos)
    cov = np.asarray(imm, float)
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(cov.shape[0]))
    z = np.random.default_rng(seed).standard_normal((opts.n_select_draws, cov.shape[0]))
    draws = np.asarray(flat, float)[None] + opts.select_scale * z @ chol.T
    return [pos["pop"]] + [unravel(jnp.asarray(d, flat.dtype))["pop"] for d in draws]


def _width_states(pop, config, k: float = 2.0):
    """``pop`` with each mean moved by +-k of its fitted width (the stars' offsets reach
    there), in the unconstrained coordinates."""
    from .model import _AV_SCALE, width_from_position, width_key

    moves = {"log_age": "sigma_log_age", "feh": "sigma_feh",
             "ln_distance_pc": "sigma_distance_pc", "av_raw": "sigma_av_mag"}
    out = []
    for key, name in moves.items():
        wkey = width_key(name, config)
        if wkey not in pop:
            continue
        sig = width_from_position(pop[wkey], config)
        if key == "ln_distance_pc":
            step = sig / jnp.exp(pop[key])
        elif key == "av_raw":  # d A_V / d raw = sigmoid(raw / scale)
            step = sig / jax.nn.sigmoid(pop[key] / _AV_SCALE)
        else:
            step = sig
        out += [{**pop, key: pop[key] + f * k * step} for f in (-1.0, 1.0)]
    return out


def _fit_marginal(fd, grid, config, priors, guess, eep0, *, init, opts, num_chains,
                  num_warmup, num_samples, seed, k_init, k_run, n_starts, optimise_steps,
                  chunk_size, max_num_doublings, target_accept, progress, checkpoint,
                  truth, t_start, n_catalogue, use_parallax):
    """:func:`fit_cluster` with ``marginal=True`` (population-only NUTS)."""
    from .marginal import (
        MarginalOptions,
        check_config,
        log_density_marginal,
        make_marginal_logdensity_fn,
        select_segments,
        star_conditionals,
    )
    from .results import FitResult

    check_config(config)
    opts = MarginalOptions() if opts is None else opts
    # the start, the segment sets and the starting metric come from the zero-width model;
    # the widths (with the stars' offsets integrated out) join before the sampler
    config_w = config._replace(signed_widths=bool(opts.signed_widths))
    config = config._replace(fit_widths=(False,) * 4)
    # 1. optimise with the per-evaluation choice of each star's nearest blocks (rough at
    #    the 0.1-1 level where the choice changes: fine for Adam, not for NUTS)
    rough_fn = make_marginal_logdensity_fn(fd.data, grid, config, priors, opts)
    cands = start_candidates(fd.data, grid, config.band_idx, guess, eep0, init=init,
                             n_starts=n_starts if optimise_steps else 1)
    starts = [{"pop": pop_to_unconstrained(g, config), "star": {}} for g, _ in cands]
    if optimise_steps:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *starts)
        best, losses = optimise_starts(rough_fn, stacked, num_steps=optimise_steps)
        k_best = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
        pos1 = jax.tree.map(lambda x: x[k_best], best)
        log.info("marginal model: optimised from %d starts: -log density %s; best: start %d",
                 len(cands), np.round(losses, 1), k_best)
    else:
        pos1, k_best, losses = starts[0], 0, None
    # (the optimiser's loss at the best start, -inf mapped to 1e30; else one evaluation)
    start_lp = (-float(losses[k_best]) if losses is not None
                else float(jax.jit(rough_fn)(pos1)))
    if not (np.isfinite(start_lp) and start_lp > -1e29):
        raise ValueError("the marginal model's log density is -inf at the start (the "
                         "population is outside the grid or no star is near the isochrone)")
    # 2. fix every star's segments around the optimum (a smooth density), optimise that
    #    with BFGS (twice, re-fixing the segments around the new optimum), take the
    #    curvature there, and fix the segments again over draws from the inflated Laplace
    #    approximation
    steps = {"log_age": 0.02, "feh": 0.02, "ln_distance_pc": 0.005, "av_raw": 0.02}
    t_sel = time.perf_counter()

    def around(pos):
        states = [pos["pop"]] + [{**pos["pop"], k: pos["pop"][k] + f * h}
                                 for k, h in steps.items() for f in (-1.0, -0.5, 0.5, 1.0)]
        return select_segments(_stack(states), fd.data, grid, config, priors, opts,
                               n_segments=opts.n_segments)

    static = {"keys": tuple(sorted(pos1["pop"])), "config": config, "priors": priors,
              "opts": opts}
    for _ in range(2 if optimise_steps else 1):
        sel = around(pos1)
        smooth_fn = make_marginal_logdensity_fn(fd.data, grid, config, priors, opts, sel=sel)
        vg = partial(_marginal_vg, sel=sel, data=fd.data, grid=grid, **static)
        hess = partial(_marginal_hess, sel=sel, data=fd.data, grid=grid, **static)
        if optimise_steps:
            pos1 = newton_best(smooth_fn, pos1, vg=vg, hess=hess)
    imm0 = population_inverse_metric(smooth_fn, pos1, neg_hess=hess)
    if imm0 is not None:
        sel = select_segments(_stack(_laplace_states(pos1, imm0, opts, seed)), fd.data, grid,
                              config, priors, opts, n_segments=opts.n_segments)
    log.info("marginal model: %d segments per star fixed in %.1f s (of %d)",
             int(sel.shape[1]), time.perf_counter() - t_sel,
             (1 + (opts.n_q if config.binaries else 0)) * (grid.iso.eep.shape[0] - 1)
             * opts.refine)
    if any(config_w.fit_widths):
        config0 = config
        pos1, imm0 = _with_widths(pos1, imm0, config_w, guess)
        config = config_w
        # the widths' start and metric from their own mode: with the identity for the
        # log widths the first warm-up window of a 500-star mock ran at 140 leapfrog
        # steps per draw (step size 0.06, 9 divergences); and the segments chosen again
        # around that mode (the zero-width optimum's sets missed 0.5 of a star's log
        # density at the final draws)
        static = {"keys": tuple(sorted(pos1["pop"])), "config": config, "priors": priors,
                  "opts": opts}
        scale = np.sqrt(np.diag(np.asarray(imm0, float)))
        for rnd in range(2):
            vg = partial(_marginal_vg, sel=sel, data=fd.data, grid=grid, **static)

            def hess(x, vg=vg):
                return fd_hessian(vg, x, scale)

            smooth_fn = make_marginal_logdensity_fn(fd.data, grid, config, priors, opts,
                                                    sel=sel)
            pos1 = newton_best(smooth_fn, pos1, vg=vg, hess=hess)
            imm_w = population_inverse_metric(smooth_fn, pos1, neg_hess=hess)
            if imm_w is not None:
                imm0 = imm_w
            if rnd == 0:
                states = (_laplace_states(pos1, imm0, opts, seed)
                          + _width_states(pos1["pop"], config))
                zero_keys = set(pop_position_keys(config0))
                sel = select_segments(
                    _stack([{k: v for k, v in st.items() if k in zero_keys} for st in states]),
                    fd.data, grid, config0, priors, opts, n_segments=opts.n_segments)
        log.info("marginal model with widths: start %s",
                 {k: round(float(v), 4) for k, v in pos1["pop"].items()})
    logdensity_fn = make_marginal_logdensity_fn(fd.data, grid, config, priors, opts, sel=sel)
    keys = jax.random.split(k_init, num_chains)
    inits = jax.vmap(lambda k: jax.tree.map(
        lambda x: x + 1e-3 * jax.random.normal(k, jnp.shape(x)), pos1))(keys)
    t_init = time.perf_counter() - t_start

    def transform(p):
        return star_conditionals(p["pop"], fd.data, grid, config, priors, opts, sel=sel)

    out = run_nuts(k_run, logdensity_fn, inits, num_warmup=num_warmup,
                   num_samples=num_samples, transform_fn=transform, chunk_size=chunk_size,
                   max_num_doublings=max_num_doublings, target_accept=target_accept,
                   progress=progress, checkpoint=checkpoint,
                   initial_inverse_mass_matrix=imm0, diagonal_mass_matrix=False)
    # how much the fixed segments miss: per star, pruned minus every-segment log density
    # at a few posterior draws
    flat_draws = np.asarray(out.final_positions)
    from jax.flatten_util import ravel_pytree
    _, unravel = ravel_pytree(pos1)
    per_star_full = jax.jit(lambda p: log_density_marginal(
        p["pop"], fd.data, grid, config, priors, opts._replace(n_blocks=None), per_star=True))
    per_star_sel = jax.jit(lambda p: log_density_marginal(
        p["pop"], fd.data, grid, config, priors, opts, per_star=True, sel=sel))
    miss = []
    for row in flat_draws[:4]:
        p = unravel(jnp.asarray(row, jnp.zeros(()).dtype))
        miss.append(np.asarray(per_star_full(p) - per_star_sel(p)))
    miss = np.asarray(miss)
    pruning = {"max_per_star": float(np.max(np.abs(miss))),
               "max_total": float(np.max(np.abs(miss.sum(axis=1))))}
    log.info("marginal model: the fixed segments miss at most %.3g per star, %.3g in total "
             "(at %d final positions)", pruning["max_per_star"], pruning["max_total"],
             len(miss))
    if pruning["max_total"] > 0.5:
        log.warning("the fixed segments miss %.2f of the log density at the final "
                    "positions: raise MarginalOptions.n_segments", pruning["max_total"])
    wall = time.perf_counter() - t_start
    settings = {
        "num_chains": num_chains, "num_warmup": num_warmup, "num_samples": num_samples,
        "seed": seed, "pooled": True, "fit_widths": list(config.fit_widths),
        "marginal_pruning": pruning, "cubic": config.cubic,
        "fit_parallax_zp": config.fit_parallax_zp, "imf": config.imf,
        "bands": list(fd.bands), "gaia_release": fd.release,
        "max_num_doublings": max_num_doublings, "target_accept": target_accept,
        "use_parallax": use_parallax, "dense_mass_matrix": True, "marginal": True,
        "marginal_options": {k: v for k, v in opts._asdict().items()},
        "priors": {k: float(v) for k, v in priors._asdict().items()},
        "initial_guess": cands[k_best][0],
        "optimised_starts": {"n": len(cands), "best": k_best,
                             "neg_log_density": None if losses is None
                             else [float(x) for x in losses]},
        "pop_position_keys": list(pop_position_keys(config)),
        "binaries": config.binaries, "field": config.field, "selection": config.selection,
        "fit_mf_slope": config.fit_mf_slope,
        "g_lim": priors.g_lim if config.selection else None,
        "g_bright": priors.g_bright if config.selection else None,
        "field_photometry": fd.field_info if config.field else None,
        "n_catalogue": n_catalogue,
    }
    timings = dict(out.timings, init_s=t_init, wall_s=wall)
    return FitResult.from_sampler(out, source_id=fd.source_id, settings=settings,
                                  timings=timings, truth=truth)


def star_log_densities(position, data: StarData, grid: ModelGrid, config: ModelConfig,
                       priors: Priors):
    """Per-star log p(theta_i | phi) + log p(D_i | theta_i) at a position, shape (N,)."""
    from .model import log_density_star, population_state

    @jax.jit  # one compiled program, not hundreds of eagerly dispatched operations
    def per_star(position, data, grid):
        popv = population_state(position["pop"], config, priors, grid)
        return jax.vmap(log_density_star, in_axes=(0, None, 0, None, None, None))(
            position["star"], popv, data, grid, config, priors)

    return per_star(position, tuple(data), grid)
