"""Counter-based random numbers of docs/spec.md §8, bit-identical in NumPy and JAX.

One generator: Threefry-2x32 with 20 rounds (Random123). Key (k0, k1) = (seed, stream),
counter (c0, c1) = (a, b), all uint32; only the first output word x0 is used.

  uniform  u = (floor(x0 / 2^8) + 0.5) / 2^24               in (0, 1), on a 24-bit grid
  normal   z = Phi^-1(u), computed symmetrically (see `normal_from_bits`)

Streams: `STREAM_SHOCKS` = 0 (factor shocks, a = scenario, b = (t - 1) * slots + slot),
`STREAM_DEFAULTS` = 1 (default uniforms, a = scenario, b = borrower index) and
`STREAM_OFFTAKERS` = 2 (offtaker uniforms, a = scenario, b = offtaker index). Every draw is a
pure function of (seed, stream, a, b), so any scenario can be regenerated from its index
alone, whatever the chunking, the backend or the number of workers.

Shapes: S scenarios, T periods, `slots` draws per scenario and period (K + nu), B borrowers.
NumPy functions return float64 (the reference); JAX functions take `dtype` float32 or
float64 (float64 needs `jax_enable_x64`, else a ValueError).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

__all__ = [
    "STREAM_DEFAULTS",
    "STREAM_OFFTAKERS",
    "STREAM_SHOCKS",
    "default_uniforms_jax",
    "default_uniforms_jax_at",
    "default_uniforms_of",
    "default_uniforms_np",
    "normal_from_bits",
    "offtaker_uniforms_jax_at",
    "offtaker_uniforms_np",
    "shock_normals_jax",
    "shock_normals_jax_at",
    "shock_normals_np",
    "threefry2x32_jax",
    "threefry2x32_np",
    "uniform_from_bits",
]

STREAM_SHOCKS = 0  # factor shocks: a = scenario, b = (t - 1) * slots + slot
STREAM_DEFAULTS = 1  # default uniforms: a = scenario, b = borrower index
STREAM_OFFTAKERS = 2  # offtaker uniforms: a = scenario, b = offtaker index (docs/spec.md §4a)

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)  # Threefry-2x32 rotation constants
_PARITY = 0x1BD11BDA  # key-schedule parity constant
_ROUNDS = 20
_MANTISSA_BITS = 24  # u lives on a 2^24 grid
_HALF = 1 << (_MANTISSA_BITS - 1)  # k >= 2^23: the upper half of the grid
_MASK24 = (1 << _MANTISSA_BITS) - 1  # k ^ _MASK24 == 2^24 - 1 - k
_SCALE = 2.0**-_MANTISSA_BITS
_U32_MAX = (1 << 32) - 1


# --------------------------------------------------------------------------- Threefry


def threefry2x32_np(key0, key1, c0, c1) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32-20 (Random123) in NumPy, vectorised.

    Args:
        key0, key1: key words, uint32 (or ints in [0, 2^32)), any broadcastable shapes.
        c0, c1: counter words, likewise.
    Returns:
        (x0, x1): uint32 arrays of the broadcast shape of the four inputs.
    Arithmetic wraps modulo 2^32. Known answer: key (0, 0), counter (0, 0) ->
    (0x6b200159, 0x99ba4efe).
    """
    k0, k1, x0, x1 = (np.asarray(v, dtype=np.uint32) for v in (key0, key1, c0, c1))
    k0, k1, x0, x1 = np.broadcast_arrays(k0, k1, x0, x1)
    with np.errstate(over="ignore"):
        ks = (k0, k1, k0 ^ k1 ^ np.uint32(_PARITY))
        x0 = x0 + ks[0]
        x1 = x1 + ks[1]
        for i in range(_ROUNDS):
            r = _ROTATIONS[i % 8]
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x1 ^ x0
            if i % 4 == 3:
                s = (i + 1) // 4
                x0 = x0 + ks[s % 3]
                x1 = x1 + ks[(s + 1) % 3] + np.uint32(s)
    return np.asarray(x0, dtype=np.uint32), np.asarray(x1, dtype=np.uint32)


def threefry2x32_jax(key0, key1, c0, c1) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32-20 (Random123) in jax.numpy; bit-identical to `threefry2x32_np`.

    Args:
        key0, key1, c0, c1: uint32 arrays (or ints in [0, 2^32)), broadcastable shapes;
            may be traced. Other integer dtypes are reinterpreted modulo 2^32.
    Returns:
        (x0, x1): uint32 arrays of the broadcast shape. Jit-friendly (the 20 rounds unroll).
    """
    k0, k1, x0, x1 = (_as_u32_jax(v) for v in (key0, key1, c0, c1))
    k0, k1, x0, x1 = jnp.broadcast_arrays(k0, k1, x0, x1)
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(_ROUNDS):
        r = _ROTATIONS[i % 8]
        x0 = x0 + x1
        x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
        x1 = x1 ^ x0
        if i % 4 == 3:
            s = (i + 1) // 4
            x0 = x0 + ks[s % 3]
            x1 = x1 + ks[(s + 1) % 3] + jnp.uint32(s)
    return x0, x1


def _as_u32_jax(v) -> jax.Array:
    if isinstance(v, int):
        return jnp.asarray(np.uint32(_check_u32(v, "value")))
    return jnp.asarray(v).astype(jnp.uint32)


def _check_u32(v: int, name: str) -> int:
    if not 0 <= v <= _U32_MAX:
        raise ValueError(f"{name} must be in [0, 2^32), got {v}")
    return v


# --------------------------------------------------------------------------- bits -> numbers


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_jax_dtype(dtype) -> np.dtype:
    dt = _float_dtype(dtype)
    if dt == np.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != np.float64:
        raise ValueError("float64 random numbers in JAX need jax_enable_x64")
    return dt


def uniform_from_bits(x0, dtype=np.float64):
    """Uniform u = (floor(x0 / 2^8) + 0.5) / 2^24 from Threefry's first output word.

    Args:
        x0: uint32 array, NumPy or JAX (the result is of the same kind), any shape.
        dtype: float64 (exact: u is on the 24-bit grid, in [2^-25, 1 - 2^-25]) or float32.
            In float32 the upper half of the grid (k = x0 >> 8 >= 2^23) is not
            representable; there u is rounded down to k / 2^24, so it stays in (0, 1)
            (round-to-nearest would give 1.0 for k = 2^24 - 1). The lower half is exact.
    Returns:
        u with the shape of x0.
    """
    dt = _float_dtype(dtype)
    xp = jnp if _is_jax(x0) else np
    if xp is jnp:
        _check_jax_dtype(dt)
    k = xp.asarray(x0).astype(xp.uint32) >> 8
    kf = k.astype(dt)
    u = (kf + 0.5) * _SCALE
    if dt == np.float32:
        u = xp.where(k < _HALF, u, kf * np.float32(_SCALE))
    return u.astype(dt)


def normal_from_bits(x0, dtype=np.float64):
    """Standard normal z = Phi^-1(u) from Threefry's first output word, symmetrically.

    With k = x0 >> 8: z = Phi^-1((k + 0.5) / 2^24) for k < 2^23 and
    z = -Phi^-1((2^24 - k - 0.5) / 2^24) for k >= 2^23, so the argument of Phi^-1 is
    always below 1/2 and exact even in float32. Every backend uses this formula.

    Args:
        x0: uint32 array, NumPy or JAX (the result is of the same kind), any shape.
        dtype: float64 or float32. NumPy evaluates in float64 (scipy.special.ndtri) and
            rounds; JAX evaluates jax.scipy.special.ndtri in `dtype`.
    Returns:
        z with the shape of x0, in [-5.42, 5.42].
    """
    dt = _float_dtype(dtype)
    if _is_jax(x0):
        _check_jax_dtype(dt)
        k = jnp.asarray(x0).astype(jnp.uint32) >> 8
        upper = k >= _HALF
        p = ((jnp.where(upper, k ^ _MASK24, k).astype(dt) + 0.5) * _SCALE).astype(dt)
        z = jax.scipy.special.ndtri(p)
        return jnp.where(upper, -z, z).astype(dt)
    k = np.asarray(x0).astype(np.uint32) >> 8
    upper = k >= _HALF
    p = (np.where(upper, k ^ _MASK24, k).astype(np.float64) + 0.5) * _SCALE
    z = scipy.special.ndtri(p)
    return np.where(upper, -z, z).astype(dt)


# --------------------------------------------------------------------------- streams, NumPy


def _scenarios_np(scenarios) -> np.ndarray:
    s = np.asarray(scenarios)
    if s.ndim != 1:
        raise ValueError(f"scenarios must be 1-D, got shape {s.shape}")
    if s.size and (s.min() < 0 or s.max() > _U32_MAX):
        raise ValueError("scenario indices must be in [0, 2^32)")
    return s.astype(np.uint32)


def _shock_counter_np(periods: int, slots: int) -> np.ndarray:
    """[T, slots] uint32: b = (t - 1) * slots + slot."""
    if periods * slots > _U32_MAX + 1:
        raise ValueError("periods * slots must be at most 2^32")
    return np.arange(periods * slots, dtype=np.uint32).reshape(periods, slots)


def shock_normals_np(seed: int, scenarios, periods: int, slots: int) -> np.ndarray:
    """Factor-shock normals (stream 0) for the given scenarios, float64.

    Args:
        seed: int in [0, 2^32).
        scenarios: [S] scenario indices (uint32 or ints in [0, 2^32)).
        periods: T.
        slots: draws per scenario and period (K + nu: K factor shocks, then nu chi^2 draws).
    Returns:
        [S, T, slots] float64; entry [s, t - 1, slot] uses counter
        (a, b) = (scenarios[s], (t - 1) * slots + slot).
    """
    _check_u32(int(seed), "seed")
    scen = _scenarios_np(scenarios)
    b = _shock_counter_np(periods, slots)
    x0, _ = threefry2x32_np(seed, STREAM_SHOCKS, scen[:, None, None], b[None, :, :])
    return normal_from_bits(x0, np.float64)


def default_uniforms_np(seed: int, scenarios, n_borrowers: int) -> np.ndarray:
    """Default uniforms U_b(omega) (stream 1) for the given scenarios, float64.

    Args:
        seed: int in [0, 2^32).
        scenarios: [S] scenario indices.
        n_borrowers: B (borrower index = order of first appearance of borrower_id).
    Returns:
        [S, B] float64; entry [s, b] uses counter (a, b) = (scenarios[s], b).
    """
    _check_u32(int(seed), "seed")
    scen = _scenarios_np(scenarios)
    b = np.arange(n_borrowers, dtype=np.uint32)
    x0, _ = threefry2x32_np(seed, STREAM_DEFAULTS, scen[:, None], b[None, :])
    return uniform_from_bits(x0, np.float64)


def offtaker_uniforms_np(seed: int, scenarios, n_offtakers: int) -> np.ndarray:
    """Offtaker uniforms U_j(omega) (stream 2, docs/spec.md §4a) for the given scenarios.

    Returns [S, J] float64; entry [s, j] uses counter (a, b) = (scenarios[s], j).
    """
    _check_u32(int(seed), "seed")
    scen = _scenarios_np(scenarios)
    b = np.arange(n_offtakers, dtype=np.uint32)
    x0, _ = threefry2x32_np(seed, STREAM_OFFTAKERS, scen[:, None], b[None, :])
    return uniform_from_bits(x0, np.float64)


# --------------------------------------------------------------------------- streams, JAX


def _seed_arg(seed):
    """Python ints are checked and passed as np.uint32 (no retrace per value, no int32 overflow)."""
    if isinstance(seed, int | np.integer):
        return np.uint32(_check_u32(int(seed), "seed"))
    return seed


def _scenario_arg(first_scenario):
    if isinstance(first_scenario, int | np.integer):
        return np.uint32(_check_u32(int(first_scenario), "first_scenario"))
    return first_scenario


@functools.partial(jax.jit, static_argnames=("periods", "slots", "dtype"))
def _shock_normals_at(seed, scenarios, periods: int, slots: int, dtype):
    scen = jnp.asarray(scenarios).astype(jnp.uint32)
    b = jnp.arange(periods * slots, dtype=jnp.uint32).reshape(periods, slots)
    x0, _ = threefry2x32_jax(seed, STREAM_SHOCKS, scen[:, None, None], b[None, :, :])
    return normal_from_bits(x0, dtype)


@functools.partial(jax.jit, static_argnames=("count", "periods", "slots", "dtype"))
def _shock_normals_range(seed, first_scenario, count: int, periods: int, slots: int, dtype):
    first = jnp.asarray(first_scenario).astype(jnp.uint32)
    return _shock_normals_at(
        seed, first + jnp.arange(count, dtype=jnp.uint32), periods, slots, dtype
    )


@functools.partial(jax.jit, static_argnames=("n_borrowers", "dtype"))
def _default_uniforms_at(seed, scenarios, n_borrowers: int, dtype):
    scen = jnp.asarray(scenarios).astype(jnp.uint32)
    b = jnp.arange(n_borrowers, dtype=jnp.uint32)
    x0, _ = threefry2x32_jax(seed, STREAM_DEFAULTS, scen[:, None], b[None, :])
    return uniform_from_bits(x0, dtype)


@functools.partial(jax.jit, static_argnames=("count", "n_borrowers", "dtype"))
def _default_uniforms_range(seed, first_scenario, count: int, n_borrowers: int, dtype):
    first = jnp.asarray(first_scenario).astype(jnp.uint32)
    return _default_uniforms_at(
        seed, first + jnp.arange(count, dtype=jnp.uint32), n_borrowers, dtype
    )


def shock_normals_jax(
    seed, first_scenario, count: int, periods: int, slots: int, dtype=jnp.float32
) -> jax.Array:
    """Factor-shock normals (stream 0) for scenarios first_scenario .. first_scenario+count-1.

    Args:
        seed: int in [0, 2^32) or a uint32 scalar (may be traced).
        first_scenario: int or uint32 scalar; may be traced, so a jitted caller looping over
            chunks compiles once per chunk size.
        count: number of scenarios S (static).
        periods: T (static).
        slots: draws per scenario and period, K + nu (static).
        dtype: float32 or float64 (static; float64 needs jax_enable_x64).
    Returns:
        [count, T, slots] array of `dtype`; bit-for-bit the bits of `shock_normals_np`
        (equal values in float64 up to ndtri's last ulps; float32 to ~1e-6 relative).
    """
    dt = _check_jax_dtype(dtype)
    return _shock_normals_range(
        _seed_arg(seed), _scenario_arg(first_scenario), int(count), int(periods), int(slots), dt
    )


def shock_normals_jax_at(seed, scenarios, periods: int, slots: int, dtype=jnp.float32) -> jax.Array:
    """Factor-shock normals (stream 0) for an explicit index array (the tail pass).

    Args:
        seed: int in [0, 2^32) or a uint32 scalar (may be traced).
        scenarios: [S] scenario indices, uint32 (int32 is reinterpreted modulo 2^32).
        periods, slots, dtype: as `shock_normals_jax` (static).
    Returns:
        [S, T, slots] array of `dtype`; row s regenerates scenario scenarios[s] exactly.
    """
    dt = _check_jax_dtype(dtype)
    if isinstance(scenarios, np.ndarray | list | tuple):
        scenarios = _scenarios_np(scenarios)
    return _shock_normals_at(_seed_arg(seed), scenarios, int(periods), int(slots), dt)


def default_uniforms_jax(
    seed, first_scenario, count: int, n_borrowers: int, dtype=jnp.float32
) -> jax.Array:
    """Default uniforms (stream 1) for scenarios first_scenario .. first_scenario+count-1.

    Args:
        seed, first_scenario: as `shock_normals_jax` (first_scenario may be traced).
        count: S (static).
        n_borrowers: B (static).
        dtype: float32 or float64 (static); see `uniform_from_bits` for float32 rounding.
    Returns:
        [count, B] array of `dtype`, u in (0, 1).
    """
    dt = _check_jax_dtype(dtype)
    return _default_uniforms_range(
        _seed_arg(seed), _scenario_arg(first_scenario), int(count), int(n_borrowers), dt
    )


def default_uniforms_of(seed, scenarios, borrowers, dtype=jnp.float32) -> jax.Array:
    """Default uniforms (stream 1) of the given borrowers only, for use inside a traced
    computation (not jitted itself): the uniforms a block of loans reads, generated where
    it reads them, with the counters of `default_uniforms_np` (bit for bit the same u).

    Args:
        seed: uint32 scalar (may be traced).
        scenarios: [S] uint32 scenario indices.
        borrowers: [b] borrower indices (int32 or uint32), e.g. each loan's borrower; a
            borrower listed twice gets the same u twice.
        dtype: float32 or float64.
    Returns:
        [S, b] array of `dtype`; entry [s, i] uses counter (a, b) = (scenarios[s], borrowers[i]).
    """
    dt = _check_jax_dtype(dtype)
    x0, _ = threefry2x32_jax(
        seed, STREAM_DEFAULTS, jnp.asarray(scenarios)[:, None], jnp.asarray(borrowers)[None, :]
    )
    return uniform_from_bits(x0, dt)


def default_uniforms_jax_at(seed, scenarios, n_borrowers: int, dtype=jnp.float32) -> jax.Array:
    """Default uniforms (stream 1) for an explicit [S] scenario index array.

    Returns:
        [S, B] array of `dtype`.
    """
    dt = _check_jax_dtype(dtype)
    if isinstance(scenarios, np.ndarray | list | tuple):
        scenarios = _scenarios_np(scenarios)
    return _default_uniforms_at(_seed_arg(seed), scenarios, int(n_borrowers), dt)


@functools.partial(jax.jit, static_argnames=("n_offtakers", "dtype"))
def _offtaker_uniforms_at(seed, scenarios, n_offtakers: int, dtype):
    scen = _as_u32_jax(scenarios)
    b = jnp.arange(n_offtakers, dtype=jnp.uint32)
    x0, _ = threefry2x32_jax(seed, STREAM_OFFTAKERS, scen[:, None], b[None, :])
    return uniform_from_bits(x0, dtype)


def offtaker_uniforms_jax_at(seed, scenarios, n_offtakers: int, dtype=jnp.float32) -> jax.Array:
    """Offtaker uniforms (stream 2, docs/spec.md §4a) [S, J] for an [S] scenario index array,
    bit for bit those of `offtaker_uniforms_np`; callable inside a traced function."""
    dt = _check_jax_dtype(dtype)
    return _offtaker_uniforms_at(_seed_arg(seed), scenarios, int(n_offtakers), dt)
