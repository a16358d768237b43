"""The results directory: summary.json, losses.parquet (every loss kept) or
tail_losses.parquet (tails-only mode), contributions.parquet, sensitivities.parquet and
report.html, written as one transaction (into a staging directory, moved in only when every
file is complete), the checkpoint of completed chunks (or batches, tails-only) that lets an
interrupted run resume, and the lock that keeps two runs out of one directory.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpucredit import __version__
from gpucredit.io import files
from gpucredit.io.book import book_to_table
from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.engine import RunResult
from gpucredit.portfolio.risk import HISTOGRAM_BINS, BatchStatistics, LossHistogram, LossTail
from gpucredit.portfolio.runner import BatchOutput
from gpucredit.portfolio.summary import book_summary

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_FILE = re.compile(r"(chunk|batch)-(\d{12})\.npz")  # what `Checkpoint.save` writes
RUN_FILE = "run.json"  # the checkpoint's run identity
LOCK_FILE = ".gpucredit.lock"
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
SUMMARY_FILE = "summary.json"
LOSSES_FILE = "losses.parquet"
TAIL_LOSSES_FILE = "tail_losses.parquet"
CONTRIBUTIONS_FILE = "contributions.parquet"
SENSITIVITIES_FILE = "sensitivities.parquet"
REPORT_FILE = "report.html"
REVERSE_STRESS_FILE = "reverse_stress.json"
# Every file a run replaces (or removes, when this run has none of it), summary.json last.
RESULT_FILES = (
    LOSSES_FILE,
    TAIL_LOSSES_FILE,
    CONTRIBUTIONS_FILE,
    SENSITIVITIES_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
)


def summary_schema() -> dict:
    """The JSON Schema (draft 2020-12) of summary.json, shipped as
    gpucredit/data/summary.schema.json; docs/spec.md (Results) describes the layout::

        jsonschema.validate(json.loads(Path("results/summary.json").read_text()), summary_schema())
    """
    schema = importlib.resources.files("gpucredit") / "data" / "summary.schema.json"
    return json.loads(schema.read_text(encoding="utf-8"))


class ResultsError(Exception):
    """The results directory cannot be written or resumed (message says why)."""


def write_atomically(path: Path, write) -> Path:
    """`files.write_atomically`, an OSError reported as a ResultsError."""
    try:
        return files.write_atomically(path, write)
    except OSError as error:
        raise ResultsError(f"cannot write {path}: {error.strerror or error}") from None


def write_json(path: Path, document: dict) -> Path:
    try:
        text = json.dumps(document, indent=2, allow_nan=False, default=_json_default)
    except ValueError as error:  # an infinity or NaN: JSON has neither
        raise ResultsError(f"cannot write {path}: {error}") from None
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
    if not str(directory).strip():
        raise ResultsError("the output directory must not be empty (give --out DIR)")
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


def refuse_overwriting_inputs(directory: Path, inputs: dict[str, str | None], names) -> None:
    """Refuse a results directory where writing (or removing) one of `names` would destroy
    an input file (`inputs`: what it is -> its path; the book, the assumptions): e.g.
    ``gpucredit run d/losses.parquet --out d``."""
    for what, source in inputs.items():
        if not source or not Path(source).is_file():
            continue
        for name in names:
            target = directory / name
            try:
                same = target.exists() and os.path.samefile(target, source)
            except OSError:
                same = False
            if same:
                raise ResultsError(
                    f"--out {directory} would overwrite the input {what} {source} (as {name}): "
                    "choose another --out directory"
                )


class OutputLock:
    """An exclusive lock on a results directory for the life of a run: a second run into it
    is refused, naming the holder's pid. `fcntl.flock` on `<dir>/.gpucredit.lock`: the
    kernel releases it when its holder exits, however it exits, so the file a killed run
    leaves behind (a dead pid) locks nothing."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._handle = None

    def acquire(self) -> OutputLock:
        if fcntl is None:  # pragma: no cover - not POSIX
            return self
        while True:
            try:
                handle = open(self.path, "a+")
            except OSError as error:
                raise ResultsError(f"cannot lock {self.path}: {error.strerror or error}") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise ResultsError(
                    f"{self.directory} is in use by another gpucredit run (pid {holder}): wait "
                    "for it to finish or choose another --out"
                ) from None
            # The previous holder removes the file as it releases it: if it did so between
            # our open and flock, we hold a lock on a name no longer there; start again.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # while still held (see acquire)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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


def input_hashes(book: Book, assumptions: Assumptions) -> dict[str, str]:
    """What ties a file to the inputs of a run (reverse_stress.json to a run's summary)."""
    return {"book_sha256": book_sha256(book), "assumptions_sha256": assumptions_sha256(assumptions)}


def write_results(
    result: RunResult, directory: str | Path, book: Book, assumptions: Assumptions
) -> list[Path]:
    """Write every result file of a run into `directory` (a str or Path, created if need
    be) as one transaction: each file goes into a staging directory first, and only when all
    are complete are they moved in (and the files of an earlier run this one has no
    counterpart for removed), so a failure part-way leaves the previous results as they
    were. Returns the paths written::

        write_results(simulate(book, assumptions), "results", book, assumptions)
    """
    from gpucredit.io.report import render_report_from_dir

    if not str(directory).strip():  # Path("") would be the current directory
        raise ResultsError("the output directory must not be empty")
    directory = prepare_output_dir(Path(directory))

    run_id = uuid.uuid4().hex
    summary = result.summary()
    summary["metadata"] |= {"run_id": run_id, "book_file_sha256": file_sha256(book.source)}
    summary["metadata"] |= input_hashes(book, assumptions)
    summary["book"] = book_summary(book, assumptions)
    summary["loss_histogram"] = result.histogram.to_dict()
    # Every parquet file says which run wrote it.
    parquet_metadata = {
        "gpucredit.run_id": run_id,
        "gpucredit.version": __version__,
        "gpucredit.seed": str(summary["metadata"].get("seed", result.config.seed)),
        "gpucredit.book_sha256": summary["metadata"]["book_sha256"],
    }
    # Every loss (losses.parquet), or in tails-only mode the run's largest losses: the tail.
    if result.losses_usd is not None:
        name, scenarios, losses = LOSSES_FILE, np.arange(len(result.losses_usd)), result.losses_usd
    else:
        name, scenarios, losses = TAIL_LOSSES_FILE, result.tail.indices, result.tail.losses_usd
    tables = {name: {"scenario": scenarios.astype(np.int64, copy=False), "loss_usd": losses}}
    for name, part in (
        (CONTRIBUTIONS_FILE, result.contributions),
        (SENSITIVITIES_FILE, result.sensitivities),
    ):
        if part is not None:
            tables[name] = part.columns()

    staging = _staging_directory(directory)
    try:
        for name, columns in tables.items():
            table = pa.table(columns)
            write_parquet(staging / name, table.replace_schema_metadata(parquet_metadata))
        write_json(staging / SUMMARY_FILE, summary)
        design = directory / REVERSE_STRESS_FILE
        if design.is_file():  # the report shows it when it is of this book and assumptions
            shutil.copyfile(design, staging / REVERSE_STRESS_FILE)
        render_report_from_dir(staging)
        (staging / REVERSE_STRESS_FILE).unlink(missing_ok=True)  # not this run's file
        written = [directory / name for name in RESULT_FILES if (staging / name).exists()]
        # The transaction's commit: every file complete; rename each in (summary.json last),
        # then remove what an earlier run wrote that this one has not (a directory never
        # mixes two runs).
        for path in written:
            os.replace(staging / path.name, path)
        for name in RESULT_FILES:
            if directory / name not in written:
                (directory / name).unlink(missing_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise ResultsError(f"cannot write the results in {directory}: {reason}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _staging_directory(directory: Path) -> Path:
    """A fresh hidden directory inside `directory` (the same file system, so each rename
    into place is atomic; the run's lock covers it)."""
    staging = directory / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
    except OSError as error:
        raise ResultsError(f"cannot write {staging}: {error.strerror or error}") from None
    return staging


class Checkpoint:
    """Completed chunks (or, tails-only, batches) of pass 1, saved in `<out>/.checkpoint/` as
    they finish; a resumed run takes only those of its own mode.

    The run's identity (book and assumptions hashes, scenarios, seed, mode, backend,
    precision, chunk size, alphas, importance shift) is stored in run.json and its hash, the
    run id, in every chunk and batch file with a checksum of its arrays; `--resume`
    continues only the same run, and a file of another run, a damaged one, or one whose
    values cannot be a run's (not float64, not finite, negative losses, wrong lengths,
    statistics inconsistent with the batch's losses) is refused. A resumed run gives exactly
    the result of an uninterrupted one because chunks are addressed by their first scenario
    index and the random numbers by scenario. `clear` deletes only the files of this run.
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
        normal_shift=None,
        alphas=None,
    ):
        self.directory = out_dir / CHECKPOINT_DIR
        self.chunk_size = chunk_size
        self.scenarios = scenarios
        self.n_loans = len(book)
        self.alphas = None if alphas is None else [float(a) for a in alphas]
        self.identity = input_hashes(book, assumptions) | {
            "scenarios": scenarios,
            "seed": seed,
            "mode": mode,
            "backend": backend,
            "precision": precision,
            "chunk_size": chunk_size,
            "importance_sampling": importance_sampling,
            "importance_shift_sha256": _shift_sha256(normal_shift),
            "alphas": self.alphas,
        }
        text = json.dumps(self.identity, sort_keys=True)
        self.run_id = hashlib.sha256(text.encode()).hexdigest()
        self._owned: set[Path] = set()  # what `clear` may delete: this run's files only
        identity_path = self.directory / RUN_FILE
        Checkpoint.preflight(out_dir, resume)
        if resume:
            self._check_identity(identity_path, out_dir)
            self._saved_files()  # an unexpected file name is refused before any work
        else:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ResultsError(
                    f"cannot write {self.directory}: {error.strerror or error}"
                ) from None
            write_json(identity_path, self.identity | {"run_id": self.run_id})
        self._owned.add(identity_path)

    @staticmethod
    def preflight(out_dir: Path, resume: bool) -> None:
        """Before any work: `--resume` needs a checkpoint, and a run without it never starts
        over an interrupted run's (nor deletes it)."""
        directory = out_dir / CHECKPOINT_DIR
        if resume:
            if not (directory / RUN_FILE).exists():
                raise ResultsError(
                    f"nothing to resume in {out_dir}: no {CHECKPOINT_DIR}/{RUN_FILE}"
                )
            return
        try:
            leftover = directory.exists() and any(directory.iterdir())
        except OSError as error:
            raise ResultsError(f"cannot read {directory}: {error.strerror or error}") from None
        if leftover:
            raise ResultsError(
                f"{out_dir} holds the checkpoint of an interrupted run ({directory}): pass "
                "--resume to continue it, or remove that directory to start afresh"
            )

    def _check_identity(self, identity_path: Path, out_dir: Path) -> None:
        if not identity_path.is_file():  # a FIFO or device would block the read
            raise self._damaged(identity_path, "not a regular file")
        try:
            saved = json.loads(identity_path.read_text())
        except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
            reason = getattr(error, "strerror", None) or "not valid JSON"
            raise self._damaged(identity_path, f"cannot be read: {reason}") from None
        if not isinstance(saved, dict):
            raise self._damaged(identity_path, "not a JSON object")
        saved_chunk = saved.get("chunk_size")
        if isinstance(saved_chunk, bool) or not isinstance(saved_chunk, int) or saved_chunk < 1:
            raise self._damaged(
                identity_path, f"chunk_size must be a whole number >= 1, got {saved_chunk!r}"
            )
        saved_id = saved.pop("run_id", None)
        if saved != self.identity:
            keys = self.identity.keys() | saved.keys()
            changed = sorted(k for k in keys if saved.get(k) != self.identity.get(k))
            hint = f" (it ran with --chunk-size {saved_chunk})" if "chunk_size" in changed else ""
            raise ResultsError(
                f"cannot resume the run in {out_dir}: it was started with a different "
                f"{', '.join(changed)}{hint}"
            )
        if saved_id != self.run_id:
            raise self._damaged(identity_path, "its run_id does not match its settings")

    def _damaged(self, path: Path, problem: str) -> ResultsError:
        return ResultsError(
            f"cannot resume from the checkpoint file {path}: {problem}; remove the checkpoint "
            f"directory {self.directory} and rerun without --resume to start afresh"
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
            if not path.is_file():  # a FIFO or device would block np.load
                raise self._damaged(path, "not a regular file")
            saved.append((path, match[1], int(match[2])))
        return saved

    def _path(self, first: int, kind: str) -> Path:
        return self.directory / f"{kind}-{first:012d}.npz"

    def save(self, first: int, output: ChunkOutput | BatchOutput) -> None:
        """Save a chunk (every loss kept) or a batch (tails-only mode) of pass 1, with the
        run id and a checksum of its arrays."""
        if isinstance(output, BatchOutput):
            kind, arrays = "batch", _batch_arrays(output)
        else:
            kind = "chunk"
            arrays = {
                "losses_usd": output.losses_usd,
                "loan_loss_sum_usd": output.loan_loss_sum_usd,
                "loan_default_probability_sum": output.loan_default_probability_sum,
                "loan_defaulted_exposure_sum_usd": output.loan_defaulted_exposure_sum_usd,
            }
            if output.log_weights is not None:
                arrays["log_weights"] = output.log_weights
        arrays = {name: np.asarray(values) for name, values in arrays.items()}
        checksum = _checksum(self.run_id, kind, first, arrays)
        path = self._path(first, kind)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, run_id=self.run_id, checksum=checksum, **arrays)

        self._owned.add(path)
        write_atomically(path, write)

    def done(self) -> dict[int, ChunkOutput | BatchOutput]:
        """The saved chunks and batches, keyed by their first scenario, each checked."""
        outputs: dict[int, ChunkOutput | BatchOutput] = {}
        for path, kind, first in self._saved_files():
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            except _NPZ_READ_ERRORS:
                raise self._damaged(
                    path, "not a readable .npz file (truncated or corrupt)"
                ) from None
            run_id, checksum = arrays.pop("run_id", None), arrays.pop("checksum", None)
            if run_id is None or checksum is None:
                raise self._damaged(path, "no run id or checksum (not written by this run)")
            if run_id.shape != () or run_id.item() != self.run_id:
                raise self._damaged(
                    path, "written by another run (another book, assumptions, seed or settings)"
                )
            if checksum.shape != () or checksum.item() != _checksum(
                self.run_id, kind, first, arrays
            ):
                raise self._damaged(path, "its arrays do not match their checksum")
            problem = _arrays_problem(kind, arrays, self.n_loans) or _values_problem(
                kind, first, arrays, self.scenarios, self.chunk_size, self.alphas
            )
            if problem is not None:
                raise self._damaged(path, problem)
            if kind == "chunk":
                outputs[first] = ChunkOutput(**arrays)
            else:
                try:
                    outputs[first] = _batch_from_arrays(first, arrays)
                except (TypeError, ValueError, OverflowError) as error:
                    raise self._damaged(path, f"unusable values ({error})") from None
            self._owned.add(path)
        return outputs

    def clear(self) -> None:
        """Delete this run's files (never another's), then the directory if it is empty."""
        for path in self._owned:
            path.unlink(missing_ok=True)
        self._owned.clear()
        try:
            self.directory.rmdir()
        except OSError:  # not empty: someone else's files stay
            pass


def _shift_sha256(normal_shift) -> str | None:
    if normal_shift is None:
        return None
    shift = np.ascontiguousarray(normal_shift, dtype=np.float64)
    return hashlib.sha256(f"{shift.shape}".encode() + shift.tobytes()).hexdigest()


def _checksum(run_id: str, kind: str, first: int, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays (names, dtypes, shapes, bytes), the run id and the file's place."""
    digest = hashlib.sha256(f"{run_id}:{kind}:{first}".encode())
    for name in sorted(arrays):
        values = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{values.dtype.str}:{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


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
_INTEGER_ARRAYS = ("tail_indices", "count", "histogram_counts", "zero_count", "chunk_size")


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
        want = np.int64 if name in _INTEGER_ARRAYS else np.float64
        if values.dtype != want:
            return f"array {name} has dtype {values.dtype}, expected {np.dtype(want)}"
    if kind == "chunk":
        if arrays["losses_usd"].ndim != 1:
            return f"losses_usd has shape {arrays['losses_usd'].shape}, expected one dimension"
        shapes = {name: (n_loans,) for name in _CHUNK_ARRAYS[1:]}
        if "log_weights" in arrays:
            shapes["log_weights"] = arrays["losses_usd"].shape
    else:
        n_alphas = arrays["alphas"].shape
        shapes = {"loan_sums": (3, n_loans), "histogram_counts": (HISTOGRAM_BINS,)}
        shapes |= {"var_usd": n_alphas, "es_usd": n_alphas}
        shapes["tail_losses_usd"] = arrays["tail_indices"].shape
        for name in ("count", "loss_sum_usd", "loss_m2_usd2", "bin_width_usd", "zero_count"):
            shapes[name] = ()
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            return f"{name} has shape {arrays[name].shape}, expected {shape} for this book"
    return None


def _values_problem(
    kind: str, first: int, a: dict[str, np.ndarray], scenarios: int, chunk_size: int, alphas
) -> str | None:
    """What makes a chunk's or batch's values impossible for this run, or None: non-finite
    or negative losses and sums, a place or length outside the run, batch statistics that
    contradict the batch's own losses."""
    for name, values in a.items():
        finite = values if name != "tail_floor_usd" else values[values != np.inf]
        if not np.all(np.isfinite(finite)):
            return f"{name} holds a value that is not finite"
        if name != "log_weights" and np.any(values < 0) and name != "chunk_size":
            return f"{name} holds a negative value"
    if first >= scenarios:
        return f"it starts at scenario {first:,}, beyond the run's {scenarios:,}"
    if kind == "chunk":
        expected = min(chunk_size, scenarios - first)
        if first % chunk_size or len(a["losses_usd"]) != expected:
            return (
                f"{len(a['losses_usd']):,} losses from scenario {first:,}: this run's chunks "
                f"hold {chunk_size:,} from a multiple of {chunk_size:,}"
            )
        return None
    count = int(a["count"])
    if not 1 <= count <= scenarios - first:
        return f"count {count:,} does not fit the run's {scenarios:,} scenarios from {first:,}"
    indices, tail = a["tail_indices"], a["tail_losses_usd"]
    if len(indices) > count or np.any(indices < first) or np.any(indices >= first + count):
        return f"tail_indices outside the batch [{first:,}, {first + count:,})"
    if int(a["histogram_counts"].sum()) != count or int(a["zero_count"]) > count:
        return f"the histogram counts {int(a['histogram_counts'].sum()):,} losses, not {count:,}"
    if alphas is not None and a["alphas"].tolist() != alphas:
        return f"alphas {a['alphas'].tolist()} are not the run's {alphas}"
    if not a["bin_width_usd"] > 0:
        return "bin_width_usd is not positive"
    tolerance = 1e-9  # relative: the same sums added in another order
    loss_sum, top = float(a["loss_sum_usd"]), float(tail.max()) if len(tail) else 0.0
    if len(tail) and loss_sum < float(tail.sum()) * (1 - tolerance):
        return "loss_sum_usd is below the sum of the batch's own largest losses"
    if len(tail) and loss_sum / count > top * (1 + tolerance):
        return "loss_sum_usd gives a mean above the batch's largest loss"
    var, es = a["var_usd"], a["es_usd"]
    if len(tail) and (np.any(es > top * (1 + tolerance)) or np.any(var > es * (1 + tolerance))):
        return "var_usd and es_usd are not within the batch's losses (VaR <= ES <= max)"
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
