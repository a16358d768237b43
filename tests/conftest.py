"""Shared test fixtures: small random books that cover every feature of MODEL.md §3-6."""

from __future__ import annotations

import pytest

from gpucredit.portfolio.book import Book, feature_book, uniform_book  # noqa: F401 (shared)


def random_book(seed: int, n_loans: int) -> Book:
    """A small book covering every amortization, rate type, contract expiry, maturity before
    and after a 3-year horizon, and miners with pledged and unpledged crypto."""
    return feature_book(n_loans, seed, source="<random>")


@pytest.fixture
def small_book() -> Book:
    return random_book(7, 40)
