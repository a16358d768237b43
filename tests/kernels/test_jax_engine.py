"""The JAX engine against the NumPy reference, scenario by scenario, on the same random numbers.

Books are kept between 33 and 64 loans so that they pad to one block of 64: every test then
shares a handful of compilations (the suite stays well under a minute on two CPU cores).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.kernels import jax_engine, reference
from gpucredit.kernels.jax_args import _statics
from gpucredit.kernels.jax_backward import _loss_gradient
from gpucredit.kernels.jax_factors import _shifted
from gpucredit.kernels.jax_forward import _simulate
from gpucredit.kernels.jax_loans import _loan_terms
from gpucredit.kernels.params import ModelParams
from gpucredit.kernels.rng import shock_normals_jax_at, shock_normals_np
from gpucredit.portfolio.assumptions import bumped_parameter, with_overrides
from gpucredit.portfolio.loans import loan_arrays

SEED = 11
COUNT = 128  # scenarios per chunk in most tests
BLOCK = 64


def _blocks(loans, dtype, block_size=BLOCK):
    return jax_engine.prepare_loans(loans, dtype, block_size)


def _reference_losses(assumptions, grid, loans, scenarios, seed=SEED):
    return reference.simulate_chunk(assumptions.params, grid, loans, seed, scenarios)  # [S, N]


def _assert_close(actual, expected, rtol):
    """Per scenario, relative to the loss, with an absolute floor of rtol × the mean loss."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    floor = rtol * max(float(np.mean(np.abs(expected))), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=floor)


# --------------------------------------------------------------------------- factor paths


@pytest.mark.parametrize("copula", ["gaussian", "t"])
def test_factor_paths_match_reference(assumptions, copula):
    grid = assumptions.grid()._replace(copula=copula)
    normals = shock_normals_np(SEED, np.arange(32), grid.periods, grid.slots_per_period)
    expected = reference.factor_paths(
        assumptions.params, grid, reference.correlated_shocks(assumptions.params, grid, normals)
    )
    actual = jax_engine.factor_paths_jax(assumptions.params, grid, jnp.asarray(normals))
    # t copula near y = 0: the reference rounds 1 − ν/(ν + y²); ours keeps it (see the docstring
    # of student_t_to_normal_jax), so a shock of 1e-3 may differ by ~1e-13.
    atol = 1e-14 if copula == "gaussian" else 1e-11
    for name, want, got in zip(expected._fields, expected, actual, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=atol, err_msg=name)


def test_student_t_transform_is_finite_and_odd_at_zero():
    y = jnp.asarray([-40.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 40.0])
    eps = np.asarray(jax_engine.student_t_to_normal_jax(y, 5))
    np.testing.assert_allclose(eps, -eps[::-1], rtol=1e-14)
    np.testing.assert_allclose(eps, reference.student_t_to_normal(np.asarray(y), 5), rtol=1e-9)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    ("mode", "copula", "discount"),
    [
        ("conditional", "gaussian", False),
        ("conditional", "t", True),
        ("sampled", "gaussian", True),
        ("sampled", "t", False),
    ],
)
def test_float64_matches_reference(assumptions, loans, mode, copula, discount):
    grid = assumptions.grid(mode)._replace(copula=copula, discount=discount)
    expected = _reference_losses(assumptions, grid, loans, np.arange(COUNT)).sum(axis=1)
    actual = jax_engine.chunk_losses(
        assumptions.params, grid, _blocks(loans, jnp.float64), SEED, 0, COUNT
    )
    assert actual.dtype == jnp.float64
    _assert_close(actual, expected, 1e-9)
    if mode == "sampled":  # identical default events: a loss is 0 exactly where the reference's is
        np.testing.assert_array_equal(np.asarray(actual) == 0, expected == 0)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_one_period_grid_matches_reference(assumptions, mode):
    """One one-year period: the period step without its loop (x_1 and the events of period 1
    straight after each other), against the reference in float64."""
    import dataclasses

    from conftest import random_book

    one_year = dataclasses.replace(assumptions, horizon_years=1.0, steps_per_year=1)
    grid = one_year.grid(mode)
    assert grid.periods == 1
    loans = loan_arrays(random_book(7, 40), one_year)
    expected = _reference_losses(one_year, grid, loans, np.arange(COUNT)).sum(axis=1)
    actual = jax_engine.chunk_losses(
        one_year.params, grid, _blocks(loans, jnp.float64), SEED, 0, COUNT
    )
    assert expected.max() > 0
    _assert_close(actual, expected, 1e-9)


@pytest.mark.parametrize("copula", ["gaussian", "t"])
def test_float32_close_to_reference(assumptions, loans, copula):
    grid = assumptions.grid()._replace(copula=copula)
    expected = _reference_losses(assumptions, grid, loans, np.arange(COUNT)).sum(axis=1)
    actual = np.asarray(
        jax_engine.chunk_losses(
            assumptions.params, grid, _blocks(loans, jnp.float32), SEED, 0, COUNT
        )
    )
    assert actual.dtype == np.float32
    assert abs(actual.sum(dtype=np.float64) / expected.sum() - 1) < 1e-4
    big = expected > 1e-3 * expected.mean()
    np.testing.assert_allclose(actual[big], expected[big], rtol=1e-3)


def test_float32_sampled_defaults_match_reference(assumptions, loans):
    """Sampled mode in float32: the same default events as the float64 reference, loan by
    loan, and the same losses where they default. A default flips only where 1 − S_i(t) lies
    within float32 rounding (~1e-7) of U, so at most 0.1% of the loan-scenarios may differ."""
    grid = assumptions.grid("sampled")
    scenarios = np.arange(COUNT)
    expected = _reference_losses(assumptions, grid, loans, scenarios)  # [S, N]
    actual = np.asarray(
        jax_engine.loan_losses_at(
            assumptions.params, grid, _blocks(loans, jnp.float32), SEED, scenarios
        ),
        np.float64,
    )
    defaulted, expected_defaulted = actual > 0, expected > 0
    assert expected_defaulted.sum() > 50  # the book defaults: the check has something to check
    assert np.mean(defaulted != expected_defaulted) <= 1e-3
    both = defaulted & expected_defaulted
    # LGD = max(EAD − recovery, 0) cancels: a small loss carries float32 rounding of EAD and
    # recovery, about 1e-7 relative each over ~100 operations, so an absolute term too.
    np.testing.assert_allclose(actual[both], expected[both], rtol=1e-3, atol=1e-5 * expected.max())


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_loan_losses_match_reference_per_loan(assumptions, loans, mode):
    grid = assumptions.grid(mode)
    scenarios = np.array([3, 0, 517, 42, 99_999, 7, 7, 2**31 + 5])
    expected = _reference_losses(assumptions, grid, loans, scenarios)
    blocks = _blocks(loans, jnp.float64, block_size=16)  # several blocks, padding in the last
    per_loan = np.asarray(
        jax_engine.loan_losses_at(assumptions.params, grid, blocks, SEED, scenarios)
    )
    assert per_loan.shape == expected.shape
    np.testing.assert_allclose(per_loan, expected, rtol=1e-9, atol=1e-9 * expected.max())
    totals = jax_engine.losses_at(assumptions.params, grid, blocks, SEED, scenarios)
    _assert_close(totals, expected.sum(axis=1), 1e-9)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_chunk_outcomes_match_reference_per_loan_sums(assumptions, loans, mode):
    grid = assumptions.grid(mode)._replace(discount=True)
    expected = reference.simulate_outcomes(
        assumptions.params, grid, loans, SEED, np.arange(100, 100 + COUNT)
    )
    blocks = _blocks(loans, jnp.float64, block_size=16)
    losses, loss_sum, pd_sum, ead_sum = (
        np.asarray(x)
        for x in jax_engine.chunk_outcomes(assumptions.params, grid, blocks, SEED, 100, COUNT)
    )
    _assert_close(losses, expected.loss_usd.sum(axis=1), 1e-9)
    for actual, per_scenario in (
        (loss_sum, expected.loss_usd),
        (pd_sum, expected.default_probability),
        (ead_sum, expected.defaulted_exposure_usd),
    ):
        assert actual.shape == (loans.gpu_count.shape[0],)
        want = per_scenario.sum(axis=0)
        np.testing.assert_allclose(actual, want, rtol=1e-9, atol=1e-9 * want.max())


@settings(max_examples=8, deadline=None)
@given(
    book_seed=st.integers(0, 10_000),
    n_loans=st.integers(33, 64),
    mode=st.sampled_from(["conditional", "sampled"]),
    first=st.integers(0, 2**20),
)
def test_random_books_match_reference(book_seed, n_loans, mode, first):
    assumptions = default_assumptions()
    grid = assumptions.grid(mode)
    loans = loan_arrays(random_book(book_seed, n_loans), assumptions)
    expected = _reference_losses(assumptions, grid, loans, first + np.arange(COUNT)).sum(axis=1)
    actual = jax_engine.chunk_losses(
        assumptions.params, grid, _blocks(loans, jnp.float64), SEED, first, COUNT
    )
    _assert_close(actual, expected, 1e-9)


@pytest.mark.parametrize(
    "launches",
    [
        [],  # no launch
        [  # one launch strictly inside period 5, and one after the horizon
            {
                "name": "mid",
                "years_from_now": 1.1,
                "price_jump": {"A100": 0.3, "H100": 0.2, "B200": 0.05},
                "rent_jump": {"H100": 0.1, "H200": 0.2},
            },
            {"name": "late", "years_from_now": 7.0, "price_jump": {"H100": 0.5}},
        ],
    ],
    ids=["no-launch", "launch-in-period"],
)
def test_launch_variants_match_reference(assumptions, loans, launches):
    varied = with_overrides(assumptions, {"launches": launches})
    grid = varied.grid()
    expected = _reference_losses(varied, grid, loans, np.arange(COUNT)).sum(axis=1)
    actual = jax_engine.chunk_losses(
        varied.params, grid, _blocks(loans, jnp.float64), SEED, 0, COUNT
    )
    _assert_close(actual, expected, 1e-9)


# --------------------------------------------------------------------------- chunking, tracing


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(jnp.float64, "conditional"), (jnp.float32, "conditional"), (jnp.float32, "sampled")],
)
def test_chunk_invariance_and_no_retrace(assumptions, loans, dtype, mode):
    """Chunks of one compiled size give bit-identical losses whatever their offsets (sampled
    mode: each block draws its uniforms from the scenario indices); chunks of another size
    agree to rounding (on a GPU, XLA's reductions depend on the batch size)."""
    grid = assumptions.grid(mode)
    blocks = _blocks(loans, dtype)
    params = assumptions.params
    half = COUNT // 2
    whole = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, 0, COUNT))
    traces = jax_engine.TRACE_COUNTS["chunk_losses"]
    shifted = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, half, COUNT))
    offset = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, 17, COUNT))
    assert jax_engine.TRACE_COUNTS["chunk_losses"] == traces  # new chunks do not retrace
    np.testing.assert_array_equal(shifted[:half], whole[half:])
    np.testing.assert_array_equal(offset[: COUNT - 17], whole[17:])
    first_half = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, 0, half))
    second_half = np.asarray(jax_engine.chunk_losses(params, grid, blocks, SEED, half, half))
    rtol = 1e-13 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(np.concatenate([first_half, second_half]), whole, rtol=rtol)
    if dtype == jnp.float64:
        # Another program (explicit indices, another batch size): equal up to the rounding
        # of XLA's vectorised transcendental functions.
        scenarios = np.array([100, 3, 64, 0, 127, 1, 2, 5, 8, 13, 21, 34, 55, 89, 90, 91])
        at = np.asarray(jax_engine.losses_at(params, grid, blocks, SEED, scenarios))
        np.testing.assert_allclose(at, whole[scenarios], rtol=1e-13)


def test_new_seed_and_params_do_not_retrace(assumptions, loans):
    grid = assumptions.grid()
    blocks = _blocks(loans, jnp.float32)
    jax_engine.chunk_losses(assumptions.params, grid, blocks, SEED, 0, COUNT)
    traces = jax_engine.TRACE_COUNTS["chunk_losses"]
    bumped = assumptions.params._replace(
        beta_liquidity=2.0, depreciation=assumptions.params.depreciation * 1.1
    )
    jax_engine.chunk_losses(bumped, grid, blocks, SEED + 1, 5, COUNT)
    assert jax_engine.TRACE_COUNTS["chunk_losses"] == traces


def test_padding_is_inert(assumptions, loans):
    grid = assumptions.grid()
    one_block = jax_engine.losses_at(
        assumptions.params, grid, _blocks(loans, jnp.float64), SEED, np.arange(16)
    )
    blocks = jax_engine.prepare_loans(loans, jnp.float64, 7)  # 40 loans -> 6 blocks of 7, 2 pads
    assert blocks.sqrt_rho.shape == (6, 7)
    many_blocks = jax_engine.losses_at(assumptions.params, grid, blocks, SEED, np.arange(16))
    np.testing.assert_allclose(np.asarray(many_blocks), np.asarray(one_block), rtol=1e-12)


# --------------------------------------------------------------------------- gradients


def _weighted_loss(params, grid, blocks, scenarios, coefficients):
    losses = np.asarray(jax_engine.losses_at(params, grid, blocks, SEED, scenarios), np.float64)
    return float(np.sum(coefficients * losses))


def test_weighted_gradient_finite_and_matches_finite_differences(assumptions, loans):
    grid = assumptions.grid()
    blocks = _blocks(loans, jnp.float64)
    params = assumptions.params
    scenarios = np.arange(64) * 3 + 1
    coefficients = np.random.default_rng(0).uniform(0.5, 1.5, len(scenarios)) / len(scenarios)
    value, grads = jax_engine.weighted_loss_gradient(
        params, grid, blocks, SEED, scenarios, coefficients
    )
    for name, leaf in grads._asdict().items():
        assert np.all(np.isfinite(np.asarray(leaf))), name
        assert np.shape(leaf) == np.shape(getattr(params, name)), name
    np.testing.assert_allclose(
        float(value), _weighted_loss(params, grid, blocks, scenarios, coefficients), rtol=1e-12
    )
    # rent:H100 (1) with price:H100 (G + 1 = 5): Σ_15 and Σ_51 move together.
    cases = [("depreciation", (1,)), ("beta_liquidity", ()), ("correlation", (1, 5))]
    for name, index in cases:
        base = float(np.asarray(getattr(params, name))[index])
        step = 1e-5 * max(abs(base), 1e-2)
        up = _weighted_loss(
            bumped_parameter(params, name, index, step), grid, blocks, scenarios, coefficients
        )
        down = _weighted_loss(
            bumped_parameter(params, name, index, -step), grid, blocks, scenarios, coefficients
        )
        finite_difference = (up - down) / (2 * step)
        leaf = np.asarray(getattr(grads, name))
        analytic = leaf[index] + leaf[index[::-1]] if name == "correlation" else leaf[index]
        np.testing.assert_allclose(analytic, finite_difference, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    ("discount", "copula", "remat_steps", "shifted"),
    [(False, "gaussian", True, False), (True, "t", False, True)],
)
def test_one_sweep_gradient_is_the_autodiff_gradient(
    assumptions, loans, discount, copula, remat_steps, shifted
):
    """`_loss_gradient` (both passes differentiated in one sweep over the blocks, the
    haircut's cotangent from pass 2's recovery weights) against jax.grad of the loss, every
    parameter and every schedule leaf, over 3 blocks."""
    import jax

    grid = assumptions.grid()._replace(discount=discount, copula=copula)
    blocks = _statics(_blocks(loans, jnp.float64, block_size=16))
    params = ModelParams(*(jnp.asarray(x, jnp.float64) for x in assumptions.params))
    scenarios = jnp.asarray(np.arange(48, dtype=np.uint32) * 5 + 2)
    coefficients = jnp.asarray(np.random.default_rng(1).uniform(0.2, 2.0, 48))
    normals = shock_normals_jax_at(
        jnp.uint32(SEED), scenarios, grid.periods, grid.slots_per_period, jnp.float64
    )
    if shifted:
        shift = np.random.default_rng(2).normal(0, 0.5, (grid.periods, grid.n_factors))
        normals = _shifted(normals, shift, grid)

    def objective(theta, schedule):
        moved = blocks._replace(**schedule)
        losses = _simulate(theta, grid, moved, normals, None, "total")
        return jnp.sum(coefficients * losses)

    schedule = {k: getattr(blocks, k) for k in jax_engine.SCHEDULE_LEAVES}
    value, (grads, schedule_grads) = jax.value_and_grad(objective, argnums=(0, 1))(params, schedule)
    one_value, one_grads, one_schedule = _loss_gradient(
        params, grid, blocks, normals, coefficients, remat_steps
    )
    np.testing.assert_allclose(float(one_value), float(value), rtol=1e-13)
    for name in ModelParams._fields:
        expected = np.asarray(getattr(grads, name))
        actual = np.asarray(getattr(one_grads, name))
        scale = max(float(np.max(np.abs(expected))), 1e-300)
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * scale, err_msg=name)
    assert np.any(np.asarray(grads.haircut_slope) != 0)  # the haircut path is exercised
    for name in jax_engine.SCHEDULE_LEAVES:
        expected, actual = np.asarray(schedule_grads[name]), np.asarray(one_schedule[name])
        scale = max(float(np.max(np.abs(expected))), 1e-300)
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * scale, err_msg=name)


def test_schedule_terms_are_every_loan_term_the_schedules_move(assumptions, loans):
    """SCHEDULE_TERMS (the loan terms `_loss_gradient` differentiates for the schedules) is
    exactly the set of `_loan_terms` leaves that change when the schedule leaves do."""
    grid = assumptions.grid()
    blocks = _blocks(loans, jnp.float64)
    moved = blocks._replace(
        **{k: getattr(blocks, k) * 1.01 + 0.5 for k in jax_engine.SCHEDULE_LEAVES}
    )
    before = _loan_terms(blocks, grid, jnp.float64)
    after = _loan_terms(moved, grid, jnp.float64)
    changed = {
        name
        for name in before._fields
        if not np.array_equal(np.asarray(getattr(before, name)), np.asarray(getattr(after, name)))
    }
    assert changed == set(jax_engine.SCHEDULE_TERMS)


def test_gradient_ignores_sampled_mode(assumptions, loans):
    """The gradient is always the conditional-mode loss's (sampled losses are not smooth)."""
    blocks = _blocks(loans, jnp.float64)
    scenarios, coefficients = np.arange(64), np.full(64, 1 / 64)
    conditional = jax_engine.weighted_loss_gradient(
        assumptions.params, assumptions.grid(), blocks, SEED, scenarios, coefficients
    )
    traces = jax_engine.TRACE_COUNTS["weighted_loss_gradient"]
    sampled = jax_engine.weighted_loss_gradient(
        assumptions.params, assumptions.grid("sampled"), blocks, SEED, scenarios, coefficients
    )
    assert jax_engine.TRACE_COUNTS["weighted_loss_gradient"] == traces
    assert float(conditional[0]) == float(sampled[0])
    np.testing.assert_array_equal(
        np.asarray(conditional[1].correlation), np.asarray(sampled[1].correlation)
    )


def test_float32_runs_on_a_repaired_correlation_matrix(loans):
    """A repaired matrix's smallest eigenvalue (1e-8) is below float32 resolution: the
    Cholesky factor is taken in float64 and cast, so float32 losses stay finite and match
    float64 (found in review: every float32 loss was NaN)."""
    repaired = with_overrides(
        default_assumptions(),
        {"correlation": {"pairs": [{"a": "rent:H100", "b": "price:H100", "value": -0.9}]}},
        repair_correlation=True,
    )
    assert repaired.correlation_repair is not None
    grid = repaired.grid()
    out = {
        dtype: np.asarray(
            jax_engine.chunk_losses(repaired.params, grid, _blocks(loans, dtype), SEED, 0, COUNT),
            np.float64,
        )
        for dtype in (jnp.float32, jnp.float64)
    }
    assert np.all(np.isfinite(out[jnp.float32]))
    np.testing.assert_allclose(out[jnp.float32], out[jnp.float64], rtol=1e-3, atol=1.0)
