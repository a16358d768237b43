"""Pathwise sensitivities (docs/spec.md §7) against central finite differences on common random
numbers.

The run's forward pass fixes the tail set and its coefficients c_j (`risk.tail_coefficients`);
then, for a parameter θ,

    ∂ES_α/∂θ ≈ [Σ_j c_j L_j(θ + h) − Σ_j c_j L_j(θ − h)] / 2h,     ∂EL/∂θ ≈ the same, c_j = 1/S,

with L_j from `jax_engine.losses_at` in float64 on the same seed, scenario indices and
LoanBlocks. `ModelParams` is bumped (`_replace`); for `rate.level` the book's balance schedules
are rebuilt too (a floating annuity's instalment uses r(0), docs/spec.md §3), as a run with another
rate level would: the AD gradient adds that path through `jax_engine.schedule_tangent`. The
PD references are the base run's in every bumped evaluation (docs/spec.md §4: sensitivities
hold them fixed), as the AD gradient treats them as constants.

The finite-difference error is estimated by comparing steps h and h/2; the tolerance is the
larger of 1e-5 relative, four times that estimate and a floor from float64 rounding of the
bumped sums. (On the reference machine AD and FD agree to ~1e-8 relative or better.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_book
from gpucredit.kernels import jax_engine
from gpucredit.portfolio.assumptions import (
    bumped_parameter,
    parameter_paths,
    parameter_value,
    with_overrides,
)
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import alpha_key, tail_coefficients
from gpucredit.portfolio.sensitivities import SMALL_MOVE, Sensitivities, parameter_moves

SEED = 5
SCENARIOS = 2048
CHUNK = 1024
ALPHAS = (0.99, 0.999)
EL_SCENARIOS = 256  # one gradient chunk; ∂EL averages over scenarios 0..255
PAD = 256  # the FD index vectors are padded to this (one compiled shape of losses_at)
BOOK = random_book(7, 40)

# Every generation's depreciation, correlation entries of each kind, launch jumps, the
# credit-metric and fire-sale parameters, crypto and rate parameters.
SAMPLE = (
    "generations.A100.depreciation",
    "generations.H100.depreciation",
    "generations.H200.depreciation",
    "generations.B200.depreciation",
    "correlation.rent:H100~price:H100",
    "correlation.btc~credit",
    "correlation.price:A100~price:B200",
    "launches.next-gen.price_jump.H100",
    "launches.next-gen.rent_jump.B200",
    "model.beta_liquidity",
    "model.beta_collateral",
    "model.haircut_slope",
    "model.refi_ltv",
    "crypto.btc.vol",
    "rate.vol",
    # Through the factor paths, the floating coupons and the schedules; the PD references
    # stay the base run's (docs/spec.md §4).
    "rate.level",
    # model v2: the credit cycle's persistence, miners' hashprice trend, the financed fleet
    "credit.persistence",
    "crypto.btc.hashprice_drift",
    "generations.H100.financed_fleet_gpus",
    "generations.A100.financed_fleet_gpus",
)


@pytest.fixture(scope="module")
def run(assumptions):
    """The public path: a float64 JAX run with contributions off and sensitivities on."""
    return simulate(
        BOOK,
        assumptions,
        scenarios=SCENARIOS,
        seed=SEED,
        backend="jax",
        precision="float64",
        chunk_size=CHUNK,
        alphas=ALPHAS,
        contributions=False,
        sensitivities=True,
        el_sensitivity_scenarios=EL_SCENARIOS,
    )


@pytest.fixture(scope="module")
def blocks(assumptions):
    # 40 loans -> one block of 64, the shape the run's JaxBackend uses too.
    return jax_engine.prepare_loans(loan_arrays(BOOK, assumptions), jnp.float64, 64)


@pytest.fixture(scope="module")
def tail_sets(run):
    """Per α key, the run's tail (indices, coefficients), padded to PAD with coefficient 0;
    plus the ∂EL set (the first EL_SCENARIOS scenarios, 1/S each)."""
    sets = {}
    for alpha in ALPHAS:
        idx, coef = tail_coefficients(run.losses_usd, None, alpha)
        assert len(idx) <= PAD
        pad = PAD - len(idx)
        sets[alpha_key(alpha)] = (
            np.concatenate([idx, np.full(pad, idx[0])]).astype(np.uint32),
            np.concatenate([coef, np.zeros(pad)]),
        )
    sets["el"] = (np.arange(EL_SCENARIOS, dtype=np.uint32), np.full(EL_SCENARIOS, 1 / EL_SCENARIOS))
    return sets


def _field_index(assumptions, path):
    for name, field, index in parameter_paths(assumptions):
        if name == path:
            return field, index
    raise KeyError(path)


def _weighted(params, assumptions, blocks, indices, coefficients):
    losses = jax_engine.losses_at(params, assumptions.grid(), blocks, SEED, indices)
    return float(np.asarray(losses, np.float64) @ coefficients)


def _blocks_at(assumptions, blocks, params):
    """The book's blocks for bumped params: rebuilt when r(0), which the schedules use, moved."""
    if params.rate_level == assumptions.params.rate_level:
        return blocks
    moved = with_overrides(assumptions, {"rate": {"level": float(params.rate_level)}})
    return jax_engine.prepare_loans(loan_arrays(BOOK, moved, base=assumptions), jnp.float64, 64)


def _central_difference(assumptions, blocks, sets, field, index, h):
    """{set key: (Σ c L(θ+h) − Σ c L(θ−h)) / 2h} for every index set."""
    up = bumped_parameter(assumptions.params, field, index, h)
    down = bumped_parameter(assumptions.params, field, index, -h)
    blocks_up, blocks_down = (_blocks_at(assumptions, blocks, p) for p in (up, down))
    return {
        key: (
            _weighted(up, assumptions, blocks_up, idx, coef)
            - _weighted(down, assumptions, blocks_down, idx, coef)
        )
        / (2 * h)
        for key, (idx, coef) in sets.items()
    }


def _analytic(sens: Sensitivities, path: str) -> dict[str, float]:
    row = sens.parameter.index(path)
    out = {"el": float(sens.d_expected_loss[row])}
    out |= {key: float(v[row]) for key, v in sens.d_expected_shortfall.items()}
    return out


# --------------------------------------------------------------------------- the public path


def test_every_parameter_is_present_and_finite(run, assumptions):
    sens = run.sensitivities
    assert isinstance(sens, Sensitivities)
    paths = parameter_paths(assumptions)
    assert sens.parameter == tuple(p for p, _, _ in paths)
    assert len(set(sens.parameter)) == len(sens.parameter)
    G, E, K = len(assumptions.generations), len(assumptions.launch_names), 2 * 4 + 5
    assert len(paths) == 10 * G + 2 * E * G + 21 + K * (K - 1) // 2
    np.testing.assert_array_equal(
        sens.value, [parameter_value(assumptions.params, f, i) for _, f, i in paths]
    )
    assert sens.d_expected_loss.shape == (len(paths),)
    assert np.all(np.isfinite(sens.d_expected_loss))
    assert set(sens.d_expected_shortfall) == {alpha_key(a) for a in ALPHAS}
    for values in sens.d_expected_shortfall.values():
        assert values.shape == (len(paths),)
        assert np.all(np.isfinite(values))
    assert sens.el_scenarios == EL_SCENARIOS
    assert run.metadata["el_sensitivity_scenarios"] == EL_SCENARIOS
    # Signs a lender expects: faster depreciation and a steeper fire sale cost money.
    for g in assumptions.generations:
        row = sens.parameter.index(f"generations.{g}.depreciation")
        assert sens.d_expected_loss[row] > 0
    assert sens.d_expected_shortfall["0.99"][sens.parameter.index("model.haircut_slope")] > 0
    # a larger financed fleet sells more into the same market; more persistent bad years
    # widen the tail
    for g in assumptions.generations:
        row = sens.parameter.index(f"generations.{g}.financed_fleet_gpus")
        assert sens.d_expected_loss[row] >= 0
    assert sens.d_expected_shortfall["0.99"][sens.parameter.index("credit.persistence")] > 0
    cols = sens.columns()
    assert {"parameter", "value", "d_el_usd", "d_es_99_usd", "d_es_99_9_usd"} <= set(cols)
    largest = sens.largest(0.99, 5)
    assert len(largest) == 5 and all(p in sens.parameter for p, *_ in largest)


def test_moves_are_100_percent_of_the_value_or_0_1_absolute():
    """One rule for the CLI's table and the report's tornado (they disagreed in sign for
    negative parameters before: |θ| in one, θ in the other)."""
    moves, small = parameter_moves(
        ["generations.H100.rent_drift", "model.beta_liquidity", "correlation.btc~eth", "x.y"],
        [-0.3, 1.5, 0.6, 0.0],
    )
    np.testing.assert_array_equal(moves, [-0.3, 1.5, SMALL_MOVE, SMALL_MOVE])
    np.testing.assert_array_equal(small, [False, False, True, True])


def test_tail_regenerated_by_index_matches_the_forward_pass(run, assumptions, blocks, tail_sets):
    """losses_at on the run's tail indices reproduces pass 1's losses (common random numbers),
    so Σ c_j L_j at θ is the run's ES."""
    for alpha in ALPHAS:
        idx, coef = tail_sets[alpha_key(alpha)]
        again = np.asarray(
            jax_engine.losses_at(assumptions.params, assumptions.grid(), blocks, SEED, idx)
        )
        np.testing.assert_allclose(again, run.losses_usd[idx], rtol=1e-12)
        np.testing.assert_allclose(again @ coef, run.es(alpha), rtol=1e-12)


@pytest.mark.parametrize("path", SAMPLE)
def test_sensitivity_matches_central_difference(path, run, assumptions, blocks, tail_sets):
    field, index = _field_index(assumptions, path)
    theta = parameter_value(assumptions.params, field, index)
    h = 1e-5 * max(abs(theta), 0.1)
    fd = _central_difference(assumptions, blocks, tail_sets, field, index, h)
    fd_half = _central_difference(assumptions, blocks, tail_sets, field, index, h / 2)
    analytic = _analytic(run.sensitivities, path)
    base = {"el": float(run.losses_usd[:EL_SCENARIOS].mean())}
    base |= {alpha_key(a): run.es(a) for a in ALPHAS}
    for key in tail_sets:
        # Rounding of the two bumped sums (~1e-16 relative each, with a wide margin for the
        # cancellation), and the truncation error estimated from the two step sizes.
        floor = 1e-12 * base[key] / h
        fd_error = abs(fd[key] - fd_half[key])
        tol = max(1e-5 * abs(fd_half[key]), 4 * fd_error, floor)
        assert abs(analytic[key] - fd_half[key]) <= tol, (
            f"{path} [{key}]: AD {analytic[key]:.9g}, FD {fd_half[key]:.9g} "
            f"(h: {fd[key]:.9g}), tol {tol:.3g}"
        )
        # The error estimate must not make the check vacuous: the FD is well resolved.
        assert fd_error <= 1e-3 * abs(fd_half[key]) + floor, (path, key, fd[key], fd_half[key])


def test_direct_gradient_matches_the_run(run, assumptions, blocks, tail_sets):
    """weighted_loss_gradient on the padded tail set gives the run's ∂ES (padding is inert)."""
    from gpucredit.portfolio.sensitivities import gradient_by_path

    sens = run.sensitivities
    tangent = jax_engine.schedule_tangent(
        loan_arrays(BOOK, assumptions), float(assumptions.params.rate_level),
        assumptions.steps_per_year, 64,
    )  # fmt: skip
    for alpha in ALPHAS:
        key = alpha_key(alpha)
        idx, coef = tail_sets[key]
        value, grads = jax_engine.weighted_loss_gradient(
            assumptions.params, assumptions.grid(), blocks, SEED, idx, coef,
            schedule_rate_tangent=tangent,
        )  # fmt: skip
        np.testing.assert_allclose(float(value), run.es(alpha), rtol=1e-12)
        names, flat = gradient_by_path(assumptions, grads)
        assert names == sens.parameter
        scale = np.abs(sens.d_expected_shortfall[key]).max()
        np.testing.assert_allclose(
            flat, sens.d_expected_shortfall[key], rtol=1e-9, atol=1e-12 * scale
        )


def test_numpy_run_gets_float64_sensitivities(run, assumptions):
    """The NumPy reference run (float64) differentiates in float64 too, whatever the
    `precision` argument (float32 by default) says: its sensitivities are the JAX float64
    run's (same losses, so the same tail set)."""
    ref = simulate(
        BOOK,
        assumptions,
        scenarios=SCENARIOS,
        seed=SEED,
        backend="numpy",
        chunk_size=CHUNK,
        alphas=ALPHAS,
        contributions=False,
        sensitivities=True,
        el_sensitivity_scenarios=EL_SCENARIOS,
    )
    for alpha in ALPHAS:
        np.testing.assert_array_equal(
            tail_coefficients(ref.losses_usd, None, alpha)[0],
            tail_coefficients(run.losses_usd, None, alpha)[0],
        )
    got, want = ref.sensitivities, run.sensitivities
    scale = np.abs(want.d_expected_loss).max()
    np.testing.assert_allclose(
        got.d_expected_loss, want.d_expected_loss, rtol=1e-9, atol=1e-12 * scale
    )
    for key, values in want.d_expected_shortfall.items():
        scale = np.abs(values).max()
        np.testing.assert_allclose(
            got.d_expected_shortfall[key], values, rtol=1e-9, atol=1e-12 * scale
        )
