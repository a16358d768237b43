"""Shared test fixtures: small random books that cover every feature of MODEL.md §3-6."""

from __future__ import annotations

import numpy as np
import pytest

from gpucredit.portfolio.book import Book, uniform_book  # noqa: F401 (shared by tests)


def random_book(seed: int, n_loans: int, generations=("A100", "H100", "H200", "B200")) -> Book:
    """A small book covering every amortization, rate type, contract expiry, maturity before
    and after a 3-year horizon, and miners with pledged and unpledged crypto."""
    rng = np.random.default_rng(seed)
    prices = {"A100": 9000.0, "H100": 22000.0, "H200": 29000.0, "B200": 40000.0}
    rents = {"A100": 1.2, "H100": 2.2, "H200": 3.0, "B200": 4.5}
    power = {"A100": 0.52, "H100": 0.91, "H200": 0.91, "B200": 1.30}
    gen = rng.choice(list(generations), n_loans)
    gpu_count = rng.integers(50, 3000, n_loans).astype(float)
    collateral_share = rng.choice([1.0, 0.6], n_loans)
    ltv = rng.uniform(0.4, 0.9, n_loans)
    price = np.array([prices[g] for g in gen])
    balance = ltv * gpu_count * price * collateral_share
    n_borrowers = max(1, n_loans // 2)
    borrower_ids = np.array([f"B{rng.integers(0, n_borrowers):03d}" for _ in range(n_loans)])
    is_miner = rng.random(n_loans) < 0.4
    contracted = rng.random(n_loans) < 0.5
    return Book(
        source="<random>",
        loan_id=np.array([f"L{i:05d}" for i in range(n_loans)], dtype=object),
        borrower_id=borrower_ids.astype(object),
        borrower_type=np.where(is_miner, "miner", "neocloud").astype(object),
        balance_usd=balance,
        rate_type=rng.choice(["fixed", "floating"], n_loans).astype(object),
        rate=rng.uniform(0.0, 0.12, n_loans),
        # 0.6 .. 5 years: before and after the horizon, on and off the quarterly grid
        maturity_years=rng.choice([0.6, 1.0, 1.75, 2.3, 3.0, 4.0, 5.0], n_loans),
        amortization=rng.choice(["bullet", "linear", "annuity"], n_loans).astype(object),
        gpu_generation=gen.astype(object),
        gpu_count=gpu_count,
        pd_annual=rng.uniform(0.01, 0.15, n_loans),
        collateral_share=collateral_share,
        contracted_share=np.where(contracted, rng.uniform(0.3, 0.9, n_loans), 0.0),
        contract_rate_usd_per_hour=np.array([rents[g] for g in gen])
        * rng.uniform(0.8, 1.3, n_loans),
        contract_years_remaining=np.where(contracted, rng.choice([0.1, 0.5, 1.2, 4.0], n_loans), 0),
        utilization=rng.uniform(0.5, 0.95, n_loans),
        power_kw_per_gpu=np.array([power[g] for g in gen]),
        other_opex_usd_per_gpu_hour=rng.uniform(0.0, 0.3, n_loans),
        cash_usd=rng.uniform(0, 0.1, n_loans) * balance,
        btc_units=np.where(is_miner, rng.uniform(0, 200, n_loans), 0.0),
        eth_units=np.where(is_miner, rng.uniform(0, 3000, n_loans), 0.0),
        crypto_pledged=is_miner & (rng.random(n_loans) < 0.5),
        liquidation_cost=rng.uniform(0.02, 0.15, n_loans),
        asset_correlation=rng.uniform(0.05, 0.4, n_loans),
    )


@pytest.fixture
def small_book() -> Book:
    return random_book(7, 40)
