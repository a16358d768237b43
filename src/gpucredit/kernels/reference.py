"""The NumPy reference of docs/spec.md §2-6: float64, written to read like the model, slow.

Every other backend is tested against this module on the same random numbers. It
materialises [scenarios, loans] per period, so it is meant for small books and chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import betainc, ndtr, ndtri

from gpucredit.kernels.params import (
    BTC,
    CREDIT,
    ETH,
    HOURS_PER_YEAR,
    PD_ANCHORS,
    POWER,
    RATE,
    LoanArrays,
    ModelGrid,
    ModelParams,
)
from gpucredit.kernels.rng import default_uniforms_np, offtaker_uniforms_np, shock_normals_np


class FactorPaths(NamedTuple):
    """Systematic factor paths of docs/spec.md §2, index 0 = today, 1..T the periods."""

    rent_usd_per_hour: np.ndarray  # [S, T+1, G] R_g(t)
    price_usd: np.ndarray  # [S, T+1, G] P_g(t)
    btc_usd: np.ndarray  # [S, T+1]
    eth_usd: np.ndarray  # [S, T+1]
    power_usd_per_kwh: np.ndarray  # [S, T+1]
    base_rate: np.ndarray  # [S, T+1] r(t)
    credit: np.ndarray  # [S, T+1] Z(t) (index 0 unused, 0)


def student_t_to_normal(y: np.ndarray, dof: int) -> np.ndarray:
    """Φ⁻¹(F_ν(y)), computed from the lower tail so the upper tail keeps its precision."""
    lower_tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + y * y))  # F_ν(−|y|)
    return -np.sign(y) * ndtri(lower_tail)


def correlated_shocks(params: ModelParams, grid: ModelGrid, normals: np.ndarray) -> np.ndarray:
    """ε [S, T, K] from the stream-0 normals [S, T, K + ν] (docs/spec.md §2, Shocks)."""
    n_factors = grid.n_factors
    cholesky = np.linalg.cholesky(np.asarray(params.correlation, dtype=np.float64))
    x = normals[..., :n_factors] @ cholesky.T  # x_k = Σ_j L_kj z_j
    if grid.copula == "gaussian":
        return x
    chi2 = np.sum(normals[..., n_factors:] ** 2, axis=-1, keepdims=True)
    mixing = grid.t_dof / chi2  # W = ν / χ²_ν
    return student_t_to_normal(np.sqrt(mixing) * x, grid.t_dof)


def factor_paths(params: ModelParams, grid: ModelGrid, shocks: np.ndarray) -> FactorPaths:
    """Factor paths from ε [S, T, K]."""
    n_scen, periods, _ = shocks.shape
    g_count = grid.n_generations
    dt = grid.dt_years
    sqrt_dt = np.sqrt(dt)
    eps_rent = shocks[..., :g_count]
    eps_price = shocks[..., g_count : 2 * g_count]
    eps_market = shocks[..., 2 * g_count :]

    rent = np.zeros((n_scen, periods + 1, g_count))
    log_price = np.zeros((n_scen, periods + 1, g_count))
    rent[:, 0] = params.rent_usd_per_hour
    log_price[:, 0] = np.log(params.price_usd)
    deviation = np.zeros((n_scen, g_count))  # y_g
    launch_periods = np.asarray(grid.launch_periods)
    for t in range(1, periods + 1):
        deviation = (1.0 - params.rent_mean_reversion * dt) * deviation + (
            params.rent_vol * sqrt_dt * eps_rent[:, t - 1]
        )
        launched = launch_periods <= t  # [E] launches with τ_e <= tΔ
        rent_jumps = np.prod(1.0 - params.launch_rent_jump[launched], axis=0)  # [G]
        rent[:, t] = (
            params.rent_usd_per_hour * np.exp(params.rent_drift * t * dt + deviation) * rent_jumps
        )
        in_period = launch_periods == t  # launches with (t−1)Δ < τ_e <= tΔ
        price_jumps = np.sum(np.log(1.0 - params.launch_price_jump[in_period]), axis=0)
        log_price[:, t] = (
            log_price[:, t - 1]
            - (params.depreciation + 0.5 * params.price_vol**2) * dt
            + params.price_vol * sqrt_dt * eps_price[:, t - 1]
            + price_jumps
        )

    def geometric(level, drift, vol, eps):
        log_steps = (drift - 0.5 * vol**2) * dt + vol * sqrt_dt * eps  # [S, T]
        log_path = np.log(level) + np.concatenate(
            [np.zeros((n_scen, 1)), np.cumsum(log_steps, axis=1)], axis=1
        )
        return np.exp(log_path)

    base_rate = np.zeros((n_scen, periods + 1))
    base_rate[:, 0] = params.rate_level
    for t in range(1, periods + 1):
        r_prev = base_rate[:, t - 1]
        base_rate[:, t] = (
            r_prev
            + params.rate_mean_reversion * (params.rate_mean - r_prev) * dt
            + params.rate_vol * sqrt_dt * eps_market[:, t - 1, RATE]
        )
    credit = np.zeros((n_scen, periods + 1))  # Z(t), a stationary AR(1) (index 0 unused)
    phi = credit_coefficient(params.credit_persistence, dt)
    innovation_scale = np.sqrt(1.0 - phi * phi)
    for t in range(1, periods + 1):
        eps = eps_market[:, t - 1, CREDIT]
        credit[:, t] = eps if t == 1 else phi * credit[:, t - 1] + innovation_scale * eps
    return FactorPaths(
        rent_usd_per_hour=rent,
        price_usd=np.exp(log_price),
        btc_usd=geometric(
            params.btc_price_usd, params.btc_drift, params.btc_vol, eps_market[..., BTC]
        ),
        eth_usd=geometric(
            params.eth_price_usd, params.eth_drift, params.eth_vol, eps_market[..., ETH]
        ),
        power_usd_per_kwh=geometric(
            params.power_usd_per_kwh, params.power_drift, params.power_vol, eps_market[..., POWER]
        ),
        base_rate=base_rate,
        credit=credit,
    )


def credit_coefficient(persistence: float, dt_years: float) -> float:
    """φ = ϕ^Δ, the per-period AR(1) coefficient of the credit cycle (ϕ = 0 gives 0)."""
    return float(persistence) ** dt_years if persistence > 0 else 0.0


def central_path(params: ModelParams, grid: ModelGrid) -> FactorPaths:
    """The scenario in which every shock ε is 0 (one scenario, [1, T+1, ...]): factors on their
    median trends, launches included (docs/spec.md §4, the "expected" PD anchor)."""
    return factor_paths(params, grid, np.zeros((1, grid.periods, grid.n_factors)))


def clipped_ratio(numerator, denominator, params: ModelParams):
    """x⁺ = min(max(num/den, floor), cap); a denominator <= 0 gives the cap (docs/spec.md §3)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.clip(numerator / denominator, params.coverage_floor, params.coverage_cap)
    return np.where(denominator > 0, ratio, params.coverage_cap)


class TodayMetrics(NamedTuple):
    """Today's values of docs/spec.md §3, [N] each."""

    noi_usd: np.ndarray  # NOI_i(0), one period's worth
    debt_service_usd: np.ndarray  # DS_i(1) with r(0)
    liquidity_coverage: np.ndarray  # LC⁺_i(0)
    collateral_coverage: np.ndarray  # CC⁺_i(0)
    refinancing_coverage: np.ndarray  # RF⁺_i(0)


def today_metrics(params: ModelParams, grid: ModelGrid, loans: LoanArrays) -> TodayMetrics:
    """Today's coverage ratios: every factor at its t = 0 level."""
    hours = HOURS_PER_YEAR * grid.dt_years
    g = loans.generation
    k0 = loans.contracted_share * loans.contracted_today
    revenue = (
        loans.gpu_count
        * hours
        * (
            k0 * loans.contract_rate_usd_per_hour
            + (1.0 - k0) * loans.utilization * params.rent_usd_per_hour[g]
        )
    )
    opex = (
        loans.gpu_count
        * hours
        * (loans.power_kw_per_gpu * params.power_usd_per_kwh + loans.other_opex_usd_per_gpu_hour)
    )
    noi = revenue - opex + loans.other_income_usd_per_year * grid.dt_years  # Inc_i(0) = OI Δ
    rate0 = loans.rate + loans.is_floating * params.rate_level
    balance0 = loans.balance_usd[:, 0]
    debt_service = rate0 * grid.dt_years * balance0 + loans.installment_usd[:, 1]
    crypto = loans.btc_units * params.btc_price_usd + loans.eth_units * params.eth_price_usd
    collateral = loans.gpu_count * params.price_usd[g] * loans.collateral_share
    refinancing = np.minimum(params.refi_ltv * collateral / balance0, 1.0)
    return TodayMetrics(
        noi_usd=noi,
        debt_service_usd=debt_service,
        liquidity_coverage=clipped_ratio(loans.cash_usd + crypto + noi, debt_service, params),
        collateral_coverage=clipped_ratio(collateral, balance0, params),
        refinancing_coverage=clipped_ratio(refinancing, 1.0, params),
    )


class PeriodMetrics(NamedTuple):
    """One period t of docs/spec.md §3 for every scenario and loan, [S, N] each."""

    noi_usd: np.ndarray  # NOI_i(t)
    debt_service_usd: np.ndarray  # DS_i(t)
    loan_rate: np.ndarray  # r_i(t)
    crypto_usd: np.ndarray  # V_i(t)
    collateral_usd: np.ndarray  # CV_i(t)
    liquidity_coverage: np.ndarray  # LC⁺_i(t), with Cash_i(t − 1) given
    collateral_coverage: np.ndarray  # CC⁺_i(t)
    refinancing_coverage: np.ndarray  # RF⁺_i, meaningful where t = t_M and Bal_i > 0


def period_metrics(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    paths: FactorPaths,
    t: int,
    cash_before: np.ndarray,
    contract_live: np.ndarray | None = None,
) -> PeriodMetrics:
    """Cash flows and clipped coverage ratios of period t (docs/spec.md §3) given Cash(t − 1).
    `contract_live` [S, N] bool: False where the loan's offtaker defaulted before t (§4a);
    None: every contract pays (no offtaker, the central path)."""
    dt = grid.dt_years
    hours = HOURS_PER_YEAR * dt
    g = loans.generation
    n = loans.gpu_count
    k = loans.contracted_share * (t <= loans.contract_periods)
    if contract_live is not None:
        k = k * contract_live  # [S, N]: the contract stops after the offtaker's default
    revenue = (
        n
        * hours
        * (
            k * loans.contract_rate_usd_per_hour
            + (1.0 - k) * loans.utilization * paths.rent_usd_per_hour[:, t, g]
        )
    )
    opex = (
        n
        * hours
        * (
            loans.power_kw_per_gpu * paths.power_usd_per_kwh[:, t, None]
            + loans.other_opex_usd_per_gpu_hour
        )
    )
    btc_index = (
        paths.btc_usd[:, t, None]
        / params.btc_price_usd
        * np.exp(params.btc_hashprice_drift * t * dt)
    )  # X_btc(t)/X_btc(0) e^{η tΔ}
    share = loans.other_income_btc_share
    other_income = loans.other_income_usd_per_year * dt * ((1.0 - share) + share * btc_index)
    noi = revenue - opex + other_income
    loan_rate = loans.rate + loans.is_floating * paths.base_rate[:, t, None]
    balance_before = loans.balance_usd[:, t - 1]
    debt_service = loan_rate * dt * balance_before + loans.installment_usd[:, t]
    crypto = (
        loans.btc_units * paths.btc_usd[:, t, None] + loans.eth_units * paths.eth_usd[:, t, None]
    )
    collateral = n * paths.price_usd[:, t, g] * loans.collateral_share
    has_balloon = loans.balloon_usd > 0
    with np.errstate(divide="ignore"):
        refinancing = np.minimum(
            params.refi_ltv * collateral / np.where(has_balloon, loans.balloon_usd, 1.0), 1.0
        )
    return PeriodMetrics(
        noi_usd=noi,
        debt_service_usd=debt_service,
        loan_rate=loan_rate,
        crypto_usd=crypto,
        collateral_usd=collateral,
        liquidity_coverage=clipped_ratio(cash_before + crypto + noi, debt_service, params),
        collateral_coverage=clipped_ratio(collateral, balance_before, params),
        refinancing_coverage=clipped_ratio(refinancing, 1.0, params),
    )


class PDReferences(NamedTuple):
    """The PD anchor's reference coverage of every loan (docs/spec.md §4), plus what the
    central path says about the loan (the "paper vs path" diagnostics)."""

    ln_liquidity: np.ndarray  # [N, T + 1] ln LC^ref_i(t) (t = 0 unused, 0)
    ln_collateral: np.ndarray  # [N, T + 1] ln CC^ref_i(t)
    ln_refinancing: np.ndarray  # [N] ln RF^ref_i
    central_min_liquidity_coverage: np.ndarray  # [N] min over t <= min(t_M, T) of LC*_i(t)
    central_refinancing_coverage: np.ndarray  # [N] RF*_i (1 without a balloon in the horizon)


def pd_references(
    params: ModelParams, grid: ModelGrid, loans: LoanArrays, anchor: str = "expected"
) -> PDReferences:
    """LC^ref, CC^ref, RF^ref of docs/spec.md §4 for `anchor` ("expected" | "today"), float64.

    "expected": §3's clipped ratios on the central path (every shock 0, its own cash carried
    over), with LC^ref = max(LC*, 1), CC^ref = CC*, RF^ref = 1: where the central path covers
    its debt service and refinances its balloon the shift is 0 on it. "today": today's
    metrics LC⁺(0), CC⁺(0), RF⁺(0) in every period. Computed once per run from the base
    assumptions; the kernels take them as constants.
    """
    n_loans = len(loans.gpu_count)
    periods = grid.periods
    paths = central_path(params, grid)
    cash = loans.cash_usd[None, :].astype(np.float64)
    ln_lc = np.zeros((n_loans, periods + 1))
    ln_cc = np.zeros((n_loans, periods + 1))
    min_lc = np.full(n_loans, np.inf)
    refi = np.ones(n_loans)
    for t in range(1, periods + 1):
        m = period_metrics(params, grid, loans, paths, t, cash)
        ln_lc[:, t] = np.log(m.liquidity_coverage[0])
        ln_cc[:, t] = np.log(m.collateral_coverage[0])
        active = t <= loans.maturity_period
        min_lc = np.where(active, np.minimum(min_lc, m.liquidity_coverage[0]), min_lc)
        at_refinancing = (t == loans.maturity_period) & (loans.balloon_usd > 0)
        refi = np.where(at_refinancing, m.refinancing_coverage[0], refi)
        cash = np.maximum(cash + m.noi_usd - m.debt_service_usd, 0.0)
    min_lc = np.where(np.isfinite(min_lc), min_lc, params.coverage_cap)
    if anchor == "expected":
        ln_liquidity = np.maximum(ln_lc, 0.0)  # LC^ref = max(LC*, 1)
        ln_collateral = ln_cc
        ln_refinancing = np.zeros(n_loans)  # RF^ref = 1
    elif anchor == "today":
        today = today_metrics(params, grid, loans)
        ln_liquidity = np.repeat(np.log(today.liquidity_coverage)[:, None], periods + 1, axis=1)
        ln_collateral = np.repeat(np.log(today.collateral_coverage)[:, None], periods + 1, axis=1)
        ln_refinancing = np.log(today.refinancing_coverage)
    else:
        raise ValueError(f"pd anchor must be one of {PD_ANCHORS}, got {anchor!r}")
    ln_liquidity[:, 0] = 0.0
    ln_collateral[:, 0] = 0.0
    return PDReferences(ln_liquidity, ln_collateral, ln_refinancing, min_lc, refi)


def with_pd_references(
    params: ModelParams, grid: ModelGrid, loans: LoanArrays, anchor: str = "expected"
) -> LoanArrays:
    """`loans` carrying the references `pd_references` computes (held fixed from then on)."""
    refs = pd_references(params, grid, loans, anchor)
    return loans._replace(
        ln_liquidity_reference=refs.ln_liquidity,
        ln_collateral_reference=refs.ln_collateral,
        ln_refinancing_reference=refs.ln_refinancing,
    )


def require_pd_references(loans: LoanArrays) -> None:
    """The kernels' guard: references are an input, computed once per run."""
    if loans.ln_liquidity_reference is None or loans.ln_refinancing_reference is None:
        raise ValueError(
            "LoanArrays carry no PD references: build them with portfolio.loans.loan_arrays "
            "or kernels.reference.with_pd_references"
        )


NEVER = np.iinfo(np.int64).max  # τ_j when offtaker j does not default within the horizon


def offtaker_default_periods(
    params: ModelParams, grid: ModelGrid, loans: LoanArrays, credit: np.ndarray, uniforms
) -> np.ndarray:
    """τ_j(ω) [S, J] of docs/spec.md §4a: the first period t with 1 − Π_{u≤t}(1 − h^o_j(u))
    >= U_j, NEVER if none. `credit` [S, T+1] is Z(t) (index 0 unused), `uniforms` [S, J] the
    stream-2 uniforms. An offtaker PD of 1 (a stress) gives h^o = 1: τ_j = 1 everywhere."""
    pd_period = 1.0 - (1.0 - np.asarray(loans.offtaker_pd_annual)) ** grid.dt_years  # [J]
    threshold = ndtri(pd_period)  # Φ⁻¹(p^Δ_j): −inf for a PD of 0 (never defaults)
    rho = params.offtaker_correlation
    n_scen = credit.shape[0]
    tau = np.full((n_scen, len(pd_period)), NEVER, dtype=np.int64)
    survival = np.ones((n_scen, len(pd_period)))
    for t in range(1, grid.periods + 1):
        h = ndtr((threshold - np.sqrt(rho) * credit[:, t, None]) / np.sqrt(1.0 - rho))
        survival = survival * (1.0 - h)
        tau = np.where((tau == NEVER) & (1.0 - survival >= uniforms), t, tau)
    return tau


def contract_live_periods(loans: LoanArrays, default_periods: np.ndarray | None) -> np.ndarray:
    """[S, N] the last period each loan's contract can pay given its offtaker's τ (§4a):
    τ_{j(i)}, or NEVER for a loan with no offtaker (or a book naming none)."""
    if default_periods is None:
        return np.full((1, len(loans.gpu_count)), NEVER, dtype=np.int64)
    has = loans.offtaker >= 0
    tau = default_periods[:, np.where(has, loans.offtaker, 0)]
    return np.where(has[None, :], tau, NEVER)


class LoanOutcomes(NamedTuple):
    """Per scenario and loan [S, N]: what contributions and the results tables need."""

    loss_usd: np.ndarray  # Σ_t DF(t) d_i(t) ℓ_i(t)
    default_probability: np.ndarray  # 1 − S_i(T) (conditional) or the default indicator (sampled)
    defaulted_exposure_usd: np.ndarray  # Σ_t DF(t) d_i(t) EAD_i(t): loss / this is the mean LGD
    log_likelihood_ratio: np.ndarray | None = None  # [S] ln w(ω) under importance sampling


def revalue(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    paths: FactorPaths,
    default_uniforms: np.ndarray | None = None,
    offtaker_uniforms: np.ndarray | None = None,
) -> np.ndarray:
    """Loss per scenario and loan [S, N] (docs/spec.md §3-6)."""
    return loan_outcomes(params, grid, loans, paths, default_uniforms, offtaker_uniforms).loss_usd


def liquidation_supply(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    dumped_gpus: np.ndarray,
    expected_dumped_gpus: np.ndarray,
) -> np.ndarray:
    """Q_g(t) + max(F_g − N_g, 0) q̄_g(t) [S, G] (docs/spec.md §5) from the book's own dumped
    GPUs n a d_i(t) and expected ones n a S_i(t−1) h_i(t), both [S, N]."""
    n_scen = dumped_gpus.shape[0]
    g = loans.generation
    pledged = loans.gpu_count * loans.collateral_share
    supply = np.zeros((n_scen, grid.n_generations))
    for gen in range(grid.n_generations):
        mine = g == gen
        book_gpus = pledged[mine].sum()  # N_g
        own = dumped_gpus[:, mine].sum(axis=1)  # Q_g(t)
        rest = max(float(params.financed_fleet_gpus[gen]) - book_gpus, 0.0)
        rate = expected_dumped_gpus[:, mine].sum(axis=1) / book_gpus if book_gpus > 0 else 0.0
        supply[:, gen] = own + rest * rate
    return supply


def loan_outcomes(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    paths: FactorPaths,
    default_uniforms: np.ndarray | None = None,
    offtaker_uniforms: np.ndarray | None = None,
) -> LoanOutcomes:
    """Loss, default probability and defaulted exposure per scenario and loan (docs/spec.md
    §3-6). `default_uniforms` [S, B] (one per borrower) are needed in sampled mode only,
    `offtaker_uniforms` [S, J] (stream 2) in either mode when the book names offtakers (§4a);
    the PD references come with `loans` (`with_pd_references`)."""
    require_pd_references(loans)
    n_scen = paths.credit.shape[0]
    default_periods = None
    if loans.offtaker is not None:
        if offtaker_uniforms is None:
            raise ValueError("the book names offtakers: offtaker_uniforms [S, J] are needed")
        default_periods = offtaker_default_periods(
            params, grid, loans, paths.credit, offtaker_uniforms
        )
    live_through = contract_live_periods(loans, default_periods)  # [S or 1, N]
    dt = grid.dt_years
    n = loans.gpu_count
    pd_period = 1.0 - (1.0 - loans.pd_annual) ** dt
    threshold = ndtri(pd_period)  # Φ⁻¹(p^Δ)
    rho = loans.asset_correlation
    has_balloon = loans.balloon_usd > 0

    # Pass over periods: cash, coverage, hazard, survival; hazards do not depend on the haircut.
    cash = np.broadcast_to(loans.cash_usd, (n_scen, len(n))).copy()
    survival = np.ones((n_scen, len(n)))
    hazard = np.zeros((grid.periods + 1, n_scen, len(n)))
    survival_before = np.zeros_like(hazard)
    exposure = np.zeros_like(hazard)
    collateral = np.zeros_like(hazard)
    crypto = np.zeros_like(hazard)
    for t in range(1, grid.periods + 1):
        live = None if default_periods is None else t <= live_through
        m = period_metrics(params, grid, loans, paths, t, cash, live)
        crypto[t] = m.crypto_usd
        collateral[t] = m.collateral_usd
        shift = params.beta_liquidity * (
            np.log(m.liquidity_coverage) - loans.ln_liquidity_reference[:, t]
        ) + params.beta_collateral * (
            np.log(m.collateral_coverage) - loans.ln_collateral_reference[:, t]
        )
        at_refinancing = (t == loans.maturity_period) & has_balloon
        shift = shift + np.where(
            at_refinancing,
            params.beta_refinancing
            * (np.log(m.refinancing_coverage) - loans.ln_refinancing_reference),
            0.0,
        )
        active = t <= loans.maturity_period
        h = ndtr((threshold - shift - np.sqrt(rho) * paths.credit[:, t, None]) / np.sqrt(1.0 - rho))
        hazard[t] = np.where(active, h, 0.0)
        survival_before[t] = survival
        survival = survival * (1.0 - hazard[t])
        cash = np.maximum(cash + m.noi_usd - m.debt_service_usd, 0.0)
        exposure[t] = loans.balance_usd[:, t - 1] * (1.0 + m.loan_rate * dt)

    # Default indicators d_i(t) [T+1, S, N]: expected (conditional) or sampled.
    expected_defaults = survival_before * hazard
    if grid.mode == "conditional":
        defaults = expected_defaults
    else:
        uniforms = default_uniforms[:, loans.borrower]  # [S, N], shared by a borrower's loans
        cumulative_pd = 1.0 - survival_before * (1.0 - hazard)  # 1 − S_i(t)
        crossed = cumulative_pd >= uniforms[None]
        crossed[0] = False
        first = np.argmax(crossed, axis=0)  # first period with 1 − S_i(t) >= U_b (0: none)
        defaults = np.zeros_like(hazard)
        s_idx, n_idx = np.nonzero(first > 0)
        defaults[first[s_idx, n_idx], s_idx, n_idx] = 1.0

    # Fire sale: the book's own liquidation volume plus the rest of the financed fleet's,
    # liquidating at the book's expected rate, set the haircut per generation and period.
    depth = params.market_depth_gpus_per_year * dt  # D_g, GPUs per period
    pledged = n * loans.collateral_share
    loss = np.zeros((n_scen, len(n)))
    defaulted_exposure = np.zeros((n_scen, len(n)))
    discount = np.ones(n_scen)
    for t in range(1, grid.periods + 1):
        if grid.discount:
            discount = discount * np.exp(-paths.base_rate[:, t] * dt)
        supply = liquidation_supply(
            params, grid, loans, defaults[t] * pledged, expected_defaults[t] * pledged
        )
        haircut = np.minimum(
            params.haircut_max,
            params.haircut_base + params.haircut_slope * (supply / depth) ** params.haircut_power,
        )  # [S, G]
        recovery = collateral[t] * (1.0 - haircut[:, loans.generation]) * (
            1.0 - loans.liquidation_cost
        ) + (loans.crypto_pledged * crypto[t])
        lgd_usd = np.maximum(exposure[t] - recovery, 0.0)
        loss += discount[:, None] * defaults[t] * lgd_usd
        defaulted_exposure += discount[:, None] * defaults[t] * exposure[t]
    return LoanOutcomes(
        loss_usd=loss,
        default_probability=defaults.sum(axis=0),
        defaulted_exposure_usd=defaulted_exposure,
    )


def simulate_chunk(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    scenarios: np.ndarray,
    normal_shift: np.ndarray | None = None,
) -> np.ndarray:
    """Loss per scenario and loan [S, N] for the scenario indices `scenarios` [S]."""
    return simulate_outcomes(params, grid, loans, seed, scenarios, normal_shift).loss_usd


def shift_normals(
    normals: np.ndarray, normal_shift: np.ndarray | None, n_factors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Importance sampling: the systematic normals z [S, T, :K] move to z + μ (μ = normal_shift
    [T, K]); the χ² slots do not move. Returns (shifted normals, ln w [S]) with the likelihood
    ratio w = φ(z + μ)/φ(z) of the original measure to the shifted one, at the shifted point:
    ln w = −Σ μ·z − |μ|²/2, z the unshifted normals (E[w] = 1 under the shifted measure)."""
    if normal_shift is None:
        return normals, np.zeros(normals.shape[0])
    mu = np.asarray(normal_shift, dtype=np.float64)
    z = normals[..., :n_factors]
    log_weight = -np.einsum("stk,tk->s", z, mu) - 0.5 * np.sum(mu * mu)
    shifted = normals.copy()
    shifted[..., :n_factors] = z + mu
    return shifted, log_weight


def simulate_outcomes(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    scenarios: np.ndarray,
    normal_shift: np.ndarray | None = None,
) -> LoanOutcomes:
    """LoanOutcomes [S, N] for the scenario indices `scenarios` [S]; with `normal_shift`
    [T, K] the systematic normals are shifted (importance sampling, docs/spec.md §8 numbers
    unchanged) and `log_likelihood_ratio` holds each scenario's ln w."""
    scenarios = np.asarray(scenarios, dtype=np.uint32)
    normals = shock_normals_np(seed, scenarios, grid.periods, grid.slots_per_period)
    normals, log_weight = shift_normals(normals, normal_shift, grid.n_factors)
    paths = factor_paths(params, grid, correlated_shocks(params, grid, normals))
    uniforms = (
        default_uniforms_np(seed, scenarios, loans.n_borrowers) if grid.mode == "sampled" else None
    )
    offtaker = (
        None
        if loans.offtaker is None
        else offtaker_uniforms_np(seed, scenarios, len(loans.offtaker_pd_annual))
    )
    return loan_outcomes(params, grid, loans, paths, uniforms, offtaker)._replace(
        log_likelihood_ratio=log_weight
    )
