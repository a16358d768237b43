"""Scenarios sharded over several devices on one host (kernels/sharding.py) give the same
losses as one device. Runs in a subprocess with two virtual CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2), since the device count is fixed when
JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import jax
    from conftest import random_book
    from gpucredit.io.assumptions import load_assumptions
    from gpucredit.kernels import jax_engine
    from gpucredit.kernels.sharding import scenario_mesh, sharded_chunk_outcomes
    from gpucredit.portfolio.backends import JaxBackend, ShardedJaxBackend
    from gpucredit.portfolio.loans import loan_arrays
    from gpucredit.portfolio.runner import run_pass1

    out = {"devices": len(jax.devices())}
    book = random_book(11, 10)
    assumptions = load_assumptions(None)
    loans = loan_arrays(book, assumptions)
    mesh = scenario_mesh()
    C, first, seed = 64, 320, 5
    for precision in ("float64", "float32"):
        grid = assumptions.grid("conditional")
        blocks = jax_engine.prepare_loans(loans, precision, 8)
        losses, loss_sum, pd_sum, ead_sum = sharded_chunk_outcomes(
            assumptions.params, grid, blocks, seed, first, C, mesh
        )
        losses = np.asarray(losses)
        rows = [
            [np.asarray(x) for x in jax_engine.chunk_outcomes(
                assumptions.params, grid, blocks, seed, first + d * C, C)]
            for d in range(2)
        ]
        whole = np.asarray(jax_engine.chunk_losses(
            assumptions.params, grid, blocks, seed, first, 2 * C))
        out[precision] = {
            "sharding": str(losses.sharding) if hasattr(losses, "sharding") else "",
            "losses_equal_per_device_chunks": bool(np.array_equal(
                losses, np.concatenate([r[0] for r in rows]))),
            "sums_equal_per_device": bool(all(
                np.array_equal(np.asarray(s)[d], rows[d][i + 1])
                for i, s in enumerate((loss_sum, pd_sum, ead_sum)) for d in range(2))),
            "losses_equal_one_chunk": bool(np.array_equal(losses, whole)),
            "max_rel_diff_one_chunk": float(np.max(np.abs(losses - whole) / np.maximum(
                np.abs(whole), 1e-30))),
        }
    # The backend in run_pass1: 3 sharded chunks of 2 x 64 plus a short last chunk.
    grid = assumptions.grid("conditional")
    sharded = ShardedJaxBackend(assumptions.params, grid, loans, seed, "float32", per_device=C)
    single = JaxBackend(assumptions.params, grid, loans, seed, "float32")
    S = 3 * 2 * C + 40
    a = run_pass1(sharded, S, sharded.default_chunk_size, len(book))
    b = run_pass1(single, S, C, len(book))
    out["pass1"] = {
        "chunk": sharded.default_chunk_size,
        "losses_equal": bool(np.array_equal(a.losses_usd, b.losses_usd)),
        "el_close": bool(np.allclose(a.loan_expected_loss_usd, b.loan_expected_loss_usd,
                                     rtol=1e-12, atol=0)),
        "device": sharded.device,
    }
    # A run with its own, smaller chunk size: sub-chunks of that size, each computed by the
    # program of that size (not padded up to per_device).
    sizes = []
    run_single = sharded._single.run_chunk
    def recording(first, count, padded_count=None):
        sizes.append(max(count, padded_count or 0))
        return run_single(first, count, padded_count)
    sharded._single.run_chunk = recording
    c = run_pass1(sharded, 100, 24, len(book))
    d = run_pass1(single, 100, 24, len(book))
    out["small_chunks"] = {
        "computed_sizes": sorted(set(sizes)),
        "losses_equal": bool(np.array_equal(c.losses_usd, d.losses_usd)),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded_run() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def test_two_virtual_devices(sharded_run):
    assert sharded_run["devices"] == 2


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_sharded_chunk_is_the_per_device_chunks(sharded_run, precision):
    """Device d runs exactly the single-device chunk of its scenarios: same bits."""
    r = sharded_run[precision]
    assert r["losses_equal_per_device_chunks"]
    assert r["sums_equal_per_device"]


def test_sharded_chunk_matches_one_device_chunk_in_float64(sharded_run):
    """Against one chunk of all 2C scenarios on one device: identical in float64 (float32 may
    differ in the last bit when the chunk size changes, jax_engine's note)."""
    assert sharded_run["float64"]["max_rel_diff_one_chunk"] <= 1e-15
    assert sharded_run["float32"]["max_rel_diff_one_chunk"] <= 1e-6


def test_sharded_backend_in_pass1(sharded_run):
    r = sharded_run["pass1"]
    assert r["chunk"] == 128
    assert r["losses_equal"]
    assert r["el_close"]
    assert r["device"].startswith("2 × cpu")


def test_a_smaller_run_chunk_is_not_padded_to_the_per_device_size(sharded_run):
    """--chunk-size below per_device on a multi-device host: each chunk computes its own
    scenarios (24 at a time), as one device with that chunk size does, not per_device (64)."""
    r = sharded_run["small_chunks"]
    assert r["computed_sizes"] == [24]
    assert r["losses_equal"]
