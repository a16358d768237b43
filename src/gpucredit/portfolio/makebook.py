"""A reproducible synthetic loan book: one lender's senior-secured GPU loans.

docs/example-book.md gives the source or reasoning of every distribution below. In short,
three kinds of borrower, all sized at today's values of docs/spec.md §9:

- neoclouds: delayed-draw term loans, floating (base rate + 6-10%), amortizing (linear or
  annuity) within take-or-pay contracts that cover 80-98% of the fleet at about today's
  market rent and, for most loans, the whole remaining term;
- miners turned AI hosts: fixed-rate (8-12.5%) amortizing equipment loans on GPU fleets
  that are partly contracted, partly rented at spot; the borrower's mining income
  (`other_income_usd_per_year`, mostly BTC-linked) and BTC/ETH treasury stand behind them;
- enterprises: fixed-rate (6.5-9.5%) annuity loans on fleets for their own use, serviced by
  the borrower's operating cash flow (`other_income_usd_per_year`, no BTC share).

Every loan is sized at origination terms a credit committee would sign: a loan-to-value
(balance over the pledged GPUs at today's resale price) of 50-80% and a debt-service cover
(today's quarterly NOI over the first quarter's debt service, docs/spec.md §3) of 1.2-2.0x.
Neoclouds' and miners' terms are sculpted to a drawn fleet margin and their running cost
solves the cover; enterprises' committed operating cash flow solves it. No loan is a bullet
(docs/example-book.md says why). Loans of one borrower share its type, PD, asset
correlation and treasury policy.

The embedded example book (`make_book(250, 2026)`, written by `python -m gpucredit.io.makebook`)
is a lender's book, not the market: about $4bn, each generation's pledged GPUs at most 11% of
its debt-financed fleet. `make_book(n, seed)` builds books of any size (the benchmarks ask
for 10,000+ loans); their balance grows with n (about $16m a loan), so a book much larger
than the example pledges more than the whole financed fleet of some generation
(docs/spec.md §5 then lets it sell its own volume alone).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gpucredit.kernels.params import HOURS_PER_YEAR

# docs/spec.md §9 levels the loans are sized with (today's values; tests/portfolio/
# test_makebook.py checks them against the embedded default assumptions).
GENERATIONS = ("A100", "H100", "H200", "B200")
PRICE_USD = np.array([9_000.0, 22_000.0, 29_000.0, 40_000.0])  # [G] resale price per GPU
RENT_USD_PER_HOUR = np.array([1.20, 2.20, 3.00, 4.50])  # [G] market rent per GPU-hour
POWER_KW_PER_GPU = np.array([0.52, 0.91, 0.91, 1.30])  # [G] facility draw, PUE 1.3
POWER_USD_PER_KWH = 0.08
BASE_RATE = 0.037  # r(0): floating loans pay it plus their spread
BTC_USD, ETH_USD = 90_000.0, 3_000.0
STEPS_PER_YEAR = 4  # the default grid: maturities and contracts in whole quarters

EXAMPLE_LOANS = 250
EXAMPLE_SEED = 2026

BORROWER_TYPES = ("neocloud", "miner", "enterprise")
NEOCLOUD, MINER, ENTERPRISE = 0, 1, 2
BORROWER_SHARES = (0.45, 0.30, 0.25)  # of borrowers
BORROWER_PREFIX = ("NC", "MN", "EN")
# Loans per borrower (1-5): delayed-draw tranches, fleets in several sites or generations.
LOANS_PER_BORROWER_P = (0.30, 0.25, 0.20, 0.15, 0.10)

# Generation mix of the loans per borrower type (A100, H100, H200, B200).
GENERATION_MIX = np.array(
    [
        (0.02, 0.36, 0.22, 0.40),  # neocloud: current fleets, B200 deliveries
        (0.08, 0.46, 0.24, 0.22),  # miner: bought used and previous-generation GPUs
        (0.05, 0.45, 0.22, 0.28),  # enterprise
    ]
)
# Loan size: median balance per type ($), lognormal with a borrower-level and a loan-level
# spread; A100 fleets are older and smaller. Clipped to MIN/MAX_BALANCE_USD.
MEDIAN_BALANCE_USD = np.array([15e6, 8e6, 8e6])
BORROWER_SIZE_SIGMA, LOAN_SIZE_SIGMA = 0.8, 0.5
A100_SIZE_FACTOR = 0.35
MIN_BALANCE_USD, MAX_BALANCE_USD = 2e6, 250e6

PD_RANGE = np.array([(0.02, 0.05), (0.04, 0.08), (0.01, 0.03)])  # annual, log-uniform
CORRELATION_RANGE = np.array([(0.15, 0.22), (0.18, 0.25), (0.12, 0.18)])
LTV_RANGE = (0.50, 0.80)  # balance / (gpu_count x price x collateral_share), triangular
LTV_MODE = 0.65
DSCR_RANGE = (1.21, 1.99)  # NOI / debt service today, triangular (inside 1.2-2.0x)
DSCR_MODE = 1.5
# Fleet NOI over fleet revenue today (neoclouds, miners; enterprises' terms are drawn instead).
FLEET_MARGIN_RANGE = np.array([(0.30, 0.50), (0.25, 0.45), (0.0, 0.0)])
MATURITY_RANGE = (2.0, 6.0)  # years: within the 5-6-year book life of a GPU
# Offtakers (docs/spec.md §4a): the counterparties behind the take-or-pay contracts, one per
# borrower, drawn with these probabilities (the last: none named). One frontier lab stands
# behind about half of the contracted revenue, as single customers do in public neocloud
# filings; a hyperscaler is the safest name, a young inference company the riskiest.
OFFTAKERS = ("Frontier Lab A", "Hyperscaler B", "Frontier Lab C", "Inference Co D")
OFFTAKER_P = (0.50, 0.20, 0.12, 0.08, 0.10)
OFFTAKER_PD = (0.03, 0.005, 0.04, 0.10)  # annual


def make_book(n_loans: int, seed: int = 0) -> pa.Table:
    """A synthetic book of `n_loans` loans with every column of docs/spec.md §3,
    deterministic in (n_loans, seed). Vectorized: 10^6 loans take seconds."""
    if n_loans < 1:
        raise ValueError(f"n_loans must be >= 1, got {n_loans}")
    rng = np.random.Generator(np.random.PCG64(seed))
    n = n_loans

    # --- Borrowers: 1-5 loans each, enough of them to fill n_loans.
    per_borrower = rng.choice(np.arange(1, 6), size=n, p=LOANS_PER_BORROWER_P)
    n_borrowers = int(np.searchsorted(np.cumsum(per_borrower), n) + 1)
    per_borrower = per_borrower[:n_borrowers]
    per_borrower[-1] -= per_borrower.sum() - n
    kind_b = rng.choice(len(BORROWER_TYPES), size=n_borrowers, p=BORROWER_SHARES)
    borrower_ids = _borrower_ids(kind_b)

    # Borrower-level credit and policy.
    pd_b = np.exp(rng.uniform(np.log(PD_RANGE[kind_b, 0]), np.log(PD_RANGE[kind_b, 1])))
    rho_b = rng.uniform(CORRELATION_RANGE[kind_b, 0], CORRELATION_RANGE[kind_b, 1])
    size_b = rng.lognormal(0.0, BORROWER_SIZE_SIGMA, n_borrowers)
    mining_share_b = rng.uniform(0.20, 0.45, n_borrowers)  # of a miner's NOI
    btc_share_b = np.round(rng.uniform(0.80, 1.00, n_borrowers), 2)  # of its mining income
    treasury_b = rng.uniform(0.10, 0.50, n_borrowers)  # BTC held, as a share of balance
    holds_eth_b = rng.random(n_borrowers) < 0.3
    pledges_crypto_b = rng.random(n_borrowers) < 0.4

    b = np.repeat(np.arange(n_borrowers), per_borrower)  # [N] borrower of each loan
    kind = kind_b[b]
    is_nc, is_mn, is_en = kind == NEOCLOUD, kind == MINER, kind == ENTERPRISE

    # --- Collateral and size.
    g = (rng.random(n)[:, None] > np.cumsum(GENERATION_MIX[kind], axis=1)).sum(axis=1)
    g = np.minimum(g, len(GENERATIONS) - 1)  # rounding of the cumulative sum
    price = PRICE_USD[g]
    rent = RENT_USD_PER_HOUR[g]
    target_balance = (
        MEDIAN_BALANCE_USD[kind]
        * size_b[b]
        * rng.lognormal(0.0, LOAN_SIZE_SIGMA, n)
        * np.where(g == 0, A100_SIZE_FACTOR, 1.0)
    )
    target_balance = np.clip(target_balance, MIN_BALANCE_USD, MAX_BALANCE_USD)
    ltv = rng.triangular(LTV_RANGE[0], LTV_MODE, LTV_RANGE[1], n)
    # Most liens cover the whole fleet; some leave GPUs outside the borrowing base.
    collateral_share = np.where(rng.random(n) < 0.8, 1.0, np.round(rng.uniform(0.75, 0.95, n), 2))
    gpu_count = np.round(target_balance / (ltv * price * collateral_share))
    gpu_count = np.maximum(gpu_count, 8.0)  # at least one 8-GPU server
    gpu_count = gpu_count.astype(np.int64)
    collateral_usd = gpu_count * price * collateral_share
    balance_usd = np.clip(  # whole dollars, never past the LTV band
        np.round(ltv * collateral_usd),
        np.ceil(LTV_RANGE[0] * collateral_usd),
        np.floor(LTV_RANGE[1] * collateral_usd),
    )

    # --- Terms: neoclouds floating (base rate + spread), the others fixed; no bullets.
    rate_type = np.where(is_nc, "floating", "fixed")
    rate = np.round(
        np.select(
            [is_nc, is_mn],
            [rng.uniform(0.06, 0.10, n), rng.uniform(0.08, 0.125, n)],
            rng.uniform(0.065, 0.095, n),
        ),
        4,
    )
    rate_at_origination = rate + is_nc * BASE_RATE
    annuity = is_en | (is_nc & (rng.random(n) < 0.5)) | (is_mn & (rng.random(n) < 0.4))
    amortization = np.where(annuity, "annuity", "linear")

    # --- Operations. Neoclouds: take-or-pay on 80-98% of the fleet at about today's market
    # rent; half the miners' loans: a hosting contract on 50-90%; enterprises: own use, a
    # little spare capacity rented out at spot.
    has_contract = is_nc | (is_mn & (rng.random(n) < 0.5))
    contracted_share = np.round(
        np.where(
            has_contract, np.where(is_nc, rng.uniform(0.80, 0.98, n), rng.uniform(0.5, 0.9, n)), 0.0
        ),
        2,
    )
    contract_rate_usd_per_hour = np.round(
        np.where(has_contract, rent * rng.uniform(0.85, 1.05, n), 0.0), 3
    )
    utilization = np.round(
        np.select(
            [is_nc, is_mn],
            [rng.uniform(0.65, 0.90, n), rng.uniform(0.60, 0.85, n)],
            rng.uniform(0.0, 0.2, n),
        ),
        3,
    )
    power_kw_per_gpu = np.round(POWER_KW_PER_GPU[g] * rng.uniform(0.95, 1.10, n), 3)
    hours = HOURS_PER_YEAR / STEPS_PER_YEAR
    revenue = (
        gpu_count
        * hours
        * (
            contracted_share * contract_rate_usd_per_hour
            + (1.0 - contracted_share) * utilization * rent
        )
    )  # today, per quarter
    power = gpu_count * hours * power_kw_per_gpu * POWER_USD_PER_KWH

    # --- Sizing: today's NOI = DSCR x the first quarter's debt service (docs/spec.md §3).
    # Neoclouds and miners: the fleet's margin (NOI over revenue, after power and running
    # costs) is drawn and the amortization sculpted to it, as lenders size term loans on
    # contracted cash flow: the term whose first debt service is NOI / DSCR, in whole
    # quarters within MATURITY_RANGE; the running cost then solves the cover exactly. A miner's
    # NOI also holds its mining income, a borrower-level share of it. Enterprises: the term
    # is drawn; the committed operating cash flow solves the cover.
    dscr = rng.triangular(DSCR_RANGE[0], DSCR_MODE, DSCR_RANGE[1], n)
    fleet_noi = revenue * rng.uniform(FLEET_MARGIN_RANGE[kind, 0], FLEET_MARGIN_RANGE[kind, 1])
    mining_share = np.where(is_mn, mining_share_b[b], 0.0)
    sculpted = _term_for_debt_service(
        balance_usd, rate_at_origination, fleet_noi / (1.0 - mining_share) / dscr, amortization
    )
    maturity_years = np.clip(
        _quarters(np.where(is_en, rng.uniform(3.0, 5.0, n), sculpted)), *MATURITY_RANGE
    )
    debt_service = _first_debt_service(
        balance_usd, rate_at_origination, maturity_years, amortization
    )
    noi = dscr * debt_service
    enterprise_opex = rent * rng.uniform(0.10, 0.20, n)  # $/GPU-hour: colocation, upkeep
    other_income = np.select(  # per quarter
        [is_mn, is_en],
        [mining_share * noi, noi - (revenue - power - gpu_count * hours * enterprise_opex)],
        0.0,
    )
    other_opex_usd_per_gpu_hour = np.round(
        np.where(
            is_en, enterprise_opex, (revenue - power + other_income - noi) / (gpu_count * hours)
        ),
        4,
    )
    other_income_usd_per_year = np.round(other_income * STEPS_PER_YEAR, -3)
    other_income_btc_share = np.where(is_mn, btc_share_b[b], 0.0)

    # Contract terms: 80% of the neocloud loans (70% of the miners' contracted ones) amortize
    # inside the contract, which runs 0-1.5 years past maturity; the others' contracts end
    # with 5-25% of the term (at least a quarter) left to re-contract.
    covers_term = rng.random(n) < np.where(is_nc, 0.8, 0.7)
    contract_years_remaining = np.where(
        has_contract,
        np.where(
            covers_term,
            maturity_years + _quarters(rng.uniform(0.0, 1.5, n)),
            np.minimum(
                _quarters(maturity_years * rng.uniform(0.75, 0.95, n)), maturity_years - 0.25
            ),
        ),
        0.0,
    )

    # --- Liquidity: a reserve of quarters of debt service; miners' BTC/ETH treasuries.
    quarters_reserve = np.select(
        [is_nc, is_mn],
        [rng.uniform(1.0, 2.0, n), rng.uniform(0.5, 2.0, n)],
        rng.uniform(1.0, 4.0, n),
    )
    cash_usd = np.round(quarters_reserve * debt_service, -3)
    btc_units = np.where(is_mn, np.round(treasury_b[b] * balance_usd / BTC_USD, 2), 0.0)
    eth_units = np.where(
        is_mn & holds_eth_b[b], np.round(rng.uniform(0.02, 0.15, n) * balance_usd / ETH_USD, 1), 0.0
    )
    crypto_pledged = is_mn & pledges_crypto_b[b]
    liquidation_cost = np.round(rng.uniform(0.05, 0.12, n), 3)

    # Interleave borrowers as a real loan tape does; loan ids follow the final order.
    order = rng.permutation(n)

    # --- Offtakers: drawn last, so the other columns keep their draws. A borrower's contracts
    # are with one offtaker (or none named); loans without a contract name none.
    offtaker_b = rng.choice(len(OFFTAKER_P), size=n_borrowers, p=OFFTAKER_P)
    # The largest neocloud contracts with the first lab, as the largest neoclouds do.
    neocloud_balance = np.bincount(b, weights=balance_usd * is_nc, minlength=n_borrowers)
    if neocloud_balance.max() > 0:
        offtaker_b[np.argmax(neocloud_balance)] = 0
    named = has_contract & (offtaker_b[b] < len(OFFTAKERS))
    offtaker = np.where(named, np.array([*OFFTAKERS, ""])[offtaker_b[b]], "")
    offtaker_pd = np.where(named, np.array([*OFFTAKER_PD, 0.0])[offtaker_b[b]], 0.0)
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
        "crypto_pledged": crypto_pledged[order],
        "liquidation_cost": liquidation_cost[order],
        "asset_correlation": np.round(rho_b[b], 3)[order],
        "other_income_usd_per_year": other_income_usd_per_year[order],
        "other_income_btc_share": other_income_btc_share[order],
        "offtaker": pa.array(offtaker[order].tolist(), type=pa.string()),
        "offtaker_pd_annual": offtaker_pd[order],
    }
    return pa.table(columns)


def _first_debt_service(
    balance_usd: np.ndarray, rate: np.ndarray, maturity_years: np.ndarray, amortization
) -> np.ndarray:
    """DS(1) of docs/spec.md §3 on the default quarterly grid: interest plus the first
    installment (linear B(0)Δ/maturity, annuity A − qB(0)); every loan here amortizes."""
    q = rate / STEPS_PER_YEAR
    t_m = np.ceil(maturity_years * STEPS_PER_YEAR - 1e-9)
    annuity = balance_usd * q / -np.expm1(-t_m * np.log1p(q))
    linear = balance_usd * (q + 1.0 / (STEPS_PER_YEAR * maturity_years))
    return np.where(amortization == "annuity", annuity, linear)


def _term_for_debt_service(
    balance_usd: np.ndarray, rate: np.ndarray, debt_service: np.ndarray, amortization
) -> np.ndarray:
    """The maturity (years, not rounded) whose first quarter's debt service is
    `debt_service`; infinite where even interest alone exceeds it."""
    q = rate / STEPS_PER_YEAR
    ratio = debt_service / balance_usd - q  # the first installment over the balance
    with np.errstate(divide="ignore", invalid="ignore"):
        linear = 1.0 / (STEPS_PER_YEAR * ratio)
        annuity = -np.log1p(-q / (ratio + q)) / np.log1p(q) / STEPS_PER_YEAR
    years = np.where(amortization == "annuity", annuity, linear)
    return np.where(ratio > 0, years, np.inf)


def _quarters(years: np.ndarray) -> np.ndarray:
    """Round to whole quarters (the default time grid)."""
    return np.round(years * STEPS_PER_YEAR) / STEPS_PER_YEAR


def _borrower_ids(kind_b: np.ndarray) -> np.ndarray:
    """Ids like "NC-0012", numbered within each borrower type in order of appearance."""
    number = np.zeros(len(kind_b), dtype=np.int64)
    for k in range(len(BORROWER_TYPES)):
        mine = kind_b == k
        number[mine] = np.arange(1, mine.sum() + 1)
    return np.array(
        [f"{BORROWER_PREFIX[k]}-{m:04d}" for k, m in zip(kind_b, number, strict=True)],
        dtype=object,
    )
