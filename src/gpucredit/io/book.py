"""Read, validate and write loan books (docs/spec.md "Interfaces", docs/spec.md §3 and §9).

A book is an Arrow IPC file (Feather v2), an Arrow IPC stream or a Parquet file; the format
is told by the file's first bytes, not its suffix. Bad input is refused before any simulation
with a `BookError` that lists every problem found (file, loan_id, column, rule), so the user
can fix the file in one pass.
"""

from __future__ import annotations

import importlib.resources
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpucredit.io.files import write_atomically
from gpucredit.portfolio.book import (
    AMORTIZATIONS,
    BORROWER_TYPES,
    OPTIONAL_DEFAULTS,
    RATE_TYPES,
    REQUIRED_COLUMNS,
    Book,
)

# Every column the model uses, in docs/spec.md's order.
BOOK_COLUMNS = REQUIRED_COLUMNS + tuple(OPTIONAL_DEFAULTS)
STRING_COLUMNS = (
    "loan_id",
    "borrower_id",
    "borrower_type",
    "rate_type",
    "amortization",
    "gpu_generation",
)
BOOL_COLUMNS = ("crypto_pledged",)
NUMERIC_COLUMNS = tuple(c for c in BOOK_COLUMNS if c not in STRING_COLUMNS + BOOL_COLUMNS)

MAX_ROWS_PER_RULE = 20  # listed rows per (column, rule); the rest are counted
BATCH_ROWS = 65_536  # rows per record batch when reading Parquet

# The longest maturity or contract a book may state, in years. docs/spec.md and docs/spec.md give
# no bound; without one a value like 1e300 overflows the schedule's whole-period count.
MAX_YEARS = 100

# Value rules of the numeric columns: (columns, test that is True for a *good* value, rule).
_RANGE_RULES = (
    (("balance_usd", "gpu_count", "maturity_years"), lambda x: x > 0, "must be > 0"),
    # A fixed rate or a floating spread (docs/spec.md §3), as a fraction per year. Bounded to
    # catch percentages (8 for 8%) and so that a fixed-rate annuity's 1 + q stays > 0
    # (q = rate x period length; rate <= -1 made its schedule NaN).
    (
        ("rate",),
        lambda x: (x > -1) & (x < 1),
        "must be in (-1, 1) (a yearly rate or spread as a fraction, e.g. 0.08 for 8%)",
    ),
    (
        ("maturity_years", "contract_years_remaining"),
        lambda x: x <= MAX_YEARS,
        f"must be <= {MAX_YEARS} (years)",
    ),
    (("pd_annual",), lambda x: (x > 0) & (x < 1), "must be in (0, 1)"),
    (
        (
            "collateral_share",
            "contracted_share",
            "utilization",
            "liquidation_cost",
            "other_income_btc_share",
        ),
        lambda x: (x >= 0) & (x <= 1),
        "must be in [0, 1]",
    ),
    (("asset_correlation",), lambda x: (x >= 0) & (x < 1), "must be in [0, 1)"),
    (
        (
            "contract_rate_usd_per_hour",
            "contract_years_remaining",
            "power_kw_per_gpu",
            "other_opex_usd_per_gpu_hour",
            "cash_usd",
            "btc_units",
            "eth_units",
            "other_income_usd_per_year",
        ),
        lambda x: x >= 0,
        "must be >= 0",
    ),
)
_ENUM_RULES = {
    "borrower_type": BORROWER_TYPES,
    "rate_type": RATE_TYPES,
    "amortization": AMORTIZATIONS,
}


@dataclass(frozen=True)
class BookProblem:
    """One broken rule. `row` (1-based, file order) locates rows that have no usable loan_id."""

    file: str
    loan_id: str | None
    column: str | None
    rule: str
    row: int | None = None

    def __str__(self) -> str:
        where = []
        if self.loan_id is not None:
            where.append(f"loan_id={self.loan_id}")
        elif self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        location = ", ".join(where) + ": " if where else ""
        return f"{self.file}: {location}{self.rule}"


class BookError(Exception):
    """The book was refused; `problems` lists every problem found, `str()` one per line."""

    def __init__(self, problems: list[BookProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def example_book_path() -> Path:
    """The embedded example book (2,000 synthetic loans, seed 2026)."""
    return Path(str(importlib.resources.files("gpucredit") / "data" / "example_book.parquet"))


# ----------------------------------------------------------------------------- reading


def read_book(path: str | os.PathLike, assumptions=None) -> Book:
    """Read and validate a book; raise `BookError` listing every problem.

    `assumptions` supplies `.generations` (the allowed `gpu_generation` names) and
    `.generation_power_kw_per_gpu` (the default of `power_kw_per_gpu`); None means the
    embedded defaults.
    """
    if assumptions is None:
        from gpucredit.io.assumptions import default_assumptions  # lazy: optional dependency

        assumptions = default_assumptions()
    file = str(path)
    problems: list[BookProblem] = []

    def refuse(rule: str) -> BookError:
        return BookError([BookProblem(file, None, None, rule)])

    source = Path(path)
    if not source.exists():
        raise refuse("no such file")
    if not source.is_file():
        raise refuse("not a file")
    try:
        with open(source, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror or e})") from None
    if len(magic) == 0:
        raise refuse("the file is empty (0 bytes); expected an Arrow IPC or Parquet file")

    try:
        schema, batches = _open_batches(source, magic)
    except (pa.ArrowException, OSError) as e:
        raise refuse(f"not a readable Arrow IPC or Parquet file ({e})") from None

    # Schema: which used columns are present with a usable type.
    present = set(schema.names)
    for name in REQUIRED_COLUMNS:
        if name not in present:
            problems.append(BookProblem(file, None, name, "required column is missing"))
    usable = []
    for name in BOOK_COLUMNS:
        if name not in present:
            continue
        expected = _type_problem(name, schema.field(name).type)
        if expected:
            problems.append(BookProblem(file, None, name, expected))
        else:
            usable.append(name)

    # Data: one NumPy chunk per batch and column, concatenated once at the end.
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in usable}
    null_rows: dict[str, list[np.ndarray]] = {name: [] for name in usable}
    n_rows = 0
    try:
        for batch in batches(usable):
            for name in usable:
                values, nulls = _to_numpy(name, batch.column(name))
                chunks[name].append(values)
                if nulls is not None:
                    null_rows[name].append(nulls + n_rows)
            n_rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise refuse(f"cannot be read: {e}") from None
    if n_rows == 0:
        problems.append(BookProblem(file, None, None, "the book has no rows"))
        raise BookError(problems)

    columns = {name: _concatenate(name, parts) for name, parts in chunks.items()}
    nulls = {
        name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
        for name, parts in null_rows.items()
    }
    problems += _check_values(file, columns, nulls, tuple(assumptions.generations))
    if problems:
        raise BookError(problems)
    return _build_book(file, columns, n_rows, assumptions)


def _open_batches(source: Path, magic: bytes):
    """(schema, batches(columns) -> iterator of RecordBatch) for the format the magic names."""
    if magic[:4] == b"PAR1":
        parquet = pq.ParquetFile(source)

        def parquet_batches(columns):
            if not columns:  # still count the rows when no used column is there
                for group in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    yield pa.RecordBatch.from_pydict({"_": pa.nulls(rows)})
                return
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)

        return parquet.schema_arrow, parquet_batches

    # Memory-mapped: the IPC batches are views of the file; only our NumPy chunks are copies.
    mapped = pa.memory_map(str(source))
    if magic[:6] == b"ARROW1":
        reader = pa.ipc.open_file(mapped)

        def file_batches(columns):
            for k in range(reader.num_record_batches):
                yield reader.get_batch(k)

        return reader.schema, file_batches

    stream = pa.ipc.open_stream(mapped)  # raises ArrowInvalid for anything else

    def stream_batches(columns):
        yield from stream

    return stream.schema, stream_batches


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _type_problem(name: str, t: pa.DataType) -> str | None:
    """The rule a column's Arrow type breaks, or None."""
    if name in STRING_COLUMNS:
        ok, want = _is_string_type(t), "must be of string type"
    elif name in BOOL_COLUMNS:
        ok, want = pa.types.is_boolean(t), "must be of boolean type"
    else:
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        want = "must be of integer or floating-point type"
    return None if ok else f"{want}, got {t}"


def _to_numpy(name: str, array: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, row positions of nulls or None): strings as objects, numbers float64."""
    nulls = None
    if array.null_count:
        nulls = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
    if name in STRING_COLUMNS:
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        values = array.cast(pa.string()).to_numpy(zero_copy_only=False)
    elif name in BOOL_COLUMNS:
        values = array.fill_null(False).to_numpy(zero_copy_only=False)
    else:
        values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    return values, nulls


def _concatenate(name: str, parts: list[np.ndarray]) -> np.ndarray:
    if name in STRING_COLUMNS:
        return np.concatenate(parts).astype(object, copy=False)
    if name in BOOL_COLUMNS:
        return np.concatenate(parts).astype(bool, copy=False)
    return np.concatenate(parts).astype(np.float64, copy=False)


def _format_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return format(float(value), ".10g")


def _check_values(
    file: str,
    columns: dict[str, np.ndarray],
    nulls: dict[str, np.ndarray],
    generations: tuple[str, ...],
) -> list[BookProblem]:
    """Every value rule on the usable columns; at most MAX_ROWS_PER_RULE rows per rule."""
    problems: list[BookProblem] = []
    loan_ids = columns.get("loan_id")

    def who(row: int) -> str | None:
        if loan_ids is None:
            return None
        loan_id = loan_ids[row]
        return loan_id if isinstance(loan_id, str) and loan_id != "" else None

    def report(column: str, bad_rows: np.ndarray, rule: str, show_value: bool = True) -> None:
        values = columns[column]
        for row in bad_rows[:MAX_ROWS_PER_RULE]:
            text = f"{rule}, got {_format_value(values[row])}" if show_value else rule
            problems.append(BookProblem(file, who(row), column, text, row=int(row) + 1))
        if len(bad_rows) > MAX_ROWS_PER_RULE:
            more = len(bad_rows) - MAX_ROWS_PER_RULE
            problems.append(BookProblem(file, None, column, f"{rule}: and {more} more rows"))

    # Nulls first; the other rules then skip those rows so each bad cell is named once.
    for column, rows in nulls.items():
        if len(rows):
            report(column, rows, "must not be null", show_value=False)

    for column in STRING_COLUMNS:
        if column not in columns:
            continue
        values = columns[column]
        present = np.ones(len(values), dtype=bool)
        present[nulls[column]] = False
        if column in ("loan_id", "borrower_id"):
            report(column, np.flatnonzero(values == ""), "must not be empty", show_value=False)
            continue
        allowed = _ENUM_RULES.get(column, generations)
        known = ", ".join(allowed)
        rule = (
            f"must be one of {known}"
            if column in _ENUM_RULES
            else f"must be one of the assumptions' generations ({known})"
        )
        bad = present & ~np.isin(values, np.array(allowed, dtype=object))
        report(column, np.flatnonzero(bad), rule)

    if loan_ids is not None:
        problems += _duplicate_problems(file, loan_ids)

    for column in NUMERIC_COLUMNS:
        if column not in columns:
            continue
        values = columns[column]
        is_null = np.zeros(len(values), dtype=bool)
        is_null[nulls[column]] = True
        finite = np.isfinite(values)
        report(column, np.flatnonzero(~finite & ~is_null), "must be a finite number")
        for rule_columns, good, rule in _RANGE_RULES:
            if column in rule_columns:
                with np.errstate(invalid="ignore"):
                    bad = finite & ~good(values)
                report(column, np.flatnonzero(bad), rule)
    return problems


def _duplicate_problems(file: str, loan_ids: np.ndarray) -> list[BookProblem]:
    """One problem per duplicated loan_id (empty and null ids are reported elsewhere)."""
    counts = Counter(loan_ids.tolist())
    duplicated = [
        loan_id for loan_id, count in counts.items() if count > 1 and loan_id not in (None, "")
    ]
    problems = []
    for loan_id in duplicated[:MAX_ROWS_PER_RULE]:
        rows = np.flatnonzero(loan_ids == loan_id) + 1
        listed = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        rule = f"duplicate loan_id: appears {len(rows)} times (rows {listed})"
        problems.append(BookProblem(file, loan_id, "loan_id", rule))
    if len(duplicated) > MAX_ROWS_PER_RULE:
        more = len(duplicated) - MAX_ROWS_PER_RULE
        problems.append(
            BookProblem(file, None, "loan_id", f"duplicate loan_id: and {more} more ids")
        )
    return problems


def _build_book(file: str, columns: dict[str, np.ndarray], n_rows: int, assumptions) -> Book:
    """A Book from validated columns, with the optional ones filled with their defaults."""
    fields = {}
    for name in BOOK_COLUMNS:
        if name in columns:
            fields[name] = columns[name]
        elif name == "power_kw_per_gpu":  # the generation's facility draw (docs/spec.md §3)
            power = dict(
                zip(assumptions.generations, assumptions.generation_power_kw_per_gpu, strict=True)
            )
            fields[name] = np.array([power[g] for g in columns["gpu_generation"]], dtype=np.float64)
        elif name in BOOL_COLUMNS:
            fields[name] = np.full(n_rows, bool(OPTIONAL_DEFAULTS[name]), dtype=bool)
        else:
            fields[name] = np.full(n_rows, float(OPTIONAL_DEFAULTS[name]), dtype=np.float64)
    return Book(source=file, **fields)


# ----------------------------------------------------------------------------- writing


def book_to_table(book: Book) -> pa.Table:
    """Every column of docs/spec.md: strings as string, crypto_pledged as bool, the rest float64."""
    arrays = {}
    for name in BOOK_COLUMNS:
        values = getattr(book, name)
        if name in STRING_COLUMNS:
            arrays[name] = pa.array(values.tolist(), type=pa.string())
        elif name in BOOL_COLUMNS:
            arrays[name] = pa.array(np.asarray(values, dtype=bool), type=pa.bool_())
        else:
            arrays[name] = pa.array(np.asarray(values, dtype=np.float64), type=pa.float64())
    return pa.table(arrays)


def write_book(table_or_book: pa.Table | Book, path: str | os.PathLike) -> Path:
    """Write Parquet for a `.parquet` suffix, else an Arrow IPC file (.arrow/.feather).

    Written to a temporary name in the same directory and renamed, so a reader never sees a
    half-written book. Returns the path written.
    """
    table = book_to_table(table_or_book) if isinstance(table_or_book, Book) else table_or_book

    def write(temporary: Path) -> None:
        if Path(path).suffix.lower() == ".parquet":
            pq.write_table(table, temporary)
        else:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)

    return write_atomically(path, write)
