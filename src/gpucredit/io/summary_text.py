"""What the terminal shows: the run's measures, top contributors, sensitivities and
calibration, and today's book summary with its paper-vs-path loans, as rich tables on
stdout."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from gpucredit.io.names import rich_text
from gpucredit.portfolio.engine import RunResult
from gpucredit.portfolio.risk import alpha_key, alpha_of_label


def usd_millions(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value / 1e6:,.2f}"


def percent(alpha: float) -> str:
    """0.999 -> "99.9%"."""
    return f"{alpha * 100:.10g}%"


def _console() -> Console:
    # emoji=False: ":smile:" in a name stays as written (names go in as io.names.rich_text)
    return Console(width=120, highlight=False, emoji=False)


def print_run_summary(result: RunResult, top: int = 10) -> None:
    console = _console()
    m = result.measures
    meta = result.metadata
    table = Table(
        title=(
            f"Portfolio loss over {meta['horizon_years']:g} years, {meta['scenarios']:,} "
            f"scenarios ({meta['mode']}, {meta['backend']} {meta['precision']}), $ millions"
        )
    )
    for column in ("measure", "estimate", "std. error", "95% interval"):
        table.add_column(column, justify="right" if column != "measure" else "left")

    def row(name, value, se, ci):
        interval = f"[{usd_millions(ci[0])}, {usd_millions(ci[1])}]"
        table.add_row(name, usd_millions(value), usd_millions(se), interval)

    row("EL", m.el, m.el_se, m.el_ci)
    table.add_row("std. deviation", usd_millions(m.std), "", "")
    for t in (t.reported() for t in m.tail):  # no interval where too few tail scenarios
        row(f"VaR {percent(t.alpha)}", t.var, t.var_se, t.var_ci)
        row(f"ES {percent(t.alpha)}", t.es, t.es_se, t.es_ci)
    console.print(table)
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False)

    alpha = max(m.alphas)
    key = alpha_key(alpha)
    if result.contributions is not None:
        contrib = result.contributions
        es_i = contrib.expected_shortfall_usd[key]
        order = np.argsort(-es_i)[:top]
        table = Table(title=f"Largest ES {percent(alpha)} contributors, $ millions")
        for column in ("loan", "borrower", "type", "gen", "balance", "EL", "ES", "share", "PD"):
            table.add_column(column, justify="left" if column in ("loan", "borrower") else "right")
        for i in order:
            table.add_row(
                rich_text(contrib.loan_id[i]),
                rich_text(contrib.borrower_id[i]),
                rich_text(contrib.borrower_type[i]),
                rich_text(contrib.gpu_generation[i]),
                usd_millions(contrib.balance_usd[i]),
                usd_millions(contrib.expected_loss_usd[i]),
                usd_millions(es_i[i]),
                f"{es_i[i] / m.es(alpha):.1%}",
                f"{contrib.horizon_pd[i]:.1%}",
            )
        console.print(table)
    if result.sensitivities is not None:
        table = Table(
            title=(
                f"Largest ES {percent(alpha)} sensitivities: the ES change ($ millions) for a "
                "move of θ by 100% of its value (0.1 for correlations)"
            )
        )
        for column in ("parameter", "value", "move", "ΔES", "∂ES/∂θ"):
            table.add_column(column, justify="left" if column == "parameter" else "right")
        for name, derivative, value, move in result.sensitivities.largest(alpha, top):
            table.add_row(
                rich_text(name),
                f"{value:.4g}",
                f"{move:.3g}",
                usd_millions(derivative * move),
                f"{derivative:.4g}",
            )
        console.print(table)
    if result.stress:
        table = Table(title="Stress scenarios (same random numbers), $ millions")
        table.add_column("scenario")
        table.add_column("EL", justify="right")
        table.add_column("ΔEL", justify="right")
        table.add_column(f"ES {percent(alpha)}", justify="right")
        table.add_column("ΔES", justify="right")
        for s in result.stress:
            table.add_row(
                rich_text(s.name),
                usd_millions(s.measures.el),
                usd_millions(s.measures.el - m.el),
                usd_millions(s.measures.es(alpha)),
                usd_millions(s.measures.es(alpha) - m.es(alpha)),
            )
        console.print(table)
    print_calibration(getattr(result, "calibration", None), console)
    console.print(
        rich_text(
            f"{meta['scenarios']:,} scenarios in {meta['pass1_seconds']:.1f} s "
            f"({meta['scenarios_per_second']:,.0f}/s, {meta['loan_periods_per_second']:.3g} "
            f"loan-periods/s) on {meta['device']}; total {meta['elapsed_seconds']:.1f} s"
        )
    )
    if result.losses_usd is None:
        console.print(
            f"tails-only pass 1: {m.n_batches} batches kept their largest losses and statistics; "
            f"per-scenario losses were not kept (the {len(result.tail.indices):,} largest are in "
            "tail_losses.parquet; --keep-losses keeps them all)"
        )


def _finite(value: object) -> float | None:
    """A finite float, or None for None, a bool, a non-number or a non-finite value."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _pct(value: object, digits: int = 2) -> str:
    """A share as a percentage; "n/a" for None or a non-finite value."""
    x = _finite(value)
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _times(value: object) -> str:
    """A ratio as "1.31x"; "n/a" for None or a non-finite value."""
    x = _finite(value)
    return "n/a" if x is None else f"{x:.2f}x"


def _es_shares(row: dict) -> list[tuple[str, object]]:
    """("ES 99.9%", share) of every es_<alpha label>_share key (es_99_9_share) of a
    calibration row, by alpha."""
    out = []
    for key, value in row.items():
        if key.startswith("es_") and key.endswith("_share"):
            try:
                alpha = alpha_of_label(key[len("es_") : -len("_share")])
            except ValueError:
                continue
            out.append((alpha, f"ES {percent(alpha)}", value))
    return [(label, value) for _, label, value in sorted(out)]


def print_calibration(calibration: dict | None, console: Console | None = None) -> None:
    """The whole book's calibration (portfolio/calibration.py) in three lines; nothing when
    the run has none (--no-calibration)."""
    if not isinstance(calibration, dict) or not isinstance(calibration.get("book"), dict):
        return
    console = console or _console()
    book = calibration["book"]
    model_h, input_h = book.get("model_pd_horizon"), book.get("input_pd_horizon")
    try:
        horizon_ratio = float(model_h) / float(input_h)
    except (TypeError, ValueError, ZeroDivisionError):
        horizon_ratio = None
    console.print(
        "calibration (whole book): year-1 default rate "
        f"{_pct(book.get('model_default_rate_year_one'))} vs input PD "
        f"{_pct(book.get('input_pd_year_one'))} ({_times(book.get('year_one_ratio'))}; "
        "~1.0-2.0x expected)"
    )
    losses = [f"EL {_pct(book.get('el_share'))}"]
    losses += [f"{label} {_pct(value)}" for label, value in _es_shares(book)]
    console.print(
        f"  horizon PD {_pct(model_h)} vs {_pct(input_h)} ({_times(horizon_ratio)}); "
        f"{', '.join(losses)} of exposure; mean LGD {_pct(book.get('mean_lgd'), 1)}"
    )
    pvp = calibration.get("paper_vs_path")
    if isinstance(pvp, dict):
        console.print("  " + _paper_vs_path_line(pvp, book.get("loans")))


def _paper_vs_path_line(pvp: dict, total_loans: object = None) -> str:
    """One line: how many loans cannot pay on their central path, and why."""
    count = pvp.get("loans") or 0
    if count == 0:
        return "paper vs path: none (every central path pays its debt service and balloon)"
    of = f" of {total_loans:,}" if isinstance(total_loans, int) else ""
    return (
        f"paper vs path: {count:,}{of} loans, {_pct(pvp.get('exposure_share'), 1)} of "
        f"exposure, cannot pay on their central path ({pvp.get('debt_service', 0):,} debt "
        f"service, {pvp.get('refinancing', 0):,} refinancing)"
    )


def print_paper_vs_path(pvp: dict, total_loans: int | None = None, top: int = 5) -> None:
    """The loans whose central path cannot pay (calibration.paper_vs_path): the count, and
    the `top` largest by balance."""
    console = _console()
    console.print(rich_text(_paper_vs_path_line(pvp, total_loans)))
    if pvp.get("loans"):
        console.print(
            "  their input PD assumed more than their expected path (every shock 0) delivers: "
            "the model's hazard sits above it there (docs/spec.md §4)"
        )
    rows = sorted(pvp.get("rows") or [], key=lambda r: -(r.get("balance_usd") or 0.0))
    if not rows:
        return
    shown = rows[:top]
    table = Table(
        title=f"Largest paper-vs-path loans ({len(shown)} of {len(rows):,}), central path"
    )
    for column in ("loan", "borrower", "type", "gen", "balance $m", "lowest LC*", "RF*"):
        numeric = column in ("balance $m", "lowest LC*", "RF*")
        table.add_column(column, justify="right" if numeric else "left")
    table.add_column("cannot pay")
    for r in shown:
        table.add_row(
            rich_text(r.get("loan_id")),
            rich_text(r.get("borrower_id")),
            rich_text(r.get("borrower_type")),
            rich_text(r.get("gpu_generation")),
            usd_millions(r.get("balance_usd")),
            _times(r.get("central_min_liquidity_coverage")),
            _times(r.get("central_refinancing_coverage")),
            rich_text(r.get("cannot_pay")),
        )
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"... and {len(rows) - len(shown):,} more (--json lists every one)")


def _ltv(value: float | None) -> str:
    """An LTV as a percentage; "n/a" when no loan has one (no collateral anywhere)."""
    return "n/a" if value is None else f"{value:.1%}"


def _dscr(value: float | None) -> str:
    """A coverage ratio; "n/a" when no loan has one (no debt service today anywhere)."""
    return "n/a" if value is None else f"{value:.2f}x"


def print_book_summary(summary: dict) -> None:
    console = _console()
    console.print(
        rich_text(
            f"{summary['source']}: {summary['loans']:,} loans, {summary['borrowers']:,} "
            f"borrowers, exposure ${usd_millions(summary['exposure_usd'])}m on "
            f"{summary['gpus']:,.0f} GPUs; LTV {_ltv(summary['ltv'])}, debt-service coverage "
            f"{_dscr(summary['dscr'])} (exposure-weighted); "
            f"{summary['dscr_below_1_share']:.1%} of exposure below 1.0x"
        )
    )
    for title, key in (("generation", "by_generation"), ("borrower type", "by_borrower_type")):
        table = Table(title=f"Today's book by {title}")
        for column in (title, "loans", "exposure $m", "GPUs", "LTV", "DSCR"):
            table.add_column(column, justify="left" if column == title else "right")
        for name, g in summary[key].items():
            table.add_row(
                rich_text(name),
                f"{g['loans']:,}",
                usd_millions(g["exposure_usd"]),
                f"{g['gpus']:,.0f}",
                _ltv(g["ltv"]),
                _dscr(g["dscr"]),
            )
        console.print(table)


def print_design_point(point) -> None:
    """The reverse stress test's design point: factor paths, loss split, likelihood."""
    console = _console()
    console.print(
        f"Most likely scenario losing {usd_millions(point.target_loss_usd)}m USD: loss "
        f"{usd_millions(point.loss_usd)}m "
        f"(central scenario {usd_millions(point.central_loss_usd)}m); "
        f"|z*| = {point.distance:.3f}, likelihood relative to the central scenario "
        f"exp(-|z*|²/2) = {np.exp(point.log_likelihood_ratio):.3g}"
        + ("" if point.converged else " (search did not fully converge)")
    )
    last = len(next(iter(point.paths.values()))) - 1
    shown = sorted({0, 1, last, *range(0, last + 1, max(1, last // 4))})  # full paths: the JSON
    table = Table(
        title="Factor paths at the design point, \\[central path]; t = period (reverse_stress.json "
        "has every period)"
    )
    table.add_column("factor")
    for t in shown:
        table.add_column(f"t={t}", justify="right")
    for name, path in point.paths.items():
        central = point.central_paths[name]
        cells = (rich_text(f"{path[t]:.4g} [{central[t]:.4g}]") for t in shown)
        table.add_row(rich_text(name), *cells)
    console.print(table)
    for title, split in (
        ("generation", point.loss_by_generation),
        ("borrower type", point.loss_by_borrower_type),
    ):
        table = Table(title=f"Loss at the design point by {title}, $ millions")
        table.add_column(title)
        table.add_column("loss", justify="right")
        table.add_column("share", justify="right")
        for name, value in split.items():
            table.add_row(rich_text(name), usd_millions(value), f"{value / point.loss_usd:.1%}")
        console.print(table)
