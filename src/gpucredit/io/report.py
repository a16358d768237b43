"""report.html: one self-contained page a credit risk team reads at 7 am (docs/spec.md "Results").

Everything is inline: the styles, and every chart as a base64 PNG drawn with matplotlib's Agg
canvas (no pyplot state, no display). The page has no script, no external stylesheet, font
or image, so it opens offline, in a mail attachment or behind a proxy, exactly as written.

Sections, in order: header, headline measures (with % of exposure and the run's warnings),
loss distribution (histogram and tail), loss by period, calibration (model vs input PDs,
paper vs path), contributions, concentration by borrower (top-10 share, HHI), sensitivities
(with their units and moves), stress (table and chart side by side when the page is wide
enough), today's book, reverse stress, run metadata. Any value of summary.json may be null;
it is shown as an em dash ("n/a" for an interval the run withheld). Missing contributions or
sensitivities tables, or a summary without "calibration" or "loss_by_period" (older runs,
or run with --no-calibration), make their sections say "not computed". No table is wider
than the page at 1,280 px (tests/io/test_report.py checks it in headless Chromium).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gpucredit.io import names
from gpucredit.io.files import write_atomically
from gpucredit.io.text_files import TextFileError, read_text_file
from gpucredit.portfolio.risk import (
    SUMMARY_FORMAT_VERSION,
    LossHistogram,
    alpha_label,
    alpha_of_label,
)
from gpucredit.portfolio.sensitivities import parameter_moves

__all__ = ["ReportError", "render_report", "render_report_from_dir"]

SUMMARY_FILE = "summary.json"
LOSSES_FILE = "losses.parquet"
TAIL_LOSSES_FILE = "tail_losses.parquet"
CONTRIBUTIONS_FILE = "contributions.parquet"
SENSITIVITIES_FILE = "sensitivities.parquet"
REPORT_FILE = "report.html"
REVERSE_STRESS_FILE = "reverse_stress.json"

TOP_BORROWERS = 20
TOP_SENSITIVITIES = 15
CONCENTRATION_TOP = 10  # the "top-10 borrowers' share" a credit committee asks for
PAPER_VS_PATH_ROWS = 50  # flagged loans listed (the largest balances first)
PAPER_METRICS_STRESS = "paper-metrics"  # built-in stress: the PD anchor "today"
DASH = "\u2014"
NOT_AVAILABLE = "n/a"  # a standard error or interval the run withheld (interval_available)

CONTRIBUTION_COLUMNS = (
    "loan_id",
    "borrower_id",
    "borrower_type",
    "gpu_generation",
    "balance_usd",
    "expected_loss_usd",
)
SENSITIVITY_COLUMNS = ("parameter", "value", "d_el_usd")

# Colours (colour-blind safe: Okabe-Ito).
C_EL = "#0072B2"
C_ES = "#D55E00"
C_VAR = "#E69F00"
C_NEG = "#0072B2"
C_POS = "#D55E00"
C_BAR = "#56B4E9"
C_GREY = "#7f7f7f"


class ReportError(Exception):
    """An input of the report is missing or unreadable (the message names the file)."""


# ----------------------------------------------------------------------------- formatting


def _esc(value: object) -> str:
    return names.html(value)


def _num(value: object) -> float | None:
    """A finite float, or None for null, NaN, ±inf and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _get(mapping: object, *keys: str) -> object:
    """mapping[k1][k2]..., or None where any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def fmt_usd(value: object, signed: bool = False) -> str:
    """$ with thousands separators: "$950,000" below $1M, "$12,345.68M" from $1M up (the
    same unit throughout, as the command line prints)."""
    x = _num(value)
    if x is None:
        return DASH
    sign = ("+" if x > 0 else "-" if x < 0 else "") if signed else ("-" if x < 0 else "")
    a = abs(x)
    if a >= 1e6:
        body = f"${a / 1e6:,.2f}M"
    else:
        body = f"${a:,.0f}"
    return sign + body


def fmt_per_unit(value: object) -> str:
    """A derivative in USD per unit of a parameter: signed, separators, "M" from a million
    up, and no "$" (it is not an amount of money)."""
    x = _num(value)
    if x is None:
        return DASH
    sign = "+" if x > 0 else "-" if x < 0 else ""
    a = abs(x)
    return sign + (f"{a / 1e6:,.2f}M" if a >= 1e6 else f"{a:,.0f}")


def fmt_int(value: object) -> str:
    x = _num(value)
    return DASH if x is None else f"{x:,.0f}"


def fmt_float(value: object, digits: int = 2) -> str:
    x = _num(value)
    return DASH if x is None else f"{x:,.{digits}f}"


def fmt_pct(value: object, digits: int = 1, signed: bool = False) -> str:
    x = _num(value)
    if x is None:
        return DASH
    return f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%"


def fmt_general(value: object) -> str:
    """Any metadata value: numbers with separators, lists joined, None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return DASH
        if value == int(value) and abs(value) < 1e15:
            return f"{value:,.0f}"
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt_general(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def fmt_seconds(value: object) -> str:
    x = _num(value)
    if x is None:
        return DASH
    if x < 60:
        return f"{x:.1f} s"
    minutes, seconds = divmod(x, 60)
    if minutes < 60:
        return f"{minutes:.0f} min {seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:.0f} h {minutes:.0f} min"


def percent_label(alpha: object) -> str:
    """0.99 -> "99%", 0.999 -> "99.9%"."""
    x = _num(alpha)
    if x is None:
        return str(alpha)
    return f"{100 * x:.6g}%"


def _interval(values: object) -> str:
    if not isinstance(values, list | tuple) or len(values) != 2:
        return DASH
    lo, hi = values
    if _num(lo) is None and _num(hi) is None:
        return DASH
    return f"{fmt_usd(lo)} \u2013 {fmt_usd(hi)}"


# ----------------------------------------------------------------------------- html pieces


def _cell(cell: str | tuple[str, str]) -> str:
    """A cell's escaped HTML; a (value, change) pair puts the change on a second, smaller
    line, which keeps tables of stressed values narrow."""
    if isinstance(cell, tuple):
        value, change = cell
        return f'{_esc(value)}<br><span class="delta">{_esc(change)}</span>'
    return _esc(cell)


def _table(
    header: Sequence[str],
    rows: Iterable[Sequence[str | tuple[str, str]]],
    numeric_from: int = 1,
    caption: str | None = None,
    css_class: str = "",
) -> str:
    """Rows are already formatted strings; they are escaped here. Columns from
    `numeric_from` on are right-aligned."""
    out = ['<div class="scroll">']
    out.append(f'<table class="{_esc(css_class)}">' if css_class else "<table>")
    if caption:
        out.append(f"<caption>{_esc(caption)}</caption>")
    out.append("<thead><tr>")
    for j, h in enumerate(header):
        cls = ' class="num"' if j >= numeric_from else ""
        out.append(f"<th{cls}>{_esc(h)}</th>")
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for j, cell in enumerate(row):
            cls = ' class="num"' if j >= numeric_from else ""
            out.append(f"<td{cls}>{_cell(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _figure_html(fig: Figure, alt: str, caption: str | None = None) -> str:
    """The figure as an inline base64 PNG inside <figure>."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    fig.clear()
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (int(round(v * 110)) for v in fig.get_size_inches())
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}" '
        f'width="{width}" height="{height}">{cap}</figure>'
    )


def _new_figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    _style_axes(ax)
    return fig, ax


def _style_axes(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(True, axis="both", color="#e5e5e5", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)


def _millions_formatter(ax, axis: str = "x") -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:,g}")
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)


def _not_computed(what: str) -> str:
    return f'<p class="note">{_esc(what)}: not computed in this run.</p>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_esc(anchor)}"><h2>{_esc(title)}</h2>{body}</section>'


# ----------------------------------------------------------------------------- sections


def _alphas(summary: dict) -> list[tuple[str, float | None]]:
    """(key, alpha) of every tail level in the base measures, in increasing alpha."""
    tail = _get(summary, "measures", "tail")
    keys = list(tail) if isinstance(tail, dict) else []
    if not keys:
        meta_alphas = _get(summary, "metadata", "alphas")
        if isinstance(meta_alphas, list):
            keys = [alpha_label(a) for a in meta_alphas if _num(a) is not None]
    pairs = []
    for key in keys:
        alpha = _num(_get(tail, key, "alpha")) if isinstance(tail, dict) else None
        pairs.append((key, alpha if alpha is not None else _label_alpha(key)))
    return sorted(pairs, key=lambda p: (p[1] is None, p[1] if p[1] is not None else 0.0))


def _label_alpha(label: str) -> float | None:
    """The confidence level of a `risk.alpha_label` ("99_9" -> 0.999), or None."""
    try:
        return alpha_of_label(label)
    except ValueError:
        return None


def _book_name(summary: dict) -> str | None:
    """The book's file name (the full path is in the metadata section)."""
    source = _get(summary, "book", "source") or _get(summary, "metadata", "book")
    if source is None:
        return None
    return Path(str(source)).name or str(source)


def _header(summary: dict, generated_at: dt.datetime) -> str:
    meta = summary.get("metadata") if isinstance(summary.get("metadata"), dict) else {}
    book = _book_name(summary)
    title = f"Credit risk report \u2014 {book}" if book else "Credit risk report"
    device = " / ".join(
        str(meta.get(k)) for k in ("backend", "device", "precision") if meta.get(k) is not None
    )
    facts = [
        ("Book", fmt_general(book)),
        ("Report date", generated_at.strftime("%Y-%m-%d %H:%M UTC")),
        ("Scenarios", fmt_int(meta.get("scenarios"))),
        ("Seed", fmt_general(meta.get("seed"))),
        ("Mode", fmt_general(meta.get("mode"))),
        ("Backend / device / precision", device or DASH),
        ("Elapsed", fmt_seconds(meta.get("elapsed_seconds"))),
        ("Version", fmt_general(meta.get("version"))),
    ]
    cells = "".join(
        f'<div class="fact"><span class="k">{_esc(k)}</span><span class="v">{_esc(v)}</span></div>'
        for k, v in facts
    )
    return f'<header><h1>{_esc(title)}</h1><div class="facts">{cells}</div></header>'


def _of_exposure(value: object, exposure: float | None) -> str:
    x = _num(value)
    return DASH if x is None or not exposure else fmt_pct(x / exposure, 2)


def _measure_rows(
    measures: object, alphas: list[tuple[str, float | None]], exposure: float | None = None
) -> list[list[str]]:
    el = _get(measures, "el_usd")
    rows = [
        [
            "Expected loss (EL)",
            fmt_usd(el),
            _of_exposure(el, exposure),
            fmt_usd(_get(measures, "el_se_usd")),
            _interval(_get(measures, "el_ci_usd")),
        ],
        ["Standard deviation", fmt_usd(_get(measures, "std_usd")), DASH, DASH, DASH],
    ]
    for key, alpha in alphas:
        t = _get(measures, "tail", key)
        label = percent_label(alpha if alpha is not None else key)
        # summary.json nulls the standard error and interval when too few tail scenarios per
        # batch make them unreliable: say "n/a" (not a dash, which reads as "missing").
        available = _get(t, "interval_available") is not False
        for name, short in (("Value at risk", "var"), ("Expected shortfall", "es")):
            value = _get(t, f"{short}_usd")
            rows.append(
                [
                    f"{name} {label}",
                    fmt_usd(value),
                    _of_exposure(value, exposure),
                    fmt_usd(_get(t, f"{short}_se_usd")) if available else NOT_AVAILABLE,
                    _interval(_get(t, f"{short}_ci_usd")) if available else NOT_AVAILABLE,
                ]
            )
    return rows


def _run_warnings(summary: dict) -> list[str]:
    """summary.json's "warnings" (older runs: the measures' interval_warnings)."""
    found = summary.get("warnings")
    if not isinstance(found, list):
        found = _get(summary, "measures", "interval_warnings")
    return [str(w) for w in found if w is not None] if isinstance(found, list) else []


def _headline(summary: dict) -> str:
    measures = summary.get("measures")
    alphas = _alphas(summary)
    exposure = _num(_get(summary, "book", "exposure_usd"))
    warnings = _run_warnings(summary)
    warning_html = ""
    if warnings:
        items = "".join(f"<li>{_esc(w)}</li>" for w in warnings)
        warning_html = (
            f'<div class="warn" role="note"><strong>Warning</strong><ul>{items}</ul></div>'
        )
    table = _table(
        ["Measure", "Estimate", "% of exposure", "Std. error", "95% interval"],
        _measure_rows(measures, alphas, exposure),
        css_class="headline",
    )
    n = _get(measures, "n_scenarios")
    ess = _get(measures, "effective_sample_size")
    batches = _get(measures, "n_batches")
    note = (
        f"{fmt_int(n)} scenarios, effective sample size {fmt_int(ess)}; standard errors from "
        f"batch means over {fmt_int(batches)} batches (i.i.d. EL standard error "
        f"{fmt_usd(_get(measures, 'el_se_iid_usd'))}). % of exposure: of the book's exposure "
        f"today, {fmt_usd(exposure)}."
    )
    if any(_get(measures, "tail", key, "interval_available") is False for key, _ in alphas):
        note += (
            f" {NOT_AVAILABLE}: too few tail scenarios per batch for a standard error "
            "(see the warning)."
        )
    return _section(
        "headline",
        "Headline risk measures",
        warning_html + table + f'<p class="note">{_esc(note)}</p>',
    )


@dataclass(frozen=True)
class _Losses:
    """What the loss-distribution section draws: every loss, or for a tails-only run the
    merged histogram and the largest losses (summary.json's loss_histogram and
    tail_losses.parquet)."""

    n: int  # scenarios
    histogram: LossHistogram
    largest_usd: np.ndarray  # the largest losses, unsorted (every loss when all are kept)
    mean_usd: float | None
    median_usd: float | None
    all_usd: np.ndarray | None  # every loss, or None (tails-only run)

    @classmethod
    def of_all(cls, losses_usd: np.ndarray) -> _Losses:
        losses = np.asarray(losses_usd, dtype=np.float64).ravel()
        losses = losses[np.isfinite(losses)]
        if losses.size == 0:
            return cls(0, LossHistogram.of(losses), losses, None, None, losses)
        mean, median = float(losses.mean()), float(np.median(losses))
        return cls(losses.size, LossHistogram.of(losses), losses, mean, median, losses)

    @classmethod
    def of_tail(cls, summary: dict, histogram: LossHistogram, tail_usd: np.ndarray) -> _Losses:
        largest = np.asarray(tail_usd, dtype=np.float64).ravel()
        largest = largest[np.isfinite(largest)]
        n = int(histogram.counts.sum())
        # The median within one bin: the middle of the bin holding the (n/2)-th loss.
        middle = int(np.searchsorted(np.cumsum(histogram.counts), n / 2.0))
        median = (middle + 0.5) * histogram.bin_width_usd if n else None
        return cls(n, histogram, largest, _num(_get(summary, "measures", "el_usd")), median, None)


def _histogram_bars(histogram: LossHistogram, bars: int = 120):
    """(left edges, widths, counts) of about `bars` bars over the used bins: whole groups of
    the histogram's bins, so the counts stay exact."""
    used = int(np.flatnonzero(histogram.counts)[-1]) + 1 if histogram.counts.any() else 1
    group = max(1, math.ceil(used / bars))
    n_bars = math.ceil(used / group)
    counts = np.zeros(n_bars * group, dtype=np.int64)
    counts[:used] = histogram.counts[:used]
    width = group * histogram.bin_width_usd
    return np.arange(n_bars) * width, width, counts.reshape(n_bars, group).sum(axis=1)


def _loss_distribution(summary: dict, view: _Losses | None) -> str:
    if view is None or view.n == 0:
        return _section("losses", "Loss distribution", _not_computed("Scenario losses"))
    measures = summary.get("measures")
    alphas = _alphas(summary)
    el = _num(_get(measures, "el_usd"))
    if el is None:
        el = view.mean_usd
    markers: list[tuple[str, float, str, str]] = [] if el is None else [("EL", el, C_EL, "-")]
    styles = ["--", ":", "-."]
    for i, (key, alpha) in enumerate(alphas):
        label = percent_label(alpha if alpha is not None else key)
        var = _num(_get(measures, "tail", key, "var_usd"))
        es = _num(_get(measures, "tail", key, "es_usd"))
        if var is None and alpha is not None and view.all_usd is not None:
            var = float(np.quantile(view.all_usd, alpha, method="inverted_cdf"))
        ls = styles[i % len(styles)]
        if var is not None:
            markers.append((f"VaR {label}", var, C_VAR, ls))
        if es is not None:
            markers.append((f"ES {label}", es, C_ES, ls))

    # Histogram (power-of-two bins from 0, grouped into about 120 bars).
    left, width, counts = _histogram_bars(view.histogram)
    fig, ax = _new_figure(10, 4.2)
    ax.bar(left / 1e6, counts, width=width / 1e6, align="edge", color=C_BAR, edgecolor="none")
    for label, x, colour, ls in markers:
        ax.axvline(
            x / 1e6, color=colour, linestyle=ls, linewidth=1.6, label=f"{label} {fmt_usd(x)}"
        )
    ax.set_xlabel("Portfolio loss over the horizon ($M)")
    ax.set_ylabel("Scenarios")
    ax.set_title("Distribution of portfolio loss", fontsize=11)
    _millions_formatter(ax)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    merged = (
        ""
        if view.all_usd is not None
        else " Tails-only run: merged from the per-batch histograms; per-scenario losses were "
        "not kept."
    )
    hist = _figure_html(
        fig,
        "Histogram of portfolio losses",
        f"Histogram of {view.n:,} simulated losses, with EL, VaR and ES marked.{merged}",
    )

    # Tail: empirical exceedance 1 - F(x) above the lowest VaR, log scale.
    lowest_var = next((x for label, x, _, _ in markers if label.startswith("VaR")), None)
    if lowest_var is not None:
        threshold = lowest_var
    elif view.all_usd is not None:
        threshold = float(np.quantile(view.all_usd, 0.99))
    else:
        threshold = float(view.largest_usd.min()) if view.largest_usd.size else math.inf
    n = view.n
    tail = np.sort(view.largest_usd[view.largest_usd >= threshold])
    if tail.size >= 2:
        # P(L > x) just after each sorted tail loss; last point set to 1/n to stay on the plot.
        exceed = (tail.size - np.arange(1, tail.size + 1)) / n
        exceed[-1] = 1.0 / n
        shown = tail.size
        if tail.size > 4000:  # thin the curve, keep the extreme end exactly
            keep = np.unique(np.r_[np.linspace(0, tail.size - 1, 3000).astype(int), tail.size - 1])
            tail, exceed = tail[keep], exceed[keep]
        fig, ax = _new_figure(10, 3.8)
        ax.step(tail / 1e6, exceed, where="post", color="#333333", linewidth=1.3)
        ax.set_yscale("log")
        for label, x, colour, ls in (m for m in markers if m[0] != "EL"):
            ax.axvline(
                x / 1e6, color=colour, linestyle=ls, linewidth=1.6, label=f"{label} {fmt_usd(x)}"
            )
        ax.set_xlabel("Portfolio loss ($M)")
        ax.set_ylabel("P(loss > x)")
        ax.set_title("Tail: exceedance probability beyond the lowest VaR", fontsize=11)
        _millions_formatter(ax)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        tail_html = _figure_html(
            fig,
            "Exceedance probability of losses in the tail",
            f"Empirical exceedance curve 1\u2212F(x) for the {shown:,} "
            f"losses at or above {fmt_usd(threshold)}, log scale (unweighted scenario counts).",
        )
    else:
        tail_html = '<p class="note">Too few tail scenarios to draw the exceedance curve.</p>'
    median_label = "Median" if view.all_usd is not None else "Median (within one histogram bin)"
    stats = _table(
        ["Statistic", "Value"],
        [
            ["Scenarios", f"{n:,}"],
            ["Mean", fmt_usd(view.mean_usd)],
            [median_label, fmt_usd(view.median_usd)],
            ["Maximum", fmt_usd(view.largest_usd.max() if view.largest_usd.size else None)],
            ["Share of scenarios with zero loss", fmt_pct(view.histogram.zero_count / n)],
        ],
        css_class="compact",
    )
    return _section("losses", "Loss distribution", hist + tail_html + stats)


def _es_share_keys(rows: Iterable[object]) -> list[tuple[str, float | None]]:
    """(row key "es_<alpha label>_share", alpha) of every ES share in the calibration rows, in
    increasing alpha."""
    found: dict[str, float | None] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        for key in row:
            if isinstance(key, str) and key.startswith("es_") and key.endswith("_share"):
                found.setdefault(key, _label_alpha(key[len("es_") : -len("_share")]))
    return sorted(found.items(), key=lambda p: (p[1] is None, p[1] or 0.0, p[0]))


def _ratio(value: object) -> str:
    x = _num(value)
    return DASH if x is None else f"{x:,.2f}\u00d7"


def _calibration_table(
    heading: str, groups: object, book_row: object, es_keys: list[tuple[str, float | None]]
) -> str:
    header = [
        heading,
        "Loans",
        "Exposure",
        "Input PD, annual",
        "Input PD, year 1",
        "Input PD, horizon",
        "Model default rate, year 1",
        "Model PD, horizon",
        "Model \u00f7 input, year 1",
        "Mean LGD",
        "EL, % of exposure",
    ]
    header += [
        f"ES {percent_label(alpha if alpha is not None else key)}, % of exposure"
        for key, alpha in es_keys
    ]

    def cells(name: str, row: object) -> list[str]:
        out = [
            name,
            fmt_int(_get(row, "loans")),
            fmt_usd(_get(row, "exposure_usd")),
            fmt_pct(_get(row, "input_pd_annual"), 2),
            fmt_pct(_get(row, "input_pd_year_one"), 2),
            fmt_pct(_get(row, "input_pd_horizon"), 2),
            fmt_pct(_get(row, "model_default_rate_year_one"), 2),
            fmt_pct(_get(row, "model_pd_horizon"), 2),
            _ratio(_get(row, "year_one_ratio")),
            fmt_pct(_get(row, "mean_lgd")),
            fmt_pct(_get(row, "el_share"), 2),
        ]
        return out + [fmt_pct(_get(row, key), 2) for key, _ in es_keys]

    rows = [cells(str(name), row) for name, row in (groups or {}).items()]
    rows.append(cells("Whole book", book_row))
    return _table(header, rows, css_class="totals calib")


def _paper_metrics_line(summary: dict) -> str:
    """EL and the highest ES of the base run against the paper-metrics stress, or ""."""
    stress = summary.get("stress")
    item = stress.get(PAPER_METRICS_STRESS) if isinstance(stress, dict) else None
    if not isinstance(item, dict):
        return ""
    base = summary.get("measures")
    stressed = item.get("measures")
    alphas = _alphas(summary)
    # ES 99.9% when the run has it, else its highest level.
    key, alpha = next(
        ((k, a) for k, a in alphas if a is not None and abs(a - 0.999) < 1e-12),
        alphas[-1] if alphas else (None, None),
    )

    def move(before: object, after: object) -> str:
        b, a = _num(before), _num(after)
        text = f"{fmt_usd(b)} \u2192 {fmt_usd(a)}"
        if b is not None and a is not None and b != 0:
            text += f" ({fmt_pct(a / b - 1.0, signed=True)})"
        return text

    parts = [f"EL {move(_get(base, 'el_usd'), _get(stressed, 'el_usd'))}"]
    if key is not None:
        label = percent_label(alpha if alpha is not None else key)
        es_move = move(_get(base, "tail", key, "es_usd"), _get(stressed, "tail", key, "es_usd"))
        parts.append(f"ES {label} {es_move}")
    return (
        '<p class="note"><strong>Infrastructure view</strong> (stress '
        f"&ldquo;{_esc(PAPER_METRICS_STRESS)}&rdquo;: the same book on the same random numbers, "
        "with the input PDs assumed to price today&rsquo;s metrics persisting, PD anchor "
        "&ldquo;today&rdquo;, so the expected fall in rents and prices counts as deterioration): "
        f"{_esc('; '.join(parts))}. The difference is how much of the book&rsquo;s risk an "
        "infrastructure reading of its PDs adds.</p>"
    )


def _paper_vs_path(pvp: object) -> str:
    if not isinstance(pvp, dict):
        return ""
    count = _num(pvp.get("loans"))
    parts = ["<h3>Paper vs path</h3>"]
    if count == 0:
        parts.append(
            '<p class="note">Every loan&rsquo;s central path pays its debt service and '
            "refinances its balloon: the input PDs and the central paths agree.</p>"
        )
        return "".join(parts)
    parts.append(
        f'<p class="note">{_esc(fmt_int(count))} loan(s), '
        f"{_esc(fmt_pct(pvp.get('exposure_share')))} of exposure "
        f"({_esc(fmt_usd(pvp.get('exposure_usd')))}), cannot pay on their central path "
        "(every shock 0): "
        f"{_esc(fmt_int(pvp.get('debt_service')))} fall short of their debt service in some "
        "period before maturity (central liquidity coverage LC* below 1.0\u00d7) and "
        f"{_esc(fmt_int(pvp.get('refinancing')))} cannot refinance their balloon (central "
        "refinancing coverage RF* below 1). Their input PD assumed something their own "
        "expected path does not deliver; the model holds their references at full coverage, "
        "so their hazard sits above the input PD even on the central path, and they push "
        "the year-1 ratio of their group up.</p>"
    )
    rows = [r for r in pvp.get("rows") or [] if isinstance(r, dict)]
    rows.sort(key=lambda r: -(_num(r.get("balance_usd")) or 0.0))
    shown = rows[:PAPER_VS_PATH_ROWS]
    if shown:
        table_rows = [
            [
                fmt_general(r.get("loan_id")),
                fmt_general(r.get("borrower_id")),
                fmt_general(r.get("borrower_type")),
                fmt_general(r.get("gpu_generation")),
                fmt_general(r.get("cannot_pay")),
                fmt_usd(r.get("balance_usd")),
                _ratio(r.get("central_min_liquidity_coverage")),
                _ratio(r.get("central_refinancing_coverage")),
            ]
            for r in shown
        ]
        caption = (
            f"The {len(shown):,} largest by balance"
            if len(rows) > len(shown)
            else "Every flagged loan, largest balance first"
        )
        parts.append(
            _table(
                [
                    "Loan",
                    "Borrower",
                    "Type",
                    "Generation",
                    "Cannot pay",
                    "Balance",
                    "Lowest LC* (central path)",
                    "RF* (central path)",
                ],
                table_rows,
                numeric_from=5,
                caption=caption,
                css_class="calib",
            )
        )
        if len(rows) > len(shown):
            rest = rows[len(shown) :]
            rest_usd = sum(_num(r.get("balance_usd")) or 0.0 for r in rest)
            parts.append(
                f'<p class="note">{len(rest):,} more flagged loan(s) not shown '
                f"({_esc(fmt_usd(rest_usd))}); summary.json lists every one.</p>"
            )
    return "".join(parts)


def _calibration(summary: dict) -> str:
    """Model vs input PDs by borrower type and generation, the anchor explained, the
    paper-metrics comparison when that stress ran, and the paper-vs-path loans."""
    title = "Calibration"
    calibration = summary.get("calibration")
    paper_metrics = _paper_metrics_line(summary)
    if not isinstance(calibration, dict):
        return _section(title.lower(), title, _not_computed("Calibration") + paper_metrics)
    book_row = calibration.get("book")
    by_type = calibration.get("by_borrower_type")
    by_generation = calibration.get("by_generation")
    by_type = by_type if isinstance(by_type, dict) else {}
    by_generation = by_generation if isinstance(by_generation, dict) else {}
    es_keys = _es_share_keys([book_row, *by_type.values(), *by_generation.values()])
    periods = _num(calibration.get("year_one_periods"))
    scenarios = _num(calibration.get("year_one_scenarios"))
    year_one = "the first year"
    if periods is not None:
        year_one += f" ({fmt_int(periods)} period{'s' if periods != 1 else ''})"
    if scenarios is not None:
        year_one += f" of the run&rsquo;s first {_esc(fmt_int(scenarios))} scenarios"

    def pd(key: str) -> str:
        return _esc(fmt_pct(_get(book_row, key), 2))

    parts = [
        '<p class="note">Does the model default as often as the input PDs say? Whole book: '
        f"the model&rsquo;s year-1 default rate is {pd('model_default_rate_year_one')} against "
        f"an input PD of {pd('input_pd_year_one')} compounded over the year "
        f"({_esc(_ratio(_get(book_row, 'year_one_ratio')))}); over the horizon the "
        f"model&rsquo;s PD is {pd('model_pd_horizon')} against {pd('input_pd_horizon')}.</p>",
        _calibration_table("Borrower type", by_type, book_row, es_keys),
        _calibration_table("Generation", by_generation, book_row, es_keys),
        '<p class="note">How to read it. The input PD is anchored on the central path '
        "(model.pd_anchor &ldquo;expected&rdquo;, docs/spec.md &sect;4): on the path where "
        "every shock is 0 (rents, prices and crypto on their median trends) a loan&rsquo;s "
        "hazard is exactly its input PD&rsquo;s, because the lender&rsquo;s PD already prices "
        "the expected fall in rents and prices. Around that path the coverage ratios move with "
        "the factors, which adds systematic variance, and a default probability is convex in "
        "it (Jensen): the model&rsquo;s unconditional default rate sits somewhat above the "
        "input PD, and a model \u00f7 input ratio of roughly 1.0\u20132.0\u00d7 is expected. "
        "A ratio well above that points at loans whose central path cannot pay (paper vs "
        "path, below). Input PDs are compounded over the periods each loan is alive for; "
        f"the year-1 default rate is measured on {year_one}. Default rates and PDs are "
        "loan-count averages; mean LGD is EL \u00f7 expected defaulted exposure; EL and ES "
        "are each group&rsquo;s Euler contributions as a share of its exposure.</p>",
    ]
    if paper_metrics:
        parts.append(paper_metrics)
    parts.append(_paper_vs_path(calibration.get("paper_vs_path")))
    return _section(title.lower(), title, "".join(parts))


def _alpha_columns(table: pa.Table, prefix: str) -> list[tuple[str, float]]:
    """Columns named prefix<alpha label>_usd (es_99_9_usd), as (column, alpha), in increasing
    alpha."""
    out = []
    for name in table.column_names:
        if name.startswith(prefix) and name.endswith("_usd"):
            alpha = _label_alpha(name[len(prefix) : -len("_usd")])
            if alpha is not None:
                out.append((name, alpha))
    return sorted(out, key=lambda p: p[1])


def _column(table: pa.Table, name: str) -> np.ndarray:
    values = table.column(name).to_numpy(zero_copy_only=False)
    if values.dtype.kind in "fiu":
        return np.nan_to_num(values.astype(np.float64), nan=0.0)
    return np.array([DASH if v is None else str(v) for v in values], dtype=object)


def _group_sum(keys: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    unique, inverse = np.unique(keys.astype(str), return_inverse=True)
    sums = [np.bincount(inverse, weights=v, minlength=unique.size) for v in values]
    counts = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    return unique, [counts, *sums]


def _share(part: float, total: float) -> str:
    return fmt_pct(part / total) if total and math.isfinite(total) and total != 0 else DASH


def _grouped_bars(labels: Sequence[str], el: np.ndarray, es: np.ndarray, es_label: str, title: str):
    fig, ax = _new_figure(10, max(2.2, 0.9 + 0.36 * len(labels)))
    y = np.arange(len(labels))
    h = 0.38
    ax.barh(y - h / 2, el / 1e6, height=h, color=C_EL, label="EL")
    ax.barh(y + h / 2, es / 1e6, height=h, color=C_ES, label=es_label)
    ax.set_yticks(y, labels=[names.mathtext(s) for s in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("$M")
    ax.set_title(title, fontsize=11)
    ax.grid(False, axis="y")
    _millions_formatter(ax)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def _contributions(contributions: pa.Table | None) -> str:
    title = "Risk contributions"
    if contributions is None:
        return _section("contributions", title, _not_computed("Loan contributions"))
    es_cols = _alpha_columns(contributions, "es_")
    balance = _column(contributions, "balance_usd")
    el = _column(contributions, "expected_loss_usd")
    if es_cols:
        es_col, es_alpha = es_cols[-1]
        es = _column(contributions, es_col)
        es_label = f"ES {percent_label(es_alpha)}"
    else:
        es = np.zeros_like(el)
        es_label = "ES (not computed)"
    total_balance, total_el, total_es = float(balance.sum()), float(el.sum()), float(es.sum())
    parts = [
        f'<p class="note">Euler allocation: a loan\'s EL contribution is E[L<sub>i</sub>], its '
        f"{_esc(es_label)} contribution E[L<sub>i</sub> | L \u2265 VaR]; contributions add up "
        f"to the portfolio measure. {contributions.num_rows:,} loans, "
        f"EL {_esc(fmt_usd(total_el))}, "
        f"{_esc(es_label)} {_esc(fmt_usd(total_es))}.</p>"
    ]

    def group_block(key: str, heading: str, top: int | None) -> str:
        groups, (count, bal, g_el, g_es) = _group_sum(_column(contributions, key), balance, el, es)
        order = np.argsort(-(g_es if es_cols else g_el), kind="stable")
        shown = order[:top] if top is not None else order
        label_of = {"borrower_id": "borrower", "borrower_type": "borrower type"}
        what = label_of.get(key, "GPU generation")
        chart_title = (
            f"Top {len(shown)} borrowers by {es_label} contribution"
            if top is not None
            else f"EL and {es_label} contributions by {what}"
        )
        fig = _grouped_bars(
            [groups[i] for i in shown], g_el[shown], g_es[shown], es_label, chart_title
        )
        chart = _figure_html(fig, chart_title)
        rows = [
            [
                str(groups[i]),
                fmt_int(count[i]),
                fmt_usd(bal[i]),
                _share(bal[i], total_balance),
                fmt_usd(g_el[i]),
                _share(g_el[i], total_el),
                fmt_usd(g_es[i]),
                _share(g_es[i], total_es),
            ]
            for i in shown
        ]
        if top is not None and len(order) > top:
            rest = order[top:]
            rows.append(
                [
                    f"Other {len(rest):,} borrowers",
                    fmt_int(count[rest].sum()),
                    fmt_usd(bal[rest].sum()),
                    _share(bal[rest].sum(), total_balance),
                    fmt_usd(g_el[rest].sum()),
                    _share(g_el[rest].sum(), total_el),
                    fmt_usd(g_es[rest].sum()),
                    _share(g_es[rest].sum(), total_es),
                ]
            )
        rows.append(
            [
                "Total",
                fmt_int(count.sum()),
                fmt_usd(total_balance),
                _share(total_balance, total_balance),
                fmt_usd(total_el),
                _share(total_el, total_el),
                fmt_usd(total_es),
                _share(total_es, total_es),
            ]
        )
        table = _table(
            [
                heading,
                "Loans",
                "Balance",
                "Share",
                "EL",
                "Share of EL",
                es_label,
                f"Share of {es_label}",
            ],
            rows,
            css_class="totals",
        )
        return f"<h3>By {_esc(what)}</h3>{chart}{table}"

    parts.append(group_block("borrower_id", "Borrower", TOP_BORROWERS))
    parts.append(group_block("borrower_type", "Borrower type", None))
    parts.append(group_block("gpu_generation", "Generation", None))
    return _section("contributions", title, "".join(parts))


def _loss_by_period(summary: dict) -> str:
    """Expected loss by default period: summary.json's "loss_by_period"
    (portfolio/periods.py), estimated on the run's first scenarios."""
    title = "Loss by period"
    table = summary.get("loss_by_period")
    el = np.array([_num(v) for v in _get(table, "el_usd") or []], dtype=float)
    if not isinstance(table, dict) or el.size == 0 or not np.isfinite(el).all():
        return _section(
            "periods",
            title,
            '<p class="note">Loss by period: not computed in this run (the engine reports the '
            "loss over the whole horizon; summary.json has no loss_by_period).</p>",
        )
    se = np.array([_num(v) for v in table.get("el_se_usd") or []], dtype=float)
    if se.shape != el.shape:
        se = np.full_like(el, np.nan)
    steps = int(_num(table.get("steps_per_year")) or 1)
    periods = np.arange(1, el.size + 1)
    fig, ax = _new_figure(10, 3.4)
    ax.bar(periods, el / 1e6, color=C_EL, width=0.7, label="EL of the period")
    ax.errorbar(
        periods, el / 1e6, yerr=1.96 * np.nan_to_num(se) / 1e6, fmt="none",
        ecolor="#333333", elinewidth=1.0, capsize=3, label="95% interval",
    )  # fmt: skip
    ax.set_xticks(periods, labels=[f"{t / steps:g}" for t in periods], fontsize=8)
    ax.set_xlabel("End of the default period (years from today)")
    ax.set_ylabel("Expected loss ($M)")
    ax.set_title("Expected loss by default period", fontsize=11)
    ax.grid(False, axis="x")
    _millions_formatter(ax, "y")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    n = table.get("scenarios")
    chart = _figure_html(
        fig,
        "Expected loss by default period",
        f"Expected loss from defaults in each period (blue bars), with its 95% interval "
        f"(black), over the run's first {fmt_int(n)} scenarios.",
    )
    # By year: the periods of each year added up (a year's standard error is not the sum of
    # its periods', so none is shown).
    total = float(el.sum())
    years = (periods - 1) // steps + 1
    rows, cumulative = [], 0.0
    for year in np.unique(years):
        value = float(el[years == year].sum())
        cumulative += value
        rows.append(
            [
                f"Year {year}",
                fmt_usd(value),
                _share(value, total),
                fmt_usd(cumulative),
                _share(cumulative, total),
            ]
        )
    by_year = _table(
        ["Default year", "EL", "Share of EL", "Cumulative EL", "Cumulative share"],
        rows,
        css_class="compact",
    )
    run_el = _num(_get(summary, "measures", "el_usd"))
    note = (
        f'<p class="note">Estimated with the float64 NumPy reference on the run&rsquo;s first '
        f"{_esc(fmt_int(n))} scenarios (same seed and mode; plain Monte Carlo), each period "
        "the difference of the loss over the first t and t&minus;1 periods, so the periods add "
        f"up to that sample&rsquo;s EL, {_esc(fmt_usd(table.get('el_total_usd')))} (the "
        f"run&rsquo;s EL: {_esc(fmt_usd(run_el))}). A loan&rsquo;s loss is counted in the "
        "period it defaults in, discounted as the run discounts.</p>"
    )
    return _section("periods", title, chart + by_year + note)


def _hhi(values: np.ndarray) -> float | None:
    """Herfindahl-Hirschman index Σ s² of the shares of `values` (None if they sum to 0)."""
    total = float(values.sum())
    if not total or not math.isfinite(total):
        return None
    shares = values / total
    return float(np.sum(shares * shares))


def _offtakers(summary: dict) -> str:
    """Offtaker concentration: summary.json's "offtakers" (portfolio/offtakers.py), one row
    per offtaker; a note when the book names none."""
    rows_in = summary.get("offtakers")
    if not isinstance(rows_in, list) or not rows_in:
        return _section(
            "offtakers",
            "Offtakers",
            '<p class="note">The book names no offtaker (column <code>offtaker</code>): its '
            "take-or-pay contracts are paid whatever happens to their counterparties.</p>",
        )
    revenue_total = sum(_num(r.get("contracted_revenue_usd_per_year")) or 0.0 for r in rows_in)

    def usd_se(row: dict, key: str) -> str:
        value, se = row.get(key), _num(row.get(key.replace("_usd", "_se_usd")))
        if value is None:
            return DASH
        return fmt_usd(value) + ("" if se is None or not np.isfinite(se) else f" ± {fmt_usd(se)}")

    rows = []
    for row in rows_in:
        revenue = _num(row.get("contracted_revenue_usd_per_year")) or 0.0
        frequency = row.get("default_frequency")
        rows.append(
            [
                fmt_general(row.get("offtaker")),
                fmt_pct(row.get("pd_annual"), 2),
                fmt_usd(revenue),
                _share(revenue, revenue_total),
                fmt_usd(row.get("exposure_usd")),
                DASH if frequency is None else fmt_pct(frequency, 2),
                DASH if row.get("loans_el_usd") is None else fmt_usd(row.get("loans_el_usd")),
                usd_se(row, "el_given_default_usd"),
                usd_se(row, "el_given_no_default_usd"),
            ]
        )
    table = _table(
        [
            "Offtaker", "PD (annual)", "Contracted revenue / yr", "Share", "Exposure",
            "Defaults in run", "EL of its loans", "Book EL | it defaults", "Book EL | not",
        ],
        rows,
    )  # fmt: skip
    note = (
        '<p class="note">The take-or-pay counterparties the book names (docs/spec.md §4a). '
        "Contracted revenue: GPUs &times; 8,760 h &times; contracted share &times; contract rate "
        "of the contracts running today. Defaults in run: the share of scenarios in which the "
        "offtaker defaults within the horizon; a persistent credit cycle makes its defaults "
        "cluster, so this sits below 1 &minus; (1 &minus; PD)<sup>H</sup>. Book EL given it "
        "defaults within the horizon, or not, over the run&rsquo;s own scenarios (&plusmn; one "
        "standard error).</p>"
    )
    return _section("offtakers", "Offtakers", table + note)


def _concentration(contributions: pa.Table | None) -> str:
    """Single-name concentration by borrower: the top 10's and the largest's share of
    exposure, EL and ES (highest level), and each one's HHI."""
    title = "Concentration by borrower"
    if contributions is None:
        return _section("concentration", title, _not_computed("Loan contributions"))
    measures = [("Exposure (balance)", _column(contributions, "balance_usd"))]
    measures.append(("EL", _column(contributions, "expected_loss_usd")))
    es_cols = _alpha_columns(contributions, "es_")
    if es_cols:
        es_col, es_alpha = es_cols[-1]
        measures.append((f"ES {percent_label(es_alpha)}", _column(contributions, es_col)))
    borrowers = _column(contributions, "borrower_id")
    rows = []
    n_borrowers = 0
    for label, values in measures:
        _, (_, by_borrower) = _group_sum(borrowers, values)
        n_borrowers = by_borrower.size
        total = float(by_borrower.sum())
        ranked = np.sort(by_borrower)[::-1]
        hhi = _hhi(by_borrower)
        rows.append(
            [
                label,
                fmt_usd(total),
                _share(float(ranked[:CONCENTRATION_TOP].sum()), total),
                _share(float(ranked[:1].sum()), total),
                DASH if hhi is None else f"{10_000 * hhi:,.0f}",
                DASH if not hhi else f"{1 / hhi:,.1f}",
            ]
        )
    table = _table(
        [
            "Measure",
            "Total",
            f"Top {CONCENTRATION_TOP} borrowers' share",
            "Largest borrower's share",
            "HHI (0\u201310,000)",
            "Equivalent borrowers (1/HHI)",
        ],
        rows,
        css_class="compact",
    )
    note = (
        f'<p class="note">{n_borrowers:,} borrowers; each ranked by the measure itself (the '
        f"top {CONCENTRATION_TOP} by EL need not be the top {CONCENTRATION_TOP} by ES). "
        "EL and ES are the borrowers&rsquo; Euler contributions (a borrower&rsquo;s loans "
        "added up). HHI = \u03a3 s<sub>b</sub>\u00b2 over the borrowers&rsquo; shares, "
        "\u00d7 10,000: 10,000 is a single borrower, 10,000/n is n equal ones; 1/HHI is that "
        "number of equal borrowers. ES more concentrated than exposure means a few names "
        "carry the tail.</p>"
    )
    return _section("concentration", title, table + note)


def _sensitivities(sensitivities: pa.Table | None) -> str:
    title = "Sensitivities"
    if sensitivities is None:
        return _section("sensitivities", title, _not_computed("Parameter sensitivities"))
    es_cols = _alpha_columns(sensitivities, "d_es_")
    parameter = _column(sensitivities, "parameter")
    value = _column(sensitivities, "value")
    d_el = _column(sensitivities, "d_el_usd")
    if es_cols:
        col, alpha = es_cols[-1]
        d_es = _column(sensitivities, col)
        measure = f"ES {percent_label(alpha)}"
    else:
        d_es = d_el
        measure = "EL"
    moves, small = parameter_moves(parameter, value)
    impact = d_es * moves
    order = np.argsort(-np.abs(impact), kind="stable")[:TOP_SENSITIVITIES]
    if order.size == 0:
        return _section("sensitivities", title, '<p class="note">No parameters.</p>')

    small_tag = " (\u0394=0.1)"
    labels = [str(parameter[i]) + (small_tag if small[i] else "") for i in order]
    fig, ax = _new_figure(10, 1.0 + 0.36 * len(order))
    y = np.arange(len(order))
    vals = impact[order] / 1e6
    ax.barh(y, vals, color=[C_POS if v > 0 else C_NEG for v in vals], height=0.6)
    ax.axvline(0, color="#333333", linewidth=0.8)
    ax.set_yticks(y, labels=[names.mathtext(s) for s in labels], fontsize=8)
    ax.invert_yaxis()
    ax.grid(False, axis="y")
    ax.set_xlabel(f"Change in {measure} ($M)")
    ax.set_title(f"Largest {len(order)} sensitivities of {measure}", fontsize=11)
    _millions_formatter(ax)
    # Name the colours the bars use (C_POS, C_NEG), so the caption stays true.
    caption = (
        f"Tornado chart: change in {measure}, in USD, for a 100% move of each parameter "
        f"(\u0394\u03b8 = \u03b8, so \u0394{measure} \u2248 \u2202{measure}/\u2202\u03b8 "
        f"\u00d7 \u03b8, first order). Correlation entries and zero-valued parameters, "
        f"labelled (\u0394=0.1), move by an absolute 0.1 instead (\u2202{measure}/\u2202\u03b8 "
        f"\u00d7 0.1). Vermillion bars raise {measure}, blue bars lower it."
    )
    chart = _figure_html(fig, f"Tornado chart of {measure} sensitivities", caption)

    # Derivatives are USD per unit of the parameter, not USD: no "$" on them, the unit in
    # the header; the move and the USD change it gives sit beside them.
    header = ["Parameter", "Value \u03b8", "\u2202EL/\u2202\u03b8"]
    header += [f"\u2202ES {percent_label(a)}/\u2202\u03b8" for _, a in es_cols]
    header += ["Move \u0394\u03b8", f"\u0394{measure} (USD)"]
    es_values = [_column(sensitivities, c) for c, _ in es_cols]
    rows = []
    for i in order:
        row = [str(parameter[i]), fmt_general(float(value[i])), fmt_per_unit(d_el[i])]
        row += [fmt_per_unit(v[i]) for v in es_values]
        move = f"{moves[i]:+.4g}" + (" (absolute)" if small[i] else " (100%)")
        row += [move, fmt_usd(impact[i], signed=True)]
        rows.append(row)
    table = _table(
        header,
        rows,
        caption=(
            f"Top {len(order)} by |\u0394{measure}|. \u2202/\u2202\u03b8 columns: USD per unit "
            f"of the parameter (M = million); \u0394{measure} = \u2202{measure}/\u2202\u03b8 "
            "\u00d7 \u0394\u03b8, in USD."
        ),
        css_class="sens",
    )
    note = (
        f'<p class="note">Pathwise derivatives by automatic differentiation with common random '
        f"numbers, in USD per unit of the parameter (a correlation entry or a rate in decimal: "
        f"per 1.0 of it); {sensitivities.num_rows:,} parameters. The move \u0394\u03b8 is 100% "
        f"of the parameter's value (\u03b8 to 2\u03b8), or an absolute 0.1 for correlation "
        f"entries and zero-valued parameters.</p>"
    )
    return _section("sensitivities", title, chart + table + note)


def _stress(summary: dict) -> str:
    title = "Stress scenarios"
    stress = summary.get("stress")
    if not isinstance(stress, dict) or not stress:
        return _section("stress", title, '<p class="note">No stress scenarios in this run.</p>')
    alphas = _alphas(summary)
    base = summary.get("measures")
    header = ["Scenario", "EL"]
    for key, alpha in alphas:
        label = percent_label(alpha if alpha is not None else key)
        header += [f"VaR {label}", f"ES {label}"]

    def moved(value: object, change: object, base_value: object) -> tuple[str, str]:
        """The stressed value over its change against the base (relative in brackets)."""
        d, b = _num(change), _num(base_value)
        if d is None:
            return (fmt_usd(value), DASH)
        rel = f" ({fmt_pct(d / b, signed=True)})" if b else ""
        return (fmt_usd(value), fmt_usd(d, signed=True) + rel)

    rows: list[list[str | tuple[str, str]]] = [
        ["Base", fmt_usd(_get(base, "el_usd"))]
        + [
            cell
            for key, _ in alphas
            for cell in (
                fmt_usd(_get(base, "tail", key, "var_usd")),
                fmt_usd(_get(base, "tail", key, "es_usd")),
            )
        ]
    ]
    # The chart: each stress's relative change in EL and in ES at the highest level.
    top_key, top_alpha = alphas[-1] if alphas else (None, None)
    es_label = f"ES {percent_label(top_alpha if top_alpha is not None else top_key)}"
    chart_names, el_moves, es_moves = [], [], []
    descriptions = []
    for name, item in stress.items():
        m = _get(item, "measures")
        change = _get(item, "change")
        row: list[str | tuple[str, str]] = [
            str(name),
            moved(_get(m, "el_usd"), _get(change, "el_usd"), _get(base, "el_usd")),
        ]
        for key, _ in alphas:
            row += [
                moved(
                    _get(m, "tail", key, "var_usd"),
                    _get(change, f"var_{key}_usd"),
                    _get(base, "tail", key, "var_usd"),
                ),
                moved(
                    _get(m, "tail", key, "es_usd"),
                    _get(change, f"es_{key}_usd"),
                    _get(base, "tail", key, "es_usd"),
                ),
            ]
        rows.append(row)
        chart_names.append(str(name))
        el_moves.append(_relative(_get(change, "el_usd"), _get(base, "el_usd")))
        es_moves.append(
            _relative(_get(change, f"es_{top_key}_usd"), _get(base, "tail", top_key, "es_usd"))
            if top_key is not None
            else math.nan
        )
        desc = _get(item, "description")
        descriptions.append(
            f"<dt>{_esc(name)}</dt><dd>{_esc(desc if desc is not None else DASH)}</dd>"
        )
    table = _table(header, rows, css_class="stress")
    chart = _stress_chart(chart_names, np.array(el_moves), np.array(es_moves), es_label)
    body = f'<div class="side">{table}{chart}</div>'
    body += (
        '<p class="note">Each stress reuses the base run\'s random numbers. Each cell shows the '
        "stressed value and, below it, the change against the base run (stress minus base; "
        "relative change in brackets).</p>"
    )
    body += f'<dl class="stress">{"".join(descriptions)}</dl>'
    return _section("stress", title, body)


def _relative(change: object, base_value: object) -> float:
    d, b = _num(change), _num(base_value)
    return d / b if d is not None and b else math.nan


def _stress_chart(names_: list[str], el: np.ndarray, es: np.ndarray, es_label: str) -> str:
    """Horizontal bars: each stress's change in EL and in ES, % of the base value."""
    # Narrow, to sit beside the table where the page is wide (main widens from 1,700 px).
    fig, ax = _new_figure(4.2, 1.1 + 0.5 * len(names_))
    y = np.arange(len(names_))
    h = 0.38
    # A missing change draws no bar (nan -> 0) rather than failing the chart.
    ax.barh(y - h / 2, np.nan_to_num(100 * el), height=h, color=C_EL, label="EL")
    ax.barh(y + h / 2, np.nan_to_num(100 * es), height=h, color=C_ES, label=es_label)
    ax.axvline(0, color="#333333", linewidth=0.8)
    ax.set_yticks(y, labels=[names.mathtext(n) for n in names_], fontsize=8)
    ax.invert_yaxis()
    ax.grid(False, axis="y")
    ax.set_xlabel("Change against the base run (%)")
    ax.set_title("Stress: change in EL and " + names.mathtext(es_label), fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="best")
    caption = (
        f"Each stress scenario's change in EL (blue) and in {es_label} (vermillion), as a % of "
        "the base run's value."
    )
    return _figure_html(fig, "Stress scenarios: change in EL and ES", caption)


def _book(summary: dict) -> str:
    title = "Today's book"
    book = summary.get("book")
    if not isinstance(book, dict):
        return _section("book", title, '<p class="note">No book summary in this run.</p>')
    overview = _table(
        ["Book", "Value"],
        [
            ["Source", fmt_general(book.get("source"))],
            ["Loans", fmt_int(book.get("loans"))],
            ["Borrowers", fmt_int(book.get("borrowers"))],
            ["Exposure", fmt_usd(book.get("exposure_usd"))],
            ["GPUs", fmt_int(book.get("gpus"))],
            ["LTV (exposure-weighted)", fmt_pct(book.get("ltv"))],
            ["DSCR (exposure-weighted)", fmt_float(book.get("dscr"))],
            ["Exposure with DSCR below 1", fmt_pct(book.get("dscr_below_1_share"))],
        ],
        css_class="compact",
    )
    total = _num(book.get("exposure_usd")) or 0.0
    parts = [overview]
    for key, heading in (("by_generation", "Generation"), ("by_borrower_type", "Borrower type")):
        groups = book.get(key)
        if not isinstance(groups, dict) or not groups:
            continue
        rows = [
            [
                str(name),
                fmt_int(_get(g, "loans")),
                fmt_usd(_get(g, "exposure_usd")),
                _share(_num(_get(g, "exposure_usd")) or 0.0, total),
                fmt_int(_get(g, "gpus")),
                fmt_pct(_get(g, "ltv")),
                fmt_float(_get(g, "dscr")),
            ]
            for name, g in groups.items()
        ]
        parts.append(
            f"<h3>By {_esc(heading.lower())}</h3>"
            + _table([heading, "Loans", "Exposure", "Share", "GPUs", "LTV", "DSCR"], rows)
        )
        if key == "by_generation":
            generations = list(groups)
            exposure = np.array([_num(_get(groups[n], "exposure_usd")) or 0.0 for n in generations])
            fig, ax = _new_figure(10, 3.2)
            x = np.arange(len(generations))
            ax.bar(x, exposure / 1e6, color=C_BAR, width=0.6)
            ax.set_xticks(x, labels=[names.mathtext(n) for n in generations], fontsize=9)
            ax.set_ylabel("Exposure ($M)")
            ax.set_title("Exposure by GPU generation", fontsize=11)
            ax.grid(False, axis="x")
            _millions_formatter(ax, "y")
            for xi, e in zip(x, exposure, strict=True):
                ax.annotate(fmt_usd(e), (xi, e / 1e6), ha="center", va="bottom", fontsize=8)
            parts.append(_figure_html(fig, "Exposure by GPU generation"))
    note = (
        '<p class="note">LTV = balance / (GPUs \u00d7 price today \u00d7 collateral share); '
        "DSCR = net operating income / debt service over the next period; both "
        "exposure-weighted.</p>"
    )
    return _section("book", title, "".join(parts) + note)


def _reverse_stress(design: dict | None) -> str:
    """The most likely scenario losing X (gpucredit reverse-stress): paths and loss split."""
    title = "Reverse stress: the most likely scenario for the loss"
    if not design:
        return _section(
            "reverse-stress",
            title,
            '<p class="note">Not computed: run <code>gpucredit reverse-stress</code> with this '
            "directory as --out.</p>",
        )
    facts = [
        ("target loss", fmt_usd(design.get("target_loss_usd"))),
        ("loss at the design point", fmt_usd(design.get("loss_usd"))),
        ("central scenario's loss", fmt_usd(design.get("central_loss_usd"))),
        ("distance |z*| (std. normal units)", fmt_float(design.get("distance"), 3)),
        (
            "likelihood relative to the central scenario",
            fmt_general(design.get("likelihood_ratio")),
        ),
        ("converged", fmt_general(design.get("converged"))),
    ]
    parts = [
        _table(["", "value"], facts, caption="Design point z*: minimises |z|²/2 with loss ≥ target")
    ]
    paths = design.get("paths") or {}
    central = design.get("central_paths") or {}
    if paths:
        factors = list(paths)
        columns = 4
        rows = -(-len(factors) // columns)
        fig = Figure(figsize=(12, 2.3 * rows), layout="constrained")
        for k, name in enumerate(factors):
            ax = fig.add_subplot(rows, columns, k + 1)
            _style_axes(ax)
            values = np.asarray(paths[name], dtype=float)
            periods = np.arange(len(values))
            ax.plot(periods, values, color="#b42318", label="design point")
            if name in central:
                ax.plot(
                    periods,
                    np.asarray(central[name], dtype=float),
                    color="#616e7c",
                    linestyle="--",
                    label="central",
                )
            ax.set_title(names.mathtext(name), fontsize=9)
            if k == 0:
                ax.legend(fontsize=8)
        parts.append(
            _figure_html(
                fig,
                "factor paths at the design point",
                "Each factor's path at the design point (red) and with every shock at its median "
                "(dashed), in natural units, period 0 = today.",
            )
        )
    for label, key in (
        ("generation", "loss_by_generation"),
        ("borrower type", "loss_by_borrower_type"),
    ):
        split = design.get(key) or {}
        total = sum(v for v in split.values() if v is not None) or None
        rows_ = [[name, fmt_usd(value), _share(value, total)] for name, value in split.items()]
        parts.append(
            _table([label, "loss", "share"], rows_, caption=f"Loss at the design point by {label}")
        )
    return _section("reverse-stress", title, "".join(parts))


def _metadata(summary: dict) -> str:
    meta = summary.get("metadata")
    if not isinstance(meta, dict) or not meta:
        return _section("metadata", "Run metadata", '<p class="note">No metadata.</p>')
    items = []
    for key, value in meta.items():
        if key.endswith("_seconds"):
            shown = fmt_seconds(value) if _num(value) is not None else DASH
        else:
            shown = fmt_general(value)
        css = ' class="hash"' if key.endswith("sha256") else ""
        items.append(f"<dt>{_esc(key)}</dt><dd{css}>{_esc(shown)}</dd>")
    return _section("metadata", "Run metadata", f'<dl class="meta">{"".join(items)}</dl>')


_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --rule:#d9dee3; --band:#f5f7f9; --accent:#0b4f8a; }
* { box-sizing: border-box; }
body { margin:0; color:var(--ink); background:#fff;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 32px 64px; }
@media (min-width:1700px) { main { max-width:1640px; } }
header { border-bottom:3px solid var(--accent); padding-bottom:12px; margin-bottom:8px; }
h1 { font-size:24px; margin:0 0 12px; color:var(--accent); }
h2 { font-size:19px; margin:36px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--rule); }
h3 { font-size:15px; margin:22px 0 6px; color:var(--muted); }
.facts { display:grid; grid-template-columns:repeat(auto-fill,minmax(210px,1fr)); gap:6px 18px; }
.fact .k { display:block; font-size:11px; text-transform:uppercase; letter-spacing:.04em;
  color:var(--muted); }
.fact .v { font-weight:600; overflow-wrap:anywhere; }
nav { font-size:13px; margin:10px 0 0; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
table { border-collapse:collapse; margin:8px 0 14px; font-variant-numeric:tabular-nums;
  min-width:50%; }
table.compact { min-width:0; }
caption { text-align:left; font-size:12px; color:var(--muted); padding-bottom:4px; }
th, td { padding:5px 10px; border-bottom:1px solid var(--rule); text-align:left;
  white-space:nowrap; }
th { background:var(--band); font-weight:600; font-size:12.5px; }
td.num, th.num { text-align:right; }
tbody tr:nth-child(even) { background:#fafbfc; }
table.totals tbody tr:last-child { font-weight:600; border-top:2px solid var(--ink); }
table.headline td:nth-child(2) { font-weight:600; }
table.wide, table.calib { font-size:12.5px; }
table.wide th, table.wide td, table.calib th, table.calib td { padding:5px 7px; }
table.wide th, table.calib th { white-space:normal; vertical-align:bottom; }
table.wide td { white-space:normal; }
table.wide td:first-child { white-space:nowrap; }
.scroll { overflow-x:auto; }
.side { display:flex; flex-wrap:wrap; gap:0 28px; align-items:flex-start; }
.side > * { min-width:0; }
table.stress td { vertical-align:top; }
table.stress td:first-child { white-space:normal; }
.delta { font-size:11.5px; color:var(--muted); }
table.sens th { white-space:normal; vertical-align:bottom; }
table.sens td:first-child { white-space:normal; overflow-wrap:anywhere; }
.warn { border-left:4px solid #D55E00; background:#fff6ef; padding:8px 14px; margin:10px 0;
  font-size:13px; max-width:900px; }
.warn ul { margin:4px 0 0; padding-left:18px; }
figure { margin:10px 0 16px; }
figure img { display:block; max-width:100%; height:auto; }
figcaption { font-size:12px; color:var(--muted); margin-top:4px; max-width:900px; }
.note { font-size:12.5px; color:var(--muted); max-width:900px; }
dl.meta { display:grid; grid-template-columns:max-content 1fr; gap:3px 18px; font-size:13px; }
dl.meta dt { color:var(--muted); }
dl.meta dd { margin:0; font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
  word-break:break-all; }
dl.stress dt { font-weight:600; margin-top:6px; }
dl.stress dd { margin:0 0 0 16px; color:var(--muted); }
footer { margin-top:40px; font-size:11px; color:var(--muted); }
@media print { main { max-width:none; padding:0; } h2 { break-after:avoid; }
  figure, table { break-inside:avoid; } }
"""

_SECTIONS = (
    ("headline", "Headline"),
    ("losses", "Loss distribution"),
    ("periods", "Loss by period"),
    ("calibration", "Calibration"),
    ("contributions", "Contributions"),
    ("concentration", "Concentration"),
    ("offtakers", "Offtakers"),
    ("sensitivities", "Sensitivities"),
    ("stress", "Stress"),
    ("book", "Today's book"),
    ("reverse-stress", "Reverse stress"),
    ("metadata", "Metadata"),
)


# ----------------------------------------------------------------------------- public API


def render_report(
    summary: dict,
    losses_usd: np.ndarray | None,
    contributions: pa.Table | None,
    sensitivities: pa.Table | None,
    *,
    tail_losses_usd: np.ndarray | None = None,
    reverse_stress: dict | None = None,
    generated_at: dt.datetime | None = None,
) -> str:
    """The report as one self-contained HTML document (no script, no external resource).

    summary: the parsed summary.json; losses_usd: [scenarios] portfolio loss per scenario,
    or None for a tails-only run, whose distribution is then drawn from summary's
    loss_histogram and tail_losses_usd (its largest losses, tail_losses.parquet);
    contributions / sensitivities: the tables of contributions.parquet and
    sensitivities.parquet, or None when not computed. generated_at: the date shown in the
    header (default: now, UTC). reverse_stress: the parsed reverse_stress.json, if any.
    """
    if not isinstance(summary, dict):
        raise ReportError(f"{SUMMARY_FILE}: expected a JSON object, got {type(summary).__name__}")
    _check_columns(contributions, CONTRIBUTION_COLUMNS, "contributions table")
    _check_columns(sensitivities, SENSITIVITY_COLUMNS, "sensitivities table")
    when = generated_at or dt.datetime.now(dt.UTC)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    if losses_usd is not None:
        losses = _Losses.of_all(losses_usd)
    elif tail_losses_usd is not None:
        losses = _Losses.of_tail(summary, _summary_histogram(summary), tail_losses_usd)
    else:
        losses = None
    book = _book_name(summary)
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in _SECTIONS)
    # Names in labels are escaped for mathtext (io/names.py); LaTeX would need other escapes,
    # so a matplotlibrc asking for usetex is overridden here.
    with rc_context({"text.usetex": False}):
        body = [
            _header(summary, when),
            f"<nav>{nav}</nav>",
            _headline(summary),
            _loss_distribution(summary, losses),
            _loss_by_period(summary),
            _calibration(summary),
            _contributions(contributions),
            _concentration(contributions),
            _offtakers(summary),
            _sensitivities(sensitivities),
            _stress(summary),
            _book(summary),
            _reverse_stress(reverse_stress),
            _metadata(summary),
            f"<footer>gpucredit {_esc(fmt_general(_get(summary, 'metadata', 'version')))} "
            f"\u2014 generated {_esc(when.strftime('%Y-%m-%d %H:%M:%S UTC'))}</footer>",
        ]
    title = f"gpucredit report \u2014 {book}" if book else "gpucredit report"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _check_columns(table: pa.Table | None, required: Sequence[str], what: str) -> None:
    if table is None:
        return
    if not isinstance(table, pa.Table):
        raise ReportError(f"{what}: expected a pyarrow Table, got {type(table).__name__}")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ReportError(f"{what}: missing column(s) {', '.join(missing)}")


def _read_summary(path: Path) -> dict:
    if not path.exists():
        raise ReportError(f"{path}: file not found (summary.json is required)")
    try:
        text = read_text_file(path)  # a FIFO or a device is refused, not waited on
    except TextFileError as error:
        raise ReportError(f"{path}: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON: {error}") from None
    except RecursionError:  # json recurses into nested arrays and objects
        raise ReportError(f"{path}: nested too deeply to be a results file") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def _read_parquet(path: Path, required: Sequence[str], optional: bool) -> pa.Table | None:
    if optional and not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except (OSError, pa.ArrowException) as error:
        raise ReportError(f"{path}: cannot read as Parquet: {error}") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def _summary_histogram(summary: dict) -> LossHistogram:
    try:
        return LossHistogram.from_dict(summary["loss_histogram"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(
            f"{SUMMARY_FILE}: no valid loss_histogram (a tails-only run needs it): {error!r}"
        ) from None


def _read_losses(path: Path) -> np.ndarray:
    table = _read_parquet(path, ("loss_usd",), optional=False)
    assert table is not None
    try:
        return table.column("loss_usd").to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise ReportError(f"{path}: loss_usd is not numeric: {error}") from None


def _same_inputs(design: dict, summary: dict) -> bool:
    """Whether reverse_stress.json is of the run's book and assumptions (their hashes, which
    `gpucredit reverse-stress` writes in its metadata; a file without them cannot be tied)."""
    keys = ("book_sha256", "assumptions_sha256")
    tied = [_get(design, "metadata", key) for key in keys]
    return None not in tied and tied == [_get(summary, "metadata", key) for key in keys]


def render_report_from_dir(directory: Path) -> Path:
    """Read summary.json, losses.parquet (tails-only runs: tail_losses.parquet and summary's
    loss_histogram) and, when present, contributions.parquet and sensitivities.parquet from
    `directory`; write `directory/report.html` atomically (temporary name in the same
    directory, then rename) and return its path.

    Raises ReportError naming the file when a required input is missing or any input is
    unreadable.
    """
    directory = Path(directory)
    summary = _read_summary(directory / SUMMARY_FILE)
    version = summary.get("format_version")
    if version != SUMMARY_FORMAT_VERSION:  # another layout's keys would render as dashes
        raise ReportError(
            f"{directory / SUMMARY_FILE}: format_version {version}, this gpucredit reads "
            f"{SUMMARY_FORMAT_VERSION} (rerun gpucredit run to rewrite the results)"
        )
    losses, tail_losses = None, None
    if _get(summary, "metadata", "keep_losses") is False:  # a tails-only run
        _summary_histogram(summary)
        tail_losses = _read_losses(directory / TAIL_LOSSES_FILE)
    else:
        losses = _read_losses(directory / LOSSES_FILE)
    contributions = _read_parquet(
        directory / CONTRIBUTIONS_FILE, CONTRIBUTION_COLUMNS, optional=True
    )
    sensitivities = _read_parquet(
        directory / SENSITIVITIES_FILE, SENSITIVITY_COLUMNS, optional=True
    )
    design_path = directory / REVERSE_STRESS_FILE
    design = _read_summary(design_path) if design_path.exists() else None
    if design is not None and not _same_inputs(design, summary):
        design = None  # another book's or assumptions' reverse stress: never mixed in
    text = render_report(
        summary,
        losses,
        contributions,
        sensitivities,
        tail_losses_usd=tail_losses,
        reverse_stress=design,
    )
    target = directory / REPORT_FILE
    try:
        write_atomically(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise ReportError(f"{target}: cannot write: {error.strerror or error}") from None
    return target
