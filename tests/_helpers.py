"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

#: ../shared beside the repository (read-only real data; CI has it too).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLUSTERS = SHARED / "data" / "clusters"


@contextlib.contextmanager
def x64():
    """Run a block with float64 enabled, whatever the JAX version."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older JAX
        from jax.experimental import enable_x64

        with enable_x64():
            yield
