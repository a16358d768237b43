"""The chunked two-pass run: pass 1 over chunks (resume, progress, chunk-size invariance),
backend selection and refusals, the RunResult (measures, summary, metadata), and tails-only
pass 1 against a run that keeps every loss."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import SMALL_JAX_RUN, random_book
from gpucredit.kernels import cupy_engine
from gpucredit.kernels.outputs import Backend, ChunkOutput
from gpucredit.portfolio import backends
from gpucredit.portfolio.backends import JaxBackend, NumpyBackend, choose_backend
from gpucredit.portfolio.book import uniform_book
from gpucredit.portfolio.engine import RunResult, simulate
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import (
    LossHistogram,
    alpha_label,
    batch_tail_size,
    largest_losses,
    risk_measures,
    risk_measures_from_tail,
    tail_coefficients,
    tail_size,
    var_es,
)
from gpucredit.portfolio.runner import BatchOutput, run_batches, run_pass1, run_tails_pass1
from gpucredit.portfolio.settings import KEEP_LOSSES_MAX_SCENARIOS, EngineError, resolve_keep_losses
from gpucredit.portfolio.stress import StressCase, stress_case

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
    "keep_losses",
}


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
    assert set(back) == {
        "format_version",
        "metadata",
        "measures",
        "stress",
        "calibration",
        "loss_by_period",
        "offtakers",
        "warnings",
    }
    assert back["format_version"] == 2
    assert back["measures"]["el_usd"] == result.measures.el
    for alpha in (0.99, 0.999):
        tail = back["measures"]["tail"][alpha_label(alpha)]
        assert tail["var_usd"] == result.var(alpha) and tail["es_usd"] == result.es(alpha)
        assert tail["alpha"] == alpha
    stress = back["stress"]["liquidity-freeze"]
    assert stress["description"]
    assert set(stress["change"]) == {
        "el_usd",
        "var_99_usd",
        "es_99_usd",
        "var_99_9_usd",
        "es_99_9_usd",
    }
    assert stress["change"]["el_usd"] > 0


def test_summary_is_json_with_too_few_scenarios_for_standard_errors(assumptions):
    """S < 32 batches: the standard errors are nan and must come out as null."""
    small = simulate(
        BOOK, assumptions, scenarios=20, seed=SEED, backend="numpy", sensitivities=False
    )
    summary = small.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["measures"]["el_se_usd"] is None


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
        def run_chunk(self, first, count, padded_count=None):
            computed.append(first)
            return backend.run_chunk(first, count, padded_count)

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


@pytest.mark.parametrize("shifted", [False, True])
def test_short_last_chunk_reuses_the_full_chunk_program(assumptions, shifted):
    """A run's short last chunk is computed by the full chunk's program (no second compile)
    and counts only its own scenarios: the same losses, per-loan sums and likelihood ratios
    as the short chunk computed on its own, and as the NumPy reference."""
    from gpucredit.kernels import jax_engine

    loans = loan_arrays(BOOK, assumptions)
    grid = assumptions.grid()
    shift = None
    if shifted:
        shift = np.random.default_rng(3).normal(0, 0.3, (grid.periods, grid.n_factors))
    backend = JaxBackend(assumptions.params, grid, loans, 5, "float64", normal_shift=shift)
    full = backend.run_chunk(0, 64, 64)
    traces = jax_engine.TRACE_COUNTS["chunk_losses"]
    short = backend.run_chunk(64, 23, 64)
    assert jax_engine.TRACE_COUNTS["chunk_losses"] == traces  # no new compilation
    alone = backend.run_chunk(64, 23)
    reference = NumpyBackend(assumptions.params, grid, loans, 5, shift).run_chunk(64, 23)
    assert len(full.losses_usd) == 64 and len(short.losses_usd) == 23
    for field in dataclasses.fields(ChunkOutput):
        got = getattr(short, field.name)
        if got is None:
            assert not shifted and field.name == "log_weights"
            continue
        np.testing.assert_allclose(got, getattr(alone, field.name), rtol=1e-12, err_msg=field.name)
        np.testing.assert_allclose(
            got, getattr(reference, field.name), rtol=1e-9, atol=1e-6, err_msg=field.name
        )


def test_a_stress_with_an_undefined_schedule_is_refused_before_any_scenario(assumptions):
    """On a yearly grid, a stress case whose rate.level takes a floating annuity below −100% a
    period (1 + q < 0: no annuity) fails before any scenario runs, naming each such loan;
    bullet and linear floating loans (rate-free schedules) are not named."""
    from gpucredit.portfolio.assumptions import with_overrides
    from gpucredit.portfolio.loans import ScheduleError

    book = uniform_book(
        4,
        rate_type=["floating", "floating", "floating", "fixed"],
        amortization=["annuity", "bullet", "annuity", "annuity"],
        rate=[-0.5, -0.5, 0.2, -0.5],
        maturity_years=5.0,
    )
    yearly = with_overrides(assumptions, {"simulation": {"steps_per_year": 1}})
    low = with_overrides(yearly, {"rate": {"level": -0.9}})
    stress = [StressCase("too-low", "rate.level -90%", low)]
    calls = []

    def progress(done, total):
        calls.append(done)

    with pytest.raises(ScheduleError) as refused:
        simulate(book, yearly, scenarios=64, backend="numpy", stress=stress,
                 sensitivities=False, progress=progress)  # fmt: skip
    assert calls == []  # nothing ran
    lines = str(refused.value).splitlines()
    assert len(lines) == 1  # loan 0 only: r = -1.4 a year; loan 2 stays at -0.7
    assert lines[0].startswith(f"<uniform>: loan_id={book.loan_id[0]}, column rate:")
    assert "annuity is undefined" in lines[0]
    # The same loans under the base level (r = -0.46) run, finite.
    run = simulate(book, yearly, scenarios=64, backend="numpy", sensitivities=False)
    assert np.isfinite(run.es(0.99))


def test_importance_sampling_on_a_host_of_several_gpus_runs_on_one(assumptions, monkeypatch):
    """Several GPUs: plain runs shard over them; importance sampling runs on one device
    (it used to be refused, with a message naming the jax backend the user had chosen)."""
    from gpucredit.portfolio import backends

    monkeypatch.setattr(backends, "_local_gpus", lambda: ["gpu0", "gpu1"])
    loans = loan_arrays(BOOK, assumptions)
    grid = assumptions.grid()
    shift = np.zeros((grid.periods, grid.n_factors))
    backend = backends.make_backend("jax", "float64", assumptions.params, grid, loans, 1, shift)
    assert isinstance(backend, JaxBackend) and backend.normal_shift is shift
    # Its default chunk is one GPU's, not the sharded run's.
    assert backends.default_chunk_size("jax") == 2 * backends.GPU_CHUNK_SIZE
    assert backends.default_chunk_size("jax", importance_sampling=True) == backends.GPU_CHUNK_SIZE
    assert backends.gradient_chunk_size() == 4096
    monkeypatch.setattr(backends, "_local_gpus", lambda: [])
    assert backends.gradient_chunk_size() == 256


def test_every_backend_is_a_backend_returning_chunk_outputs(assumptions):
    """One protocol (kernels.outputs.Backend) and one chunk type for every backend: the CuPy
    backend's chunks once lacked a field the accumulator reads (an H100 run failed on a
    missing log_weights); now it builds the same ChunkOutput."""
    loans = loan_arrays(BOOK, assumptions)
    grid = assumptions.grid()
    for backend in (
        NumpyBackend(assumptions.params, grid, loans, 1),
        JaxBackend(assumptions.params, grid, loans, 1, "float64"),
    ):
        assert isinstance(backend, Backend), type(backend)
        chunk = backend.run_chunk(0, 8, 8)
        assert isinstance(chunk, ChunkOutput) and chunk.log_weights is None
        assert chunk.loan_loss_sum_usd.shape == (len(BOOK),)
    for method in ("run_chunk", "loan_losses_at"):
        assert callable(getattr(backends.CupyBackend, method))
    assert backends.CupyBackend.name == "cupy"


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_engine.available(), reason="needs cupy and a CUDA GPU")
def test_cupy_run_matches_the_jax_run(assumptions):
    """`simulate` end to end on the CuPy backend: the same measures as JAX (float64)."""
    settings = {"scenarios": 4096, "sensitivities": False, "precision": "float64"}
    on_cupy = simulate(BOOK, assumptions, backend="cupy", **settings)
    on_jax = simulate(BOOK, assumptions, backend="jax", **settings)
    for alpha in on_jax.measures.alphas:
        np.testing.assert_allclose(on_cupy.es(alpha), on_jax.es(alpha), rtol=1e-9)
        np.testing.assert_allclose(on_cupy.var(alpha), on_jax.var(alpha), rtol=1e-9)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "fortran"}, "unknown backend"),
        pytest.param(
            {"backend": "cupy"},
            "cupy",
            marks=pytest.mark.skipif(cupy_engine.available(), reason="cupy is available here"),
        ),
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


# --------------------------------------------------------------------------- tails-only mode


def assert_same_results(a: RunResult, b: RunResult) -> None:
    """Measures (standard errors and intervals included), tail, histogram, contributions,
    sensitivities and stress measures identical, bit for bit."""
    assert a.measures.to_dict() == b.measures.to_dict()
    np.testing.assert_array_equal(a.tail.indices, b.tail.indices)
    np.testing.assert_array_equal(a.tail.losses_usd, b.tail.losses_usd)
    assert a.histogram.bin_width_usd == b.histogram.bin_width_usd
    np.testing.assert_array_equal(a.histogram.counts, b.histogram.counts)
    ca, cb = a.contributions, b.contributions
    for field in ("expected_loss_usd", "horizon_pd", "mean_lgd"):
        np.testing.assert_array_equal(getattr(ca, field), getattr(cb, field))
    assert ca.expected_shortfall_usd.keys() == cb.expected_shortfall_usd.keys()
    for key in ca.expected_shortfall_usd:
        np.testing.assert_array_equal(
            ca.expected_shortfall_usd[key], cb.expected_shortfall_usd[key]
        )
    assert (a.sensitivities is None) == (b.sensitivities is None)
    if a.sensitivities is not None:
        np.testing.assert_array_equal(
            a.sensitivities.d_expected_loss, b.sensitivities.d_expected_loss
        )
        for key, values in a.sensitivities.d_expected_shortfall.items():
            np.testing.assert_array_equal(values, b.sensitivities.d_expected_shortfall[key])
    assert [s.measures.to_dict() for s in a.stress] == [s.measures.to_dict() for s in b.stress]


@pytest.fixture(scope="module")
def both_modes(assumptions):
    """(every loss kept, tails only): one JAX float32 run of a small book in each mode."""
    book = random_book(3, 12)
    stress = (stress_case(assumptions, "liquidity-freeze"),)
    full = simulate(book, assumptions, keep_losses=True, stress=stress, **SMALL_JAX_RUN)
    tails = simulate(book, assumptions, keep_losses=False, stress=stress, **SMALL_JAX_RUN)
    return full, tails


def test_tails_only_gives_the_numbers_of_keeping_every_loss(both_modes):
    full, tails = both_modes
    assert full.metadata["keep_losses"] is True and tails.metadata["keep_losses"] is False
    assert tails.losses_usd is None and full.losses_usd.shape == (2148,)
    assert tails.measures.n_batches == 32 and tails.sensitivities is not None
    assert_same_results(full, tails)
    # ... and they are the measures of every loss.
    assert full.measures == risk_measures(full.losses_usd, None, (0.9, 0.99))
    for alpha in (0.9, 0.99):
        assert (tails.var(alpha), tails.es(alpha)) == var_es(full.losses_usd, None, alpha)
    top = largest_losses(full.losses_usd, tail_size(2148, (0.9, 0.99)))
    np.testing.assert_array_equal(tails.tail.indices, top.indices)
    hist = LossHistogram.of(full.losses_usd)
    np.testing.assert_array_equal(tails.histogram.counts, hist.counts)
    assert tails.stress[0].measures.es(0.99) != tails.es(0.99)
    json.dumps(tails.summary(), allow_nan=False)


def test_tails_only_pass1_resumes_from_saved_batches(assumptions):
    """Batches are the checkpoint unit: a resumed run recomputes only the missing ones and
    gives the same Pass1; progress reaches every scenario."""
    backend = _backend(assumptions)
    saved: dict[int, BatchOutput] = {}
    progress: list[int] = []
    full = run_tails_pass1(
        backend, 300, 128, (0.95,), lambda done, _: progress.append(done), None,
        saved.__setitem__,
    )  # fmt: skip
    assert len(saved) == 32 and progress[-1] == 300 and progress == sorted(progress)
    assert full.losses_usd is None and full.tail.n_scenarios == 300

    computed: list[int] = []

    class Counting:
        def run_chunk(self, first, count, padded_count=None):
            computed.append(first)
            return backend.run_chunk(first, count, padded_count)

    keep = sorted(saved)[:20]  # batches of 10 or 9 scenarios: chunk 128 is the boundary
    resumed = run_tails_pass1(Counting(), 300, 128, (0.95,), done={f: saved[f] for f in keep})
    assert computed == [128, 256]  # chunk 0 was all in saved batches
    for field in ("loan_expected_loss_usd", "loan_horizon_pd", "loan_mean_lgd"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(full, field))
    assert resumed.batches == full.batches
    np.testing.assert_array_equal(resumed.tail.losses_usd, full.tail.losses_usd)
    # Batches saved at other alphas (another tail size and batch VaR) are recomputed.
    computed.clear()
    run_tails_pass1(Counting(), 300, 128, (0.99,), done=saved)
    assert computed == [0, 128, 256]
    # So are batches computed in another chunking (their floats could differ in the last bit).
    computed.clear()
    run_tails_pass1(Counting(), 300, 64, (0.95,), done=saved)
    assert computed == [0, 64, 128, 192, 256]
    # The per-loan sums are those of the run that keeps every loss, bit for bit.
    kept = run_pass1(backend, 300, 128, len(BOOK))
    np.testing.assert_array_equal(kept.loan_expected_loss_usd, full.loan_expected_loss_usd)


def test_tails_only_pass1_reruns_a_batch_that_held_too_much_of_the_tail():
    """Losses that grow with the scenario index put the whole tail in the last batch, beyond
    its margin: that batch runs again down to the merged tail's floor, and the measures are
    those of every loss."""
    calls: list[int] = []

    class Increasing:
        def run_chunk(self, first, count, padded_count=None):
            calls.append(first)
            losses, zeros = np.arange(first, first + count, dtype=np.float64), np.zeros(3)
            return ChunkOutput(losses, zeros, zeros, zeros)

    saved: dict[int, BatchOutput] = {}
    pass1 = run_tails_pass1(Increasing(), 3200, 64, (0.99,), on_batch=saved.__setitem__)
    assert len(calls) == 50 + 2  # every chunk once, then the last batch's two chunks again
    assert len(saved) == 32 and saved[3100].tail.indices.size == 100  # all above the floor
    losses = np.arange(3200, dtype=np.float64)
    want = risk_measures(losses, None, (0.99,))
    assert risk_measures_from_tail(pass1.tail, pass1.batches, (0.99,)).to_dict() == want.to_dict()


def test_keep_losses_default_and_refusal(assumptions):
    assert resolve_keep_losses(None, KEEP_LOSSES_MAX_SCENARIOS) is True
    assert resolve_keep_losses(None, KEEP_LOSSES_MAX_SCENARIOS + 1) is False
    assert resolve_keep_losses(None, 10**9, importance_sampling=True) is True
    assert resolve_keep_losses(False, 100) is False and resolve_keep_losses(True, 10**9)
    grid = assumptions.grid()
    shift = np.zeros((grid.periods, grid.n_factors))
    with pytest.raises(EngineError, match="importance sampling"):
        simulate(BOOK, assumptions, scenarios=64, backend="numpy", normal_shift=shift,
                 keep_losses=False)  # fmt: skip


def test_tails_only_stress_and_sampled_mode(assumptions):
    """Sampled mode (lumpy losses, many ties at zero) and a stress case, numpy backend."""
    stressed = StressCase("freeze", "", stress_case(assumptions, "liquidity-freeze").assumptions)
    kwargs = dict(scenarios=700, seed=3, backend="numpy", chunk_size=128, mode="sampled")
    kwargs |= dict(sensitivities=False, stress=(stressed,), alphas=(0.95, 0.99))
    full = simulate(BOOK, assumptions, keep_losses=True, **kwargs)
    tails = simulate(BOOK, assumptions, keep_losses=False, **kwargs)
    assert tails.histogram.zero_count == int(np.sum(full.losses_usd == 0)) > 0
    assert_same_results(full, tails)


class _GivenLosses:
    """A backend whose scenario s has the loss `losses[s]` and per-loan sums that depend on
    the chunk (so a wrong chunk order or ownership shows)."""

    def __init__(self, losses: np.ndarray):
        self.losses = np.asarray(losses, dtype=np.float64)

    def run_chunk(self, first, count, padded_count=None):
        losses = self.losses[first : first + count].copy()
        sums = np.array([losses.sum(), 0.1 * first + count, float(count)])
        return ChunkOutput(losses, sums, sums * 0.5, sums + 1.0)


def assert_tails_pass1_is_exact(losses, alphas, chunk_size) -> None:
    """Tails-only pass 1 over `losses` gives exactly what keeping every loss gives: the top k
    (ties kept), the tail sets and coefficients, the measures, histogram and per-loan sums."""
    S = losses.size
    backend = _GivenLosses(losses)
    tails = run_tails_pass1(backend, S, chunk_size, alphas)
    kept = run_pass1(backend, S, chunk_size, 3)
    whole = largest_losses(losses, tail_size(S, alphas))
    np.testing.assert_array_equal(tails.tail.indices, whole.indices)
    np.testing.assert_array_equal(tails.tail.losses_usd, whole.losses_usd)
    for alpha in set(alphas):
        idx, coef = tails.tail.coefficients(alpha)
        want_idx, want_coef = tail_coefficients(losses, None, alpha)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(coef, want_coef)
    got = risk_measures_from_tail(tails.tail, tails.batches, alphas)
    want = risk_measures(losses, None, alphas, n_batches=len(tails.batches))
    assert got.to_dict() == want.to_dict()
    np.testing.assert_array_equal(tails.histogram.counts, LossHistogram.of(losses).counts)
    assert tails.histogram.bin_width_usd == LossHistogram.of(losses).bin_width_usd
    for field in ("loan_expected_loss_usd", "loan_horizon_pd", "loan_mean_lgd"):
        np.testing.assert_array_equal(getattr(tails, field), getattr(kept, field))


def _adversarial(values, layout: str, rng) -> np.ndarray:
    """The losses `values` laid out to put the tail where the batches' margins are tightest:
    sorted either way, or the largest m contiguous at a random place (most of the run's top k
    in one or two batches) and the others shuffled around them."""
    losses = np.asarray(values, dtype=np.float64)
    if layout == "ascending":
        return np.sort(losses)
    if layout == "descending":
        return np.sort(losses)[::-1].copy()
    if layout == "block":
        ranked = np.sort(losses)[::-1]
        batches = run_batches(losses.size)
        m = int(rng.integers(1, 2 * batches[0][1] + 2))  # up to two batches
        rest = rng.permutation(ranked[m:])
        start = int(rng.integers(0, rest.size + 1))
        if rng.random() < 0.5:  # at a batch's first scenario
            start = min(batches[int(rng.integers(0, len(batches)))][0], rest.size)
        out = np.concatenate([rest[:start], ranked[:m], rest[start:]])
        # The rest of the batches holding the block at the smallest loss: nothing of theirs
        # between their cut and the run's k-th largest.
        for first, count in batches:
            if first < start + m and start < first + count:
                lo, hi = max(first, start), min(first + count, start + m)
                out[first:lo], out[hi : first + count] = ranked[-1], ranked[-1]
        return out
    return losses


@settings(max_examples=150, deadline=None)
@example(S=1997, n_values=60, layout="block", alphas=[0.9], chunk_size=64, seed=1)
@given(
    st.integers(1, 4000),
    st.sampled_from([2, 7, 60, 10**6]),
    st.sampled_from(["random", "ascending", "descending", "block"]),
    st.lists(st.sampled_from([0.5, 0.9, 0.95, 0.99, 0.999999]), min_size=1, max_size=3),
    st.sampled_from([1, 7, 64, 1000]),
    st.integers(0, 2**32 - 1),
)
def test_tails_only_pass1_is_exact_for_any_losses(S, n_values, layout, alphas, chunk_size, seed):
    """Whatever the losses (few distinct values: ties at every cut; most of the tail in one
    batch; runs shorter than 32 scenarios; duplicate alphas; alpha close to 1), tails-only
    pass 1 is the pass 1 that keeps every loss."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, n_values, S) * 1e4
    losses = _adversarial(values, layout, rng)
    assert_tails_pass1_is_exact(losses, tuple(alphas), chunk_size)


def test_tails_only_pass1_after_a_rerun_batch_still_drops_less_than_its_floor():
    """A batch taken again down to the merged k-th loss v keeps every loss >= v; it is
    complete there even when its smallest kept loss lies above the new k-th loss (it has no
    loss in between). 25 huge losses in batch 0 (margin 20 of k = 35), zeros around them:
    the rerun keeps exactly those 25, which once made the merge refuse the run."""
    S, alphas = 3200, (0.99,)
    losses = np.random.default_rng(0).uniform(0.0, 1000.0, S)
    losses[:100] = 0.0
    losses[:25] = 1e6 + np.arange(25)
    assert tail_size(S, alphas) == 35 and batch_tail_size(S, alphas, 100) == 20
    assert_tails_pass1_is_exact(losses, alphas, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alphas": (0.99, 1.5)}, r"alpha must be in \(0, 1\), got 1.5"),
        ({"alphas": (0.0,)}, r"alpha must be in \(0, 1\), got 0"),
        ({"alphas": (1.0,)}, r"alpha must be in \(0, 1\), got 1"),
        ({"alphas": (-0.5,)}, r"alpha must be in \(0, 1\)"),
        ({"alphas": (float("nan"),)}, r"alpha must be in \(0, 1\), got nan"),
        ({"alphas": ("high",)}, r"alpha must be a number"),
        ({"chunk_size": -8}, "chunk_size must be at least 1, got -8"),
        ({"chunk_size": 0}, "chunk_size must be at least 1, got 0"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number"),
    ],
)
def test_bad_alphas_and_chunk_sizes_are_refused_before_any_work(
    assumptions, monkeypatch, kwargs, match
):
    """Refused up front with an EngineError, not after pass 1 (a ValueError from risk.py,
    or a pass 1 that folded nothing)."""
    import gpucredit.portfolio.engine as engine

    def no_work(*args, **kw):
        raise AssertionError("simulate started work before checking its arguments")

    monkeypatch.setattr(engine, "loan_arrays", no_work)
    monkeypatch.setattr(engine, "Simulation", no_work)
    settings = {"scenarios": 64, "backend": "numpy", "sensitivities": False} | kwargs
    with pytest.raises(EngineError, match=match):
        simulate(BOOK, assumptions, **settings)


def test_run_config_is_resolved_once_and_carried_by_the_result(assumptions):
    """simulate's keywords are a RunConfig: defaults from the assumptions and the backend,
    checked once; a resolved config gives the same run; both at once is refused."""
    from gpucredit.portfolio.config import RunConfig

    config = RunConfig.resolve(assumptions, scenarios=256, backend="numpy", sensitivities=False)
    assert (config.seed, config.mode, config.alphas) == (
        assumptions.seed,
        "conditional",
        (0.99, 0.999),
    )
    assert config.chunk_size == NumpyBackend.default_chunk_size and config.keep_losses
    by_config = simulate(BOOK, assumptions, config)
    by_keywords = simulate(BOOK, assumptions, scenarios=256, backend="numpy", sensitivities=False)
    np.testing.assert_array_equal(by_config.losses_usd, by_keywords.losses_usd)
    assert by_config.config is config and by_keywords.config.scenarios == 256
    with pytest.raises(TypeError, match="not both"):
        simulate(BOOK, assumptions, config, scenarios=512)
    with pytest.raises(EngineError, match="normal_shift must be"):
        RunConfig.resolve(assumptions, normal_shift=np.zeros((2, 2)))


def test_each_prepared_simulation_is_built_once_per_run(assumptions, monkeypatch):
    """One run builds one backend for pass 1 and the contributions, one for the gradients,
    one for the calibration's year-1 pass and one per stress case, never one per pass."""
    built = []
    original = backends.Simulation.build

    def counting_build(self):
        built.append((self.gradient, self.grid.periods, id(self.params)))
        return original(self)

    monkeypatch.setattr(backends.Simulation, "build", counting_build)
    case = stress_case(assumptions, "paper-metrics")
    simulate(
        BOOK, assumptions, scenarios=512, backend="numpy", chunk_size=128, stress=(case,),
        el_sensitivity_scenarios=64,
    )  # fmt: skip
    base = assumptions.grid().periods
    year_one = assumptions.steps_per_year
    assert sorted((gradient, periods) for gradient, periods, _ in built) == sorted(
        [(False, base), (False, base), (True, base), (False, year_one)]
    )  # pass 1 and contributions share one; the gradients; the year-1 pass; the stress
    stressed_or_base = {
        params for gradient, periods, params in built if (gradient, periods) == (False, base)
    }
    assert stressed_or_base == {id(assumptions.params), id(case.assumptions.params)}


def test_run_result_answers_a_notebook_user(assumptions):
    """`el`, `var`/`es` with their standard errors, tables as Arrow (and pandas when it is
    installed), and a repr with each measure as a share of exposure."""
    result = simulate(
        BOOK, assumptions, scenarios=512, backend="numpy", el_sensitivity_scenarios=64
    )
    assert (result.el, result.el_se) == (result.measures.el, result.measures.el_se)
    # 512 scenarios: 0.16 tail scenarios a batch at 99%, too few for an honest interval
    assert np.isnan(result.es_se(0.99)) and np.isfinite(result.measures.at(0.99).es_se)
    assert "run at least 10,000 scenarios" in result.warnings[0]
    assert result.exposure_usd == pytest.approx(BOOK.balance_usd.sum())
    measures = result.to_arrow("measures").to_pydict()
    assert measures["measure"] == ["el", "var", "es", "var", "es"]
    assert measures["value_usd"][2] == result.es(0.99)
    assert measures["share_of_exposure"][0] == pytest.approx(result.el / result.exposure_usd)
    assert result.to_arrow("contributions").num_rows == len(BOOK)
    assert result.to_arrow("losses").column("loss_usd").to_numpy().tolist() == list(
        result.losses_usd
    )
    assert result.to_arrow("sensitivities").num_rows == len(result.sensitivities.parameter)
    with pytest.raises(ValueError, match="unknown table 'tails'"):
        result.table("tails")
    text = repr(result)
    assert "ES 99.9%" in text and f"{result.el / result.exposure_usd:.2%} of exposure" in text
    assert "<table>" in result._repr_html_()
    pd = pytest.importorskip("pandas")
    frame = result.to_pandas("contributions")
    assert isinstance(frame, pd.DataFrame) and list(frame["loan_id"]) == list(BOOK.loan_id)


def test_importance_sampling_is_one_keyword(assumptions):
    """simulate(importance_sampling=True) is the two-step recipe (pilot design point, then a
    shifted run) in one call, with the same numbers."""
    from gpucredit.portfolio.engine import importance_shift

    book = random_book(3, 40)  # the book of tests/portfolio/test_importance_sampling.py
    settings = dict(scenarios=1024, backend="jax", precision="float32", sensitivities=False)
    settings |= dict(calibration=False, contributions=False)
    one_call = simulate(book, assumptions, importance_sampling=True, **settings)
    shift, _ = importance_shift(book, assumptions, assumptions.seed, 0.999, 1024, "jax", "float32")
    two_steps = simulate(book, assumptions, normal_shift=shift, **settings)
    np.testing.assert_array_equal(one_call.config.normal_shift, shift)
    np.testing.assert_array_equal(one_call.losses_usd, two_steps.losses_usd)
    np.testing.assert_array_equal(one_call.weights, two_steps.weights)


@pytest.mark.parametrize(
    ("scenarios", "backend", "chunk"),
    [(256, "jax", 256), (1000, "jax", 1024), (100_000, "jax", 8192), (100, "numpy", 128)],
)
def test_a_small_run_computes_no_larger_chunk_than_it_needs(assumptions, scenarios, backend, chunk):
    """The default chunk is the next power of two of the run's scenarios, at most the
    backend's default (a 256-scenario JAX run once computed a padded 8,192-scenario chunk)."""
    from gpucredit.portfolio.config import RunConfig

    assert RunConfig.resolve(assumptions, scenarios=scenarios, backend=backend).chunk_size == chunk


def test_a_phase_aware_progress_sees_every_phase_of_the_run(assumptions):
    """One display across the run: pass 1, contributions, the year-1 pass, sensitivities and
    each stress case, each reaching its total; a plain callable sees pass 1 only."""
    seen: dict[str, list[tuple[int, int]]] = {}

    class Recorder:
        def phase(self, name, total):
            seen[name] = []

        def __call__(self, done, total):
            seen[list(seen)[-1]].append((done, total))

    case = stress_case(assumptions, "paper-metrics")
    settings = dict(scenarios=512, backend="numpy", chunk_size=128, el_sensitivity_scenarios=64)
    simulate(BOOK, assumptions, stress=(case,), progress=Recorder(), **settings)
    assert list(seen) == [
        "pass 1", "contributions", "calibration (year 1)", "sensitivities", "stress paper-metrics",
        "loss by period",
    ]  # fmt: skip
    for name, updates in seen.items():
        assert updates and updates[-1][0] == updates[-1][1] > 0, name
    plain: list[tuple[int, int]] = []
    simulate(BOOK, assumptions, progress=lambda d, t: plain.append((d, t)), **settings)
    assert plain[-1] == (512, 512) and all(t == 512 for _, t in plain)
