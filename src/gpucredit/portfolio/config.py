"""A run's configuration, resolved and validated once (`RunConfig.resolve`), and its typed
metadata (`RunMetadata`): what `simulate` reads instead of a dozen loose arguments."""

from __future__ import annotations

import dataclasses
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
    ) -> RunConfig:
        """The settings of `simulate`'s keywords, with the assumptions' defaults filled in and
        every rule checked (EngineError otherwise). A `normal_shift` implies
        `importance_sampling`."""
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
        return cls(
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
            el_sensitivity_scenarios=int(el_sensitivity_scenarios),
            importance_sampling=importance_sampling,
            normal_shift=normal_shift,
        )


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
