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

__all__ = ["STYLE", "isochrone_curve", "plot_cmd", "save_figure"]

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
        "color":..., "alpha":..., "lw":...}`` drawn as a line (e.g. posterior draws).
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
            x, y, _ = isochrone_curve(**kw)
            ax.plot(x, y, color=color, alpha=alpha, lw=lw, label=label)
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
