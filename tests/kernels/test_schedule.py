"""Balance schedules of docs/spec.md §3 against hand computations.

Conventions (docs/spec.md §3): t_M = ceil(maturity / Δ − 1e-9); for t < t_M bullet B(t) = B(0),
linear B(t) = B(0)(1 − tΔ/M), annuity B(t) = B(t−1)(1 + q) − A; B(t) = 0 from t_M on; the
installment in period t_M is the one the schedule asks (bullet 0, linear B(0)Δ/M, annuity
A − q B(t−1)), at most B(t−1); the rest is the balloon (0 when ≤ 1e-6 B(0) or t_M > T).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpucredit.kernels.schedule import (
    ANNUITY,
    BULLET,
    LINEAR,
    balance_schedule,
    contract_periods,
    maturity_period,
)

B0 = 1_000_000.0


def one_loan(amortization, maturity, rate=0.08, steps=4, periods=12, balance=B0):
    """(balance [T+1], installment [T+1], balloon, t_M) of a single loan."""
    bal, inst, balloon, t_m = balance_schedule(
        np.array([balance]),
        np.array([rate]),
        np.array([maturity]),
        np.array([amortization], dtype=np.int64),
        steps,
        periods,
    )
    assert bal.shape == (1, periods + 1) and inst.shape == (1, periods + 1)
    assert balloon.shape == (1,) and t_m.shape == (1,)
    return bal[0], inst[0], float(balloon[0]), int(t_m[0])


def annuity_payment(b0, q, n):
    return b0 / n if q == 0.0 else b0 * q / (1.0 - (1.0 + q) ** (-n))


def annuity_balance(b0, q, a, t):
    """Closed form of B(t) = B(t−1)(1 + q) − A."""
    if q == 0.0:
        return b0 - a * t
    return b0 * (1.0 + q) ** t - a * ((1.0 + q) ** t - 1.0) / q


# ------------------------------------------------------------------ maturity on the grid


def test_bullet_on_grid():
    bal, inst, balloon, t_m = one_loan(BULLET, 2.0)
    assert t_m == 8
    np.testing.assert_array_equal(bal[:8], B0)
    np.testing.assert_array_equal(bal[8:], 0.0)
    np.testing.assert_array_equal(inst, 0.0)  # bullet: no installment, even at t_M
    assert balloon == pytest.approx(B0, rel=1e-15)


def test_linear_on_grid_reaches_zero_without_balloon():
    bal, inst, balloon, t_m = one_loan(LINEAR, 2.0)
    assert t_m == 8
    t = np.arange(13)
    expected = np.where(t < 8, B0 * (1.0 - t * 0.25 / 2.0), 0.0)
    np.testing.assert_allclose(bal, expected, rtol=1e-12, atol=1e-6)
    assert inst[0] == 0.0
    np.testing.assert_allclose(inst[1:9], B0 / 8, rtol=1e-12)  # B(0)Δ/M every period, t_M too
    np.testing.assert_array_equal(inst[9:], 0.0)
    assert balloon == 0.0
    assert inst.sum() == pytest.approx(B0, rel=1e-12)


@pytest.mark.parametrize("rate", [0.08, 0.13, 0.0])
def test_annuity_on_grid_constant_payment(rate):
    q = rate * 0.25
    bal, inst, balloon, t_m = one_loan(ANNUITY, 2.0, rate=rate)
    assert t_m == 8
    a = annuity_payment(B0, q, 8)
    t = np.arange(13)
    expected = np.array([annuity_balance(B0, q, a, k) if k < 8 else 0.0 for k in t])
    np.testing.assert_allclose(bal, expected, rtol=1e-10, atol=1e-6)
    # Debt service at the origination rate: interest q B(t−1) + installment = A, t = 1..t_M.
    payments = q * bal[:8] + inst[1:9]
    np.testing.assert_allclose(payments, a, rtol=1e-10)
    np.testing.assert_array_equal(inst[9:], 0.0)
    assert balloon == 0.0  # amortizes on the grid: no balloon whatever the rounding
    assert inst.sum() == pytest.approx(B0, rel=1e-10)


def test_annuity_zero_rate_is_equal_installments():
    bal, inst, balloon, t_m = one_loan(ANNUITY, 1.5, rate=0.0)
    assert t_m == 6
    np.testing.assert_allclose(inst[1:7], B0 / 6, rtol=1e-12)
    np.testing.assert_allclose(bal[:6], B0 * (1.0 - np.arange(6) / 6), rtol=1e-12)
    np.testing.assert_array_equal(bal[6:], 0.0)
    assert balloon == 0.0


# ------------------------------------------------------------------ maturity off the grid


def test_bullet_off_grid():
    bal, inst, balloon, t_m = one_loan(BULLET, 1.1)
    assert t_m == 5  # ceil(4.4)
    np.testing.assert_array_equal(bal[:5], B0)
    np.testing.assert_array_equal(bal[5:], 0.0)
    np.testing.assert_array_equal(inst, 0.0)
    assert balloon == B0


def test_linear_off_grid_final_installment_capped():
    maturity = 1.1
    bal, inst, balloon, t_m = one_loan(LINEAR, maturity)
    assert t_m == 5
    for t in range(5):
        assert bal[t] == pytest.approx(B0 * (1.0 - t * 0.25 / maturity), rel=1e-12)
    np.testing.assert_allclose(inst[1:5], B0 * 0.25 / maturity, rtol=1e-12)
    # The schedule asks B(0)Δ/M = 0.227 B(0) at t_M but only B(4) = 0.0909 B(0) is left.
    assert B0 * 0.25 / maturity > bal[4]
    assert inst[5] == pytest.approx(bal[4], rel=1e-12)
    assert inst[5] == pytest.approx(B0 * (1.0 - 1.0 / 1.1), rel=1e-12)
    assert balloon == 0.0
    np.testing.assert_array_equal(bal[5:], 0.0)
    assert inst.sum() == pytest.approx(B0, rel=1e-12)


def test_annuity_off_grid_amortizes_over_t_m_periods():
    q = 0.10 * 0.25
    bal, inst, balloon, t_m = one_loan(ANNUITY, 1.1, rate=0.10)
    assert t_m == 5
    a = annuity_payment(B0, q, 5)  # A uses t_M, not the off-grid maturity
    for t in range(5):
        assert bal[t] == pytest.approx(annuity_balance(B0, q, a, t), rel=1e-10)
    assert inst[5] == pytest.approx(a - q * bal[4], rel=1e-10)
    assert inst[5] == pytest.approx(bal[4], rel=1e-10)
    assert balloon == 0.0
    np.testing.assert_array_equal(bal[5:], 0.0)


def test_balloon_tolerance_counts_rounding_as_zero():
    # Whatever tiny residue rounding leaves at t_M, it is no balloon (≤ 1e-6 B(0)).
    for maturity in (0.25, 0.5, 1.0, 1.75, 2.3, 3.0):
        for rate in (0.0, 0.037, 0.11, 0.25):
            for amort in (LINEAR, ANNUITY):
                _, _, balloon, _ = one_loan(amort, maturity, rate=rate, balance=123_456_789.0)
                assert balloon == 0.0, (maturity, rate, amort)


# ------------------------------------------------------------------ beyond the horizon


@pytest.mark.parametrize("amortization", [BULLET, LINEAR, ANNUITY])
def test_maturity_beyond_horizon(amortization):
    q = 0.09 * 0.25
    bal, inst, balloon, t_m = one_loan(amortization, 5.0, rate=0.09)
    assert t_m == 20
    assert balloon == 0.0  # not recorded: t_M > T
    assert bal[12] > 0.0
    if amortization == BULLET:
        np.testing.assert_array_equal(bal, B0)
        np.testing.assert_array_equal(inst, 0.0)
    elif amortization == LINEAR:
        np.testing.assert_allclose(bal, B0 * (1.0 - np.arange(13) * 0.25 / 5.0), rtol=1e-12)
        assert bal[12] == pytest.approx(0.4 * B0, rel=1e-12)
        np.testing.assert_allclose(inst[1:], B0 * 0.25 / 5.0, rtol=1e-12)
    else:
        a = annuity_payment(B0, q, 20)
        expected = [annuity_balance(B0, q, a, t) for t in range(13)]
        np.testing.assert_allclose(bal, expected, rtol=1e-10)
        np.testing.assert_allclose(q * bal[:12] + inst[1:], a, rtol=1e-10)


def test_maturity_at_horizon_records_balloon():
    bal, inst, balloon, t_m = one_loan(BULLET, 3.0)
    assert t_m == 12
    assert balloon == B0
    assert bal[12] == 0.0 and bal[11] == B0


# ------------------------------------------------------------------ vectorised book


def test_vectorised_matches_single_loans():
    balances = np.array([1e6, 2e6, 5e5, 3e6, 7.5e5, 1e6])
    rates = np.array([0.08, 0.0, 0.12, 0.05, 0.03, 0.0])
    maturities = np.array([0.6, 1.0, 1.75, 2.3, 4.0, 0.75])
    amort = np.array([BULLET, LINEAR, ANNUITY, LINEAR, ANNUITY, ANNUITY], dtype=np.int64)
    bal, inst, balloon, t_m = balance_schedule(balances, rates, maturities, amort, 4, 12)
    for i in range(len(balances)):
        b1, i1, bl1, tm1 = one_loan(amort[i], maturities[i], rates[i], balance=balances[i])
        np.testing.assert_array_equal(bal[i], b1)
        np.testing.assert_array_equal(inst[i], i1)
        assert balloon[i] == bl1 and t_m[i] == tm1
    # Balance identity: B(t) = B(t−1) − I(t) for t < t_M; B(t_M−1) = I(t_M) + Bal when t_M ≤ T.
    for i in range(len(balances)):
        for t in range(1, 13):
            if t < t_m[i]:
                assert bal[i, t] == pytest.approx(bal[i, t - 1] - inst[i, t], rel=1e-12, abs=1e-6)
            elif t == t_m[i]:
                assert bal[i, t - 1] == pytest.approx(inst[i, t] + balloon[i], rel=1e-12)
                assert inst[i, t] <= bal[i, t - 1]
            else:
                assert bal[i, t] == 0.0 and inst[i, t] == 0.0


# ------------------------------------------------------------------ time tolerances


def test_maturity_period_tolerance():
    # 0.75 years on a quarterly grid is period 3, not 4
    assert maturity_period(np.array([0.75]), 4).tolist() == [3]
    assert maturity_period(np.array([0.75 + 1e-12]), 4).tolist() == [3]
    assert maturity_period(np.array([0.76]), 4).tolist() == [4]
    assert maturity_period(np.array([0.25, 0.2, 1.0, 3.0]), 4).tolist() == [1, 1, 4, 12]
    # 0.1 + 0.2 = 0.30000000000000004: 3.0000000000000004 monthly-ish periods -> 3
    assert maturity_period(np.array([0.1 + 0.2]), 10).tolist() == [3]
    # 0.07 * 100 = 7.000000000000001 in floating point -> 7, not 8
    assert 0.07 * 100 > 7.0
    assert maturity_period(np.array([0.07, 0.55, 1.1]), 100).tolist() == [7, 55, 110]
    # and a schedule built on it matures in that period
    bal, _, balloon, t_m = one_loan(BULLET, 0.1 + 0.2, steps=10, periods=10)
    assert t_m == 3 and bal[3] == 0.0 and bal[2] == B0 and balloon == B0


def test_contract_periods_tolerance():
    # k(t) = share while tΔ <= contract_years_remaining (+1e-9 years)
    assert contract_periods(np.array([0.0, 0.1, 0.25, 0.49, 0.5, 4.0]), 4).tolist() == [
        0,
        0,
        1,
        1,
        2,
        16,
    ]
    # 0.29 * 100 = 28.999999999999996 in floating point: still 29 whole periods
    assert 0.29 * 100 < 29.0
    assert contract_periods(np.array([0.29, 0.57, 0.58]), 100).tolist() == [29, 57, 58]
    # just under a period boundary, beyond the tolerance, is the period before
    assert contract_periods(np.array([0.5 - 1e-6]), 4).tolist() == [1]


def test_annuity_with_a_tiny_rate_is_finite_and_amortizes():
    """1 − (1 + q)^(−t_M) loses every digit for |q| ~ 1e-16: the schedule must stay finite
    and reach zero without a spurious balloon."""
    balance, installment, balloon, t_m = balance_schedule(
        np.array([1e6, 1e6]), np.array([1e-17, 1e-12]), np.array([2.0, 2.0]),
        np.array([ANNUITY, ANNUITY]), 4, 12,
    )  # fmt: skip
    assert np.all(np.isfinite(balance)) and np.all(np.isfinite(installment))
    np.testing.assert_array_equal(balloon, 0.0)
    np.testing.assert_allclose(installment[:, 1:9].sum(axis=1), 1e6, rtol=1e-9)
