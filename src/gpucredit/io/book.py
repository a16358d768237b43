"""Read, validate and write loan books (docs/schema.md; docs/spec.md "Book schema").

A book is a file (Parquet, Arrow IPC file/Feather v2 or stream, CSV, Excel .xlsx) or a table
in memory (a pyarrow Table, a pandas or polars DataFrame, anything with the Arrow PyCapsule
stream interface). A file's format is told by its first bytes: the binary formats' magic
numbers, else text is CSV. Every source goes through the same validation (the rules of
portfolio.book.BOOK_SCHEMA); bad input is refused before any simulation with a `BookError`
that lists every problem found (file, loan_id, column, rule), so the user can fix the book in
one pass.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpucredit.io.files import write_atomically
from gpucredit.portfolio.book import (
    BOOK_SCHEMA,
    BOOK_SCHEMA_BY_NAME,
    MAX_YEARS,  # noqa: F401  (re-exported: the bound the years rules state)
    OPTIONAL_DEFAULTS,
    REQUIRED_COLUMNS,
    Book,
)

# Every column the model uses, in docs/spec.md's order, by schema type.
BOOK_COLUMNS = tuple(c.name for c in BOOK_SCHEMA)
STRING_COLUMNS = tuple(c.name for c in BOOK_SCHEMA if c.type == "string")
BOOL_COLUMNS = tuple(c.name for c in BOOK_SCHEMA if c.type == "boolean")
NUMERIC_COLUMNS = tuple(c.name for c in BOOK_SCHEMA if c.type == "number")

MAX_ROWS_PER_RULE = 20  # listed rows per (column, rule); the rest are counted
BATCH_ROWS = 65_536  # rows per record batch when reading Parquet
HEAD_BYTES = 4096  # bytes read to tell the format (and text from binary)

# File extension -> format `write_book` writes.
WRITE_FORMATS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".csv": "csv",
    ".xlsx": "excel",
}
READABLE = "Parquet, Arrow IPC/Feather, CSV (UTF-8 text) or Excel .xlsx"
# Not the user's data: the index pandas stores in a Parquet or Arrow file (ignored).
PANDAS_INDEX = re.compile(r"__index_level_\d+__")


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


class BookFormatError(ValueError):
    """`write_book` was asked for a format it does not write (an unknown extension)."""


def example_book_path() -> Path:
    """The embedded example book (2,000 synthetic loans, seed 2026)."""
    return Path(str(importlib.resources.files("gpucredit") / "data" / "example_book.parquet"))


# ----------------------------------------------------------------------------- reading


@dataclass
class _Opened:
    """A source ready to validate: its name in messages, its columns, its record batches,
    and the cells a loan tape could not coerce (column, 0-based row, rule)."""

    name: str
    schema: pa.Schema
    batches: Callable[[list[str]], Iterator[pa.RecordBatch]]
    bad_cells: list[tuple[str, int, str]] = field(default_factory=list)


def read_book(source, assumptions=None) -> Book:
    """Read and validate a book; raise `BookError` listing every problem.

    `source` is a path (Parquet, Arrow IPC/Feather, CSV, Excel .xlsx: told by the file's
    bytes), or a table in memory: a pyarrow Table or RecordBatch, a pandas or polars
    DataFrame, any object with `__arrow_c_stream__`, or a mapping of column name to values.
    `assumptions` supplies `.generations` (the allowed `gpu_generation` names) and
    `.generation_power_kw_per_gpu` (the default of `power_kw_per_gpu`); None means the
    embedded defaults.

    >>> book = read_book("loans.csv")  # doctest: +SKIP
    >>> book = read_book(pd.read_excel("tape.xlsx"))  # doctest: +SKIP
    >>> len(read_book(example_book_path()))
    250
    """
    if assumptions is None:
        from gpucredit.io.assumptions import default_assumptions  # lazy: optional dependency

        assumptions = default_assumptions()
    if isinstance(source, str | os.PathLike):
        opened = _open_file(Path(source))
    else:
        opened = _open_memory(source)
    return _validate(opened, assumptions)


def _validate(opened: _Opened, assumptions) -> Book:
    """Every schema and value rule on an opened source; the Book, or BookError."""
    file, schema = opened.name, opened.schema
    problems: list[BookProblem] = []

    # Schema: which used columns are present, once, with a usable type; no unknown column
    # (a misspelled optional one would silently take its default).
    counts = Counter(schema.names)
    for name in counts:
        # An unnamed column (a spreadsheet's blank one) cannot be a misspelling: ignored.
        ignored = not name.strip() or PANDAS_INDEX.fullmatch(name)
        if name not in BOOK_SCHEMA_BY_NAME and not ignored:
            problems.append(BookProblem(file, None, name, unknown_column_rule(name)))
    for name in REQUIRED_COLUMNS:
        if name not in counts:
            problems.append(BookProblem(file, None, name, "required column is missing"))
    usable = []
    for name in BOOK_COLUMNS:
        if name not in counts:
            continue
        if counts[name] > 1:
            rule = f"the column appears {counts[name]} times; keep one"
            problems.append(BookProblem(file, None, name, rule))
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
        for batch in opened.batches(usable):
            for name in usable:
                values, nulls = _to_numpy(name, batch.column(name))
                chunks[name].append(values)
                if nulls is not None:
                    null_rows[name].append(nulls + n_rows)
            n_rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise BookError([BookProblem(file, None, None, f"cannot be read: {e}")]) from None
    if n_rows == 0:
        problems.append(BookProblem(file, None, None, "the book has no rows"))
        raise BookError(problems)

    columns = {name: _concatenate(name, parts) for name, parts in chunks.items()}
    nulls = {
        name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
        for name, parts in null_rows.items()
    }
    problems += _check_values(
        file, columns, nulls, tuple(assumptions.generations), opened.bad_cells
    )
    if problems:
        raise BookError(problems)
    return _build_book(file, columns, n_rows, assumptions)


def unknown_column_rule(name: str) -> str:
    """What an unknown column is told, with the nearest book column when one is close.

    >>> unknown_column_rule("utilisation")
    'unknown column: did you mean utilization? (`gpucredit schema` lists the columns)'
    """
    nearest = difflib.get_close_matches(name.strip().lower(), BOOK_COLUMNS, n=1, cutoff=0.6)
    hint = f"did you mean {nearest[0]}?" if nearest else "remove or rename it"
    return f"unknown column: {hint} (`gpucredit schema` lists the columns)"


def _open_file(source: Path) -> _Opened:
    """Open a book file in the format its first bytes name."""
    file = str(source)

    def refuse(rule: str) -> BookError:
        return BookError([BookProblem(file, None, None, rule)])

    if not source.exists():
        raise refuse("no such file")
    if not source.is_file():
        raise refuse("not a file")
    try:
        with open(source, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror or e})") from None
    if len(head) == 0:
        raise refuse(f"the file is empty (0 bytes); expected {READABLE}")

    kind = file_format(head)
    if kind == "xls":
        raise refuse("an Excel 97-2003 .xls file: save it as .xlsx or CSV")
    if kind == "utf-16":
        raise refuse("UTF-16 text: save the CSV as UTF-8")
    if kind in ("csv", "excel"):
        from gpucredit.io.tapes import TapeError, read_csv_tape, read_excel_tape

        try:
            tape = read_csv_tape(source) if kind == "csv" else read_excel_tape(source)
        except TapeError as e:
            raise refuse(str(e)) from None
        return _Opened(file, tape.table.schema, _table_batches(tape.table), tape.bad_cells)
    try:
        schema, batches = _open_batches(source, kind)
    except (pa.ArrowException, OSError) as e:
        what = {"parquet": "a readable Parquet file", "arrow file": "a readable Arrow IPC file"}
        expected = what.get(kind, f"a readable book file ({READABLE})")
        raise refuse(f"not {expected} ({e})") from None
    return _Opened(file, schema, batches)


def file_format(head: bytes) -> str:
    """The format a file's first bytes name: "parquet", "arrow file", "arrow stream",
    "excel" (a zip: .xlsx), "xls" (the legacy binary), "utf-16" (text with its byte-order
    mark), or "csv" for text (no NUL byte).

    >>> file_format(b"PAR1...."), file_format(b"loan_id,borrower_id")
    ('parquet', 'csv')
    """
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:6] == b"ARROW1":
        return "arrow file"
    if head[:4] == b"PK\x03\x04":
        return "excel"
    if head[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        return "xls"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") and head[:4] != b"\xff\xff\xff\xff":
        return "utf-16"  # Excel's "Unicode text" export
    if b"\x00" not in head:
        return "csv"
    return "arrow stream"  # 0xFFFFFFFF then a length (older streams: the length alone)


def _open_batches(source: Path, kind: str):
    """(schema, batches(columns) -> iterator of RecordBatch) of a Parquet or Arrow IPC file."""
    if kind == "parquet":
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
    if kind == "arrow file":
        reader = pa.ipc.open_file(mapped)

        def file_batches(columns):
            for k in range(reader.num_record_batches):
                yield reader.get_batch(k)

        return reader.schema, file_batches

    stream = pa.ipc.open_stream(mapped)  # raises ArrowInvalid for anything else

    def stream_batches(columns):
        yield from stream

    return stream.schema, stream_batches


def _table_batches(table: pa.Table) -> Callable[[list[str]], Iterator[pa.RecordBatch]]:
    def batches(columns):
        if not columns:  # still count the rows when no used column is there
            yield pa.RecordBatch.from_pydict({"_": pa.nulls(table.num_rows)})
            return
        yield from table.select(columns).to_batches(max_chunksize=BATCH_ROWS)

    return batches


def _open_memory(source) -> _Opened:
    """A table in memory as an opened source (its name in messages: "<pandas.DataFrame>").

    Arrow tables and Arrow-typed frames (polars, anything with `__arrow_c_stream__`) keep
    their types, as a Parquet file does; pandas frames and mappings of lists, which hold
    Python objects as a spreadsheet does, have their book columns coerced like a loan tape's.
    """
    kind = type(source)
    package = kind.__module__.split(".")[0]
    name = f"<{package}.{kind.__name__}>"
    if isinstance(source, pa.RecordBatch):
        source = pa.Table.from_batches([source])
    if isinstance(source, pa.RecordBatchReader):
        source = source.read_all()
    if isinstance(source, pa.Table):
        return _Opened(name, source.schema, _table_batches(source))
    if package == "pandas" and hasattr(source, "columns"):
        # By position: a name the frame repeats is one column each (refused by validation).
        cells = [(str(k), source.iloc[:, j]) for j, k in enumerate(source.columns)]
        return _open_cells(name, cells, len(source))
    if hasattr(source, "__arrow_c_stream__"):  # polars, duckdb, ... (Arrow PyCapsule API)
        table = pa.RecordBatchReader.from_stream(source).read_all()
        return _Opened(name, table.schema, _table_batches(table))
    if callable(getattr(source, "to_arrow", None)):  # older polars
        table = source.to_arrow()
        return _Opened(name, table.schema, _table_batches(table))
    if isinstance(source, Mapping):
        columns = [(str(k), v) for k, v in source.items()]
        lengths = {k: len(v) for k, v in columns}
        n_rows = max(lengths.values(), default=0)
        short = [f"{k} ({n})" for k, n in lengths.items() if n != n_rows]
        if short:  # a table's columns have one length
            rule = f"every column must have {n_rows} values; these have fewer: {', '.join(short)}"
            raise BookError([BookProblem(name, None, None, rule)])
        return _open_cells(name, columns, n_rows)
    raise TypeError(
        "read_book takes a path (Parquet, Arrow, CSV, Excel), a pyarrow Table, a pandas or "
        f"polars DataFrame, or a mapping of column name to values; got {kind.__name__}"
    )


def _open_cells(name: str, columns: list[tuple[str, object]], n_rows: int) -> _Opened:
    """Columns of Python values (pandas Series, lists), as (name, values): each book column
    converted by Arrow when that gives its schema type, else coerced cell by cell (naming each
    bad cell); an unknown column is kept by name only (validation refuses it)."""
    from gpucredit.io.tapes import coerce_cells

    names, arrays, bad_cells = [], [], []
    for column_name, values in columns:
        column = BOOK_SCHEMA_BY_NAME.get(column_name)
        if column is None:
            names.append(column_name)
            arrays.append(pa.nulls(n_rows))
            continue
        try:
            array = pa.Array.from_pandas(values) if hasattr(values, "dtype") else pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            array = None  # mixed objects: coerced below
        if array is None or _type_problem(column_name, array.type):
            array, bad = coerce_cells(column, _python_cells(values))
            bad_cells += bad
        names.append(column_name)
        arrays.append(array)
    if names:
        table = pa.Table.from_arrays(arrays, names=names)
    else:
        table = pa.table({"_": pa.nulls(n_rows)})
    return _Opened(name, table.schema, _table_batches(table), bad_cells)


def _python_cells(values) -> list:
    """Python values with the missing ones (None, NaN, pandas NA and NaT) as None."""
    cells = values.tolist() if hasattr(values, "tolist") else list(values)
    if hasattr(values, "isna"):
        missing = values.isna().tolist()
    else:
        missing = [v is None or (isinstance(v, float) and v != v) for v in cells]
    return [None if gone else v for v, gone in zip(cells, missing, strict=True)]


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
    bad_cells: list[tuple[str, int, str]] = (),
) -> list[BookProblem]:
    """Every rule of BOOK_SCHEMA on the usable columns, after the cells a loan tape could not
    coerce (`bad_cells`: column, 0-based row, rule); at most MAX_ROWS_PER_RULE rows per rule."""
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

    # Cells a loan tape could not coerce (left null): each named with its value, once.
    uncoerced: dict[str, list[int]] = {}
    for column, row, rule in bad_cells:
        uncoerced.setdefault(column, []).append(row)
        if len(uncoerced[column]) <= MAX_ROWS_PER_RULE:
            problems.append(BookProblem(file, who(row), column, rule, row=row + 1))
    for column, rows in uncoerced.items():
        if len(rows) > MAX_ROWS_PER_RULE:
            more = len(rows) - MAX_ROWS_PER_RULE
            rule = "cannot be read as its type"
            problems.append(BookProblem(file, None, column, f"{rule}: and {more} more rows"))

    # Nulls next; the other rules then skip those rows so each bad cell is named once.
    for column, rows in nulls.items():
        rows = np.setdiff1d(rows, uncoerced.get(column, []))
        if len(rows) and not BOOK_SCHEMA_BY_NAME[column].nullable:
            report(column, rows, "must not be null", show_value=False)

    clean = {}  # per column: the cells that broke no rule (for the rules across rows)
    for name, values in columns.items():
        column = BOOK_SCHEMA_BY_NAME[name]
        present = np.ones(len(values), dtype=bool)
        present[nulls[name]] = False
        clean[name] = present.copy()
        if column.non_empty:
            report(name, np.flatnonzero(values == ""), "must not be empty", show_value=False)
            clean[name] &= values != ""
        if column.allowed or column.allowed_are_generations:
            allowed = np.array(column.allowed or generations, dtype=object)
            bad = present & ~np.isin(values, allowed)
            report(name, np.flatnonzero(bad), column.allowed_rule(generations))
            clean[name] &= ~bad
        if column.unique:
            problems += _duplicate_problems(file, name, values)
        if column.type == "number":
            finite = np.isfinite(values)
            report(name, np.flatnonzero(~finite & present), "must be a finite number")
            clean[name] &= finite
            for rule in column.rules:  # the first rule a cell breaks is the one named
                with np.errstate(invalid="ignore"):
                    bad = clean[name] & ~rule.good(values)
                report(name, np.flatnonzero(bad), rule.text)
                clean[name] &= ~bad
    problems += _borrower_problems(file, columns, clean, who)
    problems += _offtaker_problems(file, columns, nulls, clean, who)
    return problems


def _offtaker_problems(file: str, columns, nulls, clean, who) -> list[BookProblem]:
    """A loan naming an offtaker needs its PD (docs/spec.md §4a: the column absent or the cell
    null is refused), and every loan naming one offtaker states the same PD (named with the
    offtaker's first loan). Cells that broke another rule are left out."""
    names = columns.get("offtaker")
    if names is None:
        return []
    named = np.array([isinstance(v, str) and v != "" for v in names], dtype=bool)
    named &= clean["offtaker"]
    pds = columns.get("offtaker_pd_annual")
    missing = named.copy()
    if pds is not None:
        missing[:] = False
        missing[nulls["offtaker_pd_annual"]] = True
        missing &= named
    problems = []
    rule = "required where offtaker names one (offtaker {!r} has no PD)"
    for row in np.flatnonzero(missing)[:MAX_ROWS_PER_RULE]:
        text = rule.format(names[row])
        problems.append(BookProblem(file, who(row), "offtaker_pd_annual", text, row=int(row) + 1))
    if np.count_nonzero(missing) > MAX_ROWS_PER_RULE:
        more = np.count_nonzero(missing) - MAX_ROWS_PER_RULE
        text = f"required where offtaker names one: and {more} more rows"
        problems.append(BookProblem(file, None, "offtaker_pd_annual", text))
    if pds is None:
        return problems
    usable = named & ~missing & clean["offtaker_pd_annual"]
    problems += _same_value_problems(
        file, "offtaker", names, "offtaker_pd_annual", pds, usable, who, "an offtaker"
    )
    return problems


def _borrower_problems(file: str, columns, clean, who) -> list[BookProblem]:
    """A borrower's type, PD and correlation are one value each (BookColumn.per_borrower):
    a loan that states another value than its borrower's first loan is named with both rows.
    Cells that broke another rule (`clean` False) are left out: each is named once."""
    borrowers = columns.get("borrower_id")
    if borrowers is None:
        return []
    problems = []
    for column in BOOK_SCHEMA:
        if not column.per_borrower or column.name not in columns:
            continue
        usable = clean["borrower_id"] & clean[column.name]
        values = columns[column.name]
        problems += _same_value_problems(
            file, "borrower", borrowers, column.name, values, usable, who, "a borrower"
        )
    return problems


def _same_value_problems(
    file: str, key: str, keys, name: str, values, usable, who, owner: str
) -> list[BookProblem]:
    """Rows (among `usable`) whose `values` differ from the first usable row with the same
    `keys` entry (a borrower_id or an offtaker), each named with that first row."""
    rows = np.flatnonzero(usable)
    if len(rows) == 0:
        return []
    _, first, inverse = np.unique(keys[rows].astype(str), return_index=True, return_inverse=True)
    first_row = rows[first[inverse]]  # each usable row's key's first usable row
    differs = np.flatnonzero(values[rows] != values[first_row])
    problems = []
    for k in differs[:MAX_ROWS_PER_RULE]:
        row, other = int(rows[k]), int(first_row[k])
        named = who(other)
        where = f"loan_id={named} (row {other + 1})" if named else f"row {other + 1}"
        rule = (
            f"{key} {keys[row]!r} has {name} {_format_value(values[other])} "
            f"on {where} but {_format_value(values[row])} here: every loan of {owner} "
            f"must state the same {name}"
        )
        problems.append(BookProblem(file, who(row), name, rule, row=row + 1))
    if len(differs) > MAX_ROWS_PER_RULE:
        more = len(differs) - MAX_ROWS_PER_RULE
        rule = f"{owner}'s loans disagree: and {more} more rows"
        problems.append(BookProblem(file, None, name, rule))
    return problems


def _duplicate_problems(file: str, name: str, values: np.ndarray) -> list[BookProblem]:
    """One problem per duplicated value (empty and null ones are reported elsewhere)."""
    counts = Counter(values.tolist())
    duplicated = [value for value, count in counts.items() if count > 1 and value not in (None, "")]
    problems = []
    for value in duplicated[:MAX_ROWS_PER_RULE]:
        rows = np.flatnonzero(values == value) + 1
        listed = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        rule = f"duplicate {name}: appears {len(rows)} times (rows {listed})"
        problems.append(BookProblem(file, value if name == "loan_id" else None, name, rule))
    if len(duplicated) > MAX_ROWS_PER_RULE:
        more = len(duplicated) - MAX_ROWS_PER_RULE
        problems.append(BookProblem(file, None, name, f"duplicate {name}: and {more} more ids"))
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
        elif name in STRING_COLUMNS:
            fields[name] = np.full(n_rows, OPTIONAL_DEFAULTS[name], dtype=object)
        else:
            fields[name] = np.full(n_rows, float(OPTIONAL_DEFAULTS[name]), dtype=np.float64)
    # Nullable columns: a null offtaker is none (""), a null PD of a loan with none is 0.
    fields["offtaker"] = np.array(
        [v if isinstance(v, str) else "" for v in fields["offtaker"]], dtype=object
    )
    no_pd = np.isnan(fields["offtaker_pd_annual"])
    fields["offtaker_pd_annual"] = np.where(no_pd, 0.0, fields["offtaker_pd_annual"])
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


def book_write_format(path: str | os.PathLike) -> str:
    """The format `write_book` writes to `path`, by its extension; BookFormatError if none.

    >>> book_write_format("book.feather"), book_write_format("tape.CSV")
    ('arrow', 'csv')
    """
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        known = ", ".join(WRITE_FORMATS)
        named = f"extension {suffix!r}" if suffix else "no extension"
        raise BookFormatError(f"cannot write a book to {path}: {named}; use one of {known}")
    return WRITE_FORMATS[suffix]


def write_book(table_or_book: pa.Table | Book, path: str | os.PathLike) -> Path:
    """Write a book in the format its extension names: .parquet, .arrow/.feather/.ipc (Arrow
    IPC file), .csv, or .xlsx (needs the extra `excel`); BookFormatError for any other.

    Written to a temporary name in the same directory and renamed, so a reader never sees a
    half-written book. Returns the path written.

    >>> write_book(read_book(example_book_path()), "book.csv")  # doctest: +SKIP
    PosixPath('book.csv')
    """
    kind = book_write_format(path)
    table = book_to_table(table_or_book) if isinstance(table_or_book, Book) else table_or_book

    def write(temporary: Path) -> None:
        if kind == "parquet":
            pq.write_table(table, temporary)
        elif kind == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, temporary)
        elif kind == "excel":
            from gpucredit.io.tapes import write_excel_tape

            write_excel_tape(table, temporary)
        else:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)

    return write_atomically(path, write)
