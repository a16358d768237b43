"""The loan book as a struct of arrays (one entry per loan, in file order)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REQUIRED_COLUMNS = (
    "loan_id",
    "borrower_id",
    "borrower_type",
    "balance_usd",
    "rate_type",
    "rate",
    "maturity_years",
    "amortization",
    "gpu_generation",
    "gpu_count",
    "pd_annual",
)
# Optional numeric columns and their docs/spec.md §9 defaults (power_kw_per_gpu: the generation's).
OPTIONAL_DEFAULTS: dict[str, float | bool | None] = {
    "collateral_share": 1.0,
    "contracted_share": 0.0,
    "contract_rate_usd_per_hour": 0.0,
    "contract_years_remaining": 0.0,
    "utilization": 0.70,
    "power_kw_per_gpu": None,
    "other_opex_usd_per_gpu_hour": 0.0,
    "cash_usd": 0.0,
    "btc_units": 0.0,
    "eth_units": 0.0,
    "crypto_pledged": False,
    "liquidation_cost": 0.05,
    "asset_correlation": 0.15,
    "other_income_usd_per_year": 0.0,
    "other_income_btc_share": 0.0,
}
BORROWER_TYPES = ("neocloud", "miner", "enterprise", "other")
RATE_TYPES = ("fixed", "floating")
AMORTIZATIONS = ("bullet", "linear", "annuity")


@dataclass(frozen=True)
class Book:
    """A validated loan book. String columns are object arrays, numeric ones float64 [N].

    `gpu_generation` holds names; `generation_index(generations)` maps them to the
    assumptions' generation order.
    """

    source: str  # the file it was read from (or "<memory>")
    loan_id: np.ndarray
    borrower_id: np.ndarray
    borrower_type: np.ndarray
    balance_usd: np.ndarray
    rate_type: np.ndarray
    rate: np.ndarray
    maturity_years: np.ndarray
    amortization: np.ndarray
    gpu_generation: np.ndarray
    gpu_count: np.ndarray
    pd_annual: np.ndarray
    collateral_share: np.ndarray
    contracted_share: np.ndarray
    contract_rate_usd_per_hour: np.ndarray
    contract_years_remaining: np.ndarray
    utilization: np.ndarray
    power_kw_per_gpu: np.ndarray
    other_opex_usd_per_gpu_hour: np.ndarray
    cash_usd: np.ndarray
    btc_units: np.ndarray
    eth_units: np.ndarray
    crypto_pledged: np.ndarray  # bool
    liquidation_cost: np.ndarray
    asset_correlation: np.ndarray
    other_income_usd_per_year: np.ndarray  # OI_i, net of its own costs, committed to the loan
    other_income_btc_share: np.ndarray  # share of OI_i moving with BTC and the hashprice trend

    def __len__(self) -> int:
        return len(self.loan_id)

    def generation_index(self, generations: tuple[str, ...]) -> np.ndarray:
        """[N] int index of each loan's generation in `generations`."""
        lookup = {g: k for k, g in enumerate(generations)}
        return np.array([lookup[g] for g in self.gpu_generation], dtype=np.int64)

    def borrower_index(self) -> tuple[np.ndarray, int]:
        """([N] int, count): 0-based order of first appearance of borrower_id (docs/spec.md §8)."""
        _, first, inverse = np.unique(self.borrower_id, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))  # rank of each unique id by first appearance
        return order[inverse].astype(np.int64), len(first)

    def subset(self, rows: np.ndarray) -> Book:
        """The loans at `rows` (positions), as a new Book."""
        fields = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}
        return Book(**fields)


# Column values of `uniform_book` where the caller gives none: one H100 loan of $1M, 100 GPUs,
# the optional columns at their docs/spec.md §9 defaults (power: the H100's).
UNIFORM_LOAN = dict(
    borrower_type="neocloud",
    balance_usd=1_000_000.0,
    rate_type="fixed",
    rate=0.08,
    maturity_years=5.0,
    amortization="bullet",
    gpu_generation="H100",
    gpu_count=100.0,
    pd_annual=0.05,
    **(OPTIONAL_DEFAULTS | {"power_kw_per_gpu": 0.91}),
)
STRING_FIELDS = ("borrower_id", "borrower_type", "rate_type", "amortization", "gpu_generation")


def uniform_book(n: int, source: str = "<uniform>", **columns) -> Book:
    """A book of n loans (one borrower each unless `borrower_id` is given) built in memory:
    every column a scalar (broadcast) or an [n] sequence, `UNIFORM_LOAN` where not given.
    For closed-form checks (Vasicek) and tests; it bypasses file validation."""
    fields = {"borrower_id": [f"B{i:05d}" for i in range(n)], **UNIFORM_LOAN, **columns}
    out = {}
    for key, value in fields.items():
        if key in STRING_FIELDS:
            out[key] = np.asarray(np.broadcast_to(np.asarray(value, dtype=object), (n,))).copy()
        elif key == "crypto_pledged":
            out[key] = np.broadcast_to(np.asarray(value, dtype=bool), (n,)).copy()
        else:
            out[key] = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    loan_id = np.array([f"L{i:05d}" for i in range(n)], dtype=object)
    return Book(source=source, loan_id=loan_id, **out)


def feature_book(
    n_loans: int,
    seed: int,
    ltv: tuple[float, float] = (0.4, 0.9),
    rate: tuple[float, float] = (0.0, 0.12),
    borrowers: int | None = None,
    source: str = "<feature book>",
) -> Book:
    """A small random book that exercises every mechanism of docs/spec.md §3-6: every generation,
    amortization and rate type, maturities before, on and after a 3-year horizon (on and off
    the quarterly grid), expiring and running contracts, miners with pledged and unpledged
    BTC/ETH and BTC-linked other income, flat other income, shared borrowers (cross-default;
    `borrowers` ids, default half the loans)."""
    rng = np.random.default_rng(seed)
    prices = {"A100": 9000.0, "H100": 22000.0, "H200": 29000.0, "B200": 40000.0}
    rents = {"A100": 1.2, "H100": 2.2, "H200": 3.0, "B200": 4.5}
    power = {"A100": 0.52, "H100": 0.91, "H200": 0.91, "B200": 1.30}
    gen = rng.choice(list(prices), n_loans)
    gpus = rng.integers(50, 3000, n_loans).astype(float)
    share = rng.choice([1.0, 0.6], n_loans)
    balance = rng.uniform(*ltv, n_loans) * gpus * np.array([prices[g] for g in gen]) * share
    n_borrowers = max(1, n_loans // 2 if borrowers is None else borrowers)
    borrower = np.array([f"B{rng.integers(0, n_borrowers):04d}" for _ in range(n_loans)])
    miner = rng.random(n_loans) < 0.4
    contracted = rng.random(n_loans) < 0.5
    return uniform_book(
        n_loans,
        source,
        borrower_id=borrower,
        borrower_type=np.where(miner, "miner", "neocloud"),
        balance_usd=balance,
        rate_type=rng.choice(["fixed", "floating"], n_loans),
        rate=rng.uniform(*rate, n_loans),
        maturity_years=rng.choice([0.6, 1.0, 1.75, 2.3, 3.0, 4.0, 5.0], n_loans),
        amortization=rng.choice(["bullet", "linear", "annuity"], n_loans),
        gpu_generation=gen,
        gpu_count=gpus,
        pd_annual=rng.uniform(0.01, 0.15, n_loans),
        collateral_share=share,
        contracted_share=np.where(contracted, rng.uniform(0.3, 0.9, n_loans), 0.0),
        contract_rate_usd_per_hour=np.array([rents[g] for g in gen])
        * rng.uniform(0.8, 1.3, n_loans),
        contract_years_remaining=np.where(contracted, rng.choice([0.1, 0.5, 1.2, 4.0], n_loans), 0),
        utilization=rng.uniform(0.5, 0.95, n_loans),
        power_kw_per_gpu=np.array([power[g] for g in gen]),
        other_opex_usd_per_gpu_hour=rng.uniform(0.0, 0.3, n_loans),
        cash_usd=rng.uniform(0, 0.1, n_loans) * balance,
        btc_units=np.where(miner, rng.uniform(0, 200, n_loans), 0.0),
        eth_units=np.where(miner, rng.uniform(0, 3000, n_loans), 0.0),
        crypto_pledged=miner & (rng.random(n_loans) < 0.5),
        liquidation_cost=rng.uniform(0.02, 0.15, n_loans),
        asset_correlation=rng.uniform(0.05, 0.4, n_loans),
        # other income: miners' mining revenue (mostly BTC-linked), some neoclouds' flat cash
        other_income_usd_per_year=np.where(
            miner | (rng.random(n_loans) < 0.3), rng.uniform(0.0, 0.4, n_loans) * balance, 0.0
        ),
        other_income_btc_share=np.where(miner, rng.uniform(0.5, 1.0, n_loans), 0.0),
    )
