"""The CuPy backend's gradient: the fused CUDA adjoint (kernels/cuda/adjoint.cu) of the
conditional-mode two-pass loss, Σ_j c_j L(ω_j) and its derivative w.r.t. every ModelParams
leaf, the same (value, grads) as `jax_backward.weighted_loss_gradient`.

The loan work (the [scenarios × loans × periods] part) is CUDA; what is small stays in JAX,
with the JAX kernels' own functions so the chain is the same:
  1. the factor table [S, T, 3G + 7] at the scenario indices (`cupy_engine.factor_table_jax`
     on the stream-0 normals, importance shift applied) and the offtakers' default periods;
  2. pass 1 (forward.cu, forward_kernel<real, false>): the volumes Q [S, T, G];
  3. H = H(θ, Q) (`jax_step._haircut` of `_liquidation_supply`, JAX);
  4. recovery_kernel: the losses L_s and R [S, T, G], so H̄ = c P R and, by H's VJP, the
     parameters' part p̄_H and Q̄;
  5. adjoint_kernel: each loan's period loop forward (storing Cash and S before each period)
     and backwards, seeds c and Q̄: the factor rows' cotangents [S, T, W] and per loan the
     hazard base's, the schedule's (B(t−1), I(t), ln(n a/B(t−1)), ln RF) and the model
     constants' (β_L, β_C, β_R, coverage floor and cap and their logs);
  6. back to θ: the factor rows through the table's VJP (correlation/Cholesky, factor paths,
     discount, BTC index: JAX), the β's through the hazard base's fixed PD references
     (base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref + β_C ln CC^ref (+ β_R ln RF^ref)) plus their direct
     terms, refi_ltv through ln RF, floor/cap through their logs, plus p̄_H; with a schedule
     tangent, r(0)'s effect on the balance schedules goes to ∂/∂rate_level.
Every reduction is deterministic (adjoint.cu's header). Periods are at most
GPUCREDIT_ADJOINT_MAX_T = 64 (the per-thread stored state).

`launch(name, grid_dims, threads, shared_bytes, args)` runs one kernel by its name
expression (CuPy on a GPU; the tests plug in a CPU emulation of CUDA), `xp` is the array
module of the kernel's arrays (cupy, or numpy for the emulation).

Public API:
  weighted_loss_gradient_cupy(params, grid, prepared, seed, scenario_indices, coefficients,
      normal_shift=None, schedule_rate_tangent=None, launch=None, xp=None, per_block=None)
      -> (value float, grads: ModelParams of float64 NumPy arrays)
  losses_at_cupy(params, grid, prepared, seed, scenario_indices, normal_shift=None,
      launch=None, xp=None, per_block=None) -> [S] the tail forward (forward.cu's two passes)
  kernel_names(dtype) -> the three name expressions of one dtype
  adjoint_source() -> forward.cu + adjoint.cu, one translation unit
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import NamedTuple

import numpy as np

from gpucredit.kernels import cupy_engine
from gpucredit.kernels.params import ModelGrid, ModelParams

__all__ = [
    "MAX_PERIODS",
    "adjoint_launch_shape",
    "adjoint_shared_memory_bytes",
    "adjoint_source",
    "kernel_names",
    "loan_bar_slots",
    "losses_at_cupy",
    "recovery_shared_memory_bytes",
    "weighted_loss_gradient_cupy",
]

ADJOINT_SOURCE = "cuda/adjoint.cu"
MAX_PERIODS = 64  # GPUCREDIT_ADJOINT_MAX_T
_FACTOR_BAR_COLUMNS = 10  # B_COUNT: the loan's rent, price, ln price, then the 7 F_* columns
_LOAN_TAIL_SLOTS = 8  # A_TAIL
# loan_bar tail slots (4T + A_*), adjoint.cu's order
_LN_REFI, _BETA_L, _BETA_C, _BETA_R, _FLOOR, _CAP, _LN_FLOOR, _LN_CAP = range(8)
_MAX_LOAN_PARTIALS = 1 << 27  # elements of the [groups, slots, n_pad] per-loan partials


def _real(dtype) -> str:
    return "float" if np.dtype(dtype) == np.float32 else "double"


def kernel_names(dtype) -> tuple[str, str, str]:
    """(pass 1, recovery, adjoint) name expressions of one dtype."""
    real = _real(dtype)
    return (
        f"forward_kernel<{real}, false>",
        f"recovery_kernel<{real}>",
        f"adjoint_kernel<{real}>",
    )


def adjoint_source() -> str:
    """forward.cu then adjoint.cu: adjoint.cu uses forward.cu's macros and helpers."""
    files = importlib.resources.files("gpucredit.kernels")
    return cupy_engine.kernel_source() + "\n" + files.joinpath(ADJOINT_SOURCE).read_text()


def loan_bar_slots(periods: int) -> int:
    """Slots of the per-loan partial array: 4 per period (base, B, I, ln(n a/B)) + 8."""
    return 4 * periods + _LOAN_TAIL_SLOTS


def recovery_shared_memory_bytes(periods: int, n_generations: int, threads: int, itemsize: int):
    """recovery_kernel: factor row [T, W], haircut row [T, G], per-warp weights [warps, T],
    per-warp loss [warps] (reals), warp generations (ints)."""
    warps = threads // cupy_engine.WARP
    reals = (
        periods * cupy_engine.factor_columns(n_generations)
        + periods * n_generations
        + warps * periods
        + warps
    )
    return reals * itemsize + 4 * warps


def adjoint_shared_memory_bytes(periods: int, n_generations: int, threads: int, itemsize: int):
    """adjoint_kernel: factor row [T, W], haircut and Q̄ rows [T, G] each, per-warp factor
    cotangents [warps, T, 10] (reals), warp generations (ints)."""
    warps = threads // cupy_engine.WARP
    reals = (
        periods * cupy_engine.factor_columns(n_generations)
        + 2 * periods * n_generations
        + warps * periods * _FACTOR_BAR_COLUMNS
    )
    return reals * itemsize + 4 * warps


def adjoint_launch_shape(count: int, tiles: int, n_pad: int, periods: int) -> tuple[int, int]:
    """(scenarios per block, scenario groups) of the adjoint: forward.cu's rule, with the
    per-loan partials [groups, 4T + 8, n_pad] bounded."""
    per_block, _ = cupy_engine.launch_shape(count, tiles, n_pad)
    slots = loan_bar_slots(periods)
    while per_block < count and -(-count // per_block) * slots * n_pad > _MAX_LOAN_PARTIALS:
        per_block *= 2
    per_block = min(per_block, max(count, 1))
    return per_block, -(-count // per_block)


# --------------------------------------------------------------------------- JAX side


class _JaxParts(NamedTuple):
    inputs: object  # (params, grid, seed, scenarios, shift, pd_annual, dtype) -> (table, τ)
    table_vjp: object  # (..., table_bar) -> ModelParams
    haircut: object  # (params, grid, volume [S, T, G], book_gpus) -> H [S, T, G]
    haircut_vjp: object  # (..., haircut_bar) -> (ModelParams, Q̄)


@functools.cache
def _jax_parts() -> _JaxParts:
    import jax
    import jax.numpy as jnp

    from gpucredit.kernels.jax_factors import _cast_params, _shifted
    from gpucredit.kernels.jax_step import (
        _haircut,
        _liquidation_supply,
        _offtaker_default_periods,
    )
    from gpucredit.kernels.rng import offtaker_uniforms_jax_at, shock_normals_jax_at

    def normals_at(grid, seed, scenarios, shift, dtype):
        normals = shock_normals_jax_at(seed, scenarios, grid.periods, grid.slots_per_period, dtype)
        return _shifted(normals, shift, grid)

    @functools.partial(jax.jit, static_argnames=("grid", "dtype"))
    def inputs(params, grid, seed, scenarios, shift, pd_annual, dtype):
        table = cupy_engine.factor_table_jax(params, grid, normals_at(grid, seed, scenarios,
                                                                       shift, dtype))  # fmt: skip
        if pd_annual.shape[0] == 0:
            return table, jnp.zeros((1, 1), jnp.int32)
        # τ_j as the JAX gradient has them: held fixed (docs/spec.md §4a)
        uniforms = offtaker_uniforms_jax_at(seed, scenarios, pd_annual.shape[0], dtype)
        credit = table[:, :, 3 * grid.n_generations + 4].T  # [T, S] Z(t)
        taus = _offtaker_default_periods(
            _cast_params(params, dtype), grid, pd_annual, credit, uniforms
        )
        return table, taus.astype(jnp.int32)

    @functools.partial(jax.jit, static_argnames=("grid", "dtype"))
    def table_vjp(params, grid, seed, scenarios, shift, dtype, table_bar):
        normals = normals_at(grid, seed, scenarios, shift, dtype)
        _, vjp = jax.vjp(lambda theta: cupy_engine.factor_table_jax(theta, grid, normals), params)
        return vjp(table_bar)[0]

    def haircut_of(params, grid, volume, book_gpus):
        p = _cast_params(params, volume.dtype)
        q = jnp.swapaxes(volume, 0, 1)  # [T, S, G], the JAX kernels' layout
        h = _haircut(p, grid, _liquidation_supply(p, q, q, book_gpus))
        return jnp.swapaxes(h, 0, 1)

    @functools.partial(jax.jit, static_argnames=("grid",))
    def haircut_vjp(params, grid, volume, book_gpus, haircut_bar):
        _, vjp = jax.vjp(lambda theta, q: haircut_of(theta, grid, q, book_gpus), params, volume)
        return vjp(haircut_bar)

    return _JaxParts(
        inputs=inputs,
        table_vjp=table_vjp,
        haircut=jax.jit(haircut_of, static_argnames=("grid",)),
        haircut_vjp=haircut_vjp,
    )


def _to_xp(x, dtype, xp):
    """A JAX array as a contiguous `xp` array of `dtype` (DLPack on a GPU)."""
    if xp is np:
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)
    return cupy_engine._to_cupy(x, dtype)


def _to_host(x) -> np.ndarray:
    return np.asarray(x.get() if hasattr(x, "get") else x)


# --------------------------------------------------------------------------- device side


@functools.cache
def _module():
    import cupy as cp

    names = [n for dtype in (np.float32, np.float64) for n in kernel_names(dtype)]
    return cp.RawModule(code=adjoint_source(), name_expressions=names)


def _cupy_launch(name, grid_dims, threads, shared_bytes, args):
    kernel = _module().get_function(name)
    if shared_bytes > cupy_engine._DEFAULT_SHARED_LIMIT:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    kernel(grid_dims, (threads,), args, shared_mem=shared_bytes)


def _blocked_to_book(x, n_loans: int) -> np.ndarray:
    """A LoanBlocks-layout array ([NB, T, b] or [NB, b]) in book order ([N, T] or [N])."""
    x = np.asarray(x, np.float64)
    if x.ndim == 3:
        return x.transpose(0, 2, 1).reshape(-1, x.shape[1])[:n_loans]
    return x.reshape(-1)[:n_loans]


class _Inputs(NamedTuple):
    """One call's random inputs at its scenario indices."""

    params: ModelParams  # float64 leaves
    grid: ModelGrid  # conditional mode
    seed: object  # uint32
    scenarios: object  # [S] uint32
    shift: object  # [T, K] float64 or None
    table_jax: object  # [S, T, 3G + 7] JAX
    table: object  # the same, `xp`
    taus: object  # [S, J] int32 `xp` τ_j, or [1, 1] zeros for a book naming none
    o_stride: int  # J, 0 for a book naming none


def _inputs_at(params, grid, prepared, seed, scenario_indices, normal_shift, xp) -> _Inputs:
    """The factor table [S, T, 3G + 7] at the scenario indices (stream-0 normals, importance
    shift applied) and the offtakers' τ_j, as the JAX gradient has them."""
    import jax.numpy as jnp

    from gpucredit.kernels.jax_args import _indices_arg, _shift_arg, _u32
    from gpucredit.kernels.jax_setup import configure_jax

    configure_jax()
    grid = grid._replace(mode="conditional")
    if grid.periods > MAX_PERIODS:
        raise ValueError(
            f"the adjoint kernel takes at most {MAX_PERIODS} periods, got {grid.periods}"
        )
    if prepared.tiles > 65535:
        raise ValueError("too many loans for one launch (more than 65,535 tiles)")
    params64 = cupy_engine._params_f64(params)
    scenarios = _indices_arg(scenario_indices)
    if int(scenarios.shape[0]) < 1:
        raise ValueError("at least one scenario index is needed")
    seed32, shift = _u32(seed, "seed"), _shift_arg(normal_shift)
    loans = prepared.loans
    pd_offtakers = np.zeros(0) if loans.offtaker is None else loans.offtaker_pd_annual
    table_jax, taus_jax = _jax_parts().inputs(
        params64, grid, seed32, scenarios, shift, jnp.asarray(np.asarray(pd_offtakers, np.float64)),
        jnp.dtype(prepared.dtype),
    )  # fmt: skip
    taus = _to_xp(taus_jax, np.int32, xp)
    o_stride = 0 if loans.offtaker is None else int(taus.shape[1])
    return _Inputs(
        params64, grid, seed32, scenarios, shift, table_jax, _to_xp(table_jax, prepared.dtype, xp),
        taus, o_stride,
    )  # fmt: skip


def losses_at_cupy(
    params: ModelParams,
    grid: ModelGrid,
    prepared: cupy_engine.CupyLoans,
    seed,
    scenario_indices,
    normal_shift=None,
    launch=None,
    xp=None,
    per_block: int | None = None,
) -> np.ndarray:
    """The tail forward: the conditional-mode losses L(ω_j) [S] float64 (NumPy) at the
    scenario indices, both forward.cu passes (`cupy_engine.run_passes`) on the inputs the
    adjoint uses. launch / xp: run_passes' (None: CuPy)."""
    if launch is None:
        import cupy

        launch, xp = cupy_engine._cupy_launch, cupy
    inputs = _inputs_at(params, grid, prepared, seed, scenario_indices, normal_shift, xp)
    dev = cupy_engine.device_tables(params, inputs.grid, prepared, xp)
    losses, _ = cupy_engine.run_passes(
        params, inputs.grid, prepared, dev, inputs.table, xp.zeros((1, 1), prepared.dtype),
        False, xp, launch, per_block=per_block,
        offtaker_periods=inputs.taus if inputs.o_stride else None,
    )  # fmt: skip
    return _to_host(losses).astype(np.float64)


def weighted_loss_gradient_cupy(
    params: ModelParams,
    grid: ModelGrid,
    prepared: cupy_engine.CupyLoans,
    seed,
    scenario_indices,
    coefficients,
    normal_shift=None,
    schedule_rate_tangent=None,
    launch=None,
    xp=None,
    per_block: int | None = None,
) -> tuple[float, ModelParams]:
    """Σ_j c_j L(ω_j) and its gradient w.r.t. every ModelParams leaf, by the fused adjoint.

    Same arguments and result as `jax_backward.weighted_loss_gradient` (always the
    conditional-mode loss; `schedule_rate_tangent` in that function's LoanBlocks layout, from
    `jax_engine.schedule_tangent`), with the book as `cupy_engine.prepare_loans_cupy` gives
    it (its dtype is the computation's). launch / xp: None runs the kernels with CuPy;
    the tests pass an emulated launch and numpy. per_block: scenarios per block (None: the
    launch rule).
    Returns (value, ModelParams of float64 NumPy arrays shaped like the leaves).
    """
    import jax.numpy as jnp

    if launch is None:
        import cupy

        launch, xp = _cupy_launch, cupy
    # 1. the factor table and τ_j (JAX)
    inputs = _inputs_at(params, grid, prepared, seed, scenario_indices, normal_shift, xp)
    params64, grid, scenarios = inputs.params, inputs.grid, inputs.scenarios
    table_jax, table, taus, o_stride = inputs.table_jax, inputs.table, inputs.taus, inputs.o_stride
    dt = prepared.dtype
    periods, g_count = grid.periods, grid.n_generations
    threads, tiles, n_pad = prepared.threads, prepared.tiles, prepared.n_pad
    count = int(scenarios.shape[0])
    coefficients = np.asarray(coefficients, np.float64).reshape(count)
    jdtype = jnp.dtype(dt)
    parts = _jax_parts()
    dev = cupy_engine.device_tables(params, grid, prepared, xp)
    tables = dev.tables
    dummy = xp.zeros((1,), dtype=dt)
    common = (dev.model, dev.loan_real, dev.loan_int, dev.loan_period, table)
    names = kernel_names(dt)

    # 2. pass 1: Q [S, T, G] (forward.cu, conditional mode)
    forward_block, forward_groups = cupy_engine.launch_shape(count, tiles, n_pad)
    if per_block is not None:
        forward_block, forward_groups = per_block, -(-count // per_block)
    volume = xp.zeros((1, count, periods, g_count), dtype=xp.uint64)
    forward_ints = (count, periods, g_count, n_pad, forward_block, 1, o_stride, 0, 0)
    launch(
        names[0],
        (forward_groups, tiles),
        threads,
        cupy_engine.shared_memory_bytes(periods, g_count, threads, dt.itemsize),
        (*common, dummy, dummy, taus, dev.qscale, volume, dummy, dummy,
         *(np.int32(v) for v in forward_ints)),
    )  # fmt: skip
    volume_f64 = volume[0].astype(xp.float64) / xp.asarray(tables.qscale)
    volume_jax = jnp.asarray(_to_host(volume_f64).astype(dt))
    book_gpus = jnp.asarray(tables.book_gpus.astype(dt))

    # 3. the haircut (JAX, the JAX gradient's function)
    haircut = _to_xp(parts.haircut(params64, grid, volume_jax, book_gpus), dt, xp)

    # 4. losses and recovery weights
    if per_block is None:
        per_block, groups = adjoint_launch_shape(count, tiles, n_pad, periods)
    else:
        groups = -(-count // per_block)
    ints = tuple(np.int32(v) for v in (count, periods, g_count, n_pad, per_block, o_stride))
    scenario_loss = xp.zeros((tiles, count), dtype=dt)
    recovery = xp.zeros((tiles, count, periods, g_count), dtype=dt)
    launch(
        names[1],
        (groups, tiles),
        threads,
        recovery_shared_memory_bytes(periods, g_count, threads, dt.itemsize),
        (*common, haircut, taus, scenario_loss, recovery, *ints),
    )
    losses = _to_host(scenario_loss.sum(axis=0, dtype=xp.float64))
    recovery_weights = _to_host(recovery.sum(axis=0, dtype=xp.float64))  # [S, T, G]
    price = np.asarray(table_jax, np.float64)[:, :, g_count : 2 * g_count]
    haircut_bar = coefficients.astype(dt)[:, None, None] * price * recovery_weights
    p_bar_haircut, volume_bar = parts.haircut_vjp(
        params64, grid, volume_jax, book_gpus, jnp.asarray(haircut_bar.astype(dt))
    )

    # 5. the adjoint
    factor_bar = xp.zeros((tiles, count, periods, cupy_engine.factor_columns(g_count)), dtype=dt)
    slots = loan_bar_slots(periods)
    loan_bar = xp.zeros((groups, slots, n_pad), dtype=dt)
    launch(
        names[2],
        (groups, tiles),
        threads,
        adjoint_shared_memory_bytes(periods, g_count, threads, dt.itemsize),
        (
            *common,
            haircut,
            taus,
            xp.asarray(coefficients.astype(dt)),
            _to_xp(volume_bar, dt, xp),
            factor_bar,
            loan_bar,
            *ints,
        ),
    )
    table_bar = _to_host(factor_bar.sum(axis=0, dtype=xp.float64)).astype(dt)
    per_loan = _to_host(loan_bar.sum(axis=0, dtype=xp.float64))  # [slots, n_pad]

    # 6. back to θ
    p_bar_table = parts.table_vjp(
        params64, grid, inputs.seed, scenarios, inputs.shift, jdtype, jnp.asarray(table_bar)
    )
    grads = [
        np.asarray(a, np.float64) + np.asarray(b, np.float64)
        for a, b in zip(p_bar_table, p_bar_haircut, strict=True)
    ]
    grads = ModelParams(*grads)
    grads = _add_loan_terms(grads, params64, prepared, per_loan, periods, schedule_rate_tangent)
    value = float(np.sum(coefficients * losses))
    return value, grads


def _add_loan_terms(grads, params, prepared, per_loan, periods: int, schedule_rate_tangent):
    """The kernel's per-loan and model cotangents ([4T + 8, n_pad] float64, summed over the
    scenarios) added to the ModelParams gradient: β's (direct and through the hazard base's
    fixed references), coverage floor/cap (direct and through their logs), refi_ltv
    (through ln RF = ln λ + ln(n a/Bal)) and, with a schedule tangent, rate_level."""
    loans = prepared.loans
    n_loans = prepared.n_loans
    book = per_loan[:, prepared.position]  # [slots, N] in book order
    T = periods

    def block(k):  # [N, T]
        return book[k * T : (k + 1) * T].T

    base_bar = block(0)
    tail = book[4 * T :].sum(axis=1)  # [8]
    ln_refi_bar = book[4 * T + _LN_REFI]  # [N]
    has_balloon = np.asarray(loans.balloon_usd, np.float64) > 0
    maturity = np.asarray(loans.maturity_period, np.int64)
    at_refinancing = has_balloon[:, None] & (np.arange(1, T + 1)[None, :] == maturity[:, None])
    ln_lc_ref = np.asarray(loans.ln_liquidity_reference, np.float64)[:, 1 : T + 1]
    ln_cc_ref = np.asarray(loans.ln_collateral_reference, np.float64)[:, 1 : T + 1]
    ln_rf_ref = np.asarray(loans.ln_refinancing_reference, np.float64)[:, None]

    floor, cap = float(params.coverage_floor), float(params.coverage_cap)
    ltv = float(params.refi_ltv)
    changes = {
        "beta_liquidity": tail[_BETA_L] + np.sum(base_bar * ln_lc_ref),
        "beta_collateral": tail[_BETA_C] + np.sum(base_bar * ln_cc_ref),
        "beta_refinancing": tail[_BETA_R]
        + np.sum(np.where(at_refinancing, base_bar * ln_rf_ref, 0.0)),
        "coverage_floor": tail[_FLOOR] + tail[_LN_FLOOR] / floor,
        "coverage_cap": tail[_CAP] + tail[_LN_CAP] / cap,
        # ln λ = log(λ) for λ > 0, −LOG_BIG (a constant) otherwise
        "refi_ltv": np.sum(ln_refi_bar[has_balloon]) / ltv if ltv > 0 else 0.0,
    }
    if schedule_rate_tangent is not None:
        tangent_balance, tangent_installment, tangent_ln_gpus, tangent_ln_balloon = (
            _blocked_to_book(x, n_loans) for x in schedule_rate_tangent
        )
        changes["rate_level"] = (
            np.sum(block(1) * tangent_balance)
            + np.sum(block(2) * tangent_installment)
            + np.sum(block(3) * tangent_ln_gpus)
            + np.sum(np.where(has_balloon, ln_refi_bar, 0.0) * tangent_ln_balloon)
        )
    return grads._replace(**{k: getattr(grads, k) + np.float64(v) for k, v in changes.items()})
