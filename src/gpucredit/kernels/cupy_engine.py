"""The CuPy backend of docs/spec.md §2-6 (model v2): one fused CUDA kernel
(kernels/cuda/forward.cu), two passes.

It computes exactly what `kernels.reference` computes, scenario by scenario, on the same
Threefry numbers (`kernels.rng`), in float32 or float64:

- The random inputs of a chunk are made on the device by JAX (`rng.shock_normals_jax`,
  `jax_engine.factor_paths_jax`, `rng.default_uniforms_jax`): one jitted call returns the
  factor table [S, T, W] (W = 3G + 7: R_g, P_g, ln P_g, BTC, ETH, power, r, Z, DF and other
  income's BTC index X_btc(t)/X_btc(0) e^{η tΔ}; Z is the AR(1) credit cycle) and, in
  sampled mode, the default uniforms [S, B]; for a book naming offtakers a second call
  (`offtaker_periods_input`) gives their default periods τ_j [S, J] from the table's Z(t) and
  stream 2 (docs/spec.md §4a), with the JAX kernels' own function. They reach CuPy through DLPack
  (`cupy.from_dlpack`, no host round trip). They are small next to the loan work.
- The PD anchor's references (LC^ref(t), CC^ref(t), RF^ref, docs/spec.md §4) come with the
  book (LoanArrays, computed once per run and held fixed); `loan_tables` folds them with
  Φ⁻¹(p^Δ) and the β's into one hazard base per loan and period.
- The [scenarios × loans × periods] work is the kernel's. Pass 1 runs the period loop per
  (scenario, loan) and adds each loan's liquidation volume n a d(t) into Q[s, t, g] and, in
  sampled mode, its expected volume n a S(t−1) h(t) into a second array (in conditional
  mode the two are the same); the market-wide fire-sale haircut
  H_g(t) = min(H_max, H0_g + H1 ((Q_g + max(F_g − N_g, 0) q̄_g) / D_g)^γ) is then computed
  from them ([S, T, G], CuPy elementwise, `haircut_from_volume`); pass 2 reruns the loop
  (cheaper than storing it), applies the haircut and reduces the loss per scenario and, when
  asked, the per-loan sums of a ChunkOutput (kernels/outputs.py).
- Launch: blockIdx.y = a tile of `threads` loans (one loan per thread, its constants in
  registers), blockIdx.x = a group of consecutive scenarios looped over in the block. Loans
  are sorted by generation and padded so that a warp never mixes generations. Reductions are
  deterministic (fixed-order warp and block sums, 64-bit fixed-point integer atomics for the
  volumes), so a scenario's loss does not depend on the chunk it is computed in.

The host side (layout, per-loan constants, launch shape, haircut) is plain NumPy and is
tested on a machine without a GPU; cupy is imported lazily, so this module imports anywhere.

Public API:
  available() -> bool
  prepare_loans_cupy(loans, dtype=float32, threads=256) -> CupyLoans
  chunk_losses_cupy(params, grid, prepared, seed, first_scenario, count) -> cupy [count]
  chunk_outcomes_cupy(params, grid, prepared, seed, first_scenario, count)
      -> (losses [count], loan_loss_sum [N], loan_default_probability_sum [N],
          loan_defaulted_exposure_sum [N]) as cupy arrays
The backend built on it (`portfolio.backends.CupyBackend`) wraps chunk_outcomes_cupy's arrays
in `kernels.outputs.ChunkOutput`, the one chunk type of every backend.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.special import ndtri

from gpucredit.kernels import reference
from gpucredit.kernels.params import (
    HOURS_PER_YEAR,
    LOG_BIG,
    THRESHOLD_LIMIT,
    LoanArrays,
    ModelGrid,
    ModelParams,
    safe_log_ratio,
)

__all__ = [
    "CupyLoans",
    "DeviceTables",
    "LoanTables",
    "available",
    "chunk_losses_cupy",
    "chunk_outcomes_cupy",
    "device_tables",
    "factor_columns",
    "factor_table_jax",
    "haircut_from_volume",
    "kernel_name",
    "launch_shape",
    "loan_tables",
    "prepare_loans_cupy",
    "random_inputs",
    "run_passes",
    "shared_memory_bytes",
    "volume_count",
]

WARP = 32
MAX_THREADS = 256  # GPUCREDIT_MAX_THREADS in forward.cu (__launch_bounds__)
KERNEL_SOURCE = "cuda/forward.cu"
_FIXED_POINT_BITS = 62  # volumes in fixed point: the generation's pledged GPUs N_g < 2^62
_MAX_SCENARIOS_PER_BLOCK = 64
_TARGET_BLOCKS = 4096  # enough blocks for every SM of an H100 several times over
_MAX_LOAN_PARTIALS = 1 << 27  # elements of the [groups, 3, n_pad] per-loan partial sums
_DEFAULT_SHARED_LIMIT = 48 * 1024

# Slot counts of forward.cu's SoA arrays (M_COUNT, L_COUNT, LI_COUNT, P_COUNT) and the
# factor table's columns after the 3G generation columns (F_COUNT).
_MODEL_SLOTS = 8
_LOAN_REAL_SLOTS = 18
_LOAN_INT_SLOTS = 5
_PERIOD_SLOTS = 4
_MARKET_COLUMNS = 7


def kernel_name(dtype, loss_pass: bool) -> str:
    """The template instance's name expression, e.g. 'forward_kernel<float, false>'."""
    real = "float" if np.dtype(dtype) == np.float32 else "double"
    return f"forward_kernel<{real}, {'true' if loss_pass else 'false'}>"


_KERNEL_NAMES = tuple(
    kernel_name(dtype, loss_pass)
    for dtype in (np.float32, np.float64)
    for loss_pass in (False, True)
)


def kernel_source() -> str:
    """forward.cu, read from the package (importlib.resources)."""
    return importlib.resources.files("gpucredit.kernels").joinpath(KERNEL_SOURCE).read_text()


def available() -> bool:
    """True when cupy imports and at least one CUDA device is present."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError (no driver), ...
        return False


# --------------------------------------------------------------------------- host side


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


@dataclass
class CupyLoans:
    """The book in the kernel's loan order (generation-sorted, warp-padded), host side.

    `order` [n_pad]: the original loan index at each padded position (-1: inert padding);
    `position` [N]: the padded position of each loan; `generation` [n_pad]: each position's
    generation (padding takes its run's). Device tables depend on (params, grid) and are
    built on first use and cached here.
    """

    loans: LoanArrays
    dtype: np.dtype
    threads: int  # loans per tile = threads per block
    order: np.ndarray  # [n_pad] int64
    position: np.ndarray  # [N] int64
    generation: np.ndarray  # [n_pad] int32
    n_loans: int
    n_borrowers: int
    device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_pad(self) -> int:
        return len(self.order)

    @property
    def tiles(self) -> int:
        return self.n_pad // self.threads


def prepare_loans_cupy(loans: LoanArrays, dtype=np.float32, threads: int = MAX_THREADS):
    """Sort the book by generation, pad each generation's run to whole warps and the book to
    whole tiles of `threads` loans (threads: a multiple of 32, at most 256; a smaller book
    uses fewer). Pure NumPy: nothing touches the GPU until the first chunk."""
    dt = _float_dtype(dtype)
    threads = int(threads)
    if threads % WARP or not WARP <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be a multiple of 32 in [32, {MAX_THREADS}], got {threads}")
    gen = np.asarray(loans.generation, dtype=np.int64)
    n_loans = len(gen)
    order_parts, gen_parts = [], []
    for g in np.unique(gen):
        members = np.flatnonzero(gen == g)  # stable: book order within a generation
        pad = (-len(members)) % WARP
        order_parts += [members, np.full(pad, -1, np.int64)]
        gen_parts.append(np.full(len(members) + pad, g, np.int64))
    order = np.concatenate(order_parts) if order_parts else np.full(WARP, -1, np.int64)
    padded_gen = np.concatenate(gen_parts) if gen_parts else np.zeros(WARP, np.int64)
    block = min(threads, len(order))
    extra = (-len(order)) % block
    order = np.concatenate([order, np.full(extra, -1, np.int64)])
    padded_gen = np.concatenate([padded_gen, np.full(extra, padded_gen[-1], np.int64)])
    position = np.empty(n_loans, np.int64)
    real = order >= 0
    position[order[real]] = np.flatnonzero(real)
    return CupyLoans(
        loans=loans,
        dtype=dt,
        threads=block,
        order=order,
        position=position,
        generation=padded_gen.astype(np.int32),
        n_loans=n_loans,
        n_borrowers=int(loans.n_borrowers),
    )


class LoanTables(NamedTuple):
    """forward.cu's per-run inputs, float64 / int32 NumPy in the padded loan order."""

    model: np.ndarray  # [8]
    loan_real: np.ndarray  # [18, n_pad]
    loan_int: np.ndarray  # [4, n_pad] int32
    loan_period: np.ndarray  # [4, T, n_pad]
    qscale: np.ndarray  # [G] 2^e_g: a volume of g in fixed point = round(volume 2^e_g)
    depth_gpus: np.ndarray  # [G] D_g (GPUs per period)
    book_gpus: np.ndarray  # [G] N_g = Σ_{i of g} n_i a_i, the book's pledged GPUs
    rest_of_fleet_gpus: np.ndarray  # [G] max(F_g − N_g, 0) where N_g > 0, else 0


def loan_tables(params: ModelParams, grid: ModelGrid, prepared: CupyLoans) -> LoanTables:
    """Every per-loan and per-(loan, period) constant of the period loop, in float64.

    The PD anchor's references come with the book (LoanArrays.ln_*_reference, constants of
    the run, docs/spec.md §4) and are folded with Φ⁻¹(p^Δ) into the hazard base of each
    loan and period: base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref(t) + β_C ln CC^ref(t), plus
    β_R ln RF^ref in period t_M when the loan has a balloon.
    """
    loans = prepared.loans
    reference.require_pd_references(loans)
    periods = grid.periods
    if np.asarray(loans.balance_usd).shape[1] != periods + 1:
        raise ValueError(
            f"loan schedules have {np.asarray(loans.balance_usd).shape[1] - 1} periods, "
            f"the grid {periods}"
        )
    f64 = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    dt = grid.dt_years
    hours = HOURS_PER_YEAR * dt
    n = f64(loans.gpu_count)
    pledged = n * f64(loans.collateral_share)
    share = f64(loans.contracted_share)
    contract_rate = f64(loans.contract_rate_usd_per_hour)
    util = f64(loans.utilization)
    opex = f64(loans.other_opex_usd_per_gpu_hour)
    rho = f64(loans.asset_correlation)
    balloon = f64(loans.balloon_usd)
    has_balloon = balloon > 0
    maturity = np.asarray(loans.maturity_period, np.int64)
    other_income = f64(loans.other_income_usd_per_year) * dt  # OI Δ
    btc_share = f64(loans.other_income_btc_share)
    flat_income = other_income * (1.0 - btc_share)  # OI Δ (1 − b)

    pd_period = 1.0 - (1.0 - f64(loans.pd_annual)) ** dt
    threshold = np.clip(ndtri(pd_period), -THRESHOLD_LIMIT, THRESHOLD_LIMIT)
    refi_ltv = float(params.refi_ltv)
    ln_ltv = np.log(refi_ltv) if refi_ltv > 0 else -LOG_BIG
    ln_refi = np.where(
        has_balloon, ln_ltv + safe_log_ratio(pledged, np.where(has_balloon, balloon, 1.0)), 0.0
    )

    per_loan = np.zeros((_LOAN_REAL_SLOTS, prepared.n_loans))
    per_loan[0] = pledged  # L_PLEDGED_GPUS
    per_loan[1] = pledged * (1.0 - f64(loans.liquidation_cost))  # L_RECOVERY_GPUS
    per_loan[2] = n * hours * f64(loans.power_kw_per_gpu)  # L_POWER_KWH
    per_loan[3] = f64(loans.btc_units)  # L_BTC
    per_loan[4] = f64(loans.eth_units)  # L_ETH
    per_loan[5] = f64(loans.crypto_pledged)  # L_CRYPTO_PLEDGED
    per_loan[6] = np.sqrt(rho)  # L_SQRT_RHO
    per_loan[7] = 1.0 / np.sqrt(1.0 - rho)  # L_INV_SQRT_1M_RHO
    per_loan[8] = f64(loans.cash_usd)  # L_CASH
    per_loan[9] = ln_refi  # L_LN_REFI
    per_loan[10] = has_balloon  # L_HAS_BALLOON
    per_loan[11] = f64(loans.rate)  # L_RATE
    per_loan[12] = f64(loans.is_floating)  # L_FLOATING
    per_loan[13] = n * hours * (share * contract_rate) - n * hours * opex + flat_income
    per_loan[14] = n * hours * ((1.0 - share) * util)  # L_RENT_HOURS_CONTRACTED
    per_loan[15] = -(n * hours * opex) + flat_income  # L_INCOME_FREE
    per_loan[16] = n * hours * util  # L_RENT_HOURS_FREE
    per_loan[17] = other_income * btc_share  # L_BTC_INCOME

    ints = np.zeros((_LOAN_INT_SLOTS, prepared.n_loans), np.int64)
    ints[1] = np.asarray(loans.borrower)
    ints[2] = maturity
    ints[3] = np.asarray(loans.contract_periods)
    ints[4] = -1 if loans.offtaker is None else np.asarray(loans.offtaker)  # LI_OFFTAKER

    # base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref(t) + β_C ln CC^ref(t) (+ β_R ln RF^ref at t_M).
    hazard_base = (
        threshold[:, None]
        + float(params.beta_liquidity) * f64(loans.ln_liquidity_reference)[:, 1 : periods + 1]
        + float(params.beta_collateral) * f64(loans.ln_collateral_reference)[:, 1 : periods + 1]
    )  # [N, T]
    at_refinancing = has_balloon[:, None] & (
        np.arange(1, periods + 1)[None, :] == maturity[:, None]
    )
    hazard_base = hazard_base + np.where(
        at_refinancing,
        float(params.beta_refinancing) * f64(loans.ln_refinancing_reference)[:, None],
        0.0,
    )
    balance_before = f64(loans.balance_usd)[:, :periods]  # [N, T] B(t − 1)
    per_period = np.stack(
        [
            balance_before,  # P_BALANCE
            f64(loans.installment_usd)[:, 1 : periods + 1],  # P_INSTALLMENT: I(t)
            safe_log_ratio(pledged[:, None], balance_before),  # P_LN_GPUS_PER_BALANCE
            hazard_base,  # P_HAZARD_BASE
        ]
    ).transpose(0, 2, 1)  # [4, T, N]

    real = prepared.order >= 0
    src = prepared.order[real]
    loan_real = np.zeros((_LOAN_REAL_SLOTS, prepared.n_pad))
    loan_real[7] = 1.0  # inert padding: 1/√(1 − 0)
    loan_real[:, real] = per_loan[:, src]
    loan_int = np.zeros((_LOAN_INT_SLOTS, prepared.n_pad), np.int64)
    loan_int[:, real] = ints[:, src]
    loan_int[0] = prepared.generation  # padding keeps its run's generation
    loan_int[4, ~real] = -1  # padding names no offtaker
    loan_period = np.zeros((_PERIOD_SLOTS, periods, prepared.n_pad))
    loan_period[2] = LOG_BIG  # padding: B = 0
    loan_period[:, :, real] = per_period[:, :, src]

    g_count = grid.n_generations
    book_gpus = np.bincount(
        np.asarray(loans.generation, np.int64), weights=pledged, minlength=g_count
    )[:g_count]  # N_g
    _, exponent = np.frexp(book_gpus)  # N_g < 2^exponent
    qscale = np.where(
        book_gpus > 0, np.ldexp(1.0, np.clip(_FIXED_POINT_BITS - exponent, -1000, 1000)), 1.0
    )
    fleet = np.broadcast_to(f64(params.financed_fleet_gpus), (g_count,))
    rest = np.where(book_gpus > 0, np.maximum(fleet - book_gpus, 0.0), 0.0)
    model = np.array(
        [
            dt,
            params.coverage_floor,
            params.coverage_cap,
            np.log(params.coverage_floor),
            np.log(params.coverage_cap),
            params.beta_liquidity,
            params.beta_collateral,
            params.beta_refinancing,
        ],
        dtype=np.float64,
    )
    return LoanTables(
        model=model,
        loan_real=loan_real,
        loan_int=loan_int.astype(np.int32),
        loan_period=loan_period,
        qscale=qscale,
        depth_gpus=f64(params.market_depth_gpus_per_year) * dt,
        book_gpus=book_gpus,
        rest_of_fleet_gpus=rest,
    )


def volume_count(grid: ModelGrid) -> int:
    """V, the volumes pass 1 accumulates: 2 in sampled mode (the realised Σ n a d(t) and the
    expected Σ n a S(t−1) h(t)), 1 in conditional mode (where they are the same)."""
    return 2 if grid.mode == "sampled" else 1


def haircut_from_volume(params: ModelParams, tables: LoanTables, volume_fixed, xp=np):
    """The fire-sale haircut H_g(t) [S, T, G] float64 (docs/spec.md §5) from pass 1's
    fixed-point volumes [V, S, T, G] uint64 (NumPy or CuPy, as `xp`; the last volume is the
    expected one):
      H_g(t) = min(H_max, H0_g + H1 ((Q_g(t) + max(F_g − N_g, 0) q̄_g(t)) / D_g)^γ),
    Q_g the book's own dumped GPUs, q̄_g = (expected dumped GPUs) / N_g the book's expected
    liquidation rate, at which the rest of the financed fleet sells too; N_g = 0 gives 0."""
    scale = xp.asarray(tables.qscale)
    own = volume_fixed[0].astype(xp.float64) / scale
    expected = volume_fixed[-1].astype(xp.float64) / scale
    book = np.asarray(tables.book_gpus, np.float64)
    rate = expected / xp.asarray(np.where(book > 0, book, 1.0))  # q̄_g(t); 0 where N_g = 0
    supply = own + xp.asarray(tables.rest_of_fleet_gpus) * rate
    ratio = supply / xp.asarray(tables.depth_gpus)
    base = xp.asarray(np.asarray(params.haircut_base, np.float64))
    powered = ratio ** float(params.haircut_power)
    return xp.minimum(float(params.haircut_max), base + float(params.haircut_slope) * powered)


def launch_shape(count: int, tiles: int, n_pad: int) -> tuple[int, int]:
    """(scenarios per block, scenario groups): enough blocks to fill the device several
    times over, at most 64 scenarios per block, the per-loan partials bounded."""
    per_block = max(1, min(_MAX_SCENARIOS_PER_BLOCK, (count * tiles) // _TARGET_BLOCKS))
    while per_block < count and -(-count // per_block) * 3 * n_pad > _MAX_LOAN_PARTIALS:
        per_block *= 2
    per_block = min(per_block, max(count, 1))
    return per_block, -(-count // per_block)


def factor_columns(n_generations: int) -> int:
    """W = 3G + 7, the factor table's columns: R_g, P_g, ln P_g (G each), then BTC, ETH,
    power, r, Z, DF and the BTC income index X_btc(t)/X_btc(0) e^{η tΔ}."""
    return 3 * n_generations + _MARKET_COLUMNS


def shared_memory_bytes(periods: int, n_generations: int, threads: int, itemsize: int) -> int:
    """Dynamic shared memory of forward_kernel: factor row [T, W], haircut row [T, G],
    per-warp volumes [2, warps, T], per-warp loss [warps] (reals), warp generations (ints)."""
    warps = threads // WARP
    reals = (
        periods * factor_columns(n_generations)
        + periods * n_generations
        + 2 * warps * periods
        + warps
    )
    return reals * itemsize + 4 * warps


def _params_key(params: ModelParams, grid: ModelGrid) -> tuple:
    digest = hashlib.sha1()
    for leaf in params:
        digest.update(np.ascontiguousarray(np.asarray(leaf, dtype=np.float64)).tobytes())
    return (grid, digest.hexdigest())


# --------------------------------------------------------------------------- random inputs


def factor_table_jax(params, grid: ModelGrid, normals):
    """forward.cu's factor table [S, T, 3G + 7] (dtype = normals') from the stream-0 normals
    [S, T, K + ν] and float64 params: R_g, P_g, ln P_g, BTC, ETH, power, r, Z, DF and other
    income's BTC index X_btc(t)/X_btc(0) e^{η tΔ}. Traceable: the adjoint
    (kernels/cupy_adjoint.py) takes its VJP w.r.t. params."""
    import jax.numpy as jnp

    from gpucredit.kernels import jax_engine

    dtype = normals.dtype
    paths = jax_engine.factor_paths_jax(params, grid, normals)
    price = paths.price_usd[:, 1:]
    rate = paths.base_rate[:, 1:]  # [S, T]
    btc = paths.btc_usd[:, 1:]
    if grid.discount:
        discount = jnp.exp(-jnp.cumsum(rate * grid.dt_years, axis=1))
    else:
        discount = jnp.ones_like(rate)
    # Other income's BTC index X_btc(t)/X_btc(0) e^{η tΔ} (docs/spec.md §3), [T] trend.
    steps = jnp.arange(1, grid.periods + 1, dtype=dtype)
    hashprice = jnp.exp(jnp.asarray(params.btc_hashprice_drift, dtype) * steps * grid.dt_years)
    btc_index = btc / jnp.asarray(params.btc_price_usd, dtype) * hashprice
    return jnp.concatenate(
        [
            paths.rent_usd_per_hour[:, 1:],
            price,
            jnp.log(price),
            btc[..., None],
            paths.eth_usd[:, 1:, None],
            paths.power_usd_per_kwh[:, 1:, None],
            rate[..., None],
            paths.credit[:, 1:, None],
            discount[..., None],
            btc_index[..., None],
        ],
        axis=-1,
    )  # [S, T, 3G + 7], forward.cu's factor row


@functools.cache
def _random_inputs_jit():
    import jax

    from gpucredit.kernels.rng import default_uniforms_jax, shock_normals_jax

    jnp = jax.numpy

    @functools.partial(jax.jit, static_argnames=("grid", "count", "n_uniforms", "dtype"))
    def inputs(params, grid, seed, first_scenario, count, n_uniforms, dtype):
        normals = shock_normals_jax(
            seed, first_scenario, count, grid.periods, grid.slots_per_period, dtype
        )
        table = factor_table_jax(params, grid, normals)
        if n_uniforms:
            uniforms = default_uniforms_jax(seed, first_scenario, count, n_uniforms, dtype)
        else:
            uniforms = jnp.zeros((1, 1), dtype)
        return table, uniforms

    return inputs


@functools.cache
def _offtaker_periods_jit():
    import jax

    from gpucredit.kernels.jax_factors import _cast_params
    from gpucredit.kernels.jax_step import _offtaker_default_periods
    from gpucredit.kernels.rng import offtaker_uniforms_jax_at

    jnp = jax.numpy

    @functools.partial(jax.jit, static_argnames=("grid", "count"))
    def periods(params, grid, pd_annual, seed, first_scenario, count, credit):
        dtype = credit.dtype
        scenarios = first_scenario + jnp.arange(count, dtype=jnp.uint32)
        uniforms = offtaker_uniforms_jax_at(seed, scenarios, pd_annual.shape[0], dtype)
        p = _cast_params(params, dtype)
        return _offtaker_default_periods(p, grid, pd_annual, credit.T, uniforms)

    return periods


def offtaker_periods_input(
    params, grid: ModelGrid, prepared: CupyLoans, seed: int, first_scenario: int, table
):
    """τ_j [count, J] int32 of docs/spec.md §4a as a JAX array (the JAX kernels' own function,
    `jax_step._offtaker_default_periods`, on the factor table's credit column Z(t) and the
    stream-2 uniforms), or None for a book naming no offtaker."""
    loans = prepared.loans
    if loans.offtaker is None:
        return None
    import jax.numpy as jnp

    credit = jnp.asarray(table)[:, :, 3 * grid.n_generations + 4]  # [S, T] F_CREDIT
    return _offtaker_periods_jit()(
        _params_f64(params),
        grid,
        jnp.asarray(np.asarray(loans.offtaker_pd_annual, np.float64)),
        np.uint32(int(seed)),
        np.uint32(int(first_scenario)),
        int(credit.shape[0]),
        credit,
    )


def _uniform_count(grid: ModelGrid, n_borrowers: int) -> int:
    """Sampled mode: the borrower count rounded up to a power of two (one compile per size
    class, as the JAX engine); 0 in conditional mode."""
    if grid.mode != "sampled":
        return 0
    return 1 << max(int(n_borrowers) - 1, 0).bit_length()


def _params_f64(params: ModelParams) -> ModelParams:
    """Leaves as float64 arrays (JAX leaves kept), so Python floats and arrays trace alike."""
    return ModelParams(
        *(
            leaf if hasattr(leaf, "block_until_ready") else np.asarray(leaf, dtype=np.float64)
            for leaf in params
        )
    )


def random_inputs(
    params, grid: ModelGrid, seed: int, first_scenario: int, count: int, n_borrowers, dtype
):
    """(factor table [count, T, 3G + 7], uniforms [count, B'] or [1, 1]) as JAX arrays."""
    import jax.numpy as jnp

    from gpucredit.kernels.jax_setup import configure_jax

    configure_jax()  # float64 and the XLA flags before this process's first JAX computation

    return _random_inputs_jit()(
        _params_f64(params),
        grid,
        np.uint32(int(seed)),
        np.uint32(int(first_scenario)),
        int(count),
        _uniform_count(grid, n_borrowers),
        jnp.dtype(_float_dtype(dtype)),
    )


def _to_cupy(x, dtype):
    """A JAX array on the GPU to CuPy without a host round trip (DLPack); a copy otherwise."""
    import cupy as cp

    try:
        x.block_until_ready()
        out = cp.from_dlpack(x)
    except Exception:  # e.g. JAX running on the CPU: go through the host
        out = cp.asarray(np.asarray(x))
    return cp.ascontiguousarray(out, dtype=dtype)


# --------------------------------------------------------------------------- device side


@functools.cache
def _module():
    import cupy as cp

    return cp.RawModule(code=kernel_source(), name_expressions=_KERNEL_NAMES)


def _kernel(dtype, loss_pass: bool):
    return _module().get_function(kernel_name(dtype, loss_pass))


class DeviceTables(NamedTuple):
    """LoanTables on the device (or in NumPy for the emulated kernel), in the kernel dtype."""

    tables: LoanTables
    model: object
    loan_real: object
    loan_int: object
    loan_period: object
    qscale: object


def device_tables(params: ModelParams, grid: ModelGrid, prepared: CupyLoans, xp=np):
    """loan_tables cast to the kernel's dtypes as `xp` arrays (CuPy ones cached)."""
    key = (xp.__name__, *_params_key(params, grid))
    cached = prepared.device_cache.get(key)
    if cached is None:
        tables = loan_tables(params, grid, prepared)
        dt = prepared.dtype
        cached = DeviceTables(
            tables=tables,
            model=xp.asarray(tables.model, dtype=dt),
            loan_real=xp.asarray(tables.loan_real, dtype=dt),
            loan_int=xp.asarray(tables.loan_int, dtype=xp.int32),
            loan_period=xp.asarray(tables.loan_period, dtype=dt),
            qscale=xp.asarray(tables.qscale, dtype=xp.float64),
        )
        prepared.device_cache.clear()  # one (params, grid) at a time
        prepared.device_cache[key] = cached
    return cached


def _cupy_launch(loss_pass: bool, dtype, grid_dims, threads, shared_bytes, args):
    kernel = _kernel(dtype, loss_pass)
    if shared_bytes > _DEFAULT_SHARED_LIMIT:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    kernel(grid_dims, (threads,), args, shared_mem=shared_bytes)


def run_passes(
    params: ModelParams,
    grid: ModelGrid,
    prepared: CupyLoans,
    dev: DeviceTables,
    table,
    uniforms,
    loan_sums: bool,
    xp,
    launch,
    per_block: int | None = None,
    offtaker_periods=None,
):
    """Both kernel passes on one chunk's random inputs (table [S, T, 3G + 7], uniforms
    [S, B'] or [1, 1], `xp` arrays of the kernel dtype; offtaker_periods [S, J] int32 `xp`
    array of a book naming offtakers, else None).

    `launch(loss_pass, dtype, grid_dims, threads, shared_bytes, args)` runs forward_kernel
    (CuPy on a GPU; the tests also plug in a CPU emulation). Returns (losses [S] float64,
    per-loan sums [3, N] float64 or None).
    """
    dt = prepared.dtype
    count = int(table.shape[0])
    periods, g_count = grid.periods, grid.n_generations
    if table.shape[1:] != (periods, factor_columns(g_count)):
        raise ValueError(f"factor table of shape {table.shape} does not fit the grid")
    threads, tiles, n_pad = prepared.threads, prepared.tiles, prepared.n_pad
    if tiles > 65535:
        raise ValueError("too many loans for one launch (more than 65,535 tiles)")
    if per_block is None:
        per_block, groups = launch_shape(count, tiles, n_pad)
    else:
        groups = -(-count // per_block)
    shared = shared_memory_bytes(periods, g_count, threads, dt.itemsize)

    volume = xp.zeros((volume_count(grid), count, periods, g_count), dtype=xp.uint64)
    scenario_loss = xp.zeros((tiles, count), dtype=dt)
    partials = xp.zeros((groups, 3, n_pad) if loan_sums else (1,), dtype=dt)
    dummy = xp.zeros((1,), dtype=dt)
    o_stride = 0
    if offtaker_periods is None:
        offtaker_periods = xp.zeros((1, 1), dtype=xp.int32)
    else:
        o_stride = int(offtaker_periods.shape[1])
    ints = (
        np.int32(count),
        np.int32(periods),
        np.int32(g_count),
        np.int32(n_pad),
        np.int32(per_block),
        np.int32(uniforms.shape[1]),
        np.int32(o_stride),
        np.int32(grid.mode == "sampled"),
        np.int32(loan_sums),
    )
    common = (dev.model, dev.loan_real, dev.loan_int, dev.loan_period, table)
    launch(
        False,
        dt,
        (groups, tiles),
        threads,
        shared,
        (*common, dummy, uniforms, offtaker_periods, dev.qscale, volume, dummy, dummy, *ints),
    )
    haircut = xp.ascontiguousarray(haircut_from_volume(params, dev.tables, volume, xp).astype(dt))
    launch(
        True,
        dt,
        (groups, tiles),
        threads,
        shared,
        (
            *common,
            haircut,
            uniforms,
            offtaker_periods,
            dev.qscale,
            volume,
            scenario_loss,
            partials,
            *ints,
        ),
    )
    losses = scenario_loss.sum(axis=0, dtype=xp.float64)
    if not loan_sums:
        return losses, None
    sums = partials.sum(axis=0, dtype=xp.float64)[:, xp.asarray(prepared.position)]
    return losses, sums


def _forward(params, grid, prepared: CupyLoans, seed, first_scenario, count, loan_sums: bool):
    """Both passes on one chunk on the GPU: (losses [count] float64, sums [3, N] or None)."""
    import cupy as cp

    count = int(count)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    dt = prepared.dtype
    dev = device_tables(params, grid, prepared, cp)
    table_jax, uniforms_jax = random_inputs(
        params, grid, seed, first_scenario, count, prepared.n_borrowers, dt
    )
    table = _to_cupy(table_jax, dt)
    uniforms = _to_cupy(uniforms_jax, dt)
    periods_jax = offtaker_periods_input(params, grid, prepared, seed, first_scenario, table_jax)
    periods = None if periods_jax is None else _to_cupy(periods_jax, cp.int32)
    return run_passes(
        params, grid, prepared, dev, table, uniforms, loan_sums, cp, _cupy_launch,
        offtaker_periods=periods,
    )  # fmt: skip


def chunk_losses_cupy(
    params: ModelParams, grid: ModelGrid, prepared: CupyLoans, seed, first_scenario, count: int
):
    """Portfolio loss L(ω) (docs/spec.md §6) for scenarios first_scenario .. first_scenario+count−1.

    Returns a cupy array [count] in prepared.dtype, USD (summed over loan tiles in float64).
    """
    losses, _ = _forward(params, grid, prepared, seed, first_scenario, count, loan_sums=False)
    return losses.astype(prepared.dtype)


def chunk_outcomes_cupy(
    params: ModelParams, grid: ModelGrid, prepared: CupyLoans, seed, first_scenario, count: int
):
    """(losses [count], Σ_ω L_i [N], Σ_ω Σ_t d_i(t) [N], Σ_ω Σ_t DF d_i EAD_i [N]) as cupy
    float64 arrays: what a ChunkOutput (kernels/outputs.py) keeps (Σ_t d_i(t) = 1 − S_i(T) in
    conditional mode, the default indicator in sampled mode)."""
    losses, sums = _forward(params, grid, prepared, seed, first_scenario, count, loan_sums=True)
    return losses, sums[0], sums[1], sums[2]
