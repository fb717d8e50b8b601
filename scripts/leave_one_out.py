"""Leave-one-out accuracy of the isochrone interpolation (linear and cubic), in mmag.

For each dropped node -- log10 age 7.0, 8.0, 9.0, 9.6, 10.0 (evaluated at every [Fe/H]
node) and, separately, [Fe/H] -1.0, -0.5, 0.0, +0.25 (evaluated at every log-age node) --
the isochrone at that node is interpolated from a sub-grid made of every other node along
that axis (log-age step 0.1 instead of 0.05, or [Fe/H] step 0.5 instead of 0.25; the other
axes are untouched, so the dropped node sits at the midpoint of a sub-grid cell, the
worst place) and compared with the tabulated isochrone, row by row:

* at fixed EEP: ``observables_from_eep(sub_grid, eep_row, ...)``;
* at fixed initial mass: ``observables_from_mass(sub_grid, initial_mass_row, ...)``;

against the tabulated row's (log Teff, log g, log L) put through the same bolometric
corrections (same scheme, A_V = 0, 10 pc), so only the isochrone interpolation error is
measured. Reported: median and 95th percentile of |Delta G| and |Delta (BP - RP)| [mmag] over
the rows of each region (every tabulated EEP row counts once; rows where the sub-grid
interpolation is invalid are left out and counted). Regions, from the tabulated row's EEP
and MIST phase code:

* ``PMS``: phase -1;
* ``MS``: phase 0 and EEP < 400 (ZAMS at EEP 202 up to well before the turnoff);
* ``TO/SGB``: 400 <= EEP < 500, phase 0 or 2 (turnoff, hook, TAMS at EEP 454, subgiants);
* ``RGB``: phase 2 and EEP >= 500 (up to the tip at EEP 605);
* ``CHeB``: phase 3 (EEP 605..707).

At fixed initial mass, errors on the RGB and in core-He burning (and near the turnoff for
the [Fe/H] drop) are dominated by ill-conditioning, not by the shape of the interpolated
isochrone: initial mass hardly changes along those phases (in CHeB by ~1e-5 Msun over tens
of EEPs), so a 1e-3 Msun interpolation error in mass moves the star far along the phase.

The sub-grid spacing is twice the real one, so these are upper bounds on the real grid's
interpolation error. The columns marked ``/4`` divide by 4, the h^2 scaling of linear
interpolation in smooth regions, as an estimate for the real grid (for cubic in smooth
regions the error falls faster, so /4 is conservative there; near the turnoff hook and other
kinks neither scaling holds). The ``order check`` table tests this: the same experiment with
a sub-grid of every fourth node (4x the real spacing, where the node is still a cell
midpoint) and the ratio median(4h) / median(2h) (4 for h^2, 8 for h^3).

Runs in float64 (``jax_enable_x64`` is switched on in this script only). Writes
``benchmarks/results/leave_one_out.json`` and prints the tables.

Rerun (from the repository root; a few minutes on 2 CPU cores)::

    python scripts/leave_one_out.py            # summary + order check
    python scripts/leave_one_out.py -v         # also one table per dropped node
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

REGIONS = ("PMS", "MS", "TO/SGB", "RGB", "CHeB")
DEFAULT_AGES = (7.0, 8.0, 9.0, 9.6, 10.0)
DEFAULT_FEHS = (-1.0, -0.5, 0.0, 0.25)
BANDS = ("G", "BP", "RP")
SCALE_NOTE = ("Errors measured at 2x the real node spacing (every other node): an upper bound "
              "on the real grid's interpolation error. '/4' = raw / 4, the h^2 scaling of "
              "linear interpolation in smooth regions, an estimate for the real grid.")


def region_masks(eep, phase):
    """Boolean masks of the regions (see module docstring), keyed by region name."""
    import numpy as np

    return {
        "PMS": phase == -1,
        "MS": (phase == 0) & (eep < 400),
        "TO/SGB": (eep >= 400) & (eep < 500) & np.isin(phase, (0, 2)),
        "RGB": (phase == 2) & (eep >= 500),
        "CHeB": phase == 3,
    }


def read_raw():
    """Raw isochrone table (NaN outside each isochrone) and its axes, float64."""
    import h5py
    import numpy as np

    from clusterhbm.grid import default_grid_path

    with h5py.File(default_grid_path(), "r") as h:
        g = h["isochrones"]
        return (np.asarray(g["feh"][:], np.float64), np.asarray(g["log_age"][:], np.float64),
                np.asarray(g["eep"][:], np.float64), np.asarray(g["data"][:], np.float64))


def sub_grid(full_iso, raw_data, axis: int, index: int, stride: int):
    """Sub-grid of every ``stride``-th node along ``axis`` that has node ``index`` at a
    cell midpoint (``stride`` 2 or 4), or None if that node is not inside it.

    Padding and first/last rows are recomputed from the raw NaN table with
    ``clusterhbm.grid._pad_isochrones``, exactly as ``load_grid`` does.
    """
    import jax.numpy as jnp
    import numpy as np

    from clusterhbm.grid import _pad_isochrones

    half = stride // 2
    n = raw_data.shape[axis]
    if index - half < 0 or index + half > n - 1:
        return None
    start = (index + half) % stride
    sl = [slice(None)] * 4
    sl[axis] = slice(start, None, stride)
    padded, first, last = _pad_isochrones(raw_data[tuple(sl)])
    nodes = np.asarray([full_iso.feh, full_iso.log_age][axis])[start::stride]
    kw = {("feh", "log_age")[axis]: jnp.asarray(nodes)}
    return full_iso._replace(data=jnp.asarray(padded), first=jnp.asarray(first),
                             last=jnp.asarray(last), **kw)


def make_evaluators(band_idx):
    """Jitted (grid-as-argument) functions: truth, at fixed EEP, at fixed initial mass."""
    import jax
    import jax.numpy as jnp

    from clusterhbm.grid import ModelGrid
    from clusterhbm.isochrone import StarProperties
    from clusterhbm.photometry import observables_from_eep, observables_from_mass, photometry

    fns = {}
    for cubic in (False, True):
        def truth(bc, log_teff, logg, logl, feh, cubic=cubic):
            z = jnp.zeros_like(log_teff)
            props = StarProperties(initial_mass=z, star_mass=z, log_teff=log_teff, logg=logg,
                                   logl=logl, phase=z.astype(jnp.int32), eep=z,
                                   valid=jnp.ones((), bool))
            obs = photometry(bc, props, feh, 10.0, 0.0, band_idx, cubic=cubic)
            return obs.mags, obs.valid

        def by_eep(iso, bc, eep, log_age, feh, cubic=cubic):
            obs = observables_from_eep(ModelGrid(iso, bc), eep, log_age, feh, 10.0, 0.0,
                                       band_idx, cubic=cubic)
            return obs.mags, obs.valid

        def by_mass(iso, bc, mass, log_age, feh, cubic=cubic):
            obs = observables_from_mass(ModelGrid(iso, bc), mass, log_age, feh, 10.0, 0.0,
                                        band_idx, cubic=cubic)
            return obs.mags, obs.valid

        fns[cubic] = {
            "truth": jax.jit(jax.vmap(truth, in_axes=(None, 0, 0, 0, 0))),
            "eep": jax.jit(jax.vmap(by_eep, in_axes=(None, None, 0, 0, 0))),
            "mass": jax.jit(jax.vmap(by_mass, in_axes=(None, None, 0, 0, 0))),
        }
    return fns


def truth_rows(raw, axis: int, index: int):
    """All real rows of the tabulated isochrones at the dropped node (every node of the
    other axis): dict of 1-d float64 arrays."""
    import numpy as np

    feh, log_age, eep, data = raw
    block = data[index] if axis == 0 else data[:, index]  # (n_other, n_eep, 6)
    ok = np.isfinite(block[..., 0])
    k_other, k_eep = np.nonzero(ok)
    rows = block[k_other, k_eep]
    if axis == 0:
        f = np.full(k_other.shape, feh[index])
        a = log_age[k_other]
    else:
        f = feh[k_other]
        a = np.full(k_other.shape, log_age[index])
    return {"feh": f, "log_age": a, "eep": eep[k_eep], "initial_mass": rows[:, 0],
                "log_teff": rows[:, 2], "logg": rows[:, 3], "logl": rows[:, 4],
                "phase": np.rint(rows[:, 5]).astype(int)}


def errors(fns, bc, iso_sub, rows, cubic: bool, coord: str):
    """(dG, d(BP-RP)) in mmag and the valid mask, one entry per row."""
    import jax.numpy as jnp
    import numpy as np

    f = fns[cubic]
    j = {k: jnp.asarray(v) for k, v in rows.items()}
    mt, vt = f["truth"](bc, j["log_teff"], j["logg"], j["logl"], j["feh"])
    x = j["eep"] if coord == "eep" else j["initial_mass"]
    mi, vi = f[coord](iso_sub, bc, x, j["log_age"], j["feh"])
    mt, mi = np.asarray(mt), np.asarray(mi)
    dg = 1e3 * (mi[:, 0] - mt[:, 0])
    dc = 1e3 * ((mi[:, 1] - mi[:, 2]) - (mt[:, 1] - mt[:, 2]))
    ok = np.asarray(vt) & np.asarray(vi) & np.isfinite(dg) & np.isfinite(dc)
    return dg, dc, ok


def stats(dg, dc, ok, mask):
    import numpy as np

    sel = ok & mask
    n = int(mask.sum())
    if not sel.any():
        return {"n": n, "n_valid": 0, "med_dG": None, "p95_dG": None, "med_dC": None,
                "p95_dC": None}
    ag, ac = np.abs(dg[sel]), np.abs(dc[sel])
    return {"n": n, "n_valid": int(sel.sum()),
            "med_dG": float(np.median(ag)), "p95_dG": float(np.percentile(ag, 95)),
            "med_dC": float(np.median(ac)), "p95_dC": float(np.percentile(ac, 95))}


def _ratio(a, b):
    """b / a, or None when either is missing or a is zero."""
    return None if a is None or b is None or a == 0.0 else b / a


def fmt(x, w=8, d=2):
    return f"{'-':>{w}}" if x is None else f"{x:{w}.{d}f}"


def print_table(title, rows, keys):
    print()
    print(title)
    head = "".join(f"{k:>{w}}" if i else f"{k:<{w}}" for i, (k, w) in enumerate(keys))
    head += (f"{'n_ok/n':>13}{'med|dG|':>9}{'p95|dG|':>9}{'med|dC|':>9}{'p95|dC|':>9}"
             f"{'medG/4':>8}{'p95G/4':>8}{'medC/4':>8}{'p95C/4':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        s = "".join(f"{r[k]!s:>{w}}" if i else f"{r[k]!s:<{w}}"
                    for i, (k, w) in enumerate(keys))
        s += f"{str(r['n_valid']) + '/' + str(r['n']):>13}"
        for k in ("med_dG", "p95_dG", "med_dC", "p95_dC"):
            s += fmt(r[k], 9)
        for k in ("med_dG", "p95_dG", "med_dC", "p95_dC"):
            s += fmt(None if r[k] is None else r[k] / 4, 8)
        print(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ages", type=float, nargs="+", default=list(DEFAULT_AGES),
                   help="log10 age nodes to drop")
    p.add_argument("--fehs", type=float, nargs="+", default=list(DEFAULT_FEHS),
                   help="[Fe/H] nodes to drop")
    p.add_argument("--no-order-check", action="store_true",
                   help="skip the 4x-spacing run that checks the error scaling")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-node tables")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/leave_one_out.json"))
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jaxlib
    import numpy as np

    from clusterhbm.grid import band_indices, load_grid

    t_start = time.perf_counter()
    grid = load_grid(dtype="float64")
    raw = read_raw()
    fns = make_evaluators(band_indices(BANDS))
    axes = [(1, "log_age", args.ages), (0, "feh", args.fehs)]
    strides = (2,) if args.no_order_check else (2, 4)

    # arrays[(axis_name, node, spacing, scheme, coord)] = (dG, dC, ok, region masks)
    arrays = {}
    for axis, name, nodes in axes:
        axis_nodes = raw[axis]
        for node in nodes:
            hits = np.nonzero(np.isclose(axis_nodes, node, atol=1e-6))[0]
            if hits.size != 1:
                raise ValueError(f"{name} = {node} is not a grid node; nodes are "
                                 f"{axis_nodes[0]}..{axis_nodes[-1]}")
            index = int(hits[0])
            rows = truth_rows(raw, axis, index)
            masks = region_masks(rows["eep"], rows["phase"])
            for stride in strides:
                iso_sub = sub_grid(grid.iso, raw[3], axis, index, stride)
                if iso_sub is None:
                    continue
                for cubic in (False, True):
                    for coord in ("eep", "mass"):
                        key = (name, node, stride, "cubic" if cubic else "linear", coord)
                        arrays[key] = (*errors(fns, grid.bc, iso_sub, rows, cubic, coord),
                                       masks)
            print(f"  {name} = {node:+.2f}: {len(rows['eep'])} tabulated rows "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)

    def pooled(name, nodes, stride, scheme, coord, region):
        parts = [arrays[(name, nd, stride, scheme, coord)] for nd in nodes]
        dg, dc, ok = (np.concatenate([p[i][p[3][region]] for p in parts]) for i in range(3))
        return stats(dg, dc, ok, np.ones(dg.shape, bool))

    configs = [(name, scheme, coord) for name in ("log_age", "feh")
               for scheme in ("linear", "cubic") for coord in ("eep", "mass")]
    per_node = [{"axis": name, "node": node, "spacing": stride, "scheme": scheme,
                 "coord": coord, "region": region, **stats(dg, dc, ok, masks[region])}
                for (name, node, stride, scheme, coord), (dg, dc, ok, masks) in arrays.items()
                for region in REGIONS]
    summary = []
    for name, scheme, coord in configs:
        nodes = args.ages if name == "log_age" else args.fehs
        for region in REGIONS:
            summary.append({"axis": name, "spacing": 2, "scheme": scheme, "coord": coord,
                            "region": region, "nodes": nodes,
                            **pooled(name, nodes, 2, scheme, coord, region)})

    print()
    print(SCALE_NOTE)
    print("dG = Delta G, dC = Delta(BP-RP), absolute values in mmag; coord = quantity held "
          "fixed (eep or initial mass); n_ok/n = rows with a valid interpolation / rows.")
    keys = [("axis", 8), ("scheme", 7), ("coord", 6), ("region", 7)]
    print_table("Leave-one-out, pooled over the dropped nodes (age drop: every [Fe/H]; "
                "[Fe/H] drop: every age); spacing 2h", summary, keys)
    if args.verbose:
        rows_v = [dict(r, node=f"{r['node']:+.2f}") for r in per_node if r["spacing"] == 2]
        print_table("Per dropped node, spacing 2h", rows_v,
                    [("axis", 8), ("node", 7)] + keys[1:])

    order = []
    if 4 in strides:
        print()
        print("Order check: pooled medians at 4h (every fourth node; only dropped nodes >= 2 "
              "from an axis end) vs 2h, same nodes. ratio ~4: h^2, ~8: h^3, ~2: h^1 (noisy "
              "or kinked tables). 'est h' = med 2h / ratio: the same power law carried down "
              "to the real spacing h (an alternative to the fixed /4).")
        head = (f"{'axis':<8}{'scheme':>7}{'coord':>6}{'region':>8}{'medG 2h':>9}"
                f"{'medG 4h':>9}{'ratio':>7}{'estG h':>8}{'medC 2h':>9}{'medC 4h':>9}"
                f"{'ratio':>7}{'estC h':>8}")
        print(head)
        print("-" * len(head))
        for name, scheme, coord in configs:
            nodes4 = [nd for nd in (args.ages if name == "log_age" else args.fehs)
                      if (name, nd, 4, scheme, coord) in arrays]
            if not nodes4:
                continue
            for region in REGIONS:
                m2 = pooled(name, nodes4, 2, scheme, coord, region)
                m4 = pooled(name, nodes4, 4, scheme, coord, region)
                o = {"axis": name, "scheme": scheme, "coord": coord, "region": region,
                     "nodes": nodes4, "med_dG_2h": m2["med_dG"], "med_dG_4h": m4["med_dG"],
                     "ratio_dG": _ratio(m2["med_dG"], m4["med_dG"]),
                     "med_dC_2h": m2["med_dC"], "med_dC_4h": m4["med_dC"],
                     "ratio_dC": _ratio(m2["med_dC"], m4["med_dC"])}
                for c in ("G", "C"):  # power-law extrapolation to the real spacing h
                    r = o[f"ratio_d{c}"]
                    o[f"est_med_d{c}_h"] = None if r is None else o[f"med_d{c}_2h"] / r
                order.append(o)
                print(f"{name:<8}{scheme:>7}{coord:>6}{region:>8}"
                      f"{fmt(o['med_dG_2h'], 9)}{fmt(o['med_dG_4h'], 9)}"
                      f"{fmt(o['ratio_dG'], 7, 1)}{fmt(o['est_med_dG_h'], 8)}"
                      f"{fmt(o['med_dC_2h'], 9)}{fmt(o['med_dC_4h'], 9)}"
                      f"{fmt(o['ratio_dC'], 7, 1)}{fmt(o['est_med_dC_h'], 8)}")

    record = {
        "script": "scripts/leave_one_out.py",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "numpy": np.__version__},
        "dtype": "float64",
        "units": "mmag; dG = G_interp - G_table, dC = (BP-RP)_interp - (BP-RP)_table; stats "
                 "of absolute values over valid rows",
        "note": SCALE_NOTE,
        "regions": {"PMS": "phase -1", "MS": "phase 0 and EEP < 400",
                    "TO/SGB": "400 <= EEP < 500 and phase in (0, 2)",
                    "RGB": "phase 2 and EEP >= 500", "CHeB": "phase 3"},
        "truth": "tabulated (log Teff, log g, log L) through the same BC interpolation (same "
                 "scheme), A_V = 0, distance 10 pc",
        "ages_dropped": args.ages, "fehs_dropped": args.fehs,
        "summary": summary, "per_node": per_node, "order_check": order,
        "runtime_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
