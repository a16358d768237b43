"""Regenerate the embedded example book: ``python -m gpucredit.io.makebook [N SEED OUT]``.

Writes `portfolio.makebook.make_book(N, SEED)` (default: the example's 250 loans, seed 2026)
to OUT (default: the package's data/example_book.parquet). `gpucredit make-book` writes books
of any size; this entry point keeps the example's size, seed and place in one command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpucredit.io.book import write_book
from gpucredit.io.names import terminal
from gpucredit.portfolio.makebook import EXAMPLE_LOANS, EXAMPLE_SEED, make_book

EXAMPLE_BOOK = Path(__file__).resolve().parents[1] / "data" / "example_book.parquet"


def main(argv: list[str]) -> None:
    """Regenerate the embedded example book (or: N SEED OUT)."""
    n_loans = int(argv[0]) if len(argv) > 0 else EXAMPLE_LOANS
    seed = int(argv[1]) if len(argv) > 1 else EXAMPLE_SEED
    out = Path(argv[2]) if len(argv) > 2 else EXAMPLE_BOOK
    write_book(make_book(n_loans, seed), out)
    print(f"wrote {terminal(out)} ({n_loans} loans, seed {seed})")


if __name__ == "__main__":
    main(sys.argv[1:])
