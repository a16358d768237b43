"""A run's configuration, resolved and validated once (`RunConfig.resolve`), and its typed
metadata (`RunMetadata`): what `simulate` reads instead of a dozen loose arguments."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.backends import default_chunk_size
from gpucredit.portfolio.settings import (
    EngineError,
    check_alphas,
    check_chunk_size,
    default_alphas,
    resolve_keep_losses,
    resolve_run_settings,
)


@dataclass(frozen=True, eq=False)
class RunConfig:
    """Every setting of a run, resolved against the assumptions and checked.

    `chunk_size` is the resolved chunking (the backend's default when none was asked, no
    larger than the run needs: it fixes the float32 numbers), `keep_losses` the resolved
    pass-1 mode. Importance sampling (`importance_sampling`) shifts the systematic normals by
    `normal_shift` [T, K] float64; when that is None, `simulate` finds the shift (the design
    point of a pilot run, `engine.importance_shift`) before pass 1."""

    scenarios: int
    seed: int
    mode: str  # "conditional" | "sampled"
    backend: str  # as asked: "auto" | "jax" | "numpy" | "cupy"
    precision: str  # "float32" | "float64"
    chunk_size: int
    alphas: tuple[float, ...]
    keep_losses: bool
    contributions: bool = True
    sensitivities: bool = True
    calibration: bool = True
    loss_by_period: bool = True
    el_sensitivity_scenarios: int = 8192
    importance_sampling: bool = False
    normal_shift: np.ndarray | None = None

    @classmethod
    def resolve(
        cls,
        assumptions: Assumptions,
        scenarios: int | None = None,
        seed: int | None = None,
        mode: str | None = None,
        backend: str = "auto",
        precision: str = "float32",
        chunk_size: int | None = None,
        alphas: Sequence[float] | None = None,
        contributions: bool = True,
        sensitivities: bool = True,
        el_sensitivity_scenarios: int = 8192,
        normal_shift: np.ndarray | None = None,
        keep_losses: bool | None = None,
        calibration: bool = True,
        importance_sampling: bool = False,
        loans: int | None = None,
        loss_by_period: bool = True,
    ) -> RunConfig:
        """The settings of `simulate`'s keywords, with the assumptions' defaults filled in and
        every rule checked (EngineError otherwise). A `normal_shift` implies
        `importance_sampling`. `loans` (the book's size) sizes the memory check
        (`check_memory`); without it the check counts one loan (what does not depend on the
        book)."""
        scenarios, seed, mode = resolve_run_settings(assumptions, scenarios, seed, mode)
        importance_sampling = bool(importance_sampling) or normal_shift is not None
        keep = resolve_keep_losses(keep_losses, scenarios, importance_sampling)
        checked_alphas = check_alphas(default_alphas(alphas))
        chunk = check_chunk_size(chunk_size)
        if normal_shift is not None:
            grid = assumptions.grid(mode)
            normal_shift = np.asarray(normal_shift, dtype=np.float64)
            if normal_shift.shape != (grid.periods, grid.n_factors):
                raise EngineError(
                    f"normal_shift must be [periods, factors] = "
                    f"{(grid.periods, grid.n_factors)}, got {normal_shift.shape}"
                )
        if chunk is None:
            # A small run computes no more than it needs: the next power of two of its
            # scenarios (one compiled shape for every run of about that size), at most the
            # backend's default.
            default = default_chunk_size(backend, importance_sampling=importance_sampling)
            chunk = min(default, 1 << max(scenarios - 1, 0).bit_length())
        config = cls(
            scenarios=scenarios,
            seed=seed,
            mode=mode,
            backend=backend,
            precision=precision,
            chunk_size=chunk,
            alphas=checked_alphas,
            keep_losses=keep,
            contributions=bool(contributions),
            sensitivities=bool(sensitivities),
            calibration=bool(calibration),
            loss_by_period=bool(loss_by_period),
            el_sensitivity_scenarios=int(el_sensitivity_scenarios),
            importance_sampling=importance_sampling,
            normal_shift=normal_shift,
        )
        check_memory(config, assumptions, loans)
        return config


# The memory model of a run (docs/spec.md §8 chunking): what is held at once, in values.
LOAN_BLOCK = 512  # loans the JAX kernels revalue at once (jax_engine.prepare_loans)
# [scenarios, block] arrays alive while a block steps through the periods (measured: a
# 2,000-loan book's 8,192-scenario float32 chunk peaks about 60 MB above a 256-scenario one).
LOAN_ARRAYS = 8
FACTOR_ARRAYS = 4  # [scenarios, periods, factors] arrays: shocks, correlated shocks, paths
KEPT_BYTES_PER_SCENARIO = 16  # a kept float64 loss and its int64 place in the sort


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run holds at once, by part (`check_memory`)."""

    chunk_loans: int  # the loans' working set of one chunk: scenarios x block (x loans)
    chunk_factors: int  # the chunk's systematic shocks and factor paths
    chunk_chi2: int  # the chunk's t-copula χ² draws: scenarios x periods x ν
    kept_losses: int  # every scenario's loss when kept (0 tails-only)

    @property
    def total(self) -> int:
        return self.chunk_loans + self.chunk_factors + self.chunk_chi2 + self.kept_losses


def estimate_memory(
    config: RunConfig, assumptions: Assumptions, loans: int | None = None
) -> MemoryEstimate:
    """The memory a run holds at once: one chunk's working set (its loans in blocks, in
    sampled mode each loan's default period, its shocks and factor paths over the periods, the
    t copula's χ² draws) and, when every loss is kept, 16 bytes a scenario. A lower bound of
    the peak, not a forecast: it refuses only what cannot fit.
    """
    grid = assumptions.grid(config.mode)
    value_bytes = 4 if config.precision == "float32" else 8
    chunk = min(config.chunk_size, config.scenarios)
    periods = grid.periods + 1  # index 0 is today
    loans = max(int(loans or 1), 1)
    block = min(loans, LOAN_BLOCK)
    default_periods = chunk * loans if config.mode == "sampled" else 0  # uint8 [S, N]
    return MemoryEstimate(
        chunk_loans=LOAN_ARRAYS * chunk * block * value_bytes + default_periods,
        chunk_factors=FACTOR_ARRAYS * chunk * periods * grid.n_factors * value_bytes,
        chunk_chi2=chunk * grid.periods * grid.chi2_slots * value_bytes,
        kept_losses=KEPT_BYTES_PER_SCENARIO * config.scenarios if config.keep_losses else 0,
    )


def available_memory_bytes() -> int | None:
    """The memory the machine can give a new run: MemAvailable of /proc/meminfo (free plus
    reclaimable cache), else free pages (os.sysconf); None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(
    config: RunConfig,
    assumptions: Assumptions,
    loans: int | None = None,
    available: int | None = None,
) -> MemoryEstimate:
    """Refuse, before any work, a run whose memory estimate exceeds what the machine has
    (`available` bytes, by default `available_memory_bytes()`), saying what to change."""
    estimate = estimate_memory(config, assumptions, loans)
    available = available_memory_bytes() if available is None else available
    if available is None or estimate.total <= available:
        return estimate
    chunk = min(config.chunk_size, config.scenarios)
    book = f" x {loans:,} loans" if loans else ""
    parts = {
        f"to keep every loss of {config.scenarios:,} scenarios": estimate.kept_losses,
        f"for a chunk of {chunk:,} scenarios{book} x {assumptions.grid(config.mode).periods} "
        f"periods": estimate.chunk_loans + estimate.chunk_factors,
        f"for the t copula's chi-squared draws (t_dof = {assumptions.t_dof})": estimate.chunk_chi2,
    }
    shown = [f"{_gib(size)} {what}" for what, size in parts.items() if size >= estimate.total / 100]
    fixes = []
    if estimate.kept_losses > available / 2:
        fixes.append("--tails-only (keep_losses=False: per batch only the largest losses)")
    if estimate.total - estimate.kept_losses > available / 2:
        fixes.append("a smaller --chunk-size")
        if estimate.chunk_chi2:
            fixes.append("a smaller simulation.t_dof")
    fixes.append("fewer --scenarios")
    raise EngineError(
        f"this run needs at least {_gib(estimate.total)} of memory ({'; '.join(shown)}), more "
        f"than the {_gib(available)} this machine has available; use {', or '.join(fixes)}"
    )


def _gib(size_bytes: float) -> str:
    return f"{size_bytes / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class RunMetadata:
    """What a run records about itself (summary.json "metadata"; `to_dict` keeps its layout)."""

    version: str
    seed: int
    scenarios: int
    mode: str
    backend: str  # the backend that ran ("jax", "numpy", "cupy")
    device: str
    precision: str
    chunk_size: int
    keep_losses: bool
    alphas: list[float]
    copula: str
    t_dof: int | None
    correlation_repaired: bool
    importance_shift: list | None
    horizon_years: float
    steps_per_year: int
    discount: bool
    loans: int
    book: str
    pass1_seconds: float
    sensitivities_seconds: float
    el_sensitivity_scenarios: int | None
    elapsed_seconds: float
    scenarios_per_second: float
    loan_periods_per_second: float
    estimator: str
    effective_sample_size: float
    sensitivities_of: str
    dask: dict | None = None  # the cluster, when the run was on Dask

    def to_dict(self) -> dict:
        """JSON-ready, in field order; `dask` only when the run was on a cluster."""
        out = dataclasses.asdict(self)
        if out["dask"] is None:
            del out["dask"]
        return out
