"""Reading, validating and writing loan books (gpucredit.io.book): the rules, then every
source (Parquet, Arrow, CSV, Excel, pandas, pyarrow, the Arrow PyCapsule interface) giving the
same book and the same errors, loan tapes' cells coerced with one error per bad cell, and
write_book by extension."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from gpucredit.io.book import (
    BOOK_COLUMNS,
    MAX_ROWS_PER_RULE,
    BookError,
    BookFormatError,
    BookProblem,
    book_to_table,
    file_format,
    read_book,
    write_book,
)
from gpucredit.portfolio.book import REQUIRED_COLUMNS

# Stand-in for gpucredit.io.assumptions.default_assumptions(): only these two are read.
ASSUMPTIONS = SimpleNamespace(
    generations=("A100", "H100", "H200", "B200"),
    generation_power_kw_per_gpu=(0.52, 0.91, 0.91, 1.30),
)


def good_columns(n_loans: int = 4) -> dict[str, list]:
    """A valid book with every column, as Python lists (easy to break one cell)."""
    generations = ["A100", "H100", "H200", "B200"]
    return {
        "loan_id": [f"L{k:06d}" for k in range(1, n_loans + 1)],
        "borrower_id": [f"NC-{k // 2:04d}" for k in range(n_loans)],
        "borrower_type": ["neocloud", "miner", "enterprise", "other"][:1] * n_loans,
        "balance_usd": [1.0e7 + k for k in range(n_loans)],
        "rate_type": ["floating"] * n_loans,
        "rate": [0.08] * n_loans,
        "maturity_years": [4.0] * n_loans,
        "amortization": ["linear"] * n_loans,
        "gpu_generation": [generations[k % 4] for k in range(n_loans)],
        "gpu_count": [1024] * n_loans,
        "pd_annual": [0.03] * n_loans,
        "collateral_share": [1.0] * n_loans,
        "contracted_share": [0.6] * n_loans,
        "contract_rate_usd_per_hour": [2.5] * n_loans,
        "contract_years_remaining": [2.0] * n_loans,
        "utilization": [0.8] * n_loans,
        "power_kw_per_gpu": [0.9] * n_loans,
        "other_opex_usd_per_gpu_hour": [0.5] * n_loans,
        "cash_usd": [1.0e6] * n_loans,
        "btc_units": [0.0] * n_loans,
        "eth_units": [0.0] * n_loans,
        "crypto_pledged": [False] * n_loans,
        "liquidation_cost": [0.05] * n_loans,
        "asset_correlation": [0.15] * n_loans,
        "other_income_usd_per_year": [2.0e6] * n_loans,
        "other_income_btc_share": [0.8] * n_loans,
        # Offtakers (docs/spec.md §4a): one lab behind every loan but the third of each four.
        "offtaker": ["" if k % 4 == 2 else "Lab A" for k in range(n_loans)],
        "offtaker_pd_annual": [0.0 if k % 4 == 2 else 0.02 for k in range(n_loans)],
    }


def write_parquet(tmp_path, columns: dict, name: str = "book.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def refusal(path) -> BookError:
    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    return caught.value


# ----------------------------------------------------------------------------- value rules

# (column, bad value, words of the rule)
BAD_VALUES = [
    ("balance_usd", 0.0, "must be in (0, 1e11] (USD: 1e11 is $100 bn"),
    ("balance_usd", -5.0, "must be in (0, 1e11]"),
    ("gpu_count", 0, "must be in [1, 1e7] (GPUs"),
    ("maturity_years", 0.0, "must be in (0, 100] (years), got 0"),
    ("pd_annual", 1.3, "must be in (0, 1), got 1.3"),
    ("pd_annual", 0.0, "must be in (0, 1)"),
    ("collateral_share", 1.2, "must be in [0, 1]"),
    ("contracted_share", -0.1, "must be in [0, 1]"),
    ("utilization", 1.5, "must be in [0, 1]"),
    ("liquidation_cost", -0.01, "must be in [0, 1]"),
    ("asset_correlation", 1.0, "must be in [0, 1)"),
    ("contract_rate_usd_per_hour", -1.0, "must be in [0, 100] (USD per GPU-hour"),
    ("contract_years_remaining", -1.0, "must be in [0, 100] (years)"),
    ("power_kw_per_gpu", -0.5, "must be in [0, 10] (kW per GPU"),
    ("other_opex_usd_per_gpu_hour", -0.1, "must be in [0, 100] (USD per GPU-hour"),
    ("other_income_usd_per_year", -1.0, "must be in [0, 1e12] (USD a year"),
    ("other_income_usd_per_year", float("inf"), "must be a finite number"),
    ("other_income_btc_share", 1.1, "must be in [0, 1]"),
    ("other_income_btc_share", -0.2, "must be in [0, 1]"),
    ("cash_usd", -1.0, "must be in [0, 1e12] (USD"),
    ("btc_units", -1.0, "must be in [0, 2.1e7] (BTC"),
    ("eth_units", -1.0, "must be in [0, 1.5e8] (ETH"),
    ("rate", -5.0, "must be in (-1, 1)"),
    ("rate", -1.0, "must be in (-1, 1)"),
    ("rate", 8.0, "must be in (-1, 1)"),
    ("maturity_years", 1e300, "must be in (0, 100] (years), got 1e+300"),
    ("maturity_years", 100.5, "must be in (0, 100]"),
    ("contract_years_remaining", 1e300, "must be in [0, 100]"),
    # Issue 20 item 5/6: unit slips and sizes no book holds, refused with the range and why.
    ("balance_usd", 1e300, "must be in (0, 1e11] (USD: 1e11 is $100 bn, more than any GPU loan)"),
    ("gpu_count", 1e300, "must be in [1, 1e7] (GPUs: 1e7 is more than any one fleet)"),
    ("gpu_count", 0.5, "must be a whole number, got 0.5"),
    ("gpu_count", 1024.5, "must be a whole number, got 1024.5"),
    ("btc_units", 1e300, "must be in [0, 2.1e7] (BTC: 21 million is every bitcoin"),
    ("eth_units", 1e9, "must be in [0, 1.5e8] (ETH"),
    ("other_opex_usd_per_gpu_hour", 1e300, "must be in [0, 100] (USD per GPU-hour"),
    ("contract_rate_usd_per_hour", 1e300, "must be in [0, 100] (USD per GPU-hour"),
    ("contract_rate_usd_per_hour", 250.0, "must be in [0, 100] (USD per GPU-hour: a B200 rents"),
    ("power_kw_per_gpu", 910.0, "must be in [0, 10] (kW per GPU"),
    ("cash_usd", 1e300, "must be in [0, 1e12]"),
    ("other_income_usd_per_year", 1e13, "must be in [0, 1e12]"),
    ("rate", float("nan"), "must be a finite number, got nan"),
    ("balance_usd", float("inf"), "must be a finite number, got inf"),
    ("pd_annual", None, "must not be null"),
    ("offtaker_pd_annual", 1.0, "must be in [0, 1) (an annual probability of default"),
    ("offtaker_pd_annual", -0.1, "must be in [0, 1)"),
    ("offtaker_pd_annual", None, "required where offtaker names one (offtaker 'Lab A' has no PD)"),
    ("crypto_pledged", None, "must not be null"),
    ("borrower_type", None, "must not be null"),
    ("rate_type", "flaoting", "must be one of fixed, floating, got 'flaoting'"),
    ("amortization", "balloon", "must be one of bullet, linear, annuity"),
    ("borrower_type", "bank", "must be one of neocloud, miner, enterprise, other"),
    (
        "gpu_generation",
        "V100",
        "must be one of the assumptions' generations (A100, H100, H200, B200), got 'V100'",
    ),
]


@pytest.mark.parametrize(("column", "bad", "rule"), BAD_VALUES)
def test_bad_value_is_refused_with_file_loan_column_and_rule(tmp_path, column, bad, rule):
    columns = good_columns()
    columns[column][1] = bad
    columns[column][3] = bad
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    message = str(error)
    assert f"{path}: loan_id=L000002, column {column}: {rule}" in message
    assert f"{path}: loan_id=L000004, column {column}: {rule}" in message
    assert len(error.problems) == 2  # both rows, each named once
    assert {p.loan_id for p in error.problems} == {"L000002", "L000004"}
    assert {p.column for p in error.problems} == {column}


def test_rate_rule_says_it_is_a_fraction(tmp_path):
    columns = good_columns()
    columns["rate"][1] = 8.0  # 8% written as 8
    error = refusal(write_parquet(tmp_path, columns))
    assert len(error.problems) == 1
    assert "a yearly rate or spread as a fraction" in error.problems[0].rule
    assert error.problems[0].rule.endswith("got 8")


def test_edge_values_of_rate_and_years_are_accepted(tmp_path):
    """Negative spreads, a rate of 0, and 100-year maturities and contracts are allowed."""
    columns = good_columns()
    columns["rate"] = [-0.99, 0.0, -0.02, 0.99]
    columns["amortization"] = ["annuity", "annuity", "bullet", "linear"]
    columns["rate_type"] = ["fixed", "fixed", "floating", "fixed"]
    columns["maturity_years"] = [100.0, 0.25, 30.0, 4.0]
    columns["contract_years_remaining"] = [100.0, 0.0, 2.0, 2.0]

    book = read_book(write_parquet(tmp_path, columns), ASSUMPTIONS)

    np.testing.assert_array_equal(book.rate, columns["rate"])
    assert book.maturity_years.max() == 100.0


def test_bad_rate_and_years_are_listed_with_the_other_problems(tmp_path):
    """The new rules add to the assumptions-dependent ones (generation) and the rest."""
    columns = good_columns()
    columns["rate"][0] = -5.0
    columns["maturity_years"][1] = 1e300
    columns["contract_years_remaining"][2] = 250.0
    columns["gpu_generation"][3] = "V100"
    error = refusal(write_parquet(tmp_path, columns))
    found = {(p.loan_id, p.column) for p in error.problems}
    assert found == {
        ("L000001", "rate"),
        ("L000002", "maturity_years"),
        ("L000003", "contract_years_remaining"),
        ("L000004", "gpu_generation"),
    }


@pytest.mark.parametrize("column", ["loan_id", "borrower_id"])
def test_empty_id_is_refused_with_its_row(tmp_path, column):
    columns = good_columns()
    columns[column][2] = ""
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    assert len(error.problems) == 1
    problem = error.problems[0]
    assert (problem.column, problem.rule, problem.row) == (column, "must not be empty", 3)
    if column == "borrower_id":
        assert problem.loan_id == "L000003"
    assert f"column {column}: must not be empty" in str(error)


def test_duplicate_loan_ids_are_each_named(tmp_path):
    columns = good_columns(6)
    columns["loan_id"][3] = "L000001"
    columns["loan_id"][5] = "L000002"
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    message = str(error)
    assert f"{path}: loan_id=L000001, column loan_id: duplicate loan_id" in message
    assert "appears 2 times (rows 1, 4)" in message
    assert f"{path}: loan_id=L000002, column loan_id: duplicate loan_id" in message
    assert len(error.problems) == 2


def test_every_problem_is_listed_at_once(tmp_path):
    columns = good_columns()
    columns["pd_annual"][0] = 1.3
    columns["balance_usd"][1] = -1.0
    columns["rate_type"][2] = "variable"
    columns["gpu_generation"][3] = "V100"
    columns["loan_id"][3] = "L000001"
    del columns["gpu_count"]
    columns["utilization"] = [str(u) for u in columns["utilization"]]
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    lines = str(error).splitlines()
    assert len(lines) == len(error.problems) == 7
    found = {(p.loan_id, p.column) for p in error.problems}
    assert found == {
        ("L000001", "pd_annual"),
        ("L000002", "balance_usd"),
        ("L000003", "rate_type"),
        ("L000001", "gpu_generation"),  # row 4 now carries the duplicated id
        ("L000001", "loan_id"),
        (None, "gpu_count"),
        (None, "utilization"),
    }


def test_a_bad_million_row_column_lists_20_rows_and_counts_the_rest(tmp_path):
    n_loans = 1000
    columns = good_columns(n_loans)
    columns["pd_annual"] = [1.5] * n_loans
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    assert len(error.problems) == MAX_ROWS_PER_RULE + 1
    assert str(error.problems[-1]) == (
        f"{path}: column pd_annual: must be in (0, 1): and {n_loans - MAX_ROWS_PER_RULE} more rows"
    )


# ----------------------------------------------------------------------------- schema rules


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_missing_required_column(tmp_path, column):
    columns = good_columns()
    del columns[column]
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    assert f"{path}: column {column}: required column is missing" in str(error).splitlines()


@pytest.mark.parametrize(
    ("column", "values", "rule"),
    [
        (
            "gpu_count",
            pa.array(["1024"] * 4),
            "must be of integer or floating-point type, got string",
        ),
        (
            "balance_usd",
            pa.array([True] * 4),
            "must be of integer or floating-point type, got bool",
        ),
        ("loan_id", pa.array([1, 2, 3, 4]), "must be of string type, got int64"),
        ("crypto_pledged", pa.array([0, 1, 0, 1]), "must be of boolean type, got int64"),
    ],
)
def test_wrong_type_is_refused(tmp_path, column, values, rule):
    columns = good_columns()
    columns[column] = values
    path = write_parquet(tmp_path, columns)

    error = refusal(path)

    assert f"{path}: column {column}: {rule}" in str(error)


def test_accepted_types_strings_dictionary_and_integers(tmp_path):
    columns = good_columns()
    columns["loan_id"] = pa.array(columns["loan_id"], type=pa.large_string())
    columns["borrower_type"] = pa.array(columns["borrower_type"]).dictionary_encode()
    columns["gpu_count"] = pa.array(columns["gpu_count"], type=pa.int32())
    columns["cash_usd"] = pa.array(columns["cash_usd"], type=pa.float32())
    path = write_parquet(tmp_path, columns)

    book = read_book(path, ASSUMPTIONS)

    assert book.loan_id.tolist() == good_columns()["loan_id"]
    assert book.borrower_type.dtype == object and book.borrower_type[0] == "neocloud"
    assert book.gpu_count.dtype == np.float64 and book.gpu_count[0] == 1024.0


def test_unknown_columns_are_refused_with_the_nearest_name(tmp_path):
    """Issue 20 item 6: a misspelled optional column (`utilisation`) was ignored and its
    default used; now every unknown column is refused, with the nearest known name."""
    columns = good_columns()
    columns["utilisation"] = columns.pop("utilization")
    columns["Balance_USD"] = columns["balance_usd"]
    columns["internal_rating"] = ["BB"] * 4
    path = write_parquet(tmp_path, columns)

    message = str(refusal(path))

    assert f"{path}: column utilisation: unknown column: did you mean utilization?" in message
    assert "column Balance_USD: unknown column: did you mean balance_usd?" in message
    assert "column internal_rating: unknown column: remove or rename it" in message
    assert len(refusal(path).problems) == 3


# ----------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.parquet"
    error = refusal(path)
    assert error.problems == [BookProblem(str(path), None, None, "no such file")]
    assert str(error) == f"{path}: no such file"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "book.parquet"
    path.write_bytes(b"")
    assert "the file is empty" in str(refusal(path))


def test_file_with_no_rows(tmp_path):
    path = tmp_path / "book.arrow"
    write_book(pa.table(good_columns()).slice(0, 0), path)
    assert str(refusal(path)) == f"{path}: the book has no rows"


def test_text_is_read_as_csv_whatever_the_suffix(tmp_path):
    """The bytes tell the format: text is a CSV loan tape, never "not a readable Arrow IPC or
    Parquet file"; this one lacks most columns, and says so."""
    path = tmp_path / "book.parquet"
    path.write_text("loan_id,borrower_id\nL1,B1\n")
    error = refusal(path)
    assert "Arrow" not in str(error) and "Parquet" not in str(error)
    assert f"{path}: column balance_usd: required column is missing" in str(error).splitlines()


def test_binary_junk_names_every_readable_format(tmp_path):
    path = tmp_path / "book.bin"
    path.write_bytes(b"\x00\x01\x02junk" * 10)
    error = refusal(path)
    assert len(error.problems) == 1
    assert "Parquet, Arrow IPC/Feather, CSV (UTF-8 text) or Excel .xlsx" in str(error)


def test_a_utf16_csv_is_refused_clearly(tmp_path):
    path = tmp_path / "book.csv"
    path.write_text("loan_id,borrower_id\nL1,B1\n", encoding="utf-16")
    assert str(refusal(path)) == f"{path}: UTF-16 text: save the CSV as UTF-8"


def test_a_legacy_xls_file_is_refused_clearly(tmp_path):
    path = tmp_path / "book.xls"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100)
    assert str(refusal(path)) == f"{path}: an Excel 97-2003 .xls file: save it as .xlsx or CSV"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PAR1\x15\x04", "parquet"),
        (b"ARROW1\x00\x00", "arrow file"),
        (b"\xff\xff\xff\xff\x10\x01\x00\x00", "arrow stream"),
        (b"PK\x03\x04\x14\x00", "excel"),
        (b"\xef\xbb\xbfloan_id;rate\r\n", "csv"),
        (b"loan_id,borrower_id\n", "csv"),
        (b"\xff\xfel\x00o\x00", "utf-16"),
    ],
)
def test_file_format_is_told_by_the_first_bytes(head, kind):
    assert file_format(head) == kind


def test_a_truncated_parquet_file(tmp_path):
    path = write_parquet(tmp_path, good_columns())
    path.write_bytes(path.read_bytes()[:200])
    error = refusal(path)
    assert len(error.problems) == 1 and error.problems[0].loan_id is None


# ----------------------------------------------------------------------------- round trips


def _write_ipc_stream(table, path):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)


WRITERS = {
    "parquet": lambda table, path: write_book(table, path),
    "arrow": lambda table, path: write_book(table, path),
    "feather": lambda table, path: feather.write_feather(table, path),  # v2, lz4-compressed
    "stream": _write_ipc_stream,
}


@pytest.mark.parametrize("suffix", WRITERS)
def test_round_trip(tmp_path, suffix):
    table = pa.table(good_columns(10))
    path = tmp_path / f"book.{suffix}"
    WRITERS[suffix](table, path)

    book = read_book(path, ASSUMPTIONS)

    assert book.source == str(path)
    assert book_to_table(book).equals(book_to_table(read_book(path, ASSUMPTIONS)))
    for name in BOOK_COLUMNS:
        expected = table.column(name).to_pylist()
        assert getattr(book, name).tolist() == expected, name


def test_write_book_of_a_book_round_trips(tmp_path):
    book = read_book(write_parquet(tmp_path, good_columns(7)), ASSUMPTIONS)
    path = write_book(book, tmp_path / "copy.feather")

    again = read_book(path, ASSUMPTIONS)

    assert book_to_table(again).equals(book_to_table(book))
    assert list(book_to_table(book).column_names) == list(BOOK_COLUMNS)


def test_write_book_leaves_no_temporary_file(tmp_path):
    write_book(pa.table(good_columns()), tmp_path / "book.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["book.parquet"]
    assert pq.ParquetFile(tmp_path / "book.parquet").metadata.num_rows == 4


def test_many_batches_are_concatenated_in_order(tmp_path):
    n_loans = 5000
    table = pa.table(good_columns(n_loans))
    path = tmp_path / "book.parquet"
    pq.write_table(table, path, row_group_size=777)

    book = read_book(path, ASSUMPTIONS)

    assert book.loan_id.tolist() == table.column("loan_id").to_pylist()
    assert book.balance_usd.tolist() == table.column("balance_usd").to_pylist()


def test_optional_columns_take_their_defaults(tmp_path):
    columns = {name: good_columns()[name] for name in REQUIRED_COLUMNS}
    path = write_parquet(tmp_path, columns)

    book = read_book(path, ASSUMPTIONS)

    # The generation's facility draw: A100, H100, H200, B200 in good_columns' order.
    np.testing.assert_array_equal(book.power_kw_per_gpu, [0.52, 0.91, 0.91, 1.30])
    np.testing.assert_array_equal(book.collateral_share, 1.0)
    np.testing.assert_array_equal(book.utilization, 0.70)
    np.testing.assert_array_equal(book.liquidation_cost, 0.05)
    np.testing.assert_array_equal(book.asset_correlation, 0.15)
    for name in ("contracted_share", "contract_rate_usd_per_hour", "cash_usd", "btc_units"):
        np.testing.assert_array_equal(getattr(book, name), 0.0)
    assert book.crypto_pledged.dtype == bool and not book.crypto_pledged.any()


# ----------------------------------------------------------------------------- sources


class ArrowStreamFrame:
    """A frame that speaks only the Arrow PyCapsule stream interface (as polars does)."""

    def __init__(self, table: pa.Table):
        self._table = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self._table.__arrow_c_stream__(requested_schema)


def _file(suffix):
    def make(columns, tmp_path):
        path = tmp_path / f"book{suffix}"
        write_book(pa.table(columns), path)
        return path, str(path)

    return make


SOURCES = {
    "parquet": _file(".parquet"),
    "arrow": _file(".arrow"),
    "csv": _file(".csv"),
    "xlsx": _file(".xlsx"),
    "pandas": lambda columns, _: (pd.DataFrame(columns), "<pandas.DataFrame>"),
    "pyarrow": lambda columns, _: (pa.table(columns), "<pyarrow.Table>"),
    "capsule": lambda columns, _: (
        ArrowStreamFrame(pa.table(columns)),
        f"<{ArrowStreamFrame.__module__.split('.')[0]}.ArrowStreamFrame>",
    ),
    "mapping": lambda columns, _: (columns, "<builtins.dict>"),
}


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_reads_the_same_book(tmp_path, source):
    columns = good_columns(10)
    reference = book_to_table(read_book(pa.table(columns), ASSUMPTIONS))
    book_source, name = SOURCES[source](columns, tmp_path)

    book = read_book(book_source, ASSUMPTIONS)

    assert book.source == name
    assert book_to_table(book).equals(reference)


# (column, bad value, the rule every source states). CSV cannot tell a null string from an
# empty one and Excel cannot hold NaN or infinity, so those cases skip them; to pandas NaN
# is a missing value.
SAME_ERRORS = [
    ("pd_annual", 1.3, "must be in (0, 1), got 1.3"),
    ("balance_usd", -5.0, "must be in (0, 1e11] (USD: 1e11 is $100 bn, more than any GPU"),
    ("rate", 8.0, "must be in (-1, 1) (a yearly rate or spread as a fraction"),
    ("maturity_years", 100.5, "must be in (0, 100] (years), got 100.5"),
    ("gpu_count", 0.5, "must be a whole number, got 0.5"),
    ("utilization", 1.5, "must be in [0, 1], got 1.5"),
    ("rate_type", "flaoting", "must be one of fixed, floating, got 'flaoting'"),
    ("gpu_generation", "V100", "must be one of the assumptions' generations"),
    ("pd_annual", None, "must not be null"),
    ("crypto_pledged", None, "must not be null"),
    ("borrower_type", None, "must not be null"),
    ("balance_usd", float("inf"), "must be a finite number, got inf"),
    ("rate", float("nan"), "must be a finite number, got nan"),
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("column", "bad", "rule"), SAME_ERRORS)
def test_every_source_states_the_same_errors(tmp_path, source, column, bad, rule):
    if source == "csv" and bad is None and column == "borrower_type":
        pytest.skip("CSV: an empty string cell is '', not null")
    if source == "xlsx" and isinstance(bad, float) and not np.isfinite(bad):
        pytest.skip("Excel holds no NaN or infinity")
    if source == "pandas" and isinstance(bad, float) and np.isnan(bad):
        rule = "must not be null"  # pandas' NaN is its missing value
    columns = good_columns()
    columns[column][1] = bad
    columns[column][3] = bad
    book_source, name = SOURCES[source](columns, tmp_path)

    with pytest.raises(BookError) as caught:
        read_book(book_source, ASSUMPTIONS)

    lines = str(caught.value).splitlines()
    assert len(lines) == 2, lines
    for line, loan_id in zip(lines, ("L000002", "L000004"), strict=True):
        assert line.startswith(f"{name}: loan_id={loan_id}, column {column}: {rule}"), line


# ----------------------------------------------------------------------------- CSV tapes


def test_csv_bad_cells_are_each_named_with_their_value_and_type(tmp_path):
    path = tmp_path / "tape.csv"
    write_book(pa.table(good_columns()), path)
    text = path.read_text().splitlines()
    header = text[0].replace('"', "").split(",")
    rows = [line.split(",") for line in text[1:]]
    rows[1][header.index("balance_usd")] = "12,5O0"  # a letter O, quoted below
    rows[2][header.index("gpu_count")] = "many"
    rows[3][header.index("crypto_pledged")] = "maybe"
    rows[3][header.index("cash_usd")] = ""  # empty: a null
    lines = [",".join(header)] + [
        ",".join(f'"{c}"' if "," in c else c for c in row) for row in rows
    ]
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)

    assert str(caught.value).splitlines() == [
        f"{path}: loan_id=L000002, column balance_usd: must be a number (USD), got '12,5O0'",
        f"{path}: loan_id=L000003, column gpu_count: must be a number (GPUs), got 'many'",
        f"{path}: loan_id=L000004, column crypto_pledged: must be true or false, got 'maybe'",
        f"{path}: loan_id=L000004, column cash_usd: must not be null",
    ]


def test_csv_with_semicolons_a_bom_spaces_and_yes_no_booleans(tmp_path):
    """What a spreadsheet exports: UTF-8 BOM, `;` delimiter, padded numbers, yes/no, CRLF."""
    columns = good_columns(3)
    header = ";".join(columns)
    rows = []
    for k in range(3):
        cells = []
        for name in columns:
            value = columns[name][k]
            if isinstance(value, bool):
                cells.append("yes" if value else "No")
            elif isinstance(value, float | int):
                cells.append(f" {value} ")
            else:
                cells.append(value)
        rows.append(";".join(cells))
    path = tmp_path / "export.csv"
    path.write_bytes(("\ufeff" + "\r\n".join([header, *rows]) + "\r\n").encode("utf-8"))

    book = read_book(path, ASSUMPTIONS)

    assert book.loan_id.tolist() == columns["loan_id"]
    assert book.balance_usd.tolist() == columns["balance_usd"]
    assert not book.crypto_pledged.any()


def test_csv_header_names_are_read_without_padding(tmp_path):
    path = tmp_path / "padded.csv"
    write_book(pa.table(good_columns()), path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace('"gpu_count"', '" gpu_count "'), *lines[1:]]))
    assert read_book(path, ASSUMPTIONS).gpu_count.tolist() == [1024.0] * 4


def test_a_ragged_csv_is_refused_as_a_csv(tmp_path):
    path = tmp_path / "book.csv"
    path.write_text("loan_id,borrower_id\nL1,B1\nL2\n")
    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable CSV file (")
    assert "Arrow IPC or Parquet" not in message


def test_a_repeated_column_is_refused(tmp_path):
    path = tmp_path / "book.csv"
    write_book(pa.table(good_columns()), path)
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join([lines[0] + ',"pd_annual"'] + [line + ",0.5" for line in lines[1:]]) + "\n"
    )
    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    assert str(caught.value) == (f"{path}: column pd_annual: the column appears 2 times; keep one")


def test_many_bad_cells_are_counted_past_20(tmp_path):
    columns = good_columns(30)
    columns["gpu_count"] = ["x"] * 30
    path = tmp_path / "tape.csv"
    write_book(pa.table(columns), path)
    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    problems = caught.value.problems
    assert len(problems) == 21
    assert str(problems[-1]).endswith(
        "column gpu_count: cannot be read as its type: and 10 more rows"
    )


# ----------------------------------------------------------------------------- Excel tapes


def test_excel_cells_are_coerced_and_bad_ones_named(tmp_path):
    import openpyxl

    columns = good_columns()
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(list(columns))
    for k in range(4):
        sheet.append([columns[name][k] for name in columns])
    loan_id, gpus, pledged = (
        list(columns).index(c) + 1 for c in ("loan_id", "gpu_count", "crypto_pledged")
    )
    sheet.cell(row=2, column=loan_id).value = 1001  # an id typed as a number
    sheet.cell(row=3, column=gpus).value = "n/a"
    sheet.cell(row=4, column=pledged).value = 1  # 1/0 for a boolean
    path = tmp_path / "tape.xlsx"
    workbook.save(path)

    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    assert str(caught.value) == (
        f"{path}: loan_id=L000002, column gpu_count: must be a number (GPUs), got 'n/a'"
    )

    sheet.cell(row=3, column=gpus).value = 512
    workbook.save(path)
    book = read_book(path, ASSUMPTIONS)
    assert book.loan_id[0] == "1001" and book.gpu_count[1] == 512.0
    assert book.crypto_pledged.tolist() == [False, False, True, False]


def test_excel_without_openpyxl_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "book.xlsx"
    write_book(pa.table(good_columns()), path)
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import openpyxl raises ImportError

    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)

    assert "pip install 'gpucredit[excel]'" in str(caught.value)
    assert "openpyxl" in str(caught.value)


def test_a_damaged_xlsx_is_refused_as_excel(tmp_path):
    path = tmp_path / "book.xlsx"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(BookError) as caught:
        read_book(path, ASSUMPTIONS)
    assert "not a readable Excel .xlsx file" in str(caught.value)


# ----------------------------------------------------------------------------- DataFrames


def test_pandas_object_columns_are_coerced_cell_by_cell():
    """A frame from a messy spreadsheet: mixed objects in a number column, integer ids."""
    columns = good_columns()
    frame = pd.DataFrame(columns)
    frame["balance_usd"] = pd.Series([1e7, "2e7", "lots", 3e7], dtype=object)
    frame["loan_id"] = [11, 12, 13, 14]

    with pytest.raises(BookError) as caught:
        read_book(frame, ASSUMPTIONS)

    assert str(caught.value) == (
        "<pandas.DataFrame>: loan_id=13, column balance_usd: must be a number (USD), got 'lots'"
    )
    frame.loc[2, "balance_usd"] = 4e7
    book = read_book(frame, ASSUMPTIONS)
    assert book.balance_usd.tolist() == [1e7, 2e7, 4e7, 3e7]
    assert book.loan_id.tolist() == ["11", "12", "13", "14"]


def test_pandas_index_is_ignored_and_unknown_columns_refused(tmp_path):
    frame = pd.DataFrame(good_columns()).set_index("loan_id", drop=False)
    assert len(read_book(frame, ASSUMPTIONS)) == 4
    # The index pandas stores in a Parquet file (__index_level_0__) is not the user's data.
    path = tmp_path / "indexed.parquet"
    pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True).iloc[[3, 1, 2, 0]]), path)
    assert "__index_level_0__" in pq.read_schema(path).names
    assert len(read_book(path, ASSUMPTIONS)) == 4
    frame["internal_rating"] = ["BB", None, 3, 4.5]  # unconvertible, and not ours
    with pytest.raises(BookError, match="column internal_rating: unknown column"):
        read_book(frame, ASSUMPTIONS)


@pytest.mark.parametrize("source", ["pandas", "csv", "xlsx"])
def test_a_column_named_twice_is_refused_from_every_source(tmp_path, source):
    """Issue 20 item 9: a DataFrame with a repeated column name raised a KeyError traceback."""
    columns = good_columns()
    frame = pd.DataFrame(columns)
    frame = pd.concat([frame, frame[["utilization"]].rename(columns={"utilization": "x"})], axis=1)
    frame.columns = [*columns, "utilization"]
    if source == "csv":
        frame.to_csv(tmp_path / "book.csv", index=False)
        book_source = tmp_path / "book.csv"
    elif source == "xlsx":
        pytest.importorskip("openpyxl")
        frame.to_excel(tmp_path / "book.xlsx", index=False)
        book_source = tmp_path / "book.xlsx"
    else:
        book_source = frame
    with pytest.raises(BookError) as caught:
        read_book(book_source, ASSUMPTIONS)
    assert caught.value.problems[-1].rule == "the column appears 2 times; keep one"
    assert [p.column for p in caught.value.problems] == ["utilization"]


@pytest.mark.parametrize(
    ("column", "other"),
    [("borrower_type", "miner"), ("pd_annual", 0.05), ("asset_correlation", 0.3)],
)
def test_a_borrower_stating_two_types_pds_or_correlations_is_refused(tmp_path, column, other):
    """Issue 20 item 6: one borrower_id with different types, PDs or correlations was accepted;
    the loan that differs is named with the borrower's first loan."""
    columns = good_columns()  # borrowers NC-0000 (rows 1-2) and NC-0001 (rows 3-4)
    columns[column][3] = other
    error = refusal(write_parquet(tmp_path, columns))
    first = _format(good_columns()[column][2])
    assert str(error).endswith(
        f"loan_id=L000004, column {column}: borrower 'NC-0001' has {column} {first} on "
        f"loan_id=L000003 (row 3) but {_format(other)} here: every loan of a borrower must "
        f"state the same {column}"
    )
    assert len(error.problems) == 1


def _format(value) -> str:
    return repr(value) if isinstance(value, str) else format(value, ".10g")


def test_a_misspelled_column_in_a_loan_tape_is_refused(tmp_path):
    columns = good_columns()
    columns["utilisation"] = columns.pop("utilization")
    path = tmp_path / "book.csv"
    pd.DataFrame(columns).to_csv(path, index=False)
    assert "column utilisation: unknown column: did you mean utilization?" in str(refusal(path))
    pytest.importorskip("openpyxl")
    path = tmp_path / "book.xlsx"
    pd.DataFrame(columns).to_excel(path, index=False)
    assert "column utilisation: unknown column: did you mean utilization?" in str(refusal(path))


def test_a_frame_missing_columns_is_refused_like_a_file():
    frame = pd.DataFrame({"loan_id": ["L1"], "notes": ["x"]})
    with pytest.raises(BookError) as caught:
        read_book(frame, ASSUMPTIONS)
    assert "<pandas.DataFrame>: column balance_usd: required column is missing" in str(caught.value)


def test_record_batches_and_readers_are_tables():
    table = pa.table(good_columns())
    assert len(read_book(table.to_batches()[0], ASSUMPTIONS)) == 4
    assert len(read_book(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))) == 4


def test_an_unknown_source_is_a_type_error():
    with pytest.raises(TypeError, match="read_book takes a path"):
        read_book(42, ASSUMPTIONS)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".feather", ".ipc", ".csv", ".xlsx"])
def test_write_book_writes_the_format_its_extension_names(tmp_path, suffix):
    table = pa.table(good_columns(5))
    path = write_book(table, tmp_path / f"book{suffix}")
    magic = path.read_bytes()[:6]
    expected = {".parquet": b"PAR1", ".csv": b'"loan_', ".xlsx": b"PK\x03\x04"}
    assert magic.startswith(expected.get(suffix, b"ARROW1"))
    book = read_book(path, ASSUMPTIONS)
    for name in BOOK_COLUMNS:
        assert getattr(book, name).tolist() == table.column(name).to_pylist(), name


@pytest.mark.parametrize("name", ["book.txt", "book", "book.json"])
def test_write_book_refuses_an_unknown_extension(tmp_path, name):
    with pytest.raises(BookFormatError, match="use one of .parquet, .arrow, .feather"):
        write_book(pa.table(good_columns()), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_mapping_with_columns_of_different_lengths_is_refused():
    with pytest.raises(BookError, match="these have fewer: borrower_id \\(1\\)"):
        read_book({"loan_id": ["a", "b"], "borrower_id": ["x"]}, ASSUMPTIONS)


# ----------------------------------------------------------------------------- offtakers


def test_offtakers_are_indexed_by_first_appearance_and_none_is_minus_one(tmp_path):
    """docs/spec.md §4a: offtaker j = 0-based order of first appearance; null or "" = none."""
    columns = good_columns(5)
    columns["offtaker"] = ["Lab B", None, "Lab A", "Lab B", ""]
    columns["offtaker_pd_annual"] = [0.03, None, 0.0, 0.03, 0.5]
    book = read_book(write_parquet(tmp_path, columns), ASSUMPTIONS)
    index, names, pds = book.offtaker_index()
    assert index.tolist() == [0, -1, 1, 0, -1]
    assert names == ("Lab B", "Lab A")
    assert pds.tolist() == [0.03, 0.0]
    assert book.offtaker.tolist() == ["Lab B", "", "Lab A", "Lab B", ""]
    assert book.offtaker_pd_annual.tolist() == [0.03, 0.0, 0.0, 0.03, 0.5]


def test_a_book_without_offtaker_columns_has_none(tmp_path):
    columns = good_columns()
    del columns["offtaker"], columns["offtaker_pd_annual"]
    index, names, pds = read_book(write_parquet(tmp_path, columns), ASSUMPTIONS).offtaker_index()
    assert index.tolist() == [-1] * 4 and names == () and pds.shape == (0,)


def test_an_offtaker_named_without_a_pd_column_is_refused(tmp_path):
    columns = good_columns()
    del columns["offtaker_pd_annual"]
    error = refusal(write_parquet(tmp_path, columns))
    assert [str(p).split(": ", 1)[1] for p in error.problems] == [
        "loan_id=L000001, column offtaker_pd_annual: required where offtaker names one "
        "(offtaker 'Lab A' has no PD)",
        "loan_id=L000002, column offtaker_pd_annual: required where offtaker names one "
        "(offtaker 'Lab A' has no PD)",
        "loan_id=L000004, column offtaker_pd_annual: required where offtaker names one "
        "(offtaker 'Lab A' has no PD)",
    ]


def test_an_offtaker_stating_two_pds_is_refused(tmp_path):
    columns = good_columns()
    columns["offtaker_pd_annual"][1] = 0.05
    error = refusal(write_parquet(tmp_path, columns))
    assert str(error).endswith(
        "loan_id=L000002, column offtaker_pd_annual: offtaker 'Lab A' has offtaker_pd_annual "
        "0.02 on loan_id=L000001 (row 1) but 0.05 here: every loan of an offtaker must state "
        "the same offtaker_pd_annual"
    )
    assert len(error.problems) == 1


def test_offtakers_from_a_csv_tape_with_empty_cells(tmp_path):
    columns = good_columns()
    columns["offtaker_pd_annual"] = [0.02, 0.02, None, 0.02]
    path = tmp_path / "book.csv"
    pd.DataFrame(columns).to_csv(path, index=False)
    book = read_book(path, ASSUMPTIONS)
    assert book.offtaker.tolist() == ["Lab A", "Lab A", "", "Lab A"]
    assert book.offtaker_pd_annual.tolist() == [0.02, 0.02, 0.0, 0.02]
