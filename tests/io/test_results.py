"""The results directory's checkpoint in tails-only mode: batches saved as they finish,
read back exactly, and a resumed run that recomputes only the missing ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.results import Checkpoint, ResultsError
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
