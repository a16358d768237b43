"""Model v2 mechanisms of docs/spec.md by hand, on the NumPy reference: the PD anchor's
references (central path and today's metrics), other income, the market-wide fire sale and
references held fixed under a stress."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from gpucredit.kernels import reference as ref
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.book import feature_book, uniform_book
from gpucredit.portfolio.loans import loan_arrays


@pytest.fixture(scope="module")
def book():
    return feature_book(48, seed=5)


def test_central_path_is_every_shock_zero(assumptions):
    grid = assumptions.grid()
    central = ref.central_path(assumptions.params, grid)
    p = assumptions.params
    t = np.arange(grid.periods + 1) * grid.dt_years
    # rents on their trend (launch steps included), the credit cycle at 0
    launched = np.array([[tau <= s + 1e-9 for tau in assumptions.launch_years] for s in t])
    jumps = np.prod(np.where(launched[..., None], 1 - p.launch_rent_jump[None], 1.0), axis=1)
    expected_rent = p.rent_usd_per_hour * np.exp(p.rent_drift * t[:, None]) * jumps
    np.testing.assert_allclose(central.rent_usd_per_hour[0], expected_rent, rtol=1e-12)
    np.testing.assert_array_equal(central.credit, 0.0)
    # BTC on its median: exp((μ − σ²/2) t)
    np.testing.assert_allclose(
        central.btc_usd[0], p.btc_price_usd * np.exp((p.btc_drift - p.btc_vol**2 / 2) * t)
    )


def test_expected_anchor_gives_the_vasicek_hazard_on_the_central_path(assumptions, book):
    """Where the central path covers its debt service and refinances its balloon, the shift is
    0 on that path: 1 − S_i(T) is the input PD's Vasicek hazard compounded over the active
    periods (Z = 0). Elsewhere the hazard is higher (the references never fall below 1)."""
    grid = assumptions.grid()
    loans = loan_arrays(book, assumptions)
    refs = ref.pd_references(assumptions.params, grid, loans, "expected")
    central = ref.central_path(assumptions.params, grid)
    outcome = ref.loan_outcomes(assumptions.params, grid, loans, central)
    rho = loans.asset_correlation
    hazard = ndtr(ndtri(1 - (1 - loans.pd_annual) ** grid.dt_years) / np.sqrt(1 - rho))
    active = np.minimum(loans.maturity_period, grid.periods)
    vasicek = 1 - (1 - hazard) ** active
    covered = (refs.central_min_liquidity_coverage >= 1) & (refs.central_refinancing_coverage >= 1)
    assert covered.sum() >= 10 and (~covered).sum() >= 3  # the book exercises both
    np.testing.assert_allclose(
        outcome.default_probability[0, covered], vasicek[covered], rtol=1e-10
    )
    assert np.all(outcome.default_probability[0, ~covered] > vasicek[~covered])


def test_today_anchor_references_are_todays_metrics(assumptions, book):
    grid = assumptions.grid()
    loans = loan_arrays(book, assumptions)
    refs = ref.pd_references(assumptions.params, grid, loans, "today")
    today = ref.today_metrics(assumptions.params, grid, loans)
    for t in range(1, grid.periods + 1):
        np.testing.assert_allclose(refs.ln_liquidity[:, t], np.log(today.liquidity_coverage))
        np.testing.assert_allclose(refs.ln_collateral[:, t], np.log(today.collateral_coverage))
    np.testing.assert_allclose(refs.ln_refinancing, np.log(today.refinancing_coverage))


def test_expected_references_floor_liquidity_and_refinancing_at_full_coverage(assumptions, book):
    refs = ref.pd_references(assumptions.params, assumptions.grid(), loan_arrays(book, assumptions))
    assert np.all(refs.ln_liquidity[:, 1:] >= 0.0)
    np.testing.assert_array_equal(refs.ln_refinancing, 0.0)


def test_stress_is_measured_against_the_base_references(assumptions, book):
    """A stressed trend moves the paths, not the references (docs/spec.md §4)."""
    stressed = with_overrides(assumptions, {"generations": {"H100": {"rent_drift": -0.6}}})
    base_loans = loan_arrays(book, assumptions)
    own = loan_arrays(book, stressed)
    held = loan_arrays(book, stressed, base=assumptions)
    np.testing.assert_array_equal(held.ln_liquidity_reference, base_loans.ln_liquidity_reference)
    assert not np.allclose(own.ln_liquidity_reference, base_loans.ln_liquidity_reference)
    # a stress that switches the anchor gets today's metrics of the base assumptions
    paper = with_overrides(assumptions, {"model": {"pd_anchor": "today"}})
    today = ref.today_metrics(assumptions.params, assumptions.grid(), base_loans)
    np.testing.assert_allclose(
        loan_arrays(book, paper, base=assumptions).ln_collateral_reference[:, 1],
        np.log(today.collateral_coverage),
    )


def test_other_income_by_hand(assumptions):
    """Inc(t) = OI Δ [(1 − b) + b X_btc(t)/X_btc(0) e^{η tΔ}] on a made-up BTC path."""
    grid = assumptions.grid()
    p = assumptions.params
    book = uniform_book(
        2, other_income_usd_per_year=[1_000_000.0, 0.0], other_income_btc_share=[0.75, 0.0]
    )
    loans = loan_arrays(book, assumptions)
    paths = ref.central_path(p, grid)
    btc = paths.btc_usd.copy()
    btc[0, 3] = 45_000.0  # BTC halves in period 3
    paths = paths._replace(btc_usd=btc)
    cash = loans.cash_usd[None]
    with_income = ref.period_metrics(p, grid, loans, paths, 3, cash)
    index = 45_000.0 / p.btc_price_usd * np.exp(p.btc_hashprice_drift * 3 * 0.25)
    income = 1_000_000.0 * 0.25 * (0.25 + 0.75 * index)
    assert with_income.noi_usd[0, 0] - with_income.noi_usd[0, 1] == pytest.approx(income, rel=1e-12)


def test_fire_sale_supply_by_hand(assumptions):
    """Q + max(F − N, 0) q̄ per generation: the rest of the financed fleet liquidates at the
    book's expected rate; a book holding the whole fleet sells its own volume alone; a
    generation the book does not hold has no supply."""
    grid = assumptions.grid()
    book = uniform_book(
        3, gpu_generation=["H100", "H100", "A100"], gpu_count=[1000.0, 3000.0, 500.0],
        collateral_share=[1.0, 0.5, 1.0],
    )  # fmt: skip
    loans = loan_arrays(book, assumptions)
    params = assumptions.params._replace(financed_fleet_gpus=np.array([400.0, 1.0e6, 5e5, 6e5]))
    dumped = np.array([[0.0, 1500.0, 0.0]])  # loan 1 defaults in full (sampled mode)
    expected = np.array([[50.0, 75.0, 20.0]])  # n a S h
    supply = ref.liquidation_supply(params, grid, loans, dumped, expected)
    n_h100 = 1000.0 + 1500.0
    assert supply[0, 1] == pytest.approx(1500.0 + (1.0e6 - n_h100) * (125.0 / n_h100))
    assert supply[0, 0] == pytest.approx(0.0)  # A100: F = 400 < N = 500, own volume (0) alone
    assert supply[0, 2] == 0.0 and supply[0, 3] == 0.0  # no H200 or B200 in the book
