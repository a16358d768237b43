"""What every backend returns, and the protocol every backend implements.

One chunk-output type for every backend (NumPy reference, JAX, sharded JAX, CuPy), so the
runners fold the same object whatever computed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ChunkOutput:
    """What pass 1 keeps of one chunk of S scenarios (float64 NumPy, N loans)."""

    losses_usd: np.ndarray  # [S] portfolio loss per scenario
    loan_loss_sum_usd: np.ndarray  # [N] Σ over the chunk's scenarios of L_i
    loan_default_probability_sum: np.ndarray  # [N] Σ of 1 − S_i(T) (or default indicators)
    loan_defaulted_exposure_sum_usd: np.ndarray  # [N] Σ of Σ_t DF d_i EAD_i
    # Importance sampling: [S] ln w(ω), and the per-loan sums above are Σ w(ω) x(ω). None
    # without it (w = 1).
    log_weights: np.ndarray | None = None


@runtime_checkable
class Backend(Protocol):
    """A backend computes chunks of scenarios by index (docs/spec.md §8: any scenario from its
    index alone) and the per-loan losses of given scenarios (the tail pass)."""

    name: str  # "numpy" | "jax" | "cupy"
    precision: str  # "float32" | "float64"
    device: str  # where it runs, in words

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """Scenarios [first_scenario, first_scenario + count); `padded_count` (the run's chunk
        size) lets compiled backends reuse one program for a short last chunk."""
        ...

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        """[S, N] loss per scenario and loan at the scenario indices [S]."""
        ...
