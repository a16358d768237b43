"""How a run's tasks are cut and folded, written once for every runner (docs/spec.md, Data
flow).

Pass 1 streams scenario chunks through a backend and keeps per-loan sums (EL_i, horizon PD,
defaulted exposure) and either every portfolio loss (one float per scenario: `run_pass1`, one
task a block of whole chunks) or, in tails-only mode (`run_tails_pass1`, one task a batch of
the batch-means standard errors), per batch only its largest losses with their indices, its
statistics and a histogram (`BatchOutput`). The accumulators fold chunks and batches in
scenario order whatever order they arrive in, so every `Runner` gets the same numbers: a
runner only says where tasks execute (`Runner.map`: `LocalRunner` here, `DaskRunner` in
portfolio/distributed.py). Pass 2 (portfolio/contributions.py, portfolio/sensitivities.py)
maps its tasks over the same runner.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.portfolio.risk import (
    BatchStatistics,
    LossHistogram,
    LossTail,
    batch_bounds,
    batch_count,
    batch_statistics,
    batch_tail_size,
    largest_losses,
    merge_tails,
    short_tails,
    tail_size,
)
from gpucredit.portfolio.settings import EngineError


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


def phase_progress(progress, name: str, total: int) -> ProgressCallback | None:
    """The callback of one phase of a run ("pass 1", "contributions", ...), or None.

    `progress` is what `simulate` was given: a plain ``(done, total)`` callable sees pass 1
    only; an object with ``phase(name, total)`` (io/progress.py's display) is told each
    phase as it starts and then sees its ``(done, total)``, so one display with an ETA can
    cover the whole run."""
    if progress is None:
        return None
    if hasattr(progress, "phase"):
        progress.phase(name, total)
        return progress
    return progress if name == "pass 1" else None


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


def plan_blocks(
    scenarios: int, chunk_size: int, workers: int, max_chunks_per_block: int = 64
) -> list[tuple[int, int]]:
    """Blocks ``(first, count)`` of whole chunks covering ``[0, scenarios)``: the pass-1 tasks
    when every loss is kept.

    About four blocks a worker (load balance, and little lost work when a worker dies), at
    most `max_chunks_per_block` chunks each; chunks start at multiples of `chunk_size`.
    """
    n_chunks = math.ceil(scenarios / chunk_size)
    per_block = max(1, min(max_chunks_per_block, math.ceil(n_chunks / (4 * max(workers, 1)))))
    step = per_block * chunk_size
    return [(first, min(step, scenarios - first)) for first in range(0, scenarios, step)]


@dataclass(frozen=True)
class BlockOutput:
    """What a pass-1 task returns when every loss is kept: the `ChunkOutput` of each chunk of
    its block ``[first, ...)``, in order."""

    first: int
    chunks: tuple[ChunkOutput, ...]


def run_block(backend, first: int, count: int, chunk_size: int) -> BlockOutput:
    """Pass-1 task: the chunks of ``[first, first + count)``, each computed by the program of
    `chunk_size` scenarios (a short last chunk reuses it)."""
    chunks = tuple(
        backend.run_chunk(start, min(chunk_size, first + count - start), chunk_size)
        for start in range(first, first + count, chunk_size)
    )
    return BlockOutput(first, chunks)


def run_pass1(
    simulation,
    scenarios: int,
    chunk_size: int,
    n_loans: int,
    progress: ProgressCallback | None = None,
    done: dict[int, ChunkOutput] | None = None,
    on_chunk: Callable[[int, ChunkOutput], None] | None = None,
    runner: Runner | None = None,
) -> Pass1:
    """Pass 1 keeping every loss: the blocks of `plan_blocks` mapped over `runner` (this
    process by default) on `simulation` (a `backends.Simulation`, or a built backend in this
    process), folded in scenario order.

    `done` holds chunks already computed (resume), keyed by their first scenario: a block whose
    chunks are all there is not run again; `on_chunk` is called after each new chunk
    (checkpointing).
    """
    runner = runner or LocalRunner()
    start = time.perf_counter()
    fold = Pass1Accumulator(scenarios, n_loans)
    done = done or {}
    todo, completed = [], 0
    blocks = plan_blocks(scenarios, chunk_size, runner.workers(), runner.chunks_per_block)
    for first, count in blocks:
        starts = range(first, first + count, chunk_size)
        known = [done.get(s) for s in starts]
        if all(
            isinstance(c, ChunkOutput) and len(c.losses_usd) == min(chunk_size, first + count - s)
            for c, s in zip(known, starts, strict=True)
        ):
            for s, c in zip(starts, known, strict=True):
                fold.add(s, c)
            completed += count
        else:
            todo.append((first, count, chunk_size))
    if completed and progress is not None:
        progress(completed, scenarios)
    owners = []
    for _, block, where in runner.map(simulation, run_block, todo):
        first = block.first
        for chunk in block.chunks:
            if on_chunk is not None:
                on_chunk(first, chunk)
            fold.add(first, chunk)
            first += len(chunk.losses_usd)
        if where is not None:
            owners.append((block.first, first - block.first, where))
        completed += first - block.first
        if progress is not None:
            progress(completed, scenarios)
    return fold.result(time.perf_counter() - start, owners=tuple(sorted(owners)))


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


def run_tails_pass1(
    simulation,
    scenarios: int,
    chunk_size: int,
    alphas: Sequence[float],
    progress: ProgressCallback | None = None,
    done: dict | None = None,
    on_batch: Callable[[int, BatchOutput], None] | None = None,
    runner: Runner | None = None,
) -> Pass1:
    """Tails-only pass 1: one `run_batch` task a batch mapped over `runner` (this process by
    default), then the short batches again (`TailsAccumulator.short`). `done` holds batches
    already computed (resume), keyed by their first scenario; `on_batch` is called after each
    new one (checkpointing)."""
    runner = runner or LocalRunner()
    start = time.perf_counter()
    fold = TailsAccumulator(scenarios, alphas)
    todo, completed = fold.resume(done, chunk_size, progress)
    owners: dict[int, tuple[int, int, str]] = {}
    alphas = tuple(alphas)

    def run(items: list[tuple]) -> None:
        nonlocal completed
        for _, batch, where in runner.map(simulation, run_batch, items):
            if on_batch is not None:
                on_batch(batch.first, batch)
            fold.add(batch)
            if where is not None:
                owners[batch.first] = (batch.first, batch.count, where)
            completed = min(completed + batch.count, scenarios)
            if progress is not None:
                progress(completed, scenarios)

    run([(first, count, chunk_size, scenarios, alphas) for first, count in todo])
    # The batches that held more of the run's tail than their margin, again, down to a floor.
    run([(f, c, chunk_size, scenarios, alphas, floor) for f, c, floor in fold.short()])
    return fold.result(time.perf_counter() - start, owners=tuple(sorted(owners.values())))


# --------------------------------------------------------------------------- runners


class ChunkMemo:
    """A built backend that remembers its last chunk: consecutive tails-only batches share the
    chunk across their edge, computed once. Thread-safe (one tuple read and written whole)."""

    def __init__(self, backend):
        self.backend = backend
        self._last: tuple | None = None

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def run_chunk(self, first: int, count: int, padded_count: int | None = None) -> ChunkOutput:
        key, last = (first, count, padded_count), self._last
        if last is None or last[0] != key:
            last = (key, self.backend.run_chunk(first, count, padded_count))
            self._last = last
        return last[1]


def owner_of(owners: Sequence[tuple[int, int, str]], index: int) -> str | None:
    """The worker address of the pass-1 task ``(first, count, address)`` holding scenario
    `index` (`Pass1.owners`), or None (no such task: one process, or a checkpointed block)."""
    firsts = [first for first, _, _ in owners]
    i = bisect.bisect_right(firsts, index) - 1
    if i >= 0 and index < owners[i][0] + owners[i][1]:
        return owners[i][2]
    return None


class Runner(Protocol):
    """Where the tasks of a run execute: this process (`LocalRunner`) or a Dask cluster
    (`distributed.DaskRunner`). Everything else (pass 1 in both modes, resume, contributions,
    sensitivities) is written once on top of `map`.

    `map(simulation, task, items, affinity)` runs ``task(backend, *item)`` for every item on
    the backend of `simulation` (built once per runner and simulation, wherever it runs) and
    yields ``(position, result, where)`` as tasks finish, in any order; `where` is the worker
    that ran it (None in one process). `affinity` (one worker address or None per item) asks
    for a worker, loosely. `chunks_per_block`: the pass-1 chunks one task computes.
    """

    chunks_per_block: int

    def map(
        self, simulation, task: Callable, items: Sequence[tuple],
        affinity: Sequence[str | None] | None = None,
    ) -> Iterator[tuple[int, object, str | None]]: ...  # fmt: skip

    def workers(self) -> int: ...

    def backend(self, simulation): ...

    def describe(self) -> dict | None: ...

    def close(self) -> None: ...


class LocalRunner:
    """Every task in this process, in order. A `Simulation` is built once (`backend`) and kept
    for the runner's life, so pass 1, contributions and a stress of the same simulation share
    one set of prepared loans and one jit cache; a ready backend is used as it is."""

    chunks_per_block = 1  # progress and checkpoints after every chunk

    def __init__(self):
        self._built: dict[tuple, tuple[object, object]] = {}

    def backend(self, simulation):
        if not hasattr(simulation, "key"):  # a built backend (tests, benchmarks, validation)
            return ChunkMemo(simulation)
        key = simulation.key()
        if key not in self._built:  # the entry keeps the simulation alive: its ids stay its own
            self._built[key] = (simulation, ChunkMemo(simulation.build()))
        return self._built[key][1]

    def map(self, simulation, task, items, affinity=None):
        backend = self.backend(simulation)
        for position, item in enumerate(items):
            yield position, task(backend, *item), None

    def workers(self) -> int:
        return 1

    def describe(self) -> dict | None:
        return None

    def close(self) -> None:
        self._built.clear()
