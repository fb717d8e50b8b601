"""Sampler cost: ms per leapfrog step, ESS per second and per gradient, NUTS vs ChEES/MEADS.

Two parts, on JAX's default backend (or ``--device cpu|gpu``), on a simulated M67-like
cluster (as in ``scripts/bench_kernel.py``; widths not fitted, so D = N + 4):

``--part floor`` (one chain): :func:`clusterhbm.sampling.run_nuts` on N stars
    (default N = 1, 100, 1000), dense metric as ``fit_cluster`` uses; reports ms per
    leapfrog step (sampling time without compilation / leapfrog steps), the same for the
    bare gradient (``jit(value_and_grad)``), so the NUTS overhead per step is the
    difference, and the N = 1 floor (the per-step cost of the sampler machinery, which
    bounds how fast a small cluster can be fitted).

``--part many`` (many chains): our NUTS (vmapped chains, each with its own window
    adaptation; diagonal metric) against BlackJAX's ChEES-HMC (``chees_adaptation`` with an
    ensemble-estimated diagonal metric, then ``dynamic_hmc``: every chain takes the same
    number of leapfrog steps, so nothing idles in a vmapped batch) and optionally MEADS
    (``meads_adaptation`` + ``ghmc``, ``--algorithms ... meads``) at C chains
    (default 64 and 128) on a small cluster (default N = 50).

For every run: compile time (the durations JAX reports for tracing, lowering and XLA
compilation, via ``jax.monitoring``), warm-up and sampling time without it, leapfrog
steps (= gradient evaluations), min bulk ESS and max split R-hat over the population
parameters (log age, [Fe/H], distance, A_V), ESS per second (sampling time, and whole
wall time) and per gradient. For vmapped NUTS also the SIMD efficiency: mean over
max-over-chains leapfrog steps per iteration (a batch runs as long as its longest
trajectory). Chains start at the truth jittered by 1e-3 (so R-hat measures mixing, not
burn-in).

Writes ``benchmarks/results/bench_sampler_<part>_<platform>[_<tag>].json`` with one
record per run (device, versions, load average, wall_s, min_ess_bulk, max_rhat, ...).

Rerun (from the repository root; CPU sizes, a few minutes each)::

    python scripts/bench_sampler.py --part floor
    python scripts/bench_sampler.py --part many --chains 64 128
    python scripts/bench_sampler.py --part many --device gpu --chains 64 512 --n-stars 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import (
    RESULTS,
    chain_positions,
    environment,
    mock_problem,
    select_device,
    time_compiled,
)

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_total = [0.0]


def _listener(event, duration_secs, **kwargs):
    if event in _COMPILE_EVENTS:
        _compile_total[0] += duration_secs


@contextlib.contextmanager
def timed():
    """Yield a dict that gets ``wall_s`` and ``compile_s`` (JAX-reported) of the block."""
    import jax

    if not getattr(timed, "registered", False):
        jax.monitoring.register_event_duration_secs_listener(_listener)
        timed.registered = True
    out = {}
    c0, t0 = _compile_total[0], time.perf_counter()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - t0
        out["compile_s"] = _compile_total[0] - c0
        out["run_s"] = out["wall_s"] - out["compile_s"]


def pop_transform(prob):
    """Position -> population parameters in physical units (the 4 means)."""
    from clusterhbm.model import POP_PARAMS, population_values

    config, priors = prob["config"], prob["priors"]

    def transform(p):
        v = population_values(p["pop"], config, priors)
        return {k: v[k] for k in POP_PARAMS}

    return transform


def diagnostics(draws: dict) -> dict:
    """min bulk ESS and max split R-hat over the population draws (each (C, S))."""
    import numpy as np

    from clusterhbm.diagnostics import ess_bulk, split_rhat

    ess = {k: float(ess_bulk(np.asarray(v))) for k, v in draws.items()}
    rhat = {k: float(split_rhat(np.asarray(v))) for k, v in draws.items()}
    means = {k: float(np.mean(v)) for k, v in draws.items()}
    sds = {k: float(np.std(v)) for k, v in draws.items()}
    return {"ess_bulk": ess, "rhat": rhat, "mean": means, "sd": sds,
            "min_ess_bulk": min(ess.values()), "max_rhat": max(rhat.values())}


def run_ours(prob, n_chains, *, num_warmup, num_samples, chunk_size, dense, seed,
             max_num_doublings=10):
    """Our run_nuts; returns a record."""
    import jax
    import numpy as np

    from clusterhbm.sampling import run_nuts

    init = chain_positions(prob["position"], n_chains, seed=seed)
    with timed() as t:
        out = run_nuts(jax.random.key(seed), prob["logdensity_fn"], init,
                       num_warmup=num_warmup, num_samples=num_samples,
                       transform_fn=pop_transform(prob), chunk_size=chunk_size,
                       diagonal_mass_matrix=not dense, max_num_doublings=max_num_doublings)
    steps = np.asarray(out.info["num_integration_steps"])  # (C, S)
    d = diagnostics(out.samples)
    # JAX reports the compile time (all of it falls in the first chunk of each phase)
    warm_run = out.timings["warmup_s"]
    samp = out.timings["sampling_s"]
    c_total = t["compile_s"]
    return dict(
        algorithm="nuts (clusterhbm.sampling.run_nuts)",
        max_num_doublings=max_num_doublings,
        metric="dense" if dense else "diagonal",
        n_chains=n_chains, num_warmup=num_warmup, num_samples=num_samples,
        wall_s=t["wall_s"], compile_s=c_total,
        warmup_plus_sampling_s=warm_run + samp,
        warmup_s_incl_compile=warm_run, sampling_s_incl_compile=samp,
        first_warmup_chunk_s=out.timings["first_warmup_chunk_s"],
        first_sampling_chunk_s=out.timings["first_sampling_chunk_s"],
        leapfrog_steps_sampling=int(steps.sum()),
        mean_steps_per_draw=float(steps.mean()),
        simd_efficiency=float(steps.mean() / steps.max(axis=0).mean()),
        batched_leapfrog_steps=int(steps.max(axis=0).sum()),
        step_size_mean=float(np.mean(out.step_size)),
        n_divergent=int(np.sum(out.info["is_divergent"])),
        **d)


def run_chees(prob, n_chains, *, num_warmup, num_samples, seed, learning_rate=0.05):
    """ChEES adaptation (ensemble diagonal metric) + dynamic HMC; returns a record."""
    import blackjax
    import jax
    import numpy as np
    import optax

    ld, transform = prob["logdensity_fn"], pop_transform(prob)
    init = chain_positions(prob["position"], n_chains, seed=seed)
    k_warm, k_samp = jax.random.split(jax.random.key(seed))
    warmup = blackjax.chees_adaptation(ld, n_chains, mass_matrix_estimation="diagonal")
    with timed() as tw:
        (states, params), _ = warmup.run(k_warm, init, 0.1, optax.adam(learning_rate),
                                         num_warmup)
        jax.block_until_ready(states)
    kernel = blackjax.dynamic_hmc(ld, **params)

    @jax.jit
    def sample(states, keys):
        def body(st, ks):
            st, info = jax.vmap(kernel.step)(ks, st)
            return st, (transform(st.position), info.num_integration_steps,
                        info.is_divergent)

        return jax.lax.scan(body, states, keys)

    keys = jax.random.split(k_samp, (num_samples, n_chains))
    with timed() as ts:
        _, (draws, steps, div) = jax.block_until_ready(sample(states, keys))
    draws = {k: np.asarray(v).T for k, v in draws.items()}  # (S, C) -> (C, S)
    steps = np.asarray(steps).T
    d = diagnostics(draws)
    return dict(
        algorithm="chees (blackjax.chees_adaptation + dynamic_hmc)", metric="diagonal",
        n_chains=n_chains, num_warmup=num_warmup, num_samples=num_samples,
        wall_s=tw["wall_s"] + ts["wall_s"], compile_s=tw["compile_s"] + ts["compile_s"],
        warmup_s=tw["run_s"], sampling_s=ts["run_s"],
        warmup_compile_s=tw["compile_s"], sampling_compile_s=ts["compile_s"],
        leapfrog_steps_sampling=int(steps.sum()), mean_steps_per_draw=float(steps.mean()),
        simd_efficiency=float(steps.mean() / steps.max(axis=0).mean()),
        batched_leapfrog_steps=int(steps.max(axis=0).sum()),
        step_size_mean=float(np.mean(params["step_size"])),
        n_divergent=int(np.sum(div)), learning_rate=learning_rate, **d)


def run_meads(prob, n_chains, *, num_warmup, num_samples, seed):
    """MEADS adaptation + generalised HMC (one leapfrog step per draw); a record."""
    import blackjax
    import jax
    import numpy as np

    ld, transform = prob["logdensity_fn"], pop_transform(prob)
    init = chain_positions(prob["position"], n_chains, seed=seed)
    k_warm, k_samp = jax.random.split(jax.random.key(seed))
    warmup = blackjax.meads_adaptation(ld, n_chains)
    with timed() as tw:
        (states, params), _ = warmup.run(k_warm, init, num_warmup)
        jax.block_until_ready(states)
    kernel = blackjax.ghmc(ld, **params)

    @jax.jit
    def sample(states, keys):
        def body(st, ks):
            st, info = jax.vmap(kernel.step)(ks, st)
            return st, (transform(st.position), info.is_divergent)

        return jax.lax.scan(body, states, keys)

    keys = jax.random.split(k_samp, (num_samples, n_chains))
    with timed() as ts:
        _, (draws, div) = jax.block_until_ready(sample(states, keys))
    draws = {k: np.asarray(v).T for k, v in draws.items()}
    d = diagnostics(draws)
    return dict(
        algorithm="meads (blackjax.meads_adaptation + ghmc)", metric="diagonal",
        n_chains=n_chains, num_warmup=num_warmup, num_samples=num_samples,
        wall_s=tw["wall_s"] + ts["wall_s"], compile_s=tw["compile_s"] + ts["compile_s"],
        warmup_s=tw["run_s"], sampling_s=ts["run_s"],
        leapfrog_steps_sampling=n_chains * num_samples, mean_steps_per_draw=1.0,
        simd_efficiency=1.0, batched_leapfrog_steps=num_samples,
        n_divergent=int(np.sum(div)), **d)


def finish(rec: dict) -> dict:
    """Derived rates: ESS per second (sampling only, whole wall) and per gradient."""
    samp = rec.get("sampling_s")
    if samp is None:  # ours: sampling time incl. its compile; subtract the first-chunk excess
        samp = rec["sampling_s_incl_compile"]
    rec["ess_per_s_sampling"] = rec["min_ess_bulk"] / max(samp, 1e-9)
    rec["ess_per_s_wall"] = rec["min_ess_bulk"] / rec["wall_s"]
    rec["ess_per_gradient"] = rec["min_ess_bulk"] / max(rec["leapfrog_steps_sampling"], 1)
    return rec


def bare_gradient_s(prob, n_loop: int = 200) -> float:
    """Seconds per gradient of one chain inside a compiled loop (no dispatch overhead).

    ``n_loop`` tiny gradient-ascent steps in one ``fori_loop`` (each step depends on the
    last, so XLA cannot hoist the gradient out of the loop).
    """
    import jax

    ld = prob["logdensity_fn"]

    def loop(p):
        def body(_, q):
            g = jax.grad(ld)(q)
            return jax.tree.map(lambda a, b: a + 1e-12 * b, q, g)

        return jax.lax.fori_loop(0, n_loop, body, p)

    c = jax.jit(loop).lower(prob["position"]).compile()
    med, _ = time_compiled(c, (prob["position"],), repeats=3)
    return med / n_loop


def part_floor(args, env, save):
    import numpy as np

    records = []
    print(f"{'N':>6} {'ms/leapfrog':>11} {'ms/grad':>8} {'overhead':>8} {'steps/draw':>10} "
          f"{'compile_s':>9} {'warm_s':>7} {'samp_s':>7} {'minESS':>7} {'ESS/s':>7} "
          f"{'maxRhat':>7}")
    for n in args.n_stars or (1, 100, 1000):
        prob = mock_problem(max(n, 1), fit_widths=False)
        rec = run_ours(prob, 1, num_warmup=args.warmup, num_samples=args.samples,
                       chunk_size=args.chunk, dense=True, seed=args.seed,
                       max_num_doublings=args.max_doublings)
        t_grad = bare_gradient_s(prob)
        # sampling time without compile: chunks after the first are compile-free
        n_chunks = -(-args.samples // args.chunk)
        steady = ((rec["sampling_s_incl_compile"] - rec["first_sampling_chunk_s"])
                  / max(n_chunks - 1, 1))
        samp_exec = steady * n_chunks if n_chunks > 1 else rec["sampling_s_incl_compile"]
        rec["sampling_s"] = samp_exec
        rec["ms_per_leapfrog"] = 1e3 * samp_exec / max(rec["leapfrog_steps_sampling"], 1)
        rec["ms_per_gradient_bare"] = 1e3 * t_grad
        rec["nuts_overhead_ms_per_step"] = rec["ms_per_leapfrog"] - 1e3 * t_grad
        rec.update(dict(env, loadavg=list(os.getloadavg()), n_stars=n,
                        dtype=np.dtype(prob["data"].mag.dtype).name, part="floor"))
        records.append(finish(rec))
        save(records)
        print(f"{n:6d} {rec['ms_per_leapfrog']:11.3f} {1e3 * t_grad:8.3f} "
              f"{rec['nuts_overhead_ms_per_step']:8.3f} {rec['mean_steps_per_draw']:10.1f} "
              f"{rec['compile_s']:9.1f} {rec['warmup_s_incl_compile']:7.1f} "
              f"{samp_exec:7.1f} {rec['min_ess_bulk']:7.0f} {rec['ess_per_s_sampling']:7.1f} "
              f"{rec['max_rhat']:7.3f}", flush=True)
    return records


def part_many(args, env, save):
    import numpy as np

    prob = mock_problem(args.n_stars[0] if args.n_stars else 50, fit_widths=False)
    n = int(prob["data"].mag.shape[0])
    records = []
    print(f"N = {n} stars, D = {n + 4}; warm-up {args.warmup}, samples {args.samples}")
    print(f"{'algorithm':8} {'C':>4} {'wall_s':>7} {'compile':>7} {'warm':>7} {'samp':>7} "
          f"{'grads':>9} {'steps/draw':>10} {'simd':>5} {'minESS':>7} {'ESS/s':>7} "
          f"{'ESS/grad':>9} {'maxRhat':>7}")
    for c in args.chains:
        for alg in args.algorithms:
            if alg == "nuts":
                rec = run_ours(prob, c, num_warmup=args.warmup, num_samples=args.samples,
                               chunk_size=args.chunk, dense=False, seed=args.seed,
                               max_num_doublings=args.max_doublings)
                n_chunks = -(-args.samples // args.chunk)
                steady = ((rec["sampling_s_incl_compile"] - rec["first_sampling_chunk_s"])
                          / max(n_chunks - 1, 1))
                rec["sampling_s"] = (steady * n_chunks if n_chunks > 1
                                     else rec["sampling_s_incl_compile"])
                rec["warmup_s"] = rec["wall_s"] - rec["compile_s"] - rec["sampling_s"]
            elif alg == "chees":
                rec = run_chees(prob, c, num_warmup=args.warmup, num_samples=args.samples,
                                seed=args.seed)
            elif alg == "meads":
                rec = run_meads(prob, c, num_warmup=args.warmup,
                                num_samples=args.samples, seed=args.seed)
            else:
                raise ValueError(f"unknown algorithm {alg!r}")
            rec.update(dict(env, loadavg=list(os.getloadavg()), n_stars=n,
                            dtype=np.dtype(prob["data"].mag.dtype).name, part="many"))
            rec = finish(rec)
            records.append(rec)
            save(records)
            print(f"{alg:8} {c:4d} {rec['wall_s']:7.1f} {rec['compile_s']:7.1f} "
                  f"{rec['warmup_s']:7.1f} {rec['sampling_s']:7.1f} "
                  f"{rec['leapfrog_steps_sampling']:9d} {rec['mean_steps_per_draw']:10.1f} "
                  f"{rec['simd_efficiency']:5.2f} {rec['min_ess_bulk']:7.0f} "
                  f"{rec['ess_per_s_sampling']:7.1f} {rec['ess_per_gradient']:9.2e} "
                  f"{rec['max_rhat']:7.3f}", flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("floor", "many"), required=True)
    p.add_argument("--device", choices=("cpu", "gpu"), default=None)
    p.add_argument("--x64", action="store_true")
    p.add_argument("--n-stars", type=int, nargs="+", default=None,
                   help="floor: N list (default 1 100 1000); many: N (default 50)")
    p.add_argument("--chains", type=int, nargs="+", default=[64, 128])
    p.add_argument("--algorithms", nargs="+", default=["nuts", "chees"],
                   choices=("nuts", "chees", "meads"))
    p.add_argument("--warmup", type=int, default=None, help="default 200 floor / 150 many")
    p.add_argument("--samples", type=int, default=None, help="default 200 floor / 100 many")
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--max-doublings", type=int, default=10, help="NUTS maximum tree depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.warmup = args.warmup or (200 if args.part == "floor" else 150)
    args.samples = args.samples or (200 if args.part == "floor" else 100)
    select_device(args.device, args.x64)
    env = environment()
    print(f"device {env['device']}; jax {env['jax']}; blackjax {env['blackjax']}; load "
          f"average {env['loadavg'][0]:.2f}", flush=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out or RESULTS / f"bench_sampler_{args.part}_{env['platform']}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    def save(records):  # after every run, so that an interrupted run keeps its records
        out = {"script": "scripts/bench_sampler.py", "command": command,
               "environment": env, "loadavg_end": list(os.getloadavg()), "records": records}
        path.write_text(json.dumps(out, indent=1) + "\n")

    if args.part == "floor":
        part_floor(args, env, save)
    else:
        part_many(args, env, save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
