"""The three inputs every kernel takes.

- `ModelParams`: every continuous assumption of docs/spec.md §9-10, as one immutable pytree.
  It is exactly what `jax.grad` differentiates, so each leaf has a sensitivity.
- `ModelGrid`: the static, hashable part (time grid, copula, mode, launch periods); a jit
  static argument.
- `LoanArrays`: the book as a struct of arrays with the per-book constants (balance
  schedule, maturity period, today's metrics inputs), computed once in float64.

Shapes use G generations, E launches, K = 2G + 5 factors, N loans, T periods.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Slot of each non-generation factor after the 2G generation factors (docs/spec.md §2).
BTC, ETH, POWER, RATE, CREDIT = range(5)
MARKET_FACTORS = ("btc", "eth", "power", "rate", "credit")

TIME_TOL_YEARS = 1e-9  # docs/spec.md: a <= b means a <= b + 1e-9 (years)
HOURS_PER_YEAR = 8760.0

# The fast kernels' per-loan preparation (jax_engine, cupy_engine) shares these:
# LOG_BIG stands in for ln(n a / B) when B <= 0 (the ratio is then the cap) or n a = 0 (the
# floor), far outside any [ln floor, ln cap] and finite so that gradients stay NaN-free.
LOG_BIG = 1.0e4
THRESHOLD_LIMIT = 37.0  # |Φ⁻¹(p^Δ)| beyond this is Φ = 0 or 1 in float64 anyway


def safe_log_ratio(num, den) -> np.ndarray:
    """ln(num/den); +LOG_BIG where den <= 0 (the cap), −LOG_BIG where num <= 0 < den (floor)."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.log(num / den)
    value = np.where(num > 0, value, -LOG_BIG)
    return np.where(den > 0, value, LOG_BIG)


def factor_names(generations: tuple[str, ...]) -> tuple[str, ...]:
    """Correlation-matrix order: rent:g..., price:g..., btc, eth, power, rate, credit."""
    return (
        tuple(f"rent:{g}" for g in generations)
        + tuple(f"price:{g}" for g in generations)
        + MARKET_FACTORS
    )


class ModelParams(NamedTuple):
    """Continuous assumptions (a JAX pytree). Per-generation leaves are [G], launch jumps [E, G]."""

    rent_usd_per_hour: np.ndarray  # [G] R_g(0)
    rent_drift: np.ndarray  # [G] mu_g, per year
    rent_vol: np.ndarray  # [G] sigma^R_g
    rent_mean_reversion: np.ndarray  # [G] kappa_g, per year
    price_usd: np.ndarray  # [G] P_g(0)
    depreciation: np.ndarray  # [G] delta_g, per year, continuous
    price_vol: np.ndarray  # [G] sigma^P_g
    haircut_base: np.ndarray  # [G] H0_g
    market_depth_gpus_per_year: np.ndarray  # [G] D_g / Delta
    financed_fleet_gpus: np.ndarray  # [G] F_g, the whole debt-financed fleet (fire sale)
    launch_price_jump: np.ndarray  # [E, G] J^P
    launch_rent_jump: np.ndarray  # [E, G] J^R
    btc_price_usd: float
    btc_drift: float
    btc_vol: float
    btc_hashprice_drift: float  # eta, per year: other income's BTC share earns e^{eta t}
    eth_price_usd: float
    eth_drift: float
    eth_vol: float
    power_usd_per_kwh: float
    power_drift: float
    power_vol: float
    rate_level: float  # r(0), decimal
    rate_mean_reversion: float
    rate_mean: float
    rate_vol: float
    credit_persistence: float  # annual autocorrelation of the credit cycle Z, in [0, 1)
    correlation: np.ndarray  # [K, K] Sigma, symmetric positive definite
    beta_liquidity: float
    beta_collateral: float
    beta_refinancing: float
    haircut_slope: float  # H1
    haircut_power: float  # gamma
    haircut_max: float  # H_max
    refi_ltv: float  # lambda
    coverage_floor: float
    coverage_cap: float
    # rho_o of the offtakers' default (docs/spec.md §4a). A leaf like the others, but no
    # sensitivity is reported for it: the offtakers' default periods are held fixed under
    # differentiation (an indicator's pathwise derivative is 0), so its gradient is 0.
    offtaker_correlation: float = 0.25


PD_ANCHORS = ("expected", "today")


class ModelGrid(NamedTuple):
    """Static configuration of a run (hashable: a jit static argument)."""

    steps_per_year: int  # m
    periods: int  # T = H m
    n_generations: int  # G
    launch_periods: tuple[int, ...]  # [E] period t_e of each launch (> T: after the horizon)
    copula: str = "gaussian"  # "gaussian" | "t"
    t_dof: int = 5  # nu, used when copula == "t"
    discount: bool = False
    mode: str = "conditional"  # "conditional" | "sampled"

    @property
    def dt_years(self) -> float:
        return 1.0 / self.steps_per_year

    @property
    def n_factors(self) -> int:
        return 2 * self.n_generations + 5

    @property
    def chi2_slots(self) -> int:
        """nu extra normals per period for the t copula's mixing variable, 0 for Gaussian."""
        return self.t_dof if self.copula == "t" else 0

    @property
    def slots_per_period(self) -> int:
        """K + nu: the stream-0 counters b used by one period (docs/spec.md §8)."""
        return self.n_factors + self.chi2_slots


def launch_period(years_from_now: float, steps_per_year: int) -> int:
    """The period t with (t-1)Δ < τ <= tΔ, with docs/spec.md's 1e-9-year tolerance."""
    return int(np.ceil((years_from_now - TIME_TOL_YEARS) * steps_per_year))


class LoanArrays(NamedTuple):
    """The book as arrays plus per-book constants (float64 NumPy; cast by each backend).

    Shapes: [N] per loan, [N, T + 1] per loan and period index t = 0..T.
    """

    generation: np.ndarray  # [N] int, index into the generations
    borrower: np.ndarray  # [N] int, order of first appearance of borrower_id
    gpu_count: np.ndarray  # [N] n_i
    collateral_share: np.ndarray  # [N] a_i
    contracted_share: np.ndarray  # [N] k_i while under contract
    contract_rate_usd_per_hour: np.ndarray  # [N] R^c_i
    contract_periods: np.ndarray  # [N] int: k_i(t) = contracted_share for t <= this
    contracted_today: np.ndarray  # [N] 1.0 if contract_years_remaining > 0 (today's k_i)
    utilization: np.ndarray  # [N] u_i
    power_kw_per_gpu: np.ndarray  # [N] w_i
    other_opex_usd_per_gpu_hour: np.ndarray  # [N] o_i
    cash_usd: np.ndarray  # [N] Cash_i(0)
    btc_units: np.ndarray  # [N] b_i
    eth_units: np.ndarray  # [N] e_i
    crypto_pledged: np.ndarray  # [N] 1.0 if pledged else 0.0
    liquidation_cost: np.ndarray  # [N] c_i
    asset_correlation: np.ndarray  # [N] rho_i
    other_income_usd_per_year: np.ndarray  # [N] OI_i, net of its own costs
    other_income_btc_share: np.ndarray  # [N] b_i of OI_i that moves with BTC, in [0, 1]
    pd_annual: np.ndarray  # [N] p_i
    rate: np.ndarray  # [N] fixed rate or floating spread
    is_floating: np.ndarray  # [N] 1.0 floating, 0.0 fixed
    maturity_years: np.ndarray  # [N] as in the book (schedules are rebuilt from it)
    amortization: np.ndarray  # [N] int code: 0 bullet, 1 linear, 2 annuity
    maturity_period: np.ndarray  # [N] int t_M
    balance_usd: np.ndarray  # [N, T + 1] scheduled balance B_i(t), 0 from t_M on
    installment_usd: np.ndarray  # [N, T + 1] I_i(t) (index 0 unused, 0)
    balloon_usd: np.ndarray  # [N] Bal_i (0 when none or when t_M > T)
    n_borrowers: int
    # Offtakers (docs/spec.md §4a): None (a book naming none) or the index of each loan's
    # offtaker, 0-based order of first appearance, -1 for none, and each offtaker's annual PD.
    offtaker: np.ndarray | None = None  # [N] int
    offtaker_pd_annual: np.ndarray | None = None  # [J] p_j
    # The PD anchor's reference coverage (docs/spec.md §4), computed once per run from the
    # base assumptions (`kernels.anchor.pd_references`) and held fixed: stresses, importance
    # sampling and sensitivities move the scenario paths, not these.
    ln_liquidity_reference: np.ndarray | None = None  # [N, T + 1] ln LC^ref_i(t) (t = 0 unused)
    ln_collateral_reference: np.ndarray | None = None  # [N, T + 1] ln CC^ref_i(t)
    ln_refinancing_reference: np.ndarray | None = None  # [N] ln RF^ref_i
