"""The field/outlier component of the mixture: its photometric density and membership priors.

A catalogue of a cluster holds, besides single members and unresolved binaries, field
stars that passed the astrometric selection, blue stragglers, white dwarfs and stars in
phases the isochrone grid does not cover. The model gives each star a second, broad
explanation (:class:`clusterhbm.model.ModelConfig` ``field=True``):

    p(D_i | phi) = w_i p_member(D_i | phi) + (1 - w_i) p_field(D_i | phi)

The field density is a density over the same observed quantities as the member
likelihood (every available band and the parallax), so the two are comparable:

* photometry (this module, fixed before sampling): with G the reference band and
  c = BP - RP the reference colour, p(G) is uniform over the catalogue's G range (padded
  by ``pad_mag``), p(c) uniform over its colour range (padded by ``pad_colour``), and
  every other band b follows the stellar locus, (b - G) ~ Normal(poly_b(c), s_b^2 +
  err_b^2 + err_G^2), with poly_b a cubic in c fitted to the catalogue with iterative
  3-sigma clipping and s_b the clipped scatter. The map (G, BP, RP, ...) -> (G, c,
  RP - G, ...) has unit Jacobian. Missing bands drop out (a star without BP or RP gets
  only the uniform G term, matching its member likelihood).
* parallax (in the model, fitted): Normal(field_parallax_mas, field_parallax_sd_mas^2 +
  err^2).

The locus term keeps the field from "explaining" any star with impossible colours; the
uniform terms let blue stragglers, white dwarfs and field giants sit anywhere in the CMD.
The uniform density is estimated from all stars, members included: it is a deliberately
broad outlier model, not a model of the Galaxy (as in BASE-9's field component).

Membership priors: :func:`member_log_odds` turns the Gaia module's first-pass astrometric
membership probability (column ``member_prob``) into prior log odds that are added to the
population's log odds log((1 - f_field) / f_field) for that star (0.5 is neutral).
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["FieldPhotometry", "field_photometry_log_density", "member_log_odds"]

log = logging.getLogger(__name__)

_LOG_2PI = 1.8378770664093453


class FieldPhotometry(dict):
    """What :func:`field_photometry_log_density` fitted (JSON-friendly dict)."""


def _fit_locus(c, y, deg=3, n_iter=5):
    ok = np.isfinite(c) & np.isfinite(y)
    if ok.sum() < deg + 5:
        return None, None
    keep = ok.copy()
    for _ in range(n_iter):
        coef = np.polyfit(c[keep], y[keep], deg)
        r = y - np.polyval(coef, c)
        s = 1.4826 * np.median(np.abs(r[keep] - np.median(r[keep])))
        s = max(float(s), 1e-3)
        new = ok & (np.abs(r) < 3 * s)
        if np.array_equal(new, keep):
            break
        keep = new
    return coef, s


def field_photometry_log_density(mag, mag_err, *, pad_mag: float = 0.5,
                                 pad_colour: float = 0.2):
    """Per-star log density of the photometry under the field component.

    Parameters
    ----------
    mag, mag_err : (N, B) arrays [mag]; band 0 is G, bands 1 and 2 are BP and RP (the
        order of :func:`clusterhbm.fit.prepare_data`); NaN = missing
    pad_mag, pad_colour : padding of the uniform ranges [mag]

    Returns
    -------
    log_density : (N,) array
    info : :class:`FieldPhotometry` with the ranges, locus coefficients and scatters
    """
    mag = np.asarray(mag, float)
    err = np.asarray(mag_err, float)
    if mag.ndim != 2 or mag.shape[1] < 1 or mag.shape != err.shape:
        raise ValueError(f"mag and mag_err must both be (N, B) with B >= 1; got {mag.shape} "
                         f"and {err.shape}")
    g = mag[:, 0]
    if not np.any(np.isfinite(g)):
        raise ValueError("field density: no star has a finite G magnitude (column 0)")
    g_lo, g_hi = np.nanmin(g) - pad_mag, np.nanmax(g) + pad_mag
    out = np.full(g.shape, -np.log(g_hi - g_lo))
    info = FieldPhotometry(g_range=[float(g_lo), float(g_hi)])
    if mag.shape[1] >= 3:
        c = mag[:, 1] - mag[:, 2]
        has_c = np.isfinite(c)
        if has_c.sum() >= 2:
            c_lo, c_hi = np.nanmin(c) - pad_colour, np.nanmax(c) + pad_colour
            out += np.where(has_c, -np.log(c_hi - c_lo), 0.0)
            info["colour_range"] = [float(c_lo), float(c_hi)]
            info["locus"] = {}
            for b in range(2, mag.shape[1]):  # RP and any extra band against G, vs c
                y = mag[:, b] - g
                coef, s = _fit_locus(c, y)
                if coef is None:
                    continue
                var = s ** 2 + np.nan_to_num(err[:, b]) ** 2 + np.nan_to_num(err[:, 0]) ** 2
                r = y - np.polyval(coef, c)
                term = -0.5 * (r ** 2 / var + np.log(var) + _LOG_2PI)
                out += np.where(has_c & np.isfinite(y), term, 0.0)
                info["locus"][int(b)] = {"coef": [float(x) for x in coef], "scatter": s}
    else:
        log.info("field density: fewer than 3 bands, G only")
    return out, info


def member_log_odds(member_prob, *, floor: float = 1e-3):
    """Prior log odds of membership from a probability column (NaN -> 0, neutral).

    Probabilities are clipped to ``[floor, 1 - floor]`` so that no astrometric prior can
    overrule the photometry completely.
    """
    p = np.asarray(member_prob, float)
    bad = ~np.isfinite(p)
    if np.any((p[~bad] < 0) | (p[~bad] > 1)):
        raise ValueError("member_prob must lie in [0, 1]")
    p = np.clip(np.where(bad, 0.5, p), floor, 1.0 - floor)
    if bad.any():
        log.info("member_log_odds: %d stars without a membership probability (neutral prior)",
                 int(bad.sum()))
    return np.log(p) - np.log1p(-p)
