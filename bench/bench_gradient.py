"""Cost of the tail gradient (all parameters, reverse-mode AD) as a multiple of the tail
forward pass, on the example book: the figure issues 4 and 6 ask for.

Both sides run on the same scenario indices in the same process; a run's sensitivities go
through the gradient in tasks of 256 tail scenarios (`sensitivities.tail_sensitivities`),
so 256 is the size that matters for a run, larger sizes show the trend.

    python bench/bench_gradient.py [--tail 256 2048] [--precision float32] [--repeats 5]

With --backend cupy (a GPU with cupy) the CuPy backend's fused adjoint
(`cupy_adjoint.weighted_loss_gradient_cupy`) against the CuPy tail forward
(`cupy_adjoint.losses_at_cupy`, forward.cu's two passes at the same indices), e.g. on the
benchmark's 10,000-loan book (make_book(10000, 1)):

    python bench/bench_gradient.py --backend cupy --loans 10000 --tail 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from gpucredit import __version__, default_assumptions, read_book
from gpucredit.io.book import example_book_path
from gpucredit.kernels import jax_engine
from gpucredit.portfolio.backends import JaxBackend, device_name
from gpucredit.portfolio.loans import loan_arrays


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up and compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_cases(path, device: str, book_loans: int, args, cases: list[dict], **extra) -> None:
    """The results so far as JSON (rewritten after every size, so a run cut short keeps what
    it measured), and the last case on stdout."""
    result = {
        "device": device,
        "version": __version__,
        "date": time.strftime("%Y-%m-%d"),
        "book_loans": book_loans,
        "precision": args.precision,
        "repeats": args.repeats,
        **extra,
        "cases": cases,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(cases[-1]), flush=True)


def main() -> None:
    from gpucredit.kernels.jax_setup import configure_jax

    configure_jax()  # before jax.devices(): the XLA CPU flags act only then
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tail", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--precision", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="jax", choices=("jax", "cupy"))
    parser.add_argument(
        "--loans", type=int, default=0, help="a synthetic book of this size (0: the example book)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--store-steps",
        action="store_true",
        help="also time the backward that stores each period's intermediates (remat_steps=False)",
    )
    args = parser.parse_args()
    assumptions = default_assumptions()
    if args.loans:
        from gpucredit.portfolio.makebook import make_book

        book = make_book(args.loans, 1)  # the benchmark's synthetic book of that size
    else:
        book = read_book(example_book_path())
    grid = assumptions.grid("conditional")
    if args.backend == "cupy":
        cupy_main(args, assumptions, book, grid)
        return
    # The backend a run's gradient tasks use: ∂/∂rate.level through the floating schedules too.
    backend = JaxBackend(
        assumptions.params, grid, loan_arrays(book, assumptions), 0, args.precision
    )
    device = device_name(jax.devices()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gradient-{device.split(' ')[0]}.json"

    cases = []
    for size in args.tail:
        tail = np.arange(size, dtype=np.uint32)
        coefficients = np.full(size, 1.0 / size)
        forward = median_seconds(
            lambda tail=tail: jax_engine.losses_at(
                assumptions.params, grid, backend.blocks, 0, tail
            ).block_until_ready(),
            args.repeats,
        )
        gradient = median_seconds(
            lambda tail=tail, coefficients=coefficients: jax.block_until_ready(
                backend.weighted_gradient(tail, coefficients)
            ),
            args.repeats,
        )
        case = {
            "tail_scenarios": size,
            "forward_seconds": forward,
            "gradient_seconds": gradient,
            "gradient_over_forward": gradient / forward,
        }
        if args.store_steps:
            try:
                stored = median_seconds(
                    lambda tail=tail, coefficients=coefficients: jax.block_until_ready(
                        jax_engine.weighted_loss_gradient(
                            assumptions.params, grid, backend.blocks, 0, tail, coefficients,
                            schedule_rate_tangent=backend.schedule_rate_tangent,
                            remat_steps=False,
                        )
                    ),
                    args.repeats,
                )  # fmt: skip
            except jax.errors.JaxRuntimeError as error:  # stored stacks can exceed the device
                case.update(stored_steps_error=str(error).splitlines()[0][:200])
            else:
                case.update(stored_steps_seconds=stored, stored_steps_over_forward=stored / forward)
        cases.append(case)
        write_cases(path, device, len(book), args, cases)


def cupy_main(args, assumptions, book, grid) -> None:
    """The CuPy adjoint's tail gradient against the CuPy tail forward (--backend cupy)."""
    import cupy

    from gpucredit.kernels import cupy_adjoint, cupy_engine

    params = assumptions.params
    loans = loan_arrays(book, assumptions)
    prepared = cupy_engine.prepare_loans_cupy(loans, np.dtype(args.precision))
    # ∂/∂rate.level through the floating schedules, as a run's gradient (built once, untimed)
    tangent = jax_engine.schedule_tangent(loans, float(params.rate_level), grid.steps_per_year)
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    device = f"gpu ({name.decode() if isinstance(name, bytes) else name}, cupy)"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gradient-cupy.json"
    cases = []
    for size in args.tail:
        tail = np.arange(size, dtype=np.uint32)
        coefficients = np.full(size, 1.0 / size)
        forward = median_seconds(  # returns NumPy: the device work is done
            lambda tail=tail: cupy_adjoint.losses_at_cupy(params, grid, prepared, 0, tail),
            args.repeats,
        )
        gradient = median_seconds(
            lambda tail=tail, coefficients=coefficients: cupy_adjoint.weighted_loss_gradient_cupy(
                params, grid, prepared, 0, tail, coefficients, schedule_rate_tangent=tangent
            ),
            args.repeats,
        )
        pool = cupy.get_default_memory_pool()
        cases.append(
            {
                "tail_scenarios": size,
                "forward_seconds": forward,
                "gradient_seconds": gradient,
                "gradient_over_forward": gradient / forward,
                "cupy_pool_mib": pool.total_bytes() / 2**20,
            }
        )
        write_cases(
            path, device, len(book), args, cases, target="gradient_over_forward <= 2 (issue 19)"
        )


if __name__ == "__main__":
    main()
