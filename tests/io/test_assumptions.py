"""The assumptions file: docs/spec.md §9 defaults, §10 merge rules, refusals, the correlation
matrix (assembly, PD check, nearest-correlation repair) and parameter naming."""

from __future__ import annotations

import os
import tomllib

import numpy as np
import pytest

from gpucredit.io.assumptions import (
    AssumptionsError,
    assembled_matrix_text,
    default_assumptions,
    default_assumptions_text,
    load_assumptions,
)
from gpucredit.io.text_files import MAX_TEXT_BYTES
from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.assumptions import parameter_paths, parameter_value, with_overrides
from gpucredit.portfolio.correlation import nearest_correlation
from gpucredit.portfolio.document import GENERATION_KEYS, KEYS, SIMULATION_KEYS, Range
from gpucredit.portfolio.stress import BUILTIN_STRESSES, stress_case


def write(tmp_path, text: str):
    path = tmp_path / "user.toml"
    path.write_text(text)
    return path


def corr(a, f1: str, f2: str) -> float:
    names = a.factor_names
    return float(a.params.correlation[names.index(f1), names.index(f2)])


def refusal(tmp_path, text: str, repair: bool = False) -> str:
    with pytest.raises(AssumptionsError) as info:
        load_assumptions(write(tmp_path, text), repair_correlation=repair)
    message = str(info.value)
    assert "user.toml" in message  # every problem names the file
    return message


# --- defaults (docs/spec.md §9) -------------------------------------------------------------


def test_defaults_match_the_spec():
    a = default_assumptions()
    p = a.params
    assert a.generations == ("A100", "H100", "H200", "B200")
    np.testing.assert_array_equal(p.rent_usd_per_hour, [1.20, 2.20, 3.00, 4.50])
    np.testing.assert_array_equal(p.price_usd, [9000, 22000, 29000, 40000])
    np.testing.assert_array_equal(p.rent_drift, [-0.25, -0.20, -0.18, -0.15])
    np.testing.assert_array_equal(p.rent_vol, [0.35] * 4)
    np.testing.assert_array_equal(p.depreciation, [0.30, 0.22, 0.20, 0.18])
    np.testing.assert_array_equal(p.price_vol, [0.30] * 4)
    np.testing.assert_array_equal(p.rent_mean_reversion, [0.5] * 4)
    np.testing.assert_array_equal(p.haircut_base, [0.20, 0.15, 0.15, 0.15])
    np.testing.assert_array_equal(p.market_depth_gpus_per_year, [300000, 450000, 300000, 250000])
    np.testing.assert_array_equal(p.financed_fleet_gpus, [200000, 1200000, 500000, 600000])
    assert a.generation_power_kw_per_gpu == (0.52, 0.91, 0.91, 1.30)
    assert a.launch_names == ("next-gen",)
    assert a.launch_years == (0.5,)
    np.testing.assert_array_equal(p.launch_price_jump, [[0.10, 0.12, 0.10, 0.08]])
    np.testing.assert_array_equal(p.launch_rent_jump, [[0.08, 0.08, 0.06, 0.04]])
    assert (p.btc_price_usd, p.btc_drift, p.btc_vol, p.btc_hashprice_drift) == (
        90000,
        0,
        0.55,
        -0.30,
    )
    assert (p.eth_price_usd, p.eth_drift, p.eth_vol) == (3000, 0, 0.75)
    assert (p.power_usd_per_kwh, p.power_drift, p.power_vol) == (0.08, 0.02, 0.20)
    assert (p.rate_level, p.rate_mean_reversion, p.rate_mean, p.rate_vol) == (
        0.037,
        0.3,
        0.035,
        0.01,
    )
    assert p.credit_persistence == 0.6
    assert a.pd_anchor == "expected"
    assert (p.beta_liquidity, p.beta_collateral, p.beta_refinancing) == (1.0, 0.75, 0.75)
    assert (p.haircut_slope, p.haircut_power, p.haircut_max) == (0.40, 1.0, 0.60)
    assert (p.refi_ltv, p.coverage_floor, p.coverage_cap) == (0.6, 0.01, 5)
    assert (a.horizon_years, a.steps_per_year, a.scenarios, a.seed) == (3, 4, 100_000, 0)
    assert (a.copula, a.t_dof, a.discount, a.mode) == ("gaussian", 5, False, "conditional")
    assert a.stresses == ()
    assert a.correlation_repair is None


def test_v2_keys_are_checked(tmp_path):
    message = refusal(
        tmp_path,
        "[credit]\npersistence = 1.0\n[model]\npd_anchor = 'paper'\n"
        "[crypto.eth]\nhashprice_drift = -0.3\n[generations.H100]\nfinanced_fleet_gpus = -1\n",
    )
    assert "credit.persistence" in message and "[0, 1)" in message
    assert "model.pd_anchor" in message
    assert "crypto.eth" in message and "hashprice_drift" in message  # BTC only
    assert "generations.H100.financed_fleet_gpus" in message


def test_v2_keys_are_read(tmp_path):
    a = load_assumptions(
        write(
            tmp_path,
            "[credit]\npersistence = 0.0\n[model]\npd_anchor = 'today'\n"
            "[crypto.btc]\nhashprice_drift = -0.1\n[generations.H100]\nfinanced_fleet_gpus = 7\n",
        )
    )
    assert a.params.credit_persistence == 0.0 and a.pd_anchor == "today"
    assert a.params.btc_hashprice_drift == -0.1 and a.params.financed_fleet_gpus[1] == 7


def test_leaves_are_float64_arrays_and_python_floats():
    p = default_assumptions().params
    G, K = 4, 13
    for field in ModelParams._fields:
        leaf = getattr(p, field)
        if field.startswith("launch_"):
            assert leaf.shape == (1, G) and leaf.dtype == np.float64
        elif field == "correlation":
            assert leaf.shape == (K, K) and leaf.dtype == np.float64
        elif isinstance(leaf, np.ndarray):
            assert leaf.shape == (G,) and leaf.dtype == np.float64
        else:
            assert type(leaf) is float, field


def test_default_matrix_entries():
    a = default_assumptions()
    assert corr(a, "rent:H100", "price:A100") == 0.45
    assert corr(a, "rent:H100", "price:H100") == 0.60
    assert corr(a, "rent:A100", "rent:B200") == 0.80
    assert corr(a, "price:H200", "price:B200") == 0.70
    assert corr(a, "btc", "eth") == 0.82
    assert corr(a, "eth", "rent:H200") == 0.25
    assert corr(a, "btc", "price:B200") == 0.20
    assert corr(a, "credit", "rent:A100") == 0.30
    assert corr(a, "credit", "price:H100") == 0.25
    assert corr(a, "credit", "eth") == 0.30
    assert corr(a, "power", "rent:H100") == 0.10
    assert corr(a, "btc", "rate") == -0.10
    assert corr(a, "rate", "eth") == -0.10
    for other in ("price:H100", "credit", "rate"):
        assert corr(a, "power", other) == 0
    for other in ("rent:H100", "price:H100", "credit"):
        assert corr(a, "rate", other) == 0


def test_default_matrix_is_symmetric_unit_diagonal_pd():
    sigma = default_assumptions().correlation_matrix()
    np.testing.assert_array_equal(sigma, sigma.T)
    np.testing.assert_array_equal(np.diag(sigma), 1.0)
    assert np.linalg.eigvalsh(sigma).min() > 1e-3
    np.linalg.cholesky(sigma)


def test_defaults_are_cached_and_immutable():
    a = default_assumptions()
    assert default_assumptions() is a
    assert load_assumptions() is a
    with pytest.raises(ValueError):
        a.params.depreciation[0] = 0.0


def test_default_text_parses_and_has_no_stress():
    doc = tomllib.loads(default_assumptions_text())
    assert "stress" not in doc
    assert doc["simulation"]["copula"] == "gaussian"


def test_matrix_text_labels_rows_and_columns():
    text = assembled_matrix_text(default_assumptions())
    lines = text.splitlines()
    assert lines[0].split() == list(default_assumptions().factor_names)
    assert lines[1].split()[0] == "rent:A100"
    assert len(lines) == 14


# --- merging a user file (docs/spec.md §10) ---------------------------------------------------


def test_amend_one_generation(tmp_path):
    a = load_assumptions(write(tmp_path, "[generations.H100]\ndepreciation = 0.5\n"))
    np.testing.assert_array_equal(a.params.depreciation, [0.30, 0.5, 0.20, 0.18])
    np.testing.assert_array_equal(a.params.price_usd, [9000, 22000, 29000, 40000])
    assert a.generations == default_assumptions().generations


NEW_GENERATION = """
[generations.GB300]
rent_usd_per_hour = 6.0
rent_drift = -0.15
rent_vol = 0.4
rent_mean_reversion = 0.5
price_usd = 55000
depreciation = 0.2
price_vol = 0.3
power_kw_per_gpu = 1.6
haircut_base = 0.15
market_depth_gpus_per_year = 50000
financed_fleet_gpus = 100000
"""


def test_add_a_generation(tmp_path):
    a = load_assumptions(write(tmp_path, NEW_GENERATION))
    assert a.generations == ("A100", "H100", "H200", "B200", "GB300")
    assert a.params.price_usd[-1] == 55000
    assert a.generation_power_kw_per_gpu[-1] == 1.6
    assert a.params.correlation.shape == (15, 15)
    assert a.factor_names[4] == "rent:GB300"
    assert corr(a, "rent:GB300", "price:GB300") == 0.60
    # the default launch gives the new generation no jump (absent = 0)
    np.testing.assert_array_equal(a.params.launch_price_jump, [[0.10, 0.12, 0.10, 0.08, 0.0]])


def test_new_generation_must_give_every_key(tmp_path):
    message = refusal(tmp_path, "[generations.X1]\nprice_usd = 1000\n")
    assert "generations.X1" in message
    assert "missing" in message and "rent_usd_per_hour" in message and "haircut_base" in message
    assert "price_usd," not in message  # the given key is not listed as missing


def test_empty_launches_removes_the_default(tmp_path):
    a = load_assumptions(write(tmp_path, "launches = []\n"))
    assert a.launch_names == ()
    assert a.params.launch_price_jump.shape == (0, 4)
    assert a.grid().launch_periods == ()


def test_launches_replace_the_default_list(tmp_path):
    text = """
[[launches]]
name = "rubin"
years_from_now = 1.25
price_jump = { H100 = 0.3 }

[[launches]]
name = "rubin-ultra"
years_from_now = 2
rent_jump = { B200 = 0.1 }
"""
    a = load_assumptions(write(tmp_path, text))
    assert a.launch_names == ("rubin", "rubin-ultra")
    assert a.launch_years == (1.25, 2.0)
    np.testing.assert_array_equal(a.params.launch_price_jump, [[0, 0.3, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(a.params.launch_rent_jump, [[0, 0, 0, 0], [0, 0, 0, 0.1]])
    assert a.grid().launch_periods == (5, 8)


def test_pairs_override_single_entries_symmetrically(tmp_path):
    text = """
[correlation]
btc_eth = 0.7

[[correlation.pairs]]
a = "rent:H100"
b = "btc"
value = 0.4
"""
    a = load_assumptions(write(tmp_path, text))
    assert corr(a, "rent:H100", "btc") == 0.4
    assert corr(a, "btc", "rent:H100") == 0.4
    assert corr(a, "rent:A100", "btc") == 0.25  # the group value elsewhere
    assert corr(a, "btc", "eth") == 0.7


def test_simulation_and_model_amendments(tmp_path):
    text = '[simulation]\ncopula = "t"\nt_dof = 4\nscenarios = 1000\n[model]\nrefi_ltv = 0.5\n'
    a = load_assumptions(write(tmp_path, text))
    assert (a.copula, a.t_dof, a.scenarios, a.seed) == ("t", 4, 1000, 0)
    assert a.params.refi_ltv == 0.5
    assert a.params.haircut_max == 0.60
    assert a.document["model"]["refi_ltv"] == 0.5


def test_ints_are_accepted_for_floats(tmp_path):
    a = load_assumptions(write(tmp_path, "[crypto.btc]\nprice_usd = 100000\ndrift = 0\n"))
    assert type(a.params.btc_price_usd) is float
    assert a.params.btc_price_usd == 100000.0


def test_stresses_are_read(tmp_path):
    text = """
[[stress]]
name = "gpu-crash"
description = "prices halve"
[stress.generations.H100]
price_usd = 11000
[stress.model]
haircut_slope = 0.8

[[stress]]
name = "no-launch"
launches = []
"""
    a = load_assumptions(write(tmp_path, text))
    assert [s.name for s in a.stresses] == ["gpu-crash", "no-launch"]
    crash = a.stresses[0]
    assert crash.description == "prices halve"
    assert crash.overrides == {
        "generations": {"H100": {"price_usd": 11000}},
        "model": {"haircut_slope": 0.8},
    }
    stressed = with_overrides(a, crash.overrides)
    assert stressed.params.price_usd[1] == 11000
    assert stressed.params.haircut_slope == 0.8
    assert with_overrides(a, a.stresses[1].overrides).launch_names == ()


# --- refusals -----------------------------------------------------------------------------

REFUSALS = [
    # (file text, text the message must contain)
    ("[simulation]\nhorizon = 3\n", "simulation.horizon: unknown key; known keys: horizon_years"),
    ("[bogus]\nx = 1\n", "bogus: unknown key; known keys: simulation, generations"),
    ("[generations.H100]\ndepreciaton = 0.3\n", "generations.H100.depreciaton: unknown key"),
    ("[crypto.doge]\nvol = 1\n", "crypto.doge: unknown key; known keys: btc, eth"),
    ("[crypto.btc]\nvolatility = 1\n", "crypto.btc.volatility: unknown key"),
    ("[correlation]\nrent_gold = 0.1\n", "correlation.rent_gold: unknown key"),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1\nsize = 2\n',
        "launches[0].size: unknown key; known keys: name, years_from_now, price_jump, rent_jump",
    ),
    ('[[stress]]\nname = "s"\nfoo = 1\n', "stress[0].foo: unknown key"),
    ('[[stress]]\nname = "s"\n[stress.model]\nbeta = 1\n', "stress[0].model.beta: unknown key"),
    # types
    ("[model]\nbeta_liquidity = true\n", "model.beta_liquidity: must be a number, got bool"),
    ('[model]\nbeta_liquidity = "1.5"\n', "model.beta_liquidity: must be a number, got str"),
    ("[model]\nbeta_liquidity = nan\n", "model.beta_liquidity: must be finite"),
    ("[simulation]\nsteps_per_year = 4.0\n", "simulation.steps_per_year: must be a whole number"),
    ("[simulation]\nscenarios = true\n", "simulation.scenarios: must be a whole number"),
    ("[simulation]\ndiscount = 1\n", "simulation.discount: must be true or false"),
    ("[simulation]\ncopula = 1\n", "simulation.copula: must be a string"),
    ("model = 1\n", "model: must be a table"),
    ("[launches]\nname = 'x'\n", "launches: must be an array of tables"),
    # ranges
    ("[generations.H100]\nrent_vol = -0.1\n", "generations.H100.rent_vol: must be in [0, 2]"),
    ("[generations.H100]\nprice_vol = -0.1\n", "generations.H100.price_vol: must be in [0, 2]"),
    ("[crypto.eth]\nvol = -1\n", "crypto.eth.vol: must be in [0, 3]"),
    ("[power]\nvol = -1\n", "power.vol: must be in [0, 2]"),
    ("[rate]\nvol = -0.01\n", "rate.vol: must be in [0, 0.1]"),
    (
        "[generations.H100]\nrent_mean_reversion = -0.5\n",
        "generations.H100.rent_mean_reversion: must be in [0, 12]",
    ),
    ("[rate]\nmean_reversion = -0.3\n", "rate.mean_reversion: must be in [0, 12]"),
    ("[generations.H100]\nprice_usd = 0\n", "generations.H100.price_usd: must be in (0, 1e6]"),
    ("[generations.H100]\nrent_usd_per_hour = -2\n", "rent_usd_per_hour: must be in (0, 100]"),
    ("[generations.H100]\nmarket_depth_gpus_per_year = 0\n", "market_depth_gpus_per_year: must"),
    ("[crypto.btc]\nprice_usd = 0\n", "crypto.btc.price_usd: must be in (0, 1e7]"),
    ("[power]\nusd_per_kwh = 0\n", "power.usd_per_kwh: must be in (0, 2]"),
    ("[generations.H100]\nhaircut_base = 1.0\n", "haircut_base: must be in [0, 1)"),
    ("[generations.H100]\nhaircut_base = -0.1\n", "haircut_base: must be in [0, 1)"),
    ("[model]\nhaircut_max = 1\n", "model.haircut_max: must be in [0, 1)"),
    ("[model]\nhaircut_slope = -0.1\n", "model.haircut_slope: must be in [0, 10]"),
    ("[model]\nhaircut_power = 0\n", "model.haircut_power: must be in (0, 5]"),
    ("[model]\nrefi_ltv = 0\n", "model.refi_ltv: must be in (0, 1]"),
    ("[model]\ncoverage_floor = 0\n", "model.coverage_floor: must be in [1e-6, 1]"),
    (
        "[model]\ncoverage_floor = 1\ncoverage_cap = 1\n",
        "model.coverage_cap: must be > model.coverage_floor",
    ),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1\nprice_jump = { H100 = 1.0 }\n',
        "launches[0].price_jump.H100: must be in [0, 1)",
    ),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1\nrent_jump = { H100 = -0.1 }\n',
        "launches[0].rent_jump.H100: must be in [0, 1)",
    ),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 0\n',
        "launches[0].years_from_now: must be in (1e-9, 100]",
    ),
    ('[[launches]]\nname = "x"\n', "launches[0].years_from_now: missing"),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1\nprice_jump = { V100 = 0.1 }\n',
        "launches[0].price_jump.V100: unknown generation 'V100'; generations: A100, H100",
    ),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1\n'
        '[[launches]]\nname = "x"\nyears_from_now = 2\n',
        "launches[1].name: duplicate launch name 'x'",
    ),
    ("[simulation]\nhorizon_years = 0\n", "simulation.horizon_years: must be in (0, 30]"),
    ("[simulation]\nsteps_per_year = 0\n", "simulation.steps_per_year: must be in [1, 52]"),
    (
        "[simulation]\nhorizon_years = 2.1\n",
        "simulation.horizon_years: horizon_years * steps_per_year must be a whole number",
    ),
    ("[simulation]\nscenarios = 0\n", "simulation.scenarios: must be in [1, 1e10]"),
    ("[simulation]\nseed = -1\n", "simulation.seed: must be in [0, 2^32)"),
    ("[simulation]\nseed = 4294967296\n", "simulation.seed: must be in [0, 2^32)"),
    ('[simulation]\ncopula = "clayton"\n', "simulation.copula: must be one of 'gaussian', 't'"),
    ("[simulation]\nt_dof = 0\n", "simulation.t_dof: must be in [1, 100]"),
    ("[simulation]\nt_dof = 2.5\n", "simulation.t_dof: must be a whole number"),
    ('[simulation]\nmode = "exact"\n', "simulation.mode: must be one of 'conditional', 'sampled'"),
    ("[rate]\nlevel = 4.0\n", "rate.level: must be in (-1, 1) (a yearly rate as a fraction)"),
    ("[rate]\nmean = -1\n", "rate.mean: must be in (-1, 1)"),
    ("[correlation]\nrent_rent = 1.2\n", "correlation.rent_rent: must be in [-1, 1]"),
    ("[correlation]\nrate_crypto = -1.5\n", "correlation.rate_crypto: must be in [-1, 1]"),
    (
        '[[correlation.pairs]]\na = "btc"\nb = "eth"\nvalue = 2\n',
        "correlation.pairs[0].value: must be in [-1, 1]",
    ),
    (
        '[[correlation.pairs]]\na = "btc"\nb = "gold"\nvalue = 0.1\n',
        "correlation.pairs[0].b: unknown factor 'gold'; factors: rent:A100",
    ),
    (
        '[[correlation.pairs]]\na = "btc"\nb = "btc"\nvalue = 0.1\n',
        "correlation.pairs[0]: a and b must differ",
    ),
    ('[[correlation.pairs]]\na = "btc"\nvalue = 0.1\n', "correlation.pairs[0].b: missing"),
    ('[[stress]]\ndescription = "x"\n', "stress[0].name: missing"),
    ('[[stress]]\nname = "s"\n[[stress]]\nname = "s"\n', "stress[1].name: duplicate stress name"),
    (
        '[[stress]]\nname = "s"\n[stress.model]\nhaircut_max = 2\n',
        "stress[0].model.haircut_max: must be in [0, 1)",
    ),
    (
        '[[stress]]\nname = "s"\n[stress.model]\ncoverage_floor = 1\ncoverage_cap = 1\n',
        "stress[0].model.coverage_cap: must be > model.coverage_floor",
    ),
    ("[generations.H100]\nprice_usd = [1]\n", "generations.H100.price_usd: must be a number"),
    ("[generations]\nH100 = 3\n", "generations.H100: must be a table"),
    ("[generations.'a.b']\nprice_usd = 1\n", "generation name must not contain"),
]


@pytest.mark.parametrize(("text", "expected"), REFUSALS)
def test_refusal(tmp_path, text, expected):
    message = refusal(tmp_path, text)
    assert expected in message, message


def test_all_problems_are_collected(tmp_path):
    text = "[model]\nhaircut_max = 2\nbeta_liquidity = true\nfoo = 1\n[power]\nvol = -1\n"
    with pytest.raises(AssumptionsError) as info:
        load_assumptions(write(tmp_path, text))
    problems = info.value.problems
    assert len(problems) == 4
    assert all(p.startswith(str(tmp_path / "user.toml") + ": ") for p in problems)
    assert "4 problem(s)" in str(info.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(AssumptionsError, match="cannot read"):
        load_assumptions(tmp_path / "missing.toml")
    with pytest.raises(AssumptionsError, match="not valid TOML"):
        load_assumptions(write(tmp_path, "[model\n"))


# --- correlation: PD check and repair -------------------------------------------------

NOT_PD = """
[[correlation.pairs]]
a = "rent:H100"
b = "price:H100"
value = -0.9
"""


def test_non_pd_matrix_is_refused_with_its_smallest_eigenvalue(tmp_path):
    message = refusal(tmp_path, NOT_PD)
    assert "not positive definite" in message
    user_sigma = default_assumptions().correlation_matrix().copy()
    j, k = default_assumptions().factor_names.index("rent:H100"), 5
    user_sigma[j, k] = user_sigma[k, j] = -0.9
    lowest = np.linalg.eigvalsh(user_sigma).min()
    assert lowest < 0
    assert f"smallest eigenvalue {lowest:.6g}" in message


def test_repair_gives_a_close_valid_correlation_matrix(tmp_path):
    a = load_assumptions(write(tmp_path, NOT_PD), repair_correlation=True)
    sigma = a.correlation_matrix()
    np.testing.assert_allclose(sigma, sigma.T, atol=0)
    np.testing.assert_array_equal(np.diag(sigma), 1.0)
    assert np.linalg.eigvalsh(sigma).min() > 1e-12
    np.linalg.cholesky(sigma)
    repair = a.correlation_repair
    assert repair is not None and repair.smallest_eigenvalue < 0
    original = default_assumptions().correlation_matrix().copy()
    original[1, 5] = original[5, 1] = -0.9
    change = np.abs(sigma - original).max()
    assert repair.max_abs_change == pytest.approx(change)
    assert 0 < change < 1
    # nearer (Frobenius) than the naive fix: clip the eigenvalues, rescale the diagonal
    w, v = np.linalg.eigh(original)
    naive = (v * np.maximum(w, 1e-8)) @ v.T
    naive /= np.sqrt(np.outer(np.diag(naive), np.diag(naive)))
    assert np.linalg.norm(sigma - original) < np.linalg.norm(naive - original)
    assert "nearest correlation matrix" in assembled_matrix_text(a)
    # a stress on repaired assumptions stays repaired
    assert with_overrides(a, {"model": {"refi_ltv": 0.5}}).correlation_repair is not None


def test_nearest_correlation_known_example():
    # Higham (2002) §6 example: the nearest correlation matrix to this 3x3 matrix.
    a = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=float)
    x = nearest_correlation(a)
    expected = np.array([[1.0, 0.7607, 0.1573], [0.7607, 1.0, 0.7607], [0.1573, 0.7607, 1.0]])
    np.testing.assert_allclose(x, expected, atol=1e-4)
    assert np.linalg.eigvalsh(x).min() > 0


def test_nearest_correlation_leaves_a_correlation_matrix_alone():
    sigma = default_assumptions().correlation_matrix()
    np.testing.assert_allclose(nearest_correlation(sigma), sigma, atol=1e-10)


# --- parameter naming -------------------------------------------------------------------


def test_parameter_paths_cover_every_sensitivity():
    a = default_assumptions()
    paths = parameter_paths(a)
    names = [path for path, _, _ in paths]
    assert len(names) == len(set(names))
    K = len(a.factor_names)
    correlation = [(path, index) for path, field, index in paths if field == "correlation"]
    assert len(correlation) == K * (K - 1) // 2
    assert {index for _, index in correlation} == {
        (j, k) for j in range(K) for k in range(j + 1, K)
    }
    assert ("correlation.rent:H100~price:H100", (1, 5)) in correlation
    for g, name in enumerate(a.generations):
        assert (f"generations.{name}.depreciation", "depreciation", (g,)) in paths
    assert ("launches.next-gen.price_jump.H100", "launch_price_jump", (0, 1)) in paths
    assert ("launches.next-gen.rent_jump.B200", "launch_rent_jump", (0, 3)) in paths
    assert ("crypto.btc.vol", "btc_vol", ()) in paths
    assert ("model.beta_liquidity", "beta_liquidity", ()) in paths
    assert ("rate.mean_reversion", "rate_mean_reversion", ()) in paths
    # every ModelParams leaf named, except the ones docs/spec.md §7 leaves out and ρ_o
    # (§4a: the offtakers' default periods are held fixed, so there is no ∂/∂ρ_o)
    fields = {field for _, field, _ in paths}
    assert set(ModelParams._fields) - fields == {
        "haircut_max",
        "coverage_floor",
        "coverage_cap",
        "offtaker_correlation",
    }
    assert ("credit.persistence", "credit_persistence", ()) in paths
    assert ("crypto.btc.hashprice_drift", "btc_hashprice_drift", ()) in paths
    assert ("generations.H200.financed_fleet_gpus", "financed_fleet_gpus", (2,)) in paths
    # 10 per generation, 2 jumps per launch and generation, 21 scalars, K(K-1)/2 entries
    assert len(paths) == 10 * 4 + 2 * 4 + 21 + K * (K - 1) // 2


def test_parameter_value_reads_the_leaf():
    a = default_assumptions()
    values = {path: parameter_value(a.params, f, i) for path, f, i in parameter_paths(a)}
    assert values["generations.H100.depreciation"] == 0.22
    assert values["launches.next-gen.price_jump.H200"] == 0.10
    assert values["correlation.rent:H100~price:A100"] == 0.45
    assert values["correlation.btc~rate"] == -0.10
    assert values["crypto.eth.vol"] == 0.75
    assert all(type(v) is float for v in values.values())


# --- with_overrides -----------------------------------------------------------------------


def test_with_overrides_changes_exactly_what_is_asked():
    base = default_assumptions()
    bumped = with_overrides(
        base,
        {"generations": {"H100": {"depreciation": 0.5}}, "correlation": {"btc_eth": 0.5}},
    )
    before = {p: parameter_value(base.params, f, i) for p, f, i in parameter_paths(base)}
    after = {p: parameter_value(bumped.params, f, i) for p, f, i in parameter_paths(bumped)}
    changed = {p for p in before if before[p] != after[p]}
    assert changed == {"generations.H100.depreciation", "correlation.btc~eth"}
    assert after["generations.H100.depreciation"] == 0.5
    assert after["correlation.btc~eth"] == 0.5
    assert bumped.params.correlation[9, 8] == 0.5
    # the other leaves and settings are untouched, and the base is unchanged
    assert bumped.params.haircut_max == base.params.haircut_max
    assert bumped.generation_power_kw_per_gpu == base.generation_power_kw_per_gpu
    assert (bumped.scenarios, bumped.launch_names) == (base.scenarios, base.launch_names)
    assert base.params.depreciation[1] == 0.22
    assert base.document["generations"]["H100"]["depreciation"] == 0.22
    assert bumped.document["generations"]["H100"]["depreciation"] == 0.5


def test_with_overrides_refuses_bad_overrides():
    with pytest.raises(
        AssumptionsError, match=r"<overrides>: model\.refi_ltv: must be in \(0, 1\]"
    ):
        with_overrides(default_assumptions(), {"model": {"refi_ltv": -1}})


# --- plausible ranges (issue 20, item 4) ----------------------------------------------------

UNIT_TYPOS = [
    # (file text, the key path, the suggestion): a percentage for a fraction, W for kW, $/MWh
    ("[rate]\nvol = 5\n", "rate.vol: must be in [0, 0.1]", "did you mean 0.05?"),
    ("[rate]\nlevel = 4\n", "rate.level: must be in (-1, 1)", "did you mean 0.04?"),
    ("[generations.H100]\nrent_vol = 35\n", "rent_vol: must be in [0, 2]", "did you mean 0.35?"),
    ("[generations.H100]\ndepreciation = 22\n", "depreciation: must be in", "did you mean 0.22?"),
    ("[generations.H100]\nrent_drift = -20\n", "rent_drift: must be in", "did you mean -0.2?"),
    ("[generations.H100]\nhaircut_base = 15\n", "haircut_base: must be in", "did you mean 0.15?"),
    ("[generations.H100]\npower_kw_per_gpu = 910\n", "must be in [0, 10]", "did you mean 0.91?"),
    ("[power]\nusd_per_kwh = 80\n", "power.usd_per_kwh: must be in", "did you mean 0.08?"),
    ("[power]\ndrift = 2\n", "power.drift: must be in [-0.5, 0.5]", "did you mean 0.02?"),
    ("[crypto.btc]\nvol = 55\n", "crypto.btc.vol: must be in [0, 3]", "did you mean 0.55?"),
    ("[credit]\npersistence = 60\n", "credit.persistence: must be in", "did you mean 0.6?"),
    ("[model]\nrefi_ltv = 60\n", "model.refi_ltv: must be in (0, 1]", "did you mean 0.6?"),
]


@pytest.mark.parametrize(("text", "rule", "hint"), UNIT_TYPOS)
def test_unit_typos_are_refused_with_the_range_and_a_suggestion(tmp_path, text, rule, hint):
    message = refusal(tmp_path, text)
    assert rule in message and hint in message, message


def test_a_refusal_says_what_the_number_means(tmp_path):
    message = refusal(tmp_path, "[rate]\nvol = 5\n")
    assert (
        "rate.vol: must be in [0, 0.1] (yearly volatility in rate units: 0.01 is 1 point), "
        "got 5; did you mean 0.05?" in message
    )
    # no suggestion where dividing does not land in the range
    assert "did you mean" not in refusal(tmp_path, "[rate]\nvol = 5000\n")


IMPOSSIBLE_SIZES = [
    # issue 20 item 5: each crashed or exhausted memory after passing validation
    ("[simulation]\nt_dof = 20000\n", "simulation.t_dof: must be in [1, 100]"),
    ("[simulation]\nsteps_per_year = 100000\n", "simulation.steps_per_year: must be in [1, 52]"),
    ("[simulation]\nhorizon_years = 1e300\n", "simulation.horizon_years: must be in (0, 30]"),
    ("[simulation]\nscenarios = 1000000000000\n", "simulation.scenarios: must be in [1, 1e10]"),
    ("[model]\nbeta_liquidity = 1e300\n", "model.beta_liquidity: must be in [0, 10]"),
    ("[model]\nbeta_collateral = -1\n", "model.beta_collateral: must be in [0, 10]"),
    ("[model]\nhaircut_power = 1e300\n", "model.haircut_power: must be in (0, 5]"),
    ("[model]\ncoverage_cap = 1e300\n", "model.coverage_cap: must be in [1, 1000]"),
    ("[model]\ncoverage_floor = 1e-300\n", "model.coverage_floor: must be in [1e-6, 1]"),
    (
        '[[launches]]\nname = "x"\nyears_from_now = 1e300\n',
        "launches[0].years_from_now: must be in (1e-9, 100]",
    ),
    ("[generations.H100]\nprice_usd = 1e300\n", "generations.H100.price_usd: must be in (0, 1e6]"),
    (
        "[generations.H100]\nfinanced_fleet_gpus = 1e12\n",
        "financed_fleet_gpus: must be in [0, 1e8]",
    ),
    ("[generations.H100]\nmarket_depth_gpus_per_year = 1e300\n", "must be in (0, 1e8]"),
    ("[crypto.eth]\nprice_usd = 1e300\n", "crypto.eth.price_usd: must be in (0, 1e7]"),
    ("[crypto.btc]\nhashprice_drift = -30\n", "crypto.btc.hashprice_drift: must be in [-2, 1]"),
    ("[crypto.eth]\ndrift = 1e300\n", "crypto.eth.drift: must be in [-3, 3]"),
    ("[model]\nhaircut_slope = 1e300\n", "model.haircut_slope: must be in [0, 10]"),
    (
        '[[stress]]\nname = "s"\n[stress.rate]\nvol = 5\n',
        "stress[0].rate.vol: must be in [0, 0.1]",
    ),
]


@pytest.mark.parametrize(("text", "expected"), IMPOSSIBLE_SIZES)
def test_impossible_sizes_are_refused_before_any_work(tmp_path, text, expected):
    message = refusal(tmp_path, text)
    assert expected in message, message


def test_every_number_has_a_plausible_range():
    """One table (portfolio/document.py KEYS) holds every key; every number has a Range."""
    for path, (kind, check) in KEYS.items():
        if kind in ("number", "int") and path != "simulation.seed":
            assert isinstance(check, Range), path
    # the schema of every section is read from it
    assert set(GENERATION_KEYS) == set(default_assumptions().document["generations"]["H100"])
    assert set(SIMULATION_KEYS) == set(default_assumptions().document["simulation"])


def test_the_ranges_ends_are_accepted(tmp_path):
    text = """
[simulation]
horizon_years = 30
steps_per_year = 52
t_dof = 100
[generations.H100]
rent_vol = 2
rent_drift = -2
depreciation = 2
rent_mean_reversion = 12
[model]
beta_liquidity = 10
haircut_power = 5
coverage_floor = 1e-6
coverage_cap = 1000
[rate]
vol = 0.1
[crypto.btc]
vol = 3
drift = -3
"""
    a = load_assumptions(write(tmp_path, text))
    assert (a.steps_per_year, a.t_dof, a.params.rate_vol) == (52, 100, 0.1)


def test_a_mean_reversion_faster_than_a_period_is_refused(tmp_path):
    message = refusal(tmp_path, "[generations.H100]\nrent_mean_reversion = 6\n")
    assert "generations.H100.rent_mean_reversion: must be <= simulation.steps_per_year (4)" in (
        message
    )
    message = refusal(tmp_path, "[simulation]\nsteps_per_year = 1\n[rate]\nmean_reversion = 2\n")
    assert "rate.mean_reversion: must be <= simulation.steps_per_year (1)" in message
    # with monthly steps the same speed is fine
    text = "[simulation]\nsteps_per_year = 12\n[generations.H100]\nrent_mean_reversion = 6\n"
    assert load_assumptions(write(tmp_path, text)).params.rent_mean_reversion[1] == 6


@pytest.mark.parametrize("name", list(BUILTIN_STRESSES))
def test_builtin_stresses_stay_in_range(tmp_path, name):
    """Every built-in stress passes the ranges on the defaults and on assumptions near the
    ranges' ends (crypto-winter raises vols 30%, next-gen-glut lowers drifts, ...)."""
    stress_case(default_assumptions(), name)
    edgy = """
[generations.H100]
rent_drift = -1.8
market_depth_gpus_per_year = 1
haircut_base = 0.55
[crypto.btc]
vol = 2.2
[crypto.eth]
vol = 2.2
[rate]
level = 0.5
mean = 0.5
[[launches]]
name = "soon"
years_from_now = 0.01
price_jump = { H100 = 0.9 }
"""
    stress_case(load_assumptions(write(tmp_path, edgy)), name)


# --- files that are not assumptions files (issue 20, item 4) ----------------------------------


def test_non_regular_files_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, expected in (
        (fifo, "is not a regular file"),  # opening it for reading used to wait for a writer
        ("/dev/zero", "is not a regular file"),  # reading it used to never end
        (tmp_path, "is a directory, not a file"),
    ):
        with pytest.raises(AssumptionsError) as info:
            load_assumptions(path)
        assert f"{path}: {expected}" in str(info.value)


def test_non_utf8_and_oversized_files_are_refused(tmp_path):
    latin = tmp_path / "latin1.toml"
    latin.write_bytes("# prix en \u20ac\n[rate]\nlevel = 0.03 # caf\u00e9\n".encode("cp1252"))
    with pytest.raises(AssumptionsError, match=r"latin1\.toml: is not UTF-8 text: byte b'\\x80' "):
        load_assumptions(latin)
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)
    with pytest.raises(AssumptionsError, match=r"big\.toml: is larger than 16,777,216 bytes"):
        load_assumptions(big)


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000 + "]" * 100_000,
        "a = " + "{b = " * 100_000 + "1" + "}" * 100_000,
    ],
    ids=["arrays", "inline-tables"],
)
def test_deeply_nested_files_are_refused(tmp_path, text):
    assert "nested too deeply" in refusal(tmp_path, text)


def test_huge_values_are_shown_short(tmp_path):
    text = (
        f"[generations.H100]\nprice_usd = {'[' * 200}{']' * 200}\n[rate]\nlevel = '{'x' * 10**5}'"
    )
    message = refusal(tmp_path, text)
    assert len(message) < 1000 and "got list [[[[" in message and "got str 'xxx" in message


def test_a_message_lists_at_most_100_problems(tmp_path):
    text = "".join(f"key{i} = 1\n" for i in range(250))
    with pytest.raises(AssumptionsError) as info:
        load_assumptions(write(tmp_path, text))
    assert len(info.value.problems) == 250
    assert "250 problem(s)" in str(info.value) and "... and 150 more" in str(info.value)


def test_matrix_text_shows_generation_names_as_written(tmp_path):
    """A generation's name is the user's: control characters in it never reach the terminal."""
    text = NEW_GENERATION.replace("GB300", '"G\\u001b[2J"')
    matrix = assembled_matrix_text(load_assumptions(write(tmp_path, text)))
    assert "\x1b" not in matrix and "rent:G\\x1b[2J" in matrix
    assert len({len(line) for line in matrix.splitlines()}) == 1  # columns still line up
