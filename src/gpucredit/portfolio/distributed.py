"""Scale-out on Dask (docs/spec.md, Scale-out): the same numbers on one process or many workers.

A run on a cluster is the single-process run cut into tasks, with every floating-point
reduction kept in the single-process order, so the results are *bit-identical* for any number
of workers (and to `engine.simulate` without Dask):

* Pass 1, every loss kept. A task is a block of whole chunks ``[first, first + count)``;
  chunks have the run's chunk size and start at multiples of it, exactly as in
  `runner.run_pass1`, so every per-scenario loss is the same float (the JAX kernels are
  bit-identical for chunks of the same size at any offset). A task returns the `ChunkOutput`
  of each of its chunks (losses [chunk] and three per-loan sums [N]); the driver folds them in
  chunk order as they arrive (out-of-order blocks wait in a buffer), so EL_i, horizon PD and
  mean LGD match too. Every loss travels to the driver: 8 bytes a scenario.
* Pass 1, tails only (`runner.run_tails_pass1`; the default beyond
  `settings.KEEP_LOSSES_MAX_SCENARIOS` scenarios). A task is one batch of the batch-means
  standard errors (`runner.run_batch`, in the run's chunks) and returns only a `BatchOutput`:
  its largest losses with their indices (its share of the run's top k = `risk.tail_size`,
  with a margin), its count, Σ L, Σ (L − mean)² and its own VaR/ES, a mergeable histogram
  and the per-loan sums: about (1 − min α) S losses reach the driver in all. A batch that
  held more of the top k than its margin is run again down to a floor (`risk.short_tails`).
  The driver merges the tails (`risk.merge_tails`: exactly the top k of all losses) and
  builds the same `RiskMeasures` as a run that kept every loss
  (`risk.risk_measures_from_tail`).
* Pass 2. Contributions and sensitivities cut the tail set into the same index chunks that
  `contributions.tail_contributions` (1024) and `sensitivities.tail_sensitivities` (256,
  zero-padded; 4,096 when the driver runs on a GPU, `backends.gradient_chunk_size`) use; each
  chunk is one task that regenerates its scenarios from their indices (a scenario's random
  numbers depend only on its index, so nothing per scenario is kept on, or shipped to, the
  workers), and the driver adds the per-chunk results in chunk order. A task goes to the
  worker that ran the pass-1 task owning its first index (`Pass1.owners`), as a loose
  restriction (``allow_other_workers``), so a lost worker never stalls the run.
* The book and the assumptions reach each worker once per backend: a `WorkerPlugin` per
  distinct `BackendSpec` (pass 1 and the contributions of one set of assumptions share it;
  the gradient backend and each stress case have their own) is registered on the cluster
  for the runner's life, and every worker, a replacement for a lost one
  included, receives it when it joins and builds the backend once, lazily, in its own process
  (its jit cache then serves every later task). Tasks carry only ``(plugin name, first,
  count)`` or a chunk of tail indices.
* Losing a worker: the scheduler reruns the tasks it held on the others (or on the
  replacement its nanny starts); tasks are pure functions of their arguments, so the result is
  unchanged. ``retries`` covers tasks that raise.
"""

from __future__ import annotations

import bisect
import math
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.backends import BackendSpec
from gpucredit.portfolio.contributions import contribution_of_chunk, tail_contributions
from gpucredit.portfolio.runner import (
    BatchOutput,
    Pass1,
    Pass1Accumulator,
    ProgressCallback,
    TailsAccumulator,
    run_batch,
)
from gpucredit.portfolio.sensitivities import tail_sensitivities
from gpucredit.portfolio.settings import EngineError

__all__ = ["DaskRunner", "SchedulerUnreachable", "plan_blocks"]

CONNECT_TIMEOUT = "5s"
"""How long `DaskRunner` tries to reach a scheduler before giving up."""

WORKER_WAIT_SECONDS = 60.0
"""How long `DaskRunner` waits for the first worker of an existing cluster."""


class SchedulerUnreachable(EngineError):
    """The Dask scheduler at the given address did not answer (exit status 2 in the CLI)."""


# --------------------------------------------------------------------------- worker side


def _plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class BackendPlugin(WorkerPlugin):
        """Carries a `BackendSpec` to every worker (replacements included) and builds the
        backend there once, on first use, in the worker's own process."""

        def __init__(self, name: str, spec: BackendSpec):
            self.name = name
            self.spec = spec
            self._backend = None
            self._lock = None

        def __getstate__(self):
            return {"name": self.name, "spec": self.spec}

        def __setstate__(self, state):
            self.__init__(state["name"], state["spec"])

        def setup(self, worker):
            self._lock = threading.Lock()

        def backend(self):
            if self._backend is None:
                with self._lock or threading.Lock():
                    if self._backend is None:
                        self._backend = self.spec.build()
            return self._backend

    return BackendPlugin


def _worker_backend(name: str):
    from distributed import get_worker

    plugin = get_worker().plugins.get(name)
    if plugin is None:  # pragma: no cover - the scheduler installs plugins before tasks
        raise RuntimeError(f"backend plugin {name!r} is not installed on this worker")
    return plugin.backend()


def _worker_address() -> str:
    from distributed import get_worker

    return get_worker().address


@dataclass(frozen=True)
class BlockOutput:
    """What a pass-1 task returns: the `ChunkOutput` of each chunk of its block, in order,
    and where it ran."""

    first: int
    chunks: tuple[ChunkOutput, ...]
    device: str
    worker: str


def _pass1_block(name: str, first: int, count: int, chunk_size: int) -> BlockOutput:
    backend = _worker_backend(name)
    chunks = []
    for start in range(first, first + count, chunk_size):
        chunks.append(backend.run_chunk(start, min(chunk_size, first + count - start), chunk_size))
    return BlockOutput(first, tuple(chunks), backend.device, _worker_address())


@dataclass(frozen=True)
class BatchTaskOutput:
    """What a tails-only pass-1 task returns: its batch's `BatchOutput` and where it ran."""

    batch: BatchOutput
    device: str
    worker: str


def _pass1_batch(
    name: str,
    chunk_size: int,
    scenarios: int,
    alphas: tuple,
    first: int,
    count: int,
    floor: float = math.inf,
) -> BatchTaskOutput:
    backend = _worker_backend(name)
    batch = run_batch(backend, first, count, chunk_size, scenarios, alphas, floor=floor)
    return BatchTaskOutput(batch, backend.device, _worker_address())


def _contribution_chunk(name: str, indices: np.ndarray, rows: dict[str, np.ndarray]):
    """{α key: Σ_j row_j L_i(ω_j)} [N] over one chunk of the tail union."""
    return contribution_of_chunk(_worker_backend(name).loan_losses_at, indices, rows)


def _gradient_chunk(name: str, indices: np.ndarray, coefficients: np.ndarray) -> ModelParams:
    grads = _worker_backend(name).weighted_gradient(indices, coefficients)
    return ModelParams(*(np.asarray(leaf, dtype=np.float64) for leaf in grads))


# --------------------------------------------------------------------------- blocks


def plan_blocks(
    scenarios: int, chunk_size: int, workers: int, max_chunks_per_block: int = 64
) -> list[tuple[int, int]]:
    """Blocks ``(first, count)`` of whole chunks covering ``[0, scenarios)``.

    About four blocks a worker (load balance, and little lost work when a worker dies), at
    most `max_chunks_per_block` chunks each; chunk boundaries are `run_pass1`'s.
    """
    n_chunks = math.ceil(scenarios / chunk_size)
    per_block = max(1, min(max_chunks_per_block, math.ceil(n_chunks / (4 * max(workers, 1)))))
    step = per_block * chunk_size
    return [(first, min(step, scenarios - first)) for first in range(0, scenarios, step)]


def owner_of(owners: Sequence[tuple[int, int, str]], index: int) -> str | None:
    """The worker address of the pass-1 task (first, count, address) holding scenario
    `index`, or None (no such task: e.g. its block came from a checkpoint)."""
    firsts = [first for first, _, _ in owners]
    i = bisect.bisect_right(firsts, index) - 1
    if i >= 0 and index < owners[i][0] + owners[i][1]:
        return owners[i][2]
    return None


# --------------------------------------------------------------------------- the runner


def _describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class DaskRunner:
    """A connection to a Dask cluster that runs the passes of `engine.simulate`.

    ``DaskRunner(workers=N)`` starts a local cluster of N single-threaded worker processes;
    ``DaskRunner(scheduler="tcp://host:8786")`` connects to an existing one (dask-jobqueue,
    Kubernetes, dask-cuda's LocalCUDACluster, ...) and raises `SchedulerUnreachable` when it
    does not answer within `connect_timeout`; ``DaskRunner(client=client)`` uses a client the
    caller owns. `close()` (or the context manager, or garbage collection) closes what the
    runner opened, never a client it was given.
    """

    def __init__(
        self,
        workers: int | None = None,
        scheduler: str | None = None,
        client=None,
        connect_timeout: str = CONNECT_TIMEOUT,
        retries: int = 2,
    ):
        if sum(x is not None for x in (workers, scheduler, client)) != 1:
            raise EngineError("give exactly one of workers, scheduler (or a Dask client)")
        try:
            from distributed import Client, LocalCluster
        except ImportError:  # pragma: no cover - dask is a dev dependency
            raise EngineError(
                "Dask is not installed: pip install 'gpucredit[dist]' for --workers/--scheduler"
            ) from None
        self.retries = retries
        self._owned: list = []
        if client is not None:
            self.client, self.address = client, client.scheduler.address
        elif scheduler is not None:
            self.address = scheduler
            try:
                self.client = Client(scheduler, timeout=connect_timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as error:
                raise SchedulerUnreachable(
                    f"cannot reach the Dask scheduler at {scheduler} "
                    f"(within {connect_timeout}): {_describe_error(error)}"
                ) from None
            self._owned.append(self.client)
            try:
                self.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
            except (OSError, TimeoutError) as error:
                self.close()
                raise SchedulerUnreachable(
                    f"the Dask scheduler at {scheduler} has no workers "
                    f"(waited {WORKER_WAIT_SECONDS:.0f} s): {_describe_error(error)}"
                ) from None
        else:
            if workers < 1:
                raise EngineError(f"workers must be at least 1, got {workers}")
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            )
            self.client = Client(cluster, set_as_default=False)
            self._owned += [self.client, cluster]
            self.address = cluster.scheduler_address
        self._finalizer = weakref.finalize(self, _close_all, list(self._owned))
        self.devices: set[str] = set()
        # One plugin per distinct backend for the runner's life: pass 1 and the contributions
        # of the same assumptions share one, so the book travels once per backend, not per pass.
        self._plugins: dict[tuple, tuple[BackendSpec, str]] = {}

    # -- lifecycle

    def close(self) -> None:
        if self._finalizer.alive:
            for _, name in self._plugins.values():
                self._uninstall(name)
        self._plugins.clear()
        self._finalizer()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    def describe(self) -> dict:
        """Run metadata: scheduler address, workers, and the devices the workers reported."""
        return {
            "scheduler": self.address,
            "workers": self.n_workers(),
            "worker_devices": sorted(self.devices),
        }

    # -- plumbing

    def _install(self, spec: BackendSpec) -> str:
        """The plugin name of `spec`'s backend, registered on the cluster the first time.
        Specs built from the same objects (book arrays, parameters, shift) share it; the
        entry keeps those objects alive, so their ids stay theirs."""
        key = (
            spec.backend, spec.precision, id(spec.params), spec.grid, id(spec.loans),
            spec.seed, id(spec.normal_shift), spec.gradient,
        )  # fmt: skip
        if key not in self._plugins:
            name = f"gpucredit-backend-{uuid.uuid4().hex}"
            self.client.register_plugin(_plugin_class()(name, spec), name=name)
            self._plugins[key] = (spec, name)
        return self._plugins[key][1]

    def _uninstall(self, name: str) -> None:
        try:
            self.client.unregister_worker_plugin(name)
        except Exception:  # best effort: a stale plugin only costs memory
            pass

    def _submit(self, fn, *args, worker: str | None = None):
        """Submit one task; `worker` (an address) is where it should run if that worker is
        still there, any other otherwise (a loose restriction: a lost worker stalls nothing)."""
        if worker is None:
            return self.client.submit(fn, *args, pure=False, retries=self.retries)
        return self.client.submit(
            fn, *args, pure=False, retries=self.retries, workers=[worker],
            allow_other_workers=True,
        )  # fmt: skip

    def _gather_in_order(self, futures: list, consume: Callable[[int, object], None]) -> None:
        """Call consume(i, result) as futures finish (any order); raise the first error."""
        from distributed import as_completed

        position = {f.key: i for i, f in enumerate(futures)}
        for future in as_completed(futures, loop=self.client.loop):
            consume(position[future.key], future.result())
            future.release()

    # -- pass 1

    def run_pass1(
        self,
        spec: BackendSpec,
        scenarios: int,
        chunk_size: int,
        n_loans: int,
        progress: ProgressCallback | None = None,
        done: dict[int, ChunkOutput] | None = None,
        on_chunk: Callable[[int, ChunkOutput], None] | None = None,
    ) -> Pass1:
        """`runner.run_pass1` on the cluster: the same `Pass1`, bit for bit."""
        import time

        start = time.perf_counter()
        done = done or {}
        fold = Pass1Accumulator(scenarios, n_loans)
        completed = 0
        todo = []
        for first, count in plan_blocks(scenarios, chunk_size, self.n_workers()):
            starts = range(first, first + count, chunk_size)
            known = [done.get(s) for s in starts]
            if all(
                isinstance(c, ChunkOutput)
                and len(c.losses_usd) == min(chunk_size, first + count - s)
                for c, s in zip(known, starts, strict=True)
            ):
                for s, c in zip(starts, known, strict=True):
                    fold.add(s, c)
                completed += count
            else:
                todo.append((first, count))
        if completed and progress is not None:
            progress(completed, scenarios)
        owners = []
        name = self._install(spec)
        futures = [self._submit(_pass1_block, name, f, c, chunk_size) for f, c in todo]

        def consume(_, block: BlockOutput) -> None:
            nonlocal completed
            self.devices.add(block.device)
            s = block.first
            for chunk in block.chunks:
                if on_chunk is not None:
                    on_chunk(s, chunk)
                fold.add(s, chunk)
                s += len(chunk.losses_usd)
            owners.append((block.first, s - block.first, block.worker))
            completed += s - block.first
            if progress is not None:
                progress(completed, scenarios)

        self._gather_in_order(futures, consume)
        return fold.result(time.perf_counter() - start, owners=tuple(sorted(owners)))

    def run_tails_pass1(
        self,
        spec: BackendSpec,
        scenarios: int,
        chunk_size: int,
        alphas: Sequence[float],
        progress: ProgressCallback | None = None,
        done: dict | None = None,
        on_batch: Callable[[int, BatchOutput], None] | None = None,
    ) -> Pass1:
        """`runner.run_tails_pass1` on the cluster, one task a batch: the same `Pass1`, bit
        for bit; only each batch's tail and statistics travel back."""
        import time

        start = time.perf_counter()
        fold = TailsAccumulator(scenarios, alphas)
        todo, completed = fold.resume(done, chunk_size, progress)
        owners: dict[int, tuple[int, int, str]] = {}
        name = self._install(spec)

        def consume(_, out: BatchTaskOutput) -> None:
            nonlocal completed
            self.devices.add(out.device)
            if on_batch is not None:
                on_batch(out.batch.first, out.batch)
            fold.add(out.batch)
            owners[out.batch.first] = (out.batch.first, out.batch.count, out.worker)
            completed = min(completed + out.batch.count, scenarios)
            if progress is not None:
                progress(completed, scenarios)

        alphas = tuple(alphas)
        args = (name, chunk_size, scenarios, alphas)
        futures = [self._submit(_pass1_batch, *args, f, c) for f, c in todo]
        self._gather_in_order(futures, consume)
        # The batches that held more of the run's tail than their margin, again.
        short = fold.short()
        futures = [self._submit(_pass1_batch, *args, f, c, floor) for f, c, floor in short]
        self._gather_in_order(futures, consume)
        return fold.result(time.perf_counter() - start, owners=tuple(sorted(owners.values())))

    # -- pass 2

    def _run_tasks(self, spec: BackendSpec, task, owners: Sequence[tuple[int, int, str]]):
        """A `run_tasks(items)` for the pass-2 functions: one Dask task per item, on the
        backend `spec` installed on every worker, sent to the owner of the item's first
        scenario index (`owner_of`), results in item order."""

        def run(items: list) -> list:
            name = self._install(spec)
            futures = [
                self._submit(task, name, *item, worker=owner_of(owners, int(item[0][0])))
                for item in items
            ]
            results: list = [None] * len(futures)
            self._gather_in_order(futures, results.__setitem__)
            return results

        return run

    def tail_contributions(
        self,
        spec: BackendSpec,
        tails: dict[str, tuple[np.ndarray, np.ndarray]],
        n_loans: int,
        owners: Sequence[tuple[int, int, str]] = (),
    ) -> dict[str, np.ndarray]:
        """`contributions.tail_contributions` on the cluster (same chunks, same order)."""
        run = self._run_tasks(spec, _contribution_chunk, owners)
        return tail_contributions(None, tails, n_loans, run_tasks=run)

    def tail_sensitivities(
        self,
        spec: BackendSpec,
        assumptions,
        tails: dict[str, tuple[np.ndarray, np.ndarray]],
        n_scenarios: int,
        weights: np.ndarray | None,
        el_scenarios: int,
        owners: Sequence[tuple[int, int, str]] = (),
        chunk_size: int = 256,
    ):
        """`sensitivities.tail_sensitivities` on the cluster (same chunks, same order);
        `spec` is the gradient backend (``BackendSpec(..., gradient=True)``)."""
        run = self._run_tasks(spec, _gradient_chunk, owners)
        return tail_sensitivities(
            None, assumptions, tails, n_scenarios, el_scenarios, chunk_size=chunk_size,
            weights=weights, run_tasks=run,
        )  # fmt: skip


def _close_all(resources: list) -> None:
    for resource in resources:
        try:
            resource.close()
        except Exception:  # closing is best effort
            pass
