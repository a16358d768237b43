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


def test_a_large_book_takes_fewer_scenarios_within_the_budget(book_and_assumptions):
    """The reference costs loans x T(T+1)/2 per scenario: a large book gets fewer scenarios
    (never under PERIOD_MIN_SCENARIOS), a small one the full PERIOD_MAX_SCENARIOS."""
    from gpucredit.portfolio import periods

    book, assumptions = book_and_assumptions
    T = assumptions.periods
    per_scenario = len(book) * T * (T + 1) // 2
    budget = periods.PERIOD_BUDGET_LOAN_PERIODS
    expected = min(2_048, max(periods.PERIOD_MIN_SCENARIOS, budget // per_scenario))
    original = periods.cumulative_loss_by_period
    seen = []

    def recording(book, assumptions, seed, scenarios, mode=None, progress=None):
        seen.append(scenarios)
        return np.zeros((T + 1, scenarios))

    periods.cumulative_loss_by_period = recording
    try:
        periods.loss_by_period(book, assumptions, seed=3, run_scenarios=100_000)
        periods.PERIOD_BUDGET_LOAN_PERIODS = per_scenario * 200
        periods.loss_by_period(book, assumptions, seed=3, run_scenarios=100_000)
        periods.PERIOD_BUDGET_LOAN_PERIODS = 1
        periods.loss_by_period(book, assumptions, seed=3, run_scenarios=100_000)
    finally:
        periods.cumulative_loss_by_period = original
        periods.PERIOD_BUDGET_LOAN_PERIODS = budget
    assert seen == [expected, 200, periods.PERIOD_MIN_SCENARIOS]
