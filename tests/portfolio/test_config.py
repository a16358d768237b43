"""RunConfig.resolve refuses impossible sizes before any work (issue 20 items 4-5): the memory
estimate of a run against what the machine has, with what to change."""

from __future__ import annotations

import time

import pytest

from gpucredit.io.assumptions import default_assumptions
from gpucredit.portfolio.assumptions import with_overrides
from gpucredit.portfolio.config import (
    RunConfig,
    available_memory_bytes,
    check_memory,
    estimate_memory,
)
from gpucredit.portfolio.document import AssumptionsError
from gpucredit.portfolio.settings import EngineError

ASSUMPTIONS = default_assumptions()
GIB = 2**30


def test_keeping_every_loss_of_1e12_scenarios_is_refused_at_once():
    """Issue 20 item 5: `--scenarios 1e12 --keep-losses` asked for 7 TiB."""
    started = time.perf_counter()
    with pytest.raises(EngineError) as caught:
        RunConfig.resolve(ASSUMPTIONS, scenarios=10**12, keep_losses=True, backend="numpy")
    message = str(caught.value)
    assert "to keep every loss of 1,000,000,000,000 scenarios" in message
    assert "--tails-only" in message and "fewer --scenarios" in message
    assert time.perf_counter() - started < 1.0
    # Tails-only (the default beyond 50 million scenarios) holds no loss per scenario.
    config = RunConfig.resolve(ASSUMPTIONS, scenarios=10**12, backend="numpy")
    assert not config.keep_losses and estimate_memory(config, ASSUMPTIONS).kept_losses == 0


def test_a_chunk_too_large_for_the_machine_names_the_chunk_size():
    config = RunConfig.resolve(ASSUMPTIONS, scenarios=10**5, chunk_size=10**5, backend="numpy")
    estimate = estimate_memory(config, ASSUMPTIONS, loans=2000)
    assert estimate.chunk_loans == 8 * 10**5 * 512 * 4  # float32, blocks of 512 loans
    with pytest.raises(EngineError, match="a chunk of 100,000 scenarios x 2,000 loans x 12 "):
        check_memory(config, ASSUMPTIONS, loans=2000, available=GIB)
    with pytest.raises(EngineError, match="a smaller --chunk-size"):
        check_memory(config, ASSUMPTIONS, loans=2000, available=GIB)
    assert check_memory(config, ASSUMPTIONS, loans=2000, available=1024 * GIB) == estimate
    sampled = RunConfig.resolve(
        ASSUMPTIONS, scenarios=1000, mode="sampled", backend="numpy", chunk_size=1000
    )
    assert estimate_memory(sampled, ASSUMPTIONS, 10**6).chunk_loans == 8 * 1000 * 512 * 4 + 10**9


def test_the_t_copula_draws_are_counted():
    t_copula = with_overrides(ASSUMPTIONS, {"simulation": {"copula": "t", "t_dof": 100}})
    config = RunConfig.resolve(t_copula, scenarios=8192, backend="numpy", chunk_size=8192)
    assert estimate_memory(config, t_copula).chunk_chi2 == 8192 * 12 * 100 * 4
    with pytest.raises(EngineError, match="chi-squared draws \\(t_dof = 100\\)"):
        check_memory(config, t_copula, available=10**7)


@pytest.mark.parametrize(
    "overrides",
    [{"simulation": {"t_dof": 20_000}}, {"simulation": {"steps_per_year": 100_000}}],
)
def test_sizes_of_the_assumptions_are_capped_before_a_run(overrides):
    """Issue 20 item 5: t_dof 20000 (47 GB) and steps_per_year 100000 (394 GB) are refused by
    the assumptions' ranges, before any RunConfig exists."""
    with pytest.raises(AssumptionsError, match="must be in \\[1, "):
        with_overrides(ASSUMPTIONS, overrides)


def test_an_ordinary_run_fits_and_the_machine_is_measured():
    available = available_memory_bytes()
    assert available is None or available > 0
    config = RunConfig.resolve(ASSUMPTIONS, scenarios=100_000, backend="jax", loans=2_000)
    assert estimate_memory(config, ASSUMPTIONS, 2_000).total < GIB / 4
