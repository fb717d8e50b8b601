"""Figures (matplotlib): CMDs, corner plots, shrinkage, parallax, diagnostics.

Every function returns a :class:`matplotlib.figure.Figure` and never calls ``plt.show``;
:func:`save_figure` writes PNG and PDF. Sizes suit a paper column (3.5 in) or page (7 in).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["STYLE", "isochrone_curve", "plot_cmd", "plot_corner", "plot_parallax",
           "plot_shrinkage", "plot_trace", "plot_truth", "posterior_isochrones", "save_figure"]

STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 8,
    "legend.fontsize": 6.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "xtick.direction": "in",
    "ytick.direction": "in",
    "xtick.top": True,
    "ytick.right": True,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
}


def save_figure(fig, path_stem, *, formats=("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path_stem.png`` and ``path_stem.pdf``; return the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = stem.with_suffix(f".{fmt}")
        fig.savefig(p)
        out.append(p)
    return out


def isochrone_curve(*, log_age, feh, distance_pc, av_mag, bands=("G", "BP", "RP"),
                    n=800, grid=None):
    """Apparent (BP-RP, G) of one isochrone, EEP 1..707 (invalid points dropped)."""
    from .grid import load_grid
    from .prediction import predict

    grid = load_grid() if grid is None else grid
    eep = np.linspace(float(grid.iso.eep[0]), float(grid.iso.eep[-1]), n)
    r = predict(eep=eep, log_age=log_age, feh=feh, distance_pc=distance_pc, av_mag=av_mag,
                bands=bands, grid=grid)
    ok = r["valid"]
    return r[bands[1]][ok] - r[bands[2]][ok], r[bands[0]][ok], r["phase"][ok]


def plot_cmd(catalogue, *, truth=None, member_prob=None, binary_prob=None,
             isochrones=(), title=None, ax=None, figsize=(3.5, 4.2)):
    """Colour-magnitude diagram, G vs BP-RP, with the G axis inverted.

    Parameters
    ----------
    catalogue : astropy Table with ``phot_{g,bp,rp}_mean_mag``
    truth : Table, optional
        A mock's truth (``is_field``, ``is_binary``): stars are marked by kind.
    member_prob, binary_prob : (n,) arrays, optional
        Posterior membership / binary probabilities: colour and marker edges.
    isochrones : sequence of dicts, optional
        Each ``{"log_age":..., "feh":..., "distance_pc":..., "av_mag":..., "label":...,
        "color":..., "alpha":..., "lw":..., "ls":...}`` drawn as a line (e.g. posterior
        draws).
    """
    with plt.rc_context(STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=figsize)
        else:
            fig = ax.figure
        g = np.asarray(catalogue["phot_g_mean_mag"], float)
        c = np.asarray(catalogue["phot_bp_mean_mag"], float) - np.asarray(
            catalogue["phot_rp_mean_mag"], float)
        ok = np.isfinite(g) & np.isfinite(c)
        if truth is not None:
            fld = np.asarray(truth["is_field"], bool)
            binr = np.asarray(truth["is_binary"], bool) & ~fld
            single = ~fld & ~binr
            ax.scatter(c[single & ok], g[single & ok], s=3, c="k", lw=0,
                       label=f"single members ({np.sum(single & ok)})")
            ax.scatter(c[binr & ok], g[binr & ok], s=4, c="tab:blue", lw=0,
                       label=f"binaries ({np.sum(binr & ok)})")
            ax.scatter(c[fld & ok], g[fld & ok], s=5, c="tab:orange", marker="x", lw=0.5,
                       label=f"field ({np.sum(fld & ok)})")
        elif member_prob is not None:
            p = np.asarray(member_prob, float)
            order = np.argsort(p[ok])
            sc = ax.scatter(c[ok][order], g[ok][order], s=4, c=p[ok][order], cmap="viridis",
                            vmin=0, vmax=1, lw=0)
            cb = fig.colorbar(sc, ax=ax, pad=0.02, fraction=0.05)
            cb.set_label("membership probability")
            if binary_prob is not None:
                b = np.asarray(binary_prob, float)
                sel = ok & (b > 0.5) & (p > 0.5)
                ax.scatter(c[sel], g[sel], s=14, facecolors="none", edgecolors="tab:red",
                           lw=0.4, label=f"P(binary) > 0.5 ({np.sum(sel)})")
        else:
            ax.scatter(c[ok], g[ok], s=3, c="k", lw=0, label=f"stars ({np.sum(ok)})")
        for iso in isochrones:
            kw = dict(iso)
            label = kw.pop("label", None)
            color = kw.pop("color", "tab:red")
            alpha = kw.pop("alpha", 1.0)
            lw = kw.pop("lw", 1.0)
            ls = kw.pop("ls", "-")
            x, y, _ = isochrone_curve(**kw)
            ax.plot(x, y, color=color, alpha=alpha, lw=lw, ls=ls, label=label)
        if np.any(ok):
            ax.set_xlim(np.nanmin(c[ok]) - 0.1, np.nanmax(c[ok]) + 0.1)
            ax.set_ylim(np.nanmax(g[ok]) + 0.3, np.nanmin(g[ok]) - 0.5)
        else:
            ax.invert_yaxis()
        ax.set_xlabel(r"$G_{\rm BP} - G_{\rm RP}$ [mag]")
        ax.set_ylabel(r"$G$ [mag]")
        if title:
            ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", frameon=False, markerscale=2)
        return fig


_LABELS = {"log_age": r"$\log_{10}(\mathrm{age/yr})$", "feh": "[Fe/H]",
           "distance_pc": "distance [pc]", "av_mag": r"$A_V$ [mag]",
           "sigma_log_age": r"$\sigma_{\log\,\mathrm{age}}$", "sigma_feh": r"$\sigma_{\rm [Fe/H]}$",
           "sigma_distance_pc": r"$\sigma_d$ [pc]", "sigma_av_mag": r"$\sigma_{A_V}$",
           "parallax_zp_mas": "parallax zp [mas]", "f_bin": r"$f_{\rm bin}$",
           "f_field": r"$f_{\rm field}$", "mf_slope": r"MF slope $\alpha$"}


def plot_corner(result, *, names=None, figsize=(7.0, 7.0)):
    """Corner plot of the population parameters (1-D histograms, 2-D 68/95% contours);
    the truth, when the result has one, as lines."""
    from .results import SUMMARY_ORDER

    pop = result.population
    if names is None:
        names = [n for n in SUMMARY_ORDER if n in pop] + [n for n in pop
                                                          if n not in SUMMARY_ORDER]
    names = [n for n in names if n in pop]
    k = len(names)
    # float64: the draws of a stuck chain span less than float32's resolution at their
    # value (log age 9.5494 +- 1e-5), where numpy cannot make 30 distinct bins
    x = {n: np.asarray(pop[n], np.float64).ravel() for n in names}
    truth = result.truth or {}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(k, k, figsize=figsize, squeeze=False)
        for i, ni in enumerate(names):
            for j, nj in enumerate(names):
                ax = axes[i, j]
                if j > i:
                    ax.set_visible(False)
                    continue
                if i == j:
                    nb = int(min(30, max(1, np.unique(x[ni]).size)))
                    ax.hist(x[ni], bins=nb, histtype="step", color="k", density=True)
                    ax.set_yticks([])
                    if ni in truth:
                        ax.axvline(truth[ni], color="tab:red", lw=0.8)
                    q = np.percentile(x[ni], [16, 50, 84])
                    ax.set_title(f"{q[1]:.4g}$^{{+{q[2] - q[1]:.2g}}}_{{-{q[1] - q[0]:.2g}}}$",
                                 fontsize=6.5)
                else:
                    _contour(ax, x[nj], x[ni])
                    if nj in truth:
                        ax.axvline(truth[nj], color="tab:red", lw=0.6)
                    if ni in truth:
                        ax.axhline(truth[ni], color="tab:red", lw=0.6)
                if i == k - 1:
                    ax.set_xlabel(_LABELS.get(nj, nj))
                else:
                    ax.set_xticklabels([])
                if j == 0 and i > 0:
                    ax.set_ylabel(_LABELS.get(ni, ni))
                elif j > 0:
                    ax.set_yticklabels([])
                ax.tick_params(labelsize=5.5)
        fig.subplots_adjust(wspace=0.05, hspace=0.05)
        return fig


def _contour(ax, x, y):
    h, xe, ye = np.histogram2d(x, y, bins=25)
    hs = np.sort(h.ravel())[::-1]
    cum = np.cumsum(hs) / hs.sum()
    levels = sorted({hs[np.searchsorted(cum, p)] for p in (0.95, 0.68)})
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    ax.plot(x[:: max(1, x.size // 2000)], y[:: max(1, y.size // 2000)], ",", color="0.6")
    if len(levels) >= 1 and hs[0] > 0:
        ax.contour(xc, yc, h.T, levels=levels + [hs[0] + 1], colors="k", linewidths=0.6)


def plot_shrinkage(pooled, unpooled, *, quantity="mass_msun", truth=None, g_mag=None,
                   figsize=(3.5, 3.2)):
    """Per-star 68% intervals of ``quantity``: unpooled (each star alone) vs pooled
    (hierarchical), against G magnitude; the ratio of widths is the shrinkage."""
    p = np.asarray(pooled.stars[quantity]).reshape(-1, pooled.stars[quantity].shape[-1])
    u = np.asarray(unpooled.stars[quantity]).reshape(-1, unpooled.stars[quantity].shape[-1])
    qp = np.percentile(p, [16, 50, 84], axis=0)
    qu = np.percentile(u, [16, 50, 84], axis=0)
    x = np.arange(p.shape[1]) if g_mag is None else np.asarray(g_mag)
    with plt.rc_context(STYLE):
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=figsize, sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
        ax.errorbar(x + 0.03, qu[1], yerr=[qu[1] - qu[0], qu[2] - qu[1]], fmt=".", ms=2,
                    lw=0.5, color="0.6", label="unpooled")
        ax.errorbar(x - 0.03, qp[1], yerr=[qp[1] - qp[0], qp[2] - qp[1]], fmt=".", ms=2,
                    lw=0.5, color="tab:blue", label="pooled (HBM)")
        if truth is not None:
            ax.plot(x, truth, "x", ms=3, color="tab:red", label="truth")
        ax.set_ylabel("initial mass [M$_\\odot$]" if quantity == "mass_msun" else quantity)
        ax.legend(frameon=False)
        ratio = (qp[2] - qp[0]) / np.maximum(qu[2] - qu[0], 1e-12)
        ax2.plot(x, ratio, ".", ms=2, color="k")
        ax2.axhline(1, color="0.6", lw=0.5)
        ax2.set_ylabel("width ratio")
        ax2.set_xlabel("G [mag]" if g_mag is not None else "star")
        ax2.set_title(f"median width ratio pooled/unpooled: {np.median(ratio):.2f}",
                      fontsize=7)
        return fig


def plot_parallax(catalogue, result=None, *, figsize=(3.5, 2.6)):
    """Parallax vs G with the fitted cluster distance (median and 90% band)."""
    g = np.asarray(catalogue["phot_g_mean_mag"], float)
    plx = np.asarray(catalogue["parallax"], float)
    err = np.asarray(catalogue["parallax_error"], float)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=figsize)
        ax.errorbar(g, plx, yerr=err, fmt=".", ms=2, lw=0.3, color="k", alpha=0.6)
        if result is not None and "distance_pc" in result.population:
            p = 1000.0 / np.asarray(result.population["distance_pc"]).ravel()
            zp = np.asarray(result.population.get("parallax_zp_mas", 0.0)).ravel()
            p = p + (zp if np.size(zp) == p.size else 0.0)
            lo, med, hi = np.percentile(p, [5, 50, 95])
            ax.axhspan(lo, hi, color="tab:blue", alpha=0.3, lw=0)
            ax.axhline(med, color="tab:blue", lw=0.8,
                       label=f"cluster: {1000 / med:.0f} pc")
            ax.legend(frameon=False)
        ax.set_xlabel("G [mag]")
        ax.set_ylabel("parallax [mas]")
        return fig


def plot_trace(result, *, names=None, figsize=(7.0, 4.0)):
    """Trace (left) and rank histograms (right) per population parameter and chain."""
    pop = result.population
    names = [n for n in (names or pop) if n in pop]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(names), 2, figsize=(figsize[0], 0.9 * len(names) + 0.5),
                                 squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
        for i, n in enumerate(names):
            x = np.asarray(pop[n])
            ranks = np.argsort(np.argsort(x.ravel())).reshape(x.shape)
            for c in range(x.shape[0]):
                axes[i, 0].plot(x[c], lw=0.4)
                axes[i, 1].hist(ranks[c], bins=20, histtype="step", lw=0.6)
            axes[i, 0].set_ylabel(_LABELS.get(n, n), fontsize=6)
            axes[i, 1].set_yticks([])
        axes[-1, 0].set_xlabel("draw")
        axes[-1, 1].set_xlabel("rank")
        return fig


def posterior_isochrones(result, *, n_draws=20, seed=0):
    """Isochrone specs (for :func:`plot_cmd`) from population posterior draws + median.

    A fit made with a colour correction (``settings["colour_correction"]``) draws its
    isochrones through the same corrected grid."""
    pop = result.population
    extra = {}
    cc = (result.settings or {}).get("colour_correction")
    if cc:
        from .grid import COLOUR_CORRECTIONS, colour_correction_table, load_grid

        source = cc.get("source") or (cc.get("name") if cc.get("name") in COLOUR_CORRECTIONS
                                      else None)
        if not source:
            raise ValueError("the fit's colour correction was given as a table, not a name "
                             "or file: draw its isochrones with that grid (isochrone_curve)")
        if colour_correction_table(source)["sha256"] != cc.get("sha256"):
            raise ValueError(f"colour correction {source!r} differs from the one the fit "
                             "used (checksum)")
        extra["grid"] = load_grid(colour_correction=source)
    keys = ("log_age", "feh", "distance_pc", "av_mag")
    flat = {k: np.asarray(pop[k]).ravel() for k in keys}
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat["log_age"].size, size=min(n_draws, flat["log_age"].size),
                     replace=False)
    out = [dict({k: float(flat[k][i]) for k in keys}, color="tab:red", alpha=0.15, lw=0.5,
                **extra) for i in idx]
    med = {k: float(np.median(flat[k])) for k in keys}
    out.append(dict(med, color="tab:red", lw=1.0, label="posterior median", **extra))
    return out


def plot_truth(result, *, star_truth=None, quantity="mass_msun", figsize=(7.0, 2.8)):
    """Posterior against truth for a mock.

    Left: for each population parameter with a true value, (posterior - truth) / sd as the
    median and 68%/95% intervals (a calibrated fit scatters within +-2). Right (when
    ``star_truth``, an array (N,) of true per-star values of ``quantity``, is given): each
    star's posterior median and 68% interval against its true value.
    """
    from .results import SUMMARY_ORDER

    truth = result.truth or {}
    names = [k for k in SUMMARY_ORDER if k in result.population and k in truth]
    with plt.rc_context(STYLE):
        ncol = 2 if star_truth is not None else 1
        fig, axes = plt.subplots(1, ncol, figsize=figsize if ncol == 2 else (3.5, 2.8),
                                 squeeze=False)
        ax = axes[0, 0]
        for i, k in enumerate(names):
            x = np.asarray(result.population[k], float).ravel()
            sd = np.std(x) if np.std(x) > 0 else 1.0
            z = (x - truth[k]) / sd
            q = np.percentile(z, [2.5, 16, 50, 84, 97.5])
            ax.plot([q[0], q[4]], [i, i], color="0.6", lw=0.8)
            ax.plot([q[1], q[3]], [i, i], color="k", lw=2)
            ax.plot(q[2], i, "o", color="tab:red", ms=3)
        ax.axvline(0, color="tab:blue", lw=0.8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_LABELS.get(k, k) for k in names])
        ax.set_xlabel("(posterior - truth) / posterior sd")
        ax.invert_yaxis()
        if star_truth is not None:
            ax = axes[0, 1]
            draws = np.asarray(result.stars[quantity]).reshape(
                -1, result.stars[quantity].shape[-1])
            q = np.percentile(draws, [16, 50, 84], axis=0)
            t = np.asarray(star_truth, float)
            ax.errorbar(t, q[1], yerr=[q[1] - q[0], q[2] - q[1]], fmt=".", ms=2, lw=0.5,
                        color="k", alpha=0.6)
            lim = [np.nanmin(t), np.nanmax(t)]
            ax.plot(lim, lim, color="tab:red", lw=0.8)
            ax.set_xlabel(f"true {quantity}")
            ax.set_ylabel(f"posterior {quantity}")
        fig.tight_layout()
        return fig
