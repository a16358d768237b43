"""Factor paths for the JAX kernels (docs/spec.md §2): shocks, t-copula, paths, the IS shift.

From the stream-0 normals [S, T, K + ν] of a chunk (`kernels.rng`):
- `_shifted`: importance sampling moves the systematic normals z [S, T, :K] to z + μ;
  `importance_log_weights` is the likelihood ratio ln w of each scenario under that shift;
- `correlated_shocks_jax`: ε [S, T, K] = L z (L = cholesky(Σ), factored in float64), and for
  the t copula each scenario's ε mapped through Φ⁻¹(F_ν(√W ·)) (`student_t_to_normal_jax`);
- `_paths`: the time-major factor paths [T, S, ...] the period loop reads (rents, GPU
  prices, BTC, ETH, power, the base rate, the credit cycle Z), and `factor_paths_jax` the
  same as `reference.factor_paths` ([S, T+1, ...], today included).
`_cast_params` casts ModelParams to the computation dtype (the correlation stays float64).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import betainc, ndtri

from gpucredit.kernels.jax_args import _shift_arg, _u32
from gpucredit.kernels.jax_setup import configure_jax
from gpucredit.kernels.params import BTC, CREDIT, ETH, POWER, RATE, ModelGrid, ModelParams
from gpucredit.kernels.reference import FactorPaths  # the same fields, JAX arrays here
from gpucredit.kernels.rng import shock_normals_jax

__all__ = [
    "correlated_shocks_jax",
    "factor_paths_jax",
    "importance_log_weights",
    "student_t_to_normal_jax",
]


def _cast_params(params: ModelParams, dtype) -> ModelParams:
    """Every leaf in the computation dtype except the correlation matrix, kept in float64 for
    its Cholesky factor (`correlated_shocks_jax`)."""
    cast = ModelParams(*(jnp.asarray(leaf).astype(dtype) for leaf in params))
    return cast._replace(correlation=jnp.asarray(params.correlation).astype(jnp.float64))


def student_t_to_normal_jax(y: jax.Array, dof: int) -> jax.Array:
    """Φ⁻¹(F_ν(y)) = −sign(y) Φ⁻¹(F_ν(−|y|)), F_ν(−|y|) = ½ I_{ν/(ν+y²)}(ν/2, ½).

    For y² < ν the complementary form ½ − ½ I_{y²/(ν+y²)}(½, ν/2) is used (same value, but
    1 − x is not rounded away in float32). y = 0 gives 0 with a finite gradient (double where).
    """
    configure_jax()
    dtype = y.dtype
    nonzero = y != 0
    y_safe = jnp.where(nonzero, y, jnp.ones_like(y))
    y2 = y_safe * y_safe
    nu = jnp.asarray(dof, dtype)
    half = jnp.asarray(0.5, dtype)
    small = y2 < nu
    lower_big = half * betainc(nu / 2, half, jnp.where(small, half, nu / (nu + y2)))
    lower_small = half - half * betainc(half, nu / 2, jnp.where(small, y2 / (nu + y2), half))
    lower = jnp.where(small, lower_small, lower_big)
    return jnp.where(nonzero, -jnp.sign(y_safe) * ndtri(lower), jnp.zeros_like(y))


def correlated_shocks_jax(params: ModelParams, grid: ModelGrid, normals: jax.Array) -> jax.Array:
    """ε [S, T, K] from the stream-0 normals [S, T, K + ν] (docs/spec.md §2, Shocks).

    L = cholesky(Σ) with jnp.linalg.cholesky, which symmetrizes its input ((Σ + Σᵀ)/2): the
    gradient w.r.t. Σ_jk (j ≠ k) is split between [j, k] and [k, j]; a move of the entry
    Σ_jk = Σ_kj has derivative g[j, k] + g[k, j] (the caller adds them).
    """
    configure_jax()
    dtype = normals.dtype
    n_factors = grid.n_factors
    # Factored in float64, then cast: a repaired matrix's smallest eigenvalue (1e-8) is below
    # float32 resolution, where the factorisation fails (NaN).
    correlation = jnp.asarray(params.correlation).astype(jnp.float64)
    cholesky = jnp.linalg.cholesky(correlation).astype(dtype)
    x = jnp.einsum(
        "stj,kj->stk", normals[..., :n_factors], cholesky, precision=lax.Precision.HIGHEST
    )
    if grid.copula == "gaussian":
        return x
    chi2 = jnp.sum(normals[..., n_factors:] ** 2, axis=-1, keepdims=True)
    mixing = grid.t_dof / chi2  # W = ν / χ²_ν
    return student_t_to_normal_jax(jnp.sqrt(mixing) * x, grid.t_dof)


class _Paths(NamedTuple):
    """Time-major factor paths for periods 1..T: [T, S, G] or [T, S]."""

    rent: jax.Array
    price: jax.Array
    ln_price: jax.Array
    btc: jax.Array
    eth: jax.Array
    power: jax.Array
    rate: jax.Array
    credit: jax.Array  # Z(t)
    btc_income_index: jax.Array  # [T, S] X_btc(t)/X_btc(0) e^{η tΔ} (other income's BTC part)


def _paths(p: ModelParams, grid: ModelGrid, shocks: jax.Array) -> _Paths:
    """Factor paths, time-major, from ε [S, T, K] and params already in the shocks' dtype."""
    dtype = shocks.dtype
    n_scen, periods, _ = shocks.shape
    g_count = grid.n_generations
    dt = grid.dt_years
    sqrt_dt = float(np.sqrt(dt))
    eps = jnp.swapaxes(shocks, 0, 1)  # [T, S, K]
    eps_rent = eps[..., :g_count]
    eps_price = eps[..., g_count : 2 * g_count]
    eps_market = eps[..., 2 * g_count :]

    steps = np.arange(1, periods + 1)
    launch = np.asarray(grid.launch_periods, dtype=np.int64).reshape(-1)
    launched = jnp.asarray(launch[None, :] <= steps[:, None])[..., None]  # [T, E, 1]
    in_period = jnp.asarray(launch[None, :] == steps[:, None])[..., None]
    one = jnp.ones((), dtype)
    rent_jumps = jnp.prod(jnp.where(launched, 1.0 - p.launch_rent_jump[None], one), axis=1)
    price_jumps = jnp.sum(
        jnp.where(
            in_period, jnp.log(jnp.where(in_period, 1.0 - p.launch_price_jump[None], one)), 0
        ),
        axis=1,
    )  # [T, G]

    reversion = 1.0 - p.rent_mean_reversion * dt
    rent_scale = p.rent_vol * sqrt_dt
    price_drift = (p.depreciation + 0.5 * p.price_vol**2) * dt
    price_scale = p.price_vol * sqrt_dt

    def rent_step(deviation, e):
        deviation = reversion * deviation + rent_scale * e
        return deviation, deviation

    def price_step(log_price, inputs):
        e, jump = inputs
        log_price = log_price - price_drift + price_scale * e + jump
        return log_price, log_price

    def rate_step(r_prev, e):
        r = r_prev + p.rate_mean_reversion * (p.rate_mean - r_prev) * dt + p.rate_vol * sqrt_dt * e
        return r, r

    _, deviation = lax.scan(rent_step, jnp.zeros((n_scen, g_count), dtype), eps_rent)
    trend = p.rent_drift * jnp.asarray(steps[:, None], dtype) * dt  # [T, G]
    rent = p.rent_usd_per_hour * jnp.exp(trend[:, None, :] + deviation) * rent_jumps[:, None, :]
    ln_price0 = jnp.broadcast_to(jnp.log(p.price_usd), (n_scen, g_count))
    _, ln_price = lax.scan(price_step, ln_price0, (eps_price, price_jumps[:, None, :]))
    rate0 = jnp.broadcast_to(p.rate_level, (n_scen,))
    _, rate = lax.scan(rate_step, rate0, eps_market[..., RATE])

    def geometric(level, drift, vol, e):
        log_steps = (drift - 0.5 * vol**2) * dt + vol * sqrt_dt * e  # [T, S]
        return jnp.exp(jnp.log(level) + jnp.cumsum(log_steps, axis=0))

    # Credit cycle: Z(1) = ε(1), Z(t) = φ Z(t−1) + √(1 − φ²) ε(t), φ = ϕ^Δ (ϕ = 0: φ = 0).
    persistent = p.credit_persistence > 0
    phi = jnp.where(
        persistent, jnp.exp(dt * jnp.log(jnp.where(persistent, p.credit_persistence, 1))), 0
    )
    innovation_scale = jnp.sqrt(1 - phi * phi)

    def credit_step(z, e):
        z = phi * z + innovation_scale * e
        return z, z

    credit_first = eps_market[0, :, CREDIT]
    _, credit_rest = lax.scan(credit_step, credit_first, eps_market[1:, :, CREDIT])
    btc = geometric(p.btc_price_usd, p.btc_drift, p.btc_vol, eps_market[..., BTC])
    hashprice = jnp.exp(p.btc_hashprice_drift * jnp.asarray(steps, dtype) * dt)  # [T]
    return _Paths(
        rent=rent,
        price=jnp.exp(ln_price),
        ln_price=ln_price,
        btc=btc,
        eth=geometric(p.eth_price_usd, p.eth_drift, p.eth_vol, eps_market[..., ETH]),
        power=geometric(p.power_usd_per_kwh, p.power_drift, p.power_vol, eps_market[..., POWER]),
        rate=rate,
        credit=jnp.concatenate([credit_first[None], credit_rest], axis=0),
        btc_income_index=btc / p.btc_price_usd * hashprice[:, None],
    )


def factor_paths_jax(params: ModelParams, grid: ModelGrid, normals: jax.Array) -> FactorPaths:
    """Factor paths [S, T+1, ...] from the stream-0 normals [S, T, K + ν] (dtype = normals').

    Matches reference.factor_paths(params, grid, reference.correlated_shocks(...)).
    """
    configure_jax()
    p = _cast_params(params, normals.dtype)
    paths = _paths(p, grid, correlated_shocks_jax(p, grid, normals))
    n_scen = normals.shape[0]

    def with_today(today, path):  # path [T, S, ...] -> [S, T+1, ...]
        today = jnp.broadcast_to(today, path.shape[1:])[None]
        return jnp.swapaxes(jnp.concatenate([today, path], axis=0), 0, 1)

    return FactorPaths(
        rent_usd_per_hour=with_today(p.rent_usd_per_hour, paths.rent),
        price_usd=with_today(p.price_usd, paths.price),
        btc_usd=with_today(p.btc_price_usd, paths.btc),
        eth_usd=with_today(p.eth_price_usd, paths.eth),
        power_usd_per_kwh=with_today(p.power_usd_per_kwh, paths.power),
        base_rate=with_today(p.rate_level, paths.rate),
        credit=with_today(jnp.zeros((n_scen,), normals.dtype), paths.credit),
    )


def _shifted(normals, normal_shift, grid: ModelGrid):
    """Importance sampling: the systematic normals z [S, T, :K] move to z + μ (μ [T, K]);
    the χ² slots do not (kernels.reference.shift_normals)."""
    if normal_shift is None:
        return normals
    k = grid.n_factors
    mu = jnp.asarray(normal_shift).astype(normals.dtype)
    return normals.at[..., :k].add(mu[None])


@functools.partial(jax.jit, static_argnames=("grid", "count"))
def _log_weights_jit(grid, seed, first_scenario, count, normal_shift):
    normals = shock_normals_jax(
        seed, first_scenario, count, grid.periods, grid.slots_per_period, jnp.float64
    )
    z = normals[..., : grid.n_factors]
    return -jnp.einsum("stk,tk->s", z, normal_shift) - 0.5 * jnp.sum(normal_shift**2)


def importance_log_weights(grid: ModelGrid, seed, first_scenario, count: int, normal_shift):
    """ln w(ω) [count] of scenarios first_scenario.. under the shift μ = normal_shift [T, K]:
    w = φ(z + μ)/φ(z) = exp(−μ·z − |μ|²/2), z the unshifted Threefry normals (float64; the
    same numbers as kernels.reference.shift_normals)."""
    configure_jax()
    return _log_weights_jit(
        grid,
        _u32(seed, "seed"),
        _u32(first_scenario, "first_scenario"),
        int(count),
        _shift_arg(normal_shift),
    )
