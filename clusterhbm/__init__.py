"""clusterhbm: hierarchical Bayesian modelling of star clusters.

The public API is re-exported here lazily so that ``import clusterhbm`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BAND_NAMES", "__version__", "band_indices", "load_grid", "predict"]


def __getattr__(name):  # lazy re-exports (PEP 562)
    if name in ("load_grid", "band_indices", "BAND_NAMES"):
        from . import grid

        return getattr(grid, name)
    if name == "predict":
        from .prediction import predict

        return predict
    raise AttributeError(f"module 'clusterhbm' has no attribute {name!r}")
