"""The assumptions of a run: the differentiable `ModelParams` pytree plus the static settings.

Built by `gpucredit.io.assumptions.load_assumptions` (TOML, docs/spec.md §10) and never mutated:
a stress scenario or a finite-difference bump makes a new one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    """A named stress scenario: overrides in the assumptions file's layout (docs/spec.md §10)."""

    name: str
    overrides: dict
    description: str = ""


@dataclass(frozen=True)
class Assumptions:
    params: ModelParams  # float64 NumPy leaves
    generations: tuple[str, ...]  # file order (docs/spec.md §2)
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
    pd_anchor: str = "expected"  # "expected" | "today": the PD references (docs/spec.md §4)
    stresses: tuple[Stress, ...] = ()
    document: dict = dataclasses.field(
        default_factory=dict, compare=False
    )  # merged TOML (for stresses)
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


# Per-generation sensitivity parameters: (TOML key, ModelParams field); the same names.
GENERATION_PARAMETERS = (
    "rent_usd_per_hour",
    "rent_drift",
    "rent_vol",
    "rent_mean_reversion",
    "price_usd",
    "depreciation",
    "price_vol",
    "haircut_base",
    "market_depth_gpus_per_year",
    "financed_fleet_gpus",
)
# Scalar sensitivity parameters: dotted TOML path -> ModelParams field.
SCALAR_PARAMETERS = {
    "crypto.btc.price_usd": "btc_price_usd",
    "crypto.btc.drift": "btc_drift",
    "crypto.btc.vol": "btc_vol",
    "crypto.btc.hashprice_drift": "btc_hashprice_drift",
    "crypto.eth.price_usd": "eth_price_usd",
    "crypto.eth.drift": "eth_drift",
    "crypto.eth.vol": "eth_vol",
    "power.usd_per_kwh": "power_usd_per_kwh",
    "power.drift": "power_drift",
    "power.vol": "power_vol",
    "rate.level": "rate_level",
    "rate.mean_reversion": "rate_mean_reversion",
    "rate.mean": "rate_mean",
    "rate.vol": "rate_vol",
    "credit.persistence": "credit_persistence",
    "model.beta_liquidity": "beta_liquidity",
    "model.beta_collateral": "beta_collateral",
    "model.beta_refinancing": "beta_refinancing",
    "model.haircut_slope": "haircut_slope",
    "model.haircut_power": "haircut_power",
    "model.refi_ltv": "refi_ltv",
}


def parameter_paths(assumptions: Assumptions) -> list[tuple[str, str, tuple]]:
    """Every sensitivity parameter of docs/spec.md §7 as (dotted path, ModelParams field, index
    into that leaf): () for scalars, (g,) per generation, (e, g) per launch jump, (j, k) with
    j < k per correlation entry (a move of Σ_jk moves Σ_kj with it)."""
    paths: list[tuple[str, str, tuple]] = []
    for g, name in enumerate(assumptions.generations):
        for key in GENERATION_PARAMETERS:
            paths.append((f"generations.{name}.{key}", key, (g,)))
    for e, launch in enumerate(assumptions.launch_names):
        for jump, field in (("price_jump", "launch_price_jump"), ("rent_jump", "launch_rent_jump")):
            for g, name in enumerate(assumptions.generations):
                paths.append((f"launches.{launch}.{jump}.{name}", field, (e, g)))
    for path, field in SCALAR_PARAMETERS.items():
        paths.append((path, field, ()))
    factors = assumptions.factor_names
    for j in range(len(factors)):
        for k in range(j + 1, len(factors)):
            paths.append((f"correlation.{factors[j]}~{factors[k]}", "correlation", (j, k)))
    return paths


def parameter_value(params: ModelParams, field: str, index: tuple) -> float:
    """The value of one parameter named by `parameter_paths`."""
    return float(np.asarray(getattr(params, field))[index])


def bumped_parameter(params: ModelParams, field: str, index: tuple, step: float) -> ModelParams:
    """`params` with the parameter (field, index) of `parameter_paths` moved by `step`; a move
    of the correlation entry Σ_jk moves Σ_kj with it (docs/spec.md §7). For finite differences."""
    leaf = np.array(getattr(params, field), dtype=np.float64)  # a writable copy
    if leaf.ndim == 0:
        return params._replace(**{field: float(leaf) + step})
    leaf[index] += step
    if field == "correlation":
        leaf[index[::-1]] += step
    return params._replace(**{field: leaf})
