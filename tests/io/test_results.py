"""The results directory's checkpoint in tails-only mode: batches saved as they finish,
read back exactly, and a resumed run that recomputes only the missing ones."""

from __future__ import annotations

import numpy as np

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.results import Checkpoint
from gpucredit.portfolio.engine import BatchOutput, simulate

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
