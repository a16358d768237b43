"""The textbook one-factor Gaussian threshold model in a few lines of JAX: the benchmark's floor.

Obligor i defaults in a scenario when √ρ_i Z + √(1 − ρ_i) ε_i < Φ⁻¹(p_i), with one systematic
normal Z per scenario and one idiosyncratic normal ε_i per obligor and scenario; the loss is
Σ_i EAD_i LGD_i over the defaulters. One period, nothing else: no cash flows, no collateral,
no fire sale. Not the model of docs/spec.md: the least work any one-period credit simulation
does, which `gpucredit bench` times a one-period engine run against in the same process.

Random numbers: Threefry-2x32-20 (`kernels.rng`) on a stream of its own, `STREAM_ONE_FACTOR`,
counter (a, b) = (scenario, 0) for Z and (scenario, 1 + i) for ε_i, so a chunk's losses do not
depend on the chunking.

  prepare_one_factor(pd, rho, loss_given_default_usd, dtype=float32, block_size=512)
      -> OneFactorBook
  one_factor_losses(book, seed, first_scenario, count) -> [count]
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy.special import ndtri

from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.rng import normal_from_bits, threefry2x32_jax

__all__ = ["STREAM_ONE_FACTOR", "OneFactorBook", "one_factor_losses", "prepare_one_factor"]

STREAM_ONE_FACTOR = 0x0F1  # not one of docs/spec.md §8's streams (0-2): the floor's own numbers


class OneFactorBook(NamedTuple):
    """Obligors in blocks [NB, b] (padding: loss 0, never counted)."""

    index: jax.Array  # [NB, b] uint32 obligor index i (counter b = 1 + i)
    threshold: jax.Array  # [NB, b] Φ⁻¹(p_i)
    sqrt_rho: jax.Array  # [NB, b] √ρ_i
    sqrt_one_minus_rho: jax.Array  # [NB, b] √(1 − ρ_i)
    loss_usd: jax.Array  # [NB, b] EAD_i LGD_i


def prepare_one_factor(
    pd, rho, loss_given_default_usd, dtype=jnp.float32, block_size: int = 512
) -> OneFactorBook:
    """The obligors' constants, in blocks of `block_size` (padded with zero-loss obligors).

    Args: pd [N] one-period default probabilities, rho [N] asset correlations,
    loss_given_default_usd [N] EAD × LGD; dtype of the computation.
    """
    configure_jax()
    pd, rho, loss = (
        np.asarray(x, dtype=np.float64).reshape(-1) for x in (pd, rho, loss_given_default_usd)
    )
    n = len(pd)
    b = int(min(block_size, 1 << max(n - 1, 0).bit_length()))
    blocks = max(1, -(-n // b))
    pad = blocks * b - n

    def blocked(x, fill, kind):
        x = np.concatenate([np.asarray(x, kind), np.full(pad, fill, kind)])
        return jnp.asarray(x.reshape(blocks, b))

    return OneFactorBook(
        index=blocked(np.arange(n), 0, np.uint32),
        threshold=blocked(ndtri(pd), 0.0, np.float64).astype(dtype),
        sqrt_rho=blocked(np.sqrt(rho), 0.0, np.float64).astype(dtype),
        sqrt_one_minus_rho=blocked(np.sqrt(1 - rho), 1.0, np.float64).astype(dtype),
        loss_usd=blocked(loss, 0.0, np.float64).astype(dtype),
    )


@functools.partial(jax.jit, static_argnames=("count",))
def _one_factor_jit(book: OneFactorBook, seed, first_scenario, count: int):
    dtype = book.loss_usd.dtype
    scenarios = first_scenario + jnp.arange(count, dtype=jnp.uint32)  # [S]
    z0, _ = threefry2x32_jax(seed, STREAM_ONE_FACTOR, scenarios, 0)
    z = normal_from_bits(z0, dtype)[:, None]  # [S, 1] systematic factor Z

    def block(total, obligors):  # one block of b obligors: [S, b] lives only inside
        x0, _ = threefry2x32_jax(seed, STREAM_ONE_FACTOR, scenarios[:, None], obligors.index + 1)
        eps = normal_from_bits(x0, dtype)  # [S, b] idiosyncratic ε
        default = obligors.sqrt_rho * z + obligors.sqrt_one_minus_rho * eps < obligors.threshold
        return total + jnp.sum(jnp.where(default, obligors.loss_usd, 0), axis=1), None

    total, _ = lax.scan(block, jnp.zeros((count,), dtype), book)
    return total


def one_factor_losses(book: OneFactorBook, seed: int, first_scenario: int, count: int) -> jax.Array:
    """Portfolio loss [count] for scenarios first_scenario .. first_scenario + count − 1."""
    configure_jax()
    return _one_factor_jit(book, np.uint32(seed), np.uint32(first_scenario), int(count))
