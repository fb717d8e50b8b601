"""Where a short fit's time goes: every XLA compilation longer than 0.3 s, in order, for
the demo's pooled (marginal) and unpooled fits at CI-like settings (30 stars, 1 chain).

    python scripts/compile_profile.py [--n-stars 30]

Prints one line per compilation (seconds, function) and each fit's wall time; the
numbers quoted for the CI time (issue notes) come from here.
"""

from __future__ import annotations

import argparse
import logging
import re
import time

import jax


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.rows = []

    def emit(self, record):
        m = re.search(r"Finished XLA compilation of (.+) in ([0-9.e-]+) sec", record.getMessage())
        if m:
            self.rows.append((float(m.group(2)), m.group(1)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=30)
    a = p.parse_args(argv)
    jax.config.update("jax_log_compiles", True)
    h = _Compiles()
    logging.getLogger("jax").addHandler(h)
    logging.getLogger("jax").setLevel(logging.WARNING)
    from clusterhbm.fit import fit_cluster
    from clusterhbm.simulate import ClusterParams, simulate_cluster

    sim = simulate_cluster(ClusterParams(log_age=9.6, feh=0.0, distance_pc=850.0,
                                         av_mag=0.1), n_stars=a.n_stars, seed=0, cubic=True)
    runs = {"pooled (marginal)": {"num_warmup": 30, "num_samples": 30, "cubic": True,
                                      "marginal": True, "selection": True, "g_lim": 19.0},
            "unpooled": {"pooled": False, "num_warmup": 50, "num_samples": 50,
                             "max_num_doublings": 7, "optimise_steps": 100}}
    for name, kw in runs.items():
        h.rows.clear()
        t0 = time.perf_counter()
        fit_cluster(sim.catalogue, num_chains=1, fit_widths=False, **kw)
        wall = time.perf_counter() - t0
        big = [(s, f) for s, f in h.rows if s > 0.3]
        print(f"{name}: wall {wall:.0f} s, compiling {sum(s for s, _ in h.rows):.0f} s")
        for s, f in big:
            print(f"  {s:6.1f} s  {f}")


if __name__ == "__main__":
    main()
