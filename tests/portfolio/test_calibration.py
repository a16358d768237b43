"""The calibration table (portfolio/calibration.py): the year-1 pass is the run's own first
year, the table's arithmetic, and the paper-vs-path list."""

from __future__ import annotations

import numpy as np
import pytest

from gpucredit.portfolio.book import feature_book, uniform_book
from gpucredit.portfolio.calibration import calibration_table, paper_vs_path
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.loans import loan_arrays


def test_year_one_pass_is_the_runs_first_year(assumptions):
    """Loans that mature at one year cannot default later: their horizon PD over the 3-year
    run equals the year-1 pass's default rate, scenario for scenario, so the two averages
    agree to rounding (the year-1 pass runs on the run's first scenarios and first year)."""
    book = feature_book(24, seed=9)
    book = type(book)(**{**vars(book), "maturity_years": np.ones(len(book))})
    run = simulate(book, assumptions, scenarios=512, seed=3, backend="numpy", sensitivities=False)
    table = run.calibration
    assert table["year_one_scenarios"] == 512 and table["year_one_periods"] == 4
    for row in (table["book"], *table["by_borrower_type"].values()):
        assert row["model_default_rate_year_one"] == pytest.approx(
            row["model_pd_horizon"], rel=1e-12
        )
        assert row["input_pd_year_one"] == pytest.approx(row["input_pd_horizon"], rel=1e-15)
    # and the horizon PD of a longer book is larger than its year-1 rate
    longer = simulate(
        feature_book(24, seed=9), assumptions, scenarios=512, seed=3, backend="numpy",
        sensitivities=False, contributions=False,
    )  # fmt: skip
    assert (
        longer.calibration["book"]["model_pd_horizon"]
        > (longer.calibration["book"]["model_default_rate_year_one"])
    )
    assert "es_99_share" not in longer.calibration["book"]  # no contributions, no ES shares


def test_table_arithmetic_by_hand(assumptions):
    book = uniform_book(
        3, borrower_type=["miner", "miner", "neocloud"], balance_usd=[100.0, 300.0, 600.0],
        pd_annual=[0.02, 0.04, 0.01], maturity_years=[5.0, 2.0, 5.0],
    )  # fmt: skip
    loans = loan_arrays(book, assumptions)
    table = calibration_table(
        book, loans, assumptions,
        horizon_pd=np.array([0.1, 0.2, 0.05]),
        year_one_pd=np.array([0.03, 0.05, 0.012]),
        expected_loss_usd=np.array([4.0, 12.0, 6.0]),
        mean_lgd=np.array([0.4, 0.5, np.nan]),
        expected_shortfall_usd={"0.99": np.array([20.0, 60.0, 90.0])},
    )  # fmt: skip
    miners = table["by_borrower_type"]["miner"]
    assert miners["loans"] == 2 and miners["exposure_usd"] == 400.0
    assert miners["input_pd_annual"] == pytest.approx(0.03)
    assert miners["input_pd_year_one"] == pytest.approx(0.03)
    # loan 1 matures at 2 years: compounded over 2 years, loan 0 over the 3-year horizon
    assert miners["input_pd_horizon"] == pytest.approx(((1 - 0.98**3) + (1 - 0.96**2)) / 2)
    assert miners["model_default_rate_year_one"] == pytest.approx(0.04)
    assert miners["year_one_ratio"] == pytest.approx(0.04 / 0.03)
    assert miners["mean_lgd"] == pytest.approx(16.0 / (4.0 / 0.4 + 12.0 / 0.5))
    assert miners["el_share"] == pytest.approx(16.0 / 400.0)
    assert miners["es_99_share"] == pytest.approx(80.0 / 400.0)
    assert table["by_borrower_type"]["neocloud"]["mean_lgd"] is None  # never defaults
    assert table["book"]["el_share"] == pytest.approx(22.0 / 1000.0)


def test_paper_vs_path_flags_a_loan_that_cannot_pay(assumptions):
    """A loan whose fleet earns too little to pay its debt service on the central path is
    listed; a comfortable one is not."""
    book = uniform_book(
        2, balance_usd=[1_000_000.0, 2_000_000.0], amortization=["linear", "linear"],
        other_opex_usd_per_gpu_hour=[0.0, 1.5], maturity_years=[4.0, 4.0],
        cash_usd=[500_000.0, 0.0],
    )  # fmt: skip
    listed = paper_vs_path(book, loan_arrays(book, assumptions), assumptions)
    assert listed["loans"] == 1 and listed["debt_service"] == 1 and listed["refinancing"] == 0
    (row,) = listed["rows"]
    assert row["loan_id"] == "L00001" and row["cannot_pay"] == "debt service"
    assert row["central_min_liquidity_coverage"] < 1
    assert listed["exposure_share"] == pytest.approx(2.0 / 3.0)
