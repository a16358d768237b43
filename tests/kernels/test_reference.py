"""The NumPy reference (kernels/reference.py) against docs/spec.md §2-6 closed forms.

- Factor paths: Monte Carlo means/medians against the model's expectations, shock
  correlations against the assembled matrix, the t copula's normal margins and tail dependence.
- today_metrics on a hand-built book against hand arithmetic.
- The Vasicek / Basel IRB oracle: with β's = 0, Gaussian shocks and one period the engine is
  exactly the one-factor Vasicek model (docs/spec.md §4).
- The t copula's heavier tail, sampled mode (cross-default), discounting.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import ndtr, ndtri

from conftest import uniform_book as make_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.kernels import reference as ref
from gpucredit.kernels.rng import default_uniforms_np, shock_normals_np
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.loans import loan_arrays

HOURS_PER_YEAR = 8760.0
N_SE = 4.0  # Monte Carlo tolerance of the factor-path checks
PATH_SCENARIOS = 20_000
VASICEK_SCENARIOS = 50_000
CHUNK = 10_000


# ------------------------------------------------------------------------------ helpers


def simulate(assumptions, book, scenarios: int, chunk: int = CHUNK) -> np.ndarray:
    """Loss per scenario and loan [S, N] over scenarios 0..S-1, in chunks."""
    loans = loan_arrays(book, assumptions)
    grid = assumptions.grid()
    return np.concatenate(
        [
            ref.simulate_chunk(
                assumptions.params,
                grid,
                loans,
                assumptions.seed,
                np.arange(start, min(scenarios, start + chunk)),
            )
            for start in range(0, scenarios, chunk)
        ]
    )


def shocks_for(assumptions, scenarios: int) -> np.ndarray:
    grid = assumptions.grid()
    normals = shock_normals_np(
        assumptions.seed, np.arange(scenarios), grid.periods, grid.slots_per_period
    )
    return ref.correlated_shocks(assumptions.params, grid, normals)


def paths_for(assumptions, scenarios: int) -> ref.FactorPaths:
    return ref.factor_paths(
        assumptions.params, assumptions.grid(), shocks_for(assumptions, scenarios)
    )


def quiet_overrides(
    horizon=0.25, steps=4, copula="gaussian", t_dof=5, mode="conditional", discount=False
):
    """docs/spec.md §4's Vasicek setting: no launches or generation vols, β's = 0, fixed haircut."""
    generations = default_assumptions().generations
    return {
        "launches": [],
        "simulation": {
            "horizon_years": horizon,
            "steps_per_year": steps,
            "copula": copula,
            "t_dof": t_dof,
            "mode": mode,
            "discount": discount,
        },
        "generations": {g: {"rent_vol": 0.0, "price_vol": 0.0} for g in generations},
        "model": {
            "beta_liquidity": 0.0,
            "beta_collateral": 0.0,
            "beta_refinancing": 0.0,
            "haircut_slope": 0.0,
        },
    }


def fixed_lgd_usd(assumptions, balance, rate, gpus, period, generation="H100", liq_cost=0.05):
    """ℓ(t) of a fixed-rate bullet loan when the price is deterministic (price_vol = 0)."""
    p = assumptions.params
    g = assumptions.generations.index(generation)
    dt = 1.0 / assumptions.steps_per_year
    price = p.price_usd[g] * np.exp(-p.depreciation[g] * period * dt)
    recovery = gpus * price * (1.0 - p.haircut_base[g]) * (1.0 - liq_cost)
    return max(balance * (1.0 + rate * dt) - recovery, 0.0)


def vasicek_hazard(pd_annual, rho, dt, credit):
    threshold = ndtri(1.0 - (1.0 - pd_annual) ** dt)
    return ndtr((threshold - np.sqrt(rho) * credit) / np.sqrt(1.0 - rho))


def launch_factor(assumptions, jumps: np.ndarray, period: int) -> np.ndarray:
    """[G] Π over launches with τ_e <= tΔ of (1 − J_e)."""
    dt = 1.0 / assumptions.steps_per_year
    out = np.ones(len(assumptions.generations))
    for e, tau in enumerate(assumptions.launch_years):
        if tau <= period * dt + 1e-9:
            out = out * (1.0 - jumps[e])
    return out


def order_statistic_bounds(losses: np.ndarray, alpha: float, n_se: float = 3.0):
    """(lower, point, upper) of the α quantile: ranks nα ∓ n_se √(nα(1−α)) (distribution-free)."""
    q = np.sort(losses)
    n = len(q)
    k = int(np.ceil(alpha * n)) - 1
    d = int(np.ceil(n_se * np.sqrt(n * alpha * (1.0 - alpha))))
    return q[max(k - d, 0)], q[k], q[min(k + d, n - 1)]


# ------------------------------------------------------------------------------ factor paths


@pytest.fixture(scope="module")
def default_run():
    assumptions = default_assumptions()
    shocks = shocks_for(assumptions, PATH_SCENARIOS)
    paths = ref.factor_paths(assumptions.params, assumptions.grid(), shocks)
    return assumptions, shocks, paths


def assert_mean_path(samples: np.ndarray, expected: np.ndarray, what: str):
    """samples [S, T+1, ...], expected [T+1, ...]: every period within N_SE standard errors."""
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    np.testing.assert_allclose(mean[0], expected[0], rtol=1e-12, err_msg=what)
    z = np.abs(mean[1:] - expected[1:]) / np.maximum(se[1:], 1e-300)
    assert np.all(z < N_SE), (
        f"{what}: max |z| = {z.max():.2f} at {np.unravel_index(z.argmax(), z.shape)}"
    )


def test_default_grid_has_the_launch(default_run):
    assumptions, shocks, paths = default_run
    grid = assumptions.grid()
    assert grid.periods == 12 and grid.launch_periods == (2,)  # τ = 0.5 y: period 2
    k = grid.n_factors
    assert shocks.shape == (PATH_SCENARIOS, 12, k)
    assert paths.price_usd.shape == (PATH_SCENARIOS, 13, 4)
    assert paths.base_rate.shape == (PATH_SCENARIOS, 13)


def test_price_mean_path(default_run):
    assumptions, _, paths = default_run
    p = assumptions.params
    t = np.arange(13)
    jumps = np.array([launch_factor(assumptions, p.launch_price_jump, k) for k in t])  # [T+1, G]
    expected = p.price_usd * np.exp(-p.depreciation * t[:, None] * 0.25) * jumps
    # the launch jump is applied from period 2 on, not before
    np.testing.assert_array_equal(jumps[1], 1.0)
    np.testing.assert_allclose(jumps[2], 1.0 - p.launch_price_jump[0])
    assert_mean_path(paths.price_usd, expected, "E[P_g(t)]")


def test_price_jump_is_permanent_and_exact(default_run):
    """Same shocks: ln P with and without the launch differ by exactly ln(1 − J) from τ_e on."""
    assumptions, shocks, paths = default_run
    no_launch = with_overrides(assumptions, {"launches": []})
    other = ref.factor_paths(no_launch.params, no_launch.grid(), shocks)
    diff = np.log(paths.price_usd[:100]) - np.log(other.price_usd[:100])
    jump = np.log(1.0 - assumptions.params.launch_price_jump[0])
    np.testing.assert_allclose(diff[:, :2], 0.0, atol=1e-12)
    np.testing.assert_allclose(diff[:, 2:], np.broadcast_to(jump, diff[:, 2:].shape), atol=1e-12)
    rent_ratio = paths.rent_usd_per_hour[:100] / other.rent_usd_per_hour[:100]
    rjump = 1.0 - assumptions.params.launch_rent_jump[0]
    np.testing.assert_allclose(rent_ratio[:, :2], 1.0, rtol=1e-12)
    np.testing.assert_allclose(rent_ratio[:, 2:], np.broadcast_to(rjump, rent_ratio[:, 2:].shape))


def test_crypto_and_power_mean_paths(default_run):
    assumptions, _, paths = default_run
    p = assumptions.params
    t = np.arange(13) * 0.25
    assert_mean_path(paths.btc_usd, p.btc_price_usd * np.exp(p.btc_drift * t), "E[BTC(t)]")
    assert_mean_path(paths.eth_usd, p.eth_price_usd * np.exp(p.eth_drift * t), "E[ETH(t)]")
    assert_mean_path(
        paths.power_usd_per_kwh, p.power_usd_per_kwh * np.exp(p.power_drift * t), "E[E(t)]"
    )


def test_rate_mean_and_variance_path(default_run):
    assumptions, _, paths = default_run
    p = assumptions.params
    dt = 0.25
    t = np.arange(13)
    decay = 1.0 - p.rate_mean_reversion * dt
    expected = p.rate_mean + (p.rate_level - p.rate_mean) * decay**t  # Euler-stepped OU mean
    assert_mean_path(paths.base_rate, expected, "E[r(t)]")
    # Var r(t) = σ²Δ Σ_{j<t} (1 − κΔ)^{2j}; SE of a sample variance ≈ var √(2/(n − 1))
    var = np.array([p.rate_vol**2 * dt * np.sum(decay ** (2 * np.arange(k))) for k in t])
    sample_var = paths.base_rate.var(axis=0, ddof=1)
    se = var[1:] * np.sqrt(2.0 / (PATH_SCENARIOS - 1))
    assert np.all(np.abs(sample_var[1:] - var[1:]) < N_SE * se)


def test_rent_median_path(default_run):
    assumptions, _, paths = default_run
    p = assumptions.params
    dt = 0.25
    t = np.arange(13)
    jumps = np.array([launch_factor(assumptions, p.launch_rent_jump, k) for k in t])
    trend = p.rent_usd_per_hour * np.exp(p.rent_drift * t[:, None] * dt) * jumps  # [T+1, G]
    # ln R_g(t) − ln trend = y_g(t): mean 0 and Var σ²Δ Σ_{j<t}(1 − κΔ)^{2j}
    assert_mean_path(np.log(paths.rent_usd_per_hour), np.log(trend), "E[ln R_g(t)]")
    deviation = np.log(paths.rent_usd_per_hour) - np.log(trend)
    decay = 1.0 - p.rent_mean_reversion * dt  # [G]
    var = np.array(
        [p.rent_vol**2 * dt * np.sum(decay[None] ** (2 * np.arange(k))[:, None], 0) for k in t]
    )
    se = var[1:] * np.sqrt(2.0 / (PATH_SCENARIOS - 1))
    assert np.all(np.abs(deviation.var(axis=0, ddof=1)[1:] - var[1:]) < N_SE * se)
    # the trend is the median: P(R_g(t) <= trend) = 1/2 within binomial SE
    below = (paths.rent_usd_per_hour[:, 1:] <= trend[1:]).mean(axis=0)
    assert np.all(np.abs(below - 0.5) < N_SE * np.sqrt(0.25 / PATH_SCENARIOS))


def test_credit_factor_is_a_stationary_ar1_of_the_credit_shocks(default_run):
    """Z(1) = ε(1), Z(t) = φ Z(t−1) + √(1 − φ²) ε(t) with φ = ϕ^Δ (docs/spec.md §2)."""
    assumptions, shocks, paths = default_run
    dt = 1.0 / assumptions.steps_per_year
    phi = assumptions.params.credit_persistence**dt
    eps = shocks[..., -1]
    np.testing.assert_array_equal(paths.credit[:, 0], 0.0)
    np.testing.assert_array_equal(paths.credit[:, 1], eps[:, 0])
    np.testing.assert_allclose(
        paths.credit[:, 2:], phi * paths.credit[:, 1:-1] + np.sqrt(1 - phi**2) * eps[:, 1:],
        rtol=0, atol=1e-14,
    )  # fmt: skip


def test_credit_cycle_is_standard_normal_with_annual_autocorrelation(default_run):
    """Every Z(t) has unit variance and Z(t), Z(t + m) (a year apart) correlate at ϕ, within
    N_SE standard errors of the sample moments."""
    assumptions, _, paths = default_run
    m = assumptions.steps_per_year
    z = paths.credit[:, 1:]
    n = z.shape[0]
    var_se = np.sqrt(2.0 / (n - 1))
    assert np.all(np.abs(z.var(axis=0, ddof=1) - 1.0) < N_SE * var_se)
    target = assumptions.params.credit_persistence
    for t in range(z.shape[1] - m):
        r = np.corrcoef(z[:, t], z[:, t + m])[0, 1]
        assert abs(r - target) < N_SE * (1 - target**2) / np.sqrt(n - 3), (t, r)


def test_shock_correlation_matches_assembled_matrix(default_run):
    assumptions, shocks, _ = default_run
    names = assumptions.factor_names
    sigma = assumptions.correlation_matrix()
    # spot checks of the assembled matrix against docs/spec.md §9
    ix = {name: k for k, name in enumerate(names)}
    for a, b, value in [
        ("rent:H100", "price:H100", 0.60),
        ("rent:A100", "rent:B200", 0.80),
        ("price:A100", "price:H200", 0.70),
        ("rent:H100", "price:B200", 0.45),
        ("btc", "eth", 0.82),
        ("credit", "rent:H100", 0.30),
        ("credit", "price:H200", 0.25),
        ("credit", "eth", 0.30),
        ("rate", "btc", -0.10),
        ("power", "rent:A100", 0.10),
        ("power", "price:H100", 0.0),
        ("rate", "credit", 0.0),
    ]:
        assert sigma[ix[a], ix[b]] == pytest.approx(value), (a, b)
    # every entry of the empirical correlation (pooled over scenarios and periods, all
    # independent draws) within N_SE of the matrix; SE of a correlation ≈ (1 − ρ²)/√n
    flat = shocks.reshape(-1, shocks.shape[-1])
    n = flat.shape[0]
    empirical = np.corrcoef(flat, rowvar=False)
    se = (1.0 - sigma**2) / np.sqrt(n) + 1e-12
    z = np.abs(empirical - sigma) / se
    assert z.max() < N_SE, f"max |z| = {z.max():.2f} at {np.unravel_index(z.argmax(), z.shape)}"
    # and the margins are standard normal
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=N_SE / np.sqrt(n))
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=N_SE * np.sqrt(0.5 / n))


@pytest.fixture(scope="module")
def t_copula_shocks():
    """(Gaussian ε, t-copula ε) with ν = 5, 20,000 scenarios × 12 periods each."""
    base = default_assumptions()
    t_assumptions = with_overrides(base, {"simulation": {"copula": "t", "t_dof": 5}})
    assert t_assumptions.grid().slots_per_period == t_assumptions.grid().n_factors + 5
    return base, shocks_for(base, PATH_SCENARIOS), shocks_for(t_assumptions, PATH_SCENARIOS)


def test_t_copula_margins_stay_standard_normal(t_copula_shocks):
    base, _, t_shocks = t_copula_shocks
    k = t_shocks.shape[-1]
    for factor in range(k):
        sample = t_shocks[:, 0, factor]  # one period: independent scenarios
        p_value = stats.kstest(sample, "norm").pvalue
        assert p_value > 0.01 / k, (base.factor_names[factor], p_value)  # Bonferroni over K
    pooled = t_shocks.reshape(-1, k)
    n = pooled.shape[0]
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=N_SE / np.sqrt(n))
    np.testing.assert_allclose(pooled.std(axis=0), 1.0, atol=N_SE * np.sqrt(1.0 / n))


def test_t_copula_transform_formula():
    """ε = Φ⁻¹(F_ν(y)), with the upper tail computed from the lower one (docs/spec.md §2)."""
    y = np.array([-40.0, -8.0, -1.3, 0.0, 0.7, 5.0, 12.0, 40.0])
    for nu in (1, 4, 5, 30):
        expected_lower = stats.norm.ppf(stats.t.cdf(y, nu))
        expected_upper = -stats.norm.ppf(stats.t.sf(y, nu))
        expected = np.where(y > 0, expected_upper, expected_lower)
        np.testing.assert_allclose(ref.student_t_to_normal(y, nu), expected, rtol=1e-9, atol=1e-12)
    # symmetric, so the upper tail keeps its precision
    np.testing.assert_allclose(
        ref.student_t_to_normal(np.array([30.0]), 4), -ref.student_t_to_normal(np.array([-30.0]), 4)
    )
    assert np.isfinite(ref.student_t_to_normal(np.array([1e6]), 4)).all()


@pytest.mark.parametrize(
    "pair",
    [
        ("btc", "eth"),
        ("rent:H100", "price:H100"),
        ("credit", "price:H100"),
        ("power", "price:H100"),
    ],
)
def test_t_copula_joint_extremes_more_frequent(t_copula_shocks, pair):
    base, g_shocks, t_shocks = t_copula_shocks
    names = base.factor_names
    a, b = names.index(pair[0]), names.index(pair[1])
    rho = base.correlation_matrix()[a, b]
    cut = ndtri(0.01)  # both below their 1% quantile
    gaussian_exact = stats.multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf(
        [cut, cut]
    )

    def joint(shocks):
        flat = shocks.reshape(-1, shocks.shape[-1])
        return np.mean((flat[:, a] < cut) & (flat[:, b] < cut)), flat.shape[0]

    p_gauss, n = joint(g_shocks)
    p_t, _ = joint(t_shocks)
    se_exact = np.sqrt(gaussian_exact * (1 - gaussian_exact) / n)
    assert abs(p_gauss - gaussian_exact) < N_SE * se_exact  # Gaussian copula: no tail dependence
    se_t = np.sqrt(p_t * (1 - p_t) / n)
    assert p_t > gaussian_exact + N_SE * max(se_t, se_exact), (pair, p_t, gaussian_exact)


# ------------------------------------------------------------------------------ today's metrics


def test_today_metrics_by_hand():
    assumptions = (
        default_assumptions()
    )  # Δ = 0.25, R_H100 2.2, P_H100 22000, power 0.08, r(0) 0.037
    book = make_book(
        3,
        balance_usd=[1_500_000.0, 800_000.0, 1_000.0],
        rate_type=["floating", "fixed", "fixed"],
        rate=[0.05, 0.10, 0.10],
        maturity_years=[2.0, 1.0, 1.0],
        amortization=["linear", "bullet", "bullet"],
        gpu_generation=["H100", "A100", "B200"],
        gpu_count=[100.0, 50.0, 10.0],
        collateral_share=[0.8, 1.0, 1.0],
        contracted_share=[0.5, 0.6, 0.0],
        contract_rate_usd_per_hour=[2.5, 1.0, 0.0],
        contract_years_remaining=[1.0, 0.0, 0.0],  # loan 1: contract expired today
        utilization=[0.7, 0.1, 0.7],
        power_kw_per_gpu=[0.91, 0.52, 1.30],
        other_opex_usd_per_gpu_hour=[0.1, 5.0, 0.0],
        cash_usd=[50_000.0, 0.0, 0.0],
        btc_units=[2.0, 0.0, 0.0],
        eth_units=[10.0, 0.0, 0.0],
        other_income_usd_per_year=[400_000.0, 0.0, 0.0],
        other_income_btc_share=[0.5, 0.0, 0.0],
    )
    loans = loan_arrays(book, assumptions)
    today = ref.today_metrics(assumptions.params, assumptions.grid(), loans)
    hours = 8760 * 0.25  # 2190

    # loan 0: contracted half at 2.5 $/h, the rest at 70% of 2.2 $/h
    rev0 = 100 * hours * (0.5 * 2.5 + 0.5 * 0.7 * 2.2)
    opx0 = 100 * hours * (0.91 * 0.08 + 0.1)
    noi0 = rev0 - opx0 + 400_000 * 0.25  # 504,536.8: other income today is OI Δ
    ds0 = (
        0.05 + 0.037
    ) * 0.25 * 1_500_000 + 1_500_000 * 0.25 / 2.0  # interest + linear installment
    lc0 = (50_000 + 2 * 90_000 + 10 * 3_000 + noi0) / ds0
    cv0 = 100 * 22_000 * 0.8
    assert noi0 == pytest.approx(504_536.8)
    assert today.noi_usd[0] == pytest.approx(noi0, rel=1e-12)
    assert today.debt_service_usd[0] == pytest.approx(220_125.0, rel=1e-12)
    assert today.liquidity_coverage[0] == pytest.approx(lc0, rel=1e-12)
    assert today.collateral_coverage[0] == pytest.approx(cv0 / 1_500_000, rel=1e-12)
    assert today.refinancing_coverage[0] == pytest.approx(0.6 * cv0 / 1_500_000, rel=1e-12)

    # loan 1: no contract today (k = 0), negative NOI -> LC at the floor; RF capped at 1
    noi1 = 50 * hours * (0.1 * 1.2 - 0.52 * 0.08 - 5.0)
    assert today.noi_usd[1] == pytest.approx(noi1, rel=1e-12)
    assert today.debt_service_usd[1] == pytest.approx(0.10 * 0.25 * 800_000, rel=1e-12)
    assert today.liquidity_coverage[1] == pytest.approx(0.01)
    assert today.collateral_coverage[1] == pytest.approx(50 * 9_000 / 800_000, rel=1e-12)
    assert today.refinancing_coverage[1] == pytest.approx(min(0.6 * 50 * 9_000 / 800_000, 1.0))

    # loan 2: tiny balance -> LC and CC at the cap (5), RF = 1
    assert today.liquidity_coverage[2] == pytest.approx(5.0)
    assert today.collateral_coverage[2] == pytest.approx(5.0)
    assert today.refinancing_coverage[2] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ Vasicek oracle

VASICEK_CASES = [(0.02, 0.12), (0.05, 0.24), (0.10, 0.06)]
VASICEK_LOANS = 200
VASICEK_LTV = 0.9


def vasicek_book(pd_annual, rho, n=VASICEK_LOANS):
    return make_book(
        n,
        balance_usd=VASICEK_LTV * 100 * 22_000.0,
        gpu_count=100.0,
        pd_annual=pd_annual,
        asset_correlation=rho,
        maturity_years=5.0,
        amortization="bullet",
    )


@pytest.fixture(scope="module")
def vasicek_assumptions():
    return with_overrides(default_assumptions(), quiet_overrides())


@pytest.mark.parametrize(("pd_annual", "rho"), VASICEK_CASES)
def test_vasicek_one_period(vasicek_assumptions, pd_annual, rho):
    assumptions = vasicek_assumptions
    assert assumptions.grid().periods == 1 and assumptions.grid().launch_periods == ()
    dt = 0.25
    lgd = fixed_lgd_usd(assumptions, VASICEK_LTV * 100 * 22_000.0, 0.08, 100.0, 1)
    assert lgd > 0
    per_loan = simulate(assumptions, vasicek_book(pd_annual, rho), VASICEK_SCENARIOS)
    np.testing.assert_allclose(per_loan, per_loan[:, :1] * np.ones_like(per_loan), rtol=1e-12)
    loss = per_loan.sum(axis=1)
    pd_period = 1.0 - (1.0 - pd_annual) ** dt
    total_lgd = VASICEK_LOANS * lgd

    # scenario by scenario, the conditional loss is N ℓ Φ((Φ⁻¹(p^Δ) − √ρ Z)/√(1 − ρ))
    credit = paths_for(assumptions, VASICEK_SCENARIOS).credit[:, 1]
    np.testing.assert_allclose(
        loss, total_lgd * vasicek_hazard(pd_annual, rho, dt, credit), rtol=1e-9
    )

    # EL = N ℓ p^Δ within 3 SE
    el = total_lgd * pd_period
    se = loss.std(ddof=1) / np.sqrt(VASICEK_SCENARIOS)
    assert abs(loss.mean() - el) < 3.0 * se, (loss.mean(), el, se)

    # VaR_α = N ℓ Φ((Φ⁻¹(p^Δ) + √ρ Φ⁻¹(α))/√(1 − ρ)): P(L <= VaR) = α within 3 binomial SE
    for alpha in (0.99, 0.999):
        var = total_lgd * ndtr(
            (ndtri(pd_period) + np.sqrt(rho) * ndtri(alpha)) / np.sqrt(1.0 - rho)
        )
        coverage = np.mean(loss <= var)
        assert abs(coverage - alpha) < 3.0 * np.sqrt(alpha * (1 - alpha) / VASICEK_SCENARIOS), (
            alpha,
            coverage,
        )
        lower, _, upper = order_statistic_bounds(loss, alpha)
        assert lower <= var <= upper


def test_vasicek_one_year_one_step():
    """The same oracle on horizon 1 y, 1 step a year (p^Δ = p)."""
    assumptions = with_overrides(default_assumptions(), quiet_overrides(horizon=1, steps=1))
    pd_annual, rho = 0.04, 0.2
    lgd = fixed_lgd_usd(assumptions, VASICEK_LTV * 100 * 22_000.0, 0.08, 100.0, 1)
    loss = simulate(assumptions, vasicek_book(pd_annual, rho, n=20), 20_000).sum(axis=1)
    el = 20 * lgd * pd_annual
    assert abs(loss.mean() - el) < 3.0 * loss.std(ddof=1) / np.sqrt(len(loss))
    var = 20 * lgd * ndtr((ndtri(pd_annual) + np.sqrt(rho) * ndtri(0.999)) / np.sqrt(1 - rho))
    assert abs(np.mean(loss <= var) - 0.999) < 3.0 * np.sqrt(0.999 * 0.001 / len(loss))


def test_t_copula_keeps_one_factor_vasicek():
    """With the loss a function of Z alone, the t copula changes nothing in law: Z stays N(0, 1)."""
    assumptions = with_overrides(default_assumptions(), quiet_overrides(copula="t", t_dof=4))
    pd_annual, rho = 0.05, 0.24
    dt = 0.25
    lgd = fixed_lgd_usd(assumptions, VASICEK_LTV * 100 * 22_000.0, 0.08, 100.0, 1)
    loss = simulate(assumptions, vasicek_book(pd_annual, rho, n=20), VASICEK_SCENARIOS).sum(axis=1)
    pd_period = 1.0 - (1.0 - pd_annual) ** dt
    el = 20 * lgd * pd_period
    assert abs(loss.mean() - el) < 3.0 * loss.std(ddof=1) / np.sqrt(len(loss))
    var = 20 * lgd * ndtr((ndtri(pd_period) + np.sqrt(rho) * ndtri(0.999)) / np.sqrt(1 - rho))
    assert abs(np.mean(loss <= var) - 0.999) < 3.0 * np.sqrt(0.999 * 0.001 / len(loss))


def test_t_copula_heavier_tail():
    """Same book and correlations, the collateral channel on (price vol, β_C = 1): with ν = 4
    crashes of Z and of GPU prices come together, so the 99.9% loss quantile is higher."""
    overrides = {
        "launches": [],
        "simulation": {"horizon_years": 1, "steps_per_year": 1},
        "model": {
            "beta_liquidity": 0.0,
            "beta_collateral": 1.0,
            "beta_refinancing": 0.0,
            "haircut_slope": 0.0,
        },
    }
    gaussian = with_overrides(default_assumptions(), overrides)
    overrides["simulation"] = {**overrides["simulation"], "copula": "t", "t_dof": 4}
    student = with_overrides(default_assumptions(), overrides)
    np.testing.assert_array_equal(gaussian.correlation_matrix(), student.correlation_matrix())
    book = make_book(20, balance_usd=100 * 22_000.0, pd_annual=0.05, asset_correlation=0.2)
    loss_g = simulate(gaussian, book, VASICEK_SCENARIOS).sum(axis=1)
    loss_t = simulate(student, book, VASICEK_SCENARIOS).sum(axis=1)
    _, var_g, upper_g = order_statistic_bounds(loss_g, 0.999)
    lower_t, var_t, _ = order_statistic_bounds(loss_t, 0.999)
    assert lower_t > upper_g, (var_g, var_t)


# ------------------------------------------------------------------------------ sampled mode


def test_sampled_mode_default_frequency_and_cross_default():
    assumptions = with_overrides(
        default_assumptions(), quiet_overrides(horizon=1, steps=4, mode="sampled")
    )
    # β's = 0: hazards depend on Z alone. Loans 0 and 1 share a borrower; 2 and 3 are twins of
    # them with their own borrowers; 4 and 5 other hazards. LTV 1.2: every default loses.
    pds = np.array([0.08, 0.08, 0.08, 0.08, 0.15, 0.02])
    rhos = np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.3])
    book = make_book(
        6,
        borrower_id=["A", "A", "B", "C", "D", "E"],
        balance_usd=1.2 * 100 * 22_000.0,
        pd_annual=pds,
        asset_correlation=rhos,
    )
    scenarios = 20_000
    loss = simulate(assumptions, book, scenarios)
    default = loss > 0.0

    dt = 0.25
    credit = paths_for(assumptions, scenarios).credit[:, 1:]  # [S, T]
    hazard = vasicek_hazard(pds[None, None], rhos[None, None], dt, credit[..., None])  # [S, T, N]
    survival = np.cumprod(1.0 - hazard, axis=1)
    cumulative = 1.0 - survival  # 1 − S_i(t)

    # the frequency over scenarios matches E[1 − S_i(T)], SE² = E[S(1 − S)]/n
    expected = cumulative[:, -1].mean(axis=0)
    se = np.sqrt((survival[:, -1] * cumulative[:, -1]).mean(axis=0) / scenarios)
    assert np.all(np.abs(default.mean(axis=0) - expected) < N_SE * se), (default.mean(0), expected)

    # exact: loan i defaults in the first t with 1 − S_i(t) >= U_b, and loses ℓ_i(t)
    uniforms = default_uniforms_np(assumptions.seed, np.arange(scenarios), 5)
    u = uniforms[:, [0, 0, 1, 2, 3, 4]]
    crossed = cumulative >= u[:, None, :]
    period = np.where(crossed.any(axis=1), crossed.argmax(axis=1) + 1, 0)  # [S, N]
    lgd_by_period = np.array(
        [fixed_lgd_usd(assumptions, 1.2 * 100 * 22_000.0, 0.08, 100.0, t) for t in range(5)]
    )
    np.testing.assert_allclose(loss, np.where(period > 0, lgd_by_period[period], 0.0), rtol=1e-10)

    # cross-default: a borrower's twin loans fail together; different borrowers do not
    np.testing.assert_array_equal(default[:, 0], default[:, 1])
    both_same = np.mean(default[:, 0] & default[:, 1])
    both_other = np.mean(default[:, 2] & default[:, 3])
    se_diff = np.sqrt((both_same * (1 - both_same) + both_other * (1 - both_other)) / scenarios)
    assert both_same > both_other + N_SE * se_diff
    # conditional independence given the paths: P(2 and 3) = E[(1 − S)²]
    joint = (cumulative[:, -1, 2] * cumulative[:, -1, 3]).mean()
    assert abs(both_other - joint) < N_SE * np.sqrt(joint / scenarios)


def test_sampled_mean_matches_conditional_mode():
    """E over the uniforms of the sampled loss is the conditional loss (same paths)."""
    overrides = quiet_overrides(horizon=1, steps=4)
    conditional = with_overrides(default_assumptions(), overrides)
    overrides["simulation"]["mode"] = "sampled"
    sampled = with_overrides(default_assumptions(), overrides)
    book = make_book(10, balance_usd=100 * 22_000.0, pd_annual=0.1, asset_correlation=0.15)
    lc = simulate(conditional, book, 20_000).sum(axis=1)
    ls = simulate(sampled, book, 20_000).sum(axis=1)
    se = (ls - lc).std(ddof=1) / np.sqrt(len(lc))
    assert abs(ls.mean() - lc.mean()) < N_SE * se


# ------------------------------------------------------------------------------ discounting


def test_discount_one_period_is_the_manual_discount_factor():
    plain = with_overrides(default_assumptions(), quiet_overrides())
    discounted = with_overrides(default_assumptions(), quiet_overrides(discount=True))
    assert discounted.grid().discount
    book = vasicek_book(0.05, 0.2, n=10)
    scenarios = 5_000
    loss = simulate(plain, book, scenarios)
    loss_df = simulate(discounted, book, scenarios)
    rate = paths_for(discounted, scenarios).base_rate[:, 1]
    assert np.all(rate > 0)
    np.testing.assert_allclose(loss_df, loss * np.exp(-rate * 0.25)[:, None], rtol=1e-12)
    assert np.all(loss_df < loss)


def test_discount_multi_period_by_hand():
    """L = Σ_t DF(t) S(t−1) h(t) ℓ(t), DF(t) = exp(−Σ_{s<=t} r(s)Δ), over 4 periods."""
    plain = with_overrides(default_assumptions(), quiet_overrides(horizon=1, steps=4))
    discounted = with_overrides(
        default_assumptions(), quiet_overrides(horizon=1, steps=4, discount=True)
    )
    pd_annual, rho, n = 0.06, 0.18, 5
    book = vasicek_book(pd_annual, rho, n=n)
    scenarios = 5_000
    loss = simulate(plain, book, scenarios).sum(axis=1)
    loss_df = simulate(discounted, book, scenarios).sum(axis=1)

    paths = paths_for(discounted, scenarios)
    hazard = vasicek_hazard(pd_annual, rho, 0.25, paths.credit[:, 1:])  # [S, 4]
    survival_before = np.cumprod(
        np.concatenate([np.ones((scenarios, 1)), 1 - hazard[:, :-1]], 1), 1
    )
    lgd = np.array(
        [
            fixed_lgd_usd(discounted, VASICEK_LTV * 100 * 22_000.0, 0.08, 100.0, t)
            for t in range(1, 5)
        ]
    )
    df = np.exp(-np.cumsum(paths.base_rate[:, 1:] * 0.25, axis=1))
    np.testing.assert_allclose(loss, n * (survival_before * hazard * lgd).sum(axis=1), rtol=1e-10)
    np.testing.assert_allclose(
        loss_df, n * (df * survival_before * hazard * lgd).sum(axis=1), rtol=1e-10
    )
    assert np.all(loss_df < loss)
