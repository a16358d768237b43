"""Expected loss by default period (portfolio/periods.py): the truncated-grid runs give
exactly the run's loss, so the periods add up to the full-horizon loss of each scenario."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.book import example_book_path, read_book
from gpucredit.kernels.reference import simulate_outcomes
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.periods import cumulative_loss_by_period, loss_by_period


@pytest.fixture(scope="module")
def book_and_assumptions():
    assumptions = default_assumptions()
    book = read_book(example_book_path(), assumptions)
    return book.subset(np.arange(40)), assumptions  # a small book: the reference is slow


@pytest.mark.parametrize(("mode", "discount"), [("conditional", False), ("sampled", True)])
def test_periods_add_up_to_the_full_horizon_loss(book_and_assumptions, mode, discount):
    book, assumptions = book_and_assumptions
    assumptions = dataclasses.replace(assumptions, discount=discount)
    cumulative = cumulative_loss_by_period(book, assumptions, seed=11, scenarios=64, mode=mode)
    loans = loan_arrays(book, assumptions)
    grid = assumptions.grid(mode)
    outcomes = simulate_outcomes(assumptions.params, grid, loans, 11, np.arange(64))
    full = outcomes.loss_usd.sum(axis=1)
    assert cumulative.shape == (assumptions.periods + 1, 64)
    np.testing.assert_allclose(cumulative[-1], full, rtol=1e-12, atol=1e-6)
    assert np.all(np.diff(cumulative, axis=0) >= -1e-6)  # a loss once taken stays taken


def test_loss_by_period_is_json_ready_and_sums_to_the_sample_el(book_and_assumptions):
    book, assumptions = book_and_assumptions
    table = loss_by_period(book, assumptions, seed=3, run_scenarios=100_000, max_scenarios=32)
    assert table["scenarios"] == 32 and table["period"] == list(range(1, assumptions.periods + 1))
    assert table["year_end"][-1] == pytest.approx(assumptions.horizon_years)
    assert sum(table["el_usd"]) == pytest.approx(table["el_total_usd"], rel=1e-12)
    assert table["cumulative_el_usd"][-1] == pytest.approx(table["el_total_usd"], rel=1e-12)
    assert all(se >= 0 for se in table["el_se_usd"])
    assert loss_by_period(book, assumptions, seed=3, run_scenarios=1) is None
