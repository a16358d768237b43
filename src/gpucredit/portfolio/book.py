"""The loan book as a struct of arrays (one entry per loan, in file order)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BORROWER_TYPES = ("neocloud", "miner", "enterprise", "other")
RATE_TYPES = ("fixed", "floating")
AMORTIZATIONS = ("bullet", "linear", "annuity")

# The longest maturity or contract a book may state, in years. docs/spec.md gives no bound;
# without one a value like 1e300 overflows the schedule's whole-period count.
MAX_YEARS = 100

REQUIRED = "required"  # BookColumn.default of a column every book must have
FROM_GENERATION = "the generation's"  # power_kw_per_gpu: the assumptions' value for its generation


@dataclass(frozen=True)
class ValueRule:
    """A rule on a number column: `good(values)` is True where a value keeps it; `text` is
    what a broken value is told ("must be > 0")."""

    text: str
    good: Callable[[np.ndarray], np.ndarray]


def in_range(interval: str, meaning: str) -> ValueRule:
    """A plausible range, written "(0, 1e11]" ("(" and ")" exclude their end), with what the
    number means so that a refusal says why. The ranges are generous: they catch unit slips
    (a percentage for a fraction, cents for dollars) and sizes no book holds, not unusual
    loans.

    >>> in_range("(0, 1]", "a fraction").text
    'must be in (0, 1] (a fraction)'
    """
    low, high = (float(end) for end in interval[1:-1].split(","))
    low_open, high_open = interval[0] == "(", interval[-1] == ")"

    def good(x: np.ndarray) -> np.ndarray:
        above = x > low if low_open else x >= low
        below = x < high if high_open else x <= high
        return above & below

    text = f"must be in {interval} ({meaning})" if meaning else f"must be in {interval}"
    return ValueRule(text, good)


WHOLE = ValueRule("must be a whole number", lambda x: x == np.floor(x))
FRACTION = in_range("[0, 1]", "")
PROBABILITY = in_range("(0, 1)", "")
CORRELATION = in_range("[0, 1)", "")
OFFTAKER_PD = in_range("[0, 1)", "an annual probability of default; 0 never defaults")
# Bounded to catch percentages (8 for 8%) and so that a fixed-rate annuity's 1 + q stays > 0
# (q = rate x period length; rate <= -1 made its schedule NaN).
RATE = in_range("(-1, 1)", "a yearly rate or spread as a fraction, e.g. 0.08 for 8%")
MATURITY_YEARS = in_range(f"(0, {MAX_YEARS}]", "years")
CONTRACT_YEARS = in_range(f"[0, {MAX_YEARS}]", "years")
# Money and sizes: far above any real loan, far below what overflows the model's arithmetic
# (a balance of 1e300 made the schedules infinite).
BALANCE_USD = in_range("(0, 1e11]", "USD: 1e11 is $100 bn, more than any GPU loan")
CASH_USD = in_range("[0, 1e12]", "USD: 1e12 is $1 trillion")
INCOME_USD_PER_YEAR = in_range("[0, 1e12]", "USD a year: 1e12 is $1 trillion")
GPU_COUNT = in_range("[1, 1e7]", "GPUs: 1e7 is more than any one fleet")
RENT_USD_PER_GPU_HOUR = in_range("[0, 100]", "USD per GPU-hour: a B200 rents at about 4.5")
OPEX_USD_PER_GPU_HOUR = in_range("[0, 100]", "USD per GPU-hour: more than any GPU rents for")
POWER_KW_PER_GPU = in_range("[0, 10]", "kW per GPU: a B200 draws about 1.3 with cooling")
BTC_UNITS = in_range("[0, 2.1e7]", "BTC: 21 million is every bitcoin there will ever be")
ETH_UNITS = in_range("[0, 1.5e8]", "ETH: about 120 million exist")


@dataclass(frozen=True)
class BookColumn:
    """One column of the book schema: what it holds and the rules its values keep.

    io/book.py validates every book with these fields and docs/schema.md is rendered from
    them (`gpucredit schema`), so the rules are written once, here. Example:

    >>> BOOK_SCHEMA_BY_NAME["utilization"].rule_summary()
    'in [0, 1]'
    """

    name: str
    type: str  # "string", "number" or "boolean"
    unit: str  # "" when it has none
    default: str | float | bool  # REQUIRED, FROM_GENERATION, or the value an absent column takes
    meaning: str
    rules: tuple[ValueRule, ...] = ()  # numbers (every number must also be finite)
    allowed: tuple[str, ...] = ()  # strings: the allowed values (empty: any)
    allowed_are_generations: bool = False  # one of the assumptions' GPU generations
    non_empty: bool = False  # strings: "" refused
    unique: bool = False  # no two rows share a value
    per_borrower: bool = False  # every loan of one borrower_id states the same value
    per_offtaker: bool = False  # every loan naming one offtaker states the same value (and one)
    nullable: bool = False  # null (or, for strings, empty) means "none" instead of refused

    @property
    def required(self) -> bool:
        return isinstance(self.default, str) and self.default == REQUIRED

    def allowed_rule(self, generations: tuple[str, ...] = ()) -> str:
        """What a value outside `allowed` is told (the generations come from the assumptions)."""
        if self.allowed_are_generations:
            return f"must be one of the assumptions' generations ({', '.join(generations)})"
        return f"must be one of {', '.join(self.allowed)}"

    def rule_summary(self) -> str:
        """The column's rules in a few words, for docs/schema.md (nulls are always refused)."""
        parts = []
        if self.non_empty:
            parts.append("non-empty")
        if self.unique:
            parts.append("unique")
        if self.allowed:
            parts.append("one of " + ", ".join(self.allowed))
        if self.allowed_are_generations:
            parts.append("one of the assumptions' generations")
        parts += [rule.text.removeprefix("must be ") for rule in self.rules]
        if self.type == "boolean":
            parts.append("true or false")
        if self.per_borrower:
            parts.append("the same for every loan of a borrower_id")
        if self.per_offtaker:
            parts.append("required where `offtaker` names one; the same for each of its loans")
        elif self.nullable:
            parts.append("null or empty: none")
        return "; ".join(parts)


def _number(name, unit, default, meaning, *rules) -> BookColumn:
    return BookColumn(name, "number", unit, default, meaning, rules=rules)


# Every column the model reads, in docs/spec.md's order (docs/spec.md §3 for the symbols).
BOOK_SCHEMA: tuple[BookColumn, ...] = (
    BookColumn(
        "loan_id", "string", "", REQUIRED, "The loan's identifier; errors and results name it.",
        non_empty=True, unique=True,
    ),
    BookColumn(
        "borrower_id", "string", "", REQUIRED,
        "The borrower; its loans default together in sampled mode (cross-default).",
        non_empty=True,
    ),
    BookColumn(
        "borrower_type", "string", "", REQUIRED,
        "The kind of borrower, for reporting and calibration by type.", allowed=BORROWER_TYPES,
        per_borrower=True,
    ),
    _number("balance_usd", "USD", REQUIRED, "Outstanding principal today.", BALANCE_USD),
    BookColumn(
        "rate_type", "string", "", REQUIRED,
        "fixed: `rate` is the coupon; floating: `rate` is a spread over the base rate.",
        allowed=RATE_TYPES,
    ),
    _number(
        "rate", "fraction per year", REQUIRED,
        "Fixed coupon, or the spread over the base rate when floating (0.08 for 8%).", RATE,
    ),
    _number(
        "maturity_years", "years", REQUIRED, "Time to final maturity from today.", MATURITY_YEARS,
    ),
    BookColumn(
        "amortization", "string", "", REQUIRED,
        "Repayment schedule: bullet (all at maturity), linear, or annuity (level payments).",
        allowed=AMORTIZATIONS,
    ),
    BookColumn(
        "gpu_generation", "string", "", REQUIRED,
        "The financed GPUs' generation (rents, resale prices and power follow it).",
        allowed_are_generations=True,
    ),
    _number("gpu_count", "GPUs", REQUIRED, "GPUs in the financed fleet.", WHOLE, GPU_COUNT),
    BookColumn(
        "pd_annual", "number", "fraction per year", REQUIRED,
        "The lender's annual probability of default for the borrower.", rules=(PROBABILITY,),
        per_borrower=True,
    ),
    _number(
        "collateral_share", "fraction", 1.0,
        "Share of the fleet the lender's lien covers (collateral value = GPUs x price x share).",
        FRACTION,
    ),
    _number(
        "contracted_share", "fraction", 0.0,
        "Share of the GPUs under take-or-pay contracts (paid whether used or not).", FRACTION,
    ),
    _number(
        "contract_rate_usd_per_hour", "USD per GPU-hour", 0.0,
        "Rent the contracts pay per contracted GPU.", RENT_USD_PER_GPU_HOUR,
    ),
    _number(
        "contract_years_remaining", "years", 0.0,
        "Years the contracts still run; after that every GPU earns spot rent.",
        CONTRACT_YEARS,
    ),
    _number(
        "utilization", "fraction", 0.70, "Share of the uncontracted GPUs rented at spot.",
        FRACTION,
    ),
    _number(
        "power_kw_per_gpu", "kW per GPU, incl. PUE", FROM_GENERATION,
        "Facility power drawn per GPU (every GPU draws power, used or not).",
        POWER_KW_PER_GPU,
    ),
    _number(
        "other_opex_usd_per_gpu_hour", "USD per GPU-hour", 0.0,
        "Operating costs other than power.", OPEX_USD_PER_GPU_HOUR,
    ),
    _number("cash_usd", "USD", 0.0, "Cash available to service the debt today.", CASH_USD),
    _number(
        "btc_units", "BTC", 0.0, "Bitcoin the borrower holds (counts as liquidity).", BTC_UNITS,
    ),
    _number(
        "eth_units", "ETH", 0.0, "Ether the borrower holds (counts as liquidity).", ETH_UNITS,
    ),
    BookColumn(
        "crypto_pledged", "boolean", "", False,
        "Whether the BTC and ETH are pledged to the lender (recovered on default).",
    ),
    _number(
        "liquidation_cost", "fraction", 0.05,
        "Cost of seizing and selling the collateral, as a share of its value.", FRACTION,
    ),
    BookColumn(
        "asset_correlation", "number", "", 0.15,
        "The borrower's Vasicek asset correlation with the credit cycle.",
        rules=(CORRELATION,), per_borrower=True,
    ),
    _number(
        "other_income_usd_per_year", "USD per year", 0.0,
        "Income outside the financed fleet, net of its costs, committed to this debt "
        "(a miner's mining revenue, an enterprise's operating cash flow).",
        INCOME_USD_PER_YEAR,
    ),
    _number(
        "other_income_btc_share", "fraction", 0.0,
        "Share of the other income that moves with BTC and the hashprice trend.", FRACTION,
    ),
    BookColumn(
        "offtaker", "string", "", "",
        "The contracts' counterparty (docs/spec.md §4a); its default ends every contract it "
        "signed. None named: the contracts cannot fail.", nullable=True,
    ),
    BookColumn(
        "offtaker_pd_annual", "number", "fraction per year", 0.0,
        "The offtaker's annual probability of default.", rules=(OFFTAKER_PD,),
        per_offtaker=True, nullable=True,
    ),
)  # fmt: skip
BOOK_SCHEMA_BY_NAME = {column.name: column for column in BOOK_SCHEMA}

REQUIRED_COLUMNS = tuple(c.name for c in BOOK_SCHEMA if c.required)
# Optional columns and their defaults (power_kw_per_gpu: None, the generation's).
OPTIONAL_DEFAULTS: dict[str, float | bool | None] = {
    c.name: (None if c.default == FROM_GENERATION else c.default)
    for c in BOOK_SCHEMA
    if not c.required
}


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
    offtaker: np.ndarray  # the contracts' counterparty, "" = none (docs/spec.md §4a)
    offtaker_pd_annual: np.ndarray  # its annual PD (0 where there is none)

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

    def offtaker_index(self) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
        """([N] int, names [J], PDs [J]): each loan's offtaker as its 0-based order of first
        appearance in the book, -1 for none (docs/spec.md §4a), and each offtaker's annual PD
        (its first loan's; read_book refuses an offtaker stating two)."""
        index = np.full(len(self), -1, dtype=np.int64)
        names: dict[str, int] = {}
        first_row: list[int] = []
        for row, name in enumerate(self.offtaker):
            if name is None or name == "":
                continue
            if name not in names:
                names[name] = len(names)
                first_row.append(row)
            index[row] = names[name]
        pds = np.asarray(self.offtaker_pd_annual, dtype=np.float64)[np.array(first_row, int)]
        return index, tuple(names), pds

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
STRING_FIELDS = (
    "borrower_id",
    "borrower_type",
    "rate_type",
    "amortization",
    "gpu_generation",
    "offtaker",
)


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
    book = uniform_book(
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
    # A borrower's type, PD and correlation are its first loan's (read_book refuses a
    # borrower_id that states two); drawn per loan above so the other columns keep their draws.
    _, first = np.unique(borrower, return_index=True)
    first_of = first[np.unique(borrower, return_inverse=True)[1]]
    return dataclasses.replace(
        book,
        borrower_type=book.borrower_type[first_of],
        pd_annual=book.pd_annual[first_of],
        asset_correlation=book.asset_correlation[first_of],
    )
