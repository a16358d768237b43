"""Euler contributions (docs/spec.md §7) by a second pass over the tail scenarios only.

ES_{α,i} = Σ_j c_j L_i(ω_j) with the tail coefficients c_j of `risk.tail_coefficients`, so
Σ_i ES_{α,i} = ES_α to rounding. The tail is regenerated from the scenario indices, in
chunks, so no [scenarios × loans] array over all scenarios is ever kept. The tail sets come
from the run (`risk.tail_sets`), whether pass 1 kept every loss or only the tails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit.portfolio.book import Book
from gpucredit.portfolio.risk import LossTail, alpha_label, tail_sets
from gpucredit.portfolio.runner import LocalRunner, ProgressCallback, Runner, owner_of


@dataclass(frozen=True)
class Contributions:
    """Per-loan risk in book order. `expected_shortfall_usd[key]` is [N] per α key "0.99"."""

    loan_id: np.ndarray
    borrower_id: np.ndarray
    borrower_type: np.ndarray
    gpu_generation: np.ndarray
    balance_usd: np.ndarray
    expected_loss_usd: np.ndarray  # [N] EL_i
    expected_shortfall_usd: dict[str, np.ndarray]  # α key -> [N] ES_{α,i}
    horizon_pd: np.ndarray  # [N]
    mean_lgd: np.ndarray  # [N] fraction of exposure at default (nan: never defaults)

    def columns(self) -> dict[str, np.ndarray]:
        """Flat columns for a table: the ES shares named by `risk.alpha_label`
        (``es_99_usd``, ``es_99_9_usd``)."""
        cols = {
            "loan_id": self.loan_id,
            "borrower_id": self.borrower_id,
            "borrower_type": self.borrower_type,
            "gpu_generation": self.gpu_generation,
            "balance_usd": self.balance_usd,
            "expected_loss_usd": self.expected_loss_usd,
            "horizon_pd": self.horizon_pd,
            "mean_lgd": self.mean_lgd,
        }
        for key, values in self.expected_shortfall_usd.items():
            cols[f"es_{alpha_label(float(key))}_usd"] = values
        return cols

    def by(self, column: str) -> dict[str, dict[str, float]]:
        """EL and ES summed by `borrower_id`, `borrower_type` or `gpu_generation`."""
        groups = getattr(self, column)
        names, inverse = np.unique(groups, return_inverse=True)
        out: dict[str, dict[str, float]] = {}
        measures = {"expected_loss_usd": self.expected_loss_usd, "balance_usd": self.balance_usd}
        measures |= {
            f"es_{alpha_label(float(k))}_usd": v for k, v in self.expected_shortfall_usd.items()
        }
        for field, values in measures.items():
            sums = np.bincount(inverse, weights=values, minlength=len(names))
            for name, total in zip(names, sums, strict=True):
                out.setdefault(str(name), {})[field] = float(total)
        return out


def contribution_of_chunk(backend, indices: np.ndarray, rows: dict) -> dict:
    """Pass-2 task: {α key: Σ_j row_j L_i(ω_j)} [N] over one chunk of the tail union, from the
    backend's per-loan losses at those scenarios (`loan_losses_at`)."""
    per_loan = backend.loan_losses_at(indices)  # [chunk, N]
    return {key: row @ per_loan for key, row in rows.items()}


def contribution_tasks(
    tails: dict[str, tuple[np.ndarray, np.ndarray]], chunk_size: int
) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The pass-2 contribution tasks: the union of the tail sets, ascending, cut into chunks
    of `chunk_size` indices, each with its coefficient row per α key (0 outside that α's
    tail)."""
    union = np.unique(np.concatenate([idx for idx, _ in tails.values()]))
    coefficient_rows = {}
    for key, (idx, coef) in tails.items():
        row = np.zeros(len(union))
        row[np.searchsorted(union, idx)] = coef
        coefficient_rows[key] = row
    return [
        (
            union[start : start + chunk_size].astype(np.uint32),
            {key: row[start : start + chunk_size] for key, row in coefficient_rows.items()},
        )
        for start in range(0, len(union), chunk_size)
    ]


def tail_contributions(
    simulation,
    tails: dict[str, tuple[np.ndarray, np.ndarray]],
    n_loans: int,
    chunk_size: int = 1024,
    runner: Runner | None = None,
    owners: Sequence[tuple[int, int, str]] = (),
    progress: ProgressCallback | None = None,
) -> dict[str, np.ndarray]:
    """ES_{α,i} [N] for each α key of `tails` ({key: (scenario indices, coefficients)},
    `risk.tail_sets`), on `simulation` (a `backends.Simulation`, or a built backend with
    `loan_losses_at(indices) -> [S, N]`).

    Each `contribution_tasks` item is one `contribution_of_chunk` task mapped over `runner`
    (this process by default), sent to the worker that ran pass 1 on its first index
    (`owners`, `Pass1.owners`); the results are added in chunk order, so every runner gives
    the same numbers. `progress(done, total)` counts tail scenarios.
    """
    runner = runner or LocalRunner()
    items = contribution_tasks(tails, chunk_size)
    affinity = [owner_of(owners, int(indices[0])) for indices, _ in items]
    results: list = [None] * len(items)
    total, done = sum(len(indices) for indices, _ in items), 0
    for position, partial, _ in runner.map(simulation, contribution_of_chunk, items, affinity):
        results[position] = partial
        done += len(items[position][0])
        if progress is not None:
            progress(done, total)
    contributions = {key: np.zeros(n_loans) for key in tails}
    for partial in results:
        for key in contributions:
            contributions[key] += partial[key]
    return contributions


def tail_loan_contributions(
    simulation,
    losses_usd: np.ndarray,
    weights: np.ndarray | None,
    alphas: Sequence[float],
    n_loans: int,
    chunk_size: int = 1024,
) -> dict[str, np.ndarray]:
    """`tail_contributions` over the tail sets of a run's every loss `losses_usd` [S]
    (`weights`: importance sampling's likelihood ratios, p = w / S, or None), in this
    process."""
    tails = tail_sets(LossTail.of_run(losses_usd, weights, alphas), alphas)
    return tail_contributions(simulation, tails, n_loans, chunk_size)


def make_contributions(
    book: Book,
    expected_loss_usd: np.ndarray,
    expected_shortfall_usd: dict[str, np.ndarray],
    horizon_pd: np.ndarray,
    mean_lgd: np.ndarray,
) -> Contributions:
    return Contributions(
        loan_id=book.loan_id,
        borrower_id=book.borrower_id,
        borrower_type=book.borrower_type,
        gpu_generation=book.gpu_generation,
        balance_usd=book.balance_usd,
        expected_loss_usd=expected_loss_usd,
        expected_shortfall_usd=expected_shortfall_usd,
        horizon_pd=horizon_pd,
        mean_lgd=mean_lgd,
    )
