"""`gpucredit validate-model`: the quick form passes end to end, its files are what a model-risk
team receives, and the checks can fail (a validation that cannot fail proves nothing)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from gpucredit.cli import main
from gpucredit.io.assumptions import default_assumptions
from gpucredit.portfolio import validation as v

GROUPS = {
    "vasicek",
    "reference",
    "precision",
    "invariance",
    "gradients",
    "euler",
    "convergence",
    "t_copula",
    "calibration",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    result = CliRunner().invoke(main, ["validate-model", "--quick", "--out", str(out)])
    return result, out


def test_quick_form_passes_every_check(quick_run):
    result, out = quick_run
    document = json.loads((out / "validation.json").read_text())
    failed = [(c["name"], c["values"]) for c in document["checks"] if not c["passed"]]
    assert result.exit_code == 0, (result.output, failed)
    assert document["passed"] is True and document["n_failed"] == 0
    assert {c["group"] for c in document["checks"]} == GROUPS
    assert document["metadata"]["form"] == "quick"
    for check in document["checks"]:
        assert set(check) == {
            "name",
            "group",
            "passed",
            "values",
            "tolerance",
            "why_tolerance",
            "details",
        }
        assert check["tolerance"] and len(check["why_tolerance"]) > 40, check["name"]


def test_quick_form_covers_the_issue(quick_run):
    _, out = quick_run
    names = [c["name"] for c in json.loads((out / "validation.json").read_text())["checks"]]
    vasicek = [n for n in names if n.startswith("vasicek Gaussian")]
    assert len({n.split(" EL")[0].split(" VaR")[0].split(" ES")[0] for n in vasicek}) >= 3
    assert any(" VaR 0.99" in n for n in vasicek) and any(" VaR 0.999" in n for n in vasicek)
    assert any(n.startswith("vasicek t") for n in names)
    assert sum(n.startswith("AD = FD") for n in names) >= 16
    assert any("Chunk-size" in n for n in names) and any("offset" in n for n in names)
    assert any(n.startswith("Σ contributions = ES") for n in names)
    assert any("standard error ∝ 1/√S" in n for n in names)


def test_html_is_self_contained_with_the_convergence_plot(quick_run):
    _, out = quick_run
    html = (out / "validation.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower()
    assert 'src="data:image/png;base64,' in html
    assert "Estimates and 95% intervals against the scenario count" in html
    assert "Standard error against the scenario count" in html
    assert "PASS: all" in html


# --------------------------------------------------------------------------- checks can fail


def test_vasicek_closed_forms_match_the_basel_formula():
    truth = v.vasicek_closed_forms(1.0, 0.01, 0.2, (0.999,))
    assert truth["el"] == 0.01
    # Basel IRB conditional PD at PD 1%, R 0.2: Φ((−2.32635 + √0.2 × 3.09023)/√0.8) = Φ(−1.05582)
    assert truth["var_0.999"] == pytest.approx(0.14553, abs=1e-5)
    # ES: P(X <= Φ⁻¹(PD), Z <= −Φ⁻¹(α)) / (1 − α), X and Z standard normal with correlation √R
    r = np.sqrt(0.2)
    bivariate = stats.multivariate_normal.cdf(
        [stats.norm.ppf(0.01), -stats.norm.ppf(0.999)],
        mean=[0.0, 0.0],
        cov=[[1.0, r], [r, 1.0]],
        abseps=1e-12,
        releps=1e-10,
    )
    assert truth["es_0.999"] == pytest.approx(bivariate / 0.001, rel=1e-4)
    assert truth["es_0.999"] > truth["var_0.999"]


@pytest.fixture(scope="module")
def vasicek_losses():
    base = default_assumptions()
    assumptions = v.vasicek_assumptions(base)
    book = v.vasicek_book(0.02, 0.15)
    lgd = v.vasicek_loss_given_default(assumptions, book)
    losses = v._jax_losses(book, assumptions, 65_536, 3, "float64", 65_536)
    return losses, len(book) * lgd


def test_vasicek_check_fails_on_a_wrong_closed_form(vasicek_losses):
    losses, total_lgd = vasicek_losses
    m = v.risk_measures(losses, None, (0.99,), v.N_BATCHES)
    k = v.bonferroni_multiplier(3)
    right = v.vasicek_closed_forms(total_lgd, 0.02, 0.15, (0.99,))
    wrong = v.vasicek_closed_forms(total_lgd, 0.02, 0.20, (0.99,))  # the wrong correlation
    ok = v.closed_form_check(
        "VaR", "vasicek", m.var(0.99), m.at(0.99).var_se, right["var_0.99"], k, 3
    )
    bad = v.closed_form_check(
        "VaR", "vasicek", m.var(0.99), m.at(0.99).var_se, wrong["var_0.99"], k, 3
    )
    assert ok.passed and not bad.passed
    assert abs(bad.values["z"]) > k


def test_vasicek_check_fails_on_a_biased_estimator(vasicek_losses):
    losses, total_lgd = vasicek_losses
    truth = v.vasicek_closed_forms(total_lgd, 0.02, 0.15, (0.99,))
    biased = v.risk_measures(losses * 1.03, None, (0.99,), v.N_BATCHES)  # LGD 3% too high
    check = v.closed_form_check(
        "EL", "vasicek", biased.el, biased.el_se, truth["el"], v.bonferroni_multiplier(3), 3
    )
    assert not check.passed


def test_rate_check_fails_on_a_wrong_rate():
    s = np.array([2**k for k in range(12, 19)])
    good = v.rate_check("EL", s, 5.0 / np.sqrt(s), 1, "")
    slow = v.rate_check("EL", s, 5.0 / s**0.25, 1, "")  # an estimator converging as S^(-1/4)
    assert good.passed and not slow.passed


def test_agreement_check_fails_beyond_its_tolerance():
    expected = np.linspace(1.0, 2.0, 10)
    assert v.relative_agreement_check(
        "x", "g", expected * (1 + 1e-12), expected, 1e-9, 0, ""
    ).passed
    assert not v.relative_agreement_check(
        "x", "g", expected * (1 + 1e-6), expected, 1e-9, 0, ""
    ).passed


def test_cli_exits_1_when_a_check_fails(tmp_path, monkeypatch):
    failing = v.Check("forced", "vasicek", False, {"z": 9.0}, "|z| ≤ 3", "because")
    run = v.ValidationRun((failing,), v.validation_settings(True), {"elapsed_seconds": 0.0})
    monkeypatch.setattr(v, "run_validation", lambda *args, **kwargs: run)
    result = CliRunner().invoke(main, ["validate-model", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1
    document = json.loads((tmp_path / "validation.json").read_text())
    assert document["passed"] is False and document["n_failed"] == 1
    assert "FAIL: 1 of 1" in (tmp_path / "validation.html").read_text()


def test_calibration_check_catches_a_credit_cycle_without_persistence(monkeypatch):
    """The AR(1) lag check fails when the engine's credit cycle has the wrong persistence."""
    from gpucredit.kernels import jax_engine

    base = default_assumptions()
    real = jax_engine.factor_paths_jax

    def wrong(params, grid, normals):
        return real(params._replace(credit_persistence=0.3), grid, normals)

    monkeypatch.setattr(jax_engine, "factor_paths_jax", wrong)
    checks = v.credit_cycle_checks(base, v.validation_settings(quick=True))
    assert checks and not any(c.passed for c in checks)
    monkeypatch.setattr(jax_engine, "factor_paths_jax", real)
    assert all(c.passed for c in v.credit_cycle_checks(base, v.validation_settings(quick=True)))
