"""A reproducible synthetic loan book of realistic GPU-backed borrowers.

Three kinds of borrower, sized with MODEL.md §9's rents and prices:
- neoclouds (about half the loans): take-or-pay contracts above market rent, floating-rate
  delayed-draw term loans (spread 6-13%), linear or annuity amortization, 3-6 years;
- miners turned AI hosts (about a third): BTC/ETH treasuries (sometimes pledged), fixed-rate
  notes 8-14%, often bullet, 2-5 years;
- enterprises (the rest): fixed 6-9% annuity loans on fleets for their own use.
Balances are set from a loan-to-value of 50-80% at origination, so most loans cover today's
debt service 1.0-2.5 times. `python -m gpucredit.portfolio.makebook` regenerates the
embedded example book (2,000 loans, seed 2026).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from gpucredit.kernels.params import HOURS_PER_YEAR

# MODEL.md §9 market levels used to size the book (today's values).
GENERATIONS = ("A100", "H100", "H200", "B200")
PRICE_USD = np.array([9_000.0, 22_000.0, 29_000.0, 40_000.0])  # [G] per GPU
RENT_USD_PER_HOUR = np.array([1.20, 2.20, 3.00, 4.50])  # [G] market rent per GPU-hour
POWER_KW_PER_GPU = np.array([0.52, 0.91, 0.91, 1.30])  # [G] facility draw, PUE 1.3
POWER_USD_PER_KWH = 0.08

EXAMPLE_LOANS = 2_000
EXAMPLE_SEED = 2026

BORROWER_TYPES = ("neocloud", "miner", "enterprise")
BORROWER_SHARES = (0.50, 0.33, 0.17)  # of borrowers (and so, on average, of loans)
BORROWER_PREFIX = {"neocloud": "NC", "miner": "MN", "enterprise": "EN"}
# Generation mix per borrower type (A100, H100, H200, B200): miners run older fleets.
GENERATION_MIX = {
    "neocloud": (0.10, 0.40, 0.25, 0.25),
    "miner": (0.35, 0.40, 0.15, 0.10),
    "enterprise": (0.20, 0.45, 0.20, 0.15),
}
# Median fleet size (GPUs) per borrower type; lognormal with sigma 1, clipped to 64-20,000.
MEDIAN_GPU_COUNT = {"neocloud": 1_500.0, "miner": 600.0, "enterprise": 300.0}
MIN_GPU_COUNT, MAX_GPU_COUNT = 64, 20_000


def make_book(n_loans: int, seed: int = 0) -> pa.Table:
    """A synthetic book of `n_loans` loans with every column of DESIGN.md, deterministic in
    (n_loans, seed). Loans of one borrower share its type, PD, correlation and treasury."""
    if n_loans < 1:
        raise ValueError(f"n_loans must be >= 1, got {n_loans}")
    rng = np.random.Generator(np.random.PCG64(seed))

    # Borrowers with 1-6 loans each, enough of them to fill n_loans.
    loans_per_borrower = rng.integers(1, 7, size=n_loans)
    n_borrowers = int(np.searchsorted(np.cumsum(loans_per_borrower), n_loans) + 1)
    loans_per_borrower = loans_per_borrower[:n_borrowers]
    loans_per_borrower[-1] -= loans_per_borrower.sum() - n_loans
    kind_b = rng.choice(len(BORROWER_TYPES), size=n_borrowers, p=BORROWER_SHARES)
    borrower_ids = _borrower_ids(kind_b)

    # Borrower-level credit: PD (log-uniform per type), asset correlation, crypto policy.
    pd_low = np.array([0.02, 0.04, 0.01])[kind_b]
    pd_high = np.array([0.08, 0.10, 0.04])[kind_b]
    pd_b = np.exp(rng.uniform(np.log(pd_low), np.log(pd_high)))
    rho_low = np.array([0.15, 0.18, 0.10])[kind_b]
    rho_high = np.array([0.25, 0.25, 0.18])[kind_b]
    rho_b = rng.uniform(rho_low, rho_high)
    pledges_crypto_b = (kind_b == 1) & (rng.random(n_borrowers) < 0.4)
    holds_eth_b = (kind_b == 1) & (rng.random(n_borrowers) < 0.3)

    # Loans, borrower by borrower.
    b = np.repeat(np.arange(n_borrowers), loans_per_borrower)  # [N] borrower of each loan
    kind = kind_b[b]
    is_nc, is_mn, is_en = kind == 0, kind == 1, kind == 2
    n = n_loans

    mix = np.array([GENERATION_MIX[t] for t in BORROWER_TYPES])[kind]  # [N, G]
    g = (rng.random(n)[:, None] > np.cumsum(mix, axis=1)).sum(axis=1)
    g = np.minimum(g, len(GENERATIONS) - 1)  # guard against rounding of the cumsum
    median = np.array([MEDIAN_GPU_COUNT[t] for t in BORROWER_TYPES])[kind]
    gpu_count = np.clip(
        np.round(median * rng.lognormal(0.0, 1.0, n)), MIN_GPU_COUNT, MAX_GPU_COUNT
    ).astype(np.int64)

    # The lien covers the whole fleet for most loans; a share of it for some.
    partial_lien = rng.random(n) < 0.2
    collateral_share = np.where(partial_lien, np.round(rng.uniform(0.5, 0.9, n), 2), 1.0)
    ltv = rng.uniform(0.50, 0.80, n)
    # Whole dollars, but never past the 50-80% LTV band.
    collateral_usd = gpu_count * PRICE_USD[g] * collateral_share
    balance_usd = np.clip(np.round(ltv * collateral_usd), np.ceil(0.5 * collateral_usd), None)
    balance_usd = np.minimum(balance_usd, np.floor(0.8 * collateral_usd))

    # Terms per borrower type.
    rate_type = np.where(is_nc, "floating", "fixed")
    rate = np.round(
        np.select(
            [is_nc, is_mn],
            [rng.uniform(0.06, 0.13, n), rng.uniform(0.08, 0.14, n)],
            rng.uniform(0.06, 0.09, n),
        ),
        4,
    )
    maturity_years = _quarters(
        np.select(
            [is_nc, is_mn], [rng.uniform(3, 6, n), rng.uniform(2, 5, n)], rng.uniform(3, 6, n)
        )
    )
    u_amort = rng.random(n)
    amortization = np.select(
        [is_nc & (u_amort < 0.5), is_nc, is_mn & (u_amort < 0.45), is_mn & (u_amort < 0.75)],
        ["linear", "annuity", "bullet", "linear"],
        "annuity",
    )

    # Operations: take-or-pay contracts above market rent for neoclouds, some for miners.
    rent = RENT_USD_PER_HOUR[g]
    has_contract = is_nc | (is_mn & (rng.random(n) < 0.4)) | (is_en & (rng.random(n) < 0.3))
    contracted_share = np.round(
        np.where(
            has_contract,
            np.where(is_nc, rng.uniform(0.5, 0.9, n), rng.uniform(0.2, 0.6, n)),
            0.0,
        ),
        2,
    )
    contract_rate_usd_per_hour = np.round(
        np.where(has_contract, rent * rng.uniform(1.02, 1.20, n), 0.0), 3
    )
    contract_years_remaining = np.where(
        has_contract,
        np.where(is_nc, _quarters(rng.uniform(1, 4, n)), _quarters(rng.uniform(1, 3, n))),
        0.0,
    )
    utilization = np.round(
        np.select(
            [is_nc, is_mn],
            [rng.uniform(0.70, 0.95, n), rng.uniform(0.60, 0.85, n)],
            rng.uniform(0.60, 0.90, n),
        ),
        3,
    )
    power_kw_per_gpu = np.round(POWER_KW_PER_GPU[g] * rng.uniform(0.92, 1.12, n), 3)
    # Colocation, staff, maintenance, SG&A, set from an operating margin (NOI over revenue)
    # so that thin, low-utilization fleets do not run at a loss today.
    revenue_usd_per_gpu_hour = (
        contracted_share * contract_rate_usd_per_hour + (1 - contracted_share) * utilization * rent
    )
    margin = np.where(is_nc, rng.uniform(0.32, 0.50, n), rng.uniform(0.25, 0.42, n))
    power_usd_per_gpu_hour = power_kw_per_gpu * POWER_USD_PER_KWH
    other_opex_usd_per_gpu_hour = np.round(
        np.maximum(revenue_usd_per_gpu_hour * (1 - margin) - power_usd_per_gpu_hour, 0.05 * rent),
        3,
    )

    # Liquidity: some months of this loan's revenue in cash; miners' treasuries in BTC/ETH.
    revenue_usd_per_month = gpu_count * (HOURS_PER_YEAR / 12) * revenue_usd_per_gpu_hour
    months = np.select(
        [is_nc, is_mn], [rng.uniform(1, 6, n), rng.uniform(1, 4, n)], rng.uniform(3, 12, n)
    )
    cash_usd = np.round(revenue_usd_per_month * months, -3)
    btc_units = np.where(is_mn, np.round(balance_usd * rng.uniform(0.05, 0.5, n) / 90_000, 2), 0.0)
    eth_units = np.where(
        holds_eth_b[b], np.round(balance_usd * rng.uniform(0.02, 0.2, n) / 3_000, 1), 0.0
    )
    liquidation_cost = np.round(rng.uniform(0.05, 0.12, n), 3)

    # Interleave borrowers as a real loan tape does; loan ids follow the final order.
    order = rng.permutation(n)
    columns = {
        "loan_id": [f"L{k:06d}" for k in range(1, n + 1)],
        "borrower_id": borrower_ids[b][order].tolist(),
        "borrower_type": np.array(BORROWER_TYPES)[kind][order].tolist(),
        "balance_usd": balance_usd[order],
        "rate_type": rate_type[order].tolist(),
        "rate": rate[order],
        "maturity_years": maturity_years[order],
        "amortization": amortization[order].tolist(),
        "gpu_generation": np.array(GENERATIONS)[g][order].tolist(),
        "gpu_count": gpu_count[order],
        "pd_annual": np.round(pd_b[b], 4)[order],
        "collateral_share": collateral_share[order],
        "contracted_share": contracted_share[order],
        "contract_rate_usd_per_hour": contract_rate_usd_per_hour[order],
        "contract_years_remaining": contract_years_remaining[order],
        "utilization": utilization[order],
        "power_kw_per_gpu": power_kw_per_gpu[order],
        "other_opex_usd_per_gpu_hour": other_opex_usd_per_gpu_hour[order],
        "cash_usd": cash_usd[order],
        "btc_units": btc_units[order],
        "eth_units": eth_units[order],
        "crypto_pledged": pledges_crypto_b[b][order],
        "liquidation_cost": liquidation_cost[order],
        "asset_correlation": np.round(rho_b[b], 3)[order],
    }
    return pa.table(columns)


def _quarters(years: np.ndarray) -> np.ndarray:
    """Round to whole quarters (the default time grid)."""
    return np.round(years * 4) / 4


def _borrower_ids(kind_b: np.ndarray) -> np.ndarray:
    """Ids like "NC-0012", numbered within each borrower type in order of appearance."""
    ids = np.empty(len(kind_b), dtype=object)
    counters = dict.fromkeys(BORROWER_TYPES, 0)
    for k, kind in enumerate(kind_b):
        name = BORROWER_TYPES[kind]
        counters[name] += 1
        ids[k] = f"{BORROWER_PREFIX[name]}-{counters[name]:04d}"
    return ids


def _main(argv: list[str]) -> None:
    """Regenerate the embedded example book (or: N SEED OUT)."""
    n_loans = int(argv[0]) if len(argv) > 0 else EXAMPLE_LOANS
    seed = int(argv[1]) if len(argv) > 1 else EXAMPLE_SEED
    default_out = Path(__file__).resolve().parents[1] / "data" / "example_book.parquet"
    out = Path(argv[2]) if len(argv) > 2 else default_out
    from gpucredit.io.book import write_book  # the script writes a file: io's job

    write_book(make_book(n_loans, seed), out)
    print(f"wrote {out} ({n_loans} loans, seed {seed})")


if __name__ == "__main__":
    _main(sys.argv[1:])
