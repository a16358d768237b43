"""The results directory's checkpoint in tails-only mode: batches saved as they finish,
read back exactly, and a resumed run that recomputes only the missing ones."""

from __future__ import annotations

import numpy as np

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.results import Checkpoint
from gpucredit.portfolio.engine import BatchOutput, ChunkOutput, run_tails_pass1, simulate
from gpucredit.portfolio.risk import largest_losses

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
        def run_chunk(self, first, count):
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
