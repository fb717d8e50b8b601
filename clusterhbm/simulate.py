"""Mock clusters with known truth: IMF, binaries, field stars, Gaia-like errors, a limit.

Pure core: :func:`draw_stars` draws one batch of systems of one kind (single members,
binary members, or field stars) and observes them; it is a jittable function of an
``rng_key`` and arrays. Thin shell: :func:`simulate_cluster` validates the request, calls
the core in batches until the catalogue holds ``n_stars`` detected systems, and builds the
catalogue (Gaia archive column names, see :mod:`clusterhbm.catalogue`) and the truth table.

Definitions
-----------
* Members: per-star log age, [Fe/H] and distance are Normal(mean, width); A_V is
  Normal(mean, width) truncated at 0. Widths may be zero.
* ``binary_fraction`` and ``field_fraction`` are fractions *of the catalogue* (after the
  magnitude limits): the number of field stars is Binomial(n_stars, f_field) and the number
  of binaries among members Binomial(n_members, f_bin). These are the mixture weights a
  model of the catalogue estimates.
* Binaries: unresolved; the secondary has mass q * m1 with q ~ Uniform(q_min, 1) and the
  primary's age, [Fe/H], distance and A_V; fluxes add in every band. A secondary below the
  grid's lowest mass adds no flux.
* Field stars: ages Uniform in log age, [Fe/H] Normal, distances with p(d) ∝ d^2 over a
  range around the cluster, A_V growing with distance, masses from the same IMF, broad
  proper motions, uniform positions (see :class:`FieldModel`).
* Observation: median errors and log-normal per-star spread from :mod:`clusterhbm.errors`
  (calibrated on Gaia DR3 clusters); observed = true + Normal(0, error); parallax gets an
  optional zero-point offset (observed = 1000/d + zp); the magnitude limits act on the
  observed G.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from .catalogue import write_catalogue
from .errors import draw_errors
from .grid import ModelGrid, band_indices, load_grid
from .imf import check_imf, sample_imf
from .photometry import observables_from_mass

__all__ = [
    "POP_NAMES",
    "ClusterParams",
    "FieldModel",
    "ObservingModel",
    "SimulatedCluster",
    "draw_stars",
    "read_simulation",
    "simulate_cluster",
    "write_simulation",
]

log = logging.getLogger(__name__)

#: Stable names of the population parameters (shared with the model's summaries).
POP_NAMES = ("log_age", "feh", "distance_pc", "av_mag", "sigma_log_age", "sigma_feh",
             "sigma_distance_pc", "sigma_av_mag", "f_bin", "f_field")
_GAIA = ("G", "BP", "RP")
_KIND_SINGLE, _KIND_BINARY, _KIND_FIELD = 0, 1, 2


class ClusterParams(NamedTuple):
    """Population parameters of a cluster (truth for a mock; units in the names).

    log_age : log10(age/yr); feh : dex; distance_pc : pc; av_mag : mag (V band, R_V=3.1);
    sigma_* : the widths (standard deviations) of each; f_bin, f_field : fractions of the
    catalogue.
    """

    log_age: float = 9.6
    feh: float = 0.0
    distance_pc: float = 850.0
    av_mag: float = 0.1
    sigma_log_age: float = 0.0
    sigma_feh: float = 0.0
    sigma_distance_pc: float = 0.0
    sigma_av_mag: float = 0.0
    f_bin: float = 0.0
    f_field: float = 0.0


class FieldModel(NamedTuple):
    """The broad field population behind and in front of the cluster.

    log_age_range : uniform in log10(age/yr)
    feh_mean, feh_sd : Normal [Fe/H], truncated to the grid
    distance_factor : distances in [lo, hi] x the cluster distance, p(d) ∝ d^2
    av_per_kpc : A_V [mag] per kpc along the line of sight (times Uniform(0.5, 1.5))
    pm_mean_masyr, pm_sd_masyr : proper-motion Normal (both components)
    """

    log_age_range: tuple = (8.5, 10.1)
    feh_mean: float = -0.1
    feh_sd: float = 0.2
    distance_factor: tuple = (0.3, 3.0)
    av_per_kpc: float = 0.15
    pm_mean_masyr: tuple = (-3.0, -3.0)
    pm_sd_masyr: float = 6.0


class ObservingModel(NamedTuple):
    """Survey and sky geometry of the mock.

    g_lim, g_bright : faint and bright limits on observed G [mag] (None: no limit)
    parallax_zp_mas : zero-point offset added to every observed parallax [mas]
    ra_deg, dec_deg : cluster centre; core_deg: Gaussian sigma of member positions
    field_halfwidth_deg : field stars uniform in a box of this half-width
    pm_masyr : cluster mean proper motion (pmra, pmdec); pm_disp_masyr : its dispersion
    mag_systematic_mag : unreported scatter [mag] added to every observed G, BP and RP
        beyond the catalogue errors (which stay as reported): what the fit's
        ``Priors.mag_floor`` (0.01 by default) stands for. 0 (the default): the mock
        scatters by exactly its reported errors; set it equal to the fit's floor when the
        mocks must be drawn from the model the fit assumes (coverage checks)
    """

    g_lim: float | None = 19.0
    g_bright: float | None = None
    parallax_zp_mas: float = 0.0
    ra_deg: float = 132.846
    dec_deg: float = 11.814
    core_deg: float = 0.15
    field_halfwidth_deg: float = 1.0
    pm_masyr: tuple = (-10.97, -2.94)
    pm_disp_masyr: float = 0.15
    mag_systematic_mag: float = 0.0


class SimulatedCluster(NamedTuple):
    """A mock: the catalogue, one truth row per catalogue row, and the population."""

    catalogue: Table
    truth: Table
    params: ClusterParams


def _validate(params: ClusterParams, grid: ModelGrid, imf: str, m_min, m_max, q_min,
              n_stars):
    iso = grid.iso
    age_lo, age_hi = float(iso.log_age[0]), float(iso.log_age[-1])
    feh_lo, feh_hi = float(iso.feh[0]), float(iso.feh[-1])
    if not age_lo <= params.log_age <= age_hi:
        raise ValueError(f"log_age={params.log_age} outside the grid [{age_lo}, {age_hi}]")
    if not feh_lo <= params.feh <= feh_hi:
        raise ValueError(f"feh={params.feh} outside the grid [{feh_lo}, {feh_hi}]")
    if not params.distance_pc > 0:
        raise ValueError(f"distance_pc must be > 0, got {params.distance_pc}")
    if not 0 <= params.av_mag <= 6:
        raise ValueError(f"av_mag must be in [0, 6] (the BC table), got {params.av_mag}")
    for name in ("sigma_log_age", "sigma_feh", "sigma_distance_pc", "sigma_av_mag"):
        v = getattr(params, name)
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0 (a width), got {v}")
    for name in ("f_bin", "f_field"):
        v = getattr(params, name)
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    check_imf(imf, m_min, m_max)
    if not 0 <= q_min < 1:
        raise ValueError(f"q_min must be in [0, 1), got {q_min}")
    if int(n_stars) < 1:
        raise ValueError(f"n_stars must be >= 1, got {n_stars}")


def _add_mags(m1, m2, has2):
    """Magnitude of two unresolved stars (m2 ignored where ``has2`` is False)."""
    f = 10.0 ** (-0.4 * m1) + jnp.where(has2, 10.0 ** (-0.4 * jnp.where(has2, m2, 0.0)), 0.0)
    return -2.5 * jnp.log10(f)


def draw_stars(rng_key, params: ClusterParams, field: FieldModel, obs: ObservingModel,
               grid: ModelGrid, *, n: int, kind: int, imf: str = "kroupa",
               m_min: float = 0.1, m_max: float = 20.0, q_min: float = 0.1, alpha=2.35,
               cubic: bool = False):
    """Draw and observe ``n`` systems of one kind (pure; jit with ``n``, ``imf``, ``cubic``
    static).

    ``kind``: 0 single members, 1 binary members, 2 field stars (may be traced).
    ``cubic``: the forward model's interpolation scheme (see :mod:`clusterhbm.isochrone`).

    Returns a dict of arrays of shape (n,) (``*_true`` and observed quantities, the
    per-star parameters, ``alive`` (inside the grid) and ``detected`` (alive and within
    the magnitude limits)).
    """
    ks = jax.random.split(rng_key, 12)
    band_idx = band_indices(_GAIA)
    mass = sample_imf(ks[0], n, kind=imf, m_min=m_min, m_max=m_max, alpha=alpha)
    z = jax.random.normal(ks[1], (4, n))
    is_field = jnp.full((n,), kind == _KIND_FIELD)
    # field stars
    lo, hi = field.log_age_range
    f_age = jax.random.uniform(ks[2], (n,), minval=lo, maxval=hi)
    f_feh = jnp.clip(field.feh_mean + field.feh_sd * z[1], grid.iso.feh[0], grid.iso.feh[-1])
    d_lo, d_hi = (params.distance_pc * f for f in field.distance_factor)
    u = jax.random.uniform(ks[3], (n,))
    f_dist = (d_lo ** 3 + u * (d_hi ** 3 - d_lo ** 3)) ** (1.0 / 3.0)
    f_av = jnp.clip(field.av_per_kpc * f_dist / 1000.0
                    * jax.random.uniform(ks[4], (n,), minval=0.5, maxval=1.5), 0.0, 6.0)
    # members; A_V ~ Normal(mean, width) truncated at 0
    sig = jnp.maximum(params.sigma_av_mag, 1e-12)
    tn = jax.random.truncated_normal(ks[10], -params.av_mag / sig, jnp.inf, (n,))
    m_av = jnp.where(params.sigma_av_mag > 0, params.av_mag + sig * tn, params.av_mag)
    log_age = jnp.where(is_field, f_age, params.log_age + params.sigma_log_age * z[0])
    feh = jnp.where(is_field, f_feh, params.feh + params.sigma_feh * z[1])
    dist = jnp.where(is_field, f_dist, params.distance_pc + params.sigma_distance_pc * z[2])
    av = jnp.where(is_field, f_av, m_av)
    is_binary = jnp.full((n,), kind == _KIND_BINARY)
    q = jax.random.uniform(ks[5], (n,), minval=q_min, maxval=1.0)
    mass2 = jnp.where(is_binary, q * mass, 0.0)

    def one(m, a, f, d, v):
        return observables_from_mass(grid, m, a, f, d, v, band_idx, cubic=cubic)

    o1 = jax.vmap(one)(mass, log_age, feh, dist, av)
    o2 = jax.vmap(one)(jnp.maximum(mass2, 1e-3), log_age, feh, dist, av)
    lit2 = is_binary & o2.valid
    mags = _add_mags(o1.mags, o2.mags, lit2[:, None])
    alive = o1.valid
    errs = draw_errors(ks[6], mags[:, 0], bands=_GAIA)
    e = jax.random.normal(ks[7], (4, n))
    sys2 = obs.mag_systematic_mag ** 2
    g, bp, rp = (mags[:, k] + jnp.sqrt(errs[b] ** 2 + sys2) * e[k]
                 for k, b in enumerate(_GAIA))
    plx_true = 1000.0 / dist
    plx = plx_true + obs.parallax_zp_mas + errs["parallax"] * e[3]
    detected = alive
    if obs.g_lim is not None:
        detected = detected & (g <= obs.g_lim)
    if obs.g_bright is not None:
        detected = detected & (g >= obs.g_bright)
    # astrometry for the membership module: positions and proper motions
    pe = jax.random.normal(ks[8], (4, n))
    pm_err = 1.1 * errs["parallax"]  # DR3: sigma_pm [mas/yr] ~ 1.1 sigma_parallax [mas]
    hw = obs.field_halfwidth_deg
    uu = jax.random.uniform(ks[9], (2, n), minval=-hw, maxval=hw)
    rr = obs.core_deg * jax.random.normal(ks[11], (2, n))
    cosd = jnp.cos(jnp.deg2rad(obs.dec_deg))
    ra = obs.ra_deg + jnp.where(is_field, uu[0], rr[0]) / cosd
    dec = obs.dec_deg + jnp.where(is_field, uu[1], rr[1])
    pmra_t = jnp.where(is_field, field.pm_mean_masyr[0] + field.pm_sd_masyr * pe[0],
                       obs.pm_masyr[0] + obs.pm_disp_masyr * pe[0])
    pmdec_t = jnp.where(is_field, field.pm_mean_masyr[1] + field.pm_sd_masyr * pe[1],
                        obs.pm_masyr[1] + obs.pm_disp_masyr * pe[1])
    pmra = pmra_t + pm_err * pe[2]
    pmdec = pmdec_t + pm_err * pe[3]
    return {
        "mass_msun": mass, "mass2_msun": mass2, "q": jnp.where(is_binary, q, 0.0),
        "is_binary": is_binary, "is_field": is_field,
        "log_age": log_age, "feh": feh, "distance_pc": dist, "av_mag": av,
        "eep": o1.props.eep, "phase": o1.props.phase,
        "G_true": mags[:, 0], "BP_true": mags[:, 1], "RP_true": mags[:, 2],
        "parallax_true": plx_true,
        "G": g, "BP": bp, "RP": rp, "G_err": errs["G"], "BP_err": errs["BP"],
        "RP_err": errs["RP"], "parallax": plx, "parallax_err": errs["parallax"],
        "ra": ra, "dec": dec, "pmra": pmra, "pmdec": pmdec, "pm_err": pm_err,
        "alive": alive, "detected": detected,
    }


_draw_jit = jax.jit(draw_stars, static_argnames=("n", "imf", "cubic"))


def simulate_cluster(params: ClusterParams | None = None, *, n_stars: int = 1000,
                     rng_key=None, seed: int | None = None, imf: str = "kroupa",
                     m_min: float = 0.1, m_max: float = 20.0, q_min: float = 0.1,
                     alpha: float = 2.35, field: FieldModel | None = None,
                     observing: ObservingModel | None = None,
                     grid: ModelGrid | None = None, batch: int = 8192,
                     cubic: bool = False) -> SimulatedCluster:
    """Simulate a cluster catalogue of ``n_stars`` detected systems with known truth.

    Parameters
    ----------
    params : ClusterParams
        Population truth (default: an M67-like cluster without spreads, binaries or field).
    n_stars : int
        Systems in the catalogue (after the magnitude limits).
    rng_key, seed
        Explicit JAX key, or an integer seed (``rng_key`` wins). One of them is required.
    imf : {"kroupa", "chabrier", "powerlaw"}; m_min, m_max : mass limits [Msun];
    alpha : power-law slope; q_min : lowest binary mass ratio.
    field, observing : FieldModel, ObservingModel (defaults: see the classes).
    cubic : interpolate the grid with the C1 cubic scheme instead of the linear one. A mock
        meant to test a fit's inference should use the fit's scheme: the two agree at grid
        nodes but not between them, and not at random: over an M67-like mock the cubic
        stars are 2.8 mmag brighter in G and 3.5 mmag bluer in BP-RP on average
        (``scripts/scheme_offset_check.py``), against 0.45 mmag for the distance modulus
        that 500 stars' G alone fix. A linear mock of 500 stars fitted cubic gave the
        distance 4.9 sd low.

    Returns
    -------
    SimulatedCluster

    Raises
    ------
    ValueError
        for a population outside the grid, a negative width, a fraction outside [0, 1],
        an unknown IMF, or bad mass limits; the message gives the allowed range.
    """
    params = ClusterParams() if params is None else ClusterParams(*params)
    field = FieldModel() if field is None else field
    observing = ObservingModel() if observing is None else observing
    grid = load_grid() if grid is None else grid
    _validate(params, grid, imf, m_min, m_max, q_min, n_stars)
    if not observing.mag_systematic_mag >= 0:
        raise ValueError("observing.mag_systematic_mag must be >= 0 [mag], got "
                         f"{observing.mag_systematic_mag!r}")
    if rng_key is None:
        if seed is None:
            raise ValueError("give rng_key= or seed=")
        rng_key = jax.random.key(int(seed))
    k_counts, k_draw = jax.random.split(rng_key)
    kc = np.asarray(jax.random.key_data(k_counts)).ravel()
    rng = np.random.default_rng(kc.astype(np.uint64))
    n_field = int(rng.binomial(n_stars, params.f_field))
    n_bin = int(rng.binomial(n_stars - n_field, params.f_bin))
    quotas = {_KIND_SINGLE: n_stars - n_field - n_bin, _KIND_BINARY: n_bin,
              _KIND_FIELD: n_field}
    parts, stats = [], {}
    for kind, quota in quotas.items():
        got, drawn, dead, n_iter = [], 0, 0, 0
        have = 0
        while have < quota:
            k_draw, kb = jax.random.split(k_draw)
            out = _draw_jit(kb, params, field, observing, grid, n=batch, kind=kind, imf=imf,
                            m_min=m_min, m_max=m_max, q_min=q_min, alpha=alpha,
                            cubic=cubic)
            out = {k: np.asarray(v) for k, v in out.items()}
            sel = np.flatnonzero(out["detected"])[: quota - have]
            got.append({k: v[sel] for k, v in out.items()})
            have += sel.size
            drawn += batch
            dead += int(np.sum(~out["alive"]))
            n_iter += 1
            if n_iter > 2000:
                raise RuntimeError(
                    f"could not fill {quota} detected systems of kind {kind} after "
                    f"{drawn} draws: is the magnitude limit too bright for this cluster?")
        if got:
            parts.append({k: np.concatenate([g[k] for g in got]) for k in got[0]})
        stats[kind] = (drawn, dead)
        log.info("kind %d: kept %d systems from %d draws (%d outside the grid: dead or "
                 "below its lowest mass)", kind, quota, drawn, dead)
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # shuffle so that catalogue order carries no information
    perm = rng.permutation(n_stars)
    data = {k: v[perm] for k, v in data.items()}
    return _build_tables(data, params, imf, m_min, m_max, q_min, alpha, field, observing,
                         int(kc[-1]), cubic)


def _build_tables(d, params, imf, m_min, m_max, q_min, alpha, field, observing, key_tag,
                  cubic=False):
    n = d["G"].shape[0]
    ln10 = math.log(10.0)
    cat = Table()
    cat["source_id"] = np.arange(1, n + 1, dtype=np.int64)
    cat["ra"], cat["dec"] = d["ra"], d["dec"]
    cat["parallax"], cat["parallax_error"] = d["parallax"], d["parallax_err"]
    cat["pmra"], cat["pmra_error"] = d["pmra"], d["pm_err"]
    cat["pmdec"], cat["pmdec_error"] = d["pmdec"], d["pm_err"]
    for b, col in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
        cat[f"phot_{col}_mean_mag"] = d[b]
        cat[f"phot_{col}_mean_mag_error"] = d[f"{b}_err"]
        cat[f"phot_{col}_mean_flux_over_error"] = 2.5 / ln10 / d[f"{b}_err"]
    for c in cat.colnames:
        if c.startswith("phot_") and c.endswith("mag") or c.endswith("mag_error"):
            cat[c].unit = "mag"
    for c in ("parallax", "parallax_error"):
        cat[c].unit = "mas"
    cat.meta.update({
        "gaia_release": "DR3",
        "simulated": True,
        "population": {k: float(v) for k, v in params._asdict().items()},
        "imf": imf, "m_min": m_min, "m_max": m_max, "q_min": q_min, "alpha": alpha,
        "field_model": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in field._asdict().items()},
        "observing": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in observing._asdict().items()},
        "key_tag": key_tag,
        "interpolation": "cubic" if cubic else "linear",
    })
    truth = Table()
    truth["source_id"] = cat["source_id"]
    for k in ("mass_msun", "mass2_msun", "q", "is_binary", "is_field", "log_age", "feh",
              "distance_pc", "av_mag", "eep", "phase", "G_true", "BP_true", "RP_true",
              "parallax_true"):
        truth[k] = d[k]
    return SimulatedCluster(catalogue=cat, truth=truth, params=params)


def write_simulation(sim: SimulatedCluster, path, *, overwrite: bool = True):
    """Write catalogue + truth (columns prefixed ``true_``) to ECSV or HDF5, losslessly."""
    t = sim.catalogue.copy(copy_data=True)
    for c in sim.truth.colnames:
        if c != "source_id":
            t[f"true_{c}"] = sim.truth[c]
    return write_catalogue(t, path, overwrite=overwrite)


def read_simulation(path) -> SimulatedCluster:
    """Read what :func:`write_simulation` wrote."""
    from .catalogue import read_catalogue

    t = read_catalogue(path)
    truth = Table()
    truth["source_id"] = t["source_id"]
    for c in [c for c in t.colnames if c.startswith("true_")]:
        truth[c[5:]] = t[c]
        del t[c]
    params = ClusterParams(**t.meta.get("population", {}))
    return SimulatedCluster(catalogue=t, truth=truth, params=params)
