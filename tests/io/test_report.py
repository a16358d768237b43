"""report.html: self-contained, every section present, inputs validated, and it renders in a
real headless Chromium with no console error and no broken or zero-sized image."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpucredit.io.report import ReportError, render_report, render_report_from_dir
from gpucredit.portfolio.risk import (
    SUMMARY_FORMAT_VERSION,
    LossHistogram,
    alpha_label,
    largest_losses,
    tail_size,
)

ALPHAS = (0.99, 0.999)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTION_HEADINGS = (
    "Headline risk measures",
    "Loss distribution",
    "Loss by period",
    "Calibration",
    "Risk contributions",
    "Concentration by borrower",
    "Offtakers",
    "Sensitivities",
    "Stress scenarios",
    "Today&#x27;s book",
    "Run metadata",
)


# ----------------------------------------------------------------------------- fixture writer


def _measures(losses: np.ndarray, scale: float = 1.0, unavailable: tuple = ()) -> dict:
    """Measures as summary.json has them; at the levels in `unavailable` too few tail
    scenarios per batch: no standard error or interval (null), interval_available false."""
    losses = losses * scale
    el, std = float(losses.mean()), float(losses.std())
    se = std / np.sqrt(losses.size) * 1.3
    tail = {}
    for alpha in ALPHAS:
        var = float(np.quantile(losses, alpha, method="inverted_cdf"))
        es = float(losses[losses >= var].mean())
        tail[alpha_label(alpha)] = {
            "alpha": alpha,
            "var_usd": var,
            "var_se_usd": 0.02 * var,
            "var_ci_usd": [0.96 * var, 1.04 * var],
            "es_usd": es,
            "es_se_usd": 0.03 * es,
            "es_ci_usd": [0.94 * es, 1.06 * es],
            "tail_scenarios_per_batch": losses.size * (1 - alpha) / 32,
            "interval_available": alpha not in unavailable,
        }
        if alpha in unavailable:
            tail[alpha_label(alpha)] |= {"var_se_usd": None, "var_ci_usd": [None, None]}
            tail[alpha_label(alpha)] |= {"es_se_usd": None, "es_ci_usd": [None, None]}
    return {
        "n_scenarios": int(losses.size),
        "effective_sample_size": float(losses.size),
        "n_batches": 32,
        "el_usd": el,
        "el_se_usd": se,
        "el_se_iid_usd": se / 1.3,
        "el_ci_usd": [el - 1.96 * se, el + 1.96 * se],
        "std_usd": std,
        "tail": tail,
    }


def _calibration_row(loans: int, exposure: float, pd: float, ratio: float) -> dict:
    """A calibration row (portfolio/calibration.py) with plausible numbers."""
    model_year_one = pd * ratio
    return {
        "loans": loans,
        "exposure_usd": exposure,
        "input_pd_annual": pd,
        "input_pd_year_one": pd,
        "input_pd_horizon": 1 - (1 - pd) ** 3,
        "model_default_rate_year_one": model_year_one,
        "model_pd_horizon": 1 - (1 - model_year_one) ** 3,
        "year_one_ratio": ratio,
        "mean_lgd": 0.4,
        "el_share": 0.4 * model_year_one * 2,
        "es_99_share": 0.31,
        "es_99_9_share": 0.42,
    }


def calibration_summary(flagged: int = 3, loan_id: str = "L0001") -> dict:
    """summary.json's "calibration": two borrower types, four generations, the whole book,
    and `flagged` paper-vs-path loans (the first one named `loan_id`)."""
    types = {"neocloud": (20, 6e8, 0.04, 1.21), "miner": (12, 4e8, 0.07, 1.48)}
    generations = {g: (8, 2.5e8, 0.05, 1.1 + 0.1 * i) for i, g in enumerate(GENERATIONS)}
    rows = [
        {
            "loan_id": loan_id if i == 0 else f"L{i:04d}",
            "borrower_id": f"B{i:03d}",
            "borrower_type": "neocloud" if i % 2 else "miner",
            "gpu_generation": GENERATIONS[i % 4],
            "balance_usd": 1e5 * (i + 1),
            "central_min_liquidity_coverage": 0.5 if i % 3 else 5.0,
            "central_refinancing_coverage": 1.0 if i % 3 else 0.34,
            "cannot_pay": "debt service" if i % 3 else "balloon refinancing",
        }
        for i in range(flagged)
    ]
    exposure = sum(r["balance_usd"] for r in rows)
    return {
        "book": _calibration_row(32, 1e9, 0.0513, 1.31),
        "by_borrower_type": {k: _calibration_row(*v) for k, v in types.items()},
        "by_generation": {k: _calibration_row(*v) for k, v in generations.items()},
        "year_one_periods": 4,
        "year_one_scenarios": 20_000,
        "paper_vs_path": {
            "loans": flagged,
            "debt_service": sum(1 for r in rows if r["cannot_pay"] == "debt service"),
            "refinancing": sum(1 for r in rows if r["cannot_pay"] != "debt service"),
            "exposure_usd": exposure,
            "exposure_share": exposure / 1e9,
            "rows": rows,
        },
    }


GENERATIONS = ("A100", "H100", "H200", "B200")
WARNING = (
    "VaR and ES at 99.9%: 0.62 tail scenarios per batch of the standard errors (fewer than "
    "5), so no standard error or interval is reported; run at least 161,000 scenarios"
)
# The built-in stresses' names and how much each scales the base losses (a wide table).
STRESSES = {
    "gpu_crash": 1.6,
    "next-gen-glut": 2.4,
    "crypto-winter": 1.2,
    "liquidity-freeze": 3.1,
    "rate-shock": 1.05,
}


def loss_by_period_summary(el_total: float, periods: int = 12, scenarios: int = 2048) -> dict:
    """summary.json's "loss_by_period" (portfolio/periods.py): a hump over 12 quarters."""
    weights = np.array([t * np.exp(-t / 4) for t in range(1, periods + 1)])
    el = el_total * weights / weights.sum()
    return {
        "scenarios": scenarios,
        "steps_per_year": 4,
        "period": list(range(1, periods + 1)),
        "year_end": [t / 4 for t in range(1, periods + 1)],
        "el_usd": el.tolist(),
        "el_se_usd": (0.05 * el).tolist(),
        "cumulative_el_usd": np.cumsum(el).tolist(),
        "el_total_usd": float(el.sum()),
    }


def write_results_dir(
    directory: Path,
    *,
    contributions: bool = True,
    sensitivities: bool = True,
    seed: int = 7,
    calibration: bool = True,
) -> Path:
    """A plausible results directory: summary.json, losses.parquet from a lognormal sample,
    and (optionally) contributions and sensitivities tables of a few dozen rows and the
    calibration table."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    n_scenarios = 20_000
    losses = rng.lognormal(mean=np.log(40e6), sigma=0.8, size=n_scenarios)
    losses[rng.random(n_scenarios) < 0.05] = 0.0
    base = _measures(losses, unavailable=(0.999,))
    stress = {}
    for name, scale in STRESSES.items():
        stressed = _measures(losses, scale=scale)
        change = {"el_usd": stressed["el_usd"] - base["el_usd"]}
        for key in base["tail"]:
            for m in ("var", "es"):
                moved = stressed["tail"][key][f"{m}_usd"] - base["tail"][key][f"{m}_usd"]
                change[f"{m}_{key}_usd"] = moved
        stress[name] = {
            "description": f"{name}: GPU prices fall 40% <immediately> & rents follow",
            "measures": stressed,
            "change": change,
        }
    generations = ("A100", "H100", "H200", "B200")
    types = ("neocloud", "miner")
    by = {
        g: {"loans": 8, "exposure_usd": 1e8 * (i + 1), "gpus": 5000, "ltv": 0.7, "dscr": 1.3}
        for i, g in enumerate(generations)
    }
    by["B200"]["dscr"] = None  # any value may be null
    summary = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "metadata": {
            "version": "0.1.0",
            "seed": 42,
            "scenarios": n_scenarios,
            "mode": "default",
            "backend": "numpy",
            "device": "cpu",
            "precision": "float64",
            "chunk_size": 4096,
            "alphas": list(ALPHAS),
            "copula": "t",
            "horizon_years": 3.0,
            "steps_per_year": 4,
            "discount": True,
            "loans": 32,
            "book": "demo_book.parquet",
            "book_sha256": "ab" * 32,
            "assumptions_sha256": "cd" * 32,
            "pass1_seconds": 12.5,
            "sensitivities_seconds": 3.25,
            "el_sensitivity_scenarios": 4096,
            "elapsed_seconds": 17.9,
            "scenarios_per_second": 1600.0,
            "loan_periods_per_second": 6.1e5,
        },
        "measures": base,
        "warnings": [WARNING],
        "stress": stress,
        "loss_by_period": loss_by_period_summary(0.97 * base["el_usd"]),
        "book": {
            "source": "demo_book.parquet",
            "loans": 32,
            "borrowers": 12,
            "exposure_usd": 1e9,
            "gpus": 20000,
            "ltv": 0.68,
            "dscr": 1.41,
            "dscr_below_1_share": 0.12,
            "by_generation": by,
            "by_borrower_type": {
                t: {"loans": 16, "exposure_usd": 5e8, "gpus": 10000, "ltv": 0.7, "dscr": None}
                for t in types
            },
        },
    }
    if calibration:
        summary["calibration"] = calibration_summary(flagged=5, loan_id='L<0>&"x"')
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    pq.write_table(
        pa.table(
            {"scenario": np.arange(n_scenarios, dtype=np.int64), "loss_usd": losses},
        ),
        directory / "losses.parquet",
    )
    n_loans = 32
    if contributions:
        el = rng.gamma(2.0, 1.0, n_loans)
        es99, es999 = rng.gamma(2.0, 1.0, n_loans), rng.gamma(2.0, 1.0, n_loans)
        table = {
            "loan_id": [f"L{i:04d}" for i in range(n_loans)],
            "borrower_id": [f"B{i % 24:03d}<&>" for i in range(n_loans)],  # needs escaping
            "borrower_type": [types[i % 2] for i in range(n_loans)],
            "gpu_generation": [generations[i % 4] for i in range(n_loans)],
            "balance_usd": rng.uniform(1e7, 6e7, n_loans),
            "expected_loss_usd": el / el.sum() * base["el_usd"],
            "horizon_pd": rng.uniform(0.01, 0.2, n_loans),
            "mean_lgd": rng.uniform(0.2, 0.6, n_loans),
            "es_99_usd": es99 / es99.sum() * base["tail"]["99"]["es_usd"],
            "es_99_9_usd": es999 / es999.sum() * base["tail"]["99_9"]["es_usd"],
        }
        pq.write_table(pa.table(table), directory / "contributions.parquet")
    if sensitivities:
        params = [f"generations.{g}.{p}" for g in generations for p in ("depreciation", "mu")]
        params += [f"correlation.rent:{g}~price:{g}" for g in generations]
        params += ["crypto.drift", "power.price", "rates.level", "lgd.beta_L", "fire_sale.gamma"]
        params += [f"launch.{g}.jump" for g in generations]
        n = len(params)
        value = rng.uniform(0.05, 2.0, n)
        value[params.index("crypto.drift")] = 0.0  # zero-valued: uses the 0.1 move
        table = {
            "parameter": params,
            "value": value,
            "d_el_usd": rng.normal(0, 5e6, n),
            "d_es_99_usd": rng.normal(0, 2e7, n),
            "d_es_99_9_usd": rng.normal(0, 4e7, n),
        }
        pq.write_table(pa.table(table), directory / "sensitivities.parquet")
    return directory


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    directory = write_results_dir(tmp_path_factory.mktemp("results"))
    return render_report_from_dir(directory)


# ----------------------------------------------------------------------------- static checks


def _image_sources(text: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


def test_report_is_self_contained_with_every_section(full_report: Path):
    text = full_report.read_text(encoding="utf-8")
    assert full_report.name == "report.html"
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.IGNORECASE)
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    assert "@import" not in text and "url(" not in text
    positions = [text.find(f">{h}</h2>") for h in SECTION_HEADINGS]
    assert all(p > 0 for p in positions), dict(zip(SECTION_HEADINGS, positions, strict=True))
    assert positions == sorted(positions), "sections out of order"
    images = _image_sources(text)
    # histogram, tail, loss by period, 3 contribution charts, tornado, stress, exposure
    assert len(images) == 9
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    # header facts, escaping, number formatting
    assert "demo_book.parquet" in text and "20,000" in text and "17.9 s" in text
    assert "B000&lt;&amp;&gt;" in text and "B000<&>" not in text
    assert "&lt;immediately&gt; &amp; rents follow" in text
    assert "L&lt;0&gt;&amp;&quot;x&quot;" in text and 'L<0>&"x"' not in text
    assert "99.9%" in text and "ES 99.9%" in text
    assert re.search(r"\$\d{1,3}(,\d{3})*\.\d\dM", text)
    assert "not computed" not in text
    assert "100% move" in text and "(Δ=0.1)" in text  # tornado caption
    assert text.count("+0.1 (absolute)") >= 1  # correlation or zero-valued rows in the table
    assert "gpu_crash" in text
    # every metadata field is listed
    for key in ("book_sha256", "loan_periods_per_second", "el_sensitivity_scenarios", "copula"):
        assert f"<dt>{key}</dt>" in text
    # no temporary file left behind
    assert sorted(p.name for p in full_report.parent.iterdir() if p.name.startswith(".")) == []


def test_missing_optional_tables_say_not_computed(tmp_path: Path):
    directory = write_results_dir(tmp_path / "r", contributions=False, sensitivities=False)
    text = render_report_from_dir(directory).read_text(encoding="utf-8")
    assert "Loan contributions: not computed" in text
    assert "Parameter sensitivities: not computed" in text
    assert len(_image_sources(text)) == 5  # histogram, tail, loss by period, stress, exposure


def test_missing_summary_raises_report_error_naming_it(tmp_path: Path):
    directory = write_results_dir(tmp_path / "r", contributions=False, sensitivities=False)
    (directory / "summary.json").unlink()
    with pytest.raises(ReportError, match="summary.json"):
        render_report_from_dir(directory)
    assert not (directory / "report.html").exists()


def test_unreadable_inputs_raise_report_error_naming_the_file(tmp_path: Path):
    directory = write_results_dir(tmp_path / "r", contributions=False, sensitivities=False)
    (directory / "contributions.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReportError, match="contributions.parquet"):
        render_report_from_dir(directory)
    (directory / "contributions.parquet").unlink()
    (directory / "losses.parquet").unlink()
    with pytest.raises(ReportError, match="losses.parquet"):
        render_report_from_dir(directory)
    (directory / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="summary.json"):
        render_report_from_dir(directory)
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_all_null_summary_still_renders():
    summary = {
        "metadata": {"seed": None, "alphas": [0.99], "elapsed_seconds": None},
        "measures": {
            "el_usd": None,
            "tail": {"99": {"alpha": 0.99, "var_usd": None, "es_usd": None}},
        },
        "stress": None,
        "book": None,
    }
    text = render_report(summary, np.array([0.0, 1.0, 2.0, np.nan]), None, None)
    assert "Headline risk measures" in text and "—" in text


# ----------------------------------------------------------------------------- calibration


def _section_of(text: str, anchor: str) -> str:
    start = text.index(f'<section id="{anchor}">')
    return text[start : text.index("</section>", start)]


def _summary_for_calibration(tmp_path: Path) -> tuple[dict, np.ndarray]:
    directory = write_results_dir(
        tmp_path / "r", contributions=False, sensitivities=False, calibration=False
    )
    summary = json.loads((directory / "summary.json").read_text())
    losses = pq.read_table(directory / "losses.parquet").column("loss_usd").to_numpy()
    return summary, losses


def test_calibration_section_renders_both_tables_the_note_and_paper_vs_path(tmp_path: Path):
    summary, losses = _summary_for_calibration(tmp_path)
    summary["calibration"] = calibration_summary(flagged=62, loan_id="<b>L&0</b>")
    text = render_report(summary, losses, None, None)
    nav = text[text.index("<nav>") : text.index("</nav>")]
    assert '<a href="#calibration">Calibration</a>' in nav
    assert text.index(">Loss distribution</h2>") < text.index(">Calibration</h2>")
    assert text.index(">Calibration</h2>") < text.index(">Risk contributions</h2>")
    section = _section_of(text, "calibration")
    # Two tables, each with its groups and the whole book as the total row.
    assert section.count('<table class="totals calib">') == 2
    assert "<th>Borrower type</th>" in section and "<th>Generation</th>" in section
    for name in ("neocloud", "miner", *GENERATIONS):
        assert f"<td>{name}</td>" in section
    assert section.count("<td>Whole book</td>") == 2
    for header in (
        "Input PD, annual",
        "Input PD, year 1",
        "Input PD, horizon",
        "Model default rate, year 1",
        "Model PD, horizon",
        "Model ÷ input, year 1",
        "Mean LGD",
        "EL, % of exposure",
        "ES 99%, % of exposure",
        "ES 99.9%, % of exposure",
    ):
        assert section.count(f">{header}</th>") == 2, header
    assert ">1.31×</td>" in section and ">1.48×</td>" in section  # book, miner ratios
    assert ">5.13%</td>" in section and ">42.00%</td>" in section and ">40.0%</td>" in section
    # The anchor in plain language.
    assert "pd_anchor &ldquo;expected&rdquo;" in section and "docs/spec.md" in section
    assert "every shock is 0" in section and "Jensen" in section and "1.0–2.0×" in section
    assert "first 20,000 scenarios" in section
    assert "Infrastructure view" not in section  # no paper-metrics stress in this run
    # Paper vs path: count, share, the 50 largest loans and how many more.
    paper = section[section.index("<h3>Paper vs path</h3>") :]
    assert "62 loan(s), 19.5% of exposure ($195.30M)" in paper
    assert paper.count("<tr>") == 1 + 50  # header + 50 rows
    assert "12 more flagged loan(s) not shown ($7.80M)" in paper
    body = paper[paper.index("<tbody>") :]
    assert body.index("L0061") < body.index("L0060") < body.index("L0012")  # largest first
    assert "L0011" not in body  # the 12 smallest are left out
    assert ">balloon refinancing</td>" in body and ">0.34×</td>" in body
    # Loan ids are escaped (the first loan is the smallest: give it the largest balance).
    summary["calibration"]["paper_vs_path"]["rows"][0]["balance_usd"] = 1e9
    text = render_report(summary, losses, None, None)
    assert "&lt;b&gt;L&amp;0&lt;/b&gt;" in text and "<b>L&0</b>" not in text


def test_report_renders_without_calibration(tmp_path: Path):
    """Older summaries have no "calibration"; --no-calibration writes null; a damaged one
    (nulls everywhere, no paper-vs-path rows) still renders."""
    summary, losses = _summary_for_calibration(tmp_path)
    for value in ("absent", None, "junk"):
        if value == "absent":
            summary.pop("calibration", None)
        else:
            summary["calibration"] = value
        text = render_report(summary, losses, None, None)
        section = _section_of(text, "calibration")
        assert ">Calibration</h2>" in section
        assert "Calibration: not computed in this run." in section
        assert "<table" not in section
    nulls = calibration_summary(flagged=0)
    nulls["book"] = {key: None for key in nulls["book"]}
    nulls["by_generation"] = None
    nulls["year_one_scenarios"] = None
    summary["calibration"] = nulls
    section = _section_of(render_report(summary, losses, None, None), "calibration")
    assert section.count("<td>Whole book</td>") == 2 and "—" in section
    assert "the input PDs and the central paths agree" in section
    summary["calibration"]["paper_vs_path"] = None
    section = _section_of(render_report(summary, losses, None, None), "calibration")
    assert "Paper vs path" not in section


def test_calibration_compares_the_paper_metrics_stress_with_the_base_run(tmp_path: Path):
    summary, losses = _summary_for_calibration(tmp_path)
    base = summary["measures"]
    stressed = json.loads(json.dumps(base))
    stressed["el_usd"] = base["el_usd"] * 1.25
    stressed["tail"]["99_9"]["es_usd"] = base["tail"]["99_9"]["es_usd"] * 1.1
    summary["stress"]["paper-metrics"] = {
        "description": "The infrastructure view",
        "measures": stressed,
        "change": {"el_usd": stressed["el_usd"] - base["el_usd"]},
    }
    for calibration in (calibration_summary(), None):
        summary["calibration"] = calibration
        section = _section_of(render_report(summary, losses, None, None), "calibration")
        line = section[section.index("Infrastructure view") :]
        line = line[: line.index("</p>")]
        assert "paper-metrics" in line and "anchor &ldquo;today&rdquo;" in line
        el_base = f"${base['el_usd'] / 1e6:,.2f}M"
        assert f"EL {el_base} → ${stressed['el_usd'] / 1e6:,.2f}M (+25.0%)" in line
        es_base = f"${base['tail']['99_9']['es_usd'] / 1e6:,.2f}M"
        assert f"ES 99.9% {es_base} → " in line and "(+10.0%)" in line
    # The stress also keeps its row in the stress table.
    assert ">paper-metrics</td>" in render_report(summary, losses, None, None)


def _make_tails_only(directory: Path) -> np.ndarray:
    """Turn a results directory into a tails-only run's: no losses.parquet, the histogram in
    summary.json and the largest losses in tail_losses.parquet. Returns the losses."""
    losses = pq.read_table(directory / "losses.parquet").column("loss_usd").to_numpy()
    (directory / "losses.parquet").unlink()
    summary = json.loads((directory / "summary.json").read_text())
    summary["metadata"]["keep_losses"] = False
    summary["loss_histogram"] = LossHistogram.of(losses).to_dict()
    (directory / "summary.json").write_text(json.dumps(summary))
    top = largest_losses(losses, tail_size(losses.size, ALPHAS))
    table = pa.table({"scenario": top.indices, "loss_usd": top.losses_usd})
    pq.write_table(table, directory / "tail_losses.parquet")
    return losses


def test_tails_only_report_draws_the_merged_histogram_and_the_tail(tmp_path: Path):
    """Without losses.parquet the report draws the same histogram and exceedance curve from
    summary.json's histogram and tail_losses.parquet; missing inputs name their file."""
    full = render_report_from_dir(write_results_dir(tmp_path / "full")).read_text()
    directory = write_results_dir(tmp_path / "tails")
    losses = _make_tails_only(directory)
    text = render_report_from_dir(directory).read_text(encoding="utf-8")
    positions = [text.find(f">{h}</h2>") for h in SECTION_HEADINGS]
    assert all(p > 0 for p in positions) and positions == sorted(positions)
    assert _image_sources(text)[:2] == _image_sources(full)[:2]  # histogram and tail charts
    assert len(_image_sources(text)) == 9
    assert "Tails-only run: merged from the per-batch histograms" in text
    assert "Median (within one histogram bin)" in text and f"{losses.size:,} simulated" in text
    (directory / "tail_losses.parquet").unlink()
    with pytest.raises(ReportError, match="tail_losses.parquet"):
        render_report_from_dir(directory)
    _make_tails_only(write_results_dir(tmp_path / "again"))
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    del summary["loss_histogram"]
    (tmp_path / "again" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match="summary.json: no valid loss_histogram"):
        render_report_from_dir(tmp_path / "again")


# ----------------------------------------------------------------------------- headless browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Injected into a *test copy* of the report only (the report itself has no script): collects
# JavaScript errors, console.error calls and failed resource loads from the first moment,
# then after `load` writes a JSON verdict into the DOM for --dump-dom to return.
PROBE = """<script>
window.__problems = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  if (t && t !== window) {
    __problems.push("resource failed: <" + t.tagName + "> " + String(t.src || t.href).slice(0, 60));
  } else {
    __problems.push("js error: " + e.message);
  }
}, true);
window.addEventListener("unhandledrejection", function (e) {
  __problems.push("unhandled rejection: " + e.reason);
});
(function () {
  var original = console.error;
  console.error = function () {
    __problems.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    var r = img.getBoundingClientRect();
    return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight, width: r.width, height: r.height};
  });
  var svgs = Array.prototype.map.call(document.querySelectorAll("svg"), function (s) {
    var r = s.getBoundingClientRect();
    return {width: r.width, height: r.height};
  });
  var resources = performance.getEntriesByType("resource").map(function (e) { return e.name; });
  var overflow = Array.prototype.filter.call(document.querySelectorAll("div.scroll"),
    function (d) { return d.scrollWidth > d.clientWidth + 1; }).map(function (d) {
      var s = d.closest("section");
      return (s ? s.id : "?") + ": " + d.scrollWidth + " > " + d.clientWidth + " px";
    });
  // Each section's box, and how far right anything inside it reaches (a table clipped by
  // its scroll box still reaches past the section's edge).
  var sections = Array.prototype.map.call(document.querySelectorAll("section"), function (s) {
    var r = s.getBoundingClientRect();
    var reach = r.right;
    Array.prototype.forEach.call(s.querySelectorAll("*"), function (e) {
      var b = e.getBoundingClientRect();
      if (b.width > 0 && b.height > 0) { reach = Math.max(reach, b.right); }
    });
    return {id: s.id, left: r.left + window.scrollX, top: r.top + window.scrollY,
            width: r.width, height: r.height, reach: reach};
  });
  var page = {innerWidth: window.innerWidth,
              scrollWidth: document.documentElement.scrollWidth,
              scrollHeight: document.documentElement.scrollHeight};
  var out = document.createElement("pre");
  out.id = "report-probe";
  out.textContent = JSON.stringify({problems: __problems, images: images, svgs: svgs,
                                    resources: resources, overflow: overflow,
                                    sections: sections, page: page});
  document.body.appendChild(out);
});
</script>"""

# A broken image and a script error: the control case the probe must catch.
BROKEN = (
    '<img alt="broken control" src="data:image/png;base64,iVBORw0KGgoAAAAAbroken==" '
    'width="100" height="50"><script>console.error("control console error");</script>'
)


def _find_chromium() -> str | None:
    override = os.environ.get("GPUCREDIT_CHROMIUM")
    if override:
        return override
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _chromium(binary: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run(
        [binary, *flags, *extra, url],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _console_lines(stderr: str) -> list[str]:
    """Chromium's --enable-logging=stderr prints page console messages as ':CONSOLE' lines."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]


def _probe(
    binary: str, tmp: Path, report_text: str, name: str, extra_body: str = "", width: int = 1280
) -> tuple:
    page = report_text.replace("<head>", "<head>" + PROBE, 1)
    page = page.replace("</main>", extra_body + "</main>", 1)
    path = tmp / f"{name}.html"
    path.write_text(page, encoding="utf-8")
    done = _chromium(
        binary, tmp / f"profile-{name}", path.as_uri(), f"--window-size={width},4000", "--dump-dom"
    )
    match = re.search(r'<pre id="report-probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"probe produced no verdict (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1))), _console_lines(done.stderr)


def _bad_images(verdict: dict) -> list[dict]:
    return [
        img
        for img in verdict["images"]
        if not (
            img["complete"]
            and img["naturalWidth"] > 0
            and img["naturalHeight"] > 0
            and img["width"] > 0
            and img["height"] > 0
        )
    ]


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = _find_chromium()
    if binary is None and os.environ.get("GPUCREDIT_REQUIRE_BROWSER"):
        pytest.fail("GPUCREDIT_REQUIRE_BROWSER is set but no Chromium binary was found")
    if binary is None:
        pytest.skip(
            "no Chromium binary (looked for chromium, chromium-browser, google-chrome on PATH "
            "and /usr/bin/chromium; install the Debian package `chromium` or set "
            "GPUCREDIT_CHROMIUM)"
        )
    return binary


def test_browser_probe_detects_a_broken_image_and_a_console_error(chromium, full_report, tmp_path):
    verdict, console = _probe(
        chromium, tmp_path, full_report.read_text(encoding="utf-8"), "control", BROKEN
    )
    assert [img["alt"] for img in _bad_images(verdict)] == ["broken control"]
    assert any("control console error" in p for p in verdict["problems"]), verdict["problems"]
    assert any("control console error" in line for line in console), console


def test_report_renders_in_headless_chromium(chromium, full_report, tmp_path):
    text = full_report.read_text(encoding="utf-8")
    verdict, console = _probe(chromium, tmp_path, text, "probed")
    assert verdict["problems"] == []
    assert console == []
    assert len(verdict["images"]) == 9
    assert _bad_images(verdict) == []
    assert all(s["width"] > 0 and s["height"] > 0 for s in verdict["svgs"])
    assert [r for r in verdict["resources"] if not r.startswith("data:")] == []
    assert verdict["overflow"] == []  # every table fits a 1,280 px window: nothing clipped

    # The report as shipped (no probe): loads without console messages; keep a screenshot.
    screenshot = tmp_path / "report.png"
    done = _chromium(
        chromium,
        tmp_path / "profile-shot",
        full_report.as_uri(),
        f"--screenshot={screenshot}",
        "--window-size=1280,4000",
    )
    assert _console_lines(done.stderr) == [], done.stderr[-2000:]
    assert screenshot.exists(), f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    png = screenshot.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 4000)


# ----------------------------------------------------------------------------- names are data

HOSTILE_NAMES = ("[/]", "[us]", r"$\cmd$", "$x$", "\x1b[31mred", "\x1b]8;;u\x07l", "<b>&", "a_b^c")


def test_names_are_data_in_the_report(tmp_path: Path):
    """Issue 20 item 5: "$\\cmd$" in a borrower or generation name made matplotlib raise and
    left no report; control characters reached the page. Every name the report shows, in
    tables and in chart labels, is shown as written."""
    directory = write_results_dir(tmp_path / "r")
    summary = json.loads((directory / "summary.json").read_text())
    losses = pq.read_table(directory / "losses.parquet").column("loss_usd").to_numpy()
    contributions = pq.read_table(directory / "contributions.parquet")
    n = contributions.num_rows
    names = [f"{HOSTILE_NAMES[i % len(HOSTILE_NAMES)]}{i // len(HOSTILE_NAMES)}" for i in range(n)]
    for column in ("loan_id", "borrower_id", "borrower_type", "gpu_generation"):
        index = contributions.schema.get_field_index(column)
        contributions = contributions.set_column(index, column, pa.array(names))
    sensitivities = pq.read_table(directory / "sensitivities.parquet")
    parameters = [f"generations.{names[i % n]}.depreciation" for i in range(sensitivities.num_rows)]
    sensitivities = sensitivities.set_column(0, "parameter", pa.array(parameters))
    group = next(iter(summary["book"]["by_generation"].values()))
    summary["book"]["by_generation"] = {name: group for name in HOSTILE_NAMES}
    summary["stress"] = {name: summary["stress"]["gpu_crash"] for name in HOSTILE_NAMES}
    design = {
        "target_loss_usd": 1e8,
        "loss_usd": 1.1e8,
        "central_loss_usd": 1e6,
        "distance": 3.1,
        "likelihood_ratio": 0.008,
        "converged": True,
        "paths": {f"rent:{name}": [1.0, 0.8, 0.7] for name in HOSTILE_NAMES},
        "central_paths": {f"rent:{name}": [1.0, 0.9, 0.85] for name in HOSTILE_NAMES},
        "loss_by_generation": {name: 1e7 for name in HOSTILE_NAMES},
        "loss_by_borrower_type": {"miner": 1.1e8},
    }
    text = render_report(summary, losses, contributions, sensitivities, reverse_stress=design)
    assert "\x1b" not in text and "\x07" not in text
    for name in HOSTILE_NAMES:
        shown = html.escape(name.replace("\x1b", "\\x1b").replace("\x07", "\\x07"))
        assert f">{shown}<" in text, name  # the book's generations and the stresses
        assert f">rent:{shown}<" not in text  # factor names are chart titles, not tables
    assert len(_image_sources(text)) == 10  # every chart drew, the reverse stress's included


def test_report_ignores_a_usetex_matplotlibrc(tmp_path: Path):
    """Labels are escaped for mathtext; a matplotlibrc asking for LaTeX must not apply."""
    import matplotlib

    directory = write_results_dir(tmp_path / "r", sensitivities=False)
    with matplotlib.rc_context({"text.usetex": True}):
        text = render_report_from_dir(directory).read_text(encoding="utf-8")
    assert len(_image_sources(text)) == 8


def test_a_summary_of_another_format_version_is_refused(tmp_path: Path):
    """summary.json of version 1 (keys without _usd, tails keyed "0.99") would render as
    dashes: refused, saying what to do."""
    directory = write_results_dir(tmp_path / "r", contributions=False, sensitivities=False)
    path = directory / "summary.json"
    summary = json.loads(path.read_text())
    for version in (1, None):
        summary["format_version"] = version
        path.write_text(json.dumps(summary))
        with pytest.raises(ReportError, match=r"summary\.json: format_version .*rerun"):
            render_report_from_dir(directory)


def test_unreadable_summaries_are_refused_naming_the_file(tmp_path: Path):
    directory = write_results_dir(tmp_path / "r", contributions=False, sensitivities=False)
    summary = directory / "summary.json"
    summary.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReportError, match=r"summary\.json: nested too deeply"):
        render_report_from_dir(directory)
    summary.write_bytes(b'{"metadata": "caf\xe9"}')
    with pytest.raises(ReportError, match=r"summary\.json: is not UTF-8 text"):
        render_report_from_dir(directory)
    summary.unlink()
    os.mkfifo(summary)  # opening it for reading used to wait for a writer
    with pytest.raises(ReportError, match=r"summary\.json: is not a regular file"):
        render_report_from_dir(directory)


# ----------------------------------------------------------------------------- issue 17 item 8


def _full_inputs(tmp_path: Path) -> tuple[dict, np.ndarray, pa.Table, pa.Table]:
    directory = write_results_dir(tmp_path / "r")
    summary = json.loads((directory / "summary.json").read_text())
    losses = pq.read_table(directory / "losses.parquet").column("loss_usd").to_numpy()
    contributions = pq.read_table(directory / "contributions.parquet")
    sensitivities = pq.read_table(directory / "sensitivities.parquet")
    return summary, losses, contributions, sensitivities


def _cells(section: str) -> list[list[str]]:
    """The text of every body row's cells (tags stripped, entities decoded)."""
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.DOTALL)
    out = []
    for row in rows:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
        if cells:
            out.append([html.unescape(re.sub(r"<[^>]+>", " ", c)).strip() for c in cells])
    return out


def test_headline_shows_share_of_exposure_warnings_and_withheld_intervals(tmp_path: Path):
    summary, losses, _, _ = _full_inputs(tmp_path)
    section = _section_of(render_report(summary, losses, None, None), "headline")
    # The warning is visible before the table, escaped, as summary.json words it.
    assert section.index('<div class="warn"') < section.index("<table")
    assert html.escape(WARNING) in section
    assert ">% of exposure</th>" in section
    rows = {r[0]: r for r in _cells(section)}
    el, exposure = summary["measures"]["el_usd"], summary["book"]["exposure_usd"]
    assert rows["Expected loss (EL)"][2] == f"{100 * el / exposure:.2f}%"
    es = summary["measures"]["tail"]["99_9"]["es_usd"]
    assert rows["Expected shortfall 99.9%"][2] == f"{100 * es / exposure:.2f}%"
    # 99.9%: interval withheld (n/a); 99%: shown.
    assert rows["Value at risk 99.9%"][3:] == ["n/a", "n/a"]
    assert rows["Expected shortfall 99.9%"][3:] == ["n/a", "n/a"]
    assert rows["Value at risk 99%"][3] != "n/a" and "–" in rows["Value at risk 99%"][4]
    assert "n/a: too few tail scenarios per batch" in section
    # No warnings, no box; no exposure, a dash.
    summary["warnings"] = []
    del summary["book"]
    section = _section_of(render_report(summary, losses, None, None), "headline")
    assert 'class="warn"' not in section
    assert {r[0]: r for r in _cells(section)}["Expected loss (EL)"][2] == "—"


def test_loss_by_period_section_shows_the_chart_years_and_the_sample(tmp_path: Path):
    summary, losses, _, _ = _full_inputs(tmp_path)
    section = _section_of(render_report(summary, losses, None, None), "periods")
    assert len(_image_sources(section)) == 1
    table = summary["loss_by_period"]
    el = np.array(table["el_usd"])
    rows = _cells(section)
    assert [r[0] for r in rows] == ["Year 1", "Year 2", "Year 3"]
    assert rows[0][1] == f"${el[:4].sum() / 1e6:,.2f}M"
    assert rows[-1][3] == f"${el.sum() / 1e6:,.2f}M" and rows[-1][4] == "100.0%"
    assert "first 2,048 scenarios" in section and "blue bars" in section
    # Absent (an engine that does not compute it yet, or an older run): said, not faked.
    for value in (None, {"el_usd": []}, {"el_usd": [1.0, None]}):
        summary["loss_by_period"] = value
        section = _section_of(render_report(summary, losses, None, None), "periods")
        assert "Loss by period: not computed in this run" in section and "<img" not in section


def test_concentration_gives_top_ten_shares_and_hhi_by_borrower(tmp_path: Path):
    summary, losses, contributions, _ = _full_inputs(tmp_path)
    section = _section_of(render_report(summary, losses, contributions, None), "concentration")
    rows = {r[0]: r for r in _cells(section)}
    borrowers = np.array(contributions.column("borrower_id").to_pylist())
    for label, column in (
        ("Exposure (balance)", "balance_usd"),
        ("EL", "expected_loss_usd"),
        ("ES 99.9%", "es_99_9_usd"),
    ):
        values = contributions.column(column).to_numpy()
        totals = np.array([values[borrowers == b].sum() for b in np.unique(borrowers)])
        shares = np.sort(totals / totals.sum())[::-1]
        hhi = float(np.sum(shares**2))
        assert rows[label][2] == f"{100 * shares[:10].sum():.1f}%", label
        assert rows[label][3] == f"{100 * shares[0]:.1f}%", label
        assert rows[label][4] == f"{10_000 * hhi:,.0f}", label
        assert rows[label][5] == f"{1 / hhi:,.1f}", label
    assert "24 borrowers" in section
    section = _section_of(render_report(summary, losses, None, None), "concentration")
    assert "Loan contributions: not computed" in section


def test_sensitivities_carry_units_moves_and_a_true_caption(tmp_path: Path):
    from gpucredit.io import report

    summary, losses, _, sensitivities = _full_inputs(tmp_path)
    section = _section_of(render_report(summary, losses, None, sensitivities), "sensitivities")
    assert "USD per unit of the parameter" in section
    assert ">Move Δθ</th>" in section and ">ΔES 99.9% (USD)</th>" in section
    rows = _cells(section)
    values = dict(
        zip(
            sensitivities.column("parameter").to_pylist(),
            sensitivities.column("value").to_pylist(),
            strict=True,
        )
    )
    for row in rows:
        parameter, value, d_el, *_, move, delta = row
        assert not d_el.startswith(("$", "+$", "-$"))  # a derivative is not an amount of money
        small = parameter.startswith("correlation.") or values[parameter] == 0
        assert move == ("+0.1 (absolute)" if small else f"{values[parameter]:+.4g} (100%)")
        assert delta.startswith(("+$", "-$", "$"))
    # The caption names the colours the bars are drawn in, and no other.
    caption = re.search(r"<figcaption>(.*?)</figcaption>", section).group(1)
    assert (report.C_POS, report.C_NEG) == ("#D55E00", "#0072B2")
    assert "Vermillion bars raise" in caption and "blue bars lower" in caption
    assert "Red" not in caption and "red " not in caption


def test_stress_has_a_chart_beside_a_narrow_table(tmp_path: Path):
    summary, losses, _, _ = _full_inputs(tmp_path)
    section = _section_of(render_report(summary, losses, None, None), "stress")
    side = section[section.index('<div class="side">') :]
    assert side.index('<table class="stress">') < side.index("<figure>")
    header = re.findall(r"<th(?: [^>]*)?>(.*?)</th>", section)
    assert header == ["Scenario", "EL", "VaR 99%", "ES 99%", "VaR 99.9%", "ES 99.9%"]
    rows = {r[0]: r for r in _cells(section)}
    assert set(rows) == {"Base", *STRESSES}
    base_el = summary["measures"]["el_usd"]
    stressed_el = summary["stress"]["next-gen-glut"]["measures"]["el_usd"]
    change = stressed_el - base_el
    assert rows["next-gen-glut"][1] == (
        f"${stressed_el / 1e6:,.2f}M  +${change / 1e6:,.2f}M (+{100 * change / base_el:.1f}%)"
    )
    caption = re.search(r"<figcaption>(.*?)</figcaption>", section).group(1)
    assert "EL (blue)" in caption and "ES 99.9% (vermillion)" in caption


# Every section the full report has, by anchor, and the widths a committee reads it at.
SECTION_ANCHORS = (
    "headline", "losses", "periods", "calibration", "contributions", "concentration",
    "offtakers", "sensitivities", "stress", "book", "reverse-stress", "metadata",
)  # fmt: skip
SCREEN_WIDTHS = (1280, 1920)


@pytest.mark.parametrize("width", SCREEN_WIDTHS)
def test_every_section_is_visible_and_fits_the_page(chromium, full_report, tmp_path, width):
    """Issue 17 item 8: at 1,280 and 1,920 px every section renders with a real size, nothing
    in it reaches past its right edge (no table clipped behind a scroll bar, no page-wide
    horizontal scroll), and a screenshot of the whole page shows ink in every section."""
    from PIL import Image

    verdict, _ = _probe(chromium, tmp_path, full_report.read_text(encoding="utf-8"), "s", "", width)
    page = verdict["page"]
    assert page["innerWidth"] == width and page["scrollWidth"] <= width, page
    assert verdict["overflow"] == []
    sections = {s["id"]: s for s in verdict["sections"]}
    assert tuple(sections) == SECTION_ANCHORS
    for anchor, box in sections.items():
        assert box["height"] >= 40 and box["width"] >= 600, (anchor, box)
        assert box["reach"] <= box["left"] + box["width"] + 1, (anchor, box)

    height = min(int(page["scrollHeight"]) + 10, 16_000)
    screenshot = tmp_path / f"report-{width}.png"
    done = _chromium(
        chromium,
        tmp_path / "profile-sections",
        full_report.as_uri(),
        f"--screenshot={screenshot}",
        f"--window-size={width},{height}",
    )
    assert screenshot.exists(), f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(screenshot) as image:
        assert image.size == (width, height)
        pixels = np.asarray(image.convert("L"))
    sizes = {}
    for anchor, box in sections.items():
        top, left = int(box["top"]), int(box["left"])
        if top >= height:
            continue  # below a 16,000 px screenshot (not reached by this report)
        crop = pixels[top : min(height, top + int(box["height"])), left : left + int(box["width"])]
        ink = float(np.mean(crop < 200))
        sizes[anchor] = (int(box["width"]), int(box["height"]), round(ink, 3))
        assert ink > 0.005, (anchor, sizes[anchor])
    assert set(sizes) == set(SECTION_ANCHORS)
    print(f"\n{width} px: page {width}x{height}; section (width, height, ink): {sizes}")
