"""The synthetic book generator and the embedded example book (docs/example-book.md)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.book import BOOK_COLUMNS, example_book_path, read_book, write_book
from gpucredit.kernels.reference import pd_references, today_metrics
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.makebook import (
    BASE_RATE,
    BTC_USD,
    ETH_USD,
    EXAMPLE_LOANS,
    EXAMPLE_SEED,
    GENERATIONS,
    POWER_KW_PER_GPU,
    POWER_USD_PER_KWH,
    PRICE_USD,
    RENT_USD_PER_HOUR,
    STEPS_PER_YEAR,
    make_book,
)

TYPES = ("neocloud", "miner", "enterprise")


@pytest.fixture(scope="module")
def book(assumptions):
    return read_book(example_book_path(), assumptions)


@pytest.fixture(scope="module")
def example_loans(book, assumptions):
    return loan_arrays(book, assumptions)


def _origination(book, loans, assumptions):
    """(DSCR, LTV) at today's values of the default assumptions (docs/spec.md §3)."""
    today = today_metrics(assumptions.params, assumptions.grid(), loans)
    price = assumptions.params.price_usd[book.generation_index(assumptions.generations)]
    ltv = book.balance_usd / (book.gpu_count * price * book.collateral_share)
    return today.noi_usd / today.debt_service_usd, ltv


# ----------------------------------------------------------------------------- any book


def test_same_seed_same_book_and_another_seed_another():
    assert make_book(300, seed=7).equals(make_book(300, seed=7))
    assert not make_book(300, seed=7).equals(make_book(300, seed=8))
    # Deterministic in (n_loans, seed): not a prefix of a larger book, but reproducible.
    assert make_book(40, seed=7).equals(make_book(40, seed=7))


@pytest.mark.parametrize("n_loans", [1, 2, 7, 1000])
def test_exactly_n_loans_with_every_column(n_loans):
    table = make_book(n_loans, seed=3)
    assert table.num_rows == n_loans
    assert tuple(table.column_names) == BOOK_COLUMNS
    assert table.num_rows == len(set(table.column("loan_id").to_pylist()))


def test_no_loans_is_refused():
    with pytest.raises(ValueError, match="n_loans"):
        make_book(0, seed=1)


def test_the_sizing_levels_are_the_default_assumptions(assumptions):
    """make_book sizes loans with constants of its own (portfolio does not read io); they
    must be docs/spec.md §9's values as the embedded assumptions file states them."""
    p = assumptions.params
    assert tuple(assumptions.generations) == GENERATIONS
    np.testing.assert_array_equal(p.price_usd, PRICE_USD)
    np.testing.assert_array_equal(p.rent_usd_per_hour, RENT_USD_PER_HOUR)
    np.testing.assert_array_equal(assumptions.generation_power_kw_per_gpu, POWER_KW_PER_GPU)
    assert p.power_usd_per_kwh == POWER_USD_PER_KWH
    assert p.rate_level == BASE_RATE
    assert (p.btc_price_usd, p.eth_price_usd) == (BTC_USD, ETH_USD)
    assert assumptions.steps_per_year == STEPS_PER_YEAR


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_a_large_written_book_reads_and_keeps_its_origination_terms(tmp_path, suffix):
    """Sizes far past the example (the benchmarks') still validate, and every loan keeps
    DSCR 1.2-2.0x and LTV 50-80% at today's values."""
    assumptions = default_assumptions()
    path = write_book(make_book(5000, seed=11), tmp_path / f"book{suffix}")
    book = read_book(path, assumptions)
    assert len(book) == 5000
    dscr, ltv = _origination(book, loan_arrays(book, assumptions), assumptions)
    assert dscr.min() >= 1.2 and dscr.max() <= 2.0
    assert ltv.min() >= 0.5 and ltv.max() <= 0.8


# ----------------------------------------------------------------------------- the example


def test_the_example_book_is_make_book_of_the_example_size_and_seed():
    """`python -m gpucredit.io.makebook` wrote it: same rows, columns and types."""
    stored = pq.read_table(example_book_path())
    assert stored.equals(make_book(EXAMPLE_LOANS, EXAMPLE_SEED))
    assert tuple(stored.column_names) == BOOK_COLUMNS


def test_the_example_book_is_one_lenders_book(book):
    assert 150 <= len(book) <= 400
    assert 3e9 <= book.balance_usd.sum() <= 6e9
    assert set(book.borrower_type) == set(TYPES)
    assert set(book.gpu_generation) == set(GENERATIONS)
    exposure = {t: book.balance_usd[book.borrower_type == t].sum() for t in TYPES}
    assert max(exposure, key=exposure.get) == "neocloud"
    assert all(v / book.balance_usd.sum() > 0.1 for v in exposure.values())


def test_pledged_gpus_are_at_most_15_percent_of_each_financed_fleet(book, assumptions):
    """The example is a lender's book, not the market (docs/spec.md §5's F_g)."""
    g = book.generation_index(assumptions.generations)
    pledged = np.bincount(g, weights=book.gpu_count * book.collateral_share, minlength=4)
    assert np.all(pledged <= 0.15 * assumptions.params.financed_fleet_gpus)


def test_origination_dscr_and_ltv(book, example_loans, assumptions):
    dscr, ltv = _origination(book, example_loans, assumptions)
    assert dscr.min() >= 1.2 and dscr.max() <= 2.0
    assert ltv.min() >= 0.5 and ltv.max() <= 0.8
    assert 1.4 < np.median(dscr) < 1.7 and 0.6 < np.median(ltv) < 0.7


def test_pds_and_correlations_by_borrower_type(book):
    ranges = {"neocloud": (0.02, 0.05), "miner": (0.04, 0.08), "enterprise": (0.01, 0.03)}
    for kind, (low, high) in ranges.items():
        rows = book.borrower_type == kind
        assert low <= book.pd_annual[rows].min() and book.pd_annual[rows].max() <= high
    assert book.asset_correlation.min() >= 0.12 and book.asset_correlation.max() <= 0.25


def test_loans_of_one_borrower_share_its_type_pd_and_correlation(book):
    ids, counts = np.unique(book.borrower_id, return_counts=True)
    assert counts.max() <= 5 and np.mean(counts > 1) > 0.5
    for borrower in ids:
        rows = book.borrower_id == borrower
        for column in ("borrower_type", "pd_annual", "asset_correlation"):
            assert len(set(getattr(book, column)[rows])) == 1, (borrower, column)
        assert len(set(book.other_income_btc_share[rows])) == 1


def test_neocloud_loans_amortize_inside_take_or_pay_contracts(book):
    rows = book.borrower_type == "neocloud"
    assert set(book.rate_type[rows]) == {"floating"}
    assert set(book.amortization[rows]) <= {"linear", "annuity"}
    assert book.contracted_share[rows].min() >= 0.8
    rent = RENT_USD_PER_HOUR[book.generation_index(GENERATIONS)]
    contract_to_market = book.contract_rate_usd_per_hour[rows] / rent[rows]
    assert contract_to_market.min() >= 0.85 - 1e-3 and contract_to_market.max() <= 1.05 + 1e-3
    cover = book.contract_years_remaining[rows] / book.maturity_years[rows]
    assert cover.min() >= 0.6  # every contract covers most of the term
    balance = book.balance_usd[rows]
    assert balance[cover >= 1].sum() / balance.sum() >= 0.7  # most exposure: all of it


def test_miners_have_btc_linked_mining_income_and_treasuries(book):
    rows = book.borrower_type == "miner"
    assert set(book.rate_type[rows]) == {"fixed"}
    assert book.other_income_usd_per_year[rows].min() > 0
    assert book.other_income_btc_share[rows].min() >= 0.8
    assert book.btc_units[rows].min() > 0 and book.eth_units[rows].max() > 0
    assert book.crypto_pledged[rows].any()
    others = ~rows
    assert book.btc_units[others].max() == 0 and book.eth_units[others].max() == 0
    assert not book.crypto_pledged[others].any()


def test_enterprises_are_serviced_by_operating_cash_flow(book):
    rows = book.borrower_type == "enterprise"
    assert set(book.rate_type[rows]) == {"fixed"}
    assert set(book.amortization[rows]) == {"annuity"}
    assert book.other_income_usd_per_year[rows].min() > 0
    assert book.other_income_btc_share[rows].max() == 0
    assert book.contracted_share[rows].max() == 0
    assert book.other_income_usd_per_year[book.borrower_type == "neocloud"].max() == 0


def test_few_central_paths_miss_debt_service_or_refinancing(book, example_loans, assumptions):
    """Paper vs path (docs/spec.md §4): on the central path the input PD is the model's
    hazard wherever the path pays; the example keeps the loans where it does not few."""
    refs = pd_references(assumptions.params, assumptions.grid(), example_loans, "expected")
    misses = (refs.central_min_liquidity_coverage < 1) | (refs.central_refinancing_coverage < 1)
    assert misses.sum() <= 0.05 * len(book)
    assert book.balance_usd[misses].sum() <= 0.05 * book.balance_usd.sum()


def test_the_example_book_names_offtakers_with_one_behind_forty_percent(book):
    """Issue 21 item 5: a few offtakers, one behind at least 40% of the contracted revenue;
    a loan without a contract names none, and each offtaker states one PD."""
    from gpucredit.portfolio.stress import contracted_revenue_by_offtaker

    revenue = contracted_revenue_by_offtaker(book)
    assert 3 <= len(revenue) <= 6
    assert max(revenue.values()) >= 0.40 * sum(revenue.values())
    assert np.all(book.offtaker[book.contracted_share == 0] == "")
    for name in revenue:
        assert len(set(book.offtaker_pd_annual[book.offtaker == name])) == 1
