"""The results directory's checkpoint: batches saved as they finish, read back exactly, and a
resumed run that recomputes only the missing ones; files of another run, damaged or
impossible ones refused; the lock on a results directory; results written as one
transaction."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.results import (
    LOCK_FILE,
    RESULT_FILES,
    Checkpoint,
    OutputLock,
    ResultsError,
    _checksum,
    refuse_overwriting_inputs,
    write_results,
)
from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.risk import largest_losses
from gpucredit.portfolio.runner import BatchOutput, run_tails_pass1

SCENARIOS = 500
KWARGS = dict(scenarios=SCENARIOS, seed=2, backend="numpy", chunk_size=64, sensitivities=False)


def _checkpoint(out, book, assumptions, resume: bool) -> Checkpoint:
    return Checkpoint(
        out, book, assumptions, SCENARIOS, 2, "conditional", "numpy", "float64", resume,
        chunk_size=64,
    )  # fmt: skip


def test_tails_only_checkpoint_round_trip_and_resume(tmp_path):
    book, assumptions = random_book(8, 10), default_assumptions()
    saved: dict[int, BatchOutput] = {}

    class Recording:
        def __init__(self, checkpoint: Checkpoint):
            self.checkpoint = checkpoint

        def done(self):
            return self.checkpoint.done()

        def save(self, first, output):
            saved[first] = output
            self.checkpoint.save(first, output)

    checkpoint = _checkpoint(tmp_path, book, assumptions, resume=False)
    first = simulate(
        book, assumptions, keep_losses=False, checkpoint=Recording(checkpoint), **KWARGS
    )
    done = checkpoint.done()
    assert sorted(done) == sorted(saved) and len(done) == 32
    for start, output in saved.items():
        back = done[start]
        assert isinstance(back, BatchOutput) and back.statistics == output.statistics
        np.testing.assert_array_equal(back.tail.indices, output.tail.indices)
        np.testing.assert_array_equal(back.tail.losses_usd, output.tail.losses_usd)
        np.testing.assert_array_equal(back.histogram.counts, output.histogram.counts)
        assert back.histogram.bin_width_usd == output.histogram.bin_width_usd
        np.testing.assert_array_equal(back.loan_sums, output.loan_sums)
        assert back.chunk_size == output.chunk_size is not None

    batches = sorted((tmp_path / ".checkpoint").glob("batch-*.npz"))
    for path in batches[20:]:
        path.unlink()
    saved.clear()
    resumed = _checkpoint(tmp_path, book, assumptions, resume=True)
    again = simulate(book, assumptions, keep_losses=False, checkpoint=Recording(resumed), **KWARGS)
    assert len(saved) == 12  # only the missing batches ran
    assert len(list((tmp_path / ".checkpoint").glob("batch-*.npz"))) == 32
    assert again.measures.to_dict() == first.measures.to_dict()
    np.testing.assert_array_equal(again.tail.indices, first.tail.indices)
    for key, values in first.contributions.expected_shortfall_usd.items():
        np.testing.assert_array_equal(values, again.contributions.expected_shortfall_usd[key])
    np.testing.assert_array_equal(
        again.contributions.expected_loss_usd, first.contributions.expected_loss_usd
    )
    # A run keeping every loss ignores the saved batches (and checkpoints chunks).
    kept = simulate(book, assumptions, keep_losses=True, checkpoint=resumed, **KWARGS)
    assert kept.measures.to_dict() == first.measures.to_dict()
    assert len(list((tmp_path / ".checkpoint").glob("chunk-*.npz"))) == 8


def test_a_batch_taken_again_down_to_a_floor_resumes_as_it_was(tmp_path):
    """A batch rerun down to the merged tail's floor is saved with that floor: a resumed run
    takes every batch from the checkpoint, runs nothing again and merges the same tail."""
    S = 3200
    losses = np.random.default_rng(0).uniform(0.0, 1000.0, S)
    losses[:100] = 0.0
    losses[:25] = 1e6 + np.arange(25)  # more of the top k than batch 0's margin, zeros around
    computed: list[int] = []

    class Given:
        def run_chunk(self, first, count, padded_count=None):
            computed.append(first)
            zeros = np.zeros(2)
            return ChunkOutput(losses[first : first + count].copy(), zeros, zeros, zeros)

    checkpoint = Checkpoint(
        tmp_path, random_book(8, 2), default_assumptions(), S, 2, "conditional", "numpy",
        "float64", False, chunk_size=64,
    )  # fmt: skip
    first = run_tails_pass1(Given(), S, 64, (0.99,), on_batch=checkpoint.save)
    assert computed.count(0) == 2  # batch 0 ran again, down to a floor
    done = checkpoint.done()
    assert done[0].tail.floor_usd < done[0].tail.losses_usd.min()
    computed.clear()
    again = run_tails_pass1(Given(), S, 64, (0.99,), done=done)
    assert computed == []
    np.testing.assert_array_equal(again.tail.indices, first.tail.indices)
    np.testing.assert_array_equal(again.tail.indices, largest_losses(losses, 35).indices)


# ----------------------------------------------------------------------------- damaged checkpoints


def _saved_chunk_checkpoint(tmp_path, book, assumptions) -> Checkpoint:
    checkpoint = _checkpoint(tmp_path, book, assumptions, resume=False)
    n = len(book)
    checkpoint.save(0, ChunkOutput(np.arange(64.0), np.ones(n), np.ones(n), np.ones(n)))
    return checkpoint


RUN_JSON_DAMAGE = [
    pytest.param(b'{"book_sha256": "ab', id="truncated-json"),
    pytest.param(b"\x00\xff\xfe not json", id="binary"),
    pytest.param(b"[1, 2, 3]", id="not-an-object"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("damage", RUN_JSON_DAMAGE)
def test_a_damaged_run_json_is_a_results_error(tmp_path, damage):
    book, assumptions = random_book(8, 4), default_assumptions()
    _checkpoint(tmp_path, book, assumptions, resume=False)
    run_json = tmp_path / ".checkpoint" / "run.json"
    run_json.write_bytes(damage)
    with pytest.raises(ResultsError) as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True)
    message = str(caught.value)
    assert str(run_json) in message and "without --resume" in message


@pytest.mark.parametrize("chunk_size", ['"64"', "-8", "0", "6.5", "true", "null"])
def test_a_bad_chunk_size_in_run_json_is_a_results_error(tmp_path, chunk_size):
    book, assumptions = random_book(8, 4), default_assumptions()
    _checkpoint(tmp_path, book, assumptions, resume=False)
    run_json = tmp_path / ".checkpoint" / "run.json"
    text = json.loads(run_json.read_text())
    text["chunk_size"] = "@"
    run_json.write_text(json.dumps(text).replace('"@"', chunk_size))
    with pytest.raises(ResultsError, match="chunk_size") as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True)
    assert str(run_json) in str(caught.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _flip_data_bytes(path):
    data = bytearray(path.read_bytes())
    start = data.index(b"\x93NUMPY") + 200  # inside the first array's data
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _garbage(path):
    path.write_bytes(b"this is not an npz file")


def _empty(path):
    path.write_bytes(b"")


def _wrong_keys(path):
    np.savez(path, something_else=np.zeros(3))


def _wrong_shapes(path):
    np.savez(
        path, losses_usd=np.zeros(64), loan_loss_sum_usd=np.zeros(7),
        loan_default_probability_sum=np.zeros(7), loan_defaulted_exposure_sum_usd=np.zeros(7),
    )  # fmt: skip


def _object_array(path):
    np.savez(
        path, losses_usd=np.array([None, "x"], dtype=object), loan_loss_sum_usd=np.zeros(4),
        loan_default_probability_sum=np.zeros(4), loan_defaulted_exposure_sum_usd=np.zeros(4),
    )  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_data_bytes, _garbage, _empty, _wrong_keys, _wrong_shapes, _object_array],
)
def test_a_damaged_chunk_file_is_a_results_error(tmp_path, damage):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    path = tmp_path / ".checkpoint" / "chunk-000000000000.npz"
    damage(path)
    resumed = _checkpoint(tmp_path, book, assumptions, resume=True)
    with pytest.raises(ResultsError) as caught:
        resumed.done()
    message = str(caught.value)
    assert str(path) in message and "without --resume" in message


def test_a_damaged_batch_file_is_a_results_error(tmp_path):
    book, assumptions = random_book(8, 4), default_assumptions()
    checkpoint = _checkpoint(tmp_path, book, assumptions, resume=False)
    simulate(book, assumptions, keep_losses=False, checkpoint=checkpoint, **KWARGS)
    batches = sorted((tmp_path / ".checkpoint").glob("batch-*.npz"))
    assert batches
    np.savez(batches[3], loan_sums=np.zeros((3, 4)))  # the statistics are missing
    with pytest.raises(ResultsError) as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True).done()
    assert str(batches[3]) in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["chunk-abc.npz", "chunk-000000000000-1.npz", "chunk.npz", "losses-000000000000.npz"],
)
def test_an_unexpected_file_in_the_checkpoint_is_a_results_error(tmp_path, name):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    stray = tmp_path / ".checkpoint" / name
    np.savez(stray, losses_usd=np.zeros(64))
    with pytest.raises(ResultsError) as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True).done()
    message = str(caught.value)
    assert str(stray) in message and "without --resume" in message


def test_an_intact_checkpoint_still_reads_back(tmp_path):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    done = _checkpoint(tmp_path, book, assumptions, resume=True).done()
    assert list(done) == [0] and isinstance(done[0], ChunkOutput)
    np.testing.assert_array_equal(done[0].losses_usd, np.arange(64.0))
    assert done[0].log_weights is None


# ----------------------------------------------------------------------------- one run's files only
# (issue 20, item 1)


def _resave(path, checkpoint: Checkpoint, kind: str, first: int, **changes):
    """Rewrite a saved file with `changes` to its arrays and a checksum that matches them:
    the contents checks, not the checksum, must refuse it."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k not in ("run_id", "checksum")}
    arrays |= changes
    checksum = _checksum(checkpoint.run_id, kind, first, arrays)
    np.savez(path, run_id=checkpoint.run_id, checksum=checksum, **arrays)


def test_a_chunk_of_another_run_is_refused(tmp_path):
    """Chunks copied from a run with another seed (or any other setting) are not mixed in."""
    book, assumptions = random_book(8, 4), default_assumptions()
    other = Checkpoint(
        tmp_path / "other", book, assumptions, SCENARIOS, 3, "conditional", "numpy", "float64",
        False, chunk_size=64,
    )  # fmt: skip
    n = len(book)
    other.save(64, ChunkOutput(np.arange(64.0), np.ones(n), np.ones(n), np.ones(n)))
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    copied = tmp_path / ".checkpoint" / "chunk-000000000064.npz"
    copied.write_bytes((tmp_path / "other" / ".checkpoint" / copied.name).read_bytes())
    with pytest.raises(ResultsError, match="written by another run") as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True).done()
    assert str(copied) in str(caught.value)


def test_a_chunk_moved_to_another_place_or_edited_fails_its_checksum(tmp_path):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    saved = tmp_path / ".checkpoint" / "chunk-000000000000.npz"
    moved = saved.with_name("chunk-000000000064.npz")
    saved.rename(moved)
    with pytest.raises(ResultsError, match="checksum"):
        _checkpoint(tmp_path, book, assumptions, resume=True).done()
    moved.rename(saved)
    with np.load(saved) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["losses_usd"] = arrays["losses_usd"] * 2  # the old checksum kept
    np.savez(saved, **arrays)
    with pytest.raises(ResultsError, match="checksum"):
        _checkpoint(tmp_path, book, assumptions, resume=True).done()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (dict(losses_usd=np.full(64, -1e12)), "negative"),
        (dict(losses_usd=np.zeros(64, np.int8)), "dtype int8"),
        (dict(losses_usd=np.zeros(64, np.complex128)), "dtype complex128"),
        (dict(losses_usd=np.full(64, np.nan)), "not finite"),
        (dict(losses_usd=np.full(64, np.inf)), "not finite"),
        (dict(loan_loss_sum_usd=-np.ones(4)), "negative"),
        (dict(losses_usd=np.zeros(10)), "this run's chunks"),
    ],
)
def test_impossible_chunk_values_are_refused_even_with_a_matching_checksum(
    tmp_path, changes, problem
):
    book, assumptions = random_book(8, 4), default_assumptions()
    checkpoint = _saved_chunk_checkpoint(tmp_path, book, assumptions)
    path = tmp_path / ".checkpoint" / "chunk-000000000000.npz"
    _resave(path, checkpoint, "chunk", 0, **changes)
    with pytest.raises(ResultsError, match=problem):
        _checkpoint(tmp_path, book, assumptions, resume=True).done()


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("loss_sum_usd", -5e15, "negative"),
        ("loss_sum_usd", 5e15, "mean above"),
        ("loss_sum_usd", 0.0, "below the sum"),
        ("count", 10**9, "count"),
        ("es_usd", None, "VaR <= ES"),
    ],
)
def test_batch_statistics_inconsistent_with_their_losses_are_refused(
    tmp_path, name, value, problem
):
    book, assumptions = random_book(8, 4), default_assumptions()
    checkpoint = _checkpoint(tmp_path, book, assumptions, resume=False)
    simulate(book, assumptions, keep_losses=False, checkpoint=checkpoint, **KWARGS)
    path = sorted((tmp_path / ".checkpoint").glob("batch-*.npz"))[2]
    first = int(path.stem.split("-")[1])
    with np.load(path) as data:
        values = data[name]
    changed = np.zeros_like(values) if value is None else np.array(value, values.dtype)
    _resave(path, checkpoint, "batch", first, **{name: changed})
    with pytest.raises(ResultsError, match=problem) as caught:
        _checkpoint(tmp_path, book, assumptions, resume=True).done()
    assert str(path) in str(caught.value)


def test_a_run_without_resume_over_an_interrupted_one_is_refused(tmp_path):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    with pytest.raises(ResultsError, match="pass --resume to continue it, or remove"):
        _checkpoint(tmp_path, book, assumptions, resume=False)
    assert (tmp_path / ".checkpoint" / "chunk-000000000000.npz").exists()  # nothing deleted


def test_clear_deletes_only_the_files_of_its_run(tmp_path):
    book, assumptions = random_book(8, 4), default_assumptions()
    checkpoint = _saved_chunk_checkpoint(tmp_path, book, assumptions)
    stranger = tmp_path / ".checkpoint" / "notes.txt"
    stranger.write_text("not gpucredit's")
    checkpoint.clear()
    assert [p.name for p in (tmp_path / ".checkpoint").iterdir()] == ["notes.txt"]
    resumed = _saved_chunk_checkpoint(tmp_path / "again", book, assumptions)
    resumed = _checkpoint(tmp_path / "again", book, assumptions, resume=True)
    resumed.done()
    resumed.clear()  # a resumed run owns what it resumed
    assert not (tmp_path / "again" / ".checkpoint").exists()


def test_the_output_lock_refuses_a_second_run_and_survives_a_dead_holder(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(ResultsError, match=f"another gpucredit run \\(pid {os.getpid()}\\)"):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    (tmp_path / LOCK_FILE).write_text("999999999\n")  # a killed run's file: no flock held
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


# ----------------------------------------------------------------------------- one transaction
# (issue 20, item 3)


@pytest.fixture(scope="module")
def two_runs():
    book, assumptions = random_book(8, 6), default_assumptions()
    kwargs = dict(scenarios=256, backend="numpy", chunk_size=64, sensitivities=False)
    first = simulate(book, assumptions, seed=1, **kwargs)
    second = simulate(book, assumptions, seed=2, keep_losses=False, **kwargs)
    return book, assumptions, first, second


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("failure", ["report", "summary"])
def test_a_failure_part_way_leaves_the_previous_results_intact(
    tmp_path, monkeypatch, two_runs, failure
):
    """Disk full at report.html, or an infinity in summary.json after losses.parquet: the
    directory keeps the earlier run's files, all of them, and nothing of the failed one."""
    import gpucredit.io.report as report
    import gpucredit.io.results as results

    book, assumptions, first, second = two_runs
    written = write_results(first, tmp_path, book, assumptions)
    assert {p.name for p in written} >= {"losses.parquet", "summary.json", "report.html"}
    before = _snapshot(tmp_path)
    if failure == "report":

        def full(directory):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(report, "render_report_from_dir", full)
    else:
        original = results.write_json

        def infinite(path, document):
            return original(path, document | {"oops": float("inf")})

        monkeypatch.setattr(results, "write_json", infinite)
    with pytest.raises(ResultsError):
        write_results(second, tmp_path, book, assumptions)
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_every_parquet_file_names_its_run(tmp_path, two_runs):
    book, assumptions, first, _ = two_runs
    write_results(first, tmp_path, book, assumptions)
    summary = json.loads((tmp_path / "summary.json").read_text())["metadata"]
    for name in ("losses.parquet", "contributions.parquet"):
        metadata = pq.read_schema(tmp_path / name).metadata
        assert metadata[b"gpucredit.run_id"].decode() == summary["run_id"]
        assert metadata[b"gpucredit.seed"] == b"1"
        assert metadata[b"gpucredit.version"].decode() == summary["version"]
        assert metadata[b"gpucredit.book_sha256"].decode() == summary["book_sha256"]


def test_an_output_directory_holding_an_input_is_refused(tmp_path):
    book_file = tmp_path / "losses.parquet"
    book_file.write_bytes(b"the user's book")
    with pytest.raises(ResultsError, match="would overwrite the input book"):
        refuse_overwriting_inputs(tmp_path, {"book": str(book_file)}, RESULT_FILES)
    refuse_overwriting_inputs(tmp_path / "elsewhere", {"book": str(book_file)}, RESULT_FILES)
    assert book_file.read_bytes() == b"the user's book"


@pytest.mark.parametrize("name", ["run.json", "chunk-000000000000.npz"])
def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(tmp_path, name):
    book, assumptions = random_book(8, 4), default_assumptions()
    _saved_chunk_checkpoint(tmp_path, book, assumptions)
    path = tmp_path / ".checkpoint" / name
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ResultsError, match="not a regular file"):
        _checkpoint(tmp_path, book, assumptions, resume=True).done()


def test_write_results_takes_a_str_path_and_refuses_an_empty_one(tmp_path):
    """A notebook user writes `write_results(result, "results", ...)`: a str works like a
    Path (the directory is created); '' is refused, never the current directory."""
    book, assumptions = random_book(2, 6), default_assumptions()
    result = simulate(book, assumptions, scenarios=64, backend="numpy", sensitivities=False)
    written = write_results(result, str(tmp_path / "new" / "results"), book, assumptions)
    assert (tmp_path / "new" / "results" / "summary.json") in written
    with pytest.raises(ResultsError, match="must not be empty"):
        write_results(result, "", book, assumptions)
