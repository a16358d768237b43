"""gpucredit: Monte Carlo credit risk for loan books secured by GPU fleets."""

__version__ = "0.1.0"

from gpucredit.io.assumptions import (
    default_assumptions,
    load_assumptions,
    stress_case,
    with_overrides,
)
from gpucredit.io.book import read_book, write_book
from gpucredit.io.results import write_results
from gpucredit.portfolio.engine import RunResult, simulate

__all__ = [
    "RunResult",
    "__version__",
    "default_assumptions",
    "load_assumptions",
    "read_book",
    "simulate",
    "stress_case",
    "with_overrides",
    "write_book",
    "write_results",
]
