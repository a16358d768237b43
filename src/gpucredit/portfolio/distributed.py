"""Scale-out on Dask (DESIGN.md, Scale-out): the same numbers on one process or many workers.

A run on a cluster is the single-process run cut into tasks, with every floating-point
reduction kept in the single-process order, so the results are *bit-identical* for any number
of workers (and to `engine.simulate` without Dask):

* Pass 1. A task is a block of whole chunks ``[first, first + count)``; chunks have the run's
  chunk size and start at multiples of it, exactly as in `engine.run_pass1`, so every
  per-scenario loss is the same float (the JAX kernels are bit-identical for chunks of the
  same size at any offset). A task returns the `ChunkOutput` of each of its chunks (losses
  [chunk] and three per-loan sums [N]); the driver folds them in chunk order as they arrive
  (out-of-order blocks wait in a buffer), so EL_i, horizon PD and mean LGD match too.
* Pass 2. Contributions and sensitivities cut the tail set into the same index chunks that
  `contributions.tail_loan_contributions` (1024) and `sensitivities.compute_sensitivities`
  (256, zero-padded) use; each chunk is one task that regenerates its scenarios from their
  indices on whichever worker runs it (a scenario's random numbers depend only on its index,
  so nothing per scenario is kept on, or shipped to, the workers), and the driver adds the
  per-chunk results in chunk order.
* The book and the assumptions reach each worker once: a `WorkerPlugin` per backend
  (`BackendSpec`) is registered on the cluster, and every worker, a replacement for a lost one
  included, receives it when it joins and builds the backend once, lazily, in its own process
  (its jit cache then serves every later task). Tasks carry only ``(plugin name, first,
  count)`` or a chunk of tail indices.
* Losing a worker: the scheduler reruns the tasks it held on the others (or on the
  replacement its nanny starts); tasks are pure functions of their arguments, so the result is
  unchanged. ``retries`` covers tasks that raise.

What pass 1 returns: every per-scenario loss (8 bytes a scenario: 0.8 GB on the driver at
10^8 scenarios, which `risk_measures`, losses.parquet and the report need anyway). For runs
far beyond that, `block_tail` / `merge_block_tails` give the exact alternative: a block keeps
only its losses at or above its own k-th largest (k = ⌈(1 − min α) S⌉ + 1) with their
indices; the union over blocks provably contains every scenario at or above the global VaR,
ties included, so VaR, ES and the tail set of pass 2 are exact (see `merge_block_tails`).
"""

from __future__ import annotations

import math
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.contributions import contribution_of_chunk, tail_loan_contributions
from gpucredit.portfolio.engine import (
    BackendSpec,
    ChunkOutput,
    EngineError,
    Pass1,
    Pass1Accumulator,
    ProgressCallback,
)
from gpucredit.portfolio.risk import alpha_key, tail_coefficients, var_es
from gpucredit.portfolio.sensitivities import compute_sensitivities

__all__ = [
    "BackendSpec",
    "BlockTail",
    "DaskRunner",
    "SchedulerUnreachable",
    "ShardedJaxBackend",
    "block_tail",
    "merge_block_tails",
    "plan_blocks",
    "tail_size",
]

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


@dataclass(frozen=True)
class BlockOutput:
    """What a pass-1 task returns: the `ChunkOutput` of each chunk of its block, in order."""

    first: int
    chunks: tuple[ChunkOutput, ...]
    device: str


def _pass1_block(name: str, first: int, count: int, chunk_size: int) -> BlockOutput:
    backend = _worker_backend(name)
    chunks = []
    for start in range(first, first + count, chunk_size):
        chunks.append(backend.run_chunk(start, min(chunk_size, first + count - start)))
    return BlockOutput(first, tuple(chunks), backend.device)


def _contribution_chunk(name: str, indices: np.ndarray, rows: dict[str, np.ndarray]):
    """{α key: Σ_j row_j L_i(ω_j)} [N] over one chunk of the tail union."""
    return contribution_of_chunk(_worker_backend(name).loan_losses_at, indices, rows)


def _gradient_chunk(name: str, indices: np.ndarray, coefficients: np.ndarray) -> ModelParams:
    grads = _worker_backend(name).weighted_gradient(indices, coefficients)
    return ModelParams(*(np.asarray(leaf, dtype=np.float64) for leaf in grads))


# --------------------------------------------------------------------------- one host


class ShardedJaxBackend:
    """The JAX backend with each chunk sharded over the local devices (jax.sharding).

    A chunk of D × `per_device` scenarios runs `per_device` scenarios on each device
    (kernels/sharding.py), so the losses are bit-identical to `JaxBackend` with chunk size
    `per_device` on one device; the per-loan sums agree to float rounding (added per device).
    Chunks of another size (the last one of a run) fall back to single-device sub-chunks of
    `per_device`, which keeps the losses identical there too.
    """

    name = "jax"

    def __init__(self, params, grid, loans, seed, precision, devices=None, per_device=4096):
        from gpucredit.kernels.sharding import scenario_mesh
        from gpucredit.portfolio.engine import JaxBackend

        self._single = JaxBackend(params, grid, loans, seed, precision)
        self.params, self.grid, self.seed, self.precision = params, grid, seed, precision
        self.blocks = self._single.blocks
        self.mesh = scenario_mesh(devices)
        self.per_device = per_device
        self.default_chunk_size = per_device * self.mesh.devices.size
        self.device = f"{self.mesh.devices.size} × {self._single.device}"

    def run_chunk(self, first_scenario: int, count: int) -> ChunkOutput:
        from gpucredit.kernels.sharding import sharded_chunk_outcomes

        if count != self.default_chunk_size:
            parts = [
                self._single.run_chunk(s, min(self.per_device, first_scenario + count - s))
                for s in range(first_scenario, first_scenario + count, self.per_device)
            ]
            return ChunkOutput(
                np.concatenate([p.losses_usd for p in parts]),
                *(sum(getattr(p, f) for p in parts) for f in _SUM_FIELDS),
            )
        out = sharded_chunk_outcomes(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            first_scenario,
            self.per_device,
            self.mesh,
        )
        losses, *sums = (np.asarray(x, dtype=np.float64) for x in out)
        return ChunkOutput(losses, *(s.sum(axis=0) for s in sums))

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        return self._single.loan_losses_at(scenarios)

    def weighted_gradient(self, scenarios: np.ndarray, coefficients: np.ndarray) -> ModelParams:
        return self._single.weighted_gradient(scenarios, coefficients)


_SUM_FIELDS = (
    "loan_loss_sum_usd",
    "loan_default_probability_sum",
    "loan_defaulted_exposure_sum_usd",
)


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


# --------------------------------------------------------------------------- exact tails


@dataclass(frozen=True)
class BlockTail:
    """A block's share of the tail: its losses at or above its k-th largest, with indices,
    and the batch statistics of the block (count, Σ L, Σ L²)."""

    indices: np.ndarray  # int64 [m], m >= k (ties at the k-th largest kept)
    losses_usd: np.ndarray  # [m]
    count: int
    loss_sum: float
    loss_sq_sum: float


def tail_size(scenarios: int, alphas: Sequence[float]) -> int:
    """k = ⌈(1 − min α) S⌉ + 2: enough order statistics for VaR and ES at every α (one more
    than needed, against the rounding tolerance of `risk`)."""
    return min(scenarios, math.ceil((1.0 - min(alphas)) * scenarios) + 2)


def block_tail(first: int, losses_usd: np.ndarray, k: int) -> BlockTail:
    """The `BlockTail` of a block whose scenario indices start at `first`."""
    L = np.asarray(losses_usd, dtype=np.float64)
    if k >= L.size:
        keep = np.arange(L.size)
    else:
        kth = np.partition(L, L.size - k)[L.size - k]  # the k-th largest
        keep = np.flatnonzero(L >= kth)
    return BlockTail(
        indices=keep.astype(np.int64) + first,
        losses_usd=L[keep],
        count=int(L.size),
        loss_sum=float(L.sum()),
        loss_sq_sum=float(L @ L),
    )


def merge_block_tails(
    tails: Sequence[BlockTail], scenarios: int, alphas: Sequence[float]
) -> dict[str, tuple[float, float, np.ndarray, np.ndarray]]:
    """Exact ``{α key: (VaR, ES, tail indices, coefficients)}`` from per-block tails, equal
    to `risk.var_es` and `risk.tail_coefficients` on all S losses (equal weights).

    Why exact: let v_b be block b's k-th largest loss. Block b alone has k losses >= v_b, so
    the whole sample's k-th largest v is >= v_b for every b, and every scenario with L >= v
    lies in some block's kept set. With k = `tail_size` (> (1 − α) S + 1 for every α asked),
    VaR_α >= v, so the union holds every loss >= VaR_α, ties included. The scenarios left out
    are replaced by one stand-in loss below all kept ones that carries their probability
    mass, which leaves the distribution above it, hence VaR, ES and the tail set, unchanged.
    """
    idx = np.concatenate([t.indices for t in tails])
    L = np.concatenate([t.losses_usd for t in tails])
    n_below = scenarios - L.size
    if n_below:
        floor = L.min() - max(1.0, abs(L.min()))
        L_all = np.concatenate([[floor], L])
        w_all = np.concatenate([[float(n_below)], np.ones(L.size)])
    else:
        L_all, w_all = L, None
    out = {}
    for alpha in alphas:
        var, es = var_es(L_all, w_all, alpha)
        sel, coef = tail_coefficients(L_all, w_all, alpha)
        if n_below:
            if np.any(sel == 0):  # pragma: no cover - excluded by the argument above
                raise RuntimeError("the tail reaches below the kept losses; increase k")
            sel = sel - 1
        order = np.argsort(idx[sel], kind="stable")
        out[alpha_key(alpha)] = (var, es, idx[sel][order], coef[order])
    return out


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

    # -- lifecycle

    def close(self) -> None:
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
        name = f"gpucredit-backend-{uuid.uuid4().hex}"
        self.client.register_plugin(_plugin_class()(name, spec), name=name)
        return name

    def _uninstall(self, name: str) -> None:
        try:
            self.client.unregister_worker_plugin(name)
        except Exception:  # best effort: a stale plugin only costs memory
            pass

    def _submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False, retries=self.retries)

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
        """`engine.run_pass1` on the cluster: the same `Pass1`, bit for bit."""
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
                c is not None and len(c.losses_usd) == min(chunk_size, first + count - s)
                for c, s in zip(known, starts, strict=True)
            ):
                for s, c in zip(starts, known, strict=True):
                    fold.add(s, c)
                completed += count
            else:
                todo.append((first, count))
        if completed and progress is not None:
            progress(completed, scenarios)
        name = self._install(spec)
        try:
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
                completed += s - block.first
                if progress is not None:
                    progress(completed, scenarios)

            self._gather_in_order(futures, consume)
        finally:
            self._uninstall(name)
        return fold.result(time.perf_counter() - start)

    # -- pass 2

    def _run_tasks(self, spec: BackendSpec, task):
        """A `run_tasks(items)` for the pass-2 functions: one Dask task per item, on the
        backend `spec` installed on every worker, results in item order."""

        def run(items: list) -> list:
            name = self._install(spec)
            try:
                futures = [self._submit(task, name, *item) for item in items]
                results: list = [None] * len(futures)
                self._gather_in_order(futures, results.__setitem__)
            finally:
                self._uninstall(name)
            return results

        return run

    def tail_loan_contributions(
        self,
        spec: BackendSpec,
        losses_usd: np.ndarray,
        weights: np.ndarray | None,
        alphas: Sequence[float],
        n_loans: int,
    ) -> dict[str, np.ndarray]:
        """`contributions.tail_loan_contributions` on the cluster (same chunks, same order)."""
        run = self._run_tasks(spec, _contribution_chunk)
        return tail_loan_contributions(None, losses_usd, weights, alphas, n_loans, run_tasks=run)

    def compute_sensitivities(
        self,
        spec: BackendSpec,
        assumptions,
        losses_usd: np.ndarray,
        weights: np.ndarray | None,
        alphas: Sequence[float],
        el_scenarios: int,
    ):
        """`sensitivities.compute_sensitivities` on the cluster (same chunks, same order);
        `spec` is the gradient backend (``BackendSpec(..., gradient=True)``)."""
        run = self._run_tasks(spec, _gradient_chunk)
        return compute_sensitivities(
            None, assumptions, losses_usd, alphas, el_scenarios, weights=weights, run_tasks=run
        )


def _close_all(resources: list) -> None:
    for resource in resources:
        try:
            resource.close()
        except Exception:  # closing is best effort
            pass
