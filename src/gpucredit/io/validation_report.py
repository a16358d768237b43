"""validation.json and validation.html: the evidence of `gpucredit validate-model`.

validation.json is `ValidationRun.to_dict()`: every check with its values, tolerance and the
reason for the tolerance. validation.html renders the same document as one self-contained
page in the style of report.html (inline CSS, charts as inline base64 PNGs from matplotlib's
Agg canvas, no script, no external resource): a verdict, a table per group of checks, the
convergence plots (estimate and 95% interval against the scenario count, and the standard
error against 1/√S) and a plot of the Vasicek z-scores.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np

from gpucredit.io.report import (
    _CSS,
    C_EL,
    C_ES,
    C_GREY,
    C_VAR,
    _esc,
    _figure_html,
    _new_figure,
    _section,
    fmt_general,
    fmt_seconds,
)
from gpucredit.io.results import write_atomically, write_json
from gpucredit.portfolio.validation import ValidationRun

__all__ = ["VALIDATION_HTML", "VALIDATION_JSON", "render_validation_html", "write_validation"]

VALIDATION_JSON = "validation.json"
VALIDATION_HTML = "validation.html"

GROUP_TITLES = {
    "vasicek": "Vasicek / Basel IRB limit against closed forms",
    "reference": "JAX against the NumPy reference",
    "precision": "float32 against float64",
    "invariance": "Chunk-size and scenario-offset invariance",
    "gradients": "Sensitivities: AD against finite differences",
    "euler": "Euler contributions add up",
    "convergence": "Convergence with the scenario count",
    "t_copula": "Stability under the Student-t copula",
}

_EXTRA_CSS = """
.verdict { font-size:18px; font-weight:700; padding:10px 14px; margin:14px 0; border-radius:4px; }
.verdict.pass { background:#e6f4ea; color:#1e6b34; }
.verdict.fail { background:#fdecea; color:#a1261b; }
table.checks td { white-space:normal; vertical-align:top; font-size:12.5px; }
table.checks td.why { color:var(--muted); max-width:420px; }
span.pass { color:#1e6b34; font-weight:700; } span.fail { color:#a1261b; font-weight:700; }
"""


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "\u2014"
        if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.6g}"
    if value is None:
        return "\u2014"
    if isinstance(value, list):
        if len(value) <= 4 and all(isinstance(v, int | float) or v is None for v in value):
            return "[" + ", ".join(_fmt(v) for v in value) + "]"
        return f"[{len(value)} values]"
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    return str(value)


_HIDDEN = {"series", "p_values"}


def _values_html(values: dict) -> str:
    parts = [f"{_esc(k)} = {_esc(_fmt(v))}" for k, v in values.items() if k not in _HIDDEN]
    return "<br>".join(parts)


def _checks_table(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        verdict = (
            '<span class="pass">PASS</span>' if c["passed"] else '<span class="fail">FAIL</span>'
        )
        details = f'<br><span class="note">{_esc(c["details"])}</span>' if c.get("details") else ""
        rows.append(
            f"<tr><td>{verdict}</td><td>{_esc(c['name'])}{details}</td>"
            f"<td>{_values_html(c['values'])}</td><td>{_esc(c['tolerance'])}</td>"
            f'<td class="why">{_esc(c["why_tolerance"])}</td></tr>'
        )
    return (
        '<div class="scroll"><table class="checks"><thead><tr><th>Result</th><th>Check</th>'
        "<th>Values</th><th>Tolerance</th><th>Why this tolerance</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _group_rationale(checks: list[dict]) -> str:
    """The tolerance argument once per group when every check shares it (long tables read
    better), else nothing (each row carries its own)."""
    whys = {c["why_tolerance"] for c in checks}
    if len(whys) == 1:
        return f'<p class="note"><b>Tolerance:</b> {_esc(next(iter(whys)))}</p>'
    return ""


def _convergence_figures(checks: list[dict]) -> str:
    """Per run (copula): estimate ± 95% interval against S for each measure, and the SE
    against S on log-log axes with the 1/√S line through the largest S."""
    runs: dict[str, list[dict]] = {}
    for c in checks:
        series = c["values"].get("series")
        if not series:
            continue
        label = c["name"].split("(")[-1].rstrip(")")
        runs.setdefault(label, []).append(c)
    out = []
    colours = [C_EL, C_VAR, C_ES, "#009E73", "#CC79A7", "#56B4E9", C_GREY]
    for label, items in runs.items():
        n = len(items)
        fig, _ = _new_figure(4.2 * min(n, 3), 3.2 * math.ceil(n / 3))
        fig.clear()
        axes = fig.subplots(math.ceil(n / 3), min(n, 3), squeeze=False).ravel()
        for ax, c in zip(axes, items, strict=False):
            s = c["values"]["series"]
            x = np.asarray(s["scenarios"], dtype=float)
            est = np.asarray([np.nan if v is None else v for v in s["estimate"]], dtype=float)
            ci = np.asarray(
                [[np.nan if v is None else v for v in pair] for pair in s["ci"]], dtype=float
            )
            ax.fill_between(
                x, ci[:, 0] / 1e6, ci[:, 1] / 1e6, color=C_VAR, alpha=0.25, label="95% interval"
            )
            ax.plot(x, est / 1e6, "o-", color=C_EL, ms=3, label="estimate")
            ax.axhline(est[-1] / 1e6, color=C_GREY, lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(c["name"].split(" standard error")[0], fontsize=10)
            ax.set_xlabel("scenarios S", fontsize=9)
            ax.set_ylabel("USD million", fontsize=9)
            ax.tick_params(labelsize=8)
        for ax in axes[n:]:
            ax.set_visible(False)
        axes[0].legend(fontsize=8, frameon=False)
        out.append(
            _figure_html(
                fig,
                f"Estimates and 95% intervals against the scenario count, {label}",
                f"{label}: each measure on the first S scenarios with its batch-means 95% "
                "interval; the dashed line is the estimate at the largest S.",
            )
        )
        fig, ax = _new_figure(6.5, 4.0)
        for i, c in enumerate(items):
            s = c["values"]["series"]
            x = np.asarray(s["scenarios"], dtype=float)
            se = np.asarray([np.nan if v is None else v for v in s["se"]], dtype=float)
            fitted = set(s.get("fitted", range(len(x))))
            rel = se / se[-1]
            colour = colours[i % len(colours)]
            name = c["name"].split(" standard error")[0]
            ax.plot(
                x,
                rel,
                "o-",
                color=colour,
                ms=3,
                lw=1,
                label=f"{name} (slope {c['values'].get('slope', float('nan')):.2f})",
            )
            unfit = [j for j in range(len(x)) if j not in fitted]
            if unfit:
                ax.plot(x[unfit], rel[unfit], "o", mfc="white", color=colour, ms=5)
        x = np.asarray(items[0]["values"]["series"]["scenarios"], dtype=float)
        ax.plot(x, np.sqrt(x[-1] / x), "k--", lw=1.2, label="1/√S")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("scenarios S")
        ax.set_ylabel("standard error / standard error at the largest S")
        ax.legend(fontsize=8, frameon=False)
        out.append(
            _figure_html(
                fig,
                f"Standard error against the scenario count, {label}",
                f"{label}: batch-means standard errors relative to the largest S, against the "
                "1/√S line (slope −½ on log-log axes). Open markers: fewer than 4 tail "
                "scenarios per batch, not used in the slope fit.",
            )
        )
    return "".join(out)


def _vasicek_figure(checks: list[dict]) -> str:
    z = [(c["name"], c["values"].get("z")) for c in checks if c["values"].get("z") is not None]
    if not z:
        return ""
    k = max(c["values"].get("multiplier", 0) for c in checks)
    fig, ax = _new_figure(7.5, max(2.5, 0.16 * len(z) + 1))
    ys = np.arange(len(z))
    ax.barh(ys, [v for _, v in z], color=[C_EL if abs(v) <= k else C_ES for _, v in z])
    for edge in (-k, k):
        ax.axvline(edge, color=C_ES, ls="--", lw=1)
    ax.set_yticks(ys, [n.replace("vasicek ", "") for n, _ in z], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("(estimate − closed form) / standard error")
    return _figure_html(
        fig,
        "Vasicek z-scores",
        f"Each Monte Carlo estimate's distance from the closed form in standard errors; the "
        f"dashed lines are the ±{k:.2f} SE tolerance.",
    )


def render_validation_html(document: dict, generated_at: dt.datetime | None = None) -> str:
    """The validation evidence as one self-contained HTML page."""
    when = (generated_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    meta = document.get("metadata", {})
    checks = document.get("checks", [])
    passed = bool(document.get("passed"))
    n_failed = int(document.get("n_failed", 0))
    verdict = (
        f'<div class="verdict pass">PASS: all {len(checks)} checks passed</div>'
        if passed
        else f'<div class="verdict fail">FAIL: {n_failed} of {len(checks)} checks failed</div>'
    )
    facts = [
        ("Form", meta.get("form")),
        ("Seed", meta.get("seed")),
        ("Checks", len(checks)),
        ("Failed", n_failed),
        ("Device", meta.get("device")),
        ("Elapsed", fmt_seconds(meta.get("elapsed_seconds"))),
        ("Version", meta.get("version")),
        ("Family false-alarm rate", meta.get("family_false_alarm")),
    ]
    facts_html = "".join(
        f'<div class="fact"><span class="k">{_esc(k)}</span>'
        f'<span class="v">{_esc(fmt_general(v))}</span></div>'
        for k, v in facts
    )
    groups: dict[str, list[dict]] = {}
    for c in checks:
        groups.setdefault(c["group"], []).append(c)
    summary_rows = "".join(
        f'<tr><td>{_esc(GROUP_TITLES.get(g, g))}</td><td class="num">{len(items)}</td>'
        f'<td class="num">{sum(not c["passed"] for c in items)}</td></tr>'
        for g, items in groups.items()
    )
    body = [
        "<header><h1>gpucredit model validation</h1>"
        f'<div class="facts">{facts_html}</div></header>',
        verdict,
        '<p class="note">Each check states the tolerance it used and why. Statistical checks '
        "compare Monte Carlo estimates with closed forms or known laws at a 1% family-wise "
        "false-alarm rate (Bonferroni over the family); numerical checks use floating-point "
        "bounds. The model is described in docs/model.md.</p>",
        '<div class="scroll"><table class="compact"><thead><tr><th>Group</th>'
        '<th class="num">Checks</th><th class="num">Failed</th></tr></thead>'
        f"<tbody>{summary_rows}</tbody></table></div>",
    ]
    for group, items in groups.items():
        parts = [_group_rationale(items)]
        if group == "vasicek":
            parts.append(_vasicek_figure(items))
        if group in ("convergence", "t_copula"):
            parts.append(_convergence_figures(items))
        parts.append(_checks_table(items))
        body.append(_section(group, GROUP_TITLES.get(group, group), "".join(parts)))
    body.append(
        f"<footer>gpucredit {_esc(fmt_general(meta.get('version')))} \u2014 generated "
        f"{_esc(when.strftime('%Y-%m-%d %H:%M:%S UTC'))}</footer>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>gpucredit model validation</title><style>{_CSS}{_EXTRA_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_validation(run: ValidationRun, directory: Path) -> list[Path]:
    """Write validation.json and validation.html into `directory` (atomically each)."""
    directory = Path(directory)
    document = run.to_dict()
    json_path = write_json(directory / VALIDATION_JSON, document)
    html = render_validation_html(document)
    html_path = write_atomically(
        directory / VALIDATION_HTML, lambda p: p.write_text(html, encoding="utf-8")
    )
    return [json_path, html_path]
