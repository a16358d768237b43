"""Calibration evidence a reviewer can read (docs/model.md, "Calibration"): does the model's
default behaviour match the input PDs, and does each group's loss look like a credit book?

By borrower type and by GPU generation: the input PD (annual, and compounded over the year
and over the horizon each loan is alive for), the model's year-1 default rate and horizon
PD, the mean LGD, and EL and ES as a share of exposure. And the loans whose central path
cannot pay its debt service or refinance its balloon ("paper vs path"): there the input PD
and the model disagree by construction (docs/spec.md §4).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpucredit.kernels.params import LoanArrays
from gpucredit.kernels.reference import pd_references
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.risk import alpha_label

YEAR_ONE_MAX_SCENARIOS = 100_000  # the year-1 pass runs on the run's first scenarios, at most


def year_one_assumptions(assumptions: Assumptions) -> Assumptions:
    """The run's assumptions on the first year of its grid (the whole horizon if shorter).

    Every equation is causal and the stream-0 counters of period t do not depend on the
    horizon (docs/spec.md §8), so a run of these assumptions has exactly the run's survival
    S_i(m) after m = steps_per_year periods, scenario by scenario.
    """
    return dataclasses.replace(
        assumptions, horizon_years=min(1.0, assumptions.horizon_years), stresses=()
    )


def _active_years(loans: LoanArrays, periods: int, steps_per_year: int) -> np.ndarray:
    """[N] the years of the first `periods` periods in which loan i can default (t <= t_M)."""
    return np.minimum(loans.maturity_period, periods) / steps_per_year


def calibration_table(
    book: Book,
    loans: LoanArrays,
    assumptions: Assumptions,
    horizon_pd: np.ndarray,
    year_one_pd: np.ndarray,
    expected_loss_usd: np.ndarray,
    mean_lgd: np.ndarray,
    expected_shortfall_usd: dict[str, np.ndarray] | None = None,
) -> dict:
    """JSON-ready calibration by borrower type, by generation and for the whole book.

    Input PDs are compounded over the periods each loan is alive for (a loan maturing in
    year 2 cannot default in year 3), so that "model / input" compares like with like.
    Default rates and PDs are loan-count averages (a default rate counts obligor-loans); EL
    and ES are shares of exposure (balance_usd); mean LGD is Σ EL / Σ expected defaulted
    exposure of the group. ES shares are keyed ``es_<alpha_label>_share`` (``es_99_9_share``;
    `expected_shortfall_usd` is keyed by `risk.alpha_key`).
    """
    m = assumptions.steps_per_year
    input_year_one = 1.0 - (1.0 - book.pd_annual) ** _active_years(loans, m, m)
    input_horizon = 1.0 - (1.0 - book.pd_annual) ** _active_years(loans, assumptions.periods, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        defaulted_exposure = np.where(mean_lgd > 0, expected_loss_usd / mean_lgd, 0.0)
    shortfall = expected_shortfall_usd or {}

    def row(mask: np.ndarray) -> dict:
        exposure = float(book.balance_usd[mask].sum())
        defaulted = float(defaulted_exposure[mask].sum())
        loss = float(expected_loss_usd[mask].sum())
        model_year_one = float(year_one_pd[mask].mean())
        paper_year_one = float(input_year_one[mask].mean())
        out = {
            "loans": int(mask.sum()),
            "exposure_usd": exposure,
            "input_pd_annual": float(book.pd_annual[mask].mean()),
            "input_pd_year_one": paper_year_one,
            "input_pd_horizon": float(input_horizon[mask].mean()),
            "model_default_rate_year_one": model_year_one,
            "model_pd_horizon": float(horizon_pd[mask].mean()),
            "year_one_ratio": model_year_one / paper_year_one if paper_year_one > 0 else None,
            "mean_lgd": loss / defaulted if defaulted > 0 else None,
            "el_share": loss / exposure if exposure > 0 else None,
        }
        for key, values in shortfall.items():
            out[f"es_{alpha_label(float(key))}_share"] = (
                float(values[mask].sum()) / exposure if exposure > 0 else None
            )
        return out

    def grouped(column: np.ndarray) -> dict:
        return {str(name): row(column == name) for name in sorted(set(column))}

    return {
        "book": row(np.ones(len(book), dtype=bool)),
        "by_borrower_type": grouped(book.borrower_type),
        "by_generation": grouped(book.gpu_generation),
        "year_one_periods": m if assumptions.horizon_years >= 1 else assumptions.periods,
    }


def paper_vs_path(book: Book, loans: LoanArrays, assumptions: Assumptions) -> dict:
    """The loans whose central path (every shock 0) cannot pay its debt service in some period
    before maturity (LC* < 1) or refinance its balloon (RF* < 1), with their numbers.

    The input PD of such a loan assumed something its own expected path does not deliver; the
    "expected" anchor holds those references at full coverage, so the model's hazard sits above
    the input PD there (docs/spec.md §4).
    """
    refs = pd_references(assumptions.params, assumptions.grid(), loans, "expected")
    tol = 1e-12
    short_service = refs.central_min_liquidity_coverage < 1.0 - tol
    short_refinancing = refs.central_refinancing_coverage < 1.0 - tol
    flagged = np.flatnonzero(short_service | short_refinancing)
    rows = []
    for i in flagged:
        reasons = []
        if short_service[i]:
            reasons.append("debt service")
        if short_refinancing[i]:
            reasons.append("balloon refinancing")
        rows.append(
            {
                "loan_id": str(book.loan_id[i]),
                "borrower_id": str(book.borrower_id[i]),
                "borrower_type": str(book.borrower_type[i]),
                "gpu_generation": str(book.gpu_generation[i]),
                "balance_usd": float(book.balance_usd[i]),
                "central_min_liquidity_coverage": float(refs.central_min_liquidity_coverage[i]),
                "central_refinancing_coverage": float(refs.central_refinancing_coverage[i]),
                "cannot_pay": " and ".join(reasons),
            }
        )
    exposure = float(book.balance_usd.sum())
    flagged_exposure = float(book.balance_usd[flagged].sum())
    return {
        "loans": len(rows),
        "debt_service": int(short_service.sum()),
        "refinancing": int(short_refinancing.sum()),
        "exposure_usd": flagged_exposure,
        "exposure_share": flagged_exposure / exposure if exposure > 0 else 0.0,
        "rows": rows,
    }
