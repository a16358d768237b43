"""From a validated Book and the Assumptions to the kernels' LoanArrays (once per book)."""

from __future__ import annotations

import numpy as np

from gpucredit.kernels.params import LoanArrays
from gpucredit.kernels.reference import pd_references
from gpucredit.kernels.schedule import balance_schedule, contract_periods
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import AMORTIZATIONS, Book


class ScheduleError(ValueError):
    """The book's schedules are undefined under these assumptions (one line per loan)."""


def check_schedules(book: Book, assumptions: Assumptions) -> None:
    """Raise ScheduleError naming each floating annuity whose rate at origination (its spread +
    rate.level) is below −100% a period: 1 + q < 0 has no annuity (bullet and linear
    schedules do not depend on the rate). Reachable on grids of a period a year or longer;
    rate.level and the book's rates are each bounded to (−1, 1)."""
    level = float(assumptions.params.rate_level)
    floating_annuity = (book.rate_type == "floating") & (book.amortization == "annuity")
    undefined = floating_annuity & ((book.rate + level) / assumptions.steps_per_year < -1.0)
    if np.any(undefined):
        raise ScheduleError(
            "\n".join(
                f"{book.source}: loan_id={loan_id}, column rate: the floating spread {spread:g}"
                f" + rate.level {level:g} is below -100% a period "
                f"({assumptions.steps_per_year} periods a year); the annuity is undefined"
                for loan_id, spread in zip(
                    book.loan_id[undefined], book.rate[undefined], strict=True
                )
            )
        )


def loan_arrays(
    book: Book,
    assumptions: Assumptions,
    base: Assumptions | None = None,
    offtakers_default: tuple[str, ...] = (),
) -> LoanArrays:
    """The book as float64 arrays plus the balance schedules on the assumptions' grid
    (`check_schedules` first) and the PD references of `assumptions.pd_anchor`.

    `offtakers_default` (a stress, names the book carries): those offtakers default in
    period 1 of every scenario (docs/spec.md §4a), carried as an offtaker PD of 1, whose
    hazard h^o = 1 crosses any uniform in period 1 on every backend.

    The references are a property of the book under the run's base assumptions (docs/spec.md
    §4): a stress case passes the run's assumptions as `base`, so that its stressed paths are
    measured against the base references, not against references of its own.
    """
    loans = _book_arrays(book, assumptions)
    reference_assumptions = assumptions if base is None else base
    reference_loans = loans if base is None else _book_arrays(book, base)
    refs = pd_references(
        reference_assumptions.params,
        reference_assumptions.grid(),
        reference_loans,
        assumptions.pd_anchor,
    )
    loans = loans._replace(
        ln_liquidity_reference=refs.ln_liquidity,
        ln_collateral_reference=refs.ln_collateral,
        ln_refinancing_reference=refs.ln_refinancing,
    )
    if offtakers_default:
        _, names, _ = book.offtaker_index()
        pds = np.array(loans.offtaker_pd_annual, dtype=np.float64)
        pds[[names.index(name) for name in offtakers_default]] = 1.0
        loans = loans._replace(offtaker_pd_annual=pds)
    return loans


def _book_arrays(book: Book, assumptions: Assumptions) -> LoanArrays:
    """LoanArrays without the PD references."""
    check_schedules(book, assumptions)
    is_floating = (book.rate_type == "floating").astype(np.float64)
    rate_at_origination = book.rate + is_floating * float(assumptions.params.rate_level)
    amortization = np.array(
        [AMORTIZATIONS.index(a) for a in book.amortization], dtype=np.int64
    )  # 0 bullet, 1 linear, 2 annuity: the order of kernels.schedule's codes
    balance, installment, balloon, t_m = balance_schedule(
        book.balance_usd,
        rate_at_origination,
        book.maturity_years,
        amortization,
        assumptions.steps_per_year,
        assumptions.periods,
    )
    borrower, n_borrowers = book.borrower_index()
    offtaker, _, offtaker_pd = book.offtaker_index()
    f64 = lambda column: np.asarray(column, dtype=np.float64)  # noqa: E731
    return LoanArrays(
        generation=book.generation_index(assumptions.generations),
        borrower=borrower,
        gpu_count=f64(book.gpu_count),
        collateral_share=f64(book.collateral_share),
        contracted_share=f64(book.contracted_share),
        contract_rate_usd_per_hour=f64(book.contract_rate_usd_per_hour),
        contract_periods=contract_periods(
            book.contract_years_remaining, assumptions.steps_per_year
        ),
        contracted_today=(f64(book.contract_years_remaining) > 1e-9).astype(np.float64),
        utilization=f64(book.utilization),
        power_kw_per_gpu=f64(book.power_kw_per_gpu),
        other_opex_usd_per_gpu_hour=f64(book.other_opex_usd_per_gpu_hour),
        cash_usd=f64(book.cash_usd),
        btc_units=f64(book.btc_units),
        eth_units=f64(book.eth_units),
        crypto_pledged=f64(book.crypto_pledged),
        liquidation_cost=f64(book.liquidation_cost),
        asset_correlation=f64(book.asset_correlation),
        other_income_usd_per_year=f64(book.other_income_usd_per_year),
        other_income_btc_share=f64(book.other_income_btc_share),
        pd_annual=f64(book.pd_annual),
        rate=f64(book.rate),
        is_floating=is_floating,
        maturity_years=f64(book.maturity_years),
        amortization=amortization,
        maturity_period=t_m,
        balance_usd=balance,
        installment_usd=installment,
        balloon_usd=balloon,
        n_borrowers=n_borrowers,
        # A book naming no offtaker carries None: the kernels then take their former path.
        offtaker=offtaker if len(offtaker_pd) else None,
        offtaker_pd_annual=offtaker_pd if len(offtaker_pd) else None,
    )
