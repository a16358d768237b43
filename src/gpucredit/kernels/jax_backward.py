"""The gradients of the JAX kernels: Σ_j c_j L(ω_j) and ∂/∂θ in one backward sweep.

`weighted_loss_gradient` is reverse-mode AD of the conditional-mode loss w.r.t. every
ModelParams leaf; `_loss_gradient` runs it as one sweep over the loan blocks for both passes
(the forward of `jax_forward._simulate`, restructured so that no pass's forward is recomputed
twice). The balance schedules are per-book constants built from r(0) outside the graph, so
`schedule_tangent` gives their derivative w.r.t. r(0) (central differences of
`prepare_loans`), which the gradient adds to ∂/∂rate_level through SCHEDULE_LEAVES.

  weighted_loss_gradient(params, grid, blocks, seed, scenario_indices, coefficients)
      -> (value, grads: ModelParams)
  schedule_tangent(loans, rate_level, steps_per_year, block_size=None) -> SCHEDULE_LEAVES tangents
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gpucredit.kernels.jax_args import TRACE_COUNTS, _indices_arg, _shift_arg, _statics, _u32
from gpucredit.kernels.jax_factors import _cast_params, _paths, _shifted, correlated_shocks_jax
from gpucredit.kernels.jax_loans import (
    SCHEDULE_LEAVES,
    SCHEDULE_TERMS,
    LoanBlocks,
    _book_gpus,
    _loan_terms,
    prepare_loans,
)
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.jax_step import (
    _haircut,
    _liquidation_supply,
    _offtaker_default_periods,
    _revalue_block,
)
from gpucredit.kernels.params import LoanArrays, ModelGrid, ModelParams
from gpucredit.kernels.rng import offtaker_uniforms_jax_at, shock_normals_jax_at

__all__ = ["schedule_tangent", "weighted_loss_gradient"]


def schedule_tangent(
    loans: LoanArrays, rate_level: float, steps_per_year: int, block_size: int | None = None
) -> tuple[jax.Array, ...]:
    """d/dr(0) of the schedule-dependent LoanBlocks leaves (SCHEDULE_LEAVES order, float64):
    the schedules are per-book constants built from r(0) outside the AD graph (docs/spec.md §3),
    so `weighted_loss_gradient` adds ⟨∂L/∂leaf, d leaf/dr(0)⟩ to ∂/∂rate_level."""
    configure_jax()
    from gpucredit.kernels.schedule import balance_schedule

    periods = np.asarray(loans.balance_usd).shape[1] - 1
    step = 1e-6

    def blocks_at(level: float) -> LoanBlocks:
        rate0 = loans.rate + loans.is_floating * level
        balance, installment, balloon, _ = balance_schedule(
            loans.balance_usd[:, 0], rate0, loans.maturity_years, loans.amortization,
            steps_per_year, periods,
        )  # fmt: skip
        moved = loans._replace(balance_usd=balance, installment_usd=installment,
                               balloon_usd=balloon)  # fmt: skip
        return prepare_loans(moved, jnp.float64, block_size)

    up, down = blocks_at(rate_level + step), blocks_at(rate_level - step)
    return tuple((getattr(up, k) - getattr(down, k)) / (2 * step) for k in SCHEDULE_LEAVES)


def _loss_gradient(
    params, grid, blocks, normals, coefficients, remat_steps=True, offtaker_uniforms=None
):
    """Σ_j c_j L_j and its reverse-mode gradient, in one backward sweep over the loan blocks.

    L = F₂(θ, H(θ, Q)) with Q = F₁(θ): F₁ is pass 1 (the liquidation volume), H the haircut,
    F₂ pass 2 (the loss at a given haircut). Both passes run the same hazard recursion, so
    instead of differentiating them one after the other (the backward of each recomputing its
    forward), the gradient runs:
      1. pass 1 forward: Q [T, S, G];  H = H(θ, Q) and its VJP;
      2. pass 2 forward: the losses, and R [T, S, G] with ∂F₂/∂H = c P R (`_revalue_block`'s
         "recovery_weights"), hence Q̄ = (∂H/∂Q)ᵀ H̄ before any block's backward;
      3. per block, one VJP of (F₁, F₂) jointly with the cotangents (Q̄, c): θ̄ += Q̄ ∂F₁/∂θ +
         c ∂F₂/∂θ (H held fixed; its own dependence on θ came in step 1);
      4. the factor paths' and the parameters' cast back to θ.
    Same gradient as jax.grad of the loss (tests), about 40% less work.

    params: float64 ModelParams; blocks: LoanBlocks (dtype of the computation; its
    SCHEDULE_LEAVES are differentiated too); normals [S, T, K + ν]; coefficients [S] float64;
    offtaker_uniforms [S, J] or None: the offtakers' default periods, computed from them and
    held fixed (docs/spec.md §4a), switch contracts off in both passes.
    Returns (value float64, ModelParams of gradients, {SCHEDULE_LEAVES name: gradient}).
    """
    dtype = blocks.dtype
    cotangent = coefficients.astype(dtype)  # ∂value/∂L_j

    def upstream(theta):
        p = _cast_params(theta, dtype)
        paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
        discount = None
        if grid.discount:
            discount = jnp.exp(-jnp.cumsum(paths.rate * grid.dt_years, axis=0))  # [T, S]
        return p, paths, discount

    (p, paths, discount), upstream_vjp = jax.vjp(upstream, params)
    taus = None
    if offtaker_uniforms is not None:
        taus = _offtaker_default_periods(
            p, grid, blocks.offtaker_pd_annual, paths.credit, offtaker_uniforms.astype(dtype)
        )
    schedule = {k: getattr(blocks, k) for k in SCHEDULE_LEAVES}

    def schedule_terms(leaves):
        terms = _loan_terms(blocks._replace(**leaves), grid, dtype)
        return {k: getattr(terms, k) for k in SCHEDULE_TERMS}

    scheduled, schedule_vjp = jax.vjp(schedule_terms, schedule)
    terms = _loan_terms(blocks, grid, dtype)
    n_scen = normals.shape[0]

    # 1. pass 1 forward, the haircut (conditional mode: the expected volume is Q itself)
    def volume_block(volume, block_terms):
        block = _revalue_block(p, grid, block_terms, paths, None, None, None, offtaker_periods=taus)
        return volume + block.volume, None

    volume0 = jnp.zeros((grid.periods, n_scen, grid.n_generations), dtype)
    volume, _ = lax.scan(volume_block, volume0, terms)
    book_gpus = _book_gpus(blocks, grid, dtype)
    haircut, haircut_vjp = jax.vjp(
        lambda p, q: _haircut(p, grid, _liquidation_supply(p, q, q, book_gpus)), p, volume
    )

    # 2. pass 2 forward: the losses and the haircut's cotangent
    def loss_block(carry, block_terms):
        total, weights = carry
        outcome, ys = _revalue_block(
            p, grid, block_terms, paths, None, haircut, discount, ("recovery_weights",),
            offtaker_periods=taus,
        )  # fmt: skip
        return (total + jnp.sum(outcome.loss, axis=1), weights + ys["recovery_weights"]), None

    (losses, recovery_weights), _ = lax.scan(
        loss_block, (jnp.zeros((n_scen,), dtype), jnp.zeros_like(volume0)), terms
    )
    haircut_bar = cotangent[None, :, None] * paths.price * recovery_weights
    p_bar, volume_bar = haircut_vjp(haircut_bar)

    # 3. one backward sweep over the blocks, both passes at once
    def backward_block(carry, xs):
        block_terms, block_scheduled = xs

        def both_passes(p, paths, discount, leaves):
            outcome, ys = _revalue_block(
                p, grid, block_terms._replace(**leaves), paths, None, haircut, discount,
                ("volume",), remat_steps, taus,
            )  # fmt: skip
            return ys["volume"], jnp.sum(outcome.loss, axis=1)

        _, vjp = jax.vjp(both_passes, p, paths, discount, block_scheduled)
        bars = vjp((volume_bar, cotangent))
        carry = jax.tree.map(jnp.add, carry, bars[:3])
        return carry, bars[3]

    zeros = jax.tree.map(jnp.zeros_like, (p_bar, paths, discount))
    (p_blocks_bar, paths_bar, discount_bar), scheduled_bar = lax.scan(
        backward_block, zeros, (terms, scheduled)
    )

    # 4. back to θ
    p_bar = jax.tree.map(jnp.add, p_bar, p_blocks_bar)
    (grads,) = upstream_vjp((p_bar, paths_bar, discount_bar))
    (schedule_bar,) = schedule_vjp(scheduled_bar)
    value = jnp.sum(coefficients * losses.astype(jnp.float64))
    return value, grads, schedule_bar


@functools.partial(jax.jit, static_argnames=("grid", "remat_steps"))
def _weighted_loss_gradient_jit(
    params,
    grid,
    blocks,
    seed,
    scenarios,
    coefficients,
    normal_shift=None,
    tangent=None,
    remat_steps=True,
):
    TRACE_COUNTS["weighted_loss_gradient"] += 1
    normals = shock_normals_jax_at(
        seed, scenarios, grid.periods, grid.slots_per_period, blocks.dtype
    )
    normals = _shifted(normals, normal_shift, grid)
    offtakers = None
    if blocks.n_offtakers:
        offtakers = offtaker_uniforms_jax_at(seed, scenarios, blocks.n_offtakers, blocks.dtype)
    value, grads, schedule_bar = _loss_gradient(
        params, grid, blocks, normals, coefficients, remat_steps, offtakers
    )
    if tangent is None:
        return value, grads
    through_schedule = sum(
        jnp.vdot(schedule_bar[k].astype(jnp.float64), t)
        for k, t in zip(SCHEDULE_LEAVES, tangent, strict=True)
    )
    return value, grads._replace(rate_level=grads.rate_level + through_schedule)


def weighted_loss_gradient(
    params: ModelParams,
    grid: ModelGrid,
    blocks: LoanBlocks,
    seed,
    scenario_indices,
    coefficients,
    normal_shift=None,
    schedule_rate_tangent=None,
    remat_steps: bool = True,
) -> tuple[jax.Array, ModelParams]:
    """Σ_j c_j L(ω_j) and its gradient w.r.t. every ModelParams leaf (reverse-mode AD).

    Always the conditional-mode loss (smooth), whatever grid.mode says; the scenarios are
    regenerated from their indices (common random numbers). With c_j = 1/S this is ∂EL; with
    the tail coefficients of the forward pass, ∂ES_α (Hong & Liu 2009).

    Args:
      scenario_indices: [S] scenario indices.
      coefficients: [S] weights c_j (float64 in the sum).
    Returns:
      (value float64 scalar, grads: ModelParams of float64 arrays shaped like the leaves).
      Correlation: grads.correlation[j, k] is the derivative w.r.t. the entry [j, k] of the
      matrix as passed; jnp.linalg.cholesky symmetrizes its input, so for a symmetric move
      of Σ_jk = Σ_kj (docs/spec.md §7) the derivative is grads[j, k] + grads[k, j].
      schedule_rate_tangent: `schedule_tangent(...)` to include r(0)'s effect on the balance
      schedules in grads.rate_level (without it, the schedules are held fixed).
      remat_steps: recompute each period's intermediates in the backward sweep (True, less
      memory traffic) or store them as [T, S, b] stacks per block (False).
    The backward runs both passes in one sweep over the loan blocks (`_loss_gradient`).
    """
    configure_jax()
    params = ModelParams(*(jnp.asarray(leaf, dtype=jnp.float64) for leaf in params))
    stripped = _statics(blocks)
    return _weighted_loss_gradient_jit(
        params,
        grid._replace(mode="conditional"),
        stripped,
        _u32(seed, "seed"),
        _indices_arg(scenario_indices),
        jnp.asarray(coefficients, dtype=jnp.float64),
        _shift_arg(normal_shift),
        schedule_rate_tangent,
        remat_steps,
    )
