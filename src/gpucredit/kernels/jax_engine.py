"""The JAX backend of docs/spec.md §2-6: jit-compiled, float32 (default) or float64, with gradients.

It computes exactly what `kernels.reference` computes, scenario by scenario, on the same
Threefry numbers (`kernels.rng`), but never materialises [scenarios × loans × periods]:

- `prepare_loans` hoists every per-loan constant out of the period and scenario loops once
  per book (Φ⁻¹(p^Δ), √ρ, 1/√(1−ρ), the balance schedule folded into debt service and
  exposure, ln(n_i a_i / B_i(t−1)) so that ln CC_i(t) = ln P_g(t) + that, clipped in log
  space), pads the book with inert loans to a multiple of `block_size` and reshapes it to
  [blocks, block_size, ...].
- A chunk of scenarios: normals generated on the device from (seed, scenario index), factor
  paths [S, T+1, ...], then two passes over the loan blocks (`lax.scan` over blocks, inside
  a `lax.scan` over the T periods whose carry is (cash, survival[, default period], loss) of
  shape [S, block]). Pass 1 accumulates the liquidation volume Q [T, S, G]; pass 2 recomputes
  the hazards (cheaper than storing them), applies the haircut H_g(t) and sums the loss.
  Sampled mode draws each block's default uniforms in pass 1, one per (scenario, loan), and
  pass 2 reads pass 1's default periods.
- Today's metrics (LC(0), CC(0), RF(0)) depend on ModelParams, so they are computed in the
  graph and carry gradients; so does everything else that depends on a parameter.

This module is the public API; the implementation is split by concern:

  jax_setup     configure_jax(): float64 and the XLA CPU flag, set at entry points
  jax_loans     LoanBlocks, prepare_loans, the per-chunk loan terms (_loan_terms, _book_gpus)
  jax_factors   correlated shocks, the t-copula transform, factor paths, the IS shift/weights
  jax_step      the period step of one block (_revalue_block), erfc, haircut, liquidation supply
  jax_forward   the forward passes (_simulate) and the jitted chunk / losses-at functions
  jax_backward  the one-sweep gradient (_loss_gradient) and the schedule tangent
  jax_args      argument normalisation shared by the public functions, TRACE_COUNTS

Public API (grid is static; seed and first_scenario are traced uint32, so a new chunk or a
new seed does not retrace; count and the number of scenario indices are static shapes):

  prepare_loans(loans, dtype=float32, block_size=None) -> LoanBlocks
  chunk_losses(params, grid, blocks, seed, first_scenario, count) -> [count]
  chunk_outcomes(...same...) -> ([count], per-loan sums [N] of loss, PD, defaulted exposure)
  losses_at(params, grid, blocks, seed, scenario_indices) -> [S]
  loan_losses_at(params, grid, blocks, seed, scenario_indices) -> [S, N]
  loss_given_normals(params, grid, blocks, normals, per_loan=False) -> [S] or [S, N]
  weighted_loss_gradient(params, grid, blocks, seed, scenario_indices, coefficients)
      -> (value, grads: ModelParams)
  schedule_tangent(loans, rate_level, steps_per_year, block_size=None) -> SCHEDULE_LEAVES tangents
  importance_log_weights(grid, seed, first_scenario, count, normal_shift) -> [count]
  factor_paths_jax(params, grid, normals) -> FactorPaths ([S, T+1, ...], like the reference)
  correlated_shocks_jax(params, grid, normals) -> ε [S, T, K]
  student_t_to_normal_jax(y, dof) -> Φ⁻¹(F_ν(y))

The dtype of the computation is the dtype of `blocks` (chosen in `prepare_loans`); params
come in as float64 NumPy (or JAX) leaves and are cast inside. Importing this module changes
no JAX or XLA setting: entry points call `configure_jax()` (`kernels.jax_setup`), and every
public function above calls it at first use.
"""

from __future__ import annotations

from gpucredit.kernels.jax_args import TRACE_COUNTS
from gpucredit.kernels.jax_backward import schedule_tangent, weighted_loss_gradient
from gpucredit.kernels.jax_factors import (
    _cast_params as _cast_params,  # used by portfolio.validation
)
from gpucredit.kernels.jax_factors import (
    correlated_shocks_jax,
    factor_paths_jax,
    importance_log_weights,
    student_t_to_normal_jax,
)
from gpucredit.kernels.jax_forward import (
    chunk_losses,
    chunk_outcomes,
    loan_losses_at,
    loss_given_normals,
    losses_at,
)
from gpucredit.kernels.jax_loans import SCHEDULE_LEAVES, SCHEDULE_TERMS, LoanBlocks, prepare_loans
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.reference import FactorPaths  # the same fields, JAX arrays here

__all__ = [
    "FactorPaths",
    "LoanBlocks",
    "SCHEDULE_LEAVES",
    "SCHEDULE_TERMS",
    "TRACE_COUNTS",
    "chunk_losses",
    "chunk_outcomes",
    "configure_jax",
    "correlated_shocks_jax",
    "factor_paths_jax",
    "importance_log_weights",
    "loan_losses_at",
    "loss_given_normals",
    "losses_at",
    "prepare_loans",
    "schedule_tangent",
    "student_t_to_normal_jax",
    "weighted_loss_gradient",
]
