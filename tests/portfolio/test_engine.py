"""The chunked two-pass run: pass 1 over chunks (resume, progress, chunk-size invariance),
backend selection and refusals, and the RunResult (measures, summary, metadata)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions, stress_case
from gpucredit.portfolio.engine import (
    ChunkOutput,
    EngineError,
    NumpyBackend,
    RunResult,
    choose_backend,
    run_pass1,
    simulate,
)
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import alpha_key, risk_measures, var_es

SEED = 5
SCENARIOS = 1024
BOOK = random_book(7, 40)
METADATA_KEYS = {
    "version",
    "seed",
    "scenarios",
    "mode",
    "backend",
    "device",
    "precision",
    "chunk_size",
    "alphas",
    "copula",
    "horizon_years",
    "steps_per_year",
    "discount",
    "loans",
    "book",
    "pass1_seconds",
    "sensitivities_seconds",
    "el_sensitivity_scenarios",
    "elapsed_seconds",
    "scenarios_per_second",
    "loan_periods_per_second",
}


@pytest.fixture(scope="module")
def assumptions():
    return default_assumptions()


@pytest.fixture(scope="module")
def result(assumptions):
    return simulate(
        BOOK,
        assumptions,
        scenarios=SCENARIOS,
        seed=SEED,
        backend="numpy",
        chunk_size=300,  # uneven last chunk
        sensitivities=False,
        stress=(stress_case(assumptions, "liquidity-freeze"),),
    )


def _backend(assumptions, mode="conditional"):
    return NumpyBackend(
        assumptions.params, assumptions.grid(mode), loan_arrays(BOOK, assumptions), SEED
    )


# --------------------------------------------------------------------------- RunResult


def test_var_and_es_match_the_measures(result):
    assert isinstance(result, RunResult)
    assert result.losses_usd.shape == (SCENARIOS,)
    assert result.weights is None
    assert result.measures.alphas == (0.99, 0.999)
    for alpha in (0.99, 0.999):
        var, es = var_es(result.losses_usd, None, alpha)
        assert result.var(alpha) == result.measures.var(alpha) == var
        assert result.es(alpha) == result.measures.es(alpha) == es
        assert es >= var
    assert result.measures == risk_measures(result.losses_usd, None, (0.99, 0.999))
    with pytest.raises(KeyError):
        result.var(0.95)


def test_metadata(result, assumptions):
    meta = result.metadata
    assert METADATA_KEYS <= set(meta)
    assert meta["seed"] == SEED and meta["scenarios"] == SCENARIOS
    assert meta["mode"] == "conditional" and meta["backend"] == "numpy"
    assert meta["precision"] == "float64" and meta["chunk_size"] == 300
    assert meta["alphas"] == [0.99, 0.999]
    assert meta["loans"] == len(BOOK) and meta["book"] == BOOK.source
    assert meta["horizon_years"] == assumptions.horizon_years
    assert meta["steps_per_year"] == assumptions.steps_per_year
    assert meta["copula"] == "gaussian" and meta["discount"] is False
    assert meta["el_sensitivity_scenarios"] is None  # sensitivities off
    assert meta["sensitivities_seconds"] == 0.0
    assert meta["elapsed_seconds"] >= meta["pass1_seconds"] > 0
    assert meta["scenarios_per_second"] > 0 and meta["loan_periods_per_second"] > 0
    assert result.sensitivities is None and result.contributions is not None


def test_summary_is_json(result):
    summary = result.summary()
    text = json.dumps(summary, allow_nan=False)  # no default= hook: plain Python types only
    back = json.loads(text)
    assert set(back) == {"metadata", "measures", "stress"}
    assert back["measures"]["el"] == result.measures.el
    for alpha in (0.99, 0.999):
        tail = back["measures"]["tail"][alpha_key(alpha)]
        assert tail["var"] == result.var(alpha) and tail["es"] == result.es(alpha)
    stress = back["stress"]["liquidity-freeze"]
    assert stress["description"]
    assert set(stress["change"]) == {"el", "var_0.99", "es_0.99", "var_0.999", "es_0.999"}
    assert stress["change"]["el"] > 0


def test_summary_is_json_with_too_few_scenarios_for_standard_errors(assumptions):
    """S < 32 batches: the standard errors are nan and must come out as null."""
    small = simulate(
        BOOK, assumptions, scenarios=20, seed=SEED, backend="numpy", sensitivities=False
    )
    summary = small.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["measures"]["el_se"] is None


def test_jax_summary_is_json(assumptions):
    """The JAX run's metadata (device name, precision) is plain JSON too."""
    run = simulate(
        BOOK,
        assumptions,
        scenarios=2048,
        seed=SEED,
        backend="auto",
        precision="float64",
        chunk_size=1024,
        contributions=False,
        sensitivities=False,
    )
    meta = json.loads(json.dumps(run.summary(), allow_nan=False))["metadata"]
    assert meta["backend"] == "jax" and meta["precision"] == "float64"
    assert meta["device"].startswith(("cpu", "gpu", "cuda"))


# --------------------------------------------------------------------------- pass 1


def test_pass1_is_independent_of_the_chunk_size(assumptions):
    backend = _backend(assumptions)
    runs = [run_pass1(backend, 500, size, len(BOOK)) for size in (13, 64, 499, 500, 4096)]
    for other in runs[1:]:
        np.testing.assert_allclose(other.losses_usd, runs[0].losses_usd, rtol=1e-13)
        np.testing.assert_allclose(
            other.loan_expected_loss_usd, runs[0].loan_expected_loss_usd, rtol=1e-12
        )
        np.testing.assert_allclose(other.loan_horizon_pd, runs[0].loan_horizon_pd, rtol=1e-12)


def test_pass1_resume_progress_and_checkpoint_hook(assumptions):
    backend = _backend(assumptions)
    saved: dict[int, ChunkOutput] = {}
    progress: list[tuple[int, int]] = []
    full = run_pass1(
        backend,
        300,
        128,
        len(BOOK),
        progress=lambda done, total: progress.append((done, total)),
        on_chunk=saved.__setitem__,
    )
    assert sorted(saved) == [0, 128, 256]
    assert progress == [(128, 300), (256, 300), (300, 300)]

    # Resume with two chunks done: only the missing one is recomputed.
    computed: list[int] = []

    class Counting:
        def run_chunk(self, first, count):
            computed.append(first)
            return backend.run_chunk(first, count)

    done = {0: saved[0], 256: saved[256]}
    resumed = run_pass1(Counting(), 300, 128, len(BOOK), done=done)
    assert computed == [128]
    np.testing.assert_array_equal(resumed.losses_usd, full.losses_usd)
    np.testing.assert_array_equal(resumed.loan_expected_loss_usd, full.loan_expected_loss_usd)
    # A saved chunk of the wrong length (another chunk size) is recomputed, not trusted.
    computed.clear()
    run_pass1(Counting(), 300, 128, len(BOOK), done={256: saved[128]})
    assert computed == [0, 128, 256]


def test_mean_lgd_is_loss_over_defaulted_exposure(assumptions):
    backend = _backend(assumptions)
    out = backend.run_chunk(0, 200)
    pass1 = run_pass1(backend, 200, 200, len(BOOK))
    np.testing.assert_allclose(
        pass1.loan_mean_lgd, out.loan_loss_sum_usd / out.loan_defaulted_exposure_sum_usd
    )
    np.testing.assert_allclose(pass1.loan_horizon_pd, out.loan_default_probability_sum / 200)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "fortran"}, "unknown backend"),
        ({"backend": "cupy"}, "cupy"),
        ({"precision": "float16"}, "unknown precision"),
        ({"mode": "exact"}, "unknown mode"),
        ({"scenarios": 0}, "scenarios must be at least 1"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_bad_run_settings_are_refused(assumptions, kwargs, match):
    settings = {"scenarios": 8, "backend": "numpy", "sensitivities": False} | kwargs
    with pytest.raises(EngineError, match=match):
        simulate(BOOK, assumptions, **settings)


def test_auto_backend_is_jax():
    assert choose_backend("auto") == "jax"
    assert choose_backend("numpy") == "numpy"
