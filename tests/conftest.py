"""Shared test fixtures: small random books that cover every feature of docs/spec.md §3-6."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpucredit.io.assumptions import default_assumptions
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book, feature_book, uniform_book  # noqa: F401 (shared)

configure_jax()  # float64 and the XLA CPU flag, as the CLI and simulate set them


def random_book(seed: int, n_loans: int) -> Book:
    """A small book covering every amortization, rate type, contract expiry, maturity before
    and after a 3-year horizon, and miners with pledged and unpledged crypto."""
    return feature_book(n_loans, seed, source="<random>")


OFFTAKERS = ("Lab A", "Hyperscaler B", "Lab C")
OFFTAKER_PDS = {"Lab A": 0.15, "Hyperscaler B": 0.02, "Lab C": 0.6}


def offtaker_book(seed: int = 7, n_loans: int = 40):
    """random_book with every contracted loan but every fifth naming one of three offtakers."""
    book = random_book(seed, n_loans)
    names = np.array(
        [
            "" if book.contracted_share[i] == 0 or i % 5 == 4 else OFFTAKERS[i % 3]
            for i in range(n_loans)
        ],
        dtype=object,
    )
    pds = np.array([OFFTAKER_PDS.get(name, 0.0) for name in names])
    return dataclasses.replace(book, offtaker=names, offtaker_pd_annual=pds)


# A small JAX float32 run that exercises chunk and batch edges: a short last chunk, batches of
# 67 scenarios across chunk edges, two tail levels (the Dask and tails-only comparisons).
SMALL_JAX_RUN = dict(
    scenarios=2048 + 100,
    seed=11,
    backend="jax",
    precision="float32",
    chunk_size=256,
    alphas=(0.9, 0.99),
    el_sensitivity_scenarios=512,
)


@pytest.fixture
def small_book() -> Book:
    return random_book(7, 40)


@pytest.fixture(scope="session")
def assumptions() -> Assumptions:
    """The default assumptions (immutable: a test that needs others derives them)."""
    return default_assumptions()


@pytest.fixture(scope="session")
def loans(assumptions):
    """The prepared loan arrays of `random_book(7, 40)` under the default assumptions."""
    from gpucredit.portfolio.loans import loan_arrays

    return loan_arrays(random_book(7, 40), assumptions)
