"""The assumptions TOML (docs/spec.md §9-10): the embedded defaults, a user file or text.

Reading gives one layer in the file's layout; `portfolio.assumptions.apply_layer` checks it,
merges it over the defaults and builds the immutable `Assumptions` (the schema and the merge
rules are in portfolio/document.py). A file that cannot be read, is not a regular UTF-8 file
(io/text_files.py) or is not TOML raises the same `AssumptionsError` as a bad value, naming
the file.
"""

from __future__ import annotations

import functools
import importlib.resources
import tomllib
from pathlib import Path

from gpucredit.io.names import terminal
from gpucredit.io.text_files import TextFileError, read_text_file
from gpucredit.portfolio.assumptions import Assumptions, apply_layer
from gpucredit.portfolio.document import AssumptionsError

DEFAULT_SOURCE = "<default assumptions>"


def default_assumptions_text() -> str:
    """The embedded default assumptions file (what `gpucredit assumptions` prints)."""
    resource = importlib.resources.files("gpucredit") / "data" / "assumptions.toml"
    return resource.read_text(encoding="utf-8")


@functools.cache
def default_assumptions() -> Assumptions:
    """docs/spec.md §9's defaults, parsed once from the embedded file."""
    doc = tomllib.loads(default_assumptions_text())
    return apply_layer({}, doc, DEFAULT_SOURCE, repair=False)


def load_assumptions(
    path: str | Path | None = None, repair_correlation: bool = False
) -> Assumptions:
    """The assumptions of a user TOML merged over the defaults (docs/spec.md §10); the defaults
    when `path` is None. Raises AssumptionsError listing every problem of the file."""
    if path is None:
        return default_assumptions()
    source = str(path)
    try:
        text = read_text_file(path)
    except TextFileError as err:
        raise AssumptionsError([f"{source}: {err}"]) from None
    layer = _parse(text, source)
    return apply_layer(default_assumptions().document, layer, source, repair_correlation)


def loads_assumptions(
    text: str, source: str = "<string>", repair_correlation: bool = False
) -> Assumptions:
    """`load_assumptions` for TOML text already in memory (tests, the report)."""
    layer = _parse(text, source)
    return apply_layer(default_assumptions().document, layer, source, repair_correlation)


def _parse(text: str, source: str) -> dict:
    """One layer from TOML text; AssumptionsError naming `source` if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise AssumptionsError([f"{source}: not valid TOML: {err}"]) from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise AssumptionsError([f"{source}: nested too deeply to be an assumptions file"]) from None


def assembled_matrix_text(assumptions: Assumptions) -> str:
    """The correlation matrix [K, K] as text, factor names labelling rows and columns (shown
    as written: a generation's name is the user's, io/names.py)."""
    names = [terminal(name) for name in assumptions.factor_names]
    sigma = assumptions.correlation_matrix()
    label_width = max(len(name) for name in names)
    widths = [max(len(name), 6) for name in names]
    lines = [
        " " * label_width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    ]
    for name, row in zip(names, sigma, strict=True):
        cells = "  ".join(f"{value:.3f}".rjust(w) for value, w in zip(row, widths, strict=True))
        lines.append(f"{name.ljust(label_width)}  {cells}")
    repair = assumptions.correlation_repair
    if repair is not None:
        lines.append(
            f"(nearest correlation matrix: the input's smallest eigenvalue was "
            f"{repair.smallest_eigenvalue:.6g}; largest change of an entry "
            f"{repair.max_abs_change:.6g})"
        )
    return "\n".join(lines) + "\n"
