"""Binaries and field stars on mocks: the full model against the textbook model (issue 5).

Each mock is M67-like (log age 9.6, [Fe/H] 0, 850 pc, A_V 0.1) with a binary fraction
``--f-bin`` (default 0.3, q uniform in [0.1, 1]) and a field fraction ``--f-field``
(default 0.1), Gaia DR3-like errors and G <= 19. It is fitted twice:

* the **full model**: unresolved binaries, the field/outlier mixture and the selection
  function (``binaries=True, field=True, selection=True``);
* the **textbook model**: single stars, every star a member (what the full model removes).

Both are the marginal model by default (every star's mass and q integrated out,
:mod:`clusterhbm.marginal`); ``--latent`` fits the latent-mass model instead, which does
not mix with binaries and field stars (``scripts/mixture_mixing_check.py``).

For each fit the script reports every population parameter's z-score against the truth,
R-hat, bulk ESS, divergences and wall time; for the full model also f_bin and f_field and
the ROC AUC of the per-star membership probability (field stars against members) and of
the per-star binary probability (true binaries against true single members). Writes
``benchmarks/results/mixture_study.json`` (rewritten after every fit).

    python scripts/mixture_study.py                      # 1 mock, 300 stars, 2 x (500+500)
    python scripts/mixture_study.py --n-stars 500 --chains 4 --warmup 1000 --samples 1000 \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from clusterhbm.fit import fit_cluster
from clusterhbm.marginal import MarginalOptions
from clusterhbm.results import versions
from clusterhbm.simulate import ClusterParams, simulate_cluster

ROOT = Path(__file__).resolve().parents[1]
MEANS = ("log_age", "feh", "distance_pc", "av_mag")


def roc_auc(score, positive) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative),
    ties counting one half (the Mann-Whitney U statistic over n_pos * n_neg)."""
    score = np.asarray(score, float)
    positive = np.asarray(positive, bool)
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def fit_row(res, truth: dict, sim, wall: float) -> dict:
    """z-scores, diagnostics and (full model) classification quality of one fit."""
    s = res.summary()
    steps = np.asarray(res.sampler["num_integration_steps"])
    row = {"wall_s": wall, "divergent": int(res.num_divergent),
           "steps_per_draw": float(steps.mean()), "n_stars": len(res.source_id),
           "params": {}}
    for k, v in truth.items():
        if k not in s:
            continue
        row["params"][k] = {"truth": v, "mean": s[k]["mean"], "sd": s[k]["sd"],
                            "z": (s[k]["mean"] - v) / s[k]["sd"], "rhat": s[k]["rhat"],
                            "ess_bulk": s[k]["ess_bulk"]}
    t = sim.truth
    idx = {int(sid): i for i, sid in enumerate(np.asarray(t["source_id"]))}
    rows = np.array([idx[int(sid)] for sid in res.source_id])
    is_field = np.asarray(t["is_field"], bool)[rows]
    is_bin = np.asarray(t["is_binary"], bool)[rows] & ~is_field
    if "p_member" in res.stars:
        pm = np.asarray(res.stars["p_member"]).mean(axis=(0, 1))
        row["membership"] = {
            "auc": roc_auc(pm, ~is_field), "n_field": int(is_field.sum()),
            "field_with_p_member_lt_0.5": int((pm[is_field] < 0.5).sum()),
            "members_with_p_member_gt_0.5": int((pm[~is_field] > 0.5).sum()),
            "n_members": int((~is_field).sum())}
    if "p_binary" in res.stars:
        pb = np.asarray(res.stars["p_binary"]).mean(axis=(0, 1))
        members = ~is_field
        q = np.asarray(t["q"], float)[rows]
        row["binaries"] = {
            "auc": roc_auc(pb[members], is_bin[members]),
            "auc_q_gt_0.5": roc_auc(pb[members & (~is_bin | (q > 0.5))],
                                    is_bin[members & (~is_bin | (q > 0.5))]),
            "n_binaries": int(is_bin.sum()),
            "binaries_with_p_binary_gt_0.5": int((pb[is_bin] > 0.5).sum()),
            "singles_with_p_binary_gt_0.5": int((pb[members & ~is_bin] > 0.5).sum())}
    return row


def show(label: str, row: dict) -> None:
    zs = " ".join(f"{k}:{v['z']:+.1f}" for k, v in row["params"].items())
    rh = max(v["rhat"] for v in row["params"].values())
    ess = min(v["ess_bulk"] for v in row["params"].values())
    extra = ""
    if "membership" in row:
        extra += f" | member AUC {row['membership']['auc']:.3f}"
    if "binaries" in row:
        extra += f" | binary AUC {row['binaries']['auc']:.3f}"
    print(f"{label}: {zs} | max R-hat {rh:.3f} | min ESS {ess:.0f} | div {row['divergent']}"
          f" | {row['steps_per_draw']:.0f} steps/draw | {row['wall_s']:.0f} s{extra}",
          flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-stars", type=int, default=300)
    p.add_argument("--f-bin", type=float, default=0.3)
    p.add_argument("--f-field", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--max-doublings", type=int, default=10)
    p.add_argument("--linear", action="store_true",
                   help="linear interpolation (default cubic: docs/performance.md)")
    p.add_argument("--models", default="full,textbook")
    p.add_argument("--latent", action="store_true",
                   help="the latent-mass model (does not mix with binaries and field; "
                        "default: the marginal model, clusterhbm.marginal)")
    p.add_argument("--n-q", type=int, default=24, help="mass-ratio bins (marginal)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/mixture_study.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pop = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1}
    params = ClusterParams(**pop, f_bin=a.f_bin, f_field=a.f_field)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    load0 = os.getloadavg()
    for seed in a.seeds:
        sim = simulate_cluster(params, n_stars=a.n_stars, seed=3000 + seed,
                               cubic=not a.linear)
        for model in a.models.split(","):
            full = model == "full"
            truth = dict(pop, **({"f_bin": a.f_bin} if full else {}))
            if full:
                # the fitted field fraction is of the catalogue after the G limit
                truth["f_field"] = float(np.mean(sim.truth["is_field"]))
            t0 = time.perf_counter()
            res = fit_cluster(sim.catalogue, num_chains=a.chains, num_warmup=a.warmup,
                              num_samples=a.samples, seed=seed, fit_widths=False,
                              cubic=not a.linear, binaries=full, field=full,
                              selection=full, g_lim=19.0 if full else None,
                              max_num_doublings=a.max_doublings, truth=truth,
                              marginal=not a.latent, member_prob_column=None,
                              marginal_options=MarginalOptions(n_q=a.n_q))
            row = fit_row(res, truth, sim, time.perf_counter() - t0)
            row.update({"model": model, "seed": seed})
            rows.append(row)
            show(f"seed {seed} {model}", row)
            out.write_text(json.dumps({
                "script": "scripts/mixture_study.py", "args": vars(a), "truth": pop,
                "versions": versions(), "loadavg_start": load0,
                "loadavg_end": os.getloadavg(), "rows": rows}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
