"""Scale-out on Dask (portfolio/distributed.py): the same numbers on one process or many
workers, a lost worker changes nothing, and an unreachable scheduler is a clear error.

One 2-worker local cluster (processes, one thread each) serves the module. The JAX workers
share a persistent compilation cache with this process, so they load the kernels the
single-process reference compiled instead of compiling them again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SMALL_JAX_RUN, random_book

distributed = pytest.importorskip("distributed")

from gpucredit.cli import main  # noqa: E402
from gpucredit.portfolio.distributed import DaskRunner, SchedulerUnreachable  # noqa: E402
from gpucredit.portfolio.engine import simulate  # noqa: E402
from gpucredit.portfolio.runner import plan_blocks  # noqa: E402

UNREACHABLE = "tcp://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent JAX compilation cache for this process and the workers (restored after)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = str(tmp_path_factory.mktemp("jax-cache"))
    saved_env = {k: os.environ.get(k) for k in _CACHE_ENV}
    saved_cfg = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield directory
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    jax.config.update("jax_compilation_cache_dir", saved_cfg[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_cfg[1])
    compilation_cache.reset_cache()


_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.fixture(scope="module")
def cluster(jax_cache):
    """(address, client) of a 2-worker local cluster, shared by the module."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as local,
        Client(local, set_as_default=False) as client,
    ):
        yield local.scheduler_address, client


def assert_same_run(a, b, exact_pass2: bool = True):
    """Per-scenario losses bit-identical; everything else identical (or to rounding)."""
    np.testing.assert_array_equal(a.losses_usd, b.losses_usd)
    assert a.measures.to_dict() == b.measures.to_dict()
    compare = np.testing.assert_array_equal if exact_pass2 else _close
    ca, cb = a.contributions, b.contributions
    np.testing.assert_array_equal(ca.expected_loss_usd, cb.expected_loss_usd)
    np.testing.assert_array_equal(ca.horizon_pd, cb.horizon_pd)
    np.testing.assert_array_equal(ca.mean_lgd, cb.mean_lgd)
    assert ca.expected_shortfall_usd.keys() == cb.expected_shortfall_usd.keys()
    for key in ca.expected_shortfall_usd:
        compare(ca.expected_shortfall_usd[key], cb.expected_shortfall_usd[key])
    if a.sensitivities is not None:
        sa, sb = a.sensitivities, b.sensitivities
        assert sa.parameter == sb.parameter
        compare(sa.d_expected_loss, sb.d_expected_loss)
        for key in sa.d_expected_shortfall:
            compare(sa.d_expected_shortfall[key], sb.d_expected_shortfall[key])


def _close(x, y):
    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- pure parts


def test_blocks_are_whole_chunks_in_order():
    blocks = plan_blocks(10_000, 256, workers=2)
    assert blocks[0][0] == 0 and sum(c for _, c in blocks) == 10_000
    for (f0, c0), (f1, _) in zip(blocks, blocks[1:], strict=False):
        assert f0 % 256 == 0 and c0 % 256 == 0 and f1 == f0 + c0
    assert len(blocks) == math.ceil(40 / 5)  # 40 chunks, 5 per block: ~4 blocks a worker


# ----------------------------------------------------------------------------- on a cluster


JAX_BOOK = random_book(3, 12)


@pytest.fixture(scope="module")
def single_jax_run(jax_cache, assumptions):
    """The single-process JAX float32 run (every loss kept) the cluster runs must equal."""
    return simulate(JAX_BOOK, assumptions, **SMALL_JAX_RUN)


def test_two_workers_give_the_single_process_numbers(
    cluster, assumptions, single_jax_run, monkeypatch
):
    """JAX float32: per-scenario losses, VaR/ES, contributions and sensitivities identical.
    The book travels once per backend: pass 1 and the contributions share one plugin, the
    calibration's year-1 pass and the gradient backend have one each, and all are removed from
    the cluster at the end."""
    address, _ = cluster
    single = single_jax_run
    registered: list[str] = []
    register = distributed.Client.register_plugin

    def counting(self, plugin, name=None, **kwargs):
        registered.append(name)
        return register(self, plugin, name=name, **kwargs)

    monkeypatch.setattr(distributed.Client, "register_plugin", counting)
    on_dask = simulate(JAX_BOOK, assumptions, scheduler=address, **SMALL_JAX_RUN)
    assert_same_run(single, on_dask)
    meta = on_dask.metadata["dask"]
    assert meta["scheduler"] == address and meta["workers"] == 2
    assert meta["worker_devices"] == [single.metadata["device"]]
    assert len(registered) == len(set(registered)) == 3
    assert on_dask.calibration == single.calibration
    with distributed.Client(address, set_as_default=False) as client:
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert not any(name in names for names in plugins.values() for name in registered)


def test_offtaker_events_are_the_same_on_two_workers(cluster, assumptions):
    """docs/spec.md §4a: each scenario's offtaker events come from stream 2 and its own index,
    so a book naming offtakers gives the single-process numbers on a cluster too."""
    address, _ = cluster
    names = np.where(np.arange(12) % 3 == 0, "", np.where(np.arange(12) % 2, "Lab A", "Lab B"))
    pds = np.where(names == "Lab A", 0.3, np.where(names == "Lab B", 0.1, 0.0))
    book = dataclasses.replace(
        JAX_BOOK,
        contracted_share=np.full(12, 0.8),
        contract_years_remaining=np.full(12, 3.0),
        offtaker=names.astype(object),
        offtaker_pd_annual=pds,
    )
    single = simulate(book, assumptions, **SMALL_JAX_RUN)
    assert_same_run(single, simulate(book, assumptions, scheduler=address, **SMALL_JAX_RUN))


def assert_same_tails_run(a, b):
    """Everything but the per-scenario losses identical (b may be tails-only)."""
    np.testing.assert_array_equal(a.tail.indices, b.tail.indices)
    np.testing.assert_array_equal(a.tail.losses_usd, b.tail.losses_usd)
    np.testing.assert_array_equal(a.histogram.counts, b.histogram.counts)
    assert_same_run(
        dataclasses.replace(a, losses_usd=None), dataclasses.replace(b, losses_usd=None)
    )


def test_tails_only_on_two_workers_gives_the_numbers_of_keeping_every_loss(
    cluster, assumptions, single_jax_run
):
    """Tails-only pass 1 on the cluster (one task a batch, only tails and statistics back)
    equals the single-process run that keeps every loss, and the single-process tails-only
    run: measures with their standard errors, contributions and sensitivities, bit for bit."""
    address, _ = cluster
    on_dask = simulate(JAX_BOOK, assumptions, scheduler=address, keep_losses=False, **SMALL_JAX_RUN)
    assert on_dask.losses_usd is None and on_dask.metadata["keep_losses"] is False
    assert on_dask.metadata["dask"]["workers"] == 2
    assert_same_tails_run(single_jax_run, on_dask)
    local = simulate(JAX_BOOK, assumptions, keep_losses=False, **SMALL_JAX_RUN)
    assert_same_tails_run(local, on_dask)


@pytest.mark.parametrize("keep_losses", [True, False])
def test_pass2_tasks_go_to_the_worker_that_ran_their_scenarios(
    cluster, assumptions, monkeypatch, keep_losses
):
    """Each contribution task is submitted to the worker whose pass-1 task (block or batch)
    holds its first tail index, as a loose restriction (another worker may take it)."""
    from distributed import Client

    from gpucredit.portfolio import engine
    from gpucredit.portfolio.runner import owner_of

    address, client = cluster
    submitted, owners = [], []
    submit = Client.submit

    def recording_submit(self, fn, name, task, item, **kwargs):  # DaskRunner's _run_task
        submitted.append((task.__name__, item, kwargs))
        return submit(self, fn, name, task, item, **kwargs)

    monkeypatch.setattr(Client, "submit", recording_submit)
    for function in ("run_pass1", "run_tails_pass1"):
        original = getattr(engine, function)

        def recording(*args, _original=original, **kwargs):
            pass1 = _original(*args, **kwargs)
            owners.extend(pass1.owners)
            return pass1

        monkeypatch.setattr(engine, function, recording)
    book = random_book(4, 10)
    kwargs = dict(scenarios=4000, seed=5, backend="numpy", chunk_size=128, alphas=(0.5, 0.99))
    result = simulate(
        book,
        assumptions,
        scheduler=address,
        keep_losses=keep_losses,
        sensitivities=False,
        calibration=False,
        **kwargs,
    )  # fmt: skip  (the calibration's year-1 pass would add its own pass-1 owners)
    workers = set(client.scheduler_info()["workers"])
    assert {worker for _, _, worker in owners} == workers  # both ran pass-1 tasks
    assert sum(count for _, count, _ in owners) == 4000
    pass1 = [kw for name, _, kw in submitted if name in ("run_block", "run_batch")]
    assert pass1 and all("workers" not in kw for kw in pass1)
    pass2 = [(item, kw) for name, item, kw in submitted if name == "contribution_of_chunk"]
    assert len(pass2) == 2  # the union of the tails: 2,000 indices, two chunks of 1024
    for item, kw in pass2:
        first_index = int(item[0][0])
        assert kw["workers"] == [owner_of(owners, first_index)]
        assert kw["allow_other_workers"] is True
    single = simulate(book, assumptions, keep_losses=keep_losses, sensitivities=False, **kwargs)
    assert_same_tails_run(single, result)


def test_a_killed_worker_is_replaced_and_the_result_is_the_same(cluster, assumptions):
    address, client = cluster
    book = random_book(5, 60)
    kwargs = dict(
        scenarios=16_384,
        seed=2,
        backend="numpy",
        chunk_size=256,
        alphas=(0.99,),
        sensitivities=False,
    )
    single = simulate(book, assumptions, **kwargs)
    kill_one_worker, victim, killed = _killer(client)
    on_dask = simulate(book, assumptions, scheduler=address, progress=kill_one_worker, **kwargs)
    assert killed, "the run ended before a worker could be killed"
    assert_same_run(single, on_dask)
    _wait_for_a_replacement(client, victim)


def _killer(client):
    """(progress callback that SIGKILLs one worker at the first progress report of an
    unfinished run, the victim's pid, the list it appends to once it has killed)."""
    pids = client.run(os.getpid)  # {worker address: pid}
    victim = pids[sorted(pids)[0]]
    killed: list[int] = []

    def kill_one_worker(done, total):
        if not killed and done < total:
            os.kill(victim, signal.SIGKILL)
            killed.append(done)

    return kill_one_worker, victim, killed


def _wait_for_a_replacement(client, victim: int) -> None:
    """The nanny started a replacement: two workers again, the victim not among them."""
    client.wait_for_workers(2, timeout=120)
    deadline = time.monotonic() + 60
    while victim in client.run(os.getpid).values() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim not in client.run(os.getpid).values()


def test_a_killed_worker_in_tails_only_mode_changes_nothing(cluster, assumptions):
    """Tails-only pass 1 (one task a batch) with a worker SIGKILLed after the first batch came
    back: its batches run again elsewhere, and tail, histogram, measures with their standard
    errors and contributions are those of one process keeping every loss, bit for bit."""
    address, client = cluster
    book = random_book(5, 40)
    kwargs = dict(scenarios=8192, seed=2, backend="numpy", chunk_size=256, alphas=(0.95, 0.99))
    kwargs |= dict(sensitivities=False)
    single = simulate(book, assumptions, keep_losses=True, **kwargs)
    kill_one_worker, victim, killed = _killer(client)
    on_dask = simulate(
        book, assumptions, scheduler=address, keep_losses=False, progress=kill_one_worker,
        **kwargs,
    )  # fmt: skip
    assert killed and killed[0] < 8192, "the run ended before a worker could be killed"
    assert on_dask.losses_usd is None and on_dask.measures.n_batches == 32
    assert_same_tails_run(single, on_dask)
    _wait_for_a_replacement(client, victim)


def test_batches_short_of_the_tail_run_again_on_the_cluster(cluster, assumptions, monkeypatch):
    """With every batch keeping only its 8 largest losses (patched on the workers; k = 202,
    about 6 a batch), many batches hold more of the run's top k than that: the cluster runs
    those again down to the merged floor, and the result is that of one process keeping
    every loss."""
    from distributed import Client

    address, client = cluster

    def keep_eight():  # runs on each worker (a nested function: pickled by value)
        from gpucredit.portfolio import runner

        runner.batch_tail_size = lambda scenarios, alphas, count: min(count, 8)

    def restore():
        from gpucredit.portfolio import risk, runner

        runner.batch_tail_size = risk.batch_tail_size

    book = random_book(6, 10)
    kwargs = dict(scenarios=2000, seed=7, backend="numpy", chunk_size=128, alphas=(0.9, 0.99))
    kwargs |= dict(sensitivities=False)
    single = simulate(book, assumptions, keep_losses=True, **kwargs)
    submitted = []
    submit = Client.submit

    def recording_submit(self, fn, name, task, item, **kw):  # DaskRunner's _run_task
        submitted.append((task.__name__, item))
        return submit(self, fn, name, task, item, **kw)

    monkeypatch.setattr(Client, "submit", recording_submit)
    client.run(keep_eight)
    try:
        on_dask = simulate(book, assumptions, scheduler=address, keep_losses=False, **kwargs)
    finally:
        client.run(restore)
    # run_batch(backend, first, count, chunk_size, scenarios, alphas, floor): a rerun has a floor
    reruns = [item for name, item in submitted if name == "run_batch" and len(item) == 6]
    assert len(reruns) >= 4 and all(math.isfinite(item[-1]) for item in reruns)
    assert_same_tails_run(single, on_dask)


def test_stress_and_checkpoint_hooks_on_the_cluster(cluster, assumptions):
    """Stress cases rerun pass 1 on the cluster; chunks already done are not recomputed."""
    from gpucredit.portfolio.stress import StressCase

    address, _ = cluster
    book = random_book(8, 10)
    params = assumptions.params._replace(price_vol=assumptions.params.price_vol * 1.5)
    stressed = dataclasses.replace(assumptions, params=params)
    kwargs = dict(scenarios=1024, seed=4, backend="numpy", chunk_size=128, alphas=(0.95,))
    kwargs |= dict(sensitivities=False, stress=(StressCase("vol", "price vol x1.5", stressed),))
    single = simulate(book, assumptions, **kwargs)

    class Checkpoint:
        def __init__(self, done):
            self._done, self.saved = done, {}

        def done(self):
            return self._done

        def save(self, first, chunk):
            self.saved[first] = chunk

    first = Checkpoint({})
    simulate(book, assumptions, scheduler=address, checkpoint=first, **kwargs)
    assert sorted(first.saved) == list(range(0, 1024, 128))
    resumed = Checkpoint({f: c for f, c in first.saved.items() if f < 512})
    again = simulate(book, assumptions, scheduler=address, checkpoint=resumed, **kwargs)
    assert sorted(resumed.saved) == list(range(512, 1024, 128))
    assert_same_run(single, again)
    assert again.stress[0].measures.to_dict() == single.stress[0].measures.to_dict()
    assert again.stress[0].measures.es(0.95) != again.measures.es(0.95)


def test_a_local_cluster_from_workers(assumptions):
    book = random_book(9, 8)
    kwargs = dict(scenarios=512, seed=1, backend="numpy", chunk_size=128, sensitivities=False)
    single = simulate(book, assumptions, **kwargs)
    on_dask = simulate(book, assumptions, workers=1, **kwargs)
    assert on_dask.metadata["dask"]["workers"] == 1
    assert_same_run(single, on_dask)


def test_cli_runs_on_a_scheduler(cluster, tmp_path):
    address, _ = cluster
    out = tmp_path / "out"
    args = ["run", "--scheduler", address, "--backend", "numpy", "--scenarios", "512"]
    args += ["--no-sensitivities", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "losses.parquet").exists() and (out / "summary.json").exists()


def test_pass2_runs_elsewhere_when_the_owner_is_gone(cluster, assumptions):
    """The owner restriction is loose: a task whose owner left the cluster runs on another
    worker, with the same result as in one process."""
    from gpucredit.portfolio.backends import Simulation
    from gpucredit.portfolio.contributions import tail_contributions
    from gpucredit.portfolio.loans import loan_arrays

    _, client = cluster
    book = random_book(4, 10)
    loans = loan_arrays(book, assumptions)
    run = Simulation("numpy", "float64", assumptions.params, assumptions.grid(), loans, 5)
    tails = {"0.9": (np.arange(100, 300), np.full(200, 1 / 200))}
    gone = ((0, 10_000, "tcp://127.0.0.1:9"),)  # no worker there
    with DaskRunner(client=client) as runner:
        got = tail_contributions(run, tails, len(book), runner=runner, owners=gone)
    want = tail_contributions(run, tails, len(book))
    np.testing.assert_array_equal(got["0.9"], want["0.9"])


# ----------------------------------------------------------------------------- errors


def test_unreachable_scheduler_is_a_clear_error(assumptions):
    start = time.monotonic()
    with pytest.raises(
        SchedulerUnreachable, match=f"cannot reach the Dask scheduler at {UNREACHABLE}"
    ):
        simulate(random_book(1, 4), assumptions, scenarios=64, scheduler=UNREACHABLE)
    assert time.monotonic() - start < 30


def test_cli_unreachable_scheduler_exits_non_zero(tmp_path):
    args = ["run", "--scheduler", UNREACHABLE, "--scenarios", "64", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: cannot reach the Dask scheduler at {UNREACHABLE}")
    assert "Traceback" not in result.output


def test_cli_workers_and_scheduler_are_exclusive(tmp_path):
    args = ["run", "--workers", "2", "--scheduler", UNREACHABLE, "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "mutually exclusive" in result.output


def test_runner_needs_exactly_one_target():
    from gpucredit.portfolio.settings import EngineError

    with pytest.raises(EngineError, match="exactly one"):
        DaskRunner(workers=2, scheduler=UNREACHABLE)


# ----------------------------------------------------------------------------- security (issue 20)


@pytest.fixture(scope="module")
def tls_runner():
    """A runner's own local cluster (one worker): TLS with temporary credentials."""
    with DaskRunner(workers=1) as runner:
        yield runner


def test_the_local_cluster_is_tls_on_localhost_and_refuses_strangers(tls_runner):
    from distributed import Client
    from distributed.security import Security

    assert tls_runner.address.startswith("tls://127.0.0.1:")
    workers = tls_runner.client.scheduler_info(n_workers=-1)["workers"]
    assert workers and all(w.startswith("tls://127.0.0.1:") for w in workers)
    plain = tls_runner.address.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout="3s", set_as_default=False)
    with pytest.raises((OSError, TimeoutError)):  # credentials of another CA
        Client(tls_runner.address, security=Security.temporary(), timeout="3s")


def test_cli_reaches_a_tls_scheduler_with_credential_files(tls_runner, tmp_path):
    security = tls_runner.client.security
    files = {}
    for option, pem in (
        ("--tls-ca-file", security.tls_ca_file),
        ("--tls-cert", security.tls_client_cert),
        ("--tls-key", security.tls_client_key),
    ):
        files[option] = tmp_path / option.strip("-")
        files[option].write_text(pem)
    args = ["run", "--scheduler", tls_runner.address, "--backend", "numpy"]
    args += ["--scenarios", "256", "--no-sensitivities", "--no-calibration", "--quiet"]
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2, refused.output
    assert "speaks TLS" in refused.output and "--tls-ca-file" in refused.output
    tls = [str(x) for option, path in files.items() for x in (option, path)]
    result = CliRunner().invoke(main, [*args, *tls, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_a_server_that_is_not_dask_is_refused_quickly(tmp_path, reply):
    """An HTTP server waits for a request (nothing comes) or answers text, which Dask would
    read as a message length of exabytes: refused before Dask reads anything."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        connection, _ = server.accept()
        if reply:
            connection.sendall(reply)
        time.sleep(4)
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    address = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    args = ["run", "--scheduler", address, "--scenarios", "64", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    server.close()
    assert result.exit_code == 2, result.output
    assert time.monotonic() - start < 20
    assert f"error: cannot reach the Dask scheduler at {address}" in result.output
    assert "not a Dask scheduler" in result.output or "did not greet" in result.output
    assert "Traceback" not in result.output
