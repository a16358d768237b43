"""Euler contributions (docs/spec.md §7): EL_i = E[L_i] and ES_{α,i} = E[L_i | L >= VaR_α], from a
second pass over the tail scenarios only, regenerated from their indices.

The book (40 loans) pads to one JAX block of 64 and every JAX run uses 2048 scenarios in
chunks of 1024, so the compilations are shared with the other portfolio tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.backends import NumpyBackend
from gpucredit.portfolio.contributions import Contributions, tail_loan_contributions
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import alpha_key, alpha_label, tail_coefficients, var_es

SEED = 5
SCENARIOS = 2048
CHUNK = 1024
ALPHAS = (0.99, 0.999)
BOOK = random_book(7, 40)

_RUNS: dict = {}


def _run(backend: str, mode: str, precision: str = "float64"):
    """One cached run per (backend, mode, precision): contributions, no sensitivities."""
    key = (backend, mode, precision)
    if key not in _RUNS:
        _RUNS[key] = simulate(
            BOOK,
            default_assumptions(),
            scenarios=SCENARIOS,
            seed=SEED,
            mode=mode,
            backend=backend,
            precision=precision,
            chunk_size=CHUNK,
            alphas=ALPHAS,
            sensitivities=False,
        )
    return _RUNS[key]


RUNS = [
    ("numpy", "conditional", "float64"),
    ("numpy", "sampled", "float64"),
    ("jax", "conditional", "float64"),
    ("jax", "sampled", "float64"),
    ("jax", "conditional", "float32"),
]


# --------------------------------------------------------------------------- additivity


@pytest.mark.parametrize(("backend", "mode", "precision"), RUNS)
def test_contributions_add_up_to_el_and_es(backend, mode, precision):
    result = _run(backend, mode, precision)
    c = result.contributions
    assert isinstance(c, Contributions)
    # Σ_i EL_i = EL: both are the same sums of the same per-loan float64 (or float32) losses.
    el_rtol = 1e-9 if precision == "float64" else 1e-6
    np.testing.assert_allclose(c.expected_loss_usd.sum(), result.measures.el, rtol=el_rtol)
    for alpha in ALPHAS:
        es_i = c.expected_shortfall_usd[alpha_key(alpha)]
        assert es_i.shape == (len(BOOK),)
        assert np.all(es_i >= 0)
        np.testing.assert_allclose(es_i.sum(), result.es(alpha), rtol=1e-6)
        # ES_i is a conditional mean of L_i >= 0 over the tail, so it lies in [0, ES].
        assert np.all(es_i <= result.es(alpha) * (1 + 1e-9))


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_numpy_and_jax_contributions_agree(mode):
    """The same model on the same random numbers: per-loan contributions agree to rounding."""
    ref, jax = _run("numpy", mode), _run("jax", mode)
    np.testing.assert_allclose(jax.losses_usd, ref.losses_usd, rtol=1e-9, atol=1e-6)
    cr, cj = ref.contributions, jax.contributions
    scale = ref.measures.el
    np.testing.assert_allclose(cj.expected_loss_usd, cr.expected_loss_usd, atol=1e-9 * scale)
    np.testing.assert_allclose(cj.horizon_pd, cr.horizon_pd, atol=1e-12)
    for key in cr.expected_shortfall_usd:
        np.testing.assert_allclose(
            cj.expected_shortfall_usd[key],
            cr.expected_shortfall_usd[key],
            atol=1e-9 * ref.es(float(key)),
        )


@pytest.mark.parametrize(("backend", "mode", "precision"), RUNS)
def test_horizon_pd_and_mean_lgd_are_fractions(backend, mode, precision):
    c = _run(backend, mode, precision).contributions
    assert np.all((c.horizon_pd >= 0) & (c.horizon_pd <= 1))
    defined = np.isfinite(c.mean_lgd)
    tol = 1e-6 if precision == "float32" else 1e-12
    assert np.all((c.mean_lgd[defined] >= 0) & (c.mean_lgd[defined] <= 1 + tol))
    if mode == "conditional":
        # Every loan has a positive hazard in some period: its LGD is defined.
        assert defined.all()
        assert np.all(c.horizon_pd > 0)
    else:
        # Sampled: a loan that never defaults has no LGD, no PD and no loss.
        assert np.all(c.horizon_pd[~defined] == 0)
        assert np.all(c.expected_loss_usd[~defined] == 0)
        # Default indicators: the horizon PD is a multiple of 1/S.
        np.testing.assert_allclose(
            c.horizon_pd * SCENARIOS, np.round(c.horizon_pd * SCENARIOS), atol=1e-9
        )


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("column", ["borrower_id", "borrower_type", "gpu_generation"])
def test_aggregations_sum_to_totals(column):
    result = _run("numpy", "conditional")
    c = result.contributions
    groups = c.by(column)
    assert set(groups) == {str(x) for x in getattr(BOOK, column)}
    totals = {
        "expected_loss_usd": result.measures.el,
        "balance_usd": float(BOOK.balance_usd.sum()),
    } | {f"es_{alpha_label(a)}_usd": result.es(a) for a in ALPHAS}
    for field, total in totals.items():
        np.testing.assert_allclose(sum(g[field] for g in groups.values()), total, rtol=1e-9)
    # Each group is the sum over its own loans.
    members = getattr(c, column)
    for name, sums in groups.items():
        mask = members == name
        np.testing.assert_allclose(
            sums["expected_loss_usd"], c.expected_loss_usd[mask].sum(), rtol=1e-12
        )


def test_columns_are_flat_per_loan_arrays():
    c = _run("numpy", "conditional").contributions
    cols = c.columns()
    assert {"es_99_usd", "es_99_9_usd", "expected_loss_usd", "horizon_pd"} <= set(cols)
    assert all(len(v) == len(BOOK) for v in cols.values())


# --------------------------------------------------------------------------- the tail pass


def _numpy_backend(mode="conditional"):
    a = default_assumptions()
    return NumpyBackend(a.params, a.grid(mode), loan_arrays(BOOK, a), SEED)


@pytest.mark.parametrize("mode", ["conditional", "sampled"])
def test_es_contributions_do_not_depend_on_the_tail_chunk_size(mode):
    backend = _numpy_backend(mode)
    losses = _run("numpy", mode).losses_usd
    # 0.9 as well: a tail of ~205 scenarios, enough for several uneven chunks.
    alphas = (0.9, *ALPHAS)
    results = [
        tail_loan_contributions(backend, losses, None, alphas, len(BOOK), size)
        for size in (1, 7, 64, 1024)
    ]
    for other in results[1:]:
        for key, values in results[0].items():
            np.testing.assert_allclose(other[key], values, rtol=1e-12, atol=1e-6)
    for alpha in alphas:
        np.testing.assert_allclose(
            results[0][alpha_key(alpha)].sum(), var_es(losses, None, alpha)[1], rtol=1e-9
        )


def test_jax_es_contributions_do_not_depend_on_the_tail_chunk_size():
    """JAX float64: a tail of 21 scenarios in one call or in chunks of 16 (16 + 5)."""
    from gpucredit.portfolio.backends import JaxBackend

    a = default_assumptions()
    backend = JaxBackend(a.params, a.grid(), loan_arrays(BOOK, a), SEED, "float64")
    result = _run("jax", "conditional")
    split = tail_loan_contributions(
        backend, result.losses_usd, None, ALPHAS, len(BOOK), chunk_size=16
    )
    for key, values in result.contributions.expected_shortfall_usd.items():
        np.testing.assert_allclose(split[key], values, rtol=1e-12, atol=1e-6)


def test_tail_pass_only_visits_tail_scenarios(monkeypatch):
    """A spy on `loan_losses_at`: called with tail indices only, each at most once, in chunks,
    never with [all scenarios × loans]."""
    calls: list[np.ndarray] = []
    original = NumpyBackend.loan_losses_at

    def spy(self, scenarios):
        calls.append(np.asarray(scenarios).copy())
        return original(self, scenarios)

    monkeypatch.setattr(NumpyBackend, "loan_losses_at", spy)
    alphas = (0.9, 0.99)  # tail union ~205 scenarios: 4 chunks of 64
    scenarios = 2048
    a = default_assumptions()
    result = simulate(
        BOOK,
        a,
        scenarios=scenarios,
        seed=SEED,
        backend="numpy",
        chunk_size=CHUNK,
        alphas=alphas,
        sensitivities=False,
    )
    tail = np.unique(
        np.concatenate([tail_coefficients(result.losses_usd, None, al)[0] for al in alphas])
    )
    assert calls, "the tail pass never ran"
    seen = np.concatenate(calls)
    assert all(len(c) <= 1024 for c in calls)
    assert np.isin(seen, tail).all()
    assert len(seen) == len(np.unique(seen)) == len(tail)
    assert len(tail) < scenarios // 5

    # Directly, with a small chunk size: several calls, none larger than the chunk.
    calls.clear()
    backend = _numpy_backend()
    out = tail_loan_contributions(
        backend, result.losses_usd, None, alphas, len(BOOK), chunk_size=64
    )
    assert len(calls) == -(-len(tail) // 64)
    assert max(len(c) for c in calls) == 64
    np.testing.assert_array_equal(np.sort(np.concatenate(calls)), tail)
    for al in alphas:
        np.testing.assert_allclose(
            out[alpha_key(al)],
            result.contributions.expected_shortfall_usd[alpha_key(al)],
            rtol=1e-12,
            atol=1e-6,
        )


# --------------------------------------------------------------------------- ties at VaR


def _constructed(per_loan: np.ndarray):
    """A fake backend whose `loan_losses_at` reads a fixed [S, N] matrix, recording the
    indices asked."""
    asked: list[int] = []

    def loan_losses_at(indices):
        asked.extend(int(i) for i in indices)
        return per_loan[np.asarray(indices, dtype=np.int64)]

    return SimpleNamespace(loan_losses_at=loan_losses_at), asked


def test_ties_at_var_share_the_remaining_mass():
    """S = 200, α = 0.99: the tail holds 2 scenarios' mass. One scenario lies above VaR
    (L = 20) and four tie at VaR = 10, each splitting the loss differently over 3 loans: the
    one above gets coefficient 1/2, the four ties 1/8 each (docs/spec.md §7, Acerbi-Tasche)."""
    rng = np.random.default_rng(1)
    n_scen, n_loans = 200, 3
    per_loan = rng.dirichlet(np.ones(n_loans), n_scen) * rng.uniform(0, 5, (n_scen, 1))
    above, ties = 17, [3, 50, 120, 199]
    per_loan[above] = [20.0, 0.0, 0.0]
    per_loan[ties] = [[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [2.5, 2.5, 5.0]]
    losses = per_loan.sum(axis=1)
    assert np.sum(losses == 10.0) == 4  # exact ties
    var, es = var_es(losses, None, 0.99)
    assert var == 10.0
    np.testing.assert_allclose(es, 15.0, rtol=1e-12)
    backend, asked = _constructed(per_loan)
    out = tail_loan_contributions(backend, losses, None, (0.99,), n_loans)
    expected = 0.5 * per_loan[above] + 0.125 * per_loan[ties].sum(axis=0)
    np.testing.assert_allclose(out["0.99"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["0.99"].sum(), es, rtol=1e-12)
    assert sorted(asked) == sorted([above, *ties])


def test_ties_at_var_with_no_mass_above():
    """All of the tail mass on four tied scenarios: each gets 1/4."""
    per_loan = np.tile([[0.5, 0.5]], (100, 1))
    ties = [10, 20, 30, 40]
    per_loan[ties] = [[4.0, 0.0], [0.0, 4.0], [1.0, 3.0], [3.0, 1.0]]
    losses = per_loan.sum(axis=1)
    backend, _ = _constructed(per_loan)
    out = tail_loan_contributions(backend, losses, None, (0.99, 0.999), 2)
    for key in ("0.99", "0.999"):
        np.testing.assert_allclose(out[key], [2.0, 2.0], rtol=1e-12)


def test_ties_with_importance_weights():
    """Unequal weights (likelihood ratios, p = w / S): the remaining mass is split over the
    ties in proportion to them."""
    per_loan = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    weights = np.array([2.0, 1.5, 0.5, 0.5, 0.5])  # p = 0.4, 0.3, 0.1, 0.1, 0.1
    losses = per_loan.sum(axis=1)  # 1, 1, 2, 2, 2: three ties at the top
    backend, _ = _constructed(per_loan)
    out = tail_loan_contributions(backend, losses, weights, (0.8,), 2)
    # P(L = 2) = 0.3 >= 0.2: all the tail mass on the ties, 1/3 each (equal weights among them).
    np.testing.assert_allclose(out["0.8"], [2.0 / 3 + 1.0 / 3, 2.0 / 3 + 1.0 / 3], rtol=1e-12)
    es = var_es(losses, weights, 0.8, likelihood_ratios=True)[1]
    np.testing.assert_allclose(out["0.8"].sum(), es, rtol=1e-12)


def test_sampled_mode_with_var_at_zero():
    """A high-quality book in sampled mode: most scenarios lose nothing, VaR_0.99 = 0 and the
    remaining tail mass sits on the zero-loss ties; the contributions still add up to ES."""
    book = random_book(3, 40)
    book = book.subset(np.arange(len(book)))
    object.__setattr__(book, "pd_annual", np.full(len(book), 3e-4))
    # No path dependence (β = 0): the hazard is the plain one-factor Vasicek hazard.
    quiet = with_overrides(
        default_assumptions(),
        {"model": {"beta_liquidity": 0.0, "beta_collateral": 0.0, "beta_refinancing": 0.0}},
    )
    result = simulate(
        book,
        quiet,
        scenarios=1024,
        seed=SEED,
        mode="sampled",
        backend="numpy",
        alphas=(0.99,),
        sensitivities=False,
    )
    assert result.var(0.99) == 0.0
    assert 0 < result.es(0.99)  # some scenarios do lose
    es_i = result.contributions.expected_shortfall_usd["0.99"]
    np.testing.assert_allclose(es_i.sum(), result.es(0.99), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.contributions.expected_loss_usd.sum(), result.measures.el)
