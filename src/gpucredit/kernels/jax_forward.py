"""The forward passes of the JAX kernels (docs/spec.md §6): the loss of a chunk of scenarios.

`_simulate` is the whole computation from a chunk's random numbers: factor paths, then two
passes over the loan blocks (`lax.scan` over blocks of `jax_step._revalue_block`). Pass 1
accumulates the liquidation volume Q [T, S, G] (sampled mode: and keeps each loan's default
period, drawing its uniforms in the block); pass 2 recomputes the hazards (cheaper than
storing them; sampled mode reads the default periods), applies the haircut H_g(t) and sums
the loss. The jitted functions around it
generate the random numbers on the device from (seed, scenario index) and are static in the
grid, the chunk size and the output only; the public functions normalise their arguments
(`jax_args`) and remove the padding loans.

  chunk_losses(params, grid, blocks, seed, first_scenario, count) -> [count]
  chunk_outcomes(...same...) -> ([count], per-loan sums [N] of loss, PD, defaulted exposure)
  losses_at(params, grid, blocks, seed, scenario_indices) -> [S]
  loan_losses_at(params, grid, blocks, seed, scenario_indices) -> [S, N]
  loss_given_normals(params, grid, blocks, normals, per_loan=False) -> [S] or [S, N]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gpucredit.kernels.jax_args import (
    TRACE_COUNTS,
    _indices_arg,
    _params_arg,
    _shift_arg,
    _statics,
    _u32,
)
from gpucredit.kernels.jax_factors import _cast_params, _paths, _shifted, correlated_shocks_jax
from gpucredit.kernels.jax_loans import LoanBlocks, _book_gpus, _loan_terms
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.jax_step import (
    DefaultDraws,
    _haircut,
    _liquidation_supply,
    _offtaker_default_periods,
    _revalue_block,
)
from gpucredit.kernels.params import ModelGrid, ModelParams
from gpucredit.kernels.rng import offtaker_uniforms_jax_at, shock_normals_jax, shock_normals_jax_at

__all__ = ["chunk_losses", "chunk_outcomes", "loan_losses_at", "loss_given_normals", "losses_at"]


def _simulate(
    params,
    grid: ModelGrid,
    blocks: LoanBlocks,
    normals,
    draws,
    output: str,
    scenario_weights=None,
    valid_count=None,
    offtaker_uniforms=None,
):
    """From the chunk's random numbers (the normals [S, T, K + ν]; in sampled mode `draws`, from
    which each block draws its default uniforms; for a book naming offtakers their stream-2
    uniforms [S, J], None: no offtaker defaults), by `output`:
    "total": loss per scenario [S]; "per_loan": loss per scenario and loan [S, NB b];
    "outcomes": (loss [S], and summed over the scenarios, per loan [NB b]: loss, default
    probability, defaulted exposure), each scenario weighted by `scenario_weights` [S]
    (importance sampling's likelihood ratios) when given, and only the first `valid_count`
    scenarios summed when given (a short chunk computed by a full chunk's program)."""
    dtype = blocks.dtype
    p = _cast_params(params, dtype)
    terms = _loan_terms(blocks, grid, dtype)
    paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
    discount = None
    if grid.discount:
        discount = jnp.exp(-jnp.cumsum(paths.rate * grid.dt_years, axis=0))  # [T, S] DF(t)
    n_scen = normals.shape[0]
    offtaker_periods = None  # [S, J] τ_j (docs/spec.md §4a), the same in both passes
    if offtaker_uniforms is not None:
        offtaker_periods = _offtaker_default_periods(
            p, grid, blocks.offtaker_pd_annual, paths.credit, offtaker_uniforms.astype(dtype)
        )

    # Pass 1: the liquidation volumes (Q, expected) [T, S, G], summed over the blocks; in
    # sampled mode also each block's default periods [S, b] (uint8: S N bytes per chunk),
    # which pass 2 prices instead of recomputing the hazards and the uniforms.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def volume_block(volumes, block_terms):
        block = _revalue_block(
            p, grid, block_terms, paths, draws, None, None, offtaker_periods=offtaker_periods
        )
        volume, expected = volumes
        return (volume + block.volume, expected + block.expected_volume), block.default_period

    volume0 = jnp.zeros((grid.periods, n_scen, grid.n_generations), dtype)
    (volume, expected_volume), default_periods = lax.scan(volume_block, (volume0, volume0), terms)
    book_gpus = _book_gpus(blocks, grid, dtype)
    haircut = _haircut(p, grid, _liquidation_supply(p, volume, expected_volume, book_gpus))

    # Pass 2: apply the haircut (conditional mode recomputes the hazards: cheaper than storing
    # them; sampled mode prices pass 1's default periods).
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def loss_block(total, xs):
        block_terms, default_period = xs  # default_period: [S, b] or None (conditional)
        outcome = _revalue_block(
            p, grid, block_terms, paths, default_period, haircut, discount,
            offtaker_periods=offtaker_periods,
        )  # fmt: skip
        total = total + jnp.sum(outcome.loss, axis=1)
        if output == "per_loan":
            return total, outcome.loss  # [S, b]
        if output == "outcomes":
            if scenario_weights is None and valid is None:
                return total, tuple(jnp.sum(x, axis=0) for x in outcome)  # 3 × [b]
            if scenario_weights is None:
                return total, tuple(jnp.sum(jnp.where(valid, x, 0), axis=0) for x in outcome)
            weights = (
                scenario_weights if valid is None else jnp.where(valid[:, 0], scenario_weights, 0)
            )
            return total, tuple(weights @ x for x in outcome)
        return total, None

    valid = None
    if valid_count is not None:
        valid = (jnp.arange(n_scen, dtype=jnp.uint32) < valid_count)[:, None]  # [S, 1]
    total, per_block = lax.scan(loss_block, jnp.zeros((n_scen,), dtype), (terms, default_periods))
    if output == "per_loan":
        return jnp.moveaxis(per_block, 0, 1).reshape(n_scen, -1)  # [S, NB b], padding included
    if output == "outcomes":
        return (total, *(x.reshape(-1) for x in per_block))
    return total


@functools.partial(jax.jit, static_argnames=("grid", "count", "output"))
def _chunk_losses_jit(
    params,
    grid,
    blocks,
    seed,
    first_scenario,
    count,
    output,
    normal_shift=None,
    scenario_weights=None,
    valid_count=None,
):
    TRACE_COUNTS["chunk_losses"] += 1
    dtype = blocks.dtype
    normals = shock_normals_jax(
        seed, first_scenario, count, grid.periods, grid.slots_per_period, dtype
    )
    normals = _shifted(normals, normal_shift, grid)
    scenarios = jnp.asarray(first_scenario).astype(jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
    draws = None
    if grid.mode == "sampled":
        draws = DefaultDraws(jnp.asarray(seed).astype(jnp.uint32), scenarios)
    if scenario_weights is not None:
        scenario_weights = scenario_weights.astype(dtype)
    offtakers = _offtaker_uniforms(blocks, seed, scenarios)
    return _simulate(
        params, grid, blocks, normals, draws, output, scenario_weights, valid_count, offtakers
    )


def _offtaker_uniforms(blocks: LoanBlocks, seed, scenarios):
    """Stream-2 uniforms [S, J] of a book naming offtakers (docs/spec.md §4a), else None."""
    if not blocks.n_offtakers:
        return None
    return offtaker_uniforms_jax_at(
        jnp.asarray(seed).astype(jnp.uint32), scenarios, blocks.n_offtakers, blocks.dtype
    )


@functools.partial(jax.jit, static_argnames=("grid", "output"))
def _losses_at_jit(params, grid, blocks, seed, scenarios, output, normal_shift=None):
    TRACE_COUNTS["loan_losses_at" if output == "per_loan" else "losses_at"] += 1
    dtype = blocks.dtype
    normals = shock_normals_jax_at(seed, scenarios, grid.periods, grid.slots_per_period, dtype)
    normals = _shifted(normals, normal_shift, grid)
    draws = None
    if grid.mode == "sampled":
        draws = DefaultDraws(jnp.asarray(seed).astype(jnp.uint32), scenarios.astype(jnp.uint32))
    offtakers = _offtaker_uniforms(blocks, seed, scenarios.astype(jnp.uint32))
    return _simulate(params, grid, blocks, normals, draws, output, offtaker_uniforms=offtakers)


def chunk_losses(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    first_scenario,
    count: int,
    normal_shift=None,
) -> jax.Array:
    """Portfolio loss L(ω) (docs/spec.md §6) for scenarios first_scenario .. first_scenario+count−1.

    Args:
      params: ModelParams (float64 NumPy or JAX leaves; cast to blocks.dtype inside).
      grid: ModelGrid (static: mode, copula, discounting, launch periods).
      blocks: from `prepare_loans`; its dtype is the computation's.
      seed: int in [0, 2^32) or a uint32 scalar (traced: a new seed does not retrace).
      first_scenario: int or uint32 scalar (traced: a new chunk does not retrace).
      count: S, the chunk size (static).
      normal_shift: [T, K] or None: importance sampling's shift of the systematic normals.
    Returns:
      [count] losses in blocks.dtype, USD.
    """
    configure_jax()
    stripped = _statics(blocks)
    return _chunk_losses_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        "total",
        _shift_arg(normal_shift),
    )


def chunk_outcomes(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    first_scenario,
    count: int,
    normal_shift=None,
    scenario_weights=None,
    valid_count=None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """What pass 1 of a run keeps of a chunk: the portfolio loss per scenario [count] and,
    summed over the chunk's scenarios, per loan [N]: the loss, the horizon default
    probability 1 − S_i(T) (sampled mode: default indicators) and the defaulted exposure
    Σ_t DF d_i(t) EAD_i(t); each scenario weighted by `scenario_weights` [count] when given
    (importance sampling, with `normal_shift`). `valid_count` (<= count, traced: no
    recompilation): sum only the first valid_count scenarios, so that a run's short last
    chunk reuses the full chunks' program; the caller drops the other losses. Other
    arguments as `chunk_losses`."""
    configure_jax()
    stripped = _statics(blocks)
    losses, loss_sum, pd_sum, ead_sum = _chunk_losses_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        "outcomes",
        _shift_arg(normal_shift),
        None if scenario_weights is None else jnp.asarray(scenario_weights),
        None if valid_count is None else _u32(valid_count, "valid_count"),
    )
    n = blocks.n_loans
    return losses, loss_sum[:n], pd_sum[:n], ead_sum[:n]


def losses_at(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    normal_shift=None,
):
    """Portfolio loss [S] for an explicit array of scenario indices [S] (e.g. the tail set)."""
    configure_jax()
    stripped = _statics(blocks)
    return _losses_at_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        "total",
        _shift_arg(normal_shift),
    )


def loan_losses_at(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    normal_shift=None,
) -> jax.Array:
    """Loss per scenario and loan [S, N] (padding removed), for Euler contributions.

    Σ over the loans equals `losses_at` up to rounding. Memory is O(S N).
    """
    configure_jax()
    stripped = _statics(blocks)
    losses = _losses_at_jit(
        _params_arg(params),
        grid,
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        "per_loan",
        _shift_arg(normal_shift),
    )
    return losses[:, : blocks.n_loans]


@functools.partial(jax.jit, static_argnames=("grid", "output"))
def _loss_given_normals_jit(params, grid, blocks, normals, output):
    TRACE_COUNTS["loss_given_normals"] += 1
    return _simulate(params, grid, blocks, normals.astype(blocks.dtype), None, output)


def loss_given_normals(
    params: ModelParams, grid: ModelGrid, blocks: LoanBlocks, normals, per_loan: bool = False
) -> jax.Array:
    """Conditional-mode loss for given stream-0 normals [S, T, K + ν] instead of the Threefry
    ones: [S] (or [S, N] with per_loan). Differentiable in `normals` (reverse stress testing
    searches the shock path with it) and in `params`."""
    configure_jax()
    stripped = _statics(blocks)
    losses = _loss_given_normals_jit(
        _params_arg(params),
        grid._replace(mode="conditional"),
        stripped,
        jnp.asarray(normals),
        "per_loan" if per_loan else "total",
    )
    return losses[:, : blocks.n_loans] if per_loan else losses
