"""Every notebook in notebooks/ executes top to bottom at reduced settings (CI).

Notebooks are jupytext percent scripts, so they run as plain Python. Each runs in a fresh
process with ``CLUSTERHBM_QUICK=1`` (tiny fits), the Gaia cache seeded in a temporary
directory from ``../shared/data/clusters`` (no network), and its figures written to a
temporary folder, which the test checks. Each notebook is a test (and a pytest-xdist work
unit, tests/conftest.py) of its own, so the two CI workers share them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import CLUSTERS

pytestmark = pytest.mark.notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))

#: figures each notebook must write (relative to its output folder); others: any PNG
EXPECTED = {
    "m67": ["m67/m67_cmd.png", "m67/m67_corner.png", "m67/m67_parallax.png",
            "m67/m67_trace.png", "m67/m67_shrinkage.png"],
    "pleiades": ["pleiades/pleiades_cmd.png", "pleiades/pleiades_parallax.png",
                 "pleiades/pleiades_corner.png"],
    "mock_recovery": ["mock/mock_cmd_truth.png", "mock/mock_truth.png",
                      "mock/mock_cmd_fit.png", "mock/mock_shrinkage.png"],
}
NEEDS_DATA = {"m67": "m67/m67_gaia.ecsv", "pleiades": "pleiades/pleiades_gaia.ecsv"}


def _seed(cache: Path):
    from astropy.table import Table

    from clusterhbm import gaia

    for name, rel in (("M67", NEEDS_DATA["m67"]), ("Pleiades", NEEDS_DATA["pleiades"])):
        path = CLUSTERS / rel
        if path.exists():
            gaia.seed_cache(name, Table.read(path), cache_dir=cache)


def _run(notebook: Path, base: Path):
    work = base / notebook.stem
    work.mkdir()
    cache = work / "cache"
    _seed(cache)
    out = work / "out"
    env = dict(os.environ, CLUSTERHBM_QUICK="1", CLUSTERHBM_OFFLINE="1",
               CLUSTERHBM_CACHE=str(cache), CLUSTERHBM_NOTEBOOK_OUT=str(out),
               CLUSTERHBM_SHARED=str(CLUSTERS.parents[1]), MPLBACKEND="Agg")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(notebook)], check=False, cwd=work, env=env,
                          capture_output=True, text=True, timeout=1500)
    return proc, out, time.perf_counter() - t0


def test_every_notebook_is_listed():
    assert {p.stem for p in NOTEBOOKS} >= set(EXPECTED)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    need = NEEDS_DATA.get(notebook.stem)
    if need and not (CLUSTERS / need).exists():
        pytest.skip(f"{CLUSTERS / need} not available")
    proc, out, seconds = _run(notebook, tmp_path)
    print(f"{notebook.name}: {seconds:.0f} s")
    assert proc.returncode == 0, (
        f"{notebook.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    for rel in EXPECTED.get(notebook.stem, []):
        f = out / rel
        assert f.exists() and f.stat().st_size > 1000, f"{notebook.name} did not write {rel}"
    if notebook.stem not in EXPECTED:
        assert any(p.stat().st_size > 1000 for p in out.rglob("*.png")), (
            f"{notebook.name} wrote no figure under $CLUSTERHBM_NOTEBOOK_OUT")


def test_each_notebook_is_its_own_work_unit():
    """tests/conftest.py: notebooks split across the xdist workers, other files stay whole."""
    from conftest import work_unit

    assert work_unit("tests/test_notebooks.py::test_notebook_runs[m67]") == "notebook:m67"
    assert work_unit("tests/test_notebooks.py::test_every_notebook_is_listed") == "test_notebooks.py"
    assert work_unit("tests/test_model.py::test_x[a]") == "test_model.py"
    assert (work_unit("tests/test_cli.py::test_demo_runs_end_to_end")
            == "test_cli.py::test_demo_runs_end_to_end")
