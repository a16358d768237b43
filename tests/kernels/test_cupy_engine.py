"""The CuPy kernel (kernels/cuda/forward.cu) against the NumPy reference and the JAX engine.

Needs cupy and an NVIDIA GPU (marker `gpu`); skipped otherwise. The kernel's index math and
reductions are also checked without a GPU by tests/kernels/test_cuda_compile.py (a CPU
emulation of the same source).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from tests.conftest import offtaker_book, random_book

from gpucredit.kernels import cupy_engine, reference
from gpucredit.portfolio.backends import CupyBackend
from gpucredit.portfolio.loans import loan_arrays

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_engine.available(), reason="needs cupy and a CUDA GPU"),
]

SEED = 11
COUNT = 128


def _host(x) -> np.ndarray:
    return np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float64)


def _assert_close(actual, expected, rtol):
    """Per scenario, relative to the loss, with an absolute floor of rtol × the mean loss."""
    actual, expected = _host(actual), np.asarray(expected, np.float64)
    floor = rtol * max(float(np.mean(np.abs(expected))), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=floor)


def _losses(params, grid, loans, dtype, first=0, count=COUNT, threads=256):
    prepared = cupy_engine.prepare_loans_cupy(loans, dtype, threads=threads)
    out = cupy_engine.chunk_losses_cupy(params, grid, prepared, SEED, first, count)
    assert out.shape == (count,) and out.dtype == np.dtype(dtype)
    return _host(out)


def test_dlpack_hands_jax_arrays_to_cupy_without_a_copy():
    import cupy as cp
    import jax.numpy as jnp

    x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) * 2
    x.block_until_ready()
    y = cp.from_dlpack(x)
    assert y.shape == (3, 4) and y.dtype == cp.float32
    np.testing.assert_array_equal(y.get(), np.asarray(x))
    assert y.data.ptr == x.unsafe_buffer_pointer()


@pytest.mark.parametrize(
    ("mode", "copula", "discount"),
    [
        ("conditional", "gaussian", False),
        ("conditional", "t", True),
        ("sampled", "gaussian", True),
        ("sampled", "t", False),
    ],
)
def test_float64_matches_reference(assumptions, loans, mode, copula, discount):
    grid = assumptions.grid(mode)._replace(copula=copula, discount=discount)
    scenarios = np.arange(COUNT)
    expected = reference.simulate_outcomes(assumptions.params, grid, loans, SEED, scenarios)
    want = expected.loss_usd.sum(axis=1)
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float64)
    losses, loss_sum, pd_sum, ead_sum = (
        _host(x)
        for x in cupy_engine.chunk_outcomes_cupy(assumptions.params, grid, prepared, SEED, 0, COUNT)
    )
    _assert_close(losses, want, 1e-9)
    for got, per_loan in (
        (loss_sum, expected.loss_usd),
        (pd_sum, expected.default_probability),
        (ead_sum, expected.defaulted_exposure_usd),
    ):
        total = per_loan.sum(axis=0)
        np.testing.assert_allclose(got, total, rtol=1e-9, atol=1e-9 * max(total.max(), 1.0))
    if mode == "sampled":  # identical default events and counts
        np.testing.assert_array_equal(losses == 0, want == 0)
        np.testing.assert_array_equal(pd_sum, expected.default_probability.sum(axis=0))


@pytest.mark.parametrize("copula", ["gaussian", "t"])
def test_float32_close_to_reference(assumptions, loans, copula):
    grid = assumptions.grid()._replace(copula=copula)
    want = reference.simulate_chunk(assumptions.params, grid, loans, SEED, np.arange(COUNT))
    want = want.sum(axis=1)
    got = _losses(assumptions.params, grid, loans, np.float32)
    _assert_close(got, want, 1e-4)
    assert abs(got.sum() / want.sum() - 1) < 2e-5


def _v2_case(assumptions, loans, case: str):
    """(params, loans) exercising one model-v2 mechanism beyond the defaults (the same cases
    as test_cuda_compile's emulated kernel)."""
    params, grid = assumptions.params, assumptions.grid()
    if case == "today-anchor":  # RF^ref != 1 at a balloon
        return params, reference.with_pd_references(params, grid, loans, "today")
    if case == "fleet-edges":  # F_g < N_g, F_g = 0, N_g = 0 (generation 2), F_g >> N_g
        loans = loans._replace(
            collateral_share=np.where(loans.generation == 2, 0.0, loans.collateral_share)
        )
        params = params._replace(financed_fleet_gpus=np.array([5000.0, 0.0, 4.0e5, 3.0e6]))
        return params, reference.with_pd_references(params, grid, loans)
    if case == "income-and-cycle":  # all-BTC other income, another trend, φ = 0
        params = params._replace(btc_hashprice_drift=0.15, credit_persistence=0.0)
        share = np.where(loans.other_income_usd_per_year > 0, 1.0, loans.other_income_btc_share)
        loans = loans._replace(other_income_btc_share=share)
        return params, reference.with_pd_references(params, grid, loans)
    if case == "offtakers":  # docs/spec.md §4a: contracts stop after their offtaker's default
        return params, loan_arrays(offtaker_book(), assumptions)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "mode", "dtype"),
    [
        ("today-anchor", "conditional", np.float64),
        ("today-anchor", "sampled", np.float64),
        ("fleet-edges", "conditional", np.float64),
        ("fleet-edges", "sampled", np.float64),
        ("income-and-cycle", "conditional", np.float64),
        ("income-and-cycle", "conditional", np.float32),
        ("offtakers", "conditional", np.float64),
        ("offtakers", "sampled", np.float64),
        ("offtakers", "conditional", np.float32),
    ],
)
def test_model_v2_cases_match_reference(assumptions, loans, case, mode, dtype):
    params, loans = _v2_case(assumptions, loans, case)
    grid = assumptions.grid(mode)._replace(discount=mode == "sampled")
    scenarios = np.arange(COUNT)
    want = reference.simulate_chunk(params, grid, loans, SEED, scenarios).sum(axis=1)
    got = _losses(params, grid, loans, dtype)
    _assert_close(got, want, 1e-9 if dtype == np.float64 else 1e-4)
    if mode == "sampled":
        np.testing.assert_array_equal(got == 0, want == 0)


@pytest.mark.parametrize(
    ("book_seed", "n_loans", "mode", "first", "threads"),
    [
        (1, 33, "conditional", 0, 256),
        (2, 64, "sampled", 2**20 + 3, 256),
        (3, 300, "conditional", 77, 256),  # two loan tiles
        (4, 150, "sampled", 5, 64),  # several tiles of two warps
        (5, 1, "conditional", 9, 256),  # one loan
    ],
)
def test_random_books_match_reference(assumptions, book_seed, n_loans, mode, first, threads):
    grid = assumptions.grid(mode)
    loans = loan_arrays(random_book(book_seed, n_loans), assumptions)
    scenarios = first + np.arange(96)
    want = reference.simulate_chunk(assumptions.params, grid, loans, SEED, scenarios).sum(axis=1)
    got = _losses(assumptions.params, grid, loans, np.float64, first, 96, threads)
    _assert_close(got, want, 1e-9)
    if mode == "sampled":
        np.testing.assert_array_equal(got == 0, want == 0)


def test_chunks_give_identical_bits(assumptions, loans):
    grid = assumptions.grid()
    whole = _losses(assumptions.params, grid, loans, np.float32, 0, 256)
    part = _losses(assumptions.params, grid, loans, np.float32, 100, 50)
    np.testing.assert_array_equal(part, whole[100:150])


def test_backend_matches_numpy_backend(assumptions, loans):
    from gpucredit.portfolio.backends import NumpyBackend

    grid = assumptions.grid()
    cupy_backend = CupyBackend(assumptions.params, grid, loans, SEED, "float64")
    numpy_backend = NumpyBackend(assumptions.params, grid, loans, SEED)
    got = cupy_backend.run_chunk(64, 32)
    want = numpy_backend.run_chunk(64, 32)
    for name in (
        "losses_usd",
        "loan_loss_sum_usd",
        "loan_default_probability_sum",
        "loan_defaulted_exposure_sum_usd",
    ):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == np.float64 and g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(np.abs(w).max(), 1.0))
    scenarios = np.array([3, 70, 5])
    np.testing.assert_allclose(
        cupy_backend.loan_losses_at(scenarios),
        numpy_backend.loan_losses_at(scenarios),
        rtol=1e-9,
        atol=1e-9 * want.losses_usd.max(),
    )


def test_large_chunk_matches_jax_engine(assumptions):
    """65,536 scenarios × 2,000 loans, float32, against the JAX engine on the same GPU."""
    import cupy as cp
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine

    count = 65_536
    grid = assumptions.grid()
    loans = loan_arrays(random_book(21, 2000), assumptions)
    params = assumptions.params
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float32)
    blocks = jax_engine.prepare_loans(loans, jnp.float32)

    cupy_engine.chunk_losses_cupy(params, grid, prepared, SEED, 0, count)  # compile, warm up
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    got = cupy_engine.chunk_losses_cupy(params, grid, prepared, SEED, 0, count)
    cp.cuda.Device().synchronize()
    cupy_seconds = time.perf_counter() - start

    jax_engine.chunk_losses(params, grid, blocks, SEED, 0, count).block_until_ready()
    start = time.perf_counter()
    want = jax_engine.chunk_losses(params, grid, blocks, SEED, 0, count).block_until_ready()
    jax_seconds = time.perf_counter() - start

    loan_periods = count * 2000 * grid.periods
    print(
        f"\n65,536 x 2,000 x {grid.periods}: cupy {cupy_seconds * 1e3:.1f} ms "
        f"({loan_periods / cupy_seconds / 1e9:.1f} G loan-periods/s), "
        f"jax {jax_seconds * 1e3:.1f} ms ({loan_periods / jax_seconds / 1e9:.1f} G/s)"
    )
    got, want = _host(got), _host(want)
    assert np.all(np.isfinite(got))
    _assert_close(got, want, 1e-4)
    assert abs(got.sum() / want.sum() - 1) < 1e-5
