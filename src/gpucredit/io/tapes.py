"""Loan tapes: books read cell by cell from CSV (pyarrow.csv) or Excel .xlsx (openpyxl, the
optional extra `excel`), each book column coerced to its schema type (docs/schema.md).

A cell that cannot be coerced is not guessed at: it is listed as a bad cell (column, row,
what it must be and the value found), left null, and read_book reports it with the loan's id
beside the other problems. Unknown columns are kept (read_book refuses them by name).

>>> tape = read_csv_tape(Path("book.csv"))  # doctest: +SKIP
>>> tape.table.schema.field("balance_usd").type, tape.bad_cells  # doctest: +SKIP
(DataType(double), [('gpu_count', 2, "must be a number (GPUs), got 'many'")])
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gpucredit.portfolio.book import BOOK_SCHEMA, BOOK_SCHEMA_BY_NAME, BookColumn

EXCEL_EXTRA = "excel"  # pip install 'gpucredit[excel]' (openpyxl)
DELIMITERS = ",;\t|"  # the one most frequent in the header line is used
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})


@dataclass(frozen=True)
class Tape:
    """A table read cell by cell: its book columns coerced (strings, float64, bool), and the
    cells that could not be, as (column, 0-based row, rule with the value found)."""

    table: pa.Table
    bad_cells: list[tuple[str, int, str]]


class TapeError(Exception):
    """The file cannot be read as a tape at all (not CSV, not .xlsx, no openpyxl)."""


# ----------------------------------------------------------------------------- CSV


def read_csv_tape(path: Path) -> Tape:
    """Read a CSV loan tape (UTF-8, header row; delimiter `,` `;` tab or `|`, sniffed).

    Book columns are read as text and then coerced, so one bad cell is named rather than the
    whole column refused; an empty number or boolean cell is a null (refused later).
    """
    read = pacsv.ReadOptions(block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=_sniff_delimiter(path))
    # Every book column as text (no inference), empty cells as "" for the coercion to see.
    convert = pacsv.ConvertOptions(
        column_types={c.name: pa.string() for c in BOOK_SCHEMA}, strings_can_be_null=False
    )
    try:
        table = pacsv.read_csv(
            path, read_options=read, parse_options=parse, convert_options=convert
        )
    except (pa.ArrowException, OSError) as e:
        raise TapeError(f"not a readable CSV file ({e})") from None
    names, arrays, bad_cells = [], [], []
    for k, name in enumerate(table.column_names):
        name = name.strip()  # " balance_usd" from a hand-edited header is balance_usd
        column = BOOK_SCHEMA_BY_NAME.get(name)
        array = table.column(k)
        if column is not None:
            text = array.combine_chunks()
            if not pa.types.is_string(text.type):  # a padded name escaped column_types
                text = pc.cast(text, pa.string())
            array, bad = _coerce_text(column, text)
            bad_cells += bad
        names.append(name)
        arrays.append(array)
    return Tape(_table(names, arrays, table.num_rows), bad_cells)


def _sniff_delimiter(path: Path) -> str:
    with open(path, "rb") as f:
        header = f.readline(1 << 16).decode("utf-8", errors="replace")
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _coerce_text(column: BookColumn, text: pa.Array) -> tuple[pa.Array, list]:
    """A CSV column (strings) as its schema type; Arrow's cast first, cell by cell if it fails."""
    if column.type == "string":
        return text, []
    trimmed = pc.utf8_trim_whitespace(text)
    blank_as_null = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
    if column.type == "number":
        try:
            return pc.cast(blank_as_null, pa.float64()), []
        except pa.ArrowException:
            pass  # some cell is not a number: find and name each one
    return coerce_cells(column, blank_as_null.to_pylist())


# ----------------------------------------------------------------------------- Excel


def read_excel_tape(path: Path) -> Tape:
    """Read the first sheet of an Excel .xlsx loan tape (header row first; formulas read as
    the values Excel last computed). Needs openpyxl: `pip install 'gpucredit[excel]'`."""
    try:
        import openpyxl  # optional: only Excel tapes need it
    except ImportError:
        raise TapeError(
            "reading Excel needs openpyxl, which is not installed; install the extra "
            f"`{EXCEL_EXTRA}`: pip install 'gpucredit[{EXCEL_EXTRA}]'"
        ) from None
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises zipfile, KeyError and its own errors alike
        raise TapeError(f"not a readable Excel .xlsx file ({type(e).__name__}: {e})") from None
    try:
        rows = list(workbook.worksheets[0].iter_rows(values_only=True))
    finally:
        workbook.close()
    if not rows:
        return Tape(_table([], [], 0), [])
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    body = [row for row in rows[1:] if any(cell is not None for cell in row)]  # trailing blanks
    names, arrays, bad_cells = [], [], []
    for k, name in enumerate(header):
        column = BOOK_SCHEMA_BY_NAME.get(name)
        if column is None:
            if name:  # an unknown column is kept by name (validation refuses it)
                names.append(name)
                arrays.append(pa.nulls(len(body)))
            continue  # an unnamed column (a spreadsheet's blank one) is ignored
        array, bad = coerce_cells(column, [row[k] if k < len(row) else None for row in body])
        names.append(name)  # a repeated name is kept: validation refuses it
        arrays.append(array)
        bad_cells += bad
    return Tape(_table(names, arrays, len(body)), bad_cells)


# ----------------------------------------------------------------------------- coercion


def coerce_cells(column: BookColumn, cells: Sequence[object]) -> tuple[pa.Array, list]:
    """Python cell values (CSV text, Excel values, a DataFrame's objects) as the column's
    schema type: (array, bad cells). None stays null; a bad cell becomes null and is listed.

    >>> coerce_cells(BOOK_SCHEMA_BY_NAME["gpu_count"], ["8", 16, "x"])[1]
    [('gpu_count', 2, "must be a number (GPUs), got 'x'")]
    """
    convert = {"number": _to_number, "boolean": _to_boolean, "string": _to_string}[column.type]
    values, bad = [], []
    for row, cell in enumerate(cells):
        value = None if cell is None else convert(cell)
        if cell is not None and value is None:
            bad.append((column.name, row, f"{_expected(column)}, got {_describe(cell)}"))
        values.append(value)
    arrow_type = {"number": pa.float64(), "boolean": pa.bool_(), "string": pa.string()}
    return pa.array(values, type=arrow_type[column.type]), bad


def _expected(column: BookColumn) -> str:
    if column.type == "number":
        return f"must be a number ({column.unit})" if column.unit else "must be a number"
    if column.type == "boolean":
        return "must be true or false"
    return "must be text"


def _describe(cell: object) -> str:
    if isinstance(cell, str):
        return repr(cell)
    return f"{cell} ({type(cell).__name__})"


def _to_number(cell: object) -> float | None:
    if isinstance(cell, bool):  # True is an int in Python, not a balance
        return None
    if isinstance(cell, int | float):
        return float(cell)
    if isinstance(cell, str):
        try:
            return float(cell.strip())
        except ValueError:
            return None
    return None


def _to_boolean(cell: object) -> bool | None:
    if isinstance(cell, bool):
        return cell
    if isinstance(cell, int | float) and cell in (0, 1):
        return bool(cell)
    if isinstance(cell, str):
        word = cell.strip().lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    return None


def _to_string(cell: object) -> str | None:
    if isinstance(cell, str):
        return cell
    if isinstance(cell, float) and math.isfinite(cell) and cell.is_integer():
        return str(int(cell))  # an id Excel stored as 1001.0
    if isinstance(cell, int | float | bool):
        return str(cell)
    if isinstance(cell, datetime.date | datetime.time):
        return cell.isoformat()
    return None


def _table(names: list[str], arrays: list, n_rows: int) -> pa.Table:
    """The columns as read (repeated names kept), or only the row count when there are none."""
    if not names:
        return pa.table({"_": pa.nulls(n_rows)})
    return pa.Table.from_arrays(arrays, names=names)


def write_excel_tape(table: pa.Table, path: Path) -> None:
    """Write `table` as the first sheet of an .xlsx file (header row, one row per loan)."""
    try:
        import openpyxl
    except ImportError:
        raise TapeError(
            "writing Excel needs openpyxl, which is not installed; install the extra "
            f"`{EXCEL_EXTRA}`: pip install 'gpucredit[{EXCEL_EXTRA}]'"
        ) from None
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("book")
    sheet.append(table.column_names)
    for row in table.to_pylist():
        sheet.append(list(row.values()))
    workbook.save(path)
