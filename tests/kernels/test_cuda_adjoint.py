"""kernels/cuda/adjoint.cu (the CuPy backend's fused adjoint) without a GPU, and on one.

- nvcc compiles recovery_kernel and adjoint_kernel (float and double) for sm_90, after
  forward.cu in one translation unit as the host compiles them, without a warning; ptxas
  reports registers, spills and stack (the per-thread stored state is a stack frame).
- The same source under test_cuda_compile's g++ emulation of CUDA runs the host function
  `cupy_adjoint.weighted_loss_gradient_cupy` (pass 1, recovery pass, adjoint, and the JAX
  chain around them) and must give `jax_backward.weighted_loss_gradient`'s value and every
  ModelParams leaf of its gradient: float64 to 1e-9 relative (an absolute floor scaled to
  the leaf's size), float32 to 1e-3 (floor scaled to the largest leaf's size).
- `gpu`: the real CuPy kernels against the JAX gradient.
Skipped when nvcc (resp. g++, cupy with a device) is absent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import offtaker_book, random_book
from tests.kernels.test_cuda_compile import (
    _SHIM,
    GXX,
    HARNESS,
    NVCC,
    _ptxas_report,
    compile_emulator,
)

from gpucredit.kernels import cupy_adjoint, cupy_engine, jax_engine
from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.loans import loan_arrays

CUDA = Path(cupy_engine.__file__).parent / "cuda"
SEED = 11

# --------------------------------------------------------------------------- nvcc


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_adjoint_cu_compiles_for_sm90(tmp_path):
    wrapper = tmp_path / "instances.cu"
    wrapper.write_text(
        f'#include "{CUDA / "forward.cu"}"\n#include "{CUDA / "adjoint.cu"}"\n'
        "void* gpucredit_instances[] = {\n"
        + ",\n".join(
            f"    (void*)&{kind}_kernel<{real}>"
            for kind in ("recovery", "adjoint")
            for real in ("float", "double")
        )
        + "};\n"
    )
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "-c", "-o", str(tmp_path / "x.o"), "-Xptxas", "-v",
         "-Werror", "all-warnings", str(wrapper)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    report = _ptxas_report(output)
    assert len(report) == 4, output
    lines = []
    for entry, info in sorted(report.items()):
        real = "float" if "IfEv" in entry else "double"
        kind = "adjoint" if "adjoint" in entry else "recovery"
        lines.append(f"{kind} {real}: {info}")
        assert info.get("registers", 999) <= 255, (entry, info)
        if real == "float":  # the float kernels keep everything but the stored state in registers
            assert info["spill_stores"] == 0, (entry, info)
        if kind == "recovery":
            assert info["stack"] == 0, (entry, info)
    print("\n".join(lines))


# --------------------------------------------------------------------------- CPU emulation

_MAIN = r"""
// kind: 0 / 3 forward_kernel<real, false / true> (12 arrays, 9 ints), 1 recovery_kernel,
// 2 adjoint_kernel (9 resp. 11 arrays, 6 ints). Every array is written back.
template <class real>
static void run(int kind, const std::string& dir) {
    std::ifstream meta(dir + "/launch.txt");
    long long gx, gy, threads, shared, n_arrays, n_ints;
    meta >> gx >> gy >> threads >> shared >> n_arrays >> n_ints;
    std::vector<long long> v(n_ints);
    for (auto& x : v) meta >> x;
    std::vector<std::vector<char>> a(n_arrays);
    for (int k = 0; k < n_arrays; ++k) a[k] = load(dir + "/a" + std::to_string(k) + ".bin");
    auto R = [&](int k) { return (real*)a[k].data(); };
    auto I = [&](int k) { return (int*)a[k].data(); };
    launch(gx, gy, threads, shared, [&] {
        if (kind == 0) {
            forward_kernel<real, false>(
                R(0), R(1), I(2), R(3), R(4), R(5), R(6), I(7), (const double*)a[8].data(),
                (unsigned long long*)a[9].data(), R(10), R(11),
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
        } else if (kind == 3) {
            forward_kernel<real, true>(
                R(0), R(1), I(2), R(3), R(4), R(5), R(6), I(7), (const double*)a[8].data(),
                (unsigned long long*)a[9].data(), R(10), R(11),
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
        } else if (kind == 1) {
            recovery_kernel<real>(R(0), R(1), I(2), R(3), R(4), R(5), I(6), R(7), R(8),
                                  v[0], v[1], v[2], v[3], v[4], v[5]);
        } else {
            adjoint_kernel<real>(R(0), R(1), I(2), R(3), R(4), R(5), I(6), R(7), R(8), R(9),
                                 R(10), v[0], v[1], v[2], v[3], v[4], v[5]);
        }
    });
    for (int k = 0; k < n_arrays; ++k) save(dir + "/a" + std::to_string(k) + ".out", a[k]);
}

int main(int argc, char** argv) {
    const std::string real = argv[1], dir = argv[3];
    const int kind = std::atoi(argv[2]);
    if (real == "float") run<float>(kind, dir);
    else run<double>(kind, dir);
    return 0;
}
"""


@pytest.fixture(scope="module")
def adjoint_emulator(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found")
    source = cupy_adjoint.adjoint_source().join([_SHIM + "\n", "\n" + HARNESS + _MAIN])
    return compile_emulator(tmp_path_factory.mktemp("adjoint_emu"), source)


def emulated_launch(binary: Path, folder: Path):
    """cupy_adjoint's `launch` on the CPU: arrays to files, the emulator, arrays back."""

    def launch(name, grid_dims, threads, shared_bytes, args):
        arrays = [a for a in args if isinstance(a, np.ndarray) and a.ndim > 0]
        ints = args[len(arrays) :]
        for k, array in enumerate(arrays):
            assert array.flags.c_contiguous, (name, k)
            array.tofile(folder / f"a{k}.bin")
        (folder / "launch.txt").write_text(
            " ".join(
                str(int(v))
                for v in (*grid_dims, threads, shared_bytes, len(arrays), len(ints), *ints)
            )
        )
        real = "float" if "float" in name else "double"
        kind = {"recovery_kernel": 1, "adjoint_kernel": 2}.get(name.split("<")[0])
        if kind is None:  # forward_kernel<real, false | true>
            kind = 3 if "true" in name else 0
        result = subprocess.run(
            [str(binary), real, str(kind), str(folder)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        for k, array in enumerate(arrays):
            if array.flags.writeable:
                out = np.fromfile(folder / f"a{k}.out", dtype=array.dtype)
                np.copyto(array, out.reshape(array.shape))

    return launch


def emulated_forward_launch(binary: Path, folder: Path):
    """cupy_engine.run_passes' `launch` (loss_pass, dtype, ...) on the same emulator."""
    launch = emulated_launch(binary, folder)

    def forward(loss_pass, dtype, grid_dims, threads, shared_bytes, args):
        name = f"forward_kernel<{cupy_adjoint._real(dtype)}, {'true' if loss_pass else 'false'}>"
        launch(name, grid_dims, threads, shared_bytes, args)

    return forward


def _case(assumptions, book: str, n_loans: int = 45):
    params, grid = assumptions.params, assumptions.grid("conditional")
    if book == "offtakers":
        loans = loan_arrays(offtaker_book(5, n_loans), assumptions)
        assert loans.offtaker is not None
        # Some fixed-rate bullets at a 0% rate: no debt service before maturity, so the
        # liquidity coverage is the cap (ln LC = ln cap, the cap's other path).
        zero = (loans.amortization == 0) & (loans.is_floating == 0)
        zero &= np.arange(len(zero)) % 2 == 0
        assert zero.sum() >= 2
        loans = loans._replace(rate=np.where(zero, 0.0, loans.rate))
    else:
        loans = loan_arrays(random_book(5, n_loans), assumptions)
    assert np.any(loans.balloon_usd > 0) and np.any(loans.is_floating > 0)
    return params, grid, loans


def _jax_gradient(params, grid, loans, scenarios, coefficients, shift, tangent, dtype):
    blocks = jax_engine.prepare_loans(loans, dtype, block_size=64)
    value, grads = jax_engine.weighted_loss_gradient(
        params, grid, blocks, SEED, scenarios, coefficients, normal_shift=shift,
        schedule_rate_tangent=tangent,
    )  # fmt: skip
    return float(value), ModelParams(*(np.asarray(g, np.float64) for g in grads))


def _compare(got, want, rtol, scale=None):
    """Every leaf: |got − want| <= rtol |want| + rtol × (the leaf's largest |want|, or
    `scale`), and the value. Returns the largest relative error seen (over non-tiny leaves)."""
    worst = 0.0
    for name, g, w in zip(ModelParams._fields, got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, name
        assert np.all(np.isfinite(g)), name
        floor = rtol * (np.max(np.abs(w)) if scale is None else scale)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=floor, err_msg=name)
        big = np.abs(w) > 1e-6 * max(np.max(np.abs(w)), 1e-300)
        if np.any(big):
            worst = max(worst, float(np.max(np.abs(g - w)[big] / np.abs(w)[big])))
    return worst


@pytest.mark.parametrize(
    ("book", "dtype", "discount", "shifted"),
    [
        ("random", np.float64, False, False),
        ("offtakers", np.float64, True, True),
        ("random", np.float32, True, False),
    ],
)
def test_emulated_adjoint_matches_jax_gradient(
    adjoint_emulator, assumptions, book, dtype, discount, shifted
):
    params, grid, loans = _case(assumptions, book)
    grid = grid._replace(discount=discount)
    if dtype == np.float32:  # both gradients are the conditional-mode loss's whatever the mode
        grid = grid._replace(mode="sampled")
    rng = np.random.default_rng(5)
    scenarios = np.array([3, 17, 250, 1001, 4096, 77], np.uint32)
    coefficients = rng.uniform(0.2, 1.0, len(scenarios))
    shift = None
    if shifted:  # importance sampling: a shift on the credit and price factors
        shift = np.zeros((grid.periods, grid.n_factors))
        shift[:, -1] = -1.5
        shift[:, grid.n_generations] = -0.5
    tangent = jax_engine.schedule_tangent(
        loans, float(params.rate_level), grid.steps_per_year, block_size=64
    )
    want_value, want = _jax_gradient(
        params, grid, loans, scenarios, coefficients, shift, tangent, np.float64
    )
    prepared = cupy_engine.prepare_loans_cupy(loans, dtype, threads=64)
    assert prepared.tiles >= 2
    value, got = cupy_adjoint.weighted_loss_gradient_cupy(
        params, grid, prepared, SEED, scenarios, coefficients, normal_shift=shift,
        schedule_rate_tangent=tangent, launch=emulated_launch(*adjoint_emulator), xp=np,
        per_block=4,
    )  # fmt: skip
    assert want_value > 0
    # the gradient is not trivially zero where the kernel's terms act
    acting = ("beta_liquidity", "beta_collateral", "beta_refinancing", "coverage_cap",
              "refi_ltv", "rate_level", "haircut_slope", "price_vol", "correlation")  # fmt: skip
    for name in acting:
        assert np.any(np.asarray(getattr(want, name)) != 0), name
    # the tail forward (forward.cu's two passes at the same indices) gives the same value
    losses = cupy_adjoint.losses_at_cupy(
        params, grid, prepared, SEED, scenarios, normal_shift=shift,
        launch=emulated_forward_launch(*adjoint_emulator), xp=np, per_block=4,
    )  # fmt: skip
    assert np.sum(coefficients * losses) == pytest.approx(
        value, rel=1e-12 if dtype == np.float64 else 1e-5
    )
    if dtype == np.float64:
        assert value == pytest.approx(want_value, rel=1e-10)
        worst = _compare(got, want, 1e-9)
    else:
        assert value == pytest.approx(want_value, rel=1e-4)
        # float32 against the float64 gradient: a floor of 1e-3 of the leaf's size
        worst = _compare(got, want, 1e-3)
    print(f"{book} {np.dtype(dtype).name}: value {value:.6g}, max relative error {worst:.3g}")


# --------------------------------------------------------------------------- on a GPU

_GPU_SCENARIOS = np.arange(24, dtype=np.uint32) * 97 + 13


@pytest.fixture(scope="module")
def gpu_case(assumptions):
    """The offtaker book of 300 loans (two tiles of 256), discounting on, and the JAX float64
    gradient there (computed once for both dtypes: one JAX compile)."""
    if not cupy_engine.available():
        pytest.skip("needs cupy and a CUDA GPU")
    params, grid, loans = _case(assumptions, "offtakers", n_loans=300)
    grid = grid._replace(discount=True)
    coefficients = np.random.default_rng(2).uniform(0.2, 1.0, len(_GPU_SCENARIOS))
    tangent = jax_engine.schedule_tangent(
        loans, float(params.rate_level), grid.steps_per_year, block_size=64
    )
    want = _jax_gradient(
        params, grid, loans, _GPU_SCENARIOS, coefficients, None, tangent, np.float64
    )
    return params, grid, loans, coefficients, tangent, want


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_engine.available(), reason="needs cupy and a CUDA GPU")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_adjoint_matches_jax_gradient(gpu_case, dtype):
    """The CuPy kernels (NVRTC) against the JAX float64 gradient on full tiles of 256 loans,
    and bit for bit the same gradient on a second call (deterministic reductions)."""
    params, grid, loans, coefficients, tangent, (want_value, want) = gpu_case
    prepared = cupy_engine.prepare_loans_cupy(loans, dtype)
    assert prepared.tiles >= 2 and prepared.threads == 256
    runs = [
        cupy_adjoint.weighted_loss_gradient_cupy(
            params,
            grid,
            prepared,
            SEED,
            _GPU_SCENARIOS,
            coefficients,
            schedule_rate_tangent=tangent,
        )  # fmt: skip
        for _ in range(2)
    ]
    (value, got), (value_again, got_again) = runs
    assert value == value_again
    for a, b in zip(got, got_again, strict=True):
        np.testing.assert_array_equal(a, b)
    losses = cupy_adjoint.losses_at_cupy(params, grid, prepared, SEED, _GPU_SCENARIOS)
    rtol = 1e-9 if dtype == np.float64 else 1e-3
    assert np.sum(coefficients * losses) == pytest.approx(want_value, rel=rtol)
    assert value == pytest.approx(want_value, rel=rtol)
    worst = _compare(got, want, rtol)
    print(f"gpu {np.dtype(dtype).name}: max relative error {worst:.3g}")


def _no_kernel(*args):
    raise AssertionError("no kernel should run")


def test_adjoint_refuses_grids_beyond_its_stored_state(assumptions):
    """The adjoint stores 64 periods per thread (GPUCREDIT_ADJOINT_MAX_T): longer grids are
    refused before any kernel runs."""
    loans = loan_arrays(random_book(5, 45), assumptions)
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float64)
    grid = assumptions.grid("conditional")._replace(periods=cupy_adjoint.MAX_PERIODS + 1)
    with pytest.raises(ValueError, match="at most 64 periods"):
        cupy_adjoint.weighted_loss_gradient_cupy(
            assumptions.params, grid, prepared, SEED, [1, 2], [0.5, 0.5], launch=_no_kernel, xp=np
        )
    source = cupy_adjoint.adjoint_source()
    assert f"#define GPUCREDIT_ADJOINT_MAX_T {cupy_adjoint.MAX_PERIODS}" in source


def test_adjoint_launch_shape_bounds_the_per_loan_partials():
    per_block, groups = cupy_adjoint.adjoint_launch_shape(1_000_000, 40, 10240, 12)
    assert groups * cupy_adjoint.loan_bar_slots(12) * 10240 <= 1 << 27
    assert per_block * groups >= 1_000_000 and (groups - 1) * per_block < 1_000_000
    assert cupy_adjoint.adjoint_launch_shape(3, 1, 64, 12) == (1, 3)
