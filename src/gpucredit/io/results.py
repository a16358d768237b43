"""The results directory: summary.json, losses.parquet, contributions.parquet,
sensitivities.parquet and report.html, each written to a temporary name and renamed, and the
checkpoint of completed chunks that lets an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpucredit.io.book import book_to_table
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.engine import ChunkOutput, RunResult
from gpucredit.portfolio.summary import book_summary

CHECKPOINT_DIR = ".checkpoint"


class ResultsError(Exception):
    """The results directory cannot be written or resumed (message says why)."""


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomically(path: Path, write) -> Path:
    """Call `write(temporary_path)`, then rename over `path`: a reader never sees half a file."""
    temporary = _temporary_sibling(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ResultsError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


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
        probe = _temporary_sibling(directory / "probe")
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
    written = [
        write_parquet(
            directory / "losses.parquet",
            pa.table(
                {
                    "scenario": np.arange(len(result.losses_usd), dtype=np.int64),
                    "loss_usd": result.losses_usd,
                }
            ),
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
    """Completed chunks of pass 1, saved in `<out>/.checkpoint/` as they finish.

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
            saved = json.loads(identity_path.read_text())
            self.chunk_size = saved.pop("chunk_size", chunk_size)
            if saved != self.identity:
                changed = sorted(k for k in self.identity if saved.get(k) != self.identity[k])
                raise ResultsError(
                    f"cannot resume the run in {out_dir}: it was started with a different "
                    f"{', '.join(changed)}"
                )
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            try:
                self.directory.mkdir(parents=True)
            except OSError as error:
                raise ResultsError(
                    f"cannot write {self.directory}: {error.strerror or error}"
                ) from None
            write_json(identity_path, self.identity | {"chunk_size": self.chunk_size})

    def _path(self, first: int) -> Path:
        return self.directory / f"chunk-{first:012d}.npz"

    def save(self, first: int, chunk: ChunkOutput) -> None:
        def write(path: Path) -> None:
            with open(path, "wb") as handle:
                np.savez(
                    handle,
                    losses_usd=chunk.losses_usd,
                    loan_loss_sum_usd=chunk.loan_loss_sum_usd,
                    loan_default_probability_sum=chunk.loan_default_probability_sum,
                    loan_defaulted_exposure_sum_usd=chunk.loan_defaulted_exposure_sum_usd,
                    **({} if chunk.log_weights is None else {"log_weights": chunk.log_weights}),
                )

        write_atomically(self._path(first), write)

    def done(self) -> dict[int, ChunkOutput]:
        chunks = {}
        for path in sorted(self.directory.glob("chunk-*.npz")):
            first = int(path.stem.split("-")[1])
            with np.load(path) as data:
                chunks[first] = ChunkOutput(**{k: data[k] for k in data.files})
        return chunks

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
