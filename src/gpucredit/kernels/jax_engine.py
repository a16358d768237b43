"""The JAX backend of docs/spec.md §2-6: jit-compiled, float32 (default) or float64, with gradients.

It computes exactly what `kernels.reference` computes, scenario by scenario, on the same
Threefry numbers (`kernels.rng`), but never materialises [scenarios × loans × periods]:

- `prepare_loans` hoists every per-loan constant out of the period and scenario loops once
  per book (Φ⁻¹(p^Δ), √ρ, 1/√(1−ρ), the balance schedule folded into debt service and
  exposure, ln(n_i a_i / B_i(t−1)) so that ln CC_i(t) = ln P_g(t) + that, clipped in log
  space), pads the book with inert loans to a multiple of `block_size` and reshapes it to
  [blocks, block_size, ...].
- A chunk of scenarios: normals generated on the device from (seed, scenario index), factor
  paths [S, T+1, ...], then two passes over the loan blocks (`lax.scan` over blocks, inside
  a `lax.scan` over the T periods whose carry is (cash, survival[, defaulted], loss) of shape
  [S, block]). Pass 1 accumulates the liquidation volume Q [T, S, G]; pass 2 recomputes the
  hazards (cheaper than storing them), applies the haircut H_g(t) and sums the loss.
- Today's metrics (LC(0), CC(0), RF(0)) depend on ModelParams, so they are computed in the
  graph and carry gradients; so does everything else that depends on a parameter.

Public API (grid is static; seed and first_scenario are traced uint32, so a new chunk or a
new seed does not retrace; count and the number of scenario indices are static shapes):

  prepare_loans(loans, dtype=float32, block_size=512) -> LoanBlocks
  chunk_losses(params, grid, blocks, seed, first_scenario, count) -> [count]
  chunk_outcomes(...same...) -> ([count], per-loan sums [N] of loss, PD, defaulted exposure)
  losses_at(params, grid, blocks, seed, scenario_indices) -> [S]
  loan_losses_at(params, grid, blocks, seed, scenario_indices) -> [S, N]
  weighted_loss_gradient(params, grid, blocks, seed, scenario_indices, coefficients)
      -> (value, grads: ModelParams)
  factor_paths_jax(params, grid, normals) -> FactorPaths ([S, T+1, ...], like the reference)
  correlated_shocks_jax(params, grid, normals) -> ε [S, T, K]

The dtype of the computation is the dtype of `blocks` (chosen in `prepare_loans`); params
come in as float64 NumPy (or JAX) leaves and are cast inside.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import betainc, ndtri

from gpucredit.kernels.params import (
    BTC,
    CREDIT,
    ETH,
    HOURS_PER_YEAR,
    LOG_BIG,
    POWER,
    RATE,
    THRESHOLD_LIMIT,
    LoanArrays,
    ModelGrid,
    ModelParams,
    safe_log_ratio,
)
from gpucredit.kernels.reference import (  # FactorPaths: the same fields, JAX arrays here
    FactorPaths,
    require_pd_references,
)
from gpucredit.kernels.rng import (
    default_uniforms_jax,
    default_uniforms_jax_at,
    shock_normals_jax,
    shock_normals_jax_at,
)

jax.config.update("jax_enable_x64", True)


def _prefer_wide_cpu_vectors() -> None:
    """Let XLA's CPU backend emit 512-bit vectors (AVX-512): ~25% faster period loop.

    XLA reads XLA_FLAGS when its first backend starts, so this only acts if that has not
    happened yet; a flag the user set is left alone. CPU-only, ignored by GPU backends.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_prefer_vector_width" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_prefer_vector_width=512").strip()


_prefer_wide_cpu_vectors()

__all__ = [
    "FactorPaths",
    "LoanBlocks",
    "TRACE_COUNTS",
    "chunk_losses",
    "chunk_outcomes",
    "importance_log_weights",
    "correlated_shocks_jax",
    "factor_paths_jax",
    "loan_losses_at",
    "losses_at",
    "prepare_loans",
    "student_t_to_normal_jax",
    "weighted_loss_gradient",
]

# Python-side trace counters (incremented when a jitted function is traced, not when it runs).
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------- loans


class LoanBlocks(NamedTuple):
    """The book in blocks of loans, on the device (a NamedTuple pytree).

    Shapes: [NB, b] per loan and [NB, T, b] per loan and period (index t − 1 for period
    t = 1..T), NB blocks of b loans. Loans at flat positions >= n_loans are inert padding
    (zero balance, zero GPUs, maturity period 0: never active, zero loss). Float leaves are
    float64 here except `sqrt_rho` and `inv_sqrt_one_minus_rho`, whose dtype is the dtype of
    the computation; the per-chunk terms that need Δ (hours per period, p^Δ, interest per
    period) are derived from them in the graph in float64 and cast, once per chunk (O(N T),
    not per scenario). `n_loans` and `n_borrowers` are Python ints read by the public
    functions outside jit (they are not traced), so books of different sizes with the same
    padded shape share one compilation (b is rounded up to a power of two for small books).
    """

    generation: jax.Array  # [NB, b] int32 g
    borrower: jax.Array  # [NB, b] int32 borrower index (docs/spec.md §8)
    gpu_count: jax.Array  # [NB, b] n_i
    pledged_gpus: jax.Array  # [NB, b] n_i a_i  (CV_i(t) = that × P_g(t))
    recovery_gpus: jax.Array  # [NB, b] n_i a_i (1 − c_i)
    contracted_share: jax.Array  # [NB, b] k_i while under contract
    contract_rate_usd_per_hour: jax.Array  # [NB, b] R^c_i
    contract_periods: jax.Array  # [NB, b] int32 last contracted period
    contracted_today: jax.Array  # [NB, b] 1.0 if contract_years_remaining > 0
    utilization: jax.Array  # [NB, b] u_i
    power_kw_per_gpu: jax.Array  # [NB, b] w_i
    other_opex_usd_per_gpu_hour: jax.Array  # [NB, b] o_i
    cash_usd: jax.Array  # [NB, b] Cash_i(0)
    btc_units: jax.Array  # [NB, b] b_i
    eth_units: jax.Array  # [NB, b] e_i
    crypto_pledged: jax.Array  # [NB, b] 1.0 if pledged
    other_income_usd_per_year: jax.Array  # [NB, b] OI_i
    other_income_btc_share: jax.Array  # [NB, b] b_i of OI_i moving with BTC
    pd_annual: jax.Array  # [NB, b] p_i
    sqrt_rho: jax.Array  # [NB, b] √ρ_i
    inv_sqrt_one_minus_rho: jax.Array  # [NB, b] 1/√(1 − ρ_i)
    rate: jax.Array  # [NB, b] fixed rate or floating spread
    is_floating: jax.Array  # [NB, b] 1.0 floating
    maturity_period: jax.Array  # [NB, b] int32 t_M (0 for padding)
    has_balloon: jax.Array  # [NB, b] bool Bal_i > 0
    ln_gpus_per_balloon: jax.Array  # [NB, b] ln(n_i a_i / Bal_i) (0 without a balloon)
    balance_before_usd: jax.Array  # [NB, T, b] B_i(t − 1)
    installment_usd: jax.Array  # [NB, T, b] I_i(t)
    ln_gpus_per_balance: jax.Array  # [NB, T, b] ln(n_i a_i / B_i(t − 1)), ±LOG_BIG at the edges
    ln_liquidity_reference: jax.Array  # [NB, T, b] ln LC^ref_i(t) (docs/spec.md §4)
    ln_collateral_reference: jax.Array  # [NB, T, b] ln CC^ref_i(t)
    ln_refinancing_reference: jax.Array  # [NB, b] ln RF^ref_i
    n_loans: int | None  # N real loans (None inside jit)
    n_borrowers: int | None  # B (None inside jit)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the computation."""
        return np.dtype(self.sqrt_rho.dtype)

    @property
    def block_size(self) -> int:
        return int(self.sqrt_rho.shape[1])

    @property
    def periods(self) -> int:
        return int(self.balance_before_usd.shape[1])


def prepare_loans(loans: LoanArrays, dtype=jnp.float32, block_size: int = 512) -> LoanBlocks:
    """Hoist the per-loan constants out of the period and scenario loops; block the book.

    Args:
      loans: the book's LoanArrays (float64 NumPy; schedules on the run's grid, [N, T + 1]).
      dtype: float32 or float64, the dtype of every chunk computed with these blocks.
      block_size: loans per block b (a smaller book uses the next power of two >= N); the
        book is padded with inert loans to a multiple of b. Memory per block is O(S b).
    Returns:
      LoanBlocks (device arrays).
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    require_pd_references(loans)
    n_loans = len(np.asarray(loans.gpu_count))
    periods = np.asarray(loans.balance_usd).shape[1] - 1
    # b: block_size, or for a book smaller than that the next power of two >= N.
    b = int(min(max(int(block_size), 1), 1 << max(n_loans - 1, 0).bit_length()))
    n_blocks = max(1, -(-n_loans // b))
    pad = n_blocks * b - n_loans

    def per_loan(x, fill=0.0, kind=np.float64):
        x = np.asarray(x, dtype=kind).reshape(n_loans)
        x = np.concatenate([x, np.full(pad, fill, dtype=kind)])
        return jnp.asarray(x.reshape(n_blocks, b))

    def per_period(x, fill=0.0):
        x = np.asarray(x, dtype=np.float64).reshape(n_loans, periods)
        x = np.concatenate([x, np.full((pad, periods), fill)], axis=0)
        return jnp.asarray(x.reshape(n_blocks, b, periods).transpose(0, 2, 1))

    f64 = _f64
    gpus = f64(loans.gpu_count)
    pledged = gpus * f64(loans.collateral_share)
    rho = f64(loans.asset_correlation)
    balloon = f64(loans.balloon_usd)
    has_balloon = balloon > 0
    balance_before = f64(loans.balance_usd)[:, :periods]
    return LoanBlocks(
        generation=per_loan(loans.generation, 0, np.int32),
        borrower=per_loan(loans.borrower, 0, np.int32),
        gpu_count=per_loan(gpus),
        pledged_gpus=per_loan(pledged),
        recovery_gpus=per_loan(pledged * (1.0 - f64(loans.liquidation_cost))),
        contracted_share=per_loan(loans.contracted_share),
        contract_rate_usd_per_hour=per_loan(loans.contract_rate_usd_per_hour),
        contract_periods=per_loan(loans.contract_periods, 0, np.int32),
        contracted_today=per_loan(loans.contracted_today),
        utilization=per_loan(loans.utilization),
        power_kw_per_gpu=per_loan(loans.power_kw_per_gpu),
        other_opex_usd_per_gpu_hour=per_loan(loans.other_opex_usd_per_gpu_hour),
        cash_usd=per_loan(loans.cash_usd),
        btc_units=per_loan(loans.btc_units),
        eth_units=per_loan(loans.eth_units),
        crypto_pledged=per_loan(loans.crypto_pledged),
        other_income_usd_per_year=per_loan(loans.other_income_usd_per_year),
        other_income_btc_share=per_loan(loans.other_income_btc_share),
        pd_annual=per_loan(loans.pd_annual, 0.01),
        sqrt_rho=per_loan(np.sqrt(rho)).astype(dt),
        inv_sqrt_one_minus_rho=per_loan(1.0 / np.sqrt(1.0 - rho), 1.0).astype(dt),
        rate=per_loan(loans.rate),
        is_floating=per_loan(loans.is_floating),
        maturity_period=per_loan(loans.maturity_period, 0, np.int32),
        has_balloon=per_loan(has_balloon, False, np.bool_),
        ln_gpus_per_balloon=per_loan(
            np.where(has_balloon, safe_log_ratio(pledged, np.where(has_balloon, balloon, 1.0)), 0.0)
        ),
        balance_before_usd=per_period(balance_before),
        installment_usd=per_period(f64(loans.installment_usd)[:, 1:]),
        ln_gpus_per_balance=per_period(safe_log_ratio(pledged[:, None], balance_before), LOG_BIG),
        ln_liquidity_reference=per_period(f64(loans.ln_liquidity_reference)[:, 1:]),
        ln_collateral_reference=per_period(f64(loans.ln_collateral_reference)[:, 1:]),
        ln_refinancing_reference=per_loan(loans.ln_refinancing_reference),
        n_loans=n_loans,
        n_borrowers=int(loans.n_borrowers),
    )


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class _LoanTerms(NamedTuple):
    """What the period loop reads, in the computation dtype. [NB, b] or [NB, T, b] (per period)."""

    generation: jax.Array  # [NB, b] int32
    borrower: jax.Array  # [NB, b] int32
    volume_weights: jax.Array  # [NB, b, G] n a one-hot: Q_g(t) = Σ_i d_i(t) volume_weights[i, g]
    recovery_gpus: jax.Array  # [NB, b] n a (1 − c)
    power_kwh_per_period: jax.Array  # [NB, b] n N_h w:  opex = that × E(t) + n N_h o
    btc_units: jax.Array
    eth_units: jax.Array
    crypto_pledged: jax.Array
    threshold: jax.Array  # [NB, b] Φ⁻¹(p^Δ)
    sqrt_rho: jax.Array
    inv_sqrt_one_minus_rho: jax.Array
    ln_gpus_per_balloon: jax.Array
    cash_usd: jax.Array
    btc_income_usd: jax.Array  # [NB, b] OI Δ b_i: other income's BTC part = that × BTC index
    ln_refinancing_reference: jax.Array  # [NB, b] ln RF^ref
    # [NB, T, b] n N_h (k_i(t) R^c − o) + OI Δ (1 − b_i): NOI = that + rent_hours R − power E
    # + btc_income BTC index
    fixed_income_usd: jax.Array
    rent_hours: jax.Array  # [NB, T, b] n N_h (1 − k_i(t)) u
    debt_service_fixed_usd: jax.Array  # [NB, T, b] rate Δ B(t−1) + I(t): DS = that + per_rate r(t)
    debt_service_per_rate_usd: jax.Array  # [NB, T, b] 1[floating] Δ B(t−1)
    exposure_fixed_usd: jax.Array  # [NB, T, b] B(t−1)(1 + rate Δ): EAD = that + per_rate r(t)
    ln_gpus_per_balance: jax.Array  # [NB, T, b]
    ln_liquidity_reference: jax.Array  # [NB, T, b] ln LC^ref(t)
    ln_collateral_reference: jax.Array  # [NB, T, b] ln CC^ref(t)
    active: jax.Array  # [NB, T, b] bool t <= t_M
    at_refinancing: jax.Array  # [NB, T, b] bool t == t_M and Bal > 0


def _book_gpus(blocks: LoanBlocks, grid: ModelGrid, dtype) -> jax.Array:
    """N_g [G]: the book's pledged GPUs n a of each generation (padding has none)."""
    one_hot = jax.nn.one_hot(blocks.generation, grid.n_generations, dtype=jnp.float64)
    pledged = blocks.pledged_gpus.astype(jnp.float64)[..., None]
    return jnp.sum(one_hot * pledged, axis=(0, 1)).astype(dtype)


def _loan_terms(blocks: LoanBlocks, grid: ModelGrid, dtype) -> _LoanTerms:
    """Per-chunk loan terms on the grid (float64 arithmetic, cast to `dtype`)."""
    if blocks.periods != grid.periods:
        raise ValueError(f"blocks have {blocks.periods} periods, the grid {grid.periods}")
    dt = grid.dt_years
    hours = HOURS_PER_YEAR * dt
    f64 = jnp.float64
    cast = lambda x: x.astype(dtype)  # noqa: E731
    t = jnp.arange(1, grid.periods + 1, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
    n = blocks.gpu_count.astype(f64)
    share = blocks.contracted_share.astype(f64)
    contract = blocks.contract_rate_usd_per_hour.astype(f64)
    util = blocks.utilization.astype(f64)
    opex = blocks.other_opex_usd_per_gpu_hour.astype(f64)
    k = share[:, None, :] * (t <= blocks.contract_periods[:, None, :])  # [NB, T, b]
    n_t = n[:, None, :]
    other_income = blocks.other_income_usd_per_year.astype(f64) * dt  # OI Δ
    btc_share = blocks.other_income_btc_share.astype(f64)
    rate = blocks.rate.astype(f64)[:, None, :]
    balance = blocks.balance_before_usd.astype(f64)
    pd_period = 1.0 - (1.0 - blocks.pd_annual.astype(f64)) ** dt
    threshold = jnp.clip(ndtri(pd_period), -THRESHOLD_LIMIT, THRESHOLD_LIMIT)
    per_rate = blocks.is_floating.astype(f64)[:, None, :] * dt * balance
    volume = jax.nn.one_hot(blocks.generation, grid.n_generations, dtype=f64)
    volume = volume * blocks.pledged_gpus.astype(f64)[..., None]  # [NB, b, G] n a one-hot
    return _LoanTerms(
        generation=blocks.generation,
        borrower=blocks.borrower,
        volume_weights=cast(volume),
        recovery_gpus=cast(blocks.recovery_gpus),
        power_kwh_per_period=cast(n * hours * blocks.power_kw_per_gpu),
        btc_units=cast(blocks.btc_units),
        eth_units=cast(blocks.eth_units),
        crypto_pledged=cast(blocks.crypto_pledged),
        threshold=cast(threshold),
        sqrt_rho=cast(blocks.sqrt_rho),
        inv_sqrt_one_minus_rho=cast(blocks.inv_sqrt_one_minus_rho),
        ln_gpus_per_balloon=cast(blocks.ln_gpus_per_balloon),
        cash_usd=cast(blocks.cash_usd),
        btc_income_usd=cast(other_income * btc_share),
        ln_refinancing_reference=cast(blocks.ln_refinancing_reference),
        fixed_income_usd=cast(
            n_t * hours * (k * contract[:, None, :])
            - n_t * hours * opex[:, None, :]
            + (other_income * (1.0 - btc_share))[:, None, :]
        ),
        rent_hours=cast(n_t * hours * ((1.0 - k) * util[:, None, :])),
        debt_service_fixed_usd=cast(rate * dt * balance + blocks.installment_usd),
        debt_service_per_rate_usd=cast(per_rate),
        exposure_fixed_usd=cast(balance * (1.0 + rate * dt)),
        ln_gpus_per_balance=cast(blocks.ln_gpus_per_balance),
        ln_liquidity_reference=cast(blocks.ln_liquidity_reference),
        ln_collateral_reference=cast(blocks.ln_collateral_reference),
        active=t <= blocks.maturity_period[:, None, :],
        at_refinancing=(t == blocks.maturity_period[:, None, :]) & blocks.has_balloon[:, None, :],
    )


# --------------------------------------------------------------------------- factors


def _cast_params(params: ModelParams, dtype) -> ModelParams:
    """Every leaf in the computation dtype except the correlation matrix, kept in float64 for
    its Cholesky factor (`correlated_shocks_jax`)."""
    cast = ModelParams(*(jnp.asarray(leaf).astype(dtype) for leaf in params))
    return cast._replace(correlation=jnp.asarray(params.correlation).astype(jnp.float64))


def student_t_to_normal_jax(y: jax.Array, dof: int) -> jax.Array:
    """Φ⁻¹(F_ν(y)) = −sign(y) Φ⁻¹(F_ν(−|y|)), F_ν(−|y|) = ½ I_{ν/(ν+y²)}(ν/2, ½).

    For y² < ν the complementary form ½ − ½ I_{y²/(ν+y²)}(½, ν/2) is used (same value, but
    1 − x is not rounded away in float32). y = 0 gives 0 with a finite gradient (double where).
    """
    dtype = y.dtype
    nonzero = y != 0
    y_safe = jnp.where(nonzero, y, jnp.ones_like(y))
    y2 = y_safe * y_safe
    nu = jnp.asarray(dof, dtype)
    half = jnp.asarray(0.5, dtype)
    small = y2 < nu
    lower_big = half * betainc(nu / 2, half, jnp.where(small, half, nu / (nu + y2)))
    lower_small = half - half * betainc(half, nu / 2, jnp.where(small, y2 / (nu + y2), half))
    lower = jnp.where(small, lower_small, lower_big)
    return jnp.where(nonzero, -jnp.sign(y_safe) * ndtri(lower), jnp.zeros_like(y))


def correlated_shocks_jax(params: ModelParams, grid: ModelGrid, normals: jax.Array) -> jax.Array:
    """ε [S, T, K] from the stream-0 normals [S, T, K + ν] (docs/spec.md §2, Shocks).

    L = cholesky(Σ) with jnp.linalg.cholesky, which symmetrizes its input ((Σ + Σᵀ)/2): the
    gradient w.r.t. Σ_jk (j ≠ k) is split between [j, k] and [k, j]; a move of the entry
    Σ_jk = Σ_kj has derivative g[j, k] + g[k, j] (the caller adds them).
    """
    dtype = normals.dtype
    n_factors = grid.n_factors
    # Factored in float64, then cast: a repaired matrix's smallest eigenvalue (1e-8) is below
    # float32 resolution, where the factorisation fails (NaN).
    correlation = jnp.asarray(params.correlation).astype(jnp.float64)
    cholesky = jnp.linalg.cholesky(correlation).astype(dtype)
    x = jnp.einsum(
        "stj,kj->stk", normals[..., :n_factors], cholesky, precision=lax.Precision.HIGHEST
    )
    if grid.copula == "gaussian":
        return x
    chi2 = jnp.sum(normals[..., n_factors:] ** 2, axis=-1, keepdims=True)
    mixing = grid.t_dof / chi2  # W = ν / χ²_ν
    return student_t_to_normal_jax(jnp.sqrt(mixing) * x, grid.t_dof)


class _Paths(NamedTuple):
    """Time-major factor paths for periods 1..T: [T, S, G] or [T, S]."""

    rent: jax.Array
    price: jax.Array
    ln_price: jax.Array
    btc: jax.Array
    eth: jax.Array
    power: jax.Array
    rate: jax.Array
    credit: jax.Array  # Z(t)
    btc_income_index: jax.Array  # [T, S] X_btc(t)/X_btc(0) e^{η tΔ} (other income's BTC part)


def _paths(p: ModelParams, grid: ModelGrid, shocks: jax.Array) -> _Paths:
    """Factor paths, time-major, from ε [S, T, K] and params already in the shocks' dtype."""
    dtype = shocks.dtype
    n_scen, periods, _ = shocks.shape
    g_count = grid.n_generations
    dt = grid.dt_years
    sqrt_dt = float(np.sqrt(dt))
    eps = jnp.swapaxes(shocks, 0, 1)  # [T, S, K]
    eps_rent = eps[..., :g_count]
    eps_price = eps[..., g_count : 2 * g_count]
    eps_market = eps[..., 2 * g_count :]

    steps = np.arange(1, periods + 1)
    launch = np.asarray(grid.launch_periods, dtype=np.int64).reshape(-1)
    launched = jnp.asarray(launch[None, :] <= steps[:, None])[..., None]  # [T, E, 1]
    in_period = jnp.asarray(launch[None, :] == steps[:, None])[..., None]
    one = jnp.ones((), dtype)
    rent_jumps = jnp.prod(jnp.where(launched, 1.0 - p.launch_rent_jump[None], one), axis=1)
    price_jumps = jnp.sum(
        jnp.where(
            in_period, jnp.log(jnp.where(in_period, 1.0 - p.launch_price_jump[None], one)), 0
        ),
        axis=1,
    )  # [T, G]

    reversion = 1.0 - p.rent_mean_reversion * dt
    rent_scale = p.rent_vol * sqrt_dt
    price_drift = (p.depreciation + 0.5 * p.price_vol**2) * dt
    price_scale = p.price_vol * sqrt_dt

    def rent_step(deviation, e):
        deviation = reversion * deviation + rent_scale * e
        return deviation, deviation

    def price_step(log_price, inputs):
        e, jump = inputs
        log_price = log_price - price_drift + price_scale * e + jump
        return log_price, log_price

    def rate_step(r_prev, e):
        r = r_prev + p.rate_mean_reversion * (p.rate_mean - r_prev) * dt + p.rate_vol * sqrt_dt * e
        return r, r

    _, deviation = lax.scan(rent_step, jnp.zeros((n_scen, g_count), dtype), eps_rent)
    trend = p.rent_drift * jnp.asarray(steps[:, None], dtype) * dt  # [T, G]
    rent = p.rent_usd_per_hour * jnp.exp(trend[:, None, :] + deviation) * rent_jumps[:, None, :]
    ln_price0 = jnp.broadcast_to(jnp.log(p.price_usd), (n_scen, g_count))
    _, ln_price = lax.scan(price_step, ln_price0, (eps_price, price_jumps[:, None, :]))
    rate0 = jnp.broadcast_to(p.rate_level, (n_scen,))
    _, rate = lax.scan(rate_step, rate0, eps_market[..., RATE])

    def geometric(level, drift, vol, e):
        log_steps = (drift - 0.5 * vol**2) * dt + vol * sqrt_dt * e  # [T, S]
        return jnp.exp(jnp.log(level) + jnp.cumsum(log_steps, axis=0))

    # Credit cycle: Z(1) = ε(1), Z(t) = φ Z(t−1) + √(1 − φ²) ε(t), φ = ϕ^Δ (ϕ = 0: φ = 0).
    persistent = p.credit_persistence > 0
    phi = jnp.where(
        persistent, jnp.exp(dt * jnp.log(jnp.where(persistent, p.credit_persistence, 1))), 0
    )
    innovation_scale = jnp.sqrt(1 - phi * phi)

    def credit_step(z, e):
        z = phi * z + innovation_scale * e
        return z, z

    credit_first = eps_market[0, :, CREDIT]
    _, credit_rest = lax.scan(credit_step, credit_first, eps_market[1:, :, CREDIT])
    btc = geometric(p.btc_price_usd, p.btc_drift, p.btc_vol, eps_market[..., BTC])
    hashprice = jnp.exp(p.btc_hashprice_drift * jnp.asarray(steps, dtype) * dt)  # [T]
    return _Paths(
        rent=rent,
        price=jnp.exp(ln_price),
        ln_price=ln_price,
        btc=btc,
        eth=geometric(p.eth_price_usd, p.eth_drift, p.eth_vol, eps_market[..., ETH]),
        power=geometric(p.power_usd_per_kwh, p.power_drift, p.power_vol, eps_market[..., POWER]),
        rate=rate,
        credit=jnp.concatenate([credit_first[None], credit_rest], axis=0),
        btc_income_index=btc / p.btc_price_usd * hashprice[:, None],
    )


def factor_paths_jax(params: ModelParams, grid: ModelGrid, normals: jax.Array) -> FactorPaths:
    """Factor paths [S, T+1, ...] from the stream-0 normals [S, T, K + ν] (dtype = normals').

    Matches reference.factor_paths(params, grid, reference.correlated_shocks(...)).
    """
    p = _cast_params(params, normals.dtype)
    paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
    n_scen = normals.shape[0]

    def with_today(today, path):  # path [T, S, ...] -> [S, T+1, ...]
        today = jnp.broadcast_to(today, path.shape[1:])[None]
        return jnp.swapaxes(jnp.concatenate([today, path], axis=0), 0, 1)

    return FactorPaths(
        rent_usd_per_hour=with_today(p.rent_usd_per_hour, paths.rent),
        price_usd=with_today(p.price_usd, paths.price),
        btc_usd=with_today(p.btc_price_usd, paths.btc),
        eth_usd=with_today(p.eth_price_usd, paths.eth),
        power_usd_per_kwh=with_today(p.power_usd_per_kwh, paths.power),
        base_rate=with_today(p.rate_level, paths.rate),
        credit=with_today(jnp.zeros((n_scen,), normals.dtype), paths.credit),
    )


# --------------------------------------------------------------------------- revaluation


def _ln_coverage(numerator, denominator, floor, cap):
    """ln x⁺ with x⁺ = min(max(num/den, floor), cap) and a denominator <= 0 giving the cap."""
    positive = denominator > 0
    ratio = jnp.clip(numerator / jnp.where(positive, denominator, 1), floor, cap)
    return jnp.log(jnp.where(positive, ratio, cap))


def _take(x, generation):
    """x [S, G] at each loan's generation [b] -> [S, b], as a chain of G − 1 selects.

    Exact, and fused by XLA into the period loop's elementwise kernel: no [S, b] temporary
    in memory, no gather and no K = G matmul (on CPU a gather of per-generation factors was
    70% of the time, a one-hot matmul ~3x faster than that and the selects faster still).
    """
    out = x[:, :1]
    for g in range(1, x.shape[1]):
        out = jnp.where(generation == g, x[:, g : g + 1], out)
    return jnp.broadcast_to(out, (x.shape[0], generation.shape[-1]))


# erfc(x) = t exp(−x² + P(t)), t = 1/(1 + |x|/2), x >= 0 (Numerical Recipes' erfcc,
# Chebyshev fit): relative error < 1.2e-7 for every x >= 0, so float32-exact for the hazard.
_ERFC_COEFFICIENTS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


@jax.custom_jvp
def _erfc(x):
    """erfc(x): lax.erfc in float64; in float32 one exp, one divide and 9 FMAs.

    Its derivative is the exact −2/√π exp(−x²) (custom_jvp): one exp in the backward pass
    instead of the derivative of the approximation's polynomial.

    XLA's float32 erfc evaluates both an erf and an erfc branch and selects, and on CPU
    its pieces land in separate fusions that each recompute the argument; this form is one
    expression that fuses into the period loop. erfc(−x) = 2 − erfc(x).
    """
    if x.dtype != jnp.float32:
        return lax.erfc(x)
    a = jnp.abs(x)
    t = 1 / (1 + 0.5 * a)
    poly = jnp.asarray(_ERFC_COEFFICIENTS[-1], x.dtype)
    for c in _ERFC_COEFFICIENTS[-2::-1]:
        poly = c + t * poly
    y = t * jnp.exp(poly - a * a)
    return jnp.where(x < 0, 2 - y, y)


@_erfc.defjvp
def _erfc_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _erfc(x), jnp.asarray(-2 / np.sqrt(np.pi), x.dtype) * jnp.exp(-x * x) * dx


def _liquidation_supply(p: ModelParams, volume, expected_volume, book_gpus) -> jax.Array:
    """Q_g(t) + max(F_g − N_g, 0) q̄_g(t) [T, S, G] (docs/spec.md §5): the book's own dumped
    GPUs Q [T, S, G], and the rest of the financed fleet liquidating at the book's expected
    rate q̄ = expected_volume / N_g (expected_volume = Σ n a S(t−1) h(t); in conditional mode
    it is Q itself). N_g = book_gpus [G]; N_g = 0 gives Q = q̄ = 0."""
    owned = book_gpus > 0
    rest = jnp.where(owned, jnp.maximum(p.financed_fleet_gpus - book_gpus, 0), 0)
    return volume + rest * (expected_volume / jnp.where(owned, book_gpus, 1))


def _haircut(p: ModelParams, grid: ModelGrid, supply: jax.Array) -> jax.Array:
    """H_g(t) = min(H_max, H0_g + H1 (supply_g(t)/D_g)^γ) for the liquidation supply [T, S, G]
    of `_liquidation_supply`; NaN-free at 0."""
    ratio = supply / (p.market_depth_gpus_per_year * grid.dt_years)
    positive = ratio > 0
    safe = jnp.where(positive, ratio, jnp.ones_like(ratio))
    zero_power = jnp.where(p.haircut_power == 0, 1.0, 0.0).astype(ratio.dtype)  # 0**γ
    powered = jnp.where(positive, safe**p.haircut_power, zero_power)
    return jnp.minimum(p.haircut_max, p.haircut_base + p.haircut_slope * powered)


def _revalue_block(
    p: ModelParams,
    grid: ModelGrid,
    terms: _LoanTerms,
    paths: _Paths,
    uniforms,
    haircut,
    discount,
    extras: tuple[str, ...] = (),
    remat_steps: bool = True,
):
    """One block of loans over the T periods.

    terms: one block ([b] and [T, b] leaves). paths: time-major [T, S, ...]. uniforms [S, B]
    (sampled mode) or None. haircut [T, S, G] or None: None is pass 1 and returns the
    liquidation volumes (Q, expected) [T, S, G] each: the GPUs the block dumps, Σ n a d(t),
    and the expected ones, Σ n a S(t−1) h(t) (the same array in conditional mode); otherwise
    pass 2, returning a `_BlockOutcome` of [S, b]
    arrays (what is not used is removed by XLA's dead-code elimination), or with `extras`
    (pass 2 only) the pair (outcome, {name: [T, S, G]}) for each name in extras:
      "volume": this block's Q, as pass 1 gives it (the hazards are the same);
      "recovery_weights": R_g(t) = Σ_i DF d_i 1[EAD_i > Rec_i] n_i a_i (1 − c_i) over the
        block's loans of generation g, so that ∂(Σ_i DF d_i LGD_i)/∂H_g(t) = P_g(t) R_g(t).
    remat_steps: recompute each period's intermediates in the backward pass from the carry
    (jax.checkpoint) instead of storing them as [T, S, b] stacks.
    """
    dtype = terms.threshold.dtype
    gen = terms.generation
    n_scen = paths.credit.shape[1]
    block = gen.shape[0]
    floor, cap = p.coverage_floor, p.coverage_cap
    ln_floor, ln_cap = jnp.log(floor), jnp.log(cap)
    positive_ltv = p.refi_ltv > 0
    ln_ltv = jnp.where(positive_ltv, jnp.log(jnp.where(positive_ltv, p.refi_ltv, 1)), -LOG_BIG)

    sampled = grid.mode == "sampled"
    u = jnp.take(uniforms, terms.borrower, axis=1) if sampled else None  # [S, b]
    # Per-loan-period constants of the hazard, hoisted out of the scenario loop [T, b]: with
    # x = (β_L ln LC + β_C ln CC + refi + √ρ Z − base) · scale, h = Φ(z) = ½ erfc(x), where
    # base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref(t) + β_C ln CC^ref(t) (the PD anchor's references,
    # constants of the run) and scale = 1/(√2 √(1 − ρ)).
    hazard_base = (
        terms.threshold
        + p.beta_liquidity * terms.ln_liquidity_reference
        + p.beta_collateral * terms.ln_collateral_reference
    )  # [T, b]
    scale = terms.inv_sqrt_one_minus_rho * np.sqrt(0.5).astype(dtype)
    if "recovery_weights" in extras:
        n_gen = terms.volume_weights.shape[-1]
        recovery_weights = jax.nn.one_hot(gen, n_gen, dtype=dtype) * terms.recovery_gpus[:, None]

    def step(carry, xs):
        cash, survival, defaulted, loss, defaulted_exposure = carry
        f, period, base = xs
        rent_g = _take(f.rent, gen)
        ln_price_g = _take(f.ln_price, gen)
        noi = (
            period.fixed_income_usd
            + period.rent_hours * rent_g
            - terms.power_kwh_per_period * f.power[:, None]
            + terms.btc_income_usd * f.btc_income_index[:, None]
        )
        debt_service = (
            period.debt_service_fixed_usd + period.debt_service_per_rate_usd * f.rate[:, None]
        )
        crypto = terms.btc_units * f.btc[:, None] + terms.eth_units * f.eth[:, None]
        ln_lc = _ln_coverage(cash + crypto + noi, debt_service, floor, cap)
        ln_cc = jnp.clip(ln_price_g + period.ln_gpus_per_balance, ln_floor, ln_cap)
        ln_rf = jnp.clip(
            jnp.minimum(ln_ltv + ln_price_g + terms.ln_gpus_per_balloon, 0), ln_floor, ln_cap
        )
        refinancing = jnp.where(
            period.at_refinancing, p.beta_refinancing * (ln_rf - terms.ln_refinancing_reference), 0
        )
        x = (
            p.beta_liquidity * ln_lc
            + p.beta_collateral * ln_cc
            + refinancing
            + terms.sqrt_rho * f.credit[:, None]
            - base
        ) * scale
        # Φ(z) = ½ erfc(−z/√2): one erfc per loan-period (jax.scipy's ndtr evaluates both
        # erf and erfc and selects); erfc keeps the small hazards' relative accuracy.
        hazard = jnp.where(period.active, 0.5 * _erfc(x), 0)
        new_survival = survival * (1 - hazard)
        if sampled:
            crossed = (1 - new_survival) >= u  # 1 − S_i(t) >= U_b
            default = (crossed & ~defaulted).astype(dtype)
            defaulted = defaulted | crossed
        else:
            default = survival * hazard
        cash = jnp.maximum(cash + noi - debt_service, 0)
        ys = {}
        if haircut is None or "volume" in extras:
            ys["volume"] = jnp.matmul(
                default, terms.volume_weights, precision=lax.Precision.HIGHEST
            )  # [S, G]
        if haircut is None:
            expected = ys["volume"]
            if sampled:  # the expected volume Σ n a S(t−1) h(t) sets the market's rate
                expected = jnp.matmul(
                    survival * hazard, terms.volume_weights, precision=lax.Precision.HIGHEST
                )
            return (cash, new_survival, defaulted, loss, defaulted_exposure), (
                ys["volume"],
                expected,
            )
        recovery = terms.recovery_gpus * _take(f.salvage_price, gen) + (
            terms.crypto_pledged * crypto
        )
        exposure = period.exposure_fixed_usd + period.debt_service_per_rate_usd * f.rate[:, None]
        lgd = jnp.maximum(exposure - recovery, 0)
        weight = default if discount is None else f.discount[:, None] * default
        if "recovery_weights" in extras:
            ys["recovery_weights"] = jnp.matmul(
                jnp.where(exposure > recovery, weight, 0),
                recovery_weights,
                precision=lax.Precision.HIGHEST,
            )  # [S, G]
        return (
            cash,
            new_survival,
            defaulted,
            loss + weight * lgd,
            defaulted_exposure + weight * exposure,
        ), ys

    shape = (n_scen, block)
    carry = (
        jnp.broadcast_to(terms.cash_usd, shape),
        jnp.ones(shape, dtype),
        jnp.zeros(shape, bool),
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
    )
    factors = _StepFactors(
        rent=paths.rent,
        ln_price=paths.ln_price,
        btc=paths.btc,
        eth=paths.eth,
        power=paths.power,
        rate=paths.rate,
        credit=paths.credit,
        btc_income_index=paths.btc_income_index,
        salvage_price=(
            paths.price * (1 - haircut)
            if haircut is not None
            else jnp.zeros((grid.periods, 0, 0), dtype)
        ),
        discount=discount if discount is not None else jnp.zeros((grid.periods, 0), dtype),
    )
    period_terms = _PeriodTerms(*(getattr(terms, name) for name in _PeriodTerms._fields))
    (_, survival, defaulted, loss, defaulted_exposure), ys = lax.scan(
        jax.checkpoint(step) if remat_steps else step, carry, (factors, period_terms, hazard_base)
    )
    if haircut is None:
        return ys  # (Q, expected) [T, S, G] each
    default_probability = defaulted.astype(dtype) if sampled else 1 - survival
    outcome = _BlockOutcome(loss, default_probability, defaulted_exposure)
    return (outcome, ys) if extras else outcome


class _BlockOutcome(NamedTuple):
    """Pass 2 of one block, [S, b] each (docs/spec.md §6 and the contributions table)."""

    loss: jax.Array  # Σ_t DF d ℓ
    default_probability: jax.Array  # 1 − S_i(T), or 1 if the loan defaulted (sampled)
    defaulted_exposure: jax.Array  # Σ_t DF d EAD


class _StepFactors(NamedTuple):
    rent: jax.Array  # [T, S, G]
    ln_price: jax.Array
    btc: jax.Array  # [T, S]
    eth: jax.Array
    power: jax.Array
    rate: jax.Array
    credit: jax.Array
    btc_income_index: jax.Array  # [T, S]
    salvage_price: jax.Array  # [T, S, G] P_g(t) (1 − H_g(t)) (pass 2) or [T, 0, 0]
    discount: jax.Array  # [T, S] or [T, 0]


class _PeriodTerms(NamedTuple):
    """The [T, b] leaves of `_LoanTerms` the period loop scans over (same names)."""

    fixed_income_usd: jax.Array  # [T, b]
    rent_hours: jax.Array
    debt_service_fixed_usd: jax.Array
    debt_service_per_rate_usd: jax.Array
    exposure_fixed_usd: jax.Array
    ln_gpus_per_balance: jax.Array
    active: jax.Array
    at_refinancing: jax.Array


def _shifted(normals, normal_shift, grid: ModelGrid):
    """Importance sampling: the systematic normals z [S, T, :K] move to z + μ (μ [T, K]);
    the χ² slots do not (kernels.reference.shift_normals)."""
    if normal_shift is None:
        return normals
    k = grid.n_factors
    mu = jnp.asarray(normal_shift).astype(normals.dtype)
    return normals.at[..., :k].add(mu[None])


def _simulate(
    params,
    grid: ModelGrid,
    blocks: LoanBlocks,
    normals,
    uniforms,
    output: str,
    scenario_weights=None,
    valid_count=None,
):
    """From the chunk's random numbers, by `output`:
    "total": loss per scenario [S]; "per_loan": loss per scenario and loan [S, NB b];
    "outcomes": (loss [S], and summed over the scenarios, per loan [NB b]: loss, default
    probability, defaulted exposure), each scenario weighted by `scenario_weights` [S]
    (importance sampling's likelihood ratios) when given, and only the first `valid_count`
    scenarios summed when given (a short chunk computed by a full chunk's program)."""
    dtype = blocks.dtype
    p = _cast_params(params, dtype)
    terms = _loan_terms(blocks, grid, dtype)
    paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
    discount = None
    if grid.discount:
        discount = jnp.exp(-jnp.cumsum(paths.rate * grid.dt_years, axis=0))  # [T, S] DF(t)
    n_scen = normals.shape[0]

    # Pass 1: the liquidation volumes (Q, expected) [T, S, G], summed over the blocks.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def volume_block(volumes, block_terms):
        block = _revalue_block(p, grid, block_terms, paths, uniforms, None, None)
        return jax.tree.map(jnp.add, volumes, block), None

    volume0 = jnp.zeros((grid.periods, n_scen, grid.n_generations), dtype)
    (volume, expected_volume), _ = lax.scan(volume_block, (volume0, volume0), terms)
    book_gpus = _book_gpus(blocks, grid, dtype)
    haircut = _haircut(p, grid, _liquidation_supply(p, volume, expected_volume, book_gpus))

    # Pass 2: recompute the hazards and apply the haircut.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def loss_block(total, block_terms):
        outcome = _revalue_block(p, grid, block_terms, paths, uniforms, haircut, discount)
        total = total + jnp.sum(outcome.loss, axis=1)
        if output == "per_loan":
            return total, outcome.loss  # [S, b]
        if output == "outcomes":
            if scenario_weights is None and valid is None:
                return total, tuple(jnp.sum(x, axis=0) for x in outcome)  # 3 × [b]
            if scenario_weights is None:
                return total, tuple(jnp.sum(jnp.where(valid, x, 0), axis=0) for x in outcome)
            weights = (
                scenario_weights if valid is None else jnp.where(valid[:, 0], scenario_weights, 0)
            )
            return total, tuple(weights @ x for x in outcome)
        return total, None

    valid = None
    if valid_count is not None:
        valid = (jnp.arange(n_scen, dtype=jnp.uint32) < valid_count)[:, None]  # [S, 1]
    total, per_block = lax.scan(loss_block, jnp.zeros((n_scen,), dtype), terms)
    if output == "per_loan":
        return jnp.moveaxis(per_block, 0, 1).reshape(n_scen, -1)  # [S, NB b], padding included
    if output == "outcomes":
        return (total, *(x.reshape(-1) for x in per_block))
    return total


# --------------------------------------------------------------------------- public API


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


def _statics(grid: ModelGrid, blocks: LoanBlocks) -> tuple[LoanBlocks, int]:
    """(blocks without their Python ints, the static uniform count for sampled mode).

    Uniforms are drawn for the borrower count rounded up to a power of two (extra draws are
    independent counters nobody reads), so books that share a padded shape share a compile.
    """
    n_uniforms = 0
    if grid.mode == "sampled":
        n_uniforms = 1 << max(int(blocks.n_borrowers) - 1, 0).bit_length()
    return blocks._replace(n_loans=None, n_borrowers=None), n_uniforms


@functools.partial(jax.jit, static_argnames=("grid", "count", "n_uniforms", "output"))
def _chunk_losses_jit(
    params,
    grid,
    blocks,
    seed,
    first_scenario,
    count,
    n_uniforms,
    output,
    normal_shift=None,
    scenario_weights=None,
    valid_count=None,
):
    TRACE_COUNTS["chunk_losses"] += 1
    dtype = blocks.dtype
    normals = shock_normals_jax(
        seed, first_scenario, count, grid.periods, grid.slots_per_period, dtype
    )
    normals = _shifted(normals, normal_shift, grid)
    uniforms = None
    if grid.mode == "sampled":
        uniforms = default_uniforms_jax(seed, first_scenario, count, n_uniforms, dtype)
    if scenario_weights is not None:
        scenario_weights = scenario_weights.astype(dtype)
    return _simulate(params, grid, blocks, normals, uniforms, output, scenario_weights, valid_count)


@functools.partial(jax.jit, static_argnames=("grid", "output", "n_uniforms"))
def _losses_at_jit(params, grid, blocks, seed, scenarios, output, n_uniforms, normal_shift=None):
    TRACE_COUNTS["loan_losses_at" if output == "per_loan" else "losses_at"] += 1
    dtype = blocks.dtype
    normals = shock_normals_jax_at(seed, scenarios, grid.periods, grid.slots_per_period, dtype)
    normals = _shifted(normals, normal_shift, grid)
    uniforms = None
    if grid.mode == "sampled":
        uniforms = default_uniforms_jax_at(seed, scenarios, n_uniforms, dtype)
    return _simulate(params, grid, blocks, normals, uniforms, output)


SCHEDULE_LEAVES = (
    "balance_before_usd",
    "installment_usd",
    "ln_gpus_per_balance",
    "ln_gpus_per_balloon",
)  # the LoanBlocks leaves that depend on the balance schedule


def schedule_tangent(
    loans: LoanArrays, rate_level: float, steps_per_year: int, block_size: int = 512
) -> tuple[jax.Array, ...]:
    """d/dr(0) of the schedule-dependent LoanBlocks leaves (SCHEDULE_LEAVES order, float64):
    the schedules are per-book constants built from r(0) outside the AD graph (docs/spec.md §3),
    so `weighted_loss_gradient` adds ⟨∂L/∂leaf, d leaf/dr(0)⟩ to ∂/∂rate_level."""
    from gpucredit.kernels.schedule import balance_schedule

    periods = np.asarray(loans.balance_usd).shape[1] - 1
    step = 1e-6

    def blocks_at(level: float) -> LoanBlocks:
        rate0 = loans.rate + loans.is_floating * level
        balance, installment, balloon, _ = balance_schedule(
            loans.balance_usd[:, 0], rate0, loans.maturity_years, loans.amortization,
            steps_per_year, periods,
        )  # fmt: skip
        moved = loans._replace(balance_usd=balance, installment_usd=installment,
                               balloon_usd=balloon)  # fmt: skip
        return prepare_loans(moved, jnp.float64, block_size)

    up, down = blocks_at(rate_level + step), blocks_at(rate_level - step)
    return tuple((getattr(up, k) - getattr(down, k)) / (2 * step) for k in SCHEDULE_LEAVES)


# The _LoanTerms leaves computed from SCHEDULE_LEAVES (the rest do not depend on them).
SCHEDULE_TERMS = (
    "debt_service_fixed_usd",
    "debt_service_per_rate_usd",
    "exposure_fixed_usd",
    "ln_gpus_per_balance",
    "ln_gpus_per_balloon",
)


def _loss_gradient(params, grid, blocks, normals, coefficients, remat_steps=True):
    """Σ_j c_j L_j and its reverse-mode gradient, in one backward sweep over the loan blocks.

    L = F₂(θ, H(θ, Q)) with Q = F₁(θ): F₁ is pass 1 (the liquidation volume), H the haircut,
    F₂ pass 2 (the loss at a given haircut). Both passes run the same hazard recursion, so
    instead of differentiating them one after the other (the backward of each recomputing its
    forward), the gradient runs:
      1. pass 1 forward: Q [T, S, G];  H = H(θ, Q) and its VJP;
      2. pass 2 forward: the losses, and R [T, S, G] with ∂F₂/∂H = c P R (`_revalue_block`'s
         "recovery_weights"), hence Q̄ = (∂H/∂Q)ᵀ H̄ before any block's backward;
      3. per block, one VJP of (F₁, F₂) jointly with the cotangents (Q̄, c): θ̄ += Q̄ ∂F₁/∂θ +
         c ∂F₂/∂θ (H held fixed; its own dependence on θ came in step 1);
      4. the factor paths' and the parameters' cast back to θ.
    Same gradient as jax.grad of the loss (tests), about 40% less work.

    params: float64 ModelParams; blocks: LoanBlocks (dtype of the computation; its
    SCHEDULE_LEAVES are differentiated too); normals [S, T, K + ν]; coefficients [S] float64.
    Returns (value float64, ModelParams of gradients, {SCHEDULE_LEAVES name: gradient}).
    """
    dtype = blocks.dtype
    cotangent = coefficients.astype(dtype)  # ∂value/∂L_j

    def upstream(theta):
        p = _cast_params(theta, dtype)
        paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
        discount = None
        if grid.discount:
            discount = jnp.exp(-jnp.cumsum(paths.rate * grid.dt_years, axis=0))  # [T, S]
        return p, paths, discount

    (p, paths, discount), upstream_vjp = jax.vjp(upstream, params)
    schedule = {k: getattr(blocks, k) for k in SCHEDULE_LEAVES}

    def schedule_terms(leaves):
        terms = _loan_terms(blocks._replace(**leaves), grid, dtype)
        return {k: getattr(terms, k) for k in SCHEDULE_TERMS}

    scheduled, schedule_vjp = jax.vjp(schedule_terms, schedule)
    terms = _loan_terms(blocks, grid, dtype)
    n_scen = normals.shape[0]

    # 1. pass 1 forward, the haircut (conditional mode: the expected volume is Q itself)
    def volume_block(volume, block_terms):
        block, _ = _revalue_block(p, grid, block_terms, paths, None, None, None)
        return volume + block, None

    volume0 = jnp.zeros((grid.periods, n_scen, grid.n_generations), dtype)
    volume, _ = lax.scan(volume_block, volume0, terms)
    book_gpus = _book_gpus(blocks, grid, dtype)
    haircut, haircut_vjp = jax.vjp(
        lambda p, q: _haircut(p, grid, _liquidation_supply(p, q, q, book_gpus)), p, volume
    )

    # 2. pass 2 forward: the losses and the haircut's cotangent
    def loss_block(carry, block_terms):
        total, weights = carry
        outcome, ys = _revalue_block(
            p, grid, block_terms, paths, None, haircut, discount, ("recovery_weights",)
        )
        return (total + jnp.sum(outcome.loss, axis=1), weights + ys["recovery_weights"]), None

    (losses, recovery_weights), _ = lax.scan(
        loss_block, (jnp.zeros((n_scen,), dtype), jnp.zeros_like(volume0)), terms
    )
    haircut_bar = cotangent[None, :, None] * paths.price * recovery_weights
    p_bar, volume_bar = haircut_vjp(haircut_bar)

    # 3. one backward sweep over the blocks, both passes at once
    def backward_block(carry, xs):
        block_terms, block_scheduled = xs

        def both_passes(p, paths, discount, leaves):
            outcome, ys = _revalue_block(
                p, grid, block_terms._replace(**leaves), paths, None, haircut, discount,
                ("volume",), remat_steps,
            )  # fmt: skip
            return ys["volume"], jnp.sum(outcome.loss, axis=1)

        _, vjp = jax.vjp(both_passes, p, paths, discount, block_scheduled)
        bars = vjp((volume_bar, cotangent))
        carry = jax.tree.map(jnp.add, carry, bars[:3])
        return carry, bars[3]

    zeros = jax.tree.map(jnp.zeros_like, (p_bar, paths, discount))
    (p_blocks_bar, paths_bar, discount_bar), scheduled_bar = lax.scan(
        backward_block, zeros, (terms, scheduled)
    )

    # 4. back to θ
    p_bar = jax.tree.map(jnp.add, p_bar, p_blocks_bar)
    (grads,) = upstream_vjp((p_bar, paths_bar, discount_bar))
    (schedule_bar,) = schedule_vjp(scheduled_bar)
    value = jnp.sum(coefficients * losses.astype(jnp.float64))
    return value, grads, schedule_bar


@functools.partial(jax.jit, static_argnames=("grid", "remat_steps"))
def _weighted_loss_gradient_jit(
    params,
    grid,
    blocks,
    seed,
    scenarios,
    coefficients,
    normal_shift=None,
    tangent=None,
    remat_steps=True,
):
    TRACE_COUNTS["weighted_loss_gradient"] += 1
    normals = shock_normals_jax_at(
        seed, scenarios, grid.periods, grid.slots_per_period, blocks.dtype
    )
    normals = _shifted(normals, normal_shift, grid)
    value, grads, schedule_bar = _loss_gradient(
        params, grid, blocks, normals, coefficients, remat_steps
    )
    if tangent is None:
        return value, grads
    through_schedule = sum(
        jnp.vdot(schedule_bar[k].astype(jnp.float64), t)
        for k, t in zip(SCHEDULE_LEAVES, tangent, strict=True)
    )
    return value, grads._replace(rate_level=grads.rate_level + through_schedule)


def chunk_losses(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    first_scenario,
    count: int,
    normal_shift=None,
) -> jax.Array:
    """Portfolio loss L(ω) (docs/spec.md §6) for scenarios first_scenario .. first_scenario+count−1.

    Args:
      params: ModelParams (float64 NumPy or JAX leaves; cast to blocks.dtype inside).
      grid: ModelGrid (static: mode, copula, discounting, launch periods).
      blocks: from `prepare_loans`; its dtype is the computation's.
      seed: int in [0, 2^32) or a uint32 scalar (traced: a new seed does not retrace).
      first_scenario: int or uint32 scalar (traced: a new chunk does not retrace).
      count: S, the chunk size (static).
      normal_shift: [T, K] or None: importance sampling's shift of the systematic normals.
    Returns:
      [count] losses in blocks.dtype, USD.
    """
    stripped, n_uniforms = _statics(grid, blocks)
    return _chunk_losses_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        n_uniforms,
        "total",
        _shift_arg(normal_shift),
    )


def chunk_outcomes(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    first_scenario,
    count: int,
    normal_shift=None,
    scenario_weights=None,
    valid_count=None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """What pass 1 of a run keeps of a chunk: the portfolio loss per scenario [count] and,
    summed over the chunk's scenarios, per loan [N]: the loss, the horizon default
    probability 1 − S_i(T) (sampled mode: default indicators) and the defaulted exposure
    Σ_t DF d_i(t) EAD_i(t); each scenario weighted by `scenario_weights` [count] when given
    (importance sampling, with `normal_shift`). `valid_count` (<= count, traced: no
    recompilation): sum only the first valid_count scenarios, so that a run's short last
    chunk reuses the full chunks' program; the caller drops the other losses. Other
    arguments as `chunk_losses`."""
    stripped, n_uniforms = _statics(grid, blocks)
    losses, loss_sum, pd_sum, ead_sum = _chunk_losses_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        n_uniforms,
        "outcomes",
        _shift_arg(normal_shift),
        None if scenario_weights is None else jnp.asarray(scenario_weights),
        None if valid_count is None else _u32(valid_count, "valid_count"),
    )
    n = blocks.n_loans
    return losses, loss_sum[:n], pd_sum[:n], ead_sum[:n]


def losses_at(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    normal_shift=None,
):
    """Portfolio loss [S] for an explicit array of scenario indices [S] (e.g. the tail set)."""
    stripped, n_uniforms = _statics(grid, blocks)
    return _losses_at_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        "total",
        n_uniforms,
        _shift_arg(normal_shift),
    )


def loan_losses_at(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    normal_shift=None,
) -> jax.Array:
    """Loss per scenario and loan [S, N] (padding removed), for Euler contributions.

    Σ over the loans equals `losses_at` up to rounding. Memory is O(S N).
    """
    stripped, n_uniforms = _statics(grid, blocks)
    losses = _losses_at_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        "per_loan",
        n_uniforms,
        _shift_arg(normal_shift),
    )
    return losses[:, : blocks.n_loans]


def weighted_loss_gradient(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    coefficients,
    normal_shift=None,
    schedule_rate_tangent=None,
    remat_steps: bool = True,
) -> tuple[jax.Array, ModelParams]:
    """Σ_j c_j L(ω_j) and its gradient w.r.t. every ModelParams leaf (reverse-mode AD).

    Always the conditional-mode loss (smooth), whatever grid.mode says; the scenarios are
    regenerated from their indices (common random numbers). With c_j = 1/S this is ∂EL; with
    the tail coefficients of the forward pass, ∂ES_α (Hong & Liu 2009).

    Args:
      scenario_indices: [S] scenario indices.
      coefficients: [S] weights c_j (float64 in the sum).
    Returns:
      (value float64 scalar, grads: ModelParams of float64 arrays shaped like the leaves).
      Correlation: grads.correlation[j, k] is the derivative w.r.t. the entry [j, k] of the
      matrix as passed; jnp.linalg.cholesky symmetrizes its input, so for a symmetric move
      of Σ_jk = Σ_kj (docs/spec.md §7) the derivative is grads[j, k] + grads[k, j].
      schedule_rate_tangent: `schedule_tangent(...)` to include r(0)'s effect on the balance
      schedules in grads.rate_level (without it, the schedules are held fixed).
      remat_steps: recompute each period's intermediates in the backward sweep (True, less
      memory traffic) or store them as [T, S, b] stacks per block (False).
    The backward runs both passes in one sweep over the loan blocks (`_loss_gradient`).
    """
    params = ModelParams(*(jnp.asarray(leaf, dtype=jnp.float64) for leaf in params))
    stripped, _ = _statics(grid._replace(mode="conditional"), blocks)
    return _weighted_loss_gradient_jit(
        params,
        grid._replace(mode="conditional"),
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        jnp.asarray(coefficients, dtype=jnp.float64),
        _shift_arg(normal_shift),
        schedule_rate_tangent,
        remat_steps,
    )


def _shift_arg(normal_shift):
    return None if normal_shift is None else jnp.asarray(normal_shift, dtype=jnp.float64)


@functools.partial(jax.jit, static_argnames=("grid", "count"))
def _log_weights_jit(grid, seed, first_scenario, count, normal_shift):
    normals = shock_normals_jax(
        seed, first_scenario, count, grid.periods, grid.slots_per_period, jnp.float64
    )
    z = normals[..., : grid.n_factors]
    return -jnp.einsum("stk,tk->s", z, normal_shift) - 0.5 * jnp.sum(normal_shift**2)


def importance_log_weights(grid: ModelGrid, seed, first_scenario, count: int, normal_shift):
    """ln w(ω) [count] of scenarios first_scenario.. under the shift μ = normal_shift [T, K]:
    w = φ(z + μ)/φ(z) = exp(−μ·z − |μ|²/2), z the unshifted Threefry normals (float64; the
    same numbers as kernels.reference.shift_normals)."""
    return _log_weights_jit(
        grid,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        _shift_arg(normal_shift),
    )


@functools.partial(jax.jit, static_argnames=("grid", "output"))
def _loss_given_normals_jit(params, grid, blocks, normals, output):
    TRACE_COUNTS["loss_given_normals"] += 1
    return _simulate(params, grid, blocks, normals.astype(blocks.dtype), None, output)


def loss_given_normals(
    params: ModelParams, grid: ModelGrid, blocks: LoanBlocks, normals, per_loan: bool = False
) -> jax.Array:
    """Conditional-mode loss for given stream-0 normals [S, T, K + ν] instead of the Threefry
    ones: [S] (or [S, N] with per_loan). Differentiable in `normals` (reverse stress testing
    searches the shock path with it) and in `params`."""
    stripped, _ = _statics(grid._replace(mode="conditional"), blocks)
    losses = _loss_given_normals_jit(
        _params_arg(params),
        grid._replace(mode="conditional"),
        stripped,
        jnp.asarray(normals),
        "per_loan" if per_loan else "total",
    )
    return losses[:, : blocks.n_loans] if per_loan else losses
