"""Today's book at a glance: exposure by generation and borrower type, LTV and coverage."""

from __future__ import annotations

import numpy as np

from gpucredit.kernels.reference import today_metrics
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.loans import loan_arrays


def book_summary(book: Book, assumptions: Assumptions) -> dict:
    """JSON-ready summary of today's book (docs/spec.md §3 "today's values").

    LTV_i = B_i(0) / (n_i P_g(0) a_i); debt-service coverage DSCR_i = NOI_i(0) / DS_i(1);
    both are reported exposure-weighted per generation and for the whole book.
    """
    loans = loan_arrays(book, assumptions)
    today = today_metrics(assumptions.params, assumptions.grid(), loans)
    collateral = book.gpu_count * assumptions.params.price_usd[loans.generation]
    collateral = collateral * book.collateral_share
    with np.errstate(divide="ignore", invalid="ignore"):
        ltv = np.where(collateral > 0, book.balance_usd / collateral, np.inf)
        dscr = np.where(today.debt_service_usd > 0, today.noi_usd / today.debt_service_usd, np.inf)
    exposure = book.balance_usd

    def weighted(values: np.ndarray, mask: np.ndarray) -> float | None:
        finite = mask & np.isfinite(values)
        if not finite.any():
            return None
        return float(np.average(values[finite], weights=exposure[finite]))

    def group(column: np.ndarray) -> dict[str, dict]:
        out = {}
        for name in sorted(set(column)):
            mask = column == name
            out[str(name)] = {
                "loans": int(mask.sum()),
                "exposure_usd": float(exposure[mask].sum()),
                "gpus": int(book.gpu_count[mask].sum()),  # whole GPUs (book rule)
                "other_income_usd_per_year": float(book.other_income_usd_per_year[mask].sum()),
                "ltv": weighted(ltv, mask),
                "dscr": weighted(dscr, mask),
            }
        return out

    everything = np.ones(len(book), dtype=bool)
    return {
        "source": book.source,
        "loans": len(book),
        "borrowers": int(loans.n_borrowers),
        "exposure_usd": float(exposure.sum()),
        "gpus": int(book.gpu_count.sum()),
        "ltv": weighted(ltv, everything),
        "dscr": weighted(dscr, everything),
        "dscr_below_1_share": float(exposure[dscr < 1.0].sum() / exposure.sum()),
        "by_generation": group(book.gpu_generation),
        "by_borrower_type": group(book.borrower_type),
    }
