"""Names are data (issue 20, item 5): rich markup, ANSI/OSC control sequences and matplotlib
mathtext in loan ids, borrower, generation, stress and factor names and file paths are shown
as written, in the terminal (io/summary_text.py) and in the report (io/report.py)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from rich.console import Console

from gpucredit.io import summary_text
from gpucredit.io.names import html, mathtext, rich_text, terminal

# What broke before: "[/]" raised rich's MarkupError after the results were written, "[us]"
# vanished (underline + strike), ESC and OSC sequences reached the terminal, "$\cmd$" made
# matplotlib raise and left no report; ":smile:" became an emoji.
HOSTILE = (
    "[/]",
    "[us]",
    "[bold]B",
    "\x1b[31mred",
    "\x1b]8;;http://x\x07ln",
    r"$\cmd$",
    "$x$",
    ":smile:",
    "end\\",
    "\u202eabc",
    "cr\rbs\b",
)
CONTROLS = ("\x1b", "\x07", "\r", "\b", "\u202e")
# Hypothesis alphabet: the characters that mean something to rich, matplotlib or a terminal.
SPECIAL = st.sampled_from(list("[]/\\:$_^{}ab us\x1b\x07\n\r\t\x9b") + ["\u202e", "\udcff", "é"])
NAMES = st.text(alphabet=SPECIAL, max_size=24) | st.text(max_size=24)


# ----------------------------------------------------------------------------- the helpers


def test_terminal_shows_control_characters_as_escapes():
    assert terminal("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert terminal("a\rb\bc\x07\x9b") == "a\\x0db\\x08c\\x07\\x9b"
    assert terminal("\u202eevil\u2028") == "\\u202eevil\\u2028"
    assert terminal("bad\udcffname.toml") == "bad\\udcffname.toml"  # undecodable file name
    assert terminal("two\nlines") == "two\\x0alines"
    assert terminal("two\nlines\x1b", keep_newlines=True) == "two\nlines\\x1b"
    for name in ("H100", "é ü 中文 🚀", "[/] $x$ :smile:", "a\\b", 12.5):
        assert terminal(name) == str(name)


@settings(max_examples=400, deadline=None)
@given(NAMES)
def test_rich_text_prints_as_written(name):
    console = Console(file=io.StringIO(), width=500, color_system=None)  # emoji on: not used
    console.print(rich_text(name), soft_wrap=True)
    assert console.file.getvalue() == terminal(name) + "\n"
    assert not any(c in console.file.getvalue() for c in CONTROLS)


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_mathtext_is_never_parsed_as_math(name):
    label = Text(text=mathtext(name))
    shown, is_math = label._preprocess_math(label.get_text())
    assert (shown, is_math) == (terminal(name), False)


def test_mathtext_labels_draw():
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_yticks(range(len(HOSTILE)), labels=[mathtext(n) for n in HOSTILE])
    ax.set_title(mathtext(r"rent:$\frac{1}{0}$"))
    FigureCanvasAgg(fig).draw()  # raw r"$\cmd$" raises ValueError (unknown symbol)


def test_html_escapes_markup_and_shows_controls():
    assert html('<b>L&0</b>"\x1b') == "&lt;b&gt;L&amp;0&lt;/b&gt;&quot;\\x1b"


# ----------------------------------------------------------------------------- the terminal


def _printed(capsys) -> str:
    out = capsys.readouterr().out
    for c in CONTROLS:
        assert c not in out, (c, out)
    return out


def _tail(alpha, var, es):
    tail = SimpleNamespace(
        alpha=alpha,
        var=var,
        var_se=0.01 * var,
        var_ci=(0.9 * var, 1.1 * var),
        es=es,
        es_se=0.01 * es,
        es_ci=(0.9 * es, 1.1 * es),
    )
    tail.reported = lambda: tail
    return tail


def _run_result(names):
    """What print_run_summary reads of a RunResult, with `names` as every kind of name."""
    n = len(names)
    es = np.linspace(1e6, 2e6, n)
    measures = SimpleNamespace(
        el=5e6,
        el_se=1e5,
        el_ci=(4.8e6, 5.2e6),
        std=2e6,
        tail=[_tail(0.99, 2e7, 3e7)],
        alphas=(0.99,),
        es=lambda alpha: 3e7,
        n_batches=32,
    )
    contributions = SimpleNamespace(
        expected_shortfall_usd={"0.99": es},
        loan_id=np.array(names, dtype=object),
        borrower_id=np.array(names, dtype=object),
        borrower_type=np.array(["miner"] * n, dtype=object),
        gpu_generation=np.array(names, dtype=object),
        balance_usd=np.full(n, 1e7),
        expected_loss_usd=np.full(n, 1e5),
        horizon_pd=np.full(n, 0.05),
    )
    sensitivities = SimpleNamespace(
        largest=lambda alpha, top: [(f"generations.{m}.depreciation", 1e7, 0.2, 0.2) for m in names]
    )
    stress = [
        SimpleNamespace(name=m, measures=SimpleNamespace(el=6e6, es=lambda alpha: 4e7))
        for m in names
    ]
    metadata = {
        "horizon_years": 3.0,
        "scenarios": 1000,
        "mode": "conditional",
        "backend": "numpy",
        "precision": "float64",
        "pass1_seconds": 1.0,
        "scenarios_per_second": 1000.0,
        "loan_periods_per_second": 1e6,
        "device": "cpu [x86]\x1b[2J",
        "elapsed_seconds": 2.0,
    }
    return SimpleNamespace(
        measures=measures,
        metadata=metadata,
        warnings=[],
        contributions=contributions,
        sensitivities=sensitivities,
        stress=stress,
        calibration=None,
        losses_usd=np.zeros(1),
    )


@pytest.mark.parametrize("name", HOSTILE)
def test_run_summary_prints_names_as_written(capsys, name):
    summary_text.print_run_summary(_run_result([name, "L2"]), top=5)
    out = _printed(capsys)
    assert terminal(name) in out, out
    assert "cpu [x86]\\x1b[2J" in out


@pytest.mark.parametrize("name", HOSTILE)
def test_book_summary_and_paper_vs_path_print_names_as_written(capsys, name):
    group = {"loans": 1, "exposure_usd": 1e6, "gpus": 10, "ltv": 0.5, "dscr": 1.2}
    summary_text.print_book_summary(
        {
            "source": f"/books/{name}.parquet",
            "loans": 1,
            "borrowers": 1,
            "exposure_usd": 1e6,
            "gpus": 10,
            "ltv": 0.5,
            "dscr": 1.2,
            "dscr_below_1_share": 0.0,
            "by_generation": {name: group},
            "by_borrower_type": {name: group},
        }
    )
    row = {
        "loan_id": name,
        "borrower_id": name,
        "borrower_type": name,
        "gpu_generation": name,
        "balance_usd": 1e6,
        "cannot_pay": name,
    }
    summary_text.print_paper_vs_path({"loans": 1, "exposure_share": 0.1, "rows": [row]}, 1)
    out = _printed(capsys)
    assert f"/books/{terminal(name)}.parquet" in out
    assert out.count(terminal(name)) >= 3, out  # long names may be cut with … in tables


@pytest.mark.parametrize("name", HOSTILE)
def test_design_point_prints_factor_and_generation_names_as_written(capsys, name):
    point = SimpleNamespace(
        target_loss_usd=1e8,
        loss_usd=1.1e8,
        central_loss_usd=1e6,
        distance=3.2,
        log_likelihood_ratio=-5.12,
        converged=True,
        paths={f"rent:{name}": [1.0, 0.9, 0.8]},
        central_paths={f"rent:{name}": [1.0, 0.95, 0.9]},
        loss_by_generation={name: 1.1e8},
        loss_by_borrower_type={"miner": 1.1e8},
    )
    summary_text.print_design_point(point)
    out = _printed(capsys)
    assert f"rent:{terminal(name)}" in out and out.count(terminal(name)) >= 2, out
