"""What XLA makes of the period loop: the fusions of each loop body in the optimised HLO.

    python bench/hlo_profile.py [--loans 10000] [--scenarios 4096] [--mode conditional]
                                [--one-period] [--hlo FILE]

Compiles the chunk program a run's pass 1 uses (`jax_forward._chunk_losses_jit`, output
"outcomes") for a synthetic book, reads `jax.jit(f).lower(...).compile().as_text()` and, for
every loop body that writes [S, b] arrays (the period loops of pass 1 and pass 2), prints each
fusion: its root (what it materialises), its number of HLO operations and the expensive ones
among them (log, exp, divide, power, sqrt: XLA's CPU fusion does not duplicate those, and
recomputes everything cheap in every fusion that needs it), and the [S, b] copies of the loop
carry. Nothing is timed: the counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from pathlib import Path

EXPENSIVE = ("log", "exponential", "divide", "power", "sqrt", "rsqrt", "tanh")


def computations(hlo: str) -> dict[str, list[str]]:
    """{name: instruction lines} of every computation in HLO text."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            out[name].append(line.strip())
    return out


def profile(hlo: str, state_shape: str) -> list[dict]:
    """The loop bodies that write `state_shape` arrays (e.g. "f32[4096,512]"), their fusions."""
    comps = computations(hlo)
    bodies = []
    for name, lines in comps.items():
        fusions, copies = [], 0
        for line in lines:
            m = re.match(r"%(\S+) = (\(.*?\)|\S+) fusion\(.*calls=%([\w.]+)", line)
            if m and m.group(2).lstrip("(").startswith(state_shape):  # a tuple: multi-output
                called = comps.get(m.group(3), [])
                ops = [re.search(r"= \S+ ([a-z-]+)\(", x) for x in called]
                ops = [o.group(1) for o in ops if o]
                root = next((x for x in called if x.startswith("ROOT")), "")
                root_op = re.search(r"= \S+ ([a-z-]+)\(", root)
                fusions.append(
                    {
                        "fusion": m.group(1),
                        "root": root_op.group(1) if root_op else "?",
                        "ops": len(ops),
                        "expensive": {e: ops.count(e) for e in EXPENSIVE if ops.count(e)},
                    }
                )
            elif re.match(rf"%\S+ = {re.escape(state_shape)}\S* copy\(", line):
                copies += 1
        if len(fusions) >= 2:
            bodies.append({"body": name, "fusions": fusions, "carry_copies": copies})
    return bodies


def compile_chunk(loans: int, scenarios: int, mode: str, one_period: bool) -> tuple[str, str]:
    from gpucredit.kernels.jax_setup import configure_jax

    configure_jax()
    import numpy as np

    from gpucredit import benchmark
    from gpucredit.io.assumptions import default_assumptions
    from gpucredit.io.book import read_book
    from gpucredit.kernels import jax_engine, jax_forward
    from gpucredit.kernels.jax_args import _params_arg, _statics
    from gpucredit.portfolio.loans import loan_arrays

    assumptions = default_assumptions()
    if one_period:
        assumptions = dataclasses.replace(assumptions, horizon_years=1.0, steps_per_year=1)
    with tempfile.TemporaryDirectory(prefix="gpucredit-hlo-") as tmp:
        benchmark.ensure_books(Path(tmp), [loans])
        book = read_book(benchmark._book_path(Path(tmp), loans), assumptions)
    arrays = loan_arrays(book, assumptions)
    blocks = jax_engine.prepare_loans(arrays, "float32")
    lowered = jax_forward._chunk_losses_jit.lower(
        _params_arg(assumptions.params), assumptions.grid(mode), _statics(blocks),
        np.uint32(0), np.uint32(0), scenarios, "outcomes",
    )  # fmt: skip
    return lowered.compile().as_text(), f"f32[{scenarios},{blocks.block_size}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/hlo_profile.py")
    parser.add_argument("--loans", type=int, default=10000)
    parser.add_argument("--scenarios", type=int, default=4096)
    parser.add_argument("--mode", default="conditional")
    parser.add_argument("--one-period", action="store_true", help="one one-year period")
    parser.add_argument("--hlo", default=None, help="also write the optimised HLO here")
    args = parser.parse_args(argv)
    hlo, state = compile_chunk(args.loans, args.scenarios, args.mode, args.one_period)
    if args.hlo:
        Path(args.hlo).write_text(hlo)
    for body in profile(hlo, state):
        total = sum(f["ops"] for f in body["fusions"])
        print(
            f"{body['body']}: {len(body['fusions'])} fusions write {state} per iteration"
            f" ({total} HLO ops in all), {body['carry_copies']} carry copies"
        )
        for f in body["fusions"]:
            expensive = ", ".join(f"{k} {v}" for k, v in f["expensive"].items())
            print(f"  {f['fusion']:<40} root {f['root']:<12} {f['ops']:>4} ops  {expensive}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
