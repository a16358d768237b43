"""Per-book constants of docs/spec.md §3: the scheduled balance, installments and balloon.

Schedules are the same in every scenario, so they are computed once per book, in float64,
before any simulation. Amortization codes: 0 bullet, 1 linear, 2 annuity.
"""

from __future__ import annotations

import numpy as np

BULLET, LINEAR, ANNUITY = 0, 1, 2
BALLOON_TOLERANCE = 1e-6  # a balloon of at most 1e-6 B(0) counts as 0 (docs/spec.md §3)


def maturity_period(maturity_years: np.ndarray, steps_per_year: int) -> np.ndarray:
    """[N] int t_M = ceil(maturity_years / Δ − 1e-9)."""
    return np.ceil(np.asarray(maturity_years, dtype=np.float64) * steps_per_year - 1e-9).astype(
        np.int64
    )


def contract_periods(contract_years_remaining: np.ndarray, steps_per_year: int) -> np.ndarray:
    """[N] int: the last period t with tΔ <= contract_years_remaining (+1e-9 years)."""
    years = np.asarray(contract_years_remaining, dtype=np.float64)
    return np.floor((years + 1e-9) * steps_per_year).astype(np.int64)


def balance_schedule(
    balance_usd: np.ndarray,
    rate_at_origination: np.ndarray,
    maturity_years: np.ndarray,
    amortization: np.ndarray,
    steps_per_year: int,
    periods: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scheduled balances of docs/spec.md §3.

    Args:
      balance_usd: [N] B_i(0).
      rate_at_origination: [N] r_i(0) (fixed rate, or r(0) + spread), decimal per year.
      maturity_years: [N] > 0.
      amortization: [N] int code (BULLET, LINEAR, ANNUITY).
    Returns:
      balance [N, T+1] B_i(t) (0 from t_M on), installment [N, T+1] I_i(t) (index 0 is 0),
      balloon [N] Bal_i (0 when none or when t_M > T), maturity period [N] t_M.
    """
    dt = 1.0 / steps_per_year
    b0 = np.asarray(balance_usd, dtype=np.float64)
    maturity = np.asarray(maturity_years, dtype=np.float64)
    t_m = maturity_period(maturity, steps_per_year)
    q = np.asarray(rate_at_origination, dtype=np.float64) * dt
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # 1 − (1 + q)^(−t_M) as −expm1(−t_M log1p(q)): exact for tiny |q| too
        discount = -np.expm1(-t_m.astype(np.float64) * np.log1p(q))
        annuity_payment = np.where(q == 0.0, b0 / t_m, b0 * q / discount)

    n_loans = len(b0)
    balance = np.zeros((n_loans, periods + 1))
    installment = np.zeros((n_loans, periods + 1))
    balloon = np.zeros(n_loans)
    balance[:, 0] = b0
    for t in range(1, periods + 1):
        before = balance[:, t - 1]
        scheduled = np.select(
            [amortization == BULLET, amortization == LINEAR],
            [b0, b0 * (1.0 - t * dt / maturity)],
            default=before * (1.0 + q) - annuity_payment,
        )
        # The installment the schedule asks in the maturity period, at most the balance.
        final_installment = np.minimum(
            np.select(
                [amortization == BULLET, amortization == LINEAR],
                [np.zeros(n_loans), b0 * dt / maturity],
                default=annuity_payment - q * before,
            ),
            before,
        )
        before_maturity = t < t_m
        at_maturity = t == t_m
        balance[:, t] = np.where(before_maturity, scheduled, 0.0)
        installment[:, t] = np.where(
            before_maturity, before - scheduled, np.where(at_maturity, final_installment, 0.0)
        )
        balloon = np.where(at_maturity, before - final_installment, balloon)
    balloon = np.where(balloon <= BALLOON_TOLERANCE * b0, 0.0, balloon)
    return balance, installment, balloon, t_m
