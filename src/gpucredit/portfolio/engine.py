"""The chunked two-pass run (docs/spec.md, Data flow).

Pass 1 streams scenario chunks through a backend and keeps per-loan sums (EL_i, horizon PD,
defaulted exposure) and either every portfolio loss (one float per scenario: `run_pass1`) or,
in tails-only mode (`run_tails_pass1`, the default beyond `KEEP_LOSSES_MAX_SCENARIOS`), per
batch of the batch-means standard errors only its largest losses with their indices, its own
statistics and a histogram (`BatchOutput`). Both give the same risk measures: VaR and ES from
the run's largest losses (`risk.LossTail`), standard errors from the same batches. The tail
scenarios of each α are then regenerated from their indices (pass 2): per-loan tail losses give
the Euler ES contributions and reverse-mode AD on the same scenarios gives the sensitivities.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit import __version__
from gpucredit.kernels import reference
from gpucredit.kernels.params import LoanArrays, ModelGrid, ModelParams
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.calibration import (
    YEAR_ONE_MAX_SCENARIOS,
    calibration_table,
    paper_vs_path,
    year_one_assumptions,
)
from gpucredit.portfolio.contributions import Contributions, make_contributions, tail_contributions
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.risk import (
    BatchStatistics,
    LossHistogram,
    LossTail,
    RiskMeasures,
    alpha_key,
    batch_bounds,
    batch_count,
    batch_statistics,
    batch_tail_size,
    largest_losses,
    merge_tails,
    risk_measures,
    risk_measures_from_tail,
    short_tails,
    tail_sets,
    tail_size,
)
from gpucredit.portfolio.sensitivities import Sensitivities, tail_sensitivities

BACKENDS = ("auto", "jax", "numpy", "cupy")
PRECISIONS = ("float32", "float64")
MODES = ("conditional", "sampled")

KEEP_LOSSES_MAX_SCENARIOS = 50_000_000
"""The most scenarios whose every loss a run keeps by default (400 MB of losses, a few GB
while they are sorted, and as big a losses.parquet); beyond it pass 1 is tails-only."""


class EngineError(ValueError):
    """A run that cannot start (unknown backend, bad scenario count, ...)."""


@dataclass(frozen=True)
class ChunkOutput:
    """What pass 1 keeps of one chunk of scenarios."""

    losses_usd: np.ndarray  # [S] portfolio loss per scenario
    loan_loss_sum_usd: np.ndarray  # [N] Σ over the chunk's scenarios of L_i
    loan_default_probability_sum: np.ndarray  # [N] Σ of 1 − S_i(T) (or default indicators)
    loan_defaulted_exposure_sum_usd: np.ndarray  # [N] Σ of Σ_t DF d_i EAD_i
    # Importance sampling: [S] ln w(ω), and the per-loan sums above are Σ w(ω) x(ω). None
    # without it (w = 1).
    log_weights: np.ndarray | None = None


class NumpyBackend:
    """The float64 reference: slow by design, the yardstick of every other backend."""

    name = "numpy"
    precision = "float64"
    device = "cpu (numpy reference)"
    default_chunk_size = 256

    def __init__(
        self,
        params: ModelParams,
        grid: ModelGrid,
        loans: LoanArrays,
        seed: int,
        normal_shift: np.ndarray | None = None,
    ):
        self.params, self.grid, self.loans, self.seed = params, grid, loans, seed
        self.normal_shift = normal_shift

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """Scenarios [first, first + count). `padded_count` (the run's chunk size) is for
        compiled backends; the reference compiles nothing and ignores it."""
        scenarios = np.arange(first_scenario, first_scenario + count, dtype=np.uint32)
        out = reference.simulate_outcomes(
            self.params, self.grid, self.loans, self.seed, scenarios, self.normal_shift
        )
        shifted = self.normal_shift is not None
        w = np.exp(out.log_likelihood_ratio) if shifted else np.ones(count)
        return ChunkOutput(
            losses_usd=out.loss_usd.sum(axis=1),
            loan_loss_sum_usd=w @ out.loss_usd,
            loan_default_probability_sum=w @ out.default_probability,
            loan_defaulted_exposure_sum_usd=w @ out.defaulted_exposure_usd,
            log_weights=out.log_likelihood_ratio if shifted else None,
        )

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        """[S, N] loss per loan at the given scenario indices."""
        return reference.simulate_chunk(
            self.params, self.grid, self.loans, self.seed, scenarios, self.normal_shift
        )


class JaxBackend:
    """The jit-compiled JAX kernels (CPU or GPU), float32 or float64."""

    name = "jax"
    default_chunk_size = 8192

    def __init__(
        self,
        params: ModelParams,
        grid: ModelGrid,
        loans: LoanArrays,
        seed: int,
        precision: str,
        block_size: int = 512,
        normal_shift: np.ndarray | None = None,
    ):
        import jax

        from gpucredit.kernels import jax_engine

        self._engine = jax_engine
        self.params, self.grid, self.seed, self.precision = params, grid, seed, precision
        self.normal_shift = normal_shift
        self.n_loans = len(loans.gpu_count)
        # prepare_loans itself shrinks the block of a small book to the next power of two
        # >= N, so books that pad to the same shape share one compilation; passing
        # min(block_size, N) here would give every book size its own shape (and compile).
        self.blocks = jax_engine.prepare_loans(loans, precision, block_size)
        self.device = device_name(jax.devices()[0])
        self._loans, self._block_size = loans, block_size
        self._schedule_tangent = None  # d(schedule leaves)/d rate.level, built on first use

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """Scenarios [first, first + count), computed by the program of `padded_count`
        scenarios when that is more (the run's chunk size: its short last chunk then reuses
        the full chunks' compilation) and the rest dropped."""
        size = max(count, padded_count or 0)
        if first_scenario + size > 2**32:  # indices are uint32
            size = count
        log_weights = None
        if self.normal_shift is not None:
            log_weights = np.asarray(
                self._engine.importance_log_weights(
                    self.grid, self.seed, first_scenario, size, self.normal_shift
                )
            )
        out = self._engine.chunk_outcomes(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            first_scenario,
            size,
            normal_shift=self.normal_shift,
            scenario_weights=None if log_weights is None else np.exp(log_weights),
            valid_count=count,
        )
        losses, loss_sum, pd_sum, ead_sum = (np.asarray(x, dtype=np.float64) for x in out)
        if log_weights is not None:
            log_weights = log_weights[:count]
        return ChunkOutput(losses[:count], loss_sum, pd_sum, ead_sum, log_weights)

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        out = self._engine.loan_losses_at(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            np.asarray(scenarios, np.uint32),
            normal_shift=self.normal_shift,
        )
        return np.asarray(out, dtype=np.float64)

    @property
    def schedule_rate_tangent(self) -> tuple:
        """d(schedule leaves)/d rate.level (`jax_engine.schedule_tangent`), built on first use."""
        if self._schedule_tangent is None:
            self._schedule_tangent = self._engine.schedule_tangent(
                self._loans, float(self.params.rate_level), self.grid.steps_per_year,
                self._block_size,
            )  # fmt: skip
        return self._schedule_tangent

    def weighted_gradient(self, scenarios: np.ndarray, coefficients: np.ndarray) -> ModelParams:
        """Σ_j c_j ∂L(ω_j)/∂θ for every leaf θ of ModelParams (conditional mode); ∂/∂rate.level
        includes r(0)'s effect on the floating annuities' schedules (docs/spec.md §3)."""
        _, grads = self._engine.weighted_loss_gradient(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            np.asarray(scenarios, np.uint32),
            np.asarray(coefficients),
            normal_shift=self.normal_shift,
            schedule_rate_tangent=self.schedule_rate_tangent,
        )
        return grads


def device_name(device) -> str:
    """'gpu (NVIDIA H100 80GB HBM3)', or 'cpu (2 cores)'."""

    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, jax)"
    return f"{device.platform} ({getattr(device, 'device_kind', 'unknown')})"


def choose_backend(name: str) -> str:
    """`auto` is JAX (CPU or GPU). The CuPy kernel is chosen only by name: it ran 1.62× JAX's
    forward on an H100, but a whole run on it has not been checked on a GPU yet
    (bench/results/gpu-h100.md)."""
    if name not in BACKENDS:
        raise EngineError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cupy":
        from gpucredit.kernels import cupy_engine

        if not cupy_engine.available():
            raise EngineError(
                "the cupy backend needs CuPy and an NVIDIA GPU (pip install 'gpucredit[gpu]')"
            )
    return "jax" if name == "auto" else name


def make_backend(
    name: str,
    precision: str,
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    normal_shift: np.ndarray | None = None,
):
    """The backend `name` for a run; `normal_shift` [T, K] turns on importance sampling."""
    name = choose_backend(name)
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose float32 or float64")
    if name == "numpy":
        return NumpyBackend(params, grid, loans, seed, normal_shift)
    if name == "cupy":
        if normal_shift is not None:
            raise EngineError("importance sampling runs on the jax and numpy backends, not cupy")
        from gpucredit.kernels.cupy_engine import CupyBackend

        return CupyBackend(params, grid, loans, seed, precision)
    if len(_local_gpus()) > 1 and normal_shift is None:
        from gpucredit.portfolio.distributed import ShardedJaxBackend  # several GPUs, one host

        return ShardedJaxBackend(params, grid, loans, seed, precision)
    # One device; importance sampling on a host of several GPUs too (the sharded chunks do
    # not carry likelihood ratios).
    return JaxBackend(params, grid, loans, seed, precision, normal_shift=normal_shift)


@dataclass(frozen=True)
class BackendSpec:
    """Everything that builds a backend (what a Dask worker receives once). `gradient`: the
    conditional-mode JAX backend of the sensitivities pass."""

    backend: str
    precision: str
    params: ModelParams
    grid: ModelGrid
    loans: LoanArrays
    seed: int
    normal_shift: np.ndarray | None = None
    gradient: bool = False

    def build(self):
        if self.gradient:
            return JaxBackend(
                self.params,
                self.grid._replace(mode="conditional"),
                self.loans,
                self.seed,
                self.precision,
                normal_shift=self.normal_shift,
            )
        return make_backend(
            self.backend,
            self.precision,
            self.params,
            self.grid,
            self.loans,
            self.seed,
            self.normal_shift,
        )


def _local_gpus() -> list:
    import jax

    return [d for d in jax.devices() if d.platform == "gpu"]


GPU_CHUNK_SIZE = 65536  # scenarios per GPU and chunk: launch overhead is < 5% from here on


def gradient_chunk_size() -> int:
    """Tail scenarios per gradient task, decided on the driver: 256 on a CPU; 4,096 where JAX
    (which computes every gradient) has a GPU, since there a task of 256 is launch-bound
    (H100, example book: the tail forward takes 4.7 ms at 256 scenarios and 5.9 ms at 4,096;
    bench/results/gpu-h100.md). One value for the local and the Dask runner, so their
    results agree."""
    return 4096 if _local_gpus() else 256


def default_chunk_size(backend: str, importance_sampling: bool = False) -> int:
    """Scenarios per chunk when none is given, the one rule for the CLI and `simulate` (the
    chunking fixes the float32 numbers): the backend's own default on a CPU (small for the
    NumPy reference, which materialises [S, N] per period), 65,536 per GPU (CuPy, or JAX on
    one or more GPUs; importance sampling runs on one GPU): small chunks leave a GPU idle
    between kernel launches."""
    name = choose_backend(backend)
    if name == "numpy":
        return NumpyBackend.default_chunk_size
    if name == "cupy":
        return GPU_CHUNK_SIZE
    gpus = len(_local_gpus())
    if importance_sampling:
        gpus = min(gpus, 1)  # make_backend: one device
    return GPU_CHUNK_SIZE * gpus if gpus else JaxBackend.default_chunk_size


@dataclass(frozen=True)
class Pass1:
    """Pass 1 of a run: the per-loan sums over all scenarios, and either every per-scenario
    loss or (tails-only mode) the run's largest losses, its batches' statistics and a
    histogram."""

    losses_usd: np.ndarray | None  # [S], or None in tails-only mode
    loan_expected_loss_usd: np.ndarray  # [N] EL_i
    loan_horizon_pd: np.ndarray  # [N]
    loan_mean_lgd: np.ndarray  # [N] EL_i / expected defaulted exposure (nan if none)
    elapsed_seconds: float
    log_weights: np.ndarray | None = None  # [S] ln w(ω) under importance sampling
    # Tails-only mode: the top `tail_size` losses, every batch's statistics, the histogram.
    tail: LossTail | None = None
    batches: tuple[BatchStatistics, ...] | None = None
    histogram: LossHistogram | None = None
    # (first, count, worker address) of each pass-1 task that ran on Dask: pass 2 sends the
    # tasks of those scenarios to the same worker. Empty in one process.
    owners: tuple[tuple[int, int, str], ...] = ()

    @property
    def weights(self) -> np.ndarray | None:
        """[S] the likelihood ratios w(ω) (E[w] = 1), or None without importance sampling."""
        return None if self.log_weights is None else np.exp(self.log_weights)


ProgressCallback = Callable[[int, int], None]  # (scenarios done, scenarios in all)


def run_batches(scenarios: int) -> list[tuple[int, int]]:
    """``(first, count)`` of the batches of a run (`risk.batch_bounds` of `risk.batch_count`):
    the batch-means batches in both modes, and the pass-1 tasks of tails-only mode."""
    return batch_bounds(scenarios, batch_count(scenarios))


class _LoanSums:
    """Per-loan sums folded batch by batch: Σ_batches (Σ_chunks the batch owns) in order, the
    same floating-point additions whether the chunks or the batches' sums arrive (a chunk
    belongs to the batch holding its first scenario)."""

    def __init__(self, n_loans: int):
        self.totals = np.zeros((3, n_loans))

    def add_batch(self, sums: np.ndarray) -> None:
        self.totals += sums

    def result(self, scenarios: int, elapsed_seconds: float, **fields) -> Pass1:
        loss_sum, pd_sum, ead_sum = self.totals
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_lgd = np.where(ead_sum > 0, loss_sum / ead_sum, np.nan)
        return Pass1(
            # Σ w x / S: unbiased under importance sampling (E[w] = 1), plain means without.
            loan_expected_loss_usd=loss_sum / scenarios,
            loan_horizon_pd=pd_sum / scenarios,
            loan_mean_lgd=mean_lgd,
            elapsed_seconds=elapsed_seconds,
            **fields,
        )


def _chunk_sums(chunk: ChunkOutput) -> np.ndarray:
    """[3, N] the per-loan sums of a chunk."""
    return np.stack(
        [
            chunk.loan_loss_sum_usd,
            chunk.loan_default_probability_sum,
            chunk.loan_defaulted_exposure_sum_usd,
        ]
    ).astype(np.float64)


class Pass1Accumulator:
    """Folds chunk outputs into a `Pass1` in scenario order (whatever order they arrive in),
    so every runner adds the per-loan sums in the same order and gets the same numbers."""

    def __init__(self, scenarios: int, n_loans: int):
        self.scenarios = scenarios
        self.losses = np.empty(scenarios)
        self.log_weights: np.ndarray | None = None
        self.sums = _LoanSums(n_loans)
        self.batch_firsts = np.array([f for f, _ in run_batches(scenarios)])
        self.batch = 0  # the batch whose chunks `batch_sums` is adding
        self.batch_sums = np.zeros((3, n_loans))
        self.next_first = 0
        self.pending: dict[int, ChunkOutput] = {}

    def add(self, first: int, chunk: ChunkOutput) -> None:
        self.pending[first] = chunk
        while self.next_first in self.pending:
            first = self.next_first
            chunk = self.pending.pop(first)
            count = len(chunk.losses_usd)
            self.losses[first : first + count] = chunk.losses_usd
            if chunk.log_weights is not None:
                if self.log_weights is None:
                    self.log_weights = np.zeros(self.scenarios)
                self.log_weights[first : first + count] = chunk.log_weights
            batch = int(np.searchsorted(self.batch_firsts, first, side="right")) - 1
            if batch != self.batch:
                self.sums.add_batch(self.batch_sums)
                self.batch, self.batch_sums = batch, np.zeros_like(self.batch_sums)
            self.batch_sums += _chunk_sums(chunk)
            self.next_first = first + count

    def result(self, elapsed_seconds: float, owners: tuple = ()) -> Pass1:
        if self.next_first != self.scenarios:  # a bug, not a user error
            raise RuntimeError(f"pass 1 folded {self.next_first} of {self.scenarios} scenarios")
        self.sums.add_batch(self.batch_sums)
        self.batch_sums = np.zeros_like(self.batch_sums)
        return self.sums.result(
            self.scenarios,
            elapsed_seconds,
            losses_usd=self.losses,
            log_weights=self.log_weights,
            owners=owners,
        )


def run_pass1(
    backend,
    scenarios: int,
    chunk_size: int,
    n_loans: int,
    progress: ProgressCallback | None = None,
    done: dict[int, ChunkOutput] | None = None,
    on_chunk: Callable[[int, ChunkOutput], None] | None = None,
) -> Pass1:
    """Stream chunks [first, first + chunk) through the backend.

    `done` holds chunks already computed (resume), keyed by their first scenario; `on_chunk`
    is called after each new chunk (checkpointing).
    """
    start = time.perf_counter()
    fold = Pass1Accumulator(scenarios, n_loans)
    done = done or {}
    for first in range(0, scenarios, chunk_size):
        count = min(chunk_size, scenarios - first)
        chunk = done.get(first)
        if not isinstance(chunk, ChunkOutput) or len(chunk.losses_usd) != count:
            chunk = backend.run_chunk(first, count, chunk_size)
            if on_chunk is not None:
                on_chunk(first, chunk)
        fold.add(first, chunk)
        if progress is not None:
            progress(first + count, scenarios)
    return fold.result(time.perf_counter() - start)


# --------------------------------------------------------------------------- tails-only mode


@dataclass(frozen=True)
class BatchOutput:
    """What tails-only pass 1 keeps of one batch ``[first, first + count)``: its largest
    losses, its statistics, its histogram and per-loan sums; no per-scenario loss."""

    first: int
    tail: LossTail  # its top risk.batch_tail_size losses (or all >= a floor), run indices
    statistics: BatchStatistics  # count, Σ L, Σ (L − mean)², its own VaR and ES per α
    histogram: LossHistogram
    loan_sums: np.ndarray  # [3, N] Σ L_i, Σ PD_i, Σ EAD_i over the chunks the batch owns
    chunk_size: int | None = None  # the chunking it was computed in (None: unknown)

    @property
    def count(self) -> int:
        return self.statistics.count


def run_batch(
    backend,
    first: int,
    count: int,
    chunk_size: int,
    scenarios: int,
    alphas: Sequence[float],
    progress: Callable[[int], None] | None = None,
    floor: float = math.inf,
) -> BatchOutput:
    """Tails-only pass 1 over the batch ``[first, first + count)`` of a run of `scenarios`.

    The batch's scenarios are computed in the run's own chunks (starting at multiples of
    `chunk_size`, the last one short), as `run_pass1` computes them, so every loss is the same
    float in both modes. A chunk across the batch's edge is computed whole and its losses
    outside the batch dropped (at most one extra chunk a batch edge; `batch_count` keeps
    batches of large runs thousands of chunks long; in one process `_LastChunk` computes it
    once); its per-loan sums count in the batch holding its first scenario, as in
    `Pass1Accumulator`. The tail kept is the batch's top `risk.batch_tail_size`, or every loss
    at or above `floor` where that is more (the rerun of a short batch: `TailsAccumulator`).
    `progress(n)`: n more scenarios done.
    """
    losses = np.empty(count)
    sums = None
    for start in range(first - first % chunk_size, first + count, chunk_size):
        size = min(chunk_size, scenarios - start)
        chunk = backend.run_chunk(start, size, chunk_size)
        if chunk.log_weights is not None:  # pragma: no cover - simulate refuses it first
            raise EngineError("tails-only mode does not take importance sampling")
        lo, hi = max(start, first), min(start + size, first + count)
        losses[lo - first : hi - first] = chunk.losses_usd[lo - start : hi - start]
        part = _chunk_sums(chunk)
        if sums is None:
            sums = np.zeros_like(part)
        if start >= first:  # the batch owns this chunk
            sums += part
        if progress is not None:
            progress(hi - lo)
    return BatchOutput(
        first=first,
        tail=largest_losses(losses, batch_tail_size(scenarios, alphas, count), first, floor),
        statistics=batch_statistics(losses, alphas),
        histogram=LossHistogram.of(losses),
        loan_sums=sums,
        chunk_size=chunk_size,
    )


class TailsAccumulator:
    """Folds `BatchOutput`s into a tails-only `Pass1`, in batch order whatever order they
    arrive in (per-loan sums as `Pass1Accumulator` adds them).

    A runner adds every batch (`missing` says which are still to run), then reruns the
    batches of `short()`, if any, with their floor, then takes the `result`.
    """

    def __init__(self, scenarios: int, alphas: Sequence[float]):
        self.scenarios = scenarios
        self.alphas = tuple(alphas)
        self.batches = run_batches(scenarios)
        self.outputs: dict[int, BatchOutput] = {}
        self.empty = batch_statistics([], alphas)  # also: the alphas as batches record them

    def missing(
        self, done: dict | None = None, chunk_size: int | None = None
    ) -> list[tuple[int, int]]:
        """The non-empty batches still to run; those in `done` (resume: first -> output of
        the same batch, alphas and chunk size, so every loss and sum is the same float) are
        taken as they are."""
        todo = []
        for first, count in self.batches:
            if count == 0:
                continue
            known = (done or {}).get(first)
            if (
                isinstance(known, BatchOutput)
                and known.count == count
                and known.statistics.alphas == self.empty.alphas
                and known.chunk_size == chunk_size
            ):
                self.add(known)
            else:
                todo.append((first, count))
        return todo

    def resume(
        self, done: dict | None, chunk_size: int, progress: ProgressCallback | None
    ) -> tuple[list[tuple[int, int]], int]:
        """(`missing` batches, scenarios already done), the latter reported to `progress`."""
        todo = self.missing(done, chunk_size)
        completed = self.scenarios - sum(count for _, count in todo)
        if completed and progress is not None:
            progress(completed, self.scenarios)
        return todo, completed

    def add(self, output: BatchOutput) -> None:
        self.outputs[output.first] = output

    def short(self) -> list[tuple[int, int, float]]:
        """``(first, count, floor)`` of the batches to run again, keeping every loss at or
        above `floor`: those that held more of the run's top k than their margin
        (`risk.short_tails`; with i.i.d. scenarios about never)."""
        outputs = [self.outputs[first] for first, count in self.batches if count]
        k = tail_size(self.scenarios, self.alphas)
        floor, positions = short_tails([o.tail for o in outputs], k)
        return [(outputs[i].first, outputs[i].count, floor) for i in positions]

    def result(self, elapsed_seconds: float, owners: tuple = ()) -> Pass1:
        outputs = [self.outputs[first] for first, count in self.batches if count]
        if sum(o.count for o in outputs) != self.scenarios:  # a bug, not a user error
            raise RuntimeError(f"pass 1 folded {len(outputs)} of {len(self.batches)} batches")
        sums = _LoanSums(outputs[0].loan_sums.shape[1])
        for output in outputs:
            sums.add_batch(output.loan_sums)
        by_first = {o.first: o.statistics for o in outputs}
        return sums.result(
            self.scenarios,
            elapsed_seconds,
            losses_usd=None,
            tail=merge_tails([o.tail for o in outputs], tail_size(self.scenarios, self.alphas)),
            batches=tuple(by_first.get(first, self.empty) for first, _ in self.batches),
            histogram=LossHistogram.merge([o.histogram for o in outputs]),
            owners=owners,
        )


class _LastChunk:
    """A backend that remembers its last chunk: consecutive batches share the chunk across
    their edge, computed once (in one process; a Dask task computes its own)."""

    def __init__(self, backend):
        self.backend = backend
        self.last: tuple[int, int, ChunkOutput] | None = None

    def run_chunk(self, first: int, count: int, padded_count: int | None = None) -> ChunkOutput:
        if self.last is None or self.last[:2] != (first, count):
            self.last = (first, count, self.backend.run_chunk(first, count, padded_count))
        return self.last[2]


def run_tails_pass1(
    backend,
    scenarios: int,
    chunk_size: int,
    alphas: Sequence[float],
    progress: ProgressCallback | None = None,
    done: dict | None = None,
    on_batch: Callable[[int, BatchOutput], None] | None = None,
) -> Pass1:
    """Tails-only pass 1 in this process, batch by batch (`run_batch`), then the short
    batches again (`TailsAccumulator.short`). `done` holds batches already computed (resume),
    keyed by their first scenario; `on_batch` is called after each new one (checkpointing)."""
    start = time.perf_counter()
    fold = TailsAccumulator(scenarios, alphas)
    todo, completed = fold.resume(done, chunk_size, progress)
    backend = _LastChunk(backend)

    def advance(n: int) -> None:
        nonlocal completed
        completed += n
        if progress is not None:
            progress(completed, scenarios)

    for first, count in todo:
        output = run_batch(backend, first, count, chunk_size, scenarios, alphas, advance)
        if on_batch is not None:
            on_batch(first, output)
        fold.add(output)
    for first, count, floor in fold.short():
        output = run_batch(backend, first, count, chunk_size, scenarios, alphas, floor=floor)
        if on_batch is not None:
            on_batch(first, output)
        fold.add(output)
    return fold.result(time.perf_counter() - start)


def resolve_keep_losses(
    keep_losses: bool | None, scenarios: int, importance_sampling: bool = False
) -> bool:
    """Whether pass 1 keeps every per-scenario loss. None: yes up to
    `KEEP_LOSSES_MAX_SCENARIOS` scenarios (and always under importance sampling), tails-only
    beyond. Tails-only with importance sampling is refused: the tail order then depends on each
    scenario's likelihood ratio, not on its loss alone."""
    if keep_losses is None:
        return importance_sampling or scenarios <= KEEP_LOSSES_MAX_SCENARIOS
    if not keep_losses and importance_sampling:
        raise EngineError(
            "tails-only mode (--tails-only, keep_losses=False) cannot be combined with "
            "importance sampling: the tail then depends on every scenario's likelihood ratio; "
            "keep every loss instead (--keep-losses)"
        )
    return bool(keep_losses)


class LocalRunner:
    """Both passes in this process (the Dask runner has the same methods). `owners`, where
    taken, is `Pass1.owners` (only Dask uses it)."""

    def run_pass1(self, spec: BackendSpec, scenarios, chunk_size, n_loans, progress=None,
                  done=None, on_chunk=None) -> Pass1:  # fmt: skip
        return run_pass1(spec.build(), scenarios, chunk_size, n_loans, progress, done, on_chunk)

    def run_tails_pass1(self, spec: BackendSpec, scenarios, chunk_size, alphas, progress=None,
                        done=None, on_batch=None) -> Pass1:  # fmt: skip
        return run_tails_pass1(
            spec.build(), scenarios, chunk_size, alphas, progress, done, on_batch
        )

    def tail_contributions(self, spec: BackendSpec, tails, n_loans, owners=()):
        return tail_contributions(spec.build().loan_losses_at, tails, n_loans)

    def tail_sensitivities(self, spec: BackendSpec, assumptions, tails, n_scenarios, weights,
                           el_scenarios, owners=(), chunk_size=256) -> Sensitivities:  # fmt: skip
        return tail_sensitivities(
            spec.build().weighted_gradient, assumptions, tails, n_scenarios, el_scenarios,
            chunk_size=chunk_size, weights=weights,
        )  # fmt: skip

    def describe(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


def resolve_run_settings(
    assumptions: Assumptions,
    scenarios: int | None,
    seed: int | None,
    mode: str | None,
) -> tuple[int, int, str]:
    scenarios = assumptions.scenarios if scenarios is None else int(scenarios)
    seed = assumptions.seed if seed is None else int(seed)
    mode = mode or assumptions.mode
    if scenarios < 1:
        raise EngineError(f"scenarios must be at least 1, got {scenarios}")
    if not 0 <= seed < 2**32:
        raise EngineError(f"seed must be in [0, 2^32), got {seed}")
    if mode not in MODES:
        raise EngineError(f"unknown mode {mode!r}; choose conditional or sampled")
    return scenarios, seed, mode


def default_alphas(alphas: Sequence[float] | None) -> tuple[float, ...]:
    return tuple(alphas) if alphas else (0.99, 0.999)


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """The confidence levels, each a number in (0, 1), or an EngineError naming the bad one."""
    checked = []
    for alpha in alphas:
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            raise EngineError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
        if not 0.0 < value < 1.0:  # also refuses NaN
            raise EngineError(f"alpha must be in (0, 1), got {value:g}")
        checked.append(value)
    return tuple(checked)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """None (the backend's default) or a whole number of scenarios per chunk, at least 1."""
    if chunk_size is None:
        return None
    try:
        size = operator.index(chunk_size)
    except TypeError:
        raise EngineError(f"chunk_size must be a whole number, got {chunk_size!r}") from None
    if size < 1:
        raise EngineError(f"chunk_size must be at least 1, got {size}")
    return size


@dataclass(frozen=True)
class StressCase:
    """A stress scenario ready to run: its name, what it does, and the stressed assumptions.
    Its time grid must be the base run's (the same random numbers)."""

    name: str
    description: str
    assumptions: Assumptions


@dataclass(frozen=True)
class StressResult:
    """One stress scenario on the base run's random numbers, and its change from the base."""

    name: str
    description: str
    measures: RiskMeasures

    def deltas(self, base: RiskMeasures) -> dict[str, float]:
        out = {"el": self.measures.el - base.el}
        for t in self.measures.tail:
            key = alpha_key(t.alpha)
            out[f"var_{key}"] = t.var - base.var(t.alpha)
            out[f"es_{key}"] = t.es - base.es(t.alpha)
        return out


@dataclass(frozen=True)
class RunResult:
    """Everything one run produced (what `write_results` and the report consume).

    `losses_usd` is None in tails-only mode (``metadata["keep_losses"]`` False): no process
    held every loss; `tail` and `histogram` describe the distribution in both modes.
    """

    losses_usd: np.ndarray | None  # [S] per-scenario loss, or None (tails-only mode)
    weights: np.ndarray | None  # [S] or None (equal weights)
    measures: RiskMeasures
    contributions: Contributions | None
    sensitivities: Sensitivities | None
    stress: tuple[StressResult, ...]
    metadata: dict
    tail: LossTail  # the largest losses (top `tail_size(S, alphas)`, ties kept) by scenario
    histogram: LossHistogram  # of every loss (risk.LossHistogram: power-of-two bins from 0)
    calibration: dict | None = None  # portfolio.calibration.calibration_table (None: not run)

    def var(self, alpha: float) -> float:
        return self.measures.var(alpha)

    def es(self, alpha: float) -> float:
        return self.measures.es(alpha)

    def summary(self) -> dict:
        """JSON-ready: every measure with its standard error and interval, stress deltas and
        the run's metadata."""
        return {
            "metadata": self.metadata,
            "measures": self.measures.to_dict(),
            "stress": {
                s.name: {
                    "description": s.description,
                    "measures": s.measures.to_dict(),
                    "change": s.deltas(self.measures),
                }
                for s in self.stress
            },
            "calibration": self.calibration,
        }


def simulate(
    book: Book,
    assumptions: Assumptions,
    scenarios: int | None = None,
    seed: int | None = None,
    mode: str | None = None,
    backend: str = "auto",
    precision: str = "float32",
    chunk_size: int | None = None,
    alphas: Sequence[float] | None = None,
    contributions: bool = True,
    sensitivities: bool = True,
    el_sensitivity_scenarios: int = 8192,
    stress: Sequence[StressCase] = (),
    progress: ProgressCallback | None = None,
    checkpoint=None,
    workers: int | None = None,
    scheduler: str | None = None,
    normal_shift: np.ndarray | None = None,
    keep_losses: bool | None = None,
    calibration: bool = True,
) -> RunResult:
    """Run the book against the assumptions (docs/spec.md) and measure the loss distribution.

    Pass 1 keeps every per-scenario loss (`keep_losses` True) or, tails-only (False), per
    batch only its largest losses, statistics and histogram, with the same measures, tail sets,
    contributions and sensitivities and ``RunResult.losses_usd`` None; None (the default)
    keeps them up to `KEEP_LOSSES_MAX_SCENARIOS` scenarios (`resolve_keep_losses`). Pass 2
    revisits the tail scenarios of each α by
    index for Euler contributions and AD sensitivities. Stress scenarios rerun pass 1 with
    overridden assumptions on the same random numbers. `checkpoint` (optional) has
    `.done() -> dict[first, ChunkOutput | BatchOutput]` and `.save(first, output)` for resume
    (chunks when every loss is kept, batches in tails-only mode).
    `workers` (a local Dask cluster of that many processes) or `scheduler` (the address of an
    existing one) runs both passes on Dask (portfolio/distributed.py), with identical results.
    `normal_shift` [T, K] (importance sampling) moves the mean of the systematic normals,
    e.g. to a reverse-stress design point; every scenario then carries its likelihood ratio
    and all measures, contributions and sensitivities are weighted.
    `calibration` adds the calibration table (portfolio/calibration.py): a year-1 pass over
    the run's first `YEAR_ONE_MAX_SCENARIOS` scenarios gives each loan's year-1 default rate.
    """
    started = time.perf_counter()
    scenarios, seed, mode = resolve_run_settings(assumptions, scenarios, seed, mode)
    keep_losses = resolve_keep_losses(keep_losses, scenarios, normal_shift is not None)
    alphas = check_alphas(default_alphas(alphas))
    chunk_size = check_chunk_size(chunk_size)
    loans = loan_arrays(book, assumptions)
    # Every stress case's schedules before any scenario runs (an undefined one fails now).
    stress_loans = {
        id(case.assumptions): loan_arrays(book, case.assumptions, base=assumptions)
        for case in stress
    }
    grid = assumptions.grid(mode)
    if normal_shift is not None:
        normal_shift = np.asarray(normal_shift, dtype=np.float64)
        if normal_shift.shape != (grid.periods, grid.n_factors):
            raise EngineError(
                f"normal_shift must be [periods, factors] = {(grid.periods, grid.n_factors)}, "
                f"got {normal_shift.shape}"
            )

    def spec_for(a: Assumptions, gradient: bool = False) -> BackendSpec:
        return BackendSpec(
            backend,
            engine.precision if gradient else precision,
            a.params,
            a.grid(mode),
            loans if a is assumptions else stress_loans[id(a)],
            seed,
            normal_shift,
            gradient,
        )

    engine = make_backend(backend, precision, assumptions.params, grid, loans, seed, normal_shift)
    chunk = chunk_size
    if chunk is None:
        chunk = default_chunk_size(backend, importance_sampling=normal_shift is not None)
    if workers is not None or scheduler is not None:
        from gpucredit.portfolio.distributed import DaskRunner

        runner = DaskRunner(workers=workers, scheduler=scheduler)
    else:
        runner = LocalRunner()

    def pass1_of(a: Assumptions, progress=None, checkpoint=None) -> Pass1:
        done = checkpoint.done() if checkpoint is not None else None
        save = checkpoint.save if checkpoint is not None else None
        if keep_losses:
            return runner.run_pass1(spec_for(a), scenarios, chunk, len(book), progress, done, save)
        return runner.run_tails_pass1(spec_for(a), scenarios, chunk, alphas, progress, done, save)

    try:
        pass1 = pass1_of(assumptions, progress, checkpoint)
        weights = pass1.weights
        measures, tail = _measures_and_tail(pass1, alphas)
        tails = tail_sets(tail, alphas)  # {α key: (scenario indices, coefficients)}

        contrib = None
        if contributions:
            es_i = runner.tail_contributions(
                spec_for(assumptions), tails, len(book), owners=pass1.owners
            )
            contrib = make_contributions(
                book,
                pass1.loan_expected_loss_usd,
                es_i,
                pass1.loan_horizon_pd,
                pass1.loan_mean_lgd,
            )

        calibration_table_ = None
        if calibration:
            calibration_table_ = _calibration(
                book, loans, assumptions, scenarios, pass1, contrib, runner, chunk, spec_for,
                normal_shift,
            )  # fmt: skip

        sens = None
        sensitivities_seconds = 0.0
        # Sensitivities are derivatives of the conditional-mode loss (docs/spec.md §7); a sampled
        # run's tail set is driven by the default draws, so they are not computed there.
        if sensitivities and mode == "conditional":
            t0 = time.perf_counter()
            # engine.precision, not `precision`: a NumPy (float64) run gets float64 gradients.
            sens = runner.tail_sensitivities(
                spec_for(assumptions, gradient=True),
                assumptions,
                tails,
                scenarios,
                weights,
                el_sensitivity_scenarios,
                owners=pass1.owners,
                chunk_size=gradient_chunk_size(),
            )
            sensitivities_seconds = time.perf_counter() - t0

        stress_results = []
        for case in stress:
            stress_measures, _ = _measures_and_tail(pass1_of(case.assumptions), alphas)
            stress_results.append(StressResult(case.name, case.description, stress_measures))
        cluster = runner.describe()
    finally:
        runner.close()

    if pass1.losses_usd is None:
        largest, histogram = pass1.tail, pass1.histogram
    else:  # with equal weights `tail` is the top k already; with weights, the whole run
        k = tail_size(scenarios, alphas)
        largest = tail if weights is None else largest_losses(pass1.losses_usd, k)
        histogram = LossHistogram.of(pass1.losses_usd)
    elapsed = time.perf_counter() - started
    metadata = {
        "version": __version__,
        "seed": seed,
        "scenarios": scenarios,
        "mode": mode,
        "backend": engine.name,
        "device": engine.device,
        "precision": engine.precision,
        "chunk_size": chunk,
        "keep_losses": keep_losses,
        "alphas": list(alphas),
        "copula": assumptions.copula,
        "t_dof": assumptions.t_dof if assumptions.copula == "t" else None,
        "correlation_repaired": assumptions.correlation_repair is not None,
        "importance_shift": None if normal_shift is None else normal_shift.tolist(),
        "horizon_years": assumptions.horizon_years,
        "steps_per_year": assumptions.steps_per_year,
        "discount": assumptions.discount,
        "loans": len(book),
        "book": book.source,
        "pass1_seconds": pass1.elapsed_seconds,
        "sensitivities_seconds": sensitivities_seconds,
        "el_sensitivity_scenarios": sens.el_scenarios if sens is not None else None,
        "elapsed_seconds": elapsed,
        "scenarios_per_second": scenarios / pass1.elapsed_seconds,
        "loan_periods_per_second": scenarios * len(book) * grid.periods / pass1.elapsed_seconds,
        "estimator": "plain Monte Carlo"
        if normal_shift is None
        else "importance sampling: systematic normals shifted to the design point",
        "effective_sample_size": measures.effective_sample_size,
        "sensitivities_of": "the conditional-mode loss (docs/spec.md §7), on this run's tail set"
        if mode == "conditional"
        else "not computed in sampled mode: run --mode conditional for sensitivities",
    }
    if cluster is not None:
        metadata["dask"] = cluster
    return RunResult(
        losses_usd=pass1.losses_usd,
        weights=weights,
        measures=measures,
        contributions=contrib,
        sensitivities=sens,
        stress=tuple(stress_results),
        metadata=metadata,
        tail=largest,
        histogram=histogram,
        calibration=calibration_table_,
    )


def _calibration(
    book, loans, assumptions, run_scenarios, pass1, contrib, runner, chunk, spec_for, shift
):
    """The calibration table of a run: the year-1 pass (the run's first scenarios, the same
    random numbers, on the first year of its grid), then `calibration_table`."""
    year_one = year_one_assumptions(assumptions)
    base = spec_for(assumptions)
    periods = year_one.periods
    spec = dataclasses.replace(
        base,
        params=year_one.params,
        grid=year_one.grid(base.grid.mode),
        loans=loan_arrays(book, year_one),
        normal_shift=None if shift is None else shift[:periods],
    )
    scenarios = min(YEAR_ONE_MAX_SCENARIOS, run_scenarios)
    first_year = runner.run_pass1(spec, scenarios, chunk, len(book))
    table = calibration_table(
        book,
        loans,
        assumptions,
        horizon_pd=pass1.loan_horizon_pd,
        year_one_pd=first_year.loan_horizon_pd,
        expected_loss_usd=pass1.loan_expected_loss_usd,
        mean_lgd=pass1.loan_mean_lgd,
        expected_shortfall_usd=None if contrib is None else contrib.expected_shortfall_usd,
    )
    table["year_one_scenarios"] = scenarios
    table["paper_vs_path"] = paper_vs_path(book, loans, assumptions)
    return table


def _measures_and_tail(pass1: Pass1, alphas: Sequence[float]) -> tuple[RiskMeasures, LossTail]:
    """The risk measures of a pass 1 and the `LossTail` its tail sets come from: the same
    `risk.risk_measures_from_tail` on the same largest losses and batches in both modes (with
    importance sampling: the weighted measures over every loss)."""
    if pass1.losses_usd is None:
        return risk_measures_from_tail(pass1.tail, pass1.batches, alphas), pass1.tail
    S = len(pass1.losses_usd)
    measures = risk_measures(
        pass1.losses_usd, pass1.weights, alphas, batch_count(S), likelihood_ratios=True
    )
    return measures, LossTail.of_run(pass1.losses_usd, pass1.weights, alphas)
