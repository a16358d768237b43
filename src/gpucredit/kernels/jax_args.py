"""What the public functions of the JAX kernels share: argument normalisation, trace counts.

Host values become the jitted functions' arguments here: parameters as float64 leaves, seeds
and scenario indices as uint32 (traced, so a new seed or chunk does not retrace), the
importance-sampling shift as float64, and the LoanBlocks without their Python ints (which
would otherwise be static and cost a compilation per book size).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from gpucredit.kernels.jax_loans import LoanBlocks
from gpucredit.kernels.params import ModelParams

# Python-side trace counters (incremented when a jitted function is traced, not when it runs).
TRACE_COUNTS: collections.Counter = collections.Counter()


def _params_arg(params: ModelParams) -> ModelParams:
    """Leaves as float64 (strongly typed, so Python floats and NumPy arrays trace alike)."""
    return ModelParams(
        *(
            leaf if isinstance(leaf, jax.Array) else np.asarray(leaf, dtype=np.float64)
            for leaf in params
        )
    )


def _u32(value, name: str):
    if isinstance(value, int | np.integer):
        value = int(value)
        if not 0 <= value < 2**32:
            raise ValueError(f"{name} must be in [0, 2^32), got {value}")
        return np.uint32(value)
    return jnp.asarray(value).astype(jnp.uint32)


def _indices_arg(scenario_indices):
    if isinstance(scenario_indices, jax.Array):
        return scenario_indices.astype(jnp.uint32)
    s = np.asarray(scenario_indices)
    if s.ndim != 1:
        raise ValueError(f"scenario_indices must be 1-D, got shape {s.shape}")
    if s.size and (s.min() < 0 or s.max() >= 2**32):
        raise ValueError("scenario indices must be in [0, 2^32)")
    return s.astype(np.uint32)


def _statics(blocks: LoanBlocks) -> LoanBlocks:
    """The blocks without their Python ints (they would be static: a compile per book size)."""
    return blocks._replace(n_loans=None, n_borrowers=None)


def _shift_arg(normal_shift):
    return None if normal_shift is None else jnp.asarray(normal_shift, dtype=jnp.float64)
