"""The book on the device for the JAX kernels: LoanBlocks and the per-chunk loan terms.

- `prepare_loans` hoists every per-loan constant out of the period and scenario loops once
  per book (Φ⁻¹(p^Δ) inputs, √ρ, 1/√(1−ρ), the balance schedule, ln(n_i a_i / B_i(t−1)) so
  that ln CC_i(t) = ln P_g(t) + that, clipped in log space), pads the book with inert loans
  to a multiple of `block_size` and reshapes it to [blocks, block_size, ...].
- `_loan_terms` derives, once per chunk in the graph (O(N T), not per scenario), what the
  period loop (`jax_step._revalue_block`) reads: the terms that need Δ (hours per period,
  p^Δ, interest per period), the balance schedule folded into debt service and exposure,
  in the dtype of the computation. `_book_gpus` is the book's pledged GPUs per generation.
- SCHEDULE_LEAVES / SCHEDULE_TERMS name the LoanBlocks leaves that depend on the balance
  schedule and the `_LoanTerms` leaves computed from them (the gradient's path through
  r(0), `jax_backward`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.params import (
    HOURS_PER_YEAR,
    LOG_BIG,
    THRESHOLD_LIMIT,
    LoanArrays,
    ModelGrid,
    safe_log_ratio,
)
from gpucredit.kernels.reference import require_pd_references

__all__ = ["SCHEDULE_LEAVES", "SCHEDULE_TERMS", "LoanBlocks", "prepare_loans"]


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
    offtaker: jax.Array  # [NB, b] int32 offtaker index j (docs/spec.md §4a), -1: none
    offtaker_pd_annual: jax.Array  # [J] float64 p_j; J = 0 for a book naming none
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

    @property
    def n_offtakers(self) -> int:
        """J (static: its shape): 0 keeps the kernels' path without offtakers."""
        return int(self.offtaker_pd_annual.shape[0])


def default_block_size() -> int:
    """Loans per block b on JAX's default backend: 128 on a CPU, 512 on a GPU.

    On a CPU each period of the loop writes a handful of [S, b] temporaries; at b = 128 and
    S = 4,096-8,192 scenarios they stay in the caches (2-4 MiB each against 1 MiB of L2 per
    core and 32 MiB of L3 on the benchmark's EPYC), at b = 512 they go to DRAM: about 1.4x
    the throughput on the 10,000-loan book (bench/results). A GPU wants large launches.
    """
    import jax

    return 128 if jax.default_backend() == "cpu" else 512


def prepare_loans(
    loans: LoanArrays, dtype=jnp.float32, block_size: int | None = None
) -> LoanBlocks:
    """Hoist the per-loan constants out of the period and scenario loops; block the book.

    Args:
      loans: the book's LoanArrays (float64 NumPy; schedules on the run's grid, [N, T + 1]).
      dtype: float32 or float64, the dtype of every chunk computed with these blocks.
      block_size: loans per block b (None: `default_block_size()`; a smaller book uses the
        next power of two >= N); the book is padded with inert loans to a multiple of b.
        Memory per block is O(S b). The summation order of the volumes depends on b, so
        float32 losses differ in the last bits between block sizes.
    Returns:
      LoanBlocks (device arrays).
    """
    configure_jax()
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    require_pd_references(loans)
    n_loans = len(np.asarray(loans.gpu_count))
    periods = np.asarray(loans.balance_usd).shape[1] - 1
    # b: block_size, or for a book smaller than that the next power of two >= N.
    if block_size is None:
        block_size = default_block_size()
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
        offtaker=per_loan(
            np.full(n_loans, -1) if loans.offtaker is None else loans.offtaker, -1, np.int32
        ),
        offtaker_pd_annual=jnp.asarray(
            np.zeros(0) if loans.offtaker_pd_annual is None else _f64(loans.offtaker_pd_annual)
        ),
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
    # Offtakers (docs/spec.md §4a): after the default of loan i's offtaker its contracted
    # GPUs earn spot rent, NOI += contract_rent_hours R − contract_income. [NB, T, 0] (unused)
    # for a book naming none.
    offtaker: jax.Array  # [NB, b] int32, -1: none
    contract_income_usd: jax.Array  # [NB, T, b] n N_h k_i(t) R^c
    contract_rent_hours: jax.Array  # [NB, T, b] n N_h k_i(t) u


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
    if blocks.n_offtakers:
        contract_income = n_t * hours * k * contract[:, None, :]
        contract_rent_hours = n_t * hours * k * util[:, None, :]
    else:
        contract_income = contract_rent_hours = jnp.zeros((k.shape[0], grid.periods, 0), f64)
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
        offtaker=blocks.offtaker,
        contract_income_usd=cast(contract_income),
        contract_rent_hours=cast(contract_rent_hours),
    )


SCHEDULE_LEAVES = (
    "balance_before_usd",
    "installment_usd",
    "ln_gpus_per_balance",
    "ln_gpus_per_balloon",
)  # the LoanBlocks leaves that depend on the balance schedule


# The _LoanTerms leaves computed from SCHEDULE_LEAVES (the rest do not depend on them).
SCHEDULE_TERMS = (
    "debt_service_fixed_usd",
    "debt_service_per_rate_usd",
    "exposure_fixed_usd",
    "ln_gpus_per_balance",
    "ln_gpus_per_balloon",
)
