"""The synthetic book generator and the embedded example book."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.book import BOOK_COLUMNS, example_book_path, read_book, write_book
from gpucredit.kernels.reference import today_metrics
from gpucredit.portfolio.book import BORROWER_TYPES
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.makebook import (
    EXAMPLE_LOANS,
    EXAMPLE_SEED,
    GENERATIONS,
    PRICE_USD,
    make_book,
)

ASSUMPTIONS = SimpleNamespace(
    generations=("A100", "H100", "H200", "B200"),
    generation_power_kw_per_gpu=(0.52, 0.91, 0.91, 1.30),
)


@pytest.fixture(scope="module")
def book():
    return read_book(example_book_path(), ASSUMPTIONS)


def test_same_seed_same_book_and_another_seed_another():
    assert make_book(300, seed=7).equals(make_book(300, seed=7))
    assert not make_book(300, seed=7).equals(make_book(300, seed=8))


@pytest.mark.parametrize("n_loans", [1, 2, 7, 1000])
def test_exactly_n_loans_with_every_column(n_loans):
    table = make_book(n_loans, seed=3)
    assert table.num_rows == n_loans
    assert tuple(table.column_names) == BOOK_COLUMNS


def test_the_example_book_is_make_book_2000_seed_2026(book):
    assert len(book) == EXAMPLE_LOANS == 2000
    table = make_book(EXAMPLE_LOANS, EXAMPLE_SEED)
    np.testing.assert_array_equal(book.balance_usd, table.column("balance_usd").to_numpy())
    assert book.loan_id.tolist() == table.column("loan_id").to_pylist()


def test_a_written_book_reads_and_validates(tmp_path):
    path = write_book(make_book(500, seed=11), tmp_path / "book.arrow")
    assert len(read_book(path, ASSUMPTIONS)) == 500


def test_loan_to_value_at_origination_is_50_to_80_percent(book):
    price_usd = PRICE_USD[book.generation_index(GENERATIONS)]
    ltv = book.balance_usd / (book.gpu_count * price_usd * book.collateral_share)
    assert ltv.min() >= 0.5 and ltv.max() <= 0.8


def test_pds_and_correlations_in_range(book):
    assert book.pd_annual.min() >= 0.01 and book.pd_annual.max() <= 0.10
    assert book.asset_correlation.min() >= 0.10 and book.asset_correlation.max() <= 0.25


def test_every_borrower_type_and_generation_is_present(book):
    assert set(book.borrower_type) == set(BORROWER_TYPES) - {"other"}
    assert set(book.gpu_generation) == set(GENERATIONS)
    shares = {t: np.mean(book.borrower_type == t) for t in ("neocloud", "miner", "enterprise")}
    assert 0.40 < shares["neocloud"] < 0.60
    assert 0.25 < shares["miner"] < 0.42


def test_borrowers_have_several_loans_with_one_type_and_pd(book):
    ids, counts = np.unique(book.borrower_id, return_counts=True)
    assert counts.min() >= 1 and counts.max() <= 6
    assert np.mean(counts > 1) > 0.5
    for borrower in ids[counts > 1][:50]:
        rows = book.borrower_id == borrower
        assert len(set(book.borrower_type[rows])) == 1
        assert len(set(book.pd_annual[rows])) == 1


def test_borrower_terms(book):
    neocloud = book.borrower_type == "neocloud"
    miner = book.borrower_type == "miner"
    assert set(book.rate_type[neocloud]) == {"floating"}
    assert set(book.rate_type[~neocloud]) == {"fixed"}
    assert book.contracted_share[neocloud].min() >= 0.5
    assert book.contracted_share[neocloud].max() <= 0.9
    assert book.btc_units[miner].min() > 0 and book.btc_units[~miner].max() == 0
    assert book.crypto_pledged[miner].any() and not book.crypto_pledged[~miner].any()
    assert set(book.amortization[book.borrower_type == "enterprise"]) == {"annuity"}
    assert 64 <= book.gpu_count.min() and book.gpu_count.max() <= 20_000
    assert book.utilization.min() >= 0.6 and book.utilization.max() <= 0.95


def test_most_loans_cover_todays_debt_service_one_to_two_and_a_half_times():
    """NOI over the first quarter's debt service at today's levels (MODEL.md §3, the §9
    defaults): the example book is sized like the desks' books."""
    assumptions = default_assumptions()
    loans = loan_arrays(read_book(example_book_path(), assumptions), assumptions)
    today = today_metrics(assumptions.params, assumptions.grid(), loans)
    coverage = today.noi_usd / today.debt_service_usd
    assert np.mean((coverage >= 1.0) & (coverage <= 2.5)) > 0.55
    assert 1.3 < np.median(coverage) < 2.2
