"""How many fixed segments per star the marginal model needs with single stars and widths.

    python scripts/segment_count_check.py [--cases a,b,c,d] [--n-stars 500]
        [--counts 24,48,96,192] [--out benchmarks/results/segment_count_check.json]

For each recovery mock (``scripts/recovery_study.py``'s cases with non-zero widths, seed
1000, the 0.01 mag floor in the mock and the fit) the per-star segment sets are chosen as
:func:`clusterhbm.fit._fit_marginal` does (``select_segments`` over the zero-width model at
the truth and at 16 states stepped around it), for every count in ``--counts``. The
marginal model with all four widths is then evaluated per star at the truth and at six
states around it (each mean moved by about 3 posterior sd of a 500-star fit, the widths
halved and doubled) with the fixed sets and with every segment (no pruning). Prints, per
count, the largest per-star and total |fixed - every segment| over those states, and the
time of one value and gradient (linear scheme, no binaries, selection function on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from recovery_study import mock_catalogue, truth_of

from clusterhbm.fit import prepare_data
from clusterhbm.grid import band_indices, load_grid
from clusterhbm.marginal import MarginalOptions, log_density_marginal, select_segments
from clusterhbm.model import ModelConfig, Priors, pop_to_unconstrained
from clusterhbm.results import versions

#: the states the fit's ``around`` steps through (unconstrained coordinates)
STEPS = {"log_age": 0.02, "feh": 0.02, "ln_distance_pc": 0.005, "av_raw": 0.02}
#: moves of the test states: about 3 sd of a 500-star fit's posterior
MOVES = [{"log_age": 0.01}, {"feh": -0.02}, {"ln_distance_pc": 0.004}, {"av_raw": -0.02},
         {"ln_sigma_log_age": np.log(0.5), "ln_sigma_feh": np.log(0.5),
          "ln_sigma_distance_pc": np.log(0.5), "ln_sigma_av_mag": np.log(0.5)},
         {"ln_sigma_log_age": np.log(2.0), "ln_sigma_feh": np.log(2.0),
          "ln_sigma_distance_pc": np.log(2.0), "ln_sigma_av_mag": np.log(2.0)}]


def check_case(case, n_stars, counts, grid):
    truth = truth_of(case, True)
    cat = mock_catalogue(case, True, 0, n_stars, sim_floor=0.01)
    fd = prepare_data(cat, member_prob_column=None)
    cfg0 = ModelConfig(band_idx=band_indices(fd.bands), fit_widths=(False,) * 4,
                       selection=True)
    cfg = cfg0._replace(fit_widths=(True,) * 4)
    pri = Priors(g_lim=19.0)  # the mocks are cut at G = 19
    mean_keys = ("log_age", "feh", "distance_pc", "av_mag")
    p0 = pop_to_unconstrained({k: truth[k] for k in mean_keys}, cfg0)
    states = [p0] + [{**p0, k: p0[k] + f * h} for k, h in STEPS.items()
                     for f in (-1.0, -0.5, 0.5, 1.0)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    pw = pop_to_unconstrained(truth, cfg)
    tests = [pw] + [{**pw, **{k: pw[k] + v for k, v in m.items()}} for m in MOVES]
    full = jax.jit(lambda p: log_density_marginal(p, fd.data, grid, cfg, pri,
                                                  per_star=True))
    ref = [np.asarray(full(p)) for p in tests]
    rows = []
    for n in counts:
        opts = MarginalOptions(n_segments=n)
        t = time.perf_counter()
        sel = select_segments(stacked, fd.data, grid, cfg0, pri, opts, n_segments=n)
        t_sel = time.perf_counter() - t
        fixed = jax.jit(lambda p, sel=sel: log_density_marginal(p, fd.data, grid, cfg, pri,
                                                                per_star=True, sel=sel))
        miss = np.array([np.asarray(fixed(p)) - r for p, r in zip(tests, ref)])
        vg = jax.jit(jax.value_and_grad(lambda p, sel=sel: log_density_marginal(
            p, fd.data, grid, cfg, pri, sel=sel)))
        jax.block_until_ready(vg(pw))
        t = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(vg(pw))
        ms = (time.perf_counter() - t) / 5 * 1e3
        row = {"case": case, "n_segments": n, "max_per_star": float(np.max(np.abs(miss))),
               "max_total": float(np.max(np.abs(miss.sum(1)))),
               "value_and_gradient_ms": ms, "select_s": t_sel}
        print(f"case {case}, {n:4d} segments: miss per star <= {row['max_per_star']:.2e}, "
              f"total <= {row['max_total']:.2e}; value+gradient {ms:.1f} ms", flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--n-stars", type=int, default=500)
    p.add_argument("--counts", default="24,48,96,192")
    p.add_argument("--out", default="benchmarks/results/segment_count_check.json")
    a = p.parse_args(argv)
    grid = load_grid()
    counts = [int(c) for c in a.counts.split(",")]
    rows = []
    for case in a.cases.split(","):
        rows += check_case(case, a.n_stars, counts, grid)
    Path(a.out).write_text(json.dumps({"script": "scripts/segment_count_check.py",
                                       "args": vars(a), "rows": rows,
                                       "versions": versions()}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
