"""Pass 1 on 1 and 2 Dask workers against the single-process run: parallel efficiency.

Correctness first (the per-scenario losses of every run must equal the single-process
losses bit for bit), warm-up (every worker compiles its kernel before timing), then the median
of `--repeats` timed runs. Writes bench/results/workers-<host>.json and .md.

    python bench/bench_workers.py [--scenarios 32768] [--chunk-size 4096] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", type=int, default=32_768)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from gpucredit.io.assumptions import load_assumptions
    from gpucredit.io.book import example_book_path, read_book
    from gpucredit.portfolio.backends import JaxBackend, Simulation
    from gpucredit.portfolio.distributed import DaskRunner
    from gpucredit.portfolio.loans import loan_arrays
    from gpucredit.portfolio.runner import run_pass1

    assumptions = load_assumptions(None)
    book = read_book(example_book_path(), assumptions)
    loans = loan_arrays(book, assumptions)
    grid = assumptions.grid()
    seed, S, C, N = assumptions.seed, args.scenarios, args.chunk_size, len(book)
    loan_periods = S * N * grid.periods

    # Single process (no Dask): the reference losses and the baseline time.
    single = JaxBackend(assumptions.params, grid, loans, seed, args.precision)
    single.run_chunk(0, C)  # compile
    times, reference = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run_pass1(single, S, C, N)
        times.append(time.perf_counter() - t0)
        reference = out.losses_usd if reference is None else reference
        assert np.array_equal(out.losses_usd, reference)
    rows = [{"runner": "single process", "workers": 0, "seconds": statistics.median(times)}]
    print(f"single process: {rows[0]['seconds']:.2f} s", flush=True)

    run = Simulation("jax", args.precision, assumptions.params, grid, loans, seed)
    for n in args.workers:
        with DaskRunner(workers=n) as runner:
            run_pass1(run, n * C, C, N, runner=runner)  # warm-up: each worker compiles
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = run_pass1(run, S, C, N, runner=runner)
                times.append(time.perf_counter() - t0)
                assert np.array_equal(out.losses_usd, reference), "losses differ from 1 process"
            rows.append(
                {
                    "runner": f"dask, {n} worker(s)",
                    "workers": n,
                    "seconds": statistics.median(times),
                }
            )
            print(f"{n} worker(s): {rows[-1]['seconds']:.2f} s ({times})", flush=True)

    by_workers = {r["workers"]: r["seconds"] for r in rows}
    t1 = by_workers.get(1)
    for r in rows:
        r["scenarios_per_second"] = S / r["seconds"]
        r["loan_periods_per_second"] = loan_periods / r["seconds"]
        n = r["workers"]
        r["speedup_vs_1_worker"] = t1 / r["seconds"] if t1 and n else None
        r["parallel_efficiency"] = t1 / (n * r["seconds"]) if t1 and n else None
    record = {
        "benchmark": "pass 1 on Dask workers (bench/bench_workers.py)",
        "host": platform.node(),
        "device": single.device,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "book": f"embedded example, {N} loans",
        "scenarios": S,
        "chunk_size": C,
        "periods": grid.periods,
        "precision": args.precision,
        "repeats": args.repeats,
        "losses_identical_to_single_process": True,
        "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"workers-{platform.node() or 'host'}"
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Pass 1 on Dask workers ({record['device']}, {record['cpu_count']} cores)",
        "",
        f"{N} loans × {S:,} scenarios × {grid.periods} periods, {args.precision}, chunk {C}; "
        f"median of {args.repeats}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in record['load_average_1_5_15'])}. Losses identical to "
        "the single-process run in every run.",
        "",
        "| runner | seconds | scenarios/s | speed-up vs 1 worker | parallel efficiency |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_1_worker']:.2f}" if r["speedup_vs_1_worker"] else "-"
        pe = f"{r['parallel_efficiency']:.0%}" if r["parallel_efficiency"] else "-"
        rate = f"{r['scenarios_per_second']:,.0f}"
        lines.append(f"| {r['runner']} | {r['seconds']:.2f} | {rate} | {sp} | {pe} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
