"""Model validation evidence (`gpucredit validate-model`): the checks a model-risk team reruns.

Every check is a pure function of its inputs that returns `Check` records
{name, group, passed, values, tolerance, why_tolerance, details}. Tolerances come either from
Monte Carlo standard errors (a statistical check passes when the estimate lies within k
standard errors of the closed form, k chosen so the whole family of comparisons has a 1%
false-alarm rate) or from floating-point arguments (float64 agreement to 1e-9 relative, ...),
and each record says which and why.

Groups, in the order they run:
  vasicek       the one-factor Vasicek / Basel IRB limit (EL, VaR, ES at several α and
                PD/ρ pairs) against closed forms, Gaussian and Student-t copula
  reference     JAX float64 against the NumPy reference, scenario by scenario
  precision     float32 against float64
  invariance    chunk size and scenario offset do not change any loss
  gradients     reverse-mode AD (EL and ES sensitivities) against central finite differences
  euler         Euler contributions add up to EL and ES
  convergence   VaR/ES (and EL) with their intervals against the scenario count: the 1/√S rate
  t_copula      stability under the Student-t copula (normal margins in the far tails,
                finite gradients, heavier joint tails)

`run_validation(base, quick, seed)` runs them all. This module never imports gpucredit.io:
the caller passes the base assumptions (the embedded defaults) in.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, stats
from scipy.special import ndtr, ndtri

from gpucredit import __version__
from gpucredit.kernels import reference
from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.assumptions import Assumptions, bumped_parameter, parameter_paths
from gpucredit.portfolio.book import Book, feature_book, uniform_book
from gpucredit.portfolio.contributions import tail_loan_contributions
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import MIN_BATCHES, alpha_key, risk_measures, var_es

__all__ = [
    "Check",
    "ValidationRun",
    "ValidationSettings",
    "bonferroni_multiplier",
    "closed_form_check",
    "run_validation",
    "validation_book",
    "vasicek_assumptions",
    "vasicek_book",
    "vasicek_closed_forms",
    "validation_settings",
]

FAMILY_FALSE_ALARM = 0.01  # probability that a correct model fails a statistical family
N_BATCHES = MIN_BATCHES  # batch means, as in every run (docs/spec.md §7)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Check:
    """One piece of evidence. `values` holds the numbers compared (JSON-ready), `tolerance`
    the rule applied in words and symbols, `why_tolerance` the argument for it."""

    name: str
    group: str
    passed: bool
    values: dict
    tolerance: str
    why_tolerance: str
    details: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "passed": bool(self.passed),
            "values": _jsonable(self.values),
            "tolerance": self.tolerance,
            "why_tolerance": self.why_tolerance,
            "details": self.details,
        }


def _jsonable(value):
    """Floats stay floats, non-finite numbers become None, arrays become lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        return x if math.isfinite(x) else None
    return value


@dataclass(frozen=True)
class ValidationSettings:
    """How much evidence to gather. `validation_settings(quick)` gives the two standard forms."""

    quick: bool
    seed: int
    vasicek_cases: tuple[tuple[float, float], ...]  # (annual PD, asset correlation)
    vasicek_alphas: tuple[float, ...]
    vasicek_scenarios: int
    vasicek_t_cases: tuple[tuple[float, float], ...]  # the same under the t copula
    vasicek_t_alphas: tuple[float, ...]
    vasicek_t_scenarios: int
    vasicek_t_dof: int
    book_loans: int
    chunk: int  # scenarios per chunk of the workhorse runs (one compiled shape)
    reference_scenarios: int
    reference_sampled_t: bool  # also compare sampled mode under the t copula
    gradient_scenarios: int
    gradient_alpha: float
    gradient_parameters: tuple[str, ...]
    t_gradient_parameters: tuple[str, ...]
    euler_scenarios: int
    euler_alphas: tuple[float, ...]
    convergence_scenarios: int  # the largest S; smaller ones are S / 2^j
    convergence_points: int
    convergence_alphas: tuple[float, ...]
    convergence_t_scenarios: int  # 0: no convergence run under the t copula
    convergence_t_alphas: tuple[float, ...]
    t_dof: int
    margin_scenarios: int
    calibration_path_scenarios: int  # factor paths for the AR(1) lag correlations
    calibration_scenarios: int  # the example book's year-1 and horizon default rates


_GRADIENT_PARAMETERS_QUICK = (
    "generations.H100.depreciation",
    "generations.A100.rent_drift",
    "generations.H200.price_vol",
    "generations.B200.market_depth_gpus_per_year",
    "launches.next-gen.price_jump.H100",
    "model.beta_liquidity",
    "model.beta_collateral",
    "model.haircut_slope",
    "model.refi_ltv",
    "crypto.btc.vol",
    "correlation.rent:H100~price:H100",
    "correlation.price:H100~credit",
)
_GRADIENT_PARAMETERS_FULL = _GRADIENT_PARAMETERS_QUICK + (
    "generations.H100.rent_usd_per_hour",
    "generations.H200.rent_vol",
    "generations.A100.rent_mean_reversion",
    "generations.B200.price_usd",
    "generations.H100.haircut_base",
    "launches.next-gen.rent_jump.A100",
    "crypto.eth.price_usd",
    "power.usd_per_kwh",
    "rate.level",
    "rate.vol",
    "model.beta_refinancing",
    "model.haircut_power",
    "correlation.btc~credit",
    "correlation.rent:A100~rent:B200",
)


def validation_settings(quick: bool, seed: int = 0) -> ValidationSettings:
    """The quick form (about a minute on 2 CPU cores, run by `make test`) or the full form
    (about ten minutes: more PD/ρ pairs and α's, more scenarios, every check larger)."""
    if quick:
        return ValidationSettings(
            quick=True,
            seed=seed,
            vasicek_cases=((0.005, 0.24), (0.02, 0.15), (0.10, 0.12)),
            vasicek_alphas=(0.99, 0.999),
            vasicek_scenarios=327_680,  # 10 scenarios beyond VaR_0.999 per batch
            vasicek_t_cases=((0.02, 0.15),),
            vasicek_t_alphas=(0.99,),
            vasicek_t_scenarios=32_768,  # 10 scenarios beyond VaR_0.99 per batch
            vasicek_t_dof=4,
            book_loans=48,
            chunk=2048,
            reference_scenarios=2048,
            reference_sampled_t=False,
            gradient_scenarios=1024,
            gradient_alpha=0.95,
            gradient_parameters=_GRADIENT_PARAMETERS_QUICK,
            t_gradient_parameters=(),
            euler_scenarios=4096,
            euler_alphas=(0.99, 0.999),
            convergence_scenarios=131_072,
            convergence_points=6,
            convergence_alphas=(0.95, 0.99),
            convergence_t_scenarios=0,
            convergence_t_alphas=(),
            t_dof=3,
            margin_scenarios=2048,
            calibration_path_scenarios=65_536,
            calibration_scenarios=8_192,
        )
    return ValidationSettings(
        quick=False,
        seed=seed,
        vasicek_cases=(
            (0.001, 0.24),
            (0.005, 0.20),
            (0.02, 0.15),
            (0.05, 0.12),
            (0.10, 0.12),
            (0.20, 0.03),
        ),
        vasicek_alphas=(0.95, 0.99, 0.995, 0.999, 0.9995),
        vasicek_scenarios=1_280_000,  # 20 scenarios beyond VaR_0.9995 per batch
        vasicek_t_cases=((0.005, 0.20), (0.02, 0.15), (0.10, 0.12)),
        vasicek_t_alphas=(0.99, 0.999),
        vasicek_t_scenarios=327_680,
        vasicek_t_dof=4,
        book_loans=200,
        chunk=8192,
        reference_scenarios=8192,
        reference_sampled_t=True,
        gradient_scenarios=4096,
        gradient_alpha=0.99,
        gradient_parameters=_GRADIENT_PARAMETERS_FULL,
        t_gradient_parameters=(
            "generations.H100.depreciation",
            "model.beta_collateral",
            "model.haircut_slope",
            "correlation.price:H100~credit",
        ),
        euler_scenarios=65_536,
        euler_alphas=(0.99, 0.995, 0.999),
        convergence_scenarios=2_097_152,
        convergence_points=9,
        convergence_alphas=(0.99, 0.999),
        convergence_t_scenarios=262_144,
        convergence_t_alphas=(0.99,),  # 0.999 needs > 10^6 t-copula scenarios for the fit
        t_dof=3,
        margin_scenarios=16_384,
        calibration_path_scenarios=262_144,
        calibration_scenarios=100_000,
    )


@dataclass(frozen=True)
class ValidationRun:
    """Every check, the settings and the run's metadata (what the report writes)."""

    checks: tuple[Check, ...]
    settings: ValidationSettings
    metadata: dict

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        groups: dict[str, dict[str, int]] = {}
        for c in self.checks:
            g = groups.setdefault(c.group, {"checks": 0, "failed": 0})
            g["checks"] += 1
            g["failed"] += int(not c.passed)
        return {
            "passed": self.passed,
            "n_checks": len(self.checks),
            "n_failed": len(self.failed),
            "groups": groups,
            "metadata": _jsonable(self.metadata),
            "settings": _jsonable(dataclasses.asdict(self.settings)),
            "checks": [c.to_dict() for c in self.checks],
        }


# --------------------------------------------------------------------------- statistics


def bonferroni_multiplier(n_comparisons: int, n_batches: int = N_BATCHES) -> float:
    """k such that |estimate − truth| <= k SE fails a correct model with probability
    FAMILY_FALSE_ALARM / n_comparisons each (Bonferroni), the SE being a batch-means
    estimate with n_batches − 1 degrees of freedom (Student t)."""
    level = FAMILY_FALSE_ALARM / (2.0 * max(int(n_comparisons), 1))
    return float(stats.t.ppf(1.0 - level, n_batches - 1))


def normal_multiplier(n_comparisons: int) -> float:
    """The same for a statistic whose standard error is known (normal), two-sided."""
    return float(ndtri(1.0 - FAMILY_FALSE_ALARM / (2.0 * max(int(n_comparisons), 1))))


def closed_form_check(
    name: str,
    group: str,
    estimate: float,
    standard_error: float,
    closed_form: float,
    multiplier: float,
    n_comparisons: int,
    details: str = "",
) -> Check:
    """|estimate − closed form| <= multiplier × SE (a Monte Carlo estimate against truth)."""
    diff = float(estimate) - float(closed_form)
    se = float(standard_error)
    ok = bool(math.isfinite(diff) and math.isfinite(se) and se > 0 and abs(diff) <= multiplier * se)
    return Check(
        name=name,
        group=group,
        passed=ok,
        values={
            "estimate": estimate,
            "closed_form": closed_form,
            "standard_error": se,
            "z": diff / se if se > 0 else float("nan"),
            "ci95": [estimate - 1.96 * se, estimate + 1.96 * se],
            "multiplier": multiplier,
        },
        tolerance=f"|estimate − closed form| ≤ {multiplier:.2f} SE",
        why_tolerance=(
            f"Monte Carlo error: the SE is the run's own batch-means standard error "
            f"({N_BATCHES} batches, t with {N_BATCHES - 1} d.f.). {multiplier:.2f} SE is the "
            f"two-sided Bonferroni bound for {n_comparisons} comparisons at a "
            f"{FAMILY_FALSE_ALARM:.0%} family-wise false-alarm rate: a correct engine fails "
            f"this family at most 1 time in 100 seeds, while a bias of a few SE is caught."
        ),
        details=details,
    )


def relative_agreement_check(
    name: str,
    group: str,
    actual: np.ndarray,
    expected: np.ndarray,
    rtol: float,
    atol: float,
    why: str,
    details: str = "",
    extra: dict | None = None,
) -> Check:
    """Elementwise |actual − expected| <= rtol |expected| + atol."""
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    err = np.abs(actual - expected)
    bound = rtol * np.abs(expected) + atol
    ok = bool(
        actual.shape == expected.shape and np.all(np.isfinite(actual)) and np.all(err <= bound)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(expected) > 0, err / np.abs(expected), np.where(err > 0, np.inf, 0))
    values = {
        "n_compared": int(expected.size),
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "max_rel_error": float(rel.max()) if rel.size else 0.0,
        "max_error_over_bound": float((err / bound).max()) if err.size else 0.0,
        "rtol": rtol,
        "atol": atol,
    }
    values.update(extra or {})
    return Check(
        name=name,
        group=group,
        passed=ok,
        values=values,
        tolerance=f"|a − b| ≤ {rtol:g}·|b| + {atol:.3g} elementwise",
        why_tolerance=why,
        details=details,
    )


# --------------------------------------------------------------------------- books


def validation_book(n_loans: int, seed: int = 2026) -> Book:
    """A book that exercises every mechanism of docs/spec.md §3-6 (`feature_book`) with LTVs from
    40% to 110% and about three loans for every two borrowers."""
    return feature_book(
        n_loans, seed, ltv=(0.4, 1.1), rate=(0.02, 0.13), borrowers=(2 * n_loans) // 3,
        source=f"<validation book: {n_loans} loans, seed {seed}>",
    )  # fmt: skip


# --------------------------------------------------------------------------- Vasicek


VASICEK_LOANS = 8
VASICEK_GPUS = 100.0
VASICEK_LTV = 0.9
VASICEK_RATE = 0.08


def vasicek_assumptions(base: Assumptions, copula: str = "gaussian", t_dof: int = 4) -> Assumptions:
    """docs/spec.md §4's Vasicek setting: one period of one year (p^Δ = p, Basel's horizon), no
    launches, no rent or price volatility, β's = 0 and a haircut that ignores volume, so that
    the conditional loss is N ℓ Φ((Φ⁻¹(p) − √ρ Z)/√(1 − ρ)) with a deterministic ℓ."""
    g = len(base.generations)
    params = base.params._replace(
        rent_vol=np.zeros(g),
        price_vol=np.zeros(g),
        launch_price_jump=np.zeros((0, g)),
        launch_rent_jump=np.zeros((0, g)),
        beta_liquidity=0.0,
        beta_collateral=0.0,
        beta_refinancing=0.0,
        haircut_slope=0.0,
    )
    return dataclasses.replace(
        base,
        params=params,
        launch_names=(),
        launch_years=(),
        horizon_years=1.0,
        steps_per_year=1,
        copula=copula,
        t_dof=int(t_dof),
        discount=False,
        mode="conditional",
        stresses=(),
    )


def vasicek_book(pd_annual: float, rho: float, n: int = VASICEK_LOANS) -> Book:
    """n identical fixed-rate bullet loans on H100s, maturity after the one-year horizon."""
    return uniform_book(
        n,
        f"<Vasicek book: PD {pd_annual}, rho {rho}>",
        balance_usd=VASICEK_LTV * VASICEK_GPUS * 22_000.0,
        gpu_count=VASICEK_GPUS,
        pd_annual=pd_annual,
        asset_correlation=rho,
        rate=VASICEK_RATE,
        maturity_years=5.0,
    )


def vasicek_loss_given_default(assumptions: Assumptions, book: Book) -> float:
    """ℓ of the Vasicek book's loan in period 1 (deterministic: no price vol, fixed haircut)."""
    p = assumptions.params
    g = assumptions.generations.index(str(book.gpu_generation[0]))
    dt = 1.0 / assumptions.steps_per_year
    price = float(p.price_usd[g]) * math.exp(-float(p.depreciation[g]) * dt)
    recovery = (
        book.gpu_count[0]
        * book.collateral_share[0]
        * price
        * (1.0 - float(p.haircut_base[g]))
        * (1.0 - book.liquidation_cost[0])
    )
    exposure = book.balance_usd[0] * (1.0 + book.rate[0] * dt)
    return float(max(exposure - recovery, 0.0))


def vasicek_closed_forms(
    total_lgd_usd: float, pd: float, rho: float, alphas: Sequence[float]
) -> dict[str, float]:
    """EL, VaR_α and ES_α of L = W Φ((Φ⁻¹(p) − √ρ Z)/√(1 − ρ)), Z ~ N(0, 1), W = N ℓ.

    VaR_α = W Φ((Φ⁻¹(p) + √ρ Φ⁻¹(α))/√(1 − ρ))  (Vasicek 2002; the Basel IRB formula);
    ES_α  = W/(1 − α) ∫_{Φ⁻¹(α)}^∞ Φ((Φ⁻¹(p) + √ρ z)/√(1 − ρ)) φ(z) dz (adaptive quadrature).
    """
    c = float(ndtri(pd))
    a, b = math.sqrt(rho), math.sqrt(1.0 - rho)
    out = {"el": total_lgd_usd * pd}
    for alpha in alphas:
        za = float(ndtri(alpha))
        out[f"var_{alpha_key(alpha)}"] = total_lgd_usd * float(ndtr((c + a * za) / b))
        integral, _ = integrate.quad(
            lambda z: ndtr((c + a * z) / b) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
            za,
            np.inf,
            epsabs=0.0,
            epsrel=1e-12,
            limit=200,
        )
        out[f"es_{alpha_key(alpha)}"] = total_lgd_usd * integral / (1.0 - alpha)
    return out


def _jax_losses(book, assumptions, scenarios, seed, precision, chunk, mode=None) -> np.ndarray:
    """Portfolio loss [scenarios]: pass 1 of the JAX backend, as a run computes it."""
    from gpucredit.portfolio.backends import JaxBackend
    from gpucredit.portfolio.runner import run_pass1

    loans = loan_arrays(book, assumptions)
    backend = JaxBackend(assumptions.params, assumptions.grid(mode), loans, seed, precision)
    return run_pass1(backend, scenarios, chunk, len(book)).losses_usd


def vasicek_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """EL, VaR_α, ES_α of the one-factor limit against closed forms, for every PD/ρ pair, under
    the Gaussian copula and the Student-t copula (the loss depends on Z alone and Z stays
    N(0, 1) under the t copula, so the same closed forms hold)."""
    checks = []
    copulas = (
        ("gaussian", 0, s.vasicek_cases, s.vasicek_alphas, s.vasicek_scenarios),
        ("t", s.vasicek_t_dof, s.vasicek_t_cases, s.vasicek_t_alphas, s.vasicek_t_scenarios),
    )
    n_comparisons = sum((1 + 2 * len(alphas)) * len(cases) for _, _, cases, alphas, _ in copulas)
    k = bonferroni_multiplier(n_comparisons)
    for copula, dof, cases, alphas, scenarios in copulas:
        assumptions = vasicek_assumptions(base, copula, dof or 4)
        chunk = min(scenarios, 65_536)
        for pd, rho in cases:
            book = vasicek_book(pd, rho)
            lgd = vasicek_loss_given_default(assumptions, book)
            truth = vasicek_closed_forms(len(book) * lgd, pd, rho, alphas)
            losses = _jax_losses(book, assumptions, scenarios, s.seed, "float32", chunk)
            m = risk_measures(losses, None, alphas, N_BATCHES)
            label = f"{'Gaussian' if copula == 'gaussian' else f't{dof}'} PD={pd:g} rho={rho:g}"
            details = (
                f"{len(book)} identical loans, ℓ = {lgd:,.0f} USD each, {scenarios:,} "
                f"scenarios, seed {s.seed}, JAX float32 (the default precision)"
            )
            checks.append(
                closed_form_check(
                    f"vasicek {label} EL",
                    "vasicek",
                    m.el,
                    m.el_se,
                    truth["el"],
                    k,
                    n_comparisons,
                    details,
                )
            )
            for t in m.tail:
                key = alpha_key(t.alpha)
                checks.append(
                    closed_form_check(
                        f"vasicek {label} VaR {key}",
                        "vasicek",
                        t.var,
                        t.var_se,
                        truth[f"var_{key}"],
                        k,
                        n_comparisons,
                        details + f"; {t.tail_scenarios_per_batch:.1f} tail scenarios per batch",
                    )
                )
                checks.append(
                    closed_form_check(
                        f"vasicek {label} ES {key}",
                        "vasicek",
                        t.es,
                        t.es_se,
                        truth[f"es_{key}"],
                        k,
                        n_comparisons,
                        details + f"; {t.tail_scenarios_per_batch:.1f} tail scenarios per batch",
                    )
                )
    return checks


# --------------------------------------------------------------------------- engines


def _jax_backend(
    assumptions: Assumptions,
    loans,
    seed: int,
    precision: str,
    mode: str | None = None,
    params: ModelParams | None = None,
    grid=None,
):
    from gpucredit.portfolio.backends import JaxBackend

    return JaxBackend(
        assumptions.params if params is None else params,
        grid if grid is not None else assumptions.grid(mode),
        loans,
        seed,
        precision,
    )


def _pass1(backend, scenarios: int, chunk: int, n_loans: int):
    from gpucredit.portfolio.runner import run_pass1

    return run_pass1(backend, scenarios, chunk, n_loans)


REFERENCE_RTOL = 1e-9
REFERENCE_WHY = (
    "Floating point: both sides are float64 (unit roundoff 1.1e-16) and evaluate the same "
    "equations in a different order (blocked sums, log-space collateral coverage) with "
    "different Φ, Φ⁻¹ and betainc implementations (XLA against Cephes), each good to ~1e-15 "
    "relative. The hazard's condition number |zφ(z)/Φ(z)| stays below ~40 and survival "
    "compounds over at most T periods, so honest rounding stays below ~1e-12; 1e-9 leaves "
    "a 1000× margin while any modelling difference (a missing term, a period off by one, a "
    "wrong default time) moves losses by 1e-4 or more. The absolute floor, 1e-9 × the mean "
    "loss, covers scenarios whose loss is nearly zero."
)


def reference_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """JAX float64 against the NumPy reference on the same Threefry numbers: per-scenario
    portfolio losses and the per-loan sums (EL_i, horizon PD, defaulted exposure)."""
    from gpucredit.portfolio.backends import NumpyBackend

    book = validation_book(s.book_loans)
    checks = []
    variants = (
        ("conditional, Gaussian", "conditional", {}),
        ("sampled, Gaussian", "sampled", {}),
        (
            f"conditional, t copula ν={s.t_dof}, discounted",
            "conditional",
            {"copula": "t", "t_dof": s.t_dof, "discount": True},
        ),
        (f"sampled, t copula ν={s.t_dof}", "sampled", {"copula": "t", "t_dof": s.t_dof}),
    )
    if not s.reference_sampled_t:
        variants = variants[:3]
    for label, mode, overrides in variants:
        assumptions = dataclasses.replace(base, **overrides) if overrides else base
        loans = loan_arrays(book, assumptions)
        grid = assumptions.grid(mode)
        jx = _jax_backend(assumptions, loans, s.seed, "float64", grid=grid).run_chunk(
            0, s.reference_scenarios
        )
        ref = NumpyBackend(assumptions.params, grid, loans, s.seed)
        parts = [
            ref.run_chunk(a, min(1024, s.reference_scenarios - a))
            for a in range(0, s.reference_scenarios, 1024)
        ]
        ref_losses = np.concatenate([p.losses_usd for p in parts])
        atol = REFERENCE_RTOL * max(float(np.mean(np.abs(ref_losses))), 1.0)
        details = (
            f"{s.book_loans}-loan validation book, default assumptions, scenarios "
            f"0..{s.reference_scenarios - 1}, seed {s.seed}"
        )
        checks.append(
            relative_agreement_check(
                f"JAX float64 = NumPy reference per scenario ({label})",
                "reference",
                jx.losses_usd,
                ref_losses,
                REFERENCE_RTOL,
                atol,
                REFERENCE_WHY,
                details,
                extra={"mean_loss_usd": float(np.mean(ref_losses))},
            )
        )
        for field, what in (
            ("loan_loss_sum_usd", "per-loan loss sums (EL_i)"),
            ("loan_default_probability_sum", "per-loan horizon PD sums"),
            ("loan_defaulted_exposure_sum_usd", "per-loan defaulted exposure sums"),
        ):
            want = np.sum([getattr(p, field) for p in parts], axis=0)
            got = getattr(jx, field)
            checks.append(
                relative_agreement_check(
                    f"JAX float64 = NumPy reference, {what} ({label})",
                    "reference",
                    got,
                    want,
                    REFERENCE_RTOL,
                    REFERENCE_RTOL * max(float(np.max(np.abs(want))), 1e-300),
                    REFERENCE_WHY,
                    details,
                )
            )
        if mode == "sampled":
            same = bool(np.array_equal(jx.losses_usd == 0, ref_losses == 0))
            checks.append(
                Check(
                    name=f"Same default events as the reference ({label})",
                    group="reference",
                    passed=same,
                    values={
                        "scenarios_without_loss_jax": int(np.sum(jx.losses_usd == 0)),
                        "scenarios_without_loss_reference": int(np.sum(ref_losses == 0)),
                    },
                    tolerance="identical set of scenarios with no default",
                    why_tolerance=(
                        "Exact: a default is the event 1 − S_i(t) ≥ U_b on the same 24-bit "
                        "uniforms; float64 survival differs from the reference by ~1e-15, far "
                        "below the 6e-8 spacing of the uniforms, so every event must match."
                    ),
                    details=details,
                )
            )
    return checks


# --------------------------------------------------------------------------- precision


def precision_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """float32 (the default) against float64 on the same scenarios."""
    book = validation_book(s.book_loans)
    loans = loan_arrays(book, base)
    n = s.euler_scenarios
    f64 = _pass1(_jax_backend(base, loans, s.seed, "float64"), n, s.chunk, len(book)).losses_usd
    f32 = _pass1(_jax_backend(base, loans, s.seed, "float32"), n, s.chunk, len(book)).losses_usd
    big = f64 >= 1e-3 * f64.mean()
    details = f"{s.book_loans}-loan validation book, {n:,} scenarios, seed {s.seed}"
    checks = [
        relative_agreement_check(
            "float32 = float64 per scenario (losses ≥ 0.1% of the mean)",
            "precision",
            f32[big],
            f64[big],
            1e-3,
            0.0,
            "Floating point: float32 has unit roundoff 6e-8. A loss passes through ~10² "
            "operations per loan-period (exp/log of factor paths, Φ of the hazard with "
            "condition number up to ~40, 12-period survival products, EAD − recovery "
            "cancellation), so per-scenario relative errors of 1e-5..1e-4 are expected; 1e-3 "
            "catches any float32-only defect (overflow, a lost tail, a wrong cast). Scenarios "
            "below 0.1% of the mean loss are excluded: there the loss is a near-cancellation "
            "of exposure and recovery and relative error is meaningless.",
            details,
        )
    ]
    m64 = risk_measures(f64, None, s.euler_alphas, N_BATCHES)
    m32 = risk_measures(f32, None, s.euler_alphas, N_BATCHES)
    pairs = [("EL", m32.el, m64.el, m64.el_se)]
    for t32, t64 in zip(m32.tail, m64.tail, strict=True):
        key = alpha_key(t64.alpha)
        pairs.append((f"VaR {key}", t32.var, t64.var, t64.var_se))
        pairs.append((f"ES {key}", t32.es, t64.es, t64.es_se))
    for what, a, b, se in pairs:
        diff = abs(a - b)
        ok = bool(diff <= 0.05 * se)
        checks.append(
            Check(
                name=f"float32 moves {what} by < 5% of its Monte Carlo SE",
                group="precision",
                passed=ok,
                values={
                    "float32": a,
                    "float64": b,
                    "abs_difference": diff,
                    "rel_difference": diff / abs(b) if b else 0.0,
                    "standard_error": se,
                    "difference_over_se": diff / se if se > 0 else float("nan"),
                    # the scenario count at which the float32 error would reach 5% of the SE
                    "scenarios_until_5pct_of_se": (n * (0.05 * se / diff) ** 2) if diff else None,
                },
                tolerance="|float32 − float64| ≤ 0.05 SE",
                why_tolerance=(
                    "Relevance: rounding that moves a measure by 5% of its Monte Carlo SE "
                    "widens the 95% interval by 0.1% (√(1 + 0.05²)), immaterial next to the "
                    "sampling error the user already accepts. The SE shrinks as 1/√S, so "
                    "'scenarios_until_5pct_of_se' says up to which scenario count float32 stays "
                    "immaterial; beyond it use --precision float64."
                ),
                details=details,
            )
        )
    return checks


# --------------------------------------------------------------------------- invariance


INVARIANCE_RTOL = 1e-12


def invariance_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """The loss of a scenario depends on its index alone: not on the chunk size, nor on where
    the chunk starts (the tail pass, Dask workers and resume rely on it)."""
    book = validation_book(s.book_loans)
    loans = loan_arrays(book, base)
    n = 2 * s.chunk
    checks = []
    for precision in ("float64", "float32"):
        backend = _jax_backend(base, loans, s.seed, precision)
        whole = _pass1(backend, n, s.chunk, len(book)).losses_usd
        offset = s.chunk // 2 + 17
        shifted = backend.run_chunk(offset, s.chunk).losses_usd
        same = bool(np.array_equal(shifted, whole[offset : offset + s.chunk]))
        checks.append(
            Check(
                name=f"Scenario-offset invariance ({precision})",
                group="invariance",
                passed=same,
                values={
                    "chunk": s.chunk,
                    "offset": offset,
                    "max_abs_difference": float(
                        np.max(np.abs(shifted - whole[offset : offset + s.chunk]))
                    ),
                },
                tolerance="bit-identical",
                why_tolerance=(
                    "Exact: the same compiled program on the same scenario indices must give "
                    "the same bits; the random numbers are a pure function of (seed, scenario, "
                    "slot) (docs/spec.md §8), so a chunk starting anywhere reproduces the run."
                ),
                details=f"scenarios {offset}..{offset + s.chunk - 1} as one chunk, against "
                f"the same scenarios inside chunks starting at 0 and {s.chunk}",
            )
        )
    odd = 1000 if s.chunk > 1000 else s.chunk // 3
    backend = _jax_backend(base, loans, s.seed, "float64")
    base_run = _pass1(backend, n, s.chunk, len(book)).losses_usd
    other = _pass1(backend, n, odd, len(book)).losses_usd
    checks.append(
        relative_agreement_check(
            f"Chunk-size invariance (float64, chunks of {s.chunk} against {odd})",
            "invariance",
            other,
            base_run,
            INVARIANCE_RTOL,
            0.0,
            "Floating point: the per-scenario arithmetic is identical; a different chunk size "
            "is a different compiled program whose vectorised exp/log/Φ may round a few ulps "
            "(~1e-15) differently, amplified at most ~1e3 by the model's condition numbers. "
            "Anything above 1e-12 would mean scenarios influence each other.",
            f"{n:,} scenarios; the last chunk of {odd} is a remainder of {n % odd}",
        )
    )
    m_a = risk_measures(base_run, None, s.euler_alphas, N_BATCHES).to_dict()
    m_b = risk_measures(other, None, s.euler_alphas, N_BATCHES).to_dict()
    fields = ("var_usd", "es_usd")
    flat_a = [m_a["el_usd"]] + [m_a["tail"][k][f] for k in m_a["tail"] for f in fields]
    flat_b = [m_b["el_usd"]] + [m_b["tail"][k][f] for k in m_b["tail"] for f in fields]
    checks.append(
        relative_agreement_check(
            "Chunk-size invariance of EL, VaR, ES",
            "invariance",
            flat_b,
            flat_a,
            INVARIANCE_RTOL,
            0.0,
            "Follows from the per-scenario invariance: the measures are functions of the "
            "losses alone.",
            f"α = {', '.join(alpha_key(a) for a in s.euler_alphas)}",
        )
    )
    return checks


# --------------------------------------------------------------------------- gradients


FD_RELATIVE_STEP = 1e-5
FD_RTOL = 1e-4
FD_ROUNDING = 1e-10  # relative accuracy assumed of a float64 sum of losses


def gradient_checks(
    base: Assumptions,
    s: ValidationSettings,
    parameters: Sequence[str] | None = None,
    copula_label: str = "",
) -> list[Check]:
    """∂EL/∂θ and ∂ES_α/∂θ from reverse-mode AD (the run's sensitivities: `compute_sensitivities`)
    against central finite differences of the same estimators on the same scenarios."""
    from gpucredit.portfolio.sensitivities import compute_sensitivities

    book = validation_book(s.book_loans)
    loans = loan_arrays(book, base)
    n = s.gradient_scenarios
    alpha = s.gradient_alpha
    backend = _jax_backend(base, loans, s.seed, "float64", mode="conditional")
    losses = _pass1(backend, n, n, len(book)).losses_usd
    sens = compute_sensitivities(backend, base, losses, (alpha,), n)
    paths = {p: (f, i) for p, f, i in parameter_paths(base)}
    wanted = [p for p in (parameters or s.gradient_parameters) if p in paths]
    grid = base.grid("conditional")

    def measures(params: ModelParams) -> tuple[float, float]:
        # A run at another r(0) also rebuilds the floating annuities' schedules (docs/spec.md §3);
        # the PD references stay the base run's (§4: sensitivities hold them fixed).
        moved = loans
        if params.rate_level != base.params.rate_level:
            moved = loan_arrays(book, dataclasses.replace(base, params=params), base=base)
        bumped = _jax_backend(base, moved, s.seed, "float64", params=params, grid=grid)
        L = _pass1(bumped, n, n, len(book)).losses_usd
        return float(L.mean()), var_es(L, None, alpha)[1]

    el0, es0 = float(losses.mean()), var_es(losses, None, alpha)[1]
    checks = []
    for path in wanted:
        field, index = paths[path]
        value = float(np.asarray(getattr(base.params, field))[index])
        h = FD_RELATIVE_STEP * max(abs(value), 1e-2)
        up = measures(bumped_parameter(base.params, field, index, h))
        down = measures(bumped_parameter(base.params, field, index, -h))
        row = sens.parameter.index(path)
        for what, ad, fd_pair, level in (
            ("EL", sens.d_expected_loss[row], (up[0], down[0]), el0),
            (
                f"ES {alpha_key(alpha)}",
                sens.d_expected_shortfall[alpha_key(alpha)][row],
                (up[1], down[1]),
                es0,
            ),
        ):
            fd = (fd_pair[0] - fd_pair[1]) / (2 * h)
            floor = FD_ROUNDING * abs(level) / h
            err = abs(ad - fd)
            ok = bool(math.isfinite(ad) and err <= FD_RTOL * abs(fd) + floor)
            checks.append(
                Check(
                    name=f"AD = FD: ∂{what}/∂{path}{copula_label}",
                    group="gradients" if not copula_label else "t_copula",
                    passed=ok,
                    values={
                        "ad": ad,
                        "finite_difference": fd,
                        "abs_error": err,
                        "rel_error": err / abs(fd) if fd else None,
                        "parameter_value": value,
                        "step": h,
                    },
                    tolerance=f"|AD − FD| ≤ {FD_RTOL:g}·|FD| + {FD_ROUNDING:g}·|measure|/h",
                    why_tolerance=(
                        f"Finite-difference error: central differences with h = "
                        f"{FD_RELATIVE_STEP:g}·max(|θ|, 0.01) have truncation error O(h²) "
                        f"(~1e-10 relative) and rounding error ~u·|measure|/h with the float64 "
                        f"sum accurate to ~1e-13 (the floor assumes 1e-10, for gradients near "
                        f"0). The loss has kinks (max(·, 0) in LGD and cash, clipped "
                        f"coverage, the ES tail set) that a bump can straddle, so {FD_RTOL:g} "
                        f"relative is allowed; a wrong derivative (missing chain-rule term, "
                        f"a correlation entry moved on one side only) is off by 1e-2 or more. "
                        f"The ES finite difference reruns pass 1 and re-sorts, so it also tests "
                        f"that fixing the tail set (Hong & Liu 2009) is right."
                    ),
                    details=f"{n:,} scenarios (common random numbers), {s.book_loans}-loan "
                    f"validation book, float64, seed {s.seed}",
                )
            )
    return checks


# --------------------------------------------------------------------------- Euler


def euler_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """Σ_i EL_i = EL and Σ_i ES_{α,i} = ES_α, through the run's own two passes."""
    book = validation_book(s.book_loans)
    loans = loan_arrays(book, base)
    checks = []
    for mode, precision in (
        ("conditional", "float64"),
        ("sampled", "float64"),
        ("conditional", "float32"),
    ):
        backend = _jax_backend(base, loans, s.seed, precision, mode=mode)
        p1 = _pass1(backend, s.euler_scenarios, s.chunk, len(book))
        m = risk_measures(p1.losses_usd, None, s.euler_alphas, N_BATCHES)
        es_i = tail_loan_contributions(backend, p1.losses_usd, None, s.euler_alphas, len(book))
        rtol = 1e-10 if precision == "float64" else 2e-5
        why = (
            "Floating point: ES_i = Σ_j c_j L_i(ω_j) is a re-summation of the same losses, "
            "regenerated from their indices by the tail pass; in float64 the two orders of "
            "summation over N loans and the tail scenarios agree to ~N u ≈ 1e-14, and 1e-10 "
            "leaves room for the tail pass being another compiled program."
            if precision == "float64"
            else "Floating point: per-loan float32 losses summed in another order than the "
            "pass-1 total: the difference is bounded by ~N u₃₂ ≈ "
            f"{len(book)} × 6e-8 ≈ {len(book) * 6e-8:.0e} relative; {rtol:g} allows for "
            "the tail pass being another compiled program."
        )
        label = f"{mode}, {precision}"
        pairs = [("EL", float(np.sum(p1.loan_expected_loss_usd)), m.el)]
        for t in m.tail:
            key = alpha_key(t.alpha)
            pairs.append((f"ES {key}", float(np.sum(es_i[key])), t.es))
        for what, total, measure in pairs:
            err = abs(total - measure)
            checks.append(
                Check(
                    name=f"Σ contributions = {what} ({label})",
                    group="euler",
                    passed=bool(err <= rtol * abs(measure)),
                    values={
                        "sum_of_contributions": total,
                        "measure": measure,
                        "rel_error": err / abs(measure) if measure else err,
                    },
                    tolerance=f"relative error ≤ {rtol:g}",
                    why_tolerance=why,
                    details=f"{s.euler_scenarios:,} scenarios, {s.book_loans}-loan validation "
                    f"book, seed {s.seed}",
                )
            )
    return checks


# --------------------------------------------------------------------------- convergence


def convergence_series(losses: np.ndarray, alphas: Sequence[float], points: int) -> dict:
    """Estimates, SEs and 95% intervals of EL, VaR_α and ES_α on the first S scenarios for
    S = S_max / 2^j, j = points − 1 .. 0 (nested, as when a user raises --scenarios)."""
    total = len(losses)
    counts = [total >> j for j in range(points - 1, -1, -1)]
    series: dict = {"scenarios": counts, "el": {"estimate": [], "se": [], "ci": []}}
    for a in alphas:
        for kind in ("var", "es"):
            series[f"{kind}_{alpha_key(a)}"] = {
                "estimate": [],
                "se": [],
                "ci": [],
                "tail_per_batch": [],
            }
    for count in counts:
        m = risk_measures(losses[:count], None, alphas, N_BATCHES)
        series["el"]["estimate"].append(m.el)
        series["el"]["se"].append(m.el_se)
        series["el"]["ci"].append(list(m.el_ci))
        for t in m.tail:
            for kind, est, se, ci in (
                ("var", t.var, t.var_se, t.var_ci),
                ("es", t.es, t.es_se, t.es_ci),
            ):
                entry = series[f"{kind}_{alpha_key(t.alpha)}"]
                entry["estimate"].append(est)
                entry["se"].append(se)
                entry["ci"].append(list(ci))
                entry["tail_per_batch"].append(t.tail_scenarios_per_batch)
    return series


MIN_TAIL_PER_BATCH = 4.0


def rate_check(
    name: str,
    scenarios: Sequence[int],
    se: Sequence[float],
    n_rate_checks: int,
    details: str,
    series: dict | None = None,
    group: str = "convergence",
) -> Check:
    """The slope of ln SE against ln S is −1/2 within its sampling error."""
    x = np.log(np.asarray(scenarios, dtype=np.float64))
    y = np.log(np.asarray(se, dtype=np.float64))
    ok_points = np.isfinite(y)
    x, y = x[ok_points], y[ok_points]
    if len(x) < 3:
        return Check(
            name,
            group,
            False,
            {"points": int(len(x))},
            "needs 3 points",
            "too few usable scenario counts",
            details,
        )
    slope, intercept = np.polyfit(x, y, 1)
    # ln of a batch-means SE with n_b − 1 d.f. has SD ≈ 1/√(2(n_b − 1)) (χ² delta method)
    sd_point = 1.0 / math.sqrt(2.0 * (N_BATCHES - 1))
    sd_slope = sd_point / math.sqrt(float(np.sum((x - x.mean()) ** 2)))
    k = normal_multiplier(n_rate_checks)
    ok = bool(abs(slope + 0.5) <= k * sd_slope)
    values = {
        "slope": float(slope),
        "expected_slope": -0.5,
        "slope_sd": sd_slope,
        "multiplier": k,
        "points": int(len(x)),
        "se_at_max_times_sqrt_s": float(math.exp(y[-1]) * math.sqrt(math.exp(x[-1]))),
    }
    if series is not None:
        values["series"] = series
    return Check(
        name=name,
        group=group,
        passed=ok,
        values=values,
        tolerance=f"|slope + 0.5| ≤ {k:.2f} × {sd_slope:.3f}",
        why_tolerance=(
            f"Monte Carlo error of the SE itself: a batch-means SE with {N_BATCHES - 1} degrees "
            f"of freedom has ln-SD ≈ 1/√(2·{N_BATCHES - 1}) = {sd_point:.3f}, which gives the "
            f"least-squares slope the SD shown; {k:.2f} SD is the Bonferroni bound for "
            f"{n_rate_checks} rate checks at a 1% family-wise false-alarm rate. Only scenario "
            f"counts with at least {MIN_TAIL_PER_BATCH:g} tail scenarios per batch are fitted "
            f"(below that batch-means SEs of tail measures are biased low)."
        ),
        details=details,
    )


def convergence_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """EL, VaR and ES with their 95% intervals against S; the SE falls as 1/√S (Gaussian and
    Student-t copula)."""
    book = validation_book(s.book_loans)
    checks = []
    runs = [
        (
            "Gaussian copula",
            base,
            s.convergence_scenarios,
            s.convergence_points,
            s.convergence_alphas,
        )
    ]
    if s.convergence_t_scenarios:
        t_assumptions = dataclasses.replace(base, copula="t", t_dof=s.t_dof)
        t_points = s.convergence_points - int(
            round(math.log2(s.convergence_scenarios / s.convergence_t_scenarios))
        )
        runs.append(
            (
                f"t copula ν={s.t_dof}",
                t_assumptions,
                s.convergence_t_scenarios,
                t_points,
                s.convergence_t_alphas,
            )
        )
    n_rate = sum(1 + 2 * len(run[4]) for run in runs)
    for label, assumptions, scenarios, points, alphas in runs:
        losses = _jax_losses(book, assumptions, scenarios, s.seed, "float32", s.chunk)
        series = convergence_series(losses, alphas, points)
        details = (
            f"{s.book_loans}-loan validation book, {label}, default assumptions otherwise, "
            f"float32, the first S of {scenarios:,} scenarios (seed {s.seed})"
        )
        group = "convergence" if label.startswith("Gaussian") else "t_copula"
        for key, entry in series.items():
            if key == "scenarios":
                continue
            tail = entry.get("tail_per_batch")  # None for EL: every S is usable
            usable = [
                i
                for i in range(len(series["scenarios"]))
                if tail is None or tail[i] >= MIN_TAIL_PER_BATCH
            ]
            what = (
                key.replace("_", " ").replace("var", "VaR").replace("es", "ES").replace("el", "EL")
            )
            checks.append(
                rate_check(
                    f"{what} standard error ∝ 1/√S ({label})",
                    [series["scenarios"][i] for i in usable],
                    [entry["se"][i] for i in usable],
                    n_rate,
                    details,
                    series={"scenarios": series["scenarios"], **entry, "fitted": usable},
                    group=group,
                )
            )
    return checks


# --------------------------------------------------------------------------- t copula


def t_copula_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """Stability under the Student-t copula: every shock stays N(0, 1) out to the far tails
    (the transform keeps its upper-tail precision in float32), gradients are finite and match
    finite differences, and joint crashes are more frequent than under the Gaussian copula."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine
    from gpucredit.kernels.rng import shock_normals_jax

    checks = []
    assumptions = dataclasses.replace(base, copula="t", t_dof=s.t_dof)
    grid = assumptions.grid()
    k_factors = grid.n_factors
    shocks = {}
    for dtype in (jnp.float32, jnp.float64):
        normals = shock_normals_jax(
            s.seed, 0, s.margin_scenarios, grid.periods, grid.slots_per_period, dtype
        )
        eps = jax_engine.correlated_shocks_jax(
            jax_engine._cast_params(assumptions.params, dtype), grid, normals
        )
        shocks[np.dtype(dtype).name] = np.asarray(eps, dtype=np.float64)
    names = base.factor_names
    n_ks = 2 * k_factors
    level = FAMILY_FALSE_ALARM / n_ks
    for dtype_name, eps in shocks.items():
        pvalues = [
            float(stats.kstest(eps[..., j].ravel(), "norm").pvalue) for j in range(k_factors)
        ]
        worst = int(np.argmin(pvalues))
        checks.append(
            Check(
                name=f"t copula ν={s.t_dof}: every shock is N(0, 1) (KS, {dtype_name})",
                group="t_copula",
                passed=bool(min(pvalues) > level and np.all(np.isfinite(eps))),
                values={
                    "min_p_value": min(pvalues),
                    "worst_factor": names[worst],
                    "p_values": dict(zip(names, pvalues, strict=True)),
                    "max_abs_shock": float(np.max(np.abs(eps))),
                    "samples_per_factor": int(eps[..., 0].size),
                },
                tolerance=f"every KS p-value > {level:.1e}",
                why_tolerance=(
                    f"Statistical: Kolmogorov-Smirnov against N(0, 1) on "
                    f"{eps[..., 0].size:,} shocks per factor (all periods pooled; periods are "
                    f"independent). {FAMILY_FALSE_ALARM:g}/{n_ks} is the Bonferroni level for "
                    f"{n_ks} tests at a 1% family-wise false-alarm rate. The t copula must "
                    f"keep margins standard normal (docs/spec.md §2) so vols stay vols and input "
                    f"PDs stay honoured."
                ),
                details=f"{s.margin_scenarios:,} scenarios × {grid.periods} periods, seed "
                f"{s.seed}, JAX {dtype_name}",
            )
        )
    # Far tail of the margins: P(ε < −3) and P(ε > 3) per factor against 2 Φ(−3) jointly.
    eps = shocks["float32"]
    n = eps[..., 0].size
    p3 = float(ndtr(-3.0))
    worst_z = 0.0
    for j in range(k_factors):
        for count in (np.sum(eps[..., j] < -3.0), np.sum(eps[..., j] > 3.0)):
            z = (count - n * p3) / math.sqrt(n * p3 * (1 - p3))
            worst_z = max(worst_z, abs(z))
    k = normal_multiplier(2 * k_factors)
    checks.append(
        Check(
            name=f"t copula ν={s.t_dof}: 3σ tail frequencies of every shock (float32)",
            group="t_copula",
            passed=bool(worst_z <= k),
            values={"worst_abs_z": worst_z, "expected_probability": p3, "samples": n},
            tolerance=f"|z| ≤ {k:.2f} for P(ε < −3) and P(ε > 3) of every factor",
            why_tolerance=(
                "Statistical (binomial): the count beyond ±3 has SD √(n p (1 − p)); the "
                "float32 upper tail is where a naive Φ⁻¹(F_ν(y)) loses precision (1 − F "
                "rounds to 0), so this is where a defect would show. Bonferroni over "
                f"{2 * k_factors} counts at 1%."
            ),
            details=f"{n:,} shocks per factor",
        )
    )
    # Joint crashes: credit and H100 prices both below their 1% quantile.
    i_price = names.index("price:H100")
    i_credit = names.index("credit")
    from gpucredit.kernels.rng import shock_normals_np

    normals = shock_normals_np(
        s.seed, np.arange(s.margin_scenarios), base.grid().periods, base.grid().slots_per_period
    )
    gauss = reference.correlated_shocks(base.params, base.grid(), normals)
    q = float(ndtri(0.01))

    def joint(e):
        return float(np.mean((e[..., i_price] < q) & (e[..., i_credit] < q)))

    pj_t, pj_g = joint(shocks["float64"]), joint(gauss)
    se = math.sqrt(pj_t * (1 - pj_t) / n + pj_g * (1 - pj_g) / n)
    k1 = normal_multiplier(1)
    checks.append(
        Check(
            name=f"t copula ν={s.t_dof}: joint crashes of credit and H100 prices more frequent "
            "than Gaussian",
            group="t_copula",
            passed=bool(pj_t - pj_g > k1 * se),
            values={"p_joint_t": pj_t, "p_joint_gaussian": pj_g, "standard_error": se},
            tolerance=f"P_t − P_gauss > {k1:.2f} SE",
            why_tolerance=(
                "Statistical: the t copula exists to make crashes come together (tail "
                "dependence); the difference of two binomial frequencies must exceed its "
                "one-sided 1% bound."
            ),
            details=f"P(ε_price:H100 < Φ⁻¹(1%), ε_credit < Φ⁻¹(1%)), {n:,} scenario-periods",
        )
    )
    if s.t_gradient_parameters:
        checks.extend(
            gradient_checks(
                assumptions, s, s.t_gradient_parameters, copula_label=f" (t copula ν={s.t_dof})"
            )
        )
    return checks


# --------------------------------------------------------------------------- run


# --------------------------------------------------------------------------- calibration

YEAR_ONE_BAND = (1.0, 2.0)  # model year-1 default rate / input PD, per borrower type
YEAR_ONE_WHY = (
    "On the central path the hazard is exactly the input PD's Vasicek hazard (the 'expected' "
    "anchor). Around it the coverage ratios move with rents, prices, BTC and power, and with "
    "β's > 0 that volatility adds to the systematic variance of the hazard's argument: the "
    "unconditional default rate E[Φ(·)] then sits above the input PD (Jensen), by more for "
    "borrowers whose coverage is more volatile (miners). Below 1.0 would mean the anchor "
    "does not hold the input PD on the central path; above 2.0 that the coverage shifts, not "
    "the PDs, drive the book's default rates, which a lender's PD would not accept. Loans whose "
    "central path cannot pay are included (their hazard is higher by construction)."
)


def calibration_checks(base: Assumptions, s: ValidationSettings, example_book: Book) -> list[Check]:
    """The credit cycle's AR(1) lag correlation against ϕ, the example book's year-1
    default rate against its input PDs by borrower type (a band, with its reason), and its
    offtakers' default frequency and the offtaker Vasicek limit (docs/spec.md §4a)."""
    return (
        credit_cycle_checks(base, s)
        + year_one_checks(base, s, example_book)
        + offtaker_checks(base, s, example_book)
    )


OFFTAKER_LIMIT_NAMES = 20_000  # offtakers of one PD in the Vasicek-limit check
OFFTAKER_LIMIT_SCENARIOS = 8


def _binomial_check(name: str, share: float, expected: float, n: int, k: float, m: int) -> Check:
    """|share − p| <= k √(p(1 − p)/n): n independent events of probability p."""
    se = math.sqrt(expected * (1.0 - expected) / n)
    z = (share - expected) / se if se > 0 else float("nan")
    return Check(
        name=name,
        group="calibration",
        passed=bool(se > 0 and abs(z) <= k),
        values={"share": share, "expected": expected, "standard_error": se, "z": z, "n": n},
        tolerance=f"|share − expected| ≤ {k:.2f} SE",
        why_tolerance=(
            f"The share of n = {n:,} independent events of the expected probability is "
            f"binomial, SE √(p(1 − p)/n); {k:.2f} is the two-sided Bonferroni bound for {m} "
            f"comparisons at a {FAMILY_FALSE_ALARM:.0%} family-wise false-alarm rate."
        ),
    )


def offtaker_checks(base: Assumptions, s: ValidationSettings, book: Book) -> list[Check]:
    """docs/spec.md §4a on period 1 of the grid, where the offtaker hazard is exactly Vasicek
    on a standard normal Z(1) (over the horizon a persistent cycle clusters defaults, so no
    closed form): (1) each example-book offtaker defaults in period 1 in a share p^Δ of the
    scenarios; (2) the offtaker Vasicek limit with ρ_o: in each scenario, the share of many
    offtakers of one PD that default in period 1 is Φ((Φ⁻¹(p^Δ) − √ρ_o Z(1))/√(1 − ρ_o))."""
    from gpucredit.portfolio.loans import loan_arrays
    from gpucredit.portfolio.offtakers import offtaker_events_of_run

    loans = loan_arrays(book, base)
    if loans.offtaker is None:
        return []
    grid = base.grid("conditional")._replace(periods=1)  # period 1's counters are the run's

    def period_one(scenarios: int, pds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scenarios 0..S-1: who defaults in period 1 [S, J], and Z(1) [S]."""
        with_pds = loans._replace(offtaker_pd_annual=pds)
        tau, credit = offtaker_events_of_run(base.params, grid, with_pds, s.seed, scenarios)
        return tau == 1, credit[:, 1]

    checks = []
    _, names, pds = book.offtaker_index()
    n = s.calibration_path_scenarios
    defaulted, _ = period_one(n, pds)
    k = normal_multiplier(len(names))
    for j, name in enumerate(names):
        p_period = 1.0 - (1.0 - pds[j]) ** base.grid().dt_years
        checks.append(
            _binomial_check(
                f"offtaker {name}: period-1 default frequency = p^Δ",
                float(defaulted[:, j].mean()),
                p_period,
                n,
                k,
                len(names),
            )  # fmt: skip
        )
    rho = float(base.params.offtaker_correlation)
    p_annual = 0.05
    p_period = 1.0 - (1.0 - p_annual) ** base.grid().dt_years
    many = np.full(OFFTAKER_LIMIT_NAMES, p_annual)
    defaulted, credit = period_one(OFFTAKER_LIMIT_SCENARIOS, many)
    k = normal_multiplier(OFFTAKER_LIMIT_SCENARIOS)
    for s_index, z in enumerate(credit):
        conditional = float(ndtr((ndtri(p_period) - math.sqrt(rho) * z) / math.sqrt(1 - rho)))
        checks.append(
            _binomial_check(
                f"offtaker Vasicek limit, ρ_o = {rho:g}, scenario {s_index} (Z(1) = {z:+.2f})",
                float(defaulted[s_index].mean()),
                conditional,
                OFFTAKER_LIMIT_NAMES,
                k,
                OFFTAKER_LIMIT_SCENARIOS,
            )  # fmt: skip
        )
    return checks


def credit_cycle_checks(base: Assumptions, s: ValidationSettings) -> list[Check]:
    """corr(Z(t), Z(t + m)) = ϕ for every t with a year after it (Fisher z, SE 1/√(n − 3))."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine
    from gpucredit.kernels.rng import shock_normals_np

    checks = []
    grid = base.grid("conditional")
    m = base.steps_per_year
    n = s.calibration_path_scenarios
    normals = shock_normals_np(s.seed, np.arange(n, dtype=np.uint32), grid.periods,
                               grid.slots_per_period)  # fmt: skip
    credit = np.asarray(
        jax_engine.factor_paths_jax(base.params, grid, jnp.asarray(normals, jnp.float64)).credit
    )[:, 1:]
    phi = float(base.params.credit_persistence)
    lags = [(t, t + m) for t in range(grid.periods - m)]
    k = normal_multiplier(len(lags))
    for t, u in lags:
        r = float(np.corrcoef(credit[:, t], credit[:, u])[0, 1])
        z = (math.atanh(r) - math.atanh(phi)) * math.sqrt(n - 3)
        checks.append(
            Check(
                name=f"credit cycle corr(Z({t + 1}), Z({u + 1})) = persistence",
                group="calibration",
                passed=bool(abs(z) <= k),
                values={"correlation": r, "persistence": phi, "z": z, "scenarios": n},
                tolerance=f"|Fisher z| ≤ {k:.2f}",
                why_tolerance=(
                    f"atanh of a sample correlation of n = {n} pairs is normal with SD "
                    f"1/√(n − 3); {k:.2f} is the two-sided Bonferroni bound for {len(lags)} "
                    f"lags at a {FAMILY_FALSE_ALARM:.0%} family-wise false-alarm rate."
                ),
            )
        )
    return checks


def year_one_checks(base: Assumptions, s: ValidationSettings, book: Book) -> list[Check]:
    """The example book's year-1 default rate over its input PD, by borrower type (`book`:
    the example book read under `base`, as the caller reads it)."""
    from gpucredit.portfolio.backends import JaxBackend
    from gpucredit.portfolio.calibration import calibration_table, year_one_assumptions
    from gpucredit.portfolio.runner import run_pass1

    loans = loan_arrays(book, base)
    first_year = year_one_assumptions(base)
    backend = JaxBackend(
        first_year.params, first_year.grid("conditional"), loan_arrays(book, first_year),
        s.seed, "float32",
    )  # fmt: skip
    year_one = run_pass1(backend, s.calibration_scenarios, s.chunk, len(book))
    whole = run_pass1(
        JaxBackend(base.params, base.grid("conditional"), loans, s.seed, "float32"),
        s.calibration_scenarios, s.chunk, len(book),
    )  # fmt: skip
    table = calibration_table(
        book, loans, base, whole.loan_horizon_pd, year_one.loan_horizon_pd,
        whole.loan_expected_loss_usd, whole.loan_mean_lgd,
    )  # fmt: skip
    low, high = YEAR_ONE_BAND
    checks = []
    for kind, row in table["by_borrower_type"].items():
        ratio = row["year_one_ratio"]
        horizon_ratio = row["model_pd_horizon"] / row["input_pd_horizon"]
        checks.append(
            Check(
                name=f"year-1 default rate / input PD, {kind}s of the example book",
                group="calibration",
                passed=bool(ratio is not None and low <= ratio <= high),
                values={
                    "ratio": ratio,
                    "model_default_rate_year_one": row["model_default_rate_year_one"],
                    "input_pd_year_one": row["input_pd_year_one"],
                    "horizon_ratio": horizon_ratio,
                    "el_share": row["el_share"],
                    "loans": row["loans"],
                    "scenarios": s.calibration_scenarios,
                },
                tolerance=f"{low:.1f} ≤ ratio ≤ {high:.1f}",
                why_tolerance=YEAR_ONE_WHY,
            )
        )
    return checks


# Each group's checks of (base assumptions, settings); calibration also takes the example book.
GROUPS: tuple[tuple[str, Callable[..., list[Check]]], ...] = (
    ("vasicek", vasicek_checks),
    ("reference", reference_checks),
    ("precision", precision_checks),
    ("invariance", invariance_checks),
    ("gradients", gradient_checks),
    ("euler", euler_checks),
    ("convergence", convergence_checks),
    ("t_copula", t_copula_checks),
    ("calibration", calibration_checks),
)


def run_validation(
    base: Assumptions,
    example_book: Book,
    quick: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    groups: Sequence[str] | None = None,
) -> ValidationRun:
    """Run every group of checks (or those named in `groups`) on the base assumptions;
    `example_book` is the embedded example book read under them (the calibration group's)."""
    import jax

    from gpucredit.kernels.jax_setup import configure_jax
    from gpucredit.portfolio.backends import device_name

    configure_jax()

    s = validation_settings(quick, seed)
    started = time.perf_counter()
    checks: list[Check] = []
    timings = {}
    for name, function in GROUPS:
        if groups is not None and name not in groups:
            continue
        t0 = time.perf_counter()
        found = function(base, s, example_book) if name == "calibration" else function(base, s)
        timings[name] = time.perf_counter() - t0
        checks.extend(found)
        if progress is not None:
            failed = sum(not c.passed for c in found)
            progress(f"{name}: {len(found) - failed}/{len(found)} passed ({timings[name]:.1f} s)")
    metadata = {
        "version": __version__,
        "form": "quick" if quick else "full",
        "seed": seed,
        "device": device_name(jax.devices()[0]),
        "elapsed_seconds": time.perf_counter() - started,
        "group_seconds": timings,
        "family_false_alarm": FAMILY_FALSE_ALARM,
        "n_batches": N_BATCHES,
    }
    return ValidationRun(checks=tuple(checks), settings=s, metadata=metadata)
