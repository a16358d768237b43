"""Importance sampling (issue 9): the shifted systematic normals and their likelihood ratios
agree across backends, the estimators are unbiased, contributions still add up."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_book
from gpucredit.kernels import jax_engine, reference
from gpucredit.kernels.rng import shock_normals_np
from gpucredit.portfolio.engine import importance_shift, simulate
from gpucredit.portfolio.risk import risk_measures, var_es

BOOK = random_book(3, 40)


@pytest.fixture(scope="module")
def shift(assumptions):
    mu, point = importance_shift(BOOK, assumptions, seed=0, pilot_scenarios=4096)
    assert point.converged
    return mu


def test_likelihood_ratios_are_exp_of_minus_mu_z(assumptions, shift):
    grid = assumptions.grid()
    scenarios = np.arange(100, 164)
    z = shock_normals_np(5, scenarios, grid.periods, grid.slots_per_period)[..., : grid.n_factors]
    expected = -np.einsum("stk,tk->s", z, shift) - 0.5 * np.sum(shift**2)
    got = np.asarray(jax_engine.importance_log_weights(grid, 5, 100, 64, shift))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    _, reference_log_w = reference.shift_normals(
        shock_normals_np(5, scenarios, grid.periods, grid.slots_per_period), shift, grid.n_factors
    )
    np.testing.assert_allclose(reference_log_w, expected, rtol=1e-12, atol=1e-12)
    # E[w] = 1 under the shifted measure: the mean of w over shifted draws is 1 within its SE.
    many = np.asarray(jax_engine.importance_log_weights(grid, 5, 0, 200_000, shift))
    w = np.exp(many)
    assert abs(w.mean() - 1) < 5 * w.std() / np.sqrt(w.size)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_jax_float64_matches_the_reference_with_a_shift(assumptions, shift, mode):
    kwargs = dict(scenarios=256, mode=mode, normal_shift=shift, sensitivities=False)
    ref = simulate(BOOK, assumptions, backend="numpy", **kwargs)
    jx = simulate(BOOK, assumptions, backend="jax", precision="float64", **kwargs)
    np.testing.assert_allclose(jx.losses_usd, ref.losses_usd, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(jx.weights, ref.weights, rtol=1e-9)
    np.testing.assert_allclose(
        jx.contributions.expected_loss_usd, ref.contributions.expected_loss_usd, rtol=1e-8
    )
    for key, es_i in jx.contributions.expected_shortfall_usd.items():
        np.testing.assert_allclose(es_i, ref.contributions.expected_shortfall_usd[key], rtol=1e-8)


def test_contributions_add_up_and_metadata_says_which_estimator(assumptions, shift):
    run = simulate(BOOK, assumptions, scenarios=2048, normal_shift=shift, sensitivities=False)
    for alpha in (0.99, 0.999):
        es_i = run.contributions.expected_shortfall_usd[repr(alpha)]
        assert es_i.sum() == pytest.approx(run.es(alpha), rel=1e-6)
    assert run.contributions.expected_loss_usd.sum() == pytest.approx(run.measures.el, rel=1e-6)
    assert run.metadata["estimator"].startswith("importance sampling")
    assert 0 < run.metadata["effective_sample_size"] < 2048


def test_importance_sampling_is_unbiased_and_sharper_in_the_tail(assumptions, shift):
    """IS estimates lie within their intervals of a large plain run (4 combined SE), and the
    ES_99.9 standard error per scenario is far smaller."""
    plain = simulate(BOOK, assumptions, scenarios=65_536, seed=1, sensitivities=False,
                     contributions=False)  # fmt: skip
    sampled = simulate(BOOK, assumptions, scenarios=8192, seed=2, normal_shift=shift,
                       sensitivities=False, contributions=False)  # fmt: skip
    p, q = plain.measures, sampled.measures
    for name, a, b in (
        ("EL", (p.el, p.el_se), (q.el, q.el_se)),
        ("VaR 99%", (p.var(0.99), p.at(0.99).var_se), (q.var(0.99), q.at(0.99).var_se)),
        ("ES 99.9%", (p.es(0.999), p.at(0.999).es_se), (q.es(0.999), q.at(0.999).es_se)),
    ):
        assert abs(a[0] - b[0]) <= 4 * np.hypot(a[1], b[1]), (name, a, b)
    per_scenario_variance = lambda m, s: (m.at(0.999).es_se ** 2) * s  # noqa: E731
    assert per_scenario_variance(q, 8192) * 10 < per_scenario_variance(p, 65_536)


def test_tail_mass_is_counted_from_the_top_with_likelihood_ratios():
    """p = w / S: VaR is the smallest loss with Σ_{L>VaR} w / S <= 1 − α even when Σ w != S."""
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    weights = np.array([10.0, 0.1, 0.1, 0.1])  # Σw = 10.3, S = 4: p = 2.5, .025, .025, .025
    var, es = var_es(losses, weights, 0.95, likelihood_ratios=True)
    # P(L > 3) = 0.025 <= 0.05 and P(L > 2) = 0.05 <= 0.05: VaR = 2; ES = (0.025·3 + 0.025·4)/0.05
    assert var == 2.0
    assert es == pytest.approx((0.025 * 3 + 0.025 * 4) / 0.05)
    self_normalised = var_es(losses, weights, 0.95)[0]
    assert self_normalised == 1.0  # w/Σw puts 97% of the mass on the first loss
    m = risk_measures(np.tile(losses, 8), np.tile(weights, 8), (0.95,), likelihood_ratios=True)
    assert m.el == pytest.approx(np.mean(weights * losses))


def test_el_statistics_with_likelihood_ratios():
    """EL = mean(w L) with SE std(w L)/√S; std is the loss's under the original measure."""
    rng = np.random.default_rng(4)
    losses = rng.lognormal(size=4096)
    weights = rng.exponential(size=4096)  # mean 1, like likelihood ratios
    m = risk_measures(losses, weights, (0.99,), likelihood_ratios=True)
    assert m.el == pytest.approx(np.mean(weights * losses))
    assert m.el_se_iid == pytest.approx(np.std(weights * losses, ddof=1) / np.sqrt(4096))
    second_moment = np.mean(weights * losses**2)
    assert m.std == pytest.approx(np.sqrt(second_moment - m.el**2))
    ones = risk_measures(losses, np.ones(4096), (0.99,), likelihood_ratios=True)
    plain = risk_measures(losses, None, (0.99,))
    assert ones.el == pytest.approx(plain.el) and ones.std == pytest.approx(plain.std)
    assert ones.var(0.99) == plain.var(0.99) and ones.es(0.99) == pytest.approx(plain.es(0.99))


def test_sampled_mode_runs_skip_sensitivities_and_say_so(assumptions):
    run = simulate(BOOK, assumptions, scenarios=256, mode="sampled", contributions=False)
    assert run.sensitivities is None
    assert "not computed in sampled mode" in run.metadata["sensitivities_of"]
