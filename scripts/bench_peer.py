"""Our NUTS against NumPyro's NUTS on the same log density, in the same process.

Both samplers get the same target -- :func:`clusterhbm.model.make_logdensity_fn` of a
simulated M67-like cluster (as in ``scripts/bench_kernel.py``; widths not fitted), handed to
NumPyro as ``NUTS(potential_fn=lambda p: -logdensity_fn(p))`` -- the same starting points
(``init_params``), the same numbers of chains, warm-up and sampling steps, the same target
acceptance (0.8), maximum tree depth (10) and kind of metric (dense by default, as
``fit_cluster`` uses for small clusters). NumPyro runs the chains ``vectorized`` (vmapped,
like ours) unless ``--numpyro-chain-method sequential``.

Reported per sampler: wall time, compile time (JAX-reported, as in
``scripts/bench_sampler.py``), leapfrog steps, min bulk ESS and max split R-hat over the
population parameters, ESS per second (whole wall time) and per gradient; and the
agreement of the posterior means, as the difference in units of its Monte Carlo standard
error (sqrt(sd_a^2 / ESS_a + sd_b^2 / ESS_b)) and of the posterior sd.

NumPyro is not a dependency of clusterhbm: ``pip install -e .[bench]`` (or ``pip install
numpyro``). The device is recorded, so the same command on a GPU gives the CPU vs GPU
crossover (owed: no GPU in the session that wrote this).

Writes ``benchmarks/results/bench_peer_<platform>[_<tag>].json``.

Rerun (from the repository root)::

    python scripts/bench_peer.py                           # N = 50, 4 chains, 300 + 300
    python scripts/bench_peer.py --n-stars 200 --device gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import RESULTS, chain_positions, environment, mock_problem, select_device
from bench_sampler import diagnostics, pop_transform, run_ours, timed


def run_numpyro(prob, n_chains, *, num_warmup, num_samples, dense, seed, chain_method):
    import jax
    import numpy as np
    import numpyro
    from numpyro.infer import MCMC, NUTS

    ld = prob["logdensity_fn"]
    init = chain_positions(prob["position"], n_chains, seed=seed)
    kernel = NUTS(potential_fn=lambda p: -ld(p), dense_mass=dense, target_accept_prob=0.8,
                  max_tree_depth=10)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples,
                num_chains=n_chains, chain_method=chain_method, progress_bar=False)
    with timed() as t:
        mcmc.run(jax.random.key(seed), init_params=init, extra_fields=("num_steps",
                                                                       "diverging"))
        jax.block_until_ready(mcmc.get_samples())
    samples = mcmc.get_samples(group_by_chain=True)  # leaves (C, S, ...)
    transform = jax.jit(jax.vmap(jax.vmap(pop_transform(prob))))
    draws = {k: np.asarray(v) for k, v in transform(samples).items()}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    steps = np.asarray(extra["num_steps"])
    d = diagnostics(draws)
    return dict(algorithm=f"numpyro {numpyro.__version__} NUTS ({chain_method})",
                metric="dense" if dense else "diagonal", n_chains=n_chains,
                num_warmup=num_warmup, num_samples=num_samples, wall_s=t["wall_s"],
                compile_s=t["compile_s"], run_s=t["run_s"],
                leapfrog_steps_sampling=int(steps.sum()),
                mean_steps_per_draw=float(steps.mean()),
                n_divergent=int(np.sum(extra["diverging"])), **d)


def agreement(a: dict, b: dict) -> dict:
    """Difference of posterior means in MCSE units and in posterior sd units."""
    out = {}
    for k in a["mean"]:
        mcse = math.sqrt(a["sd"][k] ** 2 / a["ess_bulk"][k] + b["sd"][k] ** 2
                         / b["ess_bulk"][k])
        diff = a["mean"][k] - b["mean"][k]
        out[k] = {"diff": diff, "z_mcse": diff / mcse if mcse > 0 else float("nan"),
                  "diff_over_sd": diff / max(0.5 * (a["sd"][k] + b["sd"][k]), 1e-300)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default=None)
    p.add_argument("--x64", action="store_true")
    p.add_argument("--n-stars", type=int, default=50)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--metric", choices=("dense", "diag"), default="dense")
    p.add_argument("--numpyro-chain-method", default="vectorized",
                   choices=("vectorized", "sequential", "parallel"))
    p.add_argument("--chunk", type=int, default=100, help="our sampler's chunk size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    select_device(args.device, args.x64)
    try:
        import numpyro  # noqa: F401
    except ImportError as exc:
        raise SystemExit("bench_peer.py needs NumPyro: pip install -e .[bench]") from exc
    import numpy as np

    env = environment()
    prob = mock_problem(args.n_stars, fit_widths=False)
    dense = args.metric == "dense"
    print(f"device {env['device']}; jax {env['jax']}; load average {env['loadavg'][0]:.2f}; "
          f"N = {args.n_stars}, D = {args.n_stars + 4}, {args.chains} chains, "
          f"{args.warmup} + {args.samples} steps, {args.metric} metric", flush=True)
    ours = run_ours(prob, args.chains, num_warmup=args.warmup, num_samples=args.samples,
                    chunk_size=args.chunk, dense=dense, seed=args.seed)
    ours["run_s"] = ours["wall_s"] - ours["compile_s"]
    theirs = run_numpyro(prob, args.chains, num_warmup=args.warmup, num_samples=args.samples,
                         dense=dense, seed=args.seed, chain_method=args.numpyro_chain_method)
    records = []
    dt = np.dtype(prob["data"].mag.dtype).name
    print(f"{'sampler':42} {'wall_s':>7} {'compile':>7} {'run_s':>7} {'steps/draw':>10} "
          f"{'minESS':>7} {'ESS/s':>7} {'ESS/s run':>9} {'ESS/grad':>9} {'maxRhat':>7} "
          f"{'div':>4}")
    for rec in (ours, theirs):
        rec["ess_per_s_wall"] = rec["min_ess_bulk"] / rec["wall_s"]
        rec["ess_per_s_run"] = rec["min_ess_bulk"] / max(rec["run_s"], 1e-9)
        rec["ess_per_gradient"] = rec["min_ess_bulk"] / max(rec["leapfrog_steps_sampling"], 1)
        rec.update(dict(env, loadavg=list(os.getloadavg()), n_stars=args.n_stars, dtype=dt))
        records.append(rec)
        print(f"{rec['algorithm'][:42]:42} {rec['wall_s']:7.1f} {rec['compile_s']:7.1f} "
              f"{rec['run_s']:7.1f} {rec['mean_steps_per_draw']:10.1f} "
              f"{rec['min_ess_bulk']:7.0f} {rec['ess_per_s_wall']:7.2f} "
              f"{rec['ess_per_s_run']:9.2f} {rec['ess_per_gradient']:9.2e} "
              f"{rec['max_rhat']:7.3f} {rec['n_divergent']:4d}")
    agree = agreement(ours, theirs)
    print("posterior means: ours vs numpyro (difference / MCSE, / sd)")
    for k, v in agree.items():
        print(f"  {k:12} {ours['mean'][k]:12.5g} {theirs['mean'][k]:12.5g} "
              f"{v['z_mcse']:7.2f} {v['diff_over_sd']:7.3f}")
    out = {"script": "scripts/bench_peer.py",
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "environment": env, "loadavg_end": list(os.getloadavg()),
           "truth": prob["sim"].params._asdict(), "records": records, "agreement": agree}
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out or RESULTS / f"bench_peer_{env['platform']}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
