"""Threefry-2x32-20 random numbers of docs/spec.md §8: known answers, NumPy == JAX bit for bit,
the 24-bit uniform grid, the symmetric normal mapping, chunk invariance and statistics."""

from __future__ import annotations

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from gpucredit.kernels import rng

KNOWN_ANSWERS = [
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]
U32 = np.iinfo(np.uint32).max


def _random_words(n: int, seed: int) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, U32, size=n, dtype=np.uint32, endpoint=True) for _ in range(4)]


def _edge_bits() -> np.ndarray:
    """x0 words covering both ends of the 24-bit grid, its middle and the dropped low byte."""
    ks = np.concatenate(
        [
            np.arange(4096),
            np.arange(0, 1 << 24, 97),
            np.arange((1 << 23) - 2048, (1 << 23) + 2048),
            np.arange((1 << 24) - 4096, 1 << 24),
        ]
    ).astype(np.uint32)
    low = np.random.default_rng(7).integers(0, 256, size=ks.size, dtype=np.uint32)
    return np.concatenate([ks << 8, (ks << 8) | low, (ks << 8) | 0xFF])


# --------------------------------------------------------------------------- Threefry


@pytest.mark.parametrize(("key", "ctr", "expected"), KNOWN_ANSWERS)
def test_known_answers_numpy(key, ctr, expected):
    x0, x1 = rng.threefry2x32_np(*key, *ctr)
    assert (int(x0), int(x1)) == expected
    assert x0.dtype == np.uint32 and x1.dtype == np.uint32


@pytest.mark.parametrize(("key", "ctr", "expected"), KNOWN_ANSWERS)
def test_known_answers_jax(key, ctr, expected):
    x0, x1 = rng.threefry2x32_jax(*key, *ctr)
    assert (int(x0), int(x1)) == expected
    args = [jnp.uint32(v) for v in (*key, *ctr)]
    y0, y1 = jax.jit(rng.threefry2x32_jax)(*args)
    assert (int(y0), int(y1)) == expected
    assert y0.dtype == jnp.uint32


def test_numpy_broadcasts():
    k0, k1, c0, c1 = _random_words(24, 1)
    x0, x1 = rng.threefry2x32_np(k0[0], k1[0], c0[:4, None], c1[None, :6])
    assert x0.shape == x1.shape == (4, 6)
    for i in range(4):
        for j in range(6):
            e0, e1 = rng.threefry2x32_np(k0[0], k1[0], c0[i], c1[j])
            assert (x0[i, j], x1[i, j]) == (e0, e1)


def test_numpy_and_jax_bits_identical():
    k0, k1, c0, c1 = _random_words(100_000, 2)
    n0, n1 = rng.threefry2x32_np(k0, k1, c0, c1)
    j0, j1 = jax.jit(rng.threefry2x32_jax)(k0, k1, c0, c1)
    np.testing.assert_array_equal(n0, np.asarray(j0))
    np.testing.assert_array_equal(n1, np.asarray(j1))


def test_matches_jax_extend_threefry():
    _, _, c0, c1 = _random_words(10_000, 3)
    for k0, k1 in [(0, 0), (0x13198A2E, 0x03707344), (U32, 1), (12345, 0)]:
        key = jnp.array([k0, k1], dtype=jnp.uint32)
        out = np.asarray(jax.extend.random.threefry_2x32(key, jnp.concatenate([c0, c1])))
        x0, x1 = rng.threefry2x32_np(k0, k1, c0, c1)
        np.testing.assert_array_equal(out[: c0.size], x0)
        np.testing.assert_array_equal(out[c0.size :], x1)


# --------------------------------------------------------------------------- bits -> numbers


def test_uniforms_on_the_24_bit_grid():
    x0 = _edge_bits()
    u = rng.uniform_from_bits(x0)
    assert u.dtype == np.float64
    assert np.all((u > 0) & (u < 1))
    np.testing.assert_array_equal(u * 2.0**24 - 0.5, (x0 >> 8).astype(np.float64))
    assert u.min() == 0.5 / 2**24 and u.max() == 1 - 0.5 / 2**24
    with jax.enable_x64(True):
        uj = np.asarray(rng.uniform_from_bits(jnp.asarray(x0), jnp.float64))
    np.testing.assert_array_equal(u, uj)


def test_float32_uniforms_stay_inside_and_round_down():
    x0 = _edge_bits()
    k = (x0 >> 8).astype(np.float64)
    u_np = rng.uniform_from_bits(x0, np.float32)
    for u32 in (u_np, rng.uniform_from_bits(jnp.asarray(x0), jnp.float32)):
        u32 = np.asarray(u32)
        assert u32.dtype == np.float32
        assert np.all((u32 > 0) & (u32 < 1))
        lower = k < 2**23
        np.testing.assert_array_equal(u32[lower], (k[lower] + 0.5) / 2**24)
        np.testing.assert_array_equal(u32[~lower], k[~lower] / 2**24)


def test_normals_symmetric_mapping_numpy():
    x0 = _edge_bits()
    k = (x0 >> 8).astype(np.int64)
    z = rng.normal_from_bits(x0)
    u = (k + 0.5) / 2**24
    np.testing.assert_allclose(z, scipy.special.ndtri(u), rtol=1e-13, atol=1e-13)
    lower = k < 2**23
    np.testing.assert_array_equal(z[lower], scipy.special.ndtri(u[lower]))
    mirrored = rng.normal_from_bits((2**24 - 1 - k).astype(np.uint32) << 8)
    np.testing.assert_array_equal(z, -mirrored)
    assert np.all(np.isfinite(z)) and np.abs(z).max() < 5.5


def test_normals_numpy_vs_jax_float64():
    x0 = _edge_bits()
    z = rng.normal_from_bits(x0)
    with jax.enable_x64(True):
        zj = jax.jit(rng.normal_from_bits, static_argnums=1)(jnp.asarray(x0), jnp.float64)
        assert zj.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(zj), z, rtol=0, atol=1e-12)


def test_normals_numpy_vs_jax_float32():
    x0 = _edge_bits()
    z = rng.normal_from_bits(x0)
    zj = np.asarray(jax.jit(rng.normal_from_bits, static_argnums=1)(jnp.asarray(x0), jnp.float32))
    assert zj.dtype == np.float32
    big = np.abs(z) > 1e-3
    np.testing.assert_allclose(zj[big], z[big], rtol=1e-5)
    np.testing.assert_allclose(zj[~big], z[~big], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.sign(zj), np.sign(z))
    z32 = rng.normal_from_bits(x0, np.float32)
    assert z32.dtype == np.float32
    np.testing.assert_array_equal(z32, z.astype(np.float32))


def test_bad_dtypes_and_seeds_are_refused():
    with pytest.raises(ValueError, match="float32 or float64"):
        rng.uniform_from_bits(np.zeros(3, np.uint32), np.float16)
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        rng.shock_normals_jax(0, 0, 2, 1, 1, jnp.float64)
    with pytest.raises(ValueError, match="seed"):
        rng.shock_normals_np(2**32, [0], 1, 1)
    with pytest.raises(ValueError, match="seed"):
        rng.default_uniforms_jax(-1, 0, 2, 3)


# --------------------------------------------------------------------------- streams


def test_shock_normals_layout_numpy():
    seed, periods, slots = 0xDEADBEEF, 5, 7
    scen = np.array([0, 3, 99, 2**32 - 1], dtype=np.uint32)
    z = rng.shock_normals_np(seed, scen, periods, slots)
    assert z.shape == (4, periods, slots) and z.dtype == np.float64
    for s in range(4):
        for t in range(1, periods + 1):
            for slot in range(slots):
                x0, _ = rng.threefry2x32_np(seed, 0, scen[s], (t - 1) * slots + slot)
                assert z[s, t - 1, slot] == rng.normal_from_bits(x0)


def test_default_uniforms_layout_numpy():
    seed, n_b = 42, 9
    scen = np.array([5, 0, 77], dtype=np.uint32)
    u = rng.default_uniforms_np(seed, scen, n_b)
    assert u.shape == (3, n_b) and u.dtype == np.float64
    for s in range(3):
        for b in range(n_b):
            x0, _ = rng.threefry2x32_np(seed, 1, scen[s], b)
            assert u[s, b] == rng.uniform_from_bits(x0)
    # stream 1 is not stream 0
    x0_shock, _ = rng.threefry2x32_np(seed, 0, scen[:, None], np.arange(n_b, dtype=np.uint32))
    assert not np.any(rng.uniform_from_bits(x0_shock) == u)


def test_stream_helpers_numpy_vs_jax():
    seed, periods, slots, n_b = 2**32 - 1, 3, 11, 13
    scen = np.arange(1000, 1300, dtype=np.uint32)
    z = rng.shock_normals_np(seed, scen, periods, slots)
    u = rng.default_uniforms_np(seed, scen, n_b)
    with jax.enable_x64(True):
        z64 = rng.shock_normals_jax(seed, 1000, 300, periods, slots, jnp.float64)
        z64_at = rng.shock_normals_jax_at(seed, scen, periods, slots, jnp.float64)
        u64 = rng.default_uniforms_jax(seed, 1000, 300, n_b, jnp.float64)
        u64_at = rng.default_uniforms_jax_at(seed, jnp.asarray(scen), n_b, jnp.float64)
        assert z64.dtype == jnp.float64 and u64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(z64), z, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(z64_at), np.asarray(z64))
    np.testing.assert_array_equal(np.asarray(u64), u)
    np.testing.assert_array_equal(np.asarray(u64_at), u)
    z32 = np.asarray(rng.shock_normals_jax(seed, np.uint32(1000), 300, periods, slots))
    assert z32.dtype == np.float32 and z32.shape == (300, periods, slots)
    big = np.abs(z) > 1e-3
    np.testing.assert_allclose(z32[big], z[big], rtol=1e-5)
    np.testing.assert_allclose(z32[~big], z[~big], rtol=0, atol=1e-6)
    u32 = np.asarray(rng.default_uniforms_jax(seed, 1000, 300, n_b))
    x0, _ = rng.threefry2x32_np(seed, 1, scen[:, None], np.arange(n_b, dtype=np.uint32))
    np.testing.assert_array_equal(u32, rng.uniform_from_bits(x0, np.float32))


def test_default_uniforms_of_borrowers_are_the_streams_columns():
    """What a loan block draws in the graph (its loans' borrowers, repeats included, any
    order) is bit for bit the column of the whole [S, B] stream, in both precisions."""
    seed, n_b = 12345, 40
    scen = np.arange(70, 170, dtype=np.uint32)
    borrowers = np.array([3, 0, 39, 3, 17, 17, 5], dtype=np.int32)
    u32 = np.asarray(rng.default_uniforms_jax_at(seed, jnp.asarray(scen), n_b))
    of32 = jax.jit(rng.default_uniforms_of)(np.uint32(seed), jnp.asarray(scen), borrowers)
    np.testing.assert_array_equal(np.asarray(of32), u32[:, borrowers])
    with jax.enable_x64(True):
        of64 = rng.default_uniforms_of(np.uint32(seed), jnp.asarray(scen), borrowers, jnp.float64)
        assert of64.dtype == jnp.float64
    np.testing.assert_array_equal(
        np.asarray(of64), rng.default_uniforms_np(seed, scen, n_b)[:, borrowers]
    )


def test_chunk_invariance():
    seed, periods, slots, total = 7, 4, 9, 10_000
    full_np = rng.shock_normals_np(seed, np.arange(total), periods, slots)
    full = np.asarray(rng.shock_normals_jax(seed, 0, total, periods, slots))

    traces = []

    @jax.jit
    def chunk_of(first, count=1):
        traces.append(1)
        return rng.shock_normals_jax(seed, first, count, periods, slots)

    ones = np.concatenate([np.asarray(chunk_of(np.uint32(s))) for s in range(50)])
    assert len(traces) == 1  # a traced first_scenario does not retrace per chunk
    np.testing.assert_array_equal(ones, full[:50])
    np.testing.assert_array_equal(
        rng.shock_normals_np(seed, np.arange(50), periods, slots), full_np[:50]
    )

    for start, size in ((0, 4096), (1234, 3000)):
        firsts = range(start, total, size)
        chunks = [
            rng.shock_normals_jax(seed, f, min(size, total - f), periods, slots) for f in firsts
        ]
        np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in chunks]), full[start:])
        chunks_np = [
            rng.shock_normals_np(seed, np.arange(f, min(f + size, total)), periods, slots)
            for f in firsts
        ]
        np.testing.assert_array_equal(np.concatenate(chunks_np), full_np[start:])

    tail = np.array([9999, 17, 4096, 0, 17], dtype=np.uint32)
    np.testing.assert_array_equal(
        np.asarray(rng.shock_normals_jax_at(seed, tail, periods, slots)), full[tail]
    )
    np.testing.assert_array_equal(rng.shock_normals_np(seed, tail, periods, slots), full_np[tail])


# --------------------------------------------------------------------------- statistics


def test_normals_are_standard_normal_ks():
    z = rng.shock_normals_np(2024, np.arange(2000), 4, 25).ravel()
    assert z.size == 200_000
    assert scipy.stats.kstest(z, "norm").pvalue > 0.01


def test_moments_and_independence_across_slots_and_periods():
    n, periods, slots = 20_000, 6, 12
    z = rng.shock_normals_np(11, np.arange(n), periods, slots)  # [n, T, slots]
    m = n * periods
    flat = z.reshape(m, slots)
    se_mean, se_var, se_corr = 1 / np.sqrt(m), np.sqrt(2 / m), 1 / np.sqrt(m)
    assert np.all(np.abs(flat.mean(axis=0)) < 4 * se_mean)
    assert np.all(np.abs(flat.var(axis=0) - 1) < 4 * se_var)
    corr = np.corrcoef(flat, rowvar=False)
    off = corr[~np.eye(slots, dtype=bool)]
    assert np.all(np.abs(off) < 4 * se_corr)
    # consecutive periods of one slot, and consecutive scenarios
    lag_t = np.mean(z[:, 1:, :] * z[:, :-1, :])
    assert abs(lag_t) < 4 / np.sqrt(n * (periods - 1) * slots)
    lag_s = np.mean(z[1:] * z[:-1])
    assert abs(lag_s) < 4 / np.sqrt((n - 1) * periods * slots)


def test_default_uniforms_moments_and_independence_from_shocks():
    n, n_b = 50_000, 4
    u = rng.default_uniforms_np(3, np.arange(n), n_b)
    m = u.size
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / m)
    assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / m)  # Var((U - 1/2)^2) = 1/180
    # same (seed, a, b) in streams 0 and 1 are unrelated
    z = rng.shock_normals_np(3, np.arange(n), 1, n_b).reshape(n, n_b)
    c = np.mean(z * scipy.special.ndtri(u))
    assert abs(c) < 4 / np.sqrt(m)
