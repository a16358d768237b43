"""Variance reduction of importance sampling (issue 9): ES_99.9 and VaR_99.9 over many seeds.

For each seed, a plain run and an importance-sampling run with the same number of scenarios
(the shift is found once, on its own pilot seed); the variance of each estimator across
seeds gives the variance reduction factor var(plain) / var(IS) at equal scenario counts.

    python bench/bench_importance.py [--seeds 20] [--scenarios 8192] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from gpucredit import __version__, default_assumptions, read_book
from gpucredit.io.book import example_book_path
from gpucredit.portfolio.engine import importance_shift, simulate

ALPHAS = (0.99, 0.999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--scenarios", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    book, assumptions = read_book(example_book_path()), default_assumptions()
    started = time.perf_counter()
    shift, point = importance_shift(book, assumptions, seed=12345, alpha=0.999)
    shift_seconds = time.perf_counter() - started
    rows = {"plain": [], "importance": []}
    for seed in range(1, args.seeds + 1):
        for name, mu in (("plain", None), ("importance", shift)):
            m = simulate(
                book,
                assumptions,
                scenarios=args.scenarios,
                seed=seed,
                alphas=ALPHAS,
                contributions=False,
                sensitivities=False,
                normal_shift=mu,
            ).measures
            rows[name].append(
                {
                    "seed": seed,
                    "el": m.el,
                    "var_0.99": m.var(0.99),
                    "var_0.999": m.var(0.999),
                    "es_0.999": m.es(0.999),
                    "es_0.999_se": m.at(0.999).es_se,
                    "ess": m.effective_sample_size,
                }
            )
        print(seed, rows["plain"][-1]["es_0.999"], rows["importance"][-1]["es_0.999"], flush=True)
    summary = {}
    for key in ("el", "var_0.99", "var_0.999", "es_0.999"):
        plain = np.array([r[key] for r in rows["plain"]])
        imp = np.array([r[key] for r in rows["importance"]])
        summary[key] = {
            "plain_mean": plain.mean(),
            "plain_std": plain.std(ddof=1),
            "importance_mean": imp.mean(),
            "importance_std": imp.std(ddof=1),
            "variance_reduction": plain.var(ddof=1) / imp.var(ddof=1),
        }
    result = {
        "what": "variance of each estimator across seeds, plain vs importance sampling, "
        "equal scenario counts, example book (2,000 loans), JAX float32 on this CPU",
        "date": time.strftime("%Y-%m-%d"),
        "version": __version__,
        "machine": platform.processor() or platform.machine(),
        "seeds": args.seeds,
        "scenarios": args.scenarios,
        "shift_distance": point.distance,
        "shift_seconds": shift_seconds,
        "summary": summary,
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "importance-sampling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Importance sampling: variance reduction at equal scenario counts",
        "",
        f"Example book (2,000 loans), {args.scenarios:,} scenarios per run, {args.seeds} seeds "
        f"each, JAX float32 on this project's 2-core CPU, {result['date']}. Shift: the design "
        f"point of VaR 99.9% (|z*| = {point.distance:.2f}), found in {shift_seconds:.0f} s.",
        "",
        "| estimator | plain mean | plain std | IS mean | IS std | variance reduction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary.items():
        lines.append(
            f"| {key} | {s['plain_mean'] / 1e6:,.1f}M | {s['plain_std'] / 1e6:,.1f}M | "
            f"{s['importance_mean'] / 1e6:,.1f}M | {s['importance_std'] / 1e6:,.1f}M | "
            f"{s['variance_reduction']:,.1f}× |"
        )
    (args.out / "importance-sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
