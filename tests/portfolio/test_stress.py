"""Stress scenarios: the built-ins as overrides in the assumptions file's own layout (docs/spec.md
§10), user `[[stress]]` tables, and stress runs on the base run's random numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import offtaker_book, random_book
from gpucredit.io.assumptions import AssumptionsError, default_assumptions, loads_assumptions
from gpucredit.kernels import reference
from gpucredit.portfolio.backends import NumpyBackend
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import batch_count, risk_measures
from gpucredit.portfolio.runner import run_pass1
from gpucredit.portfolio.stress import (
    BUILTIN_STRESSES,
    MAX_JUMP,
    StressCase,
    contracted_revenue_by_offtaker,
    defaulted_offtakers,
    stress_case,
    stress_names,
)

SEED = 5
SCENARIOS = 1024
BOOK = random_book(7, 40)
BUILTINS = ("next-gen-glut", "crypto-winter", "liquidity-freeze", "rate-shock", "paper-metrics")


def _flatten(doc, prefix=""):
    """{dotted path: leaf} of a merged assumptions document (list items by position)."""
    out = {}
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict | list) and value:
            out |= _flatten(value, path)
        else:
            out[path] = value
    return out


def _changed_keys(base, stressed) -> set[str]:
    a, b = _flatten(base.document), _flatten(stressed.document)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _changed_params(base, stressed) -> set[str]:
    return {
        name
        for name, before, after in zip(
            base.params._fields, base.params, stressed.params, strict=True
        )
        if not np.array_equal(np.asarray(before), np.asarray(after))
    }


@pytest.fixture(scope="module")
def base():
    return default_assumptions()


@pytest.fixture(scope="module")
def cases(base):
    return {name: stress_case(base, name) for name in BUILTINS}


@pytest.fixture(scope="module")
def stressed_run(base, cases):
    return simulate(
        BOOK,
        base,
        scenarios=SCENARIOS,
        seed=SEED,
        backend="numpy",
        alphas=(0.99,),
        contributions=False,
        sensitivities=False,
        stress=tuple(cases.values()),
    )


# --------------------------------------------------------------------------- built-ins


def test_builtin_names(base):
    assert tuple(BUILTIN_STRESSES) == (*BUILTINS, "largest-offtaker-default")
    assert stress_names(base) == (*BUILTINS, "largest-offtaker-default")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_builds_valid_assumptions(base, cases, name):
    case = cases[name]
    assert isinstance(case, StressCase)
    assert case.name == name
    assert case.description and "\n" not in case.description
    s = case.assumptions
    assert s.generations == base.generations
    for before, after in zip(base.params, s.params, strict=True):
        assert np.shape(before) == np.shape(after)
        assert np.all(np.isfinite(np.asarray(after)))
    assert np.all((s.params.launch_price_jump >= 0) & (s.params.launch_price_jump < 1))
    assert np.all((s.params.haircut_base >= 0) & (s.params.haircut_base < 1))
    assert s.grid() == base.grid()._replace(launch_periods=s.grid().launch_periods)
    assert (s.seed, s.scenarios, s.mode) == (base.seed, base.scenarios, base.mode)


def test_next_gen_glut_changes_launches_and_rent_drift(base, cases):
    s = cases["next-gen-glut"].assumptions
    gens = base.generations
    launch = {f"launches.0.{k}" for k in ("years_from_now",)} | {
        f"launches.0.{jump}.{g}" for jump in ("price_jump", "rent_jump") for g in gens
    }
    assert _changed_keys(base, s) == launch | {f"generations.{g}.rent_drift" for g in gens}
    assert _changed_params(base, s) == {"launch_price_jump", "launch_rent_jump", "rent_drift"}
    assert s.launch_names == base.launch_names
    np.testing.assert_allclose(s.launch_years, np.asarray(base.launch_years) / 2)
    np.testing.assert_allclose(
        s.params.launch_price_jump, np.minimum(1.6 * base.params.launch_price_jump, MAX_JUMP)
    )
    np.testing.assert_allclose(
        s.params.launch_rent_jump, np.minimum(1.6 * base.params.launch_rent_jump, MAX_JUMP)
    )
    np.testing.assert_allclose(s.params.rent_drift, base.params.rent_drift - 0.10)


def test_crypto_winter_changes_crypto_drift_and_vol(base, cases):
    s = cases["crypto-winter"].assumptions
    assert _changed_keys(base, s) == {
        f"crypto.{c}.{k}" for c in ("btc", "eth") for k in ("drift", "vol")
    }
    assert _changed_params(base, s) == {"btc_drift", "btc_vol", "eth_drift", "eth_vol"}
    # Median one-year move: exp(μ − σ²/2) = 0.30 (BTC) and 0.20 (ETH), vols ×1.3.
    p = s.params
    assert math.isclose(p.btc_vol, 1.3 * base.params.btc_vol)
    assert math.isclose(p.eth_vol, 1.3 * base.params.eth_vol)
    assert math.isclose(math.exp(p.btc_drift - p.btc_vol**2 / 2), 0.30)
    assert math.isclose(math.exp(p.eth_drift - p.eth_vol**2 / 2), 0.20)


def test_liquidity_freeze_changes_depth_and_haircut(base, cases):
    s = cases["liquidity-freeze"].assumptions
    assert _changed_keys(base, s) == {
        f"generations.{g}.{k}"
        for g in base.generations
        for k in ("market_depth_gpus_per_year", "haircut_base")
    }
    assert _changed_params(base, s) == {"market_depth_gpus_per_year", "haircut_base"}
    np.testing.assert_allclose(
        s.params.market_depth_gpus_per_year, base.params.market_depth_gpus_per_year / 10
    )
    np.testing.assert_allclose(
        s.params.haircut_base,
        np.minimum(base.params.haircut_base + 0.10, base.params.haircut_max),
    )


def test_rate_shock_changes_rate_level_and_mean(base, cases):
    s = cases["rate-shock"].assumptions
    assert _changed_keys(base, s) == {"rate.level", "rate.mean"}
    assert _changed_params(base, s) == {"rate_level", "rate_mean"}
    assert math.isclose(s.params.rate_level, base.params.rate_level + 0.03)
    assert math.isclose(s.params.rate_mean, base.params.rate_mean + 0.03)


def test_builtins_follow_amended_assumptions():
    """A built-in is a function of the assumptions it stresses, not of the defaults."""
    a = loads_assumptions(
        "[rate]\nlevel = 0.05\nmean = 0.06\n[generations.H100]\nrent_drift = -0.4\n"
    )
    shocked = stress_case(a, "rate-shock").assumptions
    assert math.isclose(shocked.params.rate_level, 0.08)
    assert math.isclose(shocked.params.rate_mean, 0.09)
    glut = stress_case(a, "next-gen-glut").assumptions
    assert math.isclose(glut.params.rent_drift[1], -0.5)


# --------------------------------------------------------------------------- runs


def test_stress_runs_report_every_case(stressed_run, base):
    assert [s.name for s in stressed_run.stress] == list(BUILTINS)
    for s in stressed_run.stress:
        deltas = s.deltas(stressed_run.measures)
        assert set(deltas) == {"el_usd", "var_99_usd", "es_99_usd"}
        assert math.isclose(deltas["el_usd"], s.measures.el - stressed_run.measures.el)


def test_stresses_do_not_touch_the_base_run(stressed_run, base):
    plain = simulate(
        BOOK,
        base,
        scenarios=SCENARIOS,
        seed=SEED,
        backend="numpy",
        alphas=(0.99,),
        contributions=False,
        sensitivities=False,
    )
    np.testing.assert_array_equal(plain.losses_usd, stressed_run.losses_usd)
    assert plain.measures == stressed_run.measures


def _direct_measures(stressed, reference):
    """Pass 1 of the stressed assumptions on the run's seed, with the PD references of
    `reference` (the base run's, docs/spec.md §4), and its measures."""
    loans = loan_arrays(BOOK, stressed, base=reference)
    backend = NumpyBackend(stressed.params, stressed.grid(), loans, SEED)
    pass1 = run_pass1(backend, SCENARIOS, 256, len(BOOK))
    return risk_measures(pass1.losses_usd, None, (0.99,), batch_count(SCENARIOS))


@pytest.mark.parametrize("name", BUILTINS)
def test_stress_uses_the_base_random_numbers_and_references(stressed_run, cases, base, name):
    """A stress measure equals pass 1 of the stressed assumptions on the same seed, measured
    against the base run's PD references."""
    measures = next(s.measures for s in stressed_run.stress if s.name == name)
    assert measures == _direct_measures(cases[name].assumptions, base)


def test_a_stress_is_not_a_run_of_its_own_references(stressed_run, cases):
    """A run of the stressed file on its own would anchor the PDs on the stressed central
    path and hide most of the stress: the stress keeps the base references."""
    glut = cases["next-gen-glut"].assumptions
    own = _direct_measures(glut, glut)
    stressed = next(s.measures for s in stressed_run.stress if s.name == "next-gen-glut")
    assert stressed.el > own.el


def test_paper_metrics_only_moves_the_anchor(base, cases):
    s = cases["paper-metrics"].assumptions
    assert _changed_keys(base, s) == {"model.pd_anchor"}
    assert _changed_params(base, s) == set()
    assert (base.pd_anchor, s.pd_anchor) == ("expected", "today")


@pytest.mark.parametrize("name", ["liquidity-freeze", "rate-shock", "next-gen-glut"])
def test_adverse_stresses_raise_expected_loss(stressed_run, name):
    result = next(s for s in stressed_run.stress if s.name == name)
    deltas = result.deltas(stressed_run.measures)
    assert deltas["el_usd"] > 0, (name, deltas)
    assert deltas["es_99_usd"] >= 0, (name, deltas)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_user_stress_with_no_overrides_reproduces_the_base(backend):
    a = loads_assumptions('[[stress]]\nname = "unchanged"\ndescription = "nothing moves"\n')
    case = stress_case(a, "unchanged")
    assert case.description == "nothing moves"
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(case.assumptions.params, a.params, strict=True)
    )
    result = simulate(
        BOOK,
        a,
        scenarios=2048 if backend == "jax" else SCENARIOS,
        seed=SEED,
        backend=backend,
        precision="float64",
        chunk_size=1024,
        alphas=(0.99, 0.999),
        contributions=False,
        sensitivities=False,
        stress=(case,),
    )
    (stressed,) = result.stress
    assert stressed.measures == result.measures
    assert all(v == 0.0 for v in stressed.deltas(result.measures).values())
    assert result.summary()["stress"]["unchanged"]["description"] == "nothing moves"


def test_user_stress_wins_over_a_builtin_of_the_same_name():
    a = loads_assumptions('[[stress]]\nname = "rate-shock"\n[stress.rate]\nlevel = 0.10\n')
    s = stress_case(a, "rate-shock").assumptions
    assert s.params.rate_level == 0.10
    assert s.params.rate_mean == a.params.rate_mean
    assert stress_names(a) == (*BUILTINS, "largest-offtaker-default", "rate-shock")


# --------------------------------------------------------------------------- refusals


def test_unknown_stress_lists_the_known_ones():
    a = loads_assumptions('[[stress]]\nname = "gpu-crash"\n[stress.model]\nhaircut_slope = 0.8\n')
    with pytest.raises(AssumptionsError) as info:
        stress_case(a, "meteor")
    message = str(info.value)
    assert "meteor" in message
    for name in (*BUILTINS, "gpu-crash"):
        assert name in message


NEW_GENERATION = "".join(
    f"{key} = {value}\n"
    for key, value in dict(
        rent_usd_per_hour=6.0, rent_drift=-0.2, rent_vol=0.35, rent_mean_reversion=0.5,
        price_usd=50000, depreciation=0.25, price_vol=0.3, power_kw_per_gpu=1.4,
        haircut_base=0.15, market_depth_gpus_per_year=50000, financed_fleet_gpus=100000,
    ).items()
)  # fmt: skip


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[stress.simulation]\nhorizon_years = 2\n", "horizon_years"),
        ("[stress.simulation]\nsteps_per_year = 12\n", "steps_per_year"),
        ('[stress.simulation]\ncopula = "t"\n', "copula"),
        ("[stress.simulation]\nseed = 7\n", "seed"),  # simulate would ignore it silently
        (f"[stress.generations.B300]\n{NEW_GENERATION}", "generations"),  # K slots change
    ],
)
def test_stress_that_changes_the_random_numbers_is_refused(table, key):
    a = loads_assumptions(f'[[stress]]\nname = "regrid"\n{table}')
    with pytest.raises(AssumptionsError, match=f"regrid: must not change {key}"):
        stress_case(a, "regrid")


def test_invalid_stress_overrides_are_refused_when_loaded():
    with pytest.raises(AssumptionsError, match="haircut_max"):
        loads_assumptions('[[stress]]\nname = "bad"\n[stress.model]\nhaircut_max = 1.5\n')


# --------------------------------------------------------------------------- offtakers


def _offtaker_case(names):
    listed = ", ".join(f'"{n}"' for n in names)
    a = loads_assumptions(f'[[stress]]\nname = "labs-fail"\nofftakers_default = [{listed}]\n')
    return a, stress_case(a, "labs-fail")


def test_offtakers_default_is_the_contracts_ending_after_period_one():
    """docs/spec.md §4a: a listed offtaker defaults in period 1 of every scenario: its loans
    lose their contracts after period 1, exactly (the other offtakers as in the base run)."""
    book = offtaker_book()
    a, case = _offtaker_case(["Lab A"])
    assert case.offtakers_default == ("Lab A",)
    for x, y in zip(case.assumptions.params, a.params, strict=True):  # a book event:
        assert np.array_equal(np.asarray(x), np.asarray(y))  # no assumption moves
    stressed = loan_arrays(book, a, offtakers_default=defaulted_offtakers(case, book))
    base = loan_arrays(book, a)
    lab_a = book.offtaker_index()[1].index("Lab A")
    by_hand = base._replace(
        contract_periods=np.where(
            base.offtaker == lab_a, np.minimum(base.contract_periods, 1), base.contract_periods
        ),
        offtaker_pd_annual=np.where(np.arange(3) == lab_a, 0.0, base.offtaker_pd_annual),
    )
    scenarios = np.arange(32)
    grid = a.grid()
    got = reference.simulate_chunk(a.params, grid, stressed, SEED, scenarios)
    want = reference.simulate_chunk(a.params, grid, by_hand, SEED, scenarios)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-6)
    base_loss = reference.simulate_chunk(a.params, grid, base, SEED, scenarios)
    assert got.sum() > base_loss.sum()


def test_offtaker_stress_runs_through_simulate():
    book = offtaker_book()
    a, case = _offtaker_case(["Lab A", "Lab C"])
    result = simulate(
        book, a, scenarios=256, seed=SEED, backend="numpy", alphas=(0.99,),
        contributions=False, sensitivities=False, stress=(case,),
    )  # fmt: skip
    (stressed,) = result.stress
    assert stressed.measures.el > result.measures.el


def test_an_offtaker_no_loan_names_is_refused():
    _, case = _offtaker_case(["Lab Z"])
    with pytest.raises(AssumptionsError, match="no loan of the book names offtaker 'Lab Z'"):
        defaulted_offtakers(case, offtaker_book())


def test_offtakers_default_must_be_a_list_of_names():
    with pytest.raises(AssumptionsError, match="offtakers_default: must be a list of offtaker"):
        loads_assumptions('[[stress]]\nname = "x"\nofftakers_default = "Lab A"\n')


def test_largest_offtaker_default_picks_the_most_contracted_revenue(base):
    book = offtaker_book()
    revenue = contracted_revenue_by_offtaker(book)
    assert set(revenue) == {"Lab A", "Hyperscaler B", "Lab C"}
    case = stress_case(base, "largest-offtaker-default")
    assert case.description.startswith("The offtaker behind the most contracted revenue")
    assert defaulted_offtakers(case, book) == (max(revenue, key=revenue.get),)
    with pytest.raises(AssumptionsError, match="the book names no offtaker"):
        defaulted_offtakers(case, BOOK)
