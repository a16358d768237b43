"""Offtakers (docs/spec.md §4a) in the NumPy reference: each offtaker's default period from
stream 2 and the credit cycle, each loan's contract switched off after it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from conftest import OFFTAKER_PDS, offtaker_book
from gpucredit.kernels import reference as ref
from gpucredit.kernels.rng import (
    STREAM_OFFTAKERS,
    offtaker_uniforms_np,
    shock_normals_np,
    threefry2x32_np,
    uniform_from_bits,
)
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.loans import loan_arrays

SEED = 5
SCENARIOS = np.arange(64, dtype=np.uint32)


@pytest.fixture(scope="module")
def offtaker_loans(assumptions):
    return loan_arrays(offtaker_book(), assumptions)


def paths_of(assumptions, scenarios=SCENARIOS):
    grid = assumptions.grid()
    normals = shock_normals_np(SEED, scenarios, grid.periods, grid.slots_per_period)
    shocks = ref.correlated_shocks(assumptions.params, grid, normals)
    return ref.factor_paths(assumptions.params, grid, shocks)


def test_offtaker_index_is_order_of_first_appearance(offtaker_loans):
    book = offtaker_book()
    named = book.offtaker != ""
    first = [n for k, n in enumerate(book.offtaker) if n and n not in book.offtaker[:k]]
    assert tuple(first) == book.offtaker_index()[1]
    assert np.all(offtaker_loans.offtaker[~named] == -1)
    assert [first[j] for j in offtaker_loans.offtaker[named]] == list(book.offtaker[named])
    assert offtaker_loans.offtaker_pd_annual.tolist() == [OFFTAKER_PDS[n] for n in first]


def test_default_periods_by_hand(assumptions, offtaker_loans):
    """τ_j: the first t with 1 − Π_{u≤t}(1 − h^o_j(u)) >= U_j, h^o the offtaker's Vasicek
    hazard on the credit cycle Z(t) with ρ_o; computed one scenario and offtaker at a time."""
    grid = assumptions.grid()
    paths = paths_of(assumptions)
    uniforms = offtaker_uniforms_np(SEED, SCENARIOS, 3)
    tau = ref.offtaker_default_periods(
        assumptions.params, grid, offtaker_loans, paths.credit, uniforms
    )
    rho = 0.25
    assert assumptions.params.offtaker_correlation == rho  # docs/spec.md §9 default
    for s in range(len(SCENARIOS)):
        for j, pd_annual in enumerate(offtaker_loans.offtaker_pd_annual):
            p_period = 1.0 - (1.0 - pd_annual) ** 0.25
            survival, expected = 1.0, ref.NEVER
            for t in range(1, grid.periods + 1):
                z = paths.credit[s, t]
                survival *= 1.0 - ndtr((ndtri(p_period) - np.sqrt(rho) * z) / np.sqrt(1 - rho))
                if 1.0 - survival >= uniforms[s, j]:
                    expected = t
                    break
            assert tau[s, j] == expected
    assert np.any(tau == ref.NEVER) and np.any(tau <= grid.periods)


def test_contract_stops_after_the_offtakers_default(assumptions, offtaker_loans):
    """Each scenario's loss equals the same loans without offtakers whose contracts end at
    min(contract end, τ of their offtaker): k_i(t) = 0 for t > τ_j (docs/spec.md §3, §4a)."""
    grid = assumptions.grid()
    outcomes = ref.simulate_outcomes(assumptions.params, grid, offtaker_loans, SEED, SCENARIOS[:16])
    paths = paths_of(assumptions, SCENARIOS[:16])
    tau = ref.offtaker_default_periods(
        assumptions.params,
        grid,
        offtaker_loans,
        paths.credit,
        offtaker_uniforms_np(SEED, SCENARIOS[:16], 3),
    )
    has = offtaker_loans.offtaker >= 0
    for s in range(16):
        last = np.where(has, tau[s, np.maximum(offtaker_loans.offtaker, 0)], ref.NEVER)
        by_hand = offtaker_loans._replace(
            contract_periods=np.minimum(offtaker_loans.contract_periods, last),
            offtaker=None,
            offtaker_pd_annual=None,
        )
        one = ref.FactorPaths(*(x[s : s + 1] for x in paths))
        expected = ref.loan_outcomes(assumptions.params, grid, by_hand, one)
        np.testing.assert_allclose(outcomes.loss_usd[s], expected.loss_usd[0], rtol=1e-12)
        np.testing.assert_array_equal(
            outcomes.default_probability[s], expected.default_probability[0]
        )
    assert np.any(tau[:16] <= grid.periods)  # some contracts did stop


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_offtakers_with_pd_zero_change_nothing(assumptions, mode):
    """A PD of 0 never defaults: the run is bit for bit the book naming no offtaker."""
    a = with_overrides(assumptions, {"simulation": {"mode": mode}})
    book = offtaker_book()
    zero = dataclasses.replace(book, offtaker_pd_annual=np.zeros(len(book)))
    none = dataclasses.replace(book, offtaker=np.full(len(book), "", dtype=object))
    with_zero = ref.simulate_outcomes(
        a.params, a.grid(), loan_arrays(zero, a), SEED, SCENARIOS[:16]
    )
    without = ref.simulate_outcomes(a.params, a.grid(), loan_arrays(none, a), SEED, SCENARIOS[:16])
    np.testing.assert_array_equal(with_zero.loss_usd, without.loss_usd)
    assert loan_arrays(none, a).offtaker is None


def test_offtaker_defaults_raise_the_loss(assumptions, offtaker_loans):
    """Contracts paying above spot that stop can only cut NOI: E[L] does not fall."""
    grid = assumptions.grid()
    with_them = ref.simulate_chunk(assumptions.params, grid, offtaker_loans, SEED, SCENARIOS)
    safe = offtaker_loans._replace(offtaker_pd_annual=np.zeros(3))
    without = ref.simulate_chunk(assumptions.params, grid, safe, SEED, SCENARIOS)
    assert with_them.sum() > without.sum()


def test_offtaker_pd_of_one_defaults_in_period_one(assumptions, offtaker_loans):
    """The stress `offtakers_default`: an offtaker PD of 1 gives h^o = 1, so τ_j = 1 in every
    scenario (its contracts pay period 1 and nothing after)."""
    grid = assumptions.grid()
    paths = paths_of(assumptions)
    stressed = offtaker_loans._replace(offtaker_pd_annual=np.array([1.0, 0.02, 0.6]))
    tau = ref.offtaker_default_periods(
        assumptions.params, grid, stressed, paths.credit, offtaker_uniforms_np(SEED, SCENARIOS, 3)
    )
    assert np.all(tau[:, 0] == 1)


@pytest.mark.parametrize(("pd_annual", "rho"), [(0.05, 0.25), (0.2, 0.5), (0.01, 0.0)])
def test_offtaker_vasicek_limit(assumptions, pd_annual, rho):
    """Many offtakers of one PD: the share that defaults in period 1 of a scenario is the
    Vasicek conditional PD Φ((Φ⁻¹(p^Δ) − √ρ_o Z(1))/√(1 − ρ_o)) (the large-pool limit), and
    over scenarios with independent periods (ϕ = 0) the default frequency within the horizon
    is 1 − (1 − p)^H."""
    a = with_overrides(
        assumptions, {"credit": {"persistence": 0.0}, "model": {"offtaker_correlation": rho}}
    )
    grid = a.grid()
    n_offtakers = 20_000
    many = offtaker_book()
    loans = loan_arrays(many, a)._replace(offtaker_pd_annual=np.full(n_offtakers, pd_annual))
    scenarios = np.arange(8, dtype=np.uint32)
    paths = paths_of(a, scenarios)
    uniforms = offtaker_uniforms_np(SEED, scenarios, n_offtakers)
    tau = ref.offtaker_default_periods(a.params, grid, loans, paths.credit, uniforms)
    p_period = 1.0 - (1.0 - pd_annual) ** grid.dt_years
    conditional = ndtr((ndtri(p_period) - np.sqrt(rho) * paths.credit[:, 1]) / np.sqrt(1 - rho))
    share = np.mean(tau == 1, axis=1)
    se = np.sqrt(conditional * (1 - conditional) / n_offtakers)
    assert np.all(np.abs(share - conditional) <= 4 * se + 1e-12)
    # Unconditional: over scenarios x offtakers, P(τ <= T) = 1 − (1 − p)^H.
    frequency = np.mean(tau <= grid.periods)
    expected = 1.0 - (1.0 - pd_annual) ** (grid.periods * grid.dt_years)
    n_draws = 8 * n_offtakers
    # Offtakers share the scenario's Z, so the 8 scenarios are the effective sample: a loose
    # bound by the between-scenario spread of the per-scenario frequencies.
    per_scenario = np.mean(tau <= grid.periods, axis=1)
    bound = 4 * per_scenario.std(ddof=1) / np.sqrt(len(scenarios)) + 4 / np.sqrt(n_draws)
    assert abs(frequency - expected) <= bound


def test_offtaker_uniforms_are_stream_two():
    """docs/spec.md §8: key (seed, 2), counter (scenario, offtaker index), the 24-bit u."""
    u = offtaker_uniforms_np(SEED, [3, 70_000], 4)
    x0, _ = threefry2x32_np(
        SEED, 2, np.array([[3], [70_000]], np.uint32), np.arange(4, dtype=np.uint32)
    )
    assert STREAM_OFFTAKERS == 2
    np.testing.assert_array_equal(u, uniform_from_bits(x0, np.float64))


# --------------------------------------------------------------------------- JAX


COUNT = 64


def _jax_blocks(loans, dtype):
    from gpucredit.kernels import jax_engine

    return jax_engine.prepare_loans(loans, dtype, 64)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-9), ("float32", 1e-4)])
def test_jax_matches_reference_per_scenario_and_loan(
    assumptions, offtaker_loans, mode, dtype, rtol
):
    """Per scenario and loan, the reference's loss (float64 1e-9, float32 1e-4 relative, with
    an absolute floor of rtol × the mean loss), on a book whose offtakers do default."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine

    grid = assumptions.grid(mode)
    blocks = _jax_blocks(offtaker_loans, getattr(jnp, dtype))
    expected = ref.simulate_chunk(assumptions.params, grid, offtaker_loans, SEED, SCENARIOS)
    per_loan = np.asarray(
        jax_engine.loan_losses_at(assumptions.params, grid, blocks, SEED, SCENARIOS), np.float64
    )
    floor = rtol * max(float(np.mean(np.abs(expected))), 1.0)
    np.testing.assert_allclose(per_loan, expected, rtol=rtol, atol=floor)
    chunk = np.asarray(jax_engine.chunk_losses(assumptions.params, grid, blocks, SEED, 0, COUNT))
    np.testing.assert_allclose(chunk, expected.sum(axis=1), rtol=rtol, atol=floor * 40)
    # the offtakers matter here: without their defaults the losses differ
    safe = offtaker_loans._replace(offtaker_pd_annual=np.zeros(3))
    without = ref.simulate_chunk(assumptions.params, grid, safe, SEED, SCENARIOS)
    assert not np.allclose(without.sum(axis=1), expected.sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_jax_chunk_invariance_with_offtakers(assumptions, offtaker_loans, mode):
    """Each scenario's offtaker events come from its own index: chunks at any offset agree."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine

    grid = assumptions.grid(mode)
    blocks = _jax_blocks(offtaker_loans, jnp.float64)
    params = assumptions.params
    whole = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, 0, COUNT))
    offset = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, 17, COUNT))
    np.testing.assert_array_equal(offset[: COUNT - 17], whole[17:])
    at = np.asarray(jax_engine.losses_at(params, grid, blocks, SEED, [40, 3, 17]))
    np.testing.assert_allclose(at, whole[[40, 3, 17]], rtol=1e-13)


def test_jax_gradient_holds_offtaker_defaults_fixed(assumptions, offtaker_loans):
    """AD = central finite differences with common random numbers for continuous parameters
    (the offtakers' τ_j are fixed by the scenario: the bumps below do not move them), and
    ∂/∂ρ_o is zero: the default periods are held fixed (docs/spec.md §4a)."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine
    from gpucredit.portfolio.assumptions import bumped_parameter

    grid = assumptions.grid()
    blocks = _jax_blocks(offtaker_loans, jnp.float64)
    params = assumptions.params
    scenarios = np.arange(48) * 3 + 1
    coefficients = np.full(len(scenarios), 1.0 / len(scenarios))

    def weighted(p):
        losses = jax_engine.losses_at(p, grid, blocks, SEED, scenarios)
        return float(np.sum(coefficients * np.asarray(losses, np.float64)))

    value, grads = jax_engine.weighted_loss_gradient(
        params, grid, blocks, SEED, scenarios, coefficients
    )
    np.testing.assert_allclose(float(value), weighted(params), rtol=1e-12)
    assert float(grads.offtaker_correlation) == 0.0
    cases = [("rent_drift", (1,)), ("beta_liquidity", ()), ("depreciation", (3,))]
    for name, index in cases:
        base = float(np.asarray(getattr(params, name))[index])
        step = 1e-5 * max(abs(base), 1e-2)
        up = weighted(bumped_parameter(params, name, index, step))
        down = weighted(bumped_parameter(params, name, index, -step))
        analytic = np.asarray(getattr(grads, name))[index]
        np.testing.assert_allclose(analytic, (up - down) / (2 * step), rtol=1e-4, err_msg=name)


# --------------------------------------------------------------------------- concentration


def test_regenerated_default_events_are_the_runs(assumptions, offtaker_loans):
    """portfolio.offtakers regenerates each scenario's offtaker events from the run's random
    numbers: where none defaults within the horizon the loss is the loss with no offtaker
    risk at all, scenario by scenario (where one does, it may or may not be: a contract that
    has ended or a coverage at its cap does not feel the default)."""
    from gpucredit.portfolio.offtakers import offtaker_events_of_run

    grid = assumptions.grid()
    scenarios = np.arange(64)
    tau, _ = offtaker_events_of_run(assumptions.params, grid, offtaker_loans, SEED, 64)
    hit = tau <= grid.periods
    with_risk = ref.simulate_chunk(assumptions.params, grid, offtaker_loans, SEED, scenarios)
    safe = offtaker_loans._replace(offtaker_pd_annual=np.zeros(3))
    without = ref.simulate_chunk(assumptions.params, grid, safe, SEED, scenarios)
    none = ~hit.any(axis=1)
    assert none.any() and (~none).any()
    np.testing.assert_allclose(with_risk[none], without[none], rtol=1e-12)
    assert np.any(with_risk[~none].sum(axis=1) != without[~none].sum(axis=1))


def test_concentration_in_the_run_summary(assumptions):
    """summary.json's "offtakers": per offtaker its contracted revenue and exposure, its
    default frequency against its PD, its loans' EL and ES, and the book's EL given its
    default against not; None for a book naming none."""
    import json

    from gpucredit.portfolio.engine import simulate

    book = offtaker_book()
    result = simulate(
        book, assumptions, scenarios=1024, seed=SEED, backend="numpy", alphas=(0.99,),
        sensitivities=False, calibration=False, loss_by_period=False,
    )  # fmt: skip
    rows = result.summary()["offtakers"]
    json.dumps(rows, allow_nan=False)
    assert tuple(r["offtaker"] for r in rows) == book.offtaker_index()[1]
    by_name = {r["offtaker"]: r for r in rows}
    lab_c = by_name["Lab C"]  # PD 0.6: it defaults in most scenarios
    for row in rows:  # period 1 is exactly Vasicek: frequency = p^Δ within its error
        assert row["period_one_pd"] == pytest.approx(1 - (1 - row["pd_annual"]) ** 0.25)
        gap = abs(row["period_one_default_frequency"] - row["period_one_pd"])
        assert gap <= 4 * row["period_one_default_frequency_se"] + 1e-12
    assert lab_c["default_frequency"] > 0.5
    assert lab_c["el_given_default_usd"] > lab_c["el_given_no_default_usd"]
    assert lab_c["el_given_default_se_usd"] > 0
    for row in rows:  # the two groups split the run's scenarios: they mix back to its EL
        f = row["default_frequency"]
        given = row["el_given_default_usd"] or 0.0  # None: it never defaulted in the run
        mixed = f * given + (1 - f) * row["el_given_no_default_usd"]
        assert mixed == pytest.approx(result.el, rel=1e-9)
        assert row["scenarios"] == 1024
    total_el = sum(r["loans_el_usd"] for r in rows)
    assert 0 < total_el <= result.el + 1e-6
    assert all(r["contracted_revenue_usd_per_year"] >= 0 for r in rows)
    plain = simulate(
        random_book_without_offtakers(), assumptions, scenarios=256, seed=SEED, backend="numpy",
        contributions=False, sensitivities=False, calibration=False, loss_by_period=False,
    )  # fmt: skip
    assert plain.summary()["offtakers"] is None


def random_book_without_offtakers():
    from conftest import random_book

    return random_book(7, 40)


def test_validation_pack_offtaker_checks_pass_on_the_example_book(assumptions):
    """Issue 21 item 5: each example-book offtaker's period-1 default frequency against p^Δ,
    and the offtaker Vasicek limit with ρ_o, in the calibration group of validate-model."""
    from gpucredit.io.book import example_book_path, read_book
    from gpucredit.portfolio.validation import offtaker_checks, validation_settings

    book = read_book(example_book_path(), assumptions)
    checks = offtaker_checks(assumptions, validation_settings(True, 0), book)
    names = book.offtaker_index()[1]
    assert len(checks) == len(names) + 8
    assert all(c.passed for c in checks), [c.name for c in checks if not c.passed]
    assert (
        offtaker_checks(assumptions, validation_settings(True, 0), random_book_without_offtakers())
        == []
    )
