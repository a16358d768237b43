"""The assumptions of a run: the differentiable `ModelParams` pytree plus the static settings,
and how they are built from a document in the assumptions file's layout (docs/spec.md §9-10).

`apply_layer` checks a layer (portfolio/document.py), merges it over a complete document, checks
the merged document and builds the immutable `Assumptions`, assembling Σ
(portfolio/correlation.py); `gpucredit.io.assumptions` reads the TOML that gives the layers.
Assumptions are never mutated: a stress scenario (`with_overrides`) or a finite-difference
bump (`bumped_parameter`) makes new ones.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels.params import ModelGrid, ModelParams, factor_names, launch_period
from gpucredit.portfolio.correlation import (
    assemble_correlation,
    is_positive_definite,
    nearest_correlation,
    smallest_eigenvalue,
)
from gpucredit.portfolio.document import (
    AssumptionsError,
    Problems,
    check_layer,
    check_merged,
    merge,
)

OVERRIDES_SOURCE = "<overrides>"


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
    offtakers_default: tuple[str, ...] = ()  # default in period 1 (docs/spec.md §4a)


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


# ---------------------------------------------------------------------------------------
# Building the Assumptions from a document.


def _generation_array(doc: dict, key: str) -> np.ndarray:
    return _frozen(np.array([gen[key] for gen in doc["generations"].values()], dtype=np.float64))


def _frozen(array: np.ndarray) -> np.ndarray:
    # Assumptions are immutable (and the defaults are cached): refuse in-place edits.
    array.setflags(write=False)
    return array


def _jump_matrix(doc: dict, jump: str, generations: tuple[str, ...]) -> np.ndarray:
    """[E, G] jumps of every launch for every generation (absent = 0)."""
    launches = doc.get("launches", [])
    out = np.zeros((len(launches), len(generations)))
    for e, launch in enumerate(launches):
        for g, name in enumerate(generations):
            out[e, g] = launch.get(jump, {}).get(name, 0.0)
    return _frozen(out)


def _correlation_for(
    doc: dict, generations: tuple[str, ...], repair: bool, label: str, problems: Problems
) -> tuple[np.ndarray, CorrelationRepair | None]:
    sigma = assemble_correlation(doc["correlation"], generations)
    if is_positive_definite(sigma):
        return sigma, None
    lowest = smallest_eigenvalue(sigma)
    if not repair:
        problems.add(
            label,
            f"the assembled correlation matrix is not positive definite (smallest eigenvalue "
            f"{lowest:.6g}); change the values or ask for the nearest correlation matrix "
            f"(repair_correlation=True, --repair-correlation)",
        )
        return sigma, None
    repaired = nearest_correlation(sigma)
    change = float(np.abs(repaired - sigma).max())
    return repaired, CorrelationRepair(smallest_eigenvalue=lowest, max_abs_change=change)


def _build(doc: dict, repair: bool, problems: Problems) -> Assumptions | None:
    """An Assumptions from a merged, checked document; None (with problems) if Σ is refused."""
    generations = tuple(doc["generations"])
    sigma, repair_record = _correlation_for(doc, generations, repair, "correlation", problems)
    if problems.items:
        return None
    # The stresses' own matrices are checked now, so that a bad stress fails before a run.
    for s, stress in enumerate(doc.get("stress", [])):
        stressed = merge(doc, _stress_overrides(stress))
        _correlation_for(
            stressed,
            tuple(stressed["generations"]),
            repair,
            f"stress[{s}] ({stress['name']!r}): correlation",
            problems,
        )
    if problems.items:
        return None
    btc, eth = doc["crypto"]["btc"], doc["crypto"]["eth"]
    power, rate, model = doc["power"], doc["rate"], doc["model"]
    params = ModelParams(
        rent_usd_per_hour=_generation_array(doc, "rent_usd_per_hour"),
        rent_drift=_generation_array(doc, "rent_drift"),
        rent_vol=_generation_array(doc, "rent_vol"),
        rent_mean_reversion=_generation_array(doc, "rent_mean_reversion"),
        price_usd=_generation_array(doc, "price_usd"),
        depreciation=_generation_array(doc, "depreciation"),
        price_vol=_generation_array(doc, "price_vol"),
        haircut_base=_generation_array(doc, "haircut_base"),
        market_depth_gpus_per_year=_generation_array(doc, "market_depth_gpus_per_year"),
        financed_fleet_gpus=_generation_array(doc, "financed_fleet_gpus"),
        launch_price_jump=_jump_matrix(doc, "price_jump", generations),
        launch_rent_jump=_jump_matrix(doc, "rent_jump", generations),
        btc_price_usd=float(btc["price_usd"]),
        btc_drift=float(btc["drift"]),
        btc_vol=float(btc["vol"]),
        btc_hashprice_drift=float(btc["hashprice_drift"]),
        eth_price_usd=float(eth["price_usd"]),
        eth_drift=float(eth["drift"]),
        eth_vol=float(eth["vol"]),
        power_usd_per_kwh=float(power["usd_per_kwh"]),
        power_drift=float(power["drift"]),
        power_vol=float(power["vol"]),
        rate_level=float(rate["level"]),
        rate_mean_reversion=float(rate["mean_reversion"]),
        rate_mean=float(rate["mean"]),
        rate_vol=float(rate["vol"]),
        credit_persistence=float(doc["credit"]["persistence"]),
        correlation=_frozen(sigma),
        beta_liquidity=float(model["beta_liquidity"]),
        beta_collateral=float(model["beta_collateral"]),
        beta_refinancing=float(model["beta_refinancing"]),
        haircut_slope=float(model["haircut_slope"]),
        haircut_power=float(model["haircut_power"]),
        haircut_max=float(model["haircut_max"]),
        refi_ltv=float(model["refi_ltv"]),
        coverage_floor=float(model["coverage_floor"]),
        coverage_cap=float(model["coverage_cap"]),
        offtaker_correlation=float(model["offtaker_correlation"]),
    )
    sim = doc["simulation"]
    launches = doc.get("launches", [])
    return Assumptions(
        params=params,
        generations=generations,
        generation_power_kw_per_gpu=tuple(
            float(gen["power_kw_per_gpu"]) for gen in doc["generations"].values()
        ),
        launch_names=tuple(launch["name"] for launch in launches),
        launch_years=tuple(float(launch["years_from_now"]) for launch in launches),
        horizon_years=float(sim["horizon_years"]),
        steps_per_year=sim["steps_per_year"],
        scenarios=sim["scenarios"],
        seed=sim["seed"],
        copula=sim["copula"],
        t_dof=sim["t_dof"],
        discount=sim["discount"],
        mode=sim["mode"],
        pd_anchor=model["pd_anchor"],
        stresses=tuple(
            Stress(
                name=stress["name"],
                overrides=_stress_overrides(stress),
                description=stress.get("description", ""),
                offtakers_default=tuple(stress.get("offtakers_default", ())),
            )
            for stress in doc.get("stress", [])
        ),
        document=doc,
        correlation_repair=repair_record,
    )


def _stress_overrides(stress: dict) -> dict:
    not_overrides = ("name", "description", "offtakers_default")
    return {k: copy.deepcopy(v) for k, v in stress.items() if k not in not_overrides}


def apply_layer(base: dict, layer: dict, source: str, repair: bool) -> Assumptions:
    """Check `layer` (portfolio/document.py), merge it over the complete document `base` ({}
    for the defaults themselves), check the merged document and each stress merged over it,
    and build. Raises AssumptionsError listing every problem, each prefixed with `source`."""
    problems = Problems(source)
    base_generations = tuple(base.get("generations", {}))
    check_layer(layer, base_generations, problems)
    if problems.items:
        raise AssumptionsError(problems.items)
    doc = merge(base, layer)
    check_merged(doc, "", problems)
    for s, stress in enumerate(doc.get("stress", [])):
        if not problems.items:  # a broken base would repeat its problems for every stress
            check_merged(merge(doc, _stress_overrides(stress)), f"stress[{s}]", problems)
    if problems.items:
        raise AssumptionsError(problems.items)
    assumptions = _build(doc, repair, problems)
    if assumptions is None:
        raise AssumptionsError(problems.items)
    return assumptions


def with_overrides(
    assumptions: Assumptions, overrides: dict, repair_correlation: bool = False
) -> Assumptions:
    """New assumptions: `overrides` (a dict in the §10 layout, e.g. a Stress's) merged over
    `assumptions.document` and rebuilt. Assumptions whose matrix was repaired stay repaired."""
    repair = repair_correlation or assumptions.correlation_repair is not None
    return apply_layer(assumptions.document, overrides, OVERRIDES_SOURCE, repair)
