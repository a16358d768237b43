"""`gpucredit bench`: throughput, scaling, memory and the roofline (README, Performance).

The unit of work is the loan-period (scenarios × loans × periods). The harness

1. checks correctness first: on a small book the JAX engine (float64 to 1e-9, float32 to
   1e-3) and, where a GPU has cupy, the CuPy kernel are compared with the NumPy reference
   scenario by scenario; nothing is timed if that fails;
2. runs every case in a fresh Python process (so each case's peak resident memory,
   `ru_maxrss`, is its own, and on a GPU its peak device memory too): a warm-up chunk is run
   and timed separately (compile time = first call − a steady call of the same shape), then
   the scenario chunks are timed one by one with the device synchronised (every backend's
   `run_chunk` returns host arrays); the median chunk time and the total are reported;
3. times the tail passes: the tail forward (losses at a set of scenario indices), the
   reverse-mode gradient of Σ c_j L(ω_j) w.r.t. every parameter (its cost as a multiple of
   that forward) and the per-loan contributions pass ([S_tail, N]);
4. times sampled against conditional mode in one process, chunk by chunk in turn ("modes"
   cases): on the default grid, and on one one-year period against the floor, a textbook
   one-factor Gaussian threshold simulation (`kernels.one_factor`: one normal per obligor and
   the systematic factor, loss = EAD × LGD on default), so that the ratios hold under
   whatever load the machine has;
5. fits the scaling exponents (time ∝ scenarios^a, ∝ loans^b) and shows the peak memory
   against the scenario count (flat: scenarios stream through in chunks);
6. places every throughput on a roofline: floating-point work and memory traffic per
   loan-period counted from the kernel (`KERNEL_COUNTS`) against the device's peak.

Results: `<out>/<device>.json` and `<out>/<device>.md` (device, versions, date).
Run `gpucredit bench [--quick] [--out DIR]` or `python -m gpucredit.benchmark`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

PERIODS_NOTE = "loan-periods = scenarios × loans × periods (12 quarters with the defaults)"

# --------------------------------------------------------------------------- the kernel's work

# Operations per loan-period of one pass, counted from jax_step._revalue_block's `step`
# (conditional mode, G = 4 generations; CuPy's forward.cu does the same arithmetic). A fused
# multiply-add counts 2, a compare/select/min/max 1, a division 1 (listed apart: it is slower).
KERNEL_COUNTS = {
    "pass1": {
        "generation selects (rent, ln P)": 6,
        "NOI, debt service, crypto (FMAs)": 9,
        "ln LC: sum, guard, clip": 7,
        "ln CC, ln RF, refinancing": 11,
        "hazard argument x (FMAs, scale)": 9,
        "erfc polynomial, |x|, select": 26,
        "hazard, survival, default": 5,
        "cash carry": 3,
        "volume Q_g += d n a (G FMAs)": 8,
        "divisions": 2,  # coverage ratio, erfc's t
        "transcendentals": 2,  # one log (ln LC), one exp (erfc)
    },
    "pass2": {
        "generation selects (rent, ln P, salvage)": 9,
        "NOI, debt service, crypto (FMAs)": 9,
        "ln LC: sum, guard, clip": 7,
        "ln CC, ln RF, refinancing": 11,
        "hazard argument x (FMAs, scale)": 9,
        "erfc polynomial, |x|, select": 26,
        "hazard, survival, default": 5,
        "cash carry": 3,
        "recovery, exposure, LGD, loss, defaulted exposure": 13,
        "divisions": 2,
        "transcendentals": 2,
    },
}
# A transcendental (exp, log) costs about this many FP operations in the vectorised math
# libraries (XLA's polynomial expansions, CUDA's __expf/__logf are cheaper, erfc dearer).
TRANSCENDENTAL_FLOPS = 15
DIVISION_FLOPS = 4
# Memory traffic per loan-period of the JAX engine as XLA runs it: the per-period [S, b]
# temporaries a fusion writes and the next reads (pass 1 keeps 6 arrays, pass 2 7, each written
# once and read about twice; `bench/hlo_profile.py` lists them), 4 bytes each in float32. An
# ideal fused kernel (forward.cu) keeps the loan's state in registers and reads only the
# per-loan terms, amortised over the scenarios: ~0 bytes of DRAM traffic per loan-period, so
# it is compute-bound.
XLA_TEMPORARIES_PER_PERIOD = {"pass1": 6, "pass2": 7}


def flops_per_loan_period() -> dict:
    """FP work of one loan-period of the forward run (both passes), as counted above."""
    out = {}
    total = 0.0
    for name, counts in KERNEL_COUNTS.items():
        plain = sum(v for k, v in counts.items() if k not in ("divisions", "transcendentals"))
        work = (
            plain
            + DIVISION_FLOPS * counts["divisions"]
            + TRANSCENDENTAL_FLOPS * counts["transcendentals"]
        )
        out[name] = work
        total += work
    out["total"] = total
    return out


def bytes_per_loan_period(itemsize: int = 4) -> dict:
    """Memory traffic of one loan-period: XLA's materialised temporaries vs a fused kernel."""
    xla = sum(3 * n * itemsize for n in XLA_TEMPORARIES_PER_PERIOD.values())
    return {"xla_temporaries": xla, "fused_kernel": 0}


# --------------------------------------------------------------------------- the device's peak

# Nominal peaks (dense, non-tensor-core FP32/FP64, HBM bandwidth) by product name.
GPU_PEAKS = (  # (name contains, fp32 FLOP/s, fp64 FLOP/s, bytes/s)
    ("H100 PCIe", 51.2e12, 25.6e12, 2.0e12),
    ("H100 NVL", 60.0e12, 30.0e12, 3.9e12),
    ("H100", 66.9e12, 33.5e12, 3.35e12),
    ("H200", 66.9e12, 33.5e12, 4.8e12),
    ("GH200", 66.9e12, 33.5e12, 4.0e12),
    ("B200", 80.0e12, 40.0e12, 8.0e12),
    ("A100", 19.5e12, 9.7e12, 2.0e12),
    ("L40S", 91.6e12, 1.4e12, 0.864e12),
    ("L4", 30.3e12, 0.47e12, 0.3e12),
    ("A10", 31.2e12, 0.98e12, 0.6e12),
    ("T4", 8.1e12, 0.25e12, 0.32e12),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak() -> dict:
    """Estimated peak FP32/FP64 FLOP/s of this CPU: cores × clock × FLOP per cycle.

    FLOP per cycle from the ISA: AVX-512 on AMD (Zen 4 runs it on two 256-bit FMA pipes) and
    AVX2+FMA: 32 FP32 (16 FP64); AVX-512 on Intel server cores (two 512-bit FMA ports): 64.
    The clock is the nominal one in /proc/cpuinfo. An estimate, stated as one.
    """
    flags, mhz, vendor = set(), None, ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
            elif line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
    except OSError:
        pass
    cores = os.cpu_count() or 1
    if "avx512f" in flags and vendor == "GenuineIntel":
        per_cycle = 64
    elif "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 16
    ghz = (mhz or 2500.0) / 1000.0
    fp32 = cores * ghz * 1e9 * per_cycle
    return {
        "fp32_flops": fp32,
        "fp64_flops": fp32 / 2,
        "fp32_flops_per_core": fp32 / cores,
        "cores": cores,
        "clock_ghz": ghz,
        "flops_per_cycle_fp32": per_cycle,
        "source": "estimate: cores × clock × FLOP/cycle from the ISA",
    }


def measured_cpu_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second of a large NumPy copy (read + write), best of 3."""
    a = np.ones(megabytes * (1 << 20) // 8)
    b = np.empty_like(a)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def gpu_peak(name: str, cupy_props: dict | None = None) -> dict | None:
    for key, fp32, fp64, bw in GPU_PEAKS:
        if key.lower() in name.lower():
            return {
                "fp32_flops": fp32,
                "fp64_flops": fp64,
                "bytes_per_s": bw,
                "source": f"nominal ({key})",
            }
    if cupy_props:  # SMs × clock × 128 FP32 lanes × 2 (FMA); 2 × memory clock × bus width
        fp32 = cupy_props["sms"] * cupy_props["clock_hz"] * 128 * 2
        bw = 2 * cupy_props["memory_clock_hz"] * cupy_props["bus_bits"] / 8
        return {"fp32_flops": fp32, "fp64_flops": fp32 / 64, "bytes_per_s": bw, "source": "cupy"}
    return None


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark, run in its own process.

    kind: "forward" (pass 1 over `scenarios` in chunks of `chunk`), "gradient" (tail
    forward and reverse-mode gradient on `scenarios` tail indices), "contributions"
    (per-loan losses [scenarios, loans] at tail indices) or "modes" (conditional and sampled
    mode, chunk by chunk in turn in one process; with periods = 1 also the one-factor floor).
    periods: 0 for the assumptions' grid (12 quarters), 1 for one one-year period.
    """

    kind: str
    backend: str  # numpy | jax | cupy
    precision: str  # float32 | float64
    mode: str  # conditional | sampled
    loans: int
    scenarios: int
    chunk: int
    groups: tuple[str, ...] = ()  # throughput | scaling-scenarios | scaling-loans | target
    periods: int = 0  # 0: the assumptions' grid; 1: one one-year period

    @property
    def label(self) -> str:
        prec = "" if self.backend == "numpy" else f" {self.precision}"
        grid = " 1 period" if self.periods == 1 else ""
        return (
            f"{self.kind} {self.backend}{prec} {self.mode}{grid} {self.loans:,}×{self.scenarios:,}"
        )


@dataclass(frozen=True)
class Plan:
    name: str
    cases: tuple[Case, ...]
    check_loans: int = 200
    check_scenarios: int = 64
    case_timeout_s: float = 600.0
    budget_s: float = 600.0
    extras: dict = field(default_factory=dict)


def _f(kind, backend, precision, mode, loans, scenarios, chunk, *groups) -> Case:
    return Case(kind, backend, precision, mode, loans, scenarios, chunk, tuple(groups))


def _modes(loans, scenarios, chunk, periods=0, precision="float32") -> Case:
    """Conditional vs sampled mode (and, on one period, the floor) in one process."""
    return Case("modes", "jax", precision, "both", loans, scenarios, chunk, ("modes",), periods)


def cpu_plan(quick: bool) -> Plan:
    """What this CPU can do in ~1 minute (quick) or ~10 minutes."""
    c, s = "conditional", "sampled"
    if quick:
        cases = (
            _f("forward", "numpy", "float64", c, 1000, 512, 256, "throughput", "target"),
            _f("forward", "jax", "float32", c, 1000, 8192, 4096, "throughput", "target"),
            _f("gradient", "jax", "float32", c, 1000, 256, 256, "tail"),
            _modes(36000, 1024, 512, periods=1),
        )
        return Plan("cpu-quick", cases, check_loans=60, check_scenarios=32, budget_s=90)
    cases = (
        _f("forward", "numpy", "float64", c, 1000, 1024, 256, "throughput"),
        _f("forward", "numpy", "float64", c, 10000, 512, 256, "throughput", "target"),
        _f("forward", "jax", "float32", c, 1000, 16384, 4096, "throughput", "scaling-loans"),
        _f("forward", "jax", "float32", c, 10000, 16384, 4096, "throughput", "target"),
        _f("forward", "jax", "float32", c, 100000, 4096, 4096, "throughput", "scaling-loans"),
        _f("forward", "jax", "float32", c, 3000, 4096, 4096, "scaling-loans"),
        _f("forward", "jax", "float32", c, 10000, 4096, 4096, "scaling-loans"),
        _f("forward", "jax", "float32", c, 30000, 4096, 4096, "scaling-loans"),
        _f("forward", "jax", "float32", c, 1000, 4096, 4096, "scaling-scenarios", "scaling-loans"),
        _f("forward", "jax", "float32", c, 1000, 65536, 4096, "scaling-scenarios"),
        _f("forward", "jax", "float32", c, 1000, 262144, 4096, "scaling-scenarios"),
        _f("forward", "jax", "float32", s, 10000, 8192, 4096, "throughput"),
        _f("forward", "jax", "float64", c, 1000, 8192, 4096, "throughput"),
        _f("forward", "jax", "float64", c, 10000, 4096, 4096, "throughput"),
        _f("gradient", "jax", "float32", c, 10000, 512, 512, "tail"),
        _f("contributions", "jax", "float32", c, 10000, 512, 512, "tail"),
        _modes(36000, 16384, 4096, periods=1),
        _modes(10000, 16384, 4096),
    )
    return Plan("cpu", cases, budget_s=1000)


def targets_plan() -> Plan:
    """Issue 18's targets on this CPU, one run: JAX float32 conditional on the 10,000-loan book
    (and the NumPy reference in the same run), one-period and 12-period sampled vs conditional,
    the one-period floor (`python -m gpucredit.benchmark --targets`)."""
    c = "conditional"
    cases = (
        _f("forward", "numpy", "float64", c, 10000, 512, 256, "throughput", "target"),
        _f("forward", "jax", "float32", c, 10000, 16384, 4096, "throughput", "target"),
        _modes(36000, 16384, 4096, periods=1),
        _modes(10000, 16384, 4096),
        _f("forward", "jax", "float32", c, 1000, 4096, 4096, "scaling-scenarios"),
        _f("forward", "jax", "float32", c, 1000, 65536, 4096, "scaling-scenarios"),
    )
    return Plan("cpu-targets", cases, budget_s=900)


def gpu_plan(quick: bool, cupy: bool) -> Plan:
    """The GPU run (bench/gpu_check.sh), most important first (the budget drops the tail):
    the 1,000,000 × 10,000 × 12 target, the tail gradient, the reference baseline, CuPy,
    then scaling, sampled mode and float64."""
    c, s = "conditional", "sampled"
    m = 1_000_000
    if quick:
        cases = (
            _f("forward", "numpy", "float64", c, 1000, 256, 256, "throughput", "target"),
            _f("forward", "jax", "float32", c, 1000, 200_000, 100_000, "throughput", "target"),
            _f("gradient", "jax", "float32", c, 1000, 4096, 4096, "tail"),
        )
        return Plan("gpu-quick", cases, case_timeout_s=120, budget_s=120)
    cases = [
        _f("forward", "jax", "float32", c, 10000, m, 100_000, "throughput", "target",
           "scaling-scenarios", "scaling-loans"),
        _f("gradient", "jax", "float32", c, 10000, 10_000, 10_000, "tail", "target"),
        _f("forward", "numpy", "float64", c, 10000, 256, 256, "throughput", "target"),
    ]  # fmt: skip
    if cupy:
        cases.append(_f("forward", "cupy", "float32", c, 10000, m, 125_000, "throughput"))
    cases += [
        _f("forward", "jax", "float32", c, 10000, 100_000, 100_000, "scaling-scenarios"),
        _f("forward", "jax", "float32", c, 10000, 300_000, 100_000, "scaling-scenarios"),
        _f("forward", "jax", "float32", c, 1000, m, 100_000, "throughput", "scaling-loans"),
        _f("forward", "jax", "float32", c, 100000, 100_000, 25_000, "throughput", "scaling-loans"),
        _f("contributions", "jax", "float32", c, 10000, 10_000, 10_000, "tail"),
        _f("forward", "jax", "float32", s, 10000, 300_000, 100_000, "throughput"),
        _modes(36000, 200_000, 100_000, periods=1),
        _f("forward", "jax", "float64", c, 10000, 100_000, 50_000, "throughput"),
    ]
    if cupy:
        cases += [
            _f("forward", "cupy", "float32", c, 100000, 100_000, 25_000, "throughput"),
            _f("forward", "cupy", "float64", c, 10000, 100_000, 50_000, "throughput"),
        ]
    return Plan("gpu", tuple(cases), case_timeout_s=150, budget_s=280)


# --------------------------------------------------------------------------- inside a case


def _book_path(book_dir: Path, loans: int) -> Path:
    return Path(book_dir) / f"book-{loans}.parquet"


def ensure_books(book_dir: Path, sizes) -> None:
    """Synthetic books (make_book, seed 1) for every size, written once."""
    from gpucredit.io.book import write_book
    from gpucredit.portfolio.makebook import make_book

    for n in sorted(set(sizes)):
        path = _book_path(book_dir, n)
        if not path.exists():
            write_book(make_book(n, 1), path)


def _load(book_dir: Path, loans: int, periods: int = 0):
    """(assumptions, LoanArrays) of the book; periods = 1: one one-year period."""
    import dataclasses

    from gpucredit.io.assumptions import default_assumptions
    from gpucredit.io.book import read_book
    from gpucredit.portfolio.loans import loan_arrays

    assumptions = default_assumptions()
    if periods == 1:
        assumptions = dataclasses.replace(assumptions, horizon_years=1.0, steps_per_year=1)
    book = read_book(_book_path(book_dir, loans), assumptions)
    return assumptions, loan_arrays(book, assumptions)


def _make_backend(name, precision, params, grid, loans, seed):
    """One backend on one device (`backends.make_backend` would shard JAX over every local GPU:
    the benchmark measures a single device)."""
    if name == "cupy":
        from gpucredit.portfolio.backends import CupyBackend

        return CupyBackend(params, grid, loans, seed, precision)
    from gpucredit.portfolio.backends import JaxBackend, NumpyBackend

    if name == "numpy":
        return NumpyBackend(params, grid, loans, seed)
    return JaxBackend(params, grid, loans, seed, precision)


def _sync(x):
    """Block until device work behind x is done (host arrays are already done)."""
    try:
        import jax

        jax.block_until_ready(x)
    except ImportError:  # pragma: no cover
        pass
    return x


def _peak_memory() -> dict:
    """Peak resident memory of this process (and of the JAX GPU device, if one was used)."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if "jax" in sys.modules:
        try:
            import jax

            device = jax.devices()[0]
            stats = device.memory_stats() if device.platform != "cpu" else None
            if stats and "peak_bytes_in_use" in stats:
                out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
        except Exception:
            pass
    if "cupy" in sys.modules:
        try:
            import cupy

            pool = cupy.get_default_memory_pool()
            out["cupy_pool_mib"] = pool.total_bytes() / 2**20
        except Exception:
            pass
    return out


SEED = 20260101


def run_case(case: Case, book_dir: Path) -> dict:
    """Time one case in this process; return a JSON-ready dict."""
    assumptions, loans = _load(book_dir, case.loans, case.periods)
    if case.kind == "modes":
        out = {"case": asdict(case), "label": case.label, "load_average_before": _load_average()}
        out.update(_time_modes(case, assumptions, loans))
        out.update(_peak_memory())
        out["load_average_after"] = _load_average()
        return out
    grid = assumptions.grid(case.mode)
    periods = grid.periods
    backend = _make_backend(case.backend, case.precision, assumptions.params, grid, loans, SEED)
    out = {"case": asdict(case), "label": case.label, "periods": periods}
    out["device"] = getattr(backend, "device", case.backend)
    out["load_average_before"] = _load_average()
    if case.kind == "forward":
        out.update(_time_forward(backend, case, periods))
    elif case.kind == "gradient":
        out.update(_time_gradient(backend, case, periods, assumptions, loans, grid))
    elif case.kind == "contributions":
        out.update(_time_contributions(backend, case, periods))
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    out.update(_peak_memory())
    out["load_average_after"] = _load_average()
    return out


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# Loss given default of the floor's obligors (Basel IRB foundation, senior unsecured): the
# floor's cost does not depend on it.
FLOOR_LGD = 0.45


def _time_modes(case: Case, assumptions, loans) -> dict:
    """Conditional and sampled mode (and on one period the one-factor floor) on the same book,
    chunk k of each in turn, so that a change in the machine's load hits all of them alike.
    Throughputs from the median chunk; ratios of those."""
    from gpucredit.kernels import one_factor

    periods = assumptions.periods
    chunk = min(case.chunk, case.scenarios)
    runs = {}
    for mode in ("conditional", "sampled"):
        backend = _make_backend(
            "jax", case.precision, assumptions.params, assumptions.grid(mode), loans, SEED
        )
        runs[mode] = backend.run_chunk
    if periods == 1:
        pd = np.asarray(loans.pd_annual)
        exposure = np.asarray(loans.balance_usd)[:, 0]
        book = one_factor.prepare_one_factor(
            pd, loans.asset_correlation, FLOOR_LGD * exposure, case.precision
        )
        runs["floor"] = lambda first, count: np.asarray(
            one_factor.one_factor_losses(book, SEED, first, count)
        )
    compile_seconds, times = {}, {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: compile and one chunk past the timed ones
        t = time.perf_counter()
        _sync(run(case.scenarios, chunk))
        compile_seconds[name] = time.perf_counter() - t
    n_chunks = max(3, -(-case.scenarios // chunk))
    for k in range(n_chunks):
        for name, run in runs.items():
            t = time.perf_counter()
            _sync(run(k * chunk, chunk))
            times[name].append(time.perf_counter() - t)
    work = chunk * case.loans * periods
    rates = {name: work / float(np.median(ts)) for name, ts in times.items()}
    for name in runs:  # compile time = first call − a steady chunk
        compile_seconds[name] = max(compile_seconds[name] - float(np.median(times[name])), 0.0)
    ratios = {"sampled_over_conditional": rates["sampled"] / rates["conditional"]}
    if "floor" in rates:
        ratios["conditional_over_floor"] = rates["conditional"] / rates["floor"]
        ratios["sampled_over_floor"] = rates["sampled"] / rates["floor"]
    return {
        "periods": periods,
        "chunk": chunk,
        "chunks": n_chunks,
        "chunk_seconds": times,
        "rates": rates,
        "ratios": ratios,
        "compile_seconds_by_run": compile_seconds,
        # the table's columns: the sampled run's
        "loan_periods_per_s": rates["sampled"],
        "seconds": float(sum(sum(ts) for ts in times.values())),
        "compile_seconds": compile_seconds["sampled"],
        "loan_periods": n_chunks * work,
    }


def _time_forward(backend, case: Case, periods: int) -> dict:
    chunk = min(case.chunk, case.scenarios)
    n_chunks = -(-case.scenarios // chunk)
    # Warm-up: the first call compiles (JAX, CuPy) and runs one chunk, with scenario indices
    # past the timed ones; compile time = that call − the median timed chunk of the same
    # shape. (NumPy compiles nothing: a small warm-up chunk, and no compile time.)
    warm_first = case.scenarios
    t = time.perf_counter()
    _sync(backend.run_chunk(warm_first, min(chunk, 16) if case.backend == "numpy" else chunk))
    first = time.perf_counter() - t
    times = []
    for k in range(n_chunks):
        start = k * chunk
        count = min(chunk, case.scenarios - start)
        t = time.perf_counter()
        _sync(backend.run_chunk(start, count))
        times.append(time.perf_counter() - t)
    total = float(sum(times))
    median = float(np.median(times))
    loan_periods = case.scenarios * case.loans * periods
    return {
        "seconds": total,
        "chunk_seconds_median": median,
        "chunks": n_chunks,
        "chunk": chunk,
        "compile_seconds": 0.0 if case.backend == "numpy" else max(first - median, 0.0),
        "loan_periods": loan_periods,
        # throughput from the median chunk (the "median of repeats"), and from the total
        "loan_periods_per_s": chunk * case.loans * periods / median,
        "loan_periods_per_s_total": loan_periods / total,
    }


def _tail_indices(count: int) -> np.ndarray:
    """`count` scenario indices spread over a 100× larger run (any indices cost the same)."""
    return (np.arange(count, dtype=np.uint64) * 97 + 13).astype(np.uint32)


def _repeat(fn, min_repeats: int = 3, min_seconds: float = 2.0) -> tuple[float, float, int]:
    """(first call seconds, median of the following calls, repeats)."""
    t = time.perf_counter()
    _sync(fn())
    first = time.perf_counter() - t
    times = []
    while len(times) < min_repeats or (sum(times) < min_seconds and len(times) < 20):
        t = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t)
    return first, float(np.median(times)), len(times)


def _time_gradient(backend, case: Case, periods: int, assumptions, loans, grid) -> dict:
    from gpucredit.kernels import jax_engine

    blocks = backend.blocks if hasattr(backend, "blocks") else backend._jax_blocks()
    indices = _tail_indices(case.scenarios)
    coefficients = np.full(case.scenarios, 1.0 / case.scenarios)
    params = assumptions.params
    fwd_first, fwd, fwd_n = _repeat(
        lambda: jax_engine.losses_at(params, grid, blocks, SEED, indices)
    )
    # What a run computes (JaxBackend.weighted_gradient): every parameter, ∂/∂rate.level
    # through the floating schedules included (their tangent is built in the first call).
    grad_first, grad, grad_n = _repeat(lambda: backend.weighted_gradient(indices, coefficients))
    n_params = int(sum(np.size(leaf) for leaf in params))
    loan_periods = case.scenarios * case.loans * periods
    return {
        "tail_forward_seconds": fwd,
        "tail_forward_compile_seconds": max(fwd_first - fwd, 0.0),
        "seconds": grad,
        "compile_seconds": max(grad_first - grad, 0.0),
        "repeats": grad_n,
        "gradient_over_forward": grad / fwd,
        "parameters": n_params,
        "loan_periods": loan_periods,
        "loan_periods_per_s": loan_periods / grad,
        "tail_forward_loan_periods_per_s": loan_periods / fwd,
    }


def _time_contributions(backend, case: Case, periods: int) -> dict:
    indices = _tail_indices(case.scenarios)
    first, median, n = _repeat(lambda: backend.loan_losses_at(indices))
    loan_periods = case.scenarios * case.loans * periods
    return {
        "seconds": median,
        "compile_seconds": max(first - median, 0.0),
        "repeats": n,
        "loan_periods": loan_periods,
        "loan_periods_per_s": loan_periods / median,
    }


# --------------------------------------------------------------------------- correctness check


def run_check(book_dir: Path, loans: int, scenarios: int, cupy: bool) -> dict:
    """Every timed backend against the NumPy reference on the same scenarios (per scenario)."""
    from gpucredit.kernels import reference

    assumptions, arrays = _load(book_dir, loans)
    out = {"loans": loans, "scenarios": scenarios, "results": []}
    indices = np.arange(scenarios, dtype=np.uint32)
    for mode in ("conditional", "sampled"):
        grid = assumptions.grid(mode)
        want = reference.simulate_chunk(assumptions.params, grid, arrays, SEED, indices).sum(1)
        combos = [("jax", "float64", 1e-9), ("jax", "float32", 1e-3)]
        if cupy:
            combos += [("cupy", "float64", 1e-9), ("cupy", "float32", 1e-3)]
        for name, precision, rtol in combos:
            backend = _make_backend(name, precision, assumptions.params, grid, arrays, SEED)
            got = np.asarray(backend.run_chunk(0, scenarios).losses_usd, dtype=np.float64)
            scale = max(float(np.mean(np.abs(want))), 1.0)
            if precision == "float32" and mode == "sampled":
                # a float32 survival can cross a uniform on the other side of float64's:
                # compare the scenario mean only (per-scenario identity is float64's test)
                err = abs(got.mean() - want.mean()) / scale
                rtol = 2e-2
            else:
                err = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), scale)))
            out["results"].append(
                {
                    "backend": name,
                    "precision": precision,
                    "mode": mode,
                    "max_relative_error": err,
                    "tolerance": rtol,
                    "ok": bool(err <= rtol),
                }
            )
    out["ok"] = all(r["ok"] for r in out["results"])
    out["environment"] = environment()
    return out


def environment() -> dict:
    """Device, versions and date (called inside a case process, where JAX is loaded)."""
    import jax

    import gpucredit

    device = jax.devices()[0]
    env = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpucredit": gpucredit.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jax_platform": device.platform,
        "jax_device": getattr(device, "device_kind", str(device)),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host": platform.node(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            env["gpu_props"] = {
                "sms": int(props["multiProcessorCount"]),
                "clock_hz": float(props["clockRate"]) * 1e3,
                "memory_clock_hz": float(props.get("memoryClockRate", 0)) * 1e3,
                "bus_bits": int(props.get("memoryBusWidth", 0)),
            }
    except Exception:
        pass
    if device.platform == "gpu" and "gpu" not in env:
        env["gpu"] = getattr(device, "device_kind", "gpu")
    if device.platform == "cpu":
        env["cpu_bandwidth_bytes_per_s"] = measured_cpu_bandwidth()
    return env


def _child_main(argv: list[str]) -> int:
    """`python -m gpucredit.benchmark --child KIND JSON BOOK_DIR`: one case, JSON on stdout."""
    kind, payload, book_dir = argv[0], json.loads(argv[1]), Path(argv[2])
    if kind == "check":
        result = run_check(book_dir, payload["loans"], payload["scenarios"], payload["cupy"])
    else:
        payload["groups"] = tuple(payload.get("groups", ()))
        result = run_case(Case(**payload), book_dir)
    print("@@RESULT@@" + json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the parent


def _run_child(args: list[str], timeout: float, env: dict) -> dict:
    cmd = [sys.executable, "-m", "gpucredit.benchmark", "--child", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit status {proc.returncode}: " + " | ".join(tail)}


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # so peak memory is real use
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cupy_available() -> bool:
    try:
        from gpucredit.kernels import cupy_engine

        return cupy_engine.available()
    except Exception:
        return False


def _gpu_present() -> bool:
    if _cupy_available():
        return True
    try:  # without cupy, ask nvidia-smi rather than start JAX in this process
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two distinct x)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs.tolist())) < 2:
        return None
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def analyse(results: list[dict], env: dict, plan: Plan) -> dict:
    """Ratios, scaling fits, memory vs scenarios and the roofline."""
    ok = [r for r in results if "error" not in r]
    fwd = [r for r in ok if r["case"]["kind"] == "forward"]
    summary: dict = {}

    def rate(backend, precision, mode, loans):
        rs = [
            r
            for r in fwd
            if (r["case"]["backend"], r["case"]["precision"], r["case"]["mode"], r["case"]["loans"])
            == (backend, precision, mode, loans)
        ]
        # the plan's "target" case where there is one (not the best of several)
        rs = [r for r in rs if "target" in r["case"]["groups"]] or rs
        return max((r["loan_periods_per_s"] for r in rs), default=None)

    # speed-up over the reference on the 10,000-loan book (else the largest both ran)
    both = {r["case"]["loans"] for r in fwd if r["case"]["backend"] == "numpy"} & {
        r["case"]["loans"] for r in fwd if r["case"]["backend"] == "jax"
    }
    for loans in sorted(both, key=lambda n: (n != 10000, -n)):
        numpy_rate = rate("numpy", "float64", "conditional", loans)
        jax_rate = rate("jax", "float32", "conditional", loans)
        if numpy_rate and jax_rate:
            summary["speedup_jax_float32_over_numpy"] = {
                "loans": loans,
                "numpy_loan_periods_per_s": numpy_rate,
                "jax_float32_loan_periods_per_s": jax_rate,
                "ratio": jax_rate / numpy_rate,
                "target": 8.0,
                "met": jax_rate / numpy_rate >= 8.0,
            }
            cupy_rate = rate("cupy", "float32", "conditional", loans)
            if cupy_rate:
                summary["speedup_cupy_float32_over_numpy"] = cupy_rate / numpy_rate
            break

    # scaling: time against scenarios (fixed loans) and against loans (fixed scenarios)
    scaling = {}
    sc = [r for r in fwd if "scaling-scenarios" in r["case"]["groups"]]
    if sc:
        loans = max(
            {r["case"]["loans"] for r in sc}, key=lambda n: sum(r["case"]["loans"] == n for r in sc)
        )
        sc = sorted(
            (r for r in sc if r["case"]["loans"] == loans), key=lambda r: r["case"]["scenarios"]
        )
        xs = [r["case"]["scenarios"] for r in sc]
        scaling["scenarios"] = {
            "loans": loans,
            "scenarios": xs,
            "seconds": [r["seconds"] for r in sc],
            "exponent": fit_exponent(xs, [r["seconds"] for r in sc]),
            "peak_rss_mib": [r["peak_rss_mib"] for r in sc],
            "peak_device_mib": [r.get("peak_device_mib") for r in sc],
            "memory_growth": max(r["peak_rss_mib"] for r in sc)
            / min(r["peak_rss_mib"] for r in sc),
        }
    sl = [r for r in fwd if "scaling-loans" in r["case"]["groups"]]
    if sl:
        # time per scenario, so cases with different scenario counts line up
        sl = sorted(sl, key=lambda r: r["case"]["loans"])
        xs = [r["case"]["loans"] for r in sl]
        per = [r["seconds"] / r["case"]["scenarios"] for r in sl]
        scaling["loans"] = {
            "loans": xs,
            "seconds_per_scenario": per,
            "exponent": fit_exponent(xs, per),
        }
    summary["scaling"] = scaling

    # the GPU target: 1,000,000 scenarios × 10,000 loans × 12 periods forward in < 5 s
    big = [r for r in fwd if r["case"]["loans"] == 10000 and r["case"]["scenarios"] >= 1_000_000]
    if big:
        summary["forward_1m_x_10k"] = {
            f"{r['case']['backend']} {r['case']['precision']} {r['case']['mode']}": {
                "seconds": r["seconds"],
                "target_seconds": 5.0,
                "met": r["seconds"] < 5.0,
            }
            for r in big
        }

    # sampled vs conditional mode (and the one-period floor), each measured in one process
    modes = [r for r in ok if r["case"]["kind"] == "modes"]
    if modes:
        summary["modes"] = [
            {
                "loans": r["case"]["loans"],
                "periods": r["periods"],
                "scenarios": r["case"]["scenarios"],
                "precision": r["case"]["precision"],
                "loan_periods_per_s": r["rates"],
                **r["ratios"],
                # issue 18: one period >= 0.8x conditional, the default grid >= 1x
                "target_sampled_over_conditional": 0.8 if r["periods"] == 1 else 1.0,
                "met": r["ratios"]["sampled_over_conditional"]
                >= (0.8 if r["periods"] == 1 else 1.0),
                "load_average": [r.get("load_average_before"), r.get("load_average_after")],
            }
            for r in modes
        ]

    grads = [r for r in ok if r["case"]["kind"] == "gradient"]
    if grads:
        g = max(grads, key=lambda r: r["loan_periods"])
        summary["tail_gradient"] = {
            "loans": g["case"]["loans"],
            "tail_scenarios": g["case"]["scenarios"],
            "gradient_seconds": g["seconds"],
            "tail_forward_seconds": g["tail_forward_seconds"],
            "gradient_over_forward": g["gradient_over_forward"],
            "parameters": g["parameters"],
            "target": 3.0,
        }

    # roofline
    flops = flops_per_loan_period()
    traffic = bytes_per_loan_period()
    if env.get("jax_platform") == "cpu":
        peak = cpu_peak()
        peak["bytes_per_s"] = env.get("cpu_bandwidth_bytes_per_s")
        peak["bandwidth_source"] = "measured: NumPy copy of 256 MiB"
    else:
        peak = gpu_peak(env.get("gpu", env.get("jax_device", "")), env.get("gpu_props")) or {}
    roof = {"flops_per_loan_period": flops, "bytes_per_loan_period": traffic, "peak": peak}
    if peak.get("fp32_flops"):
        roof["compute_roof_loan_periods_per_s"] = {
            "float32": peak["fp32_flops"] / flops["total"],
            "float64": peak["fp64_flops"] / flops["total"],
        }
        if peak.get("bytes_per_s"):
            roof["xla_memory_roof_loan_periods_per_s"] = (
                peak["bytes_per_s"] / traffic["xla_temporaries"]
            )
        for r in fwd:
            if r["case"]["backend"] == "numpy":
                key = "float64"
            else:
                key = r["case"]["precision"]
            r["roofline_fraction"] = (
                r["loan_periods_per_s"] / roof["compute_roof_loan_periods_per_s"][key]
            )
            r["achieved_flops"] = r["loan_periods_per_s"] * flops["total"]
    summary["roofline"] = roof
    return summary


def run_benchmarks(
    quick: bool = False,
    out_dir: str | os.PathLike = "bench/results",
    name: str | None = None,
    book_dir: str | os.PathLike | None = None,
    plan: Plan | None = None,
    echo=print,
    budget_s: float | None = None,
) -> dict:
    """Check, then time every case of the plan (CPU or GPU, chosen from the machine), and
    write `<out_dir>/<name>.json` and `.md` (rewritten after every case, so a run cut short
    still leaves what it measured). `budget_s` replaces the plan's budget (and caps each
    case's timeout). Returns the report. Raises RuntimeError if the correctness check fails
    (nothing is timed then)."""
    started = time.perf_counter()
    gpu = _gpu_present()
    cupy = gpu and _cupy_available()
    plan = plan or (gpu_plan(quick, cupy) if gpu else cpu_plan(quick))
    if budget_s is not None:  # later cases are skipped past it; none runs longer
        plan = replace(plan, budget_s=budget_s, case_timeout_s=min(plan.case_timeout_s, budget_s))
    env = _child_env()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if book_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gpucredit-bench-")
        book_dir = tmp.name
    book_dir = Path(book_dir)
    book_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    def write(results: list[dict], check: dict, final: bool) -> None:
        environment_info = check["environment"]
        report.clear()
        report.update(
            name=name or _device_slug(environment_info, plan),
            plan=plan.name,
            quick=quick,
            complete=final,
            environment=environment_info,
            check={k: v for k, v in check.items() if k != "environment"},
            cases=results,
            summary=analyse(results, environment_info, plan),
            note=PERIODS_NOTE,
            wall_seconds=time.perf_counter() - started,
        )
        stem = out / report["name"]
        text = json.dumps(report, indent=1, default=_json_default) + "\n"
        Path(f"{stem}.json.tmp").write_text(text)
        os.replace(f"{stem}.json.tmp", f"{stem}.json")
        Path(f"{stem}.md").write_text(markdown(report))

    try:
        sizes = sorted({c.loans for c in plan.cases} | {plan.check_loans})
        echo(f"books: {', '.join(f'{n:,}' for n in sizes)} loans")
        ensure_books(book_dir, sizes)
        check_args = {"loans": plan.check_loans, "scenarios": plan.check_scenarios, "cupy": cupy}
        check = _run_child(["check", json.dumps(check_args), str(book_dir)], 600, env)
        if "error" in check or not check.get("ok"):
            raise RuntimeError(f"correctness check failed: {json.dumps(check)[:2000]}")
        echo(
            "correctness: "
            + ", ".join(
                f"{r['backend']} {r['precision']} {r['mode']} {r['max_relative_error']:.1e}"
                for r in check["results"]
            )
        )
        results: list[dict] = []
        for case in plan.cases:
            elapsed = time.perf_counter() - started
            if elapsed > plan.budget_s:
                skipped = f"skipped: over the {plan.budget_s:.0f} s budget"
                results.append({"case": asdict(case), "label": case.label, "error": skipped})
                echo(f"  {case.label}: skipped (budget)")
                continue
            timeout = min(plan.case_timeout_s, max(plan.budget_s * 1.5 - elapsed, 30))
            r = _run_child(["case", json.dumps(asdict(case)), str(book_dir)], timeout, env)
            r.setdefault("case", asdict(case))
            r.setdefault("label", case.label)
            results.append(r)
            echo(f"  {case.label}: {_describe(r)}")
            write(results, check, final=False)
        write(results, check, final=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    echo(f"wrote {out / report['name']}.json and .md ({report['wall_seconds']:.0f} s)")
    return report


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def _describe(r: dict) -> str:
    if "error" in r:
        return r["error"]
    extra = ""
    if r["case"]["kind"] == "gradient":
        extra = f", {r['gradient_over_forward']:.2f}× the tail forward"
    return (
        f"{r['loan_periods_per_s']:.3g} loan-periods/s, {r['seconds']:.2f} s"
        f" (compile {r['compile_seconds']:.1f} s){extra}, peak {r['peak_rss_mib']:.0f} MiB"
    )


def _device_slug(env: dict, plan: Plan) -> str:
    if env.get("jax_platform") == "cpu":
        base = f"cpu-{env.get('cpu', 'cpu')}-{env.get('cpu_cores')}c"
    else:
        base = f"gpu-{env.get('gpu', env.get('jax_device', 'gpu'))}"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    for suffix in ("quick", "targets"):
        if plan.name.endswith(suffix):
            return f"{slug}-{suffix}"
    return slug


def _si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".strip()


def markdown(report: dict) -> str:
    env, summary = report["environment"], report["summary"]
    device = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_cores')} cores)"
    lines = [
        f"# gpucredit benchmark: {device}",
        "",
        f"{env['date']} · gpucredit {env['gpucredit']} · JAX {env['jax']} ({env['jax_platform']})"
        f" · NumPy {env['numpy']} · Python {env['python']}"
        + (f" · CuPy {env['cupy']}" if env.get("cupy") else "")
        + (f" · XLA_FLAGS `{env['xla_flags']}`" if env.get("xla_flags") else "")
        + (
            f" · load average {env['load_average_1min']:.1f}"
            if env.get("load_average_1min") is not None
            else ""
        ),
        "",
        f"Plan `{report['plan']}`; {PERIODS_NOTE}. Correctness first: "
        + ", ".join(
            f"{r['backend']} {r['precision']} {r['mode']} {r['max_relative_error']:.1e}"
            for r in report["check"]["results"]
        )
        + " (max relative error against the NumPy reference).",
        "",
        "| case | loans | scenarios | loan-periods/s | seconds | compile s | peak RSS MiB"
        " | device MiB | roofline | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cases"]:
        c = r["case"]
        name = f"{c['kind']} {c['backend']}" + (
            "" if c["backend"] == "numpy" else f" {c['precision']}"
        )
        name += f" {c['mode']}" + (" 1 period" if c.get("periods") == 1 else "")
        if "error" in r:
            lines.append(f"| {name} | {c['loans']:,} | {c['scenarios']:,} | {r['error']} ||||||")
            continue
        if c["kind"] == "gradient":
            name += f" (×{r['gradient_over_forward']:.2f} tail fwd)"
        frac = r.get("roofline_fraction")
        lines.append(
            f"| {name} | {c['loans']:,} | {c['scenarios']:,} | {_si(r['loan_periods_per_s'])}"
            f" | {r['seconds']:.2f} | {r['compile_seconds']:.1f} | {r['peak_rss_mib']:.0f}"
            f" | {r.get('peak_device_mib', 0) or 0:.0f}"
            f" | {'' if frac is None else f'{100 * frac:.1f}%'} | {_load_range(r)} |"
        )
    roof = summary.get("roofline", {})
    flops, peak = roof.get("flops_per_loan_period", {}), roof.get("peak", {})
    lines += ["", "## Roofline", ""]
    lines.append(
        f"Work per loan-period, counted from the kernel (`KERNEL_COUNTS` in"
        f" gpucredit/benchmark.py): pass 1 {flops.get('pass1', 0):.0f} + pass 2"
        f" {flops.get('pass2', 0):.0f} = **{flops.get('total', 0):.0f} FLOP** (an exp or log"
        f" counted as {TRANSCENDENTAL_FLOPS}, a division as {DIVISION_FLOPS})."
        f" Memory traffic: a fused kernel keeps each loan's state in registers (~0 B of DRAM"
        f" per loan-period: compute-bound); XLA materialises per-period temporaries,"
        f" ~{roof.get('bytes_per_loan_period', {}).get('xla_temporaries', 0)} B per"
        f" loan-period (mostly cache-resident)."
    )
    if peak:
        lines.append("")
        lines.append(
            f"Device peak ({peak.get('source', '')}): {_si(peak.get('fp32_flops'), 'FLOP/s')}"
            f" FP32, {_si(peak.get('fp64_flops'), 'FLOP/s')} FP64,"
            f" {_si(peak.get('bytes_per_s'), 'B/s')} memory. Compute roof:"
            f" {_si(roof.get('compute_roof_loan_periods_per_s', {}).get('float32'))}"
            f" loan-periods/s FP32,"
            f" {_si(roof.get('compute_roof_loan_periods_per_s', {}).get('float64'))} FP64"
            + (
                f"; XLA-temporaries memory roof {_si(roof['xla_memory_roof_loan_periods_per_s'])}"
                if roof.get("xla_memory_roof_loan_periods_per_s")
                else ""
            )
            + ". The `roofline` column is each throughput as a fraction of the compute roof."
        )
    lines += ["", "## Summary", ""]
    sp = summary.get("speedup_jax_float32_over_numpy")
    if sp:
        lines.append(
            f"- JAX float32 conditional over the NumPy reference, {sp['loans']:,}-loan book, same"
            f" run: **{sp['ratio']:.1f}×** ({_si(sp['jax_float32_loan_periods_per_s'])} vs"
            f" {_si(sp['numpy_loan_periods_per_s'])} loan-periods/s; target ≥ 8×:"
            f" {'met' if sp['met'] else 'NOT met'})."
        )
    if summary.get("speedup_cupy_float32_over_numpy"):
        lines.append(
            f"- CuPy float32 over the NumPy reference: "
            f"{summary['speedup_cupy_float32_over_numpy']:.0f}×."
        )
    sc = summary.get("scaling", {})
    if sc.get("scenarios"):
        s = sc["scenarios"]
        lines.append(
            f"- Time ∝ scenarios^{_fmt(s['exponent'])} ({s['loans']:,} loans,"
            f" {', '.join(f'{x:,}' for x in s['scenarios'])} scenarios); peak RSS"
            f" {', '.join(f'{m:.0f}' for m in s['peak_rss_mib'])} MiB: flat"
            f" (×{s['memory_growth']:.2f} over ×{s['scenarios'][-1] / s['scenarios'][0]:.0f}"
            f" scenarios) because scenarios stream through in fixed chunks."
        )
    if sc.get("loans"):
        s = sc["loans"]
        lines.append(
            f"- Time per scenario ∝ loans^{_fmt(s['exponent'])}"
            f" ({', '.join(f'{x:,}' for x in s['loans'])} loans)."
        )
    for key, v in summary.get("forward_1m_x_10k", {}).items():
        lines.append(
            f"- Forward run 1,000,000 scenarios × 10,000 loans × 12 periods, {key}:"
            f" **{v['seconds']:.2f} s** (target < 5 s: {'met' if v['met'] else 'NOT met'})."
        )
    for m in summary.get("modes", []):
        grid = "one one-year period" if m["periods"] == 1 else f"{m['periods']} periods"
        rates = m["loan_periods_per_s"]
        line = (
            f"- Sampled vs conditional mode, {m['loans']:,} loans, {grid}, {m['precision']},"
            f" chunks in turn in one process: sampled **{m['sampled_over_conditional']:.2f}×**"
            f" conditional ({_si(rates['sampled'])} vs {_si(rates['conditional'])}"
            f" loan-periods/s; target ≥ {m['target_sampled_over_conditional']:.1f}×:"
            f" {'met' if m['met'] else 'NOT met'})"
        )
        if "floor" in rates:
            line += (
                f"; against the one-factor Gaussian threshold floor ({_si(rates['floor'])}"
                f" obligor-periods/s): conditional {m['conditional_over_floor']:.2f}×,"
                f" sampled {m['sampled_over_floor']:.2f}× (the engine also runs each loan's"
                f" cash flows, coverage ratios, collateral and the fire sale, in two passes)"
            )
        load = m["load_average"]
        if load[0] is not None:
            line += f"; load average {load[0]:.1f} → {load[1]:.1f}"
        lines.append(line + ".")
    tg = summary.get("tail_gradient")
    if tg:
        lines.append(
            f"- Tail gradient w.r.t. all {tg['parameters']} parameters ({tg['loans']:,} loans,"
            f" {tg['tail_scenarios']:,} tail scenarios): {tg['gradient_seconds']:.2f} s ="
            f" **{tg['gradient_over_forward']:.2f}×** the tail forward pass"
            f" ({tg['tail_forward_seconds']:.2f} s; target < 3×)."
        )
    lines += [
        "",
        "Reproduce: `gpucredit bench` (CPU ~10 min, `--quick` ~1 min) or `bench/gpu_check.sh`"
        " on an NVIDIA GPU.",
        "",
    ]
    return "\n".join(lines)


def _load_range(r: dict) -> str:
    """The 1-minute load average when the case started → ended ('' if not recorded)."""
    before, after = r.get("load_average_before"), r.get("load_average_after")
    return "" if before is None or after is None else f"{before:.1f} → {after:.1f}"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from gpucredit.kernels.jax_setup import configure_jax  # float64, XLA flags: before any JAX

    configure_jax()  # `python -m gpucredit.benchmark` and each case's child process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m gpucredit.benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--out", default="bench/results", help="results folder")
    parser.add_argument("--name", default=None, help="file name (default: the device)")
    parser.add_argument("--books", default=None, help="folder to keep the synthetic books in")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds; later cases are skipped past it"
    )
    parser.add_argument(
        "--targets", action="store_true", help="issue 18's CPU targets only (`targets_plan`)"
    )
    args = parser.parse_args(argv)
    plan = targets_plan() if args.targets else None
    report = run_benchmarks(
        args.quick, args.out, args.name, args.books, plan=plan, budget_s=args.budget
    )
    failed = [r for r in report["cases"] if "error" in r and "skipped" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
