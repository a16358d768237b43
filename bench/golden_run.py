"""Golden runs for refactors that must not change a number: record, then compare bit for bit.

    python bench/golden_run.py record DIR     # before the change
    python bench/golden_run.py compare DIR    # after: exits 1 if anything differs

A compare that finds differences says how large they are (the largest relative difference of
each array, in units of its scale, and EL, VaR and ES of the base run, old against new), for a
deliberate change that moves numbers by rounding: review those, then record again.

Four runs of the embedded example book with the default assumptions: JAX float64 and float32
(conditional, contributions, sensitivities, the paper-metrics stress, calibration), sampled
mode, and importance sampling (the shift is recorded with the first record and reused).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.book import example_book_path, read_book
from gpucredit.portfolio.engine import importance_shift, simulate
from gpucredit.portfolio.stress import stress_case

RUNS = {
    "float64": dict(scenarios=4096, precision="float64", chunk_size=1024),
    "float32": dict(scenarios=16384, precision="float32", chunk_size=4096),
    "sampled": dict(scenarios=8192, precision="float32", mode="sampled", chunk_size=4096),
    "importance": dict(scenarios=8192, precision="float32", chunk_size=4096),
}


def arrays_of(result) -> dict[str, np.ndarray]:
    out = {"losses_usd": np.asarray(result.losses_usd)}
    if result.contributions is not None:
        for name, values in result.contributions.columns().items():
            if np.asarray(values).dtype.kind == "f":
                out[f"contributions.{name}"] = np.asarray(values)
    if result.sensitivities is not None:
        for name, values in result.sensitivities.columns().items():
            if np.asarray(values).dtype.kind == "f":
                out[f"sensitivities.{name}"] = np.asarray(values)
    return out


def document_of(result) -> str:
    summary = result.summary()
    summary["metadata"] = {
        k: v for k, v in summary["metadata"].items() if "seconds" not in k and "per_second" not in k
    }
    return json.dumps(summary, sort_keys=True, default=str)


def print_array_differences(golden, arrays: dict[str, np.ndarray]) -> None:
    """Per array: how many entries moved, and the largest move relative to max |golden|."""
    for key in sorted(set(golden.files) | set(arrays)):
        if key not in golden.files or key not in arrays:
            print(f"  {key}: in one recording only")
            continue
        old, new = np.asarray(golden[key], np.float64), np.asarray(arrays[key], np.float64)
        if old.shape != new.shape:
            print(f"  {key}: shape {old.shape} -> {new.shape}")
            continue
        moved = ~((old == new) | (np.isnan(old) & np.isnan(new)))
        if moved.any():
            scale = max(float(np.nanmax(np.abs(old))), 1e-300)
            largest = float(np.nanmax(np.abs(new - old)[moved])) / scale
            print(f"  {key}: {int(moved.sum()):,} of {old.size:,} moved, largest {largest:.1e}")


def print_measure_differences(old: dict, new: dict) -> None:
    """EL, VaR and ES of the base run, before -> after, relative."""
    pairs = [("EL", old["measures"]["el_usd"], new["measures"]["el_usd"])]
    for level, tail in old["measures"]["tail"].items():
        now = new["measures"]["tail"].get(level, {})
        pairs += [(f"VaR {level}", tail["var_usd"], now.get("var_usd")),
                  (f"ES {level}", tail["es_usd"], now.get("es_usd"))]  # fmt: skip
    for label, a, b in pairs:
        change = "" if a is None or b is None or a == 0 else f" ({(b - a) / abs(a):+.1e})"
        print(f"  {label}: {a} -> {b}{change}")


def run_all(directory: Path, record: bool) -> int:
    assumptions = default_assumptions()
    book = read_book(example_book_path(), assumptions)
    stress = (stress_case(assumptions, "paper-metrics"),)
    shift_file = directory / "importance_shift.npy"
    if record:
        directory.mkdir(parents=True, exist_ok=True)
        shift, _ = importance_shift(book, assumptions, 0, 0.999, 20_000, "jax", "float32")
        np.save(shift_file, shift)
    shift = np.load(shift_file)
    failures = 0
    for name, settings in RUNS.items():
        result = simulate(
            book, assumptions, seed=0, backend="jax", stress=stress,
            normal_shift=shift if name == "importance" else None, **settings,
        )  # fmt: skip
        arrays, document = arrays_of(result), document_of(result)
        if record:
            np.savez(directory / f"{name}.npz", **arrays)
            (directory / f"{name}.json").write_text(document)
            print(f"{name}: recorded")
            continue
        golden = np.load(directory / f"{name}.npz")
        same = set(golden.files) == set(arrays) and all(
            np.array_equal(golden[k], arrays[k], equal_nan=True) for k in arrays
        )
        old_document = (directory / f"{name}.json").read_text()
        same_document = old_document == document
        print(f"{name}: arrays {'identical' if same else 'DIFFER'}, "
              f"summary {'identical' if same_document else 'DIFFERS'}")  # fmt: skip
        if not same:
            print_array_differences(golden, arrays)
        if not same_document:
            print_measure_differences(json.loads(old_document), json.loads(document))
        failures += (not same) + (not same_document)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "compare"):
        sys.exit(__doc__)
    sys.exit(run_all(Path(sys.argv[2]), sys.argv[1] == "record"))
