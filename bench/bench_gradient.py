"""Cost of the tail gradient (all parameters, reverse-mode AD) as a multiple of the tail
forward pass, on the example book: the figure issues 4 and 6 ask for.

    python bench/bench_gradient.py [--tail 256] [--precision float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpucredit import __version__, default_assumptions, read_book
from gpucredit.io.book import example_book_path
from gpucredit.kernels import jax_engine
from gpucredit.portfolio.engine import device_name
from gpucredit.portfolio.loans import loan_arrays


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up and compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tail", type=int, default=256)
    parser.add_argument("--precision", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    assumptions, book = default_assumptions(), read_book(example_book_path())
    grid = assumptions.grid("conditional")
    blocks = jax_engine.prepare_loans(
        loan_arrays(book, assumptions), jnp.dtype(args.precision), 512
    )
    tail = np.arange(args.tail, dtype=np.uint32)
    coefficients = np.full(args.tail, 1.0 / args.tail)
    forward = median_seconds(
        lambda: jax_engine.losses_at(assumptions.params, grid, blocks, 0, tail).block_until_ready(),
        args.repeats,
    )
    gradient = median_seconds(
        lambda: jax.block_until_ready(
            jax_engine.weighted_loss_gradient(
                assumptions.params, grid, blocks, 0, tail, coefficients
            )
        ),
        args.repeats,
    )
    device = device_name(jax.devices()[0])
    result = {
        "device": device,
        "version": __version__,
        "date": time.strftime("%Y-%m-%d"),
        "book_loans": len(book),
        "tail_scenarios": args.tail,
        "precision": args.precision,
        "forward_seconds": forward,
        "gradient_seconds": gradient,
        "gradient_over_forward": gradient / forward,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gradient-" + device.split(" ")[0]
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
