"""Reverse stress testing: the design point against the one-factor closed form, and its
defining properties (on the limit state, locally the most likely point) on a real book."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from conftest import random_book, uniform_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.kernels import jax_engine
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.reverse_stress import (
    ReverseStressError,
    _normals,
    find_design_point,
)

PD, RHO, LOANS = 0.05, 0.2, 50


def one_factor_assumptions():
    """One period, β's = 0, no price/rent vols, no launches: L̄ depends on the credit shock only."""
    generations = default_assumptions().generations
    return with_overrides(
        default_assumptions(),
        {
            "launches": [],
            "simulation": {"horizon_years": 0.25, "steps_per_year": 4},
            "generations": {g: {"rent_vol": 0.0, "price_vol": 0.0} for g in generations},
            "model": {"beta_liquidity": 0.0, "beta_collateral": 0.0, "beta_refinancing": 0.0,
                      "haircut_slope": 0.0},
        },
    )  # fmt: skip


def test_design_point_matches_the_one_factor_closed_form():
    assumptions = one_factor_assumptions()
    book = uniform_book(LOANS, pd_annual=PD, asset_correlation=RHO, balance_usd=2.0e6)
    central = find_design_point(book, assumptions, 1.0)  # reachable at z = 0
    assert np.all(central.z == 0)
    # L̄(ε) = N ℓ Φ((c − √ρ ε)/√(1 − ρ)), ε the credit shock; the lender's full loss if all default
    full = central.central_loss_usd / ndtr(ndtri(1 - (1 - PD) ** 0.25) / np.sqrt(1 - RHO))
    target = 0.3 * full
    point = find_design_point(book, assumptions, target)
    assert point.converged
    assert point.loss_usd == pytest.approx(target, rel=1e-8)
    threshold = ndtri(1 - (1 - PD) ** 0.25)
    epsilon = (threshold - np.sqrt(1 - RHO) * ndtri(target / full)) / np.sqrt(RHO)
    # the shortest z with (L z)_credit = ε has |z| = |ε| (a row of L has unit norm)
    assert point.distance == pytest.approx(abs(epsilon), rel=1e-4)
    assert point.paths["credit (std. normal, + benign)"][1] == pytest.approx(epsilon, rel=1e-4)
    assert point.log_likelihood_ratio == pytest.approx(-0.5 * epsilon**2, rel=1e-3)


def test_design_point_is_on_the_limit_state_and_locally_most_likely():
    assumptions = default_assumptions()
    book = random_book(5, 30)
    grid = assumptions.grid("conditional")
    blocks = jax_engine.prepare_loans(loan_arrays(book, assumptions), jnp.float64, 64)

    def loss(z):
        normals = _normals(jnp.asarray(z), grid.chi2_slots)
        return float(jax_engine.loss_given_normals(assumptions.params, grid, blocks, normals)[0])

    central = loss(np.zeros((grid.periods, grid.n_factors)))
    point = find_design_point(book, assumptions, 2.0 * central)
    assert point.converged and point.distance > 0
    assert loss(point.z) == pytest.approx(2.0 * central, rel=1e-6)
    # No random direction at the same distance reaches a higher loss than z* (to rounding):
    # z* maximises L̄ on its sphere, the dual form of the design point.
    rng = np.random.default_rng(0)
    for _ in range(10):
        direction = point.z + 0.3 * point.distance * rng.standard_normal(point.z.shape) / np.sqrt(
            point.z.size
        )
        direction *= point.distance / np.linalg.norm(direction)
        assert loss(direction) <= loss(point.z) * (1 + 1e-6)
    splits = sum(point.loss_by_generation.values())
    assert splits == pytest.approx(point.loss_usd, rel=1e-9)
    assert sum(point.loss_by_borrower_type.values()) == pytest.approx(point.loss_usd, rel=1e-9)


def test_unreachable_loss_is_a_clear_error():
    assumptions = one_factor_assumptions()
    book = uniform_book(10, balance_usd=2.0e6)
    exposure = float(book.balance_usd.sum()) * 2
    with pytest.raises(ReverseStressError, match="out of reach"):
        find_design_point(book, assumptions, exposure)


def test_an_absurd_target_is_refused_quickly_without_nan():
    """Issue 20 item 5: `reverse-stress --loss 1e30` searched 200 iterations into NaN."""
    import time

    book = uniform_book(1)
    started = time.perf_counter()
    with pytest.raises(ReverseStressError, match="out of reach"):
        find_design_point(book, default_assumptions(), 1e30)
    assert time.perf_counter() - started < 60
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ReverseStressError, match="positive number"):
            find_design_point(book, default_assumptions(), bad)


@pytest.mark.parametrize(
    ("z", "loss", "converged", "match"),
    [
        # Issue 20 item 5: --importance-sampling on a one-loan book shifted to |z*| = 18,716.
        (np.full((12, 13), 18716 / np.sqrt(156)), 1e6, True, "18,716.0 standard deviations"),
        (np.full((12, 13), 1.0), float("nan"), True, "not finite"),
        (np.full((12, 13), np.nan), 1e6, True, "not finite"),
        (np.full((12, 13), 0.2), 1e6, False, "did not converge"),
    ],
)
def test_a_design_point_that_is_not_one_is_refused(z, loss, converged, match):
    from gpucredit.portfolio.reverse_stress import _refuse_implausible

    with pytest.raises(ReverseStressError, match=match):
        _refuse_implausible(1e6, z, loss, converged)
    _refuse_implausible(1e6, np.full((12, 13), 0.2), 1e6, True)  # |z| = 2.5: a design point


def test_a_target_many_times_the_central_loss_is_found_on_the_log_loss():
    """The float64 pilot of random_book(3, 40) (2,048 scenarios) sets a VaR 99.9% some 40
    times the central loss: the plain limit state 1 − L̄/X is so curved there that HL-RF's
    linearised steps overshoot to |z| ~ 70 and back, once landing where no loan loses (zero
    gradient: "the loss does not respond"). The search on ln L̄ finds the design point, the
    same one the float32 pilot's search finds."""
    from gpucredit.portfolio.engine import importance_shift

    assumptions = default_assumptions()
    book = random_book(3, 40)
    _, point64 = importance_shift(book, assumptions, 0, 0.999, 2048, "jax", "float64")
    assert point64.converged and point64.target_loss_usd > 30 * point64.central_loss_usd
    assert point64.loss_usd == pytest.approx(point64.target_loss_usd, rel=1e-8)
    assert 2.5 < point64.distance < 4.5
