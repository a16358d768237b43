"""Several devices on one host, without Dask: a pass-1 chunk sharded over the devices.

A sharded chunk of D × C scenarios starting at `first_scenario` runs, on device d, exactly
the single-device chunk kernel (`jax_engine.chunk_outcomes`) for the C scenarios starting at
``first_scenario + d C``. The per-scenario losses are therefore bit-identical to a
single-device run with chunk size C (the JAX kernels give the same bits for chunks of the
same size at any offset), whatever the number of devices. The per-loan sums come back per
device ([D, N]), so the caller can add them in scenario order.

`jax.shard_map` over a one-axis `Mesh` ("scenarios"): the parameters and the loan blocks are
replicated (placed on every device once per call; tiny next to the work), the first scenario
of each device is the only sharded input, and nothing crosses devices inside the kernel.
Tested on the CPU with virtual devices (``XLA_FLAGS=--xla_force_host_platform_device_count``).

  scenario_mesh(devices=None) -> Mesh over the given (default: all local) devices
  sharded_chunk_outcomes(params, grid, blocks, seed, first_scenario, per_device, mesh)
      -> (losses [D C], loss_sum [D, N], pd_sum [D, N], ead_sum [D, N])
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpucredit.kernels.jax_args import _params_arg, _statics, _u32
from gpucredit.kernels.jax_forward import _chunk_losses_jit
from gpucredit.kernels.jax_loans import LoanBlocks
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.params import ModelGrid, ModelParams

__all__ = ["AXIS", "scenario_mesh", "sharded_chunk_outcomes"]

AXIS = "scenarios"


def scenario_mesh(devices=None) -> Mesh:
    """A one-axis mesh ("scenarios") over `devices` (default: every local device)."""
    configure_jax()  # before the device query starts JAX's backend (kernels.jax_setup)
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (AXIS,))


@functools.partial(jax.jit, static_argnames=("grid", "per_device", "mesh"))
def _sharded_jit(params, grid, blocks, seed, firsts, per_device, mesh):
    def one_device(params, blocks, seed, firsts):  # firsts: [1] on each device
        losses, loss_sum, pd_sum, ead_sum = _chunk_losses_jit(
            params, grid, blocks, seed, firsts[0], per_device, "outcomes"
        )
        return losses, loss_sum[None], pd_sum[None], ead_sum[None]

    return jax.shard_map(
        one_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
        check_vma=False,  # the kernel's scans start from unvarying zeros; nothing is reduced
    )(params, blocks, seed, firsts)


def sharded_chunk_outcomes(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    first_scenario: int,
    per_device: int,
    mesh: Mesh,
):
    """Pass 1 of D × `per_device` scenarios from `first_scenario`, sharded over `mesh`.

    Returns ``(losses [D per_device], loss_sum [D, N], pd_sum [D, N], ead_sum [D, N])``: row d
    of the sums is over device d's scenarios ``first + d per_device ...``; arguments as
    `jax_engine.chunk_outcomes` (`per_device` is static).
    """
    configure_jax()
    n_devices = mesh.devices.size
    last = int(first_scenario) + n_devices * int(per_device)
    if not 0 <= int(first_scenario) or last > 2**32:
        raise ValueError(f"scenarios {first_scenario} .. {last - 1} are not in [0, 2^32)")
    firsts = np.arange(n_devices, dtype=np.uint64) * per_device + int(first_scenario)
    firsts = jax.device_put(firsts.astype(np.uint32), NamedSharding(mesh, P(AXIS)))
    stripped = _statics(blocks)
    losses, loss_sum, pd_sum, ead_sum = _sharded_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        firsts,
        int(per_device),
        mesh,
    )
    n = blocks.n_loans
    return losses, loss_sum[:, :n], pd_sum[:, :n], ead_sum[:, :n]
