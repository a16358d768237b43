"""kernels/cuda/forward.cu without a GPU.

- nvcc compiles all four instances (float/double × pass 1/2) for sm_90 without a warning;
  ptxas reports registers and spills, and the float kernels must not spill.
- The same source, compiled as C++ by g++ against a small CUDA emulation (one std::thread
  per CUDA thread, std::barrier for __syncthreads and for warp shuffles, real integer
  atomics), runs the CuPy backend's own host code (`cupy_engine.run_passes`) and must
  reproduce the NumPy reference scenario by scenario. This checks the kernel's index math,
  the reductions and the host-side layout before any GPU time is spent.
Skipped when nvcc (resp. g++) is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtri
from tests.conftest import offtaker_book, random_book

from gpucredit.kernels import cupy_engine, reference
from gpucredit.portfolio.loans import loan_arrays

KERNEL = Path(cupy_engine.__file__).parent / "cuda" / "forward.cu"
NVCC = shutil.which("nvcc") or (
    "/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None
)
GXX = shutil.which("g++")
INSTANCES = [(real, loss) for real in ("float", "double") for loss in ("false", "true")]
SEED = 11


# --------------------------------------------------------------------------- nvcc


def _ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """{mangled entry: {registers, spill_stores, spill_loads, stack}} from -Xptxas -v."""
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            report[current] = {}
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            report[current].update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[current]["registers"] = int(m.group(1))
    return report


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_forward_cu_compiles_for_sm90_without_spills(tmp_path):
    wrapper = tmp_path / "instances.cu"
    wrapper.write_text(
        f'#include "{KERNEL}"\n'
        "void* gpucredit_instances[] = {\n"
        + ",\n".join(f"    (void*)&forward_kernel<{r}, {loss}>" for r, loss in INSTANCES)
        + "};\n"
    )
    result = subprocess.run(
        [
            NVCC,
            "-arch=sm_90",
            "-c",
            "-o",
            str(tmp_path / "x.o"),
            "-Xptxas",
            "-v",
            "-Werror",
            "all-warnings",
            str(wrapper),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    report = _ptxas_report(output)
    assert len(report) == 4, output
    lines = []
    for entry, info in sorted(report.items()):
        real = "float" if "IfLb" in entry else "double"
        loss = "pass2" if "Lb1E" in entry else "pass1"
        lines.append(f"{real} {loss}: {info}")
        assert info.get("registers", 999) <= 255, (entry, info)
        if real == "float":
            assert info["spill_stores"] == 0, (entry, info)
            assert info["stack"] == 0, (entry, info)
    print("\n".join(lines))


# --------------------------------------------------------------------------- CPU emulation

_SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
namespace emu {
thread_local unsigned char* smem;
thread_local std::barrier<>* block_barrier;
thread_local std::barrier<>* warp_barrier;
thread_local unsigned long long* warp_scratch;
}
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define GPUCREDIT_SMEM(name) unsigned char* name = emu::smem
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 8, "");
    const int lane = threadIdx.x & 31;
    std::memcpy(&emu::warp_scratch[lane], &v, sizeof(T));
    emu::warp_barrier->arrive_and_wait();
    T r;
    std::memcpy(&r, &emu::warp_scratch[lane ^ offset], sizeof(T));
    emu::warp_barrier->arrive_and_wait();
    return r;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752440); }
"""

# The host side every emulated kernel shares: arrays from and to files, and `launch`, which
# runs a grid of blocks one after another, each block as one std::thread per CUDA thread.
HARNESS = r"""
static std::vector<char> load(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(3); }
    return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
static void save(const std::string& path, const std::vector<char>& data) {
    std::ofstream f(path, std::ios::binary);
    f.write(data.data(), data.size());
}

template <class Kernel>
static void launch(unsigned gx, unsigned gy, unsigned threads, size_t shared, Kernel kernel) {
    std::vector<unsigned char> buffer(shared + 64);
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::memset(buffer.data(), 0xff, buffer.size());  // NaN: catches unset reads
            std::barrier<> block_barrier(threads);
            const unsigned warps = threads / 32;
            std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
            for (unsigned w = 0; w < warps; ++w)
                warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
            std::vector<unsigned long long> scratch(threads);
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = bx; blockIdx.y = by;
                    blockDim.x = threads;
                    gridDim.x = gx; gridDim.y = gy;
                    emu::smem = buffer.data();
                    emu::block_barrier = &block_barrier;
                    emu::warp_barrier = warp_barriers[t / 32].get();
                    emu::warp_scratch = scratch.data() + (t / 32) * 32;
                    kernel();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}

"""

_MAIN = r"""
template <class real, bool kLoss>
static void run(const std::string& dir) {
    std::ifstream meta(dir + "/launch.txt");
    long long gx, gy, threads, shared, ints[9];
    meta >> gx >> gy >> threads >> shared;
    for (auto& v : ints) meta >> v;
    std::vector<std::vector<char>> a(12);
    for (int k = 0; k < 12; ++k) a[k] = load(dir + "/a" + std::to_string(k) + ".bin");
    launch(gx, gy, threads, shared, [&] {
        forward_kernel<real, kLoss>(
            (const real*)a[0].data(), (const real*)a[1].data(), (const int*)a[2].data(),
            (const real*)a[3].data(), (const real*)a[4].data(), (const real*)a[5].data(),
            (const real*)a[6].data(), (const int*)a[7].data(), (const double*)a[8].data(),
            (unsigned long long*)a[9].data(), (real*)a[10].data(), (real*)a[11].data(),
            ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7], ints[8]);
    });
    for (int k = 9; k < 12; ++k) save(dir + "/a" + std::to_string(k) + ".out", a[k]);
}

int main(int argc, char** argv) {
    const std::string real = argv[1], pass = argv[2], dir = argv[3];
    if (real == "float" && pass == "1") run<float, false>(dir);
    else if (real == "float") run<float, true>(dir);
    else if (pass == "1") run<double, false>(dir);
    else run<double, true>(dir);
    return 0;
}
"""


def compile_emulator(folder: Path, source_text: str, timeout_s: int = 180) -> tuple[Path, Path]:
    """g++ -std=c++20 of one emulated translation unit (shim, kernels, HARNESS, main) into
    `folder`; skips when g++ has no C++20 <barrier>. Returns (binary, folder)."""
    source = folder / "emu.cpp"
    source.write_text(source_text)
    binary = folder / "emu"
    result = subprocess.run(
        [GXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unused-variable",
         "-o", str(binary), str(source)],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if result.returncode != 0 and "barrier" in result.stderr:
        pytest.skip("g++ without C++20 <barrier>")
    assert result.returncode == 0, result.stderr
    return binary, folder


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found")
    return compile_emulator(
        tmp_path_factory.mktemp("emu"), _SHIM + f'#include "{KERNEL}"\n' + HARNESS + _MAIN
    )


def _emulated_launch(binary: Path, folder: Path):
    def launch(loss_pass, dtype, grid_dims, threads, shared_bytes, args):
        arrays, ints = args[:12], args[12:]
        for k, array in enumerate(arrays):
            np.ascontiguousarray(array).tofile(folder / f"a{k}.bin")
        (folder / "launch.txt").write_text(
            " ".join(str(int(v)) for v in (*grid_dims, threads, shared_bytes, *ints))
        )
        real = "float" if np.dtype(dtype) == np.float32 else "double"
        result = subprocess.run(
            [str(binary), real, "2" if loss_pass else "1", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        for k in (9, 10, 11):
            out = np.fromfile(folder / f"a{k}.out", dtype=arrays[k].dtype)
            np.copyto(arrays[k], out.reshape(arrays[k].shape))

    return launch


def _emulated_chunk(emulator, params, grid, prepared, first, count, per_block=None):
    binary, folder = emulator
    dt = prepared.dtype
    table, uniforms = cupy_engine.random_inputs(
        params, grid, SEED, first, count, prepared.n_borrowers, dt
    )
    dev = cupy_engine.device_tables(params, grid, prepared, np)
    periods = cupy_engine.offtaker_periods_input(params, grid, prepared, SEED, first, table)
    return cupy_engine.run_passes(
        params,
        grid,
        prepared,
        dev,
        np.ascontiguousarray(np.asarray(table), dtype=dt),
        np.ascontiguousarray(np.asarray(uniforms), dtype=dt),
        True,
        np,
        _emulated_launch(binary, folder),
        per_block=per_block,
        offtaker_periods=None if periods is None else np.asarray(periods, np.int32),
    )


def _check_against_reference(
    emulator, params, grid, loans, dtype, threads, per_block, first=1000, count=23
):
    """The emulated kernel's losses and per-loan sums against reference.simulate_outcomes,
    scenario by scenario (float64 1e-9 relative, float32 1e-3 per scenario, 1e-4 in total)."""
    prepared = cupy_engine.prepare_loans_cupy(loans, dtype, threads=threads)
    assert prepared.n_pad % prepared.threads == 0
    losses, sums = _emulated_chunk(emulator, params, grid, prepared, first, count, per_block)
    scenarios = np.arange(first, first + count)
    expected = reference.simulate_outcomes(params, grid, loans, SEED, scenarios)
    want = expected.loss_usd.sum(axis=1)
    assert want.max() > 0
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    floor = rtol * max(float(np.mean(np.abs(want))), 1.0)
    np.testing.assert_allclose(losses, want, rtol=rtol if dtype == np.float64 else 1e-3, atol=floor)
    if dtype == np.float32:
        assert abs(losses.sum() / want.sum() - 1) < 1e-4
    if grid.mode == "sampled":
        np.testing.assert_array_equal(losses == 0, want == 0)
        np.testing.assert_array_equal(sums[1], expected.default_probability.sum(axis=0))
    for got, ref_sum in zip(
        sums,
        (expected.loss_usd, expected.default_probability, expected.defaulted_exposure_usd),
        strict=True,
    ):
        want_sum = ref_sum.sum(axis=0)
        np.testing.assert_allclose(got, want_sum, rtol=rtol * 10, atol=rtol * 10 * want_sum.max())


@pytest.mark.parametrize(
    ("mode", "copula", "discount", "dtype", "threads", "per_block"),
    [
        ("conditional", "gaussian", False, np.float64, 64, 5),  # 2 tiles, ragged last group
        ("sampled", "t", True, np.float64, 256, None),
        ("conditional", "t", True, np.float32, 32, 3),
    ],
)
def test_emulated_kernel_matches_reference(
    emulator, assumptions, mode, copula, discount, dtype, threads, per_block
):
    grid = assumptions.grid(mode)._replace(copula=copula, discount=discount)
    loans = loan_arrays(random_book(5, 45), assumptions)
    _check_against_reference(emulator, assumptions.params, grid, loans, dtype, threads, per_block)


def _v2_case(assumptions, case: str):
    """(params, loans) exercising one model-v2 mechanism beyond the defaults."""
    params = assumptions.params
    grid = assumptions.grid()
    loans = loan_arrays(random_book(5, 45), assumptions)
    if case == "today-anchor":  # LC^ref, CC^ref, RF^ref = today's (RF^ref != 1 at a balloon)
        loans = reference.with_pd_references(params, grid, loans, "today")
        assert np.any(loans.ln_refinancing_reference[loans.balloon_usd > 0] < 0)
    elif case == "fleet-edges":
        # F_g below N_g (the book sells alone), 0, N_g = 0 (nothing pledged in generation 2:
        # no volume, H = min(H_max, H0)) and a fleet far above the book.
        pledged = np.where(loans.generation == 2, 0.0, loans.collateral_share)
        loans = loans._replace(collateral_share=pledged)
        params = params._replace(financed_fleet_gpus=np.array([5000.0, 0.0, 4.0e5, 3.0e6]))
        loans = reference.with_pd_references(params, grid, loans)
    elif case == "income-and-cycle":  # another hashprice trend, independent credit shocks,
        params = params._replace(btc_hashprice_drift=0.15, credit_persistence=0.0)
        share = np.where(loans.other_income_usd_per_year > 0, 1.0, loans.other_income_btc_share)
        loans = loans._replace(other_income_btc_share=share)  # all-BTC other income
        loans = reference.with_pd_references(params, grid, loans)
    elif case == "strong-cycle":
        params = params._replace(credit_persistence=0.95)
    elif case == "offtakers":  # docs/spec.md §4a: three offtakers, one very likely to fail
        loans = loan_arrays(offtaker_book(5, 45), assumptions)
        assert loans.offtaker is not None
    else:
        raise AssertionError(case)
    return params, loans


@pytest.mark.parametrize(
    ("case", "mode", "dtype"),
    [
        ("today-anchor", "conditional", np.float64),
        ("today-anchor", "sampled", np.float64),
        ("fleet-edges", "conditional", np.float64),
        ("fleet-edges", "sampled", np.float64),
        ("income-and-cycle", "conditional", np.float32),
        ("strong-cycle", "sampled", np.float64),
        ("offtakers", "conditional", np.float64),
        ("offtakers", "sampled", np.float64),
        ("offtakers", "conditional", np.float32),
    ],
)
def test_emulated_kernel_matches_reference_model_v2(emulator, assumptions, case, mode, dtype):
    params, loans = _v2_case(assumptions, case)
    grid = assumptions.grid(mode)._replace(discount=mode == "sampled")
    _check_against_reference(emulator, params, grid, loans, dtype, 64, 4, first=300, count=17)


def test_emulated_losses_do_not_depend_on_the_chunk(emulator, assumptions):
    """Deterministic reductions: the same scenario gives the same bits in any chunk."""
    grid = assumptions.grid()
    loans = loan_arrays(random_book(3, 40), assumptions)
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float32, threads=64)
    whole, _ = _emulated_chunk(emulator, assumptions.params, grid, prepared, 0, 12, per_block=4)
    tail, _ = _emulated_chunk(emulator, assumptions.params, grid, prepared, 5, 7, per_block=2)
    np.testing.assert_array_equal(tail, whole[5:])


def test_layout_keeps_warps_single_generation(assumptions):
    loans = loan_arrays(random_book(9, 300), assumptions)
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float32)
    gen = prepared.generation.reshape(-1, 32)
    assert np.all(gen == gen[:, :1])
    real = prepared.order >= 0
    np.testing.assert_array_equal(
        prepared.generation[real], np.asarray(loans.generation)[prepared.order[real]]
    )
    np.testing.assert_array_equal(prepared.order[prepared.position], np.arange(300))
    assert prepared.n_pad % prepared.threads == 0 and prepared.threads == 256


# --------------------------------------------------------------------------- host side


def test_haircut_from_volume_matches_reference_liquidation_supply(assumptions):
    """The host-side haircut from fixed-point volumes against reference.liquidation_supply,
    with F_g below, at 0 and above N_g and a generation with nothing pledged (N_g = 0)."""
    loans = loan_arrays(random_book(5, 45), assumptions)
    loans = loans._replace(
        collateral_share=np.where(loans.generation == 3, 0.0, loans.collateral_share)
    )
    params = assumptions.params._replace(
        financed_fleet_gpus=np.array([5000.0, 0.0, 4.0e5, 1.0e6]), haircut_power=0.8
    )
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float64)
    for grid in (assumptions.grid("conditional"), assumptions.grid("sampled")):
        tables = cupy_engine.loan_tables(params, grid, prepared)
        rng = np.random.default_rng(3)
        n_scen, periods, g_count = 5, grid.periods, grid.n_generations
        pledged = loans.gpu_count * loans.collateral_share
        expected = rng.uniform(0, 0.05, (n_scen, periods, len(pledged))) * pledged
        if grid.mode == "sampled":
            dumped = (rng.uniform(size=expected.shape) < 0.05) * pledged
        else:
            dumped = expected
        volumes = [dumped, expected][: cupy_engine.volume_count(grid)]
        assert len(volumes) == (2 if grid.mode == "sampled" else 1)
        fixed = np.zeros((len(volumes), n_scen, periods, g_count), np.uint64)
        for v, per_loan in enumerate(volumes):
            for g in range(g_count):
                total = per_loan[..., loans.generation == g].sum(axis=-1)
                fixed[v, ..., g] = np.rint(total * tables.qscale[g]).astype(np.uint64)
        got = cupy_engine.haircut_from_volume(params, tables, fixed)
        assert got.shape == (n_scen, periods, g_count)
        for t in range(periods):
            supply = reference.liquidation_supply(params, grid, loans, dumped[:, t], expected[:, t])
            depth = params.market_depth_gpus_per_year * grid.dt_years
            want = np.minimum(
                params.haircut_max,
                params.haircut_base
                + params.haircut_slope * (supply / depth) ** params.haircut_power,
            )
            np.testing.assert_allclose(got[:, t], want, rtol=1e-12)
        np.testing.assert_array_equal(got[..., 3], params.haircut_base[3])  # N_g = 0


def test_loan_tables_fold_the_pd_references_into_the_hazard_base(assumptions):
    loans = loan_arrays(random_book(5, 45), assumptions)
    params, grid = assumptions.params, assumptions.grid()
    loans = reference.with_pd_references(params, grid, loans, "today")
    prepared = cupy_engine.prepare_loans_cupy(loans, np.float64)
    tables = cupy_engine.loan_tables(params, grid, prepared)
    assert tables.loan_real.shape[0] == 18 and tables.loan_period.shape[:2] == (4, grid.periods)
    base = tables.loan_period[3][:, prepared.position].T  # [N, T]
    dt = grid.dt_years
    threshold = ndtri(1.0 - (1.0 - loans.pd_annual) ** dt)
    want = (
        threshold[:, None]
        + params.beta_liquidity * loans.ln_liquidity_reference[:, 1:]
        + params.beta_collateral * loans.ln_collateral_reference[:, 1:]
    )
    t = np.arange(1, grid.periods + 1)
    at_refinancing = (t[None] == loans.maturity_period[:, None]) & (loans.balloon_usd[:, None] > 0)
    assert at_refinancing.any()
    want += np.where(
        at_refinancing, params.beta_refinancing * loans.ln_refinancing_reference[:, None], 0.0
    )
    np.testing.assert_allclose(base, want, rtol=1e-14, atol=1e-14)
    # other income: OI Δ (1 − b) in both income constants, OI Δ b on the BTC index
    income = loans.other_income_usd_per_year * dt
    share = loans.other_income_btc_share
    np.testing.assert_allclose(tables.loan_real[17][prepared.position], income * share)
    padding = prepared.order < 0
    assert np.all(tables.loan_period[3][:, padding] == 0) and np.all(
        tables.loan_int[2][padding] == 0
    )
    with pytest.raises(ValueError, match="PD references"):
        cupy_engine.loan_tables(
            params,
            grid,
            cupy_engine.prepare_loans_cupy(loans._replace(ln_liquidity_reference=None)),
        )
