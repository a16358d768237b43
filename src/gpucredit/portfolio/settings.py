"""The settings of a run checked before any work: backend, precision and mode names, the
scenario count and seed, the confidence levels, the chunk size and whether pass 1 keeps every
loss. Pure Python: the CLI builds its options from it without loading NumPy or JAX."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpucredit.portfolio.assumptions import Assumptions

BACKENDS = ("auto", "jax", "numpy", "cupy")
PRECISIONS = ("float32", "float64")
MODES = ("conditional", "sampled")

KEEP_LOSSES_MAX_SCENARIOS = 50_000_000
"""The most scenarios whose every loss a run keeps by default (400 MB of losses, a few GB
while they are sorted, and as big a losses.parquet); beyond it pass 1 is tails-only."""


class EngineError(ValueError):
    """A run that cannot start (unknown backend, bad scenario count, ...)."""


def resolve_run_settings(
    assumptions: Assumptions,
    scenarios: int | None,
    seed: int | None,
    mode: str | None,
) -> tuple[int, int, str]:
    scenarios = assumptions.scenarios if scenarios is None else int(scenarios)
    seed = assumptions.seed if seed is None else int(seed)
    mode = mode or assumptions.mode
    if scenarios < 1:
        raise EngineError(f"scenarios must be at least 1, got {scenarios}")
    if not 0 <= seed < 2**32:
        raise EngineError(f"seed must be in [0, 2^32), got {seed}")
    if mode not in MODES:
        raise EngineError(f"unknown mode {mode!r}; choose conditional or sampled")
    return scenarios, seed, mode


def resolve_keep_losses(
    keep_losses: bool | None, scenarios: int, importance_sampling: bool = False
) -> bool:
    """Whether pass 1 keeps every per-scenario loss. None: yes up to
    `KEEP_LOSSES_MAX_SCENARIOS` scenarios (and always under importance sampling), tails-only
    beyond. Tails-only with importance sampling is refused: the tail order then depends on each
    scenario's likelihood ratio, not on its loss alone."""
    if keep_losses is None:
        return importance_sampling or scenarios <= KEEP_LOSSES_MAX_SCENARIOS
    if not keep_losses and importance_sampling:
        raise EngineError(
            "tails-only mode (--tails-only, keep_losses=False) cannot be combined with "
            "importance sampling: the tail then depends on every scenario's likelihood ratio; "
            "keep every loss instead (--keep-losses)"
        )
    return bool(keep_losses)


def default_alphas(alphas: Sequence[float] | None) -> tuple[float, ...]:
    return tuple(alphas) if alphas else (0.99, 0.999)


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """The confidence levels, each a number in (0, 1), or an EngineError naming the bad one."""
    checked = []
    for alpha in alphas:
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            raise EngineError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
        if not 0.0 < value < 1.0:  # also refuses NaN
            raise EngineError(f"alpha must be in (0, 1), got {value:g}")
        checked.append(value)
    return tuple(checked)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """None (the backend's default) or a whole number of scenarios per chunk, at least 1."""
    if chunk_size is None:
        return None
    try:
        size = operator.index(chunk_size)
    except TypeError:
        raise EngineError(f"chunk_size must be a whole number, got {chunk_size!r}") from None
    if size < 1:
        raise EngineError(f"chunk_size must be at least 1, got {size}")
    return size
