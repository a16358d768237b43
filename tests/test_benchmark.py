"""Smoke test of the benchmark harness (gpucredit.benchmark): tiny sizes, the correctness
check runs, each case in its own process, JSON and markdown written."""

from __future__ import annotations

import json

import pytest

from gpucredit import benchmark


def test_flop_count_and_fit():
    flops = benchmark.flops_per_loan_period()
    assert flops["total"] == flops["pass1"] + flops["pass2"] > 100
    assert benchmark.fit_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert benchmark.fit_exponent([5, 5], [1, 2]) is None
    assert benchmark.cpu_peak()["fp32_flops"] > 0


def test_harness_writes_results(tmp_path):
    f = benchmark._f
    c = "conditional"
    plan = benchmark.Plan(
        "cpu-tiny",
        (
            f("forward", "numpy", "float64", c, 40, 32, 16, "throughput", "target"),
            f("forward", "jax", "float32", c, 40, 64, 32, "throughput", "scaling-scenarios"),
            f("forward", "jax", "float32", c, 40, 128, 32, "scaling-scenarios", "scaling-loans"),
            f("forward", "jax", "float32", c, 60, 64, 32, "scaling-loans"),
            f("gradient", "jax", "float32", c, 40, 16, 16, "tail"),
            f("contributions", "jax", "float32", c, 40, 16, 16, "tail"),
        ),
        check_loans=40,
        check_scenarios=16,
        budget_s=300,
    )
    report = benchmark.run_benchmarks(
        out_dir=tmp_path, name="tiny", book_dir=tmp_path / "books", plan=plan, echo=lambda m: None
    )
    assert report["check"]["ok"]
    assert all("error" not in r for r in report["cases"]), report["cases"]
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["environment"]["jax"] and saved["environment"]["date"]
    summary = saved["summary"]
    assert summary["speedup_jax_float32_over_numpy"]["loans"] == 40
    assert summary["scaling"]["scenarios"]["exponent"] is not None
    assert summary["scaling"]["loans"]["exponent"] is not None
    assert summary["tail_gradient"]["gradient_over_forward"] > 0
    forward = [r for r in saved["cases"] if r["case"]["kind"] == "forward"]
    assert all(r["loan_periods_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in forward)
    assert all(0 < r["roofline_fraction"] < 1 for r in forward)
    md = (tmp_path / "tiny.md").read_text()
    assert "loan-periods/s" in md and "Roofline" in md


def test_modes_rows_and_the_one_factor_floor(tmp_path):
    """The "modes" cases: conditional and sampled mode in one process, on one period against
    the one-factor floor; their ratios reach the summary and the markdown."""
    benchmark.ensure_books(tmp_path, [40])
    cases = (
        benchmark._modes(40, 32, 16, periods=1),
        benchmark._modes(40, 32, 16),
    )
    results = [benchmark.run_case(case, tmp_path) for case in cases]
    one, grid = results
    assert one["periods"] == 1 and grid["periods"] == 12
    assert set(one["rates"]) == {"conditional", "sampled", "floor"}
    assert set(grid["rates"]) == {"conditional", "sampled"}
    assert all(v > 0 for r in results for v in r["rates"].values())
    assert one["ratios"]["conditional_over_floor"] > 0
    env = {"jax_platform": "cpu", "date": "", "gpucredit": "", "jax": "", "numpy": "",
           "python": "", "cpu": "cpu", "cpu_cores": 2}  # fmt: skip
    plan = benchmark.Plan("cpu-tiny", cases)
    summary = benchmark.analyse(results, env, plan)
    assert [m["periods"] for m in summary["modes"]] == [1, 12]
    report = {"environment": env, "summary": summary, "cases": results, "plan": plan.name,
              "check": {"results": []}}  # fmt: skip
    md = benchmark.markdown(report)
    assert "one one-year period" in md and "floor" in md and "Sampled vs conditional" in md


def test_one_factor_floor_is_vasicek():
    """The floor's mean loss is Σ EAD LGD p and its chunks do not depend on the chunking."""
    import numpy as np

    from gpucredit.kernels import one_factor

    n = 300
    book = one_factor.prepare_one_factor(np.full(n, 0.05), np.full(n, 0.1), np.ones(n))
    losses = np.asarray(one_factor.one_factor_losses(book, 3, 0, 4000))
    assert abs(losses.mean() / n - 0.05) < 0.005
    part = np.asarray(one_factor.one_factor_losses(book, 3, 1000, 64))
    np.testing.assert_array_equal(part, losses[1000:1064])
