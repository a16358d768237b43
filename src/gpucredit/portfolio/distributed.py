"""Scale-out on Dask (docs/spec.md, Scale-out): the same numbers on one process or many workers.

A run on a cluster is the single-process run cut into tasks, with every floating-point
reduction kept in the single-process order, so the results are *bit-identical* for any number
of workers (and to `engine.simulate` without Dask):

The cutting and folding are `runner`'s, written once: this module only says where a task runs
(`DaskRunner.map`).

* Pass 1, every loss kept. A task is a block of whole chunks ``[first, first + count)``
  (`runner.plan_blocks`, up to 64 chunks); chunks have the run's chunk size and start at
  multiples of it, as in one process, so every per-scenario loss is the same float (the JAX
  kernels are bit-identical for chunks of the same size at any offset). A task returns the
  `ChunkOutput` of each of its chunks (losses [chunk] and three per-loan sums [N]); the
  driver folds them in chunk order as they arrive (out-of-order blocks wait in a buffer), so
  EL_i, horizon PD and mean LGD match too. Every loss travels to the driver: 8 bytes a scenario.
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
* The book and the assumptions reach each worker once per simulation: a `WorkerPlugin` per
  distinct `backends.Simulation` (pass 1 and the contributions of one set of assumptions share it;
  the gradient backend and each stress case have their own) is registered on the cluster
  for the runner's life, and every worker, a replacement for a lost one
  included, receives it when it joins and builds the backend once, lazily, in its own process
  (its jit cache then serves every later task). Tasks carry only the plugin's name, the task
  function (pickled by reference) and its item: ``(first, count, ...)`` or a chunk of tail
  indices.
* Trust: whoever reaches a scheduler can run code on its workers, and tasks and results
  travel pickled. The local cluster (``workers=N``) therefore listens on 127.0.0.1 only and
  speaks TLS with credentials made for it (`Security.temporary`: a client or process without
  them is refused); an existing cluster is reached with the security of Dask's
  configuration (``distributed.comm.tls.*``; a ``tls://`` address needs it). Before Dask
  connects, the address is checked to greet as a Dask server (`_check_greeting`): Dask reads
  the first 8 bytes it receives as a message length, so an HTTP server's reply would make it
  try to allocate exabytes.
* Losing a worker: the scheduler reruns the tasks it held on the others (or on the
  replacement its nanny starts); tasks are pure functions of their arguments, so the result is
  unchanged. ``retries`` covers tasks that raise.
"""

from __future__ import annotations

import socket
import struct
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence

from gpucredit.portfolio.backends import Simulation
from gpucredit.portfolio.runner import ChunkMemo
from gpucredit.portfolio.settings import EngineError

__all__ = ["DaskRunner", "SchedulerUnreachable"]

CONNECT_TIMEOUT = "5s"
"""How long `DaskRunner` tries to reach a scheduler before giving up."""

WORKER_WAIT_SECONDS = 60.0
"""How long `DaskRunner` waits for the first worker of an existing cluster."""

MAX_GREETING_BYTES = 1 << 24
"""A Dask server's first message (its handshake) is a few hundred bytes: anything announcing
more than this is not Dask."""

TLS_HELP = (
    "--tls-ca-file, --tls-cert and --tls-key (or Dask's configuration: "
    "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert, "
    "distributed.comm.tls.client.key)"
)


class SchedulerUnreachable(EngineError):
    """The Dask scheduler at the given address did not answer (exit status 2 in the CLI)."""


# --------------------------------------------------------------------------- worker side


def _plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class SimulationPlugin(WorkerPlugin):
        """Carries a `Simulation` to every worker (replacements included) and builds its
        backend there once, on first use, in the worker's own process."""

        def __init__(self, name: str, simulation: Simulation):
            self.name = name
            self.simulation = simulation
            self._backend = None
            self._lock = None

        def __getstate__(self):
            return {"name": self.name, "simulation": self.simulation}

        def __setstate__(self, state):
            self.__init__(state["name"], state["simulation"])

        def setup(self, worker):
            self._lock = threading.Lock()

        def backend(self):
            if self._backend is None:
                with self._lock or threading.Lock():
                    if self._backend is None:
                        self._backend = ChunkMemo(self.simulation.build())
            return self._backend

    return SimulationPlugin


def _run_task(name: str, task: Callable, item: tuple):
    """One task on a worker: ``task(backend, *item)`` on the backend of plugin `name`, with
    the device and the worker it ran on."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(name)
    if plugin is None:  # pragma: no cover - the scheduler installs plugins before tasks
        raise RuntimeError(f"simulation plugin {name!r} is not installed on this worker")
    backend = plugin.backend()
    return task(backend, *item), backend.device, worker.address


# --------------------------------------------------------------------------- the runner


def _describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class DaskRunner:
    """A connection to a Dask cluster that runs the tasks of `engine.simulate` (a
    `runner.Runner`).

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
            security = _configured_security(scheduler)
            _check_greeting(scheduler, security, connect_timeout)
            try:
                self.client = Client(
                    scheduler, timeout=connect_timeout, security=security, set_as_default=False
                )
            except (OSError, TimeoutError, ValueError, TypeError) as error:
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
            security = _temporary_security()
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",  # never reachable from another machine
                protocol="tls://",
                security=security,
            )
            self.client = Client(cluster, security=security, set_as_default=False)
            self._owned += [self.client, cluster]
            self.address = cluster.scheduler_address
        self._finalizer = weakref.finalize(self, _close_all, list(self._owned))
        self.devices: set[str] = set()
        # One plugin per distinct simulation for the runner's life: pass 1 and the
        # contributions of the same assumptions share one, so the book travels once per
        # simulation, not per pass.
        self._plugins: dict[tuple, tuple[Simulation, str]] = {}
        self._driver_backends: dict[tuple, tuple[Simulation, object]] = {}

    chunks_per_block = 64  # a pass-1 task (runner.plan_blocks): few round trips a worker

    # -- lifecycle

    def close(self) -> None:
        if self._finalizer.alive:
            for _, name in self._plugins.values():
                self._uninstall(name)
        self._plugins.clear()
        self._driver_backends.clear()
        self._finalizer()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    def describe(self) -> dict:
        """Run metadata: scheduler address, workers, and the devices the workers reported."""
        return {
            "scheduler": self.address,
            "workers": self.workers(),
            "worker_devices": sorted(self.devices),
        }

    def backend(self, simulation: Simulation):
        """The simulation's backend on the driver (its name, device and precision for the
        run's metadata), built once."""
        key = simulation.key()
        if key not in self._driver_backends:
            self._driver_backends[key] = (simulation, simulation.build())
        return self._driver_backends[key][1]

    def map(
        self,
        simulation: Simulation,
        task: Callable,
        items: Sequence[tuple],
        affinity: Sequence[str | None] | None = None,
    ) -> Iterator[tuple[int, object, str | None]]:
        """`runner.Runner.map` on the cluster: one Dask task an item, yielded as they finish
        (the first error raised); each task goes to its `affinity` worker while it is there,
        to any other otherwise (a loose restriction: a lost worker stalls nothing)."""
        from distributed import as_completed

        name = self._install(simulation)
        futures = []
        for position, item in enumerate(items):
            worker = None if affinity is None else affinity[position]
            futures.append(self._submit(_run_task, name, task, item, worker=worker))
        position_of = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures, loop=self.client.loop):
            result, device, where = future.result()
            future.release()
            self.devices.add(device)
            yield position_of[future.key], result, where

    # -- plumbing

    def _install(self, simulation: Simulation) -> str:
        """The plugin name of the simulation, registered on the cluster the first time. The
        entry keeps the simulation (and so its arrays) alive, so the ids in its key stay its."""
        key = simulation.key()
        if key not in self._plugins:
            name = f"gpucredit-simulation-{uuid.uuid4().hex}"
            self.client.register_plugin(_plugin_class()(name, simulation), name=name)
            self._plugins[key] = (simulation, name)
        return self._plugins[key][1]

    def _uninstall(self, name: str) -> None:
        try:
            self.client.unregister_worker_plugin(name)
        except Exception:  # best effort: a stale plugin only costs memory
            pass

    def _submit(self, fn, *args, worker: str | None = None):
        if worker is None:
            return self.client.submit(fn, *args, pure=False, retries=self.retries)
        return self.client.submit(
            fn, *args, pure=False, retries=self.retries, workers=[worker],
            allow_other_workers=True,
        )  # fmt: skip


def _temporary_security():
    """TLS credentials made for one local cluster: only its scheduler, workers and this client
    hold them, so another process on the machine cannot connect and run code."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:  # pragma: no cover - cryptography is in the dist extra
        raise EngineError(
            "a local Dask cluster needs the cryptography package for its TLS credentials: "
            "pip install 'gpucredit[dist]'"
        ) from None


def _configured_security(scheduler: str):
    """The security of Dask's configuration (distributed.comm.tls.*, which --tls-ca-file,
    --tls-cert and --tls-key set); a tls:// address without credentials is refused."""
    from distributed.security import Security

    security = Security()
    if scheduler.startswith("tls://") and not (security.tls_ca_file and security.tls_client_cert):
        raise EngineError(
            f"the Dask scheduler at {scheduler} speaks TLS: give the cluster's CA certificate "
            f"and this client's certificate and key with {TLS_HELP}"
        )
    return security


def _check_greeting(address: str, security, timeout: str) -> None:
    """Raise `SchedulerUnreachable` unless the server at `address` greets as Dask does.

    A Dask server sends its handshake as soon as it accepts a connection, prefixed by its
    length in 8 bytes. Dask's client trusts that length: an HTTP server's bytes read as one
    of exabytes, which it would try to allocate. So read those 8 bytes first, here, within
    `timeout`: nothing (a server waiting for a request) or an absurd length is refused."""
    from dask.utils import parse_timedelta
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as error:
        raise SchedulerUnreachable(f"not a scheduler address: {address} ({error})") from None
    if scheme not in ("tcp", "tls"):  # inproc, ucx, ...: Dask's own checks
        return
    seconds = parse_timedelta(timeout)
    prefix = f"cannot reach the Dask scheduler at {address} (within {timeout})"
    try:
        with socket.create_connection((host, port), timeout=seconds) as raw:
            connection = raw
            if scheme == "tls":
                context = security.get_connection_args("client")["ssl_context"]
                hostname = host if context.check_hostname else None
                connection = context.wrap_socket(raw, server_hostname=hostname)
            with connection:
                greeting = _read_exactly(connection, 8)
    except TimeoutError:
        greeting = b""
    except OSError as error:  # refused, unreachable, TLS handshake failed
        raise SchedulerUnreachable(f"{prefix}: {_describe_error(error)}") from None
    if len(greeting) < 8:
        raise SchedulerUnreachable(
            f"{prefix}: the server there did not greet as a Dask scheduler does (is it another "
            "service, e.g. a web server or the dashboard's port?)"
        )
    (length,) = struct.unpack("<Q", greeting)
    if length > MAX_GREETING_BYTES:
        raise SchedulerUnreachable(
            f"{prefix}: the server there is not a Dask scheduler (it sent {greeting!r})"
        )


def _read_exactly(connection: socket.socket, count: int) -> bytes:
    """Up to `count` bytes (fewer when the peer closes first); TimeoutError past the socket's
    timeout."""
    data = b""
    while len(data) < count:
        block = connection.recv(count - len(data))
        if not block:
            break
        data += block
    return data


def _close_all(resources: list) -> None:
    for resource in resources:
        try:
            resource.close()
        except Exception:  # closing is best effort
            pass
