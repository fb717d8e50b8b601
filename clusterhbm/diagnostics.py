"""Convergence diagnostics for MCMC output, computed on the host in NumPy.

The estimators follow Vehtari et al. (2021), "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis 16,
667, in the form implemented by ArviZ (``arviz.rhat(method="rank")``,
``arviz.ess(method="bulk" | "tail")``, ``arviz.bfmi``), and the layout of NumPyro's
``numpyro/diagnostics.py``: every function takes draws of shape
``(n_chains, n_draws, *event)`` and returns one value per event element.

Nothing here needs JAX: inputs may be NumPy arrays, JAX arrays, lists, or anything else
:func:`numpy.asarray` accepts. Results agree with ArviZ 0.23 to floating-point rounding.

Functions
---------
split_rhat
    Rank-normalised split R-hat (the larger of the bulk and folded/tail versions).
ess_bulk, ess_tail
    Bulk and tail effective sample sizes.
ebfmi
    Energy Bayesian fraction of missing information, per chain.
summarize
    Posterior summary (mean, sd, quantiles, R-hat, ESS) for a dict of draws.
diagnostic_warnings
    Human-readable warnings when a summary or the sampler statistics cross thresholds.
format_summary_table
    An aligned plain-text table of a summary, for printing in the CLI.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import fft as _sp_fft
from scipy import special as _sp_special
from scipy import stats as _sp_stats

__all__ = [
    "diagnostic_warnings",
    "ebfmi",
    "ess_bulk",
    "ess_tail",
    "format_summary_table",
    "split_rhat",
    "summarize",
]

log = logging.getLogger(__name__)

#: Fewest draws per chain accepted (as in ArviZ; split chains then hold 2 draws each).
MIN_DRAWS = 4
#: E-BFMI below this value indicates poor exploration of the energy distribution.
EBFMI_THRESHOLD = 0.3


# ----------------------------------------------------------------------------- helpers


def _as_draws(x, *, name: str = "x") -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate draws and reshape them to ``(n_chains, n_draws, n_params)`` floats.

    Parameters
    ----------
    x : array_like, shape (n_chains, n_draws, *event)
        MCMC draws.
    name : str
        Name used in error messages.

    Returns
    -------
    draws : numpy.ndarray, shape (n_chains, n_draws, prod(event))
        Float copy (or view) of ``x`` with the event dimensions flattened.
    event_shape : tuple of int
        The trailing shape ``event``.
    """
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected an array of shape (n_chains, n_draws, *event) with at least "
            f"2 dimensions, got shape {arr.shape} (ndim={arr.ndim}); for a single chain "
            f"pass x[None, ...]"
        )
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{name}: expected real numeric draws (bool, int or float), got dtype {arr.dtype}"
        )
    n_chains, n_draws = arr.shape[:2]
    if n_chains < 1:
        raise ValueError(f"{name}: expected at least 1 chain, got shape {arr.shape}")
    if n_draws < MIN_DRAWS:
        raise ValueError(
            f"{name}: expected at least {MIN_DRAWS} draws per chain, got {n_draws} "
            f"(shape {arr.shape}, read as (n_chains, n_draws, *event))"
        )
    event_shape = arr.shape[2:]
    draws = arr.astype(float, copy=False).reshape(n_chains, n_draws, -1)
    return draws, event_shape


def _split_chains(x: np.ndarray) -> np.ndarray:
    """Split each chain into halves, dropping the middle draw when ``n_draws`` is odd.

    Parameters
    ----------
    x : numpy.ndarray, shape (n_chains, n_draws, n_params)

    Returns
    -------
    numpy.ndarray, shape (2 * n_chains, n_draws // 2, n_params)
    """
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Rank-normalise draws jointly over chains and draws, separately per parameter.

    Ranks (ties averaged) are mapped to normal scores with Blom's offset 3/8.

    Parameters
    ----------
    x : numpy.ndarray, shape (n_chains, n_draws, n_params)

    Returns
    -------
    numpy.ndarray, shape (n_chains, n_draws, n_params)
    """
    n_chains, n_draws, n_params = x.shape
    size = n_chains * n_draws
    # Rank along a contiguous last axis: sorting along a strided axis is several times slower.
    flat = np.ascontiguousarray(x.reshape(size, n_params).T)
    ranks = _sp_stats.rankdata(flat, method="average", axis=-1)
    z = _sp_special.ndtri((ranks - 0.375) / (size + 0.25))
    return z.T.reshape(x.shape)


def _rhat_classic(x: np.ndarray) -> np.ndarray:
    """Gelman-Rubin R-hat of already split (and normalised) chains.

    Parameters
    ----------
    x : numpy.ndarray, shape (n_chains, n_draws, n_params)

    Returns
    -------
    numpy.ndarray, shape (n_params,)
    """
    n_draws = x.shape[1]
    chain_mean = x.mean(axis=1)
    within = x.var(axis=1, ddof=1).mean(axis=0)
    between = n_draws * chain_mean.var(axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt((between / within + n_draws - 1) / n_draws)


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariance along the draw axis via FFT (biased, normalised by ``n_draws``).

    Parameters
    ----------
    x : numpy.ndarray, shape (n_chains, n_draws, n_params)

    Returns
    -------
    numpy.ndarray, shape (n_chains, n_draws, n_params)
        Autocovariance at lags ``0 .. n_draws - 1``.
    """
    n_draws = x.shape[1]
    m = _sp_fft.next_fast_len(2 * n_draws)
    # FFT along a contiguous last axis, (n_chains, n_params, n_draws), then back.
    centred = np.ascontiguousarray(np.swapaxes(x - x.mean(axis=1, keepdims=True), 1, 2))
    f = np.fft.rfft(centred, n=m, axis=-1)
    power = np.square(f.real) + np.square(f.imag)
    acov = np.fft.irfft(power, n=m, axis=-1)[..., :n_draws] / n_draws
    return np.swapaxes(acov, 1, 2)


def _ess(x: np.ndarray) -> np.ndarray:
    """Effective sample size of (split) chains with Geyer's initial monotone sequence.

    This is a vectorised transcription of ArviZ's ``_ess`` (itself Stan's estimator):
    autocorrelations combined over chains, truncated at the first non-positive sum of an
    adjacent (even, odd) pair, made monotone, with ``tau`` bounded below by
    ``1 / log10(n_chains * n_draws)``.

    Parameters
    ----------
    x : numpy.ndarray, shape (n_chains, n_draws, n_params)

    Returns
    -------
    numpy.ndarray, shape (n_params,)
    """
    n_chains, n_draws, n_params = x.shape
    total = n_chains * n_draws
    out = np.full(n_params, np.nan)

    finite = np.all(np.isfinite(x), axis=(0, 1))
    constant = finite & ((x.max(axis=(0, 1)) - x.min(axis=(0, 1))) < np.finfo(float).resolution)
    out[constant] = total
    todo = finite & ~constant
    if not np.any(todo):
        return out
    xs = x[:, :, todo]

    acov = _autocov(xs)  # (n_chains, n_draws, k)
    mean_acov = acov.mean(axis=0)  # (n_draws, k)
    mean_var = mean_acov[0] * n_draws / (n_draws - 1.0)
    var_plus = mean_var * (n_draws - 1.0) / n_draws
    if n_chains > 1:
        var_plus = var_plus + xs.mean(axis=1).var(axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = 1.0 - (mean_var - mean_acov) / var_plus  # (n_draws, k)
    rho[0] = 1.0

    # Pairs j = 0 .. j_max: (rho[2j], rho[2j+1]); ArviZ examines pair j >= 1 only while
    # 2j - 1 < n_draws - 3, and stops after the first pair whose sum is not positive.
    j_max = max(math.ceil(n_draws / 2) - 2, 0)
    pair_sum = rho[0 : 2 * j_max + 1 : 2] + rho[1 : 2 * j_max + 2 : 2]  # (j_max + 1, k)
    if j_max == 0:
        n_pairs = np.zeros(xs.shape[2], dtype=int)
    else:
        nonpos = pair_sum[:j_max] <= 0.0
        n_pairs = np.where(nonpos.any(axis=0), np.argmax(nonpos, axis=0), j_max)  # (k,)

    # Initial monotone sequence over the pairs kept (0 .. n_pairs - 1).
    mono = np.minimum.accumulate(pair_sum, axis=0)
    kept = np.arange(j_max + 1)[:, None] < n_pairs[None, :]
    tau = -1.0 + 2.0 * np.sum(np.where(kept, mono, 0.0), axis=0)

    # Plus the even autocorrelation that ended the sequence, as ArviZ does.
    cols = np.arange(xs.shape[2])
    last_even = rho[2 * n_pairs, cols]
    last_sum = pair_sum[n_pairs, cols]
    tau = tau + np.where((last_even > 0.0) | (last_sum >= 0.0), last_even, 0.0)

    tau = np.maximum(tau, 1.0 / np.log10(total))
    out[todo] = total / tau
    return out


def _reshape_result(values: np.ndarray, event_shape: tuple[int, ...]):
    """Return ``values`` with shape ``event_shape`` (a Python float when scalar)."""
    values = values.reshape(event_shape)
    return float(values) if values.ndim == 0 else values


def _split_rhat_flat(draws: np.ndarray, split: np.ndarray, z_split: np.ndarray) -> np.ndarray:
    """R-hat from draws ``(n_chains, n_draws, k)``, their split and its z-scores -> ``(k,)``."""
    rhat_bulk = _rhat_classic(z_split)
    folded = np.abs(split - np.median(split, axis=(0, 1)))
    rhat_tail = _rhat_classic(_z_scale(folded))
    rhat = np.maximum(rhat_bulk, rhat_tail)  # NaN if either is NaN
    rhat[np.any(np.isnan(draws), axis=(0, 1))] = np.nan
    return rhat


def _ess_bulk_flat(draws: np.ndarray, z_split: np.ndarray) -> np.ndarray:
    """Bulk ESS from draws ``(n_chains, n_draws, k)`` and z-scores of their split -> ``(k,)``."""
    ess = _ess(z_split)
    ess[np.any(np.isnan(draws), axis=(0, 1))] = np.nan
    return ess


def _ess_tail_flat(draws: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Tail ESS from draws ``(n_chains, n_draws, k)`` at ``probs`` (2,) -> ``(k,)``."""
    finite = np.all(np.isfinite(draws), axis=(0, 1))
    safe = np.where(finite, draws, 0.0)
    quantiles = np.quantile(safe.reshape(-1, safe.shape[2]), probs, axis=0)  # (2, k)
    ess = np.minimum(
        _ess(_split_chains((safe <= quantiles[0]).astype(float))),
        _ess(_split_chains((safe <= quantiles[1]).astype(float))),
    )
    ess[~finite] = np.nan
    return ess


# --------------------------------------------------------------------------- public API


def split_rhat(x):
    """Rank-normalised split R-hat (Vehtari et al. 2021).

    Each chain is split in half (the middle draw is dropped when ``n_draws`` is odd), the
    draws are rank-normalised jointly over all half-chains, and the classic Gelman-Rubin
    statistic is computed for the normalised draws (bulk) and for the normalised absolute
    deviations from the median (folded, sensitive to the tails). The larger of the two is
    returned, as ``arviz.rhat(..., method="rank")``.

    Parameters
    ----------
    x : array_like, shape (n_chains, n_draws, *event)
        MCMC draws; ``n_chains >= 1`` (a single chain is split into two halves) and
        ``n_draws >= 4``.

    Returns
    -------
    float or numpy.ndarray, shape event
        R-hat per parameter; NaN where the draws contain NaN or are constant. ArviZ
        returns NaN for a single chain, whereas this function returns the R-hat of its
        two halves.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or fewer than 4 draws per chain.
    """
    draws, event_shape = _as_draws(x, name="split_rhat")
    split = _split_chains(draws)
    return _reshape_result(_split_rhat_flat(draws, split, _z_scale(split)), event_shape)


def ess_bulk(x):
    """Bulk effective sample size (Vehtari et al. 2021).

    The ESS of the rank-normalised split chains, estimated from the FFT autocovariance
    with Geyer's initial monotone sequence, as ``arviz.ess(..., method="bulk")``.

    Parameters
    ----------
    x : array_like, shape (n_chains, n_draws, *event)
        MCMC draws; ``n_draws >= 4``.

    Returns
    -------
    float or numpy.ndarray, shape event
        Bulk ESS per parameter (in draws, summed over chains); NaN where the draws
        contain NaN; ``n_chains * (n_draws // 2) * 2`` for constant draws.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or fewer than 4 draws per chain.
    """
    draws, event_shape = _as_draws(x, name="ess_bulk")
    z_split = _z_scale(_split_chains(draws))
    return _reshape_result(_ess_bulk_flat(draws, z_split), event_shape)


def ess_tail(x, *, probs: tuple[float, float] = (0.05, 0.95)):
    """Tail effective sample size (Vehtari et al. 2021).

    The smaller of the ESS of the indicators ``x <= q`` for the quantiles ``q`` at
    ``probs`` (computed over all chains and draws, linear interpolation as R type 7),
    each on split chains, as ``arviz.ess(..., method="tail")``.

    Parameters
    ----------
    x : array_like, shape (n_chains, n_draws, *event)
        MCMC draws; ``n_draws >= 4``.
    probs : tuple of float, length 2
        Lower and upper tail probabilities, each in (0, 1).

    Returns
    -------
    float or numpy.ndarray, shape event
        Tail ESS per parameter; NaN where the draws contain NaN or infinities.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or fewer than 4 draws per chain, or if
        ``probs`` is not two probabilities in (0, 1).
    """
    draws, event_shape = _as_draws(x, name="ess_tail")
    probs_arr = np.asarray(probs, dtype=float)
    if probs_arr.shape != (2,) or not np.all((probs_arr > 0) & (probs_arr < 1)):
        raise ValueError(f"ess_tail: expected probs as two probabilities in (0, 1), got {probs!r}")
    return _reshape_result(_ess_tail_flat(draws, probs_arr), event_shape)


def ebfmi(energy) -> np.ndarray:
    """Energy Bayesian fraction of missing information (E-BFMI), per chain.

    ``E-BFMI = mean((E[t] - E[t-1])**2) / var(E)`` with the sample variance (``ddof=1``),
    as ``arviz.bfmi``. Values below 0.3 indicate that momentum resampling explores the
    energy distribution poorly (Betancourt 2016).

    Parameters
    ----------
    energy : array_like, shape (n_chains, n_draws)
        Hamiltonian energy of each draw (BlackJAX ``info.energy``).

    Returns
    -------
    numpy.ndarray, shape (n_chains,)
        E-BFMI of each chain (NaN for a chain of constant energy).

    Raises
    ------
    ValueError
        If ``energy`` is not 2-dimensional or has fewer than 4 draws per chain.
    """
    arr = np.asarray(energy)
    if arr.ndim != 2:
        raise ValueError(
            f"ebfmi: expected energy of shape (n_chains, n_draws), got shape {arr.shape}; "
            f"for a single chain pass energy[None, :]"
        )
    draws, _ = _as_draws(arr, name="ebfmi")
    e = draws[..., 0]
    num = np.square(np.diff(e, axis=1)).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / e.var(axis=1, ddof=1)


def _quantile_key(p: float) -> str:
    """Summary key for the quantile at probability ``p``: 0.05 -> "q05", 0.025 -> "q2.5"."""
    pct = 100.0 * p
    if abs(pct - round(pct)) < 1e-9:
        return f"q{round(pct):02d}"
    return f"q{pct:g}"


def _index_suffix(index: tuple[int, ...]) -> str:
    return "[" + ",".join(str(i) for i in index) + "]"


def summarize(
    samples: Mapping[str, object], *, probs: Sequence[float] = (0.05, 0.5, 0.95)
) -> dict[str, dict[str, float]]:
    """Posterior summary and convergence diagnostics for each parameter.

    Parameters
    ----------
    samples : mapping of str to array_like, each of shape (n_chains, n_draws, *event)
        Draws per named site. Entries with a non-empty ``event`` are flattened to one row
        per element, named ``name[i]`` (or ``name[i,j]`` for 2-d events, in C order).
    probs : sequence of float
        Quantile probabilities in [0, 1]; each gives a key ``q05``, ``q50``, ``q95``, ...
        (``q2.5`` for non-integer percentages).

    Returns
    -------
    dict of str to dict of str to float
        Ordered as ``samples``; for each parameter the keys ``mean``, ``sd`` (``ddof=1``
        over chains and draws pooled), one ``q..`` per entry of ``probs``, ``rhat``
        (:func:`split_rhat`), ``ess_bulk`` and ``ess_tail``.

    Raises
    ------
    ValueError
        If an entry has fewer than 2 dimensions or fewer than 4 draws, or ``probs`` holds
        a value outside [0, 1].
    """
    probs_arr = np.atleast_1d(np.asarray(probs, dtype=float))
    if probs_arr.ndim != 1 or not np.all((probs_arr >= 0) & (probs_arr <= 1)):
        raise ValueError(f"summarize: expected probs in [0, 1], got {probs!r}")
    qkeys = [_quantile_key(p) for p in probs_arr]
    if len(set(qkeys)) != len(qkeys):
        raise ValueError(f"summarize: expected distinct probs, got {probs!r}")

    summary: dict[str, dict[str, float]] = {}
    for name, value in samples.items():
        draws, event_shape = _as_draws(value, name=f"summarize[{name!r}]")
        n_params = draws.shape[2]
        pooled = draws.reshape(-1, n_params)
        stats = {
            "mean": pooled.mean(axis=0),
            "sd": pooled.std(axis=0, ddof=1),
        }
        quants = np.quantile(pooled, probs_arr, axis=0)
        for key, q in zip(qkeys, quants):
            stats[key] = q
        split = _split_chains(draws)
        z_split = _z_scale(split)
        stats["rhat"] = _split_rhat_flat(draws, split, z_split)
        stats["ess_bulk"] = _ess_bulk_flat(draws, z_split)
        stats["ess_tail"] = _ess_tail_flat(draws, np.array([0.05, 0.95]))

        if event_shape == ():
            rows = [(name, 0)]
        else:
            rows = [
                (f"{name}{_index_suffix(idx)}", k) for k, idx in enumerate(np.ndindex(*event_shape))
            ]
        for row_name, k in rows:
            summary[row_name] = {key: float(val[k]) for key, val in stats.items()}
    return summary


def diagnostic_warnings(
    summary: Mapping[str, Mapping[str, float]],
    *,
    num_divergent: int,
    num_samples_total: int,
    max_treedepth_hits: int = 0,
    ebfmi: Sequence[float] | np.ndarray | None = None,
    rhat_max: float = 1.01,
    ess_min: float = 400,
) -> list[str]:
    """Human-readable warnings about convergence and sampler behaviour.

    A warning is issued for each parameter with ``rhat > rhat_max``, with
    ``ess_bulk < ess_min`` or with ``ess_tail < ess_min``; for each chain with E-BFMI below
    0.3; and once each if ``num_divergent > 0`` or ``max_treedepth_hits > 0``. A parameter
    whose mean is not finite (NaN or infinite draws) gets a warning of its own; NaN
    diagnostics of finite parameters (e.g. constant draws) are not reported. Each warning
    names the parameter (or chain) and the number.

    Parameters
    ----------
    summary : mapping of str to mapping of str to float
        Output of :func:`summarize` (keys ``rhat``, ``ess_bulk``, ``ess_tail`` are used
        where present).
    num_divergent : int
        Number of divergent transitions after warm-up, over all chains.
    num_samples_total : int
        Number of post-warm-up transitions over all chains (``n_chains * n_draws``), > 0.
    max_treedepth_hits : int
        Number of transitions that reached the maximum tree depth.
    ebfmi : array_like, shape (n_chains,), optional
        E-BFMI per chain (:func:`ebfmi`).
    rhat_max : float
        Largest acceptable R-hat.
    ess_min : float
        Smallest acceptable bulk and tail ESS.

    Returns
    -------
    list of str
        Warnings in the order: divergences, tree depth, E-BFMI, then per parameter
        (non-finite, R-hat, bulk ESS, tail ESS). Empty if nothing crosses a threshold.

    Raises
    ------
    ValueError
        If a count is negative, ``num_samples_total`` is not positive, or
        ``num_divergent`` exceeds ``num_samples_total``.
    """
    if int(num_samples_total) <= 0:
        raise ValueError(
            f"diagnostic_warnings: expected num_samples_total > 0, got {num_samples_total}"
        )
    if not 0 <= int(num_divergent) <= int(num_samples_total):
        raise ValueError(
            f"diagnostic_warnings: expected 0 <= num_divergent <= num_samples_total "
            f"({num_samples_total}), got {num_divergent}"
        )
    if int(max_treedepth_hits) < 0:
        raise ValueError(
            f"diagnostic_warnings: expected max_treedepth_hits >= 0, got {max_treedepth_hits}"
        )

    warnings: list[str] = []
    n_div, n_tot, n_tree = int(num_divergent), int(num_samples_total), int(max_treedepth_hits)
    if n_div > 0:
        warnings.append(
            f"{n_div} of {n_tot} transitions ({100.0 * n_div / n_tot:.2g}%) were divergent; "
            f"increase target acceptance or reparameterise"
        )
    if n_tree > 0:
        warnings.append(
            f"{n_tree} of {n_tot} transitions ({100.0 * n_tree / n_tot:.2g}%) hit the "
            f"maximum tree depth; consider increasing it"
        )
    if ebfmi is not None:
        for chain, value in enumerate(np.atleast_1d(np.asarray(ebfmi, dtype=float))):
            if value < EBFMI_THRESHOLD:
                warnings.append(
                    f"chain {chain}: E-BFMI = {value:.3f} < {EBFMI_THRESHOLD} "
                    f"(poor exploration of the energy distribution)"
                )

    for name, row in summary.items():
        mean = row.get("mean")
        if mean is not None and not math.isfinite(mean):
            warnings.append(f"{name}: draws are not finite (mean = {mean})")
            continue
        rhat = row.get("rhat")
        if rhat is not None and rhat > rhat_max:
            warnings.append(f"{name}: R-hat = {rhat:.3f} > {rhat_max}")
        for key, label in (("ess_bulk", "bulk ESS"), ("ess_tail", "tail ESS")):
            ess = row.get(key)
            if ess is not None and ess < ess_min:
                warnings.append(f"{name}: {label} = {ess:.0f} < {ess_min}")

    for message in warnings:
        log.debug("diagnostic warning: %s", message)
    return warnings


def _row_decimals(sd: float | None) -> int:
    """Decimals that show a posterior sd to 3 significant digits (0 to 6; 4 if unknown)."""
    if sd is None or not math.isfinite(sd) or sd <= 0:
        return 4
    return int(min(max(2 - math.floor(math.log10(sd)), 0), 6))


def _format_number(value: float, decimals: int) -> str:
    """Fixed-point with ``decimals`` decimals; exponent notation for huge values."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e7:
        return f"{value:.3e}"
    return f"{value:.{decimals}f}"


def _truth_for(name: str, truth: Mapping[str, object]) -> float | None:
    """Look up ``name`` (or ``base[i]`` inside an array-valued ``truth[base]``)."""
    if name in truth:
        return float(np.asarray(truth[name]).reshape(()))
    if name.endswith("]") and "[" in name:
        base, _, idx = name[:-1].partition("[")
        if base in truth:
            arr = np.asarray(truth[base])
            try:
                return float(arr[tuple(int(i) for i in idx.split(","))])
            except (IndexError, ValueError):
                return None
    return None


def format_summary_table(
    summary: Mapping[str, Mapping[str, float]],
    *,
    truth: Mapping[str, float] | None = None,
) -> str:
    """Format a summary as an aligned plain-text table.

    Parameters
    ----------
    summary : mapping of str to mapping of str to float
        Output of :func:`summarize`. Quantile columns are the ``q..`` keys, in order.
    truth : mapping of str to float, optional
        True values by parameter name; adds a ``truth`` column (blank where absent).
        An array under a base name (``truth["mass"]``) also fills rows ``mass[i]``.

    Returns
    -------
    str
        Header, a rule, then one line per parameter; names left-aligned, numbers
        right-aligned. Location and scale columns (and truth) use, per site (``name`` and
        its ``name[...]`` rows), the decimals that show the median ``sd`` of the site to 3
        significant digits; R-hat has 3 decimals; ESS is rounded to an integer. No
        trailing newline.
    """
    if not summary:
        return "(no parameters)"
    first = next(iter(summary.values()))
    qkeys = [k for k in first if k.startswith("q")]
    columns = ["mean", "sd", *qkeys, "rhat", "ess_bulk", "ess_tail"]
    headers = ["parameter", "mean", "sd", *(f"{k[1:].lstrip('0') or '0'}%" for k in qkeys)]
    headers += ["R-hat", "ESS bulk", "ESS tail"]
    if truth is not None:
        headers.append("truth")

    # One number of decimals per site (``name`` and all ``name[...]`` rows), from the
    # median sd of its rows, so that the elements of a vector line up.
    group_sds: dict[str, list[float]] = {}
    for name, row in summary.items():
        sd = row.get("sd")
        if sd is not None and math.isfinite(sd) and sd > 0:
            group_sds.setdefault(name.partition("[")[0], []).append(sd)
    group_decimals = {base: _row_decimals(float(np.median(sds))) for base, sds in group_sds.items()}

    body: list[list[str]] = []
    for name, row in summary.items():
        decimals = group_decimals.get(name.partition("[")[0], _row_decimals(None))
        cells = [name]
        for key in columns:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif key == "rhat":
                cells.append(f"{value:.3f}")
            elif key.startswith("ess"):
                cells.append(f"{value:.0f}" if math.isfinite(value) else str(value))
            else:
                cells.append(_format_number(value, decimals))
        if truth is not None:
            value = _truth_for(name, truth)
            cells.append("" if value is None else _format_number(value, decimals))
        body.append(cells)

    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]

    def _line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    lines = [_line(headers), "  ".join("-" * w for w in widths)]
    lines += [_line(r) for r in body]
    return "\n".join(lines)
