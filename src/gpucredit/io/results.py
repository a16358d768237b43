"""The results directory: summary.json, losses.parquet (every loss kept) or
tail_losses.parquet (tails-only mode), contributions.parquet, sensitivities.parquet and
report.html, each written to a temporary name and renamed, and the checkpoint of completed
chunks (or batches, tails-only) that lets an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpucredit.io import files
from gpucredit.io.book import book_to_table
from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.engine import RunResult
from gpucredit.portfolio.risk import BatchStatistics, LossHistogram, LossTail
from gpucredit.portfolio.runner import BatchOutput
from gpucredit.portfolio.summary import book_summary

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_FILE = re.compile(r"(chunk|batch)-(\d{12})\.npz")  # what `Checkpoint.save` writes
# What np.load raises on a truncated or corrupt .npz (ValueError also: pickled data refused).
_NPZ_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
)
LOSSES_FILE = "losses.parquet"
TAIL_LOSSES_FILE = "tail_losses.parquet"


class ResultsError(Exception):
    """The results directory cannot be written or resumed (message says why)."""


def write_atomically(path: Path, write) -> Path:
    """`files.write_atomically`, an OSError reported as a ResultsError."""
    try:
        return files.write_atomically(path, write)
    except OSError as error:
        raise ResultsError(f"cannot write {path}: {error.strerror or error}") from None


def write_json(path: Path, document: dict) -> Path:
    text = json.dumps(document, indent=2, allow_nan=False, default=_json_default)
    return write_atomically(path, lambda p: p.write_text(text + "\n"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_parquet(path: Path, table: pa.Table) -> Path:
    return write_atomically(path, lambda p: pq.write_table(table, p))


def prepare_output_dir(directory: Path) -> Path:
    """Create `directory` if needed and check it can be written, before any simulation."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = files.temporary_sibling(directory / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ResultsError(
            f"cannot write to the output directory {directory}: {error.strerror or error}"
        ) from None
    return directory


def book_sha256(book: Book) -> str:
    """Hash of the book's content as read (independent of the file format)."""
    digest = hashlib.sha256()
    for batch in book_to_table(book).to_batches():
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


def file_sha256(path: str) -> str | None:
    """SHA-256 of a file's bytes, read in blocks (None for an in-memory book)."""
    source = Path(path)
    if not source.is_file():
        return None
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assumptions_sha256(assumptions: Assumptions) -> str:
    text = json.dumps(assumptions.document, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def write_results(
    result: RunResult, directory: Path, book: Book, assumptions: Assumptions
) -> list[Path]:
    """Write every result file of a run into `directory`; returns the paths written."""
    from gpucredit.io.report import render_report_from_dir

    summary = result.summary()
    summary["metadata"] |= {
        "book_sha256": book_sha256(book),
        "book_file_sha256": file_sha256(book.source),
        "assumptions_sha256": assumptions_sha256(assumptions),
    }
    summary["book"] = book_summary(book, assumptions)
    summary["loss_histogram"] = result.histogram.to_dict()
    # Every loss (losses.parquet), or in tails-only mode the run's largest losses: the report's
    # tail. The other file is removed, so a directory never mixes two runs.
    if result.losses_usd is not None:
        name, stale = LOSSES_FILE, TAIL_LOSSES_FILE
        scenarios, losses = np.arange(len(result.losses_usd)), result.losses_usd
    else:
        name, stale = TAIL_LOSSES_FILE, LOSSES_FILE
        scenarios, losses = result.tail.indices, result.tail.losses_usd
    (directory / stale).unlink(missing_ok=True)
    written = [
        write_parquet(
            directory / name,
            pa.table({"scenario": scenarios.astype(np.int64, copy=False), "loss_usd": losses}),
        )
    ]
    for name, part in (
        ("contributions.parquet", result.contributions),
        ("sensitivities.parquet", result.sensitivities),
    ):
        path = directory / name
        if part is None:
            path.unlink(missing_ok=True)  # never leave a stale file from an earlier run
            continue
        written.append(write_parquet(path, pa.table(part.columns())))
    written.append(write_json(directory / "summary.json", summary))
    written.append(render_report_from_dir(directory))
    return written


class Checkpoint:
    """Completed chunks (or, tails-only, batches) of pass 1, saved in `<out>/.checkpoint/` as
    they finish; a resumed run takes only those of its own mode.

    The run's identity (book and assumptions hashes, scenarios, seed, mode, backend,
    precision, chunk size) is stored with them; `--resume` continues only the same run, and
    gives exactly the result of an uninterrupted one because chunks are addressed by their
    first scenario index and the random numbers by scenario.
    """

    def __init__(
        self,
        out_dir: Path,
        book: Book,
        assumptions: Assumptions,
        scenarios: int,
        seed: int,
        mode: str,
        backend: str,
        precision: str,
        resume: bool,
        chunk_size: int,
        importance_sampling: bool = False,
    ):
        self.directory = out_dir / CHECKPOINT_DIR
        self.chunk_size = chunk_size
        self.n_loans = len(book)
        self.identity = {
            "book_sha256": book_sha256(book),
            "assumptions_sha256": assumptions_sha256(assumptions),
            "scenarios": scenarios,
            "seed": seed,
            "mode": mode,
            "backend": backend,
            "precision": precision,
            "importance_sampling": importance_sampling,
        }
        identity_path = self.directory / "run.json"
        if resume:
            if not identity_path.exists():
                raise ResultsError(f"nothing to resume in {out_dir}: no {CHECKPOINT_DIR}/run.json")
            try:
                saved = json.loads(identity_path.read_text())
            except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
                reason = getattr(error, "strerror", None) or "not valid JSON"
                raise self._damaged(identity_path, f"cannot be read: {reason}") from None
            if not isinstance(saved, dict):
                raise self._damaged(identity_path, "not a JSON object")
            saved_chunk = saved.pop("chunk_size", chunk_size)  # absent in older checkpoints
            if isinstance(saved_chunk, bool) or not isinstance(saved_chunk, int) or saved_chunk < 1:
                raise self._damaged(
                    identity_path, f"chunk_size must be a whole number >= 1, got {saved_chunk!r}"
                )
            self.chunk_size = saved_chunk
            if saved != self.identity:
                keys = self.identity.keys() | saved.keys()
                changed = sorted(k for k in keys if saved.get(k) != self.identity.get(k))
                raise ResultsError(
                    f"cannot resume the run in {out_dir}: it was started with a different "
                    f"{', '.join(changed)}"
                )
            self._saved_files()  # an unexpected file name is refused before any work
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            try:
                self.directory.mkdir(parents=True)
            except OSError as error:
                raise ResultsError(
                    f"cannot write {self.directory}: {error.strerror or error}"
                ) from None
            write_json(identity_path, self.identity | {"chunk_size": self.chunk_size})

    def _damaged(self, path: Path, problem: str) -> ResultsError:
        return ResultsError(
            f"cannot resume from the damaged checkpoint file {path}: {problem}; rerun without "
            f"--resume to start afresh (or delete the checkpoint directory {self.directory})"
        )

    def _saved_files(self) -> list[tuple[Path, str, int]]:
        """(path, kind, first scenario) of every saved chunk and batch, in name order; any
        other `.npz` file is refused (a checkpoint holds only what `save` wrote)."""
        saved = []
        for path in sorted(self.directory.glob("*.npz")):
            match = CHECKPOINT_FILE.fullmatch(path.name)
            if match is None:
                raise self._damaged(
                    path,
                    "unexpected file name (a checkpoint holds only chunk-<12 digits>.npz and "
                    "batch-<12 digits>.npz files)",
                )
            saved.append((path, match[1], int(match[2])))
        return saved

    def _path(self, first: int, kind: str) -> Path:
        return self.directory / f"{kind}-{first:012d}.npz"

    def save(self, first: int, output: ChunkOutput | BatchOutput) -> None:
        """Save a chunk (every loss kept) or a batch (tails-only mode) of pass 1."""
        if isinstance(output, BatchOutput):
            path, arrays = self._path(first, "batch"), _batch_arrays(output)
        else:
            path = self._path(first, "chunk")
            arrays = {
                "losses_usd": output.losses_usd,
                "loan_loss_sum_usd": output.loan_loss_sum_usd,
                "loan_default_probability_sum": output.loan_default_probability_sum,
                "loan_defaulted_exposure_sum_usd": output.loan_defaulted_exposure_sum_usd,
            }
            if output.log_weights is not None:
                arrays["log_weights"] = output.log_weights

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)

        write_atomically(path, write)

    def done(self) -> dict[int, ChunkOutput | BatchOutput]:
        """The saved chunks and batches, keyed by their first scenario."""
        outputs: dict[int, ChunkOutput | BatchOutput] = {}
        for path, kind, first in self._saved_files():
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            except _NPZ_READ_ERRORS:
                raise self._damaged(
                    path, "not a readable .npz file (truncated or corrupt)"
                ) from None
            problem = _arrays_problem(kind, arrays, self.n_loans)
            if problem is not None:
                raise self._damaged(path, problem)
            if kind == "chunk":
                outputs[first] = ChunkOutput(**arrays)
            else:
                try:
                    outputs[first] = _batch_from_arrays(first, arrays)
                except (TypeError, ValueError, OverflowError) as error:
                    raise self._damaged(path, f"unusable values ({error})") from None
        return outputs

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


_CHUNK_ARRAYS = (
    "losses_usd",
    "loan_loss_sum_usd",
    "loan_default_probability_sum",
    "loan_defaulted_exposure_sum_usd",
)
_BATCH_ARRAYS = (
    "tail_indices",
    "tail_losses_usd",
    "count",
    "loss_sum_usd",
    "loss_m2_usd2",
    "alphas",
    "var_usd",
    "es_usd",
    "bin_width_usd",
    "histogram_counts",
    "zero_count",
    "loan_sums",
)
_OPTIONAL_ARRAYS = {"chunk": ("log_weights",), "batch": ("tail_floor_usd", "chunk_size")}


def _arrays_problem(kind: str, arrays: dict[str, np.ndarray], n_loans: int) -> str | None:
    """What is wrong with a saved chunk's or batch's arrays (names, types, shapes), or None."""
    required = _CHUNK_ARRAYS if kind == "chunk" else _BATCH_ARRAYS
    missing = [name for name in required if name not in arrays]
    if missing:
        return f"missing arrays {', '.join(missing)}"
    unexpected = sorted(set(arrays) - set(required) - set(_OPTIONAL_ARRAYS[kind]))
    if unexpected:
        return f"unexpected arrays {', '.join(unexpected)}"
    for name, values in arrays.items():
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
            return f"array {name} is not numeric (dtype {values.dtype})"
    if kind == "chunk":
        if arrays["losses_usd"].ndim != 1:
            return f"losses_usd has shape {arrays['losses_usd'].shape}, expected one dimension"
        shapes = {name: (n_loans,) for name in _CHUNK_ARRAYS[1:]}
        if "log_weights" in arrays:
            shapes["log_weights"] = arrays["losses_usd"].shape
    else:
        shapes = {"loan_sums": (3, n_loans)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            return f"{name} has shape {arrays[name].shape}, expected {shape} for this book"
    return None


def _batch_arrays(batch: BatchOutput) -> dict[str, np.ndarray]:
    stats = batch.statistics
    return {
        "tail_indices": batch.tail.indices,
        "tail_losses_usd": batch.tail.losses_usd,
        "tail_floor_usd": np.float64(batch.tail.floor_usd),
        "chunk_size": np.int64(-1 if batch.chunk_size is None else batch.chunk_size),
        "count": np.int64(stats.count),
        "loss_sum_usd": np.float64(stats.loss_sum_usd),
        "loss_m2_usd2": np.float64(stats.loss_m2_usd2),
        "alphas": np.asarray(stats.alphas, np.float64),
        "var_usd": np.asarray(stats.var_usd, np.float64),
        "es_usd": np.asarray(stats.es_usd, np.float64),
        "bin_width_usd": np.float64(batch.histogram.bin_width_usd),
        "histogram_counts": batch.histogram.counts,
        "zero_count": np.int64(batch.histogram.zero_count),
        "loan_sums": batch.loan_sums,
    }


def _batch_from_arrays(first: int, a: dict[str, np.ndarray]) -> BatchOutput:
    count = int(a["count"])
    return BatchOutput(
        first=first,
        # The floor of a batch taken again (`risk.short_tails`); none in older checkpoints.
        tail=LossTail(
            a["tail_indices"],
            a["tail_losses_usd"],
            count,
            floor_usd=float(a.get("tail_floor_usd", np.inf)),
        ),
        statistics=BatchStatistics(
            count=count,
            loss_sum_usd=float(a["loss_sum_usd"]),
            loss_m2_usd2=float(a["loss_m2_usd2"]),
            alphas=tuple(float(x) for x in a["alphas"]),
            var_usd=tuple(float(x) for x in a["var_usd"]),
            es_usd=tuple(float(x) for x in a["es_usd"]),
        ),
        histogram=LossHistogram(
            float(a["bin_width_usd"]), a["histogram_counts"], int(a["zero_count"])
        ),
        loan_sums=a["loan_sums"],
        chunk_size=int(a["chunk_size"]) if int(a.get("chunk_size", -1)) >= 0 else None,
    )
