"""Fuzzing the command line (issue 20 item 7): random books (valid and invalid cells, renamed,
dropped and repeated columns) and random assumptions files give a result or a clear refusal
with exit status 2, never a traceback, a hang or a NaN result; and the book and size cases of
issue 20 items 5-6 and 9 as regression tests through the CLI.

Kept small (a few examples each, no deadline): the whole module runs in well under a minute.
"""

from __future__ import annotations

import csv
import json
import string
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucredit.cli import main
from gpucredit.portfolio.book import BOOK_SCHEMA
from gpucredit.portfolio.document import KEYS

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# A valid three-loan book (two borrowers), as text cells: every mutation starts from it.
GOOD_BOOK = {
    "loan_id": ["L1", "L2", "L3"],
    "borrower_id": ["B1", "B1", "B2"],
    "borrower_type": ["neocloud", "neocloud", "miner"],
    "balance_usd": ["2e7", "1.5e7", "8e6"],
    "rate_type": ["fixed", "floating", "fixed"],
    "rate": ["0.09", "0.04", "0.11"],
    "maturity_years": ["4", "2.5", "3"],
    "amortization": ["annuity", "linear", "bullet"],
    "gpu_generation": ["H100", "B200", "A100"],
    "gpu_count": ["1024", "512", "2000"],
    "pd_annual": ["0.03", "0.03", "0.06"],
    "contracted_share": ["0.6", "0.3", "0"],
    "contract_rate_usd_per_hour": ["2.4", "4.2", "0"],
    "contract_years_remaining": ["2", "1", "0"],
    "btc_units": ["0", "0", "150"],
    "other_income_usd_per_year": ["0", "1e6", "3e6"],
    "other_income_btc_share": ["0", "0", "0.8"],
}
COLUMNS = [c.name for c in BOOK_SCHEMA]

CELLS = st.one_of(
    st.sampled_from(
        ["", "nan", "inf", "-inf", "1e300", "-1", "0", "0.5", "1", "8", "1e11", "true", "no"]
    ),
    st.sampled_from(["H100", "V100", "miner", "bank", "fixed", "balloon", "[/]", "$\\x$"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable, max_size=8),
)


@st.composite
def books(draw) -> dict[str, list[str]]:
    """The good book with a few random edits: cells, a renamed, dropped or repeated column."""
    book = {name: list(cells) for name, cells in GOOD_BOOK.items()}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(book)))
        book[name][draw(st.integers(0, 2))] = draw(CELLS)
    edit = draw(st.sampled_from(["none", "rename", "drop", "repeat", "extra"]))
    name = draw(st.sampled_from(sorted(book)))
    if edit == "rename":
        book[name[:-1] + "x"] = book.pop(name)
    elif edit == "drop":
        book.pop(name)
    elif edit == "repeat":
        book[name + " "] = list(book[name])  # the CSV reader strips it: the name twice
    elif edit == "extra":
        book[draw(st.sampled_from(COLUMNS + ["utilisation", "notes"]))] = ["0.7"] * 3
    return book


def write_csv(book: dict[str, list[str]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(book)
        writer.writerows(zip(*book.values(), strict=True))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_result_or_refusal(result) -> None:
    """Exit 0, or exit 2 with an `error:` line; never a traceback or another exception."""
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert "error" in result.output.lower(), result.output


@FUZZ
@given(book=books())
def test_validate_gives_a_result_or_a_clear_refusal(book):
    with tempfile.TemporaryDirectory() as folder:
        result = invoke("validate", str(write_csv(book, Path(folder) / "book.csv")))
    assert_result_or_refusal(result)
    if result.exit_code == 0:
        assert "nan" not in result.output.lower().replace("financ", "")


@settings(FUZZ, max_examples=4)
@given(book=books())
def test_a_small_run_gives_finite_results_or_a_clear_refusal(book):
    with tempfile.TemporaryDirectory() as folder:
        path = write_csv(book, Path(folder) / "book.csv")
        out = Path(folder) / "out"
        args = ["run", str(path), "--scenarios", "64", "--no-sensitivities", "--quiet"]
        result = invoke(*args, "--backend", "numpy", "--no-contributions", "--out", str(out))
        assert_result_or_refusal(result)
        if result.exit_code == 0:
            # NaN or Infinity anywhere in summary.json fails the parse.
            json.loads((out / "summary.json").read_text(), parse_constant=_no_constant)


def _no_constant(name: str):
    raise AssertionError(f"summary.json holds {name}")


# Values for the assumptions file: of every TOML type, plausible and not.
TOML_VALUES = st.one_of(
    st.sampled_from(["0", "0.05", "5", "-1", "1e300", "nan", "inf", "100000", "20000", "4"]),
    st.sampled_from(['"t"', '"gaussian"', '"x"', "true", "[]", "[1, 2]", "{}", '""']),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
KEY_PATHS = sorted(KEYS)


@st.composite
def assumptions_files(draw) -> str:
    """TOML text: a few known keys (generation `*` as H100 or a new name), some unknown keys,
    or plain broken text."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.text(max_size=40))  # rarely valid TOML at all
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEY_PATHS + ["simulation.horizon", "rate.volatility"]))
        key = key.replace("*", draw(st.sampled_from(["H100", "X1"])), 1)
        if key.startswith("launches."):
            continue  # an array of tables: not a dotted key
        table, _, leaf = key.rpartition(".")
        lines.append(f"[{table}]\n{leaf} = {draw(TOML_VALUES)}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(text=assumptions_files())
def test_an_assumptions_file_gives_a_result_or_a_clear_refusal(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "assumptions.toml"
        path.write_text(text, encoding="utf-8")
        result = invoke("validate", "--assumptions", str(path))
    assert_result_or_refusal(result)


# ----------------------------------------------------------- issue 20 regression cases


def _book_with(tmp_path: Path, **edits: list[str]) -> Path:
    book = {name: list(cells) for name, cells in GOOD_BOOK.items()} | edits
    return write_csv(book, tmp_path / "book.csv")


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        # Item 5: values that passed validation then crashed or exhausted memory.
        ({"balance_usd": ["1e300", "1.5e7", "8e6"]}, "column balance_usd: must be in (0, 1e11]"),
        ({"gpu_count": ["1e300", "512", "2000"]}, "column gpu_count: must be in [1, 1e7]"),
        ({"btc_units": ["0", "0", "1e300"]}, "column btc_units: must be in [0, 2.1e7]"),
        ({"other_opex_usd_per_gpu_hour": ["1e300"] * 3}, "must be in [0, 100] (USD per GPU-hour"),
        ({"contract_rate_usd_per_hour": ["1e300", "4", "0"]}, "must be in [0, 100]"),
        # Item 6: silently wrong.
        ({"gpu_count": ["0.5", "512", "2000"]}, "loan_id=L1, column gpu_count: must be a whole"),
        ({"utilisation": ["0.7"] * 3}, "column utilisation: unknown column: did you mean utiliz"),
        ({"pd_annual": ["0.03", "0.05", "0.06"]}, "loan_id=L2, column pd_annual: borrower 'B1'"),
        ({"borrower_type": ["neocloud", "miner", "miner"]}, "on loan_id=L1 (row 1) but 'miner'"),
        ({"asset_correlation": ["0.1", "0.2", "0.1"]}, "must state the same asset_correlation"),
    ],
)
def test_issue_20_book_cases_are_refused_with_exit_2(tmp_path, edits, message):
    result = invoke("validate", str(_book_with(tmp_path, **edits)))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_issue_20_duplicate_columns_are_refused_with_exit_2(tmp_path):
    """Item 9: duplicate column names raised a KeyError traceback."""
    path = tmp_path / "book.csv"
    rows = list(zip(*GOOD_BOOK.values(), GOOD_BOOK["rate"], strict=True))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([[*GOOD_BOOK, "rate"], *rows])
    result = invoke("validate", str(path))
    assert result.exit_code == 2 and "column rate: the column appears 2 times" in result.output


def test_issue_20_keeping_every_loss_of_1e12_scenarios_is_refused(tmp_path):
    """Item 5: `--scenarios 1e12 --keep-losses` (7 TiB) is refused before any work."""
    out = tmp_path / "out"
    args = ["run", str(_book_with(tmp_path)), "--scenarios", "1e12", "--keep-losses"]
    result = invoke(*args, "--backend", "numpy", "--out", str(out))
    assert result.exit_code == 2 and "--tails-only" in result.output, result.output
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("line", ["t_dof = 20000", "steps_per_year = 100000"])
def test_issue_20_sizes_in_the_assumptions_are_refused(tmp_path, line):
    path = tmp_path / "assumptions.toml"
    path.write_text(f"[simulation]\ncopula = 't'\n{line}\n")
    result = invoke("validate", "--assumptions", str(path))
    assert result.exit_code == 2 and "must be in [1, " in result.output, result.output


def test_issue_20_reverse_stress_of_an_absurd_loss_is_refused(tmp_path):
    """Item 5: `reverse-stress --loss 1e30` ended in NaN."""
    book = _book_with(tmp_path)
    result = invoke("reverse-stress", str(book), "--loss", "1e30", "--out", str(tmp_path / "o"))
    # The CLI reports a search that finds no design point as a failed run (RunFailure, exit 1).
    assert result.exit_code in (1, 2) and "out of reach" in result.output, result.output
    assert (
        "Traceback" not in result.output and not (tmp_path / "o" / "reverse_stress.json").exists()
    )
