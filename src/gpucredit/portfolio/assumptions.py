"""The assumptions of a run: the differentiable `ModelParams` pytree plus the static settings.

Built by `gpucredit.io.assumptions.load_assumptions` (TOML, MODEL.md §10) and never mutated:
a stress scenario or a finite-difference bump makes a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpucredit.kernels.params import ModelGrid, ModelParams, factor_names, launch_period


@dataclass(frozen=True)
class CorrelationRepair:
    """What `--repair-correlation` changed: the input's smallest eigenvalue and the largest
    absolute change of an entry when the nearest correlation matrix (Higham 2002) replaced it."""

    smallest_eigenvalue: float
    max_abs_change: float


@dataclass(frozen=True)
class Stress:
    """A named stress scenario: overrides in the assumptions file's own layout (MODEL.md §10)."""

    name: str
    overrides: dict
    description: str = ""


@dataclass(frozen=True)
class Assumptions:
    params: ModelParams  # float64 NumPy leaves
    generations: tuple[str, ...]  # file order (MODEL.md §2)
    generation_power_kw_per_gpu: tuple[float, ...]  # [G] fills the book's optional column
    launch_names: tuple[str, ...]  # [E]
    launch_years: tuple[float, ...]  # [E] tau_e
    horizon_years: float = 3.0
    steps_per_year: int = 4
    scenarios: int = 100_000
    seed: int = 0
    copula: str = "gaussian"
    t_dof: int = 5
    discount: bool = False
    mode: str = "conditional"
    stresses: tuple[Stress, ...] = ()
    document: dict = field(default_factory=dict, compare=False)  # merged TOML (for stresses)
    correlation_repair: CorrelationRepair | None = None

    @property
    def periods(self) -> int:
        return int(round(self.horizon_years * self.steps_per_year))

    @property
    def factor_names(self) -> tuple[str, ...]:
        return factor_names(self.generations)

    def grid(self, mode: str | None = None) -> ModelGrid:
        """The static grid for the kernels (mode defaults to the assumptions' own)."""
        return ModelGrid(
            steps_per_year=self.steps_per_year,
            periods=self.periods,
            n_generations=len(self.generations),
            launch_periods=tuple(launch_period(y, self.steps_per_year) for y in self.launch_years),
            copula=self.copula,
            t_dof=self.t_dof,
            discount=self.discount,
            mode=mode or self.mode,
        )

    def correlation_matrix(self) -> np.ndarray:
        return np.asarray(self.params.correlation)
