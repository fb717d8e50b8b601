"""Fit results: population and per-star draws, diagnostics, provenance; HDF5 round trip.

The HDF5 layout (``format`` attribute ``clusterhbm-fit``, ``format_version`` 1)::

    /population/<name>      (C, S)      population draws (physical units)
    /stars/<name>           (C, S', N)  per-star draws (thinned to S' <= max_star_draws)
    /stars/source_id        (N,)
    /sampler/<name>         (C, S)      is_divergent, num_integration_steps, energy, ...
    /sampler/step_size      (C,)
    /sampler/inverse_mass_matrix  (C, D)
    attrs: settings, timings, versions, grid_sha256, truth (JSON)
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .diagnostics import (
    diagnostic_warnings,
    ebfmi,
    format_summary_table,
    summarize,
)

__all__ = ["FORMAT_VERSION", "FitResult", "load_results", "versions"]

FORMAT_VERSION = 1
_FORMAT = "clusterhbm-fit"
#: summary order of population parameters
SUMMARY_ORDER = ("log_age", "feh", "distance_pc", "av_mag", "sigma_log_age", "sigma_feh",
                 "sigma_distance_pc", "sigma_av_mag", "f_bin", "f_field", "mf_slope",
                 "parallax_zp_mas")


def versions() -> dict:
    """Versions of the software that produced a result."""
    import blackjax
    import jax
    import jaxlib

    from .grid import GRID_SHA256

    return {"clusterhbm": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "blackjax": blackjax.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "grid_sha256": GRID_SHA256,
            "device": str(jax.devices()[0].device_kind)}


@dataclass
class FitResult:
    """The outcome of :func:`clusterhbm.fit.fit_cluster`.

    population : name -> (C, S) draws; stars : name -> (C, S', N) draws; source_id : (N,);
    sampler : NUTS statistics per draw and the adapted step sizes / mass matrices;
    settings, timings, meta : dicts (JSON-serialisable); truth : optional true values.
    """

    population: dict
    stars: dict
    source_id: np.ndarray
    sampler: dict
    settings: dict
    timings: dict
    meta: dict = field(default_factory=versions)
    truth: dict | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_sampler(cls, out, *, source_id, settings, timings, truth=None,
                     max_star_draws: int = 250):
        pop = {k: np.asarray(v) for k, v in out.samples["pop"].items()}
        stars = {k: np.asarray(v) for k, v in out.samples["star"].items()}
        n_draws = next(iter(stars.values())).shape[1] if stars else 0
        step = max(1, int(np.ceil(n_draws / max_star_draws)))
        stars = {k: v[:, ::step] for k, v in stars.items()}
        sampler = {k: np.asarray(v) for k, v in out.info.items()}
        sampler["step_size"] = np.asarray(out.step_size)
        sampler["inverse_mass_matrix"] = np.asarray(out.inverse_mass_matrix)
        settings = dict(settings, star_thin=step)
        return cls(population=pop, stars=stars, source_id=np.asarray(source_id),
                   sampler=sampler, settings=settings, timings=dict(timings),
                   truth=None if truth is None else {k: float(v) for k, v in truth.items()})

    # ---------------------------------------------------------------- diagnostics
    @property
    def num_chains(self) -> int:
        return int(next(iter(self.sampler.values())).shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.sampler["is_divergent"].shape[1])

    @property
    def num_divergent(self) -> int:
        return int(np.sum(self.sampler["is_divergent"]))

    @property
    def treedepth_hits(self) -> int:
        depth = self.settings.get("max_num_doublings", 10)
        return int(np.sum(self.sampler["num_trajectory_expansions"] >= depth))

    def summary(self) -> dict:
        """Per population parameter: mean, sd, q05, q50, q95, rhat, ess_bulk, ess_tail."""
        ordered = {k: self.population[k] for k in SUMMARY_ORDER if k in self.population}
        ordered.update({k: v for k, v in self.population.items() if k not in ordered})
        return summarize(ordered)

    def warnings(self) -> list[str]:
        return diagnostic_warnings(
            self.summary(), num_divergent=self.num_divergent,
            num_samples_total=self.num_chains * self.num_draws,
            max_treedepth_hits=self.treedepth_hits,
            ebfmi=ebfmi(self.sampler["energy"]))

    def summary_json(self) -> dict:
        """Machine-readable summary (stable names; see ``clusterhbm summary --json``)."""
        return {
            "parameters": {k: {kk: float(vv) for kk, vv in v.items()}
                           for k, v in self.summary().items()},
            "divergences": self.num_divergent,
            "treedepth_hits": self.treedepth_hits,
            "ebfmi": [float(x) for x in ebfmi(self.sampler["energy"])],
            "n_stars": int(self.source_id.shape[0]),
            "chains": self.num_chains,
            "draws": self.num_draws,
            "wall_s": float(self.timings.get("wall_s", np.nan)),
            "pooled": bool(self.settings.get("pooled", True)),
            "truth": self.truth,
            "warnings": self.warnings(),
        }

    def summary_text(self) -> str:
        lines = [format_summary_table(self.summary(), truth=self.truth)]
        n = self.num_chains * self.num_draws
        lines.append(
            f"{self.source_id.shape[0]} stars, {self.num_chains} chains x {self.num_draws} "
            f"draws; divergences {self.num_divergent} ({100 * self.num_divergent / n:.2f}%);"
            f" tree-depth hits {self.treedepth_hits}; E-BFMI "
            + ", ".join(f"{x:.2f}" for x in ebfmi(self.sampler["energy"]))
            + f"; wall {self.timings.get('wall_s', float('nan')):.1f} s")
        for w in self.warnings():
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)

    def star_table(self):
        """Per-star posterior summaries (median and 16/84% of each per-star quantity)."""
        from astropy.table import Table

        t = Table()
        t["source_id"] = self.source_id
        for k, v in self.stars.items():
            flat = v.reshape(-1, v.shape[-1])
            q = np.percentile(flat, [16, 50, 84], axis=0)
            t[f"{k}_q50"] = q[1]
            t[f"{k}_q16"] = q[0]
            t[f"{k}_q84"] = q[2]
        return t

    # ---------------------------------------------------------------- I/O
    def to_hdf5(self, path) -> Path:
        path = Path(path)
        with h5py.File(path, "w") as h:
            h.attrs["format"] = _FORMAT
            h.attrs["format_version"] = FORMAT_VERSION
            for grp, d in (("population", self.population), ("stars", self.stars),
                           ("sampler", self.sampler)):
                g = h.create_group(grp)
                for k, v in d.items():
                    v = np.asarray(v)
                    kw = {"compression": "gzip", "shuffle": True} if v.size > 1000 else {}
                    g.create_dataset(k, data=v, **kw)
            h["stars"].create_dataset("source_id", data=self.source_id)
            h.attrs["settings"] = json.dumps(self.settings, default=_json_default)
            h.attrs["timings"] = json.dumps(self.timings, default=_json_default)
            h.attrs["meta"] = json.dumps(self.meta, default=_json_default)
            h.attrs["truth"] = json.dumps(self.truth, default=_json_default)
        return path

    @classmethod
    def from_hdf5(cls, path) -> FitResult:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"results file not found: {path}")
        try:
            with h5py.File(path, "r") as h:
                if h.attrs.get("format") != _FORMAT:
                    raise ValueError(f"{path} is not a clusterhbm results file")
                ver = int(h.attrs.get("format_version", -1))
                if ver != FORMAT_VERSION:
                    raise ValueError(f"{path} has results format version {ver}; this "
                                     f"clusterhbm reads version {FORMAT_VERSION}")
                pop = {k: h["population"][k][()] for k in h["population"]}
                stars = {k: h["stars"][k][()] for k in h["stars"] if k != "source_id"}
                sid = h["stars"]["source_id"][()]
                sampler = {k: h["sampler"][k][()] for k in h["sampler"]}
                settings = json.loads(h.attrs["settings"])
                timings = json.loads(h.attrs["timings"])
                meta = json.loads(h.attrs["meta"])
                truth = json.loads(h.attrs["truth"])
        except (OSError, KeyError) as exc:
            raise ValueError(f"results file {path} is corrupt or incomplete: {exc}") from exc
        return cls(population=pop, stars=stars, source_id=sid, sampler=sampler,
                   settings=settings, timings=timings, meta=meta, truth=truth)

    def to_arviz(self):
        """An ArviZ InferenceData (needs ``arviz``): posterior + sample_stats."""
        import arviz as az

        post = dict(self.population)
        stats = {"diverging": self.sampler["is_divergent"],
                 "n_steps": self.sampler["num_integration_steps"],
                 "tree_depth": self.sampler["num_trajectory_expansions"],
                 "acceptance_rate": self.sampler["acceptance_rate"],
                 "energy": self.sampler["energy"], "lp": self.sampler["logdensity"]}
        return az.from_dict(posterior=post, sample_stats=stats)


def load_results(path) -> FitResult:
    """Read a results file written by :meth:`FitResult.to_hdf5`."""
    return FitResult.from_hdf5(path)


def _json_default(x):
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")
