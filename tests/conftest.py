"""Test-run configuration: a JAX compilation cache shared by the run's processes, and
pytest-xdist work units ordered longest first.

CI time is mostly XLA compilation (a marginal-model fit compiles for 2-4 minutes on the
2-core CI machine), so two things matter:

* **The compilation cache.** Tests that build the same program twice (a checkpointed
  run resumed, the same model with another option, a notebook subprocess) compile it
  once: ``JAX_COMPILATION_CACHE_DIR`` is set before JAX is imported and inherited by the
  notebook and CLI subprocesses. Set ``CLUSTERHBM_TEST_JAX_CACHE=0`` to compile
  everything afresh, or to a folder to put the cache there (default: a per-user folder
  in the temporary directory; entries are keyed by the program, the JAX version and the
  machine, so a stale one is never used).
* **Balance between the two workers.** The README runs ``-n 2 --dist loadfile``; the
  scheduler below refines it. Every test file is one work unit (its module fixtures are
  built once), except each notebook and the few tests listed in ``OWN_UNIT``, which are
  units of their own; units are handed out longest first (``COST``), not xdist's
  most-tests-first, which started the five notebooks (one file, few tests, 15 minutes)
  last, on one worker, while the other ran out of work. (``--dist loadgroup`` would
  need no scheduler, but with pytest 9.2 and xdist 3.8 its groups are silently ignored.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_cache = os.environ.get("CLUSTERHBM_TEST_JAX_CACHE", "")
if _cache != "0":
    _cache = _cache or str(Path(tempfile.gettempdir()) / f"clusterhbm-test-jax-cache-{os.getuid()}")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    # A full run writes ~1.9 GB (the grid is a constant of many programs). JAX evicts the
    # least recently used entries beyond a cap only with `filelock` installed; without it
    # a cap makes every cache read fail (a warning, and nothing cached), so no cap then.
    try:
        import filelock  # noqa: F401
    except ImportError:
        pass
    else:
        jax.config.update("jax_compilation_cache_max_size",
                          int(os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))))

#: tests that are a work unit of their own (they share only cheap fixtures with their file)
OWN_UNIT = {
    "test_marginal.py::test_marginal_mixture_fit_recovers_fractions",
    "test_cli.py::test_demo_runs_end_to_end",
}

#: seconds of test time per work unit in the full run of 2026-12-07 (``-n 2``,
#: ``--durations=0``, 2-core development CPU; 3430 s in all, 1734 s wall); only their order
#: matters (`python scripts/ci_unit_times.py LOG` refreshes them). Unlisted units count 10 s.
COST = {
    "test_marginal.py::test_marginal_mixture_fit_recovers_fractions": 426,
    "notebook:m67": 406,
    "test_recovery.py": 390,
    "test_model.py": 290,
    "test_forward.py": 287,
    "test_cli.py::test_demo_runs_end_to_end": 267,
    "notebook:mock_recovery": 229,
    "test_mixture.py": 226,
    "test_marginal.py": 192,
    "notebook:pleiades": 160,
    "test_parallel.py": 137,
    "notebook:inference_routes": 124,
    "test_hbm.py": 101,
    "test_cli.py": 83,
    "notebook:mass_function": 44,
}


def work_unit(nodeid: str) -> str:
    """The work unit of a test: a notebook, a test in ``OWN_UNIT``, or its file."""
    path, _, name = nodeid.partition("::")
    path = Path(path).name
    if path == "test_notebooks.py" and name.startswith("test_notebook_runs["):
        return f"notebook:{name[len('test_notebook_runs['):-1]}"
    own = f"{path}::{name.split('[')[0]}"
    return own if own in OWN_UNIT else path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Units longest first (stable: tests keep their order within a unit). Without xdist
    this only changes the order; a split file builds its module fixtures twice (cheap)."""
    first = {}
    for item in items:
        first.setdefault(work_unit(item.nodeid), len(first))
    items.sort(key=lambda it: (-COST.get(work_unit(it.nodeid), 10), first[work_unit(it.nodeid)]))


@pytest.hookimpl(optionalhook=True)  # a plain pytest run (no xdist) has no such hook
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the units above instead of whole files, in collection
    order (longest first) instead of xdist's default order (most tests first)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)
