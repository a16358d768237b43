"""gpucredit: Monte Carlo credit risk for loan books secured by GPU fleets.

The names below are imported on first use (PEP 562), so that importing any part of the package
(`gpucredit.kernels.params`, the CLI for `--help`) loads neither JAX nor pyarrow nor the other
layers. Layers: kernels < portfolio < io < cli (tests/test_layers.py checks them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "RunResult": "gpucredit.portfolio.engine",
    "simulate": "gpucredit.portfolio.engine",
    "stress_case": "gpucredit.portfolio.stress",
    "with_overrides": "gpucredit.portfolio.assumptions",
    "default_assumptions": "gpucredit.io.assumptions",
    "load_assumptions": "gpucredit.io.assumptions",
    "read_book": "gpucredit.io.book",
    "write_book": "gpucredit.io.book",
    "write_results": "gpucredit.io.results",
}

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

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports them
    from gpucredit.io.assumptions import default_assumptions, load_assumptions
    from gpucredit.io.book import read_book, write_book
    from gpucredit.io.results import write_results
    from gpucredit.portfolio.assumptions import with_overrides
    from gpucredit.portfolio.engine import RunResult, simulate
    from gpucredit.portfolio.stress import stress_case


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
