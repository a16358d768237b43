"""The command line's conventions (issue 17): counts written as 1e6, 1_000_000 or 1000000;
help on every option with its default; `validate` defaulting to the example book; make-book
and schema --template writing the format the extension names; `gpucredit schema` and
docs/schema.md rendered from the one schema table."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gpucredit.cli import COUNT, Count, main
from gpucredit.io.book import BOOK_COLUMNS, example_book_path, read_book
from gpucredit.io.schema import schema_markdown
from gpucredit.portfolio.book import BOOK_SCHEMA
from gpucredit.portfolio.stress import BUILTIN_STRESSES

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _option(command: str, name: str) -> click.Option:
    return next(p for p in main.commands[command].params if p.name == name)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("text", ["1e6", "1_000_000", "1000000", "1E6", " 1e6 ", "1.0e6"])
def test_a_count_is_written_any_usual_way(text):
    assert COUNT.convert(text, None, None) == 1_000_000


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("run", "scenarios"),
        ("run", "chunk_size"),
        ("run", "workers"),
        ("reverse-stress", "scenarios"),
        ("make-book", "n_loans"),
    ],
)
def test_every_count_option_takes_1e6(command, option):
    param = _option(command, option)
    assert isinstance(param.type, Count)
    assert param.type.convert("1e6", param, None) == 1_000_000
    assert param.type.convert("2_048", param, None) == 2048


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1.5", "'1.5' is not a whole number"),
        ("2.5e0", "'2.5e0' is not a whole number"),
        ("1e-3", "is not a whole number"),
        ("abc", "'abc' is not a whole number (write e.g. 1000000, 1_000_000 or 1e6)"),
        ("nan", "is not a whole number"),
        ("inf", "is not a whole number"),
        ("-5", "-5 is negative"),
        ("-1e3", "-1e3 is negative"),
        ("0", "0 is below the minimum, 1"),
    ],
)
def test_a_bad_count_is_refused_before_any_work(tmp_path, text, words):
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--scenarios", text, "--out", str(out)])
    assert result.exit_code == 2
    assert "--scenarios" in result.output and words in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_make_book_takes_a_count_in_scientific_notation(tmp_path):
    path = tmp_path / "book.parquet"
    result = invoke("make-book", "--loans", "2.5e1", "--out", str(path))
    assert result.exit_code == 0, result.output
    assert len(read_book(path)) == 25


# ----------------------------------------------------------------------------- help


def _commands():
    return sorted(main.commands.items())


@pytest.mark.parametrize(("name", "command"), _commands())
def test_every_option_has_help_and_shows_its_default(name, command):
    text = " ".join(invoke(name, "--help").output.split())
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.help, f"{name} {param.opts[0]} has no help text"
        if param.is_flag or param.multiple or param.required:
            continue
        if param.default is None or not isinstance(param.default, str | int | float):
            # none (click 8.2+ says UNSET): where the default comes from is said in words
            assert "default" in param.help.lower(), f"{name} {param.opts[0]}"
        else:
            assert f"[default: {param.default}" in text or f"default: {param.default};" in text, (
                f"{name} {param.opts[0]} does not show its default"
            )


def test_stress_help_lists_every_built_in():
    text = "".join(invoke("run", "--help").output.split())  # names may wrap at a hyphen
    for stress in BUILTIN_STRESSES:
        assert stress in text


# ----------------------------------------------------------------------------- validate


def test_validate_defaults_to_the_example_book_like_run():
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert f"{len(read_book(example_book_path()))} loans" in result.output


# ----------------------------------------------------------------------------- make-book


@pytest.mark.parametrize(
    ("suffix", "magic"),
    [
        (".parquet", b"PAR1"),
        (".arrow", b"ARROW1"),
        (".feather", b"ARROW1"),
        (".csv", b'"loan_id"'),
        (".xlsx", b"PK\x03\x04"),
    ],
)
def test_make_book_writes_the_format_its_extension_names(tmp_path, suffix, magic):
    path = tmp_path / f"book{suffix}"
    result = invoke("make-book", "--loans", "12", "--seed", "4", "--out", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(magic)
    book = read_book(path)
    assert len(book) == 12 and book.source == str(path)


@pytest.mark.parametrize("name", ["book.txt", "book", "book.json"])
def test_make_book_refuses_an_unknown_extension(tmp_path, name):
    path = tmp_path / name
    result = CliRunner().invoke(main, ["make-book", "--loans", "5", "--out", str(path)])
    assert result.exit_code == 2
    assert f"cannot write a book to {path}" in result.output
    assert "use one of .parquet, .arrow, .feather, .ipc, .csv, .xlsx" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- schema


def test_schema_prints_every_column_with_its_unit_and_default():
    text = invoke("schema").output
    for column in BOOK_SCHEMA:
        assert column.name in text
    assert "USD per GPU-hour" in text and "the generation's" in text


def test_docs_schema_md_is_the_rendered_schema():
    """docs/schema.md is generated from BOOK_SCHEMA; regenerate it with
    `gpucredit schema --markdown > docs/schema.md` when the table changes."""
    page = (ROOT / "docs" / "schema.md").read_text(encoding="utf-8")
    assert page == schema_markdown()
    assert invoke("schema", "--markdown").output == page
    for column in BOOK_SCHEMA:
        assert f"| `{column.name}` | {column.type} |" in page


def test_readme_links_the_schema():
    assert "docs/schema.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".arrow", ".feather", ".xlsx"])
def test_schema_template_is_a_valid_book_in_its_format(tmp_path, suffix):
    path = tmp_path / f"template{suffix}"
    result = invoke("schema", "--template", str(path))
    assert result.exit_code == 0, result.output
    book = read_book(path)
    assert len(book) == 1
    if suffix == ".csv":
        header = path.read_text().splitlines()[0].replace('"', "").split(",")
        assert tuple(header) == BOOK_COLUMNS


def test_schema_template_refuses_an_unknown_extension(tmp_path):
    result = CliRunner().invoke(main, ["schema", "--template", str(tmp_path / "t.docx")])
    assert result.exit_code == 2 and "cannot write a book" in result.output
