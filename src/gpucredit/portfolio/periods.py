"""Expected loss by default period: when in the horizon the book's expected loss falls.

The kernels report each loan's loss summed over the periods (docs/spec.md §6), not period by
period. Every equation is causal and the random numbers of period t do not depend on the
horizon (docs/spec.md §8; portfolio/calibration.py relies on the same), so the NumPy
reference run on the first t periods of the grid gives, scenario by scenario, exactly the
run's loss from defaults in periods 1..t. The loss of period t is the difference of two such
cumulative losses; the periods add up to the full-horizon loss.

It costs T reference runs of 1..T periods (about T/2 full runs) on the run's first
`PERIOD_MAX_SCENARIOS` scenarios, so it is an estimate on a sample, with its own standard
error, not the run's EL split exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpucredit.kernels.reference import simulate_outcomes
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.loans import loan_arrays

PERIOD_MAX_SCENARIOS = 2_048  # the run's first scenarios; NumPy float64, ~T/2 full runs
PERIOD_MIN_SCENARIOS = 128  # fewer than this and the estimate is noise
PERIOD_BUDGET_LOAN_PERIODS = 40_000_000  # reference loan-period evaluations (~10 s on 2 cores)
PERIOD_CHUNK = 512  # scenarios per reference call (bounds its [T+1, S, N] arrays)


def truncated_assumptions(assumptions: Assumptions, periods: int) -> Assumptions:
    """The assumptions on the first `periods` periods of their grid (no stresses)."""
    return dataclasses.replace(
        assumptions, horizon_years=periods / assumptions.steps_per_year, stresses=()
    )


def cumulative_loss_by_period(
    book: Book,
    assumptions: Assumptions,
    seed: int,
    scenarios: int,
    mode: str | None = None,
    progress=None,
) -> np.ndarray:
    """[T+1, S] the portfolio loss from defaults in periods 1..t (row 0 is 0) for the run's
    scenarios 0..S-1, by the NumPy reference on truncated grids. `progress(done, total)`
    counts period-scenarios."""
    periods = assumptions.periods
    out = np.zeros((periods + 1, scenarios))
    total = scenarios * periods * (periods + 1) // 2
    for t in range(1, periods + 1):
        short = truncated_assumptions(assumptions, t)
        # References of the full grid's central path are the truncated grid's too (causal),
        # but computing them on the short grid keeps this a plain run of `short`.
        loans = loan_arrays(book, short)
        grid = short.grid(mode)
        for first in range(0, scenarios, PERIOD_CHUNK):
            index = np.arange(first, min(first + PERIOD_CHUNK, scenarios))
            outcome = simulate_outcomes(short.params, grid, loans, seed, index)
            out[t, index] = outcome.loss_usd.sum(axis=1)
            if progress is not None:
                progress(scenarios * (t - 1) * t // 2 + (index[-1] + 1) * t, total)
    return out


def loss_by_period(
    book: Book,
    assumptions: Assumptions,
    seed: int,
    run_scenarios: int,
    mode: str | None = None,
    max_scenarios: int = PERIOD_MAX_SCENARIOS,
    progress=None,
) -> dict | None:
    """JSON-ready expected loss by default period over the run's first scenarios (plain Monte
    Carlo on the run's seed and mode, no importance shift): min(`run_scenarios`,
    `max_scenarios`), fewer on a large book so the reference stays within
    `PERIOD_BUDGET_LOAN_PERIODS` (never under `PERIOD_MIN_SCENARIOS`); None for a run of
    fewer than 2 scenarios:

    ``period`` [T] 1..T, ``year_end`` [T] the period's end in years, ``el_usd`` [T] the mean
    loss from defaults in the period (discounted as the run discounts), ``el_se_usd`` [T] its
    i.i.d. standard error, ``cumulative_el_usd`` [T], and ``scenarios``, ``el_total_usd``
    (the sample's EL over the horizon: the periods add up to it).
    """
    periods = assumptions.periods
    affordable = PERIOD_BUDGET_LOAN_PERIODS // max(len(book) * periods * (periods + 1) // 2, 1)
    cap = min(int(max_scenarios), max(PERIOD_MIN_SCENARIOS, affordable))
    scenarios = min(int(run_scenarios), cap)
    if scenarios < 2:
        return None
    cumulative = cumulative_loss_by_period(book, assumptions, seed, scenarios, mode, progress)
    per_period = np.diff(cumulative, axis=0)  # [T, S]
    el = per_period.mean(axis=1)
    se = per_period.std(axis=1, ddof=1) / np.sqrt(scenarios)
    steps = assumptions.steps_per_year
    return {
        "scenarios": scenarios,
        "steps_per_year": steps,
        "period": list(range(1, assumptions.periods + 1)),
        "year_end": [t / steps for t in range(1, assumptions.periods + 1)],
        "el_usd": el.tolist(),
        "el_se_usd": se.tolist(),
        "cumulative_el_usd": np.cumsum(el).tolist(),
        "el_total_usd": float(cumulative[-1].mean()),
    }
