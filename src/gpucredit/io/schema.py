"""The book schema for people: docs/schema.md, `gpucredit schema` and its template file, all
rendered from portfolio.book.BOOK_SCHEMA (the table the validation reads), so the documented
rules are the enforced ones. Regenerate the page with `gpucredit schema --markdown >
docs/schema.md`; tests/io/test_book.py checks that they agree.

>>> print(schema_markdown().splitlines()[0])
# Book schema
"""

from __future__ import annotations

import os
from pathlib import Path

from gpucredit.portfolio.book import BOOK_SCHEMA, FROM_GENERATION, BookColumn, uniform_book

HEADER = ("Column", "Type", "Unit", "Default", "Rule", "Meaning")

INTRO = """\
One row per loan. Every column the model reads is below; a column it does not know is
refused with the nearest known name (`utilisation`: did you mean utilization?), so a
misspelled optional column never silently takes its default (unnamed columns and the index
pandas stores are ignored).

**Sources.** `gpucredit run BOOK`, `gpucredit validate BOOK` and `read_book(source)` read
Parquet, Arrow IPC (file, Feather v2 or stream), CSV (UTF-8, header row, delimiter `,` `;`
tab or `|`) and Excel .xlsx (first sheet, header row; needs the extra `excel`: `pip install
'gpucredit[excel]'`); a file's format is told by its first bytes, so the extension does not
matter. In Python `read_book` also takes a pandas or polars DataFrame, a pyarrow Table or
any object with the Arrow PyCapsule stream interface. `write_book` and `gpucredit make-book
--out` write the format the extension names: `.parquet`, `.arrow`/`.feather`/`.ipc`, `.csv`
or `.xlsx`.

**Types.** Strings may be dictionary-encoded, numbers any integer or float type. CSV and
Excel cells (and the object columns of a pandas DataFrame) are coerced to the column's type:
numbers as written (`1e6`, ` 0.08 `), booleans `true`/`false`, `yes`/`no` or `1`/`0`; a cell
that cannot be is refused with its value and the type expected.

**Rules.** No nulls (an empty number cell is a null) except in the two offtaker columns,
where a null or empty `offtaker` names none and `offtaker_pd_annual` is needed only on the
rows that name one (one PD per offtaker); every number finite and in the
plausible range shown (generous: it catches unit slips such as 8 for 8% or cents for dollars,
and sizes no book holds); a column named twice is refused; a borrower's type, PD and asset
correlation are the same on each of its loans (a loan that differs is named with the
borrower's first loan); absent optional columns take the default shown. A bad book is refused
before any simulation with every problem listed (file, `loan_id` or row, column, rule; at
most 20 rows per rule, the rest counted); the command line exits with status 2.

`gpucredit schema` prints this table; `gpucredit schema --template book.csv` (or `.parquet`,
`.arrow`, `.xlsx`) writes a one-loan example book to start from.
"""


def default_text(column: BookColumn) -> str:
    """The default as documented: "required", "the generation's", "0.7", "false"."""
    if column.required or column.default == FROM_GENERATION:
        return str(column.default)
    if column.default == "":
        return "none"
    if isinstance(column.default, bool):
        return "true" if column.default else "false"
    return format(column.default, "g")


def schema_rows() -> list[tuple[str, str, str, str, str, str]]:
    """One row of strings per column: name, type, unit, default, rule, meaning."""
    return [
        (c.name, c.type, c.unit, default_text(c), c.rule_summary(), c.meaning) for c in BOOK_SCHEMA
    ]


def schema_markdown() -> str:
    """docs/schema.md: the introduction and the table of every column."""
    lines = [
        "# Book schema",
        "",
        "<!-- Generated from gpucredit.portfolio.book.BOOK_SCHEMA by `gpucredit schema "
        "--markdown`; tests/io/test_book.py checks that they agree. Do not edit by hand. -->",
        "",
        INTRO,
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for name, *cells in schema_rows():
        lines.append("| " + " | ".join([f"`{name}`", *(_escape(c) for c in cells)]) + " |")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def template_table():
    """A one-loan example book with every column (an H100 loan, the optional columns at their
    defaults), to fill in."""
    from gpucredit.io.book import book_to_table

    return book_to_table(uniform_book(1, source="<template>", borrower_id="B00000"))


def write_template(path: str | os.PathLike) -> Path:
    """Write the example book in the format `path`'s extension names (see write_book).

    >>> write_template("book.csv")  # doctest: +SKIP
    PosixPath('book.csv')
    """
    from gpucredit.io.book import write_book

    return write_book(template_table(), path)
