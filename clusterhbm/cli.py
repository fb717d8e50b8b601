"""The ``clusterhbm`` command line: demo, simulate, fetch, fit, summary, plot.

Exit codes: 0 success; 1 bad input (a clear one-line message, no traceback); 2 a network
or cache failure. Progress bars are on here and off by default in the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]

log = logging.getLogger("clusterhbm")


def _add_simulate(sub):
    p = sub.add_parser("simulate", help="simulate a mock cluster catalogue with known truth",
                       description="Simulate a Gaia-like catalogue of a cluster (truth "
                                   "columns prefixed true_).")
    p.add_argument("--log-age", type=float, default=9.6, help="log10(age/yr) [9.6]")
    p.add_argument("--feh", type=float, default=0.0, help="[Fe/H] in dex [0.0]")
    p.add_argument("--distance-pc", type=float, default=850.0, help="distance in pc [850]")
    p.add_argument("--av", type=float, default=0.1, help="A_V in mag [0.1]")
    p.add_argument("--sigma-log-age", type=float, default=0.0)
    p.add_argument("--sigma-feh", type=float, default=0.0)
    p.add_argument("--sigma-distance-pc", type=float, default=0.0)
    p.add_argument("--sigma-av", type=float, default=0.0)
    p.add_argument("--n-stars", type=int, default=1000, help="systems in the catalogue")
    p.add_argument("--binary-fraction", type=float, default=0.0)
    p.add_argument("--field-fraction", type=float, default=0.0)
    p.add_argument("--imf", default="kroupa", choices=("kroupa", "chabrier", "powerlaw"))
    p.add_argument("--imf-slope", type=float, default=2.35, help="power-law slope alpha")
    p.add_argument("--g-lim", type=float, default=19.0, help="faint limit on G [19]")
    p.add_argument("--g-bright", type=float, default=None, help="bright limit on G")
    p.add_argument("--parallax-zp", type=float, default=0.0,
                   help="zero-point offset added to parallaxes [mas]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="mock.ecsv", help="ECSV or HDF5 (.h5)")
    p.add_argument("--plot", default=None, help="also write a CMD figure to this stem")
    p.add_argument("--cubic", action="store_true",
                   help="cubic grid interpolation (use the scheme the mock will be fitted "
                        "with: `clusterhbm fit --cubic`)")
    p.set_defaults(func=_run_simulate)


def _run_simulate(a) -> int:
    from .simulate import ClusterParams, ObservingModel, simulate_cluster, write_simulation

    params = ClusterParams(a.log_age, a.feh, a.distance_pc, a.av, a.sigma_log_age,
                           a.sigma_feh, a.sigma_distance_pc, a.sigma_av, a.binary_fraction,
                           a.field_fraction)
    obs = ObservingModel(g_lim=a.g_lim, g_bright=a.g_bright, parallax_zp_mas=a.parallax_zp)
    sim = simulate_cluster(params, n_stars=a.n_stars, seed=a.seed, imf=a.imf,
                           alpha=a.imf_slope, observing=obs, cubic=a.cubic)
    path = write_simulation(sim, a.output)
    t = sim.truth
    print(f"wrote {path}: {len(t)} systems ({int(t['is_field'].sum())} field, "
          f"{int(t['is_binary'].sum())} binaries), G {sim.catalogue['phot_g_mean_mag'].min():.2f}"
          f"..{sim.catalogue['phot_g_mean_mag'].max():.2f}")
    if a.plot:
        from .plots import plot_cmd, save_figure

        fig = plot_cmd(sim.catalogue, truth=t, isochrones=[{
            "log_age": a.log_age, "feh": a.feh, "distance_pc": a.distance_pc,
            "av_mag": a.av, "label": "input isochrone", "lw": 0.7}])
        for p in save_figure(fig, a.plot):
            print(f"wrote {p}")
    return 0


def _add_fetch(sub):
    from . import gaia

    p = sub.add_parser("fetch", help="fetch Gaia DR3 data of a named cluster (cached)",
                       description="Query Gaia DR3 for a named cluster, apply quality cuts "
                                   "and a first-pass membership; cache the result.")
    gaia.add_fetch_arguments(p)
    p.set_defaults(func=lambda a: gaia.run_fetch(a))


def _add_fit(sub):
    p = sub.add_parser("fit", help="fit the hierarchical model to a catalogue",
                       description="Fit a catalogue (CSV/ECSV/FITS/VOTable/HDF5 with Gaia "
                                   "archive column names) or a named cluster (from the "
                                   "fetch cache) with BlackJAX NUTS; write a results file.")
    p.add_argument("catalogue", help="catalogue file, or a cluster name (uses clusterhbm "
                                     "fetch, offline from its cache when possible)")
    p.add_argument("-o", "--output", default="fit.h5", help="results file [fit.h5]")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-widths", action="store_true", help="fix all widths at zero")
    p.add_argument("--widths", default=None,
                   help="which widths to fit, e.g. 'age,feh' (of age,feh,distance,av)")
    p.add_argument("--unpooled", action="store_true",
                   help="fit every star independently (no pooling)")
    p.add_argument("--cubic", action="store_true", help="C1 cubic interpolation")
    p.add_argument("--fit-parallax-zp", action="store_true",
                   help="fit a global parallax zero-point offset")
    p.add_argument("--no-parallax", action="store_true", help="ignore parallaxes")
    p.add_argument("--mass-matrix", choices=("auto", "dense", "diag"), default="auto",
                   help="metric adapted in warm-up (auto: dense up to 4000 dimensions)")
    p.add_argument("--gaia-release", default=None, help="override the catalogue's release")
    p.add_argument("--members-only", type=float, default=None, metavar="P",
                   help="keep stars with member_prob >= P")
    p.add_argument("--binaries", action="store_true",
                   help="unresolved binaries (fits the binary fraction f_bin)")
    p.add_argument("--field", action="store_true",
                   help="field/outlier mixture (fits f_field; per-star p_member)")
    p.add_argument("--selection", action="store_true",
                   help="normalise by the detection probability within the G limits")
    p.add_argument("--g-lim", type=float, default=None,
                   help="faint G limit of the catalogue (implies --selection) "
                        "[the faintest star]")
    p.add_argument("--g-bright", type=float, default=None, help="bright G limit")
    p.add_argument("--fit-mf-slope", action="store_true",
                   help="fit the power-law slope of the mass function (mf_slope)")
    p.add_argument("--full", action="store_true",
                   help="the real-cluster model: --binaries --field --selection "
                        "--fit-mf-slope")
    p.add_argument("--marginal", action="store_true",
                   help="integrate every star's mass (and q) out and sample the population "
                        "only (clusterhbm.marginal): the way the mixture model (--full) "
                        "mixes; fits no widths unless --widths names them (the stars' "
                        "offsets are then integrated out too, to first order)")
    p.add_argument("--n-q", type=int, default=24,
                   help="mass-ratio bins of the marginal model [24]")
    p.add_argument("--imf", default="kroupa", choices=("kroupa", "chabrier", "powerlaw"))
    p.add_argument("--colour-correction", default=None, metavar="NAME|JSON",
                   help="empirical correction of MIST's Gaia BP/RP: 'gaia-ms' (calibrated "
                        "on six nearby clusters' main sequences; MIST is 0.02-0.25 mag too "
                        "blue from 6800 to 3600 K) or a JSON file [none]")
    p.add_argument("--priors", default=None, metavar="TOML",
                   help="TOML file with a [priors] table overriding clusterhbm.model.Priors "
                        "fields, e.g. feh_sd = 0.2")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file: saved every chunk; a rerun resumes from it")
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--float64", action="store_true", help="run in float64")
    p.add_argument("--device", default=None, choices=("cpu", "gpu"),
                   help="JAX platform (default: JAX's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_fit)


def _setup_jax(a):
    import os

    if getattr(a, "device", None):
        os.environ.setdefault("JAX_PLATFORMS", a.device)
    if getattr(a, "float64", False):
        import jax

        jax.config.update("jax_enable_x64", True)


def _load_catalogue(spec, release=None):
    from .catalogue import read_catalogue

    if Path(spec).exists():
        return read_catalogue(spec, gaia_release=release)
    from . import gaia

    log.info("%s is not a file: fetching it as a cluster name", spec)
    return gaia.fetch(spec)


def _marginal_options(a):
    if not a.marginal:
        return None
    from .marginal import MarginalOptions

    return MarginalOptions(n_q=a.n_q)


def _run_fit(a) -> int:
    _setup_jax(a)
    import json

    import numpy as np

    from .fit import fit_cluster, priors_from_toml

    priors = priors_from_toml(a.priors) if a.priors else None  # fail before any fetch
    cat = _load_catalogue(a.catalogue, a.gaia_release)
    if a.members_only is not None:
        if "member_prob" not in cat.colnames:
            raise ValueError("--members-only needs a member_prob column in the catalogue")
        keep = np.asarray(cat["member_prob"], float) >= a.members_only
        log.warning("--members-only %.2f keeps %d of %d stars", a.members_only, keep.sum(),
                    len(cat))
        cat = cat[keep]
    widths = (True,) * 4
    if a.no_widths or (a.marginal and not a.widths):
        widths = (False,) * 4
    elif a.widths:
        names = [w.strip() for w in a.widths.split(",") if w.strip()]
        allowed = ("age", "feh", "distance", "av")
        bad = [w for w in names if w not in allowed]
        if bad:
            raise ValueError(f"--widths: unknown {bad}; choose from {allowed}")
        widths = tuple(w in names for w in allowed)
    truth = None
    if cat.meta.get("simulated"):
        from .simulate import POP_NAMES

        pop = cat.meta.get("population", {})
        truth = {k: pop[k] for k in POP_NAMES if k in pop}
    full = a.full
    res = fit_cluster(cat, num_chains=a.chains, num_warmup=a.warmup, num_samples=a.samples,
                      seed=a.seed, pooled=not a.unpooled, fit_widths=widths, cubic=a.cubic,
                      fit_parallax_zp=a.fit_parallax_zp, use_parallax=not a.no_parallax,
                      dense_mass_matrix={"auto": None, "dense": True,
                                         "diag": False}[a.mass_matrix],
                      progress=not a.no_progress, checkpoint=a.checkpoint,
                      chunk_size=a.chunk_size, truth=truth, priors=priors, imf=a.imf,
                      binaries=a.binaries or full, field=a.field or full,
                      selection=a.selection or full or a.g_lim is not None,
                      g_lim=a.g_lim, g_bright=a.g_bright,
                      fit_mf_slope=a.fit_mf_slope or full, marginal=a.marginal,
                      marginal_options=_marginal_options(a),
                      colour_correction=a.colour_correction)
    path = res.to_hdf5(a.output)
    if a.json:
        print(json.dumps(res.summary_json(), indent=2))
    else:
        print(res.summary_text())
    print(f"wrote {path}")
    return 0


def _add_summary(sub):
    p = sub.add_parser("summary", help="print the summary and diagnostics of a results file")
    p.add_argument("results", help="results file written by clusterhbm fit")
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    p.set_defaults(func=_run_summary)


def _run_summary(a) -> int:
    import json

    from .results import load_results

    res = load_results(a.results)
    if a.json:
        print(json.dumps(res.summary_json(), indent=2))
    else:
        print(res.summary_text())
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="offline end-to-end run on a simulated M67-like cluster",
                       description="Simulate an M67-like cluster (log age 9.6, [Fe/H] 0, "
                                   "850 pc, A_V 0.1), fit it pooled and unpooled, print the "
                                   "summary beside the truth and write the figures.")
    p.add_argument("-o", "--output", default="clusterhbm_demo", help="output folder")
    p.add_argument("--n-stars", type=int, default=120)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test settings (CI): the pooled fit starts from the "
                        "isochrone scan unoptimised and chooses its segment sets over 4 "
                        "draws; the numbers are not results")
    p.set_defaults(func=_run_demo)


def _run_demo(a) -> int:
    import time

    import numpy as np

    from .fit import fit_cluster
    from .marginal import MarginalOptions
    from .plots import (
        plot_cmd,
        plot_corner,
        plot_parallax,
        plot_shrinkage,
        plot_trace,
        posterior_isochrones,
        save_figure,
    )
    from .simulate import ClusterParams, simulate_cluster, write_simulation

    t0 = time.perf_counter()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    params = ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0, av_mag=0.1)
    # cubic interpolation for the mock and the pooled fit (the scheme for real fits; the
    # linear one's kinks at grid nodes cap NUTS's step size)
    sim = simulate_cluster(params, n_stars=a.n_stars, seed=a.seed, cubic=True)
    write_simulation(sim, out / "mock.ecsv")
    print(f"simulated {a.n_stars} stars of an M67-like cluster -> {out / 'mock.ecsv'}")
    truth = {k: v for k, v in params._asdict().items()
             if k in ("log_age", "feh", "distance_pc", "av_mag")}
    common = {"num_chains": a.chains, "seed": a.seed, "fit_widths": False,
              "progress": not a.no_progress, "truth": truth}
    quick = {"optimise_steps": 0} if a.quick else {}
    print("fitting the hierarchical (pooled) model ...")
    # the marginal model (every star's mass integrated out) with the mock's G <= 19
    # selection function: the per-star model's multi-start optimiser settled this mock in
    # a wrong age-extinction mode (log age 9.44, A_V 0.19 against 9.6, 0.1) that NUTS did
    # not leave; the marginal model is what real fits use (see docs/performance.md)
    res = fit_cluster(sim.catalogue, num_warmup=a.warmup, num_samples=a.samples, cubic=True,
                      marginal=True, selection=True,
                      g_lim=sim.catalogue.meta["observing"]["g_lim"],
                      marginal_options=MarginalOptions(n_select_draws=4) if a.quick else None,
                      **quick, **common)
    res.to_hdf5(out / "fit.h5")
    print(res.summary_text())
    print("fitting every star alone (unpooled) for the shrinkage figure ...")
    # each star alone under broad priors: poorly constrained ages make long trajectories,
    # so this run is shorter, its trees shallower and its scheme the cheaper linear one
    # (it only feeds the shrinkage figure)
    unp = fit_cluster(sim.catalogue, pooled=False, num_warmup=max(a.warmup // 4, 50),
                      num_samples=max(a.samples // 4, 50), max_num_doublings=7,
                      optimise_steps=100, **common)
    unp.to_hdf5(out / "fit_unpooled.h5")
    figs = {
        "cmd": plot_cmd(sim.catalogue, isochrones=posterior_isochrones(res),
                        title="mock M67: data and posterior isochrones"),
        "corner": plot_corner(res),
        "shrinkage": plot_shrinkage(res, unp, truth=np.asarray(sim.truth["mass_msun"]),
                                    g_mag=np.asarray(sim.catalogue["phot_g_mean_mag"])),
        "parallax": plot_parallax(sim.catalogue, res),
        "trace": plot_trace(res),
    }
    for name, fig in figs.items():
        for p in save_figure(fig, out / name):
            print(f"wrote {p}")
    width = (np.diff(np.percentile(res.stars["mass_msun"].reshape(-1, a.n_stars), [16, 84],
                                   axis=0), axis=0)
             / np.diff(np.percentile(unp.stars["mass_msun"].reshape(-1, a.n_stars), [16, 84],
                                     axis=0), axis=0))
    print(f"shrinkage: median per-star mass interval, pooled / unpooled = "
          f"{float(np.median(width)):.2f}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _add_plot(sub):
    p = sub.add_parser("plot", help="figures from a results file or a catalogue")
    p.add_argument("source", help="results file (fit.h5) or catalogue")
    p.add_argument("--catalogue", default=None,
                   help="the fitted catalogue (for the CMD and parallax figures)")
    p.add_argument("-o", "--output", default="figures", help="output folder")
    p.set_defaults(func=_run_plot)


def _run_plot(a) -> int:
    from .plots import (
        plot_cmd,
        plot_corner,
        plot_parallax,
        plot_trace,
        posterior_isochrones,
        save_figure,
    )

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    src = Path(a.source)
    if src.suffix in (".h5", ".hdf5") and _is_results(src):
        from .results import load_results

        res = load_results(src)
        figs["corner"] = plot_corner(res)
        figs["trace"] = plot_trace(res)
        if a.catalogue:
            import numpy as np

            cat = _load_catalogue(a.catalogue)
            rows = {s: i for i, s in enumerate(np.asarray(cat["source_id"]))}
            missing = [s for s in res.source_id if s not in rows]
            if missing:
                raise ValueError(f"--catalogue lacks {len(missing)} of the fitted stars "
                                 f"(e.g. source_id {missing[0]}); pass the fitted catalogue")
            cat = cat[np.array([rows[s] for s in res.source_id], dtype=int)]
            pm = res.stars["p_member"].mean(axis=(0, 1)) if "p_member" in res.stars else None
            pb = res.stars["p_binary"].mean(axis=(0, 1)) if "p_binary" in res.stars else None
            figs["cmd"] = plot_cmd(cat, member_prob=pm, binary_prob=pb,
                                   isochrones=posterior_isochrones(res))
            if "parallax" in cat.colnames:
                figs["parallax"] = plot_parallax(cat, res)
    else:
        cat = _load_catalogue(a.source)
        truth = None
        if any(c.startswith("true_") for c in cat.colnames):
            from .simulate import read_simulation

            sim = read_simulation(a.source)
            cat, truth = sim.catalogue, sim.truth
        figs["cmd"] = plot_cmd(cat, truth=truth,
                               member_prob=cat["member_prob"] if "member_prob" in
                               cat.colnames else None)
        if "parallax" in cat.colnames:
            figs["parallax"] = plot_parallax(cat)
    for name, fig in figs.items():
        for p in save_figure(fig, out / name):
            print(f"wrote {p}")
    return 0


def _is_results(path) -> bool:
    import h5py

    with h5py.File(path, "r") as h:
        return h.attrs.get("format") == "clusterhbm-fit"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="clusterhbm",
        description="Hierarchical Bayesian modelling of star clusters with Gaia data.")
    parser.add_argument("--version", action="version", version=f"clusterhbm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_simulate(sub)
    _add_fetch(sub)
    _add_fit(sub)
    _add_summary(sub)
    _add_plot(sub)
    _add_demo(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


#: further subcommands register here (fit, summary, plot, demo)
_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(max(level, logging.WARNING))
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"clusterhbm {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
