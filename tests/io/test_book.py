"""Reading, validating and writing loan books (gpucredit.io.book)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from gpucredit.io.book import (
    BOOK_COLUMNS,
    MAX_ROWS_PER_RULE,
    BookError,
    BookProblem,
    book_to_table,
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
    ("balance_usd", 0.0, "must be > 0"),
    ("balance_usd", -5.0, "must be > 0"),
    ("gpu_count", 0, "must be > 0"),
    ("maturity_years", 0.0, "must be > 0"),
    ("pd_annual", 1.3, "must be in (0, 1), got 1.3"),
    ("pd_annual", 0.0, "must be in (0, 1)"),
    ("collateral_share", 1.2, "must be in [0, 1]"),
    ("contracted_share", -0.1, "must be in [0, 1]"),
    ("utilization", 1.5, "must be in [0, 1]"),
    ("liquidation_cost", -0.01, "must be in [0, 1]"),
    ("asset_correlation", 1.0, "must be in [0, 1)"),
    ("contract_rate_usd_per_hour", -1.0, "must be >= 0"),
    ("contract_years_remaining", -1.0, "must be >= 0"),
    ("power_kw_per_gpu", -0.5, "must be >= 0"),
    ("other_opex_usd_per_gpu_hour", -0.1, "must be >= 0"),
    ("other_income_usd_per_year", -1.0, "must be >= 0"),
    ("other_income_usd_per_year", float("inf"), "must be a finite number"),
    ("other_income_btc_share", 1.1, "must be in [0, 1]"),
    ("other_income_btc_share", -0.2, "must be in [0, 1]"),
    ("cash_usd", -1.0, "must be >= 0"),
    ("btc_units", -1.0, "must be >= 0"),
    ("eth_units", -1.0, "must be >= 0"),
    ("rate", -5.0, "must be in (-1, 1)"),
    ("rate", -1.0, "must be in (-1, 1)"),
    ("rate", 8.0, "must be in (-1, 1)"),
    ("maturity_years", 1e300, "must be <= 100"),
    ("maturity_years", 100.5, "must be <= 100"),
    ("contract_years_remaining", 1e300, "must be <= 100"),
    ("rate", float("nan"), "must be a finite number, got nan"),
    ("balance_usd", float("inf"), "must be a finite number, got inf"),
    ("pd_annual", None, "must not be null"),
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


def test_unknown_columns_are_ignored(tmp_path):
    columns = good_columns()
    columns["internal_rating"] = ["BB"] * 4
    path = write_parquet(tmp_path, columns)

    assert len(read_book(path, ASSUMPTIONS)) == 4


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


def test_a_csv_is_not_a_book(tmp_path):
    path = tmp_path / "book.parquet"  # the suffix does not matter: the bytes do
    path.write_text("loan_id,borrower_id\nL1,B1\n")
    assert "not a readable Arrow IPC or Parquet file" in str(refusal(path))


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
